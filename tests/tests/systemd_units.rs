//! The shipped systemd units: they verify, their security score matches the
//! one documented, and socket activation with the socket unit's own settings
//! serves, exits when idle and starts again on the next connection.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use warren_tests::{Proc, TestDir, bin, ids, require_root, run_limited};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn unit(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).expect("unit file")
}

/// Values of `key=` in a unit file (all occurrences).
fn values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

/// Writes the units into `dir` with /usr/bin paths pointing at the built
/// binaries, as an installed package would have them.
fn localized_units(dir: &Path) -> Vec<PathBuf> {
    let helper = bin("warren-helper").display().to_string();
    let warren = bin("warren").display().to_string();
    let mut out = Vec::new();
    for (src, name) in [
        ("systemd/warren-helper.socket", "warren-helper.socket"),
        ("systemd/warren-helper.service", "warren-helper.service"),
        ("systemd/user/warren-proxy.service", "warren-proxy.service"),
        (
            "systemd/user/warren-instance@.service",
            "warren-instance@test.service",
        ),
    ] {
        let text = unit(src)
            .replace("/usr/bin/warren-helper", &helper)
            .replace("/usr/bin/warren ", &format!("{warren} "));
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write unit");
        out.push(p);
    }
    out
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = TestDir::new("units");
    let units = localized_units(dir.path());
    let out = run_limited(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(&units),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

#[test]
fn documented_exposure_score_matches_the_unit() {
    let out = run_limited(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(root().join("systemd/warren-helper.service")),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let score = text
        .lines()
        .find_map(|l| l.split("warren-helper.service: ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .expect("overall exposure line")
        .to_string();
    let doc = std::fs::read_to_string(root().join("docs/security.md")).expect("security.md");
    assert!(
        doc.contains(&format!("exposure level: **{score}**")),
        "docs/security.md must record the current score {score}"
    );
}

/// A minimal stand-in for systemd's socket unit (Accept=no): holds the
/// listening socket with the unit's mode and group, and on each incoming
/// connection starts the service's ExecStart with the socket as fd 3.
#[test]
fn socket_activation_with_unit_settings_idles_out_and_restarts_on_next_connection() {
    if !require_root(
        "socket_activation_with_unit_settings_idles_out_and_restarts_on_next_connection",
    ) {
        return;
    }
    let socket_unit = unit("systemd/warren-helper.socket");
    let service_unit = unit("systemd/warren-helper.service");
    assert_eq!(
        values(&socket_unit, "ListenStream"),
        vec!["/run/warren/helper.sock"]
    );
    let mode = u32::from_str_radix(&values(&socket_unit, "SocketMode")[0], 8).expect("mode");
    assert_eq!(values(&socket_unit, "SocketUser"), vec!["root"]);
    assert_eq!(values(&socket_unit, "SocketGroup"), vec!["warren"]);
    let exec = values(&service_unit, "ExecStart")[0].clone();
    let mut argv: Vec<String> = exec.split_whitespace().map(str::to_string).collect();
    assert_eq!(argv[0], "/usr/bin/warren-helper");
    argv[0] = bin("warren-helper").display().to_string();

    let dir = TestDir::new("activation");
    let sock = dir.join("helper.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    // The unit's settings, with the test group standing in for "warren".
    std::os::unix::fs::chown(&sock, Some(0), Some(ids::GROUP)).expect("chown");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(mode)).expect("chmod");
    let m = std::fs::metadata(&sock).expect("stat");
    assert_eq!(m.mode() & 0o777, 0o660);
    // Root-owned config with a short idle exit and the test group.
    let conf = dir.join("helper.toml");
    std::fs::write(
        &conf,
        format!("group = \"{}\"\nidle_timeout_secs = 1\n", ids::GROUP),
    )
    .expect("config");
    let listen_fd: OwnedFd = listener.into();

    for round in 1..=2 {
        // A client connects first; the "manager" sees the socket readable
        // and starts the service, as systemd does.
        let status = std::thread::spawn({
            let sock = sock.clone();
            move || {
                run_limited(
                    Command::new(bin("warren")).args([
                        "--helper-socket",
                        sock.to_str().expect("utf-8"),
                        "--no-autostart",
                        "helper",
                        "status",
                        "--json",
                    ]),
                    Duration::from_secs(30),
                )
            }
        });
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&listen_fd),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).expect("poll");
        assert_eq!(n, 1, "round {round}: connection pending");
        let proc = spawn_activated(&argv, &conf, &listen_fd, &dir.join(&format!("log{round}")));
        let mut proc = proc;
        let out = status.join().expect("client thread");
        assert!(
            out.status.success(),
            "round {round}: {out:?}\n{}",
            proc.log()
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["activation"], "socket");
        // Idle for 1 s: exits 0; the socket stays with the manager.
        let st = proc
            .wait_timeout(Duration::from_secs(15))
            .expect("idle exit");
        assert!(st.success(), "round {round}: {st:?}\n{}", proc.log());
        assert!(sock.exists(), "the manager's socket survives the service");
    }
}

fn spawn_activated(argv: &[String], conf: &Path, listen: &OwnedFd, log: &Path) -> Proc {
    let raw = listen.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$@\"")
        .arg("sh")
        .args(argv)
        .arg("--config")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"));
    // SAFETY: between fork and exec only dup2 and fcntl, both async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                // Already in place: only clear close-on-exec.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, 3) < 0 {
                // (dup2 clears close-on-exec on the new descriptor.)
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Proc::new(cmd.spawn().expect("spawn helper"), Some(log.to_path_buf()))
}
