//! `warren up`, `warren down`, `warren exec`.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use warren_ipc::instance::{ExitStatus, InstanceName, InstanceSpec, SpawnSpec};
use warren_ipc::msg::Event;
use zeroize::Zeroizing;

use crate::autostart::connect_or_autostart;
use crate::exit;
use crate::helper_client::{ClientError, HelperClient};
use crate::instance::{WorkerConfig, WorkerReport};
use crate::wg::conf;
use warren_ipc::HelperError;

/// Default MTU when the file names none (wg-quick's usual choice).
const DEFAULT_MTU: u16 = 1420;
/// How many port pairs `up` tries from 1080/8118 upward.
const PORT_TRIES: u16 = 100;

/// Arguments of `warren up`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Creates namespace instance NAME whose only way out is the WireGuard peer in
FILE (wg-quick format), and serves a SOCKS5 and an HTTP proxy on the host
whose connections leave through it. Several instances can run at once.
Returns once the first handshake completed; the instance keeps running
until `warren down NAME` (or, with --foreground, until Ctrl-C).

Examples:
  warren up work --wg ~/wg/work.conf
  curl --socks5-hostname 127.0.0.1:1080 http://intranet.example/
  warren exec work -- ssh build-host
  warren status
  warren down work")]
pub struct UpArgs {
    /// Instance name: 1-15 of a-z, 0-9 and '-'.
    pub name: String,
    /// The wg-quick configuration file of the exit.
    #[arg(long, value_name = "FILE")]
    pub wg: PathBuf,
    /// SOCKS5 port on the host [default: the first free pair from 1080/8118 up].
    #[arg(long, value_name = "N")]
    pub socks_port: Option<u16>,
    /// HTTP proxy port on the host [default: see --socks-port].
    #[arg(long, value_name = "N")]
    pub http_port: Option<u16>,
    /// Address the proxies listen on (loopback clients only are served).
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub listen: std::net::IpAddr,
    /// Seconds to wait for the first handshake.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub timeout: f64,
    /// Stay attached: logs on this terminal, Ctrl-C takes the instance down.
    #[arg(long)]
    pub foreground: bool,
    /// Print one JSON object on success.
    #[arg(long)]
    pub json: bool,
    /// Worker logs at debug level.
    #[arg(short, long)]
    pub verbose: bool,
    /// Route the whole host through the tunnel instead (like `wg-quick
    /// up`): routes, DNS, and with --kill-switch a firewall; NAME at most
    /// 12 characters. Restored on `warren down NAME` and when the tunnel's
    /// process dies.
    #[arg(long, conflicts_with_all = ["socks_port", "http_port"])]
    pub host: bool,
    /// With --host: drop all traffic that does not go through the tunnel.
    #[arg(long, requires = "host")]
    pub kill_switch: bool,
    /// Without the helper: the worker makes its own user and network
    /// namespace (needs unprivileged user namespaces and a usable
    /// /dev/net/tun). Chosen by itself, with a notice, when no helper is
    /// reachable and autostart is off or fails.
    #[arg(long, conflicts_with = "host")]
    pub rootless: bool,
    /// Rootless: the TCP/IP stack that carries the traffic. auto: the
    /// kernel's, in the worker's own namespaces, or a userspace stack
    /// (smoltcp) where user namespaces or /dev/net/tun are not available
    /// to you; kernel: never the userspace stack; userspace: always it (no
    /// `warren exec`; implies --rootless).
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        value_name = "STACK",
        conflicts_with = "host"
    )]
    pub stack: crate::instance::StackChoice,
    /// A port on this host forwarded to an address behind the tunnel:
    /// tcp:LISTEN=TARGET or udp:LISTEN=TARGET, e.g.
    /// tcp:127.0.0.1:8080=198.19.1.1:80 (repeatable).
    #[arg(long = "forward", value_name = "SPEC", conflicts_with = "host")]
    pub forwards: Vec<crate::instance::forward::Forward>,
    /// A port on the tunnel side forwarded to a service on this host:
    /// tcp:TUNNEL_ADDR:PORT=127.0.0.1:PORT (repeatable; TCP only).
    #[arg(long = "reverse", value_name = "SPEC", conflicts_with = "host")]
    pub reverses: Vec<crate::instance::forward::Forward>,
}

/// Arguments of `warren down`.
#[derive(Debug, clap::Args)]
pub struct DownArgs {
    /// The instance to take down.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub name: Option<String>,
    /// Take down every instance of yours.
    #[arg(long)]
    pub all: bool,
}

/// Arguments of `warren exec`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Runs CMD inside instance NAME's network namespace as yourself, with your
terminal, environment and working directory; DNS inside is the tunnel's.
The exit status is CMD's (128+N when killed by signal N).

