//! Counters of a running `warren proxy`, its control socket and the client
//! side used by `warren status`.
//!
//! Each proxy serves `$XDG_RUNTIME_DIR/warren/proxy-<pid>.sock` (fallback
//! `/tmp/warren-<uid>/`), mode 0600 in a 0700 directory. A client connects
//! and reads one JSON object; nothing is read from the client.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use crate::env::Env;

/// Live counters, updated by the connection tasks.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted.
    pub total: AtomicU64,
    /// Connections open now.
    pub active: AtomicU64,
    /// Connections refused (limit reached, client not allowed).
    pub refused: AtomicU64,
    /// Requests blocked by a rule.
    pub blocked: AtomicU64,
    /// Bytes from clients to targets.
    pub bytes_up: AtomicU64,
    /// Bytes from targets to clients.
    pub bytes_down: AtomicU64,
}

/// A snapshot of [`Counters`] as served on the control socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    /// Process id of the proxy.
    pub pid: u32,
    /// Its listeners.
    pub listeners: Vec<String>,
    /// Connections accepted.
    pub connections_total: u64,
    /// Connections open now.
    pub connections_active: u64,
    /// Connections refused.
    pub connections_refused: u64,
    /// Requests blocked by a rule.
    pub connections_blocked: u64,
    /// Bytes from clients to targets.
    pub bytes_up: u64,
    /// Bytes from targets to clients.
    pub bytes_down: u64,
    /// Set when this process is a namespace instance's worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceStatus>,
}

impl Counters {
    /// A snapshot.
    pub fn snapshot(&self, pid: u32, listeners: Vec<String>) -> Snapshot {
        Snapshot {
            pid,
            listeners,
            connections_total: self.total.load(Relaxed),
            connections_active: self.active.load(Relaxed),
            connections_refused: self.refused.load(Relaxed),
            connections_blocked: self.blocked.load(Relaxed),
            bytes_up: self.bytes_up.load(Relaxed),
            bytes_down: self.bytes_down.load(Relaxed),
            instance: None,
        }
    }
}

/// Decrements `active` when dropped.
#[derive(Debug)]
pub struct ActiveGuard<'a>(&'a Counters);

impl<'a> ActiveGuard<'a> {
    /// Counts one new connection.
    pub fn new(c: &'a Counters) -> ActiveGuard<'a> {
        c.total.fetch_add(1, Relaxed);
        c.active.fetch_add(1, Relaxed);
        ActiveGuard(c)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// The directory holding this user's control sockets.
pub fn runtime_dir(env: &dyn Env) -> PathBuf {
    match env.var("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(d) => Path::new(&d).join("warren"),
        None => PathBuf::from(format!("/tmp/warren-{}", nix::unistd::getuid())),
    }
}

/// Creates `dir` with mode 0700 and checks it is ours and private.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() || m.uid() != nix::unistd::getuid().as_raw() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory owned by this user",
            dir.display()
        )));
    }
    if m.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Reads the snapshot of every live proxy of this user; stale sockets
