//! Translation of conntrack entries between nodes: the node-local parts of
//! a `CtVal` (rule id, endpoint counter index, clock, cached next hop)
//! become identities on the sender ([`export`]) and the receiver's own
//! values on the receiver ([`import`]).

use std::collections::HashMap;

use loxilb_common::{
    ct_dir, ct_state, ep_index_flags, lb_mode, Addr, AssocKey, AssocVal, CtKey, CtVal, EpIndex,
    EpKey, EpVal, SvcKey, SvcVal,
};

use super::wire::{AssocRecord, Record};
use crate::ep_index;

/// Why an entry could not be translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The entry's rule is not (or no longer) in the node's service map.
    NoRule,
    /// The entry's endpoint is not (or no longer) one of its rule's.
    NoEndpoint,
}

fn norm(k: &SvcKey) -> SvcKey {
    SvcKey { _pad: 0, ..*k }
}

/// The sender's view of its rules: rule id -> identity, and (rule id,
/// endpoint counter index) -> endpoint (address, port).
#[derive(Debug, Default, Clone)]
pub struct SenderIndex {
    rules: HashMap<u32, SvcKey>,
    eps: HashMap<(u32, u32), (Addr, u16)>,
}

impl SenderIndex {
    pub fn build(svcs: &[(SvcKey, SvcVal)], eps: &[(EpKey, EpVal)]) -> Self {
        let mut rules: HashMap<u32, SvcKey> = HashMap::new();
        for (k, v) in svcs {
            // A multihomed rule has one entry per VIP: any identifies it;
            // take the lowest, so that the choice is stable.
            let k = norm(k);
            let e = rules.entry(v.rule_id).or_insert(k);
            if (k.addr, k.port, k.proto) < (e.addr, e.port, e.proto) {
                *e = k;
            }
        }
        let eps = eps
            .iter()
            .map(|(k, v)| ((k.rule_id, v.stat_idx), (v.addr, v.port)))
            .collect();
        SenderIndex { rules, eps }
    }
}

/// The receiver's view of its rules: identity -> rule id, and (rule id,
/// endpoint address, port) -> endpoint counter index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReceiverIndex {
    rules: HashMap<SvcKey, u32>,
    eps: HashMap<(u32, Addr, u16), u32>,
}

impl ReceiverIndex {
    pub fn build(svcs: &[(SvcKey, SvcVal)], eps: &[(EpKey, EpVal)]) -> Self {
        ReceiverIndex {
            rules: svcs.iter().map(|(k, v)| (norm(k), v.rule_id)).collect(),
            eps: eps
                .iter()
                .map(|(k, v)| ((k.rule_id, v.addr, v.port), v.stat_idx))
                .collect(),
        }
    }
}

impl ReceiverIndex {
    /// This node's id of the rule `k` identifies.
    pub fn rule_id(&self, k: &SvcKey) -> Option<u32> {
        self.rules.get(&norm(k)).copied()
    }
}

/// The record of entry (`k`, `v`) as the sender sends it; its age is
/// filled in at encoding time (from `v.last_seen_ns`).
pub fn export(k: &CtKey, v: &CtVal, idx: &SenderIndex) -> Result<Record, Skip> {
    let rule = *idx.rules.get(&v.rule_id).ok_or(Skip::NoRule)?;
    let (ep_addr, ep_port) = *idx
        .eps
        .get(&(v.rule_id, v.ep_stat))
        .ok_or(Skip::NoEndpoint)?;
    Ok(Record {
        key: CtKey {
            _pad1: 0,
            _pad2: 0,
            ..*k
        },
        // All zero for DSR sessions (no reply entry).
        peer: k.peer(v).unwrap_or_default(),
        xsaddr: outer_src_cleared(v.xsaddr, v.mode),
        xdaddr: v.xdaddr,
        xsport: v.xsport,
        xdport: v.xdport,
        rule,
        ep_addr,
        ep_port,
        dir: v.dir,
        state: v.state,
        mode: v.mode,
        timeout_s: v.timeout_s,
        sctp_tag: v.sctp_tag,
        age_ns: 0,
        packets: v.packets,
        bytes: v.bytes,
    })
}

