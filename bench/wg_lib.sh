# shellcheck shell=bash
# Shared parts of bench/wg.sh and bench/wg_more.sh. Source it; do not run it.
# Sourcing only defines functions; the caller sets REPO (the checkout) and
# BUILD_TRIES, calls wg_build, then sources the anchors' lib.sh (cleanup
# stack, start_bg/kill_tree, make_ns/make_veth, wg_start, wait_quiet, the
# foreign-CPU guard), then uses the rest:
#   wg_build                 cargo build --release --locked --bins, bounded retries
#   wg_copy_bins             warren, warren-helper (and warren-worker) copied to $LOGDIR/bin (BIN)
#   start_warren_helper NS DIR LOG   a warren-helper in netns NS ("-" = host),
#                            socket DIR/h.sock; killed by the cleanup stack
#   setup_host_warren        host helper + W (the env of every warren call)
#   warren_up NAME CONF SOCKS HTTP [ENV...] [-- EXTRA_ARGS...]
#   free_port, free_ports N, json_get, rss_line, udp_rcvbuf, tun_drops, cpu_pct
#   should_redo CFG ROUND FPCT DTICKS   the per-run foreign-CPU guard
#   own_pids PID...          worker PIDs counted as the script's own in that guard
#   run_rounds               RUNS rounds over CONFIGS, rotated, with redos,
#                            calling the script's run_one CFG ROUND

wg_build() {
  local try log=/tmp/warren-bench-wg-build.$$.log
  for ((try = 1; ; try++)); do
    if cargo build --release --locked --bins >"$log" 2>&1; then break; fi
    if (( try >= BUILD_TRIES )); then
      tail -20 "$log" >&2; rm -f "$log"
      echo "cargo build failed $try times" >&2; exit 1
    fi
    echo "cargo build failed (others mid-edit?); retry $((try + 1))/$BUILD_TRIES in 60 s" >&2
    sleep 60
  done
  rm -f "$log"
}

# Binaries copied away, so a concurrent `cargo build` cannot swap them mid-run.
# warren-worker too when the build has it: `warren up` starts the worker
# from the file of that name beside itself (else `warren instance-worker`).
wg_copy_bins() {
  local target=${CARGO_TARGET_DIR:-$REPO/target}
  BIN=$LOGDIR/bin
  mkdir -p "$BIN"
  cp "$target/release/warren" "$target/release/warren-helper" "$BIN/"
  if [[ -x $target/release/warren-worker ]]; then cp "$target/release/warren-worker" "$BIN/"; fi
  chmod 755 "$LOGDIR" "$BIN"
}

# start_warren_helper NS DIR LOGFILE: warren-helper serving DIR/h.sock in
# netns NS ("-" = this one); sets LAST_HELPER_PID. Killed by the cleanup
# stack (after everything added to it later, e.g. `warren down --all`).
start_warren_helper() {
  local ns=$1 dir=$2 logf=$3
  mkdir -p "$dir"; chmod 755 "$dir"
  if [[ $ns == - ]]; then
    "$BIN/warren-helper" serve --socket "$dir/h.sock" --group 0 --config /nonexistent 2>"$logf" &
  else
    ip netns exec "$ns" "$BIN/warren-helper" serve --socket "$dir/h.sock" --group 0 --config /nonexistent 2>"$logf" &
  fi
  LAST_HELPER_PID=$!
  add_cleanup "kill_tree $LAST_HELPER_PID"
}

