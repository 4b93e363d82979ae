//! The `warren` command line.

pub mod client;
pub mod instance;
pub mod proxy;
pub mod server;
pub mod wg_server;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::json;
use warren_ipc::msg::{Activation, StatusInfo};

use self::instance as instance_cli;
use self::proxy as proxy_cli;
use self::server as transport_cli;
use crate::autostart::HelperTarget;
use crate::autostart::{AutostartPolicy, connect_or_autostart};
use crate::exit;
use crate::helper_client::report_client_error;
use crate::helper_client::{ClientError, HelperClient, socket_path};
pub use crate::logging::init_logging;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  failure not covered below
  2  invalid command line
  3  the helper could not be reached (no socket, nobody listening)
  4  not authorized to use the helper (socket permissions or group)
  5  helper protocol mismatch (different warren releases)
  6  invalid configuration";

/// warren: route chosen traffic through VPN exits without running a big
/// program as root.
#[derive(Debug, Parser)]
#[command(name = "warren", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub globals: Globals,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Globals {
    /// Path of the root helper's socket.
    #[arg(
        long,
        global = true,
        env = warren_ipc::SOCKET_ENV,
        value_name = "PATH",
        help = "Helper socket [default: /run/warren/helper.sock]"
    )]
    pub helper_socket: Option<PathBuf>,

    /// Never start the helper through sudo when it is not running.
    #[arg(long, global = true)]
    pub no_autostart: bool,

    /// How long to wait for an autostarted helper to answer, in ms
    /// [default: the config's `autostart_timeout_secs`, else 10 s].
    #[arg(long, global = true, hide = true)]
    pub autostart_timeout_ms: Option<u64>,
}

/// `warren down` alone: the same options and arguments as [`Cli`] accepts
/// for it, without building the parser of every other command (clap builds
/// the whole tree first: about a third of `down`'s own time). Anything it
/// does not take (help, errors) goes to the full parser.
#[derive(Debug, Parser)]
#[command(name = "warren")]
struct DownCli {
    #[command(flatten)]
    globals: Globals,
    #[command(subcommand)]
    command: DownOnly,
}

