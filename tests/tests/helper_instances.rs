//! Namespace instances through a real helper, as root (CI runs it as root;
//! it fails, never skips, there otherwise): kernel state as intended, the
//! TUN descriptor carries packets both ways, programs run as the caller and
//! cannot regain privileges, ownership, leases, and crash clean-up.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use warren::helper_client::{ClientError, HelperClient};
use warren_ipc::instance::{ExitStatus, InstanceName, InstanceSpec, SpawnSpec};
use warren_ipc::{Event, HelperError};
use warren_tests::{Helper, Proc, bin, ids, require_root, run_limited, wait_for};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A unique instance name for this test process.
fn name(tag: &str) -> InstanceName {
    InstanceName::new(&format!("{tag}{}", std::process::id() % 1_000_000)).expect("name")
}

fn spec(n: &InstanceName, v4: bool, v6: bool) -> InstanceSpec {
    let mut addrs = Vec::new();
    let mut routes = Vec::new();
    let mut dns = Vec::new();
    if v4 {
        addrs.push("198.19.77.2/32".parse().expect("p"));
        routes.push("0.0.0.0/0".parse().expect("p"));
        dns.push("198.19.77.53".parse().expect("ip"));
    }
    if v6 {
        addrs.push("fd00:77::2/128".parse().expect("p"));
        routes.push("::/0".parse().expect("p"));
        dns.push("fd00:77::53".parse().expect("ip"));
    }
    InstanceSpec::new(n.clone(), 1420, addrs, routes, dns).expect("spec")
}

fn ip_json(args: &[&str]) -> serde_json::Value {
    let out = run_limited(Command::new("ip").args(args), Duration::from_secs(10));
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).expect("ip -j output")
}

fn netns_exists(n: &InstanceName) -> bool {
    std::path::Path::new("/run/netns").join(n.netns()).exists()
}

async fn connect(h: &Helper) -> HelperClient {
    HelperClient::connect(&h.socket).await.expect("connect")
}

/// Connects as another user: a thread switches only its own credentials
/// (raw system calls affect the calling thread alone), connects, and ends;
/// the kernel records those credentials for the connection.
async fn connect_as(h: &Helper, uid: u32, gid: u32, groups: &[u32]) -> HelperClient {
    connect_path_as(&h.socket, uid, gid, groups).await
}

/// [`connect_as`] to the helper at `sock`.
async fn connect_path_as(
    sock: &std::path::Path,
    uid: u32,
    gid: u32,
    groups: &[u32],
) -> HelperClient {
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

#[test]
fn dual_stack_instance_is_configured_exactly() {
    if !require_root("dual_stack_instance_is_configured_exactly") {
        return;
    }
    let h = Helper::start("inst-ds", &[]);
    let n = name("ds");
    rt().block_on(async {
        let mut c = connect(&h).await;
        let (info, _tun) = c
            .create_instance(spec(&n, true, true))
            .await
            .expect("create");
        assert_eq!(info.netns, n.netns());
        let ns = n.netns();
        let addrs = ip_json(&["-j", "-n", &ns, "addr", "show", "dev", "wr0"]);
        let locals: Vec<String> = addrs[0]["addr_info"]
            .as_array()
            .expect("addr_info")
            .iter()
            .filter(|a| a["scope"] == "global")
            .map(|a| format!("{}/{}", a["local"].as_str().expect("local"), a["prefixlen"]))
            .collect();
        assert_eq!(locals, vec!["198.19.77.2/32", "fd00:77::2/128"]);
        assert_eq!(addrs[0]["mtu"], 1420);
        assert!(addrs[0]["flags"].to_string().contains("UP"));
        let r4 = ip_json(&["-j", "-n", &ns, "route", "show"]);
        assert!(
            r4.as_array()
                .expect("routes")
                .iter()
                .any(|r| r["dst"] == "default" && r["dev"] == "wr0"),
            "{r4}"
        );
        let r6 = ip_json(&["-j", "-6", "-n", &ns, "route", "show", "default"]);
        assert!(
            r6.as_array()
                .expect("routes")
                .iter()
                .any(|r| r["dev"] == "wr0"),
            "{r6}"
        );
        let lo = ip_json(&["-j", "-n", &ns, "link", "show", "lo"]);
        assert!(lo[0]["flags"].to_string().contains("UP"), "loopback up");
        let resolv =
            std::fs::read_to_string(format!("/etc/netns/{ns}/resolv.conf")).expect("resolv.conf");
        let servers: Vec<&str> = resolv
            .lines()
            .filter(|l| l.starts_with("nameserver"))
            .collect();
        assert_eq!(
            servers,
            vec!["nameserver 198.19.77.53", "nameserver fd00:77::53"]
        );
        // `ip netns` sees it.
        let list = run_limited(
            Command::new("ip").args(["netns", "list"]),
            Duration::from_secs(10),
        );
        assert!(String::from_utf8_lossy(&list.stdout).contains(&ns));
        let listed = c.list_instances().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].lease, "connection");
        c.destroy_instance(&n).await.expect("destroy");
    });
    assert!(!netns_exists(&n));
    assert!(!std::path::Path::new(&format!("/etc/netns/{}", n.netns())).exists());
}

