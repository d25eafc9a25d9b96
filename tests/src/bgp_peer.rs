//! A BGP peer for the speaker's tests: GoBGP (`gobgpd` and its `gobgp`
//! CLI, Debian package `gobgpd`), a different implementation from the
//! speaker's BIRD, run in a network namespace. It accepts every route and
//! announces none; its RIB is read with `gobgp global rib -j`. Killed on
//! drop (also when a test panics).

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::netns::{sh, Netns};

/// One neighbour in gobgpd's configuration.
#[derive(Debug, Clone)]
pub struct GobgpNeighbor {
    pub address: IpAddr,
    pub peer_as: u32,
    /// The port gobgpd connects to (default 179).
    pub remote_port: Option<u16>,
    /// eBGP multihop TTL.
    pub multihop_ttl: Option<u8>,
    /// Never connect; only accept the speaker's connection.
    pub passive: bool,
}

impl GobgpNeighbor {
    pub fn new(address: &str, peer_as: u32) -> Self {
        GobgpNeighbor {
            address: address.parse().expect("neighbour address"),
            peer_as,
            remote_port: None,
            multihop_ttl: None,
            passive: false,
        }
    }
}

/// Where gobgpd listens for BGP.
#[derive(Debug, Clone, Copy)]
pub enum Listen {
    Port(u16),
    /// Not at all (`port = -1`): sessions only come up by gobgpd
    /// connecting out.
    Off,
}

/// A route in gobgpd's RIB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RibRoute {
    pub prefix: String,
    pub next_hop: Option<IpAddr>,
    pub as_path: Vec<u32>,
    pub local_pref: Option<u32>,
    /// The speaker it came from.
    pub neighbor: Option<IpAddr>,
    /// gobgpd's best path for the prefix.
    pub best: bool,
}

/// A running gobgpd in a namespace.
pub struct GobgpPeer {
    ns: String,
    dir: PathBuf,
    child: Option<Child>,
    pub asn: u32,
}

/// Timers short enough for tests: a session that fails is retried within
/// a second or two.
fn render(asn: u32, router_id: Ipv4Addr, listen: Listen, neighbors: &[GobgpNeighbor]) -> String {
    let mut s = String::new();
    let port: i32 = match listen {
        Listen::Port(p) => p as i32,
        Listen::Off => -1,
    };
    let _ = writeln!(
        s,
        "[global.config]\n  as = {asn}\n  router-id = \"{router_id}\"\n  port = {port}\n\
         [global.apply-policy.config]\n  default-import-policy = \"accept-route\"\n  default-export-policy = \"reject-route\""
    );
    for n in neighbors {
        let _ = writeln!(
            s,
            "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    peer-as = {}",
            n.address, n.peer_as
        );
        if n.passive || n.remote_port.is_some() {
            let _ = writeln!(s, "  [neighbors.transport.config]");
            if n.passive {
                let _ = writeln!(s, "    passive-mode = true");
            }
            if let Some(p) = n.remote_port {
                let _ = writeln!(s, "    remote-port = {p}");
            }
        }
        if let Some(ttl) = n.multihop_ttl {
            let _ = writeln!(
                s,
                "  [neighbors.ebgp-multihop.config]\n    enabled = true\n    multihop-ttl = {ttl}"
            );
        }
        let _ = writeln!(
            s,
            "  [neighbors.timers.config]\n    connect-retry = 1\n    hold-time = 9\n    keepalive-interval = 3\n    idle-hold-time-after-reset = 1"
        );
        for fam in ["ipv4-unicast", "ipv6-unicast"] {
            let _ = writeln!(
                s,
                "  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"{fam}\""
            );
        }
    }
    s
}

