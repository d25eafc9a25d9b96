//! Rule files for `loxilb-agent run`, property-based (proptest): valid
//! files are generated, then one field is mutated into a near-valid bad
//! value (wrong type, out of range, bad address or prefix, unknown key or
//! keyword, empty, huge, unicode). Properties: nothing panics; a valid
//! file is accepted as written; a mutated one is refused, the error naming
//! the file, the field mutated and the value given; a reload with a bad
//! file ([`config::reload`], what `run` does on SIGHUP or a change) writes
//! nothing and leaves the rules running as they were, and the next good
//! file applies.
//!
//! `PROPTEST_CASES` sets each test's case count; by default 3,000 files
//! and 500 reload sequences.

// One copy of the property-test helpers, kube-watch's.
#[allow(dead_code)] // quoted: the annotation tests'
#[path = "../../kube-watch/tests/prop_support/mod.rs"]
mod prop_support;

use std::collections::HashMap;

use anyhow::Result;
use ipnet::IpNet;
use loxilb_agent::{
    config::{self, ConfigError},
    rules::{Installed, RuleTable, Rules},
};
use loxilb_common::{Addr, EpKey, EpVal, RuleVips, SelChunk, SvcKey, SvcVal};
use prop_support::{cases, tally};
use proptest::prelude::*;

const FILE_CASES: u32 = 3000;
const RELOAD_CASES: u32 = 500;

/// One rule, as its YAML fields (values already YAML text).
#[derive(Clone, Debug)]
struct RuleText {
    fields: Vec<(String, String)>,
    endpoints: Vec<Vec<(String, String)>>,
    port: u16,
}

fn render(rules: &[RuleText]) -> String {
    let mut out = String::from("rules:\n");
    for r in rules {
        let mut first = true;
        for (k, v) in &r.fields {
            out.push_str(if first { "  - " } else { "    " });
            first = false;
            out.push_str(&format!("{k}: {v}\n"));
        }
        if !r.endpoints.is_empty() {
            out.push_str("    endpoints:\n");
            for e in &r.endpoints {
                let inner: Vec<String> = e.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                out.push_str(&format!("      - {{ {} }}\n", inner.join(", ")));
            }
        }
    }
    out
}

/// A valid rule: the `i`th of its file (its VIP and port are its own).
fn valid_rule(i: usize) -> impl Strategy<Value = RuleText> {
    (
        prop::option::of("[a-z][a-z0-9-]{0,15}"),
        0u8..=1,
        prop::sample::select(&["tcp", "udp", "TCP", " sctp "][..]),
        prop::sample::select(&["", "default", "onearm", "fullnat", "dsr"][..]),
        prop::sample::select(&["", "rr", "hash", "persist", "lc", "roundrobin"][..]),
        prop::option::of(1u32..=604_800),
        prop::option::of(1u32..=604_800),
        prop::collection::btree_set((1u8..=250, 1u8..=250), 0..4),
        prop::collection::vec(prop::option::of(1u16..=65535), 0..4),
        prop::collection::btree_set(8u8..=24, 0..3),
        prop::option::of(prop::sample::select(&["none", "ping", "tcp", "http"][..])),
    )
        .prop_map(
            move |(name, v6, proto, mode, sel, timeout, persist, eps, weights, ranges, probe)| {
                let port = 1000 + i as u16;
                let mut f: Vec<(String, String)> = Vec::new();
                if let Some(n) = name {
                    f.push(("name".into(), format!("r{i}-{n}")));
                }
                let v6 = v6 == 1 && mode != "dsr";
                f.push((
                    "vip".into(),
                    if v6 {
                        format!("\"fd00::{}\"", i + 1)
                    } else {
                        format!("20.0.0.{}", i + 1)
                    },
                ));
                f.push(("port".into(), port.to_string()));
                f.push(("protocol".into(), format!("\"{proto}\"")));
                if !mode.is_empty() {
                    f.push(("mode".into(), mode.into()));
                }
                if !sel.is_empty() {
                    f.push(("selection".into(), sel.into()));
                }
                if let Some(t) = timeout {
                    f.push(("timeout".into(), t.to_string()));
                }
                if let Some(p) = persist.filter(|_| sel == "persist") {
                    f.push(("persist_timeout".into(), p.to_string()));
                }
                if !ranges.is_empty() {
                    let list: Vec<String> = ranges
                        .iter()
                        .map(|l| {
                            if v6 {
                                format!("\"fd00:{l:x}::/{}\"", 32 + l)
                            } else {
                                let net: IpNet = format!("10.{l}.0.0/{l}").parse().unwrap();
                                format!("{}", net.trunc())
                            }
                        })
                        .collect();
                    f.push(("source_ranges".into(), format!("[{}]", list.join(", "))));
                }
                if let Some(p) = probe {
                    f.push(("probe".into(), format!("{{ type: {p} }}")));
                }
                let endpoints = eps
                    .iter()
                    .zip(weights.iter().chain(std::iter::repeat(&None)))
                    .map(|((a, b), w)| {
                        let ip = if v6 {
                            format!("\"fd00:1::{a:x}:{b:x}\"")
                        } else {
                            format!("10.1.{a}.{b}")
                        };
                        let ep_port = if mode == "dsr" {
                            port
                        } else {
                            8000 + *b as u16
                        };
                        let mut e = vec![
                            ("ip".to_string(), ip),
                            ("port".to_string(), ep_port.to_string()),
                        ];
                        if let Some(w) = w {
                            e.push(("weight".into(), w.to_string()));
                        }
                        e
                    })
                    .collect();
                RuleText {
                    fields: f,
                    endpoints,
                    port,
                }
            },
        )
}

