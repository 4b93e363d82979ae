//! SOCKS5 (RFC 1928) and its username/password sub-negotiation (RFC 1929)
//! as pure functions over bytes: each parser returns `Ok(None)` until enough
//! bytes have arrived, the parsed message and the bytes it used, or a typed
//! error naming the reply the client should get.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

use super::target::Target;

/// Authentication methods.
pub const NO_AUTH: u8 = 0x00;
/// RFC 1929 username/password.
pub const USER_PASS: u8 = 0x02;
/// "No acceptable methods".
pub const NO_ACCEPTABLE: u8 = 0xff;

/// Reply codes (RFC 1928 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    /// Succeeded.
    Succeeded = 0x00,
    /// General SOCKS server failure.
    GeneralFailure = 0x01,
    /// Connection not allowed by ruleset.
    NotAllowed = 0x02,
    /// Network unreachable.
    NetworkUnreachable = 0x03,
    /// Host unreachable.
    HostUnreachable = 0x04,
    /// Connection refused.
    ConnectionRefused = 0x05,
    /// TTL expired (used for timeouts).
    TtlExpired = 0x06,
    /// Command not supported.
    CommandNotSupported = 0x07,
    /// Address type not supported.
    AddressTypeNotSupported = 0x08,
}

impl Reply {
    /// The reply that best describes a connect error.
    pub fn from_io(e: &std::io::Error) -> Reply {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => Reply::ConnectionRefused,
            TimedOut => Reply::TtlExpired,
            NetworkUnreachable => Reply::NetworkUnreachable,
            HostUnreachable | NotFound => Reply::HostUnreachable,
            _ => Reply::GeneralFailure,
        }
    }
}

/// What is wrong with the client's bytes, and what to answer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SocksError {
    /// Not SOCKS version 5: close without answering.
    #[error("not SOCKS5 (version byte {0:#04x})")]
    Version(u8),
    /// Greeting offering no methods.
    #[error("greeting offers no authentication method")]
    NoMethods,
    /// Malformed username/password sub-negotiation.
    #[error("malformed username/password request")]
    BadAuth,
    /// A request with a reserved byte set or otherwise malformed.
    #[error("malformed request")]
    Malformed,
    /// A domain name of length zero or not UTF-8.
    #[error("invalid domain name")]
    BadDomain,
    /// Unknown address type: answer 0x08.
    #[error("address type {0:#04x} not supported")]
    AddressType(u8),
    /// Unknown command: answer 0x07.
    #[error("command {0:#04x} not supported")]
    Command(u8),
}

impl SocksError {
    /// The reply to send before closing, if any.
    pub fn reply(&self) -> Option<Reply> {
        match self {
            SocksError::Version(_) | SocksError::NoMethods | SocksError::BadAuth => None,
            SocksError::AddressType(_) => Some(Reply::AddressTypeNotSupported),
            SocksError::Command(_) => Some(Reply::CommandNotSupported),
            SocksError::Malformed | SocksError::BadDomain => Some(Reply::GeneralFailure),
        }
    }
}

/// A parse result: the value and the bytes used, or "need more".
pub type Parsed<T> = Result<Option<(T, usize)>, SocksError>;

/// Parses the greeting; returns the offered methods.
pub fn parse_greeting(b: &[u8]) -> Parsed<Vec<u8>> {
    let Some(&ver) = b.first() else {
        return Ok(None);
    };
    if ver != 5 {
        return Err(SocksError::Version(ver));
    }
    let Some(&n) = b.get(1) else {
        return Ok(None);
    };
    if n == 0 {
        return Err(SocksError::NoMethods);
    }
    let n = n as usize;
    if b.len() < 2 + n {
        return Ok(None);
    }
    Ok(Some((b[2..2 + n].to_vec(), 2 + n)))
}

/// Picks the method: username/password if required (and offered), else
/// no-auth if offered, else "no acceptable methods".
pub fn choose_method(offered: &[u8], need_auth: bool) -> u8 {
    if need_auth {
        if offered.contains(&USER_PASS) {
            USER_PASS
        } else {
            NO_ACCEPTABLE
        }
    } else if offered.contains(&NO_AUTH) {
        NO_AUTH
    } else {
        NO_ACCEPTABLE
    }
}

/// Parses an RFC 1929 request: (username, password).
pub fn parse_user_pass(b: &[u8]) -> Parsed<(Vec<u8>, Vec<u8>)> {
    let Some(&ver) = b.first() else {
        return Ok(None);
    };
    if ver != 1 {
        return Err(SocksError::BadAuth);
    }
    let Some(&ulen) = b.get(1) else {
        return Ok(None);
    };
    let ulen = ulen as usize;
    let Some(&plen) = b.get(2 + ulen) else {
        return Ok(None);
    };
    let plen = plen as usize;
    let end = 3 + ulen + plen;
    if b.len() < end {
        return Ok(None);
    }
    Ok(Some((
        (b[2..2 + ulen].to_vec(), b[3 + ulen..end].to_vec()),
        end,
    )))
}

/// SOCKS5 commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    /// CONNECT.
    Connect,
    /// BIND (answered with 0x07).
    Bind,
    /// UDP ASSOCIATE.
    UdpAssociate,
}

