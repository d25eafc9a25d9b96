//! Translation of conntrack entries between nodes: the node-local parts of
//! a `CtVal` (rule id, endpoint counter index, clock, cached next hop)
//! become identities on the sender ([`export`]) and the receiver's own
//! values on the receiver ([`import`]).

use std::collections::HashMap;

use loxilb_common::{Addr, AssocKey, AssocVal, CtKey, CtVal, EpKey, EpVal, SvcKey, SvcVal};

use super::wire::{AssocRecord, Record};

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
        xsaddr: v.xsaddr,
        xdaddr: v.xdaddr,
        xsport: v.xsport,
        xdport: v.xdport,
        dsr_ep: v.dsr_ep,
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
            xsaddr: r.xsaddr,
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
            dsr_ep: r.dsr_ep,
            encap_src: [0; 4],
            // (A one-entry session's reply counters do not travel: the
            // receiver counts from zero.)
            rpackets: 0,
            rbytes: 0,
            rnh: Default::default(),
        },
    ))
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
    use loxilb_common::{addr_from_ip, ct_dir, NextHop, IPPROTO_TCP};

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
                expiry_ns: now + 1_000_000_000,
            },
            encap_src: a("10.9.9.9"),
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
            assert_eq!((v2.nh, v2.encap_src), (NextHop::default(), [0; 4]));
            // Everything else as on the sender.
            let same = CtVal {
                rule_id: v.rule_id,
                ep_stat: v.ep_stat,
                last_seen_ns: v.last_seen_ns,
                nh: v.nh,
                encap_src: v.encap_src,
                ..v2
            };
            assert_eq!(same, v);
        }
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
}
