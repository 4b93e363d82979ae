//! The helper's server: accept loop, per-connection tasks, limits, idle
//! exit, graceful shutdown, systemd notifications.
//!
//! Each connection is its own task, so a slow or hostile client only ever
//! occupies its own task. Limits:
//!
//! * the version handshake must arrive within `handshake_timeout`;
//! * once a frame's first byte has arrived, the whole frame must arrive
//!   within `frame_timeout` (a byte-trickling client is cut off);
//! * a frame header announcing more than the size cap is refused at once,
//!   before any of its body is read;
//! * at most `max_connections` connections in all and
//!   `max_connections_per_uid` per user, so one user's idle connections
//!   cannot lock others out;
//! * before that, at most 128 connections in all and 32 per user that are
//!   not yet authenticated (handshake, group and caps still to check), so
//!   idle connects cannot exhaust the helper's descriptors;
//! * a peer's descriptors are never closed on the event loop
//!   ([`crate::closer`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use warren_ipc::handshake::{ClientHello, HANDSHAKE_LEN, ServerHello};
use warren_ipc::msg::{Activation, HelloInfo, StatusInfo};
use warren_ipc::{
    ClientFrame, Event, FrameError, FramedConn, HelperError, MAX_FRAME_LEN, PROTOCOL_VERSION,
    Request, Response, ServerFrame, TransportError,
};

use crate::auth::{Authorizer, PeerCred};
use crate::instances::Registry;
use crate::listener::Notifier;

/// How long a shutdown waits for in-flight requests before giving up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything that shapes the server's behaviour.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Who may use the helper.
    pub authorizer: Authorizer,
    /// How the helper was started.
    pub activation: Activation,
    /// Exit after this long without clients.
    pub idle_timeout: Option<Duration>,
    /// Cap on simultaneous connections.
    pub max_connections: u32,
    /// Cap on simultaneous connections of one uid.
    pub max_connections_per_uid: u32,
    /// Time allowed for the version handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for the rest of a frame once its first byte arrived.
    pub frame_timeout: Duration,
    /// sd_notify target.
    pub notifier: Notifier,
    /// Watchdog interval requested by systemd.
    pub watchdog: Option<Duration>,
    /// Instances and their journal (None: this helper creates none, as in
    /// tests of the protocol alone).
    pub registry: Option<Registry>,
}

impl ServerOptions {
    /// Defaults for everything but the authorized group.
    pub fn new(authorizer: Authorizer) -> Self {
        ServerOptions {
            authorizer,
            activation: Activation::Manual,
            idle_timeout: None,
            max_connections: 256,
            max_connections_per_uid: 32,
            handshake_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(5),
            notifier: Notifier::default(),
            watchdog: None,
            registry: None,
        }
    }
}

/// Why the server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM, SIGINT or the caller's token.
    Shutdown,
    /// No client for the idle timeout.
    Idle,
}

struct Shared {
    opts: ServerOptions,
    started: Instant,
    per_uid: Mutex<HashMap<u32, u32>>,
    total: AtomicU32,
    /// Not-yet-authenticated connections: in all, and per uid.
    pre_auth: Mutex<(u32, HashMap<u32, u32>)>,
    next_conn: AtomicU64,
    incidents: AtomicU64,
    count_tx: watch::Sender<u32>,
}

/// Connections not yet authenticated (no handshake, or not yet checked
/// against the group and the connection caps), per uid and in all: what
/// keeps idle connects from exhausting the helper's descriptors.
const PRE_AUTH_PER_UID: u32 = 32;
const PRE_AUTH_TOTAL: u32 = 128;

/// A not-yet-authenticated connection's place in those counts.
struct PreAuth {
    shared: Arc<Shared>,
    uid: u32,
}

impl Drop for PreAuth {
    fn drop(&mut self) {
        let mut c = self
            .shared
            .pre_auth
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        c.0 -= 1;
        if let Some(n) = c.1.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.1.remove(&self.uid);
            }
        }
    }
}