fn valid_file() -> impl Strategy<Value = Vec<RuleText>> {
    (1usize..=3).prop_flat_map(|n| (0..n).map(valid_rule).collect::<Vec<_>>())
}

/// Text nobody means: empty, huge, control characters, other scripts.
fn junk() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"\"".to_string()),
        Just("\"  \"".to_string()),
        Just("\"x\"".to_string()),
        Just("\"\\u0000\"".to_string()),
        Just("\"ＴＣＰ\"".to_string()),
        Just("\"défaut\"".to_string()),
        Just("\"١٢٧.٠.٠.١\"".to_string()),
        (1usize..3000).prop_map(|n| format!("\"{}\"", "z".repeat(n))),
        // Starting with a letter no valid word of any field starts with:
        // `[a-z]{1,8}` made "lc", a valid selection, one run in a few.
        "\"q[a-z]{0,7}\"",
    ]
}

/// A bad value for a field, and the text the error must quote (the value
/// as given, without YAML quotes).
fn bad_value(field: &str) -> BoxedStrategy<String> {
    let port = || {
        prop_oneof![
            Just("0".to_string()),
            (65536u64..10_000_000).prop_map(|n| n.to_string()),
            Just("-1".to_string()),
            Just("1.5".to_string()),
            Just("\"80\"".to_string()),
            Just("99999999999999999999999".to_string()),
            junk(),
        ]
        .boxed()
    };
    let ip = || {
        prop_oneof![
            Just("20.0.0.300".to_string()),
            Just("\"0.0.0.0\"".to_string()),
            Just("224.0.0.1".to_string()),
            Just("255.255.255.255".to_string()),
            Just("\"::\"".to_string()),
            Just("\"ff02::1\"".to_string()),
            Just("\"::ffff:10.0.0.1\"".to_string()),
            Just("10.0.0.0/24".to_string()),
            Just("10.0.0.1:80".to_string()),
            junk(),
        ]
        .boxed()
    };
    let seconds = || {
        prop_oneof![
            Just("0".to_string()),
            (604_801u64..100_000_000).prop_map(|n| n.to_string()),
            Just("-5".to_string()),
            Just("1.5".to_string()),
            Just("\"60s\"".to_string()),
            junk(),
        ]
        .boxed()
    };
    match field {
        "vip" => ip(),
        "port" => port(),
        "protocol" => prop_oneof![
            Just("icmp".to_string()),
            Just("tcp6".to_string()),
            Just("\"t c p\"".to_string()),
            junk()
        ]
        .boxed(),
        "mode" => prop_oneof![
            Just("fullproxy".to_string()),
            Just("hostonearm".to_string()),
            Just("nat".to_string()),
            Just("DSR".to_string()),
            junk()
        ]
        .boxed(),
        "selection" => prop_oneof![
            Just("n3".to_string()),
            Just("random".to_string()),
            Just("wrr".to_string()),
            junk()
        ]
        .boxed(),
        "timeout" => seconds(),
        "name" => prop_oneof![Just("\"\"".to_string()), Just("\"   \"".to_string())].boxed(),
        "source_ranges" => prop_oneof![
            Just("[10.0.0.1/8]".to_string()),
            Just("[nope]".to_string()),
            Just("[10.0.0.0/33]".to_string()),
            Just("[\"fd00::/8\"]".to_string()),
            Just("[10.0.0.0]".to_string()),
        ]
        .boxed(),
        "ep.ip" => ip(),
        "ep.port" => port(),
        "ep.weight" => prop_oneof![
            Just("0".to_string()),
            Just("65536".to_string()),
            Just("\"x\"".to_string()),
            Just("-1".to_string())
        ]
        .boxed(),
        "probe.type" => {
            prop_oneof![Just("icmp".to_string()), Just("grpc".to_string()), junk()].boxed()
        }
        other => panic!("{other}"),
    }
}