/// (their process gone) are removed.
pub fn query_all(dir: &Path) -> Vec<Snapshot> {
    use std::io::Read;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten().take(1000) {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("proxy-"))
            .and_then(|n| n.strip_suffix(".sock"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let path = e.path();
        let Ok(s) = std::os::unix::net::UnixStream::connect(&path) else {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        let mut buf = Vec::new();
        if s.take(64 * 1024).read_to_end(&mut buf).is_ok()
            && let Ok(snap) = serde_json::from_slice::<Snapshot>(&buf)
        {
            out.push(snap);
        }
    }
    out.sort_by_key(|s| s.pid);
    out
}

/// Text for `warren status`.
pub fn render(snaps: &[Snapshot]) -> String {
    if snaps.is_empty() {
        return "no warren proxy or instance running\n".into();
    }
    let mut s = String::new();
    for p in snaps {
        if let Some(i) = &p.instance {
            s.push_str(&render_instance(p, i));
            continue;
        }
        s.push_str(&format!(
            "proxy pid {} on {}: {} connections ({} active, {} refused, {} blocked), {} bytes up, {} bytes down\n",
            p.pid,
            p.listeners.join(", "),
            p.connections_total,
            p.connections_active,
            p.connections_refused,
            p.connections_blocked,
            p.bytes_up,
            p.bytes_down
        ));
    }
    s
}

fn render_instance(p: &Snapshot, i: &InstanceStatus) -> String {
    let kind = match (i.host, i.rootless, i.stack.as_str()) {
        (true, _, _) => ", host tunnel",
        (_, true, "userspace") => ", rootless, userspace TCP/IP stack",
        (_, true, _) => ", rootless",
        _ => "",
    };
    let mut s = format!(
        "instance {} (worker pid {}{kind}): SOCKS5 {}, HTTP {}; {} connections ({} active)\n",
        i.name, p.pid, i.socks, i.http, p.connections_total, p.connections_active
    );
    for peer in &i.peers {
        let hs = match (peer.last_handshake_secs, peer.unreachable) {
            (_, true) => "unreachable (no handshake for 90 s)".to_string(),
            (Some(a), false) => format!("last handshake {a} s ago"),
            (None, false) => "no handshake yet".to_string(),
        };
        s.push_str(&format!(
            "  peer {} at {}: {hs}; {} bytes in, {} bytes out\n",
            peer.public_key,
            peer.endpoint.as_deref().unwrap_or("(unknown)"),
            peer.rx_bytes,
            peer.tx_bytes
        ));
    }
    let t = &i.tun;
    if t.offload {
        s.push_str(&format!(
            "  TUN offloads on: {} merged writes ({} packets), {} TSO reads ({} segments)\n",
            t.gso_writes, t.coalesced, t.gso_reads, t.segments
        ));
    }
    s
}

/// Binds this process's control socket (mode 0600 in a 0700 directory).
pub fn control_socket(
    env: &dyn Env,
) -> std::io::Result<(tokio::net::UnixListener, std::path::PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = runtime_dir(env);
    ensure_private_dir(&dir)?;
    let path = dir.join(format!("proxy-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let l = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok((l, path))
}

/// Answers each connection on the control socket with one JSON snapshot
/// of the counters; removes the socket on shutdown.
pub async fn control_loop(
    l: tokio::net::UnixListener,
    path: std::path::PathBuf,
    snapshot: impl Fn() -> Snapshot + Send,
    stop: tokio_util::sync::CancellationToken,
) {
    use tokio::io::AsyncWriteExt;
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => break,
            r = l.accept() => r,
        };
        let Ok((mut s, _)) = r else { continue };
        let snap = snapshot();
        let body = serde_json::to_vec(&snap).unwrap_or_default();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), s.write_all(&body)).await;
    }
    let _ = std::fs::remove_file(&path);
}

/// What `warren status` shows of an instance.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceStatus {
    /// Its name.
    pub name: String,
    /// A full-host tunnel rather than a namespace instance.
    #[serde(default)]
    pub host: bool,
    /// Runs without the helper, in the worker's own user namespace.
    #[serde(default)]
    pub rootless: bool,
    /// The TCP/IP stack carrying its traffic: "kernel" or "userspace".
    #[serde(default)]
    pub stack: String,
    /// SOCKS5 listener.
    pub socks: String,
    /// HTTP listener.
    pub http: String,
    /// Its peers.
    pub peers: Vec<PeerStatus>,
    /// The TUN side's offloads.
    #[serde(default)]
    pub tun: TunStatus,
}

/// TUN offloads of an instance, in [`InstanceStatus`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TunStatus {
    /// The TUN carries virtio headers (TSO in, merged TCP segments out).
    pub offload: bool,
    /// Writes of merged TCP segments to the TUN.
    pub gso_writes: u64,
    /// Packets merged into those writes.
    pub coalesced: u64,
    /// Large (TSO) packets read from the TUN.
    pub gso_reads: u64,
    /// Segments cut from them.
    pub segments: u64,
    /// Reads dropped as malformed or unsupported.
    pub bad_reads: u64,
}

/// A peer in [`InstanceStatus`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerStatus {
    /// Public key (base64).
    pub public_key: String,
    /// Current endpoint.
    pub endpoint: Option<String>,
    /// Seconds since the last completed handshake; none yet if absent.
    pub last_handshake_secs: Option<u64>,
    /// Inner bytes received from the peer.
    pub rx_bytes: u64,
    /// Inner bytes sent to the peer.
    pub tx_bytes: u64,
    /// No handshake for 90 s: the peer is unreachable.
    pub unreachable: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn runtime_dir_prefers_xdg_and_falls_back_to_tmp() {
        let env: HashMap<String, String> =
            [("XDG_RUNTIME_DIR".to_owned(), "/run/user/7".to_owned())].into();
        assert_eq!(runtime_dir(&env), PathBuf::from("/run/user/7/warren"));
        let none: HashMap<String, String> = HashMap::new();
        assert!(runtime_dir(&none).starts_with("/tmp"));
    }

    #[test]
    fn guard_counts_active() {
        let c = Counters::default();
        {
            let _a = ActiveGuard::new(&c);
            let _b = ActiveGuard::new(&c);
            assert_eq!(c.active.load(Relaxed), 2);
        }
        let s = c.snapshot(1, vec![]);
        assert_eq!((s.connections_total, s.connections_active), (2, 0));
        assert!(render(&[s]).contains("2 connections (0 active"));
    }
}
