#!/usr/bin/env bash
# WireGuard engine: a warren namespace instance (boringtun worker, UDP socket
# in the host namespace) against wireguard-go on both ends and against the
# raw veth, side by side in one run, with the shared anchor scripts' helpers
# (../shared/bench-anchors/lib.sh) and their ns_setup_latency.sh. Needs root.
#   RUNS=5 DURATION=5 RUNS_UP=20 bench/wg.sh
#
# Topology (S = $SLOT, default 61; names start with $BENCH_PREFIX, default wrb):
#   host netns  wrbh0 198.18.S.1/30 --veth-- wrbx0 198.18.S.2/30  netns wrb-x (exit)
#   netns wrb-c wrbc1 198.18.S.6/30 --veth-- wrbx1 198.18.S.5/30  netns wrb-x
#   exit:   wireguard-go wrbwx 198.19.S.1/24, port 51820, iperf3 -s (all addresses)
#   warren: instances A (GSO on, 198.19.S.2), B (WARREN_WG_GSO=0, 198.19.S.4),
#           U (198.19.S.6, up/down latency), each also fd00:19:S::N/128;
#           endpoint 198.18.S.2:51820
#   client: wireguard-go wrbwc 198.19.S.3/24 in wrb-c; endpoint 198.18.S.5:51820
#   raw veth: iperf3 from wrb-c to 198.18.S.5 (no tunnel, veth MTU 1500)
# 1. iperf3 TCP: P1 and P4 for warren, warren-nogso, wireguard-go pair, veth;
#    -R for warren and the pair. Configurations interleaved within each round
#    (order rotated per round); per run: Gbit/s, retransmits, CPU of the
#    worker / each wireguard-go (utime+stime over the run, % of one core),
#    whole-machine busy, CPU of foreign processes, UDP RcvbufErrors in the
#    host / exit / client netns, TUN drops. A run during which foreign
#    processes used more than FOREIGN_MAX % of one core is redone after
#    wait_quiet, at most twice per run and RETRIES times in all; a third
#    try is kept and the results are tagged [machine busy] (lib.sh's guard).
# 2. `warren up` (up_ms, handshake_ms, wall) and `warren down` (wall) RUNS_UP
#    times, then the anchor ns_setup_latency.sh (wireguard-go, MODE=movetun,
#    ANCHOR_RUNS times) in the same run.
# 3. Worker VmRSS 2 s after up and after the throughput runs, VmHWM; the same
#    for the client wireguard-go.
# Parameters: RUNS=5 DURATION=5 RUNS_UP=20 ANCHOR_RUNS=5 SLOT=61 WARMUP=1
#   QUIET_WAIT=20 (s, per wait) FOREIGN_MAX=5 RETRIES=6 PROFILE=0|perf|strace|perf,strace
#   (profile the worker during an extra warren P1 run each), KEEP_LOGS=1, RESULTS.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ANCHORS=$(cd "${ANCHORS:-../shared/bench-anchors}" && pwd)
RUNS=${RUNS:-5} DURATION=${DURATION:-5} RUNS_UP=${RUNS_UP:-20} ANCHOR_RUNS=${ANCHOR_RUNS:-5}
SLOT=${SLOT:-61} WARMUP=${WARMUP:-1} PROFILE=${PROFILE:-0} BUILD_TRIES=${BUILD_TRIES:-5}
export QUIET_WAIT=${QUIET_WAIT:-20} QUIET_SECS=${QUIET_SECS:-2} RETRIES=${RETRIES:-6}
export BENCH_PREFIX=${BENCH_PREFIX:-wrb}
export RESULTS=${RESULTS:-$(mktemp /tmp/warren-bench-wg.XXXXXX.tsv)}
(( SLOT >= 4 && SLOT <= 99 )) || { echo "SLOT must be 4..99 (anchors use 0-3, tests 100-249)" >&2; exit 2; }
CMDLINE="RUNS=$RUNS DURATION=$DURATION RUNS_UP=$RUNS_UP ANCHOR_RUNS=$ANCHOR_RUNS$([[ $PROFILE == 0 ]] || echo " PROFILE=$PROFILE") bench/wg.sh"

# ---------------------------------------------------------------- build (bounded retries)
# shellcheck source=wg_lib.sh
source "$REPO/bench/wg_lib.sh"   # build, helper, warren_up, counters, round loop (shared with wg_more.sh)
wg_build

