//! Which VIPs this node answers for (active) and which it serves as a
//! backup (installed, not owned), with the time of each VIP's last
//! transition: kept by the agent as it takes or gives up VIPs, published
//! in its state directory (`roles.json`), shown by `loxilb-agent roles`.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// A VIP's state on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// This node holds the VIP (on `lo`), answers ARP/ND for it and
    /// announced it.
    Active,
    /// This node has the VIP's rules (and synced sessions) but another
    /// node answers for it.
    Backup,
}

/// One VIP's role and when it last changed (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipRole {
    pub role: Role,
    pub since_unix: u64,
}

/// Every VIP this node has held since start, by address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roles {
    /// This node's name (`NODE_NAME`).
    pub node: String,
    pub vips: BTreeMap<IpAddr, VipRole>,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Roles {
    pub fn new(node: impl Into<String>) -> Self {
        Roles {
            node: node.into(),
            vips: BTreeMap::new(),
        }
    }

    /// This node now owns exactly `owned`: those become active, every
    /// other VIP known here backup. Returns the VIPs whose role changed.
    pub fn set_owned(
        &mut self,
        owned: &std::collections::BTreeSet<IpAddr>,
        now: u64,
    ) -> Vec<(IpAddr, Role)> {
        let mut changed = vec![];
        for v in owned {
            let e = self.vips.entry(*v).or_insert(VipRole {
                role: Role::Backup,
                since_unix: now,
            });
            if e.role != Role::Active {
                *e = VipRole {
                    role: Role::Active,
                    since_unix: now,
                };
                changed.push((*v, Role::Active));
            }
        }
        for (v, e) in self.vips.iter_mut() {
            if !owned.contains(v) && e.role == Role::Active {
                *e = VipRole {
                    role: Role::Backup,
                    since_unix: now,
                };
                changed.push((*v, Role::Backup));
            }
        }
        changed
    }

    /// Write to `roles.json` in the state directory of `pin_dir`
    /// (atomically: a reader sees the old or the new file).
    pub fn publish(&self, pin_dir: &Path) -> Result<()> {
        let dir = crate::node::state_dir(pin_dir);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join("roles.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)?;
        std::fs::rename(&tmp, dir.join("roles.json"))?;
        Ok(())
    }

    pub fn read(pin_dir: &Path) -> Option<Roles> {
        let text =
            std::fs::read_to_string(crate::node::state_dir(pin_dir).join("roles.json")).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// `loxilb-agent roles`: every VIP of the installed rules (`vips`) with its
/// role here (`None`: the agent publishes no roles, i.e. standalone mode,
/// where this node serves every VIP by routing), and since when.
pub fn table(vips: &[IpAddr], roles: Option<&Roles>, now: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(r) = roles {
        let _ = writeln!(out, "node {}", r.node);
    }
    let _ = writeln!(out, "{:<40} {:<8} SINCE", "VIP", "ROLE");
    let mut all: Vec<IpAddr> = vips.to_vec();
    if let Some(r) = roles {
        all.extend(r.vips.keys().copied());
    }
    all.sort();
    all.dedup();
    for v in all {
        let (role, since) = match roles.and_then(|r| r.vips.get(&v)) {
            Some(e) => (
                match e.role {
                    Role::Active => "active",
                    Role::Backup => "backup",
                },
                format!("{}s ago", now.saturating_sub(e.since_unix)),
            ),
            None if roles.is_some() => ("backup", "start".to_string()),
            None => ("serving", "-".to_string()),
        };
        let _ = writeln!(out, "{:<40} {role:<8} {since}", v.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn transitions_are_recorded_once() {
        let mut r = Roles::new("n1");
        let set = |v: &[&str]| v.iter().map(|s| ip(s)).collect();
        assert_eq!(
            r.set_owned(&set(&["192.0.2.1", "192.0.2.2"]), 10),
            vec![
                (ip("192.0.2.1"), Role::Active),
                (ip("192.0.2.2"), Role::Active)
            ]
        );
        assert!(r
            .set_owned(&set(&["192.0.2.1", "192.0.2.2"]), 20)
            .is_empty());
        assert_eq!(
            r.set_owned(&set(&["192.0.2.2"]), 30),
            vec![(ip("192.0.2.1"), Role::Backup)]
        );
        assert_eq!(r.vips[&ip("192.0.2.1")].since_unix, 30);
        assert_eq!(r.vips[&ip("192.0.2.2")].since_unix, 10);
        let t = table(&[ip("192.0.2.3"), ip("192.0.2.1")], Some(&r), 40);
        assert!(t.starts_with("node n1\n"), "{t}");
        assert!(
            t.contains("192.0.2.1                                backup   10s ago"),
            "{t}"
        );
        assert!(
            t.contains("192.0.2.2                                active   30s ago"),
            "{t}"
        );
        assert!(
            t.contains("192.0.2.3                                backup   start"),
            "{t}"
        );
        let t = table(&[ip("192.0.2.3")], None, 40);
        assert!(t.contains("serving"), "{t}");
    }

    #[test]
    fn published_and_read_back() {
        let dir = std::env::temp_dir().join(format!("roles-test-{}", std::process::id()));
        let mut r = Roles::new("n1");
        r.set_owned(&[ip("2001:db8::1")].into_iter().collect(), 5);
        // state_dir is /run/loxilb/<name of the pin dir>
        r.publish(&dir).unwrap();
        assert_eq!(Roles::read(&dir), Some(r));
        let _ = std::fs::remove_dir_all(crate::node::state_dir(&dir));
    }
}
