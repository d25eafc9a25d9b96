//! The node's routing table (main table, IPv4 and IPv6, read over
//! rtnetlink in the agent's network namespace): enough to tell whether an
//! endpoint is on a directly connected segment, which L2 DSR needs.

use std::net::IpAddr;

use anyhow::Result;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub iface: String,
    pub dest: IpAddr,
    pub prefix_len: u8,
    /// None when directly connected.
    pub gateway: Option<IpAddr>,
}

impl Route {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.dest, ip) {
            (IpAddr::V4(d), IpAddr::V4(a)) => {
                let n = self.prefix_len.min(32) as u32;
                let mask = if n == 0 { 0 } else { u32::MAX << (32 - n) };
                u32::from(d) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(d), IpAddr::V6(a)) => {
                let n = self.prefix_len.min(128) as u32;
                let mask = if n == 0 { 0 } else { u128::MAX << (128 - n) };
                u128::from(d) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The main table's unicast routes of both families, each with its
/// device's name.
pub fn read() -> Result<Vec<Route>> {
    let links = crate::netlink::links()?;
    let name = |i: u32| {
        links
            .iter()
            .find(|l| l.index == i)
            .map_or_else(|| format!("ifindex {i}"), |l| l.name.clone())
    };
    Ok(crate::netlink::routes()?
        .into_iter()
        .map(|r| Route {
            iface: name(r.oif),
            dest: r.dest,
            prefix_len: r.prefix_len,
            gateway: r.gateway,
        })
        .collect())
}

/// The most specific route to `dst` (of its family).
pub fn lookup(routes: &[Route], dst: IpAddr) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| r.contains(dst))
        .max_by_key(|r| r.prefix_len)
}

/// Why `ep` cannot take L2 DSR traffic from this node, if it cannot.
pub fn l2_problem(routes: &[Route], ep: IpAddr) -> Option<String> {
    match lookup(routes, ep) {
        None => Some(format!("no route to {ep} from this node")),
        Some(Route {
            gateway: Some(gw),
            iface,
            ..
        }) => Some(format!(
            "{ep} is reached through the router {gw} (on {iface}), not on a directly \
             connected segment; L2 DSR cannot reach it: use mode dsr-ipip, or put the \
             endpoint on a segment this node is attached to"
        )),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(iface: &str, dest: &str, len: u8, gw: Option<&str>) -> Route {
        Route {
            iface: iface.into(),
            dest: dest.parse().unwrap(),
            prefix_len: len,
            gateway: gw.map(|g| g.parse().unwrap()),
        }
    }

    fn table() -> Vec<Route> {
        vec![
            r("eth0", "0.0.0.0", 0, Some("192.168.1.1")),
            r("eth0", "192.168.1.0", 24, None),
            r("eth1", "10.10.0.0", 16, None),
            r("eth1", "10.10.5.0", 24, Some("10.10.0.1")),
            r("eth0", "::", 0, Some("fe80::1")),
            r("eth1", "fd00:1::", 64, None),
            r("eth1", "fd00:1::8:0", 112, Some("fd00:1::1")),
        ]
    }

    #[test]
    fn matches_longest_prefix_per_family() {
        let t = table();
        let at = |ip: &str| lookup(&t, ip.parse().unwrap()).unwrap();
        assert_eq!(at("10.10.3.4").iface, "eth1");
        assert_eq!(at("10.10.5.4").gateway, Some("10.10.0.1".parse().unwrap()));
        assert_eq!(at("8.8.8.8").prefix_len, 0);
        assert_eq!(at("fd00:1::20").prefix_len, 64);
        assert_eq!(at("fd00:1::8:20").prefix_len, 112);
        assert_eq!(at("2001:db8::1").gateway, Some("fe80::1".parse().unwrap()));
        let v4_only = &t[..4];
        assert!(lookup(v4_only, "fd00:1::20".parse().unwrap()).is_none());
    }

    #[test]
    fn l2_adjacency() {
        let t = table();
        let p = |ip: &str| l2_problem(&t, ip.parse().unwrap());
        assert_eq!(p("192.168.1.20"), None);
        assert_eq!(p("10.10.9.9"), None);
        assert_eq!(p("fd00:1::20"), None);
        let e = p("10.10.5.9").unwrap();
        assert!(
            e.contains("router 10.10.0.1") && e.contains("dsr-ipip"),
            "{e}"
        );
        let e = p("fd00:1::8:9").unwrap();
        assert!(e.contains("router fd00:1::1"), "{e}");
        assert!(p("8.8.8.8").unwrap().contains("192.168.1.1"));
        assert!(l2_problem(&[], "1.1.1.1".parse().unwrap())
            .unwrap()
            .contains("no route"));
    }

    /// The kernel's own table, read over rtnetlink: in a new network
    /// namespace, the routes of addresses and gateways added there.
    #[test]
    fn reads_both_families_from_the_kernel() {
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var_os("LOXILB_REQUIRE_ROOT").is_none(),
                "LOXILB_REQUIRE_ROOT is set but this test does not run as root"
            );
            eprintln!("skipped: needs root (a network namespace of its own)");
            return;
        }
        let got = std::thread::spawn(|| -> Result<Vec<Route>> {
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                anyhow::bail!("unshare: {}", std::io::Error::last_os_error());
            }
            let sh = |c: &str| {
                let st = std::process::Command::new("sh").args(["-c", c]).status()?;
                anyhow::ensure!(st.success(), "{c}: {st}");
                Ok(())
            };
            sh("ip link add v0 type veth peer name v1")?;
            sh("ip link set v0 up && ip link set v1 up")?;
            sh("ip addr add 10.77.0.1/24 dev v0")?;
            sh("ip -6 addr add fd77::1/64 dev v0 nodad")?;
            sh("ip route add 10.78.0.0/16 via 10.77.0.254")?;
            sh("ip -6 route add fd78::/48 via fd77::fe")?;
            read()
        })
        .join()
        .unwrap()
        .unwrap();
        let find = |d: &str, l: u8| {
            got.iter()
                .find(|r| r.dest == d.parse::<IpAddr>().unwrap() && r.prefix_len == l)
        };
        assert_eq!(
            find("10.77.0.0", 24).map(|r| r.gateway),
            Some(None),
            "{got:?}"
        );
        assert_eq!(
            find("10.78.0.0", 16).and_then(|r| r.gateway),
            Some("10.77.0.254".parse().unwrap()),
            "{got:?}"
        );
        assert_eq!(
            find("fd77::", 64).map(|r| r.iface.as_str()),
            Some("v0"),
            "{got:?}"
        );
        assert_eq!(
            find("fd78::", 48).and_then(|r| r.gateway),
            Some("fd77::fe".parse().unwrap()),
            "{got:?}"
        );
    }
}
