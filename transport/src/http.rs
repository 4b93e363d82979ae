//! The HTTP face of warren's TLS transports (pure; no I/O): the request head
//! a client opens with, and what the server answers anyone who fails to
//! authenticate — the same bytes a plain web server with the decoy page would
//! send, never a distinctive error.

/// Largest request head the server reads.
pub const MAX_HEAD: usize = 8 * 1024;
/// The cookie that carries the token.
pub const COOKIE: &str = "sid";

/// A parsed request head (only what the server looks at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Request target, e.g. `/`.
    pub path: String,
    /// The `sid` cookie, if present.
    pub token: Option<String>,
}

/// Why a head could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Longer than [`MAX_HEAD`] without ending.
    TooLarge,
    /// Not HTTP/1.x.
    Malformed,
}

/// Parses a request head from the front of `b`: `Ok(None)` until the blank
/// line has arrived; then the head and the bytes it used.
pub fn parse_head(b: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if b.len() > MAX_HEAD {
            Err(HeadError::TooLarge)
        } else {
            Ok(None)
        };
    };
    if end > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let text = std::str::from_utf8(&b[..end]).map_err(|_| HeadError::Malformed)?;
    let mut lines = text.split("\r\n");
    let first = lines.next().ok_or(HeadError::Malformed)?;
    let mut parts = first.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed);
    };
    if !version.starts_with("HTTP/1.")
        || method.is_empty()
        || !method.bytes().all(|c| c.is_ascii_uppercase())
        || !path.starts_with('/')
    {
        return Err(HeadError::Malformed);
    }
    let mut token = None;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(HeadError::Malformed)?;
        if name.eq_ignore_ascii_case("cookie") {
            for c in value.split(';') {
                if let Some((k, v)) = c.trim().split_once('=')
                    && k == COOKIE
                {
                    token = Some(v.to_string());
                }
            }
        }
    }
    Ok(Some((
        RequestHead {
            method: method.to_string(),
            path: path.to_string(),
            token,
        },
        end + 4,
    )))
}

/// The client's opening request (looks like a browser fetching a page).
pub fn client_request(host: &str, token: &str) -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\nAccept: text/html,application/xhtml+xml,*/*;q=0.8\r\nAccept-Language: en-US,en;q=0.5\r\nCookie: {COOKIE}={token}\r\nConnection: keep-alive\r\n\r\n"
    )
    .into_bytes()
}

/// The answer to an authenticated client, after which the stream protocol
/// (`wire`) starts.
pub const ACCEPTED: &[u8] =
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/octet-stream\r\nCache-Control: no-store\r\n\r\n";

/// The decoy web server.
#[derive(Debug, Clone)]
pub struct Decoy {
    index: Vec<u8>,
}

const DEFAULT_PAGE: &str = "<!DOCTYPE html>\n<html>\n<head><title>Welcome</title></head>\n<body>\n<h1>It works.</h1>\n<p>This server is up.</p>\n</body>\n</html>\n";
const NOT_FOUND: &str = "<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
const BAD_REQUEST: &str = "<html>\r\n<head><title>400 Bad Request</title></head>\r\n<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

impl Default for Decoy {
    fn default() -> Self {
        Decoy {
            index: DEFAULT_PAGE.as_bytes().to_vec(),
        }
    }
}

impl Decoy {
    /// A decoy serving `index` at `/`.
    pub fn with_page(index: Vec<u8>) -> Self {
        Decoy { index }
    }

    /// What a plain web server answers to `head` (or to garbage, `None`).
    /// The connection is closed afterwards.
    pub fn respond(&self, head: Option<&RequestHead>) -> Vec<u8> {
        let (status, ctype, body, send_body): (&str, &str, &[u8], bool) = match head {
            None => ("400 Bad Request", "text/html", BAD_REQUEST.as_bytes(), true),
            Some(h) if h.method != "GET" && h.method != "HEAD" => {
                ("405 Not Allowed", "text/html", NOT_FOUND.as_bytes(), true)
            }
            Some(h) if h.path == "/" || h.path == "/index.html" => {
                ("200 OK", "text/html", &self.index, h.method == "GET")
            }
            Some(h) => (
                "404 Not Found",
                "text/html",
                NOT_FOUND.as_bytes(),
                h.method == "GET",
            ),
        };
        let mut out = format!(
            "HTTP/1.1 {status}\r\nServer: nginx\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if send_body {
            out.extend_from_slice(body);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn client_request_parses_with_token() {
        let req = client_request("vpn.example.test", "abc-_123");
        let (head, used) = parse_head(&req).expect("valid").expect("complete");
        assert_eq!(used, req.len());
        assert_eq!(head.token.as_deref(), Some("abc-_123"));
        assert_eq!(head.path, "/");
    }

    #[test]
    fn decoy_for_plain_get_equals_decoy_for_wrong_token() {
        let d = Decoy::default();
        let plain = parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("valid")
            .expect("complete")
            .0;
        let with_token = parse_head(&client_request("x", "bogus"))
            .expect("valid")
            .expect("complete")
            .0;
        assert_eq!(d.respond(Some(&plain)), d.respond(Some(&with_token)));
        assert!(d.respond(Some(&plain)).starts_with(b"HTTP/1.1 200 OK"));
    }

    #[test]
    fn garbage_and_oversized_heads() {
        assert_eq!(
            parse_head(b"\x16\x03\x01garbage\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        assert_eq!(parse_head(&[b'a'; MAX_HEAD + 1]), Err(HeadError::TooLarge));
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost"), Ok(None));
        assert!(Decoy::default().respond(None).starts_with(b"HTTP/1.1 400"));
    }

    proptest! {
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_head(&b);
        }
    }
}
