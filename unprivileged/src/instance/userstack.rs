//! A userspace TCP/IP stack (smoltcp) for rootless instances on machines
//! where the kernel's stack cannot be used: unprivileged user namespaces
//! are off, or `/dev/net/tun` is closed to the user.
//!
//! The WireGuard engine does not know the difference: it is handed one end
//! of a datagram socket pair instead of a TUN descriptor, and reads and
//! writes whole IP packets on it exactly as it would on a TUN. The other
//! end is this stack's device. Proxied connections, DNS queries, UDP
//! associations and forwards open sockets here instead of in a namespace.
//!
//! Memory is bounded: every TCP flow has fixed windows ([`TCP_BUFFER`] each
//! way, which is also the back-pressure: a full receive window stops the
//! far end, a full send buffer makes writers wait), at most [`MAX_TCP`]
//! flows and [`MAX_UDP`] UDP sockets exist at once: 32 MiB of TCP and
//! 8 MiB of UDP buffers at most, whatever the load (with the relays' own
//! 32 KiB per flow, the worker stays under ~50 MiB).
//!
//! One task drives the stack (on the worker's single runtime thread); the
//! sockets' reads and writes take its lock briefly and wake it.

use std::collections::HashSet;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tracing::{debug, warn};

/// Each TCP flow's receive window and send buffer.
pub const TCP_BUFFER: usize = 128 * 1024;
/// Most TCP sockets (flows and listeners) at once.
pub const MAX_TCP: usize = 128;
/// Most UDP sockets at once.
pub const MAX_UDP: usize = 64;
/// Datagrams queued per UDP socket and direction.
const UDP_SLOTS: usize = 32;
/// Payload bytes queued per UDP socket and direction.
const UDP_BYTES: usize = 64 * 1024;
/// A closed flow waiting for its FIN handshake is dropped after this.
const LINGER: Duration = Duration::from_secs(30);
/// Pending connections a reverse-forward listener accepts at once.
const BACKLOG: usize = 4;
/// Socket-pair buffer (the engine's side and ours).
const PAIR_BUFFER: usize = 4 << 20;

/// The engine's end and the stack's end of the packet pipe.
pub fn packet_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(io::Error::from)?;
    for fd in [&a, &b] {
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            let v = PAIR_BUFFER as libc::c_int;
            // SAFETY: setsockopt with a valid int option on our socket; an
            // unprivileged process gets at most the system maximum.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const v).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
    Ok((a, b))
}

/// The stack's device: whole IP packets on a datagram socket.
struct PacketDevice {
    fd: RawFd,
    mtu: usize,
    rx: Vec<u8>,
    tx: Vec<u8>,
    /// Packets may be waiting: false from a receive that found the pipe
    /// empty until the pipe is readable again (saves a receive system call
    /// per segment sent).
    rx_ready: bool,
}

struct Rx<'a>(&'a [u8]);
struct Tx<'a> {
    fd: RawFd,
    buf: &'a mut Vec<u8>,
}

impl RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.buf.resize(len, 0);
        let r = f(&mut self.buf[..len]);
        // SAFETY: send on our open socket from a buffer of `len` bytes.
        // A full pipe drops the packet, as a NIC would; TCP resends.
        unsafe {
            libc::send(
                self.fd,
                self.buf.as_ptr().cast(),
                len,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        r
    }
}

impl Device for PacketDevice {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if !self.rx_ready {
            return None;
        }
        // SAFETY: recv into our buffer of its full length.
        let n = unsafe {
            libc::recv(
                self.fd,
                self.rx.as_mut_ptr().cast(),
                self.rx.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
                self.rx_ready = false;
            }
            return None;
        }
        let PacketDevice { fd, rx, tx, .. } = self;
        Some((Rx(&rx[..n as usize]), Tx { fd: *fd, buf: tx }))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx {
            fd: self.fd,
            buf: &mut self.tx,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Packets arrive through WireGuard's authenticated encryption:
        // they cannot be corrupted on the way, so only sent ones get
        // checksums.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::Tx;
        caps.checksum.udp = Checksum::Tx;
        caps
    }
}

