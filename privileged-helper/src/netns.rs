//! Kernel objects of a namespace instance: the named network namespace,
//! the TUN device in it, its addresses and routes (rtnetlink), its IPv6
//! switch, and its resolv.conf.
//!
//! A namespace and everything made inside it belong to the thread that
//! created or entered it, so each step that must happen "inside" runs on a
//! short-lived std thread that calls `unshare`/`setns` and then exits; no
//! tokio worker ever changes namespace (CRATES.md).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use futures::TryStreamExt;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use thiserror::Error;
use warren_ipc::instance::{InstanceName, InstanceSpec};

/// Where named namespaces are bind-mounted (what `ip netns` reads).
pub const NETNS_DIR: &str = "/run/netns";
/// Where per-namespace configuration lives (what `ip netns exec` binds).
pub const ETC_NETNS_DIR: &str = "/etc/netns";
/// The TUN device's name inside every instance (each namespace has its own).
pub const TUN_NAME: &str = "wr0";

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
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
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

/// The host's mount namespace, when the helper runs in a private one (the
/// hardened systemd unit: `ProtectSystem=`, `PrivateMounts=`...). Bind mounts
/// the helper makes in its own mount namespace never reach the host, so
/// named namespaces are published from a thread that entered the host's
/// (docs/adr/0002-netns-visibility.md). "The host's" is the mount namespace
/// of the process that started the helper — systemd (PID 1) under the unit,
/// sudo or a shell otherwise. Opened once at start, before capabilities are
/// dropped (reading another process's /proc/PID/ns needs them).
static HOST_MNT: OnceLock<Option<File>> = OnceLock::new();

/// Records the host's mount namespace if it differs from ours. Call once at
/// start, before dropping privileges. Returns whether it differs.
pub fn detect_host_mount_ns() -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::metadata("/proc/self/ns/mnt")?;
    let parent = nix::unistd::getppid().as_raw();
    let host = match File::open(format!("/proc/{parent}/ns/mnt")) {
        Ok(f) => f,
        // No access to the parent's (e.g. a restricted container): use ours.
        Err(_) => {
            let _ = HOST_MNT.set(None);
            return Ok(false);
        }
    };
    let hm = host.metadata()?;
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
fn in_host_mount_ns<T: Send>(f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
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

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

nix::ioctl_write_int!(tunsetiff, b'T', 202);

/// Opens a TUN device named `name` (no packet information header,
/// non-blocking, close-on-exec) in the calling thread's namespace. The
/// device lives as long as a descriptor to it is open.
pub fn open_tun_named(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated path and plain flags.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads an ifreq; `req` is a properly laid out,
    // initialized ifreq that outlives the call.
    unsafe { tunsetiff(fd.as_raw_fd(), (&raw const req) as u64) }.map_err(nix_io)?;
    Ok(fd)
}

/// The index of link `name`.
async fn link_index(handle: &rtnetlink::Handle, name: &str) -> io::Result<u32> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(l.header.index),
        Ok(None) => Err(io::Error::other(format!("no link {name}"))),
        Err(e) => Err(io::Error::other(e)),
    }
}

/// Sets link `name`'s MTU, brings it up and adds `addrs` (IPv6 without
/// duplicate address detection, so they are usable at once). Returns its
/// index.
pub async fn link_up_with_addresses(
    handle: &rtnetlink::Handle,
    name: &str,
    mtu: u16,
    addrs: &[warren_ipc::instance::IpPrefix],
) -> io::Result<u32> {
    use rtnetlink::LinkUnspec;
    let index = link_index(handle, name).await?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .mtu(u32::from(mtu))
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(io::Error::other)?;
    for a in addrs {
        let mut req = handle.address().add(index, a.addr(), a.len());
        if a.addr().is_ipv6() {
            use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .map_err(|e| io::Error::other(format!("address {a}: {e}")))?;
    }
    Ok(index)
}

/// Inside the namespace: loopback up; TUN with MTU, addresses (IPv6
/// without duplicate address detection, usable at once) and routes, up.
async fn configure(spec: &InstanceSpec) -> io::Result<()> {
    use rtnetlink::{LinkUnspec, RouteMessageBuilder};
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    let res = async {
        let lo = link_index(&handle, "lo").await?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .map_err(io::Error::other)?;
        let tun = link_up_with_addresses(&handle, TUN_NAME, spec.mtu, &spec.addresses).await?;
        for r in &spec.routes {
            let msg = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(r.addr(), r.len())
                .map_err(|e| io::Error::other(format!("route {r}: {e}")))?
                .output_interface(tun)
                .build();
            handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|e| io::Error::other(format!("route {r}: {e}")))?;
        }
        Ok(())
    }
    .await;
    task.abort();
    res
}

fn set_ipv6_disabled() -> io::Result<()> {
    for knob in ["all", "default", "lo"] {
        let p = format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6");
        match std::fs::write(&p, b"1") {
            Ok(()) => {}
            // No IPv6 in this kernel at all: nothing can leak.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates the TUN device in the instance's namespace and configures
/// everything inside it. Returns the TUN descriptor.
pub fn create_tun_and_configure(ns: &File, spec: &InstanceSpec) -> Result<OwnedFd, NetError> {
    in_netns(ns, || {
        let tun = open_tun_named(TUN_NAME)?;
        if !spec.has_ipv6() {
            set_ipv6_disabled()?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(configure(spec))?;
        Ok(tun)
    })
    .map_err(step("configure the instance's TUN device"))
}

/// Writes `/etc/netns/warren-NAME/resolv.conf` with only the tunnel's DNS
/// servers (so names never resolve outside the tunnel), readable by all, in
/// the host's mount namespace (where `ip netns exec` and users look).
pub fn write_resolv_conf(name: &InstanceName, dns: &[IpAddr]) -> Result<(), NetError> {
    let (name, dns) = (name.clone(), dns.to_vec());
    in_host_mount_ns(move || Ok(write_resolv_conf_here(&name, &dns)))
        .map_err(step("enter the host's mount namespace"))?
}

fn write_resolv_conf_here(name: &InstanceName, dns: &[IpAddr]) -> Result<(), NetError> {
    let (_, dir) = paths(name);
    for d in [Path::new(ETC_NETNS_DIR), dir.as_path()] {
        match std::fs::DirBuilder::new().mode(0o755).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(step(format!("create {}", d.display()))(e)),
        }
    }
    let mut text = String::from("# written by warren-helper for this instance only\n");
    for s in dns {
        text.push_str(&format!("nameserver {s}\n"));
    }
    if dns.is_empty() {
        // No DNS through the tunnel: no resolver at all, rather than a leak.
        text.push_str("options attempts:1 timeout:1\n");
    }
    let tmp = dir.join("resolv.conf.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, dir.join("resolv.conf")))
        .map_err(step(format!("write {}/resolv.conf", dir.display())))
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
