//! Every limit of [`supported`]: the field it names, the value it quotes,
//! and that the rule just inside the limit passes.

use std::time::Duration;

use super::*;
use crate::{Endpoint, ProbeKind, ProbeSpec, Selection};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ep(a: &str, port: u16) -> Endpoint {
    Endpoint {
        ip: ip(a),
        port,
        weight: 1,
    }
}

/// A good rule: 20.0.0.1:80/tcp, fullnat, one endpoint.
fn rule() -> Rule {
    let mut r = Rule::new(ip("20.0.0.1"), 80, Protocol::Tcp);
    r.mode = Mode::FullNat;
    r.endpoints = vec![ep("10.0.0.5", 30080)];
    r
}

fn sctp() -> Rule {
    let mut r = rule();
    r.protocol = Protocol::Sctp;
    r
}

/// `r` is refused for `field` with `limit`, the message containing each
/// of `words`.
#[track_caller]
fn refused(r: &Rule, field: &str, limit: Limit, words: &[&str]) {
    let e = supported(r).unwrap_err();
    assert_eq!((e.field.as_str(), e.limit), (field, limit), "{e}");
    for w in words {
        assert!(e.to_string().contains(w), "{w:?} not in: {e}");
    }
}

#[test]
fn a_plain_rule_and_the_defaults_pass() {
    supported(&rule()).unwrap();
    supported(&Rule::new(ip("2001:db8::1"), 443, Protocol::Udp)).unwrap();
    let mut r = rule();
    r.selection = Selection::Persist;
    r.source_ranges = vec![
        "192.168.0.0/16".parse().unwrap(),
        "0.0.0.0/32".parse().unwrap(),
    ];
    r.probe = Some(ProbeSpec::new(ProbeKind::Http));
    supported(&r).unwrap();
}

#[test]
fn addresses_and_timeouts() {
    for bad in [
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::",
        "ff02::1",
        "::ffff:10.0.0.1",
    ] {
        let mut r = rule();
        r.vip = ip(bad);
        r.endpoints.clear();
        refused(
            &r,
            "vip",
            Limit::Address,
            &[bad, "cannot be a service address"],
        );
        let mut r = rule();
        r.endpoints[0].ip = ip(bad);
        if ip(bad).is_ipv4() {
            refused(
                &r,
                "endpoints[0].ip",
                Limit::Address,
                &[bad, "cannot be an endpoint"],
            );
        }
    }
    let mut r = rule();
    r.timeout_s = 0;
    refused(&r, "timeout", Limit::Timeout, &["0 is not an idle timeout"]);
    r.timeout_s = MAX_TIMEOUT_S;
    r.persist_timeout_s = MAX_TIMEOUT_S + 1;
    refused(
        &r,
        "persist_timeout",
        Limit::Timeout,
        &["604801", "1..=604800"],
    );
}

#[test]
fn secondary_vips_are_sctp_default_or_fullnat_few_distinct_of_one_family() {
    let mut r = sctp();
    r.secondary_vips = vec![ip("30.0.0.2"), ip("31.0.0.2"), ip("32.0.0.2")];
    supported(&r).unwrap();
    r.mode = Mode::Default;
    supported(&r).unwrap();
    for mode in [Mode::OneArm, Mode::Dsr, Mode::DsrIpip] {
        let mut r = r.clone();
        r.mode = mode;
        r.endpoints[0].port = 80;
        refused(
            &r,
            "secondary_vips",
            Limit::SecondaryVipsMode,
            &[
                "multihoming",
                "30.0.0.2",
                &format!("not {mode}"),
                "use mode: default or fullnat",
            ],
        );
    }
    let mut t = r.clone();
    t.protocol = Protocol::Tcp;
    refused(
        &t,
        "secondary_vips",
        Limit::SecondaryVipsProtocol,
        &["only SCTP", "a tcp connection", "protocol: sctp"],
    );
    r.secondary_vips.push(ip("33.0.0.2"));
    refused(
        &r,
        "secondary_vips",
        Limit::SecondaryVipsCount,
        &["4 secondary VIPs", "at most 3"],
    );
    r.secondary_vips = vec![ip("30.0.0.2"), ip("2001:db8::2")];
    refused(
        &r,
        "secondary_vips[1]",
        Limit::SecondaryVipFamily,
        &["2001:db8::2 is IPv6", "the VIP's family", "one family"],
    );
    r.secondary_vips = vec![ip("30.0.0.2"), ip("30.0.0.2")];
    refused(
        &r,
        "secondary_vips[1]",
        Limit::SecondaryVipRepeated,
        &["listed twice"],
    );
    r.secondary_vips = vec![r.vip];
    refused(
        &r,
        "secondary_vips[0]",
        Limit::SecondaryVipRepeated,
        &["the rule's VIP itself", "listed twice"],
    );
    r.secondary_vips = vec![ip("255.255.255.255")];
    refused(
        &r,
        "secondary_vips[0]",
        Limit::Address,
        &["cannot be a service address"],
    );
}

