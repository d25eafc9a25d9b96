#!/usr/bin/env bash
# Benchmark: ns/packet of each datapath path via BPF_PROG_TEST_RUN, with the
# XDP_PASS floor and the reference programs (loxilb-ebpf/ref) measured in the
# same run; then instructions and stack per program, the new-flow rate and a
# 60 s run with 100,000 live sessions (--soak S / --soak-flows F; --soak 0
# skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build -q --release -p loxilb-tests --bin bench
./target/release/bench "$@"
# Control plane at scale: +1 Service, full resync and RSS with 10,000
# Services and 100,000 endpoints in the real maps.
cargo build -q --release -p loxilb-tests --bin bench_kube
./target/release/bench_kube
# High availability: from SIGKILL of the active agent to its VIPs on the
# new owner, the client's ARP entry moved and the first new connection
# served there, p50/p99 over LOXILB_HA_RUNS kills (20 by default).
LOXILB_REQUIRE_ROOT=1 LOXILB_HA_RUNS="${LOXILB_HA_RUNS:-20}" \
    cargo test -q -p loxilb-tests --test all e2e_ha::a_killed_agent -- --nocapture 2>&1 |
    grep 'takeover after SIGKILL'
# The same after the active node dies (links cut, agent killed: only the
# Lease's expiry decides), with the sub-second Lease timings.
LOXILB_REQUIRE_ROOT=1 LOXILB_HA_RUNS="${LOXILB_HA_RUNS:-20}" \
    cargo test -q -p loxilb-tests --test all e2e_ha::a_dead_node -- --nocapture 2>&1 |
    grep 'takeover after the active node died'
