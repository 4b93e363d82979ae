//! The DNS message codec (queries, responses) and a small stub resolver:
//! A and AAAA queries over UDP to fixed servers (an instance's: the
//! wg-quick file's `DNS =`), through a [`DnsNet`] (the kernel's sockets by
//! default; an instance's userspace stack implements it too). Depends on
//! nothing else of warren's.

#![forbid(unsafe_code)]
//!
//! The worker resolves SOCKS5 domain targets and HTTP host names itself
//! rather than through libc: libc follows `/etc/nsswitch.conf`, which may
//! send names to a host daemon (systemd-resolved, nscd) over a Unix
//! socket, outside the tunnel. Asking the tunnel's servers directly from
//! inside the namespace means every query leaves through the tunnel.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed future, as the [`DnsNet`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A datagram socket a resolver asks through.
pub trait DnsSocket: Send + Sync {
    /// Sends one datagram.
    fn send_to<'a>(&'a self, b: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<usize>>;
    /// The next datagram and its source.
    fn recv_from<'a>(&'a self, b: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>>;
}

/// Where a resolver's datagram sockets come from.
pub trait DnsNet: Send + Sync + std::fmt::Debug {
    /// A socket for talking to addresses of `to`'s family.
    fn udp(&self, to: IpAddr) -> BoxFuture<'_, io::Result<Box<dyn DnsSocket>>>;
}

/// The kernel's sockets, in the calling process's namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelNet;

impl DnsSocket for tokio::net::UdpSocket {
    fn send_to<'a>(&'a self, b: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(tokio::net::UdpSocket::send_to(self, b, to))
    }
    fn recv_from<'a>(&'a self, b: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
        Box::pin(tokio::net::UdpSocket::recv_from(self, b))
    }
}

impl DnsNet for KernelNet {
    fn udp(&self, to: IpAddr) -> BoxFuture<'_, io::Result<Box<dyn DnsSocket>>> {
        Box::pin(async move {
            let bind: SocketAddr = if to.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let s = tokio::net::UdpSocket::bind(bind).await?;
            Ok(Box::new(s) as Box<dyn DnsSocket>)
        })
    }
}

/// Answers per query kept.
const MAX_ANSWERS: usize = 16;

/// Resolves names through fixed servers.
#[derive(Debug, Clone)]
pub struct Resolver {
    servers: Vec<IpAddr>,
    search: Vec<String>,
    timeout: Duration,
    net: Arc<dyn DnsNet>,
}

/// Builds a query for `name` of type `qtype` (1 = A, 28 = AAAA).
pub fn query(id: u16, name: &str, qtype: u16) -> io::Result<Vec<u8>> {
    let mut q = Vec::with_capacity(name.len() + 18);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, 1 question
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad name length",
        ));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad label"));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    Ok(q)
}

/// Skips a (possibly compressed) name starting at `i`; returns the index
/// after it.
fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
    for _ in 0..128 {
        let l = *b.get(i)?;
        if l == 0 {
            return Some(i + 1);
        }
        if l & 0xC0 == 0xC0 {
            return Some(i + 2).filter(|&j| j <= b.len());
        }
        i += 1 + usize::from(l);
    }
    None
}

/// Parses a response to query `id`: the addresses in its answer section,
/// or an error for NXDOMAIN / SERVFAIL / malformed input.
pub fn parse_response(b: &[u8], id: u16) -> io::Result<Vec<IpAddr>> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    if b.len() < 12 || u16::from_be_bytes([b[0], b[1]]) != id || b[2] & 0x80 == 0 {
        return Err(bad("not an answer to our query"));
    }
    match b[3] & 0x0F {
        0 => {}
        3 => return Err(io::Error::new(io::ErrorKind::NotFound, "no such name")),
        rc => return Err(bad(&format!("server answered rcode {rc}"))),
    }
    let qd = u16::from_be_bytes([b[4], b[5]]);
    let an = u16::from_be_bytes([b[6], b[7]]);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(b, i).ok_or_else(|| bad("truncated question"))? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        i = skip_name(b, i).ok_or_else(|| bad("truncated answer"))?;
        let h = b.get(i..i + 10).ok_or_else(|| bad("truncated answer"))?;
        let (ty, class) = (
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[2], h[3]]),
        );
        let len = usize::from(u16::from_be_bytes([h[8], h[9]]));
        let data = b
            .get(i + 10..i + 10 + len)
            .ok_or_else(|| bad("truncated record"))?;
        match (ty, class, len) {
            (1, 1, 4) => out.push(IpAddr::V4(Ipv4Addr::new(
                data[0], data[1], data[2], data[3],
            ))),
            (28, 1, 16) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(data);
                out.push(IpAddr::V6(Ipv6Addr::from(o)));
            }
            _ => {}
        }
        if out.len() >= MAX_ANSWERS {
            break;
        }
        i += 10 + len;
    }
    Ok(out)
}

impl Resolver {
    /// A resolver asking `servers` (tried in order), completing single-label
    /// names with `search`.
    pub fn new(servers: Vec<IpAddr>, search: Vec<String>) -> Resolver {
        Resolver {
            servers,
            search,
            timeout: Duration::from_secs(2),
            net: Arc::new(KernelNet),
        }
    }

