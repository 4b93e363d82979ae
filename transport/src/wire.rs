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

pub use warren_proxy::target::{
    MAX_DOMAIN, MAX_UDP_FRAME, Parsed, Target, WireError, get_target, parse_udp_frame, put_target,
    udp_frame,
};

/// Protocol version of the stream request.
pub const VERSION: u8 = 1;
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
