//! The WireGuard exit fixture ([`warren_tests::wgexit`]) against a plain
//! `wireguard-go` client, no warren code involved: HTTP, DNS and echo
//! through the tunnel, handshakes, a peer restart, parallel exits, and
//! clean-up. Run as root (CI does); they fail, never skip, in CI otherwise.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use warren_tests::wgexit::{PlainClient, WgExit};
use warren_tests::{require_root, run_limited, wait_for};

const LIMIT: Duration = Duration::from_secs(20);

/// Runs `cmd` (bounded), returning (success, stdout, stderr).
fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = run_limited(cmd, LIMIT);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `curl URL` from the plain client.
fn curl(client: &PlainClient, url: &str) -> String {
    let (ok, out, err) = run(client
        .exec("curl")
        .args(["-sS", "--max-time", "5", "-g", url]));
    assert!(ok, "curl {url} from {}: {err}", client.netns());
    out
}

fn netns_list() -> String {
    run(Command::new("ip").args(["netns", "list"])).1
}

fn link_exists(name: &str) -> bool {
    run(Command::new("ip").args(["link", "show", "dev", name])).0
}

/// Asserts that nothing named after `exit`/`client` is left.
fn assert_gone(netns: &[String], links: &[String]) {
    let list = netns_list();
    for ns in netns {
        assert!(
            !list.split_whitespace().any(|w| w == ns),
            "netns {ns} left behind:\n{list}"
        );
    }
    for l in links {
        assert!(!link_exists(l), "link {l} left behind");
    }
}

#[test]
fn plain_client_reaches_http_dns_and_echo_through_the_exit() {
    if !require_root("plain_client_reaches_http_dns_and_echo_through_the_exit") {
        return;
    }
    let exit = WgExit::start("fixture");
    let k = exit.index();
    assert_eq!(exit.tunnel_v4().to_string(), format!("198.19.{k}.1"));
    assert_eq!(exit.tunnel_v6().to_string(), format!("fd00:19:{k}::1"));
    assert_eq!(exit.endpoint().to_string(), format!("198.18.{k}.2:51820"));
    assert!(exit.host_veth().len() <= 15 && exit.exit_veth().len() <= 15);

    // The exit's endpoint is reachable from the host namespace: a TCP
    // connection to a closed port there is refused (not unreachable).
    let probe = format!(
        "import socket\ntry:\n socket.create_connection(('{}', 9), timeout=3)\n\
         except ConnectionRefusedError:\n print('refused')",
        exit.endpoint().ip()
    );
    let (_, out, err) = run(Command::new("python3").args(["-c", &probe]));
    assert_eq!(out.trim(), "refused", "host -> exit veth: {err}");

    // The client configuration for warren.
    let conf_path = exit.client_conf();
    let mode = std::fs::metadata(&conf_path)
        .expect("conf")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let conf = std::fs::read_to_string(&conf_path).expect("conf");
    for want in [
        format!("Address = 198.19.{k}.2/32, fd00:19:{k}::2/128"),
        format!("DNS = 198.19.{k}.1"),
        "MTU = 1420".to_string(),
        format!("PublicKey = {}", exit.exit_public_key()),
        format!("Endpoint = 198.18.{k}.2:51820"),
        "AllowedIPs = 0.0.0.0/0, ::/0".to_string(),
        "PersistentKeepalive = 25".to_string(),
    ] {
        assert!(conf.contains(&want), "{want:?} missing from:\n{conf}");
    }
    assert!(conf.contains("PrivateKey = ") && conf.contains("PresharedKey = "));
    assert_eq!(
        exit.latest_handshake(),
        None,
        "no handshake before a client"
    );

    let client = exit.plain_client();
    assert_eq!(curl(&client, &exit.url_v4("/")), exit.http_body());
    assert_eq!(curl(&client, &exit.url_v6("/")), exit.http_body());
    assert_eq!(exit.http_body(), format!("exit fixture {k}\n"));
    let (ok, size, err) = run(client.exec("curl").args([
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &exit.url_v4("/bytes/3000000"),
    ]));
    assert!(ok, "{err}");
    assert_eq!(size.trim(), "3000000");

    // DNS, both families, with the query log.
    let dig = |server: String, name: &str, qtype: &str| {
        let (ok, out, err) = run(client.exec("dig").args([
            "+time=2",
            "+tries=1",
            &format!("@{server}"),
            name,
            qtype,
            "+short",
        ]));
        assert!(ok, "dig @{server} {name} {qtype}: {out}{err}");
        out.trim().to_string()
    };
    assert_eq!(
        dig(exit.tunnel_v4().to_string(), "exit.test", "A"),
        exit.tunnel_v4().to_string()
    );
    assert_eq!(
        dig(exit.tunnel_v6().to_string(), "www.exit.test", "AAAA"),
        exit.tunnel_v6().to_string()
    );
    let (_, out, _) = run(client.exec("dig").args([
        "+time=2",
        "+tries=1",
        &format!("@{}", exit.tunnel_v4()),
        "nope.example",
        "A",
    ]));
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    let queries = exit.dns_queries();
    assert_eq!(
        queries,
        vec!["exit.test", "www.exit.test", "nope.example"],
        "query log"
    );

    // UDP echo, both families.
    for addr in [exit.tunnel_v4().to_string(), exit.tunnel_v6().to_string()] {
        let script = format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET6 if ':' in '{addr}' else socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.settimeout(3)\n\
             s.sendto(b'warren-echo', ('{addr}', 7))\n\
             print(s.recvfrom(100)[0].decode())"
        );
        let (ok, out, err) = run(client.exec("python3").args(["-c", &script]));
        assert!(ok, "echo via {addr}: {err}");
        assert_eq!(out.trim(), "warren-echo");
    }

    assert!(exit.latest_handshake().is_some(), "{}", exit.wg_show());
    assert!(client.latest_handshake().is_some(), "{}", client.wg_show());
    assert!(exit.server_log().contains("GET /"));

    let names = vec![exit.netns().to_string(), client.netns().to_string()];
    let links = vec![exit.host_veth().to_string()];
    drop(client);
    assert!(
        !netns_list()
            .split_whitespace()
            .any(|w| w == names[1].as_str()),
        "client netns removed on its own"
    );
    drop(exit);
    assert_gone(&names, &links);
}

