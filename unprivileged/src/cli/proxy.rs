//! `warren proxy`.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Env as _;
use crate::exit;
use crate::proxy::server::{Access, Direct, Protocol, Settings, serve_with_slots};

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
    /// SOCKS5 listener ("off" to disable) [default: 127.0.0.1:1080].
    #[arg(long)]
    pub socks: Option<String>,
    /// HTTP proxy listener ("off" to disable) [default: 127.0.0.1:8118].
    #[arg(long)]
    pub http: Option<String>,
    /// Configuration file [default: $XDG_CONFIG_HOME/warren/config.toml,
    /// then /etc/warren/config.toml].
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Client network allowed without credentials (CIDR; repeatable).
    /// Without --user, loopback is allowed by default; with --user, only
    /// these networks skip authentication.
    #[arg(long = "allow", value_name = "CIDR")]
    pub allow: Vec<String>,
    /// SOCKS5 username required from clients outside --allow (password from
    /// WARREN_PROXY_PASSWORD).
    #[arg(long)]
    pub user: Option<String>,
    /// Most simultaneous connections, SOCKS5 and HTTP together.
    /// [default: 10000]
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Connect timeout in seconds.
    /// [default: 10]
    #[arg(long)]
    pub connect_timeout: Option<u64>,
    /// Log every connection (debug level).
    #[arg(short, long)]
    pub verbose: bool,
    /// One structured line per finished connection: client, target, rule,
    /// action, bytes each way, duration (config: `[proxy] access_log`).
    #[arg(long)]
    pub access_log: bool,
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

/// Reloads the rules on SIGHUP and when the file's modification time
/// changes (polled every 2 s). Live connections keep the decision they
/// were made with; a bad file is logged and the previous rules stay.
async fn reload_loop(
    path: Option<std::path::PathBuf>,
    rules: crate::rules::SharedRules,
    mut hup: Option<tokio::signal::unix::Signal>,
    stop: CancellationToken,
) {
    let mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = path.as_deref().and_then(mtime);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let hup_fut = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let why = tokio::select! {
            _ = stop.cancelled() => return,
            _ = hup_fut => Some("SIGHUP"),
            _ = tick.tick() => {
                let m = path.as_deref().and_then(mtime);
                if m != seen {
                    seen = m;
                    Some("file change")
                } else {
                    None
                }
            }
        };
        let Some(why) = why else { continue };
        let Some(p) = &path else {
            info!("{why}: no configuration file to reload");
            continue;
        };
        match crate::config::Config::load(p) {
            Ok(c) => {
                info!(file = %p.display(), rules = c.rules.len(), "{why}: rules reloaded");
                rules.replace(c.rules);
            }
            Err(e) => warn!(error = %e, "{why}: reload failed; keeping the previous rules"),
        }
    }
}

/// Runs `warren proxy`.
pub fn run_proxy(args: ProxyArgs) -> ExitCode {
    run_intake_on(
        args,
        "proxy",
        |direct| Ok(Arc::new(direct)),
        Runtime::ThreadPerCore,
    )
}

/// How the intake's connections are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runtime {
    /// One multi-thread runtime with two workers.
    MultiThread,
    /// A single-threaded runtime per core (at most [`MAX_INTAKE_THREADS`]),
    /// each accepting from the same listening sockets: a connection stays
    /// on the thread that accepted it, with no hand-off between threads on
    /// its path (measured in docs/benchmarks.md).
    ThreadPerCore,
}

/// Upper bound of [`Runtime::ThreadPerCore`]'s threads: every thread waits
/// on the same listeners, and each new connection wakes them all.
const MAX_INTAKE_THREADS: usize = 4;

/// Runs the SOCKS5/HTTP intake of `warren proxy` and `warren client`:
/// listeners, rules (reloaded on SIGHUP and file change), the control
/// socket for `warren status`, and graceful shutdown; `egress` builds where
/// connections go from the direct egress (with its connect timeout).
pub fn run_intake<E: crate::proxy::server::Egress>(
    args: ProxyArgs,
    cmd: &str,
    egress: impl FnOnce(Direct) -> Result<Arc<E>, String>,
) -> ExitCode {
    run_intake_on(args, cmd, egress, Runtime::MultiThread)
}

/// A listening socket an intake thread serves, with that listener's
/// connection limit (one permit per allowed connection).
type Intake = (std::net::TcpListener, Protocol, Arc<tokio::sync::Semaphore>);

