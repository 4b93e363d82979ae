#!/usr/bin/env bash
# Namespace instance set-up and teardown: warren-helper's CreateInstance
# (request to TUN descriptor in hand) and DestroyInstance, N times, beside the
# same configuration done with one `ip` command per step (netns add, tuntap,
# addr, link up x2, route; netns del), in the same run. Needs root.
#   N=50 bench/instance.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-50}
cargo build --release --locked --bins >/dev/null 2>&1
cargo build --release --locked -p warren-tests --example bench_instance >/dev/null 2>&1
dir=$(mktemp -d /run/warren-bench-inst.XXXXXX)   # tmpfs, like /run/warren
chmod 755 "$dir"
./target/release/warren-helper serve --socket "$dir/h.sock" --group 0 --config /nonexistent 2>"$dir/helper.log" &
helper=$!
ns=wrbench$$
cleanup() { ip netns del "$ns" 2>/dev/null || true; kill "$helper" 2>/dev/null || true; wait "$helper" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
for _ in $(seq 100); do [[ -S $dir/h.sock ]] && break; sleep 0.05; done

echo "warren-helper:"
./target/release/examples/bench_instance "$dir/h.sock" "$N" | tee "$dir/warren.json"

ms() { echo $(( ($2 - $1) / 1000 )); }   # ns -> us
up=() down=()
for i in $(seq $((N + 3))); do
  t0=$(date +%s%N)
  ip netns add "$ns"
  ip -n "$ns" tuntap add dev wr0 mode tun
  ip -n "$ns" addr add 198.19.88.2/32 dev wr0
  ip -n "$ns" link set lo up
  ip -n "$ns" link set wr0 mtu 1420 up
  ip -n "$ns" route add default dev wr0
  t1=$(date +%s%N)
  ip netns del "$ns"
  t2=$(date +%s%N)
  if (( i > 3 )); then up+=("$(ms $t0 $t1)"); down+=("$(ms $t1 $t2)"); fi
done
python3 - "$dir/warren.json" "${up[*]}" "${down[*]}" <<'PY'
import json, statistics, sys
w = json.load(open(sys.argv[1]))
up = [int(x) / 1000 for x in sys.argv[2].split()]
down = [int(x) / 1000 for x in sys.argv[3].split()]
q = lambda v, p: sorted(v)[round((len(v) - 1) * p)]
print(f"ip commands:   create p50 {statistics.median(up):.2f} ms (p90 {q(up,0.9):.2f})  destroy p50 {statistics.median(down):.2f} ms (p90 {q(down,0.9):.2f})")
print(f"warren-helper: create p50 {w['create_p50_ms']:.2f} ms (p90 {w['create_p90_ms']:.2f})  destroy p50 {w['destroy_p50_ms']:.2f} ms (p90 {w['destroy_p90_ms']:.2f})")
print(f"speed-up: create {statistics.median(up)/w['create_p50_ms']:.1f}x, destroy {statistics.median(down)/w['destroy_p50_ms']:.1f}x")
PY
