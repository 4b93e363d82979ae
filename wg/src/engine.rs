//! The userspace WireGuard engine: boringtun's `Tunn` per peer between a
//! TUN descriptor and a UDP socket.
//!
//! One OS thread runs the whole data path (on the 2-core machines this is
//! measured on, one thread beat several; see docs/benchmarks.md):
//!
//! - UDP → TUN: `recvmmsg` batches of up to [`BATCH`] datagrams, each
//!   routed to its peer by the receiver index in the packet (the peer's
//!   slot is the index's upper 24 bits), decrypted, checked against the
//!   peer's AllowedIPs (crypto-key routing) and written to the TUN.
//! - TUN → UDP: up to [`BATCH`] packets read per wake-up, each routed to a
//!   peer by longest-prefix match on its destination, encrypted, and sent
//!   with UDP GSO (one `sendmsg` per run of equal-sized datagrams to one
//!   endpoint) or `sendmmsg` where GSO is unavailable.
//! - Timers every [`TICK`]: handshake retries, rekeying, keepalives,
//!   expiry, the shared handshake rate limiter (cookies under load).
//!
//! Roaming: an authenticated packet from a new address moves the peer's
//! endpoint there. A peer that stops answering is retried by boringtun's
//! timers forever (a handshake every 5 s while there is traffic or a
//! keepalive), so a restarted peer is found again on its own.

use std::io;
use std::mem::{MaybeUninit, size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use tracing::{debug, info, warn};

use super::offload::{self, Coalescer};
use warren_ipc::instance::IpPrefix;
use zeroize::Zeroizing;

/// Datagrams or packets handled per system call.
pub const BATCH: usize = 64;
/// Timer resolution (boringtun's timers count whole seconds).
pub const TICK: Duration = Duration::from_millis(250);
/// Handshakes per second above which peers must answer a cookie first.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// WireGuard data packet overhead: header 16 + tag 16.
const OVERHEAD: usize = 32;
/// Largest UDP payload one GSO send may carry.
const GSO_MAX_BYTES: usize = 65_000;
/// Most segments in one GSO send (UDP_MAX_SEGMENTS on older kernels).
const GSO_MAX_SEGS: usize = 64;

/// One peer of the engine.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    /// The peer's public key.
    pub public_key: [u8; 32],
    /// Optional preshared key.
    pub preshared_key: Option<Zeroizing<[u8; 32]>>,
    /// Where to send until the peer roams; `None` waits to be contacted.
    pub endpoint: Option<SocketAddr>,
    /// The endpoint's host name and port when it was given by name: it is
    /// looked up again when handshakes stop.
    pub endpoint_name: Option<(String, u16)>,
    /// Inner addresses routed to (and accepted from) this peer.
    pub allowed_ips: Vec<IpPrefix>,
    /// Keepalive interval in seconds.
    pub keepalive: Option<u16>,
}

/// What the engine needs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The interface's private key.
    pub private_key: Zeroizing<[u8; 32]>,
    /// Its peers (at least one).
    pub peers: Vec<PeerSpec>,
    /// The TUN's MTU.
    pub mtu: u16,
    /// Send with UDP GSO when the kernel supports it.
    pub gso: bool,
    /// The TUN was opened with `IFF_VNET_HDR`: packets carry a virtio
    /// header, TCP segments are merged on the way in and TSO is enabled
    /// on the way out (see [`super::offload`]). Must match the device.
    pub offload: bool,
    /// Receive/send buffer size asked for on the UDP socket.
    pub socket_buffer: usize,
    /// DNS servers reachable from the UDP socket's namespace (the host's),
    /// for looking endpoint names up again.
    pub host_dns: Vec<SocketAddr>,
}

impl EngineConfig {
    /// Defaults for the tuning knobs; `WARREN_WG_GSO=0` turns GSO off and
    /// `WARREN_WG_SOCKBUF=BYTES` sets the socket buffers (for benchmarks).
    pub fn tuning_from_env(&mut self) {
        if let Ok(v) = std::env::var("WARREN_WG_GSO") {
            self.gso = v != "0";
        }
        if let Some(n) = std::env::var("WARREN_WG_SOCKBUF")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            self.socket_buffer = n;
        }
    }
}

/// Live figures of one peer, shared with the status socket.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Base64 public key.
    pub public_key: String,
    /// Current endpoint.
    pub endpoint: Mutex<Option<SocketAddr>>,
    /// Unix time in ms of the last completed handshake; 0 = none yet.
    pub last_handshake_ms: AtomicU64,
    /// Bytes of inner packets sent to the peer.
    pub tx_bytes: AtomicU64,
    /// Bytes of inner packets received from the peer.
    pub rx_bytes: AtomicU64,
    /// The handshake has been failing for longer than the rekey-attempt
    /// time (90 s): the peer is considered gone until it answers again.
    pub expired: AtomicBool,
}

