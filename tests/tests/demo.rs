//! `warren demo`: builds the whole path, checks it, and leaves nothing
//! behind, both with `--once` and when stopped by `warren demo --down`.
//! Run inside a throwaway namespace that plays the host (its veth and
//! routes must not touch the machine's own). Root needed; CI runs as root.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use warren_tests::{Proc, TestNs, bin, require_root, run_limited, wait_for};

const LIMIT: Duration = Duration::from_secs(90);

fn leftovers(host: &TestNs) -> Vec<String> {
    let mut v = Vec::new();
    for ns in ["warren-demo-exit", "warren-demo"] {
        if Path::new("/run/netns").join(ns).exists() {
            v.push(format!("netns {ns}"));
        }
    }
    let links = run_limited(
        Command::new("ip").args(["-n", &host.name, "-br", "link"]),
        LIMIT,
    );
    if String::from_utf8_lossy(&links.stdout).contains("wrdemo") {
        v.push("link wrdemo0".into());
    }
    if Path::new("/run/warren-demo.json").exists() {
        v.push("/run/warren-demo.json".into());
    }
    for e in std::fs::read_dir("/run").into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("warren-demo.") {
            v.push(format!("{}", e.path().display()));
        }
    }
    v
}

fn demo(host: &TestNs) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &host.name])
        .arg(bin("warren"))
        .arg("demo");
    c
}

#[test]
fn demo_builds_checks_and_tears_down() {
    if !require_root("demo_builds_checks_and_tears_down") {
        return;
    }
    let host = TestNs::new(&format!("wrdh{}", std::process::id() % 100_000));
    host.ip(&["link", "set", "lo", "up"]);
    // --once: the check passes and nothing is left.
    let out = run_limited(demo(&host).arg("--once"), LIMIT);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo --once: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("curl --socks5-hostname 127.0.0.1:"),
        "no curl command printed: {text}"
    );
    assert!(
        text.contains("you came through WireGuard"),
        "the check's answer is missing: {text}"
    );
    assert_eq!(leftovers(&host), Vec::<String>::new());

    // Left running, then `warren demo --down` from elsewhere.
    let child = demo(&host)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo");
    let mut p = Proc::new(child, None);
    let mut lines = BufReader::new(p.child.stdout.take().expect("stdout")).lines();
    let ready = (0..40).any(|_| {
        lines
            .next()
            .is_some_and(|l| l.is_ok_and(|l| l.contains("tears it all down")))
    });
    assert!(ready, "demo did not come up");
    let down = run_limited(demo(&host).arg("--down"), LIMIT);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(
        wait_for(Duration::from_secs(30), || !p.running()),
        "the demo process did not end"
    );
    assert_eq!(leftovers(&host), Vec::<String>::new());
}
