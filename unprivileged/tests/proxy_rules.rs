//! `warren proxy` rules and configuration end to end: a `[rules]` file
//! blocks targets (SOCKS5 reply 0x02, HTTP 403) while others pass, and
//! `warren config check` names the line and column of a bad value.

mod common;
use common::{curl, origin};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Proxy {
    child: Option<Child>,
    socks: SocketAddr,
    http: SocketAddr,
    /// The proxy's runtime directory (control socket), removed with it.
    _run: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Proxy {
    /// A handle to the same proxy for another thread (does not own it).
    fn borrowed(socks: SocketAddr) -> Proxy {
        Proxy {
            child: None,
            socks,
            http: socks,
            _run: tempfile::tempdir().expect("dir"),
        }
    }

    fn child_alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// Starts `warren proxy` on ephemeral ports and reads them from its log.
fn proxy(extra: &[&str], env: &[(&str, &str)]) -> Proxy {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
    let run = tempfile::tempdir().expect("runtime dir");
    cmd.args(["proxy", "--socks", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .env("XDG_RUNTIME_DIR", run.path())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("warren proxy");
    let stderr = child.stderr.take().expect("stderr");
    // Read the log on a thread (never block the test on it); keep draining
    // it so the proxy never blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let addr = line
                .split("listen=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|a| a.parse::<SocketAddr>().ok());
            if let Some(a) = addr {
                let _ = tx.send((line.contains("Socks5"), a));
            }
        }
    });
    let (mut socks, mut http) = (None, None);
    while socks.is_none() || http.is_none() {
        let (is_socks, a) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("listener addresses in the proxy's log");
        if is_socks {
            socks = Some(a);
        } else {
            http = Some(a);
        }
    }
    let (socks, http) = (socks.expect("socks"), http.expect("http"));
    Proxy {
        child: Some(child),
        socks,
        http,
        _run: run,
    }
}

/// The test process's scratch directory, removed when the process exits
/// normally (a static `TempDir` is never dropped, so its path is cleaned at
/// exit instead).
fn scratch() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("warren-proxy-rules-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        extern "C" fn cleanup() {
            let d = std::env::temp_dir().join(format!("warren-proxy-rules-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(d);
        }
        // SAFETY: registering a plain extern "C" function with atexit.
        unsafe { libc::atexit(cleanup) };
        d
    })
}

fn tmp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = scratch();
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p
}

fn socks_connect(p: &Proxy, ip: [u8; 4], port: u16) -> u8 {
    let mut s = TcpStream::connect(p.socks).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(&[5, 1, 0]).expect("w");
    let mut b = [0u8; 2];
    s.read_exact(&mut b).expect("method");
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&ip);
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).expect("w");
    let mut r = [0u8; 10];
    s.read_exact(&mut r).expect("reply");
    r[1]
}

#[test]
fn config_rules_block_socks_and_http_targets() {
    let cfg = tmp_file(
        "block.toml",
        "[rules]\ndefault = \"direct\"\nblock = [\"127.0.0.3/32\", \"*.Blocked.Test\"]\n",
    );
    let p = proxy(&["--config", cfg.to_str().expect("utf-8 path")], &[]);
    let ok = origin("127.0.0.1:0", "allowed");
    // A blocked address: 0x02 (connection not allowed by ruleset).
    assert_eq!(socks_connect(&p, [127, 0, 0, 3], ok.port()), 0x02);
    // An allowed one succeeds.
    assert_eq!(socks_connect(&p, [127, 0, 0, 1], ok.port()), 0x00);
    assert_eq!(
        curl(&["--socks5", &p.socks.to_string(), &format!("http://{ok}/")]),
        "allowed"
    );
    // HTTP: a blocked name (apex of the suffix rule, any case) gets 403
    // before any name resolution.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args([
            "-x",
            &format!("http://{}", p.http),
            "http://BLOCKED.test./x",
        ])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    assert_eq!(
        curl(&[
            "-x",
            &format!("http://{}", p.http),
            &format!("http://{ok}/")
        ]),
        "allowed"
    );
}

#[test]
fn config_check_reports_line_and_column() {
    let good = tmp_file(
        "good.toml",
        "[proxy]\nsocks = \"127.0.0.1:0\"\n[rules]\nproxy = [\"::1\"]\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["config", "check"])
        .arg(&good)
        .output()
        .expect("warren config check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = tmp_file(
        "bad.toml",
        "[proxy]\nsocks = \"127.0.0.1:0\"\n  bogus = 1\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .expect("warren config check");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:3:3") && err.contains("bogus"),
        "{err}"
    );
    // The proxy refuses to start with it, naming the same place.
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["proxy", "--config"])
        .arg(&bad)
        .stdin(Stdio::null())
        .output()
        .expect("warren proxy");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:3:3"));
}

