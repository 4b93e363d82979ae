//! Kernel objects of a namespace instance: the named network namespace,
//! the TUN device in it, its addresses and routes (rtnetlink), its IPv6
//! switch, and its resolv.conf.
//!
//! A namespace and everything made inside it belong to the thread that
//! created or entered it, so each step that must happen "inside" runs on a
//! short-lived std thread that calls `unshare`/`setns` and then exits; no
//! tokio worker ever changes namespace (CRATES.md).

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use thiserror::Error;
use warren_ipc::instance::{InstanceName, InstanceSpec};

/// Where named namespaces are bind-mounted (what `ip netns` reads).
pub const NETNS_DIR: &str = "/run/netns";
/// Where per-namespace configuration lives (what `ip netns exec` binds).
pub const ETC_NETNS_DIR: &str = "/etc/netns";
pub use warren_netconf::{TUN_NAME, link_up_with_addresses, open_tun_named};

/// A failed step, with what it was doing.
#[derive(Debug, Error)]
#[error("{step}")]
pub struct NetError {
    /// What failed.
    pub step: String,
    /// Cause.
    #[source]
    pub source: io::Error,
}

fn step(step: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let step = step.into();
    move |source| NetError { step, source }
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

/// Paths of an instance's namespace file and config directory.
pub fn paths(name: &InstanceName) -> (PathBuf, PathBuf) {
    (
        Path::new(NETNS_DIR).join(name.netns()),
        Path::new(ETC_NETNS_DIR).join(name.netns()),
    )
}

/// Runs `f` on a fresh thread that has entered the namespace `ns`.
pub fn in_netns<T: Send>(ns: &File, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(nix_io)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

/// Makes /run/netns a shared mount point, as `ip netns add` does, so the
/// namespaces bound under it are visible in every mount namespace that
/// shares it.
fn prepare_netns_dir() -> io::Result<()> {
    let dir = Path::new(NETNS_DIR);
    create_public_dir(dir)?;
    // Try to make it shared; if it is not a mount point yet, bind it onto
    // itself first (exactly `ip netns`'s recipe).
    let shared = |d: &Path| {
        mount(
            None::<&str>,
            d,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if shared(dir).is_err() {
        mount(
            Some(dir),
            dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(nix_io)?;
        shared(dir).map_err(nix_io)?;
    }
    Ok(())
}

/// Creates `d` (if missing) readable by everyone: mode 0755 whatever the
/// umask (the unit's `UMask=0077` would make it root's alone, and then no
/// program in an instance could read its resolv.conf).
fn create_public_dir(d: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::DirBuilder::new().mode(0o755).create(d) {
        Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `text` to `path` through a temporary file beside it and a rename,
/// readable by everyone (mode 0644 whatever the umask), never following a
/// symlink at the temporary path.
pub fn write_public_file(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".warren-tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let done = f
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .and_then(|()| f.write_all(text.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// The host's mount namespace, when the helper runs in a private one (the
/// hardened systemd unit: `ProtectSystem=`, `PrivateMounts=`...). Bind mounts
/// the helper makes in its own mount namespace never reach the host, so
/// named namespaces are published, and files under `/etc` written, from a
/// thread that entered the host's (docs/adr/0002-netns-visibility.md,
/// docs/adr/0006-host-mount-namespace.md).
static HOST_MNT: OnceLock<Option<File>> = OnceLock::new();

/// Why the host's mount namespace could not be found.
#[derive(Debug, Error)]
#[error(
    "cannot find the host's mount namespace ({what}): {source}; under the systemd unit \
     it comes from `ExecStartPre=+warren-helper pass-host-namespace` (is the unit \
     file current?); refusing to start, since named namespaces and DNS changes \
     would otherwise land in a private file system view"
)]
pub struct HostNsError {
    what: String,
    #[source]
    source: io::Error,
}

/// Whether `f` is a mount namespace (`NS_GET_NSTYPE`).
fn is_mount_ns(f: &File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without arguments on a descriptor we own.
    let t = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE as _) };
    if t < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t == libc::CLONE_NEWNS)
}

/// Records the host's mount namespace if it differs from ours. Call once at
/// start, before dropping privileges. `passed` is the descriptor systemd
/// handed over (the unit's `ExecStartPre=+` put it in the file descriptor
/// store); without it, the mount namespace of the process that started the
/// helper (sudo, a shell) is the host's. Finding none is an error, never a
/// silent "we are the host". Returns whether the helper's differs.
pub fn detect_host_mount_ns(passed: Option<File>) -> Result<bool, HostNsError> {
    use std::os::unix::fs::MetadataExt;
    let fail = |what: String| move |source| HostNsError { what, source };
    let ours = std::fs::metadata("/proc/self/ns/mnt").map_err(fail("/proc/self/ns/mnt".into()))?;
    let host = match passed {
        Some(f) => {
            let what = "the descriptor systemd passed";
            if !is_mount_ns(&f).map_err(fail(what.into()))? {
                return Err(fail(what.into())(io::Error::other("not a mount namespace")));
            }
            f
        }
        None => {
            let path = format!("/proc/{}/ns/mnt", nix::unistd::getppid().as_raw());
            File::open(&path).map_err(fail(path))?
        }
    };
    let hm = host
        .metadata()
        .map_err(fail("the host's namespace".into()))?;
    let differs = (hm.dev(), hm.ino()) != (ours.dev(), ours.ino());
    let _ = HOST_MNT.set(differs.then_some(host));
    Ok(differs)
}

/// The host mount namespace's descriptor, if the helper is not in it.
pub fn host_mount_ns() -> Option<&'static File> {
    HOST_MNT.get().and_then(Option::as_ref)
}

/// On the calling (short-lived) thread: leave the shared file-system
/// context and enter the host's mount namespace, if we are not in it.
fn enter_host_mount_ns() -> io::Result<()> {
    if let Some(host) = host_mount_ns() {
        unshare(CloneFlags::CLONE_FS).map_err(nix_io)?;
        setns(host.as_fd(), CloneFlags::CLONE_NEWNS).map_err(nix_io)?;
    }
    Ok(())
}

/// Runs `f` on a fresh thread in the host's mount namespace.
pub fn in_host_mount_ns<T: Send>(f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_host_mount_ns()?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("mount namespace thread panicked")))
    })
}

