//! End-to-end tests of the root helper's foundation: its socket, peer
//! authentication, socket activation, limits, idle exit, privilege drop and
//! shutdown. Run as root (CI does); they fail, never skip, in CI otherwise.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use warren_ipc::frame::{decode_frame, encode_frame};
use warren_ipc::handshake::{ClientHello, HANDSHAKE_LEN, ServerHello};
use warren_ipc::msg::Response;
use warren_ipc::{ClientFrame, Event, HelperError, MAX_FRAME_LEN, Request, ServerFrame};
use warren_tests::{
    Helper, Proc, TestDir, as_user, bin, ids, proc_status_field, require_root, run_limited,
    wait_for,
};

const LIMIT: Duration = Duration::from_secs(20);

fn status_cmd(socket: &std::path::Path) -> Vec<String> {
    vec![
        "--helper-socket".into(),
        socket.display().to_string(),
        "helper".into(),
        "status".into(),
        "--json".into(),
    ]
}

/// Runs `warren helper status --json` as the given identity.
fn status_as(socket: &std::path::Path, uid: u32, gid: u32, groups: &[u32]) -> std::process::Output {
    let mut cmd = as_user(uid, gid, groups, &bin("warren"));
    cmd.args(status_cmd(socket));
    run_limited(&mut cmd, LIMIT)
}

/// Connects and completes the version handshake.
fn raw_connect(socket: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(&ClientHello::CURRENT.encode())
        .expect("handshake");
    let mut answer = [0u8; HANDSHAKE_LEN];
    s.read_exact(&mut answer).expect("handshake answer");
    let answer = ServerHello::decode(&answer).expect("answer decodes");
    assert_eq!(answer.chosen, warren_ipc::PROTOCOL_VERSION);
    s
}

fn send(s: &mut UnixStream, id: u32, request: Request) {
    let mut buf = Vec::new();
    encode_frame(&ClientFrame { id, request }, 0, &mut buf).expect("encode");
    s.write_all(&buf).expect("send frame");
}

/// Reads one server frame; None if the helper closed the connection.
fn recv(s: &mut UnixStream) -> Option<ServerFrame> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((frame, _, _)) = decode_frame::<ServerFrame>(&buf).expect("valid server frame")
        {
            return Some(frame);
        }
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("read from helper: {e}"),
        }
    }
}

fn hello_ok(socket: &std::path::Path) {
    let mut s = raw_connect(socket);
    send(
        &mut s,
        42,
        Request::Hello {
            client: "test".into(),
        },
    );
    match recv(&mut s) {
        Some(ServerFrame::Reply {
            id: 42,
            result: Ok(Response::Hello(info)),
        }) => assert_eq!(info.peer_uid, 0),
        other => panic!("expected a Hello reply, got {other:?}"),
    }
}

#[test]
fn socket_is_root_owned_group_0660() {
    if !require_root("socket_is_root_owned_group_0660") {
        return;
    }
    let h = Helper::start("sockmode", &[]);
    let m = std::fs::symlink_metadata(&h.socket).expect("socket exists");
    assert_eq!(m.uid(), 0);
    assert_eq!(m.gid(), ids::GROUP);
    assert_eq!(m.mode() & 0o777, 0o660);
}

