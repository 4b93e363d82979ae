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
    let lab = Lab::new("b", 42);
    let host_helper = Helper::start("wgserver-b", &[]);
    let user = User::bare("wgserver-b-user", &host_helper.socket);
    let (mut server, conf) = lab.start_exit(&user);
    wait_server(&lab, &mut server);
    let client = lab.add_peer(&user, &conf, "laptop", &format!("198.18.{}.6:51820", lab.n));
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