/// A connection slot; releasing it updates the counters.
struct Slot {
    shared: Arc<Shared>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self
            .shared
            .per_uid
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.uid);
            }
        }
        let left = self.shared.total.fetch_sub(1, Ordering::SeqCst) - 1;
        drop(map);
        self.shared.count_tx.send_replace(left);
    }
}

impl Shared {
    /// Takes a connection slot for `uid`, or says which limit is hit.
    fn admit(self: &Arc<Self>, uid: u32) -> Result<Slot, HelperError> {
        let mut map = self.per_uid.lock().unwrap_or_else(|p| p.into_inner());
        let mine = map.entry(uid).or_insert(0);
        if *mine >= self.opts.max_connections_per_uid {
            if *mine == 0 {
                map.remove(&uid);
            }
            return Err(HelperError::TooManyConnections {
                limit: self.opts.max_connections_per_uid,
            });
        }
        if self.total.load(Ordering::SeqCst) >= self.opts.max_connections {
            if *mine == 0 {
                map.remove(&uid);
            }
            return Err(HelperError::TooManyConnections {
                limit: self.opts.max_connections,
            });
        }
        *mine += 1;
        let now = self.total.fetch_add(1, Ordering::SeqCst) + 1;
        drop(map);
        self.count_tx.send_replace(now);
        Ok(Slot {
            shared: self.clone(),
            uid,
        })
    }

    /// Counts a new connection as not yet authenticated, if under the caps.
    fn pre_admit(self: &Arc<Self>, uid: u32) -> Option<PreAuth> {
        let mut c = self.pre_auth.lock().unwrap_or_else(|p| p.into_inner());
        let mine = c.1.get(&uid).copied().unwrap_or(0);
        if c.0 >= PRE_AUTH_TOTAL || mine >= PRE_AUTH_PER_UID {
            return None;
        }
        c.0 += 1;
        c.1.insert(uid, mine + 1);
        Some(PreAuth {
            shared: self.clone(),
            uid,
        })
    }

