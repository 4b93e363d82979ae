//! `warren proxy` end to end on loopback: curl as the real client (SOCKS5,
//! SOCKS5 with proxy-side names, HTTP forwarding, HTTP CONNECT; IPv4 and
//! IPv6), raw bytes for every RFC 1928 error path, RFC 1929 authentication,
//! and UDP ASSOCIATE against a real UDP echo server.

mod common;
use common::{curl, origin};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Proxy {
    child: Child,
    socks: SocketAddr,
    http: SocketAddr,
    /// Every line the proxy logged so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The proxy's runtime directory (control socket), removed with it.
    _run: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut l) = log2.lock() {
                l.push(line.clone());
            }
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
        child,
        socks,
        http,
        log,
        _run: run,
    }
}

#[test]
fn access_log_has_one_structured_line_per_connection_and_is_off_by_default() {
    let o = origin("127.0.0.1:0", "logged");
    let quiet = proxy(&[], &[]);
    assert_eq!(
        curl(&[
            "--socks5",
            &quiet.socks.to_string(),
            &format!("http://{o}/")
        ]),
        "logged"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !quiet
            .log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains("warren::access")),
        "access log on by default"
    );
    let p = proxy(&["--access-log"], &[]);
    assert_eq!(
        curl(&["--socks5", &p.socks.to_string(), &format!("http://{o}/")]),
        "logged"
    );
    let line = (0..50)
        .find_map(|_| {
            let found = p
                .log
                .lock()
                .expect("log")
                .iter()
                .find(|l| l.contains("warren::access"))
                .cloned();
            if found.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            found
        })
        .expect("an access log line");
    for field in [
        "client=127.0.0.1:",
        &format!("target={o}"),
        "rule=\"default\"",
        "action=Proxy",
        "bytes_up=",
        "bytes_down=",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    assert!(!line.contains("bytes_down=0 "), "no bytes counted: {line}");
}

#[test]
fn curl_through_socks5_and_http_ipv4_and_ipv6() {
    let p = proxy(&[], &[]);
    let v4 = origin("127.0.0.1:0", "hello v4");
    let v6 = origin("[::1]:0", "hello v6");
    let socks = p.socks.to_string();
    let http = format!("http://{}", p.http);
    assert_eq!(
        curl(&["--socks5", &socks, &format!("http://{v4}/")]),
        "hello v4"
    );
    assert_eq!(
        curl(&["--socks5", &socks, &format!("http://{v6}/")]),
        "hello v6"
    );
    // Names resolved by the proxy.
    assert_eq!(
        curl(&[
            "--socks5-hostname",
            &socks,
            &format!("http://localhost:{}/", v4.port())
        ]),
        "hello v4"
    );
    // HTTP forwarding (absolute form) and CONNECT.
    assert_eq!(
        curl(&["-x", &http, &format!("http://{v4}/x?y")]),
        "hello v4"
    );
    assert_eq!(curl(&["-x", &http, &format!("http://{v6}/")]), "hello v6");
    assert_eq!(
        curl(&["-p", "-x", &http, &format!("http://{v4}/")]),
        "hello v4"
    );
}

fn socks_conn(p: &Proxy) -> TcpStream {
    let s = TcpStream::connect(p.socks).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).expect("read");
    b
}

#[test]
fn rfc1928_error_paths() {
    let p = proxy(&[], &[]);
    // Nothing acceptable offered (only GSSAPI): 0xFF.
    let mut s = socks_conn(&p);
    s.write_all(&[5, 1, 1]).expect("w");
    assert_eq!(read_n(&mut s, 2), vec![5, 0xff]);
    // BIND: command not supported (0x07).
    let mut s = socks_conn(&p);
    s.write_all(&[5, 1, 0]).expect("w");
    assert_eq!(read_n(&mut s, 2), vec![5, 0]);
    s.write_all(&[5, 2, 0, 1, 127, 0, 0, 1, 0, 80]).expect("w");
    assert_eq!(read_n(&mut s, 10)[1], 0x07);
    // Unknown address type: 0x08.
    let mut s = socks_conn(&p);
    s.write_all(&[5, 1, 0]).expect("w");
    read_n(&mut s, 2);
    s.write_all(&[5, 1, 0, 9, 0, 0]).expect("w");
    assert_eq!(read_n(&mut s, 10)[1], 0x08);
    // Zero-length domain: general failure.
    let mut s = socks_conn(&p);
    s.write_all(&[5, 1, 0]).expect("w");
    read_n(&mut s, 2);
    s.write_all(&[5, 1, 0, 3, 0, 0, 80]).expect("w");
    assert_eq!(read_n(&mut s, 10)[1], 0x01);
    // Not SOCKS5 at all: closed without an answer.
    let mut s = socks_conn(&p);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("w");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    // Refused target: 0x05 with the real port closed.
    let closed = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("a");
    let mut s = socks_conn(&p);
    s.write_all(&[5, 1, 0]).expect("w");
    read_n(&mut s, 2);
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&closed.port().to_be_bytes());
    s.write_all(&req).expect("w");
    assert_eq!(read_n(&mut s, 10)[1], 0x05);
    // And the proxy still serves.
    let v4 = origin("127.0.0.1:0", "still");
    assert_eq!(
        curl(&["--socks5", &p.socks.to_string(), &format!("http://{v4}/")]),
        "still"
    );
}