/// A mutation: which rule, which field, the bad value. `field` is the
/// error's field (`rules[i].<field>`) when the value is refused by the
/// checks; for the unknown key and wrong YAML types the parser itself
/// refuses (no field), naming the key.
#[derive(Clone, Debug)]
enum Mutation {
    Field {
        rule: usize,
        key: &'static str,
        value: String,
    },
    Endpoint {
        rule: usize,
        key: &'static str,
        value: String,
    },
    UnknownKey {
        rule: usize,
        key: String,
    },
    WrongType {
        rule: usize,
        key: &'static str,
        value: &'static str,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let field = prop::sample::select(
        &[
            "vip",
            "port",
            "protocol",
            "mode",
            "selection",
            "timeout",
            "name",
            "source_ranges",
            "probe.type",
        ][..],
    )
    .prop_flat_map(|k| (0usize..3, Just(k), bad_value(k)))
    .prop_map(|(rule, key, value)| Mutation::Field { rule, key, value });
    let ep = prop::sample::select(&["ip", "port", "weight"][..])
        .prop_flat_map(|k| (0usize..3, Just(k), bad_value(&format!("ep.{k}"))))
        .prop_map(|(rule, key, value)| Mutation::Endpoint { rule, key, value });
    let unknown = (
        0usize..3,
        prop_oneof![
            Just("vipp".to_string()),
            Just("Port".to_string()),
            Just("endpoint".to_string()),
            "[a-z]{3,10}_x",
            Just("ポート".to_string()),
        ],
    )
        .prop_map(|(rule, key)| Mutation::UnknownKey { rule, key });
    let wrong = (
        0usize..3,
        prop::sample::select(&["vip", "protocol", "mode", "endpoints", "source_ranges"][..]),
        prop::sample::select(&["[1, 2]", "{a: 1}"][..]),
    )
        .prop_map(|(rule, key, value)| Mutation::WrongType { rule, key, value });
    prop_oneof![4 => field, 3 => ep, 1 => unknown, 1 => wrong]
}

fn set(fields: &mut Vec<(String, String)>, key: &str, value: String) {
    match fields.iter_mut().find(|(k, _)| k == key) {
        Some(f) => f.1 = value,
        None => fields.push((key.to_string(), value)),
    }
}

