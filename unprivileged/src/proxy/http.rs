//! HTTP proxy requests (pure; no I/O): the request head of a `CONNECT` or
//! an absolute-form request, and the head forwarded upstream with hop-by-hop
//! headers removed.

use thiserror::Error;

use crate::transport::wire::Target;

/// Largest request head accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header lines accepted.
pub const MAX_HEADERS: usize = 100;

/// A proxy request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRequest {
    /// Method (`CONNECT`, `GET`...).
    pub method: String,
    /// Where to connect.
    pub target: Target,
    /// For forwarded requests: the origin-form path (`/a?b`).
    pub path: String,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: String,
    /// Header lines as sent.
    pub headers: Vec<(String, String)>,
}

/// Why a request head was refused, with the status to answer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// Garbage or an unsupported form: 400.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Head too large: 431.
    #[error("request header too large")]
    TooLarge,
    /// Not http:// (e.g. https:// in absolute form): 400.
    #[error("unsupported URL scheme")]
    Scheme,
}

impl HttpError {
    /// Status line to answer with.
    pub fn status(&self) -> &'static str {
        match self {
            HttpError::TooLarge => "431 Request Header Fields Too Large",
            _ => "400 Bad Request",
        }
    }
}

fn split_host_port(authority: &str, default_port: u16) -> Result<Target, HttpError> {
    let bad = HttpError::BadRequest("bad host");
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or(bad.clone())?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad.clone())?,
            None if after.is_empty() => default_port,
            None => return Err(bad),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad.clone())?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() || host.len() > 255 || host.contains(['/', ' ', '@']) {
        return Err(bad);
    }
    Ok(match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Target::Addr(std::net::SocketAddr::new(ip, port)),
        Err(_) => Target::Domain(host, port),
    })
}

/// Parses a request head from the front of `b`.
pub fn parse(b: &[u8]) -> Result<Option<(ProxyRequest, usize)>, HttpError> {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if b.len() > MAX_HEAD {
            Err(HttpError::TooLarge)
        } else {
            Ok(None)
        };
    };
    if end > MAX_HEAD {
        return Err(HttpError::TooLarge);
    }
    let text = std::str::from_utf8(&b[..end]).map_err(|_| HttpError::BadRequest("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequest("bad request line"));
    };
    if method.is_empty() || !method.bytes().all(|c| c.is_ascii_uppercase()) {
        return Err(HttpError::BadRequest("bad method"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::BadRequest("bad version"));
    }
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() >= MAX_HEADERS {
            return Err(HttpError::TooLarge);
        }
        let (n, v) = line
            .split_once(':')
            .ok_or(HttpError::BadRequest("bad header line"))?;
        if n.is_empty() || n.contains([' ', '\t']) {
            return Err(HttpError::BadRequest("bad header name"));
        }
        headers.push((n.to_string(), v.trim().to_string()));
    }
    let (target, path) = if method == "CONNECT" {
        (split_host_port(uri, 443)?, String::new())
    } else {
        let rest = uri.strip_prefix("http://").ok_or(if uri.contains("://") {
            HttpError::Scheme
        } else {
            HttpError::BadRequest("not an absolute URL")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        (split_host_port(authority, 80)?, path.to_string())
    };
    Ok(Some((
        ProxyRequest {
            method: method.to_string(),
            target,
            path,
            version: version.to_string(),
            headers,
        },
        end + 4,
    )))
}

/// Hop-by-hop headers (RFC 9110 7.6.1) never forwarded, plus the proxy's
/// own. `Transfer-Encoding` stays: the body is relayed as sent.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

impl ProxyRequest {
    /// A header's value (first, case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The head to send upstream: origin-form, hop-by-hop headers (and
    /// those the client's `Connection` names) removed, one request per
    /// upstream connection (`Connection: close`).
    pub fn upstream_head(&self) -> Vec<u8> {
        let named: Vec<String> = self
            .header("connection")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .collect()
            })
            .unwrap_or_default();
        let mut out = format!("{} {} {}\r\n", self.method, self.path, self.version);
        let mut has_host = false;
        for (n, v) in &self.headers {
            let l = n.to_ascii_lowercase();
            if HOP_BY_HOP.contains(&l.as_str()) || named.contains(&l) {
                continue;
            }
            has_host |= l == "host";
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        if !has_host {
            out.push_str(&format!("Host: {}\r\n", self.target));
        }
        out.push_str("Connection: close\r\n\r\n");
        out.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn connect_and_absolute_form() {
        let head = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
        let (r, n) = parse(head).expect("valid").expect("complete");
        assert_eq!(n, head.len());
        assert_eq!(r.target, Target::Domain("example.com".into(), 443));
        let (r, _) = parse(b"GET http://[::1]:8080/a?b HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nProxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(r.target, Target::Addr("[::1]:8080".parse().expect("a")));
        assert_eq!(r.path, "/a?b");
        let head = String::from_utf8(r.upstream_head()).expect("utf8");
        assert_eq!(
            head,
            "GET /a?b HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn bad_heads() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n\r\n"),
            Err(HttpError::BadRequest("not an absolute URL"))
        );
        assert_eq!(
            parse(b"GET https://x/ HTTP/1.1\r\n\r\n"),
            Err(HttpError::Scheme)
        );
        assert_eq!(
            parse(b"\x16\x03\x01\r\n\r\n"),
            Err(HttpError::BadRequest("bad request line"))
        );
        assert_eq!(parse(&[b'A'; MAX_HEAD + 1]), Err(HttpError::TooLarge));
        assert_eq!(
            parse(b"CONNECT :80 HTTP/1.1\r\n\r\n"),
            Err(HttpError::BadRequest("bad host"))
        );
        assert_eq!(parse(b"GET http://x/ HTTP/1.1\r\nHost"), Ok(None));
    }

    proptest! {
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse(&b);
        }
    }
}
