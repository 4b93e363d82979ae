//! The parser: wg-quick text to [`WgConfig`], strict, with warnings.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use warren_ipc::instance::IpPrefix;
use zeroize::Zeroizing;

use super::*;

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

pub(super) const INTERFACE_KEYS: &str = "PrivateKey, Address, DNS, MTU, ListenPort";
pub(super) const PEER_KEYS: &str =
    "PublicKey, PresharedKey, Endpoint, AllowedIPs, PersistentKeepalive";
/// Longer "key names" are not echoed: they may be pasted base64 keys.
pub(super) const MAX_KEY_NAME: usize = 32;
pub(super) const HOOKS: &str = "warren does not run wg-quick hooks";

/// `[Interface]` keys that are accepted, warned about and not acted on.
pub(super) const IGNORED_INTERFACE_KEYS: &[(&str, &str)] = &[
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
pub(super) enum Section {
    None,
    Interface,
    Peer,
}

pub(super) struct IfaceBuilder {
    line: usize,
    seen: Vec<(&'static str, usize)>,
    private_key: Option<Key>,
    addresses: Vec<(IpPrefix, usize)>,
    dns: Vec<IpAddr>,
    dns_search: Vec<String>,
    mtu: Option<(u16, usize)>,
    listen_port: Option<u16>,
}

pub(super) struct PeerBuilder {
    line: usize,
    seen: Vec<(&'static str, usize)>,
    public_key: Option<(PublicKey32, usize)>,
    preshared_key: Option<Key>,
    endpoint: Option<Endpoint>,
    allowed_ips: Vec<(IpPrefix, usize)>,
    persistent_keepalive: Option<u16>,
}

pub(super) struct Parser<'a> {
    file: &'a Path,
    warnings: Vec<String>,
}

/// Digits only (no sign, no spaces), fitting in a `u16`.
pub(super) fn parse_u16(s: &str) -> Option<u16> {
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
pub(super) fn mask(p: IpPrefix) -> IpPrefix {
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
pub(super) fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
}

pub(super) fn is_key(key: &str, name: &str) -> bool {
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
