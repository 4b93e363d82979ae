//! Regression tests for the deployment bugs of issue #21 that can be shown
//! without a booted systemd (tests/lab/deploy.sh shows all seven under a
//! real one). The helper runs as the packaged unit runs it: in a private
//! mount namespace, with the unit's capability bounding set and umask, its
//! socket and the host's mount namespace handed over as systemd hands them
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use warren::helper_client::HelperClient;
use warren_ipc::instance::{InstanceName, InstanceSpec};
use warren_tests::{Helper, Proc, TestDir, bin, ids, require_root, run_limited, wait_for};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn name(tag: &str) -> InstanceName {
    InstanceName::new(&format!("{tag}{}", std::process::id() % 1_000_000)).expect("name")
}

fn spec(n: &InstanceName) -> InstanceSpec {
    InstanceSpec::new(
        n.clone(),
        1420,
        vec!["198.19.78.2/32".parse().expect("p")],
        vec!["0.0.0.0/0".parse().expect("p")],
        vec!["198.19.78.53".parse().expect("ip")],
    )
    .expect("spec")
}

fn netns_exists(n: &InstanceName) -> bool {
    Path::new("/run/netns").join(n.netns()).exists()
}

fn unit_value(key: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root");
    let text = std::fs::read_to_string(root.join("systemd/warren-helper.service")).expect("unit");
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= in the unit"))
        .to_string()
}

/// A helper started the way the packaged unit starts it: `unshare --mount
/// --propagation slave` stands in for the unit's sandbox, `setpriv` applies
/// its `CapabilityBoundingSet=`, the shell its `UMask=`; the socket is fd 3
/// and, when `pass_host_ns`, the test's (the host's) mount namespace fd 4,
/// named as `ExecStartPre=+warren-helper pass-host-namespace` names it.
struct UnitHelper {
    proc: Proc,
    socket: PathBuf,
    _listener: OwnedFd,
    _dir: TestDir,
}

impl UnitHelper {
    fn start(tag: &str, pass_host_ns: bool) -> UnitHelper {
        let dir = TestDir::new(tag);
        let socket = dir.join("helper.sock");
        let listener: OwnedFd = UnixListener::bind(&socket).expect("bind").into();
        std::os::unix::fs::chown(&socket, Some(0), Some(ids::GROUP)).expect("chown");
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660)).expect("chmod");
        let host_mnt: OwnedFd = std::fs::File::open("/proc/self/ns/mnt")
            .expect("mnt")
            .into();
        let conf = dir.join("helper.toml");
        std::fs::write(&conf, format!("group = \"{}\"\n", ids::GROUP)).expect("config");
        let caps: Vec<String> = unit_value("CapabilityBoundingSet")
            .split_whitespace()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        let bounding = format!("-all,{}", caps.join(","));
        let (n_fds, names) = if pass_host_ns {
            (2, "warren-helper.socket:host-mnt")
        } else {
            (1, "warren-helper.socket")
        };
        let log = dir.join("helper.log");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "umask {umask}; LISTEN_PID=$$ LISTEN_FDS={n_fds} LISTEN_FDNAMES={names} exec \"$@\"",
                umask = unit_value("UMask")
            ))
            .arg("sh")
            .args(["unshare", "--mount", "--propagation", "slave", "--"])
            .args(["setpriv", "--bounding-set", &bounding, "--inh-caps=-all", "--"])
            .arg(bin("warren-helper"))
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--config")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        // Above 4, so neither dup2 below overwrites the other's source.
        let high = |fd: &OwnedFd| -> OwnedFd {
            let raw =
                nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10)).expect("dup");
            // SAFETY: fcntl just returned this new descriptor; we own it.
            unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) }
        };
        let (listener, host_mnt) = (high(&listener), high(&host_mnt));
        let (l, m) = (listener.as_raw_fd(), host_mnt.as_raw_fd());
        // SAFETY: between fork and exec only dup2, async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                for (src, dst) in [(l, 3), (m, 4)] {
                    if libc::dup2(src, dst) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let proc = Proc::new(cmd.spawn().expect("spawn"), Some(log));
        drop(host_mnt);
        UnitHelper {
            proc,
            socket,
            _listener: listener,
            _dir: dir,
        }
    }
}

