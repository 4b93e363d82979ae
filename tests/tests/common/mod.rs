//! Shared pieces of the WireGuard end-to-end tests: the test user's side
//! (runtime directory, config copies, `warren` as that user) and small
//! client helpers.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use std::process::Stdio;
use warren_tests::wgexit::WgExit;

use warren_tests::{Proc, TestDir, TestNs, as_user, bin, ids, run_limited, wait_for};

pub const LIMIT: Duration = Duration::from_secs(30);

/// A user's side of the scene: a private runtime directory and a copy of
/// the exit's client file that the user owns.
pub struct User {
    pub dir: TestDir,
    pub conf: PathBuf,
    helper_socket: PathBuf,
}

impl User {
    pub fn new(tag: &str, helper_socket: &Path, exit: &WgExit) -> User {
        let dir = TestDir::new(tag);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        chown(dir.path());
        let conf = dir.join("exit.conf");
        std::fs::copy(exit.client_conf(), &conf).expect("copy conf");
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        chown(&conf);
        User {
            dir,
            conf,
            helper_socket: helper_socket.to_path_buf(),
        }
    }

    /// A user with no config file yet (`conf` is where [`User::write_conf`]
    /// puts one).
    pub fn bare(tag: &str, helper_socket: &Path) -> User {
        let dir = TestDir::new(tag);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        chown(dir.path());
        let conf = dir.join("exit.conf");
        User {
            dir,
            conf,
            helper_socket: helper_socket.to_path_buf(),
        }
    }

    /// Writes `text` as the user's file `file` (mode 0600).
    pub fn write_conf(&self, file: &str, text: &str) -> PathBuf {
        let p = self.dir.join(file);
        std::fs::write(&p, text).expect("write conf");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        chown(&p);
        p
    }

    pub fn with_conf(&self, exit: &WgExit, file: &str) -> PathBuf {
        let p = self.dir.join(file);
        std::fs::copy(exit.client_conf(), &p).expect("copy conf");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        chown(&p);
        p
    }

    /// `warren ARGS` as the test user.
    pub fn warren(&self, args: &[&str]) -> Output {
        let mut c = as_user(ids::MEMBER, ids::GROUP, &[ids::GROUP], &bin("warren"));
        self.run(&mut c, args)
    }

    /// `warren ARGS` as the test user, seeing `hosts` and `resolv` as its
    /// /etc/hosts and /etc/resolv.conf (a private mount namespace).
    pub fn warren_with_etc(&self, hosts: &Path, resolv: &Path, args: &[&str]) -> Output {
        self.warren_with_binds(&[(hosts, "/etc/hosts"), (resolv, "/etc/resolv.conf")], args)
    }

    /// `warren ARGS` as the test user in a private mount namespace where
    /// each `(file, over)` is bound over `over`.
    pub fn warren_with_binds(&self, binds: &[(&Path, &str)], args: &[&str]) -> Output {
        let mut script = String::new();
        for (file, over) in binds {
            script.push_str(&format!("mount --bind {} {over} && ", file.display()));
        }
        script.push_str(&format!(
            "exec setpriv --reuid={} --regid={} --groups={} --inh-caps=-all -- {} \"$@\"",
            ids::MEMBER,
            ids::GROUP,
            ids::GROUP,
            bin("warren").display()
        ));
        let mut c = Command::new("unshare");
        c.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
            "sh",
        ]);
        self.run(&mut c, args)
    }

    pub fn run(&self, c: &mut Command, args: &[&str]) -> Output {
        self.run_env(c, &[], args)
    }

    /// [`User::run`] with `env` added to its clean environment.
    pub fn run_env(&self, c: &mut Command, env: &[(&str, &str)], args: &[&str]) -> Output {
        c.args(["--no-autostart"])
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("XDG_RUNTIME_DIR", self.dir.path())
            .env("HOME", self.dir.path())
            .env("WARREN_HELPER_SOCKET", &self.helper_socket)
            .current_dir(self.dir.path());
        run_limited(c, LIMIT)
    }

    pub fn up(&self, name: &str, conf: &Path, socks: u16, http: u16) -> serde_json::Value {
        let out = self.warren(&[
            "up",
            name,
            "--wg",
            conf.to_str().expect("utf-8"),
            "--socks-port",
            &socks.to_string(),
            "--http-port",
            &http.to_string(),
            "--json",
        ]);
        assert!(
            out.status.success(),
            "warren up {name}: {}\n{}",
            text(&out.stderr),
            self.log(name)
        );
        serde_json::from_slice(&out.stdout).expect("up --json output")
    }

    pub fn log(&self, name: &str) -> String {
        let p = self.dir.join(&format!("warren/instance-{name}.log"));
        format!(
            "---- worker log {} ----\n{}",
            p.display(),
            std::fs::read_to_string(&p).unwrap_or_default()
        )
    }
}