# setup_host_warren: the host's helper ($LOGDIR/helper/h.sock, PID_HELPER)
# and W, the environment every `warren` call of the script runs with.
# Cleanup runs in reverse: `warren down --all` first, then the helper (whose
# shutdown removes whatever is left), then what the caller added before
# (e.g. leftovers by name).
setup_host_warren() {
  XDG=$LOGDIR/xdg HOMED=$LOGDIR/home HDIR=$LOGDIR/helper
  mkdir -p "$XDG" "$HOMED"; chmod 700 "$XDG"
  start_warren_helper - "$HDIR" "$LOGDIR/helper.log"; PID_HELPER=$LAST_HELPER_PID
  W=(env -i PATH="$PATH" XDG_RUNTIME_DIR="$XDG" HOME="$HOMED" WARREN_HELPER_SOCKET="$HDIR/h.sock" ${WARREN_WG_OFFLOAD:+WARREN_WG_OFFLOAD=$WARREN_WG_OFFLOAD}
     ${WARREN_WG_SOCKBUF:+WARREN_WG_SOCKBUF=$WARREN_WG_SOCKBUF})
  add_cleanup "timeout 20 ${W[*]} $BIN/warren --no-autostart down --all"
  wait_for "warren-helper socket" 10 test -S "$HDIR/h.sock"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# free_ports N: N distinct free ports (all held open while chosen), one line
free_ports() {
  python3 -c 'import socket,sys
ss=[socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in ss))' "$1"
}
json_get() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# warren_up NAME CONF SOCKS_PORT HTTP_PORT [ENV...] [-- ARGS...] -> prints the --json line.
# ENV: VAR=VALUE added to W; ARGS: more `warren up` options (--rootless, --forward ...).
warren_up() {
  local name=$1 conf=$2 sp=$3 hp=$4 envs=() extra=(); shift 4
  while (( $# )); do
    if [[ $1 == -- ]]; then shift; extra=("$@"); break; fi
    envs+=("$1"); shift
  done
  timeout 30 "${W[@]}" "${envs[@]}" "$BIN/warren" --no-autostart up "$name" --wg "$conf" \
    --socks-port "$sp" --http-port "$hp" "${extra[@]}" --json
}

rss_line() { # rss_line WHO PHASE PID  (appends to $RAW)
  echo "kind=rss who=$1 phase=$2 rss=$(rss_kib "$3") hwm=$(hwm_kib "$3") threads=$(awk '/^Threads:/{print $2}' "/proc/$3/status")" >>"$RAW"
}

udp_rcvbuf() { # udp_rcvbuf NETNS|-
  nsexec "$1" awk '/^Udp:/{n++; if(n==1){for(i=1;i<=NF;i++) h[i]=$i} else {for(i=1;i<=NF;i++) if(h[i]=="RcvbufErrors") print $i}}' /proc/net/snmp
}
tun_drops() { # tun_drops NETNS IF: rx_dropped + tx_dropped
  ip netns exec "$1" sh -c "cat /sys/class/net/$2/statistics/rx_dropped /sys/class/net/$2/statistics/tx_dropped" 2>/dev/null |
    awk '{s+=$1} END{print s+0}'
}
cpu_pct() { awk -v a="$1" -v b="$2" -v t="$CLK_TCK" -v e="$3" 'BEGIN{printf "%.1f", (b-a)/t/e*100}'; }

# own_pids PID... : count these processes (and their descendants) as the
# script's own in the foreign-CPU guard. `warren up` starts a worker with
# setsid and exits, so the worker is no descendant of the script, and
# lib.sh's foreign_ticks would take a busy worker for other load. Call after
# sourcing lib.sh (it replaces lib.sh's foreign_ticks).
EXTRA_MINE=()
own_pids() {
  EXTRA_MINE+=("$@")
  foreign_ticks() {
    local mine p
    mine=" $$ $(_descendants $$ | tr '\n' ' ') "
    for p in "${EXTRA_MINE[@]}"; do mine+="$p $(_descendants "$p" | tr '\n' ' ') "; done
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v mine="$mine" '
      { pid = $1; n = split($0, a, ") "); split(a[n], f, " ")
        if (index(mine, " " pid " ") == 0 && f[2] != 2 && pid != 2) s += f[12] + f[13] + f[14] + f[15] }
      END { print s + 0 }'
  }
}
ppid_of() { # ppid_of PID -> "PPID (comm)"
  local pp; pp=$(awk '{print $4}' "/proc/$1/stat" 2>/dev/null) || { echo "?"; return; }
  echo "$pp ($(cat "/proc/$pp/comm" 2>/dev/null || echo '?'))"
}

# should_redo CFG ROUND FPCT DTICKS: true when foreign processes used more
# than FOREIGN_MAX % of one core (and at least FOREIGN_MIN_TICKS) during the
# run and redos are left (LAST_TRY=0); otherwise keeps the run (tagging the
# results [machine busy] if it was disturbed).
should_redo() {
  local cfg=$1 round=$2 fpct=$3 d=$4
  awk -v f="$fpct" -v m="$FOREIGN_MAX" -v d="$d" -v mt="$FOREIGN_MIN_TICKS" 'BEGIN{exit !(f > m && d >= mt)}' || return 1
  if (( _retries_left > 0 && ! LAST_TRY )); then
    _retries_left=$((_retries_left - 1))
    log "$cfg round $round disturbed by other processes (${fpct}% of one core); redoing it ($_retries_left redos left)"
    return 0
  fi
  log "WARNING: $cfg round $round disturbed (${fpct}% of one core), no redos left; keeping it"; QUIET_WARN=1
  return 1
}

# run_rounds: RUNS rounds; in each, every configuration of CONFIGS once
# (order rotated per round), each redone after wait_quiet when run_one
# returns 2 (disturbed) or again when it returns 1 (failed), at most 3 tries.
# run_one CFG ROUND is the script's; SKIP_CFG (associative, optional) lists
# configurations given up on.
LAST_TRY=0
declare -gA SKIP_CFG=()
run_rounds() {
  local n=${#CONFIGS[@]} r k cfg try rc
  for ((r = 1; r <= RUNS; r++)); do
    wait_quiet
    for ((k = 0; k < n; k++)); do
      cfg=${CONFIGS[$(( (k + r - 1) % n ))]}
      [[ -n ${SKIP_CFG[$cfg]:-} ]] && continue
      for try in 1 2 3; do   # redo a disturbed or failed run (bounded by RETRIES and the failure limit)
        LAST_TRY=$(( try == 3 ))
        rc=0; run_one "$cfg" "$r" || rc=$?
        [[ $rc == 0 ]] && break
        [[ -n ${SKIP_CFG[$cfg]:-} ]] && break
        [[ $rc == 2 ]] && wait_quiet
      done
    done
  done
}
