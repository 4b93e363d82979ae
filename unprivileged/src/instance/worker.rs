//! The instance worker (`warren instance-worker`, started by the helper
//! inside the instance's namespace as the user; never by hand).
//!
//! It reads its configuration from the control socket (fd 0), runs the
//! WireGuard engine on its own thread, reports readiness once the first
//! handshake completed, then serves SOCKS5 and HTTP on the inherited
//! host-side listeners. Its outbound connections are made inside the
//! namespace, so they leave through the TUN and the tunnel.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use zeroize::{Zeroize, Zeroizing};

use super::net::{Datagram, Net};
use super::userstack::UserStack;
use super::{InstanceStatus, PeerStatus, StackChoice, WorkerConfig, WorkerReport, fds};
use crate::dns::Resolver;
use crate::exit;
use crate::proxy::server::{Access, Egress, Protocol, Settings, serve_with_slots};
use crate::transport::wire::Target;
use crate::wg::engine::{Engine, EngineConfig, EngineStats, PeerSpec};

/// Largest configuration accepted on the control socket.
const MAX_CONFIG: u64 = 1 << 20;

/// Outbound connections on the tunnel side (from inside the namespace, or
/// through the userspace stack); names resolved by the tunnel's DNS
/// servers.
#[derive(Debug, Clone)]
pub struct TunnelEgress {
    /// The resolver.
    pub dns: Resolver,
    /// Connect timeout (DNS included).
    pub timeout: Duration,
    /// Where the sockets come from.
    pub net: Net,
}

impl Egress for TunnelEgress {
    async fn connect(
        &self,
        target: &Target,
        _: crate::rules::Action,
    ) -> std::io::Result<crate::proxy::server::Outbound> {
        let fut = async {
            match target {
                Target::Addr(a) => self.net.connect(*a).await,
                Target::Domain(d, p) => {
                    let addrs = self.dns.lookup(d).await?;
                    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
                    for ip in addrs {
                        match self.net.connect(SocketAddr::new(ip, *p)).await {
                            Ok(s) => return Ok(s),
                            Err(e) => last = e,
                        }
                    }
                    Err(last)
                }
            }
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }

    /// With the userspace stack, UDP associations' datagrams go through
    /// it as frames (kernel sockets would leave from the host); inside a
    /// namespace, the proxy's own sockets already use the tunnel.
    async fn udp_tunnel(&self) -> Option<std::io::Result<crate::proxy::server::UdpTunnel>> {
        match &self.net {
            Net::Kernel => None,
            Net::User(_) => {
                let (near, far) = tokio::io::duplex(256 * 1024);
                tokio::spawn(udp_frames(self.net.clone(), self.dns.clone(), far));
                Some(Ok(Box::new(near)))
            }
        }
    }
}

/// Serves one UDP association's frames on the userspace stack: each
/// frame's payload goes to its target from a socket per address family;
/// answers come back as frames naming their source.
async fn udp_frames(net: Net, dns: Resolver, io: tokio::io::DuplexStream) {
    use crate::transport::io::UdpFrames;
    async fn recv(s: &Option<Datagram>, b: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        match s {
            Some(s) => s.recv_from(b).await,
            None => std::future::pending().await,
        }
    }
    let mut frames = UdpFrames::new(io);
    let (mut s4, mut s6): (Option<Datagram>, Option<Datagram>) = (None, None);
    // The stack does not reassemble IP fragments: an answer fits a packet.
    let (mut b4, mut b6) = (vec![0u8; 9216], vec![0u8; 9216]);
    loop {
        let answer = tokio::select! {
            r = frames.recv() => {
                let (target, payload) = match r {
                    Ok(f) => f,
                    Err(e) => {
                        debug!(error = %e, "UDP association ended");
                        return;
                    }
                };
                if let Some(dst) = super::forward::resolve(&target, &dns).await {
                    let slot = if dst.is_ipv4() { &mut s4 } else { &mut s6 };
                    if slot.is_none() {
                        *slot = net
                            .udp(dst.ip())
                            .await
                            .inspect_err(|e| debug!(error = %e, "UDP association: no socket"))
                            .ok();
                    }
                    if let Some(s) = slot
                        && let Err(e) = s.send_to(&payload, dst).await
                    {
                        debug!(%dst, error = %e, "UDP association: datagram not sent");
                    }
                }
                None
            }
            r = recv(&s4, &mut b4) => r.ok().map(|(n, from)| (from, n, 4)),
            r = recv(&s6, &mut b6) => r.ok().map(|(n, from)| (from, n, 6)),
        };
        if let Some((from, n, family)) = answer {
            let b = if family == 4 { &b4 } else { &b6 };
            if frames.send(&Target::Addr(from), &b[..n]).await.is_err() {
                return;
            }
        }
    }
}

/// Takes ownership of an inherited descriptor after checking it is open.
fn inherit(fd: RawFd, what: &str) -> Result<OwnedFd, String> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!(
            "descriptor {fd} ({what}) is missing: the worker is started by `warren up` through the helper, not by hand"
        ));
    }
    // SAFETY: the helper placed this descriptor for us at exec; nothing
    // else in this process owns it, and it is taken exactly once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not inherited by anything this process might start.
    // SAFETY: sets FD_CLOEXEC on an open descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(owned)
}

