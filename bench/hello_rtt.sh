#!/usr/bin/env bash
# Hello round trip to the helper over its Unix socket: p50/p99 over N calls,
# RUNS times, beside the same frames over an in-process socket pair (the
# floor no helper can beat), in the same run. Prints one JSON line per run and
# the medians. Needs root (it starts the helper).
#   RUNS=5 N=10000 bench/hello_rtt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
N=${N:-10000}
cargo build --release --locked --bins >/dev/null
dir=$(mktemp -d /tmp/warren-bench-hello.XXXXXX)
chmod 755 "$dir"
./target/release/warren-helper serve --socket "$dir/h.sock" --group 0 --config /nonexistent 2>/dev/null &
helper=$!
trap 'kill $helper 2>/dev/null; wait $helper 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [[ -S $dir/h.sock ]] && break; sleep 0.05; done
for _ in $(seq "$RUNS"); do
  ./target/release/warren --helper-socket "$dir/h.sock" helper ping -n "$N" --baseline --json
  ./target/release/warren --helper-socket "$dir/h.sock" helper ping -n "$N" --no-spin --json
done | tee "$dir/runs.jsonl"
python3 - "$dir/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
spin = [r for r in runs if r["spin"]]
nospin = [r for r in runs if not r["spin"]]
def med(rs, k, f): return statistics.median(r[k][f] for r in rs)
rows = [("helper Hello (client polls 100us)", spin, "hello"),
        ("helper Hello (client sleeps)", nospin, "hello"),
        ("in-process socketpair baseline", spin, "socketpair_baseline")]
for name, rs, k in rows:
    print(f"{name:36s} median of {len(rs)} runs: p50 {med(rs,k,'p50_us'):6.1f} us  p99 {med(rs,k,'p99_us'):6.1f} us")
print(f"ratio hello(polls)/baseline p50: {med(spin,'hello','p50_us')/med(spin,'socketpair_baseline','p50_us'):.2f}")
PY