/// Creates the named namespace `warren-NAME` without forking: a thread
/// unshares its network namespace, enters the host's mount namespace if
/// the helper is not in it, and bind-mounts its network namespace onto
/// `/run/netns/warren-NAME` there. Returns a descriptor of the namespace.
pub fn create_netns(name: &InstanceName) -> Result<File, NetError> {
    let (path, _) = paths(name);
    std::thread::scope(|s| {
        s.spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET)
                .map_err(nix_io)
                .map_err(step("create a network namespace"))?;
            let ns = File::open("/proc/thread-self/ns/net")
                .map_err(step("open the new network namespace"))?;
            enter_host_mount_ns().map_err(step("enter the host's mount namespace"))?;
            prepare_netns_dir().map_err(step("prepare /run/netns"))?;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .open(&path)
                .map_err(step(format!("create {}", path.display())))?;
            if let Err(e) = mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ) {
                let _ = std::fs::remove_file(&path);
                return Err(step(format!("bind namespace to {}", path.display()))(
                    nix_io(e),
                ));
            }
            Ok(ns)
        })
        .join()
        .unwrap_or_else(|_| Err(step("namespace thread")(io::Error::other("panicked"))))
    })
}

/// Whether the instance's namespace exists (as the host sees it).
pub fn exists(name: &InstanceName) -> bool {
    let path = paths(name).0;
    in_host_mount_ns(|| Ok(path.exists())).unwrap_or(true)
}

/// Creates the TUN device in the instance's namespace and configures
/// everything inside it. Returns the TUN descriptor.
pub fn create_tun_and_configure(ns: &File, spec: &InstanceSpec) -> Result<OwnedFd, NetError> {
    in_netns(ns, || warren_netconf::create_tun_here(spec))
        .map_err(step("configure the instance's TUN device"))
}

