//! warren's own transports to its own exit (`warren server` / `warren client`):
//! TLS 1.3 that looks like HTTPS, one connection per stream (`tls`) or one
//! multiplexed session (`tls-mux`), with shared-secret authentication,
//! replay protection and a decoy web page for everyone else.
//! See docs/transports.md.
//!
//! `warren-transport` depends on `warren-proxy` only (the target and its
//! codec, the stream I/O helpers, the `Egress` a client serves as).

pub use warren_proxy::io;

pub mod auth;
pub mod client;
pub mod http;
pub mod server;
pub mod tlsconf;
pub mod wire;
