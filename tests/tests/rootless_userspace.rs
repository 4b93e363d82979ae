//! Rootless instances on the userspace TCP/IP stack: where the user has no
//! user namespaces (forced off for real: the commands run in a user
//! namespace of their own whose `user.max_user_namespaces` is 0, so the
//! worker's `unshare(CLONE_NEWUSER)` fails with ENOSPC) or no usable
//! `/dev/net/tun` (this machine's is root-only). No helper runs. Against
//! a real wireguard-go exit (see [`warren_tests::wgexit`]). Root is needed
//! to set the scene (CI runs as root; these fail, never skip, there
//! otherwise).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use warren_tests::wgexit::WgExit;
use warren_tests::{bin, ids, require_root, wait_for};

/// `warren ARGS` as the test user with user namespaces off: in a user
/// namespace (the user mapped to itself) whose limit of child user
/// namespaces is 0, with no capabilities left when warren starts.
fn warren_without_userns(user: &User, args: &[&str]) -> Output {
    let script = format!(
        "echo 0 > /proc/sys/user/max_user_namespaces && exec setpriv --inh-caps=-all --ambient-caps=-all -- {} \"$@\"",
        bin("warren").display()
    );
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={}", ids::MEMBER),
        &format!("--regid={}", ids::GROUP),
        &format!("--groups={}", ids::GROUP),
        "--inh-caps=-all",
        "--",
        "unshare",
        "--map-current-user",
        &format!("--map-group={}", ids::GROUP),
        "--keep-caps",
        "--",
        "sh",
        "-c",
        &script,
        "sh",
    ]);
    user.run(&mut c, args)
}

#[test]
fn userspace_stack_where_user_namespaces_are_off() {
    if !require_root("userspace_stack_where_user_namespaces_are_off") {
        return;
    }
    let exit = WgExit::start("rlus");
    let user = User::new("rlus-user", Path::new("/nonexistent/helper.sock"), &exit);
    let name = iname("us");
    let (sp, hp) = free_ports();
    let (fp, up_port) = free_ports();
    let local = host_http("hello from the host\n");
    let out = warren_without_userns(
        &user,
        &[
            "up",
            &name,
            "--wg",
            user.conf.to_str().expect("utf-8"),
            "--socks-port",
            &sp.to_string(),
            "--http-port",
            &hp.to_string(),
            "--forward",
            &format!("tcp:127.0.0.1:{fp}={}:80", exit.tunnel_v4()),
            "--forward",
            &format!("udp:127.0.0.1:{up_port}={}:7", exit.tunnel_v4()),
            "--reverse",
            &format!("tcp:{}:2222=127.0.0.1:{local}", exit.client_v4()),
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "up without user namespaces: {}\n{}",
        text(&out.stderr),
        user.log(&name)
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("userspace stack") && err.contains("no user namespace"),
        "no notice of the userspace stack and why: {err}"
    );
    let up: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(up["rootless"], true);
    assert_eq!(up["stack"], "userspace");
    let worker = up["worker_pid"].as_i64().expect("pid");
    // The worker really is without namespaces of its own: same network
    // namespace as this test (the host's).
    assert_eq!(
        std::fs::read_link(format!("/proc/{worker}/ns/net")).expect("worker netns"),
        std::fs::read_link("/proc/self/ns/net").expect("own netns"),
    );

    let socks = format!("127.0.0.1:{sp}");
    let body = exit.http_body();
    assert_eq!(curl_ok(&["--socks5", &socks, &exit.url_v4("/")]), body);
    assert_eq!(curl_ok(&["--socks5", &socks, &exit.url_v6("/")]), body);
    assert_eq!(
        curl_ok(&["--socks5-hostname", &socks, "http://exit.test/"]),
        body
    );
    let http = format!("http://127.0.0.1:{hp}");
    assert_eq!(curl_ok(&["-x", &http, "http://www.exit.test/"]), body);
    assert_eq!(curl_ok(&["-p", "-x", &http, &exit.url_v4("/")]), body);
    // Names were asked at the tunnel's DNS, through the userspace stack.
    let q = exit.dns_queries();
    assert!(
        q.iter().any(|n| n.trim_end_matches('.') == "exit.test"),
        "exit.test never asked at the tunnel's DNS: {q:?}"
    );
    // A download much larger than the flow's fixed window arrives whole.
    let big = curl_ok(&[
        "--socks5",
        &socks,
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &exit.url_v4("/bytes/8000000"),
    ]);
    assert_eq!(big, "8000000");

    let echoed = socks_udp_echo(
        socks.parse().expect("addr"),
        SocketAddr::new(exit.tunnel_v4().into(), 7),
        b"userspace udp",
    );
    assert_eq!(echoed, b"userspace udp");

    // Forwards both ways.
    assert_forwards_work(&exit, fp, up_port, &|| user.log(&name));

    // status says which stack; exec is refused with the reason.
    let st = warren_without_userns(&user, &["status", "--json"]);
    assert!(
        text(&st.stdout).contains("\"stack\":\"userspace\""),
        "{}",
        text(&st.stdout)
    );
    let st = warren_without_userns(&user, &["status"]);
    assert!(
        text(&st.stdout).contains("rootless, userspace TCP/IP stack"),
        "{}",
        text(&st.stdout)
    );
    let ex = warren_without_userns(&user, &["exec", &name, "--", "true"]);
    assert!(!ex.status.success());
    assert!(
        text(&ex.stderr).contains("userspace TCP/IP stack"),
        "{}",
        text(&ex.stderr)
    );

    // kill -9: nothing is left (no process of the instance, no listener).
    // SAFETY: kill with the pid of a process this test started.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    assert!(
        wait_for(Duration::from_secs(5), || !pid_alive(worker)),
        "worker survived kill -9"
    );
    assert!(
        wait_for(Duration::from_secs(5), || port_free(sp)
            && port_free(hp)
            && port_free(fp)),
        "listeners survived the worker"
    );
    assert!(
        wait_for(Duration::from_secs(5), || connectors_for(local) == 0),
        "the reverse connector outlived the worker"
    );
}

