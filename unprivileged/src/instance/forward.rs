//! Port forwards of an instance, onetun-style, in helper-backed and
//! rootless instances alike:
//!
//! - `--forward tcp:127.0.0.1:8080=198.19.1.1:80` (or `udp:`): a port on
//!   this host whose connections (datagrams) go to an address behind the
//!   tunnel. `warren up` binds the host-side socket; the worker connects
//!   out through the tunnel (inside the namespace, or through the
//!   userspace stack).
//! - `--reverse tcp:198.19.1.2:2222=127.0.0.1:22`: a port on the tunnel
//!   side (the instance's own tunnel address) whose connections reach a
//!   service on this host. The worker listens on the tunnel side; a
//!   small connector process that `warren up` leaves in the host namespace
//!   (`warren forward-connector`, as the user) opens the host-side
//!   connections, only to the configured targets, and hands them to the
//!   worker over a socket pair. It ends when the worker does.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::{debug, info, warn};

use super::net::{Datagram, Net};
use crate::transport::wire::Target;

/// Most forwards of one kind per instance.
pub const MAX_FORWARDS: usize = 64;
/// Datagram flows a UDP forward keeps at once.
const MAX_UDP_FLOWS: usize = 1024;
/// A UDP flow without traffic for this long is forgotten.
const UDP_FLOW_IDLE: Duration = Duration::from_secs(60);
/// A forwarded TCP connection without traffic for this long is closed.
const RELAY_IDLE: Duration = Duration::from_secs(3600);

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// `PROTO:LISTEN=TARGET`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// Protocol.
    pub proto: Proto,
    /// Where to listen (host side for `--forward`, tunnel side for
    /// `--reverse`).
    pub listen: SocketAddr,
    /// Where connections go (`host:port`; names allowed for `--forward`,
    /// resolved by the tunnel's DNS).
    pub target: String,
}

impl FromStr for Forward {
    type Err = String;
    fn from_str(s: &str) -> Result<Forward, String> {
        let want = "expected tcp:LISTEN_ADDR:PORT=TARGET:PORT or udp:...";
        let (proto, rest) = s.split_once(':').ok_or(want)?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            p => return Err(format!("{p:?}: {want}")),
        };
        let (listen, target) = rest.split_once('=').ok_or(want)?;
        let listen: SocketAddr = listen
            .parse()
            .map_err(|_| format!("{listen:?} is not ADDRESS:PORT (IPv6 in brackets)"))?;
        let (host, port) = target.rsplit_once(':').ok_or(want)?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("bad port in {target:?}"))?;
        if host.is_empty() || port == 0 || listen.port() == 0 {
            return Err(format!("{s:?}: {want}"));
        }
        Ok(Forward {
            proto,
            listen,
            target: target.to_string(),
        })
    }
}

impl Forward {
    /// The target as a proxy target.
    pub fn target(&self) -> Option<Target> {
        let (host, port) = self.target.rsplit_once(':')?;
        let port = port.parse().ok()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Some(match host.parse::<IpAddr>() {
            Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
            Err(_) => Target::Domain(host.to_string(), port),
        })
    }
}

/// Sends `fds` over a Unix socket, at most 32 per message, each message
/// one byte long (a single byte without descriptors when `fds` is empty).
pub fn send_fds(sock: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    if fds.is_empty() {
        return (&*sock).write_all(&[0]);
    }
    for chunk in fds.chunks(32) {
        let cmsg = [ControlMessage::ScmRights(chunk)];
        let iov = [IoSlice::new(&[1])];
        sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
            .map_err(io::Error::from)?;
    }
    Ok(())
}

/// Receives one message sent by [`send_fds`]: its descriptors (none for an
/// empty send).
pub fn recv_msg_fds(sock: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 32]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    if msg.bytes == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut out = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: descriptors just received with SCM_RIGHTS are new and
            // owned by nobody else in this process.
            out.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other("descriptors truncated"));
    }
    Ok(out)
}

/// Receives `n` (> 0) descriptors sent with [`send_fds`].
pub fn recv_fds(sock: &UnixStream, n: usize) -> io::Result<Vec<OwnedFd>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let got = recv_msg_fds(sock)?;
        if got.is_empty() {
            return Err(io::Error::other("expected descriptors"));
        }
        out.extend(got);
    }
    Ok(out)
}

