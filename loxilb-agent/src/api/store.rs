//! Where API rules persist: in the agent's state directory
//! (`node::state_dir`, `/run/loxilb/<pin dir name>`: across agent
//! restarts, not reboots), two files:
//!
//! - [`SNAPSHOT`], `{"lbAttr": [...]}` (the shape of `GET .../all`),
//!   only ever replaced whole: written to a temporary file, synced, then
//!   renamed over the old one;
//! - [`JOURNAL`], one line per change since the snapshot
//!   (`{"put": <rule>}` / `{"del": {"externalIP", "port", "protocol"}}`),
//!   appended before the change is acknowledged.
//!
//! - [`CISTATE`], the cluster roles kube-loxilb posted (`POST
//!   /config/cistate`), `{"Attr": [...]}` (the shape of `GET
//!   /config/cistate/all`), replaced whole like the snapshot at each
//!   change: a restarted agent keeps announcing as the role it was given.
//!
//! A change costs one appended line, not a rewrite of every rule; when the
//! journal outgrows the rule set (and 1,000 lines) the snapshot is
//! rewritten and the journal emptied. Replaying is idempotent (a put
//! replaces the rule of its key, a delete removes it), so a stop between
//! the rename and the truncation loses nothing. A last line cut short (no
//! newline: the agent died while appending, before it acknowledged) is
//! dropped with a warning; any other unreadable line stops the start,
//! naming file and line.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{CiState, Key, LbRule};
use loxilb_model::Protocol;

pub const SNAPSHOT: &str = "api-rules.json";
pub const JOURNAL: &str = "api-rules.journal";
pub const CISTATE: &str = "cistate.json";
/// The journal is compacted beyond this many lines (and the rule count).
const MIN_COMPACT: usize = 1000;

#[derive(Serialize, Deserialize)]
struct Snapshot {
    #[serde(rename = "lbAttr")]
    rules: Vec<LbRule>,
}

#[derive(Serialize, Deserialize)]
struct Roles {
    #[serde(rename = "Attr")]
    roles: Vec<CiState>,
}