#[test]
fn ipv4_only_instance_has_ipv6_disabled_and_ipv6_only_works() {
    if !require_root("ipv4_only_instance_has_ipv6_disabled_and_ipv6_only_works") {
        return;
    }
    let h = Helper::start("inst-46", &[]);
    let n4 = name("v4o");
    let n6 = name("v6o");
    rt().block_on(async {
        let mut c = connect(&h).await;
        // The TUN devices live while their descriptors are open.
        let _t4 = c
            .create_instance(spec(&n4, true, false))
            .await
            .expect("v4 only");
        let _t6 = c
            .create_instance(spec(&n6, false, true))
            .await
            .expect("v6 only");
        let out = run_limited(
            Command::new("ip").args([
                "netns",
                "exec",
                &n4.netns(),
                "cat",
                "/proc/sys/net/ipv6/conf/all/disable_ipv6",
            ]),
            Duration::from_secs(10),
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "1",
            "no IPv6 leaks around an IPv4-only tunnel"
        );
        let a6 = ip_json(&["-j", "-n", &n6.netns(), "-6", "addr", "show", "dev", "wr0"]);
        assert!(a6.to_string().contains("fd00:77::2"), "{a6}");
        let a4 = ip_json(&["-j", "-n", &n6.netns(), "-4", "addr", "show", "dev", "wr0"]);
        assert!(!a4.to_string().contains("198.19"), "{a4}");
    });
    // The connection closed: both leases ended.
    assert!(wait_for(Duration::from_secs(10), || !netns_exists(&n4)
        && !netns_exists(&n6)));
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn icmp_echo(src: [u8; 4], dst: [u8; 4], ty: u8, id: u16) -> Vec<u8> {
    let mut icmp = vec![ty, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend_from_slice(b"warren-tun-test!");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ip
}

/// Reads packets from the TUN until `want` matches one (10 s at most).
fn read_until(tun: &OwnedFd, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut buf = [0u8; 2048];
    for _ in 0..200 {
        let mut fds = [nix::poll::PollFd::new(
            tun.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u16));
        match nix::unistd::read(tun, &mut buf) {
            Ok(n) if want(&buf[..n]) => return buf[..n].to_vec(),
            _ => continue,
        }
    }
    panic!("no matching packet from the TUN device");
}

#[test]
fn tun_descriptor_carries_packets_both_ways() {
    if !require_root("tun_descriptor_carries_packets_both_ways") {
        return;
    }
    let h = Helper::start("inst-tun", &[]);
    let n = name("tun");
    rt().block_on(async {
        let mut c = connect(&h).await;
        let (_info, tun) = c
            .create_instance(spec(&n, true, false))
            .await
            .expect("create");
        // From inside the namespace out through the TUN: a UDP datagram to
        // an address routed into the tunnel arrives on the descriptor.
        let out = run_limited(
            Command::new("ip").args([
                "netns",
                "exec",
                &n.netns(),
                "bash",
                "-c",
                "echo warren >/dev/udp/198.19.77.9/9",
            ]),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "{out:?}");
        let pkt = read_until(&tun, |p| {
            p.len() >= 28 && p[9] == 17 && p[16..20] == [198, 19, 77, 9]
        });
        assert_eq!(
            &pkt[12..16],
            &[198, 19, 77, 2],
            "source is the instance's address"
        );
        assert_eq!(&pkt[28..34], b"warren");
        // From the descriptor in: an echo request to the instance's address
        // is answered by its kernel, back out through the TUN.
        let req = icmp_echo([198, 19, 77, 9], [198, 19, 77, 2], 8, 0x5757);
        nix::unistd::write(&tun, &req).expect("write packet");
        let reply = read_until(&tun, |p| {
            p.len() >= 28 && p[9] == 1 && p[20] == 0 && p[24..26] == [0x57, 0x57]
        });
        assert_eq!(&reply[12..16], &[198, 19, 77, 2]);
        assert_eq!(&reply[16..20], &[198, 19, 77, 9]);
    });
}

/// Spawns `argv` in `n` through `c` with a pipe as stdout/stderr; returns
/// the output and the exit status.
async fn run_in(
    c: &mut HelperClient,
    n: &InstanceName,
    argv: &[&str],
    private_resolv: bool,
) -> (String, ExitStatus) {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    let null = std::fs::File::open("/dev/null").expect("null");
    let spec = SpawnSpec {
        instance: n.clone(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into()],
        cwd: "/".into(),
        n_fds: 0,
        private_resolv,
        bind_lease: false,
        controlling_tty: false,
    };
    let pid = c
        .spawn(spec, &[null.as_fd(), w.as_fd(), w.as_fd()])
        .await
        .expect("spawn");
    drop(w);
    let mut out = String::new();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(r);
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        s
    });
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(20), c.next_event())
            .await
            .expect("exit event")
            .expect("event")
        {
            Event::Exited { pid: p, status } if p == pid => break status,
            _ => continue,
        }
    };
    out.push_str(&reader.join().expect("reader"));
    (out, status)
}

#[test]
fn spawned_program_runs_as_the_caller_and_cannot_regain_privileges() {
    if !require_root("spawned_program_runs_as_the_caller_and_cannot_regain_privileges") {
        return;
    }
    let h = Helper::start("inst-spawn", &[]);
    let n = name("sp");
    // A setuid-root copy of `id`: under no_new_privs the bit must not work.
    let suid = h.dir.join("suid-id");
    std::fs::copy("/usr/bin/id", &suid).expect("copy id");
    std::os::unix::fs::chown(&suid, Some(0), Some(0)).expect("chown");
    std::fs::set_permissions(&suid, std::os::unix::fs::PermissionsExt::from_mode(0o4755))
        .expect("chmod");
    rt().block_on(async {
        let mut c = connect_as(
            &h,
            ids::SUPPLEMENTARY,
            ids::SUPPLEMENTARY,
            &[ids::GROUP, ids::OTHER_GROUP],
        )
        .await;
        let (_i, _tun) = c
            .create_instance(
                spec(&n, true, false)
                    .with_search(vec!["corp.example".into(), "lab".into()])
                    .expect("search domains"),
            )
            .await
            .expect("create as a member");
        let (out, st) = run_in(&mut c, &n, &["id"], false).await;
        assert_eq!(st, ExitStatus::Code(0));
        assert_eq!(
            out.trim(),
            format!(
                "uid={u} gid={u} groups={u},{g},{o}",
                u = ids::SUPPLEMENTARY,
                g = ids::GROUP,
                o = ids::OTHER_GROUP
            ),
        );
        let (out, _) = run_in(&mut c, &n, &[suid.to_str().expect("utf-8")], false).await;
        assert!(!out.contains("euid=0"), "setuid bit ignored: {out}");
        let (out, _) = run_in(&mut c, &n, &["cat", "/proc/self/status"], false).await;
        for field in [
            "CapEff:\t0000000000000000",
            "CapPrm:\t0000000000000000",
            "CapAmb:\t0000000000000000",
            "NoNewPrivs:\t1",
        ] {
            assert!(out.contains(field), "{field} in {out}");
        }
        // Inside the instance's network namespace, with its resolv.conf
        // when asked for.
        let (out, _) = run_in(
            &mut c,
            &n,
            &["ip", "-o", "addr", "show", "dev", "wr0"],
            false,
        )
        .await;
        assert!(out.contains("198.19.77.2"), "{out}");
        let (out, _) = run_in(&mut c, &n, &["cat", "/etc/resolv.conf"], true).await;
        assert!(out.contains("nameserver 198.19.77.53"), "{out}");
        assert!(out.contains("\nsearch corp.example lab\n"), "{out}");
        // Exit codes come back.
        let (_, st) = run_in(&mut c, &n, &["sh", "-c", "exit 7"], false).await;
        assert_eq!(st, ExitStatus::Code(7));
    });
}

