//! Who is calling, and may they: `SO_PEERCRED` and `SO_PEERGROUPS`.
//!
//! The kernel records a Unix socket peer's credentials when it connects, so
//! they cannot be changed afterwards by the peer. The helper authorizes root
//! and members of one group, primary or supplementary. The group comes from
//! the helper's own command line or root-owned config, never from anything
//! the client controls.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::unistd::{Gid, Group};
use thiserror::Error;

/// `SO_PEERGROUPS` (Linux 4.13+): the peer's supplementary groups as they
/// were when it connected. Not exported by the libc crate for every arch;
/// the value is the same on all Linux architectures warren supports.
const SO_PEERGROUPS: libc::c_int = 59;
/// Most supplementary groups a Linux process can have (`NGROUPS_MAX`).
const NGROUPS_MAX: usize = 65_536;

/// A connected peer's credentials as the kernel reported them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCred {
    /// Effective uid at connect time.
    pub uid: u32,
    /// Effective gid at connect time.
    pub gid: u32,
    /// Process id at connect time (informational: pids are reused).
    pub pid: i32,
    /// Supplementary groups at connect time.
    pub groups: Vec<u32>,
}

impl PeerCred {
    /// Reads the credentials of the peer of a connected Unix socket.
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` is a properly sized, writable ucred and `len` holds
        // its size; the kernel writes at most `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&raw mut cred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PeerCred {
            uid: cred.uid,
            gid: cred.gid,
            pid: cred.pid,
            groups: peer_groups(fd)?,
        })
    }
}

fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is writable for `len` bytes; on ERANGE the
        // kernel writes nothing but the needed length into `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && n > groups.len() && n <= NGROUPS_MAX {
            groups.resize(n, 0);
            continue;
        }
        return Err(err);
    }
}

/// Why the authorized group could not be set up.
#[derive(Debug, Error)]
pub enum AuthError {
    /// No group of that name exists.
    #[error(
        "group '{0}' does not exist: create it (`groupadd --system {0}`) or choose another with --group"
    )]
    NoSuchGroup(String),
    /// The group database could not be read.
    #[error("cannot look up group '{name}'")]
    Lookup {
        /// Group asked for.
        name: String,
        /// Cause.
        #[source]
        source: nix::Error,
    },
}

/// The authorization policy: root, or members of one group.
#[derive(Debug, Clone)]
pub struct Authorizer {
    group_name: String,
    gid: u32,
}

impl Authorizer {
    /// Resolves the authorized group from a name, or a numeric gid.
    pub fn new(group: &str) -> Result<Self, AuthError> {
        if group.bytes().all(|b| b.is_ascii_digit())
            && let Ok(gid) = group.parse::<u32>()
        {
            let name = Group::from_gid(Gid::from_raw(gid))
                .ok()
                .flatten()
                .map(|g| g.name)
                .unwrap_or_else(|| group.to_string());
            return Ok(Authorizer {
                group_name: name,
                gid,
            });
        }
        match Group::from_name(group) {
            Ok(Some(g)) => Ok(Authorizer {
                group_name: g.name,
                gid: g.gid.as_raw(),
            }),
            Ok(None) => Err(AuthError::NoSuchGroup(group.to_string())),
            Err(source) => Err(AuthError::Lookup {
                name: group.to_string(),
                source,
            }),
        }
    }

    /// The authorized group's name (as shown to refused clients).
    pub fn group_name(&self) -> &str {
        &self.group_name
    }

    /// The authorized group's id.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// Root, or a member of the group (primary or supplementary).
    pub fn allows(&self, peer: &PeerCred) -> bool {
        peer.uid == 0 || peer.gid == self.gid || peer.groups.contains(&self.gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn cred(uid: u32, gid: u32, groups: &[u32]) -> PeerCred {
        PeerCred {
            uid,
            gid,
            pid: 1,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn policy() {
        let a = Authorizer {
            group_name: "warren".into(),
            gid: 900,
        };
        assert!(a.allows(&cred(0, 0, &[])), "root");
        assert!(a.allows(&cred(1000, 900, &[])), "primary group");
        assert!(
            a.allows(&cred(1000, 1000, &[5, 900])),
            "supplementary group"
        );
        assert!(!a.allows(&cred(1000, 1000, &[5, 901])), "outsider");
    }

    #[test]
    fn numeric_group_without_name() {
        let a = Authorizer::new("60999").expect("numeric gid");
        assert_eq!(a.gid(), 60999);
    }

    #[test]
    fn unknown_group_is_an_error() {
        assert!(matches!(
            Authorizer::new("no-such-group-warren-test"),
            Err(AuthError::NoSuchGroup(_))
        ));
    }

    #[test]
    fn reads_own_credentials() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let c = PeerCred::of(a.as_fd()).expect("peercred");
        assert_eq!(c.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(c.pid as u32, std::process::id());
        let mut mine: Vec<u32> = nix::unistd::getgroups()
            .expect("getgroups")
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = c.groups.clone();
        mine.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, mine);
    }
}
