#!/usr/bin/env bash
# warren's TLS transports vs direct TCP on loopback, side by side in one run:
# bulk single-stream throughput and short-connection rate (N requests, C
# concurrent). Starts two `warren server` processes (tls, tls-mux) and runs
# the transport_bench example as the client; repeats RUNS times and prints
# medians. No root needed.
#   RUNS=3 SIZE_MIB=1024 REQUESTS=1000 CONCURRENCY=50 bench/transports.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}; SIZE_MIB=${SIZE_MIB:-1024}; REQUESTS=${REQUESTS:-1000}; CONCURRENCY=${CONCURRENCY:-50}
cargo build --release --locked --bins --example transport_bench >/dev/null 2>&1
dir=$(mktemp -d /tmp/warren-bench-tr.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
./target/release/warren cert --name bench.warren.test --out-dir "$dir" >"$dir/cert.txt"
pin=$(sed -n 's/^pin: *//p' "$dir/cert.txt")
export WARREN_PASSWORD=bench-secret-0123456789
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tls_port=$(port); mux_port=$(port)
./target/release/warren server --mode tls --listen 127.0.0.1:$tls_port --cert "$dir/cert.pem" --key "$dir/key.pem" --allow-local-targets 2>"$dir/tls.log" & pids+=($!)
./target/release/warren server --mode tls-mux --listen 127.0.0.1:$mux_port --cert "$dir/cert.pem" --key "$dir/key.pem" --allow-local-targets 2>"$dir/mux.log" & pids+=($!)
sleep 0.5
for _ in $(seq "$RUNS"); do
  ./target/release/examples/transport_bench --tls 127.0.0.1:$tls_port --mux 127.0.0.1:$mux_port --pin "$pin" \
    --size-mib "$SIZE_MIB" --requests "$REQUESTS" --concurrency "$CONCURRENCY"
done | tee "$dir/runs.jsonl"
python3 - "$dir/runs.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
paths = ["direct", "relay", "tls", "tls-mux"]
med = {p: {k: statistics.median(r[k] for r in rows if r["path"] == p)
           for k in ("bulk_mib_s", "short_rps", "short_p50_ms", "short_p99_ms")} for p in paths}
for p in paths:
    m = med[p]
    print(f"{p:8s} bulk {m['bulk_mib_s']:8.0f} MiB/s  short {m['short_rps']:7.0f} req/s  p50 {m['short_p50_ms']:6.2f} ms  p99 {m['short_p99_ms']:6.2f} ms")
print(f"tls bulk / direct: {med['tls']['bulk_mib_s']/med['direct']['bulk_mib_s']:.2f}")
print(f"plain user-space relay (no TLS) bulk / direct: {med['relay']['bulk_mib_s']/med['direct']['bulk_mib_s']:.2f}")
print(f"tls bulk / plain relay: {med['tls']['bulk_mib_s']/med['relay']['bulk_mib_s']:.2f}")
print(f"tls-mux bulk / direct: {med['tls-mux']['bulk_mib_s']/med['direct']['bulk_mib_s']:.2f}")
print(f"tls-mux short rate / tls: {med['tls-mux']['short_rps']/med['tls']['short_rps']:.2f}")
PY
