//! Running a program inside an instance's namespace as the requesting user:
//! their uid, gid and supplementary groups (from `SO_PEERCRED` and
//! `SO_PEERGROUPS`, never anyone else's), no capabilities, `no_new_privs`,
//! only the descriptors they passed.
//!
//! Between fork and exec only async-signal-safe system calls run (the
//! helper is multi-threaded): everything the child needs is prepared before
//! the fork. Order in the child: enter the network namespace, optionally a
//! private mount namespace with the instance's resolv.conf bound over
//! /etc/resolv.conf, its nsswitch.conf (`hosts: files dns`) over
//! /etc/nsswitch.conf and the host's name-service daemons' sockets hidden
//! ([`HIDDEN_DIRS`]), descriptors into place, then supplementary groups,
//! gid, uid (and a check that none can be regained), ambient capabilities
//! cleared, no_new_privs, and only then the working directory.
//!
//! When the helper runs in a private mount namespace (its hardened unit),
//! the child first enters the host's, so the program sees the user's real
//! file system.
//!
//! The child is tracked by a pidfd (taken before it can be reaped, so its
//! pid can't have been reused), never by its pid number alone.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use warren_ipc::instance::ExitStatus;

use crate::auth::PeerCred;

/// A spawned program: its pid and a pidfd to wait on or signal it.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid.
    pub pid: i32,
    /// A descriptor for the process itself.
    pub pidfd: OwnedFd,
}

/// The host's name-service directories hidden from a program with the
/// instance's resolv.conf (see [`warren_netconf::NAME_SERVICE_DIRS`]).
pub use warren_netconf::NAME_SERVICE_DIRS as HIDDEN_DIRS;
use warren_netconf::RESOLVED_RESOLV_FILES as RESOLV_LINK_TARGETS;

/// The instance's files bound over /etc in the program's mount namespace.
struct PrivateEtc {
    resolv: CString,
    nsswitch: CString,
}

/// Everything the child needs, prepared before fork.
struct Prepared {
    /// The user's `cgroup.procs` (see [`crate::cgroups`]).
    cgroup: Option<RawFd>,
    host_mnt: Option<RawFd>,
    netns: RawFd,
    etc: Option<PrivateEtc>,
    fds: Vec<RawFd>,
    groups: Vec<libc::gid_t>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    cwd: CString,
    ctty: bool,
}

/// Spawns `argv` in the namespace `netns` as `peer`; with `ctty`, the
/// program's descriptor 0 becomes its controlling terminal if it can. With
/// `private_etc` (the instance's directory holding its `resolv.conf` and
/// `nsswitch.conf`), in a private mount namespace that uses them and hides
/// the host's name-service sockets.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    cgroup: Option<&OwnedFd>,
    netns: &File,
    private_etc: Option<&std::path::Path>,
    peer: &PeerCred,
    argv: &[String],
    env: &[String],
    cwd: &str,
    fds: Vec<OwnedFd>,
    ctty: bool,
) -> io::Result<Spawned> {
    let cs = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let prep = Prepared {
        cgroup: cgroup.map(AsRawFd::as_raw_fd),
        host_mnt: crate::netns::host_mount_ns().map(AsRawFd::as_raw_fd),
        netns: netns.as_raw_fd(),
        etc: match private_etc {
            Some(d) => {
                let file = |f: &str| cs(d.join(f).to_str().ok_or(io::ErrorKind::InvalidInput)?);
                Some(PrivateEtc {
                    resolv: file("resolv.conf")?,
                    nsswitch: file("nsswitch.conf")?,
                })
            }
            None => None,
        },
        fds: fds.iter().map(|f| f.as_raw_fd()).collect(),
        groups: peer.groups.clone(),
        uid: peer.uid,
        gid: peer.gid,
        cwd: cs(cwd)?,
        ctty,
    };
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear();
    for e in env {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    // Standard streams are set up in pre_exec from the passed descriptors;
    // whatever the helper has on 0-2 must not leak in.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure only makes async-signal-safe system calls on
    // memory prepared before the fork (see `child_setup`).
    unsafe {
        cmd.pre_exec(move || child_setup(&prep));
    }
    let child = cmd.spawn()?;
    let pid = child.id() as i32;
    // The child is ours and not yet reaped, so `pid` still names it.
    // SAFETY: plain system call with integer arguments.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    if raw < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: signalling and reaping our own unreaped child by pid is
        // race-free: the pid cannot be reused before we reap it.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(e);
    }
    drop(fds);
    // `child` is dropped without waiting: the pidfd is used to reap it.
    drop(child);
    // SAFETY: `raw` was just returned by pidfd_open.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok(Spawned { pid, pidfd })
}

