#!/usr/bin/env bash
# More WireGuard comparisons in one run, side by side and interleaved per
# round (shares bench/wg_lib.sh with bench/wg.sh and the anchors' lib.sh):
#   1. warren on both ends: a helper-backed warren instance whose exit is
#      `warren server --mode wg`, vs the wireguard-go pair (same topology);
#   2. a wireguard-go client using the warren exit, vs the pair;
#   3. a rootless instance (`warren up --rootless`) vs the helper-backed one,
#      both against the warren exit;
#   4. a TCP forward (`warren up --forward tcp:127.0.0.1:P=TARGET`) vs onetun
#      against the warren exit, with RSS under load;
#   5. a rootless instance on the userspace TCP/IP stack (`--rootless --stack
#      userspace`, measured through its --forward) vs onetun, the
#      helper-backed --forward and the kernel-stack rootless instance;
#   plus the raw path without a tunnel (veth, routed through the exit netns).
# Needs root, iperf3, wireguard-go, wg, nft, ping; onetun from
# `cargo install --root /tmp/anchors onetun` (skipped when missing).
#   RUNS=5 DURATION=5 bench/wg_more.sh
#
# Topology (S = $SLOT, default 62; names start with $BENCH_PREFIX, default wrm):
#   host  wrmh0 198.18.S.1/30  --veth--  wrms0 198.18.S.2/30   netns wrm-s (exit host)
#   wrm-c wrmc0 198.18.S.6/30  --veth--  wrms2 198.18.S.5/30   netns wrm-s
#   wrm-d wrmd0 198.18.S.14/30 --veth--  wrms3 198.18.S.13/30  netns wrm-s
#   wrm-s wrms1 198.18.S.9/30  --veth--  wrmi0 198.18.S.10/30 (+198.18.S.17/32)  netns wrm-i
#   wrm-s: default route via 198.18.S.10 (the "internet" wrm-i, iperf3 -s there),
#          its own warren-helper; warren exit `warren server --mode wg`
#          (TUN wrswrmS, 198.19.S.1/25, UDP 51820, masquerade by the helper);
#          wireguard-go exit wrmwx 198.19.S.129/25, UDP 51821 (masquerade:
#          nft table inet wrm_bench in wrm-s).
#   host: helper; instances A (helper-backed), R (--rootless), F (helper-backed,
#         --forward tcp:127.0.0.1:PF=198.18.S.10:5201), U (--rootless --stack
#         userspace --forward tcp:127.0.0.1:PU=198.18.S.10:5201), onetun on
#         127.0.0.1:PO -> 198.18.S.10:5201; all peers of the warren exit,
#         endpoint 198.18.S.2:51820.
#   wrm-c: wireguard-go wrmwc 198.19.S.130 -> wireguard-go exit (the pair);
#          raw path: iperf3 to 198.18.S.17 routed through wrm-s, no tunnel.
#   wrm-d: wireguard-go wrmwd -> the warren exit (endpoint 198.18.S.13:51820).
# iperf3 -c 198.18.S.10 (TCP, DURATION s, -P 1 and -P 4) from inside the
# instance (`warren exec`), from wrm-c / wrm-d, or to the forwarded port.
# Per run: Gbit/s, retransmits, CPU of every WireGuard process (% of one
# core), whole-machine busy, foreign CPU, UDP RcvbufErrors per netns (host,
# wrm-s, wrm-c, wrm-d), TUN drops, peak VmRSS of the client-side process and
# the exit during the run (sampled every 0.25 s). A run during which other
# processes used more than FOREIGN_MAX % of one core is redone after
# wait_quiet (RETRIES in all; the worker processes count as ours).
# Parameters: RUNS=5 DURATION=5 SLOT=62 P4=1 WARMUP=1 QUIET_WAIT=20 FOREIGN_MAX=5
#   RETRIES=8 ONLY_CONFIGS="both-P1 pair-P1 ..." (subset) ONETUN=path
#   ONETUN_RSS_MAX_MIB=6144 (no more onetun runs once it holds more) KEEP_LOGS=1
#   RESULTS=file.tsv; REPORT_ONLY=file.raw prints the tables of an earlier run.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ANCHORS=$(cd "${ANCHORS:-../shared/bench-anchors}" && pwd)
RUNS=${RUNS:-5} DURATION=${DURATION:-5} SLOT=${SLOT:-62} WARMUP=${WARMUP:-1} P4=${P4:-1}
BUILD_TRIES=${BUILD_TRIES:-5} ONETUN_RSS_MAX_MIB=${ONETUN_RSS_MAX_MIB:-6144}
export QUIET_WAIT=${QUIET_WAIT:-20} QUIET_SECS=${QUIET_SECS:-2} RETRIES=${RETRIES:-8}
export BENCH_PREFIX=${BENCH_PREFIX:-wrm}
[[ -n ${REPORT_ONLY:-} ]] || export RESULTS=${RESULTS:-$(mktemp /tmp/warren-bench-wgmore.XXXXXX.tsv)}
(( SLOT >= 4 && SLOT <= 99 )) || { echo "SLOT must be 4..99 (anchors use 0-3, tests 100-249)" >&2; exit 2; }
(( ${#BENCH_PREFIX} <= 4 )) || { echo "BENCH_PREFIX: at most 4 characters here" >&2; exit 2; }
CMDLINE="RUNS=$RUNS DURATION=$DURATION$([[ $P4 == 1 ]] || echo " P4=$P4") bench/wg_more.sh"

# report RAW RESULTS FAILS ONETUN_VERSION: the Markdown tables from the raw
# per-run lines; appends the anchor-format TSV lines to RESULTS.
report() {
python3 - "$1" "$2" "$CMDLINE" "$DURATION" "$3" "${FOREIGN_MAX:-5}" "$4" <<'PY'
import datetime, socket, statistics, sys

raw, results, cmd, duration, fails, foreign_max, onetun_ver = sys.argv[1:8]
foreign_max = float(foreign_max)
rows = []
for line in open(raw):
    kv = dict(f.split("=", 1) for f in line.split() if "=" in f)
    if kv:
        rows.append(kv)
tput = [r for r in rows if r.get("kind") == "tput"]
rss = {(r["who"], r["phase"]): r for r in rows if r.get("kind") == "rss"}
notes = [r for r in rows if r.get("kind") == "note"]
for r in rows:   # the run's own figures win (REPORT_ONLY)
    if r.get("kind") == "meta":
        duration, fails = r.get("duration", duration), r.get("fails", fails)
        onetun_ver = "onetun " + r["onetun"] if r.get("onetun", "none") != "none" else onetun_ver
busy_note = any("machine_busy" in r for r in notes)
capped = any("onetun_capped" in r for r in notes)
cfgs = []
for r in tput:
    if r["cfg"] not in cfgs:
        cfgs.append(r["cfg"])
PROC = {"wx": "warren exit (`warren server --mode wg`)", "xg": "wireguard-go exit",
        "c1": "wireguard-go client (pair)", "c2": "wireguard-go client → warren exit",
        "a": "warren worker, helper-backed", "r": "warren worker, rootless",
        "f": "warren worker, --forward", "o": onetun_ver,
        "u": "warren worker, rootless userspace stack (--forward)"}
LABEL = {"both": "warren instance → warren exit", "pair": "wireguard-go → wireguard-go",
         "wggo2w": "wireguard-go → warren exit", "rootless": "rootless warren instance → warren exit",
         "fwd": "warren --forward → warren exit", "onetun": "onetun → warren exit",
         "user": "rootless userspace-stack --forward → warren exit",
         "userdown": "same, reverse direction (iperf3 -R: exit → host)",
         "fwddown": "warren --forward, reverse direction (iperf3 -R)",
         "veth": "raw veth, routed through the exit netns (no tunnel)"}

def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

def vals(rs, cfg, key):
    return [x for x in (num(r.get(key)) for r in rs if r["cfg"] == cfg) if x is not None]

med = lambda v: statistics.median(v) if v else None

def fmt(x, nd=2):
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) < 0.1 and x != 0:
        return f"{x:.3f}"
    return f"{x:.{nd}f}"

def cell(v, nd=2):
    if not v:
        return "—"
    return f"{fmt(med(v), nd)} ({fmt(min(v), nd)}–{fmt(max(v), nd)})" if len(v) > 1 else fmt(v[0], nd)

def ratio(a, b, nd=2):
    return "—" if a is None or not b else f"{a / b:.{nd}f}×"

def paired(rs, a, b):
    """Median over rounds of the per-round ratio a/b (drift cancels)."""
    by = lambda c: {r["round"]: num(r["gbps"]) for r in rs if r["cfg"] == c}
    x, y = by(a), by(b)
    q = [x[k] / y[k] for k in x if k in y and x[k] is not None and y[k]]
    return f"{med(q):.3f}×" if q else "—"

def proc_cpu(cfg, which):
    r0 = next((r for r in tput if r["cfg"] == cfg), None)
    if not r0 or r0.get(which, "-") == "-":
        return []
    return vals(tput, cfg, "cpu_" + r0[which])

COMPARE = [
    ("1. warren on both ends vs wireguard-go pair, 1 stream", "both-P1", "pair-P1", 2.5),
    ("1. warren on both ends vs wireguard-go pair, -P 4", "both-P4", "pair-P4", 2.5),
    ("2. wireguard-go client → warren exit vs pair, 1 stream", "wggo2w-P1", "pair-P1", 1.0),
    ("2. wireguard-go client → warren exit vs pair, -P 4", "wggo2w-P4", "pair-P4", 1.0),
    ("3. rootless vs helper-backed instance (warren exit), 1 stream", "rootless-P1", "both-P1", 0.9),
    ("3. rootless vs helper-backed instance (warren exit), -P 4", "rootless-P4", "both-P4", 0.9),
    ("4. warren --forward vs onetun (warren exit), 1 stream", "fwd-P1", "onetun-P1", None),
    ("4. warren --forward, -P 4 vs 1 stream", "fwd-P4", "fwd-P1", None),
    ("5. userspace stack (--forward) vs onetun, 1 stream", "user-P1", "onetun-P1", 10.0),
    ("5. userspace stack vs helper-backed --forward, 1 stream", "user-P1", "fwd-P1", None),
    ("5. userspace stack vs kernel-stack rootless, 1 stream", "user-P1", "rootless-P1", None),
    ("5. userspace stack, -P 4 vs 1 stream", "user-P4", "user-P1", None),
    ("5. userspace stack vs helper-backed --forward, reverse direction", "userdown-P1", "fwddown-P1", None),
    ("warren on both ends vs raw veth path, 1 stream", "both-P1", "veth-P1", None),
]

def summary(rs, title):
    print(f"\n### {title}\n")
    print("| comparison | measured, Gbit/s | baseline, Gbit/s | ratio of medians | median per-round ratio | target |")
    print("|---|---|---|---|---|---|")
    for label, a, b, tgt in COMPARE:
        va, vb = vals(rs, a, "gbps"), vals(rs, b, "gbps")
        if not va and not vb:
            continue
        rt = ratio(med(va), med(vb), 3)
        t = "—"
        if tgt is not None and va and vb:
            t = f"≥ {tgt:.2f}×: " + ("**met**" if med(va) / med(vb) >= tgt else "**not met**")
        print(f"| {label} | {cell(va)} (n={len(va)}) | {cell(vb)} (n={len(vb)}) | {rt} | {paired(rs, a, b)} | {t} |")

summary(tput, "Summary (medians, min–max in brackets; all runs)")
quiet = [r for r in tput if (num(r.get("foreign_cpu")) or 0) <= foreign_max]
if len(quiet) < len(tput):
    summary(quiet, f"Undisturbed runs only (other processes ≤ {foreign_max:g} % of one core during the run; "
            f"{len(quiet)} of {len(tput)} runs)")
else:
    print(f"\nAll {len(tput)} runs undisturbed (other processes ≤ {foreign_max:g} % of one core during each run).")

print("\n### Per configuration (medians, min–max; CPU in % of one core; drops per run)\n")
print("| configuration | Gbit/s | retransmits | client-side WG process CPU | exit CPU | iperf3 client / server CPU "
      "| machine busy (200 = both cores) | UDP RcvbufErrors host / exit ns / pair-client ns / wggo→warren ns "
      "| TUN drops client side / exit side | peak RSS during run, client side / exit |")
print("|---|---|---|---|---|---|---|---|---|---|")
TUNKEY = {"a": "tundrop_a", "r": "tundrop_r", "f": "tundrop_f", "c1": "tundrop_c1", "c2": "tundrop_c2",
          "wx": "tundrop_wx", "xg": "tundrop_xg"}
for c in cfgs:
    r0 = next(r for r in tput if r["cfg"] == c)
    cl, ex = r0.get("client", "-"), r0.get("exit", "-")
    g = lambda k: vals(tput, c, k)
    name = f"{c}: {LABEL.get(c.split('-')[0], c)}" + (f" [{PROC.get(cl, cl)}]" if cl != "-" else "")
    rcv = " / ".join(fmt(med(g(k)), 0) for k in ("rcvbuf_host", "rcvbuf_s", "rcvbuf_c", "rcvbuf_d"))
    td = " / ".join(fmt(med(g(TUNKEY[p])), 0) if p in TUNKEY else "—" for p in (cl, ex))
    rp = " / ".join(f"{med(g(k)) / 1024:.1f} MiB" if g(k) else "—" for k in ("client_rss_peak", "exit_rss_peak"))
    print(f"| {name} | {cell(g('gbps'))} | {fmt(med(g('retr')), 0)} | {cell(proc_cpu(c, 'client'), 0)} "
          f"| {cell(proc_cpu(c, 'exit'), 0)} | {fmt(med(g('iperf_client_cpu')), 0)} / {fmt(med(g('iperf_server_cpu')), 0)} "
          f"| {cell(g('machine_busy'), 0)} | {rcv} | {td} | {rp} |")

print("\n### Memory of each WireGuard process\n")
print("| process | VmRSS idle (2 s after up) | VmRSS after the runs | VmHWM (peak) | threads |")
print("|---|---|---|---|---|")
mib = lambda r, k: f"{float(r[k]) / 1024:.1f} MiB" if r else "—"
for p in ("a", "r", "f", "u", "o", "wx", "c2", "c1", "xg"):
    i, l = rss.get((p, "idle")), rss.get((p, "loaded")) or rss.get((p, "capped"))
    if not i and not l:
        continue
    print(f"| {PROC[p]} | {mib(i, 'rss')} | {mib(l, 'rss')} | {mib(l, 'hwm')} | {(l or i)['threads']} |")
if capped:
    print(f"\nonetun exceeded the RSS limit and was stopped; its figures are from then.")

print("\n### Per-run values (round order; gbps, client / exit CPU, foreign CPU)\n")
print("| configuration | Gbit/s | client CPU | exit CPU | foreign CPU | RcvbufErrors exit ns |")
print("|---|---|---|---|---|---|")
for c in cfgs:
    f = lambda k, nd=0: " ".join(f"{x:.{nd}f}" for x in vals(tput, c, k)) or "NA"
    print(f"| {c} | {f('gbps', 3)} | {' '.join(f'{x:.0f}' for x in proc_cpu(c, 'client')) or 'NA'} "
          f"| {' '.join(f'{x:.0f}' for x in proc_cpu(c, 'exit')) or 'NA'} | {f('foreign_cpu', 1)} | {f('rcvbuf_s')} |")
for r in rows:
    if r.get("kind") == "log":
        print(f"log {r['file']}: {r['lines']} lines, {r['warn']} mentioning warn, {r['error']} mentioning error")
n = len(vals(tput, "both-P1", "gbps"))
print(f"\nRuns: {n} per configuration, {duration} s each, configurations interleaved per round (order rotated); "
      f"iperf3 failures: {fails}." + (" Some runs tagged [machine busy]." if busy_note else ""))
print(f"\nCommand (as root): `{cmd}`")

now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
host = socket.gethostname()
units = {"gbps": "Gbit/s", "retr": "count", "machine_busy": "% of one core", "client_rss_peak": "KiB",
         "exit_rss_peak": "KiB", "rcvbuf_host": "packets/run", "rcvbuf_s": "packets/run",
         "rcvbuf_c": "packets/run", "rcvbuf_d": "packets/run"}
with open(results, "a") as fh:
    def rec(metric, unit, v):
        if v:
            fh.write("\t".join([now, "wg_more.sh", metric + (" [machine busy]" if busy_note else ""), unit,
                                f"{med(v):.6g}", f"{min(v):.6g}", f"{max(v):.6g}", str(len(v)),
                                ",".join(f"{x:g}" for x in v), cmd, host]) + "\n")
    for c in cfgs:
        for k, u in units.items():
            rec(f"{c} {k}", u, vals(tput, c, k))
        rec(f"{c} client-side WG cpu", "% of one core", proc_cpu(c, "client"))
        rec(f"{c} exit cpu", "% of one core", proc_cpu(c, "exit"))
    for (who, phase), r in sorted(rss.items()):
        rec(f"{who} {phase} VmRSS", "KiB", [float(r["rss"])])
        rec(f"{who} {phase} VmHWM", "KiB", [float(r["hwm"])])
PY
}
if [[ -n ${REPORT_ONLY:-} ]]; then   # REPORT_ONLY=FILE.raw: only print the report of an earlier run
  report "$REPORT_ONLY" /dev/null "?" none
  exit 0
fi
# shellcheck source=wg_lib.sh
source "$REPO/bench/wg_lib.sh"
wg_build
# shellcheck source=../../shared/bench-anchors/lib.sh
source "$ANCHORS/lib.sh"
need iperf3 ip wg wireguard-go ping python3 awk nft ss
P=$BENCH_PREFIX
NS=$P-s NC=$P-c ND=$P-d NI=$P-i
IFX=${P}wx IFC=${P}wc IFD=${P}wd
NET=198.18.$SLOT TUN=198.19.$SLOT
INET_IP=$NET.10 RAW_IP=$NET.17
XNAME=${P}$SLOT TUNX=wrs${P}$SLOT
assert_safe_addr "$NET.1" "$NET.2" "$NET.5" "$NET.6" "$NET.9" "$NET.10" "$NET.13" "$NET.14" "$NET.17" "$TUN.1" "$TUN.129"
if ip -4 -o addr show | grep -q " $NET\.\| $TUN\."; then
  die "198.18.$SLOT.0/24 or 198.19.$SLOT.0/24 already in use in the host netns; choose another SLOT"
fi
HAVE_ONETUN=0
if [[ -x $ONETUN ]] || command -v "$ONETUN" >/dev/null 2>&1; then HAVE_ONETUN=1
else log "onetun not found ($ONETUN): skipping it (cargo install --root /tmp/anchors onetun)"; fi
RAW=${RESULTS%.tsv}.raw
: >"$RAW"
log "raw per-run values: $RAW; results TSV: $RESULTS; logs: $LOGDIR"
wg_copy_bins

# ---------------------------------------------------------------- namespaces
make_ns "$NS"; make_ns "$NC"; make_ns "$ND"; make_ns "$NI"
make_veth - "${P}h0" "$NET.1/30" "$NS" "${P}s0" "$NET.2/30"
make_veth "$NC" "${P}c0" "$NET.6/30" "$NS" "${P}s2" "$NET.5/30"
make_veth "$ND" "${P}d0" "$NET.14/30" "$NS" "${P}s3" "$NET.13/30"
make_veth "$NS" "${P}s1" "$NET.9/30" "$NI" "${P}i0" "$NET.10/30"
ip -n "$NI" addr add "$RAW_IP/32" dev "${P}i0"
ip -n "$NI" route add "$NET.0/24" via "$NET.9"          # replies on the raw (not NATed) path
ip -n "$NS" route add default via "$NET.10"             # the exit host's "internet"
ip -n "$NS" route add "$RAW_IP/32" via "$NET.10"
ip -n "$NC" route add "$RAW_IP/32" via "$NET.5"
ip netns exec "$NS" sysctl -qw net.ipv4.ip_forward=1
# Masquerade for the wireguard-go exit's subnet (the helper does it for warren's).
ip netns exec "$NS" nft -f - <<EOF
table inet ${P}_bench {
  chain post { type nat hook postrouting priority 100; policy accept; ip saddr $TUN.128/25 oifname "${P}s1" masquerade; }
}
EOF
start_bg iperf-srv ip netns exec "$NI" iperf3 -s -p 5201; PID_IPERF=$LAST_PID
wait_for "iperf3 server" 10 tcp_listening "$NI" 5201

# ---------------------------------------------------------------- keys and files
umask 077
for k in x c; do wg genkey >"$LOGDIR/key-$k"; wg pubkey <"$LOGDIR/key-$k" >"$LOGDIR/pub-$k"; done
pub() { cat "$LOGDIR/pub-$1"; }
I_A=${P}$$a I_R=${P}$$r I_F=${P}$$f I_U=${P}$$u
for i in $I_A $I_F; do add_cleanup "ip netns del warren-$i; rm -rf /etc/netns/warren-$i"; done
setup_host_warren   # host helper (PID_HELPER), W = env of every warren call
WX=(env -i PATH="$PATH" XDG_RUNTIME_DIR="$LOGDIR/xdg-s" HOME="$HOMED" WARREN_HELPER_SOCKET="$LOGDIR/helper-s/h.sock" ${WARREN_WG_OFFLOAD:+WARREN_WG_OFFLOAD=$WARREN_WG_OFFLOAD})
mkdir -p "$LOGDIR/xdg-s"; chmod 700 "$LOGDIR/xdg-s"
"${W[@]}" "$BIN/warren" server wg keygen --out "$LOGDIR/exit.conf" --address "$TUN.1/25" --listen-port 51820 >"$LOGDIR/keygen.log"
add_peer() { # add_peer NAME ENDPOINT FILE
  "${W[@]}" "$BIN/warren" server wg add-peer "$1" --config "$LOGDIR/exit.conf" --endpoint "$2" >"$3"
}
add_peer inst-a "$NET.2:51820" "$LOGDIR/a.conf"      # TUN.2
add_peer inst-r "$NET.2:51820" "$LOGDIR/r.conf"      # TUN.3
add_peer inst-f "$NET.2:51820" "$LOGDIR/f.conf"      # TUN.4
add_peer wggo-d "$NET.13:51820" "$LOGDIR/d.conf"     # TUN.5
add_peer onetun "$NET.2:51820" "$LOGDIR/o.conf"      # TUN.6
add_peer inst-u "$NET.2:51820" "$LOGDIR/u.conf"      # TUN.7
conf_get() { awk -v k="$2" -F' = ' '$1 == k {print $2; exit}' "$1"; }
EXIT_PUB=$(conf_get "$LOGDIR/a.conf" PublicKey)

# ---------------------------------------------------------------- exits in wrm-s
start_warren_helper "$NS" "$LOGDIR/helper-s" "$LOGDIR/helper-s.log"   # killed by the cleanup stack after the exit
wait_for "warren-helper socket in $NS" 10 test -S "$LOGDIR/helper-s/h.sock"
start_bg warren-exit ip netns exec "$NS" "${WX[@]}" "$BIN/warren" --no-autostart server --mode wg \
  --wg "$LOGDIR/exit.conf" --name "$XNAME"; PID_WX=$LAST_PID
udp_listening() { ip netns exec "$1" ss -Hlun "sport = :$2" | grep -q .; }
wait_for "warren exit on UDP 51820" 15 udp_listening "$NS" 51820
wait_for "warren exit TUN $TUNX" 10 ip -n "$NS" link show "$TUNX"
_alive "$PID_WX" || die "warren server exited: $(cat "$LOGDIR/warren-exit.log")"

wg_start "$NS" wireguard-go "$IFX"; PID_XG=$LAST_PID
ip netns exec "$NS" wg set "$IFX" private-key "$LOGDIR/key-x" listen-port 51821 \
  peer "$(pub c)" allowed-ips "$TUN.130/32"
ip -n "$NS" addr add "$TUN.129/25" dev "$IFX"
ip -n "$NS" link set "$IFX" mtu 1420 up

# ---------------------------------------------------------------- wireguard-go clients
wg_start "$NC" wireguard-go "$IFC"; PID_C1=$LAST_PID
ip netns exec "$NC" wg set "$IFC" private-key "$LOGDIR/key-c" \
  peer "$(pub x)" allowed-ips 0.0.0.0/0 endpoint "$NET.5:51821" persistent-keepalive 25
ip -n "$NC" addr add "$TUN.130/32" dev "$IFC"
ip -n "$NC" link set "$IFC" mtu 1420 up
ip -n "$NC" route add "$INET_IP/32" dev "$IFC"

conf_get "$LOGDIR/d.conf" PrivateKey >"$LOGDIR/key-d"
conf_get "$LOGDIR/d.conf" PresharedKey >"$LOGDIR/psk-d"
wg_start "$ND" wireguard-go "$IFD"; PID_C2=$LAST_PID
ip netns exec "$ND" wg set "$IFD" private-key "$LOGDIR/key-d" \
  peer "$EXIT_PUB" preshared-key "$LOGDIR/psk-d" allowed-ips 0.0.0.0/0 endpoint "$NET.13:51820" persistent-keepalive 25
ip -n "$ND" addr add "$(conf_get "$LOGDIR/d.conf" Address)" dev "$IFD"
ip -n "$ND" link set "$IFD" mtu 1420 up
ip -n "$ND" route add "$INET_IP/32" dev "$IFD"

ping_ok() { # ping_ok CMD... : up to 20 pings of 1 s; shows the last failure
  local i; for i in $(seq 20); do "$@" >"$LOGDIR/ping.out" 2>&1 && return 0; sleep 0.2; done
  log "last try of '$*': $(head -c 400 "$LOGDIR/ping.out")"; return 1
}
ping_ok ip netns exec "$NC" ping -4 -c 1 -W 1 "$INET_IP" || die "wireguard-go pair does not reach $INET_IP"
ping_ok ip netns exec "$ND" ping -4 -c 1 -W 1 "$INET_IP" || die "wireguard-go -> warren exit does not reach $INET_IP (see $LOGDIR/warren-exit.log)"
ping_ok ip netns exec "$NC" ping -4 -c 1 -W 1 "$RAW_IP" || die "raw path C -> $RAW_IP broken"

# ---------------------------------------------------------------- warren instances, onetun
read -r PF PO SA HA SR HR SF HF PU SU HU <<<"$(free_ports 11)"   # distinct: one socket each while chosen
UP_A=$(warren_up "$I_A" "$LOGDIR/a.conf" "$SA" "$HA") || die "warren up $I_A failed (see $XDG/warren/)"
UP_R=$(warren_up "$I_R" "$LOGDIR/r.conf" "$SR" "$HR" -- --rootless) || die "warren up --rootless $I_R failed (see $XDG/warren/)"
UP_F=$(warren_up "$I_F" "$LOGDIR/f.conf" "$SF" "$HF" -- --forward "tcp:127.0.0.1:$PF=$INET_IP:5201") ||
  die "warren up --forward $I_F failed (see $XDG/warren/)"
UP_U=$(warren_up "$I_U" "$LOGDIR/u.conf" "$SU" "$HU" -- --rootless --stack userspace --forward "tcp:127.0.0.1:$PU=$INET_IP:5201") ||
  die "warren up --rootless --stack userspace $I_U failed (see $XDG/warren/)"
PID_A=$(json_get "$UP_A" worker_pid); PID_R=$(json_get "$UP_R" worker_pid); PID_F=$(json_get "$UP_F" worker_pid)
PID_U=$(json_get "$UP_U" worker_pid)
add_cleanup "kill -TERM $PID_R 2>/dev/null"   # the rootless workers, by PID (`warren down --all` stops them too)
add_cleanup "kill -TERM $PID_U 2>/dev/null"
log "instance A $I_A (helper) worker $PID_A, parent $(ppid_of "$PID_A"): $UP_A"
log "instance R $I_R (rootless) worker $PID_R, parent $(ppid_of "$PID_R"): $UP_R"
log "instance F $I_F (forward 127.0.0.1:$PF -> $INET_IP:5201) worker $PID_F, parent $(ppid_of "$PID_F"): $UP_F"
log "instance U $I_U (userspace stack, forward 127.0.0.1:$PU -> $INET_IP:5201) worker $PID_U: $UP_U"
LOG_A=$XDG/warren/instance-$I_A.log LOG_R=$XDG/warren/instance-$I_R.log LOG_F=$XDG/warren/instance-$I_F.log
wexec() { "${W[@]}" "$BIN/warren" --no-autostart exec "$@"; }
# ping cannot run under `warren exec` (no privileges there): a TCP connect to
# a closed port, answered by a reset, shows the path works.
TCP_REACH='import socket,sys
s=socket.socket(); s.settimeout(1)
try: s.connect((sys.argv[1], 9))
except ConnectionRefusedError: sys.exit(0)
except OSError as e: print(e); sys.exit(1)'
ping_ok wexec "$I_A" -- python3 -c "$TCP_REACH" "$INET_IP" || die "instance $I_A does not reach $INET_IP"
ping_ok wexec "$I_R" -- python3 -c "$TCP_REACH" "$INET_IP" || die "rootless instance $I_R does not reach $INET_IP"

PID_O=0
if [[ $HAVE_ONETUN == 1 ]]; then
  conf_get "$LOGDIR/o.conf" PrivateKey >"$LOGDIR/key-o"
  O_IP=$(conf_get "$LOGDIR/o.conf" Address); O_IP=${O_IP%/*}
  # PSK through the environment, not the command line.
  start_bg onetun env ONETUN_PRESHARED_KEY="$(conf_get "$LOGDIR/o.conf" PresharedKey)" "$ONETUN" \
    --private-key-file "$LOGDIR/key-o" --endpoint-public-key "$EXIT_PUB" --endpoint-addr "$NET.2:51820" \
    --source-peer-ip "$O_IP" --keep-alive 10 --log warn "127.0.0.1:$PO:$INET_IP:5201:TCP"; PID_O=$LAST_PID
  wait_for "onetun listening" 10 tcp_listening - "$PO"
  ONETUN_VERSION=$("$ONETUN" --version 2>/dev/null || echo onetun)
fi

# The workers are started by `warren up` with setsid and outlive it: count
# them as ours in the foreign-CPU guard (wg_lib.sh).
own_pids "$PID_A" "$PID_R" "$PID_F" "$PID_U"

# ---------------------------------------------------------------- idle RSS
# WireGuard processes by short name: wx warren exit, xg wireguard-go exit,
# c1 wireguard-go pair client, c2 wireguard-go client of the warren exit,
# a / r / f warren workers (helper-backed / rootless / forward), o onetun.
declare -A PIDOF=([wx]=$PID_WX [xg]=$PID_XG [c1]=$PID_C1 [c2]=$PID_C2 [a]=$PID_A [r]=$PID_R [f]=$PID_F [u]=$PID_U)
(( PID_O )) && PIDOF[o]=$PID_O
PNAMES=(wx xg c1 c2 a r f u); (( PID_O )) && PNAMES+=(o)
sleep 2
for k in "${PNAMES[@]}"; do rss_line "$k" idle "${PIDOF[$k]}"; done

# ---------------------------------------------------------------- measurement
ticks() { # ticks PID : utime+stime of the process (all threads), 0 when gone
  local line rest
  { read -r line <"/proc/$1/stat"; } 2>/dev/null || { echo 0; return; }
  rest=${line##*) }
  # shellcheck disable=SC2086
  set -- $rest
  echo $(( ${12} + ${13} ))
}
all_ticks() { local k; for k in "${PNAMES[@]}"; do ticks "${PIDOF[$k]}"; done | tr '\n' ' '; }
rcvbuf_of() { # rcvbuf_of PID : UDP RcvbufErrors of PID's netns
  awk '/^Udp:/{n++; if(n==1){for(i=1;i<=NF;i++) if($i=="RcvbufErrors") c=i} else {print $c; exit}}' "/proc/$1/net/snmp" 2>/dev/null || echo 0
}
tundrop_of() { # tundrop_of PID IF : rx+tx drops of IF in PID's netns
  awk -v i="$2:" '$1 == i {print $5 + $13; f=1} END{if(!f) print 0}' "/proc/$1/net/dev" 2>/dev/null || echo 0
}
CNT_KEYS=(rcvbuf_host rcvbuf_s rcvbuf_c rcvbuf_d tundrop_wx tundrop_xg tundrop_c1 tundrop_c2 tundrop_a tundrop_r tundrop_f)
counters() {
  echo "$(rcvbuf_of $$) $(rcvbuf_of "$PID_WX") $(rcvbuf_of "$PID_C1") $(rcvbuf_of "$PID_C2")" \
       "$(tundrop_of "$PID_WX" "$TUNX") $(tundrop_of "$PID_XG" "$IFX") $(tundrop_of "$PID_C1" "$IFC")" \
       "$(tundrop_of "$PID_C2" "$IFD") $(tundrop_of "$PID_A" wr0) $(tundrop_of "$PID_R" wr0) $(tundrop_of "$PID_F" wr0)"
}
# rss_sample OUT SECS PID... : peak VmRSS (KiB) of each PID over SECS s, every 0.25 s (no forks but sleep).
rss_sample() {
  local out=$1 n=$(( $2 * 4 )) i j k v _; shift 2
  local pids=("$@") mx=()
  for ((j = 0; j < ${#pids[@]}; j++)); do mx[j]=0; done
  for ((i = 0; i < n; i++)); do
    for ((j = 0; j < ${#pids[@]}; j++)); do
      { while read -r k v _; do
          if [[ $k == VmRSS: ]]; then (( v > mx[j] )) && mx[j]=$v; break; fi
        done <"/proc/${pids[j]}/status"; } 2>/dev/null || true
    done
    sleep 0.25
  done
  echo "${mx[*]}" >"$out"
}
iperf_cmd() { # iperf_cmd CFG T -> CMD (array), CL / EX (client-side / exit process names, - for none)
  local cfg=$1 t=$2 flags
  flags="-P ${cfg##*-P}"   # user-P128: 128 parallel streams
  # shellcheck disable=SC2206
  case $cfg in
    both-*)     CMD=("${W[@]}" "$BIN/warren" --no-autostart exec "$I_A" -- iperf3 -c "$INET_IP" -t "$t" $flags -J); CL=a EX=wx ;;
    rootless-*) CMD=("${W[@]}" "$BIN/warren" --no-autostart exec "$I_R" -- iperf3 -c "$INET_IP" -t "$t" $flags -J); CL=r EX=wx ;;
    pair-*)     CMD=(ip netns exec "$NC" iperf3 -c "$INET_IP" -t "$t" $flags -J); CL=c1 EX=xg ;;
    wggo2w-*)   CMD=(ip netns exec "$ND" iperf3 -c "$INET_IP" -t "$t" $flags -J); CL=c2 EX=wx ;;
    fwd-*)      CMD=(iperf3 -c 127.0.0.1 -p "$PF" -t "$t" $flags -J); CL=f EX=wx ;;
    onetun-*)   CMD=(iperf3 -c 127.0.0.1 -p "$PO" -t "$t" $flags -J); CL=o EX=wx ;;
    user-*)     CMD=(iperf3 -c 127.0.0.1 -p "$PU" -t "$t" $flags -J); CL=u EX=wx ;;
    userdown-*) CMD=(iperf3 -c 127.0.0.1 -p "$PU" -t "$t" $flags -R -J); CL=u EX=wx ;;
    fwddown-*)  CMD=(iperf3 -c 127.0.0.1 -p "$PF" -t "$t" $flags -R -J); CL=f EX=wx ;;
    veth-*)     CMD=(ip netns exec "$NC" iperf3 -c "$RAW_IP" -t "$t" $flags -J); CL=- EX=- ;;
    *) die "unknown configuration $cfg" ;;
  esac
}
CONFIGS=(both-P1 pair-P1 wggo2w-P1 rootless-P1 fwd-P1 user-P1 userdown-P1 fwddown-P1 veth-P1)
(( PID_O )) && CONFIGS+=(onetun-P1)
[[ $P4 == 1 ]] && CONFIGS+=(both-P4 pair-P4 wggo2w-P4 rootless-P4 fwd-P4 user-P4)
if [[ -n ${ONLY_CONFIGS:-} ]]; then read -r -a CONFIGS <<<"$ONLY_CONFIGS"; fi
FAILS=0
declare -A CFAILS=()
restart_iperf_server() {
  stop_bg "$PID_IPERF"
  start_bg iperf-srv ip netns exec "$NI" iperf3 -s -p 5201; PID_IPERF=$LAST_PID
  wait_for "iperf3 server" 10 tcp_listening "$NI" 5201
}
iperf_vals() { # iperf_vals FILE -> "gbps retr client_cpu server_cpu"
  python3 -c 'import json,sys
e=json.load(open(sys.argv[1]))["end"]; c=e.get("cpu_utilization_percent",{})
print("%.4f %d %.1f %.1f" % (e["sum_received"]["bits_per_second"]/1e9, e.get("sum_sent",{}).get("retransmits",0),
      c.get("host_total",0), c.get("remote_total",0)))' "$1"
}
# run_one CFG ROUND [TIME]: one measured iperf3 run; appends a raw line unless ROUND=warmup.
run_one() {
  local cfg=$1 round=$2 t=${3:-$DURATION} j c0 c1 k0 k1 f0 f1 t0 t1 el busy fpct sb st sb2 st2 i line spid=0 rssf
  iperf_cmd "$cfg" "$t"
  j=$LOGDIR/iperf-$cfg-$round.json rssf=$LOGDIR/rss-$cfg-$round
  read -r -a c0 <<<"$(counters)"
  read -r sb st <<<"$(sys_ticks)"
  f0=$(foreign_ticks)
  read -r -a k0 <<<"$(all_ticks)"
  if [[ $round != warmup && $CL != - ]]; then
    rss_sample "$rssf" "$t" "${PIDOF[$CL]}" "${PIDOF[$EX]}" & spid=$!
  fi
  t0=$EPOCHREALTIME
  if ! timeout $((t + 30)) "${CMD[@]}" >"$j" 2>"$j.err"; then
    (( spid )) && wait "$spid" || true
    FAILS=$((FAILS + 1)); CFAILS[$cfg]=$(( ${CFAILS[$cfg]:-0} + 1 ))
    log "iperf3 $cfg round $round FAILED ($FAILS): $(head -c 300 "$j.err") $(grep -o '"error":.*' "$j" | head -c 200)"
    (( FAILS <= 8 )) || die "too many iperf3 failures"
    if (( ${CFAILS[$cfg]} >= 2 )); then log "giving up on $cfg after ${CFAILS[$cfg]} failures"; SKIP_CFG[$cfg]=1; fi
    restart_iperf_server; return 1
  fi
  t1=$EPOCHREALTIME
  read -r -a k1 <<<"$(all_ticks)"
  f1=$(foreign_ticks)
  read -r sb2 st2 <<<"$(sys_ticks)"
  read -r -a c1 <<<"$(counters)"
  (( spid )) && wait "$spid" || true
  [[ $round == warmup ]] && return 0
  el=$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')
  busy=$(awk -v a="$sb" -v b="$sb2" -v c="$st" -v d="$st2" -v n="$(nproc)" 'BEGIN{printf "%.1f", (b-a)/((d-c)>0?(d-c):1)*100*n}')
  fpct=$(cpu_pct "$f0" "$f1" "$el")
  if should_redo "$cfg" "$round" "$fpct" $((f1 - f0)); then return 2; fi
  read -r gbps retr icpu scpu <<<"$(iperf_vals "$j")"
  line="kind=tput cfg=$cfg round=$round gbps=$gbps retr=$retr iperf_client_cpu=$icpu iperf_server_cpu=$scpu"
  for ((i = 0; i < ${#PNAMES[@]}; i++)); do line+=" cpu_${PNAMES[i]}=$(cpu_pct "${k0[i]}" "${k1[i]}" "$el")"; done
  line+=" client=$CL exit=$EX machine_busy=$busy foreign_cpu=$fpct"
  for ((i = 0; i < ${#CNT_KEYS[@]}; i++)); do line+=" ${CNT_KEYS[i]}=$((c1[i] - c0[i]))"; done
  if [[ -s $rssf ]]; then read -r ra rb <"$rssf"; line+=" client_rss_peak=$ra exit_rss_peak=$rb"; fi
  echo "$line" >>"$RAW"
  log "$cfg round $round: $gbps Gbit/s, client[$CL] $(grep -o "cpu_$CL=[^ ]*" <<<"$line" || true), exit[$EX] $(grep -o "cpu_$EX=[^ ]*" <<<"$line" || true), busy ${busy}%, foreign ${fpct}%"
  # onetun's memory grows with traffic: stop measuring it past ONETUN_RSS_MAX_MIB.
  if [[ $CL == o ]] && _alive "$PID_O" && (( $(rss_kib "$PID_O") > ONETUN_RSS_MAX_MIB * 1024 )); then
    log "onetun VmRSS $(rss_kib "$PID_O") KiB > ${ONETUN_RSS_MAX_MIB} MiB: no more onetun runs"
    rss_line o capped "$PID_O"; SKIP_CFG[$cfg]=1
    echo "kind=note onetun_capped=1 after_round=$round" >>"$RAW"
    stop_bg "$PID_O"
  fi
  return 0
}
if [[ $WARMUP == 1 ]]; then
  for cfg in "${CONFIGS[@]}"; do [[ $cfg == *-P4 ]] || run_one "$cfg" warmup 1 || true; done
fi
T_START=$EPOCHREALTIME
run_rounds   # RUNS rounds over CONFIGS, rotated, disturbed runs redone (wg_lib.sh)
log "measured rounds took $(awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.0f", b-a}') s"

# ---------------------------------------------------------------- after load
for k in "${PNAMES[@]}"; do _alive "${PIDOF[$k]}" && rss_line "$k" loaded "${PIDOF[$k]}"; done
for f in "$LOG_A" "$LOG_R" "$LOG_F" "$LOGDIR/warren-exit.log" "$LOGDIR/helper.log" "$LOGDIR/helper-s.log" "$LOGDIR/onetun.log"; do
  [[ -f $f ]] || continue
  echo "kind=log file=$(basename "$f") lines=$(wc -l <"$f") warn=$(grep -ci 'warn' "$f" || true) error=$(grep -ci 'error' "$f" || true)" >>"$RAW"
  grep -iE 'warn|error' "$f" | head -5 | sed "s/^/  $(basename "$f"): /" >&2 || true
done
{ echo "--- wg show (exit netns)"; ip netns exec "$NS" wg show "$IFX"; } >"$LOGDIR/wg-show.txt" 2>&1 || true
{ echo "--- nft (exit netns)"; ip netns exec "$NS" nft list ruleset; } >>"$LOGDIR/wg-show.txt" 2>&1 || true
timeout 20 "${W[@]}" "$BIN/warren" --no-autostart status --json >"$LOGDIR/status.json" 2>&1 || true

# ---------------------------------------------------------------- report
[[ $QUIET_WARN == 1 ]] && echo "kind=note machine_busy=1" >>"$RAW"
echo "kind=meta runs=$RUNS duration=$DURATION p4=$P4 fails=$FAILS onetun=$(awk '{print $2}' <<<"${ONETUN_VERSION:-x none}")" >>"$RAW"
report "$RAW" "$RESULTS" "$FAILS" "${ONETUN_VERSION:-none}"
log "raw per-run values kept in $RAW; anchor-format TSV in $RESULTS"
