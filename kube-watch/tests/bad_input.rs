//! Bad input where a user types it, property-based (proptest): the
//! `loxilb.io/*` annotations of a Service, the `loxilb-agent kube` flag
//! values and the `--config` file. Generated values are valid ones and
//! near-valid mutations (wrong type, out of range, bad addresses and
//! prefixes, unknown keys and keywords, empty, huge, unicode). Properties:
//! nothing panics; a refusal names the annotation / flag / key and the
//! value given; a valid value is accepted; an invalid one is never
//! replaced by a default (it is refused, and its field left unset).
//!
//! Case counts: `PROPTEST_CASES` sets every test's count; without it the
//! defaults below (with `tests/bad_annotation_events.rs` and the agent's
//! `tests/bad_rule_files.rs` and flag tests) total 10,000.

mod prop_support;

use std::collections::{BTreeMap, BTreeSet};

use kube_watch::{
    annotations::{self, keys},
    config_file::ConfigFile,
    flags,
};
use prop_support::{cases, quoted, tally};
use proptest::prelude::*;

const ANNOTATION_CASES: u32 = 2500;
const POOL_CASES: u32 = 800;
const SCALAR_CASES: u32 = 800;
const LEASE_CASES: u32 = 400;
const CONFIG_CASES: u32 = 500;

/// Text nobody types on purpose: empty, blanks, huge, control characters,
/// other scripts, typographic quotes, numbers of the wrong kind.
fn junk() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("  ".to_string()),
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just("0x10".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("true".to_string()),
        Just("null".to_string()),
        Just("[1, 2]".to_string()),
        Just("{a: 1}".to_string()),
        Just("\u{201c}yes\u{201d}".to_string()),
        Just("ＹＥＳ".to_string()),
        Just("défaut".to_string()),
        Just("\u{0}\u{7}".to_string()),
        "[a-z]{1,12}",
        "\\PC{1,20}",
        (1usize..5000).prop_map(|n| "x".repeat(n)),
        (1usize..50).prop_map(|n| "é".repeat(n)),
    ]
}

/// [`junk`] that is not one of `words` (any case, spaces around) by
/// chance: `[a-z]{1,12}` makes `rr` or `lc` now and then.
fn junk_except(words: &'static [&'static str]) -> impl Strategy<Value = String> {
    junk().prop_filter("a valid keyword after all", move |s| {
        !words.iter().any(|w| s.trim().eq_ignore_ascii_case(w))
    })
}

/// [`junk`] that is not a number in `lo..=hi` by chance (`\PC{1,20}`
/// makes `7` now and then).
fn junk_except_number(lo: u64, hi: u64) -> impl Strategy<Value = String> {
    junk().prop_filter("a valid number after all", move |s| {
        !s.trim()
            .parse::<i128>()
            .is_ok_and(|n| (i128::from(lo)..=i128::from(hi)).contains(&n))
    })
}

/// A keyword written as users do: any ASCII case, spaces around.
fn spelled(words: &'static [&'static str]) -> impl Strategy<Value = String> {
    (
        prop::sample::select(words),
        any::<u32>(),
        prop::sample::select(&["", " ", "  "][..]),
    )
        .prop_map(|(w, mask, pad)| {
            let w: String = w
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if mask & (1 << (i % 32)) != 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            format!("{pad}{w}{pad}")
        })
}

fn number_in(lo: u64, hi: u64) -> impl Strategy<Value = String> {
    (lo..=hi).prop_map(|n| n.to_string())
}

fn number_outside(lo: u64, hi: u64) -> impl Strategy<Value = String> {
    let below = if lo == 0 {
        Just("-1".to_string()).boxed()
    } else {
        (0..lo).prop_map(|n| n.to_string()).boxed()
    };
    prop_oneof![
        below,
        (hi + 1..hi.saturating_mul(10) + 2).prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just(format!("+{lo}")),
        Just(format!("{lo}.0")),
        Just(format!("{lo}s")),
    ]
}

fn ipv4() -> impl Strategy<Value = String> {
    any::<[u8; 4]>().prop_map(|o| std::net::Ipv4Addr::from(o).to_string())
}

