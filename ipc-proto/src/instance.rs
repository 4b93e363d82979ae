//! Types of the namespace-instance operations: validated names and
//! prefixes, what an instance is made of, what to spawn in it.
//!
//! Everything here is validated on construction *and* on deserialization
//! (`serde(try_from)`), so the helper never sees an invalid value, whatever
//! bytes a client sends.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Most addresses, routes or DNS servers in one request.
pub const MAX_LIST: usize = 32;
/// Most routes in one request (wg-quick files that carve private ranges
/// out of `0.0.0.0/0` list a few hundred prefixes).
pub const MAX_ROUTES: usize = 1024;
/// Most arguments, environment entries or bytes of one of them in a spawn.
pub const MAX_ARGS: usize = 256;
/// Longest argument, environment entry or path in a spawn.
pub const MAX_ARG_LEN: usize = 4096;

/// A value failed validation.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct Invalid {
    /// Which field.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field,
        reason: reason.into(),
    }
}

/// An instance name: 1 to 15 of `a-z 0-9 -`, starting with a letter or
/// digit. The helper derives every kernel name from it (`warren-NAME`
/// namespace, `/etc/netns/warren-NAME`), so it can never name anything
/// warren did not create.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InstanceName(String);

impl InstanceName {
    /// Validates a name.
    pub fn new(s: &str) -> Result<Self, Invalid> {
        let ok_len = (1..=15).contains(&s.len());
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok_len || !ok_chars || s.starts_with('-') {
            return Err(invalid(
                "name",
                "1 to 15 characters a-z, 0-9 and '-', not starting with '-'",
            ));
        }
        Ok(InstanceName(s.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The network namespace's name: `warren-NAME` (see [`KernelNames`]).
    pub fn netns(&self) -> String {
        KernelNames::of(ResourceKind::Instance, self)
            .netns
            .unwrap_or_default()
    }
}

/// The kinds of resource the helper creates. Names are unique across kinds
/// (one registry), but each kind derives its kernel names with a prefix of
/// its own, so two resources can never share a kernel object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// A namespace instance.
    Instance,
    /// A server tunnel (in the helper's namespace).
    Server,
    /// A host tunnel (in the helper's namespace).
    Host,
}

/// Every kernel or file name a resource gets, derived from its kind and
/// name in this one place. `None`: the kind has no such object.
///
/// | kind | netns | link in the host namespace | nftables table (inet) | state file |
/// | --- | --- | --- | --- | --- |
/// | instance | `warren-NAME` | – (its TUN lives in its own namespace) | – | – (`/etc/netns/warren-NAME`) |
/// | server | – | `wrsNAME` | `warren_s_NAME` | – |
/// | host | – | `wrhNAME` | `warren_h_NAME` | `host-NAME.resolv.conf` |
///
/// (`-` becomes `_` in table names; names never contain `_`, so this stays
/// injective.) Host tunnels' routing tables and fwmarks are slots (51820 +
/// n), handed out by the helper's registry, not names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelNames {
    /// Network namespace.
    pub netns: Option<String>,
    /// Link in the helper's (host's) namespace.
    pub link: Option<String>,
    /// nftables table (family inet).
    pub nft_table: Option<String>,
    /// File in the helper's state directory.
    pub state_file: Option<String>,
}

impl KernelNames {
    /// The names of resource `name` of kind `kind`.
    pub fn of(kind: ResourceKind, name: &InstanceName) -> KernelNames {
        let n = name.as_str();
        let table = |k: &str| Some(format!("warren_{k}_{}", n.replace('-', "_")));
        match kind {
            ResourceKind::Instance => KernelNames {
                netns: Some(format!("warren-{n}")),
                link: None,
                nft_table: None,
                state_file: None,
            },
            ResourceKind::Server => KernelNames {
                netns: None,
                link: Some(format!("wrs{n}")),
                nft_table: table("s"),
                state_file: None,
            },
            ResourceKind::Host => KernelNames {
                netns: None,
                link: Some(format!("wrh{n}")),
                nft_table: table("h"),
                state_file: Some(format!("host-{n}.resolv.conf")),
            },
        }
    }
}

impl TryFrom<String> for InstanceName {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
        InstanceName::new(&s)
    }
}

