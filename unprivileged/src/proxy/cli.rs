//! `warren proxy` and `warren config` command-line entry points.

use std::process::ExitCode;

/// Arguments of `warren proxy`.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {}

/// Arguments of `warren config`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {}

/// Runs `warren proxy`.
pub fn run_proxy(_args: ProxyArgs) -> ExitCode {
    eprintln!("warren proxy: not built yet");
    crate::exit::code(crate::exit::FAILURE)
}

/// Runs `warren config`.
pub fn run_config(_args: ConfigArgs) -> ExitCode {
    eprintln!("warren config: not built yet");
    crate::exit::code(crate::exit::FAILURE)
}