fn ipv6() -> impl Strategy<Value = String> {
    any::<[u16; 8]>().prop_map(|s| std::net::Ipv6Addr::from(s).to_string())
}

fn ip() -> impl Strategy<Value = String> {
    prop_oneof![ipv4(), ipv6()]
}

fn bad_ip() -> impl Strategy<Value = String> {
    prop_oneof![
        (256u32..1000, any::<u8>()).prop_map(|(a, b)| format!("10.{a}.0.{b}")),
        any::<[u8; 3]>().prop_map(|o| format!("{}.{}.{}", o[0], o[1], o[2])),
        ipv4().prop_map(|s| format!("{s}/24")),
        ipv4().prop_map(|s| format!("{s}:80")),
        Just("::g".to_string()),
        Just("1:2:3:4:5:6:7:8:9".to_string()),
        Just("localhost".to_string()),
        Just("١٢٧.٠.٠.١".to_string()),
        junk(),
    ]
    .prop_filter("an address after all", |s| {
        s.trim().parse::<std::net::IpAddr>().is_err()
    })
}

fn pool_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9]([A-Za-z0-9._-]{0,20}[A-Za-z0-9])?"
}

fn bad_pool_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "-[a-z]{1,5}",
        "[a-z]{1,5}-",
        "[a-z]{1,5} [a-z]{1,5}",
        "[a-z]{1,5}/[a-z]{1,5}",
        "[a-z]{64,80}",
        Just("pööl".to_string()),
    ]
}

fn dns_label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?"
}

/// A comma-separated list of 1..=max distinct items from `item`.
fn list_of(item: impl Strategy<Value = String>, max: usize) -> impl Strategy<Value = String> {
    prop::collection::btree_set(item, 1..=max).prop_map(move |s| {
        s.into_iter()
            .collect::<Vec<_>>()
            .join(if max > 1 { ", " } else { "," })
    })
}

/// One annotation value and whether it is valid.
#[derive(Clone, Debug)]
struct Value {
    text: String,
    valid: bool,
}

fn valid(s: impl Strategy<Value = String> + 'static) -> BoxedStrategy<Value> {
    s.prop_map(|text| Value { text, valid: true }).boxed()
}

fn invalid(s: impl Strategy<Value = String> + 'static) -> BoxedStrategy<Value> {
    s.prop_map(|text| Value { text, valid: false }).boxed()
}

