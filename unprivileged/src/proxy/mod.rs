//! SOCKS5 and HTTP proxy intake and relay, as a library with a thin binary
//! shell (`warren proxy`). Protocol cores are pure functions
//! ([`socks5`], [`http`]); [`server`] is the async shell; where connections
//! go is an [`server::Egress`] (direct today; tunnels later).

pub mod http;
pub mod io;
pub mod server;
pub mod socks5;
pub mod splice;
pub mod status;
pub mod target;
pub mod udpmux;
