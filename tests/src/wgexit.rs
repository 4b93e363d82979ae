//! A real WireGuard exit for end-to-end tests: `wireguard-go` in its own
//! network namespace, reachable from the host namespace over a veth pair,
//! serving HTTP, DNS and UDP echo on its tunnel addresses only.
//!
//! Addressing, per exit, with `k` unique among all live exits on the machine
//! (every test process; `k` is claimed by creating the host-side veth
//! `wxh<k>`, which the kernel allows once):
//!
//! - host veth `wxh<k>` = 198.18.k.1/30, exit veth `wxe<k>` = 198.18.k.2/30,
//!   so the WireGuard endpoint is 198.18.k.2:51820;
//! - exit `wg0` = 198.19.k.1/24 and fd00:19:k::1/64, MTU 1420;
//! - the client's tunnel addresses: 198.19.k.2/32 and fd00:19:k::2/128;
//! - plain clients ([`WgExit::plain_client`]) get further /30s of
//!   198.18.k.0/24 (exit side 198.18.k.(4m+5), client side .(4m+6)).
//!
//! `wireguard-go` keeps its control socket in `/run/wireguard/wg0.sock`, a
//! path shared by all namespaces, so every `wireguard-go` and `wg` started
//! here runs in a private mount namespace in which a per-fixture directory
//! is bind-mounted over `/run/wireguard`. [`WgExit::wg_command`] does that
//! for you.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::{Proc, TestDir, TestNs, run_limited, wait_for};

/// WireGuard's listen port in every exit.
pub const WG_PORT: u16 = 51820;
/// MTU of the tunnel interfaces (and of the client configuration).
pub const MTU: u32 = 1420;

/// Exits made by this process so far (with the pid, names are unique).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// `k` is taken from `SLOT_FIRST..SLOT_FIRST + SLOT_COUNT`, away from the
/// small hand-picked 198.18/198.19 subnets other tests use.
const SLOT_FIRST: u32 = 100;
const SLOT_COUNT: u32 = 150;
/// Plain clients per exit (each takes a /30 of 198.18.k.0/24 after the
/// host's).
const MAX_PLAIN_CLIENTS: u32 = 63;

/// Time limit for each short command (`ip`, `wg`, `ss`).
const CMD_LIMIT: Duration = Duration::from_secs(10);
/// Time limit for each daemon to come up.
const UP_LIMIT: Duration = Duration::from_secs(5);
/// How long a daemon gets between SIGTERM and SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(3);

/// Run as `sh -c MOUNT_SCRIPT RUNDIR PROGRAM ARGS...` in a fresh mount
/// namespace: gives PROGRAM a private `/run/wireguard` (= RUNDIR). When the
/// machine has no `/run/wireguard`, a private tmpfs over `/run` provides the
/// mount point, so the host's file system is never changed.
const MOUNT_SCRIPT: &str = r#"set -e
[ -d /run/wireguard ] || { mount -t tmpfs -o mode=0755,size=64k warren-wgexit /run; mkdir /run/wireguard; }
mount --bind "$0" /run/wireguard
exec "$@""#;

/// The exit's servers: `python3 -c SERVERS TAG K V4 V6 DNSLOG`. HTTP on
/// port 80, DNS on 53/udp, echo on 7/udp, each on V4 and V6 only. The
/// sockets are bound with IP(V6)_FREEBIND, so they keep working while the
/// tunnel interface is re-created ([`WgExit::restart_wireguard`]).
const SERVERS: &str = r#"
import http.server, socket, socketserver, struct, sys, threading

tag, k, v4, v6, dnslog = sys.argv[1:6]
BODY = ("exit %s %s\n" % (tag, k)).encode()
NAMES = ("exit.test", "www.exit.test")
IP_FREEBIND, IPV6_FREEBIND = 15, 78

def prepare(s, family):
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    else:
        s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path.startswith("/bytes/"):
            try:
                n = int(self.path[len("/bytes/"):])
            except ValueError:
                n = -1
            if n < 0 or n > (1 << 36):
                self.send_error(400, "bad length")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = memoryview(bytes(65536))
            while n > 0:
                m = min(n, len(chunk))
                self.wfile.write(chunk[:m])
                n -= m
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, fmt, *args):
        sys.stderr.write("http %s %s\n" % (self.client_address[0], fmt % args))

