//! The exit side of warren's TLS transports (`warren server --mode tls|tls-mux`).
//!
//! Every connection gets a TLS 1.3 handshake and must then send an HTTP/1.1
//! request head carrying a valid token, both within the handshake timeout
//! and under a cap on handshakes in progress. Anything that fails (garbage,
//! no token, wrong secret, replay, stale token, the other mode's token) is
//! answered exactly as the decoy web server would answer that request, and
//! logged; it costs the server no more than that.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::auth::{AuthKey, Mode, ReplayGuard};
use super::http::{self, Decoy, MAX_HEAD};
use super::io::{Duplex, Prefixed, read_until};
use super::wire::{self, Command, Status, Target};

/// Server settings.
#[derive(Debug)]
pub struct ServerSettings {
    /// Which transport this server speaks.
    pub mode: Mode,
    /// TLS configuration (certificate and key).
    pub tls: Arc<rustls::ServerConfig>,
    /// Key derived from the shared secret.
    pub key: AuthKey,
    /// What unauthenticated visitors see.
    pub decoy: Decoy,
    /// Time for TLS handshake plus request head.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; more are closed at once.
    pub max_pending_handshakes: usize,
    /// Handshakes in progress at once from one source (an IPv4 address,
    /// or an IPv6 /64: one host's usual share), so one source cannot take
    /// every slot and lock everyone else out; more are closed at once.
    pub max_pending_per_source: usize,
    /// Streams one tls-mux session may have open.
    pub max_streams_per_session: usize,
    /// Time to connect to a target.
    pub connect_timeout: Duration,
    /// A UDP relay with no traffic for this long ends.
    pub udp_idle: Duration,
    /// Allow targets on loopback, link-local or unspecified addresses
    /// (the server's own private services). Off by default.
    pub allow_local_targets: bool,
}

impl ServerSettings {
    /// Settings with the defaults for everything but the essentials.
    pub fn new(mode: Mode, tls: Arc<rustls::ServerConfig>, key: AuthKey) -> Self {
        ServerSettings {
            mode,
            tls,
            key,
            decoy: Decoy::default(),
            handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 256,
            max_pending_per_source: 32,
            max_streams_per_session: 256,
            connect_timeout: Duration::from_secs(10),
            udp_idle: Duration::from_secs(120),
            allow_local_targets: false,
        }
    }
}

/// Serves until `stop` is cancelled; then stops accepting and waits for the
/// streams in progress.
pub async fn serve(listener: TcpListener, settings: Arc<ServerSettings>, stop: CancellationToken) {
    let pending = Arc::new(Semaphore::new(settings.max_pending_handshakes));
    let by_source = PendingBySource::default();
    let replay = Arc::new(Mutex::new(ReplayGuard::default()));
    let tracker = TaskTracker::new();
    loop {
        let (sock, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(source) = by_source.take(peer.ip(), settings.max_pending_per_source) else {
            warn!(%peer, "too many handshakes in progress from this source; closing");
            continue;
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            warn!(%peer, "too many handshakes in progress; closing");
            continue;
        };
        let permit = (permit, source);
        let (settings, replay, stop) = (settings.clone(), replay.clone(), stop.clone());
        tracker.spawn(async move {
            let _ = sock.set_nodelay(true);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = handle(sock, peer, settings, replay, permit) => {}
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Handshakes in progress per source (see
/// [`ServerSettings::max_pending_per_source`]).
#[derive(Debug, Default, Clone)]
struct PendingBySource(Arc<Mutex<std::collections::HashMap<IpAddr, usize>>>);

/// One handshake in progress from `source`; counted until dropped.
#[derive(Debug)]
struct SourceSlot {
    table: PendingBySource,
    source: IpAddr,
}

impl PendingBySource {
    /// A slot for a handshake from `ip`, unless its source has `limit`.
    fn take(&self, ip: IpAddr, limit: usize) -> Option<SourceSlot> {
        let source = source_key(ip);
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.entry(source).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            table: self.clone(),
            source,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut t = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.source);
            }
        }
    }
}

/// What one source is counted as: an IPv4 address (IPv4-mapped IPv6
/// included), or an IPv6 address's /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn handle(
    sock: TcpStream,
    peer: SocketAddr,
    s: Arc<ServerSettings>,
    replay: Arc<Mutex<ReplayGuard>>,
    permit: (tokio::sync::OwnedSemaphorePermit, SourceSlot),
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(s.tls.clone());
    let opened = tokio::time::timeout(s.handshake_timeout, async {
        // rustls reads at most 4 KiB at a time: buffer below it (see client).
        let mut tls = acceptor
            .accept(tokio::io::BufReader::with_capacity(64 * 1024, sock))
            .await?;
        let head = read_until(&mut tls, MAX_HEAD, http::parse_head).await?;
        Ok::<_, std::io::Error>((tls, head))
    })
    .await;
    let (mut tls, head) = match opened {
        Err(_) => {
            info!(%peer, "handshake timed out");
            return;
        }
        Ok(Err(e)) => {
            info!(%peer, error = %e, "TLS handshake or request failed");
            return;
        }
        Ok(Ok(x)) => x,
    };
    let (head, rest) = match head {
        Err(e) => {
            info!(%peer, error = ?e, "not an HTTP request; answering as the decoy");
            let _ = tls.write_all(&s.decoy.respond(None)).await;
            let _ = tls.shutdown().await;
            return;
        }
        Ok(x) => x,
    };
    let verdict = match &head.token {
        None => Err(None),
        Some(t) => {
            let mut guard = replay.lock().unwrap_or_else(|p| p.into_inner());
            s.key
                .verify(t, unix_now(), s.mode, &mut guard)
                .map_err(Some)
        }
    };
    if let Err(why) = verdict {
        match why {
            Some(e) => warn!(%peer, error = %e, "authentication failed; answering as the decoy"),
            None => debug!(%peer, path = head.path, "plain visitor; answering as the decoy"),
        }
        let _ = tls.write_all(&s.decoy.respond(Some(&head))).await;
        let _ = tls.shutdown().await;
        return;
    }
    drop(permit);
    if tls.write_all(http::ACCEPTED).await.is_err() {
        return;
    }
    debug!(%peer, mode = ?s.mode, "client authenticated");
    let io = Prefixed::new(rest, tls);
    match s.mode {
        Mode::Tls => serve_stream(io, peer, &s).await,
        Mode::TlsMux => serve_mux(io, peer, s).await,
    }
}

/// Serves one stream: its request, then TCP relay, UDP relay or a ping.
async fn serve_stream<S: Duplex>(mut io: S, peer: SocketAddr, s: &ServerSettings) {
    let req = match read_until(&mut io, 1024, wire::parse_request).await {
        Ok(Ok(((cmd, target), rest))) => (cmd, target, rest),
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "bad stream request");
            let _ = io
                .write_all(&wire::reply(Status::Failure, &unspecified()))
                .await;
            return;
        }
        Err(e) => {
            debug!(%peer, error = %e, "stream closed before its request");
            return;
        }
    };
    let (cmd, target, rest) = req;
    let mut io = Prefixed::new(rest, io);
    match cmd {
        Command::Ping => {
            let _ = io.write_all(&wire::reply(Status::Ok, &unspecified())).await;
        }
        Command::Connect => relay_tcp(io, peer, target, s).await,
        Command::Udp => relay_udp(io, peer, s).await,
    }
}