pub fn chown(p: &Path) {
    std::os::unix::fs::chown(p, Some(ids::MEMBER), Some(ids::GROUP)).expect("chown");
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A unique instance name for this process.
pub fn iname(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

/// Two currently free TCP ports on loopback.
pub fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind");
    (
        a.local_addr().expect("addr").port(),
        b.local_addr().expect("addr").port(),
    )
}

pub fn curl(args: &[&str]) -> (bool, String, String) {
    let out = run_limited(
        Command::new("curl")
            .args(["-sS", "-g", "--max-time", "8"])
            .args(args),
        LIMIT,
    );
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

pub fn curl_ok(args: &[&str]) -> String {
    let (ok, out, err) = curl(args);
    assert!(ok, "curl {args:?}: {err}");
    out
}

pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns")
        .join(format!("warren-{name}"))
        .exists()
}

pub fn port_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok()
}

pub fn pid_alive(pid: i64) -> bool {
    // A zombie has released everything; only its parent's wait is missing
    // (workers are reparented to whatever reaper this machine has).
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// One UDP ASSOCIATE round trip through a SOCKS5 server.
pub fn socks_udp_echo(socks: SocketAddr, target: SocketAddr, payload: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut ctl = std::net::TcpStream::connect(socks).expect("connect socks");
    ctl.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    ctl.write_all(&[5, 1, 0]).expect("greeting");
    let mut b = [0u8; 2];
    ctl.read_exact(&mut b).expect("method");
    assert_eq!(b, [5, 0]);
    ctl.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
        .expect("associate");
    let mut r = [0u8; 10];
    ctl.read_exact(&mut r).expect("reply");
    assert_eq!(r[1], 0, "associate refused: {r:?}");
    let relay = SocketAddr::new(
        std::net::Ipv4Addr::new(r[4], r[5], r[6], r[7]).into(),
        u16::from_be_bytes([r[8], r[9]]),
    );
    let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
    u.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let SocketAddr::V4(t) = target else {
        panic!("v4 target")
    };
    let mut d = vec![0, 0, 0, 1];
    d.extend_from_slice(&t.ip().octets());
    d.extend_from_slice(&t.port().to_be_bytes());
    d.extend_from_slice(payload);
    for _ in 0..3 {
        u.send_to(&d, relay).expect("send");
        let mut buf = [0u8; 2048];
        if let Ok((n, _)) = u.recv_from(&mut buf) {
            assert!(n >= 10, "short answer");
            return buf[10..n].to_vec();
        }
    }
    panic!("no UDP answer through the association");
}

/// The three namespaces and what runs in them. `n` picks 198.18.n.0/24.
pub struct Lab {
    pub n: u8,
    pub s: TestNs,
    pub c: TestNs,
    _i: TestNs,
    helper: Proc,
    pub helper_sock: std::path::PathBuf,
    servers: Proc,
    host_link: String,
    pub dir: TestDir,
}

const SERVERS: &str = r#"
import socket, sys, threading, http.server
ip = sys.argv[1]
body = ("internet " + ip + "\n").encode()
import hashlib, os
big = None
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        global big
        data = body
        if self.path == "/big":
            # 16 MiB of random bytes and their SHA-256, for bulk transfers.
            big = big or os.urandom(16 << 20)
            data = big
        self.send_response(200); self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Sha256", hashlib.sha256(data).hexdigest()); self.end_headers(); self.wfile.write(data)
    def do_POST(self):
        # Answers the SHA-256 of the request body (at most 64 MiB).
        n = min(int(self.headers.get("Content-Length", "0")), 64 << 20)
        h = hashlib.sha256(); left = n
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk: break
            h.update(chunk); left -= len(chunk)
        out = h.hexdigest().encode()
        self.send_response(200); self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out)
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