# shellcheck source=../../shared/bench-anchors/lib.sh
source "$ANCHORS/lib.sh"   # cleanup stack, start_bg/kill_tree, make_ns/veth, wg_start, guards
need iperf3 ip wg wireguard-go ping python3 awk   # ping: apt-get install iputils-ping
REPORT="python3 $REPO/bench/wg_report.py"
P=$BENCH_PREFIX
NX=$P-x NC=$P-c
IFX=${P}wx IFC=${P}wc
NET=198.18.$SLOT TUN=198.19.$SLOT TUN6=fd00:19:$SLOT:
EXIT_IP=$TUN.1 VETH_IP=$NET.5
assert_safe_addr "$NET.1" "$NET.2" "$NET.5" "$NET.6" "$TUN.1" "$TUN.6" "${TUN6}:1"
if ip -4 -o addr show | grep -q " $NET\.\| $TUN\."; then
  die "198.18.$SLOT.0/24 or 198.19.$SLOT.0/24 already in use in the host netns; choose another SLOT"
fi
RAW=${RESULTS%.tsv}.raw
: >"$RAW"
log "raw per-run values: $RAW; results TSV: $RESULTS; logs: $LOGDIR"

wg_copy_bins   # BIN=$LOGDIR/bin: copies, so a concurrent `cargo build` cannot swap them mid-run

# ---------------------------------------------------------------- topology + exit
make_ns "$NX"; make_ns "$NC"
make_veth - "${P}h0" "$NET.1/30" "$NX" "${P}x0" "$NET.2/30"
make_veth "$NC" "${P}c1" "$NET.6/30" "$NX" "${P}x1" "$NET.5/30"

umask 077
for k in x c a b u; do wg genkey >"$LOGDIR/key-$k"; wg pubkey <"$LOGDIR/key-$k" >"$LOGDIR/pub-$k"; done
pub() { cat "$LOGDIR/pub-$1"; }

wg_start "$NX" wireguard-go "$IFX"; PID_X=$LAST_PID
ip netns exec "$NX" wg set "$IFX" private-key "$LOGDIR/key-x" listen-port 51820 \
  peer "$(pub a)" allowed-ips "$TUN.2/32,$TUN6:2/128" \
  peer "$(pub b)" allowed-ips "$TUN.4/32,$TUN6:4/128" \
  peer "$(pub u)" allowed-ips "$TUN.6/32,$TUN6:6/128" \
  peer "$(pub c)" allowed-ips "$TUN.3/32"
ip -n "$NX" addr add "$TUN.1/24" dev "$IFX"
ip -n "$NX" -6 addr add "$TUN6:1/64" dev "$IFX" nodad
ip -n "$NX" link set "$IFX" mtu 1420 up

wg_start "$NC" wireguard-go "$IFC"; PID_C=$LAST_PID
ip netns exec "$NC" wg set "$IFC" private-key "$LOGDIR/key-c" listen-port 51821 \
  peer "$(pub x)" allowed-ips "$TUN.0/24" endpoint "$NET.5:51820"
ip -n "$NC" addr add "$TUN.3/24" dev "$IFC"
ip -n "$NC" link set "$IFC" mtu 1420 up
ok=0
for _ in $(seq 20); do ip netns exec "$NC" ping -4 -c 1 -W 1 "$EXIT_IP" >/dev/null 2>&1 && { ok=1; break; }; done
[[ $ok == 1 ]] || die "wireguard-go client -> exit does not pass traffic"

start_bg iperf-srv ip netns exec "$NX" iperf3 -s -p 5201; PID_IPERF=$LAST_PID
wait_for "iperf3 server" 10 tcp_listening "$NX" 5201

