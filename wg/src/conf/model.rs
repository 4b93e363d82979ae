//! The parsed configuration, and its errors.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use warren_ipc::instance::IpPrefix;

use super::*;

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

pub(super) fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(":{l}")).unwrap_or_default()
}

impl ConfError {
    pub(super) fn at(file: &Path, line: usize, message: impl Into<String>) -> ConfError {
        ConfError {
            file: file.to_owned(),
            line: Some(line),
            message: message.into(),
        }
    }

    pub(super) fn whole(file: &Path, message: impl Into<String>) -> ConfError {
        ConfError {
            file: file.to_owned(),
            line: None,
            message: message.into(),
        }
    }
}