/// Apply `m` to `rules`; the error's expected field (empty: the parser's)
/// and the text the message must contain.
fn mutate(rules: &mut [RuleText], m: &Mutation) -> (String, String) {
    // The value as the parser reads it (YAML quotes and escapes undone).
    let unquote = |v: &str| match serde_norway::from_str::<serde_norway::Value>(v) {
        Ok(serde_norway::Value::String(s)) => s,
        _ => v.to_string(),
    };
    match m {
        Mutation::Field { rule, key, value } => {
            let i = rule % rules.len();
            let r = &mut rules[i];
            match *key {
                "probe.type" => {
                    set(&mut r.fields, "probe", format!("{{ type: {value} }}"));
                    (format!("rules[{i}].probe.type"), unquote(value))
                }
                "source_ranges" => {
                    let v6 = r.fields.iter().any(|(k, v)| k == "vip" && v.contains(':'));
                    // The other family's prefix, whichever the rule's is.
                    let value = if value.contains("fd00") && v6 {
                        "[10.0.0.0/8]".to_string()
                    } else {
                        value.clone()
                    };
                    set(&mut r.fields, "source_ranges", value.clone());
                    let inner = value.trim_matches(['[', ']']).to_string();
                    (format!("rules[{i}].source_ranges[0]"), unquote(&inner))
                }
                k => {
                    set(&mut r.fields, k, value.clone());
                    let shown = if k == "name" {
                        String::new()
                    } else {
                        unquote(value)
                    };
                    (format!("rules[{i}].{k}"), shown)
                }
            }
        }
        Mutation::Endpoint { rule, key, value } => {
            let i = rule % rules.len();
            let r = &mut rules[i];
            let port = r.port.to_string();
            if r.endpoints.is_empty() {
                r.endpoints.push(vec![
                    ("ip".into(), "10.9.9.9".into()),
                    ("port".into(), port),
                ]);
            }
            set(&mut r.endpoints[0], key, value.clone());
            (format!("rules[{i}].endpoints[0].{key}"), unquote(value))
        }
        Mutation::UnknownKey { rule, key } => {
            let i = rule % rules.len();
            rules[i].fields.push((key.clone(), "1".into()));
            (String::new(), key.clone())
        }
        Mutation::WrongType { rule, key, value } => {
            let i = rule % rules.len();
            if *key == "endpoints" {
                rules[i].endpoints.clear();
            }
            set(&mut rules[i].fields, key, value.to_string());
            // The parser names the path; a list of numbers for a list of
            // strings is read as strings, and refused by the checks.
            (format!("rules[{i}].{key}"), String::new())
        }
    }
}

proptest! {
    #![proptest_config(cases(FILE_CASES))]

    #[test]
    fn rule_files_accept_the_valid_and_name_field_and_value_of_the_bad(
        file in valid_file(),
        m in mutation(),
    ) {
        let text = render(&file);
        let rules = config::parse("r.yaml", &text)
            .map_err(|e| TestCaseError::fail(format!("valid file refused: {e}\n{text}")))?;
        prop_assert_eq!(rules.len(), file.len());
        for (r, t) in rules.iter().zip(&file) {
            prop_assert_eq!(r.port, t.port);
            prop_assert_eq!(r.endpoints.len(), t.endpoints.len());
        }

        let mut bad = file.clone();
        let (field, shown) = mutate(&mut bad, &m);
        let text = render(&bad);
        let e = match config::parse("r.yaml", &text) {
            Ok(r) => return Err(TestCaseError::fail(format!("{m:?} accepted: {r:?}\n{text}"))),
            Err(e) => e,
        };
        tally("rule files", cases(FILE_CASES).cases, 2, 1);
        let msg = e.to_string();
        prop_assert!(msg.starts_with("r.yaml: "), "{}", msg);
        if field.is_empty() {
            // Refused by the parser: where, and which key.
            prop_assert!(msg.contains(&shown) && msg.contains("line"), "{:?}: {}", m, msg);
        } else if e.field.is_empty() {
            // Refused by the parser (a number beyond any integer): the
            // message has the field's path and the value.
            prop_assert!(msg.contains(&field) && msg.contains(&shown), "{:?}: {}", m, msg);
        } else {
            // Some mutations make another field wrong first (e.g. a VIP
            // of the other family makes every endpoint wrong): the error
            // still names a field of the rule mutated.
            let rule = field.split('.').next().unwrap();
            prop_assert!(e.field.starts_with(rule), "{:?}: {}", m, msg);
            prop_assert!(msg.starts_with(&format!("r.yaml: {}: ", e.field)), "{}", msg);
            if e.field == field && !shown.is_empty() {
                // The value as given (long ones in full: the file is the
                // user's own).
                let shown_ip = shown.parse::<std::net::IpAddr>().map(|a| a.to_string()).unwrap_or_default();
                prop_assert!(
                    msg.contains(&shown) || (!shown_ip.is_empty() && msg.contains(&shown_ip))
                        || msg.contains(&format!("{:?}", shown)),
                    "{:?} not named: {}", shown, msg
                );
            } else if !e.field.starts_with(&field) {
                prop_assert!(
                    field.contains("endpoints") || field.ends_with(".vip") || field.ends_with(".mode")
                        || field.ends_with(".protocol") || field.ends_with(".selection")
                        || field.ends_with(".port"),
                    "{:?}: refused for {} instead: {}", m, e.field, msg
                );
            }
        }
    }
}

