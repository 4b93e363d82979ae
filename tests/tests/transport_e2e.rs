//! `warren client` ↔ `warren server` over tls and tls-mux across
//! namespaces: the client on the host, the server in S, the web and UDP
//! echo servers in I, which only S can reach. Rules: `proxy` goes through
//! the server, `block` is refused. A restarted tls-mux server is found
//! again. Run as root (CI does); they fail, never skip, otherwise.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use warren_tests::{Proc, TestDir, bin, require_root, run_limited, wait_for};

const SECRET: &str = "correct horse battery staple";

/// A self-signed certificate for `server.test`; returns (dir, pin).
fn cert() -> (TestDir, String) {
    let dir = TestDir::new("transport-cert");
    let out = run_limited(
        Command::new(bin("warren"))
            .args(["cert", "--name", "server.test", "--out-dir"])
            .arg(dir.path()),
        LIMIT,
    );
    assert!(out.status.success(), "warren cert: {}", text(&out.stderr));
    let pin = text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("pin:").map(|p| p.trim().to_string()))
        .expect("pin printed");
    (dir, pin)
}

fn server(lab: &Lab, certs: &TestDir, mode: &str, port: u16) -> Proc {
    let log = lab.dir.join(&format!("server-{mode}.log"));
    let child = lab
        .s
        .exec(bin("warren").to_str().expect("utf-8"))
        .args([
            "server",
            "--mode",
            mode,
            "--listen",
            &format!("198.18.{}.6:{port}", lab.n),
        ])
        .arg("--cert")
        .arg(certs.join("cert.pem"))
        .arg("--key")
        .arg(certs.join("key.pem"))
        .env("WARREN_PASSWORD", SECRET)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("warren server");
    let mut p = Proc::new(child, Some(log));
    let up = wait_for(Duration::from_secs(10), || {
        !run_limited(
            lab.s
                .exec("ss")
                .args(["-Hltn", &format!("sport = :{port}")]),
            LIMIT,
        )
        .stdout
        .is_empty()
    });
    assert!(up && p.running(), "server did not start: {}", p.log());
    p
}

fn client(
    lab: &Lab,
    mode: &str,
    port: u16,
    pin: &str,
    config: &std::path::Path,
) -> (Proc, u16, u16) {
    let (sp, hp) = free_ports();
    let log = lab.dir.join(&format!("client-{mode}.log"));
    let child = Command::new(bin("warren"))
        .args([
            "client",
            "--mode",
            mode,
            "--server",
            &format!("198.18.{}.6:{port}", lab.n),
        ])
        .args(["--server-name", "server.test", "--pin", pin])
        .args([
            "--socks",
            &format!("127.0.0.1:{sp}"),
            "--http",
            &format!("127.0.0.1:{hp}"),
        ])
        .arg("--config")
        .arg(config)
        .env("WARREN_PASSWORD", SECRET)
        .env("XDG_RUNTIME_DIR", lab.dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("warren client");
    let mut p = Proc::new(child, Some(log));
    let up = wait_for(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", sp)).is_ok()
    });
    assert!(up && p.running(), "client did not start: {}", p.log());
    (p, sp, hp)
}

#[test]
fn client_reaches_the_internet_namespace_through_each_mode() {
    if !require_root("client_reaches_the_internet_namespace_through_each_mode") {
        return;
    }
    let lab = Lab::new("t", 43);
    let (certs, pin) = cert();
    let config = lab.dir.join("client.toml");
    std::fs::write(
        &config,
        "[rules]\ndefault = \"proxy\"\nblock = [\"blocked.test\"]\n",
    )
    .expect("config");
    for (mode, port) in [("tls", 8443), ("tls-mux", 8444)] {
        let _server = server(&lab, &certs, mode, port);
        let (mut c, sp, hp) = client(&lab, mode, port, &pin, &config);
        let url = format!("http://{}/", lab.web());
        let socks = format!("127.0.0.1:{sp}");
        // I's body names I; only S (the server) has a link to I.
        assert_eq!(
            curl_ok(&["--socks5", &socks, &url]),
            lab.body(),
            "{mode} SOCKS5\n{}",
            c.log()
        );
        assert_eq!(
            curl_ok(&["--socks5-hostname", &socks, &url]),
            lab.body(),
            "{mode} SOCKS5 name"
        );
        assert_eq!(
            curl_ok(&["-x", &format!("http://127.0.0.1:{hp}"), &url]),
            lab.body(),
            "{mode} HTTP"
        );
        let (blocked, _, _) = curl(&["--socks5-hostname", &socks, "http://blocked.test/"]);
        assert!(!blocked, "a blocked name went through");
        let echoed = socks_udp_echo(
            socks.parse().expect("addr"),
            format!("{}:7", lab.web()).parse().expect("addr"),
            format!("udp over {mode}").as_bytes(),
        );
        assert_eq!(echoed, format!("udp over {mode}").as_bytes());
        c.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = c.wait_timeout(Duration::from_secs(10));
    }
}

#[test]
fn tls_mux_client_survives_a_server_restart() {
    if !require_root("tls_mux_client_survives_a_server_restart") {
        return;
    }
    let lab = Lab::new("r", 44);
    let (certs, pin) = cert();
    let config = lab.dir.join("client.toml");
    std::fs::write(&config, "").expect("config");
    let mut s = server(&lab, &certs, "tls-mux", 8444);
    let (c, sp, _) = client(&lab, "tls-mux", 8444, &pin, &config);
    let socks = format!("127.0.0.1:{sp}");
    let url = format!("http://{}/", lab.web());
    assert_eq!(curl_ok(&["--socks5", &socks, &url]), lab.body());
    s.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = s.wait_timeout(Duration::from_secs(5));
    let (during, _, _) = curl(&["--socks5", &socks, "--max-time", "3", &url]);
    assert!(!during, "a request went through with no server");
    let _s2 = server(&lab, &certs, "tls-mux", 8444);
    let back = wait_for(Duration::from_secs(30), || {
        curl(&["--socks5", &socks, "--max-time", "3", &url]).1 == lab.body()
    });
    assert!(back, "the tls-mux client did not reconnect\n{}", c.log());
}