#[derive(Debug, Subcommand)]
enum DownOnly {
    Down(instance_cli::DownArgs),
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Talk to the root helper (status, latency).
    #[command(subcommand)]
    Helper(HelperCommand),
    /// Run a local SOCKS5 + HTTP proxy (no root needed).
    Proxy(proxy_cli::ProxyArgs),
    /// Validate configuration files.
    Config(proxy_cli::ConfigArgs),
    /// Build a complete local setup in throwaway namespaces (a warren
    /// WireGuard exit with a web server, an instance using it), show a curl
    /// through it, tear it down on Ctrl-C. Needs root.
    Demo(crate::demo::DemoArgs),
    /// The demo's web server (used by `warren demo`).
    #[command(hide = true)]
    DemoWeb {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Start namespace instance NAME whose exit is a WireGuard peer, with
    /// SOCKS5 and HTTP proxies on the host.
    Up(instance_cli::UpArgs),
    /// Take namespace instances down.
    Down(instance_cli::DownArgs),
    /// Run a program inside a namespace instance, as yourself.
    Exec(instance_cli::ExecArgs),
    /// Show this user's instances (peers, handshakes, bytes) and `warren
    /// proxy` processes with their counters.
    Status(proxy_cli::StatusArgs),
    /// Run an exit: warren's TLS transports (the far end of `warren client`)
    /// or a WireGuard exit with NAT (`--mode wg`, any WireGuard client).
    Server(transport_cli::ServerArgs),
    /// A local SOCKS5 + HTTP proxy whose traffic goes through a `warren
    /// server` over TLS or multiplexed TLS (rules pick proxy/direct/block).
    Client(self::client::ClientArgs),
    /// Write a self-signed certificate and key for `warren server`, and print its pin.
    Cert(transport_cli::CertArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// The worker of a namespace instance (started by `warren up` through
    /// the helper; not for use by hand).
    #[command(hide = true)]
    InstanceWorker,
    /// Opens host-side connections for an instance's reverse forwards
    /// (started by `warren up`; not for use by hand).
    #[command(hide = true)]
    ForwardConnector {
        /// The allowed targets, in order.
        targets: Vec<String>,
    },
    /// Write man pages for warren and its subcommands into DIR (packaging).
    #[command(hide = true)]
    GenerateMan {
        /// Output directory.
        dir: PathBuf,
    },
}

/// `warren helper ...`
#[derive(Debug, Subcommand)]
pub enum HelperCommand {
    /// Make sure the helper runs: if its socket is missing, start it through
    /// sudo with the command line /etc/sudoers.d/warren allows (exits by
    /// itself when idle), then show its status. `status` never starts it.
    #[command(after_help = EXIT_CODES)]
    Start {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show whether the helper runs, its version, uptime, clients and resources.
    #[command(after_help = EXIT_CODES)]
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the namespace instances the helper holds for you (root: all).
    #[command(after_help = EXIT_CODES)]
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure the round-trip time of Hello requests to the helper.
    Ping {
        /// Number of Hello round trips.
        #[arg(short = 'n', long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
        count: u32,
        /// Also time the same frames over an in-process socket pair (the
        /// floor that no helper can beat), in the same run.
        #[arg(long)]
        baseline: bool,
        /// Sleep on every reply instead of polling briefly first.
        #[arg(long)]
        no_spin: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Where the helper is and whether to autostart it: command line (and
/// WARREN_HELPER_SOCKET) > config file > defaults.
fn helper_target(g: &Globals) -> Result<HelperTarget, ExitCode> {
    let (socket, no_autostart, timeout_ms) = (
        g.helper_socket.clone(),
        g.no_autostart,
        g.autostart_timeout_ms,
    );
    let conf = match crate::client_config::load(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren: {e}");
            return Err(exit::code(exit::CONFIG));
        }
    };
    let mut policy = AutostartPolicy::from_current_exe();
    policy.enabled &= !no_autostart && conf.autostart.unwrap_or(true);
    policy.timeout = match (timeout_ms, conf.autostart_timeout_secs) {
        (Some(ms), _) => Duration::from_millis(ms),
        (None, Some(s)) => Duration::from_secs(s),
        (None, None) => policy.timeout,
    };
    let socket = socket.or(conf.socket);
    Ok(HelperTarget {
        path: socket_path(socket.as_deref()),
        policy,
    })
}

/// This user's resources that the helper holds without a live owner: what a
/// crashed helper left and could not be removed, and kill switches left
/// blocking. `warren status` shows them, never hides them. Asks a running
/// (or socket-activated) helper only; never autostarts one.
fn helper_leftovers(path: &std::path::Path) -> proxy_cli::Leftovers {
    let mut left = proxy_cli::Leftovers::default();
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return left;
    };
    let me = nix::unistd::getuid().as_raw();
    let list = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async {
            HelperClient::connect(path).await?.list_instances().await
        })
        .await
    });
    for i in list.ok().and_then(Result::ok).unwrap_or_default() {
        if i.owner_uid != me {
            continue;
        }
        if i.lease == warren_ipc::instance::ORPHAN_LEASE {
            left.orphans.push(i.name.to_string());
        } else if i.lease == warren_ipc::instance::KILL_SWITCH_LEASE {
            left.kill_switches.push(i.name.to_string());
        }
    }
    left
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    if std::env::args_os().skip(1).any(|a| a == "down")
        && let Ok(DownCli {
            globals,
            command: DownOnly::Down(args),
        }) = DownCli::try_parse()
    {
        return match helper_target(&globals) {
            Ok(t) => instance_cli::run_down(args, t),
            Err(c) => c,
        };
    }
    let cli = Cli::parse();
    let target = || helper_target(&cli.globals);
    match cli.command {
        Command::Helper(cmd) => match target() {
            Ok(t) => run_helper(t.path, &t.policy, cmd),
            Err(c) => c,
        },
        Command::Up(args) => match target() {
            Ok(t) => instance_cli::run_up(args, t),
            Err(c) => c,
        },
        Command::Down(args) => match target() {
            Ok(t) => instance_cli::run_down(args, t),
            Err(c) => c,
        },
        Command::Exec(args) => match target() {
            Ok(t) => instance_cli::run_exec(args, t),
            Err(c) => c,
        },
        Command::InstanceWorker => crate::instance::worker::run(),
        Command::ForwardConnector { targets } => crate::instance::forward::run_connector(&targets),
        Command::Demo(args) => crate::demo::run(args),
        Command::DemoWeb { listen } => crate::demo::run_web(listen),
        Command::Proxy(args) => proxy_cli::run_proxy(args),
        Command::Config(args) => proxy_cli::run_config(args),
        Command::Status(args) => {
            let left = target()
                .map(|t| helper_leftovers(&t.path))
                .unwrap_or_default();
            proxy_cli::run_status(args, &left)
        }
        Command::Server(args) => match target() {
            Ok(t) => transport_cli::run_server(args, t),
            Err(c) => c,
        },
        Command::Cert(args) => transport_cli::run_cert(args),
        Command::Client(args) => self::client::run_client(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "warren", &mut std::io::stdout());
            exit::code(exit::OK)
        }
        Command::GenerateMan { dir } => {
            match std::fs::create_dir_all(&dir)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), &dir))
            {
                Ok(()) => exit::code(exit::OK),
                Err(e) => {
                    eprintln!("warren: cannot write man pages to {}: {e}", dir.display());
                    exit::code(exit::FAILURE)
                }
            }
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn run_helper(path: PathBuf, policy: &AutostartPolicy, cmd: HelperCommand) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren: cannot start the async runtime: {e}");
            return exit::code(exit::FAILURE);
        }
    };
    let res = rt.block_on(async {
        match cmd {
            HelperCommand::Status { json } => {
                let client = HelperClient::connect(&path).await;
                helper_status(&path, client, json).await
            }
            HelperCommand::List { json } => helper_list(&path, json).await,
            HelperCommand::Start { json } => {
                let client = connect_or_autostart(&path, policy).await;
                helper_status(&path, client, json).await
            }
            HelperCommand::Ping {
                count,
                baseline,
                no_spin,
                json,
            } => helper_ping(&path, count, baseline, !no_spin, json).await,
        }
    });
    match res {
        Ok(()) => exit::code(exit::OK),
        Err(e) => report_client_error(&e),
    }
}