/// Live figures of the engine.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Per peer, in configuration order (replaced when the peers change).
    pub peers: std::sync::RwLock<Vec<Arc<PeerStats>>>,
    /// Datagrams dropped: not WireGuard, unknown peer, failed to decrypt.
    pub rx_invalid: AtomicU64,
    /// Packets dropped: source address not in the sending peer's AllowedIPs.
    pub rx_not_allowed: AtomicU64,
    /// Packets from the TUN with no peer for their destination.
    pub tx_no_route: AtomicU64,
    /// Send errors on the UDP socket.
    pub tx_errors: AtomicU64,
    /// The TUN carries virtio headers (offloads on).
    pub offload: AtomicBool,
    /// Writes to the TUN of merged TCP segments.
    pub tun_gso_writes: AtomicU64,
    /// Packets that went into those writes.
    pub tun_coalesced: AtomicU64,
    /// Large (TSO) packets read from the TUN.
    pub tun_gso_reads: AtomicU64,
    /// Segments cut from them.
    pub tun_segments: AtomicU64,
    /// TUN reads dropped as malformed or of an unsupported kind.
    pub tun_bad_reads: AtomicU64,
}

impl EngineStats {
    /// Age of the most recent handshake over all peers.
    pub fn last_handshake_age(&self) -> Option<Duration> {
        let newest = self
            .peers()
            .iter()
            .map(|p| p.last_handshake_ms.load(Relaxed))
            .max()
            .filter(|&ms| ms > 0)?;
        let now = unix_ms();
        Some(Duration::from_millis(now.saturating_sub(newest)))
    }

    /// The current peers' figures.
    pub fn peers(&self) -> Vec<Arc<PeerStats>> {
        self.peers.read().map(|g| g.clone()).unwrap_or_default()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type PendingPeers = Arc<Mutex<Option<Vec<PeerSpec>>>>;

/// Stops a running engine, or changes its peers.
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<OwnedFd>, PendingPeers);

impl StopHandle {
    /// Replaces the peer list (within one timer tick). Peers whose key is
    /// kept keep their sessions; new ones are added; missing ones removed.
    pub fn set_peers(&self, peers: Vec<PeerSpec>) {
        if let Ok(mut g) = self.1.lock() {
            *g = Some(peers);
        }
    }

    /// Asks the engine to stop; it returns from [`Engine::run`] promptly.
    pub fn stop(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        unsafe {
            libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8);
        }
    }
}

struct Peer {
    /// Removed by a peer update; its slot stays (session indices name it).
    removed: bool,
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    name: Option<(String, u16)>,
    last_lookup: Option<Instant>,
    /// Ids of the outstanding A and AAAA queries for `name`.
    lookup_ids: (u16, u16),
    allowed: Vec<IpPrefix>,
    stats: Arc<PeerStats>,
    static_public: [u8; 32],
}

/// The engine; [`Engine::run`] it on its own thread.
pub struct Engine {
    tun: OwnedFd,
    udp: UdpSocket,
    udp_v6: bool,
    stop: Arc<OwnedFd>,
    peers: Vec<Peer>,
    /// (prefix, peer index), longest prefixes first.
    routes: Vec<(IpPrefix, usize)>,
    static_private: StaticSecret,
    static_public: PublicKey,
    limiter: Arc<RateLimiter>,
    stats: Arc<EngineStats>,
    gso: bool,
    offload: bool,
    slot: usize,
    host_dns: Vec<SocketAddr>,
    started: Instant,
    pending: PendingPeers,
}

fn new_peer(p: &PeerSpec, slot: usize, key: &StaticSecret, limiter: &Arc<RateLimiter>) -> Peer {
    let tunn = Tunn::new(
        key.clone(),
        PublicKey::from(p.public_key),
        p.preshared_key.as_deref().copied(),
        p.keepalive.filter(|&k| k > 0),
        slot as u32,
        Some(limiter.clone()),
    );
    let stats = Arc::new(PeerStats {
        public_key: base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            p.public_key,
        ),
        endpoint: Mutex::new(p.endpoint),
        ..Default::default()
    });
    Peer {
        removed: false,
        tunn,
        endpoint: p.endpoint,
        name: p.endpoint_name.clone(),
        last_lookup: None,
        lookup_ids: (0, 0),
        allowed: p.allowed_ips.clone(),
        stats,
        static_public: p.public_key,
    }
}

/// (prefix, peer slot), longest prefixes first.
fn route_table(peers: &[Peer]) -> Vec<(IpPrefix, usize)> {
    let mut routes: Vec<(IpPrefix, usize)> = peers
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.removed)
        .flat_map(|(i, p)| p.allowed.iter().map(move |a| (*a, i)))
        .collect();
    routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
    routes
}

/// A peer never reached is looked up again after this long.
const LOOKUP_FIRST: Duration = Duration::from_secs(5);
/// A peer whose last handshake is older than this is looked up again (as
/// wireguard-tools' reresolve-dns.sh does).
const LOOKUP_STALE: Duration = Duration::from_secs(135);
/// Between two lookups of one name.
const LOOKUP_EVERY: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("peers", &self.peers.len())
            .field("gso", &self.gso)
            .finish_non_exhaustive()
    }
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

