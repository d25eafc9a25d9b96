#!/usr/bin/env bash
# The main job on one machine: set up, build, and run the demo (a topology
# of network namespaces with real TCP/UDP traffic through the XDP datapath).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "[demo] building the agent (with its eBPF datapath) and the demo"
cargo build -q -p loxilb-agent -p loxilb-tests --bin loxilb-agent --bin demo
exec ./target/debug/demo "$@"