struct Inner {
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: PacketDevice,
    v4: Option<IpAddr>,
    v6: Option<IpAddr>,
    /// Closed TCP sockets finishing their FIN handshake, since when.
    closing: Vec<(SocketHandle, std::time::Instant)>,
    /// TCP sockets (flows and listeners) and their local ports.
    tcp: Vec<(SocketHandle, u16)>,
    /// Local ports of the UDP sockets.
    udp_ports: HashSet<u16>,
    next_port: u16,
}

impl Inner {
    /// Runs the stack until nothing is due right now; the time until it
    /// is due again.
    fn poll(&mut self) -> Duration {
        // smoltcp sends at most one segment per socket per poll: poll
        // while something is due (bounded, so other tasks get their turn).
        let mut next = Duration::from_secs(1);
        for _ in 0..256 {
            let now = smoltcp::time::Instant::now();
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            match self.iface.poll_delay(now, &self.sockets) {
                Some(d) if d == smoltcp::time::Duration::ZERO => next = Duration::ZERO,
                Some(d) => {
                    next = Duration::from_micros(d.total_micros());
                    break;
                }
                None => {
                    next = Duration::from_secs(1);
                    break;
                }
            }
        }
        self.reap();
        next
    }

    /// Removes closed flows whose FIN handshake ended (or took too long).
    fn reap(&mut self) {
        if self.closing.is_empty() {
            return;
        }
        let mut keep = Vec::with_capacity(self.closing.len());
        for (h, since) in std::mem::take(&mut self.closing) {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            match s.state() {
                tcp::State::Closed | tcp::State::TimeWait => self.remove_tcp(h),
                _ if since.elapsed() > LINGER => {
                    s.abort();
                    keep.push((h, since));
                }
                _ => keep.push((h, since)),
            }
        }
        self.closing = keep;
    }

    fn remove_tcp(&mut self, h: SocketHandle) {
        self.sockets.remove(h);
        if let Some(i) = self.tcp.iter().position(|(x, _)| *x == h) {
            self.tcp.swap_remove(i);
        }
    }

    fn local(&self, remote: IpAddr) -> io::Result<IpAddr> {
        match remote {
            IpAddr::V4(_) => self.v4,
            IpAddr::V6(_) => self.v6,
        }
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NetworkUnreachable,
                format!(
                    "the tunnel has no IPv{} address",
                    if remote.is_ipv4() { 4 } else { 6 }
                ),
            )
        })
    }

    fn free_port(&mut self, udp: bool) -> io::Result<u16> {
        for _ in 0..16_384 {
            let p = self.next_port;
            self.next_port = if p == u16::MAX { 49_152 } else { p + 1 };
            let used = if udp {
                self.udp_ports.contains(&p)
            } else {
                self.tcp.iter().any(|&(_, q)| q == p)
            };
            if !used {
                return Ok(p);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free port in the userspace stack",
        ))
    }

    fn new_tcp(&mut self) -> io::Result<tcp::Socket<'static>> {
        if self.tcp.len() >= MAX_TCP {
            return Err(io::Error::other(format!(
                "the userspace stack already carries {MAX_TCP} TCP flows (its memory bound)"
            )));
        }
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        s.set_nagle_enabled(false);
        s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(60)));
        Ok(s)
    }
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the driver: a socket has something to send, or read data
    /// that opens the window.
    wake: Notify,
    /// The stack's end of the packet pipe.
    _pipe: Arc<OwnedFd>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The stack; cheap to clone.
#[derive(Clone)]
pub struct UserStack(Arc<Shared>);

impl std::fmt::Debug for UserStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.0.lock();
        f.debug_struct("UserStack")
            .field("v4", &g.v4)
            .field("v6", &g.v6)
            .field("tcp", &g.tcp.len())
            .field("udp", &g.udp_ports.len())
            .finish()
    }
}

