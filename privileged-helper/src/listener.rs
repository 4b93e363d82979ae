//! Where the helper listens, and how it talks to systemd.
//!
//! Either it binds its own socket (checked: a root-owned 0755 parent
//! directory, no symlinks, socket 0660 root:GROUP), or it takes the socket
//! systemd handed over (`LISTEN_FDS`/`LISTEN_PID`). Readiness and status go
//! to `NOTIFY_SOCKET` (path or abstract `@name`).
//!
//! The systemd variables are read once at start, before any thread exists,
//! and then the whole environment is cleared, so nothing the helper does or
//! spawns depends on it. They only say *where* to listen and report, never
//! *who* is authorized or *what* to do.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::config::{ConfigError, check_root_controlled};

/// Why the helper cannot listen.
#[derive(Debug, Error)]
pub enum ListenError {
    /// The socket path or its directory is unsafe.
    #[error("refusing socket path: {0}")]
    Unsafe(#[from] ConfigError),
    /// Something exists at the socket path that is not a stale socket of root's.
    #[error("refusing socket path {path}: {reason}")]
    Occupied {
        /// The path.
        path: PathBuf,
        /// What is there.
        reason: &'static str,
    },
    /// Another helper answers on this socket.
    #[error("another helper is already listening on {0}")]
    AlreadyRunning(PathBuf),
    /// A system call failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// systemd passed something that is not one listening Unix stream socket.
    #[error("socket activation: {0}")]
    Activation(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ListenError + 'a {
    move |source| ListenError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// Creates the socket's directory (0755, root) if missing, and checks that
/// it and every directory above it are root's alone.
pub fn ensure_socket_dir(dir: &Path) -> Result<(), ListenError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(dir)
                .map_err(io_err("cannot create", dir))?;
            // The umask may have narrowed the mode.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io_err("cannot chmod", dir))?;
        }
        Err(e) => return Err(io_err("cannot inspect", dir)(e)),
        Ok(_) => {}
    }
    check_root_controlled(dir)?;
    Ok(())
}

/// Binds the helper's own socket at `path`, owned by root and group `gid`,
/// mode 0660.
pub fn bind_own(path: &Path, gid: u32) -> Result<UnixListener, ListenError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or(ListenError::Occupied {
            path: path.into(),
            reason: "has no parent directory",
        })?;
    ensure_socket_dir(dir)?;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot inspect", path)(e)),
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_symlink() {
                return Err(ListenError::Occupied {
                    path: path.into(),
                    reason: "is a symlink",
                });
            }
            if !m.file_type().is_socket() {
                return Err(ListenError::Occupied {
                    path: path.into(),
                    reason: "exists and is not a socket",
                });
            }
            if m.uid() != 0 {
                return Err(ListenError::Occupied {
                    path: path.into(),
                    reason: "is a socket not owned by root",
                });
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::AlreadyRunning(path.into()));
            }
            std::fs::remove_file(path).map_err(io_err("cannot remove stale socket", path))?;
        }
    }
    // Bind with a umask that leaves the socket reachable by root only until
    // its group and mode are set.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(io_err("cannot bind", path))?;
    std::os::unix::fs::chown(path, Some(0), Some(gid)).map_err(io_err("cannot chown", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_err("cannot chmod", path))?;
    Ok(listener)
}

/// What systemd handed over at start.
#[derive(Debug, Default)]
pub struct SystemdEnv {
    /// The listening socket, when socket-activated.
    pub listener: Option<UnixListener>,
    /// Where to send notifications.
    pub notify: Option<PathBuf>,
    /// Watchdog interval, when asked for.
    pub watchdog: Option<Duration>,
    /// The host's mount namespace, kept for the helper in systemd's file
    /// descriptor store by `warren-helper pass-host-namespace` (the unit's
    /// `ExecStartPre=+`), named [`HOST_MNT_FDNAME`].
    pub host_mnt: Option<OwnedFd>,
}

/// The name under which the unit's `ExecStartPre=+` stores the host's mount
/// namespace in systemd's file descriptor store.
pub const HOST_MNT_FDNAME: &str = "host-mnt";

