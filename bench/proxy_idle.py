#!/usr/bin/env python3
"""Idle-connection memory of `warren proxy`: hold N SOCKS5 CONNECTs open
through it to a local idle target and report the proxy's RSS growth per
connection. Loopback only; every wait is bounded.

    python3 bench/proxy_idle.py --warren target/release/warren --n 10000
"""
import argparse, asyncio, os, resource, socket, subprocess, sys, time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warren", required=True)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--parallel", type=int, default=200)
    ap.add_argument("--hold", type=float, default=3.0)
    a = ap.parse_args()
    # The proxy holds two sockets per connection (client and upstream);
    # this process and the target process one each.
    want = a.n * 2 + 500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        sys.exit(f"raise the hard fd limit first: ulimit -Hn {want} (now {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), hard))

    target = subprocess.Popen([sys.executable, __file__, "--serve-target"],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    tport = int(target.stdout.readline())
    sport = free_port()
    proxy = subprocess.Popen(
        [a.warren, "proxy", "--socks", f"127.0.0.1:{sport}", "--http", "off",
         "--max-connections", str(a.n + 100)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", sport), timeout=1).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        base = rss_kib(proxy.pid)
        clients = []
        sem = asyncio.Semaphore(a.parallel)
        req = bytes([5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1]) + tport.to_bytes(2, "big")

        async def one():
            async with sem:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", sport), 10)
                w.write(req)
                rep = await asyncio.wait_for(r.readexactly(12), 10)
                if rep[3] != 0:
                    raise RuntimeError(f"reply {rep[3]}")
                clients.append(w)

        t0 = time.monotonic()
        res = await asyncio.gather(*[one() for _ in range(a.n)], return_exceptions=True)
        errors = [e for e in res if isinstance(e, BaseException)]
        await asyncio.sleep(a.hold)
        held = rss_kib(proxy.pid)
        ok = len(clients)
        per = (held - base) / ok if ok else float("nan")
        print(f"connections_held={ok} errors={len(errors)} setup_s={time.monotonic() - t0:.1f} "
              f"rss_base_kib={base} rss_held_kib={held} rss_per_conn_kib={per:.2f}")
        if errors:
            print("first error:", repr(errors[0]), file=sys.stderr)
        for w in clients:
            w.close()
    finally:
        proxy.terminate()
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
        target.kill()
        target.wait()


async def serve_target():
    """An idle target: accepts and holds connections for at most 600 s."""
    async def on_target(r, w):
        try:
            await r.read()  # until the other side closes
        except Exception:
            pass
        w.close()

    srv = await asyncio.start_server(on_target, "127.0.0.1", 0, backlog=4096)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(600)


if len(sys.argv) > 1 and sys.argv[1] == "--serve-target":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve_target())
else:
    asyncio.run(main())
