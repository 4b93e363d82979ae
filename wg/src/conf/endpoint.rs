//! A peer's `Endpoint`: an address or a name to look up.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::*;

// ---------------------------------------------------------------------------
// Endpoints

/// A peer's `Endpoint`: an address, or a host name resolved when the tunnel
/// comes up. Written `1.2.3.4:51820`, `[fd00::1]:51820` or
/// `vpn.example.com:51820`; serde uses the same text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Endpoint {
    /// An IP address and port.
    Addr(SocketAddr),
    /// A host name (validated, not yet resolved) and port.
    Name {
        /// The host name as written.
        host: String,
        /// The UDP port.
        port: u16,
    },
}

/// Why a string is not an endpoint.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct EndpointError(String);

impl Endpoint {
    /// The UDP port.
    pub fn port(&self) -> u16 {
        match self {
            Endpoint::Addr(a) => a.port(),
            Endpoint::Name { port, .. } => *port,
        }
    }

    /// The socket addresses to try: the address itself, or what the system
    /// resolver (`getaddrinfo`, through std's `ToSocketAddrs`) returns for
    /// the host name. Blocks while resolving.
    pub fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        match self {
            Endpoint::Addr(a) => Ok(vec![*a]),
            Endpoint::Name { host, port } => {
                let addrs: Vec<SocketAddr> = (host.as_str(), *port).to_socket_addrs()?.collect();
                if addrs.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{host} has no addresses"),
                    ));
                }
                Ok(addrs)
            }
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Addr(a) => write!(f, "{a}"),
            Endpoint::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        let e = |m: String| EndpointError(m);
        let s = s.trim();
        if s.is_empty() {
            return Err(e(
                "is empty; expected HOST:PORT, IPv4:PORT or [IPv6]:PORT".into()
            ));
        }
        if let Some(rest) = s.strip_prefix('[') {
            let Some((host, after)) = rest.split_once(']') else {
                return Err(e(format!(
                    "{s:?} has '[' without a matching ']'; expected [IPv6]:PORT"
                )));
            };
            let Some(port) = after.strip_prefix(':') else {
                return Err(e(format!(
                    "{s:?} has no port after ']'; expected [IPv6]:PORT"
                )));
            };
            if host.contains('%') {
                return Err(e(format!(
                    "{s:?} has an IPv6 scope (%...), which warren does not support"
                )));
            }
            let ip: IpAddr = host.parse().map_err(|_| {
                e(format!(
                    "[{host}] is not an IP address; only addresses go in brackets"
                ))
            })?;
            return Ok(Endpoint::Addr(SocketAddr::new(ip, endpoint_port(s, port)?)));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(e(format!(
                "{s:?} has no port; expected HOST:PORT, IPv4:PORT or [IPv6]:PORT"
            )));
        };
        if host.contains(':') {
            return Err(e(format!(
                "{s:?} looks like an IPv6 address without brackets; write [ADDRESS]:PORT"
            )));
        }
        let port = endpoint_port(s, port)?;
        if let Ok(v4) = host.parse::<Ipv4Addr>() {
            return Ok(Endpoint::Addr(SocketAddr::new(IpAddr::V4(v4), port)));
        }
        if !host.is_empty() && host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(e(format!("{host:?} is not a valid IPv4 address")));
        }
        if !valid_hostname(host) {
            return Err(e(format!(
                "{host:?} is neither an IP address nor a valid host name"
            )));
        }
        Ok(Endpoint::Name {
            host: host.to_owned(),
            port,
        })
    }
}

pub(super) fn endpoint_port(whole: &str, port: &str) -> Result<u16, EndpointError> {
    match parse_u16(port) {
        Some(p) if p != 0 => Ok(p),
        _ => Err(EndpointError(format!(
            "{whole:?} has port {port:?}; expected a port number from 1 to 65535"
        ))),
    }
}

impl TryFrom<String> for Endpoint {
    type Error = EndpointError;
    fn try_from(s: String) -> Result<Endpoint, EndpointError> {
        s.parse()
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.to_string()
    }
}