    fn incident(&self) -> u64 {
        self.incidents.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn resources(&self) -> usize {
        self.opts.registry.as_ref().map_or(0, Registry::count)
    }
}

/// Serves `listener` until `shutdown` is cancelled or the idle timeout
/// fires. In-flight requests are finished before it returns.
pub async fn serve(
    listener: UnixListener,
    opts: ServerOptions,
    shutdown: CancellationToken,
) -> StopReason {
    let (count_tx, mut count_rx) = watch::channel(0u32);
    let shared = Arc::new(Shared {
        opts,
        started: Instant::now(),
        per_uid: Mutex::new(HashMap::new()),
        total: AtomicU32::new(0),
        pre_auth: Mutex::new((0, HashMap::new())),
        next_conn: AtomicU64::new(1),
        incidents: AtomicU64::new(0),
        count_tx,
    });
    let opts = &shared.opts;
    let tracker = TaskTracker::new();
    let conns_token = CancellationToken::new();
    if let Some(period) = opts.watchdog {
        let notifier = opts.notifier.clone();
        let stop = conns_token.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(e) = notifier.send("WATCHDOG=1") {
                            warn!(error = %e, "cannot ping the systemd watchdog");
                        }
                    }
                }
            }
        });
    }
    notify(&opts.notifier, "READY=1\nSTATUS=serving, no clients");
    info!(
        group = opts.authorizer.group_name(),
        gid = opts.authorizer.gid(),
        activation = ?opts.activation,
        idle_timeout_secs = opts.idle_timeout.map(|d| d.as_secs()),
        "ready"
    );
    let mut idle_since = Instant::now();
    let reason = loop {
        let idle_deadline = match opts.idle_timeout {
            Some(t) if *count_rx.borrow() == 0 && shared.resources() == 0 => {
                Some(tokio::time::Instant::from_std(idle_since + t))
            }
            _ => None,
        };
        tokio::select! {
            _ = shutdown.cancelled() => break StopReason::Shutdown,
            _ = async {
                match idle_deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => break StopReason::Idle,
            changed = count_rx.changed() => {
                if changed.is_err() { break StopReason::Shutdown; }
                let n = *count_rx.borrow_and_update();
                if n == 0 { idle_since = Instant::now(); }
                notify(&opts.notifier, &format!("STATUS=serving, {n} client(s) connected"));
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    let token = conns_token.clone();
                    tracker.spawn(async move { handle(stream, shared, token).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    };
    drop(listener);
    notify(&opts.notifier, "STOPPING=1\nSTATUS=stopping");
    info!(reason = ?reason, "stopping: no longer accepting, finishing requests in flight");
    conns_token.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        warn!("some connections did not finish within {DRAIN_TIMEOUT:?}");
    }
    if let Some(r) = &shared.opts.registry {
        r.remove_all().await;
        crate::cgroups::remove_empty();
    }
    reason
}

fn notify(n: &Notifier, msg: &str) {
    if let Err(e) = n.send(msg) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// Serves one connection, then closes it (see [`dispose`]).
async fn handle(stream: UnixStream, shared: Arc<Shared>, stop: CancellationToken) {
    let cred = match PeerCred::of(stream.as_fd()) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot read peer credentials; closing");
            return dispose(stream, vec![]).await;
        }
    };
    let Some(pre) = shared.pre_admit(cred.uid) else {
        warn!(
            uid = cred.uid,
            pid = cred.pid,
            "refused: too many connections not yet authenticated"
        );
        return dispose(stream, vec![]).await;
    };
    let mut conn = FramedConn::new(stream);
    // Both held until the descriptors are handed over, so a closer backlog
    // stays bounded by the connection caps.
    let (mut pre, mut slot) = (Some(pre), None);
    serve_conn(&mut conn, &shared, &cred, stop, &mut pre, &mut slot).await;
    let fds = conn.take_fds();
    dispose(conn.into_stream(), fds).await;
    drop((pre, slot));
}

/// Closes a connection and the descriptors its peer passed that were not
/// handed on. Shut down first, the peer can queue nothing more; if it left
/// nothing unread (so no descriptor in flight) and passed none, the close
/// cannot block and happens here, else on the closer thread.
async fn dispose(stream: UnixStream, mut fds: Vec<std::os::fd::OwnedFd>) {
    let Ok(s) = stream.into_std() else { return };
    let _ = s.shutdown(std::net::Shutdown::Both);
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the valid pointer.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut unread) };
    if fds.is_empty() && rc == 0 && unread == 0 {
        return;
    }
    fds.push(s.into());
    crate::closer::close(fds).await;
}

/// Refuses a handshake (version 0: none in common).
async fn refuse_handshake(conn: &mut FramedConn) {
    let no = ServerHello {
        chosen: 0,
        helper_max: PROTOCOL_VERSION,
    };
    let _ = conn.write_raw(&no.encode()).await;
}