/// Serves `listeners` on a thread of its own with a single-threaded
/// runtime until `stop`, then waits for its live connections.
fn spawn_intake_thread<E: crate::proxy::server::Egress>(
    n: usize,
    listeners: Vec<Intake>,
    settings: Arc<Settings>,
    egress: Arc<E>,
    stop: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("warren-intake-{n}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "intake thread: cannot start its runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (l, proto, slots) in listeners {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => tasks.push(tokio::spawn(serve_with_slots(
                            l,
                            proto,
                            settings.clone(),
                            egress.clone(),
                            slots,
                            stop.clone(),
                        ))),
                        Err(e) => warn!(error = %e, "intake thread: cannot use a listener"),
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        })
}

fn run_intake_on<E: crate::proxy::server::Egress>(
    args: ProxyArgs,
    cmd: &str,
    egress: impl FnOnce(Direct) -> Result<Arc<E>, String>,
    runtime: Runtime,
) -> ExitCode {
    crate::logging::init_logging(args.verbose);
    let usage = |m: String| {
        eprintln!("warren {cmd}: {m}");
        exit::code(exit::USAGE)
    };
    let env = crate::config::ProcessEnv;
    let path = args
        .config
        .clone()
        .or_else(|| crate::config::default_path(&env));
    let mut cfg = match &path {
        Some(p) => match crate::config::Config::load(p) {
            Ok(c) => c,
            Err(e) => return usage(e.to_string()),
        },
        None => crate::config::Config::default(),
    };
    cfg.apply_env(&env);
    let socks_s = args
        .socks
        .clone()
        .or(cfg.proxy.socks.clone())
        .unwrap_or_else(|| "127.0.0.1:1080".into());
    let http_s = args
        .http
        .clone()
        .or(cfg.proxy.http.clone())
        .unwrap_or_else(|| "127.0.0.1:8118".into());
    let (socks, http) = match (listener(&socks_s, "socks"), listener(&http_s, "http")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return usage(e),
    };
    let user = args.user.clone().or(cfg.proxy.user.clone());
    let mut allow = if user.is_none() {
        vec![
            ("127.0.0.0".parse().expect("literal"), 8),
            ("::1".parse().expect("literal"), 128),
        ]
    } else {
        Vec::new()
    };
    for c in args.allow.iter().chain(cfg.proxy.allow.iter().flatten()) {
        match parse_cidr(c) {
            Ok(x) => allow.push(x),
            Err(e) => return usage(e),
        }
    }
    let credentials = match (&user, env.var("WARREN_PROXY_PASSWORD")) {
        (Some(u), Some(p)) if !p.is_empty() => Some((u.clone(), p)),
        (Some(_), _) => return usage("--user needs the password in WARREN_PROXY_PASSWORD".into()),
        (None, _) => None,
    };
    let rules = crate::rules::SharedRules::new(cfg.rules.clone());
    let settings = Arc::new(Settings {
        access: Access { allow, credentials },
        max_connections: args
            .max_connections
            .or(cfg.proxy.max_connections)
            .unwrap_or(10_000)
            .max(1),
        idle_timeout: Duration::from_secs(cfg.proxy.idle_timeout.unwrap_or(300).max(1)),
        access_log: args.access_log || cfg.proxy.access_log.unwrap_or(false),
        rules: rules.clone(),
        ..Settings::default()
    });
    let direct = Direct {
        timeout: Duration::from_secs(
            args.connect_timeout
                .or(cfg.proxy.connect_timeout)
                .unwrap_or(10)
                .max(1),
        ),
    };
    let egress = match egress(direct) {
        Ok(e) => e,
        Err(m) => {
            eprintln!("warren {cmd}: {m}");
            return exit::code(exit::CONFIG);
        }
    };
    let (rt, extra_threads) = match runtime {
        Runtime::MultiThread => (
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build(),
            0,
        ),
        Runtime::ThreadPerCore => (
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, MAX_INTAKE_THREADS)
                - 1,
        ),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren {cmd}: cannot start the runtime: {e}");
            return exit::code(exit::FAILURE);
        }
    };
    rt.block_on(async move {
        let stop = CancellationToken::new();
        // Installed before the listeners report, so a SIGHUP never kills us.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let reloader = tokio::spawn(reload_loop(path.clone(), rules.clone(), hup, stop.clone()));
        let mut tasks = Vec::new();
        // What each extra intake thread serves: copies of the listeners.
        let mut copies: Vec<Vec<Intake>> = (0..extra_threads).map(|_| Vec::new()).collect();
        let mut names = Vec::new();
        // One connection limit for both listeners and all their threads.
        let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
        for (addr, proto) in [(socks, Protocol::Socks5), (http, Protocol::Http)] {
            let Some(addr) = addr else { continue };
            let l = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("warren {cmd}: cannot listen on {addr}: {e}");
                    return exit::code(exit::FAILURE);
                }
            };
            info!(listen = %l.local_addr().unwrap_or(addr), protocol = ?proto, "listening");
            names.push(format!("{proto:?} {}", l.local_addr().unwrap_or(addr)));
            for (n, copies) in copies.iter_mut().enumerate() {
                // The same listening socket (a second descriptor for it):
                // whichever thread is free accepts.
                match std::os::fd::AsFd::as_fd(&l).try_clone_to_owned() {
                    Ok(c) => copies.push((c.into(), proto, slots.clone())),
                    Err(e) => warn!(error = %e, intake = n + 1, "cannot share a listener with an intake thread"),
                }
            }
            tasks.push(tokio::spawn(serve_with_slots(
                l,
                proto,
                settings.clone(),
                egress.clone(),
                slots.clone(),
                stop.clone(),
            )));
        }
        if tasks.is_empty() {
            eprintln!("warren {cmd}: both listeners are off");
            return exit::code(exit::USAGE);
        }
        let mut threads = Vec::new();
        for (n, listeners) in copies.into_iter().enumerate() {
            match spawn_intake_thread(
                n + 1,
                listeners,
                settings.clone(),
                egress.clone(),
                stop.clone(),
            ) {
                Ok(t) => threads.push(t),
                Err(e) => warn!(error = %e, "cannot start an intake thread; using fewer"),
            }
        }
        let control = match crate::proxy::status::control_socket(&env) {
            Ok((l, path)) => {
                let counters = settings.counters.clone();
                let snap = move || counters.snapshot(std::process::id(), names.clone());
                Some(tokio::spawn(crate::proxy::status::control_loop(l, path, snap, stop.clone())))
            }
            Err(e) => {
                warn!(error = %e, "no control socket; `warren status` will not see this proxy");
                None
            }
        };
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
        for t in threads {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        let _ = reloader.await;
        if let Some(c) = control {
            let _ = c.await;
        }
        exit::code(exit::OK)
    })
}

