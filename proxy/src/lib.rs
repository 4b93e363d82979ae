//! `warren-proxy`: SOCKS5 and HTTP proxy intake and relay, as a library
//! with a thin binary shell (`warren proxy`, in `warren`). Protocol cores are
//! pure functions ([`socks5`], [`http`]); [`server`] is the async shell;
//! where connections go is an [`server::Egress`] (direct, a transport, an
//! instance's network), chosen per connection by [`rules`]. [`target`] is
//! where a connection goes and its address and datagram-frame codec;
//! [`status`] the counters and the control socket `warren status` reads.
//!
//! It may depend on `warren-dns` only: it knows nothing of instances,
//! transports or WireGuard, which build on it.

use warren_dns as dns;

pub mod env;
pub mod http;
pub mod io;
pub mod rules;
pub mod server;
pub mod socks5;
pub mod splice;
pub mod status;
pub mod target;
pub mod udpmux;
