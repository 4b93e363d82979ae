//! Support for warren's end-to-end tests: locating the built binaries,
//! running the helper as root on a private socket, running commands as other
//! users with `setpriv`, and failing (never skipping) privileged tests in CI.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub mod wgexit;
/// Unprivileged test identities. No passwd entries are needed: `setpriv`
/// takes numeric ids. Chosen far from real users and groups.
pub mod ids {
    /// The group the test helper authorizes.
    pub const GROUP: u32 = 60_100;
    /// Another group, authorizing nothing.
    pub const OTHER_GROUP: u32 = 60_101;
    /// A user whose primary group is [`GROUP`].
    pub const MEMBER: u32 = 60_001;
    /// A user in [`GROUP`] only through a supplementary group.
    pub const SUPPLEMENTARY: u32 = 60_002;
    /// A user outside [`GROUP`].
    pub const OUTSIDER: u32 = 60_003;
}

/// True when running in CI, where privileged tests must not skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns true if the test may run with root privileges. Outside CI, a
/// non-root run prints why and returns false (the caller returns early);
/// in CI it panics, so a privileged test can never silently pass.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if in_ci() {
        panic!("{test}: needs root, and CI=true forbids skipping privileged tests");
    }
    eprintln!("{test}: SKIPPED (needs root; CI runs it as root)");
    false
}

/// Path of a binary built by this workspace (`warren`, `warren-helper`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --workspace` first",
        p.display()
    );
    p
}

/// A fresh directory under /tmp, mode 0755 and owned by the caller, removed
/// on drop. World-traversable so unprivileged test users reach sockets in it.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates the directory; `tag` makes its name recognisable.
    pub fn new(tag: &str) -> TestDir {
        let path = tempfile::Builder::new()
            .prefix(&format!("warren-test-{tag}-"))
            .tempdir_in("/tmp")
            .expect("tempdir")
            .keep();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        TestDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A child process killed (by its PID, which we own) on drop.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
    log: Option<PathBuf>,
}