impl Engine {
    /// Builds the engine around a TUN descriptor and a bound UDP socket.
    pub fn new(
        cfg: EngineConfig,
        tun: OwnedFd,
        udp: UdpSocket,
    ) -> io::Result<(Engine, StopHandle, Arc<EngineStats>)> {
        if cfg.peers.len() > (1 << 24) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many peers",
            ));
        }
        let static_private = StaticSecret::from(*cfg.private_key);
        let static_public = PublicKey::from(&static_private);
        let limiter = Arc::new(RateLimiter::new(&static_public, HANDSHAKE_RATE_LIMIT));
        let peers: Vec<Peer> = cfg
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| new_peer(p, i, &static_private, &limiter))
            .collect();
        let stats = EngineStats {
            peers: std::sync::RwLock::new(peers.iter().map(|p| p.stats.clone()).collect()),
            offload: AtomicBool::new(cfg.offload),
            ..Default::default()
        };
        let routes = route_table(&peers);
        // The data path polls: non-blocking reads everywhere, blocking UDP
        // sends (back-pressure instead of drops when the send buffer fills).
        set_nonblocking(tun.as_raw_fd(), true)?;
        if cfg.offload {
            // Let the kernel hand over partial checksums and TCP
            // super-packets; the engine completes and cuts them.
            const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
            const TUN_F_CSUM: libc::c_ulong = 0x01;
            const TUN_F_TSO4: libc::c_ulong = 0x02;
            const TUN_F_TSO6: libc::c_ulong = 0x04;
            // SAFETY: TUNSETOFFLOAD takes its flags by value.
            let rc = unsafe {
                libc::ioctl(
                    tun.as_raw_fd(),
                    TUNSETOFFLOAD,
                    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
                )
            };
            if rc < 0 {
                warn!(error = %io::Error::last_os_error(), "TUN offloads unavailable; reading one packet at a time");
            }
        }
        udp.set_nonblocking(false)?;
        let fd = udp.as_raw_fd();
        let want = cfg.socket_buffer.min(i32::MAX as usize) as libc::c_int;
        for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            if let Err(e) = setsockopt_int(fd, libc::SOL_SOCKET, opt, want) {
                warn!(error = %e, "cannot size the UDP socket's buffers");
            }
        }
        let udp_v6 = matches!(udp.local_addr()?, SocketAddr::V6(_));
        // SAFETY: eventfd has no memory-safety preconditions.
        let efd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `efd` was just returned by eventfd and is owned by no one else.
        let stop = Arc::new(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(efd) });
        let slot = (usize::from(cfg.mtu).max(1280) + OVERHEAD + 64).next_multiple_of(64);
        let stats = Arc::new(stats);
        let pending: PendingPeers = Arc::default();
        let engine = Engine {
            pending: pending.clone(),
            tun,
            udp,
            udp_v6,
            stop: stop.clone(),
            peers,
            routes,
            static_private,
            static_public,
            limiter,
            stats: stats.clone(),
            gso: cfg.gso,
            offload: cfg.offload,
            slot,
            host_dns: cfg.host_dns,
            started: Instant::now(),
        };
        Ok((engine, StopHandle(stop, pending), stats))
    }

    /// Runs until stopped; returns the first fatal I/O error.
    pub fn run(mut self) -> io::Result<()> {
        let mut io = Buffers::new(self.slot, self.offload);
        // Start handshakes with every peer we know the address of, now
        // rather than on the first packet.
        for i in 0..self.peers.len() {
            let p = &mut self.peers[i];
            if let (Some(ep), TunnResult::WriteToNetwork(b)) = (
                p.endpoint,
                p.tunn.format_handshake_initiation(&mut io.scratch, false),
            ) {
                let b = b.to_vec();
                self.send_one(&b, ep);
            }
        }
        let mut next_tick = Instant::now() + TICK;
        let mut next_reset = Instant::now() + Duration::from_secs(1);
        info!(
            peers = self.peers.len(),
            gso = self.gso,
            offload = self.offload,
            "WireGuard engine running"
        );
        loop {
            let now = Instant::now();
            let timeout = next_tick.saturating_duration_since(now).as_millis() as libc::c_int;
            let mut fds = [
                pollfd(self.udp.as_raw_fd()),
                pollfd(self.tun.as_raw_fd()),
                pollfd(self.stop.as_raw_fd()),
            ];
            // SAFETY: `fds` is a live array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[2].revents != 0 {
                info!("WireGuard engine stopping");
                return Ok(());
            }
            if fds[0].revents != 0 {
                self.network_in(&mut io)?;
            }
            if fds[1].revents != 0 {
                match self.tun_in(&mut io) {
                    Ok(()) => {}
                    // The device was deleted (the helper removed the
                    // tunnel): nothing more to carry.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EBADFD | libc::EIO | libc::ENODEV)
                        ) =>
                    {
                        info!(error = %e, "TUN device gone; WireGuard engine stopping");
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.timers(&mut io);
                next_tick = now + TICK;
                if now >= next_reset {
                    self.limiter.reset_count();
                    next_reset = now + Duration::from_secs(1);
                }
            }
        }
    }

    /// The peer a datagram belongs to, and whether it is a handshake.
    fn peer_for_datagram(&self, dg: &[u8]) -> Option<(usize, bool)> {
        let idx = match Tunn::parse_incoming_packet(dg).ok()? {
            Packet::HandshakeInit(h) => {
                if self.peers.len() == 1 {
                    return Some((0, true));
                }
                let half =
                    parse_handshake_anon(&self.static_private, &self.static_public, &h).ok()?;
                return self
                    .peers
                    .iter()
                    .position(|p| !p.removed && p.static_public == half.peer_static_public)
                    .map(|i| (i, true));
            }
            Packet::HandshakeResponse(r) => {
                return Some(((r.receiver_idx >> 8) as usize, true))
                    .filter(|x| x.0 < self.peers.len());
            }
            Packet::PacketCookieReply(c) => c.receiver_idx,
            Packet::PacketData(d) => d.receiver_idx,
        };
        let i = (idx >> 8) as usize;
        (i < self.peers.len() && !self.peers[i].removed).then_some((i, false))
    }

    fn network_in(&mut self, io: &mut Buffers) -> io::Result<()> {
        // Bounded: at most 4 batches before looking at the TUN again.
        for _ in 0..4 {
            let n = io.recv(self.udp.as_raw_fd())?;
            for k in 0..n {
                let (len, src) = io.rx_meta[k];
                let Some(src) = src else { continue };
                let dg = &io.rx[k * io.slot..k * io.slot + len];
                if src.port() == 53 && self.host_dns.contains(&src) {
                    self.lookup_answer(dg);
                    continue;
                }
                let Some((pi, handshake)) = self.peer_for_datagram(dg) else {
                    self.stats.rx_invalid.fetch_add(1, Relaxed);
                    continue;
                };
                let peer = &mut self.peers[pi];
                let mut authenticated = true;
                // Decrypted into this datagram's own slot: with offloads
                // the batch's packets are written together at the end.
                let out = &mut io.tun_out[k * io.slot..(k + 1) * io.slot];
                let base = out.as_ptr() as usize;
                let mut deliver = None;
                match peer.tunn.decapsulate(Some(src.ip()), dg, out) {
                    TunnResult::WriteToNetwork(b) => {
                        send_to(&self.udp, self.udp_v6, b, src, &self.stats);
                        // Flush what was queued while the handshake ran.
                        while let TunnResult::WriteToNetwork(b) =
                            peer.tunn.decapsulate(None, &[], &mut io.scratch)
                        {
                            send_to(&self.udp, self.udp_v6, b, src, &self.stats);
                        }
                    }
                    TunnResult::WriteToTunnelV4(b, a) => {
                        deliver = Some((b.as_ptr() as usize - base, b.len(), IpAddr::V4(a)));
                    }
                    TunnResult::WriteToTunnelV6(b, a) => {
                        deliver = Some((b.as_ptr() as usize - base, b.len(), IpAddr::V6(a)));
                    }
                    TunnResult::Done => {}
                    TunnResult::Err(e) => {
                        authenticated = false;
                        self.stats.rx_invalid.fetch_add(1, Relaxed);
                        debug!(peer = %peer.stats.public_key, error = ?e, "datagram rejected");
                    }
                }
                if let Some((at, len, a)) = deliver.filter(|d| d.1 > 0) {
                    if !allowed(&peer.allowed, a) {
                        self.stats.rx_not_allowed.fetch_add(1, Relaxed);
                    } else {
                        peer.stats.rx_bytes.fetch_add(len as u64, Relaxed);
                        let off = k * io.slot + at;
                        if self.offload {
                            io.coalescer.push(&io.tun_out, off, len);
                        } else {
                            write_tun(self.tun.as_fd(), &io.tun_out[off..off + len]);
                        }
                    }
                }
                if authenticated && handshake {
                    note_handshake(peer, unix_ms());
                }
                if authenticated && peer.endpoint != Some(src) {
                    info!(peer = %peer.stats.public_key, endpoint = %src, "peer endpoint set");
                    peer.endpoint = Some(src);
                    if let Ok(mut g) = peer.stats.endpoint.lock() {
                        *g = Some(src);
                    }
                }
            }
            if !io.coalescer.is_empty() {
                let w = io.coalescer.flush(&mut io.tun_out, self.tun.as_fd());
                self.stats.tun_gso_writes.fetch_add(w.gso_writes, Relaxed);
                self.stats.tun_coalesced.fetch_add(w.coalesced, Relaxed);
            }
            if n < BATCH {
                break;
            }
        }
        Ok(())
    }

    fn tun_in(&mut self, io: &mut Buffers) -> io::Result<()> {
        for _ in 0..4 {
            let mut reads = 0;
            io.txq.tx_meta.clear();
            while reads < BATCH {
                let buf = &mut io.tun_in[..];
                // SAFETY: reads at most buf.len() bytes into a live buffer.
                let n =
                    unsafe { libc::read(self.tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        _ => return Err(e),
                    }
                }
                reads += 1;
                let read = &mut io.tun_in[..n as usize];
                let mut out = Outbound {
                    peers: &mut self.peers,
                    routes: &self.routes,
                    stats: &self.stats,
                    txq: &mut io.txq,
                    udp: &self.udp,
                    udp_v6: self.udp_v6,
                    gso: &mut self.gso,
                };
                if !self.offload {
                    out.packet(read);
                    continue;
                }
                match offload::segment(read, &mut io.seg, |p| out.packet(p)) {
                    Ok(1) => {}
                    Ok(k) => {
                        self.stats.tun_gso_reads.fetch_add(1, Relaxed);
                        self.stats.tun_segments.fetch_add(k as u64, Relaxed);
                    }
                    Err(e) => {
                        self.stats.tun_bad_reads.fetch_add(1, Relaxed);
                        debug!(error = ?e, len = n, "packet from the TUN dropped");
                    }
                }
            }
            flush_tx(
                &mut io.txq,
                &mut self.gso,
                &self.udp,
                self.udp_v6,
                &self.stats,
            );
            if reads < BATCH {
                break;
            }
        }
        Ok(())
    }

    fn send_one(&self, b: &[u8], to: SocketAddr) {
        send_to(&self.udp, self.udp_v6, b, to, &self.stats);
    }

    /// Asks the host's DNS servers for the addresses of peers whose
    /// endpoint was given by name and who stopped answering.
    fn lookups(&mut self) {
        let now = Instant::now();
        let now_ms = unix_ms();
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            let Some((host, _)) = &p.name else { continue };
            let last = p.stats.last_handshake_ms.load(Relaxed);
            let stale = if last == 0 {
                self.started.elapsed() >= LOOKUP_FIRST
            } else {
                now_ms.saturating_sub(last) >= LOOKUP_STALE.as_millis() as u64
            };
            let due = p.last_lookup.is_none_or(|t| now - t >= LOOKUP_EVERY);
            if !stale || !due || self.host_dns.is_empty() {
                continue;
            }
            let ids = (rand_u16(), rand_u16());
            let (Ok(qa), Ok(qaaaa)) = (
                crate::dns::query(ids.0, host, 1),
                crate::dns::query(ids.1, host, 28),
            ) else {
                continue;
            };
            debug!(peer = %p.stats.public_key, %host, "no recent handshake: looking the endpoint up again");
            for s in &self.host_dns {
                send_to(&self.udp, self.udp_v6, &qa, *s, &self.stats);
                send_to(&self.udp, self.udp_v6, &qaaaa, *s, &self.stats);
            }
            let p = &mut self.peers[i];
            p.last_lookup = Some(now);
            p.lookup_ids = ids;
        }
    }

    /// An answer from a host DNS server: moves the peer it was for to the
    /// new address (IPv4 answers preferred, as at start).
    fn lookup_answer(&mut self, dg: &[u8]) {
        if dg.len() < 2 {
            return;
        }
        let id = u16::from_be_bytes([dg[0], dg[1]]);
        for p in &mut self.peers {
            let Some((host, port)) = &p.name else {
                continue;
            };
            if id == 0 || (id != p.lookup_ids.0 && id != p.lookup_ids.1) {
                continue;
            }
            let Ok(addrs) = crate::dns::parse_response(dg, id) else {
                return;
            };
            let Some(ip) = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()) else {
                return;
            };
            let ep = SocketAddr::new(*ip, *port);
            if p.endpoint != Some(ep) {
                info!(peer = %p.stats.public_key, %host, endpoint = %ep, "endpoint looked up again: moving");
                p.endpoint = Some(ep);
                if let Ok(mut g) = p.stats.endpoint.lock() {
                    *g = Some(ep);
                }
                // Try the new address right away.
                let mut buf = [0u8; 256];
                if let TunnResult::WriteToNetwork(b) =
                    p.tunn.format_handshake_initiation(&mut buf, true)
                {
                    send_to(&self.udp, self.udp_v6, b, ep, &self.stats);
                }
            }
            return;
        }
    }

    /// Applies a pending peer update.
    fn update_peers(&mut self) {
        let Some(new) = self.pending.lock().ok().and_then(|mut g| g.take()) else {
            return;
        };
        for p in &mut self.peers {
            if !new.iter().any(|n| n.public_key == p.static_public) {
                p.removed = true;
                p.allowed.clear();
                p.endpoint = None;
            }
        }
        for n in &new {
            let count = self.peers.len();
            match self
                .peers
                .iter_mut()
                .find(|p| p.static_public == n.public_key && !p.removed)
            {
                Some(p) => {
                    p.allowed = n.allowed_ips.clone();
                    if n.endpoint.is_some() {
                        p.endpoint = n.endpoint;
                    }
                }
                None if count < (1 << 24) => {
                    let slot = self.peers.len();
                    let peer = new_peer(n, slot, &self.static_private, &self.limiter);
                    self.peers.push(peer);
                }
                None => warn!("too many peers; one not added"),
            }
        }
        self.routes = route_table(&self.peers);
        let live: Vec<Arc<PeerStats>> = self
            .peers
            .iter()
            .filter(|p| !p.removed)
            .map(|p| p.stats.clone())
            .collect();
        info!(peers = live.len(), "peers updated");
        if let Ok(mut g) = self.stats.peers.write() {
            *g = live;
        }
    }

    fn timers(&mut self, io: &mut Buffers) {
        self.update_peers();
        self.lookups();
        let now_ms = unix_ms();
        for p in &mut self.peers {
            match p.tunn.update_timers(&mut io.scratch) {
                TunnResult::WriteToNetwork(b) => {
                    if let Some(ep) = p.endpoint {
                        send_to(&self.udp, self.udp_v6, b, ep, &self.stats);
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired)
                    if !p.stats.expired.swap(true, Relaxed) =>
                {
                    warn!(peer = %p.stats.public_key, "no handshake for 90 s: peer unreachable");
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => debug!(peer = %p.stats.public_key, error = ?e, "timer"),
                _ => {}
            }
            note_handshake(p, now_ms);
        }
    }
}

/// Copies the time of the peer's last completed handshake into its stats.
fn note_handshake(p: &Peer, now_ms: u64) {
    if let Some(d) = p.tunn.time_since_last_handshake() {
        let at = now_ms.saturating_sub(d.as_millis() as u64);
        let prev = p.stats.last_handshake_ms.load(Relaxed);
        // Only move forward (boringtun's clock has coarse steps).
        if prev == 0 || at > prev + 1000 {
            if prev == 0 {
                info!(peer = %p.stats.public_key, "handshake completed");
            }
            p.stats.last_handshake_ms.store(at, Relaxed);
        }
        p.stats.expired.store(false, Relaxed);
    }
}

fn rand_u16() -> u16 {
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u16::from_be_bytes(b).max(1)
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on an open descriptor with integer arguments.
    let fl = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let fl = if on {
        fl | libc::O_NONBLOCK
    } else {
        fl & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, fl) }).map(|_| ())
}