#[test]
fn userspace_stack_without_a_usable_tun_device() {
    if !require_root("userspace_stack_without_a_usable_tun_device") {
        return;
    }
    // This machine's /dev/net/tun is root-only: user namespaces work, the
    // TUN device does not.
    let exit = WgExit::start("rlnt");
    let user = User::new("rlnt-user", Path::new("/nonexistent/helper.sock"), &exit);
    let name = iname("nt");
    let (sp, hp) = free_ports();
    let up = |stack: &str| {
        user.warren(&[
            "up",
            &name,
            "--wg",
            user.conf.to_str().expect("utf-8"),
            "--socks-port",
            &sp.to_string(),
            "--http-port",
            &hp.to_string(),
            "--rootless",
            "--stack",
            stack,
            "--json",
        ])
    };
    // --stack kernel refuses, clearly, and leaves nothing.
    let out = up("kernel");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("TUN"),
        "unclear failure: {}",
        text(&out.stderr)
    );
    assert!(wait_for(Duration::from_secs(5), || port_free(sp) && port_free(hp)));
    // auto falls back, says so, and serves.
    let out = up("auto");
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        user.log(&name)
    );
    assert!(
        text(&out.stderr).contains("no TUN device"),
        "{}",
        text(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["stack"], "userspace");
    let worker = v["worker_pid"].as_i64().expect("pid");
    // Here the worker still fences itself into an empty network namespace.
    assert_ne!(
        std::fs::read_link(format!("/proc/{worker}/ns/net")).expect("worker netns"),
        std::fs::read_link("/proc/self/ns/net").expect("own netns"),
    );
    assert_eq!(
        curl_ok(&[
            "--socks5-hostname",
            &format!("127.0.0.1:{sp}"),
            "http://exit.test/"
        ]),
        exit.http_body()
    );
    let out = user.warren(&["down", &name]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!pid_alive(worker), "down returned before the worker ended");
    assert!(port_free(sp) && port_free(hp), "ports left bound");
}