When your input is a terminal, CMD gets a terminal of its own (a
pseudo-terminal with your terminal's modes and size, as ssh gives), so
password prompts, editors and Ctrl-C work as usual; -T turns that
off (CMD then shares your terminal's descriptors but has no controlling
terminal).

Examples:
  warren exec work -- curl http://intranet.example/
  warren exec work -- ssh build-host")]
pub struct ExecArgs {
    /// Do not allocate a terminal for CMD, even when input is a terminal.
    #[arg(short = 'T', long)]
    pub no_tty: bool,
    /// The instance.
    pub name: String,
    /// The program and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

pub use crate::autostart::HelperTarget;

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn fail(cmd: &str, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("warren {cmd}: {msg}");
    exit::code(exit::FAILURE)
}

/// The listeners: explicit ports, or the first free pair upward.
fn listeners(args: &UpArgs) -> Result<(TcpListener, TcpListener), String> {
    let ip = args.listen;
    let bind = |p: u16, what: &str| {
        TcpListener::bind(SocketAddr::new(ip, p))
            .map_err(|e| format!("cannot listen on {ip}:{p} for {what}: {e}"))
    };
    match (args.socks_port, args.http_port) {
        (Some(s), Some(h)) => Ok((bind(s, "SOCKS5")?, bind(h, "HTTP")?)),
        (s, h) => {
            for i in 0..PORT_TRIES {
                let sp = s.unwrap_or(1080 + i);
                let hp = h.unwrap_or(8118 + i);
                if let (Ok(a), Ok(b)) = (
                    TcpListener::bind(SocketAddr::new(ip, sp)),
                    TcpListener::bind(SocketAddr::new(ip, hp)),
                ) {
                    return Ok((a, b));
                }
                if s.is_some() && h.is_some() {
                    break;
                }
                if let Some(sp) = s {
                    bind(sp, "SOCKS5")?;
                }
                if let Some(hp) = h {
                    bind(hp, "HTTP")?;
                }
            }
            Err(format!(
                "no free port pair on {ip} from 1080/8118 to {}/{}; choose --socks-port and --http-port",
                1080 + PORT_TRIES - 1,
                8118 + PORT_TRIES - 1
            ))
        }
    }
}

/// The tunnel's UDP socket in the host namespace: dual-stack when IPv6
/// exists, on ListenPort or an ephemeral port.
fn tunnel_socket(port: Option<u16>) -> std::io::Result<UdpSocket> {
    let port = port.unwrap_or(0);
    match UdpSocket::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(e),
        Err(_) => UdpSocket::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)),
    }
}

fn log_path(name: &str) -> PathBuf {
    crate::proxy::status::runtime_dir(&crate::config::ProcessEnv)
        .join(format!("instance-{name}.log"))
}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = path.parent() {
        crate::proxy::status::ensure_private_dir(d)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

fn tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// The environment the worker gets: enough to find its runtime directory
/// and honour the tuning knobs, nothing else.
fn worker_env() -> Vec<String> {
    const KEEP: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "XDG_RUNTIME_DIR",
        "WARREN_WG_GSO",
        "WARREN_WG_SOCKBUF",
    ];
    KEEP.iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
        .collect()
}

/// Everything `up` prepared before asking the helper.
struct Prepared {
    name: InstanceName,
    spec: InstanceSpec,
    cfg: WorkerConfig,
    /// The forwards' host-side sockets and the reverse connector's end.
    extra: Vec<OwnedFd>,
    socks: TcpListener,
    http: TcpListener,
    udp: UdpSocket,
    relay: UdpSocket,
    endpoint_text: String,
    socks_addr: SocketAddr,
    http_addr: SocketAddr,
}

/// How to start a worker: `warren-worker` beside this binary (a small
/// program: less memory per instance), else `warren instance-worker`.
fn worker_argv() -> Result<Vec<String>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the warren binary: {e}"))?;
    let small = exe.with_file_name("warren-worker");
    Ok(if small.is_file() {
        vec![small.to_string_lossy().into_owned()]
    } else {
        vec![exe.to_string_lossy().into_owned(), "instance-worker".into()]
    })
}

/// Sends the forwards' sockets (and the connector's end) after the
/// configuration.
fn send_extra(ctl: &UnixStream, fds: &[OwnedFd]) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    if fds.is_empty() {
        return Ok(());
    }
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    crate::instance::forward::send_fds(ctl, &raw)
        .map_err(|e| format!("cannot hand the forwards to the worker: {e}"))
}

/// Binds the `--forward` sockets on this host, and starts the connector
/// for `--reverse`s; returns them in the order the worker expects.
fn forward_sockets(args: &UpArgs) -> Result<Vec<OwnedFd>, String> {
    use crate::instance::forward::{MAX_FORWARDS, Proto};
    if args.forwards.len() > MAX_FORWARDS || args.reverses.len() > MAX_FORWARDS {
        return Err(format!("at most {MAX_FORWARDS} forwards of each kind"));
    }
    let mut out = Vec::new();
    for f in &args.forwards {
        let fd: OwnedFd = match f.proto {
            Proto::Tcp => TcpListener::bind(f.listen).map(OwnedFd::from),
            Proto::Udp => UdpSocket::bind(f.listen).map(OwnedFd::from),
        }
        .map_err(|e| format!("--forward: cannot listen on {}: {e}", f.listen))?;
        out.push(fd);
    }
    if !args.reverses.is_empty() {
        for r in &args.reverses {
            if r.proto != Proto::Tcp {
                return Err(format!("--reverse {}: only tcp is supported", r.target));
            }
            if r.target.parse::<SocketAddr>().is_err() {
                return Err(format!(
                    "--reverse: the host-side target {:?} must be ADDRESS:PORT",
                    r.target
                ));
            }
        }
        let (worker_end, connector_end) =
            UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find the warren binary: {e}"))?;
        use std::os::unix::process::CommandExt;
        std::process::Command::new(exe)
            .arg("forward-connector")
            .args(args.reverses.iter().map(|r| r.target.clone()))
            .stdin(std::process::Stdio::from(OwnedFd::from(connector_end)))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start the reverse-forward connector: {e}"))?;
        out.push(OwnedFd::from(worker_end));
    }
    Ok(out)
}

/// The worker's configuration message: a 4-byte big-endian length and the
/// JSON (keys included; wiped when dropped).
fn worker_json(cfg: &WorkerConfig) -> Result<Zeroizing<Vec<u8>>, String> {
    let body = Zeroizing::new(serde_json::to_vec(cfg).map_err(|e| e.to_string())?);
    let len = u32::try_from(body.len()).map_err(|_| "configuration too large".to_string())?;
    let mut v = Zeroizing::new(Vec::with_capacity(body.len() + 4));
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&body);
    Ok(v)
}

