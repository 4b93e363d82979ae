//! Per-user task limits for the programs the helper starts (issue 14,
//! finding 8).
//!
//! Everything the helper starts (instance workers, `warren exec` programs)
//! and all they fork would otherwise share the helper unit's task limit, so
//! one member could use it up, and then neither other members' programs nor
//! the helper's own threads could start. With `serve --user-cgroups` (the
//! shipped unit passes it, with `Delegate=pids`), each uid's programs are
//! moved, before they exec, into `user-UID` under the helper's own
//! (delegated) cgroup, whose `pids.max` is `user_tasks_max` (helper config,
//! default [`DEFAULT_USER_TASKS_MAX`]). On the unified hierarchy the helper
//! itself moves into a `helper` leaf first (a cgroup with controllers
//! enabled for its children holds no processes); on a hybrid host the pids
//! controller's v1 hierarchy is used the same way.
//!
//! cgroupfs is read-only in the unit's mount namespace
//! (`ProtectControlGroups=`): directories are made, and each user's
//! `cgroup.procs` opened, from the host's mount namespace; the child writes
//! to that descriptor.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tracing::{info, warn};

/// Tasks one user's programs may have together unless the config says.
pub const DEFAULT_USER_TASKS_MAX: u64 = 256;

/// Where the per-user cgroups live.
#[derive(Debug)]
struct UserCgroups {
    /// The helper's own cgroup directory (in the host's mount namespace).
    base: PathBuf,
    /// `pids.max` of each user's cgroup.
    limit: u64,
}

static USER_CGROUPS: OnceLock<UserCgroups> = OnceLock::new();

/// The helper's cgroup that holds the pids controller, from
/// `/proc/self/cgroup`'s text: the v1 `pids` hierarchy's line if there is
/// one (a hybrid host), else the unified (`0::`) one. Returns the directory
/// under `root` and whether it is the unified hierarchy.
fn own_cgroup(proc_cgroup: &str, root: &Path) -> Option<(PathBuf, bool)> {
    let mut unified = None;
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if ctrls.split(',').any(|c| c == "pids") {
            return Some((root.join("pids").join(rel), false));
        }
        if ctrls.is_empty() {
            unified = Some(root.join(rel));
        }
    }
    unified.map(|p| (p, true))
}

fn write(path: &Path, text: &str) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Sets per-user cgroups up under the helper's own cgroup, each limited to
/// `limit` tasks. Call once, before the first program is started.
pub fn setup(limit: u64) -> io::Result<()> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let (base, unified) = own_cgroup(&text, Path::new("/sys/fs/cgroup"))
        .ok_or_else(|| io::Error::other("no cgroup holds the pids controller"))?;
    crate::netns::in_host_mount_ns(|| {
        if unified {
            let controllers = std::fs::read_to_string(base.join("cgroup.controllers"))?;
            if !controllers.split_whitespace().any(|c| c == "pids") {
                return Err(io::Error::other(format!(
                    "{}: the pids controller is not delegated to the helper (Delegate=pids)",
                    base.display()
                )));
            }
            // No processes in a cgroup whose children get controllers.
            let leaf = base.join("helper");
            ensure_dir(&leaf)?;
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
            write(&base.join("cgroup.subtree_control"), "+pids")?;
        }
        // Can users' cgroups be made here? (A container's v1 controller
        // hierarchies are read-only, for one.)
        let probe = base.join("user-probe");
        ensure_dir(&probe)?;
        std::fs::remove_dir(&probe)
    })?;
    info!(cgroup = %base.display(), limit, "programs run in per-user cgroups");
    let _ = USER_CGROUPS.set(UserCgroups { base, limit });
    Ok(())
}

fn ensure_dir(d: &Path) -> io::Result<()> {
    match std::fs::create_dir(d) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(io::Error::new(e.kind(), format!("{}: {e}", d.display())))
        }
        _ => Ok(()),
    }
}

/// For a program of `uid`: a descriptor of its user's `cgroup.procs`
/// (made, with its `pids.max`, on first use) to write "0" to from the child
/// before exec. None when per-user cgroups are off.
pub fn procs_for(uid: u32) -> Option<io::Result<OwnedFd>> {
    let cg = USER_CGROUPS.get()?;
    let dir = cg.base.join(format!("user-{uid}"));
    let limit = cg.limit;
    Some(crate::netns::in_host_mount_ns(move || {
        ensure_dir(&dir)?;
        write(&dir.join("pids.max"), &limit.to_string())?;
        let f: File = OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        Ok(OwnedFd::from(f))
    }))
}

/// Removes the per-user cgroups that are empty (at shutdown); one whose
/// programs' children still live stays (systemd removes the unit's tree
/// when it stops).
pub fn remove_empty() {
    let Some(cg) = USER_CGROUPS.get() else { return };
    let base = cg.base.clone();
    let _ = crate::netns::in_host_mount_ns(move || {
        for e in std::fs::read_dir(&base)?.flatten() {
            if e.file_name().to_string_lossy().starts_with("user-")
                && let Err(err) = std::fs::remove_dir(e.path())
            {
                warn!(cgroup = %e.path().display(), error = %err, "per-user cgroup not empty; left for systemd");
            }
        }
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::own_cgroup;
    use std::path::{Path, PathBuf};

    #[test]
    fn the_pids_hierarchy_is_found_on_hybrid_and_unified_hosts() {
        let root = Path::new("/sys/fs/cgroup");
        let hybrid = "9:name=systemd:/system.slice/warren-helper.service\n8:pids:/system.slice/warren-helper.service\n0::/system.slice/warren-helper.service\n";
        assert_eq!(
            own_cgroup(hybrid, root),
            Some((
                PathBuf::from("/sys/fs/cgroup/pids/system.slice/warren-helper.service"),
                false
            ))
        );
        let unified = "0::/system.slice/warren-helper.service\n";
        assert_eq!(
            own_cgroup(unified, root),
            Some((
                PathBuf::from("/sys/fs/cgroup/system.slice/warren-helper.service"),
                true
            ))
        );
        assert_eq!(own_cgroup("", root), None);
    }
}
