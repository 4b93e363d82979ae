//! Rootless instances: the worker makes its own user, network and mount
//! namespaces (no helper, no root), creates and configures the TUN inside
//! them with the capabilities it holds only there, points
//! `/etc/resolv.conf` at the tunnel's DNS, and then gives those
//! capabilities up. Its listeners and the tunnel's UDP socket were bound
//! in the host namespace before, so they stay there. When the worker's last
//! process ends, the kernel removes the namespaces.
//!
//! Needs unprivileged user namespaces and a `/dev/net/tun` the user may
//! open (mode 0666 on most distributions).

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use warren_ipc::instance::InstanceSpec;

fn write(path: &str, text: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("{path}: {e}"))
}

/// Where the instance's resolv.conf is kept (the user's runtime directory).
fn resolv_path(name: &str) -> PathBuf {
    crate::proxy::status::runtime_dir(&crate::config::ProcessEnv)
        .join(format!("instance-{name}.resolv.conf"))
}

/// Where the instance's nsswitch.conf is kept (beside its resolv.conf).
fn nsswitch_path(name: &str) -> PathBuf {
    resolv_path(name).with_file_name(format!("instance-{name}.nsswitch.conf"))
}

/// Enters new user, network and mount namespaces (the calling process must
/// be single-threaded), maps the user to itself, and binds a resolv.conf
/// listing the tunnel's DNS servers over /etc/resolv.conf and an
/// nsswitch.conf with `hosts: files dns` over /etc/nsswitch.conf, with the
/// host's name-service sockets hidden ([`hide_name_services`]), so neither
/// the worker nor what `warren exec` runs in it resolves names outside the
/// tunnel.
pub fn enter(name: &str, spec: &InstanceSpec) -> Result<(), String> {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    // Written before unsharing, in the user's own directory.
    let resolv = resolv_path(name);
    if let Some(d) = resolv.parent() {
        crate::proxy::status::ensure_private_dir(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let text = warren_netconf::resolv_conf(
        "# warren rootless instance: the tunnel's DNS servers only",
        &spec.dns,
        &spec.search,
    );
    std::fs::write(&resolv, text).map_err(|e| format!("{}: {e}", resolv.display()))?;
    let nsswitch = nsswitch_path(name);
    let host_nss = std::fs::read("/etc/nsswitch.conf").unwrap_or_default();
    let text = warren_netconf::nsswitch_conf(
        "# warren rootless instance: names resolve by files and the tunnel's DNS only",
        &String::from_utf8_lossy(&host_nss),
    );
    std::fs::write(&nsswitch, text).map_err(|e| format!("{}: {e}", nsswitch.display()))?;
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).map_err(|e| {
        format!("unshare: {e} (are unprivileged user namespaces allowed? see /proc/sys/user/max_user_namespaces)")
    })?;
    write("/proc/self/setgroups", "deny")?;
    write("/proc/self/uid_map", &format!("{uid} {uid} 1\n"))?;
    write("/proc/self/gid_map", &format!("{gid} {gid} 1\n"))?;
    // Our mounts stay ours: nothing propagates back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making / private: {e}"))?;
    hide_name_services(&resolv)?;
    mount(
        Some(&resolv),
        "/etc/resolv.conf",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("binding {} over /etc/resolv.conf: {e}", resolv.display()))?;
    if std::path::Path::new("/etc/nsswitch.conf").exists() {
        mount(
            Some(&nsswitch),
            "/etc/nsswitch.conf",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            format!(
                "binding {} over /etc/nsswitch.conf: {e}",
                nsswitch.display()
            )
        })?;
    }
    Ok(())
}

/// In our own mount namespace: an empty read-only tmpfs over each of the
/// host's name-service directories that exists
/// ([`warren_netconf::NAME_SERVICE_DIRS`]: resolved, nscd, avahi), with
/// resolved's resolv.conf files recreated there as `resolv` (issue 14,
/// finding 7; the helper does the same for its instances' programs).
fn hide_name_services(resolv: &std::path::Path) -> Result<(), String> {
    use nix::errno::Errno;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut hidden = Vec::new();
    for dir in warren_netconf::NAME_SERVICE_DIRS {
        match mount(
            Some("warren-hidden"),
            dir,
            Some("tmpfs"),
            flags,
            Some("mode=0755,size=16k,nr_inodes=16"),
        ) {
            Ok(()) => hidden.push(dir),
            Err(Errno::ENOENT | Errno::ENOTDIR) => {}
            Err(e) => return Err(format!("hiding {dir:?}: {e}")),
        }
    }
    for file in warren_netconf::RESOLVED_RESOLV_FILES {
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(file.to_bytes()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
        mount(
            Some(resolv),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("binding {} over {}: {e}", resolv.display(), path.display()))?;
    }
    for dir in hidden {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags,
            None::<&str>,
        )
        .map_err(|e| format!("making {dir:?} read-only: {e}"))?;
    }
    Ok(())
}

/// Gives up every capability (they were only good inside our own user
/// namespace, for setting it up).
pub fn drop_capabilities() -> Result<(), String> {
    use caps::CapSet;
    for set in [CapSet::Effective, CapSet::Inheritable, CapSet::Permitted] {
        caps::clear(None, set).map_err(|e| format!("dropping capabilities: {e}"))?;
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    Ok(())
}
