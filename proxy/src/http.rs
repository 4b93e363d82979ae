//! HTTP proxy requests (pure; no I/O): the request head of a `CONNECT` or
//! an absolute-form request, and the head forwarded upstream with hop-by-hop
//! headers removed.

use thiserror::Error;

use super::target::Target;

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

/// How a message body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

fn header_in<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn framing(headers: &[(String, String)]) -> Result<Option<Body>, HttpError> {
    if let Some(te) = header_in(headers, "transfer-encoding") {
        // Only chunked as the final coding is understood (RFC 9112 6.3).
        return if te
            .rsplit(',')
            .next()
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
        {
            Ok(Some(Body::Chunked))
        } else {
            Err(HttpError::BadRequest("unsupported transfer coding"))
        };
    }
    let lens: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.as_str())
        .collect();
    match lens.as_slice() {
        [] => Ok(None),
        [first, rest @ ..] if rest.iter().all(|v| v == first) => first
            .trim()
            .parse::<u64>()
            .map(|n| Some(Body::Length(n)))
            .map_err(|_| HttpError::BadRequest("bad Content-Length")),
        _ => Err(HttpError::BadRequest("conflicting Content-Length")),
    }
}

impl ProxyRequest {
    /// The request body's framing (no framing headers: no body).
    pub fn body(&self) -> Result<Body, HttpError> {
        Ok(framing(&self.headers)?.unwrap_or(Body::None))
    }

    /// Whether the client wants the connection kept after this exchange.
    pub fn keep_alive(&self) -> bool {
        let conn = header_in(&self.headers, "connection")
            .or_else(|| header_in(&self.headers, "proxy-connection"))
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        if self.version == "HTTP/1.0" {
            conn.contains("keep-alive")
        } else {
            !conn.split(',').any(|t| t.trim() == "close")
        }
    }
}

/// A response head from the origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// `HTTP/1.1`.
    pub version: String,
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: String,
    /// Header lines.
    pub headers: Vec<(String, String)>,
}

/// Parses a response head from the front of `b`.
pub fn parse_response(b: &[u8]) -> Result<Option<(ResponseHead, usize)>, HttpError> {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if b.len() > MAX_HEAD * 4 {
            Err(HttpError::TooLarge)
        } else {
            Ok(None)
        };
    };
    let text =
        std::str::from_utf8(&b[..end]).map_err(|_| HttpError::BadRequest("response not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HttpError::BadRequest("bad status line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::BadRequest("bad response version"));
    }
    let status = code
        .parse::<u16>()
        .ok()
        .filter(|c| (100..600).contains(c))
        .ok_or(HttpError::BadRequest("bad status code"))?;
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() >= MAX_HEADERS * 2 {
            return Err(HttpError::TooLarge);
        }
        let (n, v) = line
            .split_once(':')
            .ok_or(HttpError::BadRequest("bad response header"))?;
        headers.push((n.to_string(), v.trim().to_string()));
    }
    Ok(Some((
        ResponseHead {
            version: version.to_string(),
            status,
            reason: parts.next().unwrap_or("").to_string(),
            headers,
        },
        end + 4,
    )))
}

impl ResponseHead {
    /// The body's framing for a response to `method`.
    pub fn body(&self, method: &str) -> Result<Body, HttpError> {
        if method == "HEAD"
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            return Ok(Body::None);
        }
        Ok(framing(&self.headers)?.unwrap_or(Body::UntilClose))
    }

    /// The head for the client: hop-by-hop headers removed; `keep` says
    /// whether the client connection stays open afterwards.
    pub fn client_head(&self, keep: bool) -> Vec<u8> {
        let named: Vec<String> = header_in(&self.headers, "connection")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .collect()
            })
            .unwrap_or_default();
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, self.reason);
        for (n, v) in &self.headers {
            let l = n.to_ascii_lowercase();
            if (HOP_BY_HOP.contains(&l.as_str()) && l != "transfer-encoding") || named.contains(&l)
            {
                continue;
            }
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str(if keep {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        out.into_bytes()
    }
}

/// Where a chunked body is while it is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a size line.
    Size,
    /// This many data bytes, then CRLF.
    Data(u64),
    /// Reading trailer lines after the last chunk.
    Trailers,
    /// Complete.
    Done,
}