/// The host's DNS servers (`nameserver` lines of /etc/resolv.conf), for
/// the worker's later lookups of endpoint names.
fn host_nameservers() -> Vec<std::net::IpAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()?.parse().ok())?
        })
        .take(3)
        .collect()
}

/// The routes to install: the peers' AllowedIPs, for the address families
/// the interface has an address in (a route for a family the TUN has no
/// address of could not carry anything, and the kernel refuses some).
fn routes_for(wg: &conf::WgConfig) -> Vec<warren_ipc::instance::IpPrefix> {
    let v4 = wg.interface.addresses.iter().any(|a| a.addr().is_ipv4());
    let v6 = wg.interface.addresses.iter().any(|a| a.addr().is_ipv6());
    wg.allowed_ips()
        .into_iter()
        .filter(|r| if r.addr().is_ipv4() { v4 } else { v6 })
        .collect()
}

/// An exit code and a message.
type Failure = (u8, String);

/// Resolves each peer's endpoint here, in the host namespace (the worker's
/// own lookups would go through the tunnel that is not up yet).
fn resolve_endpoints(
    wg: &conf::WgConfig,
    file: &Path,
) -> Result<(Vec<Option<SocketAddr>>, String), Failure> {
    let mut endpoints = Vec::new();
    let mut shown = Vec::new();
    for p in &wg.peers {
        let ep = match &p.endpoint {
            None => None,
            Some(e) => {
                let addrs = e.resolve().map_err(|err| {
                    (
                        exit::CONFIG,
                        format!("{}: cannot resolve Endpoint {e}: {err}", file.display()),
                    )
                })?;
                let a = addrs.into_iter().next().ok_or_else(|| {
                    (
                        exit::CONFIG,
                        format!("{}: Endpoint {e} has no address", file.display()),
                    )
                })?;
                shown.push(a.to_string());
                Some(a)
            }
        };
        endpoints.push(ep);
    }
    if endpoints.iter().all(Option::is_none) {
        return Err((
            exit::CONFIG,
            format!(
                "{}: no [Peer] has an Endpoint; warren must know where its exit is",
                file.display()
            ),
        ));
    }
    Ok((endpoints, shown.join(", ")))
}

/// The validated name and the parsed wg-quick file (its warnings printed).
fn load_named(args: &UpArgs, what: &str) -> Result<(InstanceName, conf::WgConfig), Failure> {
    let name = InstanceName::new(&args.name).map_err(|e| {
        (
            exit::USAGE,
            format!("{what} name {:?}: {}", args.name, e.reason),
        )
    })?;
    let (wg, warnings) = conf::load(&args.wg).map_err(|e| (exit::CONFIG, e.to_string()))?;
    for w in warnings {
        eprintln!("warren up: warning: {w}");
    }
    Ok((name, wg))
}

fn prepare(args: &UpArgs) -> Result<Prepared, (u8, String)> {
    let (name, wg) = load_named(args, "instance")?;
    if !(0.1..=600.0).contains(&args.timeout) {
        return Err((
            exit::USAGE,
            "--timeout must be between 0.1 and 600 seconds".into(),
        ));
    }
    let (endpoints, endpoint_text) = resolve_endpoints(&wg, &args.wg)?;
    let mtu = wg.interface.mtu.unwrap_or(DEFAULT_MTU);
    let spec = InstanceSpec::new(
        name.clone(),
        mtu,
        wg.interface.addresses.clone(),
        routes_for(&wg),
        wg.interface.dns.clone(),
    )
    .and_then(|s| s.with_search(wg.interface.dns_search.clone()))
    .map_err(|e| (exit::CONFIG, format!("{}: {}", args.wg.display(), e)))?
    .with_offload(crate::wg::offload::wanted());
    let (socks, http) = listeners(args).map_err(|e| (exit::FAILURE, e))?;
    let socks_addr = socks
        .local_addr()
        .map_err(|e| (exit::FAILURE, e.to_string()))?;
    let http_addr = http
        .local_addr()
        .map_err(|e| (exit::FAILURE, e.to_string()))?;
    let udp = tunnel_socket(wg.interface.listen_port).map_err(|e| {
        (
            exit::FAILURE,
            format!(
                "cannot bind the tunnel's UDP socket (ListenPort {:?}): {e}",
                wg.interface.listen_port
            ),
        )
    })?;
    let relay = UdpSocket::bind(SocketAddr::new(args.listen, 0)).map_err(|e| {
        (
            exit::FAILURE,
            format!("cannot bind the SOCKS5 UDP relay on {}: {e}", args.listen),
        )
    })?;
    let cfg = WorkerConfig {
        name: name.to_string(),
        wg,
        endpoints,
        host_dns: host_nameservers(),
        mtu,
        handshake_timeout_ms: (args.timeout * 1000.0) as u64,
        socks: socks_addr,
        http: http_addr,
        connect_timeout_ms: 10_000,
        max_connections: 10_000,
        verbose: args.verbose,
        host: false,
        rootless: None,
        forwards: args.forwards.clone(),
        reverses: args.reverses.clone(),
        stack: args.stack,
        offload: spec.offload,
    };
    let extra = forward_sockets(args).map_err(|e| (exit::FAILURE, e))?;
    Ok(Prepared {
        name,
        spec,
        cfg,
        extra,
        socks,
        http,
        udp,
        relay,
        endpoint_text,
        socks_addr,
        http_addr,
    })
}

/// Runs `prepare` and makes the runtime; failures are reported.
fn prepared<P>(
    args: &UpArgs,
    prepare: impl FnOnce(&UpArgs) -> Result<P, Failure>,
) -> Result<(P, tokio::runtime::Runtime), ExitCode> {
    let p = prepare(args).map_err(|(code, msg)| {
        eprintln!("warren up: {msg}");
        exit::code(code)
    })?;
    let rt = runtime().map_err(|e| fail("up", format!("cannot start the async runtime: {e}")))?;
    Ok((p, rt))
}

