#!/usr/bin/env bash
# Soak: the real agent for LOXILB_SOAK_SECS seconds (600 by default) with
# steady new connections, a long-lived one and the rule file reloaded every
# second; prints connections, failures, RSS and session entries every 10 s.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build -q -p loxilb-agent
LOXILB_REQUIRE_ROOT=1 LOXILB_SOAK_SECS="${LOXILB_SOAK_SECS:-600}" \
    cargo test -q -p loxilb-tests --test all -- --nocapture soak::
