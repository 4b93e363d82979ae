//! `warren proxy`.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::server::{Access, Direct, Protocol, Settings, serve};
use crate::exit;

/// Arguments of `warren proxy`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Listeners on addresses other than loopback refuse every client unless it is
in an --allow network or (SOCKS5) authenticates with --user and the password
in WARREN_PROXY_PASSWORD.

Examples:
  warren proxy                                 # 127.0.0.1:1080 (SOCKS5), 127.0.0.1:8118 (HTTP)
  curl --socks5-hostname 127.0.0.1:1080 http://example.org/
  curl -x http://127.0.0.1:8118 http://example.org/")]
pub struct ProxyArgs {
    /// SOCKS5 listener ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:1080")]
    pub socks: String,
    /// HTTP proxy listener ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:8118")]
    pub http: String,
    /// Client network allowed without credentials (CIDR; repeatable).
    /// Without --user, loopback is allowed by default; with --user, only
    /// these networks skip authentication.
    #[arg(long = "allow", value_name = "CIDR")]
    pub allow: Vec<String>,
    /// SOCKS5 username required from clients outside --allow (password from
    /// WARREN_PROXY_PASSWORD).
    #[arg(long)]
    pub user: Option<String>,
    /// Most simultaneous connections.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// Connect timeout in seconds.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout: u64,
    /// Log every connection (debug level).
    #[arg(short, long)]
    pub verbose: bool,
}

fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, l) = s.split_once('/').unwrap_or((s, ""));
    let ip: IpAddr = a
        .parse()
        .map_err(|_| format!("--allow {s}: not an address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = if l.is_empty() {
        max
    } else {
        l.parse::<u8>()
            .ok()
            .filter(|&n| n <= max)
            .ok_or(format!("--allow {s}: bad prefix length"))?
    };
    Ok((ip, len))
}

fn listener(s: &str, what: &str) -> Result<Option<SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| format!("--{what} {s}: expected ADDRESS:PORT or \"off\""))
}

/// Runs `warren proxy`.
pub fn run_proxy(args: ProxyArgs) -> ExitCode {
    crate::cli::init_logging(args.verbose);
    let usage = |m: String| {
        eprintln!("warren proxy: {m}");
        exit::code(exit::USAGE)
    };
    let (socks, http) = match (listener(&args.socks, "socks"), listener(&args.http, "http")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return usage(e),
    };
    let mut allow = if args.user.is_none() {
        vec![
            ("127.0.0.0".parse().expect("literal"), 8),
            ("::1".parse().expect("literal"), 128),
        ]
    } else {
        Vec::new()
    };
    for c in &args.allow {
        match parse_cidr(c) {
            Ok(x) => allow.push(x),
            Err(e) => return usage(e),
        }
    }
    let credentials = match (&args.user, std::env::var("WARREN_PROXY_PASSWORD").ok()) {
        (Some(u), Some(p)) if !p.is_empty() => Some((u.clone(), p)),
        (Some(_), _) => return usage("--user needs the password in WARREN_PROXY_PASSWORD".into()),
        (None, _) => None,
    };
    let settings = Arc::new(Settings {
        access: Access { allow, credentials },
        max_connections: args.max_connections.max(1),
        ..Settings::default()
    });
    let egress = Arc::new(Direct {
        timeout: Duration::from_secs(args.connect_timeout.max(1)),
    });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren proxy: cannot start the runtime: {e}");
            return exit::code(exit::FAILURE);
        }
    };
    rt.block_on(async move {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for (addr, proto) in [(socks, Protocol::Socks5), (http, Protocol::Http)] {
            let Some(addr) = addr else { continue };
            let l = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("warren proxy: cannot listen on {addr}: {e}");
                    return exit::code(exit::FAILURE);
                }
            };
            info!(listen = %l.local_addr().unwrap_or(addr), protocol = ?proto, "listening");
            tasks.push(tokio::spawn(serve(
                l,
                proto,
                settings.clone(),
                egress.clone(),
                stop.clone(),
            )));
        }
        if tasks.is_empty() {
            eprintln!("warren proxy: both listeners are off");
            return exit::code(exit::USAGE);
        }
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut t), Ok(mut i)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        info!("stopping: draining live connections");
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        exit::code(exit::OK)
    })
}
