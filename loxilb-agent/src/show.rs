//! Human-readable tables of rules, sessions and counters (the CLI).

use std::{collections::HashMap, fmt::Write as _, net::IpAddr};

use loxilb_common::{
    ct_dir, ct_state, ip_from_addr, lb_mode, Addr, AssocKey, AssocVal, CtKey, CtVal, EpKey,
    EpStats, EpVal, RuleStats, RuleVips, SvcKey, SvcVal,
};

fn ip(a: Addr) -> IpAddr {
    ip_from_addr(&a)
}

/// `a.b.c.d:port` or `[v6]:port`, port in network order.
fn hp(a: Addr, p: u16) -> String {
    std::net::SocketAddr::new(ip(a), u16::from_be(p)).to_string()
}

fn port(p: u16) -> u16 {
    u16::from_be(p)
}

fn proto(p: u8) -> String {
    loxilb_model::Protocol::from_number(p)
        .map(|p| p.to_string())
        .unwrap_or_else(|| p.to_string())
}

/// One row per rule (a multihomed SCTP rule has a service entry per VIP):
/// its primary entry and its secondary VIPs, by rule id.
fn by_rule(
    svcs: &[(SvcKey, SvcVal)],
    rule_vips: &HashMap<u32, RuleVips>,
) -> Vec<(SvcKey, SvcVal, Vec<Addr>)> {
    let mut groups: std::collections::BTreeMap<u32, Vec<(SvcKey, SvcVal)>> = Default::default();
    for (k, v) in svcs {
        groups.entry(v.rule_id).or_default().push((*k, *v));
    }
    groups
        .into_iter()
        .map(|(id, mut entries)| {
            let listed: Vec<Addr> = rule_vips
                .get(&id)
                .map(|v| v.vips[..(v.n as usize).min(loxilb_common::MAX_RULE_VIPS)].to_vec())
                .unwrap_or_default();
            let (k, v, secondary, _) =
                crate::datapath::primary_and_secondaries(&mut entries, &listed);
            (k, v, secondary)
        })
        .collect()
}

/// An endpoint as a rule lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EpRef {
    pub ip: IpAddr,
    pub port: u16,
    pub weight: u16,
    /// Takes new sessions (not made inactive by a probe).
    pub active: bool,
}

/// One rule, as `loxilb-agent rules` shows it (`-o json`: these fields).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RuleRow {
    pub id: u32,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub mode: &'static str,
    pub selection: &'static str,
    pub timeout_s: u32,
    pub sessions: u64,
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
    pub endpoints: Vec<EpRef>,
    /// SCTP multihoming: the rule's other VIPs.
    pub secondary_vips: Vec<IpAddr>,
}

/// Every rule of the maps, one row each.
pub fn rule_rows(
    svcs: &[(SvcKey, SvcVal)],
    eps: &HashMap<EpKey, EpVal>,
    stats: &HashMap<u32, RuleStats>,
    rule_vips: &HashMap<u32, RuleVips>,
) -> Vec<RuleRow> {
    by_rule(svcs, rule_vips)
        .into_iter()
        .map(|(k, v, secondary)| {
            let st = stats.get(&v.rule_id).copied().unwrap_or_default();
            RuleRow {
                id: v.rule_id,
                vip: ip(k.addr),
                port: port(k.port),
                protocol: proto(k.proto),
                mode: match v.mode {
                    0 => "default",
                    1 => "onearm",
                    2 => "fullnat",
                    3 => "dsr",
                    _ => "?",
                },
                selection: match v.sel {
                    0 => "rr",
                    1 => "hash",
                    2 => "persist",
                    3 => "lc",
                    _ => "?",
                },
                timeout_s: v.timeout_s,
                sessions: st.new_sessions,
                packets: st.packets,
                bytes: st.bytes,
                drops: st.drop_no_endpoint + st.drop_src_range,
                endpoints: (0..v.ep_count)
                    .filter_map(|i| eps.get(&EpKey::new(v.rule_id, v.ep_bank, i)))
                    .map(|e| EpRef {
                        ip: ip(e.addr),
                        port: port(e.port),
                        weight: e.weight,
                        active: e.flags & loxilb_common::ep_flags::INACTIVE == 0,
                    })
                    .collect(),
                secondary_vips: secondary.iter().map(|a| ip(*a)).collect(),
            }
        })
        .collect()
}