fn unspecified() -> Target {
    Target::Addr(SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Loopback, unspecified or link-local (cloud metadata at 169.254.169.254),
/// also written as an IPv4-mapped IPv6 address (`::ffff:169.254.169.254`
/// reaches the same host).
fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_loopback() || a.is_unspecified() || a.is_link_local(),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(m) => is_local(IpAddr::V4(m)),
            None => a.is_loopback() || a.is_unspecified() || a.is_unicast_link_local(),
        },
    }
}

/// Resolves a target to addresses the server may use.
async fn resolve(target: &Target, s: &ServerSettings) -> Result<Vec<SocketAddr>, Status> {
    let addrs: Vec<SocketAddr> = match target {
        Target::Addr(a) => vec![*a],
        Target::Domain(d, p) => tokio::net::lookup_host((d.as_str(), *p))
            .await
            .map_err(|_| Status::HostUnreachable)?
            .collect(),
    };
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| s.allow_local_targets || !is_local(a.ip()))
        .collect();
    if allowed.is_empty() {
        return Err(Status::NotAllowed);
    }
    Ok(allowed)
}

async fn relay_tcp<S: Duplex>(mut io: S, peer: SocketAddr, target: Target, s: &ServerSettings) {
    let addrs = match resolve(&target, s).await {
        Ok(a) => a,
        Err(st) => {
            info!(%peer, %target, status = ?st, "connect refused");
            let _ = io.write_all(&wire::reply(st, &unspecified())).await;
            return;
        }
    };
    let mut last = Status::HostUnreachable;
    let mut out = None;
    for a in addrs {
        match tokio::time::timeout(s.connect_timeout, TcpStream::connect(a)).await {
            Ok(Ok(c)) => {
                out = Some(c);
                break;
            }
            Ok(Err(e)) => last = Status::from_io(&e),
            Err(_) => last = Status::TimedOut,
        }
    }
    let Some(mut out) = out else {
        info!(%peer, %target, status = ?last, "connect failed");
        let _ = io.write_all(&wire::reply(last, &unspecified())).await;
        return;
    };
    let _ = out.set_nodelay(true);
    let bound = out
        .local_addr()
        .map(Target::Addr)
        .unwrap_or_else(|_| unspecified());
    if io
        .write_all(&wire::reply(Status::Ok, &bound))
        .await
        .is_err()
    {
        return;
    }
    match tokio::io::copy_bidirectional_with_sizes(&mut io, &mut out, 64 * 1024, 64 * 1024).await {
        Ok((up, down)) => debug!(%peer, %target, up, down, "stream done"),
        Err(e) => debug!(%peer, %target, error = %e, "stream ended"),
    }
}