/// Tells `warren up` why the worker gives up, logs it, and gives the exit
/// code.
fn fail_report(ctl: &mut UnixStream, reason: String) -> ExitCode {
    error!("{reason}");
    report(ctl, &WorkerReport::Failed { reason });
    exit::code(exit::FAILURE)
}

fn report(ctl: &mut UnixStream, r: &WorkerReport) {
    let mut line = serde_json::to_vec(r).unwrap_or_default();
    line.push(b'\n');
    let _ = ctl.write_all(&line);
}

/// Reads the configuration: a 4-byte big-endian length, then that much
/// JSON (read exactly, so descriptors sent after it stay in the socket).
fn read_config(ctl: &mut UnixStream) -> Result<WorkerConfig, String> {
    ctl.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut len = [0u8; 4];
    ctl.read_exact(&mut len)
        .map_err(|e| format!("reading the configuration: {e}"))?;
    let len = u64::from(u32::from_be_bytes(len));
    if len > MAX_CONFIG {
        return Err(format!("configuration of {len} bytes is too large"));
    }
    let mut body = Zeroizing::new(vec![0u8; len as usize]);
    ctl.read_exact(&mut body)
        .map_err(|e| format!("reading the configuration: {e}"))?;
    let cfg = serde_json::from_slice(&body).map_err(|e| format!("bad configuration: {e}"));
    body.zeroize();
    cfg
}

/// Runs the worker; never returns while the instance is up.
pub fn run() -> ExitCode {
    let ctl = match inherit(fds::CONTROL, "control socket") {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => {
            eprintln!("warren instance-worker: {e}");
            return exit::code(exit::USAGE);
        }
    };
    let mut ctl = ctl;
    let cfg = match read_config(&mut ctl) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren instance-worker: {e}");
            report(&mut ctl, &WorkerReport::Failed { reason: e });
            return exit::code(exit::FAILURE);
        }
    };
    crate::logging::init_logging(cfg.verbose);
    // The forwards' host-side sockets and the reverse connector, if any.
    let n_extra = cfg.forwards.len() + usize::from(!cfg.reverses.is_empty());
    let extra = if n_extra > 0 {
        match super::forward::recv_fds(&ctl, n_extra) {
            Ok(v) => v,
            Err(e) => {
                return fail_report(&mut ctl, format!("receiving the forwards' sockets: {e}"));
            }
        }
    } else {
        Vec::new()
    };
    let mut fallback = None;
    if let Some(spec) = &cfg.rootless {
        // Before any thread exists: unshare(CLONE_NEWUSER) needs a
        // single-threaded process. With the userspace stack the namespaces
        // are only a fence (an empty network namespace: a socket opened
        // by mistake reaches nothing), so it goes on without them.
        if let Err(e) = super::rootless::enter(&cfg.name, spec) {
            match cfg.stack {
                StackChoice::Kernel => {
                    let reason = format!("cannot set up the rootless namespace: {e}");
                    return fail_report(&mut ctl, reason);
                }
                StackChoice::Auto => {
                    fallback = Some(format!("no user namespace ({e})"));
                }
                StackChoice::Userspace => {
                    info!(error = %e, "no user namespace; the userspace stack runs in the host's");
                }
            }
        }
    }
    match start(cfg, ctl, extra, fallback) {
        Ok(code) => code,
        Err(e) => {
            error!("{e}");
            exit::code(exit::FAILURE)
        }
    }
}

