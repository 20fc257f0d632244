//! The HTTP side of operator access: naming the operator of a request (bearer token, or the
//! cookie `/login` sets for browsers), and asking [`crate::access::Access`] whether the policy
//! permits what the request does.

use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::access::{Action, Operator, Resource};
use crate::{ApiError, AppState, HttpSources, records};

/// The fleet a run spec names (`[devices] fleet`, "default" when it names none).
pub(crate) fn fleet_of_spec(spec: &str) -> String {
    toml::from_str::<toml::Table>(spec)
        .ok()
        .and_then(|t| t.get("devices")?.get("fleet")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "default".to_string())
}

pub(crate) async fn run_fleet(s: &HttpSources, id: &str) -> Result<String, ApiError> {
    let wanted = id.to_string();
    let spec = records(s, move |r| Ok(r.run(&wanted)?.map(|(_, spec)| spec))).await?;
    spec.map(|spec| fleet_of_spec(&spec))
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no run {id:?}")))
}

/// 403 unless the policy lets `op` do `action` on `resource`; everything is allowed on an
/// endpoint without operators (loopback only).
pub(crate) fn allow(
    s: &HttpSources,
    op: Option<&Operator>,
    action: Action,
    resource: &Resource,
) -> Result<(), ApiError> {
    let Some(access) = &s.access else {
        return Ok(());
    };
    let Some(op) = op else {
        return Err(ApiError(StatusCode::UNAUTHORIZED, "no operator".into()));
    };
    access
        .authorize(op, action, resource)
        .map_err(|why| ApiError(StatusCode::FORBIDDEN, why))
}

pub(crate) async fn allow_run(
    s: &HttpSources,
    op: Option<&Operator>,
    action: Action,
    id: &str,
) -> Result<(), ApiError> {
    if s.access.is_none() {
        return Ok(());
    }
    let run = Resource::Run {
        id: id.to_string(),
        fleet: run_fleet(s, id).await?,
    };
    allow(s, op, action, &run)
}

/// Names the operator of a request from its bearer token or `pollen_token` cookie; 401 for
/// anything else but `/healthz` and `/login`.
pub(crate) async fn authenticate(
    State(app): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(access) = &app.sources.access else {
        return next.run(request).await;
    };
    if matches!(request.uri().path(), "/healthz" | "/login") {
        return next.run(request).await;
    }
    let headers = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("pollen_token="));
    match bearer.or(cookie).and_then(|t| access.authenticate(t)) {
        Some(operator) => {
            request.extensions_mut().insert(operator);
            next.run(request).await
        }
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"pollen\"")],
            "an operator token is required: Authorization: Bearer TOKEN, or open /login?token=TOKEN\n",
        )
            .into_response(),
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct LoginQuery {
    token: String,
}

/// For browsers, whose event streams cannot send headers: checks the token and keeps it in an
/// HTTP-only cookie, then opens the dashboard.
pub(crate) async fn login(State(s): State<HttpSources>, Query(q): Query<LoginQuery>) -> Response {
    let known = s
        .access
        .as_ref()
        .is_none_or(|a| a.authenticate(&q.token).is_some());
    if !known || q.token.contains([';', ',', ' ']) {
        return (StatusCode::UNAUTHORIZED, "unknown token\n").into_response();
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_string()),
            (
                header::SET_COOKIE,
                format!(
                    "pollen_token={}; HttpOnly; SameSite=Strict; Path=/",
                    q.token
                ),
            ),
        ],
    )
        .into_response()
}