#[test]
fn source_ranges_of_the_vips_family_without_host_bits() {
    let mut r = rule();
    r.source_ranges = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
    refused(
        &r,
        "source_ranges[1]",
        Limit::SourceRangeFamily,
        &["fd00::/8 is IPv6 on an IPv4 rule", "can never match"],
    );
    r.source_ranges = vec!["10.0.0.1/8".parse().unwrap()];
    refused(
        &r,
        "source_ranges[0]",
        Limit::SourceRangeHostBits,
        &["10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"],
    );
}

#[test]
fn endpoints_the_datapath_cannot_reach_as_asked() {
    let mut r = rule();
    r.endpoints[0].ip = ip("2001:db8::5");
    refused(
        &r,
        "endpoints[0].ip",
        Limit::Nat46,
        &["2001:db8::5", "NAT46 is not supported"],
    );

    let mut r = rule();
    r.vip = ip("2001:db8::1");
    r.endpoints = vec![ep("2001:db8:1::5", 1), ep("10.0.0.6", 1)];
    refused(
        &r,
        "endpoints[1].ip",
        Limit::EndpointFamilies,
        &["different families", "one family"],
    );
    // NAT64: fine in the translating modes, not in dsr, not for SCTP.
    r.endpoints = vec![ep("10.0.0.6", 80)];
    supported(&r).unwrap();
    for mode in [Mode::Dsr, Mode::DsrIpip] {
        r.mode = mode;
        refused(
            &r,
            "endpoints[0].ip",
            Limit::Nat64Dsr,
            &["NAT64", "dsr modes"],
        );
    }
    r.mode = Mode::Default;
    r.protocol = Protocol::Sctp;
    refused(
        &r,
        "endpoints[0].ip",
        Limit::Nat64Sctp,
        &["SCTP is not translated"],
    );
    r.protocol = Protocol::Tcp;
    r.mode = Mode::DsrIpip;
    r.endpoints = vec![ep("2001:db8:1::5", 80)];
    refused(&r, "mode", Limit::DsrIpipIpv6, &["IPv4 only", "use dsr"]);
    r.mode = Mode::Dsr;
    supported(&r).unwrap();

    let mut r = rule();
    r.mode = Mode::Dsr;
    refused(
        &r,
        "endpoints[0].port",
        Limit::DsrPort,
        &["10.0.0.5:30080", "service port 80", "give it port 80"],
    );
    r.endpoints = vec![ep("10.0.0.5", 80), ep("10.0.0.5", 80)];
    refused(
        &r,
        "endpoints[1].ip",
        Limit::EndpointRepeated,
        &["10.0.0.5:80 is listed twice"],
    );
    r.endpoints[1].port = 81;
    r.mode = Mode::FullNat;
    supported(&r).unwrap();
    r.endpoints[1].weight = 0;
    refused(
        &r,
        "endpoints[1].weight",
        Limit::EndpointWeight,
        &["0 is not a weight"],
    );
    r.endpoints = (0..=MAX_ENDPOINTS)
        .map(|i| ep("10.0.0.5", (i % 65536) as u16))
        .collect();
    refused(
        &r,
        "endpoints",
        Limit::EndpointCount,
        &["65537 endpoints", "at most 65536"],
    );
}

#[test]
fn probe_settings_are_checked() {
    let mut r = rule();
    let mut p = ProbeSpec::new(ProbeKind::Ping);
    p.port = Some(80);
    r.probe = Some(p);
    refused(
        &r,
        "probe",
        Limit::Probe,
        &["probe port 80", "a ping probe has no port"],
    );
    let mut p = ProbeSpec::new(ProbeKind::Tcp);
    p.timeout = Duration::ZERO;
    r.probe = Some(p);
    refused(&r, "probe", Limit::Probe, &["probe timeout 0ms"]);
}

#[test]
fn the_message_and_a_front_ends_own_remedy() {
    let mut r = sctp();
    r.mode = Mode::OneArm;
    r.secondary_vips = vec![ip("30.0.0.2")];
    let e = supported(&r).unwrap_err();
    assert!(e
        .message()
        .ends_with("; use mode: default or fullnat, or remove secondary_vips"));
    assert!(e
        .to_string()
        .starts_with("secondary_vips: SCTP multihoming"));
    let other = e.message_with("set loxilb.io/lbmode");
    assert!(other.starts_with(&e.problem) && other.ends_with("; set loxilb.io/lbmode"));
    assert_eq!(e.message_with(""), e.problem);
}
