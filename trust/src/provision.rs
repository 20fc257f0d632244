//! `pollen fleet provision`: a directory that holds a fleet's CA, its identities and its
//! broker policies. The directory is the state: running again reuses the CA and every
//! identity already issued, issues the new ones, and regenerates the policies from every
//! identity present, so adding devices is re-running with more `--devices`.
//!
//! ```text
//! DIR/fleet                      the fleet's name (a directory serves one fleet)
//! DIR/ca.pem  ca.key             the fleet CA (keep ca.key offline in production)
//! DIR/broker.pem .key            the broker's server certificate
//! DIR/coordinator.pem .key       the coordinator's server certificate
//! DIR/devices/<id>.pem .key      one client certificate per device, CN = device id
//! DIR/proxies/<id>.pem .key      CN = pollen-proxy.<id>
//! DIR/operators/<name>.pem .key  CN = pollen-operator.<name>
//! DIR/*/<name>.password          with --passwords: that identity's broker password
//! DIR/mosquitto.conf .acl .passwd     the broker with an ACL file
//! DIR/mosquitto-dynsec.conf          the broker with the dynamic-security plugin over
//! DIR/dynamic-security.json          this JSON: refuses subscriptions too
//! DIR/aws-iot-device-policy.json aws-iot-proxy-policy.json
//! ```

use std::path::{Path, PathBuf};

use crate::pki::{FleetCa, IdentityFiles, Usage};
use crate::policy::{self, Access, AwsScope, ListenerFiles};
use crate::{TrustError, dynsec, passwords, write_private, write_public};

/// What to provision.
#[derive(Debug, Clone)]
pub struct Provision {
    pub fleet: String,
    pub dir: PathBuf,
    pub devices: Vec<String>,
    pub proxies: Vec<String>,
    pub operators: Vec<String>,
    /// DNS names and IP addresses the broker's certificate is valid for.
    pub broker_names: Vec<String>,
    /// DNS names and IP addresses the coordinator's certificate is valid for.
    pub coordinator_names: Vec<String>,
    /// The broker's mutual-TLS listener.
    pub listen_host: String,
    pub listen_port: u16,
    /// A password for every identity and a second listener for password logins.
    pub password_port: Option<u16>,
    pub aws_region: String,
    pub aws_account: String,
    /// Where the broker host has Mosquitto's dynamic-security plugin.
    pub dynsec_plugin: String,
}

/// Which files provisioning wrote and which it found and kept.
#[derive(Debug, Default)]
pub struct Provisioned {
    pub created: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
    pub devices: usize,
    pub proxies: usize,
    pub operators: usize,
}

/// Kinds of identity, each in a directory of its own.
const DEVICES: &str = "devices";
const PROXIES: &str = "proxies";
const OPERATORS: &str = "operators";

fn check_ids(what: &'static str, ids: &[String]) -> Result<(), TrustError> {
    for id in ids {
        pollen_proto::topics::validate_id(what, id)
            .map_err(|e| TrustError::Input(e.to_string()))?;
        if what == "device id" && id.starts_with(policy::RESERVED_PREFIX) {
            return Err(TrustError::Input(format!(
                "device id {id:?} starts with {:?}, which names proxies and operators",
                policy::RESERVED_PREFIX
            )));
        }
    }
    Ok(())
}

/// The names (file stems) of the identities already issued in `dir`.
fn issued(dir: &Path) -> Result<Vec<String>, TrustError> {
    let mut names = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(TrustError::io(dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| TrustError::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "pem")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            names.push(stem.to_string());
        }
    }
    names.sort();
    Ok(names)
}

fn read_text(path: &Path) -> Result<String, TrustError> {
    std::fs::read_to_string(path).map_err(|e| TrustError::io(path, e))
}

impl Provision {
    pub fn run(&self) -> Result<Provisioned, TrustError> {
        pollen_proto::topics::validate_id("fleet", &self.fleet)
            .map_err(|e| TrustError::Input(e.to_string()))?;
        check_ids("device id", &self.devices)?;
        check_ids("proxy id", &self.proxies)?;
        check_ids("operator name", &self.operators)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| TrustError::io(&self.dir, e))?;
        let dir = self
            .dir
            .canonicalize()
            .map_err(|e| TrustError::io(&self.dir, e))?;
        let mut out = Provisioned::default();

