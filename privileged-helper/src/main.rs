//! `warren-helper`: the root helper's command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::os::fd::FromRawFd;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use warren_helper::auth::Authorizer;
use warren_helper::config::{DEFAULT_CONFIG_PATH, HelperConfig};
use warren_helper::listener::{Notifier, bind_own, take_systemd_env};
use warren_helper::privs::drop_privileges;
use warren_helper::server::{ServerOptions, serve};
use warren_ipc::msg::Activation;

/// Default idle exit for an autostarted or socket-activated helper.
const DEFAULT_IDLE_SECS: u64 = 60;

/// warren's root helper: creates namespaces, TUN devices, routes, DNS and NAT
/// for root and members of one group, over a Unix socket.
#[derive(Debug, Parser)]
#[command(name = "warren-helper", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve requests on the helper socket (must run as root).
    ///
    /// Under systemd socket activation the socket comes from systemd
    /// (LISTEN_FDS) and --socket is ignored; otherwise the helper binds
    /// --socket itself: parent directory root-owned and not writable by
    /// others, socket mode 0660, group = the authorized group.
    Serve(ServeArgs),
    /// Remove every namespace instance a helper that is no longer running
    /// left behind (from its journal beside the socket). Run by the systemd
    /// unit after the helper stops, crashes included; `serve` does the same
    /// at start. Refuses while a helper runs (it holds `helper.lock` beside
    /// the socket); it never connects to the socket, so it cannot start a
    /// socket-activated helper either.
    Cleanup {
        /// The socket whose journal to read.
        #[arg(long, value_name = "PATH", default_value = warren_ipc::DEFAULT_SOCKET_PATH)]
        socket: PathBuf,
    },
    /// Hand the host's mount namespace to the helper through systemd's file
    /// descriptor store. Only for the unit's `ExecStartPre=+` line (which runs
    /// it outside the unit's sandbox, in the host's namespaces): the sandboxed
    /// helper cannot open PID 1's namespace itself (docs/adr/0006).
    PassHostNamespace,
    /// Write the man pages into DIR (packaging).
    #[command(hide = true)]
    GenerateMan {
        /// Output directory.
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Socket to listen on.
    #[arg(long, value_name = "PATH", default_value = warren_ipc::DEFAULT_SOCKET_PATH)]
    socket: PathBuf,
    /// Group whose members may use the helper (name or numeric gid)
    /// [default: the config's `group`, else "warren"].
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
    /// Started on demand by a client (through sudo): exit when idle.
    #[arg(long)]
    autostarted: bool,
    /// Exit after this many seconds without clients [default: 60 when
    /// autostarted or socket-activated, never otherwise].
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// Root-owned configuration file.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Cap on simultaneous connections [default: config, else 256].
    #[arg(long, value_name = "N")]
    max_connections: Option<u32>,
    /// Cap on simultaneous connections of one user [default: config, else 32].
    #[arg(long, value_name = "N")]
    max_connections_per_uid: Option<u32>,
    /// Time a client has to finish a frame once it started one, in ms
    /// (tests shorten it).
    #[arg(long, value_name = "MS", default_value_t = 5000, hide = true)]
    frame_timeout_ms: u64,
    /// Treat the helper's own mount namespace as the host's: publish named
    /// namespaces and change /etc/resolv.conf in it. For a helper started
    /// inside a namespace that plays the host (as `ip netns exec` makes one);
    /// by default the host's is the one systemd passes (the unit's
    /// `ExecStartPre=+`), else that of the process that started the helper.
    #[arg(long)]
    own_mount_ns: bool,
    /// Run each user's programs in a cgroup of their own under the
    /// helper's, limited to `user_tasks_max` tasks (config; default 256),
    /// so no member can use up the helper's task limit. Needs the pids
    /// controller delegated to the helper's cgroup (the shipped unit's
    /// `Delegate=pids`).
    #[arg(long)]
    user_cgroups: bool,
    /// Log more (repeat for even more).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::GenerateMan { dir } => match write_man_pages(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "warren-helper: cannot write man pages to {}: {e}",
                    dir.display()
                );
                ExitCode::FAILURE
            }
        },
        Command::PassHostNamespace => match pass_host_namespace() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("warren-helper: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Cleanup { socket } => {
            warren_helper::listener::clear_env();
            init_logging(0);
            match run_cleanup(&socket) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("warren-helper: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve(args) => match run_serve(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e:#}");
                eprintln!("warren-helper: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Section 8 (system administration) pages for the helper and `serve`.
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    cmd.build();
    let mut pages = vec![("warren-helper".to_string(), cmd.clone())];
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("warren-helper-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().display_name(name)));
    }
    for (name, page) in pages {
        let mut f = std::fs::File::create(dir.join(format!("{name}.8")))?;
        clap_mangen::Man::new(page).section("8").render(&mut f)?;
    }
    Ok(())
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => tracing::Level::INFO,
        1 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// An autostarted helper was started by sudo on behalf of a client: it must
/// not keep the client's pipes open (the client waits for their end), so its
/// stdin and stdout go to /dev/null and its log to `helper.log` beside its
/// socket (root-only, truncated at each start).
fn detach_stdio(socket: &std::path::Path) -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = socket.parent().context("socket path has no directory")?;
    warren_helper::listener::ensure_socket_dir(dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join("helper.log"))
        .with_context(|| format!("cannot open {}/helper.log", dir.display()))?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("cannot open /dev/null")?;
    for (src, target) in [(null.as_fd(), 0), (null.as_fd(), 1), (log.as_fd(), 2)] {
        // SAFETY: dup2 onto the standard descriptors, which this process
        // owns; nothing holds Rust-side ownership of fds 0-2 as OwnedFd.
        let mut std_fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(target) };
        let r = nix::unistd::dup2(src, &mut std_fd);
        std::mem::forget(std_fd);
        r.context("cannot redirect standard descriptors")?;
    }
    Ok(())
}

