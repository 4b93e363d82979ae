#!/usr/bin/env bash
# warren proxy beside direct, microsocks and dante in one run, with the
# shared anchor scripts (../shared/bench-anchors): 1 GiB single-stream
# download and short-connection rate (50 concurrent, 2,000 connections).
# Needs root (the anchor scripts start dante as root) and Debian's microsocks
# and dante-server.
#   RUNS=3 SIZE_MB=1024 bench/proxy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ANCHORS=${ANCHORS:-../shared/bench-anchors}
export RUNS=${RUNS:-3} SIZE_MB=${SIZE_MB:-1024} N=${N:-2000} CONCURRENCY=${CONCURRENCY:-50}
export RESULTS=${RESULTS:-$(mktemp /tmp/warren-bench-proxy.XXXXXX.tsv)}
command -v microsocks >/dev/null && command -v danted >/dev/null || {
  echo "apt-get install microsocks dante-server first" >&2; exit 1; }
cargo build --release --locked --bins >/dev/null 2>&1
WARREN=${CARGO_TARGET_DIR:-target}/release/warren
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# The proxy is started by the same process that then becomes the anchor
# script (exec), so the script counts it as its own, not as foreign load.
pidfile=$(mktemp /tmp/warren-bench-proxy.pid.XXXXXX)
stop_proxy() { [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null; : >"$pidfile"; }
trap 'stop_proxy; rm -f "$pidfile"' EXIT
run_with_proxy() {
  local script=$1 proxies=$2
  bash -c '
    '"$WARREN"' proxy --socks 127.0.0.1:'"$port"' --http off 2>/dev/null &
    echo $! >'"$pidfile"'
    export PROXY_PID_EXTERNAL=$!
    sleep 0.3
    exec env PROXIES="'"$proxies"'" bash "'"$script"'"
  ' || { stop_proxy; return 1; }
  stop_proxy   # the anchor script does not know it started the proxy
}
run_with_proxy "$ANCHORS/socks_throughput.sh" "direct socks5://127.0.0.1:$port microsocks dante"
run_with_proxy "$ANCHORS/socks_connrate.sh" "socks5://127.0.0.1:$port microsocks dante"
# (c) idle connections held: RSS per connection. The proxy needs two fds per
# connection; raise the hard limit (`ulimit -Hn`) for 10,000 (this
# container's hard limit of 20,000 allowed 9,500).
( ulimit -n "$(ulimit -Hn)"; python3 bench/proxy_idle.py --warren "$WARREN" --n "${IDLE_N:-10000}" ) || true
python3 "$ANCHORS/report.py" "$RESULTS" --no-cmd
echo "results: $RESULTS"