/// Reads the systemd variables, then empties the whole environment (see
/// [`clear_env`]). Must run before any thread is started.
pub fn take_systemd_env() -> Result<SystemdEnv, ListenError> {
    let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()
        .map_err(|e| ListenError::Activation(e.to_string()))?
        .collect();
    let notify = std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from);
    let watchdog = sd_notify::watchdog_enabled();
    clear_env();
    let (host_mnt, sockets): (Vec<_>, Vec<_>) = fds
        .into_iter()
        .partition(|(_, name)| name == HOST_MNT_FDNAME);
    let host_mnt = match host_mnt.as_slice() {
        [] => None,
        // SAFETY: sd_listen_fds semantics: systemd passed us this
        // descriptor and nothing else in the process refers to it.
        [(fd, _)] => Some(unsafe { OwnedFd::from_raw_fd(*fd) }),
        more => {
            return Err(ListenError::Activation(format!(
                "expected one {HOST_MNT_FDNAME} descriptor, got {}",
                more.len()
            )));
        }
    };
    let listener = match sockets.as_slice() {
        [] => None,
        [(fd, _)] => Some(adopt_listener(*fd)?),
        more => {
            return Err(ListenError::Activation(format!(
                "expected one socket, got {}",
                more.len()
            )));
        }
    };
    Ok(SystemdEnv {
        listener,
        notify,
        watchdog,
        host_mnt,
    })
}

/// Empties the environment: the helper keeps nothing it did not set (a
/// `PATH`, `LD_*` or locale from whoever started it must never steer what
/// it runs). Call before any thread exists.
pub fn clear_env() {
    // SAFETY: called from main before the runtime or any other thread
    // exists, so nothing reads the environment concurrently. (clearenv, not
    // remove_var: that panics on names such as "=x" that execve allows.)
    unsafe { libc::clearenv() };
}

fn adopt_listener(fd: RawFd) -> Result<UnixListener, ListenError> {
    use nix::sys::socket::{SockType, getsockname, getsockopt, sockopt};
    // SAFETY: sd_listen_fds semantics: systemd passed us this descriptor
    // and nothing else in the process refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let bad = |what: &str| ListenError::Activation(format!("fd {fd} is {what}"));
    let ty = getsockopt(&owned, sockopt::SockType).map_err(|_| bad("not a socket"))?;
    if ty != SockType::Stream {
        return Err(bad("not a stream socket"));
    }
    let listening = getsockopt(&owned, sockopt::AcceptConn).map_err(|_| bad("not a socket"))?;
    if !listening {
        return Err(bad("not listening"));
    }
    getsockname::<nix::sys::socket::UnixAddr>(owned.as_raw_fd())
        .map_err(|_| bad("not a Unix socket"))?;
    Ok(UnixListener::from(owned))
}

/// Sends sd_notify messages, if systemd asked for them.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<PathBuf>,
}

impl Notifier {
    /// A notifier for `NOTIFY_SOCKET` as read at start.
    pub fn new(target: Option<PathBuf>) -> Self {
        Notifier { target }
    }

    /// Whether anyone listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification (`READY=1`, `STATUS=...`); failures are
    /// returned for logging, never fatal.
    pub fn send(&self, msg: &str) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let sock = UnixDatagram::unbound()?;
        let bytes = target.as_os_str().as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg.as_bytes(), &addr)?;
        } else {
            sock.send_to(msg.as_bytes(), target)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifier_reaches_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("warren-notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("notify");
        let rx = UnixDatagram::bind(&path).expect("bind");
        Notifier::new(Some(path.clone()))
            .send("READY=1")
            .expect("send");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).expect("cleanup");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("warren-notify-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let rx = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        Notifier::new(Some(PathBuf::from(format!("@{name}"))))
            .send("STATUS=x")
            .expect("send");
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STATUS=x");
    }

    #[test]
    fn disabled_notifier_is_silent() {
        assert!(!Notifier::default().enabled());
        Notifier::default().send("READY=1").expect("no-op");
    }
}
