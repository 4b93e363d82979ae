//! Starting the root helper on demand through sudo.
//!
//! When the helper's socket is missing (no systemd socket unit), a client
//! that needs the helper runs exactly the command line that
//! `packaging/sudoers.d/warren` whitelists:
//!
//! ```text
//! sudo -n -b /usr/bin/warren-helper serve --autostarted
//! ```
//!
//! `-n` never prompts; only when that fails for want of a password *and* the
//! client has a terminal does it run sudo once more and let it ask. A
//! per-user lock file keeps two clients from starting two helpers; the client
//! then waits (bounded) until the socket answers. The autostarted helper
//! exits by itself when idle. Each way this can fail has its own error.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use crate::helper_client::AutostartError;
use crate::helper_client::{ClientError, HelperClient};

/// How a command reaches the helper: its socket, and whether and how to
/// start it there.
#[derive(Debug, Clone)]
pub struct HelperTarget {
    /// Socket path.
    pub path: PathBuf,
    /// Autostart policy.
    pub policy: AutostartPolicy,
}

/// How to autostart.
#[derive(Debug, Clone)]
pub struct AutostartPolicy {
    /// Autostart at all (config `[helper] autostart`, `--no-autostart`).
    pub enabled: bool,
    /// The helper binary sudo runs (must match the sudoers line).
    pub helper: PathBuf,
    /// How long to wait for the helper's socket to answer.
    pub timeout: Duration,
    /// Whether sudo may ask for a password (only ever with a terminal).
    pub interactive: bool,
    /// The sudo binary.
    pub sudo: PathBuf,
}

impl AutostartPolicy {
    /// The default: enabled, the `warren-helper` installed beside this
    /// `warren`, 10 s, a password prompt only on a terminal.
    pub fn from_current_exe() -> Self {
        let helper = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("warren-helper")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("/usr/bin/warren-helper"));
        AutostartPolicy {
            enabled: true,
            helper,
            timeout: Duration::from_secs(10),
            interactive: std::io::IsTerminal::is_terminal(&std::io::stdin()),
            sudo: PathBuf::from("sudo"),
        }
    }
}