impl UserStack {
    /// A stack with the tunnel's `addresses` on the stack's end of the
    /// packet pipe (`pipe`), routing everything into it. Starts its driver
    /// task on the current runtime.
    pub fn start(pipe: OwnedFd, addresses: &[(IpAddr, u8)], mtu: u16) -> io::Result<UserStack> {
        let mut dev = PacketDevice {
            fd: pipe.as_raw_fd(),
            mtu: usize::from(mtu),
            rx: vec![0; usize::from(mtu).max(1280) + 64],
            tx: Vec::with_capacity(usize::from(mtu)),
            rx_ready: true,
        };
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = u64::from_ne_bytes(rand_bytes());
        let mut iface = Interface::new(config, &mut dev, smoltcp::time::Instant::now());
        let (mut v4, mut v6) = (None, None);
        iface.update_ip_addrs(|a| {
            for &(ip, len) in addresses {
                match ip {
                    IpAddr::V4(_) if v4.is_some() => continue,
                    IpAddr::V6(_) if v6.is_some() => continue,
                    IpAddr::V4(_) => v4 = Some(ip),
                    IpAddr::V6(_) => v6 = Some(ip),
                }
                let _ = a.push(IpCidr::new(IpAddress::from(ip), len));
            }
        });
        // Everything goes into the tunnel; with no link layer the
        // "gateway" is only a placeholder.
        if let Some(IpAddr::V4(a)) = v4 {
            let _ = iface.routes_mut().add_default_ipv4_route(a);
        }
        if let Some(IpAddr::V6(a)) = v6 {
            let _ = iface.routes_mut().add_default_ipv6_route(a);
        }
        let pipe = Arc::new(pipe);
        // SAFETY: the AsyncFd owns a clone of the Arc, so the descriptor
        // stays open and unchanged for the AsyncFd's whole life.
        let afd = unsafe {
            AsyncFd::register_with_interest(pipe.clone(), tokio::io::Interest::READABLE)?
        };
        let start_port = 49_152 + (u16::from_ne_bytes([rand_bytes()[0], rand_bytes()[1]]) % 16_000);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                iface,
                sockets: SocketSet::new(Vec::new()),
                dev,
                v4,
                v6,
                closing: Vec::new(),
                udp_ports: HashSet::new(),
                tcp: Vec::new(),
                next_port: start_port,
            }),
            wake: Notify::new(),
            _pipe: pipe,
        });
        tokio::spawn(drive(Arc::downgrade(&shared), afd));
        Ok(UserStack(shared))
    }

    /// Opens a TCP connection through the tunnel.
    pub async fn connect(&self, to: SocketAddr) -> io::Result<UserTcp> {
        let handle = {
            let mut g = self.0.lock();
            let local = g.local(to.ip())?;
            let mut s = g.new_tcp()?;
            let port = g.free_port(false)?;
            let Inner { iface, .. } = &mut *g;
            s.connect(iface.context(), to, SocketAddr::new(local, port))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")))?;
            let h = g.sockets.add(s);
            g.tcp.push((h, port));
            h
        };
        self.0.wake.notify_one();
        let conn = UserTcp {
            stack: self.0.clone(),
            handle,
        };
        poll_fn(|cx| {
            let mut g = self.0.lock();
            let s = g.sockets.get_mut::<tcp::Socket>(handle);
            match s.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    s.register_send_waker(cx.waker());
                    Poll::Pending
                }
                tcp::State::Closed => {
                    Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionRefused)))
                }
                _ => Poll::Ready(Ok(())),
            }
        })
        .await?;
        Ok(conn)
    }

    /// A UDP socket on a free port of the tunnel's addresses.
    pub fn udp(&self) -> io::Result<UserUdp> {
        let mut g = self.0.lock();
        if g.udp_ports.len() >= MAX_UDP {
            return Err(io::Error::other(format!(
                "the userspace stack already has {MAX_UDP} UDP sockets (its memory bound)"
            )));
        }
        let port = g.free_port(true)?;
        let buf = || {
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; UDP_SLOTS],
                vec![0; UDP_BYTES],
            )
        };
        let mut s = udp::Socket::new(buf(), buf());
        s.bind(port)
            .map_err(|e| io::Error::new(io::ErrorKind::AddrInUse, format!("{e:?}")))?;
        let handle = g.sockets.add(s);
        g.udp_ports.insert(port);
        Ok(UserUdp {
            stack: self.0.clone(),
            handle,
            port,
        })
    }

    /// Listens for TCP connections to `at` (an address of the tunnel, or
    /// unspecified for any of them).
    pub fn listen(&self, at: SocketAddr) -> io::Result<UserListener> {
        let mut l = UserListener {
            stack: self.0.clone(),
            at,
            backlog: Vec::new(),
        };
        l.fill()?;
        Ok(l)
    }
}