/// Whether `a` falls in `p`.
pub fn prefix_contains(p: &IpPrefix, a: IpAddr) -> bool {
    match (p.addr(), a) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let l = u32::from(p.len());
            l == 0 || (u32::from(n) ^ u32::from(a)) >> (32 - l) == 0
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let l = u32::from(p.len());
            l == 0 || (u128::from(n) ^ u128::from(a)) >> (128 - l) == 0
        }
        _ => false,
    }
}

fn allowed(list: &[IpPrefix], a: IpAddr) -> bool {
    list.iter().any(|p| prefix_contains(p, a))
}

fn write_tun(tun: std::os::fd::BorrowedFd<'_>, b: &[u8]) {
    // SAFETY: writes a live buffer to an open descriptor. A full TUN queue
    // (EAGAIN) drops the packet, as a NIC would.
    unsafe {
        libc::write(tun.as_raw_fd(), b.as_ptr().cast(), b.len());
    }
}

/// A socket address as the kernel wants it for a socket of this family
/// (IPv4 peers are written v4-mapped on a dual-stack IPv6 socket).
fn to_sockaddr(a: SocketAddr, v6: bool) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let a = match (a, v6) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        (a, _) => a,
    };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in>().write(sin) };
            (ss, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(v6a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6a.ip().octets(),
                },
                sin6_scope_id: v6a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in6>().write(sin6) };
            (ss, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// The inverse of [`to_sockaddr`]; v4-mapped addresses come back as IPv4.
fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, sin6.sin6_scope_id)),
            })
        }
        _ => None,
    }
}