def http_server(family, addr):
    class Server(http.server.ThreadingHTTPServer):
        address_family = family
        daemon_threads = True
        allow_reuse_address = True

        def server_bind(self):
            prepare(self.socket, family)
            # Not HTTPServer.server_bind: it resolves the address (getfqdn).
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = addr, 80

    return Server((addr, 80), Handler)

def udp_socket(family, addr, port):
    s = socket.socket(family, socket.SOCK_DGRAM)
    prepare(s, family)
    s.bind((addr, port))
    return s

log_lock = threading.Lock()

def dns_answer(q):
    if len(q) < 12:
        return None
    qid, flags, qdcount = struct.unpack(">HHH", q[:6])
    if flags & 0x8000 or qdcount != 1:
        return None
    i, labels = 12, []
    while True:
        if i >= len(q):
            return None
        n = q[i]
        i += 1
        if n == 0:
            break
        if n & 0xC0 or i + n > len(q):
            return None
        labels.append(q[i:i + n].decode("ascii", "replace"))
        i += n
    if i + 4 > len(q):
        return None
    qtype, qclass = struct.unpack(">HH", q[i:i + 4])
    name = ".".join(labels).lower()
    with log_lock:
        with open(dnslog, "a") as f:
            f.write(name + "\n")
    answers = []
    if name in NAMES:
        rcode = 0
        if qtype == 1 and qclass == 1:
            answers.append((1, socket.inet_pton(socket.AF_INET, v4)))
        elif qtype == 28 and qclass == 1:
            answers.append((28, socket.inet_pton(socket.AF_INET6, v6)))
    else:
        rcode = 3
    out_flags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080 | rcode
    out = struct.pack(">HHHHHH", qid, out_flags, 1, len(answers), 0, 0) + q[12:i + 4]
    for rtype, rdata in answers:
        out += b"\xc0\x0c" + struct.pack(">HHIH", rtype, 1, 60, len(rdata)) + rdata
    return out

def serve_dns(s):
    while True:
        q, peer = s.recvfrom(4096)
        try:
            a = dns_answer(q)
        except Exception as e:
            sys.stderr.write("dns: %r\n" % (e,))
            a = None
        if a is not None:
            s.sendto(a, peer)

def serve_echo(s):
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)

open(dnslog, "a").close()
threads = []
for family, addr in ((socket.AF_INET, v4), (socket.AF_INET6, v6)):
    threads.append(threading.Thread(target=http_server(family, addr).serve_forever, daemon=True))
    threads.append(threading.Thread(target=serve_dns, args=(udp_socket(family, addr, 53),), daemon=True))
    threads.append(threading.Thread(target=serve_echo, args=(udp_socket(family, addr, 7),), daemon=True))
for t in threads:
    t.start()
sys.stderr.write("servers up\n")
for t in threads:
    t.join()
"#;