# ---------------------------------------------------------------- helper + warren
# Cleanup runs in reverse: `warren down --all` first, then the helper
# (whose shutdown removes whatever is left), then leftovers by name.
I_A=${P}$$a I_B=${P}$$b I_U=${P}$$u
for i in $I_A $I_B $I_U; do add_cleanup "ip netns del warren-$i; rm -rf /etc/netns/warren-$i"; done
setup_host_warren   # helper on $LOGDIR/helper/h.sock (PID_HELPER), W = env of every warren call
# Each instance also gets an IPv6 address: with IPv4 only, the helper turns
# IPv6 off in the namespace and then fails to add the ::/0 route (EACCES).
write_conf() { # write_conf KEY N FILE
  cat >"$3" <<EOF
[Interface]
PrivateKey = $(cat "$LOGDIR/key-$1")
Address = $TUN.$2/32, $TUN6:$2/128
DNS = $EXIT_IP
MTU = 1420

[Peer]
PublicKey = $(pub x)
Endpoint = $NET.2:51820
AllowedIPs = 0.0.0.0/0, ::/0
EOF
}
write_conf a 2 "$LOGDIR/a.conf"
write_conf b 4 "$LOGDIR/b.conf"
write_conf u 6 "$LOGDIR/u.conf"
UP_A=$(warren_up "$I_A" "$LOGDIR/a.conf" "$(free_port)" "$(free_port)") || die "warren up $I_A failed (see $XDG/warren/)"
UP_B=$(warren_up "$I_B" "$LOGDIR/b.conf" "$(free_port)" "$(free_port)" WARREN_WG_GSO=0) || die "warren up $I_B failed"
PID_A=$(json_get "$UP_A" worker_pid); PID_B=$(json_get "$UP_B" worker_pid)
log "warren $I_A (GSO) worker $PID_A: $UP_A"
log "warren $I_B (no GSO) worker $PID_B: $UP_B"
LOG_A=$XDG/warren/instance-$I_A.log LOG_B=$XDG/warren/instance-$I_B.log

# ---------------------------------------------------------------- 3a. idle RSS
sleep 2
rss_line warren-gso idle "$PID_A"; rss_line warren-nogso idle "$PID_B"
rss_line wggo-client idle "$PID_C"; rss_line wggo-exit idle "$PID_X"