/// Runs `warren up`.
pub fn run_up(args: UpArgs, target: HelperTarget) -> ExitCode {
    if args.host {
        return run_up_host(args, target);
    }
    let started = Instant::now();
    match prepared(&args, prepare) {
        Ok((p, rt)) => rt.block_on(up(args, target, p, started)),
        Err(code) => code,
    }
}

async fn up(args: UpArgs, target: HelperTarget, p: Prepared, started: Instant) -> ExitCode {
    let helper = if args.rootless || args.stack == crate::instance::StackChoice::Userspace {
        None
    } else {
        match connect_or_autostart(&target.path, &target.policy).await {
            Ok(h) => Some(h),
            Err(
                e @ (ClientError::NoSocket(_)
                | ClientError::NotListening(_)
                | ClientError::Autostart(_)),
            ) => {
                eprintln!(
                    "warren up: {e}; starting {} rootless (without the helper)",
                    p.name
                );
                None
            }
            Err(e) => return crate::helper_client::report_client_error(&e),
        }
    };
    let Some(mut helper) = helper else {
        return up_rootless(args, p, started).await;
    };
    let (_info, tun) = match helper.create_instance(p.spec.clone()).await {
        Ok(x) => x,
        Err(e) => return crate::helper_client::report_client_error(&e),
    };
    // From here on, any failure must take the instance down again.
    match launch(&args, &mut helper, &p, tun).await {
        Ok((pid, ready)) => {
            let pid = pid as u32;
            report_up(&args, &p, pid, &ready, started, false);
            if args.foreground {
                return foreground(&mut helper, &p.name, pid as i32).await;
            }
            exit::code(exit::OK)
        }
        Err((pid, msg)) => {
            let _ = helper.destroy_instance(&p.name).await;
            // Return only once the worker is gone, so its listeners are
            // closed when the caller sees the failure.
            if let Some(pid) = pid {
                let _ = tokio::time::timeout(Duration::from_secs(3), async {
                    loop {
                        match helper.next_event().await {
                            Ok(Event::Exited { pid: p, .. }) if p == pid => break,
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                })
                .await;
            }
            eprintln!("warren up: {msg}");
            exit::code(exit::FAILURE)
        }
    }
}

/// Prints what `up` made.
fn report_up(
    args: &UpArgs,
    p: &Prepared,
    pid: u32,
    ready: &Ready,
    started: Instant,
    rootless: bool,
) {
    let total = started.elapsed();
    if let Some(why) = &ready.fallback {
        eprintln!(
            "warren up: {}: the kernel's TCP/IP stack is not available to this user ({why}); using the userspace stack (no `warren exec`)",
            p.name
        );
    }
    if args.json {
        let v = serde_json::json!({
            "name": p.name.as_str(),
            "socks": p.socks_addr.to_string(),
            "http": p.http_addr.to_string(),
            "endpoint": p.endpoint_text,
            "worker_pid": pid,
            "rootless": rootless,
            "stack": ready.stack,
            "handshake_ms": ready.handshake_ms,
            "up_ms": total.as_secs_f64() * 1000.0,
        });
        println!("{v}");
    } else {
        let kind = match (rootless, ready.stack.as_str()) {
            (false, _) => "",
            (true, "userspace") => " (rootless, userspace stack)",
            (true, _) => " (rootless)",
        };
        println!(
            "{} is up{kind}: SOCKS5 {}, HTTP {}; exit {} (handshake after {} ms, {:.1} ms in all)",
            p.name,
            p.socks_addr,
            p.http_addr,
            p.endpoint_text,
            ready.handshake_ms,
            total.as_secs_f64() * 1000.0
        );
        if !args.foreground {
            let exec = if ready.stack == "userspace" {
                String::new()
            } else {
                format!("   |   warren exec {} -- CMD", p.name)
            };
            println!(
                "  try: curl --socks5-hostname {} http://.../{exec}   |   warren down {}",
                p.socks_addr, p.name
            );
        }
    }
    let _ = std::io::stdout().flush();
}

/// `up` without the helper: the worker makes its own user and network
/// namespace.
async fn up_rootless(args: UpArgs, mut p: Prepared, started: Instant) -> ExitCode {
    use std::os::fd::AsRawFd;
    p.cfg.rootless = Some(p.spec.clone());
    let json = match worker_json(&p.cfg) {
        Ok(j) => j,
        Err(e) => return fail("up", e),
    };
    let extra = [
        None,
        Some(p.udp.as_raw_fd()),
        Some(p.socks.as_raw_fd()),
        Some(p.http.as_raw_fd()),
        Some(p.relay.as_raw_fd()),
    ];
    match start_direct_worker(
        p.name.as_str(),
        &json,
        &p.extra,
        &extra,
        args.timeout,
        args.foreground,
    )
    .await
    {
        Ok((pid, ready)) => {
            report_up(&args, &p, pid, &ready, started, true);
            if args.foreground {
                return foreground_rootless(pid).await;
            }
            exit::code(exit::OK)
        }
        Err(msg) => {
            eprintln!("warren up: {msg}");
            exit::code(exit::FAILURE)
        }
    }
}

/// `--foreground` without the helper: Ctrl-C ends the worker.
async fn foreground_rootless(pid: u32) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return fail("up", "cannot install signal handlers");
    };
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {
                if !pid_alive(pid) {
                    return fail("up", "the worker ended");
                }
            }
        }
    }
    stop_worker(pid).await;
    exit::code(exit::OK)
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// SIGTERM to a rootless worker (ours: same user), then SIGKILL after 3 s;
/// returns once it is gone (watched through a pidfd, so without polling
/// delays).
async fn stop_worker(pid: u32) {
    let Ok(p) = i32::try_from(pid) else { return };
    // SAFETY: pidfd_open with a pid and no flags; the result is checked.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, p, 0) };
    let pidfd = (raw >= 0).then(|| {
        // SAFETY: a new descriptor returned by pidfd_open, owned by nobody else.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw as i32) }
    });
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(p, libc::SIGTERM) };
    let exited = move |limit: Duration| {
        let Some(fd) = &pidfd else {
            std::thread::sleep(limit.min(Duration::from_millis(50)));
            return !pid_alive(pid);
        };
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(fd),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as i32) > 0 }
    };
    let done = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            if exited(Duration::from_millis(500)) || !pid_alive(pid) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    if !done {
        // SAFETY: as above.
        unsafe { libc::kill(p, libc::SIGKILL) };
        for _ in 0..40 {
            if !pid_alive(pid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Spawns the worker and waits for its report.
async fn launch(
    args: &UpArgs,
    helper: &mut HelperClient,
    p: &Prepared,
    tun: OwnedFd,
) -> Result<(i32, Ready), (Option<i32>, String)> {
    let pid = std::cell::Cell::new(None);
    launch_inner(args, helper, p, tun, &pid)
        .await
        .map_err(|e| (pid.get(), e))
}

async fn launch_inner(
    args: &UpArgs,
    helper: &mut HelperClient,
    p: &Prepared,
    tun: OwnedFd,
    spawned: &std::cell::Cell<Option<i32>>,
) -> Result<(i32, Ready), String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let log = log_path(p.name.as_str());
    let log_file = if args.foreground {
        None
    } else {
        Some(open_log(&log).map_err(|e| format!("cannot open the log {}: {e}", log.display()))?)
    };
    let stderr = std::io::stderr();
    let (out1, out2): (BorrowedFd<'_>, BorrowedFd<'_>) = match &log_file {
        Some(f) => (f.as_fd(), f.as_fd()),
        None => (stderr.as_fd(), stderr.as_fd()),
    };
    let spec = SpawnSpec {
        instance: p.name.clone(),
        argv: worker_argv()?,
        env: worker_env(),
        cwd: "/".into(),
        n_fds: 0,
        private_resolv: true,
        bind_lease: true,
        controlling_tty: false,
    };
    let fds = [
        theirs.as_fd(),
        out1,
        out2,
        tun.as_fd(),
        p.udp.as_fd(),
        p.socks.as_fd(),
        p.http.as_fd(),
        p.relay.as_fd(),
    ];
    let pid = helper
        .spawn(spec, &fds)
        .await
        .map_err(|e| format!("cannot start the worker: {e}"))?;
    spawned.set(Some(pid));
    drop(theirs);
    drop(tun);
    let ready = configure_and_wait(
        ours,
        &worker_json(&p.cfg)?,
        &p.extra,
        args.timeout,
        &log,
        args.foreground,
    )
    .await?;
    Ok((pid, ready))
}

/// What a worker reported once its tunnel was up.
#[derive(Debug)]
struct Ready {
    /// Time to the first handshake.
    handshake_ms: u64,
    /// "kernel" or "userspace".
    stack: String,
    /// Why the userspace stack was chosen, when it was a fallback.
    fallback: Option<String>,
}

/// Sends the worker its configuration (and the descriptors that follow
/// it), then waits for its one-line report.
async fn configure_and_wait(
    mut ours: UnixStream,
    config: &[u8],
    after: &[OwnedFd],
    timeout: f64,
    log: &Path,
    foreground: bool,
) -> Result<Ready, String> {
    ours.write_all(config)
        .map_err(|e| format!("cannot configure the worker: {e}"))?;
    send_extra(&ours, after)?;
    let wait = Duration::from_secs_f64(timeout) + Duration::from_secs(5);
    ours.set_read_timeout(Some(wait))
        .map_err(|e| e.to_string())?;
    // A blocking read of at most a line, on a thread.
    let line = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut line = String::new();
        BufReader::new((&ours).take(64 * 1024))
            .read_line(&mut line)
            .map(|_| line)
    })
    .await
    .map_err(|e| format!("waiting for the worker: {e}"))?
    .map_err(|e| {
        format!(
            "the worker did not answer: {e}{}",
            log_hint(log, foreground)
        )
    })?;
    match serde_json::from_str::<WorkerReport>(line.trim()) {
        Ok(WorkerReport::Ready {
            handshake_ms,
            stack,
            fallback,
        }) => Ok(Ready {
            handshake_ms,
            stack,
            fallback,
        }),
        Ok(WorkerReport::Failed { reason }) => Err(reason),
        Err(_) if line.is_empty() => Err(format!(
            "the worker exited before the tunnel came up{}",
            log_hint(log, foreground)
        )),
        Err(e) => Err(format!("the worker answered garbage ({e})")),
    }
}

