//! Exit codes that scripts can rely on. Documented in the README
//! ("Exit codes") and in `warren --help`.

use std::process::ExitCode;

/// Success.
pub const OK: u8 = 0;
/// A failure not covered by a more specific code below.
pub const FAILURE: u8 = 1;
/// The command line was invalid (clap's own code).
pub const USAGE: u8 = 2;
/// The helper could not be reached: no socket, or nobody listening on it.
pub const HELPER_UNAVAILABLE: u8 = 3;
/// This user may not use the helper: the socket's permissions keep them
/// out, or the helper refused them (not root, not in the authorized group).
pub const NOT_AUTHORIZED: u8 = 4;
/// The helper speaks an incompatible protocol version or answered garbage.
pub const PROTOCOL: u8 = 5;
/// A configuration file is invalid.
pub const CONFIG: u8 = 6;

/// Converts a code above into an [`ExitCode`].
pub fn code(c: u8) -> ExitCode {
    ExitCode::from(c)
}
