//! Parsers of BIRD's `show status`, `show protocols all` and
//! `show route export table <peer>.<family>` replies into typed
//! neighbour and route records.
//!
//! Defensive: unknown lines are skipped, a missing field is `None`, and
//! only a reply whose basic shape is wrong (a protocol row without name,
//! type and state) is an error. The generated configuration prints times
//! as Unix seconds (`timeformat ... "%s"`); another time format gives
//! `None` times rather than an error.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use ipnet::IpNet;

use super::control::Reply;

/// The BGP finite-state machine's state (RFC 4271), as BIRD names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BgpState {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
    Close,
    /// The protocol is down (disabled, or shutting down) and shows no BGP
    /// state.
    Down,
    Other(String),
}

impl BgpState {
    pub fn parse(s: &str) -> Self {
        match s.trim() {
            "Idle" => BgpState::Idle,
            "Connect" => BgpState::Connect,
            "Active" => BgpState::Active,
            "OpenSent" => BgpState::OpenSent,
            "OpenConfirm" => BgpState::OpenConfirm,
            "Established" => BgpState::Established,
            "Close" => BgpState::Close,
            "Down" | "" => BgpState::Down,
            o => BgpState::Other(o.to_string()),
        }
    }
}

impl std::fmt::Display for BgpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BgpState::Other(s) => f.write_str(s),
            s => write!(f, "{s:?}"),
        }
    }
}

/// One address family of a session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Channel {
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// `UP`, `DOWN`, `START`, ...
    pub state: String,
    pub imported: Option<u32>,
    /// Routes currently exported (sent) on this channel.
    pub exported: Option<u32>,
    /// Next hop(s) put on routes sent: the address, and for IPv6 also the
    /// link-local one. Empty while the session is down, or when BIRD has
    /// no next hop for this family (`::`): then its routes are not
    /// announced.
    pub next_hop: Vec<IpAddr>,
    /// BIRD printed a next hop of `::`/`0.0.0.0`: routes of this family
    /// cannot be announced on this session (set
    /// [`super::BgpConfig::next_hop_v6`] / `next_hop_v4`).
    pub next_hop_missing: bool,
}

/// One protocol row of `show protocols all` with its details.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProtocolInfo {
    pub name: String,
    /// `BGP`, `Static`, `Device`, ...
    pub proto: String,
    pub table: String,
    /// `up`, `start`, `down`, `flush`, ...
    pub state: String,
    /// Unix seconds of the last state change.
    pub since: Option<u64>,
    pub info: String,
    /// `BGP state:`.
    pub bgp_state: Option<String>,
    pub neighbor_address: Option<IpAddr>,
    pub neighbor_as: Option<u32>,
    pub local_as: Option<u32>,
    pub neighbor_id: Option<Ipv4Addr>,
    /// `external`, `internal`, with `multihop`, `AS4`, ...
    pub session: Option<String>,
    pub source_address: Option<IpAddr>,
    /// (remaining, negotiated) seconds.
    pub hold_timer: Option<(f64, u32)>,
    pub keepalive_timer: Option<(f64, u32)>,
    pub last_error: Option<String>,
    pub channels: Vec<Channel>,
}

/// A BGP neighbour, for introspection.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbor {
    /// BIRD's protocol name.
    pub name: String,
    pub address: IpAddr,
    pub remote_as: Option<u32>,
    pub local_as: Option<u32>,
    pub state: BgpState,
    /// How long the session has been Established (`None` otherwise).
    pub uptime: Option<Duration>,
    /// Unix seconds of the last state change (session up, or down).
    pub since: Option<u64>,
    /// `true` for iBGP.
    pub internal: Option<bool>,
    pub multihop: bool,
    pub source_address: Option<IpAddr>,
    pub router_id: Option<Ipv4Addr>,
    /// Negotiated hold time and keepalive interval (Established only).
    pub hold_time: Option<u32>,
    pub keepalive: Option<u32>,
    /// Why the last session ended, or why it does not come up.
    pub last_error: Option<String>,
    /// BIRD's one-line summary (e.g. `Active Socket: Connection refused`).
    pub info: String,
    pub channels: Vec<Channel>,
}

impl Neighbor {
    pub fn is_established(&self) -> bool {
        self.state == BgpState::Established
    }

    /// Routes currently sent on all channels.
    pub fn routes_sent(&self) -> u32 {
        self.channels.iter().filter_map(|c| c.exported).sum()
    }
}

