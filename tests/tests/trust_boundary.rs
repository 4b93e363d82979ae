//! Regression tests for issue 14 ("Trust boundary"), one per finding, named
//! after it. Root e2e tests (CI runs them as root; they fail, never skip,
//! there otherwise). Everything that touches routing or nftables runs in a
//! throwaway namespace that plays the host, never the machine's own.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use warren::helper_client::{ClientError, HelperClient};
use warren_ipc::HelperError;
use warren_ipc::instance::{
    HostTunnelSpec, InstanceName, InstanceSpec, ServerTunnelSpec, SpawnSpec,
};
use warren_tests::{Proc, TestDir, TestNs, require_root, run_limited};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn pid() -> u32 {
    std::process::id() % 100_000
}

/// A namespace playing the host (optionally with a veth to a neighbour and
/// a default route through it), and a helper serving inside it with a
/// private /etc/resolv.conf.
struct Lab {
    host: TestNs,
    _other: Option<TestNs>,
    sock: std::path::PathBuf,
    helper: Proc,
    _dir: TestDir,
}

impl Lab {
    fn new(tag: &str, default_route: bool, env: &[(&str, &str)]) -> Lab {
        Lab::with_setup(tag, default_route, env, "")
    }

    /// [`Lab::new`] with `setup` run in the lab host's private mount
    /// namespace before the helper starts.
    fn with_setup(tag: &str, default_route: bool, env: &[(&str, &str)], setup: &str) -> Lab {
        let host = TestNs::new(&format!("wrtb{tag}{}h", pid()));
        let other = default_route.then(|| {
            let other = TestNs::new(&format!("wrtb{tag}{}o", pid()));
            host.veth(
                &format!("tb{tag}{}h", pid()),
                "198.18.54.1/24",
                &other,
                &format!("tb{tag}{}o", pid()),
                "198.18.54.2/24",
            );
            host.ip(&["route", "add", "default", "via", "198.18.54.2"]);
            other
        });
        let dir = TestDir::new(&format!("trust-{tag}"));
        let resolv = dir.join("resolv.conf");
        std::fs::write(&resolv, "nameserver 198.18.54.53\n").expect("resolv");
        let sock = dir.join("helper.sock");
        let config =
            warren_tests::write_helper_config(&dir, warren_tests::TEST_SERVER_TUNNEL_POOLS);
        let helper = warren_tests::start_lab_helper_with(
            &host,
            &resolv,
            &sock,
            &dir.join("helper.log"),
            &warren_tests::LabHelperOptions {
                env,
                config: Some(&config),
                setup,
            },
        );
        Lab {
            host,
            _other: other,
            sock,
            helper,
            _dir: dir,
        }
    }

