//! `warren server` and `warren cert`.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::exit;
use crate::transport::auth::{AuthKey, Mode};
use crate::transport::http::Decoy;
use crate::transport::server::{ServerSettings, serve};
use crate::transport::tlsconf;

/// Transport modes on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// One TLS 1.3 connection per proxied stream.
    Tls,
    /// One TLS 1.3 session multiplexing every stream.
    TlsMux,
    /// A WireGuard exit (`warren server` only): needs --wg and the helper.
    Wg,
}

impl ModeArg {
    /// The TLS transport mode, if this is one.
    pub fn transport(self) -> Option<Mode> {
        match self {
            ModeArg::Tls => Some(Mode::Tls),
            ModeArg::TlsMux => Some(Mode::TlsMux),
            ModeArg::Wg => None,
        }
    }
}

/// Arguments of `warren server`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
The shared secret comes from the environment variable WARREN_PASSWORD or from
--password-file (never from the command line). Clients that fail to
authenticate, and anyone else, see an ordinary web server serving --decoy.

Examples:
  warren cert --name vpn.example.org --out-dir /etc/warren
  WARREN_PASSWORD=... warren server --mode tls-mux --listen 0.0.0.0:443 \\
      --cert /etc/warren/cert.pem --key /etc/warren/key.pem

  warren server wg keygen --out exit.conf --address 100.64.100.1/24
  warren server wg add-peer laptop --config exit.conf --endpoint vpn.example.org:51820 > laptop.conf
  warren server --mode wg --wg exit.conf     # through the helper: TUN, forwarding, NAT")]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    /// WireGuard exit tools (keygen, add-peer).
    #[command(subcommand)]
    pub tool: Option<ServerTool>,
    /// Transport to serve.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// --mode wg: the server's wg-quick file (see `warren server wg keygen`).
    #[arg(long, value_name = "FILE")]
    pub wg: Option<PathBuf>,
    /// --mode wg: name of the server tunnel (TUN `wrsNAME`, at most 12 characters).
    #[arg(long, default_value = "exit")]
    pub name: String,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Certificate chain (PEM) [tls, tls-mux].
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) [tls, tls-mux].
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// File holding the shared secret (instead of WARREN_PASSWORD).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// HTML page shown to everyone who does not authenticate.
    #[arg(long)]
    pub decoy: Option<PathBuf>,
    /// Let clients reach this server's own loopback and link-local
    /// addresses (off: such targets are refused).
    #[arg(long)]
    pub allow_local_targets: bool,
    /// Most TLS handshakes in progress at once.
    #[arg(long, default_value_t = 256)]
    pub max_pending_handshakes: usize,
    /// Most TLS handshakes in progress at once from one source address
    /// (an IPv6 source counts by its /64).
    #[arg(long, default_value_t = 32)]
    pub max_pending_per_source: usize,
    /// Log every stream (debug level).
    #[arg(short, long)]
    pub verbose: bool,
}

/// `warren server SUBCOMMAND`.
#[derive(Debug, clap::Subcommand)]
pub enum ServerTool {
    /// WireGuard exit files: `keygen`, `add-peer`.
    #[command(subcommand)]
    Wg(super::wg_server::WgTool),
}

