//! Who may use the HTTP endpoint, and for what: operators authenticate with a bearer token
//! (or the cookie `/login` sets from one, for the browser's event stream), and every request
//! is then decided by Cedar policies over operator, action and resource.
//!
//! - Principals: `Pollen::Operator::"<name>"` with `fleets: Set<String>`, members of
//!   `Pollen::Role::"<role>"` for each of their roles.
//! - Actions and resources: `view_dashboard`, `watch_events` and `scrape_metrics` on
//!   `Pollen::Coordinator::"this"`; `view_run` and `download_model` on `Pollen::Run::"<id>"`
//!   with `fleet: String` (the run spec's `[devices] fleet`).
//!
//! The default policy (`operators.cedar`, checked against `operators.cedarschema` in the
//! tests) gives `admin` everything, `viewer` the dashboard, the event stream and the runs of
//! its fleets, `analyst` that and model downloads, and `scraper` only `/metrics`.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityUid, PolicySet, Request,
    RestrictedExpression,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The policy used unless `--operator-policy` names another.
pub const DEFAULT_POLICY: &str = include_str!("operators.cedar");
/// The schema the default policy is written against.
pub const SCHEMA: &str = include_str!("operators.cedarschema");

/// Why the access configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{origin}: {reason}")]
    Config { origin: String, reason: String },
}

fn config_error(origin: &str, reason: impl std::fmt::Display) -> AccessError {
    AccessError::Config {
        origin: origin.to_string(),
        reason: reason.to_string(),
    }
}

/// One operator as the operators file lists it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OperatorEntry {
    pub name: String,
    /// Lower-case hex SHA-256 of the operator's bearer token; the token itself is never stored.
    pub token_sha256: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Fleets whose runs the operator may see (policies read it as `principal.fleets`).
    #[serde(default)]
    pub fleets: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorsFile {
    #[serde(default)]
    operator: Vec<OperatorEntry>,
}

/// An authenticated operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator(pub String);

/// What a request asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    ViewDashboard,
    WatchEvents,
    ScrapeMetrics,
    ViewRun,
    DownloadModel,
    SubmitRun,
    StopRun,
    ResumeRun,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::ViewDashboard => "view_dashboard",
            Action::WatchEvents => "watch_events",
            Action::ScrapeMetrics => "scrape_metrics",
            Action::ViewRun => "view_run",
            Action::DownloadModel => "download_model",
            Action::SubmitRun => "submit_run",
            Action::StopRun => "stop_run",
            Action::ResumeRun => "resume_run",
        }
    }
}

/// What the action is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Coordinator,
    Run { id: String, fleet: String },
}

/// The operators, their tokens and the policies that decide what they may do.
pub struct Access {
    by_token: BTreeMap<String, String>,
    entities: Entities,
    policies: PolicySet,
    origin: String,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("operators", &self.by_token.len())
            .field("policy", &self.origin)
            .finish()
    }
}

fn uid(ty: &str, id: &str) -> Result<EntityUid, String> {
    EntityUid::from_str(&format!("Pollen::{ty}::{id:?}")).map_err(|e| e.to_string())
}