#[test]
fn other_users_cannot_touch_an_instance() {
    if !require_root("other_users_cannot_touch_an_instance") {
        return;
    }
    let h = Helper::start("inst-own", &[]);
    let n = name("own");
    rt().block_on(async {
        let mut owner = connect_as(&h, ids::MEMBER, ids::GROUP, &[]).await;
        owner
            .create_instance(spec(&n, true, false))
            .await
            .expect("create");
        let mut other = connect_as(&h, ids::SUPPLEMENTARY, ids::SUPPLEMENTARY, &[ids::GROUP]).await;
        assert!(
            other.list_instances().await.expect("list").is_empty(),
            "others' instances are not listed"
        );
        let err = other.destroy_instance(&n).await.expect_err("not theirs");
        assert!(
            matches!(err, ClientError::Helper(HelperError::NotFound { .. })),
            "{err:?}"
        );
        let null = std::fs::File::open("/dev/null").expect("null");
        let err = other
            .spawn(
                SpawnSpec {
                    instance: n.clone(),
                    argv: vec!["true".into()],
                    env: vec![],
                    cwd: "/".into(),
                    n_fds: 0,
                    private_resolv: false,
                    bind_lease: false,
                    controlling_tty: false,
                },
                &[null.as_fd()],
            )
            .await
            .expect_err("not theirs");
        assert!(
            matches!(err, ClientError::Helper(HelperError::NotFound { .. })),
            "{err:?}"
        );
        // Names outside warren's own are impossible to express at all.
        assert!(InstanceName::new("../../etc").is_err());
        // Root sees and may remove everything.
        let mut root = connect(&h).await;
        assert_eq!(root.list_instances().await.expect("list").len(), 1);
        root.destroy_instance(&n).await.expect("root removes");
    });
    assert!(!netns_exists(&n));
}

#[test]
fn kill_9_of_the_client_removes_its_instance() {
    if !require_root("kill_9_of_the_client_removes_its_instance") {
        return;
    }
    let h = Helper::start("inst-k9c", &[]);
    let n = name("k9c");
    let mut child = Command::new(bin("examples/hold_instance"))
        .arg(&h.socket)
        .arg(n.as_str())
        .stdout(Stdio::piped())
        .spawn()
        .expect("holder");
    let mut line = [0u8; 6];
    child
        .stdout
        .as_mut()
        .expect("stdout")
        .read_exact(&mut line)
        .expect("ready");
    assert_eq!(&line, b"ready\n");
    let holder = Proc::new(child, None);
    assert!(netns_exists(&n));
    holder.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(
        wait_for(Duration::from_secs(10), || !netns_exists(&n)),
        "instance removed when its client died"
    );
    assert!(!std::path::Path::new(&format!("/etc/netns/{}", n.netns())).exists());
    drop(holder);
}

#[test]
fn kill_9_of_the_helper_then_restart_removes_orphans() {
    if !require_root("kill_9_of_the_helper_then_restart_removes_orphans") {
        return;
    }
    let mut h = Helper::start("inst-k9h", &[]);
    let n = name("k9h");
    rt().block_on(async {
        let mut c = connect(&h).await;
        c.create_instance(spec(&n, true, true))
            .await
            .expect("create");
        h.proc.signal(nix::sys::signal::Signal::SIGKILL);
        assert!(h.proc.wait_timeout(Duration::from_secs(10)).is_some());
    });
    assert!(
        netns_exists(&n),
        "a killed helper leaves its namespace behind..."
    );
    // ...until a helper starts again on the same directory (journal).
    let log = h.dir.join("helper2.log");
    let child = Command::new(bin("warren-helper"))
        .args([
            "serve",
            "--socket",
            h.socket.to_str().expect("utf-8"),
            "--group",
            "60100",
            "--config",
            "/nonexistent/x.toml",
        ])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("restart");
    let _second = Proc::new(child, Some(log));
    assert!(
        wait_for(Duration::from_secs(10), || !netns_exists(&n)),
        "orphan removed at start"
    );
    assert!(!std::path::Path::new(&format!("/etc/netns/{}", n.netns())).exists());
}

#[test]
fn cleanup_command_removes_orphans_and_refuses_while_serving() {
    if !require_root("cleanup_command_removes_orphans_and_refuses_while_serving") {
        return;
    }
    let mut h = Helper::start("inst-clean", &[]);
    let n = name("cln");
    let sock = h.socket.to_str().expect("utf-8").to_string();
    let out = run_limited(
        Command::new(bin("warren-helper")).args(["cleanup", "--socket", &sock]),
        Duration::from_secs(20),
    );
    assert!(!out.status.success(), "refuses while a helper serves");
    rt().block_on(async {
        let mut c = connect(&h).await;
        c.create_instance(spec(&n, true, false))
            .await
            .expect("create");
        h.proc.signal(nix::sys::signal::Signal::SIGKILL);
        assert!(h.proc.wait_timeout(Duration::from_secs(10)).is_some());
    });
    let _ = std::fs::remove_file(&h.socket);
    let out = run_limited(
        Command::new(bin("warren-helper")).args(["cleanup", "--socket", &sock]),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(!netns_exists(&n));
}

#[test]
fn worker_lease_ends_the_instance_with_the_worker() {
    if !require_root("worker_lease_ends_the_instance_with_the_worker") {
        return;
    }
    let h = Helper::start("inst-lease", &[]);
    let n = name("wl");
    rt().block_on(async {
        let mut c = connect(&h).await;
        c.create_instance(spec(&n, true, false))
            .await
            .expect("create");
        let null = std::fs::File::open("/dev/null").expect("null");
        let pid = c
            .spawn(
                SpawnSpec {
                    instance: n.clone(),
                    argv: vec!["sleep".into(), "30".into()],
                    env: vec!["PATH=/usr/bin:/bin".into()],
                    cwd: "/".into(),
                    n_fds: 0,
                    private_resolv: false,
                    bind_lease: true,
                    controlling_tty: false,
                },
                &[null.as_fd(), null.as_fd(), null.as_fd()],
            )
            .await
            .expect("spawn worker");
        let listed = c.list_instances().await.expect("list");
        assert_eq!(listed[0].lease, format!("worker {pid}"));
        // The worker's lease outlives our connection...
        drop(c);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            netns_exists(&n),
            "worker-leased instance survives its creator's connection"
        );
        // ...and ends with the worker.
        // SAFETY: plain kill of the worker the helper spawned for this test.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(
            wait_for(Duration::from_secs(10), || !netns_exists(&n)),
            "removed with its worker"
        );
    });
}