/// Valid and invalid values of annotation `key`.
fn value_for(key: &'static str) -> BoxedStrategy<Value> {
    let yes_no = || spelled(&["yes", "no"]);
    let probe_text = || {
        prop_oneof![
            "[ -~]{1,40}",
            "[a-zé€中]{1,20}",
            (1usize..=1024).prop_map(|n| "r".repeat(n)),
        ]
    };
    match key {
        keys::LB_MODE => prop_oneof![
            valid(spelled(&["default", "onearm", "fullnat", "dsr"])),
            invalid(prop_oneof![
                spelled(&["fullproxy", "hostonearm", "nat", "dnat", "dsr-ipip"]),
                junk_except(&["default", "onearm", "fullnat", "dsr"])
            ]),
        ]
        .boxed(),
        keys::IPAM => prop_oneof![
            valid(spelled(&[
                "ipv4", "ip", "ip4", "ipv6", "ip6", "nat66", "ipv6to4", "nat64"
            ])),
            invalid(prop_oneof![
                spelled(&["ipv5", "dual", "nat46", "v4"]),
                junk_except(&["ipv4", "ip", "ip4", "ipv6", "ip6", "nat66", "ipv6to4", "nat64"])
            ]),
        ]
        .boxed(),
        keys::TIMEOUT => prop_oneof![
            valid(number_in(1, 604_800)),
            invalid(prop_oneof![
                number_outside(1, 604_800),
                junk_except_number(1, 604_800)
            ]),
        ]
        .boxed(),
        keys::PROBE_TYPE => prop_oneof![
            valid(spelled(&[
                "none", "ping", "udp", "tcp", "http", "https", "sctp"
            ])),
            invalid(prop_oneof![
                spelled(&["icmp", "grpc", "http2"]),
                junk_except(&["none", "ping", "udp", "tcp", "http", "https", "sctp"])
            ]),
        ]
        .boxed(),
        keys::PROBE_PORT => prop_oneof![
            valid(number_in(1, 65535)),
            invalid(prop_oneof![
                number_outside(1, 65535),
                junk_except_number(1, 65535)
            ]),
        ]
        .boxed(),
        keys::PROBE_REQ | keys::PROBE_RESP => prop_oneof![
            valid(probe_text()),
            invalid(prop_oneof![
                Just(String::new()),
                (1025usize..20_000).prop_map(|n| "q".repeat(n)),
                Just("\u{201c}ok\u{201d}".to_string()),
            ]),
        ]
        .boxed(),
        keys::PROBE_TIMEOUT => prop_oneof![
            valid(number_in(1, 3600)),
            invalid(prop_oneof![
                number_outside(1, 3600),
                junk_except_number(1, 3600)
            ]),
        ]
        .boxed(),
        keys::PROBE_RETRIES => prop_oneof![
            valid(number_in(0, 100)),
            invalid(prop_oneof![
                number_outside(0, 100),
                junk_except_number(0, 100)
            ]),
        ]
        .boxed(),
        keys::EP_SELECT => prop_oneof![
            valid(spelled(&["rr", "roundrobin", "hash", "persist", "lc"])),
            invalid(prop_oneof![
                spelled(&["n2", "n3", "random", "wrr"]),
                junk_except(&["rr", "roundrobin", "hash", "persist", "lc"])
            ]),
        ]
        .boxed(),
        keys::LIVENESS | keys::USE_POD_NETWORK => prop_oneof![
            valid(yes_no()),
            invalid(prop_oneof![
                spelled(&["true", "false", "on", "off", "y", "n", "1", "0"]),
                junk_except(&["yes", "no"])
            ]),
        ]
        .boxed(),
        keys::STATIC_IP => {
            prop_oneof![valid(ip().prop_map(|s| format!(" {s}"))), invalid(bad_ip()),].boxed()
        }
        keys::SECONDARY_IPS => prop_oneof![
            valid(list_of(ip(), 3)),
            invalid(prop_oneof![
                prop::collection::btree_set(ipv4(), 4..8)
                    .prop_map(|s| s.into_iter().collect::<Vec<_>>().join(",")),
                ipv4().prop_map(|a| format!("{a},{a}")),
                (ipv4(), bad_ip()).prop_map(|(a, b)| format!("{a},{b}")),
                ipv4().prop_map(|a| format!("{a},,")),
                Just(String::new()),
            ]),
        ]
        .boxed(),
        keys::POOL_SELECT => prop_oneof![valid(pool_name()), invalid(bad_pool_name())].boxed(),
        keys::POOL_SELECT_SECONDARY => prop_oneof![
            valid(list_of(pool_name(), 3)),
            invalid(prop_oneof![
                prop::collection::btree_set(pool_name(), 4..6)
                    .prop_map(|s| s.into_iter().collect::<Vec<_>>().join(",")),
                pool_name().prop_map(|a| format!("{a},{a}")),
                (pool_name(), bad_pool_name()).prop_map(|(a, b)| format!("{a},{b}")),
            ]),
        ]
        .boxed(),
        keys::MULTUS_NETS => prop_oneof![
            valid(list_of(
                prop_oneof![
                    dns_label(),
                    (dns_label(), dns_label()).prop_map(|(n, m)| format!("{n}/{m}"))
                ],
                3
            )),
            invalid(prop_oneof![
                "[A-Z][a-z]{1,5}",
                (dns_label(), dns_label(), dns_label())
                    .prop_map(|(a, b, c)| format!("{a}/{b}/{c}")),
                dns_label().prop_map(|a| format!("{a},{a}")),
                dns_label().prop_map(|a| format!("{a}_x")),
                Just(String::new()),
            ]),
        ]
        .boxed(),
        other => panic!("no generator for {other}"),
    }
}

