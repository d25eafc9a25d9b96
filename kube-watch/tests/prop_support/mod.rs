//! What the property tests of user input share (kube-watch's
//! `bad_input.rs` and `bad_annotation_events.rs`, and the agent's
//! `tests/bad_rule_files.rs`, which includes this file by path).

use std::collections::BTreeMap;

use proptest::prelude::ProptestConfig;

/// `PROPTEST_CASES` when set, else `default`; no failure files written.
pub fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Per test: cases run, inputs tried, inputs refused; a summary line once
/// its last case ran (`-- --nocapture` shows it).
pub fn tally(test: &'static str, of: u32, inputs: usize, refused: usize) {
    static T: std::sync::Mutex<BTreeMap<&'static str, (u32, usize, usize)>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut t = T.lock().unwrap();
    let e = t.entry(test).or_default();
    e.0 += 1;
    e.1 += inputs;
    e.2 += refused;
    if e.0 == of {
        println!(
            "bad input: {test}: {} cases, {} inputs, {} refused, 0 panics",
            e.0, e.1, e.2
        );
    }
}

/// `value` as an error message quotes it (the first 64 characters, then
/// `...`), to look for in the message.
pub fn quoted(value: &str) -> String {
    let mut v: String = value.chars().take(64).collect();
    if value.chars().count() > 64 {
        v.push_str("...");
    }
    format!("{v:?}")
}