impl Drop for UnitHelper {
    fn drop(&mut self) {
        if self.proc.running() {
            self.proc.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = self.proc.wait_timeout(Duration::from_secs(15));
        }
    }
}

/// Bug 1: under the unit's bounding set the helper cannot open its parent's
/// (PID 1's) mount namespace; it used to assume it was not sandboxed and
/// created /run/netns and /etc/netns in its private view. With the stored
/// descriptor, instances are published to the host. Bug 5: the unit's
/// `UMask=0077` made the instance's resolv.conf and /etc/netns entry root's
/// alone, so `warren exec` programs could not resolve.
#[test]
fn bug1_bug5_helper_under_the_units_sandbox_publishes_readable_instances_to_the_host() {
    if !require_root("bug1_bug5_helper_under_the_units_sandbox_publishes_readable_instances") {
        return;
    }
    let mut h = UnitHelper::start("dep-unit", true);
    let n = name("dpu");
    rt().block_on(async {
        let limit = Duration::from_secs(20);
        let connected = tokio::time::timeout(limit, HelperClient::connect(&h.socket)).await;
        let Ok(Ok(mut c)) = connected else {
            panic!("connect: {connected:?}\n{}", h.proc.log());
        };
        let created = tokio::time::timeout(limit, c.create_instance(spec(&n)))
            .await
            .expect("answer in time");
        assert!(created.is_ok(), "{created:?}\n{}", h.proc.log());
        assert!(netns_exists(&n), "published to the host's /run/netns");
        let dir = Path::new("/etc/netns").join(n.netns());
        let resolv = dir.join("resolv.conf");
        let mode = |p: &Path| std::fs::metadata(p).map(|m| m.mode() & 0o777);
        assert_eq!(mode(&dir).ok(), Some(0o755), "{}", dir.display());
        assert_eq!(mode(&resolv).ok(), Some(0o644), "{}", resolv.display());
        // Readable by a user, as a `warren exec` program is.
        let out = run_limited(
            Command::new("setpriv")
                .args(["--reuid=60001", "--regid=60100", "--clear-groups", "cat"])
                .arg(&resolv),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("198.19.78.53"));
        c.destroy_instance(&n).await.expect("destroy");
    });
    assert!(!netns_exists(&n));
    h.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(h.proc.wait_timeout(Duration::from_secs(10)).is_some());
}

/// Bug 1, the loud part: without the stored descriptor, under the unit's
/// bounding set, the helper refuses to start and says why, instead of
/// silently working in its private file system view.
#[test]
fn bug1_helper_that_cannot_find_the_host_mount_namespace_refuses_to_start() {
    if !require_root("bug1_helper_that_cannot_find_the_host_mount_namespace_refuses_to_start") {
        return;
    }
    let mut h = UnitHelper::start("dep-nons", false);
    let status = h.proc.wait_timeout(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| !s.success()),
        "must exit with an error: {status:?}\n{}",
        h.proc.log()
    );
    let log = h.proc.log();
    assert!(
        log.contains("cannot find the host's mount namespace")
            && log.contains("pass-host-namespace"),
        "{log}"
    );
}

