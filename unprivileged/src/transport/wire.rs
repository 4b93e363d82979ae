//! What travels inside an authenticated transport stream (pure; no I/O).
//!
//! Each stream (a whole TLS connection in `tls` mode, a yamux stream in
//! `tls-mux` mode) starts with one request from the client:
//!
//! ```text
//! request: version u8 (=1) | command u8 | address
//! reply:   status u8 | address            (the server's bound address)
//! address: type u8 (1 IPv4, 3 domain, 4 IPv6) | addr (4, 1+len, 16) | port u16 BE
//! ```
//!
//! Commands: 1 = TCP connect (then raw bytes both ways), 2 = UDP relay (then
//! datagram frames both ways), 3 = ping (reply only; keepalive).
//! Status codes follow SOCKS5's (0 ok, 1 failure, 2 not allowed, 3 network
//! unreachable, 4 host unreachable, 5 refused, 6 timed out, 8 bad address).
//!
//! UDP frames: `len u16 BE | address | payload`, where `len` counts address
//! and payload, at most [`MAX_UDP_FRAME`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// Protocol version of the stream request.
pub const VERSION: u8 = 1;
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

/// What the client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// A TCP connection to the target.
    Connect = 1,
    /// A UDP association (datagram frames follow).
    Udp = 2,
    /// Keepalive probe.
    Ping = 3,
}

/// Reply status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// General failure.
    Failure = 1,
    /// Not allowed by the server's rules.
    NotAllowed = 2,
    /// Network unreachable.
    NetUnreachable = 3,
    /// Host unreachable (or name did not resolve).
    HostUnreachable = 4,
    /// Connection refused.
    Refused = 5,
    /// Timed out.
    TimedOut = 6,
    /// Address type not supported.
    BadAddress = 8,
}

impl Status {
    /// From the wire byte (unknown codes read as failure).
    pub fn from_byte(b: u8) -> Status {
        match b {
            0 => Status::Ok,
            2 => Status::NotAllowed,
            3 => Status::NetUnreachable,
            4 => Status::HostUnreachable,
            5 => Status::Refused,
            6 => Status::TimedOut,
            8 => Status::BadAddress,
            _ => Status::Failure,
        }
    }

    /// The status that best describes a connect error.
    pub fn from_io(e: &std::io::Error) -> Status {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => Status::Refused,
            TimedOut => Status::TimedOut,
            NetworkUnreachable => Status::NetUnreachable,
            HostUnreachable | NotFound => Status::HostUnreachable,
            _ => Status::Failure,
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

/// Encodes a stream request.
pub fn request(cmd: Command, target: &Target) -> Vec<u8> {
    let mut out = vec![VERSION, cmd as u8];
    put_target(&mut out, target);
    out
}

/// Decodes a stream request from the front of `b`.
pub fn parse_request(b: &[u8]) -> Parsed<(Command, Target)> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[0] != VERSION {
        return Err(WireError::Version(b[0]));
    }
    let cmd = match b[1] {
        1 => Command::Connect,
        2 => Command::Udp,
        3 => Command::Ping,
        c => return Err(WireError::Command(c)),
    };
    Ok(get_target(&b[2..])?.map(|(t, n)| ((cmd, t), n + 2)))
}

/// Encodes a reply.
pub fn reply(status: Status, bound: &Target) -> Vec<u8> {
    let mut out = vec![status as u8];
    put_target(&mut out, bound);
    out
}

/// Decodes a reply from the front of `b`.
pub fn parse_reply(b: &[u8]) -> Parsed<(Status, Target)> {
    let Some(&s) = b.first() else {
        return Ok(None);
    };
    Ok(get_target(&b[1..])?.map(|(t, n)| ((Status::from_byte(s), t), n + 1)))
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_round_trip() {
        for t in [
            Target::Addr("198.18.0.1:80".parse().expect("addr")),
            Target::Addr("[fd00::1]:443".parse().expect("addr")),
            Target::Domain("example.test".into(), 8080),
        ] {
            let r = request(Command::Connect, &t);
            assert_eq!(
                parse_request(&r).expect("valid"),
                Some(((Command::Connect, t.clone()), r.len()))
            );
            for cut in 0..r.len() {
                assert_eq!(parse_request(&r[..cut]).expect("prefix ok"), None);
            }
            let f = udp_frame(&t, b"hello").expect("frame");
            let ((t2, p), n) = parse_udp_frame(&f).expect("valid").expect("complete");
            assert_eq!((t2, p, n), (t.clone(), &b"hello"[..], f.len()));
        }
    }

    #[test]
    fn bad_requests() {
        assert_eq!(parse_request(&[9, 1]), Err(WireError::Version(9)));
        assert_eq!(parse_request(&[1, 7]), Err(WireError::Command(7)));
        assert_eq!(parse_request(&[1, 1, 2]), Err(WireError::AddressType(2)));
        assert_eq!(parse_request(&[1, 1, 3, 0, 0, 80]), Err(WireError::Domain));
    }

    proptest! {
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_request(&b);
            let _ = parse_reply(&b);
            let _ = parse_udp_frame(&b);
        }
    }
}
