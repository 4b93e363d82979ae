//! The sudo autostart path, with a real sudo and the shipped sudoers file, as
//! unprivileged test users.
//!
//! Each scenario runs in a private mount namespace (`unshare --mount`) where
//! /etc is a copy of the host's with test users, a `warren` group, the shipped
//! sudoers snippet and a helper config added, and /run is a fresh tmpfs, so
//! the host's users, sudoers and /run are never touched.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use warren_tests::{TestDir, bin, require_root, run_limited};

const GID_WARREN: u32 = 61_100;
/// In group warren: covered by the shipped sudoers line.
const MEMBER: (&str, u32) = ("wrtmember", 61_001);
/// Has a sudoers rule for the helper, but one that needs a password.
const PASSWORD_USER: (&str, u32) = ("wrtpasswd", 61_002);
/// May run something else without a password, not the helper.
const OTHER_USER: (&str, u32) = ("wrtother", 61_003);

/// A private /etc for one scenario.
struct FakeEtc {
    dir: TestDir,
}

impl FakeEtc {
    fn new(tag: &str) -> FakeEtc {
        let dir = TestDir::new(tag);
        let etc = dir.join("etc");
        let st = Command::new("cp")
            .args(["-a", "/etc"])
            .arg(&etc)
            .status()
            .expect("cp");
        assert!(st.success());
        let helper = bin("warren-helper");
        let helper = helper.to_str().expect("utf-8 path");
        let mut passwd = std::fs::read_to_string(etc.join("passwd")).expect("passwd");
        let mut group = std::fs::read_to_string(etc.join("group")).expect("group");
        // PAM's account check wants a shadow entry ("*": no password login).
        let mut shadow = std::fs::read_to_string(etc.join("shadow")).expect("shadow");
        for (name, uid) in [MEMBER, PASSWORD_USER, OTHER_USER] {
            passwd.push_str(&format!("{name}:x:{uid}:{uid}::/nonexistent:/bin/sh\n"));
            group.push_str(&format!("{name}:x:{uid}:\n"));
            shadow.push_str(&format!("{name}:*:19000:0:99999:7:::\n"));
        }
        std::fs::write(etc.join("shadow"), shadow).expect("shadow");
        group.push_str(&format!("warren:x:{GID_WARREN}:{}\n", MEMBER.0));
        std::fs::write(etc.join("passwd"), passwd).expect("passwd");
        std::fs::write(etc.join("group"), group).expect("group");
        // The shipped snippet, pointed at the binary under test.
        let shipped = std::fs::read_to_string(workspace_root().join("packaging/sudoers.d/warren"))
            .expect("shipped sudoers");
        let snippet = shipped.replace("/usr/bin/warren-helper", helper);
        let extra = format!(
            "{p} ALL=(root) {helper} serve --autostarted\n{o} ALL=(root) NOPASSWD: /bin/true\n",
            p = PASSWORD_USER.0,
            o = OTHER_USER.0
        );
        for (name, text) in [
            ("warren", snippet.as_str()),
            ("warren-test", extra.as_str()),
        ] {
            let path = etc.join("sudoers.d").join(name);
            std::fs::write(&path, text).expect("sudoers");
            let st = Command::new("chmod")
                .arg("0440")
                .arg(&path)
                .status()
                .expect("chmod");
            assert!(st.success());
            let out = Command::new("visudo")
                .arg("-c")
                .arg("-f")
                .arg(&path)
                .output()
                .expect("visudo");
            assert!(out.status.success(), "visudo -c: {out:?}");
        }
        std::fs::create_dir_all(etc.join("warren")).expect("mkdir");
        std::fs::write(etc.join("warren/helper.toml"), "idle_timeout_secs = 2\n").expect("toml");
        FakeEtc { dir }
    }