/// Arguments of `warren cert`.
#[derive(Debug, clap::Args)]
pub struct CertArgs {
    /// Name(s) the certificate is for (DNS names or IP addresses).
    #[arg(long = "name", required = true)]
    pub names: Vec<String>,
    /// Directory to write cert.pem and key.pem into.
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

/// Reads the shared secret: `--password-file`, else `WARREN_PASSWORD`.
/// Warns when the file is readable by group or others.
pub fn read_secret(file: Option<&Path>, env: Option<String>) -> Result<Vec<u8>, String> {
    let secret = match file {
        Some(p) => {
            let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
            if meta.mode() & 0o044 != 0 {
                warn!(
                    file = %p.display(),
                    "secret file is readable by group or others; chmod 600 it"
                );
            }
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            text.trim_end_matches(['\r', '\n']).as_bytes().to_vec()
        }
        None => env
            .ok_or("no shared secret: set WARREN_PASSWORD or pass --password-file")?
            .into_bytes(),
    };
    if secret.len() < 16 {
        return Err("the shared secret must be at least 16 bytes long".into());
    }
    Ok(secret)
}

/// Runs `warren server`.
pub fn run_server(args: ServerArgs, target: crate::autostart::HelperTarget) -> ExitCode {
    crate::logging::init_logging(args.verbose);
    let fail = |msg: String| {
        eprintln!("warren server: {msg}");
        exit::code(exit::CONFIG)
    };
    if let Some(ServerTool::Wg(tool)) = args.tool {
        return super::wg_server::run_tool(tool);
    }
    let Some(mode) = args.mode else {
        return fail("--mode is required".into());
    };
    let Some(mode) = mode.transport() else {
        return match &args.wg {
            Some(f) => super::wg_server::run(f, &args.name, target),
            None => {
                fail("--mode wg needs --wg FILE (make one with `warren server wg keygen`)".into())
            }
        };
    };
    let (Some(cert), Some(keyfile)) = (&args.cert, &args.key) else {
        return fail("--mode tls and tls-mux need --cert and --key (see `warren cert`)".into());
    };
    let secret = match read_secret(
        args.password_file.as_deref(),
        std::env::var("WARREN_PASSWORD").ok(),
    ) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let certs = match tlsconf::load_certs(cert) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let key = match tlsconf::load_key(keyfile) {
        Ok(k) => k,
        Err(e) => return fail(e.to_string()),
    };
    let tls = match tlsconf::server_config(certs, key) {
        Ok(t) => t,
        Err(e) => {
            return fail(format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            ));
        }
    };
    let mut settings = ServerSettings::new(mode, tls, AuthKey::derive(&secret));
    settings.allow_local_targets = args.allow_local_targets;
    settings.max_pending_handshakes = args.max_pending_handshakes.max(1);
    settings.max_pending_per_source = args.max_pending_per_source.max(1);
    if let Some(p) = &args.decoy {
        match std::fs::read(p) {
            Ok(page) => settings.decoy = Decoy::with_page(page),
            Err(e) => return fail(format!("{}: {e}", p.display())),
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("warren server: cannot listen on {}: {e}", args.listen);
                return exit::code(exit::FAILURE);
            }
        };
        let stop = CancellationToken::new();
        let signals = stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            if let (Ok(mut t), Ok(mut i)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
            }
            signals.cancel();
        });
        info!(listen = %args.listen, mode = ?args.mode, "serving");
        serve(listener, Arc::new(settings), stop).await;
        info!("stopped");
        exit::code(exit::OK)
    })
}

/// Runs `warren cert`.
pub fn run_cert(args: CertArgs) -> ExitCode {
    let (cert, key) = match tlsconf::generate_self_signed(&args.names) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("warren cert: {e}");
            return exit::code(exit::FAILURE);
        }
    };
    let write = |name: &str, text: &str, mode: u32| -> std::io::Result<PathBuf> {
        let path = args.out_dir.join(name);
        let mut o = std::fs::OpenOptions::new();
        o.write(true).mode(mode);
        if args.force {
            o.create(true).truncate(true);
        } else {
            o.create_new(true);
        }
        std::io::Write::write_all(&mut o.open(&path)?, text.as_bytes())?;
        Ok(path)
    };
    let res = write("key.pem", &key, 0o600).and_then(|k| Ok((k, write("cert.pem", &cert, 0o644)?)));
    match res {
        Ok((k, c)) => {
            let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert.as_bytes())
                .map(|d: rustls::pki_types::CertificateDer<'_>| tlsconf::fingerprint(&d))
                .unwrap_or_default();
            println!(
                "certificate: {}\nprivate key: {} (mode 0600)\npin:         {der}",
                c.display(),
                k.display()
            );
            println!(
                "clients can trust it with: --pin {der}   (or --ca {})",
                c.display()
            );
            exit::code(exit::OK)
        }
        Err(e) => {
            eprintln!(
                "warren cert: cannot write into {}: {e}{}",
                args.out_dir.display(),
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    " (use --force to overwrite)"
                } else {
                    ""
                }
            );
            exit::code(exit::FAILURE)
        }
    }
}
