//! The helper's own files across its life (issue #14, finding 8): a second
//! autostart must not erase the running helper's log (its audit trail), and
//! a stopping helper removes only the socket it bound.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use warren_tests::{Helper, Proc, TestDir, bin, require_root, run_limited, wait_for};

#[test]
fn finding_8_second_autostart_never_truncates_the_running_helpers_log() {
    if !require_root("finding_8_second_autostart_never_truncates_the_running_helpers_log") {
        return;
    }
    let dir = TestDir::new("autolog");
    let sock = dir.join("helper.sock");
    let args = [
        "serve",
        "--autostarted",
        "--socket",
        sock.to_str().expect("utf-8"),
        "--group",
        "60100",
        "--config",
        "/nonexistent/x.toml",
    ];
    let child = Command::new(bin("warren-helper"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("first helper");
    let mut first = Proc::new(child, Some(dir.join("helper.log")));
    assert!(
        wait_for(Duration::from_secs(10), || UnixStream::connect(&sock)
            .is_ok()),
        "first helper up"
    );
    let log = dir.join("helper.log");
    // The socket can answer a moment before the start is logged.
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_for(Duration::from_secs(10), || !logged().is_empty()),
        "the first helper logged its start"
    );
    let before = logged();
    let out = run_limited(
        Command::new(bin("warren-helper")).args(args),
        Duration::from_secs(20),
    );
    assert!(
        !out.status.success(),
        "a second helper must refuse: {out:?}"
    );
    let after = std::fs::read_to_string(&log).expect("log");
    assert!(
        after.starts_with(&before),
        "the running helper's log was erased by a second autostart:\n{after}"
    );
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(first.wait_timeout(Duration::from_secs(10)).is_some());
}

#[test]
fn finding_8_shutdown_never_unlinks_a_socket_that_is_not_its_own() {
    if !require_root("finding_8_shutdown_never_unlinks_a_socket_that_is_not_its_own") {
        return;
    }
    let mut h = Helper::start("sockown", &[]);
    // Someone else's socket now sits at the path.
    std::fs::remove_file(&h.socket).expect("remove");
    let theirs = UnixListener::bind(&h.socket).expect("bind another socket");
    let ino = std::fs::metadata(&h.socket).expect("stat").ino();
    h.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(h.proc.wait_timeout(Duration::from_secs(10)).is_some());
    let now = std::fs::metadata(&h.socket).map(|m| m.ino());
    assert_eq!(
        now.ok(),
        Some(ino),
        "the helper removed a socket it had not bound"
    );
    drop(theirs);
}