/// The hex SHA-256 of a token, as the operators file stores it.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Access {
    /// Operators from TOML text (`[[operator]]` tables) and a Cedar policy.
    pub fn new(
        operators: &str,
        operators_origin: &str,
        policy: &str,
        policy_origin: &str,
    ) -> Result<Self, AccessError> {
        let file: OperatorsFile =
            toml::from_str(operators).map_err(|e| config_error(operators_origin, e))?;
        let policies = PolicySet::from_str(policy).map_err(|e| config_error(policy_origin, e))?;
        let mut by_token = BTreeMap::new();
        let mut entities = Vec::new();
        for op in file.operator {
            let digest = op.token_sha256.to_ascii_lowercase();
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(config_error(
                    operators_origin,
                    format!("operator {:?}: token_sha256 is not 64 hex digits", op.name),
                ));
            }
            if by_token.insert(digest, op.name.clone()).is_some() {
                return Err(config_error(
                    operators_origin,
                    format!("operator {:?}: the same token as another operator", op.name),
                ));
            }
            let parents = op
                .roles
                .iter()
                .map(|r| uid("Role", r))
                .collect::<Result<_, _>>()
                .map_err(|e| config_error(operators_origin, e))?;
            let fleets = RestrictedExpression::new_set(
                op.fleets
                    .iter()
                    .map(|f| RestrictedExpression::new_string(f.clone())),
            );
            let entity = Entity::new(
                uid("Operator", &op.name).map_err(|e| config_error(operators_origin, e))?,
                [("fleets".to_string(), fleets)].into(),
                parents,
            )
            .map_err(|e| config_error(operators_origin, e))?;
            entities.push(entity);
        }
        let entities = Entities::from_entities(entities, None)
            .map_err(|e| config_error(operators_origin, e))?;
        Ok(Self {
            by_token,
            entities,
            policies,
            origin: policy_origin.to_string(),
        })
    }

    /// Operators from the file at `operators`, and the policy at `policy` or the default one.
    pub fn load(operators: &Path, policy: Option<&Path>) -> Result<Self, AccessError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| config_error(&p.display().to_string(), e))
        };
        let text = read(operators)?;
        let (policy_text, policy_origin) = match policy {
            Some(p) => (read(p)?, p.display().to_string()),
            None => (
                DEFAULT_POLICY.to_string(),
                "the default operator policy".to_string(),
            ),
        };
        Self::new(
            &text,
            &operators.display().to_string(),
            &policy_text,
            &policy_origin,
        )
    }

    /// The operator holding `token`, if any.
    pub fn authenticate(&self, token: &str) -> Option<Operator> {
        self.by_token
            .get(&token_digest(token))
            .cloned()
            .map(Operator)
    }

    /// Whether `operator` may do `action` on `resource`; the error says which policy decided.
    pub fn authorize(
        &self,
        operator: &Operator,
        action: Action,
        resource: &Resource,
    ) -> Result<(), String> {
        let denied = |why: String| {
            Err(format!(
                "operator {:?} may not {} {}: {why}",
                operator.0,
                action.name(),
                match resource {
                    Resource::Coordinator => "this coordinator".to_string(),
                    Resource::Run { id, fleet } => format!("run {id:?} of fleet {fleet:?}"),
                }
            ))
        };
        let (resource_uid, extra) = match resource {
            Resource::Coordinator => (uid("Coordinator", "this"), None),
            Resource::Run { id, fleet } => {
                let run = uid("Run", id);
                let entity = run.clone().and_then(|r| {
                    Entity::new(
                        r,
                        [(
                            "fleet".to_string(),
                            RestrictedExpression::new_string(fleet.clone()),
                        )]
                        .into(),
                        Default::default(),
                    )
                    .map_err(|e| e.to_string())
                });
                (run, Some(entity))
            }
        };
        let request = (|| {
            Request::new(
                uid("Operator", &operator.0)?,
                uid("Action", action.name())?,
                resource_uid?,
                Context::empty(),
                None,
            )
            .map_err(|e| e.to_string())
        })();
        let request = match request {
            Ok(r) => r,
            Err(e) => return denied(e),
        };
        let entities = match extra {
            Some(Ok(run)) => match self.entities.clone().add_entities([run], None) {
                Ok(e) => e,
                Err(e) => return denied(e.to_string()),
            },
            Some(Err(e)) => return denied(e),
            None => self.entities.clone(),
        };
        let response = Authorizer::new().is_authorized(&request, &self.policies, &entities);
        match response.decision() {
            Decision::Allow => Ok(()),
            Decision::Deny => {
                let forbidding: Vec<String> = response
                    .diagnostics()
                    .reason()
                    .map(|id| {
                        self.policies
                            .annotation(id, "id")
                            .map_or_else(|| id.to_string(), str::to_string)
                    })
                    .collect();
                denied(if forbidding.is_empty() {
                    format!("no policy of {} permits it", self.origin)
                } else {
                    format!("forbidden by {}", forbidding.join(", "))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        let operators = format!(
            r#"
            [[operator]]
            name = "root"
            token_sha256 = "{}"
            roles = ["admin"]

            [[operator]]
            name = "vera"
            token_sha256 = "{}"
            roles = ["viewer"]
            fleets = ["homes"]

            [[operator]]
            name = "prom"
            token_sha256 = "{}"
            roles = ["scraper"]
            "#,
            token_digest("root-token"),
            token_digest("vera-token"),
            token_digest("prom-token"),
        );
        Access::new(&operators, "operators.toml", DEFAULT_POLICY, "default").expect("valid")
    }

    fn run(fleet: &str) -> Resource {
        Resource::Run {
            id: "r1".into(),
            fleet: fleet.into(),
        }
    }

    #[test]
    fn tokens_name_operators_and_unknown_tokens_name_nobody() {
        let a = access();
        assert_eq!(a.authenticate("vera-token"), Some(Operator("vera".into())));
        assert_eq!(a.authenticate("guess"), None);
    }

    #[test]
    fn the_default_policy_gives_each_role_its_part() {
        let a = access();
        let (root, vera, prom) = (
            Operator("root".into()),
            Operator("vera".into()),
            Operator("prom".into()),
        );
        assert!(
            a.authorize(&root, Action::DownloadModel, &run("any"))
                .is_ok()
        );
        assert!(a.authorize(&vera, Action::ViewRun, &run("homes")).is_ok());
        assert!(
            a.authorize(&vera, Action::ViewDashboard, &Resource::Coordinator)
                .is_ok()
        );
        let err = a
            .authorize(&vera, Action::ViewRun, &run("utility"))
            .expect_err("other fleet");
        assert!(
            err.contains("\"vera\" may not view_run run \"r1\" of fleet \"utility\""),
            "{err}"
        );
        assert!(
            a.authorize(&vera, Action::DownloadModel, &run("homes"))
                .is_err()
        );
        assert!(
            a.authorize(&vera, Action::ScrapeMetrics, &Resource::Coordinator)
                .is_err()
        );
        assert!(
            a.authorize(&prom, Action::ScrapeMetrics, &Resource::Coordinator)
                .is_ok()
        );
        assert!(a.authorize(&prom, Action::ViewRun, &run("homes")).is_err());
        // The control API (`pollen serve`) is the admins' alone by default.
        for action in [Action::SubmitRun, Action::StopRun, Action::ResumeRun] {
            assert!(a.authorize(&root, action, &run("homes")).is_ok());
            let err = a
                .authorize(&vera, action, &run("homes"))
                .expect_err("viewer");
            assert!(err.contains(action.name()), "{err}");
        }
    }

    #[test]
    fn the_default_policy_validates_against_the_schema() {
        let schema = cedar_policy::Schema::from_cedarschema_str(SCHEMA)
            .expect("schema parses")
            .0;
        let policies = PolicySet::from_str(DEFAULT_POLICY).expect("policy parses");
        let result = cedar_policy::Validator::new(schema)
            .validate(&policies, cedar_policy::ValidationMode::Strict);
        assert!(
            result.validation_passed(),
            "{:?}",
            result
                .validation_errors()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_files_are_refused_naming_the_file_and_operator() {
        let err = Access::new(
            "[[operator]]\nname = \"x\"\ntoken_sha256 = \"abc\"",
            "ops.toml",
            DEFAULT_POLICY,
            "p",
        )
        .expect_err("short digest")
        .to_string();
        assert!(err.contains("ops.toml") && err.contains("\"x\""), "{err}");
        let err = Access::new("", "ops.toml", "permit(", "bad.cedar")
            .expect_err("bad policy")
            .to_string();
        assert!(err.starts_with("bad.cedar:"), "{err}");
    }
}