/// What the worker serves once the tunnel is up.
enum Front {
    /// A namespace instance: SOCKS5, HTTP and the UDP relay.
    Proxies {
        socks: OwnedFd,
        http: OwnedFd,
        relay: OwnedFd,
    },
    /// A host tunnel: the helper connection holding its lease.
    Host { helper: OwnedFd },
}

fn start(
    cfg: WorkerConfig,
    mut ctl: UnixStream,
    extra: Vec<OwnedFd>,
    mut fallback: Option<String>,
) -> Result<ExitCode, String> {
    let rootless = cfg.rootless.clone();
    // The stack's end of the packet pipe, with the userspace stack.
    let mut user_pipe = None;
    // Whether the engine's descriptor carries virtio headers.
    let mut offload = cfg.offload;
    let taken = (|| {
        let tun = match &rootless {
            Some(spec) => {
                let tun = if fallback.is_some() || cfg.stack == StackChoice::Userspace {
                    None
                } else {
                    match warren_netconf::create_tun_here(spec) {
                        Ok(t) => Some(t),
                        Err(e) if cfg.stack == StackChoice::Auto => {
                            fallback = Some(format!("no TUN device ({e})"));
                            None
                        }
                        Err(e) => {
                            return Err(format!(
                                "cannot create the TUN device in the rootless namespace: {e}"
                            ));
                        }
                    }
                };
                offload = tun.is_some() && spec.offload;
                match tun {
                    Some(t) => t,
                    None => {
                        let (engine_end, stack_end) = super::userstack::packet_pair()
                            .map_err(|e| format!("cannot create the packet pipe: {e}"))?;
                        user_pipe = Some(stack_end);
                        engine_end
                    }
                }
            }
            None => inherit(fds::TUN, "TUN")?,
        };
        if rootless.is_some() {
            super::rootless::drop_capabilities()?;
        }
        let udp = inherit(fds::UDP, "tunnel UDP socket")?;
        let front = if cfg.host {
            Front::Host {
                helper: inherit(fds::HELPER, "helper connection")?,
            }
        } else {
            Front::Proxies {
                socks: inherit(fds::SOCKS, "SOCKS5 listener")?,
                http: inherit(fds::HTTP, "HTTP listener")?,
                relay: inherit(fds::RELAY, "UDP relay socket")?,
            }
        };
        Ok::<_, String>((tun, udp, front))
    })();
    let (tun, udp, front) = match taken {
        Ok(x) => x,
        Err(e) => {
            report(&mut ctl, &WorkerReport::Failed { reason: e.clone() });
            return Err(e);
        }
    };
    let peers: Vec<PeerSpec> = cfg
        .wg
        .peers
        .iter()
        .zip(cfg.endpoints.iter().chain(std::iter::repeat(&None)))
        .map(|(p, ep)| PeerSpec {
            public_key: p.public_key.0,
            preshared_key: p
                .preshared_key
                .as_ref()
                .map(|k| Zeroizing::new(*k.as_bytes())),
            endpoint: *ep,
            endpoint_name: match &p.endpoint {
                Some(crate::wg::conf::Endpoint::Name { host, port }) => Some((host.clone(), *port)),
                _ => None,
            },
            allowed_ips: p.allowed_ips.clone(),
            keepalive: p.persistent_keepalive,
        })
        .collect();
    let mut ecfg = EngineConfig {
        private_key: Zeroizing::new(*cfg.wg.interface.private_key.as_bytes()),
        peers,
        mtu: cfg.mtu,
        gso: true,
        offload,
        socket_buffer: 4 << 20,
        host_dns: cfg
            .host_dns
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect(),
    };
    ecfg.tuning_from_env();
    let udp = std::net::UdpSocket::from(udp);
    let (engine, engine_stop, stats) = match Engine::new(ecfg, tun, udp) {
        Ok(x) => x,
        Err(e) => {
            let reason = format!("cannot start the WireGuard engine: {e}");
            report(
                &mut ctl,
                &WorkerReport::Failed {
                    reason: reason.clone(),
                },
            );
            return Err(reason);
        }
    };
    let started = Instant::now();
    let engine_thread = std::thread::Builder::new()
        .name("wg-engine".into())
        .spawn(move || {
            if let Err(e) = engine.run() {
                // The instance is useless without its engine: exit, and the
                // helper removes the namespace.
                error!(error = %e, "WireGuard engine failed; stopping the instance");
                std::process::exit(1);
            }
        })
        .map_err(|e| format!("cannot start the engine thread: {e}"))?;
    // Wait for the first completed handshake.
    let deadline = started + Duration::from_millis(cfg.handshake_timeout_ms);
    loop {
        if stats.last_handshake_age().is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let eps: Vec<String> = cfg
                .endpoints
                .iter()
                .flatten()
                .map(ToString::to_string)
                .collect();
            let reason = format!(
                "no WireGuard handshake with {} within {:.1} s: the peer is unreachable, not running, or does not know this key (check Endpoint, PublicKey and that the peer lists this client's public key {})",
                if eps.is_empty() {
                    "the peer".to_string()
                } else {
                    eps.join(", ")
                },
                cfg.handshake_timeout_ms as f64 / 1000.0,
                cfg.wg.public_key()
            );
            report(
                &mut ctl,
                &WorkerReport::Failed {
                    reason: reason.clone(),
                },
            );
            engine_stop.stop();
            let _ = engine_thread.join();
            return Err(reason);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let handshake_ms = started.elapsed().as_millis() as u64;
    info!(instance = %cfg.name, handshake_ms, "first handshake completed");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let code = match front {
        Front::Proxies { socks, http, relay } => rt.block_on(serve_instance(
            cfg,
            ctl,
            [socks, http, relay],
            extra,
            (user_pipe, fallback),
            stats,
            handshake_ms,
        )),
        Front::Host { helper } => rt.block_on(serve_host(cfg, ctl, helper, stats, handshake_ms)),
    };
    engine_stop.stop();
    let _ = engine_thread.join();
    Ok(code)
}

async fn serve_instance(
    cfg: WorkerConfig,
    mut ctl: UnixStream,
    [socks, http, relay]: [OwnedFd; 3],
    mut extra: Vec<OwnedFd>,
    (user_pipe, fallback): (Option<OwnedFd>, Option<String>),
    stats: Arc<EngineStats>,
    handshake_ms: u64,
) -> ExitCode {
    let listen = |fd: OwnedFd| {
        let l = std::net::TcpListener::from(fd);
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    };
    let (socks_l, http_l) = match (listen(socks), listen(http)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            let reason = format!("inherited listeners unusable: {e}");
            return fail_report(&mut ctl, reason);
        }
    };
    let relay = match crate::proxy::udpmux::UdpMux::from_fd(relay) {
        Ok(m) => Some(m),
        Err(e) => {
            warn!(error = %e, "no UDP relay socket: SOCKS5 UDP ASSOCIATE is refused");
            None
        }
    };
    let net = match user_pipe {
        None => Net::Kernel,
        Some(pipe) => {
            let addrs: Vec<(IpAddr, u8)> = cfg
                .wg
                .interface
                .addresses
                .iter()
                .map(|a| (a.addr(), a.len()))
                .collect();
            match UserStack::start(pipe, &addrs, cfg.mtu) {
                Ok(s) => Net::User(s),
                Err(e) => {
                    return fail_report(&mut ctl, format!("cannot start the userspace stack: {e}"));
                }
            }
        }
    };
    if let Some(why) = &fallback {
        warn!(reason = %why, "the kernel's stack is not available to this user: using the userspace TCP/IP stack");
    }
    let dns = Resolver::new(
        cfg.wg.interface.dns.clone(),
        cfg.wg.interface.dns_search.clone(),
    )
    .with_net(net.clone());
    let egress = Arc::new(TunnelEgress {
        dns: dns.clone(),
        timeout: Duration::from_millis(cfg.connect_timeout_ms.max(100)),
        net: net.clone(),
    });
    let connector = (!cfg.reverses.is_empty()).then(|| extra.pop()).flatten();
    super::forward::start_forwards(&cfg.forwards, extra, egress.clone(), dns.clone(), &net);
    if let Some(c) = connector {
        super::forward::start_reverses(&cfg.reverses, UnixStream::from(c), &net);
    }
    let loopback: Vec<(IpAddr, u8)> = vec![
        (IpAddr::from([127, 0, 0, 0]), 8),
        (IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]), 128),
    ];
    let settings = Arc::new(Settings {
        access: Access {
            allow: loopback,
            credentials: None,
        },
        max_connections: cfg.max_connections.max(1),
        udp_relay: relay,
        resolver: Some(dns),
        ..Settings::default()
    });
    let stop = CancellationToken::new();
    // One connection limit for both listeners.
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    let tasks = vec![
        tokio::spawn(serve_with_slots(
            socks_l,
            Protocol::Socks5,
            settings.clone(),
            egress.clone(),
            slots.clone(),
            stop.clone(),
        )),
        tokio::spawn(serve_with_slots(
            http_l,
            Protocol::Http,
            settings.clone(),
            egress,
            slots,
            stop.clone(),
        )),
    ];
    let counters = settings.counters.clone();
    let (name, socks_s, http_s) = (
        cfg.name.clone(),
        cfg.socks.to_string(),
        cfg.http.to_string(),
    );
    let status_stats = stats.clone();
    let rootless = cfg.rootless.is_some();
    let stack = net.name();
    let control = spawn_status(
        move || {
            let mut s =
                counters.snapshot(std::process::id(), vec![socks_s.clone(), http_s.clone()]);
            let mut i = instance_status(&name, &socks_s, &http_s, &status_stats);
            i.rootless = rootless;
            i.stack = stack.into();
            s.instance = Some(i);
            s
        },
        &stop,
    );
    report(
        &mut ctl,
        &WorkerReport::Ready {
            handshake_ms,
            stack: stack.into(),
            fallback,
        },
    );
    drop(ctl);
    info!(instance = %cfg.name, socks = %cfg.socks, http = %cfg.http, stack, "instance serving");
    use tokio::signal::unix::{SignalKind, signal};
    if let (Ok(mut t), Ok(mut i)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
    }
    info!("stopping");
    stop.cancel();
    // Live connections get a short grace period; the namespace goes away
    // with this process anyway.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    if let Some(c) = control {
        let _ = c.await;
    }
    exit::code(exit::OK)
}

