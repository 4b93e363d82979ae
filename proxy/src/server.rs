//! The proxy's async shell: listeners, per-connection tasks, limits, the
//! relay, graceful shutdown. The protocol work is in [`super::socks5`] and
//! [`super::http`]; where connections go is the [`Egress`]'s business
//! (direct here; tunnels plug in behind the same trait).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::http::{self, HttpError};
use super::io::{Prefixed, UdpFrames, read_until};
use super::socks5::{self, Cmd, Reply};
use super::target::Target;

/// A connection an egress made: a TCP socket (relayed with splice), or a
/// stream of a transport (relayed by copying).
pub enum Outbound {
    /// A plain TCP connection.
    Tcp(TcpStream),
    /// A stream of a tunnel transport.
    Stream(super::io::BoxStream),
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outbound::Tcp(t) => f.debug_tuple("Tcp").field(t).finish(),
            Outbound::Stream(_) => f.write_str("Stream"),
        }
    }
}

impl From<TcpStream> for Outbound {
    fn from(t: TcpStream) -> Self {
        Outbound::Tcp(t)
    }
}

impl tokio::io::AsyncRead for Outbound {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Outbound::Tcp(t) => std::pin::Pin::new(t).poll_read(cx, buf),
            Outbound::Stream(st) => std::pin::Pin::new(st).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Outbound {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Outbound::Tcp(t) => std::pin::Pin::new(t).poll_write(cx, b),
            Outbound::Stream(st) => std::pin::Pin::new(st).poll_write(cx, b),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Outbound::Tcp(t) => std::pin::Pin::new(t).poll_flush(cx),
            Outbound::Stream(st) => std::pin::Pin::new(st).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Outbound::Tcp(t) => std::pin::Pin::new(t).poll_shutdown(cx),
            Outbound::Stream(st) => std::pin::Pin::new(st).poll_shutdown(cx),
        }
    }
}

impl Outbound {
    fn prepare(&self) {
        if let Outbound::Tcp(t) = self {
            let _ = t.set_nodelay(true);
        }
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Outbound::Tcp(t) => t.local_addr().ok(),
            Outbound::Stream(_) => None,
        }
    }
}

/// A datagram channel an egress opened for a SOCKS5 UDP association
/// (frames of [`super::target::udp_frame`] over a stream).
pub type UdpTunnel = super::io::BoxStream;

/// Where proxied connections go.
pub trait Egress: Send + Sync + 'static {
    /// Opens a connection to `target` for a request the rules sent to
    /// `action` ([`crate::rules::Action::Proxy`] or `Direct`).
    fn connect(
        &self,
        target: &Target,
        action: crate::rules::Action,
    ) -> impl std::future::Future<Output = std::io::Result<Outbound>> + Send;

    /// A tunnel for UDP associations, if this egress has one (otherwise
    /// datagrams leave from local sockets).
    fn udp_tunnel(
        &self,
    ) -> impl std::future::Future<Output = Option<std::io::Result<UdpTunnel>>> + Send {
        std::future::ready(None)
    }
}

/// Straight out of this host.
#[derive(Debug, Clone)]
pub struct Direct {
    /// Connect timeout.
    pub timeout: Duration,
}

impl Egress for Direct {
    async fn connect(&self, target: &Target, _: crate::rules::Action) -> std::io::Result<Outbound> {
        self.tcp(target).await.map(Outbound::Tcp)
    }
}

impl Direct {
    /// A TCP connection to `target` from this host, within the timeout.
    pub async fn tcp(&self, target: &Target) -> std::io::Result<TcpStream> {
        let fut = async {
            match target {
                Target::Addr(a) => TcpStream::connect(a).await,
                Target::Domain(d, p) => TcpStream::connect((d.as_str(), *p)).await,
            }
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }
}

/// Who may use a listener.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Client networks allowed without credentials.
    pub allow: Vec<(IpAddr, u8)>,
    /// Username and password required from everyone else (SOCKS5 only).
    pub credentials: Option<(String, String)>,
}

