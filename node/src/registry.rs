//! The exporter registry: one entry per exporter of a region, naming the keys that prove
//! it (its credential) and what it may claim. Collectors load it from the file
//! `exporter_registry` names, and again on SIGHUP.
//!
//! ```toml
//! [[exporter]]
//! id = 1                                   # the exporter's `exporter_id`
//! name = "host-a"                          # optional, for logs
//! keys = [{ key_id = 101, key_file = "/etc/tenure/exporters/host-a.key" }]
//! prefixes = ["10.1.0.0/26", "10.1.9.9/32"]
//! workloads = ["web", "db"]                # optional: any name when absent
//! revoked = false                          # optional
//! ```
//!
//! Invariants, checked by [`Registry::parse`]: exporter ids and key ids are unique across
//! the file, an exporter has one or two keys (two during a rotation), and no key is the
//! cluster key. A file that breaks one is refused as a whole, naming the entry and field,
//! and the running registry stays.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use tenure_gossip::seal::{BoundKeys, SecretKey};

use crate::config::{ConfigError, KeyConfig};
use crate::core::entitlement::{ENTITLED_PREFIXES_MAX, ENTITLED_WORKLOADS_MAX};
use crate::core::{Entitlement, Entitlements};

/// Most exporters one registry lists.
pub const REGISTRY_EXPORTERS_MAX: usize = 32_768;

/// Most keys one exporter holds at once: its key and, during a rotation, the next one.
pub const EXPORTER_KEYS_MAX: usize = 2;

/// Why a registry file was refused. Nothing changed when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The file could not be read.
    #[error("reading the exporter registry {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a registry.
    #[error("parsing the exporter registry {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// An entry breaks a rule; `exporter` is its id (or its position when the id is the
    /// problem).
    #[error("exporter registry {path}, exporter {exporter}, {field}: {message}")]
    Invalid {
        path: PathBuf,
        exporter: u64,
        field: &'static str,
        message: String,
    },
    /// A key of an entry could not be loaded.
    #[error("exporter registry {path}, exporter {exporter}, keys")]
    Key {
        path: PathBuf,
        exporter: u64,
        #[source]
        source: ConfigError,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    exporter: Vec<EntryFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    id: u64,
    #[serde(default)]
    name: Option<String>,
    keys: Vec<KeyConfig>,
    #[serde(default)]
    prefixes: Vec<IpNet>,
    #[serde(default)]
    workloads: Option<Vec<String>>,
    #[serde(default)]
    revoked: bool,
}

/// A loaded registry: the keys that open exporters' frames, each bound to its exporter,
/// and what each exporter may claim.
#[derive(Debug)]
pub struct Registry {
    /// Key id → exporter id, with the keys.
    pub keys: BoundKeys,
    /// Exporter id → what it may claim.
    pub entitlements: Entitlements,
    /// Exporter id → its name, for logs.
    pub names: BTreeMap<u64, String>,
}