#[test]
fn restarted_exit_takes_the_client_back() {
    if !require_root("restarted_exit_takes_the_client_back") {
        return;
    }
    let mut exit = WgExit::start("restart");
    let client = exit.plain_client();
    assert_eq!(curl(&client, &exit.url_v4("/")), exit.http_body());
    let before = exit.wg_pid().expect("wireguard-go runs");

    exit.stop_wireguard();
    assert_eq!(exit.wg_pid(), None);
    let (ok, _, _) = run(client
        .exec("curl")
        .args(["-sS", "--max-time", "2", &exit.url_v4("/")]));
    assert!(!ok, "no answer while the exit's WireGuard is down");

    exit.restart_wireguard();
    let after = exit.wg_pid().expect("wireguard-go runs again");
    assert_ne!(before, after);
    assert_eq!(exit.latest_handshake(), None, "fresh wireguard-go");
    // The client's session is stale; wireguard-go re-handshakes after
    // about 15 s without an answer. Bounded: 8 tries of up to 5 s each.
    let mut body = String::new();
    for _ in 0..8 {
        let (ok, out, _) =
            run(client
                .exec("curl")
                .args(["-sS", "--max-time", "5", &exit.url_v4("/")]));
        if ok {
            body = out;
            break;
        }
    }
    assert_eq!(body, exit.http_body(), "{}", exit.wireguard_log());
    assert!(exit.latest_handshake().is_some());
}

#[test]
fn two_exits_at_once_are_distinct_and_clean_up() {
    if !require_root("two_exits_at_once_are_distinct_and_clean_up") {
        return;
    }
    let a = WgExit::start("a");
    let b = WgExit::start("b");
    assert_ne!(a.index(), b.index());
    assert_ne!(a.netns(), b.netns());
    assert_ne!(a.host_veth(), b.host_veth());
    assert_ne!(a.http_body(), b.http_body());
    assert_ne!(a.client_public_key(), b.client_public_key());
    let ca = a.plain_client();
    let cb = b.plain_client();
    assert_eq!(curl(&ca, &a.url_v4("/")), a.http_body());
    assert_eq!(curl(&cb, &b.url_v4("/")), b.http_body());
    // Each client only reaches its own exit.
    let (ok, _, _) = run(ca
        .exec("curl")
        .args(["-sS", "--max-time", "2", &b.url_v4("/")]));
    assert!(!ok, "client of a must not reach b");

    let names: Vec<String> = [a.netns(), b.netns(), ca.netns(), cb.netns()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let links = vec![a.host_veth().to_string(), b.host_veth().to_string()];
    let wg_pids = [ca.wg_pid(), cb.wg_pid()];
    drop((ca, cb, a, b));
    assert_gone(&names, &links);
    assert!(
        wait_for(Duration::from_secs(5), || wg_pids
            .iter()
            .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())),
        "client wireguard-go processes gone"
    );
}