impl Proc {
    /// Wraps a spawned child whose stderr goes to `log`.
    pub fn new(child: Child, log: Option<PathBuf>) -> Proc {
        Proc { child, log }
    }

    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// What the child wrote to its log so far.
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Waits up to `limit` for the child to exit.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// True while the child runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` every 10 ms until it returns true or `limit` passes.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A root helper serving a private socket in its own test directory.
#[derive(Debug)]
pub struct Helper {
    /// The helper process (killed on drop).
    pub proc: Proc,
    /// Its socket.
    pub socket: PathBuf,
    /// Keeps the directory alive.
    pub dir: TestDir,
}

impl Helper {
    /// Starts `warren-helper serve` authorizing [`ids::GROUP`], plus
    /// `extra` arguments, and waits until its socket accepts connections.
    pub fn start(tag: &str, extra: &[&str]) -> Helper {
        let dir = TestDir::new(tag);
        let socket = dir.join("helper.sock");
        let log = dir.join("helper.log");
        let group = ids::GROUP.to_string();
        let mut args = vec![
            "serve",
            "--socket",
            socket.to_str().expect("utf-8 path"),
            "--group",
            &group,
            "--config",
            "/nonexistent/warren-test/helper.toml",
        ];
        args.extend_from_slice(extra);
        let child = Command::new(bin("warren-helper"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn warren-helper");
        let mut proc = Proc::new(child, Some(log));
        let up = wait_for(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        assert!(
            up && proc.running(),
            "helper did not come up; log:\n{}",
            proc.log()
        );
        Helper { proc, socket, dir }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- helper log ----\n{}", self.proc.log());
        }
        // Stop it the graceful way, so it removes what it created even when
        // the test failed half-way (Proc's drop then has nothing to kill).
        if self.proc.running() {
            self.proc.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = self.proc.wait_timeout(Duration::from_secs(15));
        }
    }
}

/// A command that runs `program` as `uid`/`gid` with exactly the
/// supplementary `groups`, no capabilities (via `setpriv`).
pub fn as_user(uid: u32, gid: u32, groups: &[u32], program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--inh-caps=-all");
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        let g: Vec<String> = groups.iter().map(u32::to_string).collect();
        c.arg(format!("--groups={}", g.join(",")));
    }
    c.arg("--").arg(program);
    c
}

/// Runs `cmd` to completion with a time limit, capturing its output.
pub fn run_limited(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("command {cmd:?} ran longer than {limit:?}; stderr: {err}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().expect("output")
}

/// Reads a `Name:\tvalue` field of /proc/PID/status.
pub fn proc_status_field(pid: i32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

/// A throwaway network namespace made by a test (`ip netns add`), deleted
/// on drop, failures included. Names must be unique per test (include the
/// pid) and must not start with `warren-` (the helper's own).
#[derive(Debug)]
pub struct TestNs {
    /// Its name.
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestNs {
    /// Creates it with loopback up.
    pub fn new(name: &str) -> TestNs {
        assert!(!name.starts_with("warren-"));
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        TestNs { name: name.into() }
    }

    /// Runs `ip -n NAME ARGS...`, asserting success.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// A command run inside it (`ip netns exec`).
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Connects `self` and `other` with a veth pair, addresses on both ends.
    pub fn veth(&self, if_a: &str, addr_a: &str, other: &TestNs, if_b: &str, addr_b: &str) {
        ip(&[
            "link",
            "add",
            if_a,
            "netns",
            &self.name,
            "type",
            "veth",
            "peer",
            "name",
            if_b,
            "netns",
            &other.name,
        ]);
        self.ip(&["addr", "add", addr_a, "dev", if_a]);
        self.ip(&["link", "set", if_a, "up"]);
        other.ip(&["addr", "add", addr_b, "dev", if_b]);
        other.ip(&["link", "set", if_b, "up"]);
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Starts the helper inside the lab host, with the lab's resolv.conf bound
/// over /etc/resolv.conf in a private mount namespace, which the helper
/// takes for the host's (`--own-mount-ns`): the machine's own
/// /etc/resolv.conf is never touched.
pub fn start_lab_helper(
    host: &TestNs,
    resolv: &std::path::Path,
    sock: &std::path::Path,
    log: &std::path::Path,
) -> Proc {
    start_lab_helper_env(host, resolv, sock, log, &[])
}

/// [`start_lab_helper`] with `env` added to the helper's environment.
pub fn start_lab_helper_env(
    host: &TestNs,
    resolv: &std::path::Path,
    sock: &std::path::Path,
    log: &std::path::Path,
    env: &[(&str, &str)],
) -> Proc {
    start_lab_helper_with(
        host,
        resolv,
        sock,
        log,
        &LabHelperOptions {
            env,
            ..LabHelperOptions::default()
        },
    )
}

/// What else a lab helper gets (see [`start_lab_helper_with`]).
#[derive(Debug, Default)]
pub struct LabHelperOptions<'a> {
    /// Added to the helper's environment.
    pub env: &'a [(&'a str, &'a str)],
    /// The helper's `--config` (root-owned, as the helper demands); none:
    /// no config file.
    pub config: Option<&'a std::path::Path>,
    /// Shell commands run inside the lab host (its network namespace and
    /// its private mount namespace) just before the helper starts: mounts
    /// that shape what the helper takes for the host's file system.
    pub setup: &'a str,
}

/// [`start_lab_helper`] with [`LabHelperOptions`].
pub fn start_lab_helper_with(
    host: &TestNs,
    resolv: &std::path::Path,
    sock: &std::path::Path,
    log: &std::path::Path,
    opts: &LabHelperOptions<'_>,
) -> Proc {
    let setup = if opts.setup.is_empty() {
        String::new()
    } else {
        let script = log.with_extension("setup.sh");
        std::fs::write(&script, format!("set -e\n{}\nexec \"$@\"\n", opts.setup))
            .expect("lab setup script");
        format!("sh {} ", script.display())
    };
    let script = format!(
        "mount --bind {resolv} /etc/resolv.conf && exec ip netns exec {ns} {setup}{helper} serve --own-mount-ns --socket {sock} --group 60100 --config {config}",
        resolv = resolv.display(),
        ns = host.name,
        helper = bin("warren-helper").display(),
        sock = sock.display(),
        config = opts
            .config
            .unwrap_or(std::path::Path::new("/nonexistent/x.toml"))
            .display(),
    );
    let child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .envs(opts.env.iter().copied())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("helper in the lab host");
    let helper = Proc::new(child, Some(log.to_path_buf()));
    assert!(
        wait_for(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(sock).is_ok()
        }),
        "{}",
        helper.log()
    );
    helper
}

/// The test pools for server tunnels (issue 14, finding 4: their subnets
/// must lie in the helper config's pools; the defaults are 100.64.0.0/10
/// and fd00::/8, the tests' addresses come from 198.18.0.0/15).
pub const TEST_SERVER_TUNNEL_POOLS: &str =
    "server_tunnel_pools = [\"198.18.0.0/15\", \"fd00::/8\"]\n";

/// Writes a helper config into `dir` (root-owned, mode 0644, as the helper
/// demands) and returns its path.
pub fn write_helper_config(dir: &TestDir, text: &str) -> PathBuf {
    let path = dir.join("helper.toml");
    std::fs::write(&path, text).expect("helper config");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    path
}

/// A listener standing in for a host daemon's socket (issue 14, finding 7);
/// counts connections from non-root peers (a lab's helper itself, root,
/// may look up its group through nscd: that is not a program's lookup).
#[derive(Debug)]
pub struct FakeDaemon {
    /// Where it listens.
    pub path: std::path::PathBuf,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeDaemon {
    /// Listens at `path` (mode 0777) until `stop` is set.
    pub fn new(
        path: std::path::PathBuf,
        stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        use std::sync::atomic::Ordering;
        let l = std::os::unix::net::UnixListener::bind(&path).expect("bind fake daemon");
        // Anyone may connect, as to the real daemons' sockets.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        l.set_nonblocking(true).expect("nonblocking");
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (count, stop) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((s, _)) => {
                        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
                        let uid = getsockopt(&s, PeerCredentials).map(|c| c.uid());
                        if uid != Ok(0) {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FakeDaemon { path, accepted }
    }

    /// Connections from non-root peers so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}
