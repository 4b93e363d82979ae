//! `warren-ipc`: the protocol spoken between the unprivileged `warren`
//! process and the root helper `warren-helper`.
//!
//! The crate holds only what both sides must agree on:
//!
//! * [`handshake`]: the fixed 8-byte version handshake that opens every
//!   connection;
//! * [`frame`]: length-prefixed postcard frames with a hard size cap, as pure
//!   encode/decode functions that do no I/O (fuzzed, see `fuzz/`);
//! * [`msg`]: the request, response, event and error types;
//! * [`conn`]: an async framed connection over a Unix stream socket that
//!   carries file descriptors with `SCM_RIGHTS`.
//!
//! It contains no policy (who is authorized, which timeouts apply, what an
//! operation does): that lives in the helper. See `docs/protocol.md`.
#![deny(missing_docs)]

pub mod conn;
pub mod frame;
pub mod handshake;
pub mod instance;
pub mod msg;

pub use conn::{FramedConn, TransportError};
pub use frame::{FrameError, FrameHeader, HEADER_LEN, MAX_FDS_PER_FRAME, MAX_FRAME_LEN};
pub use handshake::{HandshakeError, PROTOCOL_VERSION};
pub use msg::{ClientFrame, Event, HelperError, Request, Response, ServerFrame};

/// Default path of the helper's socket.
pub const DEFAULT_SOCKET_PATH: &str = "/run/warren/helper.sock";

/// Environment variable the *client* reads to find a helper socket elsewhere.
/// The helper never reads it.
pub const SOCKET_ENV: &str = "WARREN_HELPER_SOCKET";