impl Access {
    fn allows_addr(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.allow.iter().any(|&(net, len)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                u32::from(n) & m == u32::from(a) & m
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                u128::from(n) & m == u128::from(a) & m
            }
            _ => false,
        })
    }
}

/// Proxy settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Access control.
    pub access: Access,
    /// Simultaneous connections.
    pub max_connections: usize,
    /// Time for a client to send its request.
    pub handshake_timeout: Duration,
    /// Time a relay may stay without traffic in either direction... (per
    /// direction read).
    pub idle_timeout: Duration,
    /// Routing rules. Only `block` changes anything while the egress is
    /// [`Direct`] (no upstream yet: `proxy` and `direct` both go direct).
    pub rules: crate::rules::SharedRules,
    /// Counters served to `warren status`.
    pub counters: Arc<super::status::Counters>,
    /// Log one line per finished connection (target `warren::access`).
    pub access_log: bool,
    /// A shared host-side UDP relay (namespace instances); otherwise each
    /// association binds its own.
    pub udp_relay: Option<Arc<super::udpmux::UdpMux>>,
    /// Resolver for UDP targets given by name (otherwise the system's).
    pub resolver: Option<crate::dns::Resolver>,
}

fn rule_host(t: &Target) -> crate::rules::Host<'_> {
    match t {
        Target::Addr(a) => crate::rules::Host::Ip(a.ip()),
        Target::Domain(d, _) => crate::rules::Host::Name(d),
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            access: Access::default(),
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            rules: crate::rules::SharedRules::default(),
            counters: Arc::default(),
            access_log: false,
            udp_relay: None,
            resolver: None,
        }
    }
}

/// The proxy's protocol on a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// SOCKS5.
    Socks5,
    /// HTTP proxy (CONNECT and absolute-form).
    Http,
}

/// Serves `listener` until `stop`; then waits for live connections.
pub async fn serve<E: Egress>(
    listener: TcpListener,
    protocol: Protocol,
    settings: Arc<Settings>,
    egress: Arc<E>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    serve_with_slots(listener, protocol, settings, egress, slots, stop).await
}

/// [`serve`] with a connection limit shared with other listeners or
/// threads (`slots` holds one permit per allowed connection).
pub async fn serve_with_slots<E: Egress>(
    listener: TcpListener,
    protocol: Protocol,
    settings: Arc<Settings>,
    egress: Arc<E>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let tracker = TaskTracker::new();
    // Accepted sockets inherit TCP_NODELAY from the listener (Linux): one
    // setsockopt here instead of one per connection.
    let inherited =
        nix::sys::socket::setsockopt(&listener, nix::sys::socket::sockopt::TcpNoDelay, &true)
            .is_ok();
    loop {
        let (sock, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            settings.counters.refused.fetch_add(1, Relaxed);
            warn!(%peer, "connection limit reached; closing");
            continue;
        };
        let (settings, egress) = (settings.clone(), egress.clone());
        tracker.spawn(async move {
            if !inherited {
                let _ = sock.set_nodelay(true);
            }
            let _active = super::status::ActiveGuard::new(&settings.counters);
            let r = match protocol {
                Protocol::Socks5 => socks(sock, peer, &settings, &*egress).await,
                Protocol::Http => http_proxy(sock, peer, &settings, &*egress).await,
            };
            if let Err(e) = r {
                debug!(%peer, error = %e, "connection ended");
            }
            drop(slot);
        });
    }
    tracker.close();
    tracker.wait().await;
}

type Res = std::io::Result<()>;

/// Compares without an early exit (the length is not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