/// The hardened unit gives the helper a private mount namespace (slave of
/// the host's, with a read-only system and hidden homes). Simulated here
/// with `unshare --mount --propagation slave` plus a tmpfs that hides a
/// directory: named namespaces must still appear in the host's /run/netns,
/// and spawned programs must see the host's file system.
#[test]
fn namespaces_are_published_to_the_host_from_a_private_mount_namespace() {
    if !require_root("namespaces_are_published_to_the_host_from_a_private_mount_namespace") {
        return;
    }
    let dir = warren_tests::TestDir::new("inst-mntns");
    let hidden = dir.join("home");
    std::fs::create_dir(&hidden).expect("mkdir");
    std::fs::write(hidden.join("note"), "visible on the host\n").expect("write");
    std::fs::set_permissions(&hidden, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let sock = dir.join("helper.sock");
    let log = dir.join("helper.log");
    let script = format!(
        "mount -t tmpfs none {hidden} && exec {helper} serve --socket {sock} --group 60100 --config /nonexistent/x.toml",
        hidden = hidden.display(),
        helper = bin("warren-helper").display(),
        sock = sock.display()
    );
    let child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "slave",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("helper in a private mount namespace");
    let mut helper = Proc::new(child, Some(log));
    assert!(
        wait_for(Duration::from_secs(10), || StdUnixStream::connect(&sock)
            .is_ok()),
        "helper up: {}",
        helper.log()
    );
    let n = name("mnt");
    rt().block_on(async {
        let mut c = HelperClient::connect(&sock).await.expect("connect");
        let (_info, _tun) = c
            .create_instance(spec(&n, true, false))
            .await
            .expect("create");
        // Visible to `ip netns` in the host's mount namespace.
        let list = run_limited(
            Command::new("ip").args(["netns", "list"]),
            Duration::from_secs(10),
        );
        assert!(
            String::from_utf8_lossy(&list.stdout).contains(&n.netns()),
            "published to the host: {}",
            helper.log()
        );
        let a = ip_json(&["-j", "-n", &n.netns(), "addr", "show", "dev", "wr0"]);
        assert!(a.to_string().contains("198.19.77.2"), "{a}");
        // A spawned program sees the host's files, not the helper's tmpfs.
        let note = hidden.join("note");
        let (out, st) = run_in(&mut c, &n, &["cat", note.to_str().expect("utf-8")], false).await;
        assert_eq!(st, ExitStatus::Code(0), "{out}");
        assert_eq!(out, "visible on the host\n");
        c.destroy_instance(&n).await.expect("destroy");
    });
    assert!(!netns_exists(&n), "removed from the host's /run/netns");
    helper.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(helper.wait_timeout(Duration::from_secs(10)).is_some());
}

/// Server tunnel, with the helper in a throwaway namespace that plays the
/// exit host (never the machine's own routes): a packet from a tunnel
/// client, written to the TUN, reaches an "internet" namespace through
/// warren's NAT, and the answer comes back through the TUN; teardown
/// removes warren's table and restores forwarding.
#[test]
fn server_tunnel_nats_tunnel_clients_to_the_internet_namespace() {
    if !require_root("server_tunnel_nats_tunnel_clients_to_the_internet_namespace") {
        return;
    }
    use warren_ipc::instance::ServerTunnelSpec;
    use warren_tests::TestNs;
    let pid = std::process::id() % 100_000;
    let inet = TestNs::new(&format!("wrtinet{pid}"));
    let srv = TestNs::new(&format!("wrtsrv{pid}"));
    srv.veth(
        &format!("wrtv{pid}s"),
        "198.18.50.1/24",
        &inet,
        &format!("wrtv{pid}i"),
        "198.18.50.2/24",
    );
    srv.ip(&["route", "add", "default", "via", "198.18.50.2"]);
    let fwd = |ns: &TestNs| {
        let out = run_limited(
            ns.exec("cat").arg("/proc/sys/net/ipv4/ip_forward"),
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(fwd(&srv), "0");

    let dir = warren_tests::TestDir::new("inst-srv");
    let sock = dir.join("helper.sock");
    let log = dir.join("helper.log");
    let config = warren_tests::write_helper_config(&dir, warren_tests::TEST_SERVER_TUNNEL_POOLS);
    let child = srv
        .exec(bin("warren-helper").to_str().expect("utf-8"))
        .args([
            "serve",
            "--socket",
            sock.to_str().expect("utf-8"),
            "--group",
            "60100",
            "--config",
            config.to_str().expect("utf-8"),
        ])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("helper in the server namespace");
    let mut helper = Proc::new(child, Some(log));
    assert!(
        wait_for(Duration::from_secs(10), || StdUnixStream::connect(&sock)
            .is_ok()),
        "{}",
        helper.log()
    );
    let n = name("srv");
    let table = format!("warren_s_{}", n.as_str());
    let nft_has_table = || {
        let out = run_limited(
            srv.exec("nft").args(["list", "tables"]),
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).contains(&table)
    };
    rt().block_on(async {
        let mut c = HelperClient::connect(&sock).await.expect("connect");
        let spec =
            ServerTunnelSpec::new(n.clone(), 1420, vec!["198.19.60.1/24".parse().expect("p")])
                .expect("spec");
        let (info, tun) = c
            .create_server_tunnel(spec)
            .await
            .expect("create server tunnel");
        assert_eq!(
            info.egress,
            format!("wrtv{pid}s"),
            "egress = the default route's interface"
        );
        assert!(nft_has_table(), "warren's own table installed");
        assert_eq!(fwd(&srv), "1");
        // A tunnel client (198.19.60.2) pings the internet host.
        let req = icmp_echo([198, 19, 60, 2], [198, 18, 50, 2], 8, 0x6060);
        nix::unistd::write(&tun, &req).expect("inject");
        let reply = read_until(&tun, |p| {
            p.len() >= 28 && p[9] == 1 && p[20] == 0 && p[24..26] == [0x60, 0x60]
        });
        assert_eq!(
            &reply[12..16],
            &[198, 18, 50, 2],
            "answer from the internet namespace"
        );
        assert_eq!(
            &reply[16..20],
            &[198, 19, 60, 2],
            "de-NATed back to the tunnel client"
        );
        c.destroy_instance(&n).await.expect("destroy");
    });
    assert!(!nft_has_table(), "table removed");
    assert_eq!(fwd(&srv), "0", "forwarding restored");
    helper.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(helper.wait_timeout(Duration::from_secs(10)).is_some());
}

/// A throwaway "host" namespace with a veth to an "other" namespace, and a
/// helper serving inside the host namespace with its own private
/// /etc/resolv.conf (a temp file bind-mounted over it), so nothing of the
/// machine's own routing or resolver is ever touched.
struct HostLab {
    host: warren_tests::TestNs,
    other: warren_tests::TestNs,
    host_if: String,
    resolv: std::path::PathBuf,
    sock: std::path::PathBuf,
    helper: Proc,
    _dir: warren_tests::TestDir,
}

impl HostLab {
    fn new(tag: &str) -> HostLab {
        use warren_tests::TestNs;
        let pid = std::process::id() % 100_000;
        let host = TestNs::new(&format!("wrth{tag}{pid}"));
        let other = TestNs::new(&format!("wrto{tag}{pid}"));
        let host_if = format!("wr{tag}{pid}h");
        host.veth(
            &host_if,
            "198.18.52.1/24",
            &other,
            &format!("wr{tag}{pid}o"),
            "198.18.52.2/24",
        );
        host.ip(&["route", "add", "default", "via", "198.18.52.2"]);
        let dir = warren_tests::TestDir::new(&format!("hostlab-{tag}"));
        let resolv = dir.join("resolv.conf");
        std::fs::write(&resolv, "nameserver 198.18.52.53\n").expect("resolv");
        let sock = dir.join("helper.sock");
        let helper = warren_tests::start_lab_helper(&host, &resolv, &sock, &dir.join("helper.log"));
        HostLab {
            host,
            other,
            host_if,
            resolv,
            sock,
            helper,
            _dir: dir,
        }
    }

    /// Routing and DNS state of the lab host.
    fn snapshot(&self) -> String {
        let mut s = String::new();
        for args in [
            vec!["rule", "show"],
            vec!["-6", "rule", "show"],
            vec!["route", "show", "table", "all"],
            vec!["-6", "route", "show", "table", "all"],
        ] {
            let mut full = vec!["-n", self.host.name.as_str()];
            full.extend(args);
            let out = run_limited(Command::new("ip").args(&full), Duration::from_secs(10));
            // IPv6 link-local routes appear whenever the new veth finishes
            // its address autoconfiguration: not warren's doing.
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if !line.contains("fe80:") {
                    s.push_str(line);
                    s.push('\n');
                }
            }
        }
        let nft = run_limited(
            self.host.exec("nft").args(["list", "ruleset"]),
            Duration::from_secs(10),
        );
        s.push_str(&String::from_utf8_lossy(&nft.stdout));
        s.push_str(&std::fs::read_to_string(&self.resolv).expect("resolv"));
        s
    }

    /// TCP connect from the lab host to the other namespace, forced out of
    /// the veth (SO_BINDTODEVICE), so routing cannot be what stops it.
    fn connect_out_of_veth(&self) -> bool {
        let code = format!(
            "import socket\ns=socket.socket()\ns.settimeout(2)\ns.setsockopt(socket.SOL_SOCKET, 25, b'{}')\ns.connect(('198.18.52.2', 8080))\n",
            self.host_if
        );
        run_limited(
            self.host.exec("python3").args(["-c", &code]),
            Duration::from_secs(20),
        )
        .status
        .success()
    }

    /// Sends UDP from the lab host out of its uplink to the other namespace
    /// and reports whether a listener there received it.
    fn udp_out_arrives(&self) -> bool {
        udp_arrives(&self.host, &self.other, "198.18.52.2", 9998)
    }

    /// Sends UDP from the other namespace to the tunnel's inner address and
    /// reports whether a listener in the lab host received it.
    fn udp_to_inner_address_arrives(&self) -> bool {
        udp_arrives(&self.other, &self.host, "198.19.71.2", 9999)
    }
}

/// Sends a few UDP datagrams from namespace `from` to `dst:port` and reports
/// whether a listener on `port` in namespace `to` (bound before the first is
/// sent) received one.
fn udp_arrives(
    from: &warren_tests::TestNs,
    to: &warren_tests::TestNs,
    dst: &str,
    port: u16,
) -> bool {
    let send = format!("echo x >/dev/udp/{dst}/{port}");
    udp_arrives_from(to, port, || {
        let _ = run_limited(
            from.exec("bash").args(["-c", &send]),
            Duration::from_secs(5),
        );
    })
}

/// Whether a listener on `port` in namespace `to` (bound before the first
/// is sent) receives one of the few datagrams `send` sends.
fn udp_arrives_from(to: &warren_tests::TestNs, port: u16, send: impl Fn()) -> bool {
    let code = format!(
        "import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', {port}))\nprint('READY', flush=True)\ns.settimeout(3)\ntry:\n  s.recvfrom(64)\n  print('GOT')\nexcept OSError:\n  print('NONE')\n"
    );
    let mut listener = to
        .exec("python3")
        .args(["-c", &code])
        .stdout(Stdio::piped())
        .spawn()
        .expect("listener");
    let mut out = listener.stdout.take().expect("stdout");
    let mut ready = [0u8; 6];
    let _ = out.read_exact(&mut ready);
    for _ in 0..5 {
        send();
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    let _ = listener.wait();
    rest.contains("GOT")
}

impl Drop for HostLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- helper log ----\n{}", self.helper.log());
        }
        self.helper.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = self.helper.wait_timeout(Duration::from_secs(10));
    }
}