fn rand_bytes() -> [u8; 8] {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b
}

/// The driver: runs the stack whenever packets arrive, a socket asks, or
/// a timer is due. Ends when the stack is gone.
async fn drive(shared: std::sync::Weak<Shared>, afd: AsyncFd<Arc<OwnedFd>>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let delay = s.lock().poll();
        tokio::select! {
            r = afd.readable() => match r {
                // Cleared before the next poll drains the pipe, so a packet
                // arriving meanwhile sets it again.
                Ok(mut g) => {
                    g.clear_ready();
                    s.lock().dev.rx_ready = true;
                }
                Err(e) => {
                    warn!(error = %e, "userspace stack: packet pipe failed");
                    return;
                }
            },
            () = s.wake.notified() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// A TCP connection through the userspace stack.
pub struct UserTcp {
    stack: Arc<Shared>,
    handle: SocketHandle,
}

impl std::fmt::Debug for UserTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserTcp").finish_non_exhaustive()
    }
}

impl UserTcp {
    /// The far end's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        let g = self.stack.lock();
        let s = g.sockets.get::<tcp::Socket>(self.handle);
        s.remote_endpoint()
            .map(|e| SocketAddr::new(e.addr.into(), e.port))
    }
}

impl AsyncRead for UserTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut g = self.stack.lock();
        let s = g.sockets.get_mut::<tcp::Socket>(self.handle);
        if s.can_recv() {
            let n = s
                .recv_slice(buf.initialize_unfilled())
                .map_err(|e| io::Error::other(format!("{e:?}")))?;
            buf.advance(n);
            drop(g);
            // The window opened: let the stack tell the far end.
            self.stack.wake.notify_one();
            return Poll::Ready(Ok(()));
        }
        if !s.may_recv() {
            // FIN received, or the connection is gone: end of stream.
            return Poll::Ready(Ok(()));
        }
        s.register_recv_waker(cx.waker());
        Poll::Pending
    }
}

impl AsyncWrite for UserTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let mut g = self.stack.lock();
        let s = g.sockets.get_mut::<tcp::Socket>(self.handle);
        if !s.may_send() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if s.can_send() {
            let n = s
                .send_slice(b)
                .map_err(|e| io::Error::other(format!("{e:?}")))?;
            drop(g);
            self.stack.wake.notify_one();
            return Poll::Ready(Ok(n));
        }
        s.register_send_waker(cx.waker());
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stack
            .lock()
            .sockets
            .get_mut::<tcp::Socket>(self.handle)
            .close();
        self.stack.wake.notify_one();
        Poll::Ready(Ok(()))
    }
}

impl Drop for UserTcp {
    fn drop(&mut self) {
        let mut g = self.stack.lock();
        let s = g.sockets.get_mut::<tcp::Socket>(self.handle);
        if s.state() == tcp::State::Closed {
            g.remove_tcp(self.handle);
        } else {
            s.close();
            g.closing.push((self.handle, std::time::Instant::now()));
        }
        drop(g);
        self.stack.wake.notify_one();
    }
}