async fn socks<E: Egress>(mut sock: TcpStream, peer: SocketAddr, s: &Settings, egress: &E) -> Res {
    let trusted = s.access.allows_addr(peer.ip());
    let need_auth = !trusted;
    if need_auth && s.access.credentials.is_none() {
        s.counters.refused.fetch_add(1, Relaxed);
        warn!(%peer, "client not in the allow list and no credentials configured; closing");
        return Ok(());
    }
    let handshake = async {
        let (methods, rest) = match read_until(&mut sock, 300, socks5::parse_greeting).await? {
            Ok(x) => x,
            Err(e) => {
                info!(%peer, error = %e, "bad SOCKS greeting");
                return Ok::<_, std::io::Error>(None);
            }
        };
        let method = socks5::choose_method(&methods, need_auth);
        sock.write_all(&[5, method]).await?;
        if method == socks5::NO_ACCEPTABLE {
            info!(%peer, "no acceptable authentication method");
            return Ok(None);
        }
        let mut rest = rest;
        if method == socks5::USER_PASS {
            let mut io = Prefixed::new(rest, &mut sock);
            let ((user, pass), after) =
                match read_until(&mut io, 600, socks5::parse_user_pass).await? {
                    Ok(x) => x,
                    Err(e) => {
                        info!(%peer, error = %e, "bad authentication request");
                        return Ok(None);
                    }
                };
            let ok = s
                .access
                .credentials
                .as_ref()
                .is_some_and(|(u, p)| ct_eq(u.as_bytes(), &user) & ct_eq(p.as_bytes(), &pass));
            io.write_all(&[1, if ok { 0 } else { 1 }]).await?;
            if !ok {
                warn!(%peer, "authentication failed");
                return Ok(None);
            }
            rest = after;
        }
        let mut io = Prefixed::new(rest, &mut sock);
        match read_until(&mut io, 300, socks5::parse_request).await? {
            Ok(((cmd, target), rest)) => Ok(Some((cmd, target, rest))),
            Err(e) => {
                info!(%peer, error = %e, "bad SOCKS request");
                if let Some(code) = e.reply() {
                    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
                    io.write_all(&socks5::reply(code, unspecified)).await?;
                }
                Ok(None)
            }
        }
    };
    let Some((cmd, target, rest)) = tokio::time::timeout(s.handshake_timeout, handshake)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??
    else {
        return Ok(());
    };
    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
    match cmd {
        Cmd::Bind => {
            sock.write_all(&socks5::reply(Reply::CommandNotSupported, unspecified))
                .await
        }
        Cmd::Connect => {
            let d = s.rules.get().decide(rule_host(&target));
            if d.action == crate::rules::Action::Block {
                s.counters.blocked.fetch_add(1, Relaxed);
                info!(%peer, %target, rule = ?d.rule, "blocked by rule");
                return sock
                    .write_all(&socks5::reply(Reply::NotAllowed, unspecified))
                    .await;
            }
            let out = match egress.connect(&target, d.action).await {
                Ok(o) => o,
                Err(e) => {
                    info!(%peer, %target, error = %e, "connect failed");
                    return sock
                        .write_all(&socks5::reply(Reply::from_io(&e), unspecified))
                        .await;
                }
            };
            out.prepare();
            let bound = out.local_addr().unwrap_or(unspecified);
            sock.write_all(&socks5::reply(Reply::Succeeded, bound))
                .await?;
            relay(sock, rest, out, peer, &target, d, s).await
        }
        Cmd::UdpAssociate => udp_associate(sock, peer, &target, s, egress).await,
    }
}