async fn relay_udp<S: Duplex>(io: S, peer: SocketAddr, s: &ServerSettings) {
    let sock = match UdpSocket::bind(SocketAddr::from(([0u16; 8], 0))).await {
        Ok(u) => u,
        Err(_) => match UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).await {
            Ok(u) => u,
            Err(e) => {
                warn!(%peer, error = %e, "cannot open a UDP socket");
                let mut io = io;
                let _ = io
                    .write_all(&wire::reply(Status::Failure, &unspecified()))
                    .await;
                return;
            }
        },
    };
    let bound = sock
        .local_addr()
        .map(Target::Addr)
        .unwrap_or_else(|_| unspecified());
    let mut io = io;
    if io
        .write_all(&wire::reply(Status::Ok, &bound))
        .await
        .is_err()
    {
        return;
    }
    let mut frames = crate::io::UdpFrames::new(io);
    let mut dgram = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            r = frames.recv() => {
                let (target, payload) = match r {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        warn!(%peer, error = %e, "bad UDP frame; ending relay");
                        return;
                    }
                    Err(_) => break,
                };
                match resolve(&target, s).await {
                    Ok(addrs) => {
                        let dst = to_socket_family(addrs[0]);
                        if let Err(e) = sock.send_to(&payload, dst).await {
                            debug!(%peer, %target, error = %e, "UDP send failed");
                        }
                    }
                    Err(st) => debug!(%peer, %target, status = ?st, "UDP target refused"),
                }
            }
            r = sock.recv_from(&mut dgram) => {
                let Ok((n, from)) = r else { break };
                match frames.send(&Target::Addr(unmap(from)), &dgram[..n]).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => continue,
                    Err(_) => break,
                }
            }
            _ = tokio::time::sleep(s.udp_idle) => {
                debug!(%peer, "UDP relay idle; ending");
                break;
            }
        }
    }
}

/// IPv4 destinations on the dual-stack socket go as v4-mapped addresses.
fn to_socket_family(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    }
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

async fn serve_mux<S: Duplex + 'static>(io: S, peer: SocketAddr, s: Arc<ServerSettings>) {
    let mut cfg = yamux::Config::default();
    cfg.set_max_num_streams(s.max_streams_per_session);
    let mut conn = yamux::Connection::new(io.compat(), cfg, yamux::Mode::Server);
    let streams = TaskTracker::new();
    loop {
        let next = futures::future::poll_fn(|cx| conn.poll_next_inbound(cx)).await;
        match next {
            Some(Ok(stream)) => {
                let s = s.clone();
                streams.spawn(async move { serve_stream(stream.compat(), peer, &s).await });
            }
            Some(Err(e)) => {
                debug!(%peer, error = %e, "mux session ended");
                break;
            }
            None => break,
        }
    }
    streams.close();
    streams.wait().await;
}

#[cfg(test)]
mod tests {
    use super::{PendingBySource, is_local, source_key};

    /// An IPv4 source and its IPv4-mapped spelling are one source; an
    /// IPv6 source counts by its /64.
    #[test]
    fn finding_8_pending_handshakes_are_counted_per_source() {
        let t = PendingBySource::default();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        let a = t.take(ip("198.18.0.7"), 2).expect("first");
        let _b = t.take(ip("::ffff:198.18.0.7"), 2).expect("second");
        assert!(t.take(ip("198.18.0.7"), 2).is_none(), "third refused");
        assert!(t.take(ip("198.18.0.8"), 2).is_some(), "another source");
        drop(a);
        assert!(t.take(ip("198.18.0.7"), 2).is_some(), "slot back");
        assert_eq!(source_key(ip("fd00:1:2:3:4:5:6:7")), ip("fd00:1:2:3::"));
        let _c = t.take(ip("fd00::1"), 1).expect("v6");
        assert!(t.take(ip("fd00::2"), 1).is_none(), "same /64");
        assert!(t.take(ip("fd00:0:0:1::1"), 1).is_some(), "another /64");
    }

    /// Issue 14, finding 8: the exit's local-address filter must catch
    /// IPv4-mapped IPv6 spellings of local addresses too.
    #[test]
    fn finding_8_local_filter_catches_ipv4_mapped_ipv6() {
        for local in [
            "127.0.0.1",
            "0.0.0.0",
            "169.254.169.254",
            "::1",
            "::",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:0.0.0.0",
        ] {
            assert!(is_local(local.parse().expect("ip")), "{local}");
        }
        for remote in ["198.18.0.1", "::ffff:198.18.0.1", "fd00::1", "2001:db8::1"] {
            assert!(!is_local(remote.parse().expect("ip")), "{remote}");
        }
    }
}