fn send_to(udp: &UdpSocket, v6: bool, b: &[u8], to: SocketAddr, stats: &EngineStats) {
    let (ss, len) = to_sockaddr(to, v6);
    // SAFETY: sends a live buffer to a live sockaddr of the given length.
    let rc = unsafe {
        libc::sendto(
            udp.as_raw_fd(),
            b.as_ptr().cast(),
            b.len(),
            0,
            (&raw const ss).cast(),
            len,
        )
    };
    if rc < 0 {
        stats.tx_errors.fetch_add(1, Relaxed);
        debug!(error = %io::Error::last_os_error(), %to, "UDP send failed");
    }
}

/// What the TUN side needs to route, encrypt and queue one packet.
struct Outbound<'a> {
    peers: &'a mut [Peer],
    routes: &'a [(IpPrefix, usize)],
    stats: &'a EngineStats,
    txq: &'a mut TxQueue,
    udp: &'a UdpSocket,
    udp_v6: bool,
    gso: &'a mut bool,
}

impl Outbound<'_> {
    /// Routes `pkt` to its peer by destination, encrypts it into the next
    /// free slot and sends the queue when it is full.
    fn packet(&mut self, pkt: &[u8]) {
        let Some(dst) = Tunn::dst_address(pkt) else {
            return;
        };
        let pi = if self.peers.len() == 1 {
            allowed(&self.peers[0].allowed, dst).then_some(0)
        } else {
            self.routes
                .iter()
                .find(|(p, _)| prefix_contains(p, dst))
                .map(|(_, i)| *i)
        };
        let Some(pi) = pi else {
            self.stats.tx_no_route.fetch_add(1, Relaxed);
            return;
        };
        if self.txq.tx_meta.len() == BATCH {
            flush_tx(self.txq, self.gso, self.udp, self.udp_v6, self.stats);
        }
        let peer = &mut self.peers[pi];
        let k = self.txq.tx_meta.len();
        let slot = self.txq.slot;
        let out = &mut self.txq.tx[k * slot..(k + 1) * slot];
        if let TunnResult::WriteToNetwork(b) = peer.tunn.encapsulate(pkt, out) {
            let len = b.len();
            peer.stats.tx_bytes.fetch_add(pkt.len() as u64, Relaxed);
            if let Some(ep) = peer.endpoint {
                self.txq.tx_meta.push((len, ep));
            }
        }
    }
}

