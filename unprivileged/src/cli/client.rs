//! `warren client`: the proxy intake (SOCKS5, HTTP, rules) whose `proxy`
//! action goes through warren's TLS transports to a `warren server`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::proxy::{ProxyArgs, run_intake};
use super::server::{ModeArg, read_secret};
use crate::proxy::server::{Direct, Egress, Outbound, UdpTunnel};
use crate::rules::Action;
use crate::transport::auth::AuthKey;
use crate::transport::client::{Client, ClientSettings, TransportError};
use crate::transport::tlsconf::{self, Trust};
use crate::transport::wire::{Command, Target};

/// Arguments of `warren client`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
The shared secret comes from WARREN_PASSWORD or --password-file (never the
command line). The server is verified by --ca (its certificate chains to
this CA, for --server-name) or --pin (exactly this certificate; printed by
`warren cert`). Rules (config file [rules]) decide per destination: proxy
goes through the server, direct leaves from this host, block is refused.

Example:
  WARREN_PASSWORD=... warren client --mode tls-mux --server vpn.example.org:443 \\
      --pin sha256:... --socks 127.0.0.1:1080 --http 127.0.0.1:8118")]
pub struct ClientArgs {
    /// Transport to the server.
    #[arg(long, value_enum)]
    pub mode: ModeArg,
    /// The server, HOST:PORT.
    #[arg(long)]
    pub server: String,
    /// Name to verify in the server's certificate [default: the HOST of --server].
    #[arg(long)]
    pub server_name: Option<String>,
    /// Trust certificates chaining to this CA (PEM).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "pin",
        required_unless_present = "pin"
    )]
    pub ca: Option<PathBuf>,
    /// Trust exactly the certificate with this fingerprint (sha256:HEX).
    #[arg(long)]
    pub pin: Option<String>,
    /// File holding the shared secret (instead of WARREN_PASSWORD).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// The local intake (listeners, config, access).
    #[command(flatten)]
    pub intake: ProxyArgs,
}

/// Proxy through the transport; direct from this host.
#[derive(Debug)]
struct TransportEgress {
    client: Client,
    direct: Direct,
}

fn io_error(e: TransportError) -> std::io::Error {
    let kind = match &e {
        TransportError::Timeout => std::io::ErrorKind::TimedOut,
        TransportError::Refused(_) => std::io::ErrorKind::ConnectionRefused,
        _ => std::io::ErrorKind::Other,
    };
    std::io::Error::new(kind, e.to_string())
}

impl Egress for TransportEgress {
    async fn connect(&self, target: &Target, action: Action) -> std::io::Result<Outbound> {
        if action == Action::Direct {
            return self.direct.tcp(target).await.map(Outbound::Tcp);
        }
        let (s, _bound) = self
            .client
            .open(Command::Connect, target)
            .await
            .map_err(io_error)?;
        Ok(Outbound::Stream(s))
    }

    async fn udp_tunnel(&self) -> Option<std::io::Result<UdpTunnel>> {
        let any = Target::Addr(std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        Some(
            self.client
                .open(Command::Udp, &any)
                .await
                .map(|(s, _)| s)
                .map_err(io_error),
        )
    }
}

/// Runs `warren client`.
pub fn run_client(args: ClientArgs) -> ExitCode {
    let Some(mode) = args.mode.transport() else {
        eprintln!(
            "warren client: --mode tls or tls-mux (a WireGuard exit is used with `warren up`)"
        );
        return crate::exit::code(crate::exit::USAGE);
    };
    let build = |direct: Direct| -> Result<Arc<TransportEgress>, String> {
        let secret = read_secret(
            args.password_file.as_deref(),
            std::env::var("WARREN_PASSWORD").ok(),
        )?;
        let trust = match (&args.ca, &args.pin) {
            (Some(ca), _) => Trust::Ca(tlsconf::load_certs(ca).map_err(|e| e.to_string())?),
            (None, Some(pin)) => Trust::Pin(tlsconf::parse_pin(pin).map_err(|e| e.to_string())?),
            (None, None) => return Err("--ca or --pin is needed to verify the server".into()),
        };
        let host = args.server_name.clone().unwrap_or_else(|| {
            let h = args
                .server
                .rsplit_once(':')
                .map_or(args.server.as_str(), |(h, _)| h);
            h.trim_start_matches('[').trim_end_matches(']').to_string()
        });
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| format!("--server-name {host:?} is not a valid name"))?;
        let settings = ClientSettings {
            server: args.server.clone(),
            server_name,
            tls: tlsconf::client_config(&trust).map_err(|e| e.to_string())?,
            key: Arc::new(AuthKey::derive(&secret)),
            connect_timeout: Duration::from_secs(10),
        };
        Ok(Arc::new(TransportEgress {
            client: Client::new(mode, settings),
            direct,
        }))
    };
    run_intake(args.intake, "client", build)
}