/// Replace `path` by `body`: a temporary file beside it, synced, renamed.
fn write_whole(path: &Path, body: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DelKey {
    #[serde(rename = "externalIP")]
    external_ip: IpAddr,
    port: u16,
    protocol: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
enum Line {
    #[serde(rename = "put")]
    Put(Box<LbRule>),
    #[serde(rename = "del")]
    Del(DelKey),
}

/// The key of a stored rule (it was checked before it was stored).
fn key_of(r: &LbRule) -> Option<Key> {
    Some((
        r.service.external_ip.trim().parse().ok()?,
        r.service.port,
        Protocol::from_name(&r.service.protocol)?,
    ))
}

pub struct Store {
    /// None: nothing persists (tests, benchmarks of the handler).
    dir: Option<PathBuf>,
    journal: Option<File>,
    lines: usize,
}

impl Store {
    /// A store that keeps nothing.
    pub fn in_memory() -> Self {
        Store {
            dir: None,
            journal: None,
            lines: 0,
        }
    }

    /// The store in `dir` (created if missing) and the rules it holds, in
    /// key order; compacted at once (one snapshot, empty journal).
    pub fn open(dir: &Path) -> Result<(Self, Vec<LbRule>)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        let snap = dir.join(SNAPSHOT);
        let mut rules: BTreeMap<Key, LbRule> = BTreeMap::new();
        match std::fs::read(&snap) {
            Ok(b) => {
                let s: Snapshot = serde_json::from_slice(&b).with_context(|| {
                    format!(
                        "{}: not an API rule snapshot; move it away to start without the API \
                         rules it held",
                        snap.display()
                    )
                })?;
                for (i, r) in s.rules.into_iter().enumerate() {
                    let Some(k) = key_of(&r) else {
                        bail!(
                            "{}: lbAttr[{i}] has no valid externalIP/port/protocol; fix or \
                             remove it",
                            snap.display()
                        );
                    };
                    rules.insert(k, r);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("cannot read {}: {e}", snap.display()),
        }
        let jpath = dir.join(JOURNAL);
        match std::fs::read_to_string(&jpath) {
            Ok(text) => {
                let complete = text.ends_with('\n');
                let n = text.lines().count();
                for (i, line) in text.lines().enumerate() {
                    let parsed = serde_json::from_str::<Line>(line);
                    let parsed = match parsed {
                        Err(_) if i + 1 == n && !complete => {
                            tracing::warn!(
                                "{}: line {} was cut short (the agent stopped while writing \
                                 it, before the change was acknowledged); dropped",
                                jpath.display(),
                                i + 1
                            );
                            break;
                        }
                        Err(e) => bail!(
                            "{}: line {}: {e}; fix or remove the line (the journal of API \
                             changes)",
                            jpath.display(),
                            i + 1
                        ),
                        Ok(l) => l,
                    };
                    match parsed {
                        Line::Put(r) => {
                            let Some(k) = key_of(&r) else {
                                bail!(
                                    "{}: line {}: no valid externalIP/port/protocol",
                                    jpath.display(),
                                    i + 1
                                );
                            };
                            rules.insert(k, *r);
                        }
                        Line::Del(d) => {
                            let Some(p) = Protocol::from_name(&d.protocol) else {
                                bail!(
                                    "{}: line {}: {:?} is not a protocol",
                                    jpath.display(),
                                    i + 1,
                                    d.protocol
                                );
                            };
                            rules.remove(&(d.external_ip, d.port, p));
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("cannot read {}: {e}", jpath.display()),
        }
        let mut store = Store {
            dir: Some(dir.to_path_buf()),
            journal: None,
            lines: 0,
        };
        let rules: Vec<LbRule> = rules.into_values().collect();
        store.compact(rules.iter())?;
        Ok((store, rules))
    }

    /// The snapshot's path, for messages.
    pub fn describe(&self) -> String {
        match &self.dir {
            Some(d) => d.join(SNAPSHOT).display().to_string(),
            None => "the API rules (in memory)".into(),
        }
    }

    fn append(&mut self, line: &Line) -> Result<()> {
        let Some(f) = self.journal.as_mut() else {
            return Ok(());
        };
        let mut text = serde_json::to_string(line).context("encoding a journal line")?;
        text.push('\n');
        f.write_all(text.as_bytes()).with_context(|| {
            format!(
                "cannot append to {}",
                self.dir
                    .as_ref()
                    .expect("a directory")
                    .join(JOURNAL)
                    .display()
            )
        })?;
        self.lines += 1;
        Ok(())
    }

    /// Record a rule created or replaced.
    pub fn put(&mut self, r: &LbRule) -> Result<()> {
        self.append(&Line::Put(Box::new(r.clone())))
    }

    /// Record a rule deleted.
    pub fn del(&mut self, (ip, port, proto): Key) -> Result<()> {
        self.append(&Line::Del(DelKey {
            external_ip: ip,
            port,
            protocol: proto.to_string(),
        }))
    }

    /// Whether the journal should be folded into the snapshot, with
    /// `rules` rules held.
    pub fn due(&self, rules: usize) -> bool {
        self.dir.is_some() && self.lines > MIN_COMPACT.max(rules)
    }

    /// Write `rules` as the snapshot (temporary file, sync, rename) and
    /// empty the journal.
    pub fn compact<'a>(&mut self, rules: impl Iterator<Item = &'a LbRule>) -> Result<()> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        let body = serde_json::to_vec(&Snapshot {
            rules: rules.cloned().collect(),
        })
        .context("encoding the API rules")?;
        write_whole(&dir.join(SNAPSHOT), &body)?;
        let j = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(dir.join(JOURNAL))
            .with_context(|| format!("cannot open {}", dir.join(JOURNAL).display()))?;
        drop(j);
        self.journal = Some(
            OpenOptions::new()
                .append(true)
                .open(dir.join(JOURNAL))
                .with_context(|| format!("cannot open {}", dir.join(JOURNAL).display()))?,
        );
        self.lines = 0;
        Ok(())
    }
}

impl Store {
    /// The cluster roles stored by [`Store::save_roles`] (none stored:
    /// empty).
    pub fn roles(&self) -> Result<Vec<CiState>> {
        let Some(dir) = &self.dir else {
            return Ok(vec![]);
        };
        let path = dir.join(CISTATE);
        match std::fs::read(&path) {
            Ok(b) => Ok(serde_json::from_slice::<Roles>(&b)
                .with_context(|| {
                    format!(
                        "{}: not the cluster roles this agent writes; remove it (kube-loxilb \
                         sets them again)",
                        path.display()
                    )
                })?
                .roles),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => bail!("cannot read {}: {e}", path.display()),
        }
    }

    /// The roles' file, for messages.
    pub fn describe_roles(&self) -> String {
        match &self.dir {
            Some(d) => d.join(CISTATE).display().to_string(),
            None => "the cluster roles (in memory)".into(),
        }
    }

    /// Store the cluster roles (the file replaced whole).
    pub fn save_roles<'a>(&self, roles: impl Iterator<Item = &'a CiState>) -> Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let body = serde_json::to_vec(&Roles {
            roles: roles.cloned().collect(),
        })
        .context("encoding the cluster roles")?;
        write_whole(&dir.join(CISTATE), &body)
    }
}