pub fn rules_table(
    svcs: &[(SvcKey, SvcVal)],
    eps: &HashMap<EpKey, EpVal>,
    stats: &HashMap<u32, RuleStats>,
    rule_vips: &HashMap<u32, RuleVips>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<22} {:<5} {:<8} {:<7} {:<8} {:>9} {:>10} {:>7} ENDPOINTS",
        "ID", "VIP:PORT", "PROTO", "MODE", "SEL", "TIMEOUT", "SESSIONS", "PACKETS", "DROPS"
    );
    for r in rule_rows(svcs, eps, stats, rule_vips) {
        let list: Vec<String> = r
            .endpoints
            .iter()
            .map(|e| {
                format!(
                    "{}{}{}",
                    std::net::SocketAddr::new(e.ip, e.port),
                    if e.weight > 1 {
                        format!("*{}", e.weight)
                    } else {
                        String::new()
                    },
                    if e.active { "" } else { "(inactive)" }
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<5} {:<22} {:<5} {:<8} {:<7} {:<8} {:>9} {:>10} {:>7} {}",
            r.id,
            std::net::SocketAddr::new(r.vip, r.port).to_string(),
            r.protocol,
            r.mode,
            r.selection,
            format!("{}s", r.timeout_s),
            r.sessions,
            r.packets,
            r.drops,
            if list.is_empty() {
                "(none: new connections are dropped)".to_string()
            } else {
                list.join(", ")
            }
        );
        if !r.secondary_vips.is_empty() {
            // SCTP multihoming: the rule's other VIPs, under its VIP.
            let _ = writeln!(
                out,
                "{:<5} + {} (secondary VIPs)",
                "",
                r.secondary_vips
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    out
}

/// One session (its forward entry joined with its reply entry), as
/// `loxilb-agent sessions` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SessionRow {
    pub protocol: String,
    pub client: std::net::SocketAddr,
    pub service: std::net::SocketAddr,
    pub endpoint: std::net::SocketAddr,
    pub state: &'static str,
    pub idle_s: u64,
    pub packets_in: u64,
    pub packets_out: u64,
}

/// Every session, one row each (by protocol, client).
pub fn session_rows(sessions: &[(CtKey, CtVal)], now_ns: u64) -> Vec<SessionRow> {
    let by_key: HashMap<CtKey, CtVal> = sessions.iter().copied().collect();
    let sa = |a: Addr, p: u16| std::net::SocketAddr::new(ip(a), port(p));
    let mut rows: Vec<_> = sessions
        .iter()
        .filter(|(_, v)| v.dir == ct_dir::FORWARD)
        .collect();
    rows.sort_by_key(|(k, _)| (k.proto, ip(k.saddr), u16::from_be(k.sport)));
    rows.into_iter()
        .map(|(k, v)| {
            let reply = k.peer(v).and_then(|p| by_key.get(&p));
            let state = if v.state & ct_state::RST != 0 {
                "reset"
            } else if v.state & ct_state::CLOSING != 0 {
                "closing"
            } else if v.state & (ct_state::FIN_FWD | ct_state::FIN_REPLY) != 0 {
                "fin-wait"
            } else if v.state & ct_state::OPENING != 0 {
                "opening"
            } else {
                "active"
            };
            let last = reply
                .map(|r| r.last_seen_ns.max(v.last_seen_ns))
                .unwrap_or(v.last_seen_ns);
            SessionRow {
                protocol: proto(k.proto),
                client: sa(k.saddr, k.sport),
                service: sa(k.daddr, k.dport),
                // (A DSR session's translated destination is its endpoint,
                // its port the packet's own.)
                endpoint: sa(v.xdaddr, v.xdport),
                state,
                idle_s: now_ns.saturating_sub(last) / 1_000_000_000,
                packets_in: v.packets,
                // (A one-entry session counts its replies itself; 0 for
                // DSR.)
                packets_out: reply.map(|r| r.packets).unwrap_or(v.rpackets),
            }
        })
        .collect()
}

/// One line per session (the forward entry, joined with its reply entry).
pub fn sessions_table(sessions: &[(CtKey, CtVal)], now_ns: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<22} {:<22} {:<22} {:<9} {:>6} {:>10} {:>10}",
        "PROTO", "CLIENT", "SERVICE", "ENDPOINT", "STATE", "IDLE", "PKTS->", "PKTS<-"
    );
    for r in session_rows(sessions, now_ns) {
        let _ = writeln!(
            out,
            "{:<5} {:<22} {:<22} {:<22} {:<9} {:>5}s {:>10} {:>10}",
            r.protocol,
            r.client.to_string(),
            r.service.to_string(),
            r.endpoint.to_string(),
            r.state,
            r.idle_s,
            r.packets_in,
            r.packets_out,
        );
    }
    out
}