/// The connection's life. `pre` counts it as not yet authenticated until
/// it gets its connection `slot`.
async fn serve_conn(
    conn: &mut FramedConn,
    shared: &Arc<Shared>,
    cred: &PeerCred,
    stop: CancellationToken,
    pre: &mut Option<PreAuth>,
    slot: &mut Option<Slot>,
) {
    let (uid, pid) = (cred.uid, cred.pid);
    let opts = &shared.opts;
    let version = match tokio::time::timeout(
        opts.handshake_timeout,
        conn.read_raw::<HANDSHAKE_LEN>(Some(opts.frame_timeout)),
    )
    .await
    {
        Err(_) => {
            info!(uid, pid, "no handshake in time; closing");
            return;
        }
        Ok(Err(e @ TransportError::UnexpectedFds)) => {
            // Descriptors come only with a spawn request that declares them.
            warn!(uid, pid, error = %e, "descriptors with the handshake; refusing");
            refuse_handshake(conn).await;
            return;
        }
        Ok(Err(e)) => {
            info!(uid, pid, error = %e, "handshake failed; closing");
            return;
        }
        Ok(Ok(bytes)) => match ClientHello::decode(&bytes).and_then(ClientHello::negotiate) {
            Ok(v) => v,
            Err(e) => {
                warn!(uid, pid, error = %e, "refusing handshake");
                refuse_handshake(conn).await;
                return;
            }
        },
    };
    if conn
        .write_raw(
            &ServerHello {
                chosen: version,
                helper_max: PROTOCOL_VERSION,
            }
            .encode(),
        )
        .await
        .is_err()
    {
        return;
    }
    if !opts.authorizer.allows(cred) {
        warn!(
            uid,
            pid,
            gid = cred.gid,
            group = opts.authorizer.group_name(),
            "refused: peer is neither root nor a member of the authorized group"
        );
        refuse(
            conn,
            opts.frame_timeout,
            HelperError::NotAuthorized {
                group: opts.authorizer.group_name().into(),
            },
        )
        .await;
        return;
    }
    *slot = match shared.admit(uid) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(uid, pid, error = %e, "refused: connection limit");
            refuse(conn, opts.frame_timeout, e).await;
            return;
        }
    };
    *pre = None;
    debug!(uid, pid, version, "client connected");
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::channel::<Event>(64);
    if let Some(r) = &opts.registry {
        r.connect(conn_id, ev_tx);
    }
    loop {
        let read = tokio::select! {
            _ = stop.cancelled() => {
                let _ = conn.write_frame(&ServerFrame::Event(Event::ShuttingDown), &[]).await;
                break;
            }
            Some(ev) = ev_rx.recv() => {
                if conn.write_frame(&ServerFrame::Event(ev), &[]).await.is_err() {
                    break;
                }
                continue;
            }
            r = conn.read_frame::<ClientFrame>(Some(opts.frame_timeout)) => r,
        };
        let (frame, fds) = match read {
            Ok((frame, fds)) if !fds.is_empty() && !matches!(frame.request, Request::Spawn(_)) => {
                warn!(
                    uid,
                    pid,
                    op = frame.request.op_name(),
                    "descriptors with a request that takes none; closing"
                );
                crate::closer::close(fds).await;
                let refused = HelperError::InvalidArgument {
                    field: "descriptors".into(),
                    reason: "only a spawn request may carry descriptors".into(),
                };
                let reply = ServerFrame::Reply {
                    id: frame.id,
                    result: Err(refused),
                };
                let _ = conn.write_frame(&reply, &[]).await;
                break;
            }
            Ok(x) => x,
            Err(TransportError::Closed) => break,
            Err(e) => {
                warn!(uid, pid, error = %e, cause = ?std::error::Error::source(&e).map(|s| s.to_string()), "bad input from client; closing");
                if let Some(err) = reply_for(&e) {
                    let _ = conn
                        .write_frame(
                            &ServerFrame::Reply {
                                id: 0,
                                result: Err(err),
                            },
                            &[],
                        )
                        .await;
                }
                break;
            }
        };
        let op = frame.request.op_name();
        info!(uid, pid, op, id = frame.id, "request");
        let (result, reply_fds) =
            dispatch(shared, cred, conn_id, version, frame.request, fds).await;
        if let Err(e) = &result {
            info!(uid, pid, op, error = %e, "request failed");
        }
        let reply = ServerFrame::Reply {
            id: frame.id,
            result,
        };
        let sent_fds: Vec<_> = reply_fds.iter().map(AsFd::as_fd).collect();
        let written = conn.write_frame(&reply, &sent_fds).await;
        drop(sent_fds);
        if !reply_fds.is_empty() {
            let fd = reply_fds;
            // Our copy of a TUN device: if the client has already closed
            // its copy, this close unregisters the device and waits for an
            // RCU grace period (~30 ms); never on the event loop.
            tokio::task::spawn_blocking(move || drop(fd));
        }
        if let Err(e) = written {
            debug!(uid, pid, error = %e, "cannot answer; closing");
            break;
        }
    }
    if let Some(r) = &opts.registry {
        r.disconnect(conn_id).await;
    }
    debug!(uid, pid, "client disconnected");
}

/// Answers the client's first request (if it sends one in time) with
/// `err`, then lets the connection close.
async fn refuse(conn: &mut FramedConn, wait: Duration, err: HelperError) {
    let id = match tokio::time::timeout(wait, conn.read_frame::<ClientFrame>(Some(wait))).await {
        Ok(Ok((frame, fds))) => {
            crate::closer::close(fds).await;
            frame.id
        }
        _ => 0,
    };
    let _ = conn
        .write_frame(
            &ServerFrame::Reply {
                id,
                result: Err(err),
            },
            &[],
        )
        .await;
}

