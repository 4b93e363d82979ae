//! Shared pieces of the WireGuard end-to-end tests: the test user's side
//! (runtime directory, config copies, `warren` as that user) and small
//! client helpers.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use warren_tests::wgexit::WgExit;
use warren_tests::{TestDir, as_user, bin, ids, run_limited};

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
        let script = format!(
            "mount --bind {} /etc/hosts && mount --bind {} /etc/resolv.conf && exec setpriv --reuid={} --regid={} --groups={} --inh-caps=-all -- {} \"$@\"",
            hosts.display(),
            resolv.display(),
            ids::MEMBER,
            ids::GROUP,
            ids::GROUP,
            bin("warren").display()
        );
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
        c.args(["--no-autostart"])
            .args(args)
            .env_clear()
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
    Path::new(&format!("/proc/{pid}")).exists()
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