/// Serves the `--forward`s on their host-side sockets (`fds`, in order);
/// the tunnel side's sockets come from `net`.
pub fn start_forwards<E: crate::proxy::server::Egress>(
    specs: &[Forward],
    fds: Vec<OwnedFd>,
    egress: Arc<E>,
    dns: crate::dns::Resolver,
    net: &Net,
) {
    for (spec, fd) in specs.iter().zip(fds) {
        let Some(target) = spec.target() else {
            continue;
        };
        match spec.proto {
            Proto::Tcp => {
                let l = std::net::TcpListener::from(fd);
                let Ok(l) = l
                    .set_nonblocking(true)
                    .and_then(|()| TcpListener::from_std(l))
                else {
                    warn!(listen = %spec.listen, "forward listener unusable");
                    continue;
                };
                info!(listen = %spec.listen, target = %spec.target, "TCP forward");
                tokio::spawn(tcp_forward(l, target, egress.clone()));
            }
            Proto::Udp => {
                let u = std::net::UdpSocket::from(fd);
                let Ok(u) = u
                    .set_nonblocking(true)
                    .and_then(|()| UdpSocket::from_std(u))
                else {
                    warn!(listen = %spec.listen, "forward socket unusable");
                    continue;
                };
                info!(listen = %spec.listen, target = %spec.target, "UDP forward");
                tokio::spawn(udp_forward(Arc::new(u), target, dns.clone(), net.clone()));
            }
        }
    }
}

async fn tcp_forward<E: crate::proxy::server::Egress>(
    l: TcpListener,
    target: Target,
    egress: Arc<E>,
) {
    loop {
        let Ok((mut client, peer)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (target, egress) = (target.clone(), egress.clone());
        tokio::spawn(async move {
            match egress.connect(&target, crate::rules::Action::Proxy).await {
                Ok(mut out) => {
                    let _ = client.set_nodelay(true);
                    if let crate::proxy::server::Outbound::Tcp(t) = &out {
                        let _ = t.set_nodelay(true);
                    }
                    let r = super::net::relay(&mut client, &mut out, RELAY_IDLE).await;
                    debug!(%peer, %target, result = ?r, "forwarded connection ended");
                }
                Err(e) => info!(%peer, %target, error = %e, "forward: connect failed"),
            }
        });
    }
}

/// The first address of `target` (names through the tunnel's DNS).
pub(crate) async fn resolve(target: &Target, dns: &crate::dns::Resolver) -> Option<SocketAddr> {
    match target {
        Target::Addr(a) => Some(*a),
        Target::Domain(d, p) => dns
            .lookup(d)
            .await
            .ok()?
            .first()
            .map(|ip| SocketAddr::new(*ip, *p)),
    }
}

/// Datagrams from each client source go out of a socket of their own on
/// the tunnel side (so answers find their way back).
async fn udp_forward(host: Arc<UdpSocket>, target: Target, dns: crate::dns::Resolver, net: Net) {
    type Flows = std::collections::HashMap<SocketAddr, (Arc<Datagram>, SocketAddr)>;
    let flows: Arc<tokio::sync::Mutex<Flows>> = Arc::default();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, src)) = host.recv_from(&mut buf).await else {
            continue;
        };
        let (sock, dst) = {
            let mut f = flows.lock().await;
            match f.get(&src) {
                Some(s) => s.clone(),
                None => {
                    if f.len() >= MAX_UDP_FLOWS {
                        continue;
                    }
                    let Some(dst) = resolve(&target, &dns).await else {
                        continue;
                    };
                    let s = match net.udp(dst.ip()).await {
                        Ok(s) => Arc::new(s),
                        Err(e) => {
                            debug!(%src, error = %e, "UDP forward: no socket for a new flow");
                            continue;
                        }
                    };
                    f.insert(src, (s.clone(), dst));
                    let (s2, host2, flows2) = (s.clone(), host.clone(), flows.clone());
                    tokio::spawn(async move {
                        let mut b = vec![0u8; 65_536];
                        while let Ok(Ok((n, from))) =
                            tokio::time::timeout(UDP_FLOW_IDLE, s2.recv_from(&mut b)).await
                        {
                            // Answers from the target only.
                            if from == dst {
                                let _ = host2.send_to(&b[..n], src).await;
                            }
                        }
                        flows2.lock().await.remove(&src);
                    });
                    (s, dst)
                }
            }
        };
        let _ = sock.send_to(&buf[..n], dst).await;
    }
}

