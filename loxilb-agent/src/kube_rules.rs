//! From the Kubernetes side's rules (`kube_watch::translate::LbRule`) to
//! the agent's own rule type, which the reconciler installs. What the
//! datapath cannot do yet is refused with a message that names the rule
//! (it becomes a Warning Event on the Service), never silently changed.

use std::net::IpAddr;

use kube_watch::{
    annotations::{EpSelect, LbMode},
    translate::LbRule,
    Protocol as KProto,
};

use crate::config::{
    Endpoint, Mode, Protocol, Rule, Selection, DEFAULT_PERSIST_TIMEOUT_S, MAX_SECONDARY_VIPS,
};

/// Why a Kubernetes rule cannot be installed by this datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub rule: String,
    pub reason: String,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.rule, self.reason)
    }
}

fn family(a: IpAddr) -> &'static str {
    if a.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// The secondary VIPs of `r` (SCTP multihoming), or why this datapath
/// cannot serve them.
fn secondary_vips(r: &LbRule, protocol: Protocol, mode: Mode) -> Result<Vec<IpAddr>, String> {
    let list = &r.secondary_vips;
    if list.is_empty() {
        return Ok(vec![]);
    }
    let shown = list
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if protocol != Protocol::Sctp {
        return Err(format!(
            "secondary VIPs ({shown}) are for SCTP multihoming; a {protocol} rule has one VIP \
             (remove loxilb.io/secondaryIPs / poolSelectSecondary)"
        ));
    }
    if mode != Mode::Default && mode != Mode::FullNat {
        return Err(format!(
            "SCTP multihoming (secondary VIPs {shown}) is done in lbmode default (DNAT) and \
             fullnat; set loxilb.io/lbmode: default or fullnat, or remove \
             loxilb.io/secondaryIPs / poolSelectSecondary to serve the primary VIP alone"
        ));
    }
    if list.len() > MAX_SECONDARY_VIPS {
        return Err(format!(
            "{} secondary VIPs ({shown}); a rule has at most {MAX_SECONDARY_VIPS}",
            list.len()
        ));
    }
    let mut out: Vec<IpAddr> = Vec::with_capacity(list.len());
    for a in list {
        if a.is_ipv4() != r.vip.is_ipv4() {
            return Err(format!(
                "secondary VIP {a} is {} but the VIP {} is {}; every VIP of an association \
                 has one family",
                family(*a),
                r.vip,
                family(r.vip)
            ));
        }
        if *a == r.vip || out.contains(a) {
            return Err(format!(
                "secondary VIP {a} is listed twice (or is the VIP itself); list each address once"
            ));
        }
        out.push(*a);
    }
    Ok(out)
}

