#!/bin/bash
# Where a datapath program spends its time, by source line: runs the bench
# under `perf record`, reads the program's JIT line info while it is
# loaded (scripts/bpf-lines.py), and maps the samples to lines. Samples in
# kernel functions (map lookups, LRU inserts) are counted under the line
# that called them.
#
#   sudo ./scripts/profile.sh [program] [bench arguments...]
#   sudo ./scripts/profile.sh loxilb_xdp_new4 --rounds 3 --iters 20000
#
# Needs perf and python3; run nothing else that loads programs meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
prog=${1:-loxilb_xdp_new4}
shift || true
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--soak 0 --rounds 3 --iters 20000 --full 0)
command -v perf >/dev/null || { echo "profile.sh: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
cargo build -q --release -p loxilb-tests --bin bench
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
perf record -q -e cpu-clock -F 20000 -g -o "$out/perf.data" -- \
    ./target/release/bench "${args[@]}" > "$out/bench.txt" 2>&1 &
rec=$!
got=
for _ in $(seq 1 900); do
    if python3 scripts/bpf-lines.py info "$prog" "$out/lines.json" 2>/dev/null; then got=1; break; fi
    sleep 0.2
done
wait $rec || { cat "$out/bench.txt" >&2; exit 1; }
[ -n "$got" ] || { echo "profile.sh: $prog was never loaded" >&2; exit 1; }
perf script -i "$out/perf.data" -F ip,sym 2>/dev/null > "$out/script.txt"
python3 scripts/bpf-lines.py map "$out/lines.json" "$out/script.txt"
