//! Where a connection or datagram goes ([`Target`]: an address, or a name
//! and port), and its codec: the SOCKS5 address form (`type | addr | port`)
//! and datagram frames (`len | address | payload`) that carry UDP over a
//! stream. Pure; no I/O. The proxy's UDP relay uses it, and warren's
//! transports build their stream request and reply around it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// Longest domain name in an address.
pub const MAX_DOMAIN: usize = 255;
/// Largest UDP frame body (address + payload).
pub const MAX_UDP_FRAME: usize = 65_535;

/// Where a stream should go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// An address.
    Addr(SocketAddr),
    /// A name the far end resolves, and a port.
    Domain(String, u16),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Domain(d, p) => write!(f, "{d}:{p}"),
        }
    }
}

/// Decoding failures.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Unsupported request version.
    #[error("unsupported stream request version {0}")]
    Version(u8),
    /// Unknown command.
    #[error("unknown command {0}")]
    Command(u8),
    /// Unknown address type.
    #[error("unknown address type {0}")]
    AddressType(u8),
    /// Empty or non-UTF-8 domain.
    #[error("invalid domain name")]
    Domain,
    /// Frame larger than allowed.
    #[error("frame too large")]
    TooLarge,
}

/// Appends an address.
pub fn put_target(out: &mut Vec<u8>, t: &Target) {
    match t {
        Target::Addr(SocketAddr::V4(a)) => {
            out.push(1);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Target::Addr(SocketAddr::V6(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Target::Domain(d, p) => {
            let d = &d.as_bytes()[..d.len().min(MAX_DOMAIN)];
            out.push(3);
            out.push(d.len() as u8);
            out.extend_from_slice(d);
            out.extend_from_slice(&p.to_be_bytes());
        }
    }
}

/// Reads an address from the front of `b`: `Ok(None)` if more bytes are
/// needed, else the address and the bytes used.
pub fn get_target(b: &[u8]) -> Result<Option<(Target, usize)>, WireError> {
    let Some(&ty) = b.first() else {
        return Ok(None);
    };
    let (len, t) = match ty {
        1 => {
            if b.len() < 7 {
                return Ok(None);
            }
            let ip = Ipv4Addr::new(b[1], b[2], b[3], b[4]);
            (
                7,
                Target::Addr(SocketAddr::new(
                    IpAddr::V4(ip),
                    u16::from_be_bytes([b[5], b[6]]),
                )),
            )
        }
        4 => {
            if b.len() < 19 {
                return Ok(None);
            }
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[1..17]);
            (
                19,
                Target::Addr(SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(o)),
                    u16::from_be_bytes([b[17], b[18]]),
                )),
            )
        }
        3 => {
            let Some(&n) = b.get(1) else {
                return Ok(None);
            };
            let n = n as usize;
            if n == 0 {
                return Err(WireError::Domain);
            }
            if b.len() < 2 + n + 2 {
                return Ok(None);
            }
            let d = std::str::from_utf8(&b[2..2 + n]).map_err(|_| WireError::Domain)?;
            (
                2 + n + 2,
                Target::Domain(d.to_string(), u16::from_be_bytes([b[2 + n], b[3 + n]])),
            )
        }
        other => return Err(WireError::AddressType(other)),
    };
    Ok(Some((t, len)))
}

/// A decoded value and the bytes it used, `None` if more bytes are needed.
pub type Parsed<T> = Result<Option<(T, usize)>, WireError>;

/// Encodes one UDP frame.
pub fn udp_frame(target: &Target, payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut body = Vec::with_capacity(payload.len() + 24);
    put_target(&mut body, target);
    body.extend_from_slice(payload);
    if body.len() > MAX_UDP_FRAME {
        return Err(WireError::TooLarge);
    }
    let mut out = (body.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes one UDP frame from the front of `b`: target and payload.
pub fn parse_udp_frame(b: &[u8]) -> Parsed<(Target, &[u8])> {
    if b.len() < 2 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([b[0], b[1]]) as usize;
    if b.len() < 2 + len {
        return Ok(None);
    }
    let body = &b[2..2 + len];
    match get_target(body)? {
        Some((t, n)) => Ok(Some(((t, &body[n..]), 2 + len))),
        None => Err(WireError::AddressType(body.first().copied().unwrap_or(0))),
    }
}