#[test]
fn root_member_and_supplementary_member_are_served_outsider_is_refused() {
    if !require_root("root_member_and_supplementary_member_are_served_outsider_is_refused") {
        return;
    }
    let h = Helper::start("auth", &[]);

    let out = run_limited(
        Command::new(bin("warren")).args(status_cmd(&h.socket)),
        LIMIT,
    );
    assert!(out.status.success(), "root: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["running"], true);
    assert_eq!(v["activation"], "manual");

    let out = status_as(&h.socket, ids::MEMBER, ids::GROUP, &[]);
    assert!(out.status.success(), "primary-group member: {out:?}");

    let out = status_as(
        &h.socket,
        ids::SUPPLEMENTARY,
        ids::SUPPLEMENTARY,
        &[ids::OTHER_GROUP, ids::GROUP],
    );
    assert!(out.status.success(), "supplementary-group member: {out:?}");

    // The socket's mode keeps an outsider out before the helper even sees it.
    let out = status_as(&h.socket, ids::OUTSIDER, ids::OUTSIDER, &[ids::OTHER_GROUP]);
    assert_eq!(out.status.code(), Some(4), "outsider: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");

    // With the socket opened up, the helper's own SO_PEERCRED check refuses.
    std::fs::set_permissions(&h.socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = status_as(&h.socket, ids::OUTSIDER, ids::OUTSIDER, &[ids::OTHER_GROUP]);
    assert_eq!(out.status.code(), Some(4), "outsider: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not authorized"), "{err}");
    assert!(
        wait_for(Duration::from_secs(5), || h
            .proc
            .log()
            .contains("uid=60003")),
        "refusal logged with uid: {}",
        h.proc.log()
    );
    let log = h.proc.log();
    assert!(log.contains("refused"), "{log}");
}

#[test]
fn missing_helper_is_explained() {
    let dir = TestDir::new("absent");
    let sock = dir.join("nothing.sock");
    let out = run_limited(Command::new(bin("warren")).args(status_cmd(&sock)), LIMIT);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert!(err.contains("warren-helper serve"), "{err}");
    assert!(err.contains("warren-helper.socket"), "{err}");
    // --json still answers on stdout, for scripts.
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json on stdout");
    assert_eq!(v["running"], false);
    assert_eq!(v["exit_code"], 3);
}

/// Runs `warren-helper serve --socket SOCKET ARGS...` and asserts it fails
/// with `needle` in its message.
fn serve_fails(socket: &std::path::Path, args: &[&str], needle: &str) {
    let out = run_limited(
        Command::new(bin("warren-helper"))
            .args(["serve", "--socket", socket.to_str().expect("utf-8")])
            .args(args),
        LIMIT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "helper started: {out:?}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

const TEST_GROUP_ARGS: &[&str] = &["--group", "60100", "--config", "/nonexistent/x.toml"];

#[test]
fn unsafe_socket_paths_are_refused() {
    if !require_root("unsafe_socket_paths_are_refused") {
        return;
    }
    // A symlink where the socket should be.
    let d = TestDir::new("symlink");
    std::os::unix::fs::symlink("/tmp/elsewhere", d.join("helper.sock")).expect("symlink");
    serve_fails(&d.join("helper.sock"), TEST_GROUP_ARGS, "symlink");

    // A directory someone else owns.
    let d = TestDir::new("owner");
    std::os::unix::fs::chown(d.path(), Some(ids::MEMBER), None).expect("chown");
    serve_fails(&d.join("helper.sock"), TEST_GROUP_ARGS, "not owned by root");

    // A directory anyone may write to.
    let d = TestDir::new("worldw");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    serve_fails(
        &d.join("helper.sock"),
        TEST_GROUP_ARGS,
        "writable by group or others",
    );

    // A regular file in the way.
    let d = TestDir::new("file");
    std::fs::write(d.join("helper.sock"), b"x").expect("write");
    serve_fails(&d.join("helper.sock"), TEST_GROUP_ARGS, "not a socket");
}

#[test]
fn socket_activation_notifies_ready_and_exits_when_idle() {
    if !require_root("socket_activation_notifies_ready_and_exits_when_idle") {
        return;
    }
    let dir = TestDir::new("activate");
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let sock = dir.join("activated.sock");
    let log = dir.join("helper.log");
    let child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
        .arg(bin("warren-helper"))
        .args([
            "serve",
            "--group",
            "60100",
            "--idle-timeout",
            "1",
            "--config",
            "/nonexistent/x.toml",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("systemd-socket-activate");
    let mut proc = Proc::new(child, Some(log));
    assert!(
        wait_for(Duration::from_secs(10), || sock.exists()),
        "activator did not bind"
    );
    // The first connection starts the helper on the inherited socket.
    let out = run_limited(Command::new(bin("warren")).args(status_cmd(&sock)), LIMIT);
    assert!(out.status.success(), "{out:?}\n{}", proc.log());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["activation"], "socket");
    assert_eq!(v["idle_timeout_secs"], 1);

    let mut messages = String::new();
    let mut buf = [0u8; 512];
    while !messages.contains("READY=1") {
        let n = notify.recv(&mut buf).expect("READY=1 from the helper");
        messages.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    // Idle for 1 s: it exits on its own, successfully, and says so.
    let st = proc
        .wait_timeout(Duration::from_secs(15))
        .expect("idle helper exits");
    assert!(st.success(), "{st:?}\n{}", proc.log());
    while !messages.contains("STOPPING=1") {
        let n = notify.recv(&mut buf).expect("STOPPING=1 from the helper");
        messages.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(messages.contains("STATUS="), "{messages}");
}

#[test]
fn socket_activation_with_foreign_listen_pid_is_ignored() {
    if !require_root("socket_activation_with_foreign_listen_pid_is_ignored") {
        return;
    }
    // LISTEN_PID naming another process: the helper must not adopt fd 3 and
    // binds its own socket instead.
    let dir = TestDir::new("listenpid");
    let sock = dir.join("helper.sock");
    let child = Command::new(bin("warren-helper"))
        .args([
            "serve",
            "--socket",
            sock.to_str().expect("utf-8"),
            "--group",
            "60100",
            "--config",
            "/nonexistent/x.toml",
        ])
        .env("LISTEN_FDS", "1")
        .env("LISTEN_PID", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let _proc = Proc::new(child, None);
    assert!(wait_for(Duration::from_secs(10), || UnixStream::connect(
        &sock
    )
    .is_ok()));
    let out = run_limited(Command::new(bin("warren")).args(status_cmd(&sock)), LIMIT);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["activation"], "manual");
}

#[test]
fn autostarted_helper_stays_while_used_and_exits_when_idle() {
    if !require_root("autostarted_helper_stays_while_used_and_exits_when_idle") {
        return;
    }
    let mut h = Helper::start("idle", &["--autostarted", "--idle-timeout", "1"]);
    let held = raw_connect(&h.socket);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(h.proc.running(), "exited while a client was connected");
    drop(held);
    let st = h
        .proc
        .wait_timeout(Duration::from_secs(15))
        .expect("helper exits when idle");
    assert!(st.success(), "{st:?}");
    assert!(!h.socket.exists(), "socket removed on exit");
}

#[test]
fn malformed_input_is_refused_and_helper_keeps_serving() {
    if !require_root("malformed_input_is_refused_and_helper_keeps_serving") {
        return;
    }
    let h = Helper::start("malformed", &[]);

    // Not our protocol at all: told "no common version", then closed.
    let mut s = UnixStream::connect(&h.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let answer: [u8; HANDSHAKE_LEN] = rest
        .as_slice()
        .try_into()
        .expect("exactly one handshake answer, then close");
    assert_eq!(ServerHello::decode(&answer).expect("decodes").chosen, 0);

    // A wrong version: the helper answers "version 0" and closes.
    let mut s = UnixStream::connect(&h.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(&ClientHello { min: 900, max: 901 }.encode())
        .expect("write");
    let mut answer = [0u8; HANDSHAKE_LEN];
    s.read_exact(&mut answer).expect("answer");
    assert_eq!(ServerHello::decode(&answer).expect("decodes").chosen, 0);
    hello_ok(&h.socket);

    let mut valid = Vec::new();
    encode_frame(
        &ClientFrame {
            id: 1,
            request: Request::Status,
        },
        0,
        &mut valid,
    )
    .expect("encode");
    let mut trailing = valid.clone();
    trailing[3] += 2; // body length covers two extra bytes
    trailing.extend_from_slice(&[0, 0]);
    let mut unknown_variant = valid.clone();
    let body_start = warren_ipc::HEADER_LEN;
    unknown_variant[body_start + 1] = 0x7f; // request variant index 127
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty frame", vec![0, 0, 0, 0, 0, 0]),
        ("reserved flags", vec![0, 0, 0, 1, 0, 1, 0]),
        ("undecodable body", vec![0, 0, 0, 3, 0, 0, 0xff, 0xff, 0xff]),
        ("unknown variant", unknown_variant),
        ("trailing bytes", trailing),
        ("fds announced but absent", {
            let mut f = valid.clone();
            f[4] = 2;
            f
        }),
        ("too many fds", {
            let mut f = valid.clone();
            f[4] = 200;
            f
        }),
    ];
    for (name, bytes) in cases {
        let mut s = raw_connect(&h.socket);
        s.write_all(&bytes).expect("write");
        match recv(&mut s) {
            Some(ServerFrame::Reply {
                id: 0,
                result: Err(HelperError::Malformed),
            }) => {}
            other => panic!("{name}: expected Malformed, got {other:?}"),
        }
        assert!(recv(&mut s).is_none(), "{name}: connection closed after");
        // Every time, a well-behaved client is still served.
        hello_ok(&h.socket);
    }
    assert!(h.proc.log().contains("bad input from client"));
}

#[test]
fn frame_one_byte_over_cap_is_rejected_before_buffering() {
    if !require_root("frame_one_byte_over_cap_is_rejected_before_buffering") {
        return;
    }
    // A long frame timeout: if the helper waited for the body it would not
    // answer within the read timeout below.
    let h = Helper::start("cap", &["--frame-timeout-ms", "60000"]);
    let mut s = raw_connect(&h.socket);
    let mut header = [0u8; warren_ipc::HEADER_LEN];
    header[..4].copy_from_slice(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes());
    s.write_all(&header).expect("header only, no body");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    match recv(&mut s) {
        Some(ServerFrame::Reply {
            id: 0,
            result: Err(HelperError::FrameTooLarge { max }),
        }) => assert_eq!(max as usize, MAX_FRAME_LEN),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    // Exactly the cap is accepted as a header (then the body is awaited).
    let mut s = raw_connect(&h.socket);
    header[..4].copy_from_slice(&(MAX_FRAME_LEN as u32).to_be_bytes());
    s.write_all(&header).expect("header");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut b = [0u8; 1];
    let r = s.read(&mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a frame at the cap is not refused: {r:?}"
    );
    hello_ok(&h.socket);
}

#[test]
fn idle_and_trickling_clients_over_the_cap_do_not_starve_others() {
    if !require_root("idle_and_trickling_clients_over_the_cap_do_not_starve_others") {
        return;
    }
    let h = Helper::start(
        "flood",
        &[
            "--max-connections-per-uid",
            "4",
            "--max-connections",
            "64",
            "--frame-timeout-ms",
            "1500",
        ],
    );
    // Root holds its 4 slots: two idle, two trickling a frame byte by byte.
    let mut idle: Vec<UnixStream> = (0..2).map(|_| raw_connect(&h.socket)).collect();
    let mut tricklers: Vec<UnixStream> = (0..2).map(|_| raw_connect(&h.socket)).collect();
    let mut frame = Vec::new();
    encode_frame(
        &ClientFrame {
            id: 9,
            request: Request::Status,
        },
        0,
        &mut frame,
    )
    .expect("encode");
    for t in &mut tricklers {
        t.write_all(&frame[..1]).expect("first byte");
    }
    // A fifth connection of the same uid is refused with a typed error.
    let mut fifth = raw_connect(&h.socket);
    send(&mut fifth, 5, Request::Status);
    match recv(&mut fifth) {
        Some(ServerFrame::Reply {
            result: Err(HelperError::TooManyConnections { limit: 4 }),
            ..
        }) => {}
        other => panic!("expected TooManyConnections, got {other:?}"),
    }
    // Another user is served while root's slots are full.
    let out = status_as(&h.socket, ids::MEMBER, ids::GROUP, &[]);
    assert!(out.status.success(), "member starved: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["connected_clients"], 5, "4 of root's + the member's");

    // Tricklers are cut off once the frame timeout passes...
    for t in &mut tricklers {
        let _ = t.write_all(&frame[1..2]);
        t.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        assert!(recv(t).is_none(), "trickler disconnected");
    }
    // ...which frees slots for root again, while idle clients stay served.
    hello_ok(&h.socket);
    for s in &mut idle {
        send(s, 3, Request::Status);
        assert!(matches!(
            recv(s),
            Some(ServerFrame::Reply {
                id: 3,
                result: Ok(Response::Status(_))
            })
        ));
    }
}

#[test]
fn capabilities_are_reduced_and_no_new_privs_is_set() {
    if !require_root("capabilities_are_reduced_and_no_new_privs_is_set") {
        return;
    }
    let h = Helper::start("caps", &[]);
    let pid = h.proc.pid();
    // CHOWN 0, KILL 5, SETGID 6, SETUID 7, NET_ADMIN 12, SYS_CHROOT 18,
    // SYS_ADMIN 21.
    let kept: u64 = [0u32, 5, 6, 7, 12, 18, 21].iter().map(|b| 1u64 << b).sum();
    let hex = |f: &str| {
        u64::from_str_radix(&proc_status_field(pid, f).expect(f), 16).expect("hex capability mask")
    };
    assert_eq!(hex("CapEff"), kept, "effective set");
    assert_eq!(hex("CapPrm"), kept, "permitted set");
    assert_eq!(hex("CapBnd"), kept, "bounding set");
    assert_eq!(hex("CapInh"), 0, "inheritable set");
    assert_eq!(hex("CapAmb"), 0, "ambient set");
    assert_eq!(proc_status_field(pid, "NoNewPrivs").as_deref(), Some("1"));
    // And it still serves.
    hello_ok(&h.socket);
}

#[test]
fn sigterm_drains_clients_and_exits_zero() {
    if !require_root("sigterm_drains_clients_and_exits_zero") {
        return;
    }
    let mut h = Helper::start("sigterm", &[]);
    let mut client = raw_connect(&h.socket);
    send(&mut client, 1, Request::Status);
    assert!(matches!(
        recv(&mut client),
        Some(ServerFrame::Reply { id: 1, .. })
    ));
    h.proc.signal(Signal::SIGTERM);
    assert_eq!(
        recv(&mut client),
        Some(ServerFrame::Event(Event::ShuttingDown)),
        "idle client told before the helper goes"
    );
    let st = h.proc.wait_timeout(LIMIT).expect("exits");
    assert_eq!(st.code(), Some(0));
    assert!(!h.socket.exists(), "own socket removed");
    assert!(
        UnixStream::connect(&h.socket).is_err(),
        "no longer accepting"
    );
}

#[test]
fn sigint_exits_zero_too() {
    if !require_root("sigint_exits_zero_too") {
        return;
    }
    let mut h = Helper::start("sigint", &[]);
    h.proc.signal(Signal::SIGINT);
    let st = h.proc.wait_timeout(LIMIT).expect("exits");
    assert_eq!(st.code(), Some(0));
}

#[test]
fn second_helper_on_a_live_socket_refuses_to_start() {
    if !require_root("second_helper_on_a_live_socket_refuses_to_start") {
        return;
    }
    let h = Helper::start("twice", &[]);
    serve_fails(&h.socket, TEST_GROUP_ARGS, "already listening");
    hello_ok(&h.socket);
}

#[test]
fn config_file_must_be_root_controlled() {
    if !require_root("config_file_must_be_root_controlled") {
        return;
    }
    let d = TestDir::new("config");
    let conf = d.join("helper.toml");
    let conf_arg = conf.to_str().expect("utf-8").to_string();
    std::fs::write(&conf, "group = \"60100\"\n").expect("write");
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    serve_fails(
        &d.join("h.sock"),
        &["--config", &conf_arg],
        "writable by group or others",
    );
    // An unknown key is named with its line and column.
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::write(&conf, "group = \"60100\"\nmax_conections = 3\n").expect("write");
    serve_fails(
        &d.join("h.sock"),
        &["--config", &conf_arg],
        "line 2, column 1: unknown field `max_conections`",
    );
}