/// The entry the receiver installs for `r`, on its clock `now_ns`: its own
/// rule id and endpoint counter index; no cached next hop (its first
/// packet looks the route up in the receiver's FIB); counters as sent.
pub fn import(r: &Record, idx: &ReceiverIndex, now_ns: u64) -> Result<(CtKey, CtVal), Skip> {
    let rule_id = *idx.rules.get(&norm(&r.rule)).ok_or(Skip::NoRule)?;
    let ep_stat = *idx
        .eps
        .get(&(rule_id, r.ep_addr, r.ep_port))
        .ok_or(Skip::NoEndpoint)?;
    Ok((
        r.key,
        CtVal {
            xsaddr: outer_src_cleared(r.xsaddr, r.mode),
            xdaddr: r.xdaddr,
            xsport: r.xsport,
            xdport: r.xdport,
            rule_id,
            timeout_s: r.timeout_s,
            sctp_tag: r.sctp_tag,
            last_seen_ns: now_ns.saturating_sub(r.age_ns),
            packets: r.packets,
            bytes: r.bytes,
            dir: r.dir,
            state: r.state,
            mode: r.mode,
            _pad1: 0,
            ep_stat,
            nh: Default::default(),
            // (A one-entry session's reply counters do not travel: the
            // receiver counts from zero.)
            rpackets: 0,
            rbytes: 0,
            rnh: Default::default(),
        },
    ))
}

/// A session's `xsaddr`, but zero in `mode` DSR, where it is IPIP's outer
/// source cached with the next hop (node-local, as the next hop is).
fn outer_src_cleared(xsaddr: Addr, mode: u8) -> Addr {
    if lb_mode::is_dsr(mode) {
        [0; 4]
    } else {
        xsaddr
    }
}

/// The endpoint index slot through which the replies of one-entry session
/// (`k`, `v`) (`ct_state::ONE`, a forward entry) would find it: that of
/// its endpoint. `None` for any other entry.
pub fn one_slot(k: &CtKey, v: &CtVal) -> Option<u32> {
    ep_index::needed_by(k, v).map(|(ep, _)| ep_index::slot_of(&ep))
}

/// Whether endpoint index slot `e` serves one-entry session (`k`, `v`) the
/// way the datapath's reply lookup needs ([`ep_index::needed_by`]): the
/// slot holds the session's endpoint and maps it to the session's VIP and
/// port. A draining slot does not count: it still serves the replies of
/// the sessions that used it, but the node's rules no longer give the
/// endpoint to this service alone and the slot is emptied once no session
/// needs it, so no new one-entry session is made on it here (as the
/// datapath makes none).
pub fn one_served(k: &CtKey, v: &CtVal, e: Option<&EpIndex>) -> bool {
    e.is_some_and(|e| {
        e.proto != 0
            && e.flags & ep_index_flags::DRAINING == 0
            && ep_index::needed_by(k, v) == Some(ep_index::mapping(e))
    })
}

/// One-entry session (`k`, `v`) as a two-entry one: its forward entry
/// without `ct_state::ONE` (and without the reply direction's counters and
/// next hop, which only a one-entry session keeps), and the reply entry
/// the datapath would have created with it (keyed by `CtKey::peer` of the
/// former; `create` in the datapath's conntrack). `None` for a session
/// without a reply direction (DSR).
pub fn split(k: &CtKey, v: &CtVal) -> Option<[(CtKey, CtVal); 2]> {
    let fv = CtVal {
        state: v.state & !ct_state::ONE,
        rpackets: 0,
        rbytes: 0,
        rnh: Default::default(),
        ..*v
    };
    let rk = k.peer(&fv)?;
    let rv = CtVal {
        xsaddr: k.daddr,
        xdaddr: k.saddr,
        xsport: k.dport,
        xdport: k.sport,
        rule_id: fv.rule_id,
        timeout_s: fv.timeout_s,
        last_seen_ns: fv.last_seen_ns,
        dir: ct_dir::REPLY,
        state: fv.state & ct_state::OPENING,
        mode: fv.mode,
        ep_stat: fv.ep_stat,
        ..Default::default()
    };
    Some([(*k, fv), (rk, rv)])
}