/// A client address of an association, and how the endpoint sees it
/// (fullnat: a VIP; default: itself).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AssocClient {
    pub client: std::net::SocketAddr,
    pub seen_as: std::net::SocketAddr,
}

/// One path of an association: the VIP and the endpoint address it pairs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AssocPath {
    pub vip: IpAddr,
    pub endpoint: std::net::SocketAddr,
}

/// One multihomed SCTP association, as `loxilb-agent associations` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AssocRow {
    pub service: std::net::SocketAddr,
    pub mode: &'static str,
    /// Both sides' verification tags.
    pub tags: Vec<u32>,
    pub clients: Vec<AssocClient>,
    pub paths: Vec<AssocPath>,
}

/// Every association once (each is recorded under both sides' tags).
pub fn association_rows(assocs: &[(AssocKey, AssocVal)]) -> Vec<AssocRow> {
    let mut groups: Vec<(AssocVal, Vec<u32>)> = vec![];
    for (k, v) in assocs {
        match groups.iter_mut().find(|(g, _)| g == v) {
            Some((_, tags)) => tags.push(u32::from_be(k.vtag)),
            None => groups.push((*v, vec![u32::from_be(k.vtag)])),
        }
    }
    groups.sort_by_key(|(a, _)| (ip(a.vips[0]), u16::from_be(a.vport), ip(a.clients[0])));
    let n = |x: u8| (x as usize).min(loxilb_common::MAX_RULE_VIPS);
    let sa = |a: Addr, p: u16| std::net::SocketAddr::new(ip(a), port(p));
    groups
        .into_iter()
        .map(|(a, mut tags)| {
            tags.sort_unstable();
            AssocRow {
                service: sa(a.vips[0], a.vport),
                mode: match a.mode {
                    lb_mode::DEFAULT => "default",
                    lb_mode::FULLNAT => "fullnat",
                    _ => "other",
                },
                tags,
                clients: (0..n(a.n_clients))
                    .map(|i| AssocClient {
                        client: sa(a.clients[i], a.cport),
                        seen_as: sa(a.xclients[i], a.xcport),
                    })
                    .collect(),
                paths: (0..n(a.n_pairs))
                    .map(|k| AssocPath {
                        vip: ip(a.vips[k]),
                        endpoint: sa(a.eps[k], a.ep_port),
                    })
                    .collect(),
            }
        })
        .collect()
}

