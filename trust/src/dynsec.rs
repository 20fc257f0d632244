//! The same rules as [`crate::policy::mosquitto_acl`], as the configuration of Mosquitto's
//! dynamic-security plugin (`mosquitto_dynamic_security.so`, shipped with Mosquitto 2).
//!
//! Why a second form: Mosquitto 2's ACL file grants every SUBSCRIBE and only withholds, at
//! delivery, what a client may not read. The plugin checks subscriptions too, so a device that
//! subscribes to another device's command topic (or to `#`) gets SUBACK 0x80 and knows it.
//!
//! The plugin (2.0.x) has no `%u` patterns, so every device gets a role of its own naming its
//! three topics; proxies and operators share one role each. Nothing is allowed by default.

use std::collections::BTreeMap;

use pollen_proto::topics;
use serde_json::{Value, json};

use crate::passwords::Hashed;
use crate::policy::{operator_identity, proxy_identity};

/// Where Debian and Ubuntu install the plugin (the `eclipse-mosquitto` image has it at
/// `/usr/lib/mosquitto_dynamic_security.so`).
pub const DEBIAN_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so";

const PROXY_ROLE: &str = "pollen-proxy";
const OPERATOR_ROLE: &str = "pollen-operator";

fn device_role(device: &str) -> String {
    format!("pollen-device.{device}")
}

fn acl(kind: &str, topic: &str) -> Value {
    json!({"acltype": kind, "topic": topic, "priority": 0, "allow": true})
}

/// Subscribing to and receiving from `filter`.
fn read(filter: &str, pattern: bool) -> [Value; 2] {
    let subscribe = if pattern {
        "subscribePattern"
    } else {
        "subscribeLiteral"
    };
    [acl(subscribe, filter), acl("publishClientReceive", filter)]
}

fn write(topic: &str) -> Value {
    acl("publishClientSend", topic)
}

/// The plugin's JSON for one fleet: a client per identity (with its password when
/// `passwords` has one for its username) and the roles that bind each to its topics.
pub fn config(
    fleet: &str,
    devices: &[String],
    proxies: &[String],
    operators: &[String],
    passwords: &BTreeMap<String, Hashed>,
) -> Value {
    let client = |username: &str, role: &str| {
        let mut c = json!({
            "username": username,
            "roles": [{"rolename": role}],
            "groups": [],
        });
        if let Some(p) = passwords.get(username) {
            c["password"] = json!(p.hash_b64());
            c["salt"] = json!(p.salt_b64());
            c["iterations"] = json!(p.iterations);
        }
        c
    };
    let mut clients = Vec::new();
    let mut roles = Vec::new();
    for device in devices {
        let role = device_role(device);
        let (cmd, reply, status) = (
            topics::command(fleet, device),
            topics::reply(fleet, device),
            topics::status(fleet, device),
        );
        let mut acls: Vec<Value> = read(&cmd, false).into();
        acls.extend(read(&status, false));
        acls.extend([write(&reply), write(&status)]);
        roles.push(json!({"rolename": role, "acls": acls}));
        clients.push(client(device, &role));
    }
    let all_cmd = format!("{}/{fleet}/+/cmd", topics::ROOT);
    let mut proxy_acls: Vec<Value> = read(&topics::all_replies(fleet), true).into();
    proxy_acls.extend(read(&topics::all_status(fleet), true));
    proxy_acls.push(write(&all_cmd));
    // One role serves every proxy, so each may write any proxy's announcement: the proxies
    // are the operator's own processes. (The ACL file confines each to its own.)
    let all_proxies = topics::all_proxy_status(fleet);
    proxy_acls.extend(read(&all_proxies, true));
    proxy_acls.push(write(&all_proxies));
    roles.push(json!({"rolename": PROXY_ROLE, "acls": proxy_acls}));
    let operator_acls: Vec<Value> = read(&topics::all_status(fleet), true).into();
    roles.push(json!({"rolename": OPERATOR_ROLE, "acls": operator_acls}));
    clients.extend(
        proxies
            .iter()
            .map(|p| client(&proxy_identity(p), PROXY_ROLE)),
    );
    clients.extend(
        operators
            .iter()
            .map(|o| client(&operator_identity(o), OPERATOR_ROLE)),
    );
    json!({
        "defaultACLAccess": {
            "publishClientSend": false,
            "publishClientReceive": false,
            "subscribe": false,
            "unsubscribe": true,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acls_of<'a>(config: &'a Value, role: &str) -> Vec<(&'a str, &'a str)> {
        config["roles"]
            .as_array()
            .expect("roles")
            .iter()
            .find(|r| r["rolename"] == role)
            .unwrap_or_else(|| panic!("no role {role}"))["acls"]
            .as_array()
            .expect("acls")
            .iter()
            .map(|a| {
                assert_eq!(a["allow"], true);
                (
                    a["acltype"].as_str().expect("type"),
                    a["topic"].as_str().expect("topic"),
                )
            })
            .collect()
    }

    #[test]
    fn each_device_gets_only_its_own_topics_and_nothing_is_allowed_by_default() {
        let passwords = BTreeMap::from([("dev-1".to_string(), Hashed::new("pw"))]);
        let c = config(
            "f1",
            &["dev-1".into(), "dev-2".into()],
            &["proxy-0".into()],
            &["ops".into()],
            &passwords,
        );
        for kind in ["publishClientSend", "publishClientReceive", "subscribe"] {
            assert_eq!(c["defaultACLAccess"][kind], false, "{kind}");
        }
        let mut dev = acls_of(&c, "pollen-device.dev-1");
        dev.sort_unstable();
        assert_eq!(
            dev,
            [
                ("publishClientReceive", "pollen/f1/dev-1/cmd"),
                ("publishClientReceive", "pollen/f1/dev-1/status"),
                ("publishClientSend", "pollen/f1/dev-1/reply"),
                ("publishClientSend", "pollen/f1/dev-1/status"),
                ("subscribeLiteral", "pollen/f1/dev-1/cmd"),
                ("subscribeLiteral", "pollen/f1/dev-1/status"),
            ]
        );
        let proxy = acls_of(&c, "pollen-proxy");
        assert!(proxy.contains(&("publishClientSend", "pollen/f1/+/cmd")));
        assert!(proxy.contains(&("subscribePattern", "pollen/f1/+/reply")));
        assert!(
            !acls_of(&c, "pollen-operator")
                .iter()
                .any(|(k, _)| k.starts_with("publishClientSend"))
        );

        let clients = c["clients"].as_array().expect("clients");
        let find = |name: &str| {
            clients
                .iter()
                .find(|c| c["username"] == name)
                .unwrap_or_else(|| panic!("no client {name}"))
        };
        assert_eq!(find("dev-2")["roles"][0]["rolename"], "pollen-device.dev-2");
        assert_eq!(
            find("pollen-proxy.proxy-0")["roles"][0]["rolename"],
            "pollen-proxy"
        );
        assert_eq!(
            find("pollen-operator.ops")["roles"][0]["rolename"],
            "pollen-operator"
        );
        // Passwords where given, in the plugin's fields (12-byte salt, 64-byte hash).
        let dev1 = find("dev-1");
        assert_eq!(dev1["iterations"], crate::passwords::ITERATIONS);
        assert_eq!(dev1["salt"].as_str().expect("salt").len(), 16);
        assert_eq!(dev1["password"].as_str().expect("hash").len(), 88);
        assert!(find("dev-2").get("password").is_none());
    }
}