impl GobgpPeer {
    /// Write the configuration and start gobgpd in `ns`; returns once its
    /// API answers.
    pub fn start(
        ns: &Netns,
        asn: u32,
        router_id: Ipv4Addr,
        listen: Listen,
        neighbors: &[GobgpNeighbor],
    ) -> Result<Self> {
        for bin in ["gobgpd", "gobgp"] {
            if sh(&["sh", "-c", &format!("command -v {bin}")]).is_err() {
                bail!("{bin} not found: install the Debian package gobgpd (scripts/setup.sh does)");
            }
        }
        let dir = std::env::temp_dir().join(format!("{}-gobgp", ns.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("gobgpd.toml"),
            render(asn, router_id, listen, neighbors),
        )?;
        let mut p = GobgpPeer {
            ns: ns.name.clone(),
            dir,
            child: None,
            asn,
        };
        p.launch()?;
        Ok(p)
    }

    fn launch(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("gobgpd.log"))?;
        // nsenter execs gobgpd: the child's pid is gobgpd's.
        let mut cmd = Command::new("nsenter");
        // SAFETY: prctl is async-signal-safe. gobgpd dies with the test
        // process even when that is killed (no guard runs then).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .arg(format!("--net=/var/run/netns/{}", self.ns))
            .arg("gobgpd")
            .arg("-f")
            .arg(self.dir.join("gobgpd.toml"))
            .args([
                "-t",
                "toml",
                "--api-hosts",
                "127.0.0.1:50051",
                "--pprof-disable",
                "-p",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting gobgpd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.gobgp(&["global"]).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("gobgpd exited at start ({st}):\n{}", self.log());
                }
            }
            if Instant::now() > deadline {
                bail!("gobgpd API did not answer:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gobgpd.log")).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kill gobgpd abruptly (SIGKILL: a crash; the kernel closes its
    /// sessions).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start gobgpd again with the same configuration (an empty RIB).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch()
    }

    /// Run the gobgp CLI against this daemon.
    pub fn gobgp(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "netns", "exec", &self.ns, "gobgp"];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// The routes of one family (`ipv4` or `ipv6`) in gobgpd's RIB.
    pub fn rib(&self, family: &str) -> Result<Vec<RibRoute>> {
        let out = self.gobgp(&["global", "rib", "-a", family, "-j"])?;
        parse_rib(&out)
    }

    /// Every route of both families.
    pub fn routes(&self) -> Result<Vec<RibRoute>> {
        let mut r = self.rib("ipv4")?;
        r.extend(self.rib("ipv6")?);
        Ok(r)
    }

    /// (neighbour address, session state) as gobgpd sees it: `idle`,
    /// `connect`, `active`, `opensent`, `openconfirm`, `established`.
    pub fn neighbors(&self) -> Result<Vec<(IpAddr, String)>> {
        let out = self.gobgp(&["neighbor", "-j"])?;
        parse_neighbors(&out)
    }

    pub fn established_with(&self, addr: IpAddr) -> bool {
        self.neighbors()
            .map(|ns| ns.iter().any(|(a, s)| *a == addr && s == "established"))
            .unwrap_or(false)
    }
}

impl Drop for GobgpPeer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `gobgp global rib -a F -j`: `{"prefix": [path, ...], ...}`; each path
/// has `attrs` (type 3 NEXT_HOP, 14 MP_REACH with `nexthop`, 2 AS_PATH,
/// 5 LOCAL_PREF). Every path is returned, best or not.
pub fn parse_rib(json: &str) -> Result<Vec<RibRoute>> {
    let v: Value = serde_json::from_str(json.trim()).context("gobgp rib JSON")?;
    let mut out = vec![];
    let Some(obj) = v.as_object() else {
        return Ok(out); // null: empty
    };
    for (prefix, paths) in obj {
        for p in paths.as_array().into_iter().flatten() {
            let mut r = RibRoute {
                prefix: prefix.clone(),
                next_hop: None,
                as_path: vec![],
                local_pref: None,
                best: p.get("best").and_then(Value::as_bool).unwrap_or(false),
                neighbor: p
                    .get("neighbor-ip")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse().ok()),
            };
            for a in p
                .get("attrs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                match a.get("type").and_then(Value::as_u64) {
                    Some(3) | Some(14) => {
                        r.next_hop = a
                            .get("nexthop")
                            .and_then(Value::as_str)
                            .and_then(|s| s.parse().ok())
                    }
                    Some(2) => {
                        for seg in a
                            .get("as_paths")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                        {
                            for asn in seg
                                .get("asns")
                                .and_then(Value::as_array)
                                .into_iter()
                                .flatten()
                            {
                                if let Some(n) = asn.as_u64() {
                                    r.as_path.push(n as u32);
                                }
                            }
                        }
                    }
                    Some(5) => {
                        r.local_pref = a.get("value").and_then(Value::as_u64).map(|n| n as u32)
                    }
                    _ => {}
                }
            }
            out.push(r);
        }
    }
    Ok(out)
}