    /// Sends its queries through `net` (the userspace stack, when the
    /// instance has one).
    pub fn with_net(mut self, net: impl DnsNet + 'static) -> Resolver {
        self.net = Arc::new(net);
        self
    }

    /// Whether any server is configured.
    pub fn is_configured(&self) -> bool {
        !self.servers.is_empty()
    }

    /// Addresses of `name`: IPv4 first, then IPv6 (an IP literal is
    /// returned as is).
    pub async fn lookup(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        if self.servers.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the instance has no DNS server (add DNS = to the wg-quick file)",
            ));
        }
        let mut names = vec![name.to_string()];
        if !name.contains('.') {
            names.extend(self.search.iter().map(|s| format!("{name}.{s}")));
        }
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no such name");
        for n in &names {
            match self.lookup_one(n).await {
                Ok(v) if !v.is_empty() => return Ok(v),
                Ok(_) => last = io::Error::new(io::ErrorKind::NotFound, "no address for the name"),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn lookup_one(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        let mut last = io::Error::new(io::ErrorKind::TimedOut, "DNS timeout");
        for server in &self.servers {
            let to = SocketAddr::new(*server, 53);
            let sock = self.net.udp(*server).await?;
            let (a, b) = (rand_id(), rand_id());
            sock.send_to(&query(a, name, 1)?, to).await?;
            sock.send_to(&query(b, name, 28)?, to).await?;
            let mut v4: Option<io::Result<Vec<IpAddr>>> = None;
            let mut v6: Option<io::Result<Vec<IpAddr>>> = None;
            let mut buf = [0u8; 1500];
            let deadline = tokio::time::Instant::now() + self.timeout;
            while v4.is_none() || v6.is_none() {
                let n = match tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
                    // Only the server's answers count.
                    Ok(Ok((_, from))) if from != to => continue,
                    Ok(Ok((n, _))) => n,
                    Ok(Err(e)) => {
                        last = e;
                        break;
                    }
                    Err(_) => break,
                };
                let r = &buf[..n];
                if r.len() >= 2 && u16::from_be_bytes([r[0], r[1]]) == a {
                    v4 = Some(parse_response(r, a));
                } else if r.len() >= 2 && u16::from_be_bytes([r[0], r[1]]) == b {
                    v6 = Some(parse_response(r, b));
                }
            }
            let mut out = Vec::new();
            let mut err = None;
            for r in [v4, v6].into_iter().flatten() {
                match r {
                    Ok(v) => out.extend(v),
                    Err(e) => err = Some(e),
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
            if let Some(e) = err {
                if e.kind() == io::ErrorKind::NotFound {
                    return Err(e);
                }
                last = e;
            }
        }
        Err(last)
    }
}

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    // ring's system random; fall back to the clock.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return n as u16;
    }
    u16::from_be_bytes(b)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn answer(id: u16, q: &[u8], rcode: u8, records: &[(u16, &[u8])]) -> Vec<u8> {
        let mut r = q.to_vec();
        r[0..2].copy_from_slice(&id.to_be_bytes());
        r[2] = 0x81;
        r[3] = 0x80 | rcode;
        r[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        for (ty, data) in records {
            r.extend_from_slice(&[0xC0, 12]);
            r.extend_from_slice(&ty.to_be_bytes());
            r.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
            r.extend_from_slice(&(data.len() as u16).to_be_bytes());
            r.extend_from_slice(data);
        }
        r
    }

    #[test]
    fn query_shape() {
        let q = query(7, "www.exit.test.", 1).unwrap();
        assert_eq!(&q[..2], &[0, 7]);
        assert_eq!(&q[12..], b"\x03www\x04exit\x04test\x00\x00\x01\x00\x01");
        assert!(query(1, "", 1).is_err());
        assert!(query(1, "a..b", 1).is_err());
        assert!(query(1, &"a".repeat(64), 1).is_err());
    }

    #[test]
    fn parses_answers_and_errors() {
        let q = query(9, "exit.test", 1).unwrap();
        let r = answer(
            9,
            &q,
            0,
            &[(1, &[198, 19, 1, 1]), (5, b"\x00"), (28, &[0xfd; 16])],
        );
        let v = parse_response(&r, 9).unwrap();
        assert_eq!(
            v,
            vec![
                "198.19.1.1".parse::<IpAddr>().unwrap(),
                IpAddr::V6(Ipv6Addr::from([0xfd; 16]))
            ]
        );
        assert_eq!(
            parse_response(&answer(9, &q, 3, &[]), 9)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
        assert!(parse_response(&answer(8, &q, 0, &[]), 9).is_err());
        assert!(parse_response(&r[..r.len() - 2], 9).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        for len in 0..64 {
            let b: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = parse_response(&b, 0);
            let mut c = b.clone();
            if c.len() > 3 {
                c[2] = 0x80;
                c[3] = 0;
            }
            let _ = parse_response(
                &c,
                u16::from_be_bytes([
                    c.first().copied().unwrap_or(0),
                    c.get(1).copied().unwrap_or(0),
                ]),
            );
        }
    }
}