fn log_hint(log: &Path, foreground: bool) -> String {
    if foreground {
        return String::new();
    }
    let t = tail(log, 5);
    if t.is_empty() {
        format!(" (log: {})", log.display())
    } else {
        format!("; last lines of {}:\n{t}", log.display())
    }
}

async fn foreground(helper: &mut HelperClient, name: &InstanceName, pid: i32) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return fail("up", "cannot install signal handlers");
    };
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            ev = helper.next_event() => match ev {
                Ok(Event::Exited { pid: p, status }) if p == pid => {
                    eprintln!("warren up: the worker ended ({status:?}); {name} is down");
                    return exit::code(exit::FAILURE);
                }
                Ok(_) => {}
                Err(e) => return crate::helper_client::report_client_error(&e),
            }
        }
    }
    match helper.destroy_instance(name).await {
        Ok(()) => {
            eprintln!("warren up: {name} is down");
            exit::code(exit::OK)
        }
        Err(e) => crate::helper_client::report_client_error(&e),
    }
}

/// Runs `warren down`.
pub fn run_down(args: DownArgs, target: HelperTarget) -> ExitCode {
    let wanted = match &args.name {
        Some(raw) => match InstanceName::new(raw) {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!("warren down: instance name {raw:?}: {}", e.reason);
                return exit::code(exit::USAGE);
            }
        },
        None => None,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail("down", format!("cannot start the async runtime: {e}")),
    };
    rt.block_on(async move {
        let mut code = exit::code(exit::OK);
        let mut found = false;
        // Helper-backed instances first (the common case: no need to ask
        // every worker), then rootless ones (this user's own processes).
        match (HelperClient::connect(&target.path).await, &wanted) {
            // One round trip for a named instance: the helper checks that
            // it is the caller's (others' answer NotFound, as missing ones).
            (Ok(mut helper), Some(n)) => match helper.destroy_instance(n).await {
                Ok(()) => {
                    println!("{n} is down");
                    return code;
                }
                Err(ClientError::Helper(HelperError::NotFound { .. })) => {}
                Err(e) => return crate::helper_client::report_client_error(&e),
            },
            (Ok(mut helper), None) => {
                let list = match helper.list_instances().await {
                    Ok(l) => l,
                    Err(e) => return crate::helper_client::report_client_error(&e),
                };
                let me = nix::unistd::getuid().as_raw();
                for i in list.iter().filter(|i| i.owner_uid == me) {
                    found = true;
                    match helper.destroy_instance(&i.name).await {
                        Ok(()) => {
                            if let Some(pid) = i.lease.strip_prefix("worker ") {
                                let _ = std::fs::remove_file(
                                    status_dir().join(format!("proxy-{pid}.sock")),
                                );
                            }
                            println!("{} is down", i.name);
                        }
                        Err(e) => code = crate::helper_client::report_client_error(&e),
                    }
                }
            }
            (Err(ClientError::NoSocket(_) | ClientError::NotListening(_)), _) => {}
            (Err(e), _) => return crate::helper_client::report_client_error(&e),
        }
        for (pid, n) in rootless_workers() {
            if wanted.as_ref().is_none_or(|w| w.as_str() == n) {
                stop_worker(pid).await;
                let _ = std::fs::remove_file(status_dir().join(format!("proxy-{pid}.sock")));
                println!("{n} is down");
                found = true;
            }
        }
        match (&wanted, found) {
            (Some(n), false) => fail("down", format!("no instance {n} (see `warren status`)")),
            _ => code,
        }
    })
}