/// Runs `cmd` with [`CMD_LIMIT`], panicking with `what` and its stderr
/// unless it succeeds; returns its stdout.
fn run_ok(what: &str, cmd: &mut Command) -> String {
    let out = run_limited(cmd, CMD_LIMIT);
    assert!(
        out.status.success(),
        "{what}: {cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip ARGS...`, which must succeed.
fn ip(args: &[&str]) {
    run_ok("ip", Command::new("ip").args(args));
}

/// Runs `cmd` with `input` on its stdin (bounded), returning its stdout.
fn run_with_input(cmd: &mut Command, input: &[u8]) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).expect("write stdin");
    }
    let start = Instant::now();
    while matches!(child.try_wait(), Ok(None)) {
        if start.elapsed() > CMD_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} ran longer than {CMD_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `wg genkey` / `wg genpsk`.
fn wg_gen(what: &str) -> String {
    run_ok("wg key generation", Command::new("wg").arg(what))
        .trim()
        .to_string()
}

/// `wg pubkey` of a private key.
fn wg_pubkey(private: &str) -> String {
    run_with_input(
        Command::new("wg").arg("pubkey"),
        format!("{private}\n").as_bytes(),
    )
    .trim()
    .to_string()
}

/// Writes `text` to a new file of mode 0600.
fn write_private(path: &Path, text: &str) {
    let _ = std::fs::remove_file(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(text.as_bytes()).expect("write private file");
}

/// The contents of `path`, or a note saying why it cannot be read.
fn read_log(path: &Path) -> String {
    let mut s = String::new();
    match std::fs::File::open(path) {
        Ok(mut f) => {
            let _ = f.read_to_string(&mut s);
        }
        Err(e) => s = format!("(no log {}: {e})", path.display()),
    }
    s
}

/// Local addresses (`ss -Hln{t,u}` in `ns`) with a socket listening.
fn listening(ns: &str, proto: char) -> Vec<SocketAddr> {
    let out = run_limited(
        Command::new("ip").args(["netns", "exec", ns, "ss", &format!("-Hln{proto}")]),
        CMD_LIMIT,
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| {
            // Wildcards print as `*:port` / `0.0.0.0:port` / `[::]:port`.
            let a = a
                .strip_prefix("*:")
                .map_or(a.to_string(), |p| format!("0.0.0.0:{p}"));
            a.parse().ok()
        })
        .collect()
}

/// A daemon started by a fixture: SIGTERM, then SIGKILL after
/// [`STOP_LIMIT`], on [`Daemon::stop`] and on drop.
#[derive(Debug)]
struct Daemon {
    what: String,
    proc: Proc,
}

impl Daemon {
    fn stop(&mut self) {
        if self.proc.running() {
            self.proc.signal(Signal::SIGTERM);
            if self.proc.wait_timeout(STOP_LIMIT).is_none() {
                eprintln!(
                    "{} ignored SIGTERM for {STOP_LIMIT:?}; killing it",
                    self.what
                );
                self.proc.signal(Signal::SIGKILL);
                let _ = self.proc.wait_timeout(STOP_LIMIT);
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A link deleted (`ip [-n NS] link del NAME`) on drop. Deleting one end
/// of a veth pair deletes both.
#[derive(Debug)]
struct Link {
    netns: Option<String>,
    name: String,
}

impl Drop for Link {
    fn drop(&mut self) {
        let mut cmd = Command::new("ip");
        if let Some(ns) = &self.netns {
            cmd.args(["-n", ns]);
        }
        cmd.args(["link", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = run_limited(&mut cmd, CMD_LIMIT);
    }
}

/// One `wireguard-go` on `wg0` in a namespace, with its private
/// `/run/wireguard`.
#[derive(Debug)]
struct WgNode {
    netns: String,
    run_dir: PathBuf,
    log: PathBuf,
}

impl WgNode {
    fn new(netns: &str, dir: &TestDir) -> WgNode {
        let run_dir = dir.join("wg-run");
        std::fs::create_dir(&run_dir).expect("wireguard run dir");
        WgNode {
            netns: netns.to_string(),
            run_dir,
            log: dir.join("wireguard-go.log"),
        }
    }

    /// `program` in the namespace, seeing the private `/run/wireguard`.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, "unshare", "-m", "sh", "-c"])
            .arg(MOUNT_SCRIPT)
            .arg(&self.run_dir)
            .arg(program);
        c
    }

    /// Starts `wireguard-go -f wg0` and waits for its control socket.
    fn start(&self) -> Daemon {
        let sock = self.run_dir.join("wg0.sock");
        let _ = std::fs::remove_file(&sock);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("wireguard-go log");
        let child = self
            .command("wireguard-go")
            .args(["-f", "wg0"])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .env("LOG_LEVEL", "verbose")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn wireguard-go");
        let mut d = Daemon {
            what: format!("wireguard-go in {}", self.netns),
            proc: Proc::new(child, Some(self.log.clone())),
        };
        let up = wait_for(UP_LIMIT, || sock.exists());
        assert!(
            up && d.proc.running(),
            "wireguard-go on wg0 in netns {} did not come up within {UP_LIMIT:?} \
             (control socket {}); log:\n{}",
            self.netns,
            sock.display(),
            d.proc.log()
        );
        d
    }

    /// `wg set wg0 ARGS...`, which must succeed.
    fn set(&self, args: &[&str]) {
        run_ok("wg set", self.command("wg").args(["set", "wg0"]).args(args));
    }

    /// `wg show wg0 dump`.
    fn dump(&self) -> String {
        run_ok("wg show", self.command("wg").args(["show", "wg0", "dump"]))
    }

    /// Waits until `ss -Hlnu` shows WireGuard's port.
    fn wait_port(&self, port: u16) {
        let up = wait_for(UP_LIMIT, || {
            listening(&self.netns, 'u').iter().any(|a| a.port() == port)
        });
        assert!(
            up,
            "wireguard-go in netns {} is not listening on udp port {port} after {UP_LIMIT:?}; \
             log:\n{}",
            self.netns,
            read_log(&self.log)
        );
    }
}

/// The latest handshake (seconds since the epoch) with `peer` in a
/// `wg show dump`.
fn handshake_in_dump(dump: &str, peer: &str) -> Option<u64> {
    dump.lines()
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|f| f.len() >= 8 && f[0] == peer)
        .and_then(|f| f[4].parse::<u64>().ok())
        .filter(|&t| t != 0)
}

/// Whether host address `a/pa` overlaps network `b/pb`.
fn overlaps(a: IpAddr, pa: u8, b: IpAddr, pb: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let p = u32::from(pa.min(pb).min(32));
            let mask = u32::MAX.checked_shl(32 - p).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let p = u32::from(pa.min(pb).min(128));
            let mask = u128::MAX.checked_shl(128 - p).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// The host namespace's addresses with their prefix lengths.
fn host_addrs() -> Vec<(IpAddr, u8)> {
    run_ok(
        "list host addresses",
        Command::new("ip").args(["-o", "addr", "show"]),
    )
    .lines()
    .filter_map(|l| {
        let mut it = l.split_whitespace();
        it.find(|w| *w == "inet" || *w == "inet6")?;
        let (a, p) = it.next()?.split_once('/')?;
        Some((a.parse().ok()?, p.parse().ok()?))
    })
    .collect()
}

fn v4(k: u8, last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, k, last)
}

fn tunnel_v4(k: u8, last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, k, last)
}

fn tunnel_v6(k: u8, last: u16) -> Ipv6Addr {
    format!("fd00:19:{k}::{last:x}")
        .parse()
        .expect("tunnel v6 address")
}

/// A WireGuard exit in its own namespace (see the module docs). Everything
/// it started or created goes away on drop, also when a test panics.
#[derive(Debug)]
pub struct WgExit {
    // Drop order = declaration order: processes first, then links, the
    // namespace, and last the files.
    servers: Option<Daemon>,
    wg: Option<Daemon>,
    _host_link: Link,
    ns: TestNs,
    node: WgNode,
    tag: String,
    k: u8,
    host_veth: String,
    exit_veth: String,
    exit_key: PathBuf,
    psk: PathBuf,
    exit_public: String,
    client_private: String,
    client_public: String,
    conf: PathBuf,
    dns_log: PathBuf,
    server_log: PathBuf,
    plain_clients: AtomicU32,
    _dir: TestDir,
}

impl WgExit {
    /// Creates the namespace, the veth pair to the host, `wireguard-go`
    /// with a fresh client peer, and the HTTP/DNS/echo servers; writes the
    /// client's wg-quick file. Panics, naming what did not come up, within
    /// a bounded time.
    pub fn start(tag: &str) -> WgExit {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let ns_name = format!("wx-{}-{n}", pid % 10_000);
        let safe_tag: String = tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(32)
            .collect();
        let dir = TestDir::new(&format!("wgexit-{safe_tag}"));
        let ns = TestNs::new(&ns_name);

        // Claim k: the host-side link name is the lock.
        let taken = host_addrs();
        let start = pid.wrapping_mul(7).wrapping_add(n.wrapping_mul(13));
        let mut claimed = None;
        for i in 0..SLOT_COUNT {
            let k = u8::try_from(SLOT_FIRST + start.wrapping_add(i) % SLOT_COUNT)
                .expect("slot fits in a byte");
            let busy = taken.iter().any(|&(a, p)| {
                overlaps(a, p, v4(k, 0).into(), 24)
                    || overlaps(a, p, tunnel_v4(k, 0).into(), 24)
                    || overlaps(a, p, tunnel_v6(k, 0).into(), 64)
            });
            if busy {
                continue;
            }
            let host_veth = format!("wxh{k}");
            let exit_veth = format!("wxe{k}");
            let out = run_limited(
                Command::new("ip").args([
                    "link", "add", &host_veth, "type", "veth", "peer", "name", &exit_veth, "netns",
                    &ns_name,
                ]),
                CMD_LIMIT,
            );
            if out.status.success() {
                claimed = Some((k, host_veth, exit_veth));
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("File exists"),
                "creating veth {host_veth} for exit {ns_name}: {err}"
            );
        }
        let (k, host_veth, exit_veth) = claimed.unwrap_or_else(|| {
            panic!("no free exit slot in 198.18.{SLOT_FIRST}.0 .. +{SLOT_COUNT} (all wxh* taken?)")
        });
        let host_link = Link {
            netns: None,
            name: host_veth.clone(),
        };
        ip(&[
            "addr",
            "add",
            &format!("{}/30", v4(k, 1)),
            "dev",
            &host_veth,
        ]);
        ip(&["link", "set", &host_veth, "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/30", v4(k, 2)),
            "dev",
            &exit_veth,
        ]);
        ns.ip(&["link", "set", &exit_veth, "up"]);

        // Keys.
        let exit_private = wg_gen("genkey");
        let exit_public = wg_pubkey(&exit_private);
        let client_private = wg_gen("genkey");
        let client_public = wg_pubkey(&client_private);
        let psk_text = wg_gen("genpsk");
        let exit_key = dir.join("exit.key");
        let psk = dir.join("psk");
        write_private(&exit_key, &format!("{exit_private}\n"));
        write_private(&psk, &format!("{psk_text}\n"));

        let node = WgNode::new(&ns_name, &dir);
        let mut exit = WgExit {
            servers: None,
            wg: None,
            _host_link: host_link,
            ns,
            node,
            tag: tag.to_string(),
            k,
            host_veth,
            exit_veth,
            exit_key,
            psk,
            exit_public,
            client_private,
            client_public,
            conf: dir.join("client.conf"),
            dns_log: dir.join("dns-queries.log"),
            server_log: dir.join("servers.log"),
            plain_clients: AtomicU32::new(0),
            _dir: dir,
        };
        exit.start_wireguard();
        exit.servers = Some(exit.start_servers());
        exit.write_conf(&psk_text);
        exit
    }

    /// Starts and configures `wireguard-go` (same keys every time).
    fn start_wireguard(&mut self) {
        let d = self.node.start();
        self.wg = Some(d);
        let k = self.k;
        let allowed = format!("{}/32,{}/128", self.client_v4(), self.client_v6());
        self.node.set(&[
            "listen-port",
            &WG_PORT.to_string(),
            "private-key",
            self.exit_key.to_str().expect("utf-8 path"),
            "peer",
            &self.client_public,
            "preshared-key",
            self.psk.to_str().expect("utf-8 path"),
            "allowed-ips",
            &allowed,
        ]);
        self.ns.ip(&[
            "addr",
            "add",
            &format!("{}/24", tunnel_v4(k, 1)),
            "dev",
            "wg0",
        ]);
        self.ns.ip(&[
            "addr",
            "add",
            &format!("{}/64", tunnel_v6(k, 1)),
            "dev",
            "wg0",
            "nodad",
        ]);
        self.ns
            .ip(&["link", "set", "wg0", "mtu", &MTU.to_string(), "up"]);
        self.node.wait_port(WG_PORT);
    }

    /// Starts the Python servers and waits for each of their ports.
    fn start_servers(&self) -> Daemon {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.server_log)
            .expect("server log");
        let child = self
            .ns
            .exec("python3")
            .args(["-u", "-c", SERVERS, &self.tag, &self.k.to_string()])
            .arg(self.tunnel_v4().to_string())
            .arg(self.tunnel_v6().to_string())
            .arg(&self.dns_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn python3 servers");
        let mut d = Daemon {
            what: format!("servers in {}", self.ns.name),
            proc: Proc::new(child, Some(self.server_log.clone())),
        };
        for (what, proto, port) in [("HTTP", 't', 80), ("DNS", 'u', 53), ("echo", 'u', 7)] {
            for addr in [IpAddr::V4(self.tunnel_v4()), IpAddr::V6(self.tunnel_v6())] {
                let want = SocketAddr::new(addr, port);
                let up = wait_for(UP_LIMIT, || listening(&self.ns.name, proto).contains(&want));
                assert!(
                    up && d.proc.running(),
                    "exit {}: {what} server on {want} ({}) did not come up within {UP_LIMIT:?}; \
                     log:\n{}",
                    self.ns.name,
                    if proto == 't' { "tcp" } else { "udp" },
                    d.proc.log()
                );
            }
        }
        d
    }

    fn write_conf(&self, psk: &str) {
        let text = format!(
            "[Interface]\n\
             PrivateKey = {}\n\
             Address = {}/32, {}/128\n\
             DNS = {}\n\
             MTU = {MTU}\n\
             \n\
             [Peer]\n\
             PublicKey = {}\n\
             PresharedKey = {psk}\n\
             Endpoint = {}\n\
             AllowedIPs = 0.0.0.0/0, ::/0\n\
             PersistentKeepalive = 25\n",
            self.client_private,
            self.client_v4(),
            self.client_v6(),
            self.tunnel_v4(),
            self.exit_public,
            self.endpoint(),
        );
        write_private(&self.conf, &text);
    }

    /// The client's wg-quick file (mode 0600): the client key, tunnel
    /// addresses, DNS = [`WgExit::tunnel_v4`], MTU 1420, and the exit as
    /// the only peer (endpoint [`WgExit::endpoint`], all addresses).
    pub fn client_conf(&self) -> PathBuf {
        self.conf.clone()
    }

    /// The exit's WireGuard endpoint, reachable from the host namespace:
    /// 198.18.k.2:51820.
    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::new(v4(self.k, 2).into(), WG_PORT)
    }

    /// This exit's unique index `k` (in the addresses above).
    pub fn index(&self) -> u8 {
        self.k
    }

    /// The exit's inner IPv4 address, 198.19.k.1 (HTTP, DNS, echo).
    pub fn tunnel_v4(&self) -> Ipv4Addr {
        tunnel_v4(self.k, 1)
    }

    /// The exit's inner IPv6 address, fd00:19:k::1 (HTTP, DNS, echo).
    pub fn tunnel_v6(&self) -> Ipv6Addr {
        tunnel_v6(self.k, 1)
    }

    /// The client's IPv4 tunnel address, 198.19.k.2.
    pub fn client_v4(&self) -> Ipv4Addr {
        tunnel_v4(self.k, 2)
    }

    /// The client's IPv6 tunnel address, fd00:19:k::2.
    pub fn client_v6(&self) -> Ipv6Addr {
        tunnel_v6(self.k, 2)
    }

    /// The exit's network namespace.
    pub fn netns(&self) -> &str {
        &self.ns.name
    }

    /// The host-side veth (in the host namespace).
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }

    /// The host-side veth's address, 198.18.k.1 (/30).
    pub fn host_addr(&self) -> Ipv4Addr {
        v4(self.k, 1)
    }

    /// Moves the host side of the exit's link (with its address) into
    /// network namespace `ns`, which then plays the host that reaches the
    /// exit (for full-host tunnel tests, where the real host must not be
    /// rerouted).
    pub fn move_uplink_to(&mut self, ns: &str) {
        let a = format!("{}/30", self.host_addr());
        ip(&["link", "set", &self.host_veth, "netns", ns]);
        ip(&["-n", ns, "addr", "add", &a, "dev", &self.host_veth]);
        ip(&["-n", ns, "link", "set", &self.host_veth, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        self._host_link = Link {
            netns: Some(ns.to_string()),
            name: self.host_veth.clone(),
        };
    }

    /// The exit-side veth (in the exit namespace); its address is the
    /// endpoint's.
    pub fn exit_veth(&self) -> &str {
        &self.exit_veth
    }

    /// The exit's WireGuard public key.
    pub fn exit_public_key(&self) -> &str {
        &self.exit_public
    }

    /// The client's WireGuard public key.
    pub fn client_public_key(&self) -> &str {
        &self.client_public
    }

    /// What every HTTP GET (other than `/bytes/N`) answers:
    /// `exit <tag> <k>\n`.
    pub fn http_body(&self) -> String {
        format!("exit {} {}\n", self.tag, self.k)
    }

    /// `http://198.19.k.1<path>`.
    pub fn url_v4(&self, path: &str) -> String {
        format!("http://{}{path}", self.tunnel_v4())
    }

    /// `http://[fd00:19:k::1]<path>`.
    pub fn url_v6(&self, path: &str) -> String {
        format!("http://[{}]{path}", self.tunnel_v6())
    }

    /// The pid of the current `wireguard-go` (`None` after
    /// [`WgExit::stop_wireguard`]).
    pub fn wg_pid(&self) -> Option<i32> {
        self.wg.as_ref().map(|d| d.proc.pid())
    }

    /// `program` run in the exit namespace (`ip netns exec`).
    pub fn exec(&self, program: &str) -> Command {
        self.ns.exec(program)
    }

    /// `wg` in the exit namespace, talking to this exit's `wireguard-go`
    /// (add the arguments, e.g. `show wg0`).
    pub fn wg_command(&self) -> Command {
        self.node.command("wg")
    }

    /// `wg show wg0 dump`.
    pub fn wg_show(&self) -> String {
        self.node.dump()
    }

    /// The latest handshake with the client (seconds since the epoch), if
    /// any.
    pub fn latest_handshake(&self) -> Option<u64> {
        handshake_in_dump(&self.wg_show(), &self.client_public)
    }

    /// The names of all DNS queries received so far, in order (lower case,
    /// no trailing dot).
    pub fn dns_queries(&self) -> Vec<String> {
        std::fs::read_to_string(&self.dns_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// What the servers logged (HTTP requests, errors).
    pub fn server_log(&self) -> String {
        read_log(&self.server_log)
    }

    /// What `wireguard-go` logged (all its runs).
    pub fn wireguard_log(&self) -> String {
        read_log(&self.node.log)
    }

    /// Stops `wireguard-go` (SIGTERM, SIGKILL after 3 s); `wg0` and its
    /// sessions go away. The servers keep running.
    pub fn stop_wireguard(&mut self) {
        if let Some(mut d) = self.wg.take() {
            d.stop();
        }
    }

    /// Stops `wireguard-go` and starts and configures it again with the same
    /// keys (a peer restart: it has no session and no client endpoint until
    /// the client handshakes again).
    pub fn restart_wireguard(&mut self) {
        self.stop_wireguard();
        self.start_wireguard();
    }

    /// A second namespace with a standard `wireguard-go` client using the
    /// client key of [`WgExit::client_conf`], joined to the exit by its own
    /// veth pair, with the tunnel subnets routed through its `wg0`. Do not
    /// run it at the same time as another client of this exit's key.
    pub fn plain_client(&self) -> PlainClient {
        let m = self.plain_clients.fetch_add(1, Ordering::Relaxed);
        assert!(m < MAX_PLAIN_CLIENTS, "too many plain clients for one exit");
        let m8 = u8::try_from(m).expect("small");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let ns_name = format!("wxc-{}-{n}", std::process::id() % 10_000);
        let dir = TestDir::new(&format!("wgexit-client{}", self.k));
        let ns = TestNs::new(&ns_name);
        let exit_side = format!("wxc{m}");
        let client_side = "wxu0".to_string();
        ip(&[
            "link",
            "add",
            &exit_side,
            "netns",
            &self.ns.name,
            "type",
            "veth",
            "peer",
            "name",
            &client_side,
            "netns",
            &ns_name,
        ]);
        let exit_link = Link {
            netns: Some(self.ns.name.clone()),
            name: exit_side.clone(),
        };
        let exit_addr = v4(self.k, 4 * m8 + 5);
        let client_addr = v4(self.k, 4 * m8 + 6);
        self.ns
            .ip(&["addr", "add", &format!("{exit_addr}/30"), "dev", &exit_side]);
        self.ns.ip(&["link", "set", &exit_side, "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{client_addr}/30"),
            "dev",
            &client_side,
        ]);
        ns.ip(&["link", "set", &client_side, "up"]);

        let key = dir.join("client.key");
        let psk = dir.join("psk");
        write_private(&key, &format!("{}\n", self.client_private));
        write_private(&psk, &read_log(&self.psk));
        let node = WgNode::new(&ns_name, &dir);
        let wg = node.start();
        let endpoint = SocketAddr::new(exit_addr.into(), WG_PORT);
        node.set(&[
            "private-key",
            key.to_str().expect("utf-8 path"),
            "peer",
            &self.exit_public,
            "preshared-key",
            psk.to_str().expect("utf-8 path"),
            "endpoint",
            &endpoint.to_string(),
            "allowed-ips",
            "0.0.0.0/0,::/0",
            "persistent-keepalive",
            "25",
        ]);
        let (c4, c6) = (self.client_v4().to_string(), self.client_v6().to_string());
        ns.ip(&["addr", "add", &format!("{c4}/32"), "dev", "wg0"]);
        ns.ip(&["addr", "add", &format!("{c6}/128"), "dev", "wg0", "nodad"]);
        ns.ip(&["link", "set", "wg0", "mtu", &MTU.to_string(), "up"]);
        ns.ip(&[
            "route",
            "add",
            &format!("{}/24", tunnel_v4(self.k, 0)),
            "dev",
            "wg0",
            "src",
            &c4,
        ]);
        ns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{}/64", tunnel_v6(self.k, 0)),
            "dev",
            "wg0",
            "src",
            &c6,
        ]);
        PlainClient {
            wg,
            _exit_link: exit_link,
            ns,
            node,
            exit_public: self.exit_public.clone(),
            endpoint,
            _dir: dir,
        }
    }
}

impl Drop for WgExit {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- exit {} wireguard-go log ----\n{}\n---- exit {} servers log ----\n{}",
                self.ns.name,
                self.wireguard_log(),
                self.ns.name,
                self.server_log()
            );
        }
        // The fields then go in order: processes, links, namespace, files.
        if let Some(mut d) = self.servers.take() {
            d.stop();
        }
        self.stop_wireguard();
    }
}