/// The datapath maps in memory, counting every write.
#[derive(Default)]
struct Table {
    svcs: HashMap<SvcKey, SvcVal>,
    eps: HashMap<EpKey, EpVal>,
    writes: usize,
}

impl RuleTable for Table {
    fn put_service(&mut self, key: SvcKey, val: SvcVal) -> Result<()> {
        self.writes += 1;
        self.svcs.insert(key, val);
        Ok(())
    }
    fn delete_service(&mut self, key: SvcKey) -> Result<()> {
        self.writes += 1;
        self.svcs.remove(&key);
        Ok(())
    }
    fn put_endpoint(&mut self, key: EpKey, val: EpVal) -> Result<()> {
        self.writes += 1;
        self.eps.insert(key, val);
        Ok(())
    }
    fn delete_endpoint(&mut self, key: EpKey) -> Result<()> {
        self.writes += 1;
        self.eps.remove(&key);
        Ok(())
    }
    fn put_sel_chunk(&mut self, _: u32, _: SelChunk) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
    fn delete_sel_chunk(&mut self, _: u32) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
    fn put_src_range(&mut self, _: u32, _: IpNet) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
    fn delete_src_range(&mut self, _: u32, _: IpNet) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
    fn put_filter_word(&mut self, _: u32, _: u64) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
    fn put_vip(&mut self, _: Addr) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
    fn delete_vip(&mut self, _: Addr) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
    fn put_rule_vips(&mut self, _: u32, _: RuleVips) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
    fn delete_rule_vips(&mut self, _: u32) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
    fn reset_rule_stats(&mut self, _: u32) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
    fn reset_ep_stats(&mut self, _: u32) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
    fn retire_ep_slot(&mut self, _: u32) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
    fn flush_sessions(&mut self, _: u32) -> Result<usize> {
        self.writes += 1;
        Ok(0)
    }
    fn put_ep_index(&mut self, _: u32, _: loxilb_common::EpIndex) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
}

fn installed(r: &Rules) -> Vec<Installed> {
    r.installed().cloned().collect()
}

/// What `run` does: reload `text` into `rules` over `table`.
fn reload(text: &str, rules: &mut Rules, table: &mut Table) -> Result<(), ConfigError> {
    config::reload(
        || config::parse("r.yaml", text),
        |desired| rules.apply(desired, table),
    )?
    .expect("map writes in memory do not fail");
    Ok(())
}

proptest! {
    #![proptest_config(cases(RELOAD_CASES))]

    #[test]
    fn a_bad_reload_keeps_the_rules_running_and_the_next_good_one_applies(
        first in valid_file(),
        m in mutation(),
        next in valid_file(),
    ) {
        let mut rules = Rules::default();
        let mut table = Table::default();
        reload(&render(&first), &mut rules, &mut table).unwrap();
        prop_assert_eq!(rules.len(), first.len());
        let (before, svcs, eps, writes) =
            (installed(&rules), table.svcs.clone(), table.eps.clone(), table.writes);

        let mut bad = next.clone();
        mutate(&mut bad, &m);
        let e = reload(&render(&bad), &mut rules, &mut table);
        prop_assert!(e.is_err(), "{:?} accepted", m);
        tally("rule file reloads", cases(RELOAD_CASES).cases, 3, 1);
        prop_assert_eq!(table.writes, writes, "a refused file writes nothing");
        prop_assert_eq!(installed(&rules), before);
        prop_assert_eq!(&table.svcs, &svcs);
        prop_assert_eq!(&table.eps, &eps);

        reload(&render(&next), &mut rules, &mut table).unwrap();
        let want = config::parse("r.yaml", &render(&next)).unwrap();
        let mut got: Vec<String> = rules.installed().map(|i| i.name.clone()).collect();
        let mut names: Vec<String> = want.iter().map(|r| r.name.clone()).collect();
        got.sort();
        names.sort();
        prop_assert_eq!(got, names);
        prop_assert_eq!(table.svcs.len(), want.len() + want.iter().map(|r| r.secondary_vips.len()).sum::<usize>());
    }
}
