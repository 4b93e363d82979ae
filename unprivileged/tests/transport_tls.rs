//! warren's TLS transports end to end on loopback: a real rustls server and
//! client, a real TCP echo target and a real UDP echo target.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use warren::transport::auth::{AuthKey, Mode};
use warren::transport::client::{Client, ClientSettings, TransportError};
use warren::transport::http::Decoy;
use warren::transport::server::{ServerSettings, serve};
use warren::transport::tlsconf::{self, Trust};
use warren::transport::wire::{self, Command, Target};

struct Pki {
    cert: CertificateDer<'static>,
    key_pem: String,
}

fn pki() -> Pki {
    let (cert, key) =
        tlsconf::generate_self_signed(&["exit.warren.test".into()]).expect("generate");
    Pki {
        cert: CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert"),
        key_pem: key,
    }
}

struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start_server(mode: Mode, pki: &Pki, secret: &[u8], bind: Option<SocketAddr>) -> Server {
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).expect("key");
    let tls = tlsconf::server_config(vec![pki.cert.clone()], key).expect("server config");
    let mut s = ServerSettings::new(mode, tls, AuthKey::derive(secret));
    s.allow_local_targets = true;
    s.decoy = Decoy::with_page(b"<html>decoy</html>".to_vec());
    let listener = TcpListener::bind(bind.unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr")))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(listener, Arc::new(s), stop.clone()));
    Server { addr, stop, task }
}

impl Server {
    async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

fn client(mode: Mode, server: SocketAddr, trust: Trust, secret: &[u8]) -> Client {
    Client::new(
        mode,
        ClientSettings {
            server: server.to_string(),
            server_name: ServerName::try_from("exit.warren.test").expect("name"),
            tls: tlsconf::client_config(&trust).expect("client config"),
            key: Arc::new(AuthKey::derive(secret)),
            connect_timeout: Duration::from_secs(5),
        },
    )
}

async fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn udp_echo() -> SocketAddr {
    let u = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = u.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        for _ in 0..1000 {
            let Ok((n, from)) = u.recv_from(&mut buf).await else {
                break;
            };
            let _ = u.send_to(&buf[..n], from).await;
        }
    });
    addr
}

async fn echo_roundtrip(c: &Client, target: SocketAddr, msg: &[u8]) {
    let (mut s, _bound) = c
        .open(Command::Connect, &Target::Addr(target))
        .await
        .expect("open stream");
    s.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(back, msg);
}

#[tokio::test]
async fn tls_and_mux_carry_tcp_streams() {
    let pki = pki();
    let echo = tcp_echo().await;
    for mode in [Mode::Tls, Mode::TlsMux] {
        let srv = start_server(mode, &pki, b"s3cret", None).await;
        let c = client(mode, srv.addr, Trust::Ca(vec![pki.cert.clone()]), b"s3cret");
        for i in 0..5u8 {
            echo_roundtrip(&c, echo, &[i; 1000]).await;
        }
        // Concurrent streams (one session in mux mode).
        let c = Arc::new(c);
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                echo_roundtrip(&c, echo, &vec![i; 100_000]).await
            }));
        }
        for t in tasks {
            t.await.expect("stream task");
        }
        srv.stop().await;
    }
}

#[tokio::test]
async fn pinned_certificate_is_enforced() {
    let pki = pki();
    let other = pki_other();
    let echo = tcp_echo().await;
    let srv = start_server(Mode::Tls, &pki, b"k", None).await;
    let pin = tlsconf::parse_pin(&tlsconf::fingerprint(&pki.cert)).expect("pin");
    echo_roundtrip(
        &client(Mode::Tls, srv.addr, Trust::Pin(pin), b"k"),
        echo,
        b"hi",
    )
    .await;
    let wrong = tlsconf::parse_pin(&tlsconf::fingerprint(&other)).expect("pin");
    let err = client(Mode::Tls, srv.addr, Trust::Pin(wrong), b"k")
        .open(Command::Connect, &Target::Addr(echo))
        .await
        .err()
        .expect("wrong pin refused");
    assert!(matches!(err, TransportError::Tls(_)), "{err:?}");
    srv.stop().await;
}

fn pki_other() -> CertificateDer<'static> {
    let (cert, _) = tlsconf::generate_self_signed(&["exit.warren.test".into()]).expect("cert");
    CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")
}