/// A host tunnel: status socket, and wait until the helper removes the
/// tunnel (`warren down`), the helper goes away, or a signal.
async fn serve_host(
    cfg: WorkerConfig,
    mut ctl: UnixStream,
    helper: OwnedFd,
    stats: Arc<EngineStats>,
    handshake_ms: u64,
) -> ExitCode {
    let stop = CancellationToken::new();
    let name = cfg.name.clone();
    let status_stats = stats.clone();
    let control = spawn_status(
        move || {
            let mut s = crate::proxy::status::Snapshot {
                pid: std::process::id(),
                ..Default::default()
            };
            let mut i = instance_status(&name, "-", "-", &status_stats);
            i.host = true;
            s.instance = Some(i);
            s
        },
        &stop,
    );
    let conn = std::os::unix::net::UnixStream::from(helper);
    let conn = match conn
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(conn))
    {
        Ok(c) => c,
        Err(e) => {
            let reason = format!("helper connection unusable: {e}");
            return fail_report(&mut ctl, reason);
        }
    };
    let mut conn = warren_ipc::conn::FramedConn::new(conn);
    report(
        &mut ctl,
        &WorkerReport::Ready {
            handshake_ms,
            stack: "kernel".into(),
            fallback: None,
        },
    );
    drop(ctl);
    info!(tunnel = %cfg.name, "host tunnel serving");
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut t), Ok(mut i)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return exit::code(exit::FAILURE);
    };
    loop {
        tokio::select! {
            _ = t.recv() => break,
            _ = i.recv() => break,
            f = conn.read_frame::<warren_ipc::ServerFrame>(None) => match f {
                Ok((warren_ipc::ServerFrame::Event(warren_ipc::Event::InstanceGone { name }), _)) => {
                    info!(tunnel = %name, "the helper removed the tunnel");
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    info!(error = %e, "helper connection closed; the helper restores the host");
                    break;
                }
            }
        }
    }
    stop.cancel();
    if let Some(c) = control {
        let _ = c.await;
    }
    exit::code(exit::OK)
}