async fn helper_status(
    path: &std::path::Path,
    client: Result<HelperClient, ClientError>,
    json: bool,
) -> Result<(), ClientError> {
    let st = async { client?.status().await }.await;
    let st = match st {
        Ok(st) => st,
        Err(e) => {
            if json {
                // Scripts get an answer on stdout too (the exit code says why).
                println!(
                    "{}",
                    json!({
                        "running": false,
                        "socket": path.display().to_string(),
                        "error": e.to_string(),
                        "exit_code": e.exit_code(),
                    })
                );
            }
            return Err(e);
        }
    };
    if json {
        println!("{}", status_json(path, &st));
    } else {
        print!("{}", status_text(path, &st));
    }
    Ok(())
}

async fn helper_list(path: &std::path::Path, json: bool) -> Result<(), ClientError> {
    let mut client = HelperClient::connect(path).await?;
    let list = client.list_instances().await?;
    if json {
        let v: Vec<serde_json::Value> = list
            .iter()
            .map(|i| {
                json!({
                    "name": i.name.as_str(),
                    "netns": i.netns,
                    "tun": i.tun,
                    "owner_uid": i.owner_uid,
                    "lease": i.lease,
                    "addresses": i.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else if list.is_empty() {
        println!("no instances");
    } else {
        println!(
            "{:<16} {:<22} {:>6}  {:<14} ADDRESSES",
            "NAME", "NETNS", "OWNER", "LEASE"
        );
        for i in &list {
            let addrs: Vec<String> = i.addresses.iter().map(ToString::to_string).collect();
            println!(
                "{:<16} {:<22} {:>6}  {:<14} {}",
                i.name.as_str(),
                i.netns,
                i.owner_uid,
                i.lease,
                addrs.join(", ")
            );
        }
    }
    Ok(())
}

fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::Manual => "manual",
        Activation::Socket => "socket",
        Activation::Autostarted => "autostarted",
        _ => "unknown",
    }
}

fn status_json(path: &std::path::Path, st: &StatusInfo) -> serde_json::Value {
    json!({
        "running": true,
        "socket": path.display().to_string(),
        "helper_version": st.helper_version,
        "protocol": st.protocol,
        "pid": st.pid,
        "uptime_ms": st.uptime_ms,
        "connected_clients": st.connected_clients,
        "resources": st.resources,
        "activation": activation_name(st.activation),
        "idle_timeout_secs": st.idle_timeout_secs,
    })
}

fn status_text(path: &std::path::Path, st: &StatusInfo) -> String {
    let idle = match st.idle_timeout_secs {
        Some(s) => format!("after {s}s without clients"),
        None => "never".into(),
    };
    format!(
        "warren-helper {} (protocol {}), pid {}\n  socket:     {}\n  started:    {}\n  uptime:     {}\n  clients:    {}\n  resources:  {}\n  idle exit:  {}\n",
        st.helper_version,
        st.protocol,
        st.pid,
        path.display(),
        activation_name(st.activation),
        fmt_duration(Duration::from_millis(st.uptime_ms)),
        st.connected_clients,
        st.resources,
        idle
    )
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{}.{:01}s", s, d.subsec_millis() / 100),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Copy)]
struct Summary {
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn summarize(mut v: Vec<Duration>) -> Summary {
    v.sort_unstable();
    let us = |d: Duration| d.as_nanos() as f64 / 1000.0;
    let pct = |p: f64| us(v[((v.len() - 1) as f64 * p).round() as usize]);
    Summary {
        min: us(v[0]),
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        max: us(v[v.len() - 1]),
    }
}

async fn helper_ping(
    path: &std::path::Path,
    count: u32,
    baseline: bool,
    spin: bool,
    json: bool,
) -> Result<(), ClientError> {
    let mut client = HelperClient::connect(path).await?;
    if !spin {
        client.set_spin(None);
    }
    // Warm up the connection and both processes' caches.
    for _ in 0..count.min(200) {
        client.hello().await?;
    }
    let mut samples = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let t = Instant::now();
        client.hello().await?;
        samples.push(t.elapsed());
    }
    let helper = summarize(samples);
    let base = if baseline {
        Some(summarize(baseline_samples(count).await?))
    } else {
        None
    };
    let row = |s: &Summary| json!({"min_us": s.min, "p50_us": s.p50, "p90_us": s.p90, "p99_us": s.p99, "max_us": s.max});
    if json {
        let mut v = json!({"count": count, "spin": spin, "socket": path.display().to_string(), "hello": row(&helper)});
        if let Some(b) = &base {
            v["socketpair_baseline"] = row(b);
        }
        println!("{v}");
    } else {
        let line = |name: &str, s: &Summary| {
            println!(
                "{name:<22} min {:>7.1} µs  p50 {:>7.1} µs  p90 {:>7.1} µs  p99 {:>7.1} µs  max {:>8.1} µs",
                s.min, s.p50, s.p90, s.p99, s.max
            )
        };
        println!(
            "{count} Hello round trips to {}{}",
            path.display(),
            if spin { "" } else { " (no spin)" }
        );
        line("helper Hello", &helper);
        if let Some(b) = &base {
            line("socketpair baseline", b);
        }
    }
    Ok(())
}

/// The same request/reply frames over an in-process socket pair with a
/// trivial echo task: what the transport costs with no helper work at all.
async fn baseline_samples(count: u32) -> Result<Vec<Duration>, ClientError> {
    use warren_ipc::msg::HelloInfo;
    use warren_ipc::{ClientFrame, FramedConn, Request, Response, ServerFrame};
    let (a, b) = tokio::net::UnixStream::pair().map_err(|e| ClientError::Connect {
        path: "socketpair".into(),
        source: e,
    })?;
    let mut server = FramedConn::new(b);
    let echo = tokio::spawn(async move {
        while let Ok((f, _)) = server.read_frame::<ClientFrame>(None).await {
            let reply = ServerFrame::Reply {
                id: f.id,
                result: Ok(Response::Hello(HelloInfo {
                    protocol: 1,
                    helper_version: "baseline".into(),
                    peer_uid: 0,
                    peer_pid: 0,
                })),
            };
            if server.write_frame(&reply, &[]).await.is_err() {
                break;
            }
        }
    });
    let mut client = FramedConn::new(a);
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count.saturating_add(200) {
        let t = Instant::now();
        let req = ClientFrame {
            id: i,
            request: Request::Hello {
                client: "baseline".into(),
            },
        };
        client.write_frame(&req, &[]).await?;
        client.read_frame::<ServerFrame>(None).await?;
        if i >= 200 {
            out.push(t.elapsed());
        }
    }
    drop(client);
    let _ = echo.await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        DownCli::command().debug_assert();
    }

    /// The `down` fast path takes exactly what the full parser takes for
    /// `down`, with the same meaning, and nothing else.
    #[test]
    fn down_fast_path_agrees_with_the_full_parser() {
        let full = |argv: &[&str]| match Cli::try_parse_from(argv) {
            Ok(Cli {
                globals,
                command: Command::Down(a),
            }) => Some(format!("{globals:?} {a:?}")),
            _ => None,
        };
        let fast = |argv: &[&str]| match DownCli::try_parse_from(argv) {
            Ok(DownCli {
                globals,
                command: DownOnly::Down(a),
            }) => Some(format!("{globals:?} {a:?}")),
            Err(_) => None,
        };
        for argv in [
            &["warren", "down", "work"][..],
            &["warren", "--no-autostart", "down", "work"],
            &["warren", "down", "--all"],
            &["warren", "down", "work", "--helper-socket", "/x.sock"],
            &["warren", "--helper-socket", "/x.sock", "down", "--all"],
            &["warren", "down"],
            &["warren", "down", "a", "--all"],
            &["warren", "down", "--bogus"],
            &["warren", "up", "down", "--wg", "f"],
        ] {
            assert_eq!(fast(argv), full(argv), "{argv:?}");
        }
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let s = summarize(v);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 100.0);
        assert!((s.p50 - 50.0).abs() <= 1.0);
        assert!((s.p99 - 99.0).abs() <= 1.0);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(fmt_duration(Duration::from_secs(7260)), "2h01m");
    }
}