#[test]
fn connect_reply_carries_the_real_bound_address() {
    let p = proxy(&[], &[]);
    let v4 = origin("127.0.0.1:0", "x");
    let mut s = socks_conn(&p);
    s.write_all(&[5, 1, 0]).expect("w");
    read_n(&mut s, 2);
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&req).expect("w");
    let r = read_n(&mut s, 10);
    assert_eq!(&r[..4], &[5, 0, 0, 1]);
    assert_eq!(&r[4..8], &[127, 0, 0, 1]);
    assert_ne!(u16::from_be_bytes([r[8], r[9]]), 0, "a real port");
}

#[test]
fn rfc1929_username_password() {
    let p = proxy(
        &["--user", "alice"],
        &[("WARREN_PROXY_PASSWORD", "s3cret-pw")],
    );
    let v4 = origin("127.0.0.1:0", "authed");
    let socks = p.socks.to_string();
    assert_eq!(
        curl(&[
            "--socks5",
            &socks,
            "--proxy-user",
            "alice:s3cret-pw",
            &format!("http://{v4}/")
        ]),
        "authed"
    );
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "10",
            "--socks5",
            &socks,
            "--proxy-user",
            "alice:wrong",
        ])
        .arg(format!("http://{v4}/"))
        .output()
        .expect("curl");
    assert!(!out.status.success(), "wrong password refused");
    // No-auth only: nothing acceptable.
    let mut s = socks_conn(&p);
    s.write_all(&[5, 1, 0]).expect("w");
    assert_eq!(read_n(&mut s, 2), vec![5, 0xff]);
}

#[test]
fn udp_associate_relays_to_a_real_echo_server() {
    let p = proxy(&[], &[]);
    let echo = UdpSocket::bind("127.0.0.1:0").expect("echo");
    let echo_addr = echo.local_addr().expect("a");
    std::thread::spawn(move || {
        let mut b = [0u8; 2048];
        for _ in 0..10 {
            let Ok((n, from)) = echo.recv_from(&mut b) else {
                break;
            };
            let _ = echo.send_to(&b[..n], from);
        }
    });
    let mut ctl = socks_conn(&p);
    ctl.write_all(&[5, 1, 0]).expect("w");
    read_n(&mut ctl, 2);
    ctl.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).expect("w");
    let r = read_n(&mut ctl, 10);
    assert_eq!(r[1], 0);
    let relay = SocketAddr::from(([r[4], r[5], r[6], r[7]], u16::from_be_bytes([r[8], r[9]])));
    let c = UdpSocket::bind("127.0.0.1:0").expect("client");
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("t");
    let mut d = vec![0, 0, 0, 1, 127, 0, 0, 1];
    d.extend_from_slice(&echo_addr.port().to_be_bytes());
    d.extend_from_slice(b"ping through socks");
    c.send_to(&d, relay).expect("send");
    let mut b = [0u8; 2048];
    let (n, _) = c.recv_from(&mut b).expect("echo back");
    assert_eq!(&b[..3], &[0, 0, 0]);
    assert_eq!(&b[10..n], b"ping through socks");
    // A fragment is dropped, not relayed.
    let mut f = d.clone();
    f[2] = 1;
    c.send_to(&f, relay).expect("send");
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("t");
    assert!(c.recv_from(&mut b).is_err(), "fragments are refused");
    drop(ctl);
}

#[test]
fn http_proxy_bad_requests_get_error_answers() {
    let p = proxy(&[], &[]);
    for (req, want) in [
        (&b"GARBAGE\r\n\r\n"[..], "HTTP/1.1 400"),
        (
            &b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            "HTTP/1.1 400",
        ),
    ] {
        let mut s = TcpStream::connect(p.http).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("t");
        s.write_all(req).expect("w");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with(want), "{out}");
    }
    let mut s = TcpStream::connect(p.http).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("t");
    let mut big = b"GET http://x/ HTTP/1.1\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'a', 20_000));
    let _ = s.write_all(&big);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
}