/// Relays both ways until both sides are done (half-close propagated),
/// with splice(2): the bytes never enter user space. `early` is what the
/// client sent after its request, already read.
async fn relay(
    mut client: TcpStream,
    early: Vec<u8>,
    mut out: Outbound,
    peer: SocketAddr,
    target: &Target,
    decision: crate::rules::Decision,
    s: &Settings,
) -> Res {
    let started = std::time::Instant::now();
    if !early.is_empty() {
        out.write_all(&early).await?;
        s.counters.bytes_up.fetch_add(early.len() as u64, Relaxed);
    }
    let r = match &mut out {
        Outbound::Tcp(t) => super::splice::relay(&client, t, s.idle_timeout).await,
        Outbound::Stream(st) => tokio::io::copy_bidirectional(&mut client, st).await,
    };
    let (up, down, end) = match &r {
        Ok((u, d)) => (*u, *d, "closed".to_string()),
        Err(e) => (0, 0, e.to_string()),
    };
    if s.access_log {
        info!(
            target: "warren::access",
            client = %peer,
            %target,
            rule = decision.rule.map_or("default".to_string(), |l| format!("line {l}")),
            action = ?decision.action,
            bytes_up = up + early.len() as u64,
            bytes_down = down,
            duration_ms = started.elapsed().as_millis() as u64,
            end = %end,
            "connection"
        );
    }
    let (up, down) = r?;
    s.counters.bytes_up.fetch_add(up, Relaxed);
    s.counters.bytes_down.fetch_add(down, Relaxed);
    debug!(%peer, %target, up, down, "relay done");
    Ok(())
}

/// The client-facing side of a UDP association: a socket of its own, or
/// the instance's shared host-side relay.
enum RelayEnd {
    Own(UdpSocket),
    Shared(super::udpmux::Association),
}

impl RelayEnd {
    async fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<(Vec<u8>, SocketAddr)> {
        match self {
            RelayEnd::Own(s) => {
                let (n, from) = s.recv_from(buf).await?;
                Ok((buf[..n].to_vec(), from))
            }
            RelayEnd::Shared(a) => a
                .recv()
                .await
                .ok_or_else(|| std::io::Error::other("UDP relay closed")),
        }
    }

    async fn send_to(&self, b: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        match self {
            RelayEnd::Own(s) => s.send_to(b, to).await,
            RelayEnd::Shared(a) => a.send_to(b, to).await,
        }
    }
}

fn unmap_v4(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), v6.port())),
        v4 => v4,
    }
}

