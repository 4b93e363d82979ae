//! `warren server --mode wg` as a WireGuard exit, in three namespaces: an
//! exit host S (its own helper, a default route to I), an "internet" I
//! with an HTTP server and a UDP echo server, and a client C. A
//! wireguard-go client in C and a warren instance on the host both use the
//! warren exit. Run as root (CI does); they fail, never skip, otherwise.

mod common;

use std::time::Duration;

use common::*;
use warren_tests::wgexit::WgGoClient;
use warren_tests::{Helper, Proc, require_root, run_limited, wait_for};

/// Waits until the server listens on UDP 51820 in S.
fn wait_server(lab: &Lab, server: &mut Proc) {
    let up = wait_for(Duration::from_secs(10), || {
        !run_limited(lab.s.exec("ss").args(["-Hlun", "sport = :51820"]), LIMIT)
            .stdout
            .is_empty()
    });
    assert!(
        up && server.running(),
        "warren server did not start:\n{}",
        server.log()
    );
    std::thread::sleep(Duration::from_millis(200));
}

/// A lab with the warren exit serving in S, and a helper on the host with
/// a user of it (for warren instances as the exit's clients).
fn exit_and_host_user(tag: &str, n: u8) -> (Lab, Helper, User, Proc, std::path::PathBuf) {
    let lab = Lab::new(tag, n);
    let host_helper = Helper::start(&format!("wgserver-{tag}"), &[]);
    let user = User::bare(&format!("wgserver-{tag}-user"), &host_helper.socket);
    let (mut server, conf) = lab.start_exit(&user);
    wait_server(&lab, &mut server);
    (lab, host_helper, user, server, conf)
}

/// Makes the exit read its peers now (SIGHUP), rather than at its next
/// file check (every 2 s, and a second `add-peer` within one check is only
/// seen at the following one), and waits until it says so.
fn reload_peers(server: &Proc) {
    let before = server.log().matches("SIGHUP: peers reloaded").count();
    server.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(5), || {
            server.log().matches("SIGHUP: peers reloaded").count() > before
        }),
        "the exit did not reload its peers:\n{}",
        server.log()
    );
}

#[test]
fn a_wireguard_go_client_uses_the_warren_exit_and_stopping_it_restores_s() {
    if !require_root("a_wireguard_go_client_uses_the_warren_exit_and_stopping_it_restores_s") {
        return;
    }
    let lab = Lab::new("a", 41);
    let user = User::bare("wgserver-a-user", &lab.helper_sock);
    let before = lab.nft_ruleset();
    let (mut server, conf) = lab.start_exit(&user);
    wait_server(&lab, &mut server);
    assert!(
        lab.nft_ruleset().contains("warren_"),
        "no NAT table while the exit runs"
    );
    let client = lab.add_peer(&user, &conf, "wggo", &format!("198.18.{}.10:51820", lab.n));
    reload_peers(&server);
    let web = format!("{}/32", lab.web());
    let wg = WgGoClient::from_conf(&lab.c.name, &client, &[&web]);
    let got = wait_for(Duration::from_secs(15), || {
        run_limited(
            lab.c
                .exec("curl")
                .args(["-sS", "--max-time", "3", &format!("http://{}/", lab.web())]),
            LIMIT,
        )
        .stdout
            == lab.body().as_bytes()
    });
    assert!(
        got,
        "the wireguard-go client did not reach the internet through the warren exit\n{}",
        server.log()
    );
    assert!(wg.latest_handshake().is_some());
    // Stopping the server removes its tunnel and NAT table.
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        server
            .wait_timeout(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "server did not stop cleanly"
    );
    assert!(
        wait_for(Duration::from_secs(5), || lab.nft_ruleset() == before),
        "NAT table left behind:\n{}",
        lab.nft_ruleset()
    );
}

#[test]
fn warren_on_both_ends_instance_through_the_warren_exit() {
    if !require_root("warren_on_both_ends_instance_through_the_warren_exit") {
        return;
    }
    let (lab, _host_helper, user, mut server, conf) = exit_and_host_user("b", 42);
    let client = lab.add_peer(&user, &conf, "laptop", &format!("198.18.{}.6:51820", lab.n));
    reload_peers(&server);
    let cconf = user.write_conf("laptop.conf", &client);
    let name = iname("b");
    let (sp, hp) = free_ports();
    user.up(&name, &cconf, sp, hp);
    let socks = format!("127.0.0.1:{sp}");
    assert_eq!(
        curl_ok(&["--socks5", &socks, &format!("http://{}/", lab.web())]),
        lab.body()
    );
    assert_eq!(
        curl_ok(&[
            "-x",
            &format!("http://127.0.0.1:{hp}"),
            &format!("http://{}/", lab.web())
        ]),
        lab.body()
    );
    let echoed = socks_udp_echo(
        socks.parse().expect("addr"),
        format!("{}:7", lab.web()).parse().expect("addr"),
        b"udp through two warrens",
    );
    assert_eq!(echoed, b"udp through two warrens");
    let _ = user.warren(&["down", &name]);
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = server.wait_timeout(Duration::from_secs(10));
}