/// A UDP socket of the userspace stack.
pub struct UserUdp {
    stack: Arc<Shared>,
    handle: SocketHandle,
    port: u16,
}

impl std::fmt::Debug for UserUdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserUdp").field("port", &self.port).finish()
    }
}

impl UserUdp {
    /// Sends one datagram (waits while the socket's queue is full).
    pub async fn send_to(&self, b: &[u8], to: SocketAddr) -> io::Result<usize> {
        {
            let g = self.stack.lock();
            g.local(to.ip())?;
        }
        poll_fn(|cx| {
            let mut g = self.stack.lock();
            let s = g.sockets.get_mut::<udp::Socket>(self.handle);
            if !s.can_send() {
                s.register_send_waker(cx.waker());
                return Poll::Pending;
            }
            Poll::Ready(
                s.send_slice(b, IpEndpoint::from(to))
                    .map(|()| b.len())
                    .map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("datagram of {} bytes not sent: {e:?}", b.len()),
                        )
                    }),
            )
        })
        .await
        .inspect(|_| self.stack.wake.notify_one())
    }

    /// The next datagram and where it came from.
    pub async fn recv_from(&self, b: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        poll_fn(|cx| {
            let mut g = self.stack.lock();
            let s = g.sockets.get_mut::<udp::Socket>(self.handle);
            match s.recv_slice(b) {
                Ok((n, meta)) => Poll::Ready(Ok((
                    n,
                    SocketAddr::new(meta.endpoint.addr.into(), meta.endpoint.port),
                ))),
                Err(udp::RecvError::Truncated) => {
                    Poll::Ready(Err(io::Error::other("datagram larger than the buffer")))
                }
                Err(udp::RecvError::Exhausted) => {
                    s.register_recv_waker(cx.waker());
                    Poll::Pending
                }
            }
        })
        .await
    }
}

impl Drop for UserUdp {
    fn drop(&mut self) {
        let mut g = self.stack.lock();
        g.sockets.remove(self.handle);
        g.udp_ports.remove(&self.port);
    }
}

/// A TCP listener of the userspace stack (reverse forwards).
pub struct UserListener {
    stack: Arc<Shared>,
    at: SocketAddr,
    backlog: Vec<SocketHandle>,
}

impl std::fmt::Debug for UserListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserListener")
            .field("at", &self.at)
            .finish()
    }
}

impl UserListener {
    /// Where its sockets listen (no address: all of the stack's).
    fn endpoint(&self) -> IpListenEndpoint {
        IpListenEndpoint {
            addr: (!self.at.ip().is_unspecified()).then(|| self.at.ip().into()),
            port: self.at.port(),
        }
    }

    /// Keeps [`BACKLOG`] sockets listening.
    fn fill(&mut self) -> io::Result<()> {
        let mut g = self.stack.lock();
        while self.backlog.len() < BACKLOG {
            let mut s = g.new_tcp()?;
            s.listen(self.endpoint())
                .map_err(|e| io::Error::new(io::ErrorKind::AddrInUse, format!("{e:?}")))?;
            let h = g.sockets.add(s);
            g.tcp.push((h, self.at.port()));
            self.backlog.push(h);
        }
        Ok(())
    }