/// Parses an address (type byte first) from the front of `b`.
pub fn parse_addr(b: &[u8]) -> Parsed<Target> {
    let Some(&atyp) = b.first() else {
        return Ok(None);
    };
    match atyp {
        1 => {
            if b.len() < 7 {
                return Ok(None);
            }
            let ip = Ipv4Addr::new(b[1], b[2], b[3], b[4]);
            let port = u16::from_be_bytes([b[5], b[6]]);
            Ok(Some((
                Target::Addr(SocketAddr::new(IpAddr::V4(ip), port)),
                7,
            )))
        }
        4 => {
            if b.len() < 19 {
                return Ok(None);
            }
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[1..17]);
            let port = u16::from_be_bytes([b[17], b[18]]);
            Ok(Some((
                Target::Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port)),
                19,
            )))
        }
        3 => {
            let Some(&n) = b.get(1) else {
                return Ok(None);
            };
            let n = n as usize;
            if n == 0 {
                return Err(SocksError::BadDomain);
            }
            if b.len() < 2 + n + 2 {
                return Ok(None);
            }
            let name = std::str::from_utf8(&b[2..2 + n]).map_err(|_| SocksError::BadDomain)?;
            if name.contains('\0') {
                return Err(SocksError::BadDomain);
            }
            let port = u16::from_be_bytes([b[2 + n], b[3 + n]]);
            // An IP literal sent as a name is an address.
            let t = match name.parse::<IpAddr>() {
                Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
                Err(_) => Target::Domain(name.to_string(), port),
            };
            Ok(Some((t, 4 + n)))
        }
        other => Err(SocksError::AddressType(other)),
    }
}

/// Parses a request: command and target.
pub fn parse_request(b: &[u8]) -> Parsed<(Cmd, Target)> {
    if b.len() < 4 {
        return Ok(None);
    }
    if b[0] != 5 {
        return Err(SocksError::Version(b[0]));
    }
    if b[2] != 0 {
        return Err(SocksError::Malformed);
    }
    let cmd = match b[1] {
        1 => Cmd::Connect,
        2 => Cmd::Bind,
        3 => Cmd::UdpAssociate,
        c => {
            // Still consume the address so the reply is well-formed.
            return Err(SocksError::Command(c));
        }
    };
    Ok(parse_addr(&b[3..])?.map(|(t, n)| ((cmd, t), 3 + n)))
}

/// Encodes a reply with the bound address.
pub fn reply(code: Reply, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![5, code as u8, 0];
    put_addr(&mut out, bound);
    out
}

fn put_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a {
        SocketAddr::V4(v4) => {
            out.push(1);
            out.extend_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => {
                out.push(1);
                out.extend_from_slice(&v4.octets());
            }
            None => {
                out.push(4);
                out.extend_from_slice(&v6.ip().octets());
            }
        },
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

/// A parsed UDP datagram header (RFC 1928 section 7): target and payload.
pub fn parse_udp(b: &[u8]) -> Result<(Target, &[u8]), SocksError> {
    if b.len() < 4 || b[0] != 0 || b[1] != 0 {
        return Err(SocksError::Malformed);
    }
    if b[2] != 0 {
        // Fragments are not supported: drop the datagram.
        return Err(SocksError::Malformed);
    }
    match parse_addr(&b[3..])? {
        Some((t, n)) => Ok((t, &b[3 + n..])),
        None => Err(SocksError::Malformed),
    }
}

/// Encodes a UDP datagram header + payload for the client.
pub fn udp_datagram(from: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0];
    put_addr(&mut out, from);
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_and_methods() {
        assert_eq!(parse_greeting(&[5, 2, 0, 2]), Ok(Some((vec![0, 2], 4))));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(None));
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(SocksError::Version(4)));
        assert_eq!(parse_greeting(&[5, 0]), Err(SocksError::NoMethods));
        assert_eq!(choose_method(&[0], false), NO_AUTH);
        assert_eq!(choose_method(&[0], true), NO_ACCEPTABLE);
        assert_eq!(choose_method(&[0, 2], true), USER_PASS);
        assert_eq!(choose_method(&[1], false), NO_ACCEPTABLE);
    }

    #[test]
    fn requests() {
        let r = [5, 1, 0, 1, 127, 0, 0, 1, 0, 80];
        assert_eq!(
            parse_request(&r),
            Ok(Some((
                (
                    Cmd::Connect,
                    Target::Addr("127.0.0.1:80".parse().expect("a"))
                ),
                10
            )))
        );
        let mut d = vec![5, 1, 0, 3, 11];
        d.extend_from_slice(b"example.com");
        d.extend_from_slice(&[1, 187]);
        assert_eq!(
            parse_request(&d),
            Ok(Some((
                (Cmd::Connect, Target::Domain("example.com".into(), 443)),
                d.len()
            )))
        );
        for cut in 0..d.len() {
            assert_eq!(parse_request(&d[..cut]), Ok(None), "prefix {cut}");
        }
        assert_eq!(
            parse_request(&[5, 1, 0, 9, 0]),
            Err(SocksError::AddressType(9))
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 0, 0, 80]),
            Err(SocksError::BadDomain)
        );
        assert_eq!(
            parse_request(&[5, 9, 0, 1, 1, 2, 3, 4, 0, 1]),
            Err(SocksError::Command(9))
        );
        assert_eq!(
            parse_request(&[5, 1, 7, 1, 1, 2, 3, 4, 0, 1]),
            Err(SocksError::Malformed)
        );
    }

    #[test]
    fn replies_and_udp() {
        assert_eq!(
            reply(Reply::Succeeded, "[::ffff:1.2.3.4]:5".parse().expect("a")),
            vec![5, 0, 0, 1, 1, 2, 3, 4, 0, 5]
        );
        let d = udp_datagram("1.2.3.4:53".parse().expect("a"), b"q");
        assert_eq!(
            parse_udp(&d),
            Ok((Target::Addr("1.2.3.4:53".parse().expect("a")), &b"q"[..]))
        );
        let mut frag = d.clone();
        frag[2] = 1;
        assert_eq!(parse_udp(&frag), Err(SocksError::Malformed));
    }

    proptest! {
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_greeting(&b);
            let _ = parse_user_pass(&b);
            let _ = parse_request(&b);
            let _ = parse_udp(&b);
        }
    }
}