impl Registry {
    /// Reads and checks the registry at `path`; `cluster_key` must not be among its keys.
    pub fn load(path: &Path, cluster_key: &SecretKey) -> Result<Registry, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.to_owned(),
            source,
        })?;
        Registry::parse(&text, path, cluster_key)
    }

    /// Parses and checks registry text; `path` is for messages (and `key_file`s are read
    /// as written, relative to the working directory).
    pub fn parse(
        text: &str,
        path: &Path,
        cluster_key: &SecretKey,
    ) -> Result<Registry, RegistryError> {
        let file: RegistryFile = toml::from_str(text).map_err(|source| RegistryError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let invalid =
            |exporter: u64, field: &'static str, message: String| RegistryError::Invalid {
                path: path.to_owned(),
                exporter,
                field,
                message,
            };
        if file.exporter.len() > REGISTRY_EXPORTERS_MAX {
            return Err(invalid(
                0,
                "exporter",
                format!("at most {REGISTRY_EXPORTERS_MAX} exporters"),
            ));
        }
        let mut keys = BoundKeys::new(REGISTRY_EXPORTERS_MAX * EXPORTER_KEYS_MAX);
        let mut by_exporter = BTreeMap::new();
        let mut names = BTreeMap::new();
        for entry in file.exporter {
            let id = entry.id;
            if by_exporter.contains_key(&id) {
                return Err(invalid(id, "id", "listed twice".into()));
            }
            if entry.keys.is_empty() || entry.keys.len() > EXPORTER_KEYS_MAX {
                return Err(invalid(
                    id,
                    "keys",
                    format!("one or {EXPORTER_KEYS_MAX} keys (two during a rotation)"),
                ));
            }
            if entry.prefixes.len() > ENTITLED_PREFIXES_MAX {
                return Err(invalid(
                    id,
                    "prefixes",
                    format!("at most {ENTITLED_PREFIXES_MAX}"),
                ));
            }
            let workloads = match entry.workloads {
                None => None,
                Some(list) => {
                    if list.len() > ENTITLED_WORKLOADS_MAX {
                        return Err(invalid(
                            id,
                            "workloads",
                            format!("at most {ENTITLED_WORKLOADS_MAX}"),
                        ));
                    }
                    if let Some(empty) = list.iter().find(|n| n.is_empty()) {
                        return Err(invalid(id, "workloads", format!("empty name {empty:?}")));
                    }
                    Some(list.into_iter().collect::<BTreeSet<String>>())
                }
            };
            if let Some(name) = &entry.name {
                if name.is_empty() || name.len() > 253 || name.chars().any(char::is_control) {
                    return Err(invalid(
                        id,
                        "name",
                        "1 to 253 bytes, no control characters".into(),
                    ));
                }
                names.insert(id, name.clone());
            }
            for k in &entry.keys {
                let key = k.resolve(None).map_err(|source| RegistryError::Key {
                    path: path.to_owned(),
                    exporter: id,
                    source,
                })?;
                if key.same_as(cluster_key) {
                    return Err(invalid(
                        id,
                        "keys",
                        format!(
                            "key {} is the cluster key (an exporter must not be able to speak for a collector)",
                            k.key_id
                        ),
                    ));
                }
                keys.bind(k.key_id, id, &key)
                    .map_err(|e| invalid(id, "keys", e.to_string()))?;
            }
            by_exporter.insert(
                id,
                Entitlement {
                    prefixes: entry.prefixes.iter().map(IpNet::trunc).collect(),
                    workloads,
                    revoked: entry.revoked,
                },
            );
        }
        Ok(Registry {
            keys,
            entitlements: Entitlements::new(by_exporter),
            names,
        })
    }

    /// Exporters listed, and how many of them are revoked.
    pub fn counts(&self) -> (usize, usize) {
        let revoked = self.entitlements.iter().filter(|(_, e)| e.revoked).count();
        (self.entitlements.len(), revoked)
    }
}

/// Writes a fresh 256-bit key, as 64 hex digits and a newline, to `out`, which must not
/// exist yet (created 0640: readable by the service's group, like the other key files).
/// The key is drawn from the operating system's generator. Returns nothing secret: the key
/// is only in the file.
pub fn keygen(out: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut bytes = [0u8; tenure_gossip::seal::KEY_BYTES];
    let mut rng: rand::rngs::StdRng = rand::make_rng();
    rand::Rng::fill_bytes(&mut rng, &mut bytes);
    let mut hex = String::with_capacity(bytes.len() * 2 + 1);
    for b in bytes {
        hex.push_str(&format!("{b:02x}"));
    }
    hex.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(out)?;
    file.write_all(hex.as_bytes())?;
    file.sync_all()
}