/// One row per multihomed SCTP association (recorded under each side's
/// verification tag: shown once, with both tags): the client's addresses
/// (and, in fullnat, how the endpoint sees them) and each path's VIP and
/// endpoint address.
pub fn associations_table(assocs: &[(AssocKey, AssocVal)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22} {:<8} {:<21} {:<40} PATHS (VIP -> ENDPOINT ADDRESS)",
        "SERVICE", "MODE", "TAGS", "CLIENT ADDRESSES"
    );
    for r in association_rows(assocs) {
        let tags = r
            .tags
            .iter()
            .map(|t| format!("{t:#010x}"))
            .collect::<Vec<_>>()
            .join(",");
        let clients = r
            .clients
            .iter()
            .map(|c| {
                if c.seen_as != c.client {
                    format!("{} (as {})", c.client, c.seen_as)
                } else {
                    c.client.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let paths = r
            .paths
            .iter()
            .map(|p| format!("{} -> {}", p.vip, p.endpoint))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "{:<22} {:<8} {:<21} {:<40} {}",
            r.service.to_string(),
            r.mode,
            tags,
            clients,
            paths
        );
    }
    out
}

pub fn stats_table(stats: &[(&str, u64)]) -> String {
    let mut out = String::new();
    for (n, v) in stats {
        let _ = writeln!(out, "{n:<21} {v}");
    }
    out
}

/// How translated packets leave through each device (`LB_DEV_FWD`):
/// `(ifindex, forwarding)`.
pub fn devices_table(devs: &[(u32, loxilb_common::DevFwd)]) -> String {
    let mut out = String::from("DEVICE           IFINDEX  FORWARDING\n");
    for (i, d) in devs {
        let name = crate::devices::name_of(d);
        let _ = writeln!(out, "{name:<16} {i:<8} {}", crate::devices::describe(d));
    }
    out
}

/// CLOCK_MONOTONIC in ns: the clock the datapath stamps sessions with
/// (`bpf_ktime_get_coarse_ns`, the same clock at tick resolution).
pub fn monotonic_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The last health probe of an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProbeView {
    pub state: &'static str,
    pub latency_us: Option<u64>,
    #[serde(skip)]
    pub latency: Option<std::time::Duration>,
    pub result: String,
}

/// One endpoint of a rule, as `loxilb-agent endpoints` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EndpointRow {
    pub rule_id: u32,
    pub service: String,
    pub endpoint: std::net::SocketAddr,
    pub weight: u16,
    pub state: &'static str,
    pub active_sessions: u64,
    pub sessions: u64,
    pub packets: u64,
    pub bytes: u64,
    pub probe: Option<ProbeView>,
}

/// Every endpoint of every rule. `stats` holds (counters, active
/// sessions) by `EpVal::stat_idx`.
pub fn endpoint_rows(
    svcs: &[(SvcKey, SvcVal)],
    eps: &HashMap<EpKey, EpVal>,
    stats: &HashMap<u32, (EpStats, u64)>,
    probes: &[crate::probe::TargetStatus],
    rule_vips: &HashMap<u32, RuleVips>,
) -> Vec<EndpointRow> {
    let mut out = vec![];
    for (k, v, _) in by_rule(svcs, rule_vips) {
        for i in 0..v.ep_count {
            let Some(e) = eps.get(&EpKey::new(v.rule_id, v.ep_bank, i)) else {
                continue;
            };
            let (st, active) = stats.get(&e.stat_idx).copied().unwrap_or_default();
            let probe = probes
                .iter()
                .find(|p| p.key.addr == ip(e.addr) && p.key.port == port(e.port))
                .map(|p| ProbeView {
                    state: p.state(),
                    latency_us: p.last_latency.map(|d| d.as_micros() as u64),
                    latency: p.last_latency,
                    result: p.last_result.clone(),
                });
            out.push(EndpointRow {
                rule_id: v.rule_id,
                service: format!("{}/{}", hp(k.addr, k.port), proto(k.proto)),
                endpoint: std::net::SocketAddr::new(ip(e.addr), port(e.port)),
                weight: e.weight,
                state: if e.flags & loxilb_common::ep_flags::INACTIVE != 0 {
                    "inactive"
                } else {
                    "active"
                },
                active_sessions: active,
                sessions: st.new_sessions,
                packets: st.packets,
                bytes: st.bytes,
                probe,
            });
        }
    }
    out
}