    /// The lab host's nftables ruleset.
    fn ruleset(&self) -> String {
        let out = run_limited(
            self.host.exec("nft").args(["list", "ruleset"]),
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The lab host's IPv4 forwarding switch.
    fn forwarding(&self) -> String {
        let out = run_limited(
            self.host.exec("cat").arg("/proc/sys/net/ipv4/ip_forward"),
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Table `inet TABLE` as nft lists it ("" when it does not exist).
    fn table(&self, table: &str) -> String {
        let out = run_limited(
            self.host.exec("nft").args(["list", "table", "inet", table]),
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- helper log ----\n{}", self.helper.log());
        }
        self.helper.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = self.helper.wait_timeout(Duration::from_secs(10));
    }
}

fn name(s: &str) -> InstanceName {
    InstanceName::new(s).expect("name")
}

fn server_spec(n: &str) -> ServerTunnelSpec {
    ServerTunnelSpec::new(name(n), 1420, vec!["198.19.61.1/24".parse().expect("p")]).expect("spec")
}

fn host_spec(n: &str) -> HostTunnelSpec {
    HostTunnelSpec::new(
        name(n),
        1420,
        vec!["198.19.72.2/32".parse().expect("p")],
        vec!["0.0.0.0/0".parse().expect("p")],
        vec![],
        true,
    )
    .expect("spec")
}

/// Finding 1: a helper started with a hostile `PATH` (a marker-writing
/// `nft` first) creates and destroys a server tunnel and a host tunnel with
/// kill switch, and never runs that `nft`.
#[test]
fn finding_1_helper_never_runs_nft_found_through_path() {
    if !require_root("finding_1_helper_never_runs_nft_found_through_path") {
        return;
    }
    let hostile = TestDir::new("trust-path");
    let marker = hostile.join("ran");
    let fake = hostile.join("nft");
    // Does what the real one does, so only the marker tells them apart.
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$@\" >>{}\nexec /usr/sbin/nft \"$@\"\n",
            marker.display()
        ),
    )
    .expect("fake nft");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", hostile.path().display());
    let lab = Lab::new("p", true, &[("PATH", &path)]);
    let (s, h) = (format!("ps{}", pid()), format!("ph{}", pid()));
    rt().block_on(async {
        let mut c = HelperClient::connect(&lab.sock).await.expect("connect");
        let (_, _tun) = c
            .create_server_tunnel(server_spec(&s))
            .await
            .expect("server tunnel");
        let (_, _tun2, _udp) = c
            .create_host_tunnel(host_spec(&h))
            .await
            .expect("host tunnel with kill switch");
        let rules = lab.ruleset();
        assert!(
            rules.contains("masquerade"),
            "server NAT installed: {rules}"
        );
        assert!(
            rules.contains("policy drop"),
            "kill switch installed: {rules}"
        );
        c.destroy_instance(&name(&h)).await.expect("destroy host");
        c.destroy_instance(&name(&s)).await.expect("destroy server");
    });
    assert_eq!(lab.ruleset().trim(), "", "every table removed");
    assert!(
        !marker.exists(),
        "the helper ran the nft found through PATH: {}",
        std::fs::read_to_string(&marker).unwrap_or_default()
    );
}

/// Finding 3: a server tunnel named `h-fN` and a host tunnel named `fN`
/// (once both `warren_h_fN`) each keep a table of their own, and neither's
/// creation or removal touches the other's; a table the helper did not
/// create is never replaced or deleted: the request is refused instead.
#[test]
fn finding_3_server_h_foo_and_host_foo_keep_their_own_tables() {
    if !require_root("finding_3_server_h_foo_and_host_foo_keep_their_own_tables") {
        return;
    }
    let lab = Lab::new("t", true, &[]);
    let (s, h, x) = (
        format!("h-f{}", pid()),
        format!("f{}", pid()),
        format!("x{}", pid()),
    );
    let (server, host) = (server_spec(&s), host_spec(&h));
    let server_table = server.names().nft_table.expect("server table");
    let host_table = host.names().nft_table.expect("host table");
    assert_ne!(server_table, host_table);
    // Someone else's tables under the names a server tunnel `xN` gets (now
    // and before the fix).
    let foreign = server_spec(&x).names().nft_table.expect("table");
    for t in [foreign.as_str(), &format!("warren_{x}")] {
        let out = run_limited(
            lab.host.exec("nft").args([
                "add",
                "table",
                "inet",
                t,
                "{ comment \"not warren's\" ; }",
            ]),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "nft add table: {out:?}");
    }
    rt().block_on(async {
        let mut c = HelperClient::connect(&lab.sock).await.expect("connect");
        match c.create_server_tunnel(server_spec(&x)).await {
            Err(ClientError::Helper(HelperError::Exists { what })) => {
                assert!(what.contains(&foreign), "{what}")
            }
            other => panic!("a foreign table must be refused, got {other:?}"),
        }
        for t in [foreign.as_str(), &format!("warren_{x}")] {
            assert!(lab.table(t).contains("not warren's"), "{t} left alone");
        }
        let (_, _tun) = c.create_server_tunnel(server).await.expect("server");
        let (_, _tun2, _udp) = c.create_host_tunnel(host).await.expect("host");
        assert!(
            lab.table(&server_table).contains("masquerade"),
            "server NAT intact after the host tunnel: {}",
            lab.ruleset()
        );
        assert!(
            lab.table(&host_table).contains("policy drop"),
            "kill switch installed: {}",
            lab.ruleset()
        );
        c.destroy_instance(&name(&h)).await.expect("destroy host");
        assert!(
            lab.table(&server_table).contains("masquerade"),
            "server NAT intact after the host tunnel's removal: {}",
            lab.ruleset()
        );
        assert_eq!(lab.table(&host_table), "", "kill switch removed");
        c.destroy_instance(&name(&s)).await.expect("destroy server");
    });
    assert_eq!(lab.table(&server_table), "", "server table removed");
    for t in [foreign.as_str(), &format!("warren_{x}")] {
        assert!(lab.table(t).contains("not warren's"), "{t} left alone");
    }
}

/// Finding 3 (the helper never uses or removes a kernel object it did not
/// create): a server or host tunnel whose link name is taken by a link that
/// is not warren's is refused, and that link stays.
#[test]
fn finding_3_tunnel_whose_link_name_is_taken_is_refused() {
    if !require_root("finding_3_tunnel_whose_link_name_is_taken_is_refused") {
        return;
    }
    let lab = Lab::new("l", true, &[]);
    let (s, h) = (format!("ls{}", pid()), format!("lh{}", pid()));
    let (server, host) = (server_spec(&s), host_spec(&h));
    for ifname in [server.ifname(), host.ifname()] {
        lab.host
            .ip(&["tuntap", "add", "dev", &ifname, "mode", "tun"]);
    }
    rt().block_on(async {
        let mut c = HelperClient::connect(&lab.sock).await.expect("connect");
        match c.create_server_tunnel(server.clone()).await {
            Err(ClientError::Helper(HelperError::Exists { what })) => {
                assert!(what.contains(&server.ifname()), "{what}")
            }
            other => panic!("expected Exists, got {other:?}"),
        }
        match c.create_host_tunnel(host.clone()).await {
            Err(ClientError::Helper(HelperError::Exists { what })) => {
                assert!(what.contains(&host.ifname()), "{what}")
            }
            other => panic!("expected Exists, got {other:?}"),
        }
    });
    for ifname in [server.ifname(), host.ifname()] {
        lab.host.ip(&["link", "show", "dev", &ifname]);
    }
    assert_eq!(lab.ruleset().trim(), "");
}

/// Finding 10: a server tunnel on a host without a default route is
/// refused with that reason (a typed error the CLI prints), not with an
/// incident number in a log the member cannot read; nothing is left behind.
#[test]
fn finding_10_server_tunnel_without_default_route_says_why() {
    if !require_root("finding_10_server_tunnel_without_default_route_says_why") {
        return;
    }
    let lab = Lab::new("d", false, &[]);
    let s = format!("d{}", pid());
    let spec = server_spec(&s);
    rt().block_on(async {
        let mut c = HelperClient::connect(&lab.sock).await.expect("connect");
        let e = c
            .create_server_tunnel(spec.clone())
            .await
            .expect_err("no default route");
        match &e {
            ClientError::Helper(HelperError::HostState { reason }) => {
                assert!(reason.contains("no IPv4 default route"), "{reason}")
            }
            other => panic!("expected the specific refusal, got {other:?}: {other}"),
        }
        let shown = e.to_string();
        assert!(
            shown.contains("no IPv4 default route") && !shown.contains("incident"),
            "{shown}"
        );
        // The connection is still usable, and nothing was left behind.
        assert!(c.list_instances().await.expect("list").is_empty());
    });
    let links = run_limited(
        lab.host.exec("ip").args(["-o", "link", "show"]),
        Duration::from_secs(10),
    );
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    assert!(!links.contains(&spec.ifname()), "{links}");
    assert_eq!(lab.ruleset().trim(), "");
    assert_eq!(lab.forwarding(), "0");
}

/// Finding 8: forwarding is put back when the last server tunnel ends,
/// also when the first one (which saved it) ends first.
#[test]
fn finding_8_forwarding_restored_when_the_first_of_two_server_tunnels_ends_first() {
    if !require_root(
        "finding_8_forwarding_restored_when_the_first_of_two_server_tunnels_ends_first",
    ) {
        return;
    }
    let lab = Lab::new("f", true, &[]);
    let before = lab.forwarding();
    assert_eq!(before, "0");
    let (a, b) = (format!("fa{}", pid()), format!("fb{}", pid()));
    rt().block_on(async {
        let mut c = HelperClient::connect(&lab.sock).await.expect("connect");
        let (_, _ta) = c.create_server_tunnel(server_spec(&a)).await.expect("a");
        let spec_b =
            ServerTunnelSpec::new(name(&b), 1420, vec!["198.19.62.1/24".parse().expect("p")])
                .expect("spec");
        let (_, _tb) = c.create_server_tunnel(spec_b).await.expect("b");
        assert_eq!(lab.forwarding(), "1");
        c.destroy_instance(&name(&a)).await.expect("destroy a");
        assert_eq!(lab.forwarding(), "1", "b still forwards");
        c.destroy_instance(&name(&b)).await.expect("destroy b");
    });
    assert_eq!(lab.forwarding(), before, "restored after the last one");
}

/// Finding 8: ~2,000 idle connects (never a handshake) from a member
/// cannot exhaust the helper's descriptors (it runs with the usual soft
/// limit of 1024): meanwhile another client connects and gets an answer.
#[test]
fn finding_8_idle_unauthenticated_connects_cannot_exhaust_the_helper() {
    if !require_root("finding_8_idle_unauthenticated_connects_cannot_exhaust_the_helper") {
        return;
    }
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let dir = TestDir::new("trust-preauth");
    let sock = dir.join("helper.sock");
    let log = dir.join("helper.log");
    let child = Command::new("prlimit")
        .arg("--nofile=1024:1024")
        .arg("--")
        .arg(warren_tests::bin("warren-helper"))
        .args(["serve", "--socket"])
        .arg(&sock)
        .args(["--group", "60100", "--config", "/nonexistent/x.toml"])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("helper");
    let mut helper = Proc::new(child, Some(log));
    assert!(
        warren_tests::wait_for(Duration::from_secs(10), || StdUnixStream::connect(&sock)
            .is_ok()),
        "{}",
        helper.log()
    );
    // A member's idle connects, from a thread that switched only its own
    // credentials (the kernel records them at connect).
    let target = sock.clone();
    let idle = std::thread::spawn(move || {
        let (uid, gid) = (warren_tests::ids::MEMBER, warren_tests::ids::GROUP);
        // SAFETY: thread-local credential changes with valid arguments.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        let addr = UnixAddr::new(&target).expect("addr");
        let mut held = Vec::new();
        for _ in 0..2000 {
            let s = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )
            .expect("socket");
            if connect(std::os::fd::AsRawFd::as_raw_fd(&s), &addr).is_ok() {
                held.push(s);
            }
        }
        held
    })
    .join()
    .expect("idle connects");
    assert!(idle.len() > 1100, "only {} idle connects", idle.len());
    rt().block_on(async {
        let answered = tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = HelperClient::connect(&sock).await.expect("connect");
            c.status().await.expect("status")
        })
        .await;
        assert!(
            answered.is_ok(),
            "no answer while idle connects are held; helper log:\n{}",
            helper
                .log()
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    });
    drop(idle);
    assert!(helper.running(), "{}", helper.log());
    helper.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(helper.wait_timeout(Duration::from_secs(10)).is_some());
}

