//! `warren`: the unprivileged half of warren.
//!
//! This crate never needs root. It holds the command-line interface, the
//! typed client of the root helper ([`helper_client`]), and the proxy intake
//! with its routing rules ([`proxy`]). The helper protocol itself lives in
//! `warren-ipc`; see `docs/architecture.md` for how the pieces fit.

pub mod autostart;
pub mod cli;
pub mod client_config;
pub mod config;
pub mod demo;
pub use warren_dns as dns;
pub mod exit;
pub mod helper_client;
pub mod instance;
pub mod logging;
pub use warren_proxy as proxy;
pub use warren_proxy::rules;
pub use warren_transport as transport;
pub use warren_wg as wg;
