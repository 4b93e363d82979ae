//! WireGuard: the wg-quick file format ([`conf`]) and the userspace engine
//! around boringtun's `Tunn` ([`engine`]).

pub mod conf;
pub mod engine;
pub mod offload;
pub mod server;