/// Connects to the helper, starting it through sudo first if its socket is
/// missing or dead and `policy` allows.
pub async fn connect_or_autostart(
    path: &Path,
    policy: &AutostartPolicy,
) -> Result<HelperClient, ClientError> {
    match HelperClient::connect(path).await {
        Err(ClientError::NoSocket(_) | ClientError::NotListening(_)) => {}
        other => return other,
    }
    if !policy.enabled {
        return Err(AutostartError::Disabled.into());
    }
    if path != Path::new(warren_ipc::DEFAULT_SOCKET_PATH) {
        return Err(AutostartError::NotDefaultSocket(path.into()).into());
    }
    let lock = lock_path();
    let _guard = take_lock(&lock).await?;
    // Someone else may have started it while we waited for the lock.
    if let Ok(c) = HelperClient::connect(path).await {
        return Ok(c);
    }
    start_with_sudo(policy)?;
    let deadline = Instant::now() + policy.timeout;
    loop {
        match HelperClient::connect(path).await {
            Ok(c) => return Ok(c),
            Err(ClientError::NoSocket(_) | ClientError::NotListening(_))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(ClientError::NoSocket(_) | ClientError::NotListening(_)) => {
                return Err(AutostartError::Timeout(policy.timeout).into());
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs the whitelisted command line through sudo, without a prompt; with
/// a terminal and on "password required", once more with a prompt.
fn start_with_sudo(policy: &AutostartPolicy) -> Result<(), AutostartError> {
    let (ok, err) = run_sudo(policy, &["-n", "-b"])?;
    if ok {
        return Ok(());
    }
    match classify(&err) {
        Failure::Password => {}
        Failure::Refused => return Err(AutostartError::Refused(policy.helper.clone())),
        Failure::Other => return Err(AutostartError::SudoFailed(err.trim().to_string())),
    }
    // sudo asks for a password before saying no to users who have other
    // rules; `sudo -n -l CMD` tells the two apart without a password when
    // the user has any password-less rule.
    let (_, probe) = run_sudo(policy, &["-n", "-l"])?;
    if classify(&probe) == Failure::Refused || !probe.to_ascii_lowercase().contains("password") {
        return Err(AutostartError::Refused(policy.helper.clone()));
    }
    if !policy.interactive {
        return Err(AutostartError::PasswordRequired);
    }
    let (ok, err) = run_sudo(policy, &["-b"])?;
    if ok {
        return Ok(());
    }
    Err(match classify(&err) {
        Failure::Refused => AutostartError::Refused(policy.helper.clone()),
        _ => AutostartError::SudoFailed(err.trim().to_string()),
    })
}

/// Runs `sudo FLAGS HELPER serve --autostarted`; returns success and what
/// sudo wrote to stderr.
///
/// sudo's stderr goes to a memfd rather than a pipe: with `-b` (and
/// `use_pty`) a sudo process stays beside the helper and keeps its copy of
/// stderr open, so a pipe would never reach end-of-file.
fn run_sudo(policy: &AutostartPolicy, flags: &[&str]) -> Result<(bool, String), AutostartError> {
    use std::io::{Read, Seek};
    let failed = |e: io::Error| AutostartError::SudoFailed(e.to_string());
    let memfd = nix::sys::memfd::memfd_create(
        c"warren-sudo-stderr",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )
    .map_err(|e| failed(e.into()))?;
    let mut errfile = std::fs::File::from(memfd);
    let status = Command::new(&policy.sudo)
        .args(flags)
        .arg(&policy.helper)
        .args(["serve", "--autostarted"])
        .stdin(if flags.contains(&"-n") {
            Stdio::null()
        } else {
            // sudo asks on the terminal itself.
            Stdio::inherit()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::from(errfile.try_clone().map_err(failed)?))
        .status()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => AutostartError::NoSudo,
            _ => failed(e),
        })?;
    let mut err = String::new();
    errfile.rewind().map_err(failed)?;
    errfile
        .take(64 * 1024)
        .read_to_string(&mut err)
        .map_err(failed)?;
    Ok((status.success(), err))
}

#[derive(Debug, PartialEq, Eq)]
enum Failure {
    Password,
    Refused,
    Other,
}

/// Reads sudo's complaint (its messages are stable across releases).
fn classify(stderr: &str) -> Failure {
    let s = stderr.to_ascii_lowercase();
    if s.contains("is not allowed to execute")
        || s.contains("may not run sudo")
        || s.contains("is not in the sudoers file")
    {
        Failure::Refused
    } else if s.contains("password is required") || s.contains("no tty present") {
        Failure::Password
    } else {
        Failure::Other
    }
}

/// `$XDG_RUNTIME_DIR/warren/autostart.lock`, else `/tmp/warren-UID/autostart.lock`.
fn lock_path() -> PathBuf {
    let uid = nix::unistd::getuid().as_raw();
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| PathBuf::from(d).join("warren"))
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/warren-{uid}")));
    dir.join("autostart.lock")
}

/// An exclusive `flock` on the per-user lock file, waited for at most 15 s.
async fn take_lock(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, AutostartError> {
    let lock_err = |source| AutostartError::Lock {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(lock_err(e)),
        }
        // In a shared /tmp, only a directory of our own will do.
        let m = std::fs::symlink_metadata(dir).map_err(lock_err)?;
        if !m.is_dir() || m.uid() != nix::unistd::getuid().as_raw() {
            return Err(lock_err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "lock directory is not a directory owned by this user",
            )));
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(lock_err)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = f;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err((_, e)) => return Err(lock_err(io::Error::from(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sudo_messages_are_classified() {
        assert_eq!(
            classify("sudo: a password is required\n"),
            Failure::Password
        );
        assert_eq!(
            classify(
                "Sorry, user bob is not allowed to execute '/usr/bin/warren-helper serve' as root on h.\n"
            ),
            Failure::Refused
        );
        assert_eq!(
            classify("bob is not in the sudoers file.  This incident will be reported.\n"),
            Failure::Refused
        );
        assert_eq!(
            classify("sudo: unable to execute: Permission denied"),
            Failure::Other
        );
    }

    #[tokio::test]
    async fn lock_is_exclusive_and_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w").join("autostart.lock");
        let first = take_lock(&path).await.expect("first lock");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        let second = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock);
        assert!(second.is_err(), "held lock is exclusive");
        drop(first);
        let again = take_lock(&path).await;
        assert!(again.is_ok(), "released on drop");
    }
}
