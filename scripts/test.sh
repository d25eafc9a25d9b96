#!/usr/bin/env bash
# Set up and run every test: unit tests, packet tables through
# BPF_PROG_TEST_RUN, and network-namespace end-to-end tests. Needs root;
# root tests fail (rather than skip) here because LOXILB_REQUIRE_ROOT=1.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "[test] formatting and lints"
cargo fmt --all -- --check
cargo clippy -q --workspace --exclude loxilb-ebpf --exclude loxilb-ebpf-ref --all-targets -- -D warnings
echo "[test] building the agent (with its eBPF datapath)"
cargo build -q -p loxilb-agent -p loxilb-tests --bins
echo "[test] running the tests"
LOXILB_REQUIRE_ROOT=1 LOXILB_REQUIRE_TOOLS=1 cargo test -q --workspace --exclude loxilb-ebpf --exclude loxilb-ebpf-ref "$@"