/// An annotation map: some known annotations (valid or not), maybe an
/// unknown or a kube-loxilb-only one, maybe foreign ones.
fn annotation_map() -> impl Strategy<Value = Vec<(String, Value)>> {
    let known = prop::sample::subsequence(keys::ALL.to_vec(), 1..=5).prop_flat_map(|ks| {
        ks.into_iter()
            .map(|k| value_for(k).prop_map(move |v| (k.to_string(), v)))
            .collect::<Vec<_>>()
    });
    let extra = prop_oneof![
        4 => Just(vec![]),
        1 => (prop::sample::select(&["loxilb.io/frobnicate", "loxilb.io/LBMode", "loxilb.io/"][..]), junk())
            // Unknown: a warning, unless the value has typographic quotes.
            .prop_map(|(k, v)| {
                let valid = !v.contains(['\u{201c}', '\u{201d}', '\u{2018}', '\u{2019}']);
                vec![(k.to_string(), Value { text: v, valid })]
            }),
        1 => (
            prop::sample::select(&["loxilb.io/egress", "loxilb.io/prefLocalPod", "loxilb.io/zoneselect"][..]),
            prop::sample::select(&["", "no", "false", "disabled", "yes", "true", "zone-a"][..]),
        )
            .prop_map(|(k, v)| {
                let inert = matches!(v, "" | "no" | "false" | "disabled");
                vec![(k.to_string(), Value { text: v.to_string(), valid: inert })]
            }),
        1 => junk().prop_map(|v| vec![("example.com/lbmode".to_string(), Value { text: v, valid: true })]),
    ];
    (known, extra).prop_map(|(mut a, b)| {
        a.extend(b);
        a
    })
}

proptest! {
    #![proptest_config(cases(ANNOTATION_CASES))]

    #[test]
    fn annotations_refuse_exactly_the_bad_values_and_name_them(entries in annotation_map()) {
        let map: BTreeMap<String, String> =
            entries.iter().map(|(k, v)| (k.clone(), v.text.clone())).collect();
        let parsed = annotations::parse(&map);
        tally("annotations", cases(ANNOTATION_CASES).cases, map.len(), parsed.errors.len());
        // Which annotations must be refused: the invalid values, and both
        // kinds of secondary addresses given at once.
        let mut want: BTreeSet<&str> = entries
            .iter()
            .filter(|(_, v)| !v.valid)
            .map(|(k, _)| k.as_str())
            .collect();
        if map.contains_key(keys::POOL_SELECT_SECONDARY) && map.contains_key(keys::SECONDARY_IPS) {
            want.insert(keys::POOL_SELECT_SECONDARY);
            want.insert(keys::SECONDARY_IPS);
        }
        let got: BTreeSet<&str> = parsed.errors.iter().map(|p| p.annotation.as_str()).collect();
        prop_assert_eq!(&got, &want, "errors: {:?}", parsed.errors);
        for p in parsed.errors.iter().chain(&parsed.warnings) {
            let text = p.to_string();
            prop_assert_eq!(Some(&p.value), map.get(&p.annotation), "{}", text);
            prop_assert!(text.starts_with(&format!("{}: {}: ", p.annotation, quoted(&p.value))), "{}", text);
            prop_assert!(p.message.len() > 10, "says what is allowed: {}", text);
        }
        // A refused value is never replaced by a default.
        let v = &parsed.values;
        let unset = [
            (keys::LB_MODE, v.lb_mode.is_none()),
            (keys::IPAM, v.ipam.is_none()),
            (keys::TIMEOUT, v.timeout_s.is_none()),
            (keys::PROBE_TYPE, v.probe_type.is_none()),
            (keys::PROBE_PORT, v.probe_port.is_none()),
            (keys::PROBE_REQ, v.probe_req.is_none()),
            (keys::PROBE_RESP, v.probe_resp.is_none()),
            (keys::PROBE_TIMEOUT, v.probe_timeout_s.is_none()),
            (keys::PROBE_RETRIES, v.probe_retries.is_none()),
            (keys::EP_SELECT, v.ep_select.is_none()),
            (keys::LIVENESS, v.liveness.is_none()),
            (keys::USE_POD_NETWORK, v.use_pod_network.is_none()),
            (keys::STATIC_IP, v.static_ip.is_none()),
            (keys::POOL_SELECT, v.pool_select.is_none()),
            (keys::SECONDARY_IPS, v.secondary_ips.is_empty()),
            (keys::POOL_SELECT_SECONDARY, v.pool_select_secondary.is_empty()),
            (keys::MULTUS_NETS, v.multus_nets.is_empty()),
        ];
        for (k, is_unset) in unset {
            if want.contains(k) {
                prop_assert!(is_unset, "{} refused but set: {:?}", k, v);
            } else if map.contains_key(k) {
                prop_assert!(!is_unset, "{} valid but not set: {:?}", k, v);
            }
        }
        // Unknown and foreign keys never break the rest.
        prop_assert!(parsed.errors.iter().all(|p| p.annotation.starts_with(annotations::PREFIX)));
    }
}