/// UDP ASSOCIATE: datagrams from the client (the first source address seen
/// from its host, or the one it announced) go to their targets, answers
/// come back with the SOCKS header. The relay is a socket of its own on
/// the control connection's address, or the instance's shared relay. The
/// association ends with the TCP control connection.
async fn udp_associate<E: Egress>(
    mut ctl: TcpStream,
    peer: SocketAddr,
    announced: &Target,
    s: &Settings,
    egress: &E,
) -> Res {
    let local_ip = ctl.local_addr()?.ip();
    let announced = match announced {
        Target::Addr(a) if !a.ip().is_unspecified() => Some(*a),
        _ => None,
    };
    let (mut relay, relay_addr) = match &s.udp_relay {
        Some(mux) => (
            RelayEnd::Shared(mux.register(peer.ip(), announced)),
            mux.local_addr()?,
        ),
        None => {
            let sock = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?;
            let a = sock.local_addr()?;
            (RelayEnd::Own(sock), a)
        }
    };
    // Outbound: an IPv6 socket reaches both families where IPv6 exists.
    let out = match UdpSocket::bind(SocketAddr::new(IpAddr::from([0u16; 8]), 0)).await {
        Ok(o) => o,
        Err(_) => UdpSocket::bind(SocketAddr::new(IpAddr::from([0u8; 4]), 0)).await?,
    };
    let out_v6 = out.local_addr()?.is_ipv6();
    ctl.write_all(&socks5::reply(Reply::Succeeded, relay_addr))
        .await?;
    let mut client: Option<SocketAddr> = None;
    let (mut inb, mut outb) = (vec![0u8; 65_536], vec![0u8; 65_536]);
    let mut ctl_buf = [0u8; 64];
    // Datagrams the rules send to the egress's tunnel (if it has one) go
    // there as frames, opened on first use.
    let mut tunnel: Option<UdpFrames<UdpTunnel>> = None;
    let mut tunnel_failed = false;
    loop {
        tokio::select! {
            r = async { match tunnel.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {
                match r {
                    Ok((from, payload)) => {
                        let from = match from {
                            Target::Addr(a) => a,
                            Target::Domain(..) => SocketAddr::from(([0, 0, 0, 0], 0)),
                        };
                        if let Some(c) = client {
                            s.counters.bytes_down.fetch_add(payload.len() as u64, Relaxed);
                            let _ = relay.send_to(&socks5::udp_datagram(from, &payload), c).await;
                        }
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "UDP tunnel closed");
                        tunnel = None;
                    }
                }
            }
            r = ctl.read(&mut ctl_buf) => {
                if matches!(r, Ok(0) | Err(_)) {
                    debug!(%peer, "UDP association ended with its control connection");
                    return Ok(());
                }
            }
            r = relay.recv(&mut inb) => {
                let (d, from) = r?;
                // Only the client that owns the association (same host).
                let from = unmap_v4(from);
                if from.ip() != peer.ip() && !(from.ip().is_loopback() && peer.ip().is_loopback()) {
                    continue;
                }
                if *client.get_or_insert(from) != from {
                    continue;
                }
                let Ok((target, payload)) = socks5::parse_udp(&d) else {
                    debug!(%peer, "dropped a malformed or fragmented datagram");
                    continue;
                };
                let action = s.rules.get().decide(rule_host(&target)).action;
                if action == crate::rules::Action::Block {
                    s.counters.blocked.fetch_add(1, Relaxed);
                    continue;
                }
                if action == crate::rules::Action::Proxy && !tunnel_failed {
                    if tunnel.is_none() {
                        match egress.udp_tunnel().await {
                            Some(Ok(t)) => tunnel = Some(UdpFrames::new(t)),
                            Some(Err(e)) => {
                                info!(%peer, error = %e, "cannot open the UDP tunnel; dropping datagrams for it");
                                tunnel_failed = true;
                                continue;
                            }
                            None => tunnel_failed = true,
                        }
                    }
                    if let Some(t) = tunnel.as_mut() {
                        if t.send(&target, payload).await.is_ok() {
                            s.counters.bytes_up.fetch_add(payload.len() as u64, Relaxed);
                        }
                        continue;
                    }
                }
                let dst = match target {
                    Target::Addr(a) => Some(a),
                    Target::Domain(d, p) => match &s.resolver {
                        Some(r) => r.lookup(&d).await.ok().and_then(|v| v.first().map(|ip| SocketAddr::new(*ip, p))),
                        None => tokio::net::lookup_host((d.as_str(), p)).await.ok().and_then(|mut i| i.next()),
                    },
                };
                if let Some(dst) = dst {
                    let dst = match (out_v6, dst) {
                        (true, SocketAddr::V4(v4)) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
                        (_, d) => d,
                    };
                    if out.send_to(payload, dst).await.is_ok() {
                        s.counters.bytes_up.fetch_add(payload.len() as u64, Relaxed);
                    }
                }
            }
            r = out.recv_from(&mut outb) => {
                let (n, from) = r?;
                if let Some(c) = client {
                    s.counters.bytes_down.fetch_add(n as u64, Relaxed);
                    let _ = relay.send_to(&socks5::udp_datagram(unmap_v4(from), &outb[..n]), c).await;
                }
            }
        }
    }
}

async fn http_error(sock: &mut TcpStream, e: &HttpError) -> Res {
    let body = format!("{}\n", e.status());
    let msg = format!(
        "HTTP/1.1 {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        e.status(),
        body.len()
    );
    sock.write_all(msg.as_bytes()).await
}