/// Writes `/etc/netns/warren-NAME/resolv.conf` with only the tunnel's DNS
/// servers (so names never resolve outside the tunnel), readable by all, in
/// the host's mount namespace (where `ip netns exec` and users look).
pub fn write_resolv_conf(
    name: &InstanceName,
    dns: &[IpAddr],
    search: &[String],
) -> Result<(), NetError> {
    let text = warren_netconf::resolv_conf(
        "# written by warren-helper for this instance only",
        dns,
        search,
    );
    let name = name.clone();
    in_host_mount_ns(move || Ok(write_resolv_conf_here(&name, &text)))
        .map_err(step("enter the host's mount namespace"))?
}

fn write_resolv_conf_here(name: &InstanceName, text: &str) -> Result<(), NetError> {
    let (_, dir) = paths(name);
    for d in [Path::new(ETC_NETNS_DIR), dir.as_path()] {
        create_public_dir(d).map_err(step(format!("create {}", d.display())))?;
    }
    write_public_file(&dir.join("resolv.conf"), text)
        .map_err(step(format!("write {}/resolv.conf", dir.display())))
}

/// The host's nsswitch.conf, read from at most this many bytes.
const MAX_NSSWITCH: u64 = 64 * 1024;

/// Writes `/etc/netns/warren-NAME/nsswitch.conf` (after its resolv.conf,
/// which makes the directory): the host's, with `hosts: files dns`
/// ([`warren_netconf::nsswitch_conf`]), readable by all. Programs run with
/// a private resolv.conf get it as /etc/nsswitch.conf (as `ip netns exec`
/// does), so libc never asks a host daemon for a name.
pub fn write_nsswitch_conf(name: &InstanceName) -> Result<(), NetError> {
    let name = name.clone();
    in_host_mount_ns(move || Ok(write_nsswitch_conf_here(&name)))
        .map_err(step("enter the host's mount namespace"))?
}

fn write_nsswitch_conf_here(name: &InstanceName) -> Result<(), NetError> {
    use std::io::Read;
    let mut host = Vec::new();
    match File::open("/etc/nsswitch.conf") {
        Ok(f) => {
            f.take(MAX_NSSWITCH)
                .read_to_end(&mut host)
                .map_err(step("read /etc/nsswitch.conf"))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(step("read /etc/nsswitch.conf")(e)),
    }
    let text = warren_netconf::nsswitch_conf(
        "# written by warren-helper for this instance: names resolve by files and the instance's DNS only",
        &String::from_utf8_lossy(&host),
    );
    let dir = paths(name).1;
    write_public_file(&dir.join("nsswitch.conf"), &text)
        .map_err(step(format!("write {}/nsswitch.conf", dir.display())))
}

/// Removes an instance's namespace and configuration. Keeps going after an
/// error and returns every error. Removing what is already gone is fine.
pub fn destroy(name: &InstanceName) -> Vec<NetError> {
    let n = name.clone();
    in_host_mount_ns(move || Ok(destroy_here(&n)))
        .unwrap_or_else(|e| vec![step("enter the host's mount namespace")(e)])
}

fn destroy_here(name: &InstanceName) -> Vec<NetError> {
    let mut errs = Vec::new();
    let (ns, dir) = paths(name);
    if ns.exists() {
        if let Err(e) = umount2(&ns, MntFlags::MNT_DETACH) {
            // EINVAL: not a mount point any more (half-created).
            if e != nix::errno::Errno::EINVAL {
                errs.push(step(format!("unmount {}", ns.display()))(nix_io(e)));
            }
        }
        if let Err(e) = std::fs::remove_file(&ns)
            && e.kind() != io::ErrorKind::NotFound
        {
            errs.push(step(format!("remove {}", ns.display()))(e));
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        errs.push(step(format!("remove {}", dir.display()))(e));
    }
    errs
}