# ---------------------------------------------------------------- 1. throughput
counters() {
  echo "$(udp_rcvbuf -) $(udp_rcvbuf "$NX") $(udp_rcvbuf "$NC") $(tun_drops "warren-$I_A" wr0)" \
       "$(tun_drops "warren-$I_B" wr0) $(tun_drops "$NX" "$IFX") $(tun_drops "$NC" "$IFC")"
}
iperf_cmd() { # iperf_cmd CFG -> sets CMD (array) and WPID (worker pid or 0)
  local cfg=$1 flags
  case $cfg in *-P4) flags="-P 4" ;; *-R) flags="-P 1 -R" ;; *) flags="-P 1" ;; esac
  # shellcheck disable=SC2206
  case $cfg in
    warren-nogso-*) CMD=("${W[@]}" "$BIN/warren" --no-autostart exec "$I_B" -- iperf3 -c "$EXIT_IP" -t "$DURATION" $flags -J); WPID=$PID_B ;;
    warren-*) CMD=("${W[@]}" "$BIN/warren" --no-autostart exec "$I_A" -- iperf3 -c "$EXIT_IP" -t "$DURATION" $flags -J); WPID=$PID_A ;;
    wggo-*)   CMD=(ip netns exec "$NC" iperf3 -c "$EXIT_IP" -t "$DURATION" $flags -J); WPID=0 ;;
    veth-*)   CMD=(ip netns exec "$NC" iperf3 -c "$VETH_IP" -t "$DURATION" $flags -J); WPID=0 ;;
  esac
}
CONFIGS=(warren-P1 wggo-P1 veth-P1 warren-nogso-P1 warren-P4 wggo-P4 veth-P4 warren-nogso-P4 warren-R wggo-R)
FAILS=0
restart_iperf_server() {
  stop_bg "$PID_IPERF"
  start_bg iperf-srv ip netns exec "$NX" iperf3 -s -p 5201; PID_IPERF=$LAST_PID
  wait_for "iperf3 server" 10 tcp_listening "$NX" 5201
}
# run_one CFG ROUND [TIME]: one measured iperf3 run; appends a raw line unless ROUND=warmup.
run_one() {
  local cfg=$1 round=$2 t=${3:-$DURATION} j c0 c1 wa wb xa xb ca cb sa sb f0 f1 t0 t1 el busy fpct
  local save=$DURATION; DURATION=$t; iperf_cmd "$cfg"; DURATION=$save
  j=$LOGDIR/iperf-$cfg-$round.json
  read -r -a c0 <<<"$(counters)"
  read -r sb st <<<"$(sys_ticks)"
  f0=$(foreign_ticks)
  wa=$(pid_cpu_ticks "$WPID"); xa=$(pid_cpu_ticks "$PID_X"); ca=$(pid_cpu_ticks "$PID_C"); t0=$EPOCHREALTIME
  if ! timeout $((t + 30)) "${CMD[@]}" >"$j" 2>"$j.err"; then
    FAILS=$((FAILS + 1)); log "iperf3 $cfg round $round FAILED ($FAILS): $(head -c 300 "$j.err") $(grep -o '"error":.*' "$j" | head -c 200)"
    (( FAILS <= 3 )) || die "too many iperf3 failures"
    restart_iperf_server; return 1
  fi
  t1=$EPOCHREALTIME; wb=$(pid_cpu_ticks "$WPID"); xb=$(pid_cpu_ticks "$PID_X"); cb=$(pid_cpu_ticks "$PID_C")
  f1=$(foreign_ticks)
  read -r sb2 st2 <<<"$(sys_ticks)"
  read -r -a c1 <<<"$(counters)"
  [[ $round == warmup ]] && return 0
  el=$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')
  busy=$(awk -v a="$sb" -v b="$sb2" -v c="$st" -v d="$st2" -v n="$(nproc)" 'BEGIN{printf "%.1f", (b-a)/((d-c)>0?(d-c):1)*100*n}')
  fpct=$(cpu_pct "$f0" "$f1" "$el")
  if should_redo "$cfg" "$round" "$fpct" $((f1 - f0)); then return 2; fi
  read -r gbps retr icpu scpu <<<"$($REPORT iperf "$j")"
  echo "kind=tput cfg=$cfg round=$round gbps=$gbps retr=$retr iperf_client_cpu=$icpu iperf_server_cpu=$scpu" \
       "worker_cpu=$( ((WPID)) && cpu_pct "$wa" "$wb" "$el" || echo NA)" \
       "exit_cpu=$(cpu_pct "$xa" "$xb" "$el") client_wggo_cpu=$(cpu_pct "$ca" "$cb" "$el")" \
       "machine_busy=$busy foreign_cpu=$fpct" \
       "rcvbuf_host=$((c1[0] - c0[0])) rcvbuf_exit=$((c1[1] - c0[1])) rcvbuf_client=$((c1[2] - c0[2]))" \
       "tundrop_inst=$((c1[3] - c0[3] + c1[4] - c0[4])) tundrop_exit=$((c1[5] - c0[5])) tundrop_client=$((c1[6] - c0[6]))" >>"$RAW"
  log "$cfg round $round: $gbps Gbit/s, worker $(tail -1 "$RAW" | grep -o 'worker_cpu=[^ ]*'), $(tail -1 "$RAW" | grep -o 'exit_cpu=[^ ]*'), $(tail -1 "$RAW" | grep -o 'client_wggo_cpu=[^ ]*'), busy ${busy}%, foreign ${fpct}%"
}
if [[ $WARMUP == 1 ]]; then
  for cfg in warren-P1 warren-nogso-P1 wggo-P1 veth-P1; do run_one "$cfg" warmup 1 || true; done
fi
run_rounds   # RUNS rounds over CONFIGS, rotated, disturbed runs redone (wg_lib.sh)

# ---------------------------------------------------------------- 3b. RSS after load
rss_line warren-gso loaded "$PID_A"; rss_line warren-nogso loaded "$PID_B"
rss_line wggo-client loaded "$PID_C"; rss_line wggo-exit loaded "$PID_X"

# Optional profiles of the worker, each during one extra (unrecorded) warren P1 run.
for prof in ${PROFILE//,/ }; do
  [[ $prof == 0 ]] && continue
  iperf_cmd warren-P1
  case $prof in
    perf) need perf
          perf record -g -F 999 -o "$LOGDIR/perf.data" -p "$PID_A" -- sleep "$DURATION" >"$LOGDIR/perf-record.log" 2>&1 & prof_pid=$! ;;
    strace) need strace
          timeout "$DURATION" strace -c -f -p "$PID_A" -o "$LOGDIR/strace.txt" 2>/dev/null & prof_pid=$! ;;
    *) die "PROFILE: perf, strace or 0" ;;
  esac
  sleep 0.3
  timeout $((DURATION + 30)) "${CMD[@]}" >"$LOGDIR/iperf-$prof.json" 2>&1 || true
  wait "$prof_pid" || true
  echo "---- worker profile ($prof) during one extra warren P1 run: $($REPORT iperf "$LOGDIR/iperf-$prof.json" 2>/dev/null | cut -d' ' -f1) Gbit/s ----"
  (
    set +o pipefail
    if [[ $prof == perf ]]; then
      echo "-- by object --"
      perf report -i "$LOGDIR/perf.data" --stdio --no-children -g none --sort dso --percent-limit 0.5 2>/dev/null | grep '%' | head -8
      echo "-- by symbol (self) --"
      perf report -i "$LOGDIR/perf.data" --stdio --no-children -g none --sort dso,sym --percent-limit 0.6 2>/dev/null | grep '%' | head -35
      echo "-- by system call entry (callers of the kernel time) --"
      perf report -i "$LOGDIR/perf.data" --stdio --children -g none --sort sym 2>/dev/null |
        grep -E '\] (__x64_sys_|__sys_|do_syscall_64|tun_chr|udp_sendmsg|udp_recvmsg|__do_sys|__x64_sys)' | head -15
    else
      head -25 "$LOGDIR/strace.txt"
    fi
  ) || true
