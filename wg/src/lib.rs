//! `warren-wg`: WireGuard for warren. The wg-quick file format ([`conf`]:
//! model and strict parser), the userspace engine around boringtun's `Tunn`
//! ([`engine`]: one thread, batched UDP, endpoint re-lookup), and the TUN
//! offloads it uses ([`offload`]: virtio header, merged TCP writes, TSO
//! reads).
//!
//! It depends on `warren-dns` (endpoint names) and `warren-ipc` (prefixes)
//! only; instances, the helper and the command line build on it.

use warren_dns as dns;

pub mod conf;
pub mod engine;
pub mod offload;
