//! Human-readable tables of rules, sessions and counters (the CLI).

use std::{collections::HashMap, fmt::Write as _, net::IpAddr};

use loxilb_common::{
    ct_dir, ct_state, ip_from_addr, Addr, CtKey, CtVal, EpKey, EpStats, EpVal, RuleStats, SvcKey,
    SvcVal,
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
    crate::config::Protocol::from_number(p)
        .map(|p| p.to_string())
        .unwrap_or_else(|| p.to_string())
}

pub fn rules_table(
    svcs: &[(SvcKey, SvcVal)],
    eps: &HashMap<EpKey, EpVal>,
    stats: &HashMap<u32, RuleStats>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<22} {:<5} {:<8} {:<7} {:<8} {:>9} {:>10} {:>7} ENDPOINTS",
        "ID", "VIP:PORT", "PROTO", "MODE", "SEL", "TIMEOUT", "SESSIONS", "PACKETS", "DROPS"
    );
    let mut svcs = svcs.to_vec();
    svcs.sort_by_key(|(_, v)| v.rule_id);
    for (k, v) in svcs {
        let list: Vec<String> = (0..v.ep_count)
            .map(|i| match eps.get(&EpKey::new(v.rule_id, v.ep_bank, i)) {
                Some(e) => format!(
                    "{}{}{}",
                    hp(e.addr, e.port),
                    if e.weight > 1 {
                        format!("*{}", e.weight)
                    } else {
                        String::new()
                    },
                    if e.flags & loxilb_common::ep_flags::INACTIVE != 0 {
                        "(inactive)"
                    } else {
                        ""
                    }
                ),
                None => "?".into(),
            })
            .collect();
        let st = stats.get(&v.rule_id).copied().unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<5} {:<22} {:<5} {:<8} {:<7} {:<8} {:>9} {:>10} {:>7} {}",
            v.rule_id,
            hp(k.addr, k.port),
            proto(k.proto),
            match v.mode {
                0 => "default",
                1 => "onearm",
                2 => "fullnat",
                3 => "dsr",
                _ => "?",
            },
            match v.sel {
                0 => "rr",
                1 => "hash",
                2 => "persist",
                3 => "lc",
                _ => "?",
            },
            format!("{}s", v.timeout_s),
            st.new_sessions,
            st.packets,
            st.drop_no_endpoint + st.drop_src_range,
            if list.is_empty() {
                "(none: new connections are dropped)".to_string()
            } else {
                list.join(", ")
            }
        );
    }
    out
}

/// One line per session (the forward entry, joined with its reply entry).
pub fn sessions_table(sessions: &[(CtKey, CtVal)], now_ns: u64) -> String {
    let by_key: HashMap<CtKey, CtVal> = sessions.iter().copied().collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<22} {:<22} {:<22} {:<9} {:>6} {:>10} {:>10}",
        "PROTO", "CLIENT", "SERVICE", "ENDPOINT", "STATE", "IDLE", "PKTS->", "PKTS<-"
    );
    let mut rows: Vec<_> = sessions
        .iter()
        .filter(|(_, v)| v.dir == ct_dir::FORWARD)
        .collect();
    rows.sort_by_key(|(k, _)| (k.proto, ip(k.saddr), u16::from_be(k.sport)));
    for (k, v) in rows {
        let reply = by_key.get(&v.peer);
        let state = if v.state & ct_state::RST != 0 {
            "reset"
        } else if v.state & ct_state::CLOSING != 0 {
            "closing"
        } else if v.state & (ct_state::FIN_FWD | ct_state::FIN_REPLY) != 0 {
            "fin-wait"
        } else {
            "active"
        };
        let last = reply
            .map(|r| r.last_seen_ns.max(v.last_seen_ns))
            .unwrap_or(v.last_seen_ns);
        let _ = writeln!(
            out,
            "{:<5} {:<22} {:<22} {:<22} {:<9} {:>5}s {:>10} {:>10}",
            proto(k.proto),
            hp(k.saddr, k.sport),
            hp(k.daddr, k.dport),
            hp(v.xdaddr, v.xdport),
            state,
            now_ns.saturating_sub(last) / 1_000_000_000,
            v.packets,
            reply.map(|r| r.packets).unwrap_or(0),
        );
    }
    out
}

pub fn stats_table(stats: &[(&str, u64)]) -> String {
    let mut out = String::new();
    for (n, v) in stats {
        let _ = writeln!(out, "{n:<18} {v}");
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

/// One line per endpoint of every rule: state, active sessions, counters.
/// `stats` holds (counters, active sessions) by `EpVal::stat_idx`.
pub fn endpoints_table(
    svcs: &[(SvcKey, SvcVal)],
    eps: &HashMap<EpKey, EpVal>,
    stats: &HashMap<u32, (EpStats, u64)>,
    probes: &[crate::probe::TargetStatus],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<22} {:<22} {:>6} {:<8} {:>7} {:>9} {:>10} {:>12}  PROBE",
        "RULE", "SERVICE", "ENDPOINT", "WEIGHT", "STATE", "ACTIVE", "SESSIONS", "PACKETS", "BYTES"
    );
    let mut svcs = svcs.to_vec();
    svcs.sort_by_key(|(_, v)| v.rule_id);
    for (k, v) in svcs {
        for i in 0..v.ep_count {
            let Some(e) = eps.get(&EpKey::new(v.rule_id, v.ep_bank, i)) else {
                continue;
            };
            let (st, active) = stats.get(&e.stat_idx).copied().unwrap_or_default();
            let probe = probes
                .iter()
                .find(|p| p.key.addr == ip(e.addr) && p.key.port == port(e.port))
                .map(|p| {
                    format!(
                        "{} {} ({})",
                        p.state(),
                        p.last_latency
                            .map(crate::probe::fmt_dur)
                            .unwrap_or_else(|| "-".into()),
                        p.last_result
                    )
                })
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "{:<5} {:<22} {:<22} {:>6} {:<8} {:>7} {:>9} {:>10} {:>12}  {}",
                v.rule_id,
                format!("{}/{}", hp(k.addr, k.port), proto(k.proto)),
                hp(e.addr, e.port),
                e.weight,
                if e.flags & loxilb_common::ep_flags::INACTIVE != 0 {
                    "inactive"
                } else {
                    "active"
                },
                active,
                st.new_sessions,
                st.packets,
                st.bytes,
                probe,
            );
        }
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
