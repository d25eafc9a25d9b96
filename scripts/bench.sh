#!/usr/bin/env bash
# Benchmark: ns/packet of each datapath path via BPF_PROG_TEST_RUN, with the
# XDP_PASS floor measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build -q --release -p loxilb-tests --bin bench
exec ./target/release/bench "$@"
