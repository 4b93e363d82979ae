//! `warren up / exec / status / down` against a real WireGuard peer
//! (wireguard-go in an exit namespace, see [`warren_tests::wgexit`]), run
//! as an unprivileged member of the helper's group. Root is needed to set
//! the scene (CI runs as root; these fail, never skip, there otherwise).

mod common;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use warren_tests::wgexit::WgExit;
use warren_tests::{Helper, TestDir, as_user, bin, ids, require_root, run_limited, wait_for};

#[test]
fn up_proxies_exec_status_and_down_through_a_wireguard_go_exit() {
    if !require_root("up_proxies_exec_status_and_down_through_a_wireguard_go_exit") {
        return;
    }
    let exit = WgExit::start("inst-main");
    let helper = Helper::start("inst-main", &[]);
    let user = User::new("inst-main-user", &helper.socket, &exit);
    let name = iname("i");
    let (sp, hp) = free_ports();
    let up = user.up(&name, &user.conf, sp, hp);
    assert_eq!(up["socks"], format!("127.0.0.1:{sp}"));
    let worker = up["worker_pid"].as_i64().expect("worker pid");
    let socks = format!("127.0.0.1:{sp}");
    let http = format!("http://127.0.0.1:{hp}");
    let body = exit.http_body();

    // SOCKS5 to IPv4 and IPv6 literals, socks5h names resolved by the
    // tunnel's DNS, the HTTP proxy (absolute form and CONNECT).
    assert_eq!(curl_ok(&["--socks5", &socks, &exit.url_v4("/")]), body);
    assert_eq!(curl_ok(&["--socks5", &socks, &exit.url_v6("/")]), body);
    assert_eq!(
        curl_ok(&["--socks5-hostname", &socks, "http://exit.test/"]),
        body
    );
    assert_eq!(curl_ok(&["-x", &http, "http://www.exit.test/"]), body);
    assert_eq!(curl_ok(&["-p", "-x", &http, &exit.url_v4("/")]), body);
    let q = exit.dns_queries();
    assert!(
        q.iter().any(|n| n.trim_end_matches('.') == "exit.test"),
        "exit.test never asked at the tunnel's DNS: {q:?}"
    );
    assert!(
        q.iter().any(|n| n.trim_end_matches('.') == "www.exit.test"),
        "www.exit.test never asked: {q:?}"
    );

    // A name that does not exist fails cleanly (SOCKS error, no hang).
    let (ok, _, _) = curl(&["--socks5-hostname", &socks, "http://nope.invalid/"]);
    assert!(!ok);

    // exec: inside the namespace, as the caller, DNS through the tunnel.
    let out = user.warren(&["exec", &name, "--", "id", "-u"]);
    assert!(out.status.success(), "exec id: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), ids::MEMBER.to_string());
    let out = user.warren(&[
        "exec",
        &name,
        "--",
        "curl",
        "-sS",
        "--max-time",
        "8",
        "http://exit.test/",
    ]);
    assert!(out.status.success(), "exec curl: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), body);
    let out = user.warren(&["exec", &name, "--", "sh", "-c", "exit 7"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "exec returns the program's status"
    );
    // Ctrl-C (SIGINT to `warren exec`) reaches the program.
    let mut c = as_user(ids::MEMBER, ids::GROUP, &[ids::GROUP], &bin("warren"));
    c.args(["--no-autostart", "exec", &name, "--", "sleep", "30"])
        .env("XDG_RUNTIME_DIR", user.dir.path())
        .env("WARREN_HELPER_SOCKET", &helper.socket)
        .stdout(std::process::Stdio::null());
    let mut sleeper = warren_tests::Proc::new(c.spawn().expect("exec sleep"), None);
    std::thread::sleep(Duration::from_millis(500));
    sleeper.signal(nix::sys::signal::Signal::SIGINT);
    let st = sleeper
        .wait_timeout(Duration::from_secs(5))
        .expect("exec did not end on SIGINT");
    assert_eq!(st.code(), Some(130), "sleep did not die of SIGINT");

    // Under a terminal, the program gets a terminal of its own (the size of
    // ours) as its controlling terminal: /dev/tty works. With -T it does not.
    let in_terminal = |exec_flags: &str| {
        let script = format!(
            "stty rows 33 cols 111; exec {} --no-autostart exec {exec_flags} {name} -- \
             sh -c 'tty; stty size; echo via-dev-tty > /dev/tty && exit 7'",
            bin("warren").display()
        );
        let mut c = as_user(ids::MEMBER, ids::GROUP, &[ids::GROUP], Path::new("script"));
        c.args(["-qec", &script, "/dev/null"])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("XDG_RUNTIME_DIR", user.dir.path())
            .env("HOME", user.dir.path())
            .env("WARREN_HELPER_SOCKET", &helper.socket)
            .current_dir(user.dir.path());
        run_limited(&mut c, Duration::from_secs(20))
    };
    let out = in_terminal("");
    let shown = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "exec in a terminal: {shown}{}",
        text(&out.stderr)
    );
    assert!(shown.contains("/dev/pts/"), "no terminal: {shown}");
    assert!(shown.contains("33 111"), "size not passed on: {shown}");
    assert!(shown.contains("via-dev-tty"), "/dev/tty unusable: {shown}");
    let out = in_terminal("-T");
    let shown = text(&out.stdout);
    assert_ne!(
        out.status.code(),
        Some(7),
        "-T still gave a terminal: {shown}"
    );
    assert!(!shown.contains("via-dev-tty"), "{shown}");

    // status --json: the instance, its peer, a recent handshake, bytes.
    let out = user.warren(&["status", "--json"]);
    assert!(out.status.success());
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    let inst = st["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["instance"]["name"] == name.as_str()))
        .unwrap_or_else(|| panic!("instance missing from status: {st}"));
    assert_eq!(inst["pid"].as_i64(), Some(worker));
    let peer = &inst["instance"]["peers"][0];
    assert_eq!(peer["endpoint"], exit.endpoint().to_string());
    assert!(
        peer["last_handshake_secs"].as_u64().is_some_and(|s| s < 60),
        "{peer}"
    );
    assert!(peer["rx_bytes"].as_u64().unwrap_or(0) > 0, "{st}");
    assert!(peer["tx_bytes"].as_u64().unwrap_or(0) > 0, "{st}");
    let plain = user.warren(&["status"]);
    assert!(text(&plain.stdout).contains(&format!("instance {name}")));

    // down: nothing left.
    let out = user.warren(&["down", &name]);
    assert!(out.status.success(), "down: {}", text(&out.stderr));
    assert!(
        wait_for(Duration::from_secs(5), || !pid_alive(worker)),
        "worker still running"
    );
    assert!(!netns_exists(&name), "namespace left behind");
    assert!(port_free(sp) && port_free(hp), "ports still taken");
    let out = user.warren(&["status", "--json"]);
    assert!(
        !text(&out.stdout).contains(&name),
        "status still lists {name}"
    );
}

#[test]
fn two_instances_reach_two_exits_at_once() {
    if !require_root("two_instances_reach_two_exits_at_once") {
        return;
    }
    let (e1, e2) = (WgExit::start("two-a"), WgExit::start("two-b"));
    let helper = Helper::start("inst-two", &[]);
    let user = User::new("inst-two-user", &helper.socket, &e1);
    let c2 = user.with_conf(&e2, "second.conf");
    let (n1, n2) = (iname("a"), iname("b"));
    let (s1, h1) = free_ports();
    user.up(&n1, &user.conf, s1, h1);
    let (s2, h2) = free_ports();
    user.up(&n2, &c2, s2, h2);
    let b1 = curl_ok(&[
        "--socks5-hostname",
        &format!("127.0.0.1:{s1}"),
        "http://exit.test/",
    ]);
    let b2 = curl_ok(&[
        "--socks5-hostname",
        &format!("127.0.0.1:{s2}"),
        "http://exit.test/",
    ]);
    assert_eq!(b1, e1.http_body());
    assert_eq!(b2, e2.http_body());
    assert_ne!(b1, b2);
    let out = user.warren(&["down", "--all"]);
    assert!(out.status.success());
    assert!(!netns_exists(&n1) && !netns_exists(&n2));
}

#[test]
fn killing_the_worker_removes_the_instance() {
    if !require_root("killing_the_worker_removes_the_instance") {
        return;
    }
    let exit = WgExit::start("kill");
    let helper = Helper::start("inst-kill", &[]);
    let user = User::new("inst-kill-user", &helper.socket, &exit);
    let name = iname("k");
    let (sp, hp) = free_ports();
    let up = user.up(&name, &user.conf, sp, hp);
    let worker = up["worker_pid"].as_i64().expect("pid");
    assert!(netns_exists(&name));
    // SAFETY: kill with a pid we were given for a process we started.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    assert!(
        wait_for(Duration::from_secs(5), || !netns_exists(&name)),
        "namespace survived its worker"
    );
    assert!(
        wait_for(Duration::from_secs(5), || port_free(sp) && port_free(hp)),
        "ports survived the worker"
    );
}

#[test]
fn unreachable_peer_fails_up_clearly_and_leaves_nothing() {
    if !require_root("unreachable_peer_fails_up_clearly_and_leaves_nothing") {
        return;
    }
    let mut exit = WgExit::start("unreach");
    exit.stop_wireguard();
    let helper = Helper::start("inst-unreach", &[]);
    let user = User::new("inst-unreach-user", &helper.socket, &exit);
    let name = iname("u");
    let (sp, hp) = free_ports();
    let out = user.warren(&[
        "up",
        &name,
        "--wg",
        user.conf.to_str().expect("utf-8"),
        "--socks-port",
        &sp.to_string(),
        "--http-port",
        &hp.to_string(),
        "--timeout",
        "1",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("no WireGuard handshake"),
        "unclear error: {err}"
    );
    assert!(
        err.contains(&exit.endpoint().to_string()),
        "error does not name the endpoint: {err}"
    );
    assert!(
        wait_for(Duration::from_secs(5), || !netns_exists(&name)),
        "namespace left behind"
    );
    assert!(port_free(sp) && port_free(hp), "ports left bound");
}

#[test]
fn a_taken_port_is_a_clear_error_and_leaves_nothing() {
    if !require_root("a_taken_port_is_a_clear_error_and_leaves_nothing") {
        return;
    }
    let exit = WgExit::start("port");
    let helper = Helper::start("inst-port", &[]);
    let user = User::new("inst-port-user", &helper.socket, &exit);
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let tp = taken.local_addr().expect("addr").port();
    let (_, hp) = free_ports();
    let name = iname("p");
    let out = user.warren(&[
        "up",
        &name,
        "--wg",
        user.conf.to_str().expect("utf-8"),
        "--socks-port",
        &tp.to_string(),
        "--http-port",
        &hp.to_string(),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{tp}")) && err.contains("SOCKS5"),
        "unclear error: {err}"
    );
    assert!(!netns_exists(&name));
    assert!(port_free(hp));
}

#[test]
fn peer_restart_recovers_and_a_dead_peer_fails_socks_clients_fast() {
    if !require_root("peer_restart_recovers_and_a_dead_peer_fails_socks_clients_fast") {
        return;
    }
    let mut exit = WgExit::start("restart");
    let helper = Helper::start("inst-restart", &[]);
    let user = User::new("inst-restart-user", &helper.socket, &exit);
    let name = iname("r");
    let (sp, hp) = free_ports();
    user.up(&name, &user.conf, sp, hp);
    let socks = format!("127.0.0.1:{sp}");
    assert_eq!(
        curl_ok(&["--socks5", &socks, &exit.url_v4("/")]),
        exit.http_body()
    );
    // Peer gone: the SOCKS client gets an answer (failure), not a hang.
    exit.stop_wireguard();
    let t = std::time::Instant::now();
    let (ok, _, _) = curl(&["--socks5", &socks, "--max-time", "20", &exit.url_v4("/")]);
    assert!(!ok, "a request through a dead peer succeeded");
    assert!(
        t.elapsed() < Duration::from_secs(19),
        "the SOCKS client hung until curl gave up"
    );
    // Peer back (new process, no session): the handshake recovers on its own.
    exit.restart_wireguard();
    let back = wait_for(Duration::from_secs(45), || {
        curl(&["--socks5", &socks, "--max-time", "3", &exit.url_v4("/")]).1 == exit.http_body()
    });
    assert!(
        back,
        "no recovery after the peer restarted\n{}",
        user.log(&name)
    );
    let _ = user.warren(&["down", &name]);
}

#[test]
fn udp_associate_goes_through_the_tunnel() {
    if !require_root("udp_associate_goes_through_the_tunnel") {
        return;
    }
    let exit = WgExit::start("udp");
    let helper = Helper::start("inst-udp", &[]);
    let user = User::new("inst-udp-user", &helper.socket, &exit);
    let name = iname("d");
    let (sp, hp) = free_ports();
    user.up(&name, &user.conf, sp, hp);
    let echoed = socks_udp_echo(
        format!("127.0.0.1:{sp}").parse().expect("addr"),
        SocketAddr::new(exit.tunnel_v4().into(), 7),
        b"warren-udp-through-tunnel",
    );
    assert_eq!(echoed, b"warren-udp-through-tunnel");
    let _ = user.warren(&["down", &name]);
}

#[test]
fn nothing_in_plaintext_leaves_on_the_exit_link() {
    if !require_root("nothing_in_plaintext_leaves_on_the_exit_link") {
        return;
    }
    let exit = WgExit::start("leak");
    let helper = Helper::start("inst-leak", &[]);
    let user = User::new("inst-leak-user", &helper.socket, &exit);
    let name = iname("l");
    let (sp, hp) = free_ports();
    user.up(&name, &user.conf, sp, hp);
    let marker = format!("WARRENLEAK{}", std::process::id());
    let pcap = user.dir.join("cap.txt");
    let capture = |send: &dyn Fn()| -> String {
        let mut tcpdump = warren_tests::Proc::new(
            Command::new("tcpdump")
                .args(["-l", "-n", "-A", "-U", "-i", exit.host_veth()])
                .stdout(std::fs::File::create(&pcap).expect("cap file"))
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("tcpdump"),
            None,
        );
        std::thread::sleep(Duration::from_millis(700));
        send();
        std::thread::sleep(Duration::from_millis(500));
        tcpdump.signal(nix::sys::signal::Signal::SIGINT);
        let _ = tcpdump.wait_timeout(Duration::from_secs(5));
        std::fs::read_to_string(&pcap).unwrap_or_default()
    };
    // Negative control: the marker sent in the clear to the exit's link
    // address is seen by the capture.
    let seen = capture(&|| {
        let u = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let _ = u.send_to(marker.as_bytes(), (exit.endpoint().ip(), 9));
    });
    assert!(
        seen.contains(&marker),
        "the capture does not see plaintext; the test would prove nothing"
    );
    // Through the instance: only ciphertext on the link.
    let url = exit.url_v4(&format!("/{marker}"));
    let seen = capture(&|| {
        let _ = curl(&["--socks5", &format!("127.0.0.1:{sp}"), &url]);
        let _ = curl(&["-x", &format!("http://127.0.0.1:{hp}"), &url]);
    });
    assert!(seen.contains("UDP"), "no tunnel traffic captured at all");
    assert!(
        !seen.contains(&marker),
        "plaintext marker seen on the exit link"
    );
    let _ = user.warren(&["down", &name]);
}

#[test]
fn host_tunnel_routes_a_lab_host_and_down_restores_it() {
    if !require_root("host_tunnel_routes_a_lab_host_and_down_restores_it") {
        return;
    }
    let mut exit = WgExit::start("host");
    let lab = warren_tests::TestNs::new(&format!("wrhl{}", std::process::id() % 100_000));
    exit.move_uplink_to(&lab.name);
    let dir = TestDir::new("inst-host");
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 198.18.52.53\n").expect("resolv");
    let sock = dir.join("helper.sock");
    let mut helper = warren_tests::start_lab_helper(&lab, &resolv, &sock, &dir.join("helper.log"));
    let user = User::new("inst-host-user", &sock, &exit);
    let snapshot = || {
        let mut s = String::new();
        for args in [
            &["rule", "show"][..],
            &["route", "show", "table", "all"],
            &["-6", "rule", "show"],
        ] {
            let out = run_limited(Command::new("ip").args(["-n", &lab.name]).args(args), LIMIT);
            s.push_str(
                &text(&out.stdout)
                    .lines()
                    .filter(|l| !l.contains("fe80:"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        }
        let nft = run_limited(lab.exec("nft").args(["list", "ruleset"]), LIMIT);
        s.push_str(&text(&nft.stdout));
        s.push_str(&std::fs::read_to_string(&resolv).expect("resolv"));
        s
    };
    let before = snapshot();
    let name = format!("h{}", std::process::id() % 100_000);
    let out = user.warren(&[
        "up",
        "--host",
        &name,
        "--wg",
        user.conf.to_str().expect("utf-8"),
        "--kill-switch",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "up --host: {}\n{}\n{}",
        text(&out.stderr),
        user.log(&name),
        helper.log()
    );
    let up: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let worker = up["worker_pid"].as_i64().expect("pid");
    // The lab host's own traffic goes through the tunnel, DNS too.
    let got = run_limited(
        lab.exec("curl")
            .args(["-sS", "--max-time", "8", &exit.url_v4("/")]),
        LIMIT,
    );
    assert_eq!(text(&got.stdout), exit.http_body(), "{}", text(&got.stderr));
    let r = std::fs::read_to_string(&resolv).expect("resolv");
    assert!(
        r.contains(&format!("nameserver {}", exit.tunnel_v4())),
        "DNS not switched: {r}"
    );
    let st = user.warren(&["status", "--json"]);
    assert!(
        text(&st.stdout).contains("\"host\":true"),
        "{}",
        text(&st.stdout)
    );
    // down restores routes, rules, firewall and DNS; the worker ends.
    let out = user.warren(&["down", &name]);
    assert!(out.status.success(), "down: {}", text(&out.stderr));
    assert!(
        wait_for(Duration::from_secs(5), || !pid_alive(worker)),
        "tunnel worker still running"
    );
    assert_eq!(snapshot(), before, "the lab host was not restored");
    helper.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = helper.wait_timeout(Duration::from_secs(10));
}

#[test]
fn host_tunnel_is_restored_when_its_worker_is_killed() {
    if !require_root("host_tunnel_is_restored_when_its_worker_is_killed") {
        return;
    }
    let mut exit = WgExit::start("hostkill");
    let lab = warren_tests::TestNs::new(&format!("wrhk{}", std::process::id() % 100_000));
    exit.move_uplink_to(&lab.name);
    let dir = TestDir::new("inst-hostkill");
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 198.18.52.53\n").expect("resolv");
    let sock = dir.join("helper.sock");
    let mut helper = warren_tests::start_lab_helper(&lab, &resolv, &sock, &dir.join("helper.log"));
    let user = User::new("inst-hostkill-user", &sock, &exit);
    let name = format!("k{}", std::process::id() % 100_000);
    let out = user.warren(&[
        "up",
        "--host",
        &name,
        "--wg",
        user.conf.to_str().expect("utf-8"),
        "--json",
    ]);
    assert!(out.status.success(), "up --host: {}", text(&out.stderr));
    let up: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let worker = up["worker_pid"].as_i64().expect("pid");
    // SAFETY: kill with a pid of a process this test started.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    let restored = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&resolv).is_ok_and(|r| r == "nameserver 198.18.52.53\n")
            && !text(
                &run_limited(
                    Command::new("ip").args(["-n", &lab.name, "rule", "show"]),
                    LIMIT,
                )
                .stdout,
            )
            .contains("lookup 518")
    });
    assert!(
        restored,
        "the lab host was not restored after kill -9 of the tunnel's worker\n{}",
        helper.log()
    );
    helper.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = helper.wait_timeout(Duration::from_secs(10));
}

#[test]
fn dns_from_the_instance_reaches_only_the_tunnel_dns() {
    if !require_root("dns_from_the_instance_reaches_only_the_tunnel_dns") {
        return;
    }
    let exit = WgExit::start("dns");
    let helper = Helper::start("inst-dns", &[]);
    let user = User::new("inst-dns-user", &helper.socket, &exit);
    // A resolver on the host side of the exit's link: nothing may reach it.
    let host_dns = UdpSocket::bind((exit.host_addr(), 53)).expect("host-side DNS listener");
    host_dns.set_nonblocking(true).expect("nonblocking");
    let name = iname("n");
    let (sp, hp) = free_ports();
    user.up(&name, &user.conf, sp, hp);
    let tag = std::process::id();
    let names = [
        format!("socks-{tag}.exit.test"),
        format!("http-{tag}.exit.test"),
        format!("exec-{tag}.exit.test"),
    ];
    let _ = curl(&[
        "--socks5-hostname",
        &format!("127.0.0.1:{sp}"),
        &format!("http://{}/", names[0]),
    ]);
    let _ = curl(&[
        "-x",
        &format!("http://127.0.0.1:{hp}"),
        &format!("http://{}/", names[1]),
    ]);
    let _ = user.warren(&["exec", &name, "--", "getent", "hosts", &names[2]]);
    let asked = exit.dns_queries();
    for n in &names {
        assert!(
            asked.iter().any(|q| q == n),
            "{n} never reached the tunnel's DNS: {asked:?}"
        );
    }
    let mut b = [0u8; 512];
    assert!(
        host_dns.recv_from(&mut b).is_err(),
        "a DNS query reached the host-side resolver"
    );
    let _ = user.warren(&["down", &name]);
}

/// A DNS server on `addr` answering A queries for `name` with `ip`
/// (NXDOMAIN otherwise) until the returned flag is set; counts queries.
fn fake_dns(
    addr: SocketAddr,
    name: &str,
    ip: std::net::Ipv4Addr,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicU32>,
) {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let count = std::sync::Arc::new(AtomicU32::new(0));
    let sock = UdpSocket::bind(addr).expect("fake DNS bind");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let (st, ct) = (stop.clone(), count.clone());
    let mut qname = Vec::new();
    for l in name.split('.') {
        qname.push(l.len() as u8);
        qname.extend_from_slice(l.as_bytes());
    }
    qname.push(0);
    std::thread::spawn(move || {
        let mut b = [0u8; 512];
        let t0 = std::time::Instant::now();
        while !st.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(120) {
            let Ok((n, from)) = sock.recv_from(&mut b) else {
                continue;
            };
            if n < 12 + qname.len() + 4 {
                continue;
            }
            ct.fetch_add(1, Ordering::Relaxed);
            let q = &b[12..12 + qname.len() + 4];
            let qtype = u16::from_be_bytes([q[qname.len()], q[qname.len() + 1]]);
            let hit = b[12..12 + qname.len()].eq_ignore_ascii_case(&qname);
            let mut r = b[..12 + qname.len() + 4].to_vec();
            r[2] = 0x81;
            r[3] = if hit { 0x80 } else { 0x83 };
            r[6..12].copy_from_slice(&[0, 0, 0, 0, 0, 0]);
            if hit && qtype == 1 {
                r[7] = 1;
                r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
                r.extend_from_slice(&ip.octets());
            }
            let _ = sock.send_to(&r, from);
        }
    });
    (stop, count)
}

#[test]
fn a_named_endpoint_is_looked_up_again_when_handshakes_fail() {
    if !require_root("a_named_endpoint_is_looked_up_again_when_handshakes_fail") {
        return;
    }
    let exit = WgExit::start("reresolve");
    let helper = Helper::start("inst-reresolve", &[]);
    let user = User::new("inst-reresolve-user", &helper.socket, &exit);
    let host = format!("exit-{}.test", std::process::id());
    // At start the name points at an address where no WireGuard answers
    // (the host's own end of the link); the DNS server knows better.
    let hosts = user.dir.join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n{} {host}\n", exit.host_addr()),
    )
    .expect("hosts");
    let resolv = user.dir.join("resolv.conf");
    let dns_addr: SocketAddr = (std::net::Ipv4Addr::new(127, 0, 0, 77), 53).into();
    std::fs::write(&resolv, format!("nameserver {}\n", dns_addr.ip())).expect("resolv");
    let std::net::IpAddr::V4(real) = exit.endpoint().ip() else {
        panic!("v4 endpoint")
    };
    let (stop, asked) = fake_dns(dns_addr, &host, real);
    let conf = std::fs::read_to_string(&user.conf).expect("conf").replace(
        &format!("Endpoint = {}", exit.endpoint()),
        &format!("Endpoint = {host}:{}", exit.endpoint().port()),
    );
    assert!(conf.contains(&host), "endpoint not replaced in {conf}");
    let named = user.dir.join("named.conf");
    std::fs::write(&named, conf).expect("write");
    std::fs::set_permissions(&named, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    chown(&named);
    let name = iname("rr");
    let (sp, hp) = free_ports();
    let out = user.warren_with_etc(
        &hosts,
        &resolv,
        &[
            "up",
            &name,
            "--wg",
            named.to_str().expect("utf-8"),
            "--socks-port",
            &sp.to_string(),
            "--http-port",
            &hp.to_string(),
            "--timeout",
            "20",
            "--json",
        ],
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        out.status.success(),
        "up with a stale name: {}\n{}",
        text(&out.stderr),
        user.log(&name)
    );
    assert!(
        asked.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the host's DNS was never asked"
    );
    assert_eq!(
        curl_ok(&["--socks5", &format!("127.0.0.1:{sp}"), &exit.url_v4("/")]),
        exit.http_body()
    );
    let _ = user.warren(&["down", &name]);
}

#[test]
fn foreground_up_as_the_user_unit_runs_it_stops_on_sigterm() {
    if !require_root("foreground_up_as_the_user_unit_runs_it_stops_on_sigterm") {
        return;
    }
    // systemd/user/warren-instance@.service runs `warren up %i --wg FILE
    // --foreground` and stops it with SIGTERM (then `warren down %i`).
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/user/warren-instance@.service"),
    )
    .expect("unit");
    assert!(
        unit.contains(
            "ExecStart=/usr/bin/warren up %i --wg %E/warren/instances/%i.conf --foreground"
        )
    );
    let exit = WgExit::start("fg");
    let helper = Helper::start("inst-fg", &[]);
    let user = User::new("inst-fg-user", &helper.socket, &exit);
    let name = iname("f");
    let (sp, hp) = free_ports();
    let mut c = as_user(ids::MEMBER, ids::GROUP, &[ids::GROUP], &bin("warren"));
    c.args(["--no-autostart", "up", &name, "--wg"])
        .arg(&user.conf)
        .args([
            "--foreground",
            "--socks-port",
            &sp.to_string(),
            "--http-port",
            &hp.to_string(),
        ])
        .env("XDG_RUNTIME_DIR", user.dir.path())
        .env("WARREN_HELPER_SOCKET", &helper.socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut fg = warren_tests::Proc::new(c.spawn().expect("up --foreground"), None);
    let socks = format!("127.0.0.1:{sp}");
    let up = wait_for(Duration::from_secs(10), || {
        curl(&["--socks5", &socks, "--max-time", "2", &exit.url_v4("/")]).1 == exit.http_body()
    });
    assert!(up, "foreground instance never served");
    fg.signal(nix::sys::signal::Signal::SIGTERM);
    let st = fg
        .wait_timeout(Duration::from_secs(10))
        .expect("up --foreground did not stop");
    assert!(st.success(), "{st:?}");
    assert!(
        wait_for(Duration::from_secs(5), || !netns_exists(&name)),
        "namespace left behind"
    );
    assert!(wait_for(Duration::from_secs(5), || port_free(sp) && port_free(hp)));
}

/// A character device node for /dev/net/tun that the test user may open
/// (this machine's is root-only; most distributions ship it 0666), bound
/// over /dev/net/tun in a private mount namespace for the user's commands.
fn user_tun_node(dir: &TestDir) -> std::path::PathBuf {
    let node = dir.join("tun");
    let out = run_limited(
        Command::new("mknod")
            .args(["-m", "0666"])
            .arg(&node)
            .args(["c", "10", "200"]),
        LIMIT,
    );
    assert!(out.status.success(), "mknod: {}", text(&out.stderr));
    node
}

/// `warren ARGS` as the test user with `tun` as its /dev/net/tun and no
/// helper (the user's helper socket does not exist).
fn warren_rootless(user: &User, tun: &Path, args: &[&str]) -> std::process::Output {
    user.warren_with_binds(&[(tun, "/dev/net/tun")], args)
}

#[test]
fn rootless_instance_without_any_helper() {
    if !require_root("rootless_instance_without_any_helper") {
        return;
    }
    let exit = WgExit::start("rootless");
    let user = User::new(
        "inst-rootless-user",
        Path::new("/nonexistent/helper.sock"),
        &exit,
    );
    let tun = user_tun_node(&user.dir);
    let name = iname("rl");
    let (sp, hp) = free_ports();
    let out = warren_rootless(
        &user,
        &tun,
        &[
            "up",
            &name,
            "--wg",
            user.conf.to_str().expect("utf-8"),
            "--socks-port",
            &sp.to_string(),
            "--http-port",
            &hp.to_string(),
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "rootless up: {}\n{}",
        text(&out.stderr),
        user.log(&name)
    );
    assert!(
        text(&out.stderr).contains("rootless"),
        "no notice of the fallback: {}",
        text(&out.stderr)
    );
    let up: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(up["rootless"], true);
    assert_eq!(up["stack"], "kernel");
    let worker = up["worker_pid"].as_i64().expect("pid");
    let socks = format!("127.0.0.1:{sp}");
    assert_eq!(
        curl_ok(&["--socks5", &socks, &exit.url_v4("/")]),
        exit.http_body()
    );
    assert_eq!(
        curl_ok(&["--socks5-hostname", &socks, "http://exit.test/"]),
        exit.http_body()
    );
    assert_eq!(
        curl_ok(&[
            "-x",
            &format!("http://127.0.0.1:{hp}"),
            "http://www.exit.test/"
        ]),
        exit.http_body()
    );
    let echoed = socks_udp_echo(
        socks.parse().expect("addr"),
        SocketAddr::new(exit.tunnel_v4().into(), 7),
        b"rootless udp",
    );
    assert_eq!(echoed, b"rootless udp");
    // exec joins the worker's namespaces as the same user.
    let out = warren_rootless(&user, &tun, &["exec", &name, "--", "id", "-u"]);
    assert!(out.status.success(), "exec: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), ids::MEMBER.to_string());
    let out = warren_rootless(
        &user,
        &tun,
        &[
            "exec",
            &name,
            "--",
            "curl",
            "-sS",
            "--max-time",
            "8",
            "http://exit.test/",
        ],
    );
    assert_eq!(text(&out.stdout), exit.http_body(), "{}", text(&out.stderr));
    let st = warren_rootless(&user, &tun, &["status", "--json"]);
    assert!(
        text(&st.stdout).contains("\"rootless\":true"),
        "{}",
        text(&st.stdout)
    );
    // kill -9: the kernel removes the namespaces with the last process; the
    // ports are free again.
    let ns_inode = std::fs::read_link(format!("/proc/{worker}/ns/net")).expect("netns link");
    // SAFETY: kill with a pid of a process this test started.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    assert!(
        wait_for(Duration::from_secs(5), || !pid_alive(worker)),
        "worker survived kill -9"
    );
    assert!(
        wait_for(Duration::from_secs(5), || port_free(sp) && port_free(hp)),
        "listeners survived the worker"
    );
    // No process is left in that network namespace.
    let left = std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| std::fs::read_link(e.path().join("ns/net")).is_ok_and(|l| l == ns_inode))
        .count();
    assert_eq!(
        left,
        0,
        "processes left in the rootless namespace {}",
        ns_inode.display()
    );
}

/// Finding 7 (issue 14), rootless: `warren exec` into a rootless instance
/// joins the worker's mount namespace, which now hides the host's
/// name-service sockets and binds `hosts: files dns` too. The worker is
/// started in a view (private mount namespace, tmpfs over /run: the
/// machine's own daemons are never touched) where listeners play
/// systemd-resolved's, nscd's and avahi's sockets and nsswitch.conf names
/// resolve and mdns; while `getent hosts` and a direct probe run under
/// `warren exec`, no listener gets a connection.
#[test]
fn finding_7_rootless_exec_never_reaches_host_name_service_sockets() {
    if !require_root("finding_7_rootless_exec_never_reaches_host_name_service_sockets") {
        return;
    }
    let exit = WgExit::start("rl-nss");
    let user = User::new(
        "inst-rl-nss-user",
        Path::new("/nonexistent/helper.sock"),
        &exit,
    );
    let tun = user_tun_node(&user.dir);
    let lab = TestDir::new("rl-nss-lab");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let daemons: Vec<(&str, warren_tests::FakeDaemon)> = [
        ("/run/systemd/resolve/io.systemd.Resolve", "resolve.sock"),
        ("/run/nscd/socket", "nscd.sock"),
        ("/run/avahi-daemon/socket", "avahi.sock"),
    ]
    .iter()
    .map(|(real, f)| (*real, warren_tests::FakeDaemon::new(lab.join(f), &stop)))
    .collect();
    let nss = lab.join("nsswitch.conf");
    std::fs::write(
        &nss,
        "# warren-lab-nsswitch\npasswd: files\nhosts: files resolve [!UNAVAIL=return] mdns4_minimal [NOTFOUND=return] dns\n",
    )
    .expect("lab nsswitch.conf");
    let mut script = format!(
        "mount --bind {tun} /dev/net/tun && mount --bind {nss} /etc/nsswitch.conf && mount -t tmpfs -o mode=0755 warren-lab-run /run",
        tun = tun.display(),
        nss = nss.display()
    );
    for (real, d) in &daemons {
        let parent = Path::new(real).parent().expect("dir");
        script.push_str(&format!(
            " && mkdir -p {} && touch {real} && mount --bind {} {real}",
            parent.display(),
            d.path.display()
        ));
    }
    script.push_str(&format!(
        " && exec setpriv --reuid={} --regid={} --groups={} --inh-caps=-all -- {} \"$@\"",
        ids::MEMBER,
        ids::GROUP,
        ids::GROUP,
        bin("warren").display()
    ));
    let name = iname("rn");
    let (sp, hp) = free_ports();
    let mut up = Command::new("unshare");
    up.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        &script,
        "sh",
    ]);
    let out = user.run(
        &mut up,
        &[
            "up",
            &name,
            "--rootless",
            "--wg",
            user.conf.to_str().expect("utf-8"),
            "--socks-port",
            &sp.to_string(),
            "--http-port",
            &hp.to_string(),
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "rootless up: {}\n{}",
        text(&out.stderr),
        user.log(&name)
    );
    let worker =
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["worker_pid"]
            .as_i64()
            .expect("pid");
    // Only what the program does counts (up and its worker may have looked
    // their user up).
    std::thread::sleep(Duration::from_millis(100));
    let before: Vec<usize> = daemons.iter().map(|(_, d)| d.accepted()).collect();
    let probe = user.dir.join("unix_probe");
    std::fs::copy(bin("examples/unix_probe"), &probe).expect("copy probe");
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let program = format!(
        "echo ==nsswitch; cat /etc/nsswitch.conf; echo ==getent; \
         timeout 20 getent hosts warren-leak-probe.example; echo ==probe; \
         {} /run/systemd/resolve/io.systemd.Resolve /run/nscd/socket /var/run/nscd/socket \
         /run/avahi-daemon/socket /var/run/avahi-daemon/socket",
        probe.display()
    );
    // `warren exec` itself runs in the machine's view (no fake daemons
    // there); its program joins the worker's.
    let out = warren_rootless(&user, &tun, &["exec", &name, "--", "sh", "-c", &program]);
    std::thread::sleep(Duration::from_millis(200));
    let reached: Vec<String> = daemons
        .iter()
        .zip(&before)
        .filter(|((_, d), b)| d.accepted() > **b)
        .map(|((real, d), b)| format!("{real} ({} connections)", d.accepted() - b))
        .collect();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    // SAFETY: kill with the pid of the worker this test started.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    assert!(wait_for(Duration::from_secs(5), || !pid_alive(worker)));
    let shown = text(&out.stdout);
    assert!(
        reached.is_empty(),
        "host name-service sockets reached: {reached:?}; program output:\n{shown}\n{}",
        text(&out.stderr)
    );
    assert!(shown.contains("==probe"), "{shown}\n{}", text(&out.stderr));
    assert!(!shown.contains(" connected"), "{shown}");
    let hosts: Vec<Vec<&str>> = shown
        .lines()
        .filter(|l| l.trim_start().starts_with("hosts:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(hosts, vec![vec!["hosts:", "files", "dns"]], "{shown}");
    assert!(shown.contains("# warren-lab-nsswitch"), "{shown}");
}

#[test]
fn forwards_and_reverse_forwards() {
    if !require_root("forwards_and_reverse_forwards") {
        return;
    }
    let exit = WgExit::start("fwd");
    let helper = Helper::start("inst-fwd", &[]);
    let user = User::new("inst-fwd-user", &helper.socket, &exit);
    let name = iname("fw");
    let (sp, hp) = free_ports();
    let (fp, up_port) = free_ports();
    let local = host_http("hello from the host\n");
    let out = user.warren(&[
        "up",
        &name,
        "--wg",
        user.conf.to_str().expect("utf-8"),
        "--socks-port",
        &sp.to_string(),
        "--http-port",
        &hp.to_string(),
        "--forward",
        &format!("tcp:127.0.0.1:{fp}={}:80", exit.tunnel_v4()),
        "--forward",
        &format!("udp:127.0.0.1:{up_port}={}:7", exit.tunnel_v4()),
        "--reverse",
        &format!("tcp:{}:2222=127.0.0.1:{local}", exit.client_v4()),
    ]);
    assert!(
        out.status.success(),
        "up with forwards: {}\n{}",
        text(&out.stderr),
        user.log(&name)
    );
    // A local port reaches the exit's web server (TCP) and echo server
    // (UDP); from inside the exit, the instance's tunnel address reaches a
    // service on this host.
    assert_forwards_work(&exit, fp, up_port, &|| user.log(&name));
    let out = user.warren(&["down", &name]);
    assert!(out.status.success());
    assert!(
        wait_for(Duration::from_secs(5), || port_free(fp)),
        "forward port left bound"
    );
    // The connector ends with the worker.
    assert!(
        wait_for(Duration::from_secs(5), || connectors_for(local) == 0),
        "the reverse connector outlived the instance"
    );
}

#[test]
fn rootless_down_stops_the_worker_and_frees_its_ports() {
    if !require_root("rootless_down_stops_the_worker_and_frees_its_ports") {
        return;
    }
    let exit = WgExit::start("rldown");
    let user = User::new(
        "inst-rldown-user",
        Path::new("/nonexistent/helper.sock"),
        &exit,
    );
    let tun = user_tun_node(&user.dir);
    let name = iname("rd");
    let (sp, hp) = free_ports();
    let out = warren_rootless(
        &user,
        &tun,
        &[
            "up",
            &name,
            "--wg",
            user.conf.to_str().expect("utf-8"),
            "--rootless",
            "--socks-port",
            &sp.to_string(),
            "--http-port",
            &hp.to_string(),
            "--json",
        ],
    );
    assert!(out.status.success(), "rootless up: {}", text(&out.stderr));
    let up: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let worker = up["worker_pid"].as_i64().expect("pid");
    let out = warren_rootless(&user, &tun, &["down", &name]);
    assert!(out.status.success(), "down: {}", text(&out.stderr));
    assert!(
        !pid_alive(worker),
        "worker still running after down returned"
    );
    assert!(
        port_free(sp) && port_free(hp),
        "ports still bound after down returned"
    );
    let out = warren_rootless(&user, &tun, &["down", &name]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("no instance"),
        "{}",
        text(&out.stderr)
    );
}