/// Serves `warren status` on this process's control socket until `stop`.
fn spawn_status(
    snap: impl Fn() -> crate::proxy::status::Snapshot + Send + 'static,
    stop: &CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    match crate::proxy::status::control_socket(&crate::config::ProcessEnv) {
        Ok((l, path)) => Some(tokio::spawn(crate::proxy::status::control_loop(
            l,
            path,
            snap,
            stop.clone(),
        ))),
        Err(e) => {
            warn!(error = %e, "no control socket; `warren status` will not see this worker");
            None
        }
    }
}

fn instance_status(name: &str, socks: &str, http: &str, stats: &EngineStats) -> InstanceStatus {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    InstanceStatus {
        name: name.into(),
        host: false,
        rootless: false,
        stack: "kernel".into(),
        socks: socks.into(),
        http: http.into(),
        peers: stats
            .peers()
            .iter()
            .map(|p| {
                let hs = p.last_handshake_ms.load(Relaxed);
                PeerStatus {
                    public_key: p.public_key.clone(),
                    endpoint: p
                        .endpoint
                        .lock()
                        .ok()
                        .and_then(|g| g.map(|a| a.to_string())),
                    last_handshake_secs: (hs > 0).then(|| now.saturating_sub(hs) / 1000),
                    rx_bytes: p.rx_bytes.load(Relaxed),
                    tx_bytes: p.tx_bytes.load(Relaxed),
                    unreachable: p.expired.load(Relaxed),
                }
            })
            .collect(),
        tun: super::TunStatus {
            offload: stats.offload.load(Relaxed),
            gso_writes: stats.tun_gso_writes.load(Relaxed),
            coalesced: stats.tun_coalesced.load(Relaxed),
            gso_reads: stats.tun_gso_reads.load(Relaxed),
            segments: stats.tun_segments.load(Relaxed),
            bad_reads: stats.tun_bad_reads.load(Relaxed),
        },
    }
}