/// Serves the `--reverse` forwards: listeners on the tunnel side (from
/// `net`); host-side connections come from the connector (`conn`).
pub fn start_reverses(specs: &[Forward], conn: UnixStream, net: &Net) {
    let conn = Arc::new(std::sync::Mutex::new(conn));
    for (i, spec) in specs.iter().enumerate() {
        if spec.proto != Proto::Tcp {
            warn!(listen = %spec.listen, "UDP reverse forwards are not supported; skipped");
            continue;
        }
        let (spec, conn, net) = (spec.clone(), conn.clone(), net.clone());
        tokio::spawn(async move {
            let mut l = match net.listen(spec.listen).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(listen = %spec.listen, error = %e, "reverse forward: cannot listen");
                    return;
                }
            };
            info!(listen = %spec.listen, target = %spec.target, "reverse TCP forward");
            loop {
                let (mut inside, peer) = match l.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(error = %e, "reverse forward: accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let conn = conn.clone();
                let index = i as u8;
                let target = spec.target.clone();
                tokio::spawn(async move {
                    let got = tokio::task::spawn_blocking(move || {
                        let c = conn
                            .lock()
                            .map_err(|_| io::Error::other("connector lock"))?;
                        (&*c).write_all(&[index])?;
                        let mut fds = recv_msg_fds(&c)?;
                        fds.pop()
                            .ok_or_else(|| io::Error::other("the connector could not connect"))
                    })
                    .await;
                    let out = match got {
                        Ok(Ok(fd)) => std::net::TcpStream::from(fd),
                        Ok(Err(e)) => {
                            info!(%peer, %target, error = %e, "reverse forward: host connection failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let Ok(mut out) = out
                        .set_nonblocking(true)
                        .and_then(|()| TcpStream::from_std(out))
                    else {
                        return;
                    };
                    let r = super::net::relay(&mut out, &mut inside, RELAY_IDLE).await;
                    debug!(%peer, %target, result = ?r, "reverse connection ended");
                });
            }
        });
    }
}

/// `warren forward-connector` (started by `warren up`, never by hand): on
/// fd 0, for each request byte `i`, connects to `targets[i]` on this host
/// and sends the connection back (an empty message when it fails). Ends
/// when the worker closes the socket.
pub fn run_connector(targets: &[String]) -> std::process::ExitCode {
    // SAFETY: fd 0 was set up by `warren up` as this process's end of the
    // socket pair; nothing else owns it.
    let sock = unsafe { UnixStream::from_raw_fd(0) };
    let targets: Vec<Option<SocketAddr>> = targets.iter().map(|t| t.parse().ok()).collect();
    let mut b = [0u8; 1];
    while matches!((&sock).read(&mut b), Ok(1)) {
        let conn = targets
            .get(usize::from(b[0]))
            .copied()
            .flatten()
            .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)).ok());
        let r = match &conn {
            Some(c) => send_fds(&sock, &[c.as_raw_fd()]),
            None => send_fds(&sock, &[]),
        };
        if r.is_err() {
            break;
        }
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_forwards() {
        let f: Forward = "tcp:127.0.0.1:8080=198.19.1.1:80".parse().unwrap();
        assert_eq!((f.proto, f.listen.port()), (Proto::Tcp, 8080));
        assert_eq!(
            f.target(),
            Some(Target::Addr("198.19.1.1:80".parse().unwrap()))
        );
        let u: Forward = "udp:[::1]:5353=exit.test:53".parse().unwrap();
        assert_eq!(u.proto, Proto::Udp);
        assert_eq!(u.target(), Some(Target::Domain("exit.test".into(), 53)));
        let v6: Forward = "tcp:127.0.0.1:1=[fd00::1]:22".parse().unwrap();
        assert_eq!(
            v6.target(),
            Some(Target::Addr("[fd00::1]:22".parse().unwrap()))
        );
        for bad in [
            "",
            "tcp",
            "sctp:127.0.0.1:1=a:1",
            "tcp:127.0.0.1=a:1",
            "tcp:127.0.0.1:1=a",
            "tcp:127.0.0.1:0=a:1",
            "tcp:127.0.0.1:1=:1",
            "tcp:127.0.0.1:1=a:0",
        ] {
            assert!(bad.parse::<Forward>().is_err(), "{bad}");
        }
    }

    #[test]
    fn fds_cross_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let f1 = std::fs::File::open("/dev/null").unwrap();
        let f2 = std::fs::File::open("/dev/null").unwrap();
        send_fds(&a, &[f1.as_raw_fd(), f2.as_raw_fd()]).unwrap();
        assert_eq!(recv_fds(&b, 2).unwrap().len(), 2);
    }
}