// ---------------------------------------------------------------- flags

/// The rules the flags state, written again here (independently of
/// `flags.rs`) to tell the generated junk that happens to be valid.
fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn is_class(s: &str) -> bool {
    let name = |n: &str| {
        let b = n.as_bytes();
        (1..=63).contains(&b.len())
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
    };
    match s.split_once('/') {
        Some((p, n)) => p.len() <= 253 && !p.is_empty() && p.split('.').all(is_label) && name(n),
        None => name(s),
    }
}

fn is_duration(s: &str) -> bool {
    let v = s.trim();
    let (n, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60.0)
    } else {
        (v, 1.0)
    };
    n.trim()
        .parse::<f64>()
        .is_ok_and(|x| x.is_finite() && x > 0.0 && x * scale <= 3600.0)
}

/// A pool item: valid (`name=CIDR`, `name=first-last`, a bare CIDR) or not.
fn pool_item(v6: bool, one_family: bool) -> BoxedStrategy<(String, bool)> {
    let addr = move || if v6 { ipv6().boxed() } else { ipv4().boxed() };
    let max = if v6 { 128u8 } else { 32 };
    prop_oneof![
        // Valid shapes (overlaps decided below, by the parser's own rule).
        (pool_name(), addr(), 0..=max).prop_map(move |(n, a, l)| (format!("{n}={a}/{l}"), true)),
        (addr(), 0..=max).prop_map(move |(a, l)| (format!("{a}/{l}"), true)),
        (pool_name(), addr(), addr()).prop_map(|(n, a, b)| {
            let (x, y): (std::net::IpAddr, std::net::IpAddr) =
                (a.parse().unwrap(), b.parse().unwrap());
            let (lo, hi) = if x <= y { (x, y) } else { (y, x) };
            (format!("{n}={lo}-{hi}"), true)
        }),
        // Invalid ones.
        (pool_name(), addr(), max + 1..=200).prop_map(|(n, a, l)| (format!("{n}={a}/{l}"), false)),
        (pool_name(), addr()).prop_map(|(n, a)| (format!("{n}={a}"), false)),
        (pool_name(), bad_ip()).prop_map(|(n, a)| (format!("{n}={a}/24"), false)),
        (bad_pool_name(), addr()).prop_map(|(n, a)| (format!("{n}={a}/30"), false)),
        (
            pool_name(),
            if v6 { ipv4().boxed() } else { ipv6().boxed() }
        )
            .prop_map(move |(n, a)| (format!("{n}={a}/30"), !one_family)),
        Just((String::new(), false)),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(cases(POOL_CASES))]

    #[test]
    fn pool_flags_refuse_bad_items_and_name_flag_and_value(
        items in prop::collection::vec(pool_item(false, true), 1..4),
        items6 in prop::collection::vec(pool_item(true, true), 1..3),
        secondary in prop::collection::vec(prop_oneof![pool_item(false, false), pool_item(true, false)], 1..3),
    ) {
        let mut refused = 0;
        for (flag, items, parse) in [
            ("--cidrPools", &items, flags::parse_cidr_pools as fn(&str) -> _),
            ("--cidr6Pools", &items6, flags::parse_cidr6_pools),
            ("--externalSecondaryCIDRs", &secondary, flags::parse_secondary_cidrs),
        ] {
            let value = items.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(",");
            // An empty value is no pools (documented).
            let none = value.trim().is_empty();
            let all_valid = none || items.iter().all(|(_, ok)| *ok);
            match parse(&value) {
                Ok(pools) => {
                    prop_assert!(all_valid, "{} {:?} accepted: {:?}", flag, value, pools);
                    prop_assert_eq!(pools.len(), if none { 0 } else { items.len() });
                    // What is accepted makes an allocation table.
                    let names: BTreeSet<&str> = pools.iter().map(|p| p.name.as_str()).collect();
                    prop_assert_eq!(names.len(), pools.len(), "unique names");
                }
                Err(e) => {
                    refused += 1;
                    prop_assert_eq!(e.flag, flag);
                    prop_assert_eq!(&e.value, &value);
                    let text = e.to_string();
                    prop_assert!(text.starts_with(&format!("{flag} {value:?}: ")), "{}", text);
                    if all_valid {
                        // Valid items refused together only for what the
                        // set breaks: a name twice, overlapping pools.
                        prop_assert!(
                            text.contains("used twice") || text.contains("overlap"),
                            "{}", text
                        );
                    }
                }
            }
        }
        tally("pool flags", cases(POOL_CASES).cases, 3, refused);
    }

}