/// An origin that reads each request's body (Content-Length or chunked, by
/// the proxy's framing) and answers with its length and the path.
fn body_origin() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming().take(50) {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                // Everything until the proxy half-closes or 1 s of quiet.
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n");
                    let Some(h) = head_end else { continue };
                    let head = String::from_utf8_lossy(&got[..h]).to_ascii_lowercase();
                    let body = &got[h + 4..];
                    let done = if let Some(cl) =
                        head.lines().find_map(|l| l.strip_prefix("content-length:"))
                    {
                        body.len() >= cl.trim().parse::<usize>().unwrap_or(0)
                    } else if head.contains("transfer-encoding: chunked") {
                        body.ends_with(b"0\r\n\r\n")
                    } else {
                        true
                    };
                    if done {
                        let path = head.split_whitespace().nth(1).unwrap_or("?").to_string();
                        let answer = format!("{path} {}", body.len());
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
                            answer.len()
                        );
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn http_keep_alive_with_bodies_and_pipelining() {
    use std::io::{Read, Write};
    let p = proxy(&[], &[]);
    let o = body_origin();
    let mut c = TcpStream::connect(p.http).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // Three requests on one client connection, pipelined: a Content-Length
    // body, a chunked body, and a plain GET.
    let reqs = format!(
        "POST http://{o}/one HTTP/1.1\r\nHost: {o}\r\nContent-Length: 5\r\n\r\nhello\
         POST http://{o}/two HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
         GET http://{o}/three HTTP/1.1\r\nHost: {o}\r\nConnection: close\r\n\r\n"
    );
    c.write_all(reqs.as_bytes()).expect("write");
    let mut all = String::new();
    c.read_to_string(&mut all)
        .expect("read until the proxy closes");
    let bodies: Vec<&str> = all
        .split("HTTP/1.1 200 OK")
        .skip(1)
        .filter_map(|r| r.split("\r\n\r\n").nth(1))
        .collect();
    assert_eq!(bodies.len(), 3, "three responses on one connection: {all}");
    assert_eq!(bodies[0], "/one 5");
    assert!(bodies[1].starts_with("/two "), "{}", bodies[1]);
    assert_eq!(bodies[2], "/three 0");
    assert!(all.contains("Connection: keep-alive"), "{all}");
    // curl reuses the proxy connection for a second URL.
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-v",
            "--max-time",
            "10",
            "-x",
            &format!("http://{}", p.http),
        ])
        .arg(format!("http://{o}/a"))
        .arg(format!("http://{o}/b"))
        .output()
        .expect("curl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("Re-using existing") || err.contains("Reusing existing"),
        "curl did not reuse the connection:\n{err}"
    );
}

/// An echo server on loopback: each connection gets back what it sends.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let a = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut b) {
                    if s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    a
}

/// A SOCKS5 CONNECT to `to` through `p`, answered with success.
fn socks_connect_to(p: &Proxy, to: SocketAddr) -> TcpStream {
    let mut s = socks_conn(p);
    s.write_all(&[5, 1, 0]).expect("w");
    assert_eq!(read_n(&mut s, 2), vec![5, 0]);
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&to.port().to_be_bytes());
    s.write_all(&req).expect("w");
    assert_eq!(read_n(&mut s, 10)[1], 0, "CONNECT succeeded");
    s
}

#[test]
fn connection_limit_is_shared_by_the_intake_threads_and_both_listeners() {
    // `warren proxy` accepts on one thread per core; the limit is one for
    // both listeners, whichever thread accepts.
    let p = proxy(&["--max-connections", "2"], &[]);
    let echo = echo_server();
    let mut held: Vec<TcpStream> = (0..2).map(|_| socks_connect_to(&p, echo)).collect();
    for s in &mut held {
        s.write_all(b"ping").expect("w");
        assert_eq!(read_n(s, 4), b"ping");
    }
    for _ in 0..6 {
        let mut s = socks_conn(&p);
        let _ = s.write_all(&[5, 1, 0]);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "a connection over the limit was served");
    }
    // The HTTP listener counts against the same limit.
    for _ in 0..3 {
        let mut s = TcpStream::connect(p.http).expect("connect http");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = s.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes());
        let mut b = [0u8; 64];
        let n = s.read(&mut b).unwrap_or(0);
        assert_eq!(
            n,
            0,
            "HTTP over the shared limit was served: {:?}",
            String::from_utf8_lossy(&b[..n])
        );
    }
    // A closed connection frees its slot (once the proxy has seen the
    // close: retried, bounded).
    drop(held.pop());
    let mut served = false;
    for _ in 0..100 {
        let mut s = socks_conn(&p);
        let _ = s.write_all(&[5, 1, 0]);
        let mut b = [0u8; 2];
        if s.read_exact(&mut b).is_ok() {
            assert_eq!(b, [5, 0]);
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served, "no slot came free after a connection closed");
}

#[test]
fn sigterm_drains_live_relays_then_exits_zero() {
    let mut p = proxy(&[], &[]);
    let echo = echo_server();
    let mut s = socks_connect_to(&p, echo);
    s.write_all(b"one").expect("w");
    assert_eq!(read_n(&mut s, 3), b"one");
    let pid = nix::unistd::Pid::from_raw(p.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let stopping = || {
        p.log
            .lock()
            .map(|l| l.iter().any(|x| x.contains("draining live connections")))
            .unwrap_or(false)
    };
    let mut seen = false;
    for _ in 0..200 {
        if stopping() {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen, "the proxy did not log that it is stopping");
    // The live relay still works while the proxy drains.
    s.write_all(b"two").expect("w");
    assert_eq!(read_n(&mut s, 3), b"two");
    assert!(
        p.child.try_wait().expect("try_wait").is_none(),
        "exited with a live connection"
    );
    drop(s);
    // Then it exits by itself, successfully.
    let mut status = None;
    for _ in 0..200 {
        status = p.child.try_wait().expect("try_wait");
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = status.expect("the proxy exits once its last connection closed");
    assert!(status.success(), "exit status {status}");
}