fn host_spec(n: &InstanceName, kill_switch: bool) -> warren_ipc::instance::HostTunnelSpec {
    warren_ipc::instance::HostTunnelSpec::new(
        n.clone(),
        1420,
        vec!["198.19.71.2/32".parse().expect("p")],
        vec!["0.0.0.0/0".parse().expect("p")],
        vec!["198.19.71.53".parse().expect("ip")],
        kill_switch,
    )
    .expect("spec")
}

#[test]
fn host_tunnel_routes_like_wg_quick_with_kill_switch_and_restores_everything() {
    if !require_root("host_tunnel_routes_like_wg_quick_with_kill_switch_and_restores_everything") {
        return;
    }
    let lab = HostLab::new("k");
    let web = lab
        .other
        .exec("python3")
        .args(["-m", "http.server", "8080", "--bind", "198.18.52.2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("web server");
    let _web = Proc::new(web, None);
    assert!(
        wait_for(Duration::from_secs(10), || lab.connect_out_of_veth()),
        "control: reachable before"
    );
    let before = lab.snapshot();
    let n = name("hk");
    rt().block_on(async {
        let mut c = HelperClient::connect(&lab.sock).await.expect("connect");
        let (info, _tun, udp) = c
            .create_host_tunnel(
                host_spec(&n, true)
                    .with_search(vec!["corp.example".into()])
                    .expect("search"),
            )
            .await
            .expect("host tunnel");
        assert_eq!(info.table, 51820);
        let mark =
            nix::sys::socket::getsockopt(&udp, nix::sys::socket::sockopt::Mark).expect("mark");
        assert_eq!(mark, 51820, "the UDP socket bypasses the tunnel");
        let rules = run_limited(
            Command::new("ip").args(["-n", &lab.host.name, "rule", "show"]),
            Duration::from_secs(10),
        );
        let rules = String::from_utf8_lossy(&rules.stdout).to_string();
        assert!(
            rules.contains("not from all fwmark 0xca6c lookup 51820"),
            "{rules}"
        );
        assert!(
            rules.contains("from all lookup main suppress_prefixlength 0"),
            "{rules}"
        );
        let t = run_limited(
            Command::new("ip").args(["-n", &lab.host.name, "route", "show", "table", "51820"]),
            Duration::from_secs(10),
        );
        assert!(
            String::from_utf8_lossy(&t.stdout).contains(&format!("default dev {}", info.ifname))
        );
        let dns = std::fs::read_to_string(&lab.resolv).expect("resolv");
        assert!(
            dns.contains("nameserver 198.19.71.53")
                && dns.contains("\nsearch corp.example\n")
                && !dns.contains("198.18.52.53"),
            "{dns}"
        );
        assert!(
            !lab.connect_out_of_veth(),
            "kill switch blocks traffic that is not the tunnel's"
        );
        c.destroy_instance(&n).await.expect("destroy");
    });
    assert_eq!(
        lab.snapshot(),
        before,
        "routes, rules, nftables and DNS restored exactly"
    );
    assert!(lab.connect_out_of_veth(), "reachable again after teardown");
}

#[test]
fn cve_2019_14899_kill_switch_drops_tunnel_address_traffic_from_other_interfaces() {
    if !require_root(
        "cve_2019_14899_kill_switch_drops_tunnel_address_traffic_from_other_interfaces",
    ) {
        return;
    }
    let lab = HostLab::new("c");
    // An attacker on the local network routes to the tunnel's inner address.
    lab.other
        .ip(&["route", "add", "198.19.71.2/32", "via", "198.18.52.1"]);
    let n = name("hc");
    rt().block_on(async {
        let mut c = HelperClient::connect(&lab.sock).await.expect("connect");
        // Negative control: without the kill switch the probe gets through.
        let _t = c
            .create_host_tunnel(host_spec(&n, false))
            .await
            .expect("tunnel");
        assert!(
            lab.udp_to_inner_address_arrives(),
            "control: reachable without the kill switch"
        );
        c.destroy_instance(&n).await.expect("destroy");
        let _t = c
            .create_host_tunnel(host_spec(&n, true))
            .await
            .expect("tunnel with kill switch");
        assert!(
            !lab.udp_to_inner_address_arrives(),
            "dropped with the kill switch"
        );
        c.destroy_instance(&n).await.expect("destroy");
    });
}

/// Finding 6 of issue 14: the kill switch failed open. A host tunnel whose
/// process dies, and then the helper (kill -9, restart), must leave the host
/// blocked (a packet to an outside address is dropped, not sent in the
/// clear) until `warren down`; bringing the tunnel up again takes the block
/// over; `warren down` then restores the host exactly.
#[test]
fn finding_6_kill_switch_holds_after_its_tunnel_and_the_helper_die_until_down() {
    if !require_root("finding_6_kill_switch_holds_after_its_tunnel_and_the_helper_die_until_down") {
        return;
    }
    let mut lab = HostLab::new("q");
    let before = lab.snapshot();
    let n = name("hk");
    assert!(
        lab.udp_out_arrives(),
        "control: the uplink works without a tunnel"
    );
    let ifname = host_spec(&n, true).ifname();
    let link_gone = |lab: &HostLab| {
        !run_limited(
            lab.host.exec("ip").args(["link", "show", &ifname]),
            Duration::from_secs(5),
        )
        .status
        .success()
    };
    rt().block_on(async {
        let mut c = HelperClient::connect(&lab.sock).await.expect("connect");
        let _t = c
            .create_host_tunnel(host_spec(&n, true))
            .await
            .expect("tunnel with kill switch");
        // The tunnel's process dies: its connection (the lease) closes.
    });
    assert!(
        wait_for(Duration::from_secs(10), || link_gone(&lab)),
        "the tunnel ended"
    );
    assert!(
        !lab.udp_out_arrives(),
        "blocked after the tunnel's process died"
    );
    lab.helper.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(lab.helper.wait_timeout(Duration::from_secs(10)).is_some());
    assert!(!lab.udp_out_arrives(), "blocked while the helper is dead");
    let _ = std::fs::remove_file(&lab.sock);
    lab.helper = warren_tests::start_lab_helper(
        &lab.host,
        &lab.resolv,
        &lab.sock,
        &lab._dir.join("helper2.log"),
    );
    assert!(
        !lab.udp_out_arrives(),
        "still blocked after the helper restarted"
    );
    rt().block_on(async {
        let mut c = HelperClient::connect(&lab.sock).await.expect("connect");
        let list = c.list_instances().await.expect("list");
        assert!(
            list.iter()
                .any(|i| i.name == n && i.lease == warren_ipc::instance::KILL_SWITCH_LEASE),
            "the held kill switch is shown: {list:?}"
        );
        // Up again: the new tunnel takes the block over.
        let _t = c
            .create_host_tunnel(host_spec(&n, true))
            .await
            .expect("the tunnel again");
        let list = c.list_instances().await.expect("list");
        assert_eq!(list.iter().filter(|i| i.name == n).count(), 1, "{list:?}");
        c.destroy_instance(&n).await.expect("down");
    });
    assert!(lab.udp_out_arrives(), "down releases the block");
    assert_eq!(lab.snapshot(), before, "down restores the host exactly");
}

/// The paths finding 6 added (a held kill switch taken over by the next
/// `up`, released by `down`) act on the caller's own only: another member
/// can neither take it over nor release it, and does not even see it.
#[test]
fn finding_6_another_member_cannot_take_over_or_release_a_held_kill_switch() {
    if !require_root("finding_6_another_member_cannot_take_over_or_release_a_held_kill_switch") {
        return;
    }
    let lab = HostLab::new("m");
    let n = name("hm");
    rt().block_on(async {
        let mut owner = connect_path_as(&lab.sock, ids::MEMBER, ids::GROUP, &[]).await;
        let _t = owner
            .create_host_tunnel(host_spec(&n, true))
            .await
            .expect("owner's tunnel with kill switch");
        drop(_t);
        drop(owner);
    });
    assert!(
        wait_for(Duration::from_secs(10), || !lab.udp_out_arrives()),
        "the owner's kill switch is held"
    );
    rt().block_on(async {
        let mut other = connect_path_as(
            &lab.sock,
            ids::SUPPLEMENTARY,
            ids::SUPPLEMENTARY,
            &[ids::GROUP],
        )
        .await;
        let list = other.list_instances().await.expect("list");
        assert!(
            list.iter().all(|i| i.name != n),
            "not shown to others: {list:?}"
        );
        let takeover = other.create_host_tunnel(host_spec(&n, true)).await;
        assert!(
            matches!(
                takeover,
                Err(ClientError::Helper(HelperError::Exists { .. }))
            ),
            "another member cannot take it over: {takeover:?}"
        );
        let release = other.destroy_instance(&n).await;
        assert!(
            matches!(
                release,
                Err(ClientError::Helper(HelperError::NotFound { .. }))
            ),
            "another member cannot release it: {release:?}"
        );
    });
    assert!(
        !lab.udp_out_arrives(),
        "still blocked after the other member tried"
    );
    rt().block_on(async {
        let mut owner = connect_path_as(&lab.sock, ids::MEMBER, ids::GROUP, &[]).await;
        owner
            .destroy_instance(&n)
            .await
            .expect("the owner releases it");
    });
    assert!(lab.udp_out_arrives(), "released by its owner");
}

#[test]
fn kill_9_of_the_helper_with_a_host_tunnel_then_restart_restores_the_host() {
    if !require_root("kill_9_of_the_helper_with_a_host_tunnel_then_restart_restores_the_host") {
        return;
    }
    let mut lab = HostLab::new("r");
    let before = lab.snapshot();
    let n = name("hr");
    rt().block_on(async {
        let mut c = HelperClient::connect(&lab.sock).await.expect("connect");
        let _t = c
            .create_host_tunnel(host_spec(&n, false))
            .await
            .expect("tunnel");
        lab.helper.signal(nix::sys::signal::Signal::SIGKILL);
        assert!(lab.helper.wait_timeout(Duration::from_secs(10)).is_some());
    });
    assert_ne!(
        lab.snapshot(),
        before,
        "a killed helper leaves its host tunnel behind..."
    );
    // ...until it starts again (same journal, same lab host).
    let _ = std::fs::remove_file(&lab.sock);
    lab.helper = warren_tests::start_lab_helper(
        &lab.host,
        &lab.resolv,
        &lab.sock,
        &lab._dir.join("helper2.log"),
    );
    assert_eq!(
        lab.snapshot(),
        before,
        "rules, routes and DNS restored at start (a kill switch stays: see finding_6_...)"
    );
}

/// A UDP datagram sent from the lab host to `dst` leaves through `tun`
/// (read from its descriptor).
fn lab_udp_leaves_through(lab: &HostLab, dst: [u8; 4], tun: &OwnedFd) {
    let send = format!(
        "echo warren >/dev/udp/{}.{}.{}.{}/9",
        dst[0], dst[1], dst[2], dst[3]
    );
    let out = run_limited(
        lab.host.exec("bash").args(["-c", &send]),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{out:?}");
    read_until(tun, |p| p.len() >= 28 && p[9] == 17 && p[16..20] == dst);
}

/// A host tunnel routing only `subnet` (198.18.6X.0/24), inner address
/// 198.19.7X.2, no DNS, no kill switch: several can share a host.
fn split_host_spec(n: &InstanceName, x: u8) -> warren_ipc::instance::HostTunnelSpec {
    warren_ipc::instance::HostTunnelSpec::new(
        n.clone(),
        1420,
        vec![format!("198.19.7{x}.2/32").parse().expect("p")],
        vec![format!("198.18.6{x}.0/24").parse().expect("p")],
        vec![],
        false,
    )
    .expect("spec")
}

fn lab_rules(lab: &HostLab) -> String {
    let out = run_limited(
        Command::new("ip").args(["-n", &lab.host.name, "rule", "show"]),
        Duration::from_secs(10),
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn finding_5_two_members_racing_for_one_name_leave_the_winner_intact() {
    if !require_root("finding_5_two_members_racing_for_one_name_leave_the_winner_intact") {
        return;
    }
    let h = Helper::start("inst-race", &[]);
    let n = name("race");
    rt().block_on(async {
        let mut a = connect_as(&h, ids::MEMBER, ids::GROUP, &[]).await;
        let mut b = connect_as(&h, ids::SUPPLEMENTARY, ids::SUPPLEMENTARY, &[ids::GROUP]).await;
        for round in 0..50 {
            let (ra, rb) = tokio::join!(
                a.create_instance(spec(&n, true, false)),
                b.create_instance(spec(&n, true, false))
            );
            let (winner, lost, tun) = match (ra, rb) {
                (Ok((_, tun)), Err(e)) => (&mut a, e, tun),
                (Err(e), Ok((_, tun))) => (&mut b, e, tun),
                (ra, rb) => panic!("round {round}: exactly one wins: {ra:?} / {rb:?}"),
            };
            assert!(
                matches!(lost, ClientError::Helper(HelperError::Exists { .. })),
                "round {round}: the loser is told the name is taken: {lost:?}"
            );
            assert!(netns_exists(&n), "round {round}: the winner's namespace");
            let addrs = ip_json(&["-n", &n.netns(), "-j", "addr", "show", "dev", "wr0"]);
            assert!(
                addrs.to_string().contains("198.19.77.2"),
                "round {round}: the winner's TUN is configured: {addrs}"
            );
            // And its TUN still carries its traffic.
            let out = run_limited(
                Command::new("ip").args([
                    "netns",
                    "exec",
                    &n.netns(),
                    "bash",
                    "-c",
                    "echo warren >/dev/udp/198.19.77.9/9",
                ]),
                Duration::from_secs(10),
            );
            assert!(out.status.success(), "round {round}: {out:?}");
            read_until(&tun, |p| p.len() >= 28 && p[16..20] == [198, 19, 77, 9]);
            winner.destroy_instance(&n).await.expect("destroy");
            assert!(!netns_exists(&n), "round {round}: removed");
        }
    });
}

#[test]
fn finding_5_two_host_tunnels_created_concurrently_both_work() {
    if !require_root("finding_5_two_host_tunnels_created_concurrently_both_work") {
        return;
    }
    let lab = HostLab::new("w");
    let before = lab.snapshot();
    let (na, nb) = (name("hwa"), name("hwb"));
    rt().block_on(async {
        let mut a = connect_path_as(&lab.sock, ids::MEMBER, ids::GROUP, &[]).await;
        let mut b = connect_path_as(
            &lab.sock,
            ids::SUPPLEMENTARY,
            ids::SUPPLEMENTARY,
            &[ids::GROUP],
        )
        .await;
        let (ra, rb) = tokio::join!(
            a.create_host_tunnel(split_host_spec(&na, 0)),
            b.create_host_tunnel(split_host_spec(&nb, 1))
        );
        let (ia, tun_a, _udp_a) = ra.expect("first host tunnel");
        let (ib, tun_b, _udp_b) = rb.expect("second host tunnel");
        assert_ne!(ia.table, ib.table, "each has its own routing table");
        let rules = lab_rules(&lab);
        for t in [ia.table, ib.table] {
            assert!(
                rules.contains(&format!("not from all fwmark {t:#x} lookup {t}")),
                "{rules}"
            );
        }
        assert_eq!(
            rules.matches("lookup main suppress_prefixlength 0").count(),
            1,
            "one shared suppress rule: {rules}"
        );
        lab_udp_leaves_through(&lab, [198, 18, 60, 9], &tun_a);
        lab_udp_leaves_through(&lab, [198, 18, 61, 9], &tun_b);
        a.destroy_instance(&na).await.expect("destroy first");
        let rules = lab_rules(&lab);
        assert!(
            rules.contains("lookup main suppress_prefixlength 0"),
            "the second still has the shared rule: {rules}"
        );
        lab_udp_leaves_through(&lab, [198, 18, 61, 9], &tun_b);
        b.destroy_instance(&nb).await.expect("destroy second");
    });
    assert_eq!(lab.snapshot(), before, "the host restored exactly");
}

#[test]
fn finding_5_a_failed_second_host_tunnel_leaves_the_first_intact() {
    if !require_root("finding_5_a_failed_second_host_tunnel_leaves_the_first_intact") {
        return;
    }
    let lab = HostLab::new("f");
    let (na, nb) = (name("hfa"), name("hfb"));
    // Someone else's rule on the routing table the second tunnel gets: its
    // creation fails after it has started routing.
    let planted = [
        "rule", "add", "not", "fwmark", "51821", "table", "51821", "priority", "32761",
    ];
    rt().block_on(async {
        let mut a = connect_path_as(&lab.sock, ids::MEMBER, ids::GROUP, &[]).await;
        let (ia, tun_a, _udp_a) = a
            .create_host_tunnel(split_host_spec(&na, 0))
            .await
            .expect("first host tunnel");
        assert_eq!(ia.table, 51820);
        lab.host.ip(&planted);
        let before = lab.snapshot();
        let mut b = connect_path_as(
            &lab.sock,
            ids::SUPPLEMENTARY,
            ids::SUPPLEMENTARY,
            &[ids::GROUP],
        )
        .await;
        let failed = b.create_host_tunnel(split_host_spec(&nb, 1)).await;
        assert!(
            matches!(
                failed,
                Err(ClientError::Helper(HelperError::HostState { .. }))
            ),
            "the second fails, saying why: {failed:?}"
        );
        assert_eq!(
            lab.snapshot(),
            before,
            "the first's routing (and the rule that is not warren's) intact"
        );
        lab_udp_leaves_through(&lab, [198, 18, 60, 9], &tun_a);
        // With the foreign rule gone, the first's end takes the shared
        // rule with it.
        lab.host
            .ip(&["rule", "del", "priority", "32761", "table", "51821"]);
        a.destroy_instance(&na).await.expect("destroy first");
    });
    let rules = lab_rules(&lab);
    assert!(
        !rules.contains("suppress_prefixlength") && !rules.contains("fwmark"),
        "{rules}"
    );
}

#[test]
fn finding_5_host_tunnels_that_would_undo_each_other_are_refused_with_the_reason() {
    if !require_root(
        "finding_5_host_tunnels_that_would_undo_each_other_are_refused_with_the_reason",
    ) {
        return;
    }
    let lab = HostLab::new("x");
    let (na, nb) = (name("hxa"), name("hxb"));
    let refused = |r: Result<_, ClientError>, what: &str| match r {
        Err(ClientError::Helper(HelperError::HostState { reason })) => {
            assert!(
                reason.contains(na.as_str()),
                "{what}: names the other: {reason}"
            )
        }
        other => panic!("{what}: refused with the reason: {other:?}"),
    };
    rt().block_on(async {
        let mut a = connect_path_as(&lab.sock, ids::MEMBER, ids::GROUP, &[]).await;
        let mut b = HelperClient::connect(&lab.sock).await.expect("connect");
        // A kill switch drops whatever does not leave through its own
        // tunnel: no second host tunnel can work beside it, either way.
        let t = a
            .create_host_tunnel(host_spec(&na, true))
            .await
            .expect("with a kill switch");
        refused(
            b.create_host_tunnel(split_host_spec(&nb, 1)).await,
            "beside a kill switch",
        );
        drop(t);
        a.destroy_instance(&na).await.expect("down");
        let t = a
            .create_host_tunnel(host_spec(&na, false))
            .await
            .expect("with DNS");
        let with_ks = split_host_spec(&nb, 1);
        let with_ks = warren_ipc::instance::HostTunnelSpec {
            kill_switch: true,
            ..with_ks
        };
        refused(
            b.create_host_tunnel(with_ks).await,
            "a kill switch beside it",
        );
        // One resolv.conf: a second DNS switch would restore the first's.
        let with_dns = warren_ipc::instance::HostTunnelSpec {
            dns: vec!["198.19.71.54".parse().expect("ip")],
            ..split_host_spec(&nb, 1)
        };
        refused(b.create_host_tunnel(with_dns).await, "a second DNS switch");
        let (_, _tun, _udp) = b
            .create_host_tunnel(split_host_spec(&nb, 1))
            .await
            .expect("without DNS or kill switch it fits");
        drop(t);
    });
}

#[test]
fn finding_6_the_marked_socket_reaches_only_the_peer_endpoints_under_the_kill_switch() {
    if !require_root(
        "finding_6_the_marked_socket_reaches_only_the_peer_endpoints_under_the_kill_switch",
    ) {
        return;
    }
    let lab = HostLab::new("e");
    let n = name("he");
    rt().block_on(async {
        let mut c = HelperClient::connect(&lab.sock).await.expect("connect");
        let spec = host_spec(&n, true)
            .with_endpoints(vec!["198.18.52.2:9996".parse().expect("endpoint")])
            .expect("endpoints");
        let (_info, _tun, udp) = c.create_host_tunnel(spec).await.expect("host tunnel");
        let send_to = |port: u16| {
            let dst = nix::sys::socket::SockaddrIn::new(198, 18, 52, 2, port);
            let _ = nix::sys::socket::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&udp),
                b"wg",
                &dst,
                nix::sys::socket::MsgFlags::empty(),
            );
        };
        assert!(
            udp_arrives_from(&lab.other, 9996, || send_to(9996)),
            "the tunnel's own traffic reaches its peer's endpoint"
        );
        assert!(
            !udp_arrives_from(&lab.other, 9995, || send_to(9995)),
            "the marked socket cannot reach anything else in the clear"
        );
        c.destroy_instance(&n).await.expect("down");
    });
}