/// Plain TLS connection to the server: sends `request`, returns everything
/// the server sends back until it closes.
async fn raw_exchange(pki: &Pki, server: SocketAddr, request: &[u8]) -> Vec<u8> {
    let cfg = tlsconf::client_config(&Trust::Ca(vec![pki.cert.clone()])).expect("cfg");
    let tcp = TcpStream::connect(server).await.expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("exit.warren.test").expect("name"), tcp)
        .await
        .expect("tls");
    tls.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn wrong_secret_gets_exactly_the_decoy_of_a_plain_https_get() {
    let pki = pki();
    for mode in [Mode::Tls, Mode::TlsMux] {
        let srv = start_server(mode, &pki, b"right", None).await;
        let plain = raw_exchange(
            &pki,
            srv.addr,
            b"GET / HTTP/1.1\r\nHost: exit.warren.test\r\nUser-Agent: curl/7.88\r\nAccept: */*\r\n\r\n",
        )
        .await;
        assert!(plain.starts_with(b"HTTP/1.1 200 OK"), "{plain:?}");
        assert!(plain.ends_with(b"<html>decoy</html>"));
        // A real client with the wrong secret.
        let wrong_key = AuthKey::derive(b"wrong");
        let token = wrong_key.token(now(), [5; 16], mode);
        let req = warren::transport::http::client_request("exit.warren.test", &token);
        let answer = raw_exchange(&pki, srv.addr, &req).await;
        assert_eq!(answer, plain, "{mode:?}: same bytes as the decoy");
        let err = client(mode, srv.addr, Trust::Ca(vec![pki.cert.clone()]), b"wrong")
            .open(Command::Connect, &Target::Addr(srv.addr))
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, TransportError::Rejected), "{err:?}");
        // Garbage instead of HTTP: an nginx-style 400, never a crash.
        let answer = raw_exchange(&pki, srv.addr, b"\x00\x01garbage\r\n\r\n").await;
        assert!(answer.starts_with(b"HTTP/1.1 400 Bad Request"));
        // And the server still serves real clients.
        let echo = tcp_echo().await;
        echo_roundtrip(
            &client(mode, srv.addr, Trust::Ca(vec![pki.cert.clone()]), b"right"),
            echo,
            b"still here",
        )
        .await;
        srv.stop().await;
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

#[tokio::test]
async fn replayed_token_gets_the_decoy() {
    let pki = pki();
    let srv = start_server(Mode::Tls, &pki, b"k", None).await;
    let echo = tcp_echo().await;
    let token = AuthKey::derive(b"k").token(now(), [42; 16], Mode::Tls);
    let mut req = warren::transport::http::client_request("exit.warren.test", &token);
    req.extend_from_slice(&wire::request(Command::Connect, &Target::Addr(echo)));
    let first = raw_exchange_keep(&pki, srv.addr, &req).await;
    assert!(first.starts_with(warren::transport::http::ACCEPTED));
    let second = raw_exchange(&pki, srv.addr, &req).await;
    assert!(
        second.starts_with(b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/html"),
        "replay answered as decoy: {:?}",
        String::from_utf8_lossy(&second)
    );
    srv.stop().await;
}

/// Like raw_exchange but reads only what arrives within a short time (the
/// accepted stream stays open).
async fn raw_exchange_keep(pki: &Pki, server: SocketAddr, request: &[u8]) -> Vec<u8> {
    let cfg = tlsconf::client_config(&Trust::Ca(vec![pki.cert.clone()])).expect("cfg");
    let tcp = TcpStream::connect(server).await.expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("exit.warren.test").expect("name"), tcp)
        .await
        .expect("tls");
    tls.write_all(request).await.expect("write");
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut out))
        .await
        .expect("answer")
        .expect("read");
    out.truncate(n);
    out
}

#[tokio::test]
async fn udp_relay_through_both_modes() {
    let pki = pki();
    let echo = udp_echo().await;
    for mode in [Mode::Tls, Mode::TlsMux] {
        let srv = start_server(mode, &pki, b"k", None).await;
        let c = client(mode, srv.addr, Trust::Ca(vec![pki.cert.clone()]), b"k");
        let (mut s, _) = c
            .open(
                Command::Udp,
                &Target::Addr(SocketAddr::from(([0, 0, 0, 0], 0))),
            )
            .await
            .expect("udp relay");
        for i in 0..3u8 {
            let frame = wire::udp_frame(&Target::Addr(echo), &[i; 512]).expect("frame");
            s.write_all(&frame).await.expect("send");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 2048];
            let (from, payload) = loop {
                if let Some(((t, p), _)) = wire::parse_udp_frame(&buf).expect("valid frame") {
                    break (t, p.to_vec());
                }
                let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
                    .await
                    .expect("reply in time")
                    .expect("read");
                assert!(n > 0, "relay closed");
                buf.extend_from_slice(&chunk[..n]);
            };
            assert_eq!(from, Target::Addr(echo));
            assert_eq!(payload, vec![i; 512]);
        }
        srv.stop().await;
    }
}