done

# Worker logs: GSO fallbacks, warnings, errors.
for f in "$LOG_A" "$LOG_B"; do
  echo "kind=log file=$(basename "$f") lines=$(wc -l <"$f") warn=$(grep -ci 'warn' "$f" || true) error=$(grep -ci 'error' "$f" || true) gso=$(grep -ci 'gso' "$f" || true)" >>"$RAW"
  grep -iE 'warn|error|gso' "$f" | head -5 | sed "s/^/  $(basename "$f"): /" >&2 || true
done
timeout 20 "${W[@]}" "$BIN/warren" --no-autostart status --json >"$LOGDIR/status.json" 2>&1 || true
timeout 20 "${W[@]}" "$BIN/warren" --no-autostart down "$I_A" >/dev/null
timeout 20 "${W[@]}" "$BIN/warren" --no-autostart down "$I_B" >/dev/null

# ---------------------------------------------------------------- 2. up / down latency
ms_between() { local a=${1/./} b=${2/./}; awk -v d=$(( 10#$b - 10#$a )) 'BEGIN{printf "%.3f", d/1000}'; }
U_SOCKS=$(free_port) U_HTTP=$(free_port)
for ((r = 1; r <= RUNS_UP; r++)); do
  t0=$EPOCHREALTIME
  out=$(warren_up "$I_U" "$LOGDIR/u.conf" "$U_SOCKS" "$U_HTTP") || die "warren up $I_U failed (run $r)"
  # down is timed as a user runs it: one process, no timeout/env wrappers
  # (each of those is another exec inside the timed span).
  t1=$EPOCHREALTIME
  XDG_RUNTIME_DIR=$XDG HOME=$HOMED WARREN_HELPER_SOCKET=$HDIR/h.sock \
    "$BIN/warren" --no-autostart down "$I_U" >/dev/null || die "warren down $I_U failed (run $r)"
  t2=$EPOCHREALTIME
  read -r up_ms hs_ms <<<"$(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(j["up_ms"], j["handshake_ms"])' "$out")"
  echo "kind=up round=$r up_ms=$up_ms handshake_ms=$hs_ms up_wall_ms=$(ms_between "$t0" "$t1") down_wall_ms=$(ms_between "$t1" "$t2")" >>"$RAW"
  log "up/down $r: $(tail -1 "$RAW")"
  sleep 0.2
done

log "anchor ns_setup_latency.sh (wireguard-go, movetun, RUNS=$ANCHOR_RUNS)"
BENCH_PREFIX=${P}n RUNS=$ANCHOR_RUNS IMPL=wireguard-go MODE=movetun LOGDIR="$LOGDIR/anchor-ns" \
  QUIET_WAIT=$QUIET_WAIT QUIET_SECS=1 bash "$ANCHORS/ns_setup_latency.sh" >"$LOGDIR/anchor-ns.out" 2>&1 ||
  { cat "$LOGDIR/anchor-ns.out" >&2; die "anchor ns_setup_latency.sh failed"; }

# ---------------------------------------------------------------- report
[[ $QUIET_WARN == 1 ]] && echo "kind=note machine_busy=1" >>"$RAW"
$REPORT report "$RAW" "$RESULTS" --cmd "$CMDLINE" --duration "$DURATION" --fails "$FAILS" --foreign-max "$FOREIGN_MAX"
log "raw per-run values kept in $RAW; anchor-format TSV in $RESULTS"