/// The record of SCTP association entry (`k`, `v`) as the sender sends it.
pub fn export_assoc(k: &AssocKey, v: &AssocVal, idx: &SenderIndex) -> Result<AssocRecord, Skip> {
    let rule = *idx.rules.get(&k.rule_id).ok_or(Skip::NoRule)?;
    let (ep_addr, ep_port) = *idx
        .eps
        .get(&(k.rule_id, v.ep_stat))
        .ok_or(Skip::NoEndpoint)?;
    Ok(AssocRecord {
        rule,
        vtag: k.vtag,
        val: AssocVal { ep_stat: 0, ..*v },
        ep_addr,
        ep_port,
    })
}

/// The association entry the receiver installs for `r`.
pub fn import_assoc(r: &AssocRecord, idx: &ReceiverIndex) -> Result<(AssocKey, AssocVal), Skip> {
    let rule_id = *idx.rules.get(&norm(&r.rule)).ok_or(Skip::NoRule)?;
    let ep_stat = *idx
        .eps
        .get(&(rule_id, r.ep_addr, r.ep_port))
        .ok_or(Skip::NoEndpoint)?;
    Ok((
        AssocKey {
            rule_id,
            vtag: r.vtag,
        },
        AssocVal { ep_stat, ..r.val },
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use loxilb_common::{addr_fold, addr_from_ip, ep_index_slot, NextHop, IPPROTO_TCP};

    pub fn a(s: &str) -> Addr {
        addr_from_ip(s.parse().unwrap())
    }

    pub fn svc(vip: &str, port: u16, rule_id: u32) -> (SvcKey, SvcVal) {
        (
            SvcKey {
                addr: a(vip),
                port: port.to_be(),
                proto: IPPROTO_TCP,
                _pad: 0,
            },
            SvcVal {
                rule_id,
                ep_count: 1,
                timeout_s: 300,
                ..Default::default()
            },
        )
    }

    pub fn ep(rule_id: u32, idx: u32, addr: &str, port: u16, stat_idx: u32) -> (EpKey, EpVal) {
        (
            EpKey::new(rule_id, 0, idx),
            EpVal {
                addr: a(addr),
                port: port.to_be(),
                weight: 1,
                stat_idx,
                rule_id,
                ..Default::default()
            },
        )
    }

    /// Both entries of a DNAT session client:cport -> VIP:80 -> ep:8080.
    pub fn session(
        client: &str,
        cport: u16,
        vip: &str,
        epa: &str,
        rule_id: u32,
        ep_stat: u32,
        now: u64,
    ) -> [(CtKey, CtVal); 2] {
        let fk = CtKey {
            saddr: a(client),
            daddr: a(vip),
            sport: cport.to_be(),
            dport: 80u16.to_be(),
            proto: IPPROTO_TCP,
            ..Default::default()
        };
        let rk = CtKey {
            saddr: a(epa),
            daddr: a(client),
            sport: 8080u16.to_be(),
            dport: cport.to_be(),
            proto: IPPROTO_TCP,
            ..Default::default()
        };
        let base = CtVal {
            rule_id,
            ep_stat,
            timeout_s: 300,
            last_seen_ns: now,
            nh: NextHop {
                ifindex: 7,
                macs: [1, 2, 3, 4, 5, 6],
                expiry: loxilb_common::nh_tick(now) + 953,
            },
            packets: 3,
            bytes: 180,
            ..Default::default()
        };
        [
            (
                fk,
                CtVal {
                    xsaddr: a(client),
                    xdaddr: a(epa),
                    xsport: cport.to_be(),
                    xdport: 8080u16.to_be(),
                    dir: ct_dir::FORWARD,
                    ..base
                },
            ),
            (
                rk,
                CtVal {
                    xsaddr: a(vip),
                    xdaddr: a(client),
                    xsport: 80u16.to_be(),
                    xdport: cport.to_be(),
                    dir: ct_dir::REPLY,
                    ..base
                },
            ),
        ]
    }

    #[test]
    fn rule_and_endpoint_are_renumbered_clock_rebased_next_hop_cleared() {
        // Sender: web is rule 1, its endpoint counter 0.
        let s = SenderIndex::build(
            &[svc("20.0.0.100", 80, 1)],
            &[ep(1, 0, "10.0.1.10", 8080, 0)],
        );
        // Receiver: web is rule 4, the endpoint counter 9.
        let r = ReceiverIndex::build(
            &[svc("20.0.0.101", 80, 1), svc("20.0.0.100", 80, 4)],
            &[
                ep(1, 0, "10.0.1.10", 8080, 2),
                ep(4, 0, "10.0.1.10", 8080, 9),
            ],
        );
        for (k, v) in session("192.168.0.2", 40000, "20.0.0.100", "10.0.1.10", 1, 0, 5_000) {
            let mut rec = export(&k, &v, &s).unwrap();
            rec.age_ns = 2_000; // sender: now 7_000
            let (k2, v2) = import(&rec, &r, 1_000_000).unwrap();
            assert_eq!(k2, k);
            assert_eq!(v2.rule_id, 4);
            assert_eq!(v2.ep_stat, 9);
            assert_eq!(v2.last_seen_ns, 998_000);
            assert_eq!(v2.nh, NextHop::default());
            // Everything else as on the sender.
            let same = CtVal {
                rule_id: v.rule_id,
                ep_stat: v.ep_stat,
                last_seen_ns: v.last_seen_ns,
                nh: v.nh,
                ..v2
            };
            assert_eq!(same, v);
        }
        // An IPIP DSR session: its endpoint (the translated destination)
        // travels, its outer source (cached with the next hop) does not.
        let [(k, v), _] = session("192.168.0.2", 40000, "20.0.0.100", "10.0.1.10", 1, 0, 5_000);
        let v = CtVal {
            xsaddr: a("10.9.9.9"),
            xdport: 80u16.to_be(),
            mode: lb_mode::DSR_IPIP,
            ..v
        };
        let rec = export(&k, &v, &s).unwrap();
        assert_eq!((rec.xsaddr, rec.xdaddr), ([0; 4], a("10.0.1.10")));
        // (Were a sender to send one, the receiver would not take it.)
        let rec = Record {
            xsaddr: a("10.9.9.9"),
            ..rec
        };
        let (_, v2) = import(&rec, &r, 1_000_000).unwrap();
        assert_eq!(
            (v2.xsaddr, v2.dsr_endpoint()),
            ([0; 4], Some(a("10.0.1.10")))
        );
    }

    #[test]
    fn unknown_rule_or_endpoint_is_skipped() {
        let s = SenderIndex::build(
            &[svc("20.0.0.100", 80, 1)],
            &[ep(1, 0, "10.0.1.10", 8080, 0)],
        );
        let [(k, v), _] = session("192.168.0.2", 1, "20.0.0.100", "10.0.1.10", 2, 0, 0);
        assert_eq!(export(&k, &v, &s), Err(Skip::NoRule));
        let [(k, v), _] = session("192.168.0.2", 1, "20.0.0.100", "10.0.1.10", 1, 5, 0);
        assert_eq!(export(&k, &v, &s), Err(Skip::NoEndpoint));
        let [(k, v), _] = session("192.168.0.2", 1, "20.0.0.100", "10.0.1.10", 1, 0, 0);
        let rec = export(&k, &v, &s).unwrap();
        let no_rule = ReceiverIndex::build(&[svc("20.0.0.100", 81, 1)], &[]);
        assert_eq!(import(&rec, &no_rule, 0), Err(Skip::NoRule));
        let no_ep = ReceiverIndex::build(
            &[svc("20.0.0.100", 80, 3)],
            &[ep(3, 0, "10.0.1.11", 8080, 1)],
        );
        assert_eq!(import(&rec, &no_ep, 0), Err(Skip::NoEndpoint));
    }

    #[test]
    fn associations_are_renumbered_too() {
        let s = SenderIndex::build(
            &[svc("20.0.0.100", 80, 1), svc("20.0.0.101", 80, 1)],
            &[ep(1, 0, "10.0.1.10", 8080, 3)],
        );
        let r = ReceiverIndex::build(
            &[svc("20.0.0.100", 80, 6), svc("20.0.0.101", 80, 6)],
            &[ep(6, 0, "10.0.1.10", 8080, 11)],
        );
        let k = AssocKey {
            rule_id: 1,
            vtag: 77,
        };
        let v = AssocVal {
            eps: [a("10.0.1.10"), a("10.0.2.10"), [0; 4], [0; 4]],
            ep_port: 8080u16.to_be(),
            ep_stat: 3,
            n_pairs: 2,
            ctag: 77,
            etag: 88,
            ..Default::default()
        };
        let rec = export_assoc(&k, &v, &s).unwrap();
        assert_eq!(rec.rule.addr, a("20.0.0.100"));
        let (k2, v2) = import_assoc(&rec, &r).unwrap();
        assert_eq!(
            k2,
            AssocKey {
                rule_id: 6,
                vtag: 77
            }
        );
        assert_eq!(v2, AssocVal { ep_stat: 11, ..v });
        let k = AssocKey {
            rule_id: 2,
            vtag: 1,
        };
        assert_eq!(export_assoc(&k, &v, &s), Err(Skip::NoRule));
        let empty = ReceiverIndex::build(&[svc("20.0.0.100", 80, 6)], &[]);
        assert_eq!(import_assoc(&rec, &empty), Err(Skip::NoEndpoint));
    }

    #[test]
    fn a_multihomed_rule_is_identified_by_its_lowest_vip() {
        let s = SenderIndex::build(
            &[svc("20.0.0.102", 80, 1), svc("20.0.0.100", 80, 1)],
            &[ep(1, 0, "10.0.1.10", 8080, 0)],
        );
        let [(k, v), _] = session("192.168.0.2", 1, "20.0.0.102", "10.0.1.10", 1, 0, 0);
        assert_eq!(export(&k, &v, &s).unwrap().rule.addr, a("20.0.0.100"));
    }

    #[test]
    fn a_one_entry_session_is_served_only_by_its_endpoints_live_slot_for_its_vip() {
        let [(k, v), (rk, rv)] = session("192.168.0.2", 40000, "20.0.0.100", "10.0.1.10", 1, 0, 0);
        let v = CtVal {
            state: ct_state::ONE,
            ..v
        };
        let e = EpIndex {
            addr: a("10.0.1.10"),
            vip: a("20.0.0.100"),
            port: 8080u16.to_be(),
            vport: 80u16.to_be(),
            proto: IPPROTO_TCP,
            flags: 0,
            _pad2: 0,
        };
        assert_eq!(
            one_slot(&k, &v),
            Some(ep_index_slot(addr_fold(&e.addr), e.port, e.proto))
        );
        assert_eq!(one_slot(&k, &CtVal { state: 0, ..v }), None);
        assert_eq!(one_slot(&rk, &rv), None);
        assert!(one_served(&k, &v, Some(&e)));
        for (what, bad) in [
            ("empty", EpIndex::default()),
            (
                "address",
                EpIndex {
                    addr: a("10.0.1.11"),
                    ..e
                },
            ),
            (
                "port",
                EpIndex {
                    port: 8081u16.to_be(),
                    ..e
                },
            ),
            ("protocol", EpIndex { proto: 17, ..e }),
            (
                "VIP",
                EpIndex {
                    vip: a("20.0.0.101"),
                    ..e
                },
            ),
            (
                "service port",
                EpIndex {
                    vport: 81u16.to_be(),
                    ..e
                },
            ),
            (
                "draining",
                EpIndex {
                    flags: ep_index_flags::DRAINING,
                    ..e
                },
            ),
        ] {
            assert!(!one_served(&k, &v, Some(&bad)), "{what}");
        }
        assert!(!one_served(&k, &v, None));
        // Split: the forward entry without the bit, and the reply entry a
        // two-entry session of the same translation has (its counters and
        // next hop aside: the datapath creates it with none).
        let [(fk, fv), (sk, sv)] = split(&k, &v).unwrap();
        assert_eq!((fk, fv), (k, CtVal { state: 0, ..v }));
        assert_eq!(sk, rk);
        assert_eq!(
            sv,
            CtVal {
                packets: 0,
                bytes: 0,
                nh: NextHop::default(),
                ..rv
            }
        );
    }
}