fn status_dir() -> PathBuf {
    crate::proxy::status::runtime_dir(&crate::config::ProcessEnv)
}

/// (pid, name) of this user's running rootless workers.
fn rootless_workers() -> Vec<(u32, String)> {
    crate::proxy::status::query_all(&status_dir())
        .into_iter()
        .filter_map(|s| {
            let i = s.instance?;
            i.rootless.then_some((s.pid, i.name))
        })
        .collect()
}

/// `warren exec` for a rootless instance: join the worker's user, network
/// and mount namespaces (we own them: same user) and run the program as
/// our child, with our terminal.
fn exec_rootless(pid: u32, command: &[String]) -> ExitCode {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let open = |ns: &str| std::fs::File::open(format!("/proc/{pid}/ns/{ns}"));
    let (user, net, mnt) = match (open("user"), open("net"), open("mnt")) {
        (Ok(u), Ok(n), Ok(m)) => (u, n, m),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return fail(
                "exec",
                format!("cannot open the instance's namespaces: {e}"),
            );
        }
    };
    let fds = [
        (user.as_raw_fd(), libc::CLONE_NEWUSER),
        (net.as_raw_fd(), libc::CLONE_NEWNET),
        (mnt.as_raw_fd(), libc::CLONE_NEWNS),
    ];
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let cwd_c = std::ffi::CString::new(cwd.as_os_str().as_encoded_bytes()).unwrap_or_default();
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    // SAFETY: between fork and exec only raw system calls (setns, chdir)
    // on descriptors opened before the fork and a pre-built C string.
    unsafe {
        cmd.pre_exec(move || {
            for (fd, kind) in fds {
                if libc::setns(fd, kind) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::chdir(cwd_c.as_ptr());
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail("exec", format!("cannot run {}: {e}", command[0])),
    };
    // Ctrl-C reaches the child through the terminal (same process group);
    // we only wait for it.
    // SAFETY: sets SIGINT/SIGQUIT to ignored in this process only (the
    // child was already started with the defaults).
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    match child.wait() {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(c), _) => ExitCode::from(c.clamp(0, 255) as u8),
            (None, Some(sig)) => ExitCode::from((128 + sig).clamp(0, 255) as u8),
            _ => exit::code(exit::FAILURE),
        },
        Err(e) => fail("exec", e),
    }
}