    /// Runs `script` (bash) as root in a private mount namespace with this
    /// /etc and an empty /run; scratch files go to /run/scratch and each
    /// user's runtime directory (autostart lock) to /run/user/UID, so
    /// nothing lands on the host (and /tmp, where the checkout and its
    /// binaries may live, stays visible).
    fn run(&self, script: &str) -> std::process::Output {
        let prologue = format!(
            "set -u\nmount --bind {etc} /etc\nmount -t tmpfs -o mode=0755 tmpfs /run\nmkdir -m 1777 /run/scratch\nfor u in {m} {p} {o}; do mkdir -p -m 700 /run/user/$u && chown $u /run/user/$u; done\n",
            etc = self.dir.join("etc").display(),
            m = MEMBER.1,
            p = PASSWORD_USER.1,
            o = OTHER_USER.1,
        );
        run_limited(
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "--", "bash", "-c"])
                .arg(format!("{prologue}{script}")),
            Duration::from_secs(60),
        )
    }
}

fn workspace_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `setpriv` prefix running as `user` with their groups from the fake /etc
/// and their runtime directory.
fn as_user(user: (&str, u32)) -> String {
    format!(
        "setpriv --reuid={u} --regid={u} --init-groups --inh-caps=-all -- env XDG_RUNTIME_DIR=/run/user/{u}",
        u = user.1
    )
}

fn warren() -> String {
    bin("warren").display().to_string()
}

/// Waits (in the namespace) for the autostarted helper to exit by itself,
/// then reports; kills it by its pid only if it overstays.
const WAIT_IDLE_EXIT: &str = r#"
for i in $(seq 150); do [ -S /run/warren/helper.sock ] || break; sleep 0.1; done
if [ -S /run/warren/helper.sock ]; then echo "HELPER-STILL-RUNNING"; kill "$HELPER_PID" 2>/dev/null; fi
"#;