proptest! {
    #![proptest_config(cases(SCALAR_CASES))]

    #[test]
    #[allow(clippy::type_complexity)]
    fn scalar_flags_accept_valid_values_and_name_bad_ones(
        mode in prop_oneof![
            number_in(0, 3).prop_map(|s| (s, true)),
            prop_oneof![number_outside(0, 3), junk()]
                .prop_filter("a mode", |s| !["0", "1", "2", "3"].contains(&s.trim()))
                .prop_map(|s| (s, false)),
        ],
        b in prop_oneof![
            prop::sample::select(&["1", "t", "T", "true", "TRUE", "True", "0", "f", "F", "false", "FALSE", "False"][..]).prop_map(|s| (s.to_string(), true)),
            prop_oneof![spelled(&["yes", "no", "on", "off", "tRue"]), junk()]
                .prop_filter("a boolean", |s| !["1", "t", "T", "true", "TRUE", "True", "0", "f", "F", "false", "FALSE", "False"].contains(&s.as_str()))
                .prop_map(|s| (s, false)),
        ],
        zone in prop_oneof![
            dns_label().prop_map(|s| (s, true)),
            prop_oneof!["[A-Z]{1,5}", "-[a-z]{1,5}", "[a-z]{64,70}", junk()]
                .prop_filter("a zone", |s| !is_label(s))
                .prop_map(|s| (s, false)),
        ],
        class in prop_oneof![
            prop_oneof![
                "[a-z]{1,10}\\.[a-z]{2,5}/[a-zA-Z0-9]([a-zA-Z0-9._-]{0,20}[a-zA-Z0-9])?",
                "[a-zA-Z0-9]([a-zA-Z0-9._-]{0,20}[a-zA-Z0-9])?",
            ].prop_map(|s| (s, true)),
            prop_oneof!["[a-z]{1,5}/", "/[a-z]{1,5}", "[a-z]{1,5}/[a-z]{1,5}/[a-z]{1,5}", "[a-z]{64,70}", junk()]
                .prop_filter("a class", |s| !is_class(s))
                .prop_map(|s| (s, false)),
        ],
        dur in prop_oneof![
            (1u32..3600).prop_map(|n| (n.to_string(), true)),
            (1u32..60).prop_map(|n| (format!("{n}m"), true)),
            (1u32..3_600_000).prop_map(|n| (format!("{n}ms"), true)),
            prop_oneof![Just("0".to_string()), Just("3601".to_string()), Just("61m".to_string()), Just("-1s".to_string()), Just("NaN".to_string()), Just("inf".to_string()), Just("1h".to_string()), junk()]
                .prop_filter("a duration", |s| !is_duration(s))
                .prop_map(|s| (s, false)),
        ],
    ) {
        let check = |r: Result<(), flags::FlagError>, flag: &str, value: &str, ok: bool| -> Result<(), TestCaseError> {
            match r {
                Ok(()) => prop_assert!(ok, "{} {:?} accepted", flag, value),
                Err(e) => {
                    prop_assert!(!ok, "{} {:?} refused: {}", flag, value, e);
                    prop_assert_eq!(e.flag, flag);
                    prop_assert_eq!(&e.value, value);
                    prop_assert!(e.to_string().starts_with(&format!("{flag} {value:?}: ")), "{}", e);
                    prop_assert!(e.message.contains("allowed") || e.message.contains("write") || e.message.contains("e.g."), "says what to write: {}", e);
                }
            }
            Ok(())
        };
        check(flags::parse_lb_mode(&mode.0).map(|_| ()), "--setLBMode", &mode.0, mode.1)?;
        check(flags::parse_bool("--setUniqueIP", &b.0).map(|_| ()), "--setUniqueIP", &b.0, b.1)?;
        check(flags::parse_zone(&zone.0).map(|_| ()), "--zone", &zone.0, zone.1)?;
        check(flags::parse_load_balancer_class(&class.0).map(|_| ()), "--loadBalancerClass", &class.0, class.1)?;
        // A duration's bound is checked after the unit: 3,600,000 ms is 1 h.
        check(flags::parse_duration("--leaseDuration", &dur.0).map(|_| ()), "--leaseDuration", &dur.0, dur.1)?;
        let refused = [mode.1, b.1, zone.1, class.1, dur.1].iter().filter(|ok| !**ok).count();
        tally("scalar flags", cases(SCALAR_CASES).cases, 5, refused);
    }

}

