//! The device owner's consent: a local Cedar policy that decides, before any work starts,
//! whether this agent accepts an instruction. As in AWS's smart-home example with Verified
//! Permissions (the power company may act only between 2 and 5 PM), the owner writes rules over
//! who asks (the fleet), what is asked (the action, the run, the task), when (local time), and
//! the device's own state.
//!
//! Each request is
//! - principal `Pollen::Fleet::"<fleet>"`,
//! - action `Pollen::Action::"fit" | "evaluate" | "get_parameters" | "statistics"`,
//! - resource `Pollen::Device::"<device id>"`,
//! - context `{ run, round, task, hour, minute, weekday, free_disk_bytes, busy, device }`: the
//!   run id, round number and task manifest digest of the instruction; the device's local hour
//!   (0-23), minute and weekday (1 = Monday ... 7 = Sunday); its free disk and whether it is
//!   working; `device` holds the attributes its config declares (`[consent.attributes]`).
//!
//! Cedar denies unless a `permit` matches and no `forbid` does. A refused instruction is
//! answered at once with `FAILURE_CODE_DECLINED`, which the coordinator counts apart from
//! errors.

use std::collections::BTreeMap;
use std::str::FromStr;

use cedar_policy::{Authorizer, Context, Decision, Entities, EntityUid, PolicySet, Request};
use chrono::{Datelike, Timelike};

/// Why a consent policy cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConsentError {
    #[error("consent policy {origin}: {reason}")]
    Policy { origin: String, reason: String },
    #[error("consent attribute {name:?}: {reason}")]
    Attribute { name: String, reason: String },
}

/// A value the device's config declares for its policy.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum Attribute {
    Bool(bool),
    Long(i64),
    String(String),
}

/// What is asked of the device, and its state when asked.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub fleet: &'a str,
    pub device: &'a str,
    /// `fit`, `evaluate`, `get_parameters` or `statistics`.
    pub action: &'a str,
    pub run: &'a str,
    pub round: u64,
    /// SHA-256 of the task manifest (empty when the instruction names none).
    pub task: &'a str,
    pub now: chrono::DateTime<chrono::Local>,
    pub free_disk_bytes: u64,
    pub busy: bool,
}

/// The verdict, with the policies that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Decline(String),
}

/// A parsed policy and the device's declared attributes.
pub struct Consent {
    origin: String,
    policies: PolicySet,
    attributes: BTreeMap<String, Attribute>,
}

impl std::fmt::Debug for Consent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consent")
            .field("origin", &self.origin)
            .field("policies", &self.policies.policies().count())
            .field("attributes", &self.attributes)
            .finish()
    }
}

impl Consent {
    /// Parses `text` (Cedar policies; `origin` names it in errors).
    pub fn parse(
        text: &str,
        origin: &str,
        attributes: BTreeMap<String, Attribute>,
    ) -> Result<Self, ConsentError> {
        let policies = PolicySet::from_str(text).map_err(|e| ConsentError::Policy {
            origin: origin.to_string(),
            reason: e.to_string(),
        })?;
        for name in attributes.keys() {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ConsentError::Attribute {
                    name: name.clone(),
                    reason: "use letters, digits and '_' (it is read as context.device.NAME)"
                        .into(),
                });
            }
        }
        Ok(Self {
            origin: origin.to_string(),
            policies,
            attributes,
        })
    }

    /// Reads the policy file at `path`.
    pub fn load(
        path: &std::path::Path,
        attributes: BTreeMap<String, Attribute>,
    ) -> Result<Self, ConsentError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConsentError::Policy {
            origin: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string(), attributes)
    }

    /// Whether the device accepts `ask`. Evaluation errors (a policy reading an attribute the
    /// config does not declare, say) skip that policy, as Cedar specifies, and are logged.
    pub fn decide(&self, ask: &Ask<'_>) -> Verdict {
        let request = match self.request(ask) {
            Ok(r) => r,
            Err(reason) => {
                return Verdict::Decline(format!("cannot evaluate {}: {reason}", self.origin));
            }
        };
        let response =
            Authorizer::new().is_authorized(&request, &self.policies, &Entities::empty());
        for error in response.diagnostics().errors() {
            tracing::warn!(policy = %self.origin, "consent policy error: {error}");
        }
        match response.decision() {
            Decision::Allow => Verdict::Accept,
            Decision::Deny => {
                let reasons: Vec<String> = response
                    .diagnostics()
                    .reason()
                    .map(|id| {
                        self.policies
                            .annotation(id, "id")
                            .map_or_else(|| id.to_string(), str::to_string)
                    })
                    .collect();
                Verdict::Decline(if reasons.is_empty() {
                    format!(
                        "declined by the device owner's policy ({}): no policy permits {} at {:02}:{:02}",
                        self.origin,
                        ask.action,
                        ask.now.hour(),
                        ask.now.minute()
                    )
                } else {
                    format!(
                        "declined by the device owner's policy ({}): forbidden by {}",
                        self.origin,
                        reasons.join(", ")
                    )
                })
            }
        }
    }

    fn request(&self, ask: &Ask<'_>) -> Result<Request, String> {
        let uid = |ty: &str, id: &str| {
            EntityUid::from_str(&format!("Pollen::{ty}::{}", quoted(id))).map_err(|e| e.to_string())
        };
        let device: serde_json::Map<String, serde_json::Value> = self
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or_default()))
            .collect();
        let context = serde_json::json!({
            "run": ask.run,
            "round": i64::try_from(ask.round).unwrap_or(i64::MAX),
            "task": ask.task,
            "hour": i64::from(ask.now.hour()),
            "minute": i64::from(ask.now.minute()),
            "weekday": i64::from(ask.now.weekday().number_from_monday()),
            "free_disk_bytes": i64::try_from(ask.free_disk_bytes).unwrap_or(i64::MAX),
            "busy": ask.busy,
            "device": device,
        });
        let context = Context::from_json_value(context, None).map_err(|e| e.to_string())?;
        Request::new(
            uid("Fleet", ask.fleet)?,
            uid("Action", ask.action)?,
            uid("Device", ask.device)?,
            context,
            None,
        )
        .map_err(|e| e.to_string())
    }
}