/// Runs `warren exec`.
pub fn run_exec(args: ExecArgs, target: HelperTarget) -> ExitCode {
    let name = match InstanceName::new(&args.name) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("warren exec: instance name {:?}: {}", args.name, e.reason);
            return exit::code(exit::USAGE);
        }
    };
    if let Some(i) = crate::proxy::status::query_all(&status_dir())
        .into_iter()
        .find(|s| {
            s.instance
                .as_ref()
                .is_some_and(|i| i.rootless && i.name == name.as_str())
        })
    {
        if i.instance.as_ref().is_some_and(|i| i.stack == "userspace") {
            return fail(
                "exec",
                format!(
                    "{name} runs on the userspace TCP/IP stack (no user namespace or TUN device for you here), so there is no namespace to run a program in; use its SOCKS5/HTTP ports or --forward instead"
                ),
            );
        }
        return exec_rootless(i.pid, &args.command);
    }
    let cwd = std::env::current_dir()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "/".into());
    let env: Vec<String> = std::env::vars_os()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_str()?, v.to_str()?)))
        .filter(|e| e.len() < warren_ipc::instance::MAX_ARG_LEN)
        .take(warren_ipc::instance::MAX_ARGS)
        .collect();
    let (i, o, e) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    let pty = if args.no_tty || !crate::instance::pty::is_tty(i.as_fd()) {
        None
    } else {
        match crate::instance::pty::open_like(i.as_fd()) {
            Ok(p) => Some(p),
            Err(err) => return fail("exec", format!("cannot open a pseudo-terminal: {err}")),
        }
    };
    let spec = SpawnSpec {
        instance: name.clone(),
        argv: args.command,
        env,
        cwd,
        n_fds: 0,
        private_resolv: true,
        bind_lease: false,
        controlling_tty: pty.is_some(),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail("exec", format!("cannot start the async runtime: {e}")),
    };
    rt.block_on(async move {
        let mut helper = match HelperClient::connect(&target.path).await {
            Ok(h) => h,
            Err(ClientError::NoSocket(_) | ClientError::NotListening(_)) => {
                return fail(
                    "exec",
                    format!("no instance {name}: the helper is not running"),
                );
            }
            Err(e) => return crate::helper_client::report_client_error(&e),
        };
        // With a pty, the program's 0 is its terminal side, and so are 1
        // and 2 where ours are terminals (redirections stay as they are).
        let fds = match &pty {
            Some(p) => {
                let pick = |fd| {
                    if crate::instance::pty::is_tty(fd) {
                        p.slave.as_fd()
                    } else {
                        fd
                    }
                };
                [p.slave.as_fd(), pick(o.as_fd()), pick(e.as_fd())]
            }
            None => [i.as_fd(), o.as_fd(), e.as_fd()],
        };
        let pid = match helper.spawn(spec, &fds).await {
            Ok(pid) => pid,
            Err(err) => return crate::helper_client::report_client_error(&err),
        };
        // The pty's program side is the program's alone now: when it (and
        // whatever it started) closes it, the output relay sees the end.
        let (term, mut output_done) = match pty {
            Some(p) => {
                let out = if crate::instance::pty::is_tty(o.as_fd())
                    || !crate::instance::pty::is_tty(e.as_fd())
                {
                    o.as_fd()
                } else {
                    e.as_fd()
                };
                let master = p.master;
                drop(p.slave);
                let winch_fd = match master.try_clone() {
                    Ok(f) => f,
                    Err(err) => return fail("exec", format!("pseudo-terminal: {err}")),
                };
                let raw = crate::instance::pty::RawMode::enter(i.as_fd()).ok();
                match crate::instance::pty::relay(master, i.as_fd(), out) {
                    Ok(rx) => (Some((raw, winch_fd)), Some(rx)),
                    Err(err) => return fail("exec", format!("pseudo-terminal relay: {err}")),
                }
            }
            None => (None, None),
        };
        // The program runs as us, so we may signal it ourselves: what the
        // terminal sends us, it gets.
        use tokio::signal::unix::{SignalKind, signal};
        let mut winch = term
            .as_ref()
            .and_then(|_| signal(SignalKind::window_change()).ok());
        let kinds = [
            (SignalKind::interrupt(), libc::SIGINT),
            (SignalKind::terminate(), libc::SIGTERM),
            (SignalKind::hangup(), libc::SIGHUP),
            (SignalKind::quit(), libc::SIGQUIT),
        ];
        let (tx, mut rx) = tokio::sync::mpsc::channel::<i32>(8);
        for (k, n) in kinds {
            if let Ok(mut s) = signal(k) {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        let _ = tx.send(n).await;
                    }
                });
            }
        }
        loop {
            tokio::select! {
                Some(sig) = rx.recv() => {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, sig) };
                }
                Some(()) = async { winch.as_mut()?.recv().await } => {
                    if let Some((_, m)) = &term {
                        crate::instance::pty::copy_winsize(i.as_fd(), m.as_fd());
                    }
                }
                ev = helper.next_event() => match ev {
                    Ok(Event::Exited { pid: p, status }) if p == pid => {
                        // The rest of its output, unless something it left
                        // running keeps the terminal open.
                        if let Some(rx) = output_done.take() {
                            let _ = tokio::task::spawn_blocking(move || {
                                rx.recv_timeout(Duration::from_secs(2))
                            })
                            .await;
                        }
                        drop(term);
                        return match status {
                            ExitStatus::Code(c) => ExitCode::from(c.clamp(0, 255) as u8),
                            ExitStatus::Signal(s) => ExitCode::from((128 + s).clamp(0, 255) as u8),
                        };
                    }
                    Ok(Event::InstanceGone { .. }) => {
                        return fail("exec", format!("instance {name} went away"));
                    }
                    Ok(_) => {}
                    Err(err) => return crate::helper_client::report_client_error(&err),
                }
            }
        }
    })
}

/// The parts of `up --host` known before asking the helper.
struct HostPrepared {
    spec: warren_ipc::instance::HostTunnelSpec,
    worker: Zeroizing<Vec<u8>>,
    listen_port: Option<u16>,
    endpoint_text: String,
}