/// One line per endpoint of every rule: state, active sessions, counters.
/// `stats` holds (counters, active sessions) by `EpVal::stat_idx`.
pub fn endpoints_table(
    svcs: &[(SvcKey, SvcVal)],
    eps: &HashMap<EpKey, EpVal>,
    stats: &HashMap<u32, (EpStats, u64)>,
    probes: &[crate::probe::TargetStatus],
    rule_vips: &HashMap<u32, RuleVips>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<22} {:<22} {:>6} {:<8} {:>7} {:>9} {:>10} {:>12}  PROBE",
        "RULE", "SERVICE", "ENDPOINT", "WEIGHT", "STATE", "ACTIVE", "SESSIONS", "PACKETS", "BYTES"
    );
    for r in endpoint_rows(svcs, eps, stats, probes, rule_vips) {
        let probe = r
            .probe
            .map(|p| {
                format!(
                    "{} {} ({})",
                    p.state,
                    p.latency
                        .map(crate::probe::fmt_dur)
                        .unwrap_or_else(|| "-".into()),
                    p.result
                )
            })
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<5} {:<22} {:<22} {:>6} {:<8} {:>7} {:>9} {:>10} {:>12}  {}",
            r.rule_id,
            r.service,
            r.endpoint.to_string(),
            r.weight,
            r.state,
            r.active_sessions,
            r.sessions,
            r.packets,
            r.bytes,
            probe,
        );
    }
    out
}