/// Sends the queued datagrams (UDP GSO, or `sendmmsg` once the kernel has
/// refused GSO) and empties the queue.
fn flush_tx(txq: &mut TxQueue, gso: &mut bool, udp: &UdpSocket, v6: bool, stats: &EngineStats) {
    if txq.tx_meta.is_empty() {
        return;
    }
    if *gso {
        match txq.send_gso(udp.as_raw_fd(), v6) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                ) =>
            {
                warn!(error = %e, "UDP GSO unavailable; sending datagrams one by one");
                *gso = false;
                txq.send_mmsg(udp.as_raw_fd(), v6, stats);
            }
            Err(e) => {
                stats.tx_errors.fetch_add(1, Relaxed);
                debug!(error = %e, "UDP send failed");
            }
        }
    } else {
        txq.send_mmsg(udp.as_raw_fd(), v6, stats);
    }
    txq.tx_meta.clear();
}

/// The engine's packet buffers, allocated once.
struct Buffers {
    slot: usize,
    rx: Vec<u8>,
    rx_meta: Vec<(usize, Option<SocketAddr>)>,
    rx_addrs: Vec<libc::sockaddr_storage>,
    txq: TxQueue,
    /// One TUN read (with its virtio header and up to 64 KiB when the TUN
    /// has offloads).
    tun_in: Vec<u8>,
    /// One segment cut from a large TUN read.
    seg: Vec<u8>,
    /// The packets decrypted from one batch of datagrams, a slot each,
    /// kept until they are written to the TUN together.
    tun_out: Vec<u8>,
    coalescer: Coalescer,
    scratch: Vec<u8>,
}