/// Stores our mount namespace (the host's: `ExecStartPre=+` runs outside the
/// sandbox) in the service's file descriptor store, replacing any earlier one.
fn pass_host_namespace() -> anyhow::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    use std::os::fd::AsRawFd;
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        bail!(
            "NOTIFY_SOCKET is not set: this only runs from the unit's ExecStartPre=+ line \
             (with NotifyAccess=exec and FileDescriptorStoreMax=1)"
        );
    };
    let ns = std::fs::File::open("/proc/self/ns/mnt").context("cannot open /proc/self/ns/mnt")?;
    let bytes = target.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name),
        None => UnixAddr::new(bytes),
    }
    .context("bad NOTIFY_SOCKET")?;
    let sock = std::os::unix::net::UnixDatagram::unbound().context("cannot make a socket")?;
    let name = warren_helper::listener::HOST_MNT_FDNAME;
    let send = |msg: String, fds: &[std::os::fd::RawFd]| {
        let iov = [std::io::IoSlice::new(msg.as_bytes())];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs = if fds.is_empty() { &[][..] } else { &cmsg[..] };
        sendmsg(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::empty(),
            Some(&addr),
        )
    };
    // Replace, not add: a restart runs this again while the store may still
    // hold the previous start's descriptor.
    send(format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
        .context("cannot clear the file descriptor store")?;
    send(format!("FDSTORE=1\nFDNAME={name}"), &[ns.as_raw_fd()])
        .context("cannot store the host's mount namespace with systemd")?;
    Ok(())
}