/// Runs in the child between fork and exec: raw system calls only.
fn child_setup(p: &Prepared) -> io::Result<()> {
    fn check(rc: libc::c_int) -> io::Result<()> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
    // SAFETY: each call is an async-signal-safe system call
    // whose pointer arguments point into `p`, which lives until exec.
    unsafe {
        // First of all into the user's own task-limited cgroup, so nothing
        // it ever forks counts against the helper's.
        if let Some(c) = p.cgroup {
            let n = libc::write(c, c"0".as_ptr().cast(), 1);
            if n != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        // The user's programs see the host's file system, not the helper's
        // sandbox (ProtectHome, PrivateTmp... of its systemd unit).
        if let Some(m) = p.host_mnt {
            check(libc::setns(m, libc::CLONE_NEWNS))?;
        }
        check(libc::setns(p.netns, libc::CLONE_NEWNET))?;
        if let Some(etc) = &p.etc {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            hide_name_services(&etc.resolv)?;
            bind(&etc.resolv, c"/etc/resolv.conf")?;
            // A host without /etc/nsswitch.conf uses glibc's defaults,
            // which name no daemon's module.
            if let Err(e) = bind(&etc.nsswitch, c"/etc/nsswitch.conf")
                && libc::access(c"/etc/nsswitch.conf".as_ptr(), libc::F_OK) == 0
            {
                return Err(e);
            }
        }
        // Move the passed descriptors out of the way of 0..n first, then
        // into place (dup2 clears close-on-exec on the copies).
        let base = 100;
        for (i, fd) in p.fds.iter().enumerate() {
            check(libc::dup2(*fd, base + i as libc::c_int))?;
        }
        for i in 0..p.fds.len() {
            check(libc::dup2(base + i as libc::c_int, i as libc::c_int))?;
            libc::close(base + i as libc::c_int);
        }
        check(libc::setgroups(p.groups.len(), p.groups.as_ptr()))?;
        check(libc::setresgid(p.gid, p.gid, p.gid))?;
        check(libc::setresuid(p.uid, p.uid, p.uid))?;
        if p.uid != 0 && (libc::setuid(0) == 0 || libc::setgid(0) == 0 && p.gid != 0) {
            // An errno, not a message: allocating between fork and exec
            // can deadlock on a lock another thread held at the fork.
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        // A session of its own: never the helper's controlling terminal or
        // process group (signals come from its client, by pid).
        libc::setsid();
        if p.ctty {
            // As the caller, so without the privilege to steal a terminal
            // from another session: only a terminal nobody controls (the
            // client's fresh pseudo-terminal) is taken. Failing leaves the
            // program without one, as before.
            libc::ioctl(0, libc::TIOCSCTTY, 0);
        }
        check(libc::chdir(p.cwd.as_ptr()))?;
    }
    Ok(())
}

/// Bind-mounts `src` over `dst` (between fork and exec: a raw system call).
fn bind(src: &CStr, dst: &CStr) -> io::Result<()> {
    // SAFETY: two NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// In the child's private mount namespace (between fork and exec: raw
/// system calls only, no allocation): an empty tmpfs over each of
/// [`HIDDEN_DIRS`] that exists, systemd-resolved's resolv.conf files
/// recreated in it as `resolv` (the instance's), then each made read-only.
/// Any failure but a missing directory stops the spawn: the program must
/// not run with the host's resolvers in reach.
fn hide_name_services(resolv: &CStr) -> io::Result<()> {
    let gone = |e: &io::Error| matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR));
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mut mounted = [false; HIDDEN_DIRS.len()];
    for (i, dir) in HIDDEN_DIRS.iter().enumerate() {
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"warren-hidden".as_ptr(),
                dir.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                c"mode=0755,size=16k,nr_inodes=16".as_ptr().cast(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if gone(&e) {
                continue;
            }
            return Err(e);
        }
        mounted[i] = true;
    }
    for file in RESOLV_LINK_TARGETS {
        // SAFETY: a NUL-terminated path; the descriptor is closed at once.
        let fd = unsafe {
            libc::open(
                file.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o644,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if gone(&e) {
                // Its directory does not exist: nothing hidden there.
                continue;
            }
            return Err(e);
        }
        // SAFETY: our own descriptor, just opened.
        unsafe { libc::close(fd) };
        bind(resolv, file)?;
    }
    for (dir, _) in HIDDEN_DIRS.iter().zip(mounted).filter(|(_, m)| *m) {
        // SAFETY: a NUL-terminated path; remounting our own tmpfs.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                dir.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY | flags,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reaps the process behind `pidfd` (it must have exited: the pidfd is
/// readable) and says how it ended.
pub fn reap(pidfd: &OwnedFd) -> io::Result<ExitStatus> {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: P_PIDFD (3) with our pidfd; `info` is writable.
    let rc = unsafe {
        libc::waitid(
            3, // P_PIDFD
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after a successful waitid with WEXITED these fields are set.
    let (code, status) = unsafe { (info.si_code, info.si_status()) };
    Ok(if code == libc::CLD_EXITED {
        ExitStatus::Code(status)
    } else {
        ExitStatus::Signal(status)
    })
}

/// Sends `sig` through the pidfd (never to a recycled pid).
pub fn signal(pidfd: &OwnedFd, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: plain system call; a null siginfo means "as kill()".
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