/// Encrypted datagrams waiting to be sent, a slot each.
struct TxQueue {
    slot: usize,
    tx: Vec<u8>,
    tx_meta: Vec<(usize, SocketAddr)>,
}

impl Buffers {
    fn new(slot: usize, offload: bool) -> Buffers {
        let read = if offload {
            offload::VNET_HDR_LEN + 65_535
        } else {
            slot
        };
        Buffers {
            slot,
            rx: vec![0; BATCH * slot],
            rx_meta: vec![(0, None); BATCH],
            // SAFETY: sockaddr_storage is plain data; all-zero is valid.
            rx_addrs: vec![unsafe { zeroed() }; BATCH],
            txq: TxQueue {
                slot,
                tx: vec![0; BATCH * slot],
                tx_meta: Vec::with_capacity(BATCH),
            },
            tun_in: vec![0; read],
            seg: vec![0; slot],
            tun_out: vec![0; BATCH * slot],
            coalescer: Coalescer::default(),
            scratch: vec![0; slot.max(2048)],
        }
    }

    /// One `recvmmsg` without waiting; returns how many datagrams arrived.
    fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iov: [MaybeUninit<libc::iovec>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
        // SAFETY: mmsghdr is plain data; all-zero is a valid value.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for k in 0..BATCH {
            iov[k].write(libc::iovec {
                // SAFETY: k * slot is inside `rx` (BATCH * slot bytes).
                iov_base: unsafe { self.rx.as_mut_ptr().add(k * self.slot) }.cast(),
                iov_len: self.slot,
            });
            let h = &mut hdrs[k].msg_hdr;
            h.msg_name = (&raw mut self.rx_addrs[k]).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = iov[k].as_mut_ptr();
            h.msg_iovlen = 1;
        }
        // SAFETY: every header points at live buffers of the stated sizes
        // (iov, rx slots, rx_addrs), which outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                // ICMP errors surface on the socket; they are not fatal.
                _ if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)
                ) =>
                {
                    Ok(0)
                }
                _ => Err(e),
            };
        }
        let n = n as usize;
        for (k, h) in hdrs.iter().enumerate().take(n) {
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let len = h.msg_len as usize;
            self.rx_meta[k] = if truncated {
                (0, None)
            } else {
                (len, from_sockaddr(&self.rx_addrs[k]))
            };
        }
        Ok(n)
    }
}