async fn http_proxy<E: Egress>(
    mut sock: TcpStream,
    peer: SocketAddr,
    s: &Settings,
    egress: &E,
) -> Res {
    if !s.access.allows_addr(peer.ip()) {
        s.counters.refused.fetch_add(1, Relaxed);
        warn!(%peer, "client not in the allow list; closing");
        return Ok(());
    }
    let head = tokio::time::timeout(
        s.handshake_timeout,
        read_until(&mut sock, http::MAX_HEAD + 4, http::parse),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut));
    let (req, rest) = match head {
        Ok(Ok(Ok(x))) => x,
        Ok(Ok(Err(e))) => {
            info!(%peer, error = %e, "bad HTTP proxy request");
            return http_error(&mut sock, &e).await;
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            return http_error(&mut sock, &HttpError::TooLarge).await;
        }
        Ok(Err(e)) | Err(e) => return Err(e),
    };
    if req.method != "CONNECT" {
        return forward_http(sock, rest, req, peer, s, egress).await;
    }
    let d = s.rules.get().decide(rule_host(&req.target));
    if d.action == crate::rules::Action::Block {
        s.counters.blocked.fetch_add(1, Relaxed);
        info!(%peer, target = %req.target, rule = ?d.rule, "blocked by rule");
        return sock.write_all(&blocked_answer(false)).await;
    }
    let out = match egress.connect(&req.target, d.action).await {
        Ok(o) => o,
        Err(e) => {
            info!(%peer, target = %req.target, error = %e, "connect failed");
            return sock.write_all(&gateway_error(&e, false)).await;
        }
    };
    out.prepare();
    sock.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    relay(sock, rest, out, peer, &req.target, d, s).await
}

fn blocked_answer(keep: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 27\r\nConnection: {}\r\n\r\nblocked by a warren rule.\r\n",
        if keep { "keep-alive" } else { "close" }
    )
    .into_bytes()
}

fn gateway_error(e: &std::io::Error, keep: bool) -> Vec<u8> {
    let status = if e.kind() == std::io::ErrorKind::TimedOut {
        "504 Gateway Timeout"
    } else {
        "502 Bad Gateway"
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: {}\r\n\r\n",
        if keep { "keep-alive" } else { "close" }
    )
    .into_bytes()
}

/// Reads more bytes into `buf`; `Ok(false)` at end of stream.
async fn fill<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    idle: Duration,
) -> std::io::Result<bool> {
    // Into the spare capacity, not through a buffer on the stack: a 16 KiB
    // array held across this await made every connection's task (SOCKS5
    // ones too: the task is sized for its largest state) 16 KiB bigger.
    buf.reserve(16 * 1024);
    let n = tokio::time::timeout(idle, r.read_buf(buf))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(n > 0)
}

/// Copies one message body from `r` (with `pre` already read from it) to
/// `w`, as framed by `body`; bytes read past the body stay in `pre`.
async fn copy_body<R, W>(
    r: &mut R,
    pre: &mut Vec<u8>,
    w: &mut W,
    body: http::Body,
    idle: Duration,
) -> std::io::Result<u64>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let eof = || std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
    let mut total = 0u64;
    match body {
        http::Body::None => {}
        http::Body::Length(mut left) => loop {
            let take = (pre.len() as u64).min(left) as usize;
            w.write_all(&pre[..take]).await?;
            pre.drain(..take);
            total += take as u64;
            left -= take as u64;
            if left == 0 {
                break;
            }
            if !fill(r, pre, idle).await? {
                return Err(eof());
            }
        },
        http::Body::Chunked => {
            let mut sc = http::ChunkedScanner::default();
            loop {
                let used = sc.feed(pre).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                })?;
                w.write_all(&pre[..used]).await?;
                pre.drain(..used);
                total += used as u64;
                if sc.done() {
                    break;
                }
                if !fill(r, pre, idle).await? {
                    return Err(eof());
                }
            }
        }
        http::Body::UntilClose => loop {
            w.write_all(pre).await?;
            total += pre.len() as u64;
            pre.clear();
            if !fill(r, pre, idle).await? {
                break;
            }
        },
    }
    w.flush().await?;
    Ok(total)
}

