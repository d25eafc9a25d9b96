//! Packet tables: cases of (input frame, expected verdict, expected output
//! frame) run through the datapath with BPF_PROG_TEST_RUN, every failure
//! collected and reported with a byte diff and the datapath's counters.
//!
//! Before anything runs, every frame of a table goes through the
//! independent [`crate::oracle`]: a table of well-formed frames
//! ([`check`], [`check_with`]) must have inputs and expected outputs that
//! etherparse reads as consistent; a table of deliberately malformed
//! inputs ([`check_malformed`]) must have inputs the oracle refuses (or it
//! would not test what it says), expected back untouched.

use std::collections::HashMap;

use loxilb_agent::datapath::Datapath;

use crate::{fib::run_xdp, oracle, packet::diff};

/// One row of a packet table.
pub struct Case {
    pub name: &'static str,
    pub input: Vec<u8>,
    pub expected: Vec<u8>,
    pub verdict: u32,
}

/// How a program is run on one frame ([`crate::fib::run_xdp`],
/// [`crate::fib::run_tc`]).
pub type Run = fn(&mut Datapath, &[u8]) -> (u32, Vec<u8>);

/// The datapath's counters by name.
pub fn stats(dp: &Datapath) -> HashMap<&'static str, u64> {
    dp.stats().unwrap().into_iter().collect()
}

/// A table of well-formed frames through XDP.
pub fn check(dp: &mut Datapath, cases: Vec<Case>) {
    check_with(dp, cases, run_xdp)
}

/// A table of well-formed frames through `run`: every input and expected
/// output must pass the oracle.
pub fn check_with(dp: &mut Datapath, cases: Vec<Case>, run: Run) {
    vet(&cases);
    run_table(dp, cases, run)
}

/// Every input and expected output of a table of well-formed frames must
/// pass the oracle (panics naming the case and what is wrong).
pub fn vet(cases: &[Case]) {
    for c in cases {
        oracle::assert_frame(&format!("case {:?}, input", c.name), &c.input);
        oracle::assert_frame(&format!("case {:?}, expected output", c.name), &c.expected);
    }
}

/// A table of deliberately malformed inputs through `run`: the oracle must
/// refuse every input (else the case tests a well-formed frame), and the
/// datapath must give it back as it came.
pub fn check_malformed(dp: &mut Datapath, cases: Vec<Case>, run: Run) {
    for c in &cases {
        assert!(
            oracle::frame_error(&c.input).is_some(),
            "case {:?}: meant to be malformed, but the oracle reads it as a consistent frame; \
             break it the way the case's name says",
            c.name
        );
        assert_eq!(
            c.input, c.expected,
            "case {:?}: a malformed frame is expected back untouched",
            c.name
        );
    }
    run_table(dp, cases, run)
}

/// A table of random bytes through `run`, which the oracle cannot judge
/// either way (random bytes may well parse): each is expected back as it
/// came.
pub fn check_random(dp: &mut Datapath, cases: Vec<Case>, run: Run) {
    for c in &cases {
        assert_eq!(
            c.input, c.expected,
            "case {:?}: random bytes are expected back untouched",
            c.name
        );
    }
    run_table(dp, cases, run)
}