/// The agent rule for `r`, or why it cannot be installed.
pub fn to_rule(r: &LbRule) -> Result<Rule, Unsupported> {
    let name = r.name.clone();
    let bad = |reason: String| Unsupported {
        rule: name.clone(),
        reason,
    };
    let vip = r.vip;
    let protocol = match r.protocol {
        KProto::Tcp => Protocol::Tcp,
        KProto::Udp => Protocol::Udp,
        KProto::Sctp => Protocol::Sctp,
    };
    let mode = match r.mode {
        LbMode::Default => Mode::Default,
        LbMode::OneArm => Mode::OneArm,
        LbMode::FullNat => Mode::FullNat,
        LbMode::Dsr => Mode::Dsr,
    };
    let secondary_vips = secondary_vips(r, protocol, mode).map_err(bad)?;
    let selection = match r.selection {
        EpSelect::RoundRobin => Selection::RoundRobin,
        EpSelect::Hash => Selection::Hash,
        EpSelect::Persist => Selection::Persist,
        EpSelect::LeastConnections => Selection::LeastConn,
    };
    let mut endpoints = Vec::with_capacity(r.endpoints.len());
    for e in &r.endpoints {
        let ip = e.ip;
        if vip.is_ipv4() && ip.is_ipv6() {
            return Err(bad(format!(
                "endpoint {ip} is IPv6 but the VIP {vip} is IPv4; NAT46 is not supported \
                 (use an IPv6 VIP: ipFamilies or loxilb.io/ipam)"
            )));
        }
        if let Some(first) = endpoints.first().map(|e: &Endpoint| e.ip) {
            if first.is_ipv4() != ip.is_ipv4() {
                return Err(bad(format!(
                    "endpoints {first} and {ip} are of different families; one rule balances \
                     one family"
                )));
            }
        }
        if mode == Mode::Dsr && vip.is_ipv6() && ip.is_ipv4() {
            return Err(bad(format!(
                "endpoint {ip} is IPv4 under the IPv6 VIP {vip} (NAT64), which DSR cannot do; \
                 use another lbmode"
            )));
        }
        if mode == Mode::Dsr && e.port != r.port {
            return Err(bad(format!(
                "endpoint {ip}:{} : DSR sends packets untranslated, so endpoints must listen \
                 on the service port {} (use the pod network, or another mode)",
                e.port, r.port
            )));
        }
        endpoints.push(Endpoint {
            ip,
            port: e.port,
            weight: e.weight.max(1),
        });
    }
    let source_ranges = match &r.allowed_sources {
        None => vec![],
        Some(list) if list.is_empty() => {
            // Every listed prefix was of the other family: nobody may
            // connect. The unspecified address is a source no packet
            // carries.
            vec![if vip.is_ipv4() {
                "0.0.0.0/32"
            } else {
                "::/128"
            }
            .parse()
            .expect("valid")]
        }
        Some(list) => {
            let mut v = vec![];
            for n in list {
                if n.addr().is_ipv4() != vip.is_ipv4() {
                    return Err(bad(format!(
                        "source range {n} is {} on an {} rule",
                        family(n.addr()),
                        family(vip)
                    )));
                }
                v.push(n.trunc());
            }
            v.sort();
            v.dedup();
            v
        }
    };
    let probe = match &r.probe {
        None => None,
        Some(p) => {
            let kind: crate::probe::ProbeKind = p
                .kind
                .as_str()
                .parse()
                .map_err(|e: crate::probe::ProbeError| bad(e.to_string()))?;
            let mut spec = crate::probe::ProbeSpec::new(kind);
            spec.port = p.port;
            spec.request = p.request.clone();
            spec.response = p.response.clone();
            spec.timeout = std::time::Duration::from_secs(p.timeout_s.max(1) as u64);
            spec.retries = p.retries;
            spec.validate().map_err(|e| bad(e.to_string()))?;
            Some(spec)
        }
    };
    Ok(Rule {
        name,
        vip,
        secondary_vips,
        port: r.port,
        protocol,
        mode,
        selection,
        timeout_s: r.timeout_s,
        persist_timeout_s: DEFAULT_PERSIST_TIMEOUT_S,
        source_ranges,
        endpoints,
        probe,
        announce_local_only: r.local_traffic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_watch::{translate::Endpoint as KEp, ServiceKey};

    fn rule() -> LbRule {
        LbRule {
            service: ServiceKey::new("default", "web"),
            name: "default/web:80/tcp@20.0.0.1".into(),
            vip: "20.0.0.1".parse().unwrap(),
            secondary_vips: vec![],
            port: 80,
            protocol: KProto::Tcp,
            mode: LbMode::FullNat,
            selection: EpSelect::LeastConnections,
            timeout_s: 60,
            endpoints: vec![KEp {
                ip: "10.0.0.5".parse().unwrap(),
                port: 30080,
                weight: 2,
            }],
            allowed_sources: None,
            probe: None,
            local_traffic: true,
        }
    }

    #[test]
    fn maps_every_field() {
        let r = to_rule(&rule()).unwrap();
        assert_eq!(r.vip, "20.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            (r.port, r.protocol, r.mode),
            (80, Protocol::Tcp, Mode::FullNat)
        );
        assert_eq!(r.selection, Selection::LeastConn);
        assert_eq!(r.timeout_s, 60);
        assert_eq!(r.endpoints[0].port, 30080);
        assert_eq!(r.endpoints[0].weight, 2);
        assert!(r.source_ranges.is_empty() && r.probe.is_none());
        assert!(r.announce_local_only);
    }

    #[test]
    fn refuses_what_the_datapath_cannot_do_and_says_why() {
        let mut r = rule();
        r.endpoints[0].ip = "2001:db8::5".parse().unwrap();
        let e = to_rule(&r).unwrap_err();
        assert!(
            e.reason.contains("NAT46") && e.rule.contains("default/web"),
            "{e}"
        );
        let mut r = rule();
        r.endpoints.push(KEp {
            ip: "2001:db8::6".parse().unwrap(),
            port: 30080,
            weight: 1,
        });
        r.vip = "2001:db8::1".parse().unwrap();
        assert!(to_rule(&r)
            .unwrap_err()
            .reason
            .contains("different families"));
        let mut r = rule();
        r.vip = "2001:db8::1".parse().unwrap();
        r.allowed_sources = Some(vec!["10.0.0.0/8".parse().unwrap()]);
        assert!(to_rule(&r)
            .unwrap_err()
            .reason
            .contains("IPv4 on an IPv6 rule"));
        let mut r = rule();
        r.protocol = KProto::Sctp;
        assert_eq!(to_rule(&r).unwrap().protocol, Protocol::Sctp);
        r.secondary_vips = vec!["20.0.0.2".parse().unwrap()];
        // (the rule is fullnat: multihomed)
        assert_eq!(to_rule(&r).unwrap().secondary_vips, r.secondary_vips);
        r.mode = LbMode::OneArm;
        let e = to_rule(&r).unwrap_err();
        assert!(
            e.reason.contains("multihoming")
                && e.reason.contains("lbmode default (DNAT) and fullnat"),
            "{e}"
        );
        let mut r = rule();
        r.mode = LbMode::Dsr;
        assert!(to_rule(&r).unwrap_err().reason.contains("service port 80"));
    }

    #[test]
    fn sctp_secondary_vips_pass_through_in_default_mode() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut r = rule();
        r.protocol = KProto::Sctp;
        r.mode = LbMode::Default;
        r.secondary_vips = vec![ip("30.0.0.2"), ip("31.0.0.2")];
        let x = to_rule(&r).unwrap();
        assert_eq!(x.secondary_vips, vec![ip("30.0.0.2"), ip("31.0.0.2")]);
        assert_eq!((x.protocol, x.mode), (Protocol::Sctp, Mode::Default));
        // More than the datapath holds.
        r.secondary_vips = (1..=4).map(|i| ip(&format!("30.0.0.{i}"))).collect();
        let e = to_rule(&r).unwrap_err();
        assert!(e.reason.contains("at most 3"), "{e}");
        // Another family, a repeat.
        r.secondary_vips = vec![ip("2001:db8::2")];
        assert!(to_rule(&r).unwrap_err().reason.contains("one family"));
        r.secondary_vips = vec![ip("30.0.0.2"), ip("30.0.0.2")];
        assert!(to_rule(&r).unwrap_err().reason.contains("listed twice"));
        r.secondary_vips = vec![r.vip];
        assert!(to_rule(&r).unwrap_err().reason.contains("listed twice"));
        // Fullnat too; not the others.
        let mut f = r.clone();
        f.mode = LbMode::FullNat;
        f.secondary_vips = vec![ip("30.0.0.2")];
        assert_eq!(to_rule(&f).unwrap().mode, Mode::FullNat);
        for mode in [LbMode::OneArm, LbMode::Dsr] {
            let mut r = r.clone();
            r.mode = mode;
            r.secondary_vips = vec![ip("30.0.0.2")];
            if mode == LbMode::Dsr {
                r.endpoints[0].port = 80;
            }
            let e = to_rule(&r).unwrap_err();
            assert!(
                e.reason.contains("lbmode default (DNAT) and fullnat"),
                "{mode:?}: {e}"
            );
        }
        // Not SCTP (kube-watch gives secondaries to SCTP rules only, but
        // never install one silently without them).
        r.protocol = KProto::Tcp;
        r.secondary_vips = vec![ip("30.0.0.2")];
        assert!(to_rule(&r).unwrap_err().reason.contains("for SCTP"));
    }

    #[test]
    fn source_ranges_none_some_and_nobody() {
        let mut r = rule();
        r.allowed_sources = Some(vec!["192.168.1.7/24".parse().unwrap()]);
        assert_eq!(
            to_rule(&r).unwrap().source_ranges,
            vec!["192.168.1.0/24".parse::<ipnet::IpNet>().unwrap()]
        );
        r.allowed_sources = Some(vec![]);
        assert_eq!(
            to_rule(&r).unwrap().source_ranges,
            vec!["0.0.0.0/32".parse::<ipnet::IpNet>().unwrap()],
            "an empty list admits nobody"
        );
        r.vip = "2001:db8::1".parse().unwrap();
        r.endpoints[0].ip = "2001:db8:1::5".parse().unwrap();
        assert_eq!(
            to_rule(&r).unwrap().source_ranges,
            vec!["::/128".parse::<ipnet::IpNet>().unwrap()]
        );
        r.allowed_sources = Some(vec!["2001:db8:77::1/48".parse().unwrap()]);
        assert_eq!(
            to_rule(&r).unwrap().source_ranges,
            vec!["2001:db8:77::/48".parse::<ipnet::IpNet>().unwrap()]
        );
    }
}