pub fn ip(args: &[&str]) {
    let out = run_limited(Command::new("ip").args(args), LIMIT);
    assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
}

impl Lab {
    pub fn new(tag: &str, n: u8) -> Lab {
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
        let config =
            warren_tests::write_helper_config(&dir, warren_tests::TEST_SERVER_TUNNEL_POOLS);
        let helper = warren_tests::start_lab_helper_with(
            &s,
            &resolv,
            &helper_sock,
            &dir.join("helper.log"),
            &warren_tests::LabHelperOptions {
                config: Some(&config),
                ..Default::default()
            },
        );
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

    pub fn web(&self) -> String {
        format!("198.18.{}.2", self.n)
    }

    pub fn body(&self) -> String {
        format!("internet {}\n", self.web())
    }

    /// `warren ARGS` as the test user inside S.
    pub fn warren_in_s(&self, args: &[&str]) -> Command {
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
    pub fn start_exit(&self, user: &User) -> (Proc, std::path::PathBuf) {
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

    pub fn add_peer(
        &self,
        user: &User,
        conf: &std::path::Path,
        name: &str,
        endpoint: &str,
    ) -> String {
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

    pub fn nft_ruleset(&self) -> String {
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

/// A small HTTP server on 127.0.0.1 answering `body` to up to 100
/// connections (a thread; ends with the test process).
pub fn host_http(body: &'static str) -> u16 {
    use std::io::{Read, Write};
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming().take(100) {
            let Ok(mut s) = s else { continue };
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// Running `warren forward-connector` processes whose targets include
/// `port`.
pub fn connectors_for(port: u16) -> usize {
    let port = port.to_string();
    std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                c.windows(17).any(|w| w == b"forward-connector")
                    && c.windows(port.len()).any(|w| w == port.as_bytes())
            })
        })
        .count()
}

/// One datagram to 127.0.0.1:`to` and its answer (three tries of 3 s).
pub fn udp_roundtrip(to: u16, payload: &[u8]) -> Option<Vec<u8>> {
    let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
    u.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    for _ in 0..3 {
        u.send_to(payload, ("127.0.0.1", to)).expect("send");
        let mut b = [0u8; 256];
        if let Ok((n, _)) = u.recv_from(&mut b) {
            return Some(b[..n].to_vec());
        }
    }
    None
}

/// The forwards an instance was started with reach the exit: a TCP forward
/// on `tcp_port` to its web server, a UDP forward on `udp_port` to its echo
/// server, and a reverse forward (tunnel side port 2222 → `host_http`'s
/// "hello from the host") reached with curl from inside the exit. `log` is
/// the instance's log, shown when one fails.
pub fn assert_forwards_work(exit: &WgExit, tcp_port: u16, udp_port: u16, log: &dyn Fn() -> String) {
    assert_eq!(
        curl_ok(&[&format!("http://127.0.0.1:{tcp_port}/")]),
        exit.http_body(),
        "TCP forward"
    );
    assert_eq!(
        udp_roundtrip(udp_port, b"forwarded datagram").as_deref(),
        Some(&b"forwarded datagram"[..]),
        "UDP forward"
    );
    let r = run_limited(
        exit.exec("curl").args([
            "-sS",
            "--max-time",
            "8",
            &format!("http://{}:2222/", exit.client_v4()),
        ]),
        LIMIT,
    );
    assert_eq!(
        text(&r.stdout),
        "hello from the host\n",
        "reverse forward: {}\n{}",
        text(&r.stderr),
        log()
    );
}