/// Absolute-form requests, with keep-alive towards the client: each
/// request goes to its origin on a connection of its own (`Connection:
/// close` upstream), its body copied as framed (Content-Length or
/// chunked), the response forwarded with its framing; then the next
/// request on the same client connection (pipelined bytes included).
async fn forward_http<E: Egress>(
    mut sock: TcpStream,
    mut buf: Vec<u8>,
    mut req: http::ProxyRequest,
    peer: SocketAddr,
    s: &Settings,
    egress: &E,
) -> Res {
    loop {
        let started = std::time::Instant::now();
        let d = s.rules.get().decide(rule_host(&req.target));
        let keep_req = req.keep_alive();
        let body = match req.body() {
            Ok(b) => b,
            Err(e) => return http_error(&mut sock, &e).await,
        };
        if d.action == crate::rules::Action::Block {
            s.counters.blocked.fetch_add(1, Relaxed);
            info!(%peer, target = %req.target, rule = ?d.rule, "blocked by rule");
            // Drain the refused request's body to stay in step.
            copy_body(
                &mut sock,
                &mut buf,
                &mut tokio::io::sink(),
                body,
                s.idle_timeout,
            )
            .await?;
            sock.write_all(&blocked_answer(keep_req)).await?;
        } else {
            match egress.connect(&req.target, d.action).await {
                Err(e) => {
                    info!(%peer, target = %req.target, error = %e, "connect failed");
                    sock.write_all(&gateway_error(&e, false)).await?;
                    return Ok(());
                }
                Ok(mut out) => {
                    out.prepare();
                    out.write_all(&req.upstream_head()).await?;
                    let up = copy_body(&mut sock, &mut buf, &mut out, body, s.idle_timeout).await?;
                    let (down, keep) =
                        forward_response(&mut out, &mut sock, &req, keep_req, s).await?;
                    s.counters.bytes_up.fetch_add(up, Relaxed);
                    s.counters.bytes_down.fetch_add(down, Relaxed);
                    if s.access_log {
                        info!(
                            target: "warren::access",
                            client = %peer,
                            target = %req.target,
                            rule = d.rule.map_or("default".to_string(), |l| format!("line {l}")),
                            action = ?d.action,
                            bytes_up = up,
                            bytes_down = down,
                            duration_ms = started.elapsed().as_millis() as u64,
                            end = "response",
                            "request"
                        );
                    }
                    if !keep {
                        return Ok(());
                    }
                }
            }
        }
        if !keep_req {
            return Ok(());
        }
        // The next request on this connection.
        req = loop {
            match http::parse(&buf) {
                Ok(Some((next, n))) => {
                    buf.drain(..n);
                    break next;
                }
                Ok(None) => {}
                Err(e) => return http_error(&mut sock, &e).await,
            }
            match fill(&mut sock, &mut buf, s.idle_timeout).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return Ok(()),
            }
        };
        if req.method == "CONNECT" {
            return http_error(
                &mut sock,
                &HttpError::BadRequest("CONNECT after a forwarded request"),
            )
            .await;
        }
    }
}

/// Reads the origin's response and forwards it to the client; returns the
/// body bytes and whether the client connection can stay open.
async fn forward_response(
    out: &mut Outbound,
    sock: &mut TcpStream,
    req: &http::ProxyRequest,
    keep_req: bool,
    s: &Settings,
) -> std::io::Result<(u64, bool)> {
    let bad = |e: HttpError| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
    let mut rbuf = Vec::new();
    loop {
        let (head, n) = loop {
            match http::parse_response(&rbuf).map_err(bad)? {
                Some(x) => break x,
                None => {
                    if !fill(out, &mut rbuf, s.idle_timeout).await? {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
        };
        rbuf.drain(..n);
        if head.status == 101 {
            // An upgrade: from here on, bytes both ways as they are.
            sock.write_all(&head.client_head(true)).await?;
            return Ok((0, false));
        }
        if (100..200).contains(&head.status) {
            sock.write_all(&head.client_head(true)).await?;
            continue;
        }
        let body = head.body(&req.method).map_err(bad)?;
        let keep = keep_req && body != http::Body::UntilClose;
        sock.write_all(&head.client_head(keep)).await?;
        let down = copy_body(out, &mut rbuf, sock, body, s.idle_timeout).await?;
        return Ok((down, keep));
    }
}