/// A TCP socket whose last close blocks: `SO_LINGER` {on, 30 s} and unsent
/// data, connected to a loopback listener that never reads (kept alive by
/// the returned listener; dropping it resets the connection).
fn lingering_socket() -> (std::net::TcpListener, std::os::fd::OwnedFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    use std::io::Write;
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    setsockopt(&l, sockopt::RcvBuf, &4096).expect("rcvbuf");
    let mut s = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    setsockopt(&s, sockopt::SndBuf, &4096).expect("sndbuf");
    s.set_nonblocking(true).expect("nonblocking");
    let chunk = [0x5au8; 65536];
    let mut sent = 0usize;
    loop {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("fill: {e}"),
        }
    }
    assert!(sent > 0);
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 30,
    };
    setsockopt(&s, sockopt::Linger, &linger).expect("linger");
    (l, s.into())
}

/// Sends `bytes` with `fd` attached (SCM_RIGHTS), then closes our copy so
/// the helper's becomes the last one.
fn send_with_fd(sock: &StdUnixStream, bytes: &[u8], fd: std::os::fd::OwnedFd) {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let raw = [fd.as_raw_fd()];
    let iov = [std::io::IoSlice::new(bytes)];
    let n = sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    assert_eq!(n, bytes.len());
    drop(fd);
}

