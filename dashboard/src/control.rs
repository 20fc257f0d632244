//! The control API of a long-lived coordinator (`pollen serve`): submit a run, stop one, resume
//! one. JSON over HTTP beside the dashboard's read-only API, so that one endpoint, one set of
//! operators and one Cedar policy cover both:
//!
//! ```text
//! POST /api/runs               body: the run spec (TOML)   202 {"id": ..., "status": "queued"}
//! POST /api/runs/{id}/stop                                 202 {"id": ..., "status": ...}
//! POST /api/runs/{id}/resume                               202 {"id": ..., "status": "queued"}
//! GET  /api/runs, /api/runs/{id}                           (the dashboard's API)
//! ```
//!
//! Authorization: `submit_run` (on the fleet the spec names), `stop_run` and `resume_run` (on
//! the run's fleet). The service behind it is a [`Control`]; this crate does not run anything.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::Serialize;

use crate::access::{Action, Operator, Resource};
use crate::guard::{allow, allow_run, fleet_of_spec};
use crate::{ApiError, HttpSources};

/// Why a control request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The spec does not parse or validate, or cannot be run by this service (400).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The run is not in a state that allows it (409): resuming a completed run, stopping a
    /// finished one.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
}

/// A run's state after a control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Accepted {
    pub id: String,
    pub status: String,
}

/// What a coordinator service does on control requests. Calls may block (they touch the run
/// database); handlers run them off the async workers.
pub trait Control: Send + Sync {
    /// Queues a run of `spec` (TOML).
    fn submit(&self, spec: &str) -> Result<Accepted, ControlError>;
    /// Stops a running run (its current round is abandoned, completed ones stay recorded) or
    /// takes a queued one off the queue.
    fn stop(&self, id: &str) -> Result<Accepted, ControlError>;
    /// Queues an interrupted, stopped or failed run to continue from its records.
    fn resume(&self, id: &str) -> Result<Accepted, ControlError>;
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status = match &e {
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, format!("{e}\n"))
    }
}

fn control(s: &HttpSources) -> Result<std::sync::Arc<dyn Control>, ApiError> {
    s.control.clone().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this endpoint takes no control requests: start runs with `pollen serve`\n".into(),
        )
    })
}

async fn call(
    control: std::sync::Arc<dyn Control>,
    f: impl FnOnce(&dyn Control) -> Result<Accepted, ControlError> + Send + 'static,
) -> Result<impl IntoResponse, ApiError> {
    let accepted = tokio::task::spawn_blocking(move || f(control.as_ref()))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

pub(crate) async fn submit(
    State(s): State<HttpSources>,
    op: Option<Extension<Operator>>,
    spec: String,
) -> Result<impl IntoResponse, ApiError> {
    // The run has no id yet: the policy decides on the fleet the spec would train. Decided
    // before anything else, so that an operator learns nothing of an endpoint they may not use.
    let resource = Resource::Run {
        id: "new".into(),
        fleet: fleet_of_spec(&spec),
    };
    allow(&s, op.as_deref(), Action::SubmitRun, &resource)?;
    let control = control(&s)?;
    call(control, move |c| c.submit(&spec)).await
}

pub(crate) async fn stop(
    State(s): State<HttpSources>,
    Path(id): Path<String>,
    op: Option<Extension<Operator>>,
) -> Result<impl IntoResponse, ApiError> {
    allow_run(&s, op.as_deref(), Action::StopRun, &id).await?;
    let control = control(&s)?;
    call(control, move |c| c.stop(&id)).await
}

pub(crate) async fn resume(
    State(s): State<HttpSources>,
    Path(id): Path<String>,
    op: Option<Extension<Operator>>,
) -> Result<impl IntoResponse, ApiError> {
    allow_run(&s, op.as_deref(), Action::ResumeRun, &id).await?;
    let control = control(&s)?;
    call(control, move |c| c.resume(&id)).await
}