impl TxQueue {
    /// Sends the queued datagrams with `sendmmsg`.
    fn send_mmsg(&mut self, fd: RawFd, v6: bool, stats: &EngineStats) {
        let n = self.tx_meta.len();
        let mut iov: [MaybeUninit<libc::iovec>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
        // SAFETY: plain data; all-zero is valid.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let mut addrs: [MaybeUninit<(libc::sockaddr_storage, libc::socklen_t)>; BATCH] =
            [const { MaybeUninit::uninit() }; BATCH];
        for k in 0..n {
            let (len, to) = self.tx_meta[k];
            let a = addrs[k].write(to_sockaddr(to, v6));
            iov[k].write(libc::iovec {
                // SAFETY: k * slot is inside `tx`.
                iov_base: unsafe { self.tx.as_mut_ptr().add(k * self.slot) }.cast(),
                iov_len: len,
            });
            let h = &mut hdrs[k].msg_hdr;
            h.msg_name = (&raw mut a.0).cast();
            h.msg_namelen = a.1;
            h.msg_iov = iov[k].as_mut_ptr();
            h.msg_iovlen = 1;
        }
        let mut done = 0;
        while done < n {
            // SAFETY: headers k < n point at initialized iovecs, addresses
            // and tx slots that outlive the call.
            let rc = unsafe {
                libc::sendmmsg(
                    fd,
                    hdrs.as_mut_ptr().add(done),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            if rc <= 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                stats.tx_errors.fetch_add(1, Relaxed);
                debug!(error = %e, "UDP send failed");
                // Skip the datagram that failed (e.g. unreachable peer).
                done += 1;
                continue;
            }
            done += rc as usize;
        }
    }

    /// Sends the queued datagrams with UDP GSO: one `sendmsg` per run of
    /// datagrams to one endpoint whose sizes are equal (the last of a run
    /// may be shorter).
    fn send_gso(&mut self, fd: RawFd, v6: bool) -> io::Result<()> {
        let n = self.tx_meta.len();
        let mut start = 0;
        let mut first_err = None;
        while start < n {
            let (size, to) = self.tx_meta[start];
            let max_segs = (GSO_MAX_BYTES / size.max(1)).clamp(1, GSO_MAX_SEGS);
            let mut end = start + 1;
            while end < n && end - start < max_segs {
                let (l, t) = self.tx_meta[end];
                if t != to || l > size {
                    break;
                }
                end += 1;
                if l < size {
                    break;
                }
            }
            if let Err(e) = self.sendmsg_gso(fd, v6, start, end, size, to) {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                ) && start == 0
                {
                    return Err(e);
                }
                first_err.get_or_insert(e);
            }
            start = end;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn sendmsg_gso(
        &mut self,
        fd: RawFd,
        v6: bool,
        start: usize,
        end: usize,
        size: usize,
        to: SocketAddr,
    ) -> io::Result<()> {
        let segs = end - start;
        let mut iov: [MaybeUninit<libc::iovec>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
        for (j, k) in (start..end).enumerate() {
            iov[j].write(libc::iovec {
                // SAFETY: k * slot is inside `tx`.
                iov_base: unsafe { self.tx.as_mut_ptr().add(k * self.slot) }.cast(),
                iov_len: self.tx_meta[k].0,
            });
        }
        let (mut ss, sslen) = to_sockaddr(to, v6);
        // Control message: UDP_SEGMENT (u16), only when there is more than
        // one datagram.
        #[repr(C, align(8))]
        struct Cmsg([u8; 64]);
        let mut cbuf = Cmsg([0; 64]);
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = (&raw mut ss).cast();
        msg.msg_namelen = sslen;
        msg.msg_iov = iov.as_mut_ptr().cast();
        msg.msg_iovlen = segs;
        if segs > 1 {
            // SAFETY: CMSG_SPACE is a pure size computation.
            let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
            msg.msg_control = cbuf.0.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: msg_control points at `cbuf`, aligned and at least
            // `space` bytes, so the first header and its data fit.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                libc::CMSG_DATA(c)
                    .cast::<u16>()
                    .write_unaligned(size as u16);
            }
        }
        loop {
            // SAFETY: msg points at live iovecs (initialized for 0..segs),
            // address and control buffer, all outliving the call.
            let rc = unsafe { libc::sendmsg(fd, &msg, 0) };
            if rc >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let p: IpPrefix = "198.18.0.0/15".parse().unwrap();
        assert!(prefix_contains(&p, "198.19.255.1".parse().unwrap()));
        assert!(!prefix_contains(&p, "198.20.0.1".parse().unwrap()));
        assert!(!prefix_contains(&p, "fd00::1".parse().unwrap()));
        let all: IpPrefix = "0.0.0.0/0".parse().unwrap();
        assert!(prefix_contains(&all, "1.2.3.4".parse().unwrap()));
        let h: IpPrefix = "fd00::1/128".parse().unwrap();
        assert!(prefix_contains(&h, "fd00::1".parse().unwrap()));
        assert!(!prefix_contains(&h, "fd00::2".parse().unwrap()));
        let all6: IpPrefix = "::/0".parse().unwrap();
        assert!(prefix_contains(&all6, "fd00::2".parse().unwrap()));
    }

    #[test]
    fn sockaddr_round_trip() {
        for a in ["198.18.0.1:51820", "[fd00::1]:7", "[::ffff:198.18.0.1]:9"] {
            let a: SocketAddr = a.parse().unwrap();
            for v6 in [true, false] {
                if a.is_ipv6() && !v6 {
                    continue;
                }
                let (ss, _) = to_sockaddr(a, v6);
                let back = from_sockaddr(&ss).unwrap();
                let want = match a {
                    SocketAddr::V6(x) if x.ip().to_ipv4_mapped().is_some() => {
                        SocketAddr::new(IpAddr::V4(x.ip().to_ipv4_mapped().unwrap()), x.port())
                    }
                    a => a,
                };
                assert_eq!(back, want);
            }
        }
    }
}