/// The registry entry for a key made by [`keygen`], for the operator to paste and
/// complete (its prefixes, and names if they are to be restricted).
pub fn entry_snippet(exporter_id: u64, key_id: u32, key_path: &Path) -> String {
    format!(
        "[[exporter]]\nid = {exporter_id}\nkeys = [{{ key_id = {key_id}, key_file = \"{}\" }}]\nprefixes = []  # the IPs this exporter may claim, e.g. [\"10.1.7.0/24\"]\n",
        key_path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const KEY_A: &str = "aa00000000000000000000000000000000000000000000000000000000000001";
    const KEY_B: &str = "bb00000000000000000000000000000000000000000000000000000000000002";

    fn cluster() -> SecretKey {
        crate::config::parse_key(CLUSTER).expect("key")
    }

    fn parse(text: &str) -> Result<Registry, RegistryError> {
        Registry::parse(text, Path::new("registry.toml"), &cluster())
    }

    #[test]
    fn a_registry_binds_keys_to_exporters_and_lists_what_they_may_claim() {
        let r = parse(&format!(
            r#"
[[exporter]]
id = 1
name = "host-a"
keys = [{{ key_id = 101, key_hex = "{KEY_A}" }}]
prefixes = ["10.1.0.7/26"]

[[exporter]]
id = 2
keys = [{{ key_id = 201, key_hex = "{KEY_B}" }}, {{ key_id = 202, key_hex = "{KEY_A}" }}]
prefixes = ["10.1.1.0/24"]
workloads = ["db"]
revoked = true
"#
        ))
        .expect("parses");
        assert_eq!(r.keys.owner_of(101), Some(1));
        assert_eq!(r.keys.owner_of(202), Some(2));
        assert_eq!(r.names.get(&1).map(String::as_str), Some("host-a"));
        let a = r.entitlements.get(1).expect("a");
        // Host bits are dropped: the prefix is the network.
        assert_eq!(
            a.prefixes,
            vec!["10.1.0.0/26".parse::<IpNet>().expect("net")]
        );
        assert!(r.entitlements.get(2).expect("b").revoked);
        assert_eq!(r.counts(), (2, 1));
    }

    #[test]
    fn keygen_writes_a_fresh_key_a_registry_can_load_and_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host-a.key");
        keygen(&path).expect("keygen");
        assert!(
            keygen(&path).is_err(),
            "an existing key file is never overwritten"
        );
        let other = dir.path().join("host-b.key");
        keygen(&other).expect("keygen");
        let (a, b) = (
            std::fs::read_to_string(&path).expect("read"),
            std::fs::read_to_string(&other).expect("read"),
        );
        assert_ne!(a, b, "two keys differ");
        let text = entry_snippet(7, 701, &path);
        let r = parse(&text).expect("the snippet parses with the key it names");
        assert_eq!(r.keys.owner_of(701), Some(7));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode & 0o007, 0, "not readable by others: {mode:o}");
    }

    #[test]
    fn a_bad_registry_names_the_entry_and_field() {
        let cases = [
            (
                "[[exporter]]\nid = 1\nkeys = []\n".to_owned(),
                "exporter 1, keys",
            ),
            (
                format!(
                    "[[exporter]]\nid = 1\nkeys = [{{ key_id = 1, key_hex = \"{KEY_A}\" }}]\n[[exporter]]\nid = 1\nkeys = [{{ key_id = 2, key_hex = \"{KEY_B}\" }}]\n"
                ),
                "exporter 1, id: listed twice",
            ),
            (
                format!(
                    "[[exporter]]\nid = 1\nkeys = [{{ key_id = 1, key_hex = \"{KEY_A}\" }}]\n[[exporter]]\nid = 2\nkeys = [{{ key_id = 1, key_hex = \"{KEY_B}\" }}]\n"
                ),
                "exporter 2, keys: key id 1 is bound already",
            ),
            (
                format!("[[exporter]]\nid = 3\nkeys = [{{ key_id = 1, key_hex = \"{CLUSTER}\" }}]\n"),
                "exporter 3, keys: key 1 is the cluster key",
            ),
            (
                format!("[[exporter]]\nid = 4\nkeys = [{{ key_id = 1, key_hex = \"{KEY_A}\" }}]\nworkloads = [\"\"]\n"),
                "exporter 4, workloads",
            ),
            (
                "[[exporter]]\nid = 5\nkeys = [{ key_id = 1, key_hex = \"zz\" }]\n".to_owned(),
                "exporter 5, keys",
            ),
            (
                format!("[[exporter]]\nid = 6\nkeys = [{{ key_id = 1, key_hex = \"{KEY_A}\" }}]\nprefixes = [\"10.1.0.0/33\"]\n"),
                "parsing",
            ),
            (
                format!("[[exporter]]\nid = 7\nkey = [{{ key_id = 1, key_hex = \"{KEY_A}\" }}]\n"),
                "parsing",
            ),
        ];
        for (text, expected) in cases {
            let e = parse(&text).expect_err(&text);
            let message = crate::report::Chain(&e).to_string();
            assert!(
                message.contains(expected),
                "{message:?} should say {expected:?}"
            );
        }
    }
}