/// The error a misbehaving client is told before being disconnected.
fn reply_for(e: &TransportError) -> Option<HelperError> {
    match e {
        TransportError::Frame(FrameError::TooLarge { .. }) => Some(HelperError::FrameTooLarge {
            max: MAX_FRAME_LEN as u32,
        }),
        TransportError::Frame(_)
        | TransportError::FdsMissing { .. }
        | TransportError::UnexpectedFds => Some(HelperError::Malformed),
        _ => None,
    }
}

/// Carries out one request; some answers come with a descriptor.
async fn dispatch(
    shared: &Shared,
    cred: &PeerCred,
    conn_id: u64,
    version: u16,
    request: Request,
    fds: Vec<std::os::fd::OwnedFd>,
) -> (Result<Response, HelperError>, Vec<std::os::fd::OwnedFd>) {
    let registry = match (&request, &shared.opts.registry) {
        (Request::Hello { .. } | Request::Status, _) => None,
        (_, Some(r)) => Some(r),
        (_, None) => {
            crate::closer::close(fds).await;
            return (Err(HelperError::Unsupported), vec![]);
        }
    };
    match (request, registry) {
        (Request::CreateInstance(spec), Some(r)) => match r.create(spec, cred, conn_id).await {
            Ok((info, tun)) => (Ok(Response::InstanceCreated(info)), vec![tun]),
            Err(e) => (Err(e), vec![]),
        },
        (Request::Destroy { name }, Some(r)) => (
            r.destroy(&name, cred).await.map(|()| Response::Destroyed),
            vec![],
        ),
        (Request::ListInstances, Some(r)) => (Ok(Response::Instances(r.list(cred))), vec![]),
        (Request::CreateHostTunnel(spec), Some(r)) => {
            match r.create_host(spec, cred, conn_id).await {
                Ok((info, tun, udp)) => (Ok(Response::HostTunnelCreated(info)), vec![tun, udp]),
                Err(e) => (Err(e), vec![]),
            }
        }
        (Request::CreateServerTunnel(spec), Some(r)) => {
            match r.create_server(spec, cred, conn_id).await {
                Ok((info, tun)) => (Ok(Response::ServerTunnelCreated(info)), vec![tun]),
                Err(e) => (Err(e), vec![]),
            }
        }
        (Request::Spawn(spec), Some(r)) => (
            r.spawn(spec, cred, conn_id, fds)
                .await
                .map(|pid| Response::Spawned { pid }),
            vec![],
        ),
        (request, _) => (simple(shared, cred, version, request), vec![]),
    }
}

fn simple(
    shared: &Shared,
    cred: &PeerCred,
    version: u16,
    request: Request,
) -> Result<Response, HelperError> {
    match request {
        Request::Hello { client } => {
            if client.len() > warren_ipc::msg::MAX_CLIENT_NAME {
                return Err(HelperError::InvalidArgument {
                    field: "client".into(),
                    reason: format!("longer than {} bytes", warren_ipc::msg::MAX_CLIENT_NAME),
                });
            }
            Ok(Response::Hello(HelloInfo {
                protocol: version,
                helper_version: env!("CARGO_PKG_VERSION").into(),
                peer_uid: cred.uid,
                peer_pid: cred.pid,
            }))
        }
        Request::Status => Ok(Response::Status(StatusInfo {
            protocol: version,
            helper_version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_ms: shared.started.elapsed().as_millis() as u64,
            connected_clients: shared.total.load(Ordering::SeqCst),
            resources: shared.resources() as u32,
            activation: shared.opts.activation,
            idle_timeout_secs: shared.opts.idle_timeout.map(|d| d.as_secs()),
        })),
        _ => {
            let incident = shared.incident();
            warn!(incident, uid = cred.uid, "unsupported request");
            Err(HelperError::Unsupported)
        }
    }
}