#[tokio::test]
async fn mux_client_reconnects_after_server_restart() {
    let pki = pki();
    let echo = tcp_echo().await;
    let srv = start_server(Mode::TlsMux, &pki, b"k", None).await;
    let addr = srv.addr;
    let c = client(Mode::TlsMux, addr, Trust::Ca(vec![pki.cert.clone()]), b"k");
    echo_roundtrip(&c, echo, b"before").await;
    srv.stop().await;
    // The old session is gone; new streams fail until the server is back...
    let srv = start_server(Mode::TlsMux, &pki, b"k", Some(addr)).await;
    // ...and then work again, through a new session, within the backoff.
    let mut ok = false;
    for _ in 0..100 {
        if let Ok((mut s, _)) = c.open(Command::Connect, &Target::Addr(echo)).await {
            s.write_all(b"after").await.expect("write");
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await.expect("read");
            assert_eq!(&b, b"after");
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "client reconnected after the server restart");
    srv.stop().await;
}

#[tokio::test]
async fn local_targets_are_refused_by_default() {
    let pki = pki();
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).expect("key");
    let tls = tlsconf::server_config(vec![pki.cert.clone()], key).expect("cfg");
    let s = ServerSettings::new(Mode::Tls, tls, AuthKey::derive(b"k"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(listener, Arc::new(s), stop.clone()));
    let echo = tcp_echo().await;
    let err = client(Mode::Tls, addr, Trust::Ca(vec![pki.cert.clone()]), b"k")
        .open(Command::Connect, &Target::Addr(echo))
        .await
        .err()
        .expect("loopback target refused");
    assert!(
        matches!(err, TransportError::Refused(wire::Status::NotAllowed)),
        "{err:?}"
    );
    stop.cancel();
    let _ = task.await;
}

/// A TCP connection to `server` from `source` (any 127/8 address is this
/// machine's).
async fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{source}:0").parse().expect("addr"))
        .expect("bind source");
    sock.connect(server).await.expect("connect")
}

/// Whether the server closed `c` (EOF or reset) within two seconds, long
/// before its handshake timeout.
async fn closed_at_once(c: &mut TcpStream) -> bool {
    let mut b = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), c.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Issue 14, finding 8: the default settings' per-source cap (32) on
/// handshakes in progress. One source holding connections open without a
/// handshake cannot take every slot: its next connection is closed at once,
/// while another source is served, and its own turn comes back when its
/// idle connections go.
#[tokio::test]
async fn finding_8_one_source_cannot_hold_every_pending_handshake() {
    let pki = pki();
    let srv = start_server(Mode::Tls, &pki, b"k", None).await;
    let mut idle = Vec::new();
    for _ in 0..32 {
        idle.push(connect_from("127.0.0.1", srv.addr).await);
    }
    // Each of those is being handshaken (the server has accepted it): one
    // more from the same source is refused.
    let mut refused = false;
    for _ in 0..50 {
        let mut extra = connect_from("127.0.0.1", srv.addr).await;
        if closed_at_once(&mut extra).await {
            refused = true;
            break;
        }
        idle.push(extra);
    }
    assert!(
        refused,
        "a 33rd pending handshake from one source is closed"
    );
    assert!(idle.len() < 40, "within a few of the cap: {}", idle.len());
    // Another source is served meanwhile.
    let cfg = tlsconf::client_config(&Trust::Ca(vec![pki.cert.clone()])).expect("cfg");
    let tcp = connect_from("127.0.0.2", srv.addr).await;
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("exit.warren.test").expect("name"), tcp)
        .await
        .expect("another source completes its handshake");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: exit.warren.test\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    assert!(out.starts_with(b"HTTP/1.1 200 OK"), "{out:?}");
    // Once the idle ones go, the source is served again.
    drop(idle);
    let mut back = false;
    for _ in 0..50 {
        let mut c = connect_from("127.0.0.1", srv.addr).await;
        if !closed_at_once(&mut c).await {
            back = true;
            break;
        }
    }
    assert!(back, "the source's slots come back");
    srv.stop().await;
}