/// BGP neighbours: address, AS, state, uptime, routes sent, last error.
pub fn bgp_table(n: &[crate::bgp::Neighbor]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<26} {:>10} {:<12} {:>9} {:>7}  INFO",
        "PEER", "AS", "STATE", "UPTIME", "ROUTES"
    );
    for x in n {
        let _ = writeln!(
            out,
            "{:<26} {:>10} {:<12} {:>9} {:>7}  {}",
            x.address,
            x.remote_as
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            format!("{:?}", x.state),
            x.uptime
                .map(|d| format!("{}s", d.as_secs()))
                .unwrap_or_else(|| "-".into()),
            x.routes_sent(),
            x.last_error.as_deref().unwrap_or(&x.info),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{tests::MemTable, Rules};

    #[test]
    fn a_session_row_names_the_endpoint_in_every_mode() {
        let a = |s: &str| {
            loxilb_common::v4_mapped(u32::from(s.parse::<std::net::Ipv4Addr>().unwrap()).to_be())
        };
        let key = CtKey {
            saddr: a("192.168.0.2"),
            daddr: a("20.0.0.1"),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            ..Default::default()
        };
        let ep = "10.0.1.10:80".parse().unwrap();
        // DNAT: the translated destination; its reply entry joined.
        let fwd = CtVal {
            xsaddr: key.saddr,
            xdaddr: a("10.0.1.10"),
            xsport: key.sport,
            xdport: key.dport,
            packets: 3,
            ..Default::default()
        };
        let rk = key.peer(&fwd).unwrap();
        let rev = CtVal {
            dir: ct_dir::REPLY,
            packets: 2,
            ..Default::default()
        };
        let rows = session_rows(&[(key, fwd), (rk, rev)], 0);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].endpoint, rows[0].packets_in, rows[0].packets_out),
            (ep, 3, 2)
        );
        // DSR: untranslated (the port is the packet's own), the endpoint
        // where the frame goes; no reply entry.
        let dsr = CtVal {
            xdaddr: a("10.0.1.10"),
            xsport: key.sport,
            xdport: key.dport,
            mode: lb_mode::DSR,
            ..Default::default()
        };
        let rows = session_rows(&[(key, dsr)], 0);
        assert_eq!((rows[0].endpoint, rows[0].packets_out), (ep, 0));
        // One entry for both directions (its replies found through the
        // endpoint index).
        let one = CtVal {
            state: ct_state::ONE,
            rpackets: 4,
            ..fwd
        };
        let rows = session_rows(&[(key, one)], 0);
        assert_eq!(
            (rows[0].endpoint, rows[0].packets_in, rows[0].packets_out),
            (ep, 3, 4)
        );
        // The state, most telling first.
        use loxilb_common::ct_state as st;
        for (state, name) in [
            (0, "active"),
            (st::OPENING, "opening"),
            (st::FIN_FWD, "fin-wait"),
            (st::FIN_FWD | st::FIN_REPLY | st::CLOSING, "closing"),
            (st::OPENING | st::RST | st::CLOSING, "reset"),
        ] {
            let rows = session_rows(&[(key, CtVal { state, ..dsr })], 0);
            assert_eq!(rows[0].state, name, "state {state:#x}");
        }
    }

    #[test]
    fn an_association_is_one_row_with_both_tags_its_clients_and_paths() {
        let a = |s: &str| loxilb_common::addr_from_ip(s.parse().unwrap());
        let mut v = AssocVal {
            n_pairs: 2,
            n_clients: 2,
            n_vips: 2,
            mode: lb_mode::FULLNAT,
            ep_port: 30868u16.to_be(),
            vport: 3868u16.to_be(),
            cport: 5000u16.to_be(),
            xcport: 40001u16.to_be(),
            ..Default::default()
        };
        v.vips[..2].copy_from_slice(&[a("20.0.0.100"), a("20.0.0.101")]);
        v.eps[..2].copy_from_slice(&[a("10.0.1.10"), a("10.0.1.11")]);
        v.clients[..2].copy_from_slice(&[a("192.168.0.2"), a("192.168.0.3")]);
        v.xclients[..2].copy_from_slice(&[a("20.0.0.100"), a("20.0.0.101")]);
        let key = |t: u32| AssocKey {
            rule_id: 1,
            vtag: t.to_be(),
        };
        let out = associations_table(&[(key(0x0e0d), v), (key(0x0c11), v)]);
        assert_eq!(out.lines().count(), 2, "header and one association:\n{out}");
        // The JSON form (`-o json`) holds the same, once, both tags.
        let rows =
            serde_json::to_value(association_rows(&[(key(0x0e0d), v), (key(0x0c11), v)])).unwrap();
        assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
        assert_eq!(rows[0]["service"], "20.0.0.100:3868");
        assert_eq!(rows[0]["tags"], serde_json::json!([0x0c11, 0x0e0d]));
        assert_eq!(rows[0]["clients"][1]["seen_as"], "20.0.0.101:40001");
        let row = out.lines().nth(1).unwrap();
        assert!(row.starts_with("20.0.0.100:3868"), "{row}");
        assert!(
            row.contains("fullnat") && row.contains("0x00000c11,0x00000e0d"),
            "{row}"
        );
        assert!(
            row.contains(
                "192.168.0.2:5000 (as 20.0.0.100:40001), 192.168.0.3:5000 (as 20.0.0.101:40001)"
            ),
            "{row}"
        );
        assert!(
            row.contains("20.0.0.100 -> 10.0.1.10:30868, 20.0.0.101 -> 10.0.1.11:30868"),
            "{row}"
        );
        // Default mode: the client as itself.
        v.mode = lb_mode::DEFAULT;
        v.xclients = v.clients;
        v.xcport = v.cport;
        let out = associations_table(&[(key(1), v)]);
        assert!(!out.contains("(as "), "{out}");
        assert!(out.contains("192.168.0.2:5000, 192.168.0.3:5000"), "{out}");
    }

    #[test]
    fn a_multihomed_rule_is_one_row_with_its_secondary_vips() {
        let rules = crate::config::parse(
            "t",
            "rules:\n  - {vip: 20.0.0.7, secondary_vips: [30.0.0.2, 31.0.0.2], port: 38412, protocol: sctp, endpoints: [{ip: 10.0.0.1, port: 38412}]}\n  - {vip: 20.0.0.7, port: 80, protocol: tcp, endpoints: [{ip: 10.0.0.1, port: 8080}]}\n",
        )
        .unwrap();
        let mut t = MemTable::default();
        Rules::adopt(vec![]).apply(&rules, &mut t).unwrap();
        let svcs: Vec<(SvcKey, SvcVal)> = t.svcs.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(svcs.len(), 4);
        let out = rules_table(&svcs, &t.eps, &HashMap::new(), &t.rule_vips);
        assert_eq!(out.lines().count(), 4, "header, 2 rules, 1 note:\n{out}");
        assert_eq!(out.matches("20.0.0.7:38412").count(), 1, "{out}");
        assert!(!out.contains("30.0.0.2:38412"), "{out}");
        assert!(
            out.contains("+ 30.0.0.2, 31.0.0.2 (secondary VIPs)"),
            "{out}"
        );
        let eps = endpoints_table(&svcs, &t.eps, &HashMap::new(), &[], &t.rule_vips);
        assert_eq!(eps.lines().count(), 3, "one row per endpoint:\n{eps}");
        assert!(eps.contains("20.0.0.7:38412/sctp"), "{eps}");
    }
}