/// Finds where a chunked body that starts at `b[0]` ends, incrementally:
/// feed it bytes as they come; it returns how many of them belong to the
/// body and whether the body is complete.
#[derive(Debug)]
pub struct ChunkedScanner {
    state: ChunkState,
    line: Vec<u8>,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        ChunkedScanner {
            state: ChunkState::Size,
            line: Vec::new(),
        }
    }
}

impl ChunkedScanner {
    /// Consumes from `b`; returns the bytes used, or an error for a
    /// malformed body.
    pub fn feed(&mut self, b: &[u8]) -> Result<usize, HttpError> {
        let mut i = 0;
        while i < b.len() && self.state != ChunkState::Done {
            match self.state {
                ChunkState::Data(n) => {
                    let take = (b.len() - i).min(n as usize);
                    i += take;
                    let left = n - take as u64;
                    self.state = ChunkState::Data(left);
                    if left == 0 {
                        // The data's CRLF is read as an (empty) size line.
                        self.state = ChunkState::Size;
                        self.line.clear();
                        self.line.push(b'\0');
                    }
                }
                ChunkState::Size | ChunkState::Trailers => {
                    let c = b[i];
                    i += 1;
                    if c != b'\n' {
                        if self.line.len() > 4096 {
                            return Err(HttpError::BadRequest("chunk line too long"));
                        }
                        self.line.push(c);
                        continue;
                    }
                    let mut line = std::mem::take(&mut self.line);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if line.first() == Some(&b'\0') {
                        // End of a chunk's data: must be an empty line.
                        if line.len() != 1 {
                            return Err(HttpError::BadRequest("missing CRLF after chunk"));
                        }
                        continue;
                    }
                    if self.state == ChunkState::Trailers {
                        if line.is_empty() {
                            self.state = ChunkState::Done;
                        }
                        continue;
                    }
                    let hex = line.split(|&c| c == b';').next().unwrap_or_default();
                    let hex = std::str::from_utf8(hex)
                        .map_err(|_| HttpError::BadRequest("bad chunk size"))?;
                    let n = u64::from_str_radix(hex.trim(), 16)
                        .map_err(|_| HttpError::BadRequest("bad chunk size"))?;
                    self.state = if n == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(n)
                    };
                }
                ChunkState::Done => {}
            }
        }
        Ok(i)
    }

    /// Whether the body is complete.
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
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
    fn chunked_bodies_end_where_they_end() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\nGET /next";
        // Whole, and byte by byte.
        let mut sc = ChunkedScanner::default();
        let used = sc.feed(body).expect("valid");
        assert!(sc.done());
        assert_eq!(&body[used..], b"GET /next");
        let mut sc = ChunkedScanner::default();
        let mut used = 0;
        for b in body.iter() {
            if sc.done() {
                break;
            }
            used += sc.feed(std::slice::from_ref(b)).expect("valid");
        }
        assert_eq!(&body[used..], b"GET /next");
        let mut bad = ChunkedScanner::default();
        assert!(bad.feed(b"zz\r\n").is_err());
        let mut bad = ChunkedScanner::default();
        assert!(bad.feed(b"1\r\nab\r\n").is_err());
    }

    #[test]
    fn framing_and_keep_alive() {
        let (r, _) = parse(b"POST http://x/ HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(r.body(), Ok(Body::Length(5)));
        assert!(r.keep_alive());
        let (r, _) = parse(b"POST http://x/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n").expect("ok").expect("complete");
        assert_eq!(r.body(), Ok(Body::Chunked));
        assert!(!r.keep_alive());
        let (r, _) = parse(b"GET http://x/ HTTP/1.0\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(r.body(), Ok(Body::None));
        assert!(!r.keep_alive());
        let (r, _) =
            parse(b"GET http://x/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .expect("ok")
                .expect("complete");
        assert!(r.body().is_err());
        let resp =
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\nabc";
        let (h, n) = parse_response(resp).expect("ok").expect("complete");
        assert_eq!(&resp[n..], b"abc");
        assert_eq!(h.body("GET"), Ok(Body::Length(3)));
        assert_eq!(h.body("HEAD"), Ok(Body::None));
        assert_eq!(
            String::from_utf8(h.client_head(true)).expect("utf8"),
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n"
        );
        let (h, _) = parse_response(b"HTTP/1.0 200 OK\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(h.body("GET"), Ok(Body::UntilClose));
        let (h, _) = parse_response(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(h.body("GET"), Ok(Body::None));
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
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
