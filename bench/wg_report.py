#!/usr/bin/env python3
"""Helper of bench/wg.sh.

  wg_report.py iperf FILE
      one iperf3 -J result -> "gbps retransmits client_cpu server_cpu"
  wg_report.py report RAW RESULTS_TSV [--cmd CMD] [--duration S] [--fails N]
      RAW: one line per measurement, `kind=... key=value ...` (written by
      wg.sh). Prints the per-run values and the Markdown summary, appends one
      line per metric to RESULTS_TSV in the anchors' format (date script
      metric unit median min max n values command host), and reads the
      anchor ns_setup_latency.sh lines from it.
"""
import argparse
import csv
import datetime
import json
import socket
import statistics
import sys


def iperf(path):
    j = json.load(open(path))
    end = j["end"]
    gbps = end["sum_received"]["bits_per_second"] / 1e9
    retr = end.get("sum_sent", {}).get("retransmits", 0)
    cpu = end.get("cpu_utilization_percent", {})
    print(f"{gbps:.3f} {retr} {cpu.get('host_total', 0):.1f} {cpu.get('remote_total', 0):.1f}")


def parse(path):
    rows = []
    for line in open(path):
        kv = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if kv:
            rows.append(kv)
    return rows


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def vals(rows, key, **match):
    out = []
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            x = num(r.get(key))
            if x is not None:
                out.append(x)
    return out


def med(v):
    return statistics.median(v) if v else None


def fmt(x, nd=2):
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def cell(v, nd=2, spread=True):
    if not v:
        return "—"
    m = med(v)
    if spread and len(v) > 1:
        return f"{fmt(m, nd)} ({fmt(min(v), nd)}–{fmt(max(v), nd)})"
    return fmt(m, nd)


def ratio(a, b):
    if a is None or b in (None, 0):
        return "—"
    return f"{a / b:.2f}×"


def anchor(results, text):
    """Values of the first ns_setup_latency line whose metric contains text."""
    try:
        rows = list(csv.reader(open(results), delimiter="\t"))
    except FileNotFoundError:
        return [], ""
    for r in rows:
        if len(r) >= 10 and r[1] == "ns_setup_latency" and text in r[2]:
            return [float(x) for x in r[8].split(",") if x], r[2]
    return [], ""


