//! `warren server --mode wg` as a WireGuard exit, in three namespaces: an
//! exit host S (its own helper, a default route to I), an "internet" I
//! with an HTTP server and a UDP echo server, and a client C. A
//! wireguard-go client in C and a warren instance on the host both use the
//! warren exit. Run as root (CI does); they fail, never skip, otherwise.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use warren_tests::wgexit::WgGoClient;
use warren_tests::{Helper, Proc, TestDir, TestNs, bin, ids, require_root, run_limited, wait_for};

/// The three namespaces and what runs in them. `n` picks 198.18.n.0/24.
struct Lab {
    n: u8,
    s: TestNs,
    c: TestNs,
    _i: TestNs,
    helper: Proc,
    helper_sock: std::path::PathBuf,
    servers: Proc,
    host_link: String,
    dir: TestDir,
}

const SERVERS: &str = r#"
import socket, sys, threading, http.server
ip = sys.argv[1]
body = ("internet " + ip + "\n").encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer.address_family = socket.AF_INET
srv = http.server.HTTPServer((ip, 80), H)
def echo():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((ip, 7))
    while True:
        d, a = u.recvfrom(2048); u.sendto(d, a)
threading.Thread(target=echo, daemon=True).start()
print("up", flush=True)
srv.timeout = 1
import time
end = time.time() + 300
while time.time() < end:
    srv.handle_request()
"#;

fn ip(args: &[&str]) {
    let out = run_limited(Command::new("ip").args(args), LIMIT);
    assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
}

impl Lab {
    fn new(tag: &str, n: u8) -> Lab {
        let pid = std::process::id() % 10_000;
        let s = TestNs::new(&format!("wrs{tag}{pid}"));
        let i = TestNs::new(&format!("wri{tag}{pid}"));
        let c = TestNs::new(&format!("wrc{tag}{pid}"));
        let a = |last: u8| format!("198.18.{n}.{last}/30");
        s.veth(
            &format!("ws{n}i{pid}"),
            &a(1),
            &i,
            &format!("wi{n}s{pid}"),
            &a(2),
        );
        s.veth(
            &format!("ws{n}c{pid}"),
            &a(10),
            &c,
            &format!("wc{n}s{pid}"),
            &a(9),
        );
        s.ip(&["link", "set", "lo", "up"]);
        s.ip(&["route", "add", "default", "via", &format!("198.18.{n}.2")]);
        // The host reaches S directly (for a warren instance as the client).
        let host_link = format!("wh{n}s{pid}");
        ip(&[
            "link",
            "add",
            &host_link,
            "type",
            "veth",
            "peer",
            "name",
            &format!("ws{n}h{pid}"),
            "netns",
            &s.name,
        ]);
        ip(&["addr", "add", &a(5), "dev", &host_link]);
        ip(&["link", "set", &host_link, "up"]);
        s.ip(&["addr", "add", &a(6), "dev", &format!("ws{n}h{pid}")]);
        s.ip(&["link", "set", &format!("ws{n}h{pid}"), "up"]);
        let dir = TestDir::new(&format!("wgserver-{tag}"));
        let log = dir.join("servers.log");
        let child = i
            .exec("python3")
            .args(["-c", SERVERS, &format!("198.18.{n}.2")])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("servers");
        let mut servers = Proc::new(child, Some(log));
        let up = wait_for(Duration::from_secs(10), || {
            !run_limited(i.exec("ss").args(["-Hltn", "sport = :80"]), LIMIT)
                .stdout
                .is_empty()
        });
        assert!(
            up && servers.running(),
            "internet servers did not start: {}",
            servers.log()
        );
        let resolv = dir.join("resolv.conf");
        std::fs::write(&resolv, "nameserver 198.18.52.53\n").expect("resolv");
        let helper_sock = dir.join("helper.sock");
        let helper =
            warren_tests::start_lab_helper(&s, &resolv, &helper_sock, &dir.join("helper.log"));
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        Lab {
            n,
            s,
            c,
            _i: i,
            helper,
            helper_sock,
            servers,
            host_link,
            dir,
        }
    }

    fn web(&self) -> String {
        format!("198.18.{}.2", self.n)
    }

    fn body(&self) -> String {
        format!("internet {}\n", self.web())
    }

    /// `warren ARGS` as the test user inside S.
    fn warren_in_s(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.s.name, "setpriv"])
            .arg(format!("--reuid={}", ids::MEMBER))
            .arg(format!("--regid={}", ids::GROUP))
            .arg(format!("--groups={}", ids::GROUP))
            .args(["--inh-caps=-all", "--"])
            .arg(bin("warren"))
            .arg("--no-autostart")
            .args(args)
            .env("WARREN_HELPER_SOCKET", &self.helper_sock)
            .env("XDG_RUNTIME_DIR", self.dir.path());
        c
    }

    /// Makes the exit's file and starts `warren server --mode wg` in S.
    fn start_exit(&self, user: &User) -> (Proc, std::path::PathBuf) {
        let conf = user.dir.join("exit.conf");
        let out = user.warren(&[
            "server",
            "wg",
            "keygen",
            "--out",
            conf.to_str().expect("utf-8"),
            "--address",
            &format!("198.19.{}.1/24", self.n),
        ]);
        assert!(out.status.success(), "keygen: {}", text(&out.stderr));
        let log = self.dir.join("server.log");
        let child = self
            .warren_in_s(&[
                "server",
                "--mode",
                "wg",
                "--wg",
                conf.to_str().expect("utf-8"),
                "--name",
                &format!("t{}", self.n),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("warren server");
        (Proc::new(child, Some(log)), conf)
    }

    fn add_peer(&self, user: &User, conf: &std::path::Path, name: &str, endpoint: &str) -> String {
        let out = user.warren(&[
            "server",
            "wg",
            "add-peer",
            name,
            "--config",
            conf.to_str().expect("utf-8"),
            "--endpoint",
            endpoint,
        ]);
        assert!(out.status.success(), "add-peer: {}", text(&out.stderr));
        text(&out.stdout)
    }

    fn nft_ruleset(&self) -> String {
        text(&run_limited(self.s.exec("nft").args(["list", "ruleset"]), LIMIT).stdout)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- S helper log ----\n{}", self.helper.log());
        }
        self.helper.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = self.helper.wait_timeout(Duration::from_secs(10));
        self.servers.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = run_limited(
            Command::new("ip").args(["link", "del", &self.host_link]),
            LIMIT,
        );
    }
}

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