proptest! {
    #![proptest_config(cases(LEASE_CASES))]

    #[test]
    fn lease_timings_and_status_form_name_the_flag_at_fault(
        d in prop::option::of(prop_oneof![(1u32..20).prop_map(|n| n.to_string()), junk()]),
        r in prop::option::of(prop_oneof![(1u32..20).prop_map(|n| n.to_string()), junk()]),
        p in prop::option::of(prop_oneof![(1u32..20).prop_map(|n| format!("{}ms", n * 100)), junk()]),
        hostname in prop::option::of(prop_oneof![Just("true".to_string()), Just("false".to_string()), junk()]),
        zone in prop::option::of(prop_oneof![dns_label(), junk()]),
        no_zone in prop::option::of(prop_oneof![Just("true".to_string()), Just("false".to_string()), junk()]),
    ) {
        let base = (
            std::time::Duration::from_secs(4),
            std::time::Duration::from_secs(3),
            std::time::Duration::from_secs(1),
        );
        let timings = flags::lease_timings(base, d.as_deref(), r.as_deref(), p.as_deref());
        let form = flags::status_form(hostname.as_deref(), zone.as_deref(), no_zone.as_deref());
        tally(
            "lease and status flags",
            cases(LEASE_CASES).cases,
            2,
            usize::from(timings.is_err()) + usize::from(form.is_err()),
        );
        match timings {
            Ok((d2, r2, p2)) => prop_assert!(p2 < r2 && r2 < d2, "{:?}", (d2, r2, p2)),
            Err(e) => {
                prop_assert!(
                    ["--leaseDuration", "--leaseRenewDeadline", "--leaseRetryPeriod"].contains(&e.flag),
                    "{}", e
                );
                prop_assert!(e.to_string().starts_with(&format!("{} {:?}: ", e.flag, e.value)), "{}", e);
                // The value is the one given, or (for an order problem)
                // the duration it came to.
                let given = match e.flag {
                    "--leaseDuration" => d.as_deref(),
                    "--leaseRenewDeadline" => r.as_deref(),
                    _ => p.as_deref(),
                };
                prop_assert!(
                    given == Some(e.value.as_str()) || e.message.contains("must be shorter"),
                    "{}", e
                );
            }
        }
        match form {
            Ok(_) => {}
            Err(e) => {
                let given = match e.flag {
                    "--setLBHostnameStatus" => hostname.as_deref(),
                    "--zone" => zone.as_deref(),
                    "--noZoneName" => no_zone.as_deref(),
                    other => return Err(TestCaseError::fail(format!("unexpected flag {other}: {e}"))),
                };
                prop_assert_eq!(given, Some(e.value.as_str()), "{}", e);
                prop_assert!(e.to_string().starts_with(&format!("{} {:?}: ", e.flag, e.value)), "{}", e);
            }
        }
    }
}

