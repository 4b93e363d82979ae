//! Dropping privileges at start: keep only the capabilities the helper's
//! operations need, remove every other one from the bounding set too, and
//! set `PR_SET_NO_NEW_PRIVS`.
//!
//! Kept capabilities, and why (see also docs/security.md):
//!
//! | capability | needed for |
//! | --- | --- |
//! | `CAP_NET_ADMIN` | TUN devices, links, addresses, routes, rules, nftables, forwarding sysctls |
//! | `CAP_SYS_ADMIN` | `setns`/`unshare` into network namespaces, bind-mounting them under /run/netns, the mount namespace of a spawned program |
//! | `CAP_SETUID`, `CAP_SETGID` | spawning an instance worker as the requesting user (never anyone else) |
//! | `CAP_KILL` | signalling the workers it spawned, which run as other uids |
//! | `CAP_CHOWN` | giving its own socket to the authorized group |
//! | `CAP_SYS_CHROOT` | entering the host's mount namespace (with `CAP_SYS_ADMIN`) to publish named namespaces when the unit gives the helper a private one |
//!
//! Everything else (`CAP_SYS_MODULE`, `CAP_SYS_PTRACE`, `CAP_SYS_RAWIO`,
//! `CAP_SETPCAP` after use, `CAP_NET_RAW`, `CAP_FOWNER`, `CAP_DAC_OVERRIDE`...) is dropped from
//! the effective, permitted, inheritable, ambient and bounding sets.

use caps::{CapSet, Capability, CapsHashSet};
use thiserror::Error;

/// The capabilities the helper keeps.
pub const KEPT: &[Capability] = &[
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
    Capability::CAP_KILL,
    Capability::CAP_CHOWN,
    Capability::CAP_SYS_CHROOT,
];

/// Why privileges could not be dropped.
#[derive(Debug, Error)]
#[error("cannot drop privileges ({step})")]
pub struct PrivError {
    step: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

fn step<E: std::error::Error + Send + Sync + 'static>(
    step: &'static str,
) -> impl Fn(E) -> PrivError {
    move |e| PrivError {
        step,
        source: Box::new(e),
    }
}

/// What was dropped, for the start-up log line.
#[derive(Debug, Clone)]
pub struct Dropped {
    /// Capabilities kept in the effective set.
    pub kept: Vec<Capability>,
    /// Whether the process holds any capability at all (false when the
    /// helper runs without privileges, e.g. in an unprivileged test).
    pub privileged: bool,
}

/// Drops every capability not in [`KEPT`], from every set including the
/// bounding set, and sets no_new_privs. Idempotent.
pub fn drop_privileges() -> Result<Dropped, PrivError> {
    let keep: CapsHashSet = KEPT.iter().copied().collect();
    let permitted = caps::read(None, CapSet::Permitted).map_err(step("read permitted"))?;
    // The bounding set can only be reduced while CAP_SETPCAP is effective.
    if permitted.contains(&Capability::CAP_SETPCAP) {
        caps::raise(None, CapSet::Effective, Capability::CAP_SETPCAP)
            .map_err(step("raise setpcap"))?;
        for cap in caps::all() {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(step("bounding set"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(step("ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(step("inheritable set"))?;
    let new: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &new).map_err(step("effective set"))?;
    caps::set(None, CapSet::Permitted, &new).map_err(step("permitted set"))?;
    nix::sys::prctl::set_no_new_privs().map_err(step("no_new_privs"))?;
    let mut kept: Vec<Capability> = new.into_iter().collect();
    kept.sort_by_key(|c| c.index());
    Ok(Dropped {
        privileged: !kept.is_empty(),
        kept,
    })
}