        let fleet_file = dir.join("fleet");
        if fleet_file.exists() {
            let existing = read_text(&fleet_file)?;
            if existing.trim() != self.fleet {
                return Err(TrustError::Input(format!(
                    "{} was provisioned for fleet {:?}, not {:?}; use a directory per fleet",
                    dir.display(),
                    existing.trim(),
                    self.fleet
                )));
            }
        } else {
            write_public(&fleet_file, format!("{}\n", self.fleet).as_bytes())?;
        }

        let ca_files = IdentityFiles::new(&dir, "ca");
        let ca = if ca_files.exist() {
            out.kept.push(ca_files.cert.clone());
            FleetCa::load(
                &self.fleet,
                read_text(&ca_files.cert)?,
                &read_text(&ca_files.key)?,
                &ca_files.key,
            )?
        } else {
            let ca = FleetCa::create(&self.fleet)?;
            write_public(&ca_files.cert, ca.cert_pem.as_bytes())?;
            write_private(&ca_files.key, ca.key_pem().as_bytes())?;
            out.created.push(ca_files.cert.clone());
            ca
        };

        let mut issue = |files: IdentityFiles, cn: &str, names: &[String], usage: Usage| {
            if files.exist() {
                out.kept.push(files.cert);
                return Ok::<_, TrustError>(());
            }
            files.write(&ca.issue(cn, names, usage)?)?;
            out.created.push(files.cert);
            Ok(())
        };
        issue(
            IdentityFiles::new(&dir, "broker"),
            "pollen-broker",
            &self.broker_names,
            Usage::Server,
        )?;
        issue(
            IdentityFiles::new(&dir, "coordinator"),
            "pollen-coordinator",
            &self.coordinator_names,
            Usage::Server,
        )?;
        for (kind, ids) in [
            (DEVICES, &self.devices),
            (PROXIES, &self.proxies),
            (OPERATORS, &self.operators),
        ] {
            let sub = dir.join(kind);
            std::fs::create_dir_all(&sub).map_err(|e| TrustError::io(&sub, e))?;
            for id in ids {
                let cn = match kind {
                    DEVICES => id.clone(),
                    PROXIES => policy::proxy_identity(id),
                    _ => policy::operator_identity(id),
                };
                issue(IdentityFiles::new(&sub, id), &cn, &[], Usage::Client)?;
            }
        }

        // Policies cover every identity in the directory, not only this invocation's.
        let devices = issued(&dir.join(DEVICES))?;
        let proxies = issued(&dir.join(PROXIES))?;
        let operators = issued(&dir.join(OPERATORS))?;
        (out.devices, out.proxies, out.operators) = (devices.len(), proxies.len(), operators.len());

        let passwd = dir.join("mosquitto.passwd");
        let mut hashed = std::collections::BTreeMap::new();
        if self.password_port.is_some() {
            let mut lines = String::new();
            for (kind, names) in [
                (DEVICES, &devices),
                (PROXIES, &proxies),
                (OPERATORS, &operators),
            ] {
                for name in names {
                    let file = dir.join(kind).join(format!("{name}.password"));
                    let password = if file.exists() {
                        read_text(&file)?.trim().to_string()
                    } else {
                        let p = passwords::generate();
                        write_private(&file, p.as_bytes())?;
                        out.created.push(file);
                        p
                    };
                    let user = match kind {
                        DEVICES => name.clone(),
                        PROXIES => policy::proxy_identity(name),
                        _ => policy::operator_identity(name),
                    };
                    let hash = passwords::Hashed::new(&password);
                    lines.push_str(&hash.entry(&user));
                    lines.push('\n');
                    hashed.insert(user, hash);
                }
            }
            write_private(&passwd, lines.as_bytes())?;
            out.created.push(passwd.clone());
        }

        let acl = dir.join("mosquitto.acl");
        write_public(
            &acl,
            policy::mosquitto_acl(&self.fleet, &proxies, &operators).as_bytes(),
        )?;
        // Password hashes: private, like the password file.
        let dynsec_json = dir.join("dynamic-security.json");
        let dynsec = dynsec::config(&self.fleet, &devices, &proxies, &operators, &hashed);
        let text =
            serde_json::to_string_pretty(&dynsec).map_err(|e| TrustError::Input(e.to_string()))?;
        write_private(&dynsec_json, text.as_bytes())?;