/// A standard WireGuard client (`wireguard-go` + `wg`) in its own namespace,
/// connected to a [`WgExit`]; see [`WgExit::plain_client`]. Removed on drop.
#[derive(Debug)]
pub struct PlainClient {
    wg: Daemon,
    _exit_link: Link,
    ns: TestNs,
    node: WgNode,
    exit_public: String,
    endpoint: SocketAddr,
    _dir: TestDir,
}

impl PlainClient {
    /// `program` run in the client namespace, e.g. `exec("curl")`.
    pub fn exec(&self, program: &str) -> Command {
        self.ns.exec(program)
    }

    /// The client's namespace.
    pub fn netns(&self) -> &str {
        &self.ns.name
    }

    /// The exit address the client uses as its endpoint (on its own veth).
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// The pid of the client's `wireguard-go`.
    pub fn wg_pid(&self) -> i32 {
        self.wg.proc.pid()
    }

    /// `wg show wg0 dump` in the client.
    pub fn wg_show(&self) -> String {
        self.node.dump()
    }

    /// The client's latest handshake with the exit, if any.
    pub fn latest_handshake(&self) -> Option<u64> {
        handshake_in_dump(&self.wg_show(), &self.exit_public)
    }

    /// What the client's `wireguard-go` logged.
    pub fn wireguard_log(&self) -> String {
        read_log(&self.node.log)
    }
}

