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

/// Enters new user, network and mount namespaces (the calling process must
/// be single-threaded), maps the user to itself, and binds a resolv.conf
/// listing the tunnel's DNS servers over /etc/resolv.conf.
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
    mount(
        Some(&resolv),
        "/etc/resolv.conf",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("binding {} over /etc/resolv.conf: {e}", resolv.display()))?;
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