impl From<InstanceName> for String {
    fn from(n: InstanceName) -> String {
        n.0
    }
}

impl std::fmt::Display for InstanceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An address with a prefix length (`198.18.0.2/32`, `fd00::2/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "(IpAddr, u8)", into = "(IpAddr, u8)")]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    /// Validates the prefix length for the address family.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, Invalid> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(invalid("prefix", format!("/{len} is longer than /{max}")));
        }
        Ok(IpPrefix { addr, len })
    }

    /// The address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether this is a zero-length (default) prefix.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The network it names: the address with its host bits cleared
    /// (`198.18.5.1/24` -> `198.18.5.0/24`).
    pub fn network(&self) -> IpPrefix {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let m = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & m).into())
            }
            IpAddr::V6(a) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & m).into())
            }
        };
        IpPrefix {
            addr,
            len: self.len,
        }
    }

    /// Whether every address of `other`'s network is in this network (same
    /// family only).
    pub fn contains(&self, other: &IpPrefix) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4()
            && other.len >= self.len
            && IpPrefix {
                addr: other.addr,
                len: self.len,
            }
            .network()
                == self.network()
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &IpPrefix) -> bool {
        self.contains(other) || other.contains(self)
    }
}

impl TryFrom<(IpAddr, u8)> for IpPrefix {
    type Error = Invalid;
    fn try_from((a, l): (IpAddr, u8)) -> Result<Self, Invalid> {
        IpPrefix::new(a, l)
    }
}

impl From<IpPrefix> for (IpAddr, u8) {
    fn from(p: IpPrefix) -> (IpAddr, u8) {
        (p.addr, p.len)
    }
}

impl std::fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for IpPrefix {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| invalid("prefix", format!("{a:?} is not an IP address")))?;
        let len = match l {
            Some(l) => l
                .trim()
                .parse()
                .map_err(|_| invalid("prefix", format!("{l:?} is not a prefix length")))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        IpPrefix::new(addr, len)
    }
}

/// What a namespace instance is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawInstanceSpec")]
pub struct InstanceSpec {
    /// Its name.
    pub name: InstanceName,
    /// The TUN device's MTU (576..=9000).
    pub mtu: u16,
    /// The tunnel's inner addresses (at least one).
    pub addresses: Vec<IpPrefix>,
    /// What is routed into the tunnel (the peers' allowed IPs).
    pub routes: Vec<IpPrefix>,
    /// DNS servers for the namespace's resolv.conf.
    pub dns: Vec<IpAddr>,
    /// Search domains for that resolv.conf (see [`check_search`]).
    pub search: Vec<String>,
    /// Open the TUN with `IFF_VNET_HDR` (virtio header on every packet:
    /// TCP segmentation and coalescing offloads). Off by default.
    pub offload: bool,
}

/// The `lease` of an [`InstanceInfo`] that a previous helper left behind and
/// the current one could not remove (its journal keeps it; `warren status`
/// shows it and `warren down NAME` retries).
pub const ORPHAN_LEASE: &str =
    "orphan: removal failed (see the helper's log; `warren down NAME` retries)";

/// The `lease` of an [`InstanceInfo`] that is a host tunnel's kill switch
/// left blocking after its tunnel ended without `warren down`.
pub const KILL_SWITCH_LEASE: &str = "kill switch: its tunnel ended; all traffic stays blocked until `warren down NAME` (or the tunnel is up again)";

/// Most search domains (glibc reads at most 6).
pub const MAX_SEARCH: usize = 6;

/// Checks search domains: at most [`MAX_SEARCH`], each a host name of at
/// most 253 bytes (letters, digits, `-`, `_`, dots; no empty label), so
/// that nothing but a `search` line can come of them in resolv.conf.
pub fn check_search(search: &[String]) -> Result<(), Invalid> {
    if search.len() > MAX_SEARCH {
        return Err(invalid(
            "search",
            format!("at most {MAX_SEARCH} search domains"),
        ));
    }
    for d in search {
        let ok = !d.is_empty()
            && d.len() <= 253
            && d.trim_end_matches('.').split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !ok {
            return Err(invalid("search", format!("{d:?} is not a domain name")));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct RawInstanceSpec {
    name: InstanceName,
    mtu: u16,
    addresses: Vec<IpPrefix>,
    routes: Vec<IpPrefix>,
    dns: Vec<IpAddr>,
    search: Vec<String>,
    offload: bool,
}

impl TryFrom<RawInstanceSpec> for InstanceSpec {
    type Error = Invalid;
    fn try_from(r: RawInstanceSpec) -> Result<Self, Invalid> {
        InstanceSpec::new(r.name, r.mtu, r.addresses, r.routes, r.dns)?
            .with_offload(r.offload)
            .with_search(r.search)
    }
}

impl InstanceSpec {
    /// Validates a spec.
    pub fn new(
        name: InstanceName,
        mtu: u16,
        addresses: Vec<IpPrefix>,
        routes: Vec<IpPrefix>,
        dns: Vec<IpAddr>,
    ) -> Result<Self, Invalid> {
        if !(576..=9000).contains(&mtu) {
            return Err(invalid("mtu", "must be between 576 and 9000"));
        }
        if addresses.is_empty() {
            return Err(invalid("addresses", "at least one address is needed"));
        }
        for (field, n, max) in [
            ("addresses", addresses.len(), MAX_LIST),
            ("routes", routes.len(), MAX_ROUTES),
            ("dns", dns.len(), MAX_LIST),
        ] {
            if n > max {
                return Err(invalid(field, format!("at most {max} entries")));
            }
        }
        if mtu < 1280 && addresses.iter().any(|a| a.addr().is_ipv6()) {
            return Err(invalid("mtu", "IPv6 needs an MTU of at least 1280"));
        }
        Ok(InstanceSpec {
            name,
            mtu,
            addresses,
            routes,
            dns,
            search: Vec::new(),
            offload: false,
        })
    }

    /// The same spec with TUN offloads on or off.
    #[must_use]
    pub fn with_offload(mut self, on: bool) -> Self {
        self.offload = on;
        self
    }

    /// The same spec with these search domains (checked).
    pub fn with_search(mut self, search: Vec<String>) -> Result<Self, Invalid> {
        check_search(&search)?;
        self.search = search;
        Ok(self)
    }

    /// Whether the instance has any IPv6 address.
    pub fn has_ipv6(&self) -> bool {
        self.addresses.iter().any(|a| a.addr().is_ipv6())
    }
}

/// A server tunnel: a TUN device in the helper's own network namespace
/// whose traffic is forwarded and masqueraded out of the host's default
/// route (a WireGuard exit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawServerTunnelSpec")]
pub struct ServerTunnelSpec {
    /// Its name (at most 12 characters: the TUN is `wrs` + name).
    pub name: InstanceName,
    /// The TUN's MTU.
    pub mtu: u16,
    /// The tunnel's addresses with their subnets (`198.19.5.1/24`): traffic
    /// from these subnets is forwarded and masqueraded.
    pub addresses: Vec<IpPrefix>,
    /// Open the TUN with `IFF_VNET_HDR` (see [`InstanceSpec::offload`]).
    pub offload: bool,
}

#[derive(Deserialize)]
struct RawServerTunnelSpec {
    name: InstanceName,
    mtu: u16,
    addresses: Vec<IpPrefix>,
    offload: bool,
}

impl TryFrom<RawServerTunnelSpec> for ServerTunnelSpec {
    type Error = Invalid;
    fn try_from(r: RawServerTunnelSpec) -> Result<Self, Invalid> {
        Ok(ServerTunnelSpec::new(r.name, r.mtu, r.addresses)?.with_offload(r.offload))
    }
}

impl ServerTunnelSpec {
    /// Validates a spec.
    pub fn new(name: InstanceName, mtu: u16, addresses: Vec<IpPrefix>) -> Result<Self, Invalid> {
        if name.as_str().len() > 12 {
            return Err(invalid("name", "at most 12 characters for a server tunnel"));
        }
        // The same checks as an instance's.
        InstanceSpec::new(name.clone(), mtu, addresses.clone(), vec![], vec![])?;
        Ok(ServerTunnelSpec {
            name,
            mtu,
            addresses,
            offload: false,
        })
    }

    /// The same spec with TUN offloads on or off.
    #[must_use]
    pub fn with_offload(mut self, on: bool) -> Self {
        self.offload = on;
        self
    }

    /// The TUN device's name (see [`KernelNames`]).
    pub fn ifname(&self) -> String {
        self.names().link.unwrap_or_default()
    }

    /// Its kernel names.
    pub fn names(&self) -> KernelNames {
        KernelNames::of(ResourceKind::Server, &self.name)
    }
}

/// What CreateServerTunnel made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerTunnelInfo {
    /// Its name.
    pub name: InstanceName,
    /// The TUN device.
    pub ifname: String,
    /// The interface traffic is masqueraded out of.
    pub egress: String,
}

/// A host tunnel: the whole host (the helper's network namespace) routed
/// through a TUN device the way wg-quick does it (own routing table, fwmark
/// rule, `suppress_prefixlength 0`), DNS switched to the tunnel's, and an
/// optional kill switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawHostTunnelSpec")]
pub struct HostTunnelSpec {
    /// Its name (at most 12 characters: the TUN is `wrh` + name).
    pub name: InstanceName,
    /// The TUN's MTU.
    pub mtu: u16,
    /// The tunnel's inner addresses.
    pub addresses: Vec<IpPrefix>,
    /// What goes through the tunnel (allowed IPs; `0.0.0.0/0`, `::/0` for
    /// everything).
    pub routes: Vec<IpPrefix>,
    /// DNS servers while the tunnel is up (none: DNS left alone).
    pub dns: Vec<IpAddr>,
    /// Search domains while the tunnel is up (see [`check_search`]).
    pub search: Vec<String>,
    /// Drop everything that does not leave through the tunnel (or is the
    /// tunnel's own encrypted traffic), and anything arriving for the
    /// tunnel's addresses on other interfaces.
    pub kill_switch: bool,
    /// The peers' endpoints (protocol version 5). Under the kill switch,
    /// the marked UDP socket may send only to these (issue 14, finding 6):
    /// the mark bypasses the tunnel, so to anywhere else it would be a way
    /// out in the clear.
    pub endpoints: Vec<SocketAddr>,
}

/// Most endpoints a host tunnel lists.
pub const MAX_ENDPOINTS: usize = 64;

#[derive(Deserialize)]
struct RawHostTunnelSpec {
    name: InstanceName,
    mtu: u16,
    addresses: Vec<IpPrefix>,
    routes: Vec<IpPrefix>,
    dns: Vec<IpAddr>,
    search: Vec<String>,
    kill_switch: bool,
    endpoints: Vec<SocketAddr>,
}

impl TryFrom<RawHostTunnelSpec> for HostTunnelSpec {
    type Error = Invalid;
    fn try_from(r: RawHostTunnelSpec) -> Result<Self, Invalid> {
        HostTunnelSpec::new(r.name, r.mtu, r.addresses, r.routes, r.dns, r.kill_switch)?
            .with_search(r.search)?
            .with_endpoints(r.endpoints)
    }
}

impl HostTunnelSpec {
    /// Validates a spec.
    pub fn new(
        name: InstanceName,
        mtu: u16,
        addresses: Vec<IpPrefix>,
        routes: Vec<IpPrefix>,
        dns: Vec<IpAddr>,
        kill_switch: bool,
    ) -> Result<Self, Invalid> {
        if name.as_str().len() > 12 {
            return Err(invalid("name", "at most 12 characters for a host tunnel"));
        }
        let checked = InstanceSpec::new(name, mtu, addresses, routes, dns)?;
        if checked.routes.is_empty() {
            return Err(invalid("routes", "at least one route is needed"));
        }
        Ok(HostTunnelSpec {
            name: checked.name,
            mtu,
            addresses: checked.addresses,
            routes: checked.routes,
            dns: checked.dns,
            search: Vec::new(),
            kill_switch,
            endpoints: Vec::new(),
        })
    }

    /// The same spec with these peer endpoints: at most
    /// [`MAX_ENDPOINTS`], each with a port and a specific address.
    pub fn with_endpoints(mut self, endpoints: Vec<SocketAddr>) -> Result<Self, Invalid> {
        if endpoints.len() > MAX_ENDPOINTS {
            return Err(invalid("endpoints", format!("at most {MAX_ENDPOINTS}")));
        }
        if let Some(e) = endpoints
            .iter()
            .find(|e| e.port() == 0 || e.ip().is_unspecified() || e.ip().is_multicast())
        {
            return Err(invalid(
                "endpoints",
                format!("{e}: needs a port and a unicast address"),
            ));
        }
        self.endpoints = endpoints;
        Ok(self)
    }

    /// The same spec with these search domains (checked).
    pub fn with_search(mut self, search: Vec<String>) -> Result<Self, Invalid> {
        check_search(&search)?;
        self.search = search;
        Ok(self)
    }

    /// The TUN device's name (see [`KernelNames`]).
    pub fn ifname(&self) -> String {
        self.names().link.unwrap_or_default()
    }

    /// Its kernel names.
    pub fn names(&self) -> KernelNames {
        KernelNames::of(ResourceKind::Host, &self.name)
    }
}

/// What CreateHostTunnel made. The reply carries two descriptors: the TUN
/// device, and a UDP socket carrying the tunnel's fwmark (so the encrypted
/// traffic bypasses the tunnel) for the WireGuard engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostTunnelInfo {
    /// Its name.
    pub name: InstanceName,
    /// The TUN device.
    pub ifname: String,
    /// Routing table holding the tunnel's routes.
    pub table: u32,
    /// The fwmark of the returned UDP socket.
    pub fwmark: u32,
}

/// A program to run inside an instance, as the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawSpawnSpec")]
pub struct SpawnSpec {
    /// The instance to run in.
    pub instance: InstanceName,
    /// Program and arguments (`argv[0]` is the program, found via `PATH`
    /// in `env` if it has no slash).
    pub argv: Vec<String>,
    /// The whole environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory (entered after dropping to the caller's ids).
    pub cwd: String,
    /// The descriptors sent with the request become the program's 0, 1, 2,
    /// 3...: this many of them.
    pub n_fds: u8,
    /// Give the program a private mount namespace in which /etc/resolv.conf
    /// is the instance's.
    pub private_resolv: bool,
    /// The instance lives as long as this program: when it exits, the
    /// helper removes the instance (a worker's lease).
    pub bind_lease: bool,
    /// Make descriptor 0 (a terminal, e.g. a pseudo-terminal the client
    /// opened) the program's controlling terminal. Done after the drop to
    /// the caller's ids, without stealing: a terminal that already belongs
    /// to another session stays where it is (the program then has none).
    pub controlling_tty: bool,
}

#[derive(Deserialize)]
struct RawSpawnSpec {
    instance: InstanceName,
    argv: Vec<String>,
    env: Vec<String>,
    cwd: String,
    n_fds: u8,
    private_resolv: bool,
    bind_lease: bool,
    controlling_tty: bool,
}

impl TryFrom<RawSpawnSpec> for SpawnSpec {
    type Error = Invalid;
    fn try_from(r: RawSpawnSpec) -> Result<Self, Invalid> {
        let s = SpawnSpec {
            instance: r.instance,
            argv: r.argv,
            env: r.env,
            cwd: r.cwd,
            n_fds: r.n_fds,
            private_resolv: r.private_resolv,
            bind_lease: r.bind_lease,
            controlling_tty: r.controlling_tty,
        };
        s.validate()?;
        Ok(s)
    }
}

impl SpawnSpec {
    /// Checks sizes and shapes (no NUL bytes, `KEY=VALUE`, absolute cwd).
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(invalid("argv", "a program is needed"));
        }
        if self.argv.len() > MAX_ARGS || self.env.len() > MAX_ARGS {
            return Err(invalid("argv", format!("at most {MAX_ARGS} entries")));
        }
        let all = self
            .argv
            .iter()
            .chain(&self.env)
            .chain(std::iter::once(&self.cwd));
        for s in all {
            if s.len() > MAX_ARG_LEN || s.contains('\0') {
                return Err(invalid(
                    "argv",
                    format!("entries must be under {MAX_ARG_LEN} bytes without NUL"),
                ));
            }
        }
        if self
            .env
            .iter()
            .any(|e| !e.contains('=') || e.starts_with('='))
        {
            return Err(invalid("env", "entries must be KEY=VALUE"));
        }
        if !self.cwd.starts_with('/') {
            return Err(invalid("cwd", "must be an absolute path"));
        }
        if usize::from(self.n_fds) > crate::MAX_FDS_PER_FRAME {
            return Err(invalid("n_fds", "too many descriptors"));
        }
        Ok(())
    }
}

/// What `List` reports per instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Its name.
    pub name: InstanceName,
    /// Its network namespace (`warren-NAME`).
    pub netns: String,
    /// The TUN device inside it.
    pub tun: String,
    /// The owner's uid.
    pub owner_uid: u32,
    /// What keeps it alive: `connection` or `worker PID`.
    pub lease: String,
    /// Addresses (details are shown to the owner and root only).
    pub addresses: Vec<IpPrefix>,
}

/// How a spawned program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(InstanceName::new("work-1").is_ok());
        for bad in [
            "",
            "-x",
            "UPPER",
            "a/b",
            "../etc",
            "sixteen-chars-xx",
            "a b",
        ] {
            assert!(InstanceName::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            InstanceName::new("exit").expect("valid").netns(),
            "warren-exit"
        );
    }

    #[test]
    fn invalid_values_do_not_deserialize() {
        let bad = postcard::to_allocvec(&("../x".to_string(),)).expect("encode");
        assert!(postcard::from_bytes::<(InstanceName,)>(&bad).is_err());
        let p: (IpAddr, u8) = ("198.18.0.1".parse().expect("ip"), 33);
        let enc = postcard::to_allocvec(&p).expect("encode");
        assert!(postcard::from_bytes::<IpPrefix>(&enc).is_err());
    }

    #[test]
    fn search_domains_are_names_only() {
        let ok = |v: &[&str]| check_search(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&["corp.example", "lab", "a-b.c_d.example."]).is_ok());
        for bad in [
            "",
            "a b",
            "x\nnameserver 198.18.0.1",
            "-lead.example",
            "a..b",
            "semi;colon",
        ] {
            assert!(ok(&[bad]).is_err(), "{bad:?}");
        }
        assert!(ok(&["a"; MAX_SEARCH + 1]).is_err());
        // And a spec carrying a bad one does not decode.
        let mut spec = InstanceSpec::new(
            InstanceName::new("s").expect("name"),
            1420,
            vec!["198.18.0.2/32".parse().expect("prefix")],
            vec![],
            vec![],
        )
        .expect("spec");
        spec.search = vec!["x\nnameserver 198.18.0.9".into()];
        let enc = postcard::to_allocvec(&spec).expect("encode");
        assert!(postcard::from_bytes::<InstanceSpec>(&enc).is_err());
        spec.search = vec!["corp.example".into()];
        let enc = postcard::to_allocvec(&spec).expect("encode");
        assert_eq!(
            postcard::from_bytes::<InstanceSpec>(&enc).expect("decode"),
            spec
        );
    }

    #[test]
    fn prefixes_parse() {
        let p: IpPrefix = "198.18.0.2/24".parse().expect("prefix");
        assert_eq!((p.addr().to_string(), p.len()), ("198.18.0.2".into(), 24));
        let p: IpPrefix = "fd00::2".parse().expect("prefix");
        assert_eq!(p.len(), 128);
        assert!("198.18.0.2/40".parse::<IpPrefix>().is_err());
    }

    #[test]
    fn finding_4_prefix_containment_and_overlap() {
        let p = |s: &str| s.parse::<IpPrefix>().expect("prefix");
        assert_eq!(p("198.18.5.1/24").network(), p("198.18.5.0/24"));
        assert_eq!(p("fd00:1::5/64").network(), p("fd00:1::/64"));
        assert_eq!(p("1.2.3.4/0").network(), p("0.0.0.0/0"));
        let pool = p("198.18.0.0/15");
        assert!(pool.contains(&p("198.19.61.1/24")));
        assert!(pool.contains(&p("198.18.0.0/15")));
        assert!(!pool.contains(&p("198.18.0.1/14")), "wider than the pool");
        assert!(!pool.contains(&p("1.1.1.2/24")));
        assert!(!pool.contains(&p("fd00::1/64")), "other family");
        assert!(p("fd00::/8").contains(&p("fd00:61::1/64")));
        assert!(p("198.18.54.0/24").overlaps(&p("198.18.54.7/32")));
        assert!(p("198.18.54.7/32").overlaps(&p("198.18.0.0/16")));
        assert!(!p("198.18.54.0/24").overlaps(&p("198.18.55.0/24")));
        assert!(!p("198.18.54.0/24").overlaps(&p("fd00::/8")));
    }

    #[test]
    fn spawn_specs_validate() {
        let ok = SpawnSpec {
            instance: InstanceName::new("a").expect("name"),
            argv: vec!["id".into()],
            env: vec!["PATH=/usr/bin:/bin".into()],
            cwd: "/".into(),
            n_fds: 3,
            private_resolv: true,
            bind_lease: false,
            controlling_tty: false,
        };
        assert!(ok.validate().is_ok());
        let mut bad = ok.clone();
        bad.env = vec!["NOEQUALS".into()];
        assert!(bad.validate().is_err());
        let mut bad = ok.clone();
        bad.cwd = "relative".into();
        assert!(bad.validate().is_err());
        let mut bad = ok;
        bad.argv = vec![];
        assert!(bad.validate().is_err());
    }

    fn arb_kind_name() -> impl proptest::strategy::Strategy<Value = (ResourceKind, InstanceName)> {
        use proptest::prelude::*;
        (
            prop_oneof![
                Just(ResourceKind::Instance),
                Just(ResourceKind::Server),
                Just(ResourceKind::Host)
            ],
            "[a-z0-9][a-z0-9-]{0,14}",
        )
            .prop_map(|(k, n)| {
                // Tunnels' names have at most 12 characters.
                let n = if k == ResourceKind::Instance {
                    n
                } else {
                    n.chars().take(12).collect()
                };
                (k, InstanceName::new(&n).expect("valid"))
            })
    }

    proptest::proptest! {
        /// Finding 3 (issue 14): no two resources, of the same kind or
        /// not, ever share a kernel object; link names fit IFNAMSIZ.
        #[test]
        fn finding_3_kernel_names_are_injective_across_kinds(
            a in arb_kind_name(),
            b in arb_kind_name(),
        ) {
            let (na, nb) = (KernelNames::of(a.0, &a.1), KernelNames::of(b.0, &b.1));
            for n in [&na, &nb] {
                proptest::prop_assert!(n.link.as_ref().is_none_or(|l| l.len() <= 15));
            }
            if a != b {
                for (x, y) in [
                    (&na.netns, &nb.netns),
                    (&na.link, &nb.link),
                    (&na.nft_table, &nb.nft_table),
                    (&na.state_file, &nb.state_file),
                ] {
                    if let (Some(x), Some(y)) = (x, y) {
                        proptest::prop_assert_ne!(x, y);
                    }
                }
            }
        }
    }

    #[test]
    fn finding_3_host_and_server_tables_differ_for_h_prefixed_names() {
        let server = KernelNames::of(
            ResourceKind::Server,
            &InstanceName::new("h-foo").expect("n"),
        );
        let host = KernelNames::of(ResourceKind::Host, &InstanceName::new("foo").expect("n"));
        assert_ne!(server.nft_table, host.nft_table);
    }
}