    /// The next established connection and the peer's address.
    pub async fn accept(&mut self) -> io::Result<(UserTcp, SocketAddr)> {
        let (h, peer) = poll_fn(|cx| {
            let mut g = self.stack.lock();
            for (i, &h) in self.backlog.iter().enumerate() {
                let s = g.sockets.get_mut::<tcp::Socket>(h);
                match s.state() {
                    tcp::State::Listen | tcp::State::SynReceived => {
                        s.register_recv_waker(cx.waker());
                    }
                    tcp::State::Closed => {
                        // Reset during its handshake: listen again.
                        let _ = s.listen(self.endpoint());
                        s.register_recv_waker(cx.waker());
                    }
                    _ => {
                        let peer = s
                            .remote_endpoint()
                            .map(|e| SocketAddr::new(e.addr.into(), e.port))
                            .unwrap_or(self.at);
                        return Poll::Ready((self.backlog.swap_remove(i), peer));
                    }
                }
            }
            Poll::Pending
        })
        .await;
        if let Err(e) = self.fill() {
            debug!(error = %e, "reverse listener: backlog not refilled");
        }
        Ok((
            UserTcp {
                stack: self.stack.clone(),
                handle: h,
            },
            peer,
        ))
    }
}

impl Drop for UserListener {
    fn drop(&mut self) {
        let mut g = self.stack.lock();
        for h in self.backlog.drain(..) {
            g.remove_tcp(h);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Two stacks joined by a socket pair talk TCP and UDP to each other.
    #[tokio::test]
    async fn two_stacks_talk_tcp_and_udp() {
        let (a, b) = packet_pair().unwrap();
        let ip_a: IpAddr = "198.19.7.1".parse().unwrap();
        let ip_b: IpAddr = "198.19.7.2".parse().unwrap();
        let sa = UserStack::start(
            a,
            &[(ip_a, 32), ("fd00:19:7::1".parse().unwrap(), 128)],
            1420,
        )
        .unwrap();
        let sb = UserStack::start(b, &[(ip_b, 32)], 1420).unwrap();
        let mut l = sb.listen(SocketAddr::new(ip_b, 80)).unwrap();
        let server = tokio::spawn(async move {
            let (mut c, peer) = l.accept().await.unwrap();
            assert_eq!(peer.ip(), ip_a);
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            c.write_all(&got).await.unwrap();
            c.shutdown().await.unwrap();
            got.len()
        });
        let mut c = sa.connect(SocketAddr::new(ip_b, 80)).await.unwrap();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
        let (mut rd, mut wr) = tokio::io::split(&mut c);
        let send = async {
            wr.write_all(&data).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let recv = rd.read_to_end(&mut back);
        let ((), r) = tokio::join!(send, recv);
        r.unwrap();
        assert_eq!(back, data, "echoed bytes differ");
        assert_eq!(server.await.unwrap(), data.len());
        // No listener: refused, not a hang.
        let e = sa.connect(SocketAddr::new(ip_b, 81)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        // No IPv6 address on the far stack's side of this one: a clear error.
        let e = sb
            .connect("[fd00:19:7::1]:80".parse().unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NetworkUnreachable);
        // UDP both ways.
        let ua = sa.udp().unwrap();
        let ub = sb.udp().unwrap();
        let to_b = SocketAddr::new(ip_b, ub.port);
        ua.send_to(b"ping", to_b).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = ub.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(from.ip(), ip_a);
        ub.send_to(b"pong", from).await.unwrap();
        let (n, _) = ua.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"pong");
    }

    #[tokio::test]
    async fn flows_are_bounded() {
        let (a, _b) = packet_pair().unwrap();
        let s = UserStack::start(a, &[("198.19.7.1".parse().unwrap(), 32)], 1420).unwrap();
        let mut ls = Vec::new();
        let mut err = None;
        for p in 1..=(MAX_TCP as u16 / BACKLOG as u16 + 1) {
            match s.listen(SocketAddr::new("198.19.7.1".parse().unwrap(), p)) {
                Ok(l) => ls.push(l),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let e = err.expect("no limit on TCP sockets");
        assert!(e.to_string().contains("memory bound"), "{e}");
        drop(ls);
        // Freed again.
        assert!(s.listen("198.19.7.1:1".parse().unwrap()).is_ok());
        let mut us = Vec::new();
        for _ in 0..MAX_UDP {
            us.push(s.udp().unwrap());
        }
        assert!(s.udp().is_err());
        us.pop();
        assert!(s.udp().is_ok());
    }
}