/// A Cedar string literal of `id` (ids are `[A-Za-z0-9_.-]`, so only quoting is needed).
fn quoted(id: &str) -> String {
    format!("{id:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ask(hour: u32) -> Ask<'static> {
        Ask {
            fleet: "homes",
            device: "gw-1",
            action: "fit",
            run: "r1",
            round: 3,
            task: "abc",
            now: chrono::Local
                .with_ymd_and_hms(2026, 12, 7, hour, 30, 0)
                .single()
                .expect("a local time"),
            free_disk_bytes: 5_000_000_000,
            busy: false,
        }
    }

    const SMART_HOME: &str = r#"
        @id("afternoons")
        permit(principal == Pollen::Fleet::"homes", action == Pollen::Action::"fit", resource)
        when { context.hour >= 14 && context.hour < 17 };

        @id("evaluate-any-time")
        permit(principal, action == Pollen::Action::"evaluate", resource);

        @id("battery")
        forbid(principal, action, resource)
        when { context.device has on_mains && !context.device.on_mains };

        @id("disk")
        forbid(principal, action == Pollen::Action::"fit", resource)
        when { context.free_disk_bytes < 1000000000 };
    "#;

    fn attrs(on_mains: bool) -> BTreeMap<String, Attribute> {
        BTreeMap::from([("on_mains".to_string(), Attribute::Bool(on_mains))])
    }

    #[test]
    fn the_owner_allows_fits_only_in_the_afternoon_on_mains_with_disk_to_spare() {
        let consent = Consent::parse(SMART_HOME, "home.cedar", attrs(true)).expect("parses");
        assert_eq!(consent.decide(&ask(15)), Verdict::Accept);
        let Verdict::Decline(why) = consent.decide(&ask(9)) else {
            panic!("a fit at 09:30 must be declined");
        };
        assert!(why.contains("no policy permits fit at 09:30"), "{why}");
        let evaluate = Ask {
            action: "evaluate",
            ..ask(9)
        };
        assert_eq!(consent.decide(&evaluate), Verdict::Accept);
        let low_disk = Ask {
            free_disk_bytes: 10,
            ..ask(15)
        };
        assert_eq!(
            consent.decide(&low_disk),
            Verdict::Decline(
                "declined by the device owner's policy (home.cedar): forbidden by disk".into()
            )
        );
        let other_fleet = Ask {
            fleet: "utility",
            ..ask(15)
        };
        assert!(matches!(consent.decide(&other_fleet), Verdict::Decline(_)));
        let on_battery = Consent::parse(SMART_HOME, "home.cedar", attrs(false)).expect("parses");
        assert_eq!(
            on_battery.decide(&ask(15)),
            Verdict::Decline(
                "declined by the device owner's policy (home.cedar): forbidden by battery".into()
            )
        );
    }

    #[test]
    fn a_policy_that_does_not_parse_is_refused_naming_the_file() {
        let err = Consent::parse(
            "permit(principal, action resource);",
            "bad.cedar",
            BTreeMap::new(),
        )
        .expect_err("refused")
        .to_string();
        assert!(err.starts_with("consent policy bad.cedar:"), "{err}");
        let err = Consent::parse(
            "",
            "x",
            BTreeMap::from([("a b".into(), Attribute::Long(1))]),
        )
        .expect_err("bad attribute")
        .to_string();
        assert!(err.contains("\"a b\""), "{err}");
    }
}