/// `gobgp neighbor -j`.
pub fn parse_neighbors(json: &str) -> Result<Vec<(IpAddr, String)>> {
    let v: Value = serde_json::from_str(json.trim()).context("gobgp neighbor JSON")?;
    let mut out = vec![];
    for n in v.as_array().into_iter().flatten() {
        let Some(addr) = n
            .pointer("/conf/neighbor_address")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        let st = n.pointer("/state/session_state");
        let state = match st {
            Some(Value::Number(x)) => match x.as_u64() {
                Some(1) => "idle",
                Some(2) => "connect",
                Some(3) => "active",
                Some(4) => "opensent",
                Some(5) => "openconfirm",
                Some(6) => "established",
                _ => "unknown",
            }
            .to_string(),
            Some(Value::String(s)) => s.to_ascii_lowercase(),
            _ => "unknown".to_string(),
        };
        out.push((addr, state));
    }
    Ok(out)
}

/// Poll `f` until it returns `Ok`, for at most `timeout`; the error says
/// what was last seen.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> std::result::Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => {
                if start.elapsed() > timeout {
                    panic!("{what}: not within {timeout:?}; last seen: {last}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A veth pair `a_if` (in `a`) <-> `b_if` (in `b`), up, with addresses
/// (`10.1.0.1/24`, `fd00:1::1/64`; IPv6 without duplicate address
/// detection, so usable at once).
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addrs: &[&str],
    b: &Netns,
    b_if: &str,
    b_addrs: &[&str],
) -> Result<()> {
    a.sh(&[
        "ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])?;
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.sh(&["ip", "-6", "addr", "add", addr, "dev", ifname, "nodad"])?;
            } else {
                ns.sh(&["ip", "addr", "add", addr, "dev", ifname])?;
            }
        }
        ns.sh(&["ip", "link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// Removes a directory on drop.
pub struct DirGuard(pub PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rib_json() {
        let v4 = r#"{"20.0.0.100/32":[{"nlri":{"prefix":"20.0.0.100/32"},"age":1,"best":true,"attrs":[{"type":1,"value":0},{"type":2,"as_paths":[{"segment_type":2,"num":1,"asns":[65001]}]},{"type":3,"nexthop":"10.77.0.1"}],"stale":false,"source-id":"10.77.0.1","neighbor-ip":"10.77.0.1"}]}"#;
        let r = parse_rib(v4).unwrap();
        assert_eq!(
            r,
            vec![RibRoute {
                prefix: "20.0.0.100/32".into(),
                next_hop: Some("10.77.0.1".parse().unwrap()),
                as_path: vec![65001],
                local_pref: None,
                neighbor: Some("10.77.0.1".parse().unwrap()),
                best: true,
            }]
        );
        let v6 = r#"{"2001:db8::100/128":[{"attrs":[{"type":5,"value":100},{"type":14,"nexthop":"fd77::1","afi":2,"safi":1}],"neighbor-ip":"10.77.0.1"}]}"#;
        let r = parse_rib(v6).unwrap();
        assert_eq!(r[0].next_hop, Some("fd77::1".parse().unwrap()));
        assert_eq!(r[0].local_pref, Some(100));
        assert!(r[0].as_path.is_empty());
        assert!(!r[0].best);
        assert!(parse_rib("{}").unwrap().is_empty());
        assert!(parse_rib("null").unwrap().is_empty());
    }

    #[test]
    fn neighbor_json() {
        let j = r#"[{"conf":{"neighbor_address":"10.5.0.1","peer_asn":65001},"state":{"session_state":6}},{"conf":{"neighbor_address":"fd00::1"},"state":{"session_state":3}}]"#;
        assert_eq!(
            parse_neighbors(j).unwrap(),
            vec![
                ("10.5.0.1".parse().unwrap(), "established".to_string()),
                ("fd00::1".parse().unwrap(), "active".to_string())
            ]
        );
    }

    #[test]
    fn config_text() {
        let mut n = GobgpNeighbor::new("10.1.0.1", 65001);
        n.remote_port = Some(1790);
        n.passive = true;
        n.multihop_ttl = Some(10);
        let c = render(65002, Ipv4Addr::new(10, 1, 0, 2), Listen::Off, &[n]);
        for want in [
            "as = 65002",
            "port = -1",
            "neighbor-address = \"10.1.0.1\"",
            "passive-mode = true",
            "remote-port = 1790",
            "multihop-ttl = 10",
            "afi-safi-name = \"ipv6-unicast\"",
        ] {
            assert!(c.contains(want), "{want} missing:\n{c}");
        }
    }
}
