#!/usr/bin/env bash
# Packet fuzzing: LOXILB_FUZZ_PACKETS generated frames (default 1,000,000)
# through the XDP datapath with BPF_PROG_TEST_RUN, every verdict checked by
# the oracle of tests/tests/all/fuzz/oracle.rs. LOXILB_FUZZ_SEED picks the
# sequence (default: a new one each run, printed); a failure prints the
# seed, the packet's index and the frames in hex. Needs root. CI runs the
# same test on 50,000 packets with a fixed seed.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export LOXILB_FUZZ_PACKETS="${LOXILB_FUZZ_PACKETS:-1000000}"
export LOXILB_FUZZ_SEED="${LOXILB_FUZZ_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}"
cargo test -q -p loxilb-tests --test all --no-run
LOXILB_REQUIRE_ROOT=1 cargo test -q -p loxilb-tests --test all -- \
    --nocapture --exact fuzz::fuzzed_frames_through_the_datapath_satisfy_the_oracle
