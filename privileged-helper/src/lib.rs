//! `warren-helper`: the small root helper of warren.
//!
//! It alone creates TUN devices, routes, DNS settings, NAT and network
//! namespaces, on behalf of root and members of one authorized group, behind
//! intent-level operations (see `docs/architecture.md` and
//! `docs/security.md`). This library holds the helper's pieces so tests and
//! examples can drive them; the binary is a thin shell.

pub mod auth;
pub mod cgroups;
pub mod closer;
pub mod config;
pub mod hosttun;
pub mod instances;
pub mod journal;
pub mod listener;
pub mod nat;
pub mod netns;
pub mod privs;
pub mod runas;
pub mod server;