impl Drop for PlainClient {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- plain client {} wireguard-go log ----\n{}",
                self.ns.name,
                self.wireguard_log()
            );
        }
        self.wg.stop();
    }
}

/// A standard WireGuard client (wireguard-go + `wg`) on `wg0` in an
/// existing namespace, for pointing at warren's own WireGuard exit.
#[derive(Debug)]
pub struct WgGoClient {
    _wg: Daemon,
    node: WgNode,
    peer_public: String,
    _dir: TestDir,
}

impl WgGoClient {
    /// Starts wireguard-go in `netns` configured from a one-peer wg-quick
    /// client file's text (PrivateKey, Address, PublicKey, PresharedKey,
    /// Endpoint; all traffic allowed), and routes `routes` through wg0.
    pub fn from_conf(netns: &str, conf: &str, routes: &[&str]) -> WgGoClient {
        let field = |key: &str| {
            conf.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().to_string())
            })
        };
        let need = |key: &str| field(key).unwrap_or_else(|| panic!("{key} missing in\n{conf}"));
        let endpoint: SocketAddr = need("Endpoint").parse().expect("numeric Endpoint");
        let psk = field("PresharedKey");
        let (private_key, address, peer_public) =
            (need("PrivateKey"), need("Address"), need("PublicKey"));
        let (private_key, address, peer_public) =
            (private_key.as_str(), address.as_str(), peer_public.as_str());
        let allowed = "0.0.0.0/0";
        let psk = psk.as_deref();
        let dir = TestDir::new("wggo-client");
        let key = dir.join("key");
        write_private(&key, &format!("{private_key}\n"));
        let node = WgNode::new(netns, &dir);
        let wg = node.start();
        let key_s = key.to_str().expect("utf-8 path").to_string();
        let ep = endpoint.to_string();
        let mut args = vec!["private-key", key_s.as_str(), "peer", peer_public];
        let psk_path = dir.join("psk");
        let psk_s = psk_path.to_str().expect("utf-8 path").to_string();
        if let Some(p) = psk {
            write_private(&psk_path, &format!("{p}\n"));
            args.extend(["preshared-key", psk_s.as_str()]);
        }
        args.extend([
            "endpoint",
            ep.as_str(),
            "allowed-ips",
            allowed,
            "persistent-keepalive",
            "25",
        ]);
        node.set(&args);
        ip(&["-n", netns, "addr", "add", address, "dev", "wg0"]);
        ip(&[
            "-n",
            netns,
            "link",
            "set",
            "wg0",
            "mtu",
            &MTU.to_string(),
            "up",
        ]);
        for r in routes {
            ip(&["-n", netns, "route", "add", r, "dev", "wg0"]);
        }
        WgGoClient {
            _wg: wg,
            node,
            peer_public: peer_public.to_string(),
            _dir: dir,
        }
    }

    /// The latest handshake with the peer (seconds since the epoch).
    pub fn latest_handshake(&self) -> Option<u64> {
        handshake_in_dump(&self.node.dump(), &self.peer_public)
    }

    /// The process id of wireguard-go.
    pub fn pid(&self) -> i32 {
        self._wg.proc.pid()
    }
}
