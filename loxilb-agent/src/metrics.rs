//! Prometheus metrics (`GET /metrics` on `--health-listen`), read from the
//! datapath's pinned maps and the agent's published state at each scrape,
//! encoded by the Prometheus project's Rust client (text format 0.0.4 /
//! OpenMetrics text).
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `loxilb_datapath_events_total` | counter | `event` | every datapath counter of `loxilb-agent stats` (rx, new_session, ct_hit, fwd_redirect, fwd_stack_device, drop_*, ...) |
//! | `loxilb_rule_packets_total`, `loxilb_rule_bytes_total` | counter | `service`, `vip`, `port`, `protocol` | packets/bytes of the rule's sessions (both directions) |
//! | `loxilb_rule_sessions_total` | counter | same | sessions created |
//! | `loxilb_rule_drops_total` | counter | same + `reason` (`no_endpoint`, `source_range`) | new connections dropped |
//! | `loxilb_endpoint_packets_total`, `loxilb_endpoint_bytes_total`, `loxilb_endpoint_sessions_total` | counter | `service`, `endpoint` | per endpoint |
//! | `loxilb_endpoint_active_sessions` | gauge | `service`, `endpoint` | sessions open on the endpoint |
//! | `loxilb_endpoint_up` | gauge | `service`, `endpoint` | 1 when the endpoint takes new sessions (active, probe up), 0 when not |
//! | `loxilb_endpoint_probe_latency_seconds` | gauge | `service`, `endpoint` | duration of the last health probe |
//! | `loxilb_conntrack_entries`, `loxilb_conntrack_capacity` | gauge | | session entries (one per direction; one for a one-entry DNAT session) in use, and the table's size |
//! | `loxilb_vip_active` | gauge | `vip` | 1 where this node answers for the VIP (Kubernetes mode) |
//! | `loxilb_device_xdp_redirect` | gauge | `device` | 1 where translated packets leave by XDP redirect, 0 where by the stack |
//! | `loxilb_bgp_session_up` | gauge | `peer`, `remote_as` | 1 while the BGP session with the peer is established, 0 when not (`--setBGP`) |
//! | `loxilb_bgp_routes_sent` | gauge | `peer`, `remote_as` | routes (VIPs) announced to the peer on its session |
//! | `loxilb_kube_leader` | gauge | | 1 while this agent holds the leader Lease (allocates addresses, writes status) (Kubernetes mode) |
//! | `loxilb_kube_reconciles_total`, `loxilb_kube_reconcile_seconds_total` | counter | | Services reconciled (planned and carried out) and the time spent on them |
//! | `loxilb_kube_reconcile_errors_total` | counter | `kind` (`conflict`, `error`, `datapath`) | reconciles that failed |
//! | `loxilb_kube_services` | gauge | | Services of the agent's class the controller knows |
//! | `loxilb_ipam_pool_addresses`, `loxilb_ipam_pool_used` | gauge | `pool`, `family`, `secondary` | addresses a pool hands out, and those held by a Service (as the leader's allocation table says; a follower reports its last view) |

use std::{collections::HashMap, net::SocketAddr, path::Path};