/// Arguments of `warren status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What the helper holds for this user without a live owner.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Left by a crashed helper; the next could not remove them.
    pub orphans: Vec<String>,
    /// Kill switches of host tunnels that ended without `warren down`.
    pub kill_switches: Vec<String>,
}

/// Runs `warren status`: the running `warren proxy` processes and instances
/// of this user and their counters, and what the helper holds for this user
/// without a live owner (`left`).
pub fn run_status(args: StatusArgs, left: &Leftovers) -> ExitCode {
    let dir = crate::proxy::status::runtime_dir(&crate::config::ProcessEnv);
    let snaps = crate::proxy::status::query_all(&dir);
    if args.json {
        let (instances, proxies): (Vec<_>, Vec<_>) =
            snaps.into_iter().partition(|s| s.instance.is_some());
        let v = serde_json::json!({
            "proxies": proxies,
            "instances": instances,
            "orphans": left.orphans,
            "kill_switches": left.kill_switches,
        });
        println!("{v}");
    } else {
        if !snaps.is_empty() || (left.orphans.is_empty() && left.kill_switches.is_empty()) {
            print!("{}", crate::proxy::status::render(&snaps));
        }
        for n in &left.orphans {
            println!(
                "orphan {n}: left by a helper that crashed, and the helper could not remove it (see its log); `warren down {n}` retries"
            );
        }
        for n in &left.kill_switches {
            println!(
                "kill switch {n}: its tunnel ended, all traffic stays blocked; `warren down {n}` releases it, `warren up --host {n} --kill-switch` takes it over"
            );
        }
    }
    exit::code(exit::OK)
}

/// Arguments of `warren config`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ConfigCommand,
}

/// `warren config` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file (default: the one `warren proxy` would
    /// read).
    Check {
        /// The file.
        file: Option<std::path::PathBuf>,
    },
}

/// Runs `warren config`.
pub fn run_config(args: ConfigArgs) -> ExitCode {
    let ConfigCommand::Check { file } = args.command;
    let Some(path) = file.or_else(|| crate::config::default_path(&crate::config::ProcessEnv))
    else {
        eprintln!("warren config check: no configuration file found");
        return exit::code(exit::USAGE);
    };
    match crate::config::Config::load(&path) {
        Ok(c) => {
            println!(
                "{}: ok ({} rules, default {})",
                path.display(),
                c.rules.len(),
                c.rules.default_action()
            );
            exit::code(exit::OK)
        }
        Err(e) => {
            eprintln!("{e}");
            exit::code(exit::FAILURE)
        }
    }
}