/// The lock a running helper holds (beside its socket): one helper per
/// socket, and `cleanup` knows without connecting (which would start a
/// socket-activated helper again).
fn take_lock(socket: &std::path::Path) -> anyhow::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = socket.parent().context("socket path has no directory")?;
    warren_helper::listener::ensure_socket_dir(dir)?;
    let path = dir.join("helper.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// (device, inode) of what is at `path`, not following a symlink.
fn inode(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The journal lives beside the socket.
fn journal_path(socket: &std::path::Path) -> anyhow::Result<PathBuf> {
    let dir = socket.parent().context("socket path has no directory")?;
    Ok(dir.join("state.json"))
}

fn run_cleanup(socket: &std::path::Path) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root");
    }
    let Some(_lock) = take_lock(socket)? else {
        bail!(
            "a helper is running for {} (it holds helper.lock); it removes its own resources",
            socket.display()
        );
    };
    // Under the unit this runs as `ExecStopPost=+`, in the host's namespaces.
    warren_helper::netns::detect_host_mount_ns(None)?;
    warren_helper::privs::drop_privileges()?;
    let path = journal_path(socket)?;
    let (mut journal, corrupt) =
        warren_helper::journal::Journal::<warren_helper::instances::JournalEntry>::open(&path)?;
    if let Some(e) = corrupt {
        tracing::warn!(error = %e, "journal set aside");
    }
    let removed = warren_helper::instances::reconcile(&mut journal);
    let left = warren_helper::instances::unremoved(&journal);
    info!(removed, left, "cleanup done");
    if left > 0 {
        bail!("{left} orphaned resource(s) could not be removed; see the log");
    }
    Ok(())
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    // Before any thread exists: read and scrub systemd's variables.
    let systemd = take_systemd_env()?;
    init_logging(args.verbose);
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root (it creates namespaces and network devices for its clients)");
    }
    let config = HelperConfig::load(&args.config)?;
    let group = args
        .group
        .or(config.group)
        .unwrap_or_else(|| "warren".to_string());
    let authorizer = Authorizer::new(&group)?;
    // One thread serves every connection: requests are short, kernel work
    // runs on dedicated threads, and a single thread keeps the round trip
    // free of cross-thread wake-ups (docs/benchmarks.md). It creates no
    // thread now (blocking threads start later, after the privilege drop);
    // it exists this early so SIGTERM/SIGINT are handled from before the
    // socket is bound: a signal during start-up still stops cleanly.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (mut term, mut int) = {
        use tokio::signal::unix::{SignalKind, signal};
        let _in_rt = rt.enter();
        (
            signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        )
    };
    let activation = if systemd.listener.is_some() {
        Activation::Socket
    } else if args.autostarted {
        Activation::Autostarted
    } else {
        Activation::Manual
    };
    let idle_secs = args
        .idle_timeout
        .or(config.idle_timeout_secs)
        .or(match activation {
            Activation::Manual => None,
            _ => Some(DEFAULT_IDLE_SECS),
        });
    // Before anything else touches the socket's directory (a second
    // autostart must not truncate the running helper's log).
    let Some(_lock) = take_lock(&args.socket)? else {
        bail!(
            "another helper is already listening on {} (it holds helper.lock)",
            args.socket.display()
        );
    };
    if activation == Activation::Autostarted {
        detach_stdio(&args.socket)?;
    }
    let (std_listener, own_socket) = match systemd.listener {
        Some(l) => (l, None),
        None => {
            let l = bind_own(&args.socket, authorizer.gid())?;
            (l, Some((args.socket.clone(), inode(&args.socket))))
        }
    };
    warren_helper::listener::ensure_socket_dir(
        args.socket
            .parent()
            .context("socket path has no directory")?,
    )?;
    // Before dropping privileges (another process's /proc/PID/ns needs
    // them), and before the journal is reconciled: removing orphans happens
    // in the host's mount namespace.
    if args.own_mount_ns {
        info!("--own-mount-ns: this mount namespace is the host's");
    } else if warren_helper::netns::detect_host_mount_ns(systemd.host_mnt.map(std::fs::File::from))?
    {
        info!("running in a private mount namespace: named namespaces are published to the host's");
    }
    let registry = warren_helper::instances::Registry::open(journal_path(&args.socket)?)?;
    if args.user_cgroups {
        let limit = config
            .user_tasks_max
            .unwrap_or(warren_helper::cgroups::DEFAULT_USER_TASKS_MAX);
        // Where it is impossible (no pids controller delegated; a
        // container's read-only controller hierarchies), the helper still
        // serves, saying loudly what is missing: programs are then limited
        // in number per user (64), but what they fork shares its task limit.
        if let Err(e) = warren_helper::cgroups::setup(limit) {
            tracing::warn!(error = %e, "per-user task limits unavailable: programs' forks share the helper's task limit");
        }
    }
    let dropped = drop_privileges()?;
    info!(kept = ?dropped.kept, "capabilities dropped to what the helper needs; no_new_privs set");

    let mut opts = ServerOptions::new(authorizer);
    opts.activation = activation;
    opts.idle_timeout = idle_secs.map(Duration::from_secs);
    if let Some(n) = args.max_connections.or(config.max_connections) {
        opts.max_connections = n;
    }
    if let Some(n) = args
        .max_connections_per_uid
        .or(config.max_connections_per_uid)
    {
        opts.max_connections_per_uid = n;
    }
    opts.frame_timeout = Duration::from_millis(args.frame_timeout_ms.max(1));
    opts.handshake_timeout = opts.frame_timeout;
    opts.notifier = Notifier::new(systemd.notify);
    opts.watchdog = systemd.watchdog;
    opts.registry = Some(registry);

    let reason = rt.block_on(async move {
        std_listener
            .set_nonblocking(true)
            .context("cannot make the socket non-blocking")?;
        let listener = tokio::net::UnixListener::from_std(std_listener)
            .context("cannot register the socket")?;
        let token = CancellationToken::new();
        let signals = token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = int.recv() => info!("SIGINT received"),
            }
            signals.cancel();
        });
        anyhow::Ok(serve(listener, opts, token).await)
    })?;
    // Only the socket this helper bound: whatever has been put at the path
    // since (by an administrator; no helper can while we hold the lock) stays.
    if let Some((path, bound)) = own_socket
        && bound.is_some()
        && inode(&path) == bound
    {
        let _ = std::fs::remove_file(&path);
    }
    info!(reason = ?reason, "stopped");
    Ok(())
}