/// Bug 3: `warren-helper cleanup` (the unit's ExecStopPost) decided whether
/// a helper runs by connecting to the socket, which systemd still holds: it
/// always refused, and its connection started the helper again. Now it
/// never connects, and cleans up when no helper holds the lock.
#[test]
fn bug3_cleanup_never_connects_to_the_socket_systemd_holds() {
    if !require_root("bug3_cleanup_never_connects_to_the_socket_systemd_holds") {
        return;
    }
    let mut h = Helper::start("dep-clean", &[]);
    let n = name("dpc");
    rt().block_on(async {
        let mut c = HelperClient::connect(&h.socket).await.expect("connect");
        c.create_instance(spec(&n)).await.expect("create");
    });
    h.proc.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(h.proc.wait_timeout(Duration::from_secs(10)).is_some());
    // systemd keeps listening on the socket after the service died.
    let _ = std::fs::remove_file(&h.socket);
    let manager = UnixListener::bind(&h.socket).expect("bind as the socket unit");
    manager.set_nonblocking(true).expect("nonblocking");
    let out = run_limited(
        Command::new(bin("warren-helper"))
            .args(["cleanup", "--socket"])
            .arg(&h.socket),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        matches!(manager.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "cleanup connected to the socket (that starts a socket-activated helper)"
    );
    assert!(!netns_exists(&n), "the orphan is removed");
}

/// Bug 4: what a restarted helper cannot remove stays in the journal and is
/// shown (`warren status` lists it as an orphan), never hidden; `warren down`
/// retries it.
#[test]
fn bug4_orphans_that_cannot_be_removed_are_listed_and_down_retries() {
    if !require_root("bug4_orphans_that_cannot_be_removed_are_listed_and_down_retries") {
        return;
    }
    let mut h = Helper::start("dep-orph", &[]);
    let n = name("dpo");
    rt().block_on(async {
        let mut c = HelperClient::connect(&h.socket).await.expect("connect");
        c.create_instance(spec(&n)).await.expect("create");
    });
    h.proc.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(h.proc.wait_timeout(Duration::from_secs(10)).is_some());
    // Something removal cannot get past: a mount over the resolv.conf.
    let resolv = Path::new("/etc/netns").join(n.netns()).join("resolv.conf");
    let mounted = run_limited(
        Command::new("mount")
            .args(["--bind", "/etc/hostname"])
            .arg(&resolv),
        Duration::from_secs(10),
    );
    assert!(mounted.status.success(), "{mounted:?}");
    let unmount = || {
        run_limited(Command::new("umount").arg(&resolv), Duration::from_secs(10));
    };
    let log = h.dir.join("helper2.log");
    let child = Command::new(bin("warren-helper"))
        .args(["serve", "--socket"])
        .arg(&h.socket)
        .args(["--group", "60100", "--config", "/nonexistent/x.toml"])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("restart");
    let mut second = Proc::new(child, Some(log));
    let up = wait_for(Duration::from_secs(10), || {
        UnixStream::connect(&h.socket).is_ok()
    });
    if !up {
        unmount();
        panic!("second helper: {}", second.log());
    }
    rt().block_on(async {
        let mut c = HelperClient::connect(&h.socket).await.expect("connect");
        let list = c.list_instances().await.expect("list");
        let listed = list
            .iter()
            .any(|i| i.name == n && i.lease.starts_with("orphan"));
        let status = run_limited(
            Command::new(bin("warren"))
                .arg("--helper-socket")
                .arg(&h.socket)
                .args(["--no-autostart", "status"]),
            Duration::from_secs(20),
        );
        let retry_blocked = c.destroy_instance(&n).await.is_err();
        unmount();
        assert!(listed, "the orphan is listed: {list:?}\n{}", second.log());
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(
            status.status.success() && text.contains(&format!("orphan {n}:")),
            "warren status shows it: {status:?}"
        );
        assert!(
            retry_blocked,
            "removal cannot succeed while the mount is there"
        );
        c.destroy_instance(&n)
            .await
            .expect("down retries once it can");
        let list = c.list_instances().await.expect("list");
        assert!(list.iter().all(|i| i.name != n), "{list:?}");
    });
    assert!(!netns_exists(&n));
    second.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(second.wait_timeout(Duration::from_secs(10)).is_some());
}