/// Finding 2: a member passes lingering sockets with the handshake and with
/// a Status frame; meanwhile another client's status requests (on its
/// connection, and on new ones) are answered within a second each: the
/// helper's event loop never closes a peer's descriptor itself. Both
/// offending connections are refused.
#[test]
fn finding_2_lingering_descriptors_never_stall_the_helper() {
    if !require_root("finding_2_lingering_descriptors_never_stall_the_helper") {
        return;
    }
    use std::io::{Read, Write};
    use warren_ipc::handshake::{ClientHello, HANDSHAKE_LEN, ServerHello};
    use warren_ipc::{ClientFrame, Request, ServerFrame};
    let h = warren_tests::Helper::start("trust-linger", &[]);
    let deadline = Duration::from_secs(1);
    rt().block_on(async {
        let mut other = HelperClient::connect(&h.socket).await.expect("connect");
        other.status().await.expect("status");
        let helper_fds = || {
            std::fs::read_dir(format!("/proc/{}/fd", h.proc.pid()))
                .map(Iterator::count)
                .unwrap_or(0)
        };
        let baseline = helper_fds();

        // With the handshake.
        let (l1, fd1) = lingering_socket();
        let a = StdUnixStream::connect(&h.socket).expect("connect");
        a.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        send_with_fd(&a, &ClientHello::CURRENT.encode(), fd1);

        // With a Status frame, after a clean handshake.
        let (l2, fd2) = lingering_socket();
        let mut b = StdUnixStream::connect(&h.socket).expect("connect");
        b.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        b.write_all(&ClientHello::CURRENT.encode())
            .expect("handshake");
        let mut answer = [0u8; HANDSHAKE_LEN];
        b.read_exact(&mut answer)
            .expect("handshake answered (the helper must not stall)");
        let mut frame = Vec::new();
        warren_ipc::frame::encode_frame(
            &ClientFrame {
                id: 7,
                request: Request::Status,
            },
            1,
            &mut frame,
        )
        .expect("encode");
        send_with_fd(&b, &frame, fd2);

        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            let t = Instant::now();
            tokio::time::timeout(deadline, other.status())
                .await
                .expect("status on an open connection answered within 1 s")
                .expect("status");
            let fresh = tokio::time::timeout(deadline, async {
                let mut c = HelperClient::connect(&h.socket).await.expect("connect");
                c.status().await.expect("status");
            })
            .await;
            assert!(
                fresh.is_ok(),
                "status on a new connection answered within 1 s"
            );
            assert!(t.elapsed() < 2 * deadline);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // The handshake with descriptors was refused (version 0)...
        let mut answer = Vec::new();
        let _ = (&a).read_to_end(&mut answer);
        let answer: [u8; HANDSHAKE_LEN] = answer.as_slice().try_into().expect("one answer");
        assert_eq!(ServerHello::decode(&answer).expect("decodes").chosen, 0);
        // ...and so was the Status frame, with a typed error.
        let mut reply = Vec::new();
        let _ = b.read_to_end(&mut reply);
        let (frame, _, _) = warren_ipc::frame::decode_frame::<ServerFrame>(&reply)
            .expect("decodes")
            .expect("a whole reply");
        match frame {
            ServerFrame::Reply {
                id: 7,
                result: Err(HelperError::InvalidArgument { field, .. }),
            } => assert_eq!(field, "descriptors"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // The closer did not linger either: the helper let go of them.
        assert!(
            warren_tests::wait_for(Duration::from_secs(3), || helper_fds() <= baseline),
            "helper still holds {} descriptors, {baseline} before",
            helper_fds()
        );
        drop((l1, l2));
    });
}

/// Connects as another user: a thread switches only its own credentials
/// (the kernel records them at connect), connects, and ends.
async fn connect_as(sock: &std::path::Path, uid: u32, gid: u32, groups: &[u32]) -> HelperClient {
    let sock = sock.to_path_buf();
    let groups = groups.to_vec();
    let stream = std::thread::spawn(move || {
        // SAFETY: thread-local credential changes with valid arguments; the
        // thread exits right after connecting.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        StdUnixStream::connect(&sock).expect("connect as user")
    })
    .join()
    .expect("thread");
    stream.set_nonblocking(true).expect("nonblocking");
    let stream = tokio::net::UnixStream::from_std(stream).expect("tokio stream");
    HelperClient::from_stream(stream).await.expect("handshake")
}

/// Spawns `argv` in instance `n` with a pipe as stdout and stderr and a
/// private resolv.conf; returns what it wrote once it has ended.
async fn run_private(c: &mut HelperClient, n: &InstanceName, argv: &[&str]) -> String {
    use std::io::Read;
    use std::os::fd::AsFd;
    let (r, w) = nix::unistd::pipe().expect("pipe");
    let null = std::fs::File::open("/dev/null").expect("null");
    let spec = SpawnSpec {
        instance: n.clone(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/bin:/bin:/usr/sbin:/sbin".into()],
        cwd: "/".into(),
        n_fds: 3,
        private_resolv: true,
        bind_lease: false,
        controlling_tty: false,
    };
    let pid = c
        .spawn(spec, &[null.as_fd(), w.as_fd(), w.as_fd()])
        .await
        .expect("spawn");
    drop(w);
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::fs::File::from(r).read_to_string(&mut s);
        s
    });
    loop {
        match tokio::time::timeout(Duration::from_secs(30), c.next_event())
            .await
            .expect("exit event")
            .expect("event")
        {
            warren_ipc::Event::Exited { pid: p, .. } if p == pid => break,
            _ => continue,
        }
    }
    reader.join().expect("reader")
}

/// Finding 7: a program run in an instance with the instance's resolv.conf
/// resolves names by files and the instance's DNS only. The lab host's
/// view (a private tmpfs over /run: the machine's own daemons are never
/// touched) has systemd-resolved's, nscd's and avahi's sockets, played by
/// listeners, and an nsswitch.conf naming resolve and mdns; while
/// `getent hosts` runs (and a probe connects to each socket path by hand)
/// in the program, no listener gets a connection, and the program's
/// /etc/nsswitch.conf says `hosts: files dns` (the rest as the host's).
#[test]
fn finding_7_exec_programs_never_reach_host_name_service_sockets() {
    if !require_root("finding_7_exec_programs_never_reach_host_name_service_sockets") {
        return;
    }
    let dir = TestDir::new("trust-nss");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sockets = [
        ("/run/systemd/resolve/io.systemd.Resolve", "resolve.sock"),
        ("/run/nscd/socket", "nscd.sock"),
        ("/run/avahi-daemon/socket", "avahi.sock"),
    ];
    let daemons: Vec<(&str, warren_tests::FakeDaemon)> = sockets
        .iter()
        .map(|(real, file)| (*real, warren_tests::FakeDaemon::new(dir.join(file), &stop)))
        .collect();
    let nsswitch = dir.join("nsswitch.conf");
    std::fs::write(
        &nsswitch,
        "# warren-lab-nsswitch\npasswd: files\ngroup: files\nhosts: files resolve [!UNAVAIL=return] mdns4_minimal [NOTFOUND=return] dns\n",
    )
    .expect("lab nsswitch.conf");
    let mut setup = format!(
        "mount --bind {} /etc/nsswitch.conf\nmount -t tmpfs -o mode=0755 warren-lab-run /run\n",
        nsswitch.display()
    );
    for (real, d) in &daemons {
        let parent = std::path::Path::new(real).parent().expect("dir");
        setup.push_str(&format!(
            "mkdir -p {parent}\ntouch {real}\nmount --bind {sock} {real}\n",
            parent = parent.display(),
            sock = d.path.display()
        ));
    }
    let lab = Lab::with_setup("n", false, &[], &setup);
    // The example is copied where the member may run it.
    let probe = dir.join("unix_probe");
    std::fs::copy(warren_tests::bin("examples/unix_probe"), &probe).expect("copy probe");
    let n = name(&format!("nss{}", pid()));
    let script = format!(
        "echo ==nsswitch; cat /etc/nsswitch.conf; echo ==resolv; cat /etc/resolv.conf; \
         echo ==stub; cat /run/systemd/resolve/stub-resolv.conf; \
         echo ==getent; timeout 20 getent hosts warren-leak-probe.example; echo ==probe; \
         {probe} /run/systemd/resolve/io.systemd.Resolve /run/nscd/socket /var/run/nscd/socket \
         /run/avahi-daemon/socket /var/run/avahi-daemon/socket",
        probe = probe.display()
    );
    let out = rt().block_on(async {
        let (uid, gid) = (warren_tests::ids::MEMBER, warren_tests::ids::GROUP);
        let mut c = connect_as(&lab.sock, uid, gid, &[]).await;
        // No DNS servers: the instance's resolver fails at once (no leak
        // either way), so only the host's sockets could answer.
        let spec = InstanceSpec::new(
            n.clone(),
            1420,
            vec!["198.19.78.2/32".parse().expect("p")],
            vec!["0.0.0.0/0".parse().expect("p")],
            vec![],
        )
        .expect("spec");
        let (_info, _tun) = c.create_instance(spec).await.expect("create");
        let out = run_private(&mut c, &n, &["sh", "-c", &script]).await;
        c.destroy_instance(&n).await.expect("destroy");
        out
    });
    // Connections already made are counted by now (the listeners poll).
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let reached: Vec<String> = daemons
        .iter()
        .filter(|(_, d)| d.accepted() > 0)
        .map(|(real, d)| format!("{real} ({} connections)", d.accepted()))
        .collect();
    drop(lab);
    assert!(
        reached.is_empty(),
        "host name-service sockets reached: {reached:?}; program output:\n{out}"
    );
    let nss = out
        .split("==nsswitch\n")
        .nth(1)
        .and_then(|s| s.split("==resolv").next())
        .unwrap_or_default();
    let hosts: Vec<&str> = nss
        .lines()
        .filter(|l| l.trim_start().starts_with("hosts:"))
        .collect();
    assert_eq!(
        hosts
            .iter()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        vec![vec!["hosts:", "files", "dns"]],
        "program output:\n{out}"
    );
    assert!(
        nss.contains("# warren-lab-nsswitch") && nss.contains("passwd: files"),
        "the rest is the host's: {out}"
    );
    assert!(
        !out.contains(" connected"),
        "a host socket was reachable: {out}"
    );
    assert!(out.contains("==probe"), "the probe ran: {out}");
    // What a systemd-resolved host's /etc/resolv.conf links to is the
    // instance's too.
    let stub = out
        .split("==stub\n")
        .nth(1)
        .and_then(|s| s.split("==getent").next())
        .unwrap_or_default();
    assert!(
        stub.contains("written by warren-helper for this instance"),
        "{out}"
    );
}

fn server_with(n: &str, addresses: &[&str]) -> ServerTunnelSpec {
    ServerTunnelSpec::new(
        name(n),
        1420,
        addresses
            .iter()
            .map(|a| a.parse().expect("prefix"))
            .collect(),
    )
    .expect("spec")
}

impl Lab {
    /// The lab host's `ip -o addr` and `ip -o link` listings.
    fn links_and_addresses(&self) -> String {
        let mut s = String::new();
        for what in ["link", "addr"] {
            let out = run_limited(
                self.host.exec("ip").args(["-o", what, "show"]),
                Duration::from_secs(10),
            );
            s.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        s
    }
}

/// Finding 4: a server tunnel's subnet must lie in the root-owned config's
/// pools (here 198.18.0.0/15 and fd00::/8): `1.1.1.2/24` (all the host's
/// traffic to 1.1.1.1 into the member's TUN), a prefix wider than the pool
/// and an IPv6 subnet outside fd00::/8 are refused with the pool named,
/// and leave nothing behind; a subnet inside the pools works.
#[test]
fn finding_4_server_tunnel_outside_the_pools_is_refused_naming_the_pool() {
    if !require_root("finding_4_server_tunnel_outside_the_pools_is_refused_naming_the_pool") {
        return;
    }
    let lab = Lab::new("q", true, &[]);
    let s = format!("q{}", pid());
    rt().block_on(async {
        let (uid, gid) = (warren_tests::ids::MEMBER, warren_tests::ids::GROUP);
        let mut c = connect_as(&lab.sock, uid, gid, &[]).await;
        for (addr, pool) in [
            ("1.1.1.2/24", "198.18.0.0/15"),
            ("198.18.0.1/14", "198.18.0.0/15"),
            ("2001:db8::1/64", "fd00::/8"),
        ] {
            match c.create_server_tunnel(server_with(&s, &[addr])).await {
                Err(ClientError::Helper(HelperError::InvalidArgument { field, reason })) => {
                    assert_eq!(field, "addresses");
                    assert!(
                        reason.contains(addr) && reason.contains(pool),
                        "{addr}: {reason}"
                    );
                    assert!(!reason.contains("incident"), "{reason}");
                }
                other => panic!("{addr} outside the pools must be refused, got {other:?}"),
            }
        }
        let s6 = server_with(&s, &["198.19.61.1/24", "fd00:61::1/64"]);
        assert!(
            !lab.links_and_addresses().contains(&s6.ifname()),
            "nothing left behind: {}",
            lab.links_and_addresses()
        );
        let (_, _tun) = c
            .create_server_tunnel(s6.clone())
            .await
            .expect("a subnet inside the pools");
        let shown = lab.links_and_addresses();
        assert!(
            shown.contains("198.19.61.1/24") && shown.contains("fd00:61::1/64"),
            "{shown}"
        );
        c.destroy_instance(&name(&s)).await.expect("destroy");
    });
    assert_eq!(lab.ruleset().trim(), "");
}

/// Finding 4: a server tunnel's subnet inside the pools must not overlap a
/// route the lab host already has, in any table: its veth's subnet, a
/// policy-routing table's route, another member's server tunnel. Each is
/// refused as `HostState` naming the route; routes of a host tunnel
/// (0.0.0.0/1 and 128.0.0.0/1: host-wide by design) do not count, and a
/// free subnet works.
#[test]
fn finding_4_server_tunnel_overlapping_a_host_route_is_refused() {
    if !require_root("finding_4_server_tunnel_overlapping_a_host_route_is_refused") {
        return;
    }
    let lab = Lab::new("r", true, &[]);
    lab.host.ip(&[
        "route",
        "add",
        "unreachable",
        "198.19.99.0/24",
        "table",
        "100",
    ]);
    let (a, b, h) = (
        format!("ra{}", pid()),
        format!("rb{}", pid()),
        format!("rh{}", pid()),
    );
    rt().block_on(async {
        let g = warren_tests::ids::GROUP;
        let mut m1 = connect_as(&lab.sock, warren_tests::ids::MEMBER, g, &[]).await;
        let mut m2 = connect_as(&lab.sock, warren_tests::ids::SUPPLEMENTARY, g, &[g]).await;
        let (_, _ta) = m1
            .create_server_tunnel(server_with(&a, &["198.19.64.1/24"]))
            .await
            .expect("first member's server tunnel");
        for (addr, route) in [
            ("198.18.54.7/24", "198.18.54.0/24"),
            ("198.18.54.130/25", "198.18.54.0/24"),
            ("198.19.99.1/25", "198.19.99.0/24"),
            ("198.19.64.129/25", "198.19.64.0/24"),
        ] {
            match m2.create_server_tunnel(server_with(&b, &[addr])).await {
                Err(ClientError::Helper(HelperError::HostState { reason })) => {
                    assert!(reason.contains(route), "{addr}: {reason}")
                }
                other => panic!("{addr} overlaps {route}: must be refused, got {other:?}"),
            }
        }
        let shown = lab.links_and_addresses();
        assert!(
            !shown.contains(&server_with(&b, &["198.19.65.1/24"]).ifname()),
            "nothing left behind: {shown}"
        );
        // Root's host tunnel routing everything through 0.0.0.0/1 and
        // 128.0.0.0/1 keeps no server tunnel out.
        let mut root = HelperClient::connect(&lab.sock).await.expect("connect");
        let host = HostTunnelSpec::new(
            name(&h),
            1420,
            vec!["198.19.72.2/32".parse().expect("p")],
            vec![
                "0.0.0.0/1".parse().expect("p"),
                "128.0.0.0/1".parse().expect("p"),
            ],
            vec![],
            false,
        )
        .expect("host spec");
        let (_, _tun, _udp) = root.create_host_tunnel(host).await.expect("host tunnel");
        let (_, _tb) = m2
            .create_server_tunnel(server_with(&b, &["198.19.65.1/24"]))
            .await
            .expect("a free subnet");
        root.destroy_instance(&name(&h))
            .await
            .expect("destroy host");
        m2.destroy_instance(&name(&b)).await.expect("destroy b");
        m1.destroy_instance(&name(&a)).await.expect("destroy a");
    });
    assert_eq!(lab.ruleset().trim(), "");
}

/// Spawns `argv` in `n` with no descriptors (the helper gives it
/// /dev/null); returns the helper's answer.
async fn spawn_quiet(
    c: &mut HelperClient,
    n: &InstanceName,
    argv: &[&str],
) -> Result<i32, ClientError> {
    let spec = SpawnSpec {
        instance: n.clone(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/bin:/bin".into()],
        cwd: "/".into(),
        n_fds: 0,
        private_resolv: false,
        bind_lease: false,
        controlling_tty: false,
    };
    c.spawn(spec, &[]).await
}

fn small_instance(n: &InstanceName, third: u8) -> InstanceSpec {
    InstanceSpec::new(
        n.clone(),
        1420,
        vec![format!("198.19.79.{third}/32").parse().expect("p")],
        vec!["0.0.0.0/0".parse().expect("p")],
        vec![],
    )
    .expect("spec")
}

/// Finding 8: programs spawned through the helper share its unit's task
/// limit, so one member may run at most 64 at once: the 65th is refused
/// with `TooManyPrograms`, another member and root still spawn, and once
/// one of the member's programs ends the member may spawn again.
#[test]
fn finding_8_spawned_programs_are_limited_per_uid() {
    if !require_root("finding_8_spawned_programs_are_limited_per_uid") {
        return;
    }
    let lab = Lab::new("k", false, &[]);
    let (a, b) = (name(&format!("ka{}", pid())), name(&format!("kb{}", pid())));
    rt().block_on(async {
        let g = warren_tests::ids::GROUP;
        let mut m1 = connect_as(&lab.sock, warren_tests::ids::MEMBER, g, &[]).await;
        let mut m2 = connect_as(&lab.sock, warren_tests::ids::SUPPLEMENTARY, g, &[g]).await;
        let (_, _ta) = m1.create_instance(small_instance(&a, 2)).await.expect("a");
        let (_, _tb) = m2.create_instance(small_instance(&b, 3)).await.expect("b");
        let short = spawn_quiet(&mut m1, &a, &["sleep", "2"])
            .await
            .expect("first");
        for i in 1..64 {
            spawn_quiet(&mut m1, &a, &["sleep", "60"])
                .await
                .unwrap_or_else(|e| panic!("program {}: {e:?}", i + 1));
        }
        match spawn_quiet(&mut m1, &a, &["sleep", "60"]).await {
            Err(ClientError::Helper(HelperError::TooManyPrograms { limit })) => {
                assert_eq!(limit, 64)
            }
            other => panic!("the 65th program must be refused, got {other:?}"),
        }
        spawn_quiet(&mut m2, &b, &["sleep", "60"])
            .await
            .expect("another member is not limited by the first's programs");
        let mut root = HelperClient::connect(&lab.sock).await.expect("connect");
        spawn_quiet(&mut root, &a, &["sleep", "60"])
            .await
            .expect("root is not limited");
        // The first one ends: room for one more.
        loop {
            match tokio::time::timeout(Duration::from_secs(20), m1.next_event())
                .await
                .expect("exit event")
                .expect("event")
            {
                warren_ipc::Event::Exited { pid, .. } if pid == short => break,
                _ => continue,
            }
        }
        spawn_quiet(&mut m1, &a, &["sleep", "60"])
            .await
            .expect("a program ended: room again");
        m1.destroy_instance(&a).await.expect("destroy a");
        m2.destroy_instance(&b).await.expect("destroy b");
    });
}

/// A throwaway cgroup holding the pids controller (the v1 `pids`
/// hierarchy on a hybrid host, else the unified one), limited to `max`
/// tasks: it plays the helper unit's `TasksMax=`. Dropped, it ends the
/// processes left in it (all started by the test) and removes it.
struct TestCgroup {
    dir: std::path::PathBuf,
}

impl TestCgroup {
    fn new(tag: &str, max: u32) -> TestCgroup {
        let v1 = std::path::Path::new("/sys/fs/cgroup/pids");
        let root = if v1.join("cgroup.procs").exists() {
            v1.to_path_buf()
        } else {
            let root = std::path::PathBuf::from("/sys/fs/cgroup");
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+pids");
            root
        };
        let dir = root.join(format!("warren-test-{tag}{}", pid()));
        std::fs::create_dir(&dir).expect("test cgroup");
        std::fs::write(dir.join("pids.max"), max.to_string()).expect("pids.max");
        TestCgroup { dir }
    }

    fn procs(dir: &std::path::Path) -> Vec<i32> {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Its sub-cgroups.
    fn children(&self) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let mut dirs = self.children();
            dirs.push(self.dir.clone());
            let left: Vec<i32> = dirs.iter().flat_map(|d| TestCgroup::procs(d)).collect();
            if left.is_empty() {
                break;
            }
            for p in left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for d in self.children() {
            let _ = std::fs::remove_dir(d);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Finding 8: what a member's programs fork counts against their own
/// share, not the helper's. The helper runs in a cgroup limited to 48 tasks
/// (playing its unit's `TasksMax=`) with `--user-cgroups` and
/// `user_tasks_max = 16`: one member's program forking 40 sleepers fills
/// only its own 16, and another member's program still starts, in its own
/// cgroup, while the helper keeps answering.
#[test]
fn finding_8_a_members_forks_fill_only_their_own_task_share() {
    if !require_root("finding_8_a_members_forks_fill_only_their_own_task_share") {
        return;
    }
    let cg = TestCgroup::new("f8", 48);
    let dir = TestDir::new("trust-cgroup");
    let sock = dir.join("helper.sock");
    let config = warren_tests::write_helper_config(&dir, "user_tasks_max = 16\n");
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cg.dir.join("cgroup.procs"))
        .expect("cgroup.procs");
    let mut cmd = Command::new(warren_tests::bin("warren-helper"));
    cmd.args(["serve", "--user-cgroups", "--group", "60100", "--socket"])
        .arg(&sock)
        .arg("--config")
        .arg(&config)
        .stderr(std::fs::File::create(dir.join("helper.log")).expect("log"));
    let procs_fd = std::os::fd::AsRawFd::as_raw_fd(&procs);
    // SAFETY: one write(2) of a static buffer between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::write(procs_fd, c"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let helper = Proc::new(cmd.spawn().expect("helper"), Some(dir.join("helper.log")));
    assert!(
        warren_tests::wait_for(Duration::from_secs(10), || {
            StdUnixStream::connect(&sock).is_ok()
        }),
        "{}",
        helper.log()
    );
    let user_dir = |uid: u32| {
        cg.children()
            .into_iter()
            .find(|d| d.ends_with(format!("user-{uid}")))
    };
    let current = |d: &std::path::Path| -> u32 {
        std::fs::read_to_string(d.join("pids.current"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let (a, b) = (name(&format!("ca{}", pid())), name(&format!("cb{}", pid())));
    rt().block_on(async {
        let g = warren_tests::ids::GROUP;
        let mut m1 = connect_as(&sock, warren_tests::ids::MEMBER, g, &[]).await;
        let mut m2 = connect_as(&sock, warren_tests::ids::SUPPLEMENTARY, g, &[g]).await;
        let (_, _ta) = m1.create_instance(small_instance(&a, 4)).await.expect("a");
        let (_, _tb) = m2.create_instance(small_instance(&b, 5)).await.expect("b");
        spawn_quiet(
            &mut m1,
            &a,
            &["sh", "-c", "for i in $(seq 40); do sleep 30 & done; wait"],
        )
        .await
        .expect("the forking program starts");
        let mine = user_dir(warren_tests::ids::MEMBER).expect("the member's own cgroup");
        assert_eq!(
            std::fs::read_to_string(mine.join("pids.max"))
                .expect("pids.max")
                .trim(),
            "16"
        );
        // The kernel counts the forks it refused at the limit.
        let refused = || {
            std::fs::read_to_string(mine.join("pids.events"))
                .unwrap_or_default()
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        assert!(
            warren_tests::wait_for(Duration::from_secs(10), || refused() > 0),
            "the member's forks reach their share's limit ({} tasks)",
            current(&mine)
        );
        assert!(
            (10..=16).contains(&current(&mine)),
            "their share holds them: {}",
            current(&mine)
        );
        let other = spawn_quiet(&mut m2, &b, &["sleep", "5"])
            .await
            .expect("another member's program still starts");
        let where_ = std::fs::read_to_string(format!("/proc/{other}/cgroup")).expect("cgroup");
        assert!(
            where_.contains(&format!("user-{}", warren_tests::ids::SUPPLEMENTARY)),
            "in its own user's cgroup: {where_}"
        );
        let mut root = HelperClient::connect(&sock).await.expect("connect");
        root.status().await.expect("the helper still answers");
        m1.destroy_instance(&a).await.expect("destroy a");
        m2.destroy_instance(&b).await.expect("destroy b");
    });
    drop(helper);
}