fn prepare_host(args: &UpArgs) -> Result<HostPrepared, (u8, String)> {
    let (name, wg) = load_named(args, "tunnel")?;
    let (endpoints, shown) = resolve_endpoints(&wg, &args.wg)?;
    let mtu = wg.interface.mtu.unwrap_or(DEFAULT_MTU);
    let spec = warren_ipc::instance::HostTunnelSpec::new(
        name.clone(),
        mtu,
        wg.interface.addresses.clone(),
        routes_for(&wg),
        wg.interface.dns.clone(),
        args.kill_switch,
    )
    .and_then(|s| s.with_search(wg.interface.dns_search.clone()))
    .and_then(|s| s.with_endpoints(endpoints.iter().flatten().copied().collect()))
    .map_err(|e| (exit::CONFIG, format!("{}: {}", args.wg.display(), e)))?;
    let listen_port = wg.interface.listen_port;
    let unused: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
    let cfg = WorkerConfig {
        name: name.to_string(),
        wg,
        endpoints,
        host_dns: host_nameservers(),
        mtu,
        handshake_timeout_ms: (args.timeout * 1000.0) as u64,
        socks: unused,
        http: unused,
        connect_timeout_ms: 10_000,
        max_connections: 1,
        verbose: args.verbose,
        host: true,
        rootless: None,
        forwards: Vec::new(),
        reverses: Vec::new(),
        stack: crate::instance::StackChoice::Kernel,
        // The host tunnel's TUN is opened without a virtio header.
        offload: false,
    };
    let worker = worker_json(&cfg).map_err(|e| (exit::FAILURE, e))?;
    Ok(HostPrepared {
        spec,
        worker,
        listen_port,
        endpoint_text: shown,
    })
}

/// Runs `warren up --host`: the helper routes the host through a TUN; a
/// worker started here (in its own session) runs the engine and holds the
/// helper connection, which is the tunnel's lease.
fn run_up_host(args: UpArgs, target: HelperTarget) -> ExitCode {
    let started = Instant::now();
    let (p, rt) = match prepared(&args, prepare_host) {
        Ok(x) => x,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let mut helper = match connect_or_autostart(&target.path, &target.policy).await {
            Ok(h) => h,
            Err(e) => return crate::helper_client::report_client_error(&e),
        };
        let name = p.spec.name.clone();
        let (_info, tun, udp) = match helper.create_host_tunnel(p.spec.clone()).await {
            Ok(x) => x,
            Err(e) => return crate::helper_client::report_client_error(&e),
        };
        match launch_host(&args, &helper, &p, tun, udp).await {
            Ok((pid, ready)) => {
                let handshake_ms = ready.handshake_ms;
                let total = started.elapsed().as_secs_f64() * 1000.0;
                if args.json {
                    let v = serde_json::json!({
                        "name": name.as_str(), "host": true, "endpoint": p.endpoint_text,
                        "worker_pid": pid, "handshake_ms": handshake_ms, "up_ms": total,
                    });
                    println!("{v}");
                } else {
                    println!(
                        "{name} is up: this host routes through {} (handshake after {handshake_ms} ms, {total:.1} ms in all); `warren down {name}` restores it",
                        p.endpoint_text
                    );
                }
                exit::code(exit::OK)
            }
            Err(msg) => {
                let _ = helper.destroy_instance(&name).await;
                eprintln!("warren up: {msg}");
                exit::code(exit::FAILURE)
            }
        }
    })
}

async fn launch_host(
    args: &UpArgs,
    helper: &HelperClient,
    p: &HostPrepared,
    tun: OwnedFd,
    udp: OwnedFd,
) -> Result<(u32, Ready), String> {
    use std::os::fd::AsRawFd;
    if let Some(port) = p.listen_port {
        let addr = nix::sys::socket::SockaddrIn6::from(std::net::SocketAddrV6::new(
            Ipv6Addr::UNSPECIFIED,
            port,
            0,
            0,
        ));
        nix::sys::socket::bind(udp.as_raw_fd(), &addr).map_err(|e| {
            format!("cannot bind the tunnel's UDP socket to ListenPort {port}: {e}")
        })?;
    }
    let (pid, ready) = start_direct_worker(
        p.spec.name.as_str(),
        &p.worker,
        &[],
        &[
            Some(tun.as_raw_fd()),
            Some(udp.as_raw_fd()),
            Some(helper.socket().as_raw_fd()),
        ],
        args.timeout,
        false,
    )
    .await?;
    Ok((pid, ready))
}

/// Starts `warren instance-worker` as a child of this process (no helper
/// involved) in a session of its own, with the control socket, the log on
/// 1 and 2, and `extra` as fds 3, 4, ... (`None` leaves that number
/// closed); sends it `config` and waits for its report.
async fn start_direct_worker(
    name: &str,
    config: &[u8],
    after: &[OwnedFd],
    extra: &[Option<std::os::fd::RawFd>],
    timeout: f64,
    foreground: bool,
) -> Result<(u32, Ready), String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let log = log_path(name);
    let log_file = if foreground {
        None
    } else {
        Some(open_log(&log).map_err(|e| format!("cannot open the log {}: {e}", log.display()))?)
    };
    let out = log_file.as_ref().map_or(2, |f| f.as_raw_fd());
    let argv = worker_argv()?;
    let mut src: Vec<Option<i32>> = vec![Some(theirs.as_raw_fd()), Some(out), Some(out)];
    src.extend_from_slice(extra);
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe system calls (dup2, close, setsid) on descriptors
    // that are open in the child; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let base = 100;
            for (i, fd) in src.iter().enumerate() {
                if let Some(fd) = fd
                    && libc::dup2(*fd, base + i as i32) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, fd) in src.iter().enumerate() {
                let i = i as i32;
                if fd.is_none() {
                    continue;
                }
                if libc::dup2(base + i, i) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(base + i);
            }
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the worker: {e}"))?;
    let pid = child.id();
    drop(theirs);
    let ready = configure_and_wait(ours, config, after, timeout, &log, foreground).await;
    // The worker is not our child to wait for: it lives on in its own
    // session (it is reaped by init when it ends).
    drop(child);
    Ok((pid, ready?))
}