fn run_table(dp: &mut Datapath, cases: Vec<Case>, run: Run) {
    let mut failures = vec![];
    for c in cases {
        let (v, out) = run(dp, &c.input);
        if v != c.verdict || out != c.expected {
            failures.push(format!(
                "case {:?}: verdict {v} (want {})\n{}",
                c.name,
                c.verdict,
                diff(&out, &c.expected)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\ncounters: {:?}",
        failures.join("\n"),
        stats(dp)
    );
}

/// The single-frame form of a table row: the datapath's output `got`
/// must be `want`, and `want` must pass the oracle first.
pub fn expect_frame(what: &str, got: &[u8], want: &[u8]) {
    oracle::assert_frame(&format!("{what}, expected output"), want);
    assert_eq!(got, want, "{what}\n{}", diff(got, want));
}

#[cfg(test)]
mod tests {
    use crate::fib::{EP1_MAC, LB_TO_EP_MAC};
    use crate::oracle::{crc32c, frame_error};
    use crate::packet::{icmp_frame, Frame, SYN};

    fn must_refuse(what: &str, b: &[u8], why: &str) {
        let e = frame_error(b).unwrap_or_else(|| panic!("{what}: the oracle accepted it"));
        assert!(e.contains(why), "{what}: refused for {e:?}, want {why:?}");
    }

    /// What the tables build passes; one corrupted byte of an expected
    /// frame, in each field the oracle checks, fails it.
    #[test]
    fn the_oracle_passes_good_frames_and_refuses_each_corruption() {
        let tcp = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN)
            .with("192.168.0.2", 40000, "10.0.1.10", 8080)
            .routed(LB_TO_EP_MAC, EP1_MAC)
            .bytes();
        let udp = Frame::udp("192.168.0.2", 5000, "20.0.0.100", 53).bytes();
        let tcp6 = Frame::tcp("fd00:c::2", 44000, "fd00:20::100", 80, SYN).bytes();
        let icmp = icmp_frame("192.168.0.2", "20.0.0.100", 64, 8, 0, [0, 1, 0, 1], b"ping");
        for (what, b) in [
            ("tcp", &tcp),
            ("udp", &udp),
            ("tcp6", &tcp6),
            ("icmp", &icmp),
        ] {
            assert_eq!(frame_error(b), None, "{what}");
        }

        let mut bad = tcp.clone();
        bad[14 + 20 + 16] ^= 0x01; // TCP checksum
        must_refuse("TCP checksum", &bad, "TCP checksum");
        let mut bad = tcp.clone();
        bad[14 + 10] ^= 0x01; // IPv4 header checksum
        must_refuse("IPv4 checksum", &bad, "IPv4 header checksum");
        let mut bad = tcp.clone();
        bad[14 + 8] -= 1; // TTL not followed by the checksum
        must_refuse("stale IPv4 checksum", &bad, "IPv4 header checksum");
        let mut bad = udp.clone();
        bad[14 + 20 + 7] ^= 0x10; // UDP checksum
        must_refuse("UDP checksum", &bad, "UDP checksum");
        let mut bad = udp.clone();
        bad.push(0); // one byte the lengths do not count
        bad[14 + 20 + 5] += 1; // UDP length says one more than the IP packet
        must_refuse("UDP length", &bad, "etherparse refuses");
        let mut bad = tcp6.clone();
        bad[14 + 40 + 17] ^= 0x01; // TCP over IPv6 checksum
        must_refuse("TCP6 checksum", &bad, "TCP checksum");
        let mut bad = icmp.clone();
        bad[14 + 20 + 2] ^= 0x01;
        must_refuse("ICMP checksum", &bad, "ICMP checksum");
        let mut bad = tcp.clone();
        bad.extend_from_slice(&[0; 8]); // longer than the IP length says
        must_refuse("trailing bytes", &bad, "after the IP packet");
        must_refuse("cut", &tcp[..40], "etherparse refuses");
    }

    /// A table whose expected output was built with a wrong checksum is
    /// refused before anything runs.
    #[test]
    #[should_panic(
        expected = "case \"corrupted\", expected output: the frame is not consistent by an independent parser (TCP checksum"
    )]
    fn a_table_with_a_corrupted_expected_frame_fails() {
        let input = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN).bytes();
        let mut expected = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN)
            .with("192.168.0.2", 40000, "10.0.1.10", 8080)
            .routed(LB_TO_EP_MAC, EP1_MAC)
            .bytes();
        expected[14 + 20 + 17] ^= 0x04;
        super::vet(&[
            super::Case {
                name: "good",
                input: input.clone(),
                expected: input.clone(),
                verdict: 2,
            },
            super::Case {
                name: "corrupted",
                input,
                expected,
                verdict: 4,
            },
        ]);
    }

    /// RFC 3720 B.4 reference values of the oracle's own CRC32c.
    #[test]
    fn crc32c_reference_values() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }
}