        let path = |p: &Path| p.display().to_string();
        let (ca_pem, broker_pem, broker_key, acl_s, passwd_s, dynsec_s) = (
            path(&ca_files.cert),
            path(&dir.join("broker.pem")),
            path(&dir.join("broker.key")),
            path(&acl),
            path(&passwd),
            path(&dynsec_json),
        );
        for (file, access) in [
            (
                "mosquitto.conf",
                Access::AclFile {
                    acl: &acl_s,
                    passwords: self.password_port.map(|_| passwd_s.as_str()),
                },
            ),
            (
                "mosquitto-dynsec.conf",
                Access::DynamicSecurity {
                    plugin: &self.dynsec_plugin,
                    config: &dynsec_s,
                    passwords: self.password_port.is_some(),
                },
            ),
        ] {
            let conf = policy::mosquitto_conf(
                &self.fleet,
                &self.listen_host,
                self.listen_port,
                self.password_port,
                &ListenerFiles {
                    ca: &ca_pem,
                    cert: &broker_pem,
                    key: &broker_key,
                    access,
                },
            );
            write_public(&dir.join(file), conf.as_bytes())?;
        }
        let scope = AwsScope {
            region: &self.aws_region,
            account: &self.aws_account,
        };
        for (file, doc) in [
            (
                "aws-iot-device-policy.json",
                policy::aws_device_policy(&self.fleet, &scope),
            ),
            (
                "aws-iot-proxy-policy.json",
                policy::aws_proxy_policy(&self.fleet, &scope),
            ),
        ] {
            let text =
                serde_json::to_string_pretty(&doc).map_err(|e| TrustError::Input(e.to_string()))?;
            write_public(&dir.join(file), text.as_bytes())?;
        }
        out.created.extend(
            [
                "mosquitto.acl",
                "mosquitto.conf",
                "mosquitto-dynsec.conf",
                "dynamic-security.json",
                "aws-iot-device-policy.json",
                "aws-iot-proxy-policy.json",
            ]
            .map(|f| dir.join(f)),
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(dir: &Path, devices: &[&str]) -> Provision {
        Provision {
            fleet: "f1".into(),
            dir: dir.to_path_buf(),
            devices: devices.iter().map(|d| d.to_string()).collect(),
            proxies: vec!["proxy-0".into()],
            operators: vec!["admin".into()],
            broker_names: vec!["localhost".into(), "127.0.0.1".into()],
            coordinator_names: vec!["127.0.0.1".into()],
            listen_host: "127.0.0.1".into(),
            listen_port: 8883,
            password_port: Some(8884),
            aws_region: "*".into(),
            aws_account: "*".into(),
            dynsec_plugin: crate::dynsec::DEBIAN_PLUGIN.into(),
        }
    }

    #[test]
    fn running_again_keeps_the_ca_and_issued_identities_and_adds_new_devices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = plan(dir.path(), &["dev-a", "dev-b"]).run().expect("first");
        assert_eq!((first.devices, first.proxies, first.operators), (2, 1, 1));
        let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca");
        let a = std::fs::read(dir.path().join("devices/dev-a.pem")).expect("dev-a");
        let a_password = std::fs::read(dir.path().join("devices/dev-a.password")).expect("pw");

        let second = plan(dir.path(), &["dev-c"]).run().expect("second");
        assert_eq!(second.devices, 3);
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).expect("ca"), ca);
        assert_eq!(
            std::fs::read(dir.path().join("devices/dev-a.pem")).expect("a"),
            a
        );
        assert_eq!(
            std::fs::read(dir.path().join("devices/dev-a.password")).expect("pw"),
            a_password
        );
        let passwd = std::fs::read_to_string(dir.path().join("mosquitto.passwd")).expect("passwd");
        let users: Vec<&str> = passwd.lines().filter_map(|l| l.split(':').next()).collect();
        assert_eq!(
            users,
            [
                "dev-a",
                "dev-b",
                "dev-c",
                "pollen-proxy.proxy-0",
                "pollen-operator.admin"
            ]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("devices/dev-c.key"))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(
                mode & 0o077,
                0,
                "private keys are for their owner only: {mode:o}"
            );
        }
    }

    #[test]
    fn a_directory_serves_one_fleet_and_reserved_names_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        plan(dir.path(), &["dev-a"]).run().expect("first");
        let mut other = plan(dir.path(), &[]);
        other.fleet = "f2".into();
        let err = other.run().expect_err("other fleet").to_string();
        assert!(err.contains("provisioned for fleet \"f1\""), "{err}");
        let err = plan(dir.path(), &["pollen-proxy.proxy-0"])
            .run()
            .expect_err("reserved")
            .to_string();
        assert!(err.contains("starts with \"pollen-\""), "{err}");
        let err = plan(dir.path(), &["dev/a"])
            .run()
            .expect_err("bad id")
            .to_string();
        assert!(err.contains("device id") && err.contains("'/'"), "{err}");
    }
}
