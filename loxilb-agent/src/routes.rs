//! The node's IPv4 routing table as the kernel shows it in
//! `/proc/net/route` (of the agent's network namespace): enough to tell
//! whether an endpoint is on a directly connected segment, which L2 DSR
//! needs.

use std::net::Ipv4Addr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub iface: String,
    pub dest: Ipv4Addr,
    pub mask: Ipv4Addr,
    /// None when directly connected.
    pub gateway: Option<Ipv4Addr>,
}

const RTF_UP: u32 = 0x1;
const RTF_GATEWAY: u32 = 0x2;

fn hex_addr(s: &str) -> Option<Ipv4Addr> {
    // The kernel prints the raw (network-order) u32 with %08X.
    u32::from_str_radix(s, 16)
        .ok()
        .map(|v| Ipv4Addr::from(v.to_ne_bytes()))
}

/// Parse the text of `/proc/net/route`.
pub fn parse(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            if flags & RTF_UP == 0 {
                return None;
            }
            Some(Route {
                iface: f[0].to_string(),
                dest: hex_addr(f[1])?,
                gateway: if flags & RTF_GATEWAY != 0 {
                    hex_addr(f[2])
                } else {
                    None
                },
                mask: hex_addr(f[7])?,
            })
        })
        .collect()
}

pub fn read() -> std::io::Result<Vec<Route>> {
    Ok(parse(&std::fs::read_to_string("/proc/net/route")?))
}

/// The most specific route to `dst`.
pub fn lookup(routes: &[Route], dst: Ipv4Addr) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| u32::from(dst) & u32::from(r.mask) == u32::from(r.dest) & u32::from(r.mask))
        .max_by_key(|r| u32::from(r.mask).count_ones())
}

/// Why `ep` cannot take L2 DSR traffic from this node, if it cannot.
pub fn l2_problem(routes: &[Route], ep: Ipv4Addr) -> Option<String> {
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

    const TABLE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth1\t00000A0A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth1\t00050A0A\t01000A0A\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0
";

    #[test]
    fn parses_and_matches_longest_prefix() {
        let r = parse(TABLE);
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].gateway, Some("192.168.1.1".parse().unwrap()));
        assert_eq!(r[1].dest, "192.168.1.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(r[1].mask, "255.255.255.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            lookup(&r, "10.10.3.4".parse().unwrap()).unwrap().iface,
            "eth1"
        );
        assert_eq!(
            lookup(&r, "10.10.5.4".parse().unwrap()).unwrap().gateway,
            Some("10.10.0.1".parse().unwrap())
        );
    }

    #[test]
    fn l2_adjacency() {
        let r = parse(TABLE);
        assert_eq!(l2_problem(&r, "192.168.1.20".parse().unwrap()), None);
        assert_eq!(l2_problem(&r, "10.10.9.9".parse().unwrap()), None);
        let e = l2_problem(&r, "10.10.5.9".parse().unwrap()).unwrap();
        assert!(
            e.contains("router 10.10.0.1") && e.contains("dsr-ipip"),
            "{e}"
        );
        let e = l2_problem(&r, "8.8.8.8".parse().unwrap()).unwrap();
        assert!(e.contains("192.168.1.1"), "default route is a router: {e}");
        assert!(l2_problem(&parse(""), "1.1.1.1".parse().unwrap())
            .unwrap()
            .contains("no route"));
    }
}
