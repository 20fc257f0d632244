//! MQTT topic scheme: `pollen/<fleet>/<device>/<channel>`.
//!
//! Fleet and device ids are restricted to `[A-Za-z0-9_.-]` so that they can never contain the
//! MQTT wildcards `+` and `#` or the level separator `/`.

/// Root of every Pollen topic.
pub const ROOT: &str = "pollen";

/// Why an id cannot be used in a topic.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("{what} is empty; use letters, digits, '_', '.' or '-'")]
    Empty { what: &'static str },
    #[error("{what} {value:?} has the character {bad:?}; use letters, digits, '_', '.' or '-'")]
    BadChar {
        what: &'static str,
        value: String,
        bad: char,
    },
}

/// Checks that `value` can stand as one topic level.
pub fn validate_id(what: &'static str, value: &str) -> Result<(), TopicError> {
    if value.is_empty() {
        return Err(TopicError::Empty { what });
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(TopicError::BadChar {
            what,
            value: value.to_string(),
            bad,
        });
    }
    Ok(())
}

/// Commands from the proxy to one device.
pub fn command(fleet: &str, device: &str) -> String {
    format!("{ROOT}/{fleet}/{device}/cmd")
}

/// Replies from one device to its proxy.
pub fn reply(fleet: &str, device: &str) -> String {
    format!("{ROOT}/{fleet}/{device}/reply")
}

/// Retained status (and last-will) of one device.
pub fn status(fleet: &str, device: &str) -> String {
    format!("{ROOT}/{fleet}/{device}/status")
}

/// Subscription filter for every device's status in a fleet.
pub fn all_status(fleet: &str) -> String {
    format!("{ROOT}/{fleet}/+/status")
}

/// Subscription filter for every device's replies in a fleet.
pub fn all_replies(fleet: &str) -> String {
    format!("{ROOT}/{fleet}/+/reply")
}

/// The channel proxies announce themselves on.
pub const PROXY_CHANNEL: &str = "proxy";

/// The retained status (and last-will) of proxy `proxy_id` of `fleet`. Its level is the
/// proxy's broker identity, `pollen-proxy.<id>`, a name no device may take (`pollen fleet
/// provision` refuses device ids starting with `pollen-`), and its channel is not one a device
/// may write.
pub fn proxy_status(fleet: &str, proxy_id: &str) -> String {
    format!("{ROOT}/{fleet}/pollen-proxy.{proxy_id}/{PROXY_CHANNEL}")
}

/// Subscription filter for every proxy's status in a fleet.
pub fn all_proxy_status(fleet: &str) -> String {
    format!("{ROOT}/{fleet}/+/{PROXY_CHANNEL}")
}

/// Splits a topic into `(fleet, device, channel)` if it is a Pollen device topic.
pub fn parse(topic: &str) -> Option<(&str, &str, &str)> {
    let mut parts = topic.split('/');
    let (root, fleet, device, channel) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if root != ROOT || parts.next().is_some() || fleet.is_empty() || device.is_empty() {
        return None;
    }
    Some((fleet, device, channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_through_parse() {
        assert_eq!(command("f1", "dev-7"), "pollen/f1/dev-7/cmd");
        assert_eq!(parse(&reply("f1", "dev-7")), Some(("f1", "dev-7", "reply")));
        assert_eq!(
            parse(&proxy_status("f1", "p-2")),
            Some(("f1", "pollen-proxy.p-2", PROXY_CHANNEL))
        );
        assert_eq!(parse("pollen/f1/dev-7"), None);
        assert_eq!(parse("other/f1/dev-7/cmd"), None);
        assert_eq!(parse("pollen/f1/dev-7/cmd/extra"), None);
    }

    #[test]
    fn ids_with_wildcards_or_separators_are_refused() {
        assert!(validate_id("device id", "gw-01.site_a").is_ok());
        assert_eq!(
            validate_id("device id", "a/b"),
            Err(TopicError::BadChar {
                what: "device id",
                value: "a/b".into(),
                bad: '/'
            })
        );
        assert!(validate_id("fleet", "#").is_err());
        assert!(validate_id("fleet", "").is_err());
    }
}