/// The status of instance `name` (its `instance` object) from
/// `warren status --json`.
fn instance_status(user: &User, name: &str) -> serde_json::Value {
    let out = user.warren(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    st["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["instance"]["name"] == name))
        .map(|i| i["instance"].clone())
        .unwrap_or_else(|| panic!("instance {name} missing from status: {st}"))
}

fn sha256_file(p: &std::path::Path) -> String {
    let out = run_limited(std::process::Command::new("sha256sum").arg(p), LIMIT);
    assert!(out.status.success());
    text(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// 16 MiB down and 16 MiB up through a warren instance and the warren
/// exit, byte for byte (SHA-256 on both sides); returns the instance's
/// TUN figures after the transfers.
fn bulk_both_ways(lab: &Lab, user: &User, name: &str, socks: &str) -> serde_json::Value {
    let file = user.dir.join(&format!("{name}.down"));
    let headers = user.dir.join(&format!("{name}.headers"));
    let _ = curl_ok(&[
        "--socks5",
        socks,
        "--max-time",
        "60",
        "-D",
        headers.to_str().expect("utf-8"),
        "-o",
        file.to_str().expect("utf-8"),
        &format!("http://{}/big", lab.web()),
    ]);
    let sent = std::fs::read_to_string(&headers)
        .expect("headers")
        .lines()
        .find_map(|l| l.strip_prefix("X-Sha256: ").map(|v| v.trim().to_string()))
        .expect("X-Sha256 header");
    assert_eq!(
        std::fs::metadata(&file).expect("download").len(),
        16 << 20,
        "download size"
    );
    assert_eq!(sha256_file(&file), sent, "the download arrived altered");
    // Upload: different bytes, hashed by the server in the internet namespace.
    let up = user.dir.join(&format!("{name}.up"));
    let mut data = std::fs::read(&file).expect("read");
    data.reverse();
    std::fs::write(&up, &data).expect("write");
    let got = curl_ok(&[
        "--socks5",
        socks,
        "--max-time",
        "60",
        "--data-binary",
        &format!("@{}", up.display()),
        "-H",
        "Content-Type: application/octet-stream",
        &format!("http://{}/hash", lab.web()),
    ]);
    assert_eq!(got, sha256_file(&up), "the upload arrived altered");
    instance_status(user, name)["tun"].clone()
}

#[test]
fn tun_offloads_carry_bulk_tcp_intact_both_ways_and_can_be_turned_off() {
    if !require_root("tun_offloads_carry_bulk_tcp_intact_both_ways_and_can_be_turned_off") {
        return;
    }
    let (lab, _host_helper, user, mut server, conf) = exit_and_host_user("o", 45);
    let endpoint = format!("198.18.{}.6:51820", lab.n);
    let on_conf = user.write_conf("on.conf", &lab.add_peer(&user, &conf, "on", &endpoint));
    let off_conf = user.write_conf("off.conf", &lab.add_peer(&user, &conf, "off", &endpoint));
    reload_peers(&server);

    // Offloads on (the default).
    let on = iname("on");
    let (sp, hp) = free_ports();
    user.up(&on, &on_conf, sp, hp);
    let tun = bulk_both_ways(&lab, &user, &on, &format!("127.0.0.1:{sp}"));
    assert_eq!(tun["offload"], true, "{tun}");
    let n = |k: &str| tun[k].as_u64().unwrap_or(0);
    // Downloads arrive as segments from the exit: the instance merges them
    // (more packets than writes). Uploads leave the namespace's TCP as TSO
    // packets: the instance cuts them (more segments than reads).
    for (many, few) in [("coalesced", "gso_writes"), ("segments", "gso_reads")] {
        assert!(n(few) > 0 && n(many) > n(few), "{few}/{many}: {tun}");
    }
    assert_eq!(tun["bad_reads"], 0, "{tun}");
    let plain = text(&user.warren(&["status"]).stdout);
    assert!(plain.contains("TUN offloads on"), "{plain}");

    // Offloads off for the second instance: same bytes, no merging.
    let off = iname("off");
    let (sp2, hp2) = free_ports();
    let out = user.run_env(
        &mut warren_tests::as_user(
            warren_tests::ids::MEMBER,
            warren_tests::ids::GROUP,
            &[warren_tests::ids::GROUP],
            &warren_tests::bin("warren"),
        ),
        &[("WARREN_WG_OFFLOAD", "0")],
        &[
            "up",
            &off,
            "--wg",
            off_conf.to_str().expect("utf-8"),
            "--socks-port",
            &sp2.to_string(),
            "--http-port",
            &hp2.to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "up with offloads off: {}",
        text(&out.stderr)
    );
    let tun = bulk_both_ways(&lab, &user, &off, &format!("127.0.0.1:{sp2}"));
    assert_eq!(tun["offload"], false, "{tun}");
    for k in ["gso_writes", "coalesced", "gso_reads", "segments"] {
        assert_eq!(tun[k], 0, "{k} with offloads off: {tun}");
    }
    let _ = user.warren(&["down", "--all"]);

    // The exit merged the uploads of both: it says so when it stops.
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        server
            .wait_timeout(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "server did not stop cleanly"
    );
    let log = server.log();
    let merged = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tun_gso_writes="))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(merged.is_some_and(|n| n > 0), "exit merged nothing:\n{log}");
}