def report(a):
    rows = parse(a.raw)
    tput = [r for r in rows if r.get("kind") == "tput"]
    ups = [r for r in rows if r.get("kind") == "up"]
    rss = {(r["who"], r["phase"]): r for r in rows if r.get("kind") == "rss"}
    busy_note = any(r.get("kind") == "note" for r in rows)
    cfgs = []
    for r in tput:
        if r["cfg"] not in cfgs:
            cfgs.append(r["cfg"])

    g = lambda cfg, key="gbps": vals(tput, key, cfg=cfg)
    # ---- per-run values
    print("\n### Per-run values (in round order; CPU in % of one core, drops per run)\n")
    keys = ["gbps", "retr", "worker_cpu", "client_wggo_cpu", "exit_cpu", "iperf_client_cpu",
            "iperf_server_cpu", "machine_busy", "foreign_cpu", "rcvbuf_host", "rcvbuf_exit",
            "rcvbuf_client", "tundrop_inst", "tundrop_exit", "tundrop_client"]
    print("| config | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for c in cfgs:
        cells = []
        for k in keys:
            v = g(c, k)
            cells.append(" ".join(f"{x:.{2 if k == 'gbps' else 0}f}" for x in v) if v else "NA")
        print(f"| {c} | " + " | ".join(cells) + " |")
    if ups:
        print("\nup/down runs (ms): up_ms " + ", ".join(fmt(x, 1) for x in vals(ups, "up_ms")))
        print("  handshake_ms " + ", ".join(fmt(x, 0) for x in vals(ups, "handshake_ms")))
        print("  up wall " + ", ".join(fmt(x, 1) for x in vals(ups, "up_wall_ms")))
        print("  down wall " + ", ".join(fmt(x, 1) for x in vals(ups, "down_wall_ms")))
    for (who, phase), r in sorted(rss.items()):
        print(f"RSS {who} {phase}: VmRSS {r['rss']} KiB, VmHWM {r['hwm']} KiB, threads {r['threads']}")
    for r in rows:
        if r.get("kind") == "log":
            print(f"worker log {r['file']}: {r['lines']} lines, {r['warn']} warn, {r['error']} error, {r['gso']} mentioning GSO")

    # ---- summary
    M = lambda cfg, key="gbps": med(g(cfg, key))
    out = []
    row = lambda *c: out.append("| " + " | ".join(c) + " |")
    print("\n### Summary (medians; min–max in brackets)\n")
    row("metric", "warren", "wireguard-go pair", "raw veth", "ratio")
    out.append("|---|---|---|---|---|")
    def paired(a_cfg, b_cfg, key="gbps"):
        """Median over rounds of the per-round ratio a/b (drift cancels)."""
        by = lambda c: {r["round"]: num(r.get(key)) for r in tput if r["cfg"] == c}
        a_, b_ = by(a_cfg), by(b_cfg)
        rs = [a_[k] / b_[k] for k in a_ if k in b_ and a_[k] is not None and b_[k]]
        return f"{med(rs):.2f}×" if rs else "—"
    TPUT = [("TCP 1 stream, Gbit/s", "warren-P1", "wggo-P1", "veth-P1"),
            ("TCP 4 streams (-P 4), Gbit/s", "warren-P4", "wggo-P4", "veth-P4"),
            ("TCP 1 stream reverse (-R, exit → client), Gbit/s", "warren-R", "wggo-R", None)]
    for label, w, wg, v in TPUT:
        rs = f"{ratio(M(w), M(wg))} of wireguard-go (per round {paired(w, wg)})"
        if v:
            rs += f", {ratio(M(w), M(v))} of veth"
        row(label, cell(g(w)), cell(g(wg)), cell(g(v)) if v else "—", rs)
    for label, w, base in [("warren with WARREN_WG_GSO=0, 1 stream, Gbit/s", "warren-nogso-P1", "warren-P1"),
                           ("warren with WARREN_WG_GSO=0, -P 4, Gbit/s", "warren-nogso-P4", "warren-P4")]:
        row(label, cell(g(w)), "—", "—", f"GSO on/off {ratio(M(base), M(w))} (per round {paired(base, w)})")
    for label, sfx in [("1 stream", "P1"), ("-P 4", "P4"), ("-R", "R")]:
        w, wg = f"warren-{sfx}", f"wggo-{sfx}"
        row(f"client-side WireGuard CPU, {label}, % of one core (warren worker / wireguard-go)",
            cell(g(w, "worker_cpu"), 0), cell(g(wg, "client_wggo_cpu"), 0), "—",
            f"{ratio(M(w, 'worker_cpu'), M(wg, 'client_wggo_cpu'))} CPU; per Gbit/s "
            f"{ratio(div(M(w, 'worker_cpu'), M(w)), div(M(wg, 'client_wggo_cpu'), M(wg)))}")
    for sfx in ("nogso-P1", "nogso-P4"):
        row(f"warren worker CPU with GSO off, {sfx[6:]}, % of one core", cell(g(f"warren-{sfx}", "worker_cpu"), 0),
            "—", "—", "—")
    for label, sfx in [("1 stream", "P1"), ("-P 4", "P4"), ("-R", "R")]:
        row(f"exit wireguard-go CPU, {label}, % of one core", cell(g(f"warren-{sfx}", "exit_cpu"), 0),
            cell(g(f"wggo-{sfx}", "exit_cpu"), 0), "—", "—")
    for label, sfx in [("1 stream", "P1"), ("-P 4", "P4")]:
        row(f"whole machine busy, {label} (200 % = both cores)", cell(g(f"warren-{sfx}", "machine_busy"), 0),
            cell(g(f"wggo-{sfx}", "machine_busy"), 0), cell(g(f"veth-{sfx}", "machine_busy"), 0), "—")
    for label, sfx in [("1 stream", "P1"), ("-P 4", "P4"), ("-R", "R")]:
        row(f"TCP retransmits per run, {label}", cell(g(f"warren-{sfx}", "retr"), 0, False),
            cell(g(f"wggo-{sfx}", "retr"), 0, False), cell(g(f"veth-{sfx}", "retr"), 0, False) if sfx != "R" else "—", "—")
    def drops(cfg, keys):
        return " / ".join(fmt(med(g(cfg, k)), 0) for k in keys)
    for sfx in ("P1", "P4", "R"):
        row(f"UDP RcvbufErrors per run, {sfx} (warren: host / exit netns; pair: client / exit netns)",
            drops(f"warren-{sfx}", ["rcvbuf_host", "rcvbuf_exit"]),
            drops(f"wggo-{sfx}", ["rcvbuf_client", "rcvbuf_exit"]), "—", "—")
        row(f"TUN drops per run, {sfx} (client TUN / exit TUN)",
            drops(f"warren-{sfx}", ["tundrop_inst", "tundrop_exit"]),
            drops(f"wggo-{sfx}", ["tundrop_client", "tundrop_exit"]), "—", "—")
    ready, ready_name = anchor(a.results, "C ready total")
    td, td_name = anchor(a.results, "F teardown total")
    up_ms = vals(ups, "up_ms")
    row("up to first completed handshake, ms (warren `up_ms`; anchor: netns add → first ping reply)",
        cell(up_ms, 1), cell(ready, 1) + (" [machine busy]" if "busy" in ready_name else ""), "—",
        ratio(med(up_ms), med(ready)))
    row("`warren up` wall time, ms", cell(vals(ups, "up_wall_ms"), 1), "—", "—", ratio(med(vals(ups, "up_wall_ms")), med(ready)))
    row("of which handshake, ms (worker's `handshake_ms`)", cell(vals(ups, "handshake_ms"), 0), "—", "—", "—")
    row("teardown, ms (`warren down` wall; anchor: stop WG + netns del)", cell(vals(ups, "down_wall_ms"), 1),
        cell(td, 1) + (" [machine busy]" if "busy" in td_name else ""), "—", ratio(med(vals(ups, "down_wall_ms")), med(td)))
    def kib(who, phase, key="rss"):
        r = rss.get((who, phase))
        return float(r[key]) if r else None
    def mib(x):
        return "—" if x is None else f"{x / 1024:.1f} MiB"
    for label, phase, key in [("RSS idle (2 s after up / handshake)", "idle", "rss"),
                              ("RSS after the throughput runs", "loaded", "rss"),
                              ("peak RSS (VmHWM) after the runs", "loaded", "hwm")]:
        w, wg = kib("warren-gso", phase, key), kib("wggo-client", phase, key)
        row(f"{label}: warren worker / client wireguard-go", mib(w), mib(wg), "—", ratio(w, wg))
    row("same, warren worker with GSO off (idle / after runs / peak)",
        " / ".join(mib(kib("warren-nogso", p, k)) for p, k in [("idle", "rss"), ("loaded", "rss"), ("loaded", "hwm")]),
        "exit: " + " / ".join(mib(kib("wggo-exit", p, k)) for p, k in [("idle", "rss"), ("loaded", "rss"), ("loaded", "hwm")]),
        "—", "—")
    print("\n".join(out))
    # Runs during which other processes used at most --foreign-max % of one core.
    quiet = [r for r in tput if (num(r.get("foreign_cpu")) or 0) <= float(a.foreign_max)]
    if len(quiet) < len(tput):
        q = lambda cfg: vals(quiet, "gbps", cfg=cfg)
        qc = lambda cfg: (f"{fmt(med(q(cfg)))} (n={len(q(cfg))})" if q(cfg) else "—")
        print(f"\nUndisturbed runs only (other processes ≤ {a.foreign_max} % of one core during the run; "
              f"{len(quiet)} of {len(tput)} runs):\n")
        print("| metric | warren | wireguard-go pair | raw veth | ratio |\n|---|---|---|---|---|")
        for label, w, wg, v in TPUT + [("warren GSO off, 1 stream, Gbit/s", "warren-nogso-P1", "warren-P1", None),
                                       ("warren GSO off, -P 4, Gbit/s", "warren-nogso-P4", "warren-P4", None)]:
            if "GSO off" in label:
                print(f"| {label} | {qc(w)} | — | — | GSO on/off {ratio(med(q(wg)), med(q(w)))} |")
                continue
            rs = f"{ratio(med(q(w)), med(q(wg)))} of wireguard-go"
            if v:
                rs += f", {ratio(med(q(w)), med(q(v)))} of veth"
            print(f"| {label} | {qc(w)} | {qc(wg)} | {qc(v) if v else '—'} | {rs} |")
    n = len(g("warren-P1"))
    print(f"\nRuns: {n} per configuration, {a.duration} s each, configurations interleaved per round; "
          f"{len(up_ms)} up/down cycles; anchor ns_setup_latency.sh RUNS={len(ready)}. "
          f"iperf3 failures (redone): {a.fails}." + (" Some runs tagged [machine busy]." if busy_note else ""))
    if a.cmd:
        print(f"\nCommand (as root): `{a.cmd}`")

    # ---- anchor-format TSV lines
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    host = socket.gethostname()
    units = {"gbps": "Gbit/s", "retr": "count", "worker_cpu": "% of one core",
             "client_wggo_cpu": "% of one core", "exit_cpu": "% of one core",
             "machine_busy": "% of one core", "rcvbuf_host": "packets/run",
             "rcvbuf_exit": "packets/run", "rcvbuf_client": "packets/run",
             "tundrop_inst": "packets/run", "tundrop_exit": "packets/run",
             "tundrop_client": "packets/run"}
    with open(a.results, "a") as f:
        def rec(metric, unit, v):
            if v:
                f.write("\t".join([now, "wg.sh", metric + (" [machine busy]" if busy_note else ""), unit,
                                   f"{med(v):.6g}", f"{min(v):.6g}", f"{max(v):.6g}", str(len(v)),
                                   ",".join(f"{x:g}" for x in v), a.cmd or "bench/wg.sh", host]) + "\n")
        for c in cfgs:
            for k, u in units.items():
                rec(f"{c} {k}", u, g(c, k))
        for k in ("up_ms", "handshake_ms", "up_wall_ms", "down_wall_ms"):
            rec(f"warren {k}", "ms", vals(ups, k))
        for (who, phase), r in sorted(rss.items()):
            rec(f"{who} {phase} VmRSS", "KiB", [float(r["rss"])])
            rec(f"{who} {phase} VmHWM", "KiB", [float(r["hwm"])])


def div(a, b):
    if a is None or not b:
        return None
    return a / b


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "iperf":
        return iperf(sys.argv[2])
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["report"])
    ap.add_argument("raw")
    ap.add_argument("results")
    ap.add_argument("--cmd", default="")
    ap.add_argument("--duration", default="5")
    ap.add_argument("--fails", default="0")
    ap.add_argument("--foreign-max", default="5")
    report(ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
