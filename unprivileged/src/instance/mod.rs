//! Namespace instances: `warren up`, `down`, `exec`, and the worker that
//! runs inside each instance.
//!
//! `warren up NAME --wg FILE` (the client, in the host namespace) binds the
//! SOCKS5 and HTTP listeners, the SOCKS5 UDP relay socket and the tunnel's
//! UDP socket, asks the helper for the instance (a namespace with a TUN),
//! and has the helper spawn the worker in it as the calling user with
//! those descriptors. The configuration, keys included, goes to the worker
//! over a socket pair (never argv or environment); the worker answers once
//! the first handshake completed. The worker holds the instance's lease:
//! when it exits, however it exits, the helper removes the namespace.
//!
//! Descriptors of a worker (see [`worker`]):
//!
//! | fd | what |
//! |----|------|
//! | 0 | control socket (config in, readiness out) |
//! | 1, 2 | log file |
//! | 3 | TUN device |
//! | 4 | tunnel UDP socket (host namespace) |
//! | 5 | SOCKS5 listener (host namespace) |
//! | 6 | HTTP listener (host namespace) |
//! | 7 | SOCKS5 UDP relay socket (host namespace) |
//!
//! `warren up --host` (a full-host tunnel) starts the same worker itself,
//! without the helper's spawn: fds 0 to 4 as above, and fd 5 is the helper
//! connection that holds the host tunnel's lease (no proxies). When the
//! worker ends, the connection closes and the helper restores the host's
//! routes, rules, DNS and firewall.

pub mod forward;
pub mod net;
pub mod pty;
pub mod rootless;
pub mod userstack;
pub mod worker;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::wg::conf::WgConfig;

/// Descriptor numbers in the worker.
pub mod fds {
    /// Control socket.
    pub const CONTROL: i32 = 0;
    /// TUN device.
    pub const TUN: i32 = 3;
    /// Tunnel UDP socket.
    pub const UDP: i32 = 4;
    /// SOCKS5 listener.
    pub const SOCKS: i32 = 5;
    /// HTTP listener.
    pub const HTTP: i32 = 6;
    /// SOCKS5 UDP relay socket.
    pub const RELAY: i32 = 7;
    /// Host tunnels: the helper connection holding the lease.
    pub const HELPER: i32 = 5;
}

/// What `warren up` sends the worker (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// Instance name.
    pub name: String,
    /// The parsed wg-quick file, keys included.
    pub wg: WgConfig,
    /// Each peer's endpoint, resolved in the host namespace.
    pub endpoints: Vec<Option<SocketAddr>>,
    /// The host's DNS servers, for looking endpoint names up again.
    #[serde(default)]
    pub host_dns: Vec<std::net::IpAddr>,
    /// The TUN's MTU.
    pub mtu: u16,
    /// How long to wait for the first handshake.
    pub handshake_timeout_ms: u64,
    /// The listeners, for status output.
    pub socks: SocketAddr,
    /// The HTTP listener.
    pub http: SocketAddr,
    /// Connect timeout for proxied connections.
    pub connect_timeout_ms: u64,
    /// Most simultaneous proxied connections.
    pub max_connections: usize,
    /// Log at debug level.
    pub verbose: bool,
    /// A full-host tunnel (`warren up --host`): no proxies; fd 5 is the
    /// helper connection that holds the tunnel's lease.
    #[serde(default)]
    pub host: bool,
    /// Rootless (`warren up --rootless`): no helper; the worker makes its
    /// own user and network namespace, with this TUN configuration, and
    /// fd 3 is not passed.
    #[serde(default)]
    pub rootless: Option<warren_ipc::instance::InstanceSpec>,
    /// `--forward`s: their host-side sockets follow the configuration on
    /// the control socket, in this order.
    #[serde(default)]
    pub forwards: Vec<forward::Forward>,
    /// `--reverse`s: the connector's socket follows the forwards' sockets.
    #[serde(default)]
    pub reverses: Vec<forward::Forward>,
    /// Rootless only: which TCP/IP stack carries the traffic.
    #[serde(default)]
    pub stack: StackChoice,
    /// The helper's TUN (fd 3) was opened with a virtio header (TUN
    /// offloads). A rootless worker's own TUN follows `rootless.offload`.
    #[serde(default)]
    pub offload: bool,
}

/// Which TCP/IP stack a rootless instance uses (`warren up --stack`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StackChoice {
    /// The kernel's, in the worker's own user and network namespace; the
    /// userspace stack where user namespaces or the TUN device are not
    /// available to the user.
    #[default]
    Auto,
    /// The kernel's only (fail where it is not available).
    Kernel,
    /// The userspace stack (smoltcp) in any case.
    Userspace,
}

/// The worker's answer on the control socket (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum WorkerReport {
    /// The first handshake completed after this many ms.
    Ready {
        /// Time from the engine's start to the completed handshake.
        handshake_ms: u64,
        /// Which stack carries the traffic ("kernel" or "userspace").
        #[serde(default)]
        stack: String,
        /// Why the instance runs on the userspace stack, when that was a
        /// fallback (for the user).
        #[serde(default)]
        fallback: Option<String>,
    },
    /// The worker gives up.
    Failed {
        /// Why, for the user.
        reason: String,
    },
}

pub use crate::proxy::status::{InstanceStatus, PeerStatus, TunStatus};