/// An echo server on 127.0.0.1 for at most `n` connections.
fn echo_server(n: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming().take(n) {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => {
                            if s.write_all(&buf[..k]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Opens a SOCKS5 CONNECT to `to`; returns the stream on success, or the
/// reply code.
fn socks_open(p: &Proxy, to: SocketAddr) -> Result<TcpStream, u8> {
    let mut s = TcpStream::connect(p.socks).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = vec![5, 1, 0, 5, 1, 0, 1];
    match to.ip() {
        std::net::IpAddr::V4(a) => req.extend_from_slice(&a.octets()),
        std::net::IpAddr::V6(_) => panic!("IPv4 only here"),
    }
    req.extend_from_slice(&to.port().to_be_bytes());
    s.write_all(&req).expect("w");
    let mut r = [0u8; 12];
    s.read_exact(&mut r).expect("method choice and reply");
    if r[3] == 0 { Ok(s) } else { Err(r[3]) }
}

fn echo_once(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("write through the proxy");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("echo through the proxy");
    assert_eq!(back, msg);
}

fn wait_blocked(p: &Proxy, to: SocketAddr) {
    for _ in 0..100 {
        if socks_open(p, to).err() == Some(0x02) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the new rule never took effect");
}

#[test]
fn reload_on_sighup_under_load_loses_no_connection() {
    let cfg = tmp_file("reload-hup.toml", "[rules]\ndefault = \"direct\"\n");
    let mut p = proxy(&["--config", cfg.to_str().expect("utf-8 path")], &[]);
    let echo = echo_server(400);
    // Long-lived connections established before the reload.
    let mut live: Vec<TcpStream> = (0..20)
        .map(|_| socks_open(&p, echo).expect("connect before reload"))
        .collect();
    for s in &mut live {
        echo_once(s, b"before");
    }
    // Load during the reload: new connections either relay fully or get a
    // clean 0x02, never a broken stream.
    let socks = p.socks;
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let p = Proxy::borrowed(socks);
                let mut ok = 0;
                for _ in 0..40 {
                    match socks_open(&p, echo) {
                        Ok(mut s) => {
                            echo_once(&mut s, b"load");
                            ok += 1;
                        }
                        Err(code) => assert_eq!(code, 0x02),
                    }
                }
                ok
            })
        })
        .collect();
    std::fs::write(
        &cfg,
        "[rules]\ndefault = \"direct\"\nblock = [\"127.0.0.1\"]\n",
    )
    .expect("rewrite config");
    let st = Command::new("kill")
        .args(["-HUP", &p.child.as_ref().expect("owned").id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(st.success());
    wait_blocked(&p, echo);
    for l in loaders {
        l.join().expect("loader thread");
    }
    // Every connection made before the reload still relays.
    for s in &mut live {
        echo_once(s, b"after");
    }
    assert!(p.child_alive());
}

#[test]
fn reload_on_file_change_and_bad_file_keeps_rules() {
    let cfg = tmp_file("reload-file.toml", "[rules]\ndefault = \"direct\"\n");
    let mut p = proxy(&["--config", cfg.to_str().expect("utf-8 path")], &[]);
    let echo = echo_server(200);
    let mut s = socks_open(&p, echo).expect("allowed at first");
    echo_once(&mut s, b"x");
    // Make sure the modification time moves even on coarse clocks.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&cfg, "[rules]\nblock = [\"127.0.0.0/8\"]\n").expect("rewrite");
    wait_blocked(&p, echo);
    echo_once(&mut s, b"still relayed");
    // A broken file is refused; the previous rules stay in force.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&cfg, "[rules]\nblock = [\"127.0.0.0/99\"]\n").expect("rewrite");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(socks_open(&p, echo).err(), Some(0x02));
    assert!(p.child_alive());
}

#[test]
fn status_lists_the_proxy_and_its_counters() {
    let run = std::env::temp_dir().join(format!("warren-status-{}", std::process::id()));
    std::fs::create_dir_all(&run).expect("mkdir");
    let run_s = run.to_str().expect("utf-8 path").to_owned();
    let cfg = tmp_file("status.toml", "[rules]\nblock = [\"127.0.0.9\"]\n");
    let p = proxy(
        &["--config", cfg.to_str().expect("utf-8 path")],
        &[("XDG_RUNTIME_DIR", &run_s)],
    );
    let pid = p.child.as_ref().expect("owned").id();
    let ok = origin("127.0.0.1:0", "counted");
    assert_eq!(
        curl(&["--socks5", &p.socks.to_string(), &format!("http://{ok}/")]),
        "counted"
    );
    assert_eq!(socks_connect(&p, [127, 0, 0, 9], 80), 0x02);
    let sock = run.join(format!("warren/proxy-{pid}.sock"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| {
            std::fs::metadata(p).expect("exists").permissions().mode() & 0o777
        };
        assert_eq!(mode(&sock), 0o600);
        assert_eq!(mode(&run.join("warren")), 0o700);
    }
    let mut last = String::new();
    for _ in 0..50 {
        let out = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["status", "--json"])
            .env("XDG_RUNTIME_DIR", &run_s)
            .output()
            .expect("warren status");
        assert!(out.status.success());
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: serde_json::Value = serde_json::from_str(&last).expect("JSON");
        let me = v["proxies"]
            .as_array()
            .expect("list")
            .iter()
            .find(|x| x["pid"] == pid)
            .cloned();
        if let Some(me) = me
            && me["connections_total"].as_u64() >= Some(2)
            && me["connections_active"].as_u64() == Some(0)
        {
            assert_eq!(me["connections_blocked"], 1);
            assert!(me["bytes_down"].as_u64().expect("number") >= 7);
            assert!(me["bytes_up"].as_u64().expect("number") > 0);
            let text = Command::new(env!("CARGO_BIN_EXE_warren"))
                .arg("status")
                .env("XDG_RUNTIME_DIR", &run_s)
                .output()
                .expect("warren status");
            assert!(String::from_utf8_lossy(&text.stdout).contains(&format!("proxy pid {pid}")));
            drop(p);
            let _ = std::fs::remove_dir_all(&run);
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("counters never settled: {last}");
}