// ---------------------------------------------------------- config file

/// A `--config` file's value for a setting: valid or a mutation.
fn setting_value() -> impl Strategy<Value = (String, String)> {
    let keys = kube_watch::config_file::SETTINGS
        .iter()
        .map(|s| s.name)
        .chain(["setExclIPAM", "loxilbLoadBalancerClass"])
        .chain(["cidrpools", "setLbMode", "unknownSetting", "iface2"])
        .collect::<Vec<_>>();
    let value = prop_oneof![
        Just("true".to_string()),
        Just("false".to_string()),
        Just("2".to_string()),
        Just("7".to_string()),
        Just("defaultPool=192.0.2.0/24".to_string()),
        Just("[defaultPool=192.0.2.0/24, p2=198.51.100.0/24]".to_string()),
        Just("[eth0, eth1]".to_string()),
        Just("[]".to_string()),
        Just("{a: 1}".to_string()),
        Just("~".to_string()),
        Just("\"yes\"".to_string()),
        Just("llb".to_string()),
        Just("loxilb.io/loxilb".to_string()),
        Just("300.0.0.1/24".to_string()),
        junk().prop_map(|s| format!("{s:?}")),
    ];
    (prop::sample::select(keys).prop_map(str::to_string), value)
}

proptest! {
    #![proptest_config(cases(CONFIG_CASES))]

    #[test]
    fn config_files_refuse_with_file_key_and_value(
        entries in prop::collection::vec(setting_value(), 0..6),
        garbage in prop::option::of(junk()),
    ) {
        let mut text: String = entries.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
        if let Some(g) = &garbage {
            text.push_str(g);
        }
        let parsed = ConfigFile::parse("kube.yaml", &text);
        tally("--config files", cases(CONFIG_CASES).cases, 1, usize::from(parsed.is_err()));
        match parsed {
            Ok(f) => {
                // Every accepted value is one a flag takes as it is.
                for (s, values) in &f.values {
                    prop_assert!(entries.iter().any(|(k, _)| k == s.name || s.aliases.contains(&k.as_str())), "{}", s.name);
                    if s.name == "setLBMode" {
                        prop_assert!(flags::parse_lb_mode(&values[0]).is_ok());
                    }
                    if s.name == "cidrPools" {
                        prop_assert!(flags::parse_cidr_pools(&values.join(",")).is_ok() || values.len() == 1 && flags::parse_cidr_pools(&values[0]).is_ok());
                    }
                }
            }
            Err(e) => {
                let shown = e.to_string();
                prop_assert!(shown.starts_with("kube.yaml: "), "{}", shown);
                if !e.key.is_empty() {
                    prop_assert!(shown.starts_with(&format!("kube.yaml: {}: ", e.key)), "{}", shown);
                    let (_, v) = entries.iter().find(|(k, _)| *k == e.key).cloned().unwrap_or_default();
                    // The value is quoted unless it is the key that is wrong
                    // or the value is absent, a list or a map.
                    let key_wrong = shown.contains("unknown setting") || shown.contains("the same setting");
                    let plain = v.trim_matches('"');
                    let v_ok = key_wrong
                        || e.message.contains("has no value")
                        || e.message.contains("empty list")
                        || v.starts_with('[') || v.starts_with('{')
                        || e.message.contains(&format!("`{plain}`"))
                        || e.message.contains(&format!("{plain:?}"))
                        || e.message.contains(plain)
                        // A quoted YAML scalar is named as it decodes
                        // (`"\""` is the one-character value `"`).
                        || serde_norway::from_str::<String>(&v)
                            .is_ok_and(|d| e.message.contains(&format!("`{d}`")));
                    prop_assert!(v_ok, "value {:?} not named: {}", v, shown);
                }
            }
        }
    }
}
