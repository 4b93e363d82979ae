//! Where an instance's own sockets come from: the kernel (the worker runs
//! inside the instance's network namespace, so its sockets use the TUN),
//! or the userspace stack (rootless without user namespaces or TUN).
//! Everything that opens a connection or a datagram socket on the tunnel
//! side (proxied connections, DNS queries, UDP associations, forwards)
//! goes through [`Net`], so the userspace path can never fall back to the
//! host's network.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::userstack::{UserListener, UserStack, UserUdp};
use crate::proxy::server::Outbound;

/// The tunnel side's sockets.
#[derive(Debug, Clone)]
pub enum Net {
    /// The kernel's, inside the instance's namespace.
    Kernel,
    /// The userspace stack's.
    User(UserStack),
}

/// A datagram socket on the tunnel side.
#[derive(Debug)]
pub enum Datagram {
    /// A kernel socket.
    Kernel(UdpSocket),
    /// A userspace-stack socket.
    User(UserUdp),
}

/// A TCP listener on the tunnel side.
#[derive(Debug)]
pub enum Listener {
    /// A kernel listener.
    Kernel(TcpListener),
    /// A userspace-stack listener.
    User(UserListener),
}

impl Net {
    /// Which stack, for status output.
    pub fn name(&self) -> &'static str {
        match self {
            Net::Kernel => "kernel",
            Net::User(_) => "userspace",
        }
    }

    /// A TCP connection to `to`.
    pub async fn connect(&self, to: SocketAddr) -> io::Result<Outbound> {
        match self {
            Net::Kernel => TcpStream::connect(to).await.map(Outbound::Tcp),
            Net::User(s) => Ok(Outbound::Stream(Box::new(s.connect(to).await?))),
        }
    }

    /// A datagram socket for talking to addresses of `to`'s family.
    pub async fn udp(&self, to: IpAddr) -> io::Result<Datagram> {
        match self {
            Net::Kernel => {
                let bind: SocketAddr = if to.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (Ipv6Addr::UNSPECIFIED, 0).into()
                };
                UdpSocket::bind(bind).await.map(Datagram::Kernel)
            }
            Net::User(s) => s.udp().map(Datagram::User),
        }
    }

    /// Listens on `at`.
    pub async fn listen(&self, at: SocketAddr) -> io::Result<Listener> {
        match self {
            Net::Kernel => TcpListener::bind(at).await.map(Listener::Kernel),
            Net::User(s) => s.listen(at).map(Listener::User),
        }
    }
}

impl Datagram {
    /// Sends one datagram.
    pub async fn send_to(&self, b: &[u8], to: SocketAddr) -> io::Result<usize> {
        match self {
            Datagram::Kernel(s) => s.send_to(b, to).await,
            Datagram::User(s) => s.send_to(b, to).await,
        }
    }

    /// The next datagram and its source.
    pub async fn recv_from(&self, b: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self {
            Datagram::Kernel(s) => s.recv_from(b).await,
            Datagram::User(s) => s.recv_from(b).await,
        }
    }
}

impl Listener {
    /// The next connection and its peer.
    pub async fn accept(&mut self) -> io::Result<(Outbound, SocketAddr)> {
        match self {
            Listener::Kernel(l) => l.accept().await.map(|(s, a)| (Outbound::Tcp(s), a)),
            Listener::User(l) => l
                .accept()
                .await
                .map(|(s, a)| (Outbound::Stream(Box::new(s)), a)),
        }
    }
}

/// Copies both ways between a host-side connection and a tunnel-side one
/// until both directions end: splice(2) between kernel sockets, a buffered
/// copy otherwise. Bytes (host → tunnel, tunnel → host).
pub async fn relay(
    host: &mut TcpStream,
    tunnel: &mut Outbound,
    idle: Duration,
) -> io::Result<(u64, u64)> {
    match tunnel {
        Outbound::Tcp(t) => crate::proxy::splice::relay(host, t, idle).await,
        // Small buffers: the stack's own windows do the buffering, and this
        // is per flow (the userspace stack's memory bound counts it).
        Outbound::Stream(s) => {
            tokio::io::copy_bidirectional_with_sizes(host, s, 16 * 1024, 16 * 1024).await
        }
    }
}

impl crate::dns::DnsSocket for Datagram {
    fn send_to<'a>(
        &'a self,
        b: &'a [u8],
        to: SocketAddr,
    ) -> crate::dns::BoxFuture<'a, io::Result<usize>> {
        Box::pin(Datagram::send_to(self, b, to))
    }
    fn recv_from<'a>(
        &'a self,
        b: &'a mut [u8],
    ) -> crate::dns::BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
        Box::pin(Datagram::recv_from(self, b))
    }
}

impl crate::dns::DnsNet for Net {
    fn udp(
        &self,
        to: IpAddr,
    ) -> crate::dns::BoxFuture<'_, io::Result<Box<dyn crate::dns::DnsSocket>>> {
        Box::pin(async move {
            Ok(Box::new(Net::udp(self, to).await?) as Box<dyn crate::dns::DnsSocket>)
        })
    }
}