/// `show status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    pub version: String,
    pub router_id: Option<Ipv4Addr>,
    /// Unix seconds, BIRD's clock.
    pub server_time: Option<u64>,
    pub last_reboot: Option<u64>,
    pub last_reconfiguration: Option<u64>,
    /// The final line: `Daemon is up and running`, `Reconfiguration in
    /// progress`, `Shutdown in progress`, ...
    pub daemon: String,
}

fn after<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    s.trim().strip_prefix(prefix).map(str::trim)
}

pub fn parse_status(r: &Reply) -> Status {
    let mut st = Status {
        daemon: r.message().trim().to_string(),
        ..Default::default()
    };
    for l in &r.lines {
        let t = l.text.trim();
        if l.code == 1000 {
            st.version = t.to_string();
        } else if let Some(v) = after(t, "Router ID is") {
            st.router_id = v.parse().ok();
        } else if let Some(v) = after(t, "Current server time is") {
            st.server_time = v.parse().ok();
        } else if let Some(v) = after(t, "Last reboot on") {
            st.last_reboot = v.parse().ok();
        } else if let Some(v) = after(t, "Last reconfiguration on") {
            st.last_reconfiguration = v.parse().ok();
        }
    }
    st
}

/// `12.5/90` -> (12.5, 90).
fn timer(v: &str) -> Option<(f64, u32)> {
    let (a, b) = v.split_once('/')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// `0 imported, 1 exported, 0 preferred` (also with `filtered`).
fn route_counts(v: &str) -> (Option<u32>, Option<u32>) {
    let mut imported = None;
    let mut exported = None;
    for part in v.split(',') {
        let mut it = part.split_whitespace();
        let (Some(n), Some(what)) = (it.next(), it.next()) else {
            continue;
        };
        match what {
            "imported" => imported = n.parse().ok(),
            "exported" => exported = n.parse().ok(),
            _ => {}
        }
    }
    (imported, exported)
}

fn parse_row(text: &str) -> Result<ProtocolInfo, String> {
    let mut it = text.split_whitespace();
    let (Some(name), Some(proto), Some(table), Some(state)) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(format!("protocol row too short: {text:?}"));
    };
    let rest: Vec<&str> = it.collect();
    let (since, info) = match rest.first().and_then(|s| s.parse::<u64>().ok()) {
        Some(t) => (Some(t), rest[1..].join(" ")),
        None => (None, rest.join(" ")),
    };
    Ok(ProtocolInfo {
        name: name.to_string(),
        proto: proto.to_string(),
        table: table.to_string(),
        state: state.to_string(),
        since,
        info,
        ..Default::default()
    })
}

fn apply_detail(p: &mut ProtocolInfo, text: &str) {
    let t = text.trim();
    if t.is_empty() {
        return;
    }
    if let Some(fam) = t.strip_prefix("Channel ") {
        p.channels.push(Channel {
            family: fam.trim().to_string(),
            ..Default::default()
        });
        return;
    }
    let Some((key, value)) = t.split_once(':') else {
        return; // capability names and other headings
    };
    let value = value.trim();
    if let Some(ch) = p.channels.last_mut() {
        match key {
            "State" => ch.state = value.to_string(),
            "Routes" => (ch.imported, ch.exported) = route_counts(value),
            "BGP Next hop" => {
                let addrs: Vec<IpAddr> = value
                    .split_whitespace()
                    .filter_map(|a| a.parse().ok())
                    .collect();
                ch.next_hop_missing = addrs.first().is_some_and(|a| a.is_unspecified());
                ch.next_hop = addrs.into_iter().filter(|a| !a.is_unspecified()).collect();
            }
            _ => {}
        }
        return;
    }
    match key {
        "BGP state" => p.bgp_state = Some(value.to_string()),
        "Neighbor address" => p.neighbor_address = value.parse().ok(),
        "Neighbor AS" => p.neighbor_as = value.parse().ok(),
        "Local AS" => p.local_as = value.parse().ok(),
        "Neighbor ID" => p.neighbor_id = value.parse().ok(),
        "Session" => p.session = Some(value.to_string()),
        "Source address" => p.source_address = value.parse().ok(),
        "Hold timer" => p.hold_timer = timer(value),
        "Keepalive timer" => p.keepalive_timer = timer(value),
        "Last error" => p.last_error = Some(value.to_string()),
        _ => {}
    }
}