#[test]
fn group_member_autostarts_helper_once_and_it_exits_when_idle() {
    if !require_root("group_member_autostarts_helper_once_and_it_exits_when_idle") {
        return;
    }
    let etc = FakeEtc::new("sudo-ok");
    let script = format!(
        r#"
{u} {w} helper start --json > /run/scratch/a.json 2>/run/scratch/a.err &
{u} {w} helper start --json > /run/scratch/b.json 2>/run/scratch/b.err &
wait
cat /run/scratch/a.json; echo; cat /run/scratch/b.json; echo; cat /run/scratch/a.err /run/scratch/b.err
HELPER_PID=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' /run/scratch/a.json)
echo "SOCKET: $(stat -c '%a %U %g' /run/warren/helper.sock)"
{wait}
echo DONE
"#,
        u = as_user(MEMBER),
        w = warren(),
        wait = WAIT_IDLE_EXIT
    );
    let out = etc.run(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let jsons: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(
        jsons.len(),
        2,
        "both clients got the helper: {stdout}\n{stderr}"
    );
    assert_eq!(jsons[0]["activation"], "autostarted");
    assert_eq!(
        jsons[0]["pid"], jsons[1]["pid"],
        "the start lock let only one helper start"
    );
    assert_eq!(jsons[0]["idle_timeout_secs"], 2, "config from /etc/warren");
    assert!(
        stdout.contains(&format!("SOCKET: 660 root {GID_WARREN}")),
        "{stdout}"
    );
    assert!(
        !stdout.contains("HELPER-STILL-RUNNING"),
        "autostarted helper exits when idle: {stdout}"
    );
    assert!(stdout.contains("DONE"), "{stdout}\n{stderr}");
}

/// Issue 14, finding 1: even where the main sudoers file sets no
/// `secure_path`, the autostarted helper starts with the shipped line's
/// PATH, never the caller's (and clears even that at once).
#[test]
fn finding_1_autostarted_helper_gets_secure_path_not_the_callers() {
    if !require_root("finding_1_autostarted_helper_gets_secure_path_not_the_callers") {
        return;
    }
    let etc = FakeEtc::new("sudo-path");
    let main = etc.dir.join("etc/sudoers");
    let text = std::fs::read_to_string(&main).expect("sudoers");
    let without: String = text
        .lines()
        .filter(|l| !l.contains("secure_path"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&main, without).expect("sudoers");
    let script = format!(
        r#"
mkdir -p -m 0777 /run/scratch/hostile
{u} PATH=/run/scratch/hostile:/usr/bin:/bin {w} helper start --json > /run/scratch/a.json 2>/run/scratch/a.err
cat /run/scratch/a.err
HELPER_PID=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' /run/scratch/a.json)
echo "HELPER-$(tr '\0' '\n' < /proc/$HELPER_PID/environ | grep '^PATH=')"
{wait}
"#,
        u = as_user(MEMBER),
        w = warren(),
        wait = WAIT_IDLE_EXIT
    );
    let out = etc.run(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("HELPER-PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sudoers_allows_only_the_exact_command_line() {
    if !require_root("sudoers_allows_only_the_exact_command_line") {
        return;
    }
    let etc = FakeEtc::new("sudo-exact");
    let helper = bin("warren-helper").display().to_string();
    let script = format!(
        r#"
{u} sudo -n {h} serve --autostarted --group 0 </dev/null; echo "EXTRA-ARG-RC=$?"
{u} sudo -n {h} serve </dev/null; echo "FEWER-ARGS-RC=$?"
{u} sudo -n /bin/true </dev/null; echo "OTHER-CMD-RC=$?"
"#,
        u = as_user(MEMBER),
        h = helper
    );
    let out = etc.run(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["EXTRA-ARG-RC", "FEWER-ARGS-RC", "OTHER-CMD-RC"] {
        assert!(
            stdout.contains(&format!("{key}=1")),
            "{key} refused: {stdout}\n{stderr}"
        );
    }
    // sudo answers "a password is required" or "not allowed" depending on
    // the user's other rules; either way it refused (exit 1, not run).
    assert!(
        stderr.contains("not allowed to execute") || stderr.contains("password is required"),
        "{stderr}"
    );
}

#[test]
fn each_autostart_failure_has_its_own_message() {
    if !require_root("each_autostart_failure_has_its_own_message") {
        return;
    }
    let etc = FakeEtc::new("sudo-fail");
    let w = warren();
    let script = format!(
        r#"
echo "== nosudo"; {m} env PATH=/nonexistent {w} helper start </dev/null; echo "RC=$?"
echo "== password"; {p} {w} helper start </dev/null; echo "RC=$?"
echo "== refused"; {o} {w} helper start </dev/null; echo "RC=$?"
echo "== disabled"; {m} {w} --no-autostart helper start </dev/null; echo "RC=$?"
echo "== disabled-by-config"; mkdir -p /run/cfg/warren && printf '[helper]\nautostart = false\n' >/run/cfg/warren/config.toml && chmod -R a+rX /run/cfg
{m} env XDG_CONFIG_HOME=/run/cfg {w} helper start </dev/null; echo "RC=$?"
echo "== timeout"; mkdir -p /run/warren && chown {uid} /run/warren
{m} {w} --autostart-timeout-ms 1500 helper start </dev/null; echo "RC=$?"
echo "== end"
"#,
        m = as_user(MEMBER),
        p = as_user(PASSWORD_USER),
        o = as_user(OTHER_USER),
        uid = MEMBER.1,
    );
    let out = etc.run(&script);
    // The CLI writes its errors to stderr, the markers go to stdout; merge
    // them by section with 2>&1 semantics: rerun capturing both in order.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("== end"), "{stdout}\n{stderr}");
    let rcs: Vec<&str> = stdout.lines().filter(|l| l.starts_with("RC=")).collect();
    assert_eq!(
        rcs,
        vec!["RC=3", "RC=3", "RC=4", "RC=3", "RC=3", "RC=3"],
        "{stdout}\n{stderr}"
    );
    for msg in [
        "sudo is not installed",
        "sudo needs a password and there is no terminal",
        "sudo refused to run",
        "autostart is turned off",
        "did not answer within",
    ] {
        assert!(stderr.contains(msg), "missing {msg:?} in:\n{stderr}");
    }
}