use anyhow::Result;
use loxilb_common::{ep_flags, ip_from_addr, EpKey, MAX_CT_ENTRIES};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::datapath::PinnedMaps;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventL {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleL {
    service: String,
    vip: String,
    port: String,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropL {
    service: String,
    vip: String,
    port: String,
    protocol: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EpL {
    service: String,
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipL {
    vip: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerL {
    peer: String,
    remote_as: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DevL {
    device: String,
}

fn counter<L>(reg: &mut Registry, name: &str, help: &str) -> Family<L, Counter>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let f = Family::<L, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge<L>(reg: &mut Registry, name: &str, help: &str) -> Family<L, Gauge>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let f = Family::<L, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

/// The metrics text of the datapath pinned in `pin_dir` (and the agent's
/// published probe and role state).
pub fn render(pin_dir: &Path) -> Result<String> {
    let m = PinnedMaps::open(pin_dir)?;
    let mut reg = Registry::with_prefix("loxilb");

    let events = counter::<EventL>(
        &mut reg,
        "datapath_events",
        "Datapath counters (loxilb-agent stats)",
    );
    for (name, v) in m.stats()? {
        events
            .get_or_create(&EventL { event: name.into() })
            .inc_by(v);
    }

    let svcs = m.services()?;
    let eps = m.endpoints()?;
    let rule_stats = m.rule_stats()?;
    let rule_pk = counter::<RuleL>(&mut reg, "rule_packets", "Packets of the rule's sessions");
    let rule_by = counter::<RuleL>(&mut reg, "rule_bytes", "Bytes of the rule's sessions");
    let rule_se = counter::<RuleL>(&mut reg, "rule_sessions", "Sessions the rule created");
    let rule_dr = counter::<DropL>(&mut reg, "rule_drops", "New connections the rule dropped");
    let ep_pk = counter::<EpL>(
        &mut reg,
        "endpoint_packets",
        "Packets of the endpoint's sessions",
    );
    let ep_by = counter::<EpL>(
        &mut reg,
        "endpoint_bytes",
        "Bytes of the endpoint's sessions",
    );
    let ep_se = counter::<EpL>(
        &mut reg,
        "endpoint_sessions",
        "Sessions sent to the endpoint",
    );
    let ep_ac = gauge::<EpL>(
        &mut reg,
        "endpoint_active_sessions",
        "Sessions open on the endpoint",
    );
    let ep_up = gauge::<EpL>(
        &mut reg,
        "endpoint_up",
        "1 when the endpoint takes new sessions, 0 when inactive (probe down)",
    );
    let ep_lat = Family::<EpL, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    reg.register(
        "endpoint_probe_latency_seconds",
        "Duration of the endpoint's last health probe",
        ep_lat.clone(),
    );
    let probes = crate::node::read_probe_state(pin_dir).unwrap_or_default();
    let stat_idx: Vec<u32> = eps.values().map(|e| e.stat_idx).collect();
    let ep_stats: HashMap<u32, (loxilb_common::EpStats, u64)> = stat_idx
        .iter()
        .copied()
        .zip(m.ep_stats(&stat_idx)?)
        .collect();
    for (k, v) in &svcs {
        let vip = ip_from_addr(&k.addr);
        let port = u16::from_be(k.port);
        let protocol = loxilb_model::Protocol::from_number(k.proto)
            .map(|p| p.to_string())
            .unwrap_or_else(|| k.proto.to_string());
        let service = format!("{}/{protocol}", SocketAddr::new(vip, port));
        let rl = RuleL {
            service: service.clone(),
            vip: vip.to_string(),
            port: port.to_string(),
            protocol: protocol.clone(),
        };
        if let Some(st) = rule_stats.get(&v.rule_id) {
            rule_pk.get_or_create(&rl).inc_by(st.packets);
            rule_by.get_or_create(&rl).inc_by(st.bytes);
            rule_se.get_or_create(&rl).inc_by(st.new_sessions);
            for (reason, n) in [
                ("no_endpoint", st.drop_no_endpoint),
                ("source_range", st.drop_src_range),
            ] {
                rule_dr
                    .get_or_create(&DropL {
                        service: service.clone(),
                        vip: rl.vip.clone(),
                        port: rl.port.clone(),
                        protocol: protocol.clone(),
                        reason: reason.into(),
                    })
                    .inc_by(n);
            }
        } else {
            let _ = rule_se.get_or_create(&rl);
        }
        for i in 0..v.ep_count {
            let Some(e) = eps.get(&EpKey::new(v.rule_id, v.ep_bank, i)) else {
                continue;
            };
            let ep_ip = ip_from_addr(&e.addr);
            let ep_port = u16::from_be(e.port);
            let l = EpL {
                service: service.clone(),
                endpoint: SocketAddr::new(ep_ip, ep_port).to_string(),
            };
            let (st, active) = ep_stats.get(&e.stat_idx).copied().unwrap_or_default();
            ep_pk.get_or_create(&l).inc_by(st.packets);
            ep_by.get_or_create(&l).inc_by(st.bytes);
            ep_se.get_or_create(&l).inc_by(st.new_sessions);
            ep_ac.get_or_create(&l).set(active as i64);
            ep_up
                .get_or_create(&l)
                .set((e.flags & ep_flags::INACTIVE == 0) as i64);
            if let Some(p) = probes
                .iter()
                .find(|p| p.key.addr == ep_ip && p.key.port == ep_port)
            {
                if let Some(d) = p.last_latency {
                    ep_lat.get_or_create(&l).set(d.as_secs_f64());
                }
            }
        }
    }

    let entries = Gauge::<i64>::default();
    entries.set(m.sessions()?.len() as i64);
    reg.register(
        "conntrack_entries",
        "Session entries in use (one per direction; one for an indexed DNAT session)",
        entries,
    );
    let cap = Gauge::<i64>::default();
    cap.set(MAX_CT_ENTRIES as i64);
    reg.register(
        "conntrack_capacity",
        "Session entries the table holds at most",
        cap,
    );

    if let Some(r) = crate::roles::Roles::read(pin_dir) {
        let vips = gauge::<VipL>(
            &mut reg,
            "vip_active",
            "1 where this node answers for the VIP, 0 where it is a backup",
        );
        for (v, e) in &r.vips {
            vips.get_or_create(&VipL { vip: v.to_string() })
                .set((e.role == crate::roles::Role::Active) as i64);
        }
    }

    let devs = gauge::<DevL>(
        &mut reg,
        "device_xdp_redirect",
        "1 where translated packets leave by XDP redirect, 0 where by the kernel stack",
    );
    for (_, d) in m.dev_fwd()? {
        devs.get_or_create(&DevL {
            device: crate::devices::name_of(&d),
        })
        .set((d.mode == loxilb_common::dev_fwd::REDIRECT) as i64);
    }

    if let Some(k) = crate::kube_state::KubeState::read(pin_dir) {
        register_kube(&mut reg, &k);
    }
    // The BGP speaker, asked over its control socket as `loxilb-agent
    // bgp` does (nothing when BGP is off or BIRD is between restarts).
    let bird =
        crate::bgp::speaker::SpeakerOptions::in_dir(crate::node::state_dir(pin_dir).join("bgp"));
    if bird.socket_path().exists() {
        let control = crate::bgp::control::Control::new(&bird.socket_path());
        if let Ok(n) = crate::bgp::speaker::query_neighbors(&control) {
            register_bgp(&mut reg, &n);
        }
    }

    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolL {
    pool: String,
    family: String,
    secondary: String,
}

/// Each BGP session's state and the routes sent on it.
fn register_bgp(reg: &mut Registry, neighbors: &[crate::bgp::Neighbor]) {
    let up = gauge::<PeerL>(
        reg,
        "bgp_session_up",
        "1 while the BGP session with the peer is established, 0 when not",
    );
    let sent = gauge::<PeerL>(reg, "bgp_routes_sent", "Routes announced to the peer");
    for n in neighbors {
        let l = PeerL {
            peer: n.address.to_string(),
            remote_as: n.remote_as.map(|a| a.to_string()).unwrap_or_default(),
        };
        up.get_or_create(&l).set(n.is_established() as i64);
        sent.get_or_create(&l).set(i64::from(n.routes_sent()));
    }
}

/// The Kubernetes controller's figures ([`crate::kube_state`]).
fn register_kube(reg: &mut Registry, k: &crate::kube_state::KubeState) {
    let leader = Gauge::<i64>::default();
    leader.set(k.leader as i64);
    reg.register(
        "kube_leader",
        "1 while this agent holds the leader Lease (allocates addresses, writes status)",
        leader,
    );
    let services = Gauge::<i64>::default();
    services.set(k.services as i64);
    reg.register(
        "kube_services",
        "Services of the agent's class the controller knows",
        services,
    );
    let size = gauge::<PoolL>(reg, "ipam_pool_addresses", "Addresses the pool hands out");
    let used = gauge::<PoolL>(
        reg,
        "ipam_pool_used",
        "Addresses of the pool held by at least one Service",
    );
    for p in &k.pools {
        let l = PoolL {
            pool: p.name.clone(),
            family: p.family.clone(),
            secondary: p.secondary.to_string(),
        };
        size.get_or_create(&l)
            .set(i64::try_from(p.size).unwrap_or(i64::MAX));
        used.get_or_create(&l).set(p.used as i64);
    }
    let r = &k.reconcile;
    let reconciles = Counter::<u64>::default();
    reconciles.inc_by(r.reconciles);
    reg.register(
        "kube_reconciles",
        "Services planned and carried out by the controller",
        reconciles,
    );
    let errors = counter::<KindL>(
        reg,
        "kube_reconcile_errors",
        "Reconciles that failed: conflict (the Service changed meanwhile), error (retried with \
         back-off), datapath (rules not taken by the node)",
    );
    for (kind, n) in [
        ("conflict", r.conflicts),
        ("error", r.errors),
        ("datapath", r.sink_errors),
    ] {
        errors.get_or_create(&KindL { kind: kind.into() }).inc_by(n);
    }
    let seconds = Counter::<f64, std::sync::atomic::AtomicU64>::default();
    seconds.inc_by(r.seconds);
    reg.register(
        "kube_reconcile_seconds",
        "Time the controller spent planning and carrying out reconciles",
        seconds,
    );
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindL {
    kind: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_figures_are_encoded() {
        let k = crate::kube_state::KubeState {
            leader: true,
            services: 3,
            pools: vec![crate::kube_state::PoolState {
                name: "defaultPool".into(),
                family: "ipv4".into(),
                secondary: false,
                size: 254,
                used: 2,
            }],
            reconcile: crate::kube_state::ReconcileCounts {
                reconciles: 7,
                conflicts: 1,
                errors: 2,
                seconds: 0.25,
                sink_errors: 0,
            },
        };
        let mut reg = Registry::with_prefix("loxilb");
        register_kube(&mut reg, &k);
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        for want in [
            "loxilb_kube_leader 1",
            "loxilb_kube_services 3",
            "loxilb_ipam_pool_addresses{pool=\"defaultPool\",family=\"ipv4\",secondary=\"false\"} 254",
            "loxilb_ipam_pool_used{pool=\"defaultPool\",family=\"ipv4\",secondary=\"false\"} 2",
            "loxilb_kube_reconciles_total 7",
            "loxilb_kube_reconcile_errors_total{kind=\"conflict\"} 1",
            "loxilb_kube_reconcile_errors_total{kind=\"error\"} 2",
            "loxilb_kube_reconcile_errors_total{kind=\"datapath\"} 0",
            "loxilb_kube_reconcile_seconds_total 0.25",
        ] {
            assert!(out.contains(want), "{want} missing from:\n{out}");
        }
    }
}