/// `show protocols all`: every protocol with its details (code 1002 rows,
/// 1006 details).
pub fn parse_protocols(r: &Reply) -> Result<Vec<ProtocolInfo>, String> {
    let mut out: Vec<ProtocolInfo> = vec![];
    for l in &r.lines {
        match l.code {
            1002 => out.push(parse_row(&l.text)?),
            1006 => {
                if let Some(p) = out.last_mut() {
                    apply_detail(p, &l.text);
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The BGP protocols as neighbours; `now` (BIRD's clock, Unix seconds)
/// gives the uptime.
pub fn neighbors(protocols: &[ProtocolInfo], now: Option<u64>) -> Vec<Neighbor> {
    protocols
        .iter()
        .filter(|p| p.proto == "BGP")
        .filter_map(|p| {
            let address = p.neighbor_address?;
            let state = match &p.bgp_state {
                Some(s) => BgpState::parse(s),
                None => BgpState::Down,
            };
            let uptime = match (state == BgpState::Established, p.since, now) {
                (true, Some(since), Some(now)) => {
                    Some(Duration::from_secs(now.saturating_sub(since)))
                }
                _ => None,
            };
            let session = p.session.as_deref().unwrap_or("");
            Some(Neighbor {
                name: p.name.clone(),
                address,
                remote_as: p.neighbor_as,
                local_as: p.local_as,
                state,
                uptime,
                since: p.since,
                internal: if session.contains("internal") {
                    Some(true)
                } else if session.contains("external") {
                    Some(false)
                } else {
                    None
                },
                multihop: session.contains("multihop"),
                source_address: p.source_address,
                router_id: p.neighbor_id,
                hold_time: p.hold_timer.map(|t| t.1),
                keepalive: p.keepalive_timer.map(|t| t.1),
                last_error: p.last_error.clone(),
                info: p.info.clone(),
                channels: p.channels.clone(),
            })
        })
        .collect()
}

/// `show route export table P.ipv4`: the prefixes of the rows (code 1007;
/// attribute lines, second routes of a prefix and the `Table` heading are
/// skipped).
pub fn parse_export_table(r: &Reply) -> Vec<IpNet> {
    r.lines
        .iter()
        .filter(|l| l.code == 1007)
        .filter(|l| !l.text.starts_with(char::is_whitespace))
        .filter_map(|l| l.text.split_whitespace().next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::control::decode;
    use super::*;

    /// Captured from BIRD 2.0.12 (`show protocols all`, raw socket
    /// protocol; trimmed, the IPv6 session made iBGP), with an established IPv4 session carrying both families,
    /// an IPv6 session, a multihop one whose IPv6 next hop is missing, and
    /// one that cannot connect.
    const PROTOCOLS: &str = "\
2002-Name       Proto      Table      State  Since         Info
1002-device1    Device     ---        up     1795781986    
1006-
1002-vips4      Static     master4    up     1795781986    
1006-  Channel ipv4
     State:          UP
     Table:          master4
     Preference:     200
     Input filter:   ACCEPT
     Output filter:  REJECT
     Routes:         1 imported, 0 exported, 1 preferred
     Route change stats:     received   rejected   filtered    ignored   accepted
       Import updates:              1          0          0          0          1
       Import withdraws:            0          0        ---          0          0
       Export updates:              0          0          0        ---          0
       Export withdraws:            0        ---        ---        ---          0
 
1002-peer4_10_77_0_2 BGP        ---        up     1795782063    Established   
1006-  BGP state:          Established
     Neighbor address: 10.77.0.2
     Neighbor AS:      65002
     Local AS:         65001
     Neighbor ID:      10.77.0.2
     Local capabilities
       Multiprotocol
         AF announced: ipv4 ipv6
       Route refresh
       Graceful restart
       4-octet AS numbers
       Enhanced refresh
       Long-lived graceful restart
     Neighbor capabilities
       Multiprotocol
         AF announced: ipv4 ipv6
       Route refresh
       Extended next hop
         IPv6 nexthop: ipv4
       4-octet AS numbers
       Hostname: vm
     Session:          external AS4
     Source address:   10.77.0.1
     Hold timer:       7.809/9
     Keepalive timer:  1.715/3
   Channel ipv4
     State:          UP
     Table:          master4
     Preference:     100
     Input filter:   REJECT
     Output filter:  (unnamed)
     Routes:         0 imported, 1 exported, 0 preferred
     Route change stats:     received   rejected   filtered    ignored   accepted
       Import updates:              0          0          0          0          0
       Import withdraws:            0          0        ---          0          0
       Export updates:              1          0          0        ---          1
       Export withdraws:            0        ---        ---        ---          0
     BGP Next hop:   10.77.0.1
   Channel ipv6
     State:          UP
     Table:          master6
     Preference:     100
     Input filter:   REJECT
     Output filter:  (unnamed)
     Routes:         0 imported, 1 exported, 0 preferred
     BGP Next hop:   fd77::1 fe80::4f4:46ff:fea6:ee6d
 
1002-peer6_fd77_0_0_0_0_0_0_2 BGP        ---        up     1795782084    Established   
1006-  BGP state:          Established
     Neighbor address: fd77::2
     Neighbor AS:      65001
     Local AS:         65001
     Neighbor ID:      10.77.0.2
     Session:          internal multihop AS4
     Source address:   fd77::1
     Hold timer:       5.073/9
     Keepalive timer:  0.234/3
   Channel ipv4
     State:          UP
     Table:          master4
     Routes:         0 imported, 1 exported, 0 preferred
     BGP Next hop:   10.77.0.1
   Channel ipv6
     State:          UP
     Table:          master6
     Routes:         0 imported, 1 exported, 0 preferred
     BGP Next hop:   fd77::1 fe80::4f4:46ff:fea6:ee6d
 
1002-peer4_10_99_0_2 BGP        ---        up     1795782159    Established   
1006-  BGP state:          Established
     Neighbor address: 10.99.0.2
     Neighbor AS:      65002
     Local AS:         65001
     Session:          external multihop AS4
     Source address:   10.88.0.1
     Hold timer:       7.097/9
     Keepalive timer:  1.961/3
   Channel ipv4
     State:          UP
     Routes:         0 imported, 1 exported, 0 preferred
     BGP Next hop:   10.88.0.1
     IGP IPv4 table: master4
   Channel ipv6
     State:          UP
     Routes:         0 imported, 0 exported, 0 preferred
     BGP Next hop:   ::
     IGP IPv6 table: master6
 
1002-peer4_10_66_0_2 BGP        ---        start  1795782058    Active        Socket: Connection refused
1006-  BGP state:          Active
     Neighbor address: 10.66.0.2
     Neighbor AS:      65002
     Local AS:         65001
     Connect delay:    1.935/5
     Last error:       Socket: Connection refused
   Channel ipv4
     State:          DOWN
     Table:          master4
     IGP IPv4 table: master4
   Channel ipv6
     State:          DOWN
     Table:          master6
     IGP IPv6 table: master6
 
0000 
";

    const STATUS: &str = "\
1000-BIRD 2.0.12
1011-Router ID is 10.77.0.1
 Hostname is vm
 Current server time is 1795782066
 Last reboot on 1795781986
 Last reconfiguration on 1795782058
0013 Daemon is up and running
";

    const EXPORT: &str = "\
1007-Table export:
 20.0.0.100/32        blackhole [vips4 12:21:25.839] * (200)
 20.0.0.101/32        blackhole [vips4 12:21:25.839] * (200)
                      blackhole [other 12:21:25.839] (100)
1008-\tType: static univ
0000 
";

    #[test]
    fn status() {
        let s = parse_status(&decode(STATUS).unwrap());
        assert_eq!(
            s,
            Status {
                version: "BIRD 2.0.12".into(),
                router_id: Some(Ipv4Addr::new(10, 77, 0, 1)),
                server_time: Some(1795782066),
                last_reboot: Some(1795781986),
                last_reconfiguration: Some(1795782058),
                daemon: "Daemon is up and running".into(),
            }
        );
    }

    #[test]
    fn protocols_and_neighbors() {
        let ps = parse_protocols(&decode(PROTOCOLS).unwrap()).unwrap();
        let names: Vec<&str> = ps.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "device1",
                "vips4",
                "peer4_10_77_0_2",
                "peer6_fd77_0_0_0_0_0_0_2",
                "peer4_10_99_0_2",
                "peer4_10_66_0_2"
            ]
        );
        assert_eq!(ps[1].channels[0].imported, Some(1));
        assert_eq!(ps[1].since, Some(1795781986));

        let ns = neighbors(&ps, Some(1795782066));
        assert_eq!(ns.len(), 4);
        let e = &ns[0];
        assert_eq!(e.address, "10.77.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(e.state, BgpState::Established);
        assert!(e.is_established());
        assert_eq!(e.uptime, Some(Duration::from_secs(3)));
        assert_eq!((e.remote_as, e.local_as), (Some(65002), Some(65001)));
        assert_eq!(e.internal, Some(false));
        assert!(!e.multihop);
        assert_eq!(e.source_address, Some("10.77.0.1".parse().unwrap()));
        assert_eq!(e.router_id, Some(Ipv4Addr::new(10, 77, 0, 2)));
        assert_eq!((e.hold_time, e.keepalive), (Some(9), Some(3)));
        assert_eq!(e.routes_sent(), 2);
        assert_eq!(e.channels.len(), 2);
        assert_eq!(e.channels[0].family, "ipv4");
        assert_eq!(e.channels[0].state, "UP");
        assert_eq!(
            e.channels[0].next_hop,
            vec!["10.77.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            e.channels[1].next_hop,
            vec![
                "fd77::1".parse::<IpAddr>().unwrap(),
                "fe80::4f4:46ff:fea6:ee6d".parse().unwrap()
            ]
        );
        assert!(!e.channels[1].next_hop_missing);

        let i = &ns[1];
        assert_eq!(i.internal, Some(true));
        assert!(i.multihop);
        // `since` after BIRD's `now` (cannot happen, but clocks): zero, not a panic
        assert_eq!(i.uptime, Some(Duration::ZERO));

        let m = &ns[2];
        assert!(m.multihop);
        assert_eq!(m.internal, Some(false));
        assert!(m.channels[1].next_hop_missing, "{:?}", m.channels[1]);
        assert!(m.channels[1].next_hop.is_empty());
        assert_eq!(m.routes_sent(), 1);

        let d = &ns[3];
        assert_eq!(d.state, BgpState::Active);
        assert!(!d.is_established());
        assert_eq!(d.uptime, None);
        assert_eq!(d.last_error.as_deref(), Some("Socket: Connection refused"));
        assert_eq!(d.info, "Active Socket: Connection refused");
        assert_eq!(d.channels[0].state, "DOWN");
        assert_eq!(d.routes_sent(), 0);
    }

    #[test]
    fn defensive() {
        // a disabled protocol has no BGP details; other time formats give None
        let r = decode(
            "1002-peer4_10_0_0_9 BGP        ---        down   12:19:50.802\n1006-  Neighbor address: 10.0.0.9\n0000 \n",
        )
        .unwrap();
        let ps = parse_protocols(&r).unwrap();
        assert_eq!(ps[0].since, None);
        assert_eq!(ps[0].info, "12:19:50.802");
        let ns = neighbors(&ps, None);
        assert_eq!(ns[0].state, BgpState::Down);
        // a BGP row without a neighbour address is not a neighbour
        let r = decode("1002-x BGP --- up 1\n0000 \n").unwrap();
        assert!(neighbors(&parse_protocols(&r).unwrap(), None).is_empty());
        // a row that is too short is an error
        let r = decode("1002-x BGP\n0000 \n").unwrap();
        assert!(parse_protocols(&r).is_err());
        // details before any row, unknown lines: ignored
        let r = decode("1006-  Something: else\n1002-p BGP --- up 5 Established\n1006-  BGP state: Weird\n   Hold timer: x/y\n0000 \n").unwrap();
        let ns = neighbors(&parse_protocols(&r).unwrap(), Some(10));
        assert!(ns.is_empty());
        let ps = parse_protocols(&r).unwrap();
        assert_eq!(ps[0].bgp_state.as_deref(), Some("Weird"));
        assert_eq!(ps[0].hold_timer, None);
        assert_eq!(BgpState::parse("Weird"), BgpState::Other("Weird".into()));
    }

    #[test]
    fn export_table() {
        let routes = parse_export_table(&decode(EXPORT).unwrap());
        assert_eq!(
            routes,
            vec![
                "20.0.0.100/32".parse::<IpNet>().unwrap(),
                "20.0.0.101/32".parse().unwrap()
            ]
        );
        let v6 = decode("1007-Table export:\n 2001:db8::100/128    blackhole [vips6 12:21:25.839] * (200)\n0000 \n").unwrap();
        assert_eq!(
            parse_export_table(&v6),
            vec!["2001:db8::100/128".parse::<IpNet>().unwrap()]
        );
        assert!(parse_export_table(&decode("0000 \n").unwrap()).is_empty());
    }
}
