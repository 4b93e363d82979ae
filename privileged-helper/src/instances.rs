//! Namespace instances the helper holds: who owns them, what keeps them
//! alive (a lease), the programs spawned in them, and the journal that lets
//! a restarted helper remove what a crashed one left.
//!
//! Leases: an instance is leased to the connection that created it and is
//! removed when that connection closes (a `kill -9`ed client included),
//! unless a program spawned in it with `bind_lease` took the lease over:
//! then it is removed when that program exits. Programs are tracked by
//! pidfd.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::{error, info, warn};
use warren_ipc::Event;
use warren_ipc::HelperError;
use warren_ipc::instance::{
    HostTunnelInfo, HostTunnelSpec, InstanceInfo, InstanceName, InstanceSpec, IpPrefix,
    KILL_SWITCH_LEASE, ORPHAN_LEASE, ServerTunnelInfo, ServerTunnelSpec, SpawnSpec,
};

use crate::auth::PeerCred;
use crate::journal::Journal;
use crate::{netns, runas};

/// Most instances one user may hold.
pub const MAX_INSTANCES_PER_UID: usize = 16;

/// Most programs (workers, `warren exec` programs) one user may run through
/// the helper at once; root: no limit. They share the helper's task limit
/// (its unit's `TasksMax=`), so one member must not use it all up (issue
/// 14, finding 8).
pub const MAX_PROGRAMS_PER_UID: usize = 64;

/// Routing tables / fwmarks host tunnels may use (51820 onwards).
const HOST_TUNNEL_SLOTS: u32 = 64;

/// What the journal records: enough to remove it after a crash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JournalEntry {
    /// A namespace instance (namespace, /etc/netns entry).
    Instance {
        /// Its name.
        name: String,
        /// Its owner.
        owner: u32,
    },
    /// A host tunnel (link, rules, kill switch, DNS).
    HostTunnel {
        /// Its name.
        name: String,
        /// Its owner.
        owner: u32,
        /// What to undo.
        record: crate::hosttun::HostRecord,
    },
    /// A server tunnel (nftables table, forwarding sysctls).
    ServerTunnel {
        /// Its name.
        name: String,
        /// Its owner.
        owner: u32,
        /// What to undo.
        record: crate::nat::ServerRecord,
    },
    /// The kill switch of a host tunnel that ended without `warren down`
    /// (its process died, or the helper stopped): it keeps blocking the
    /// host until its owner says `warren down NAME`, or brings the tunnel
    /// up again (which takes it over).
    KillSwitch {
        /// The tunnel's name.
        name: String,
        /// Its owner.
        owner: u32,
        /// warren's nftables table.
        table: String,
    },
}

impl JournalEntry {
    /// (name, owner).
    fn who(&self) -> (&str, u32) {
        match self {
            JournalEntry::Instance { name, owner }
            | JournalEntry::HostTunnel { name, owner, .. }
            | JournalEntry::ServerTunnel { name, owner, .. }
            | JournalEntry::KillSwitch { name, owner, .. } => (name, *owner),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    Connection(u64),
    Worker(i32),
}

#[derive(Debug)]
enum Kind {
    Instance {
        spec: InstanceSpec,
        netns: Arc<std::fs::File>,
    },
    Server {
        spec: ServerTunnelSpec,
        record: crate::nat::ServerRecord,
        egress: String,
    },
    Host {
        spec: HostTunnelSpec,
        record: crate::hosttun::HostRecord,
    },
}

#[derive(Debug)]
struct Instance {
    kind: Kind,
    owner: u32,
    lease: Lease,
    creator: u64,
    journal_id: u64,
}

#[derive(Debug)]
struct Proc {
    pidfd: Arc<OwnedFd>,
    conn: u64,
    instance: InstanceName,
    /// Whose it is (counted against [`MAX_PROGRAMS_PER_UID`]).
    uid: u32,
}

#[derive(Debug)]
struct State {
    instances: HashMap<InstanceName, Instance>,
    procs: HashMap<i32, Proc>,
    /// Spawns under way, per uid (counted with `procs` against the limit).
    starting: HashMap<u32, usize>,
    events: HashMap<u64, mpsc::Sender<Event>>,
    journal: Journal<JournalEntry>,
    state_dir: PathBuf,
    incidents: u64,
    /// Journal ids of what could not be removed (by a previous helper's
    /// reconcile, or a failed removal here): shown as orphans.
    orphans: std::collections::HashSet<u64>,
    /// Creations under way (issue 14, finding 5): from the request until it
    /// is registered or rolled back, each holds its name, counts against
    /// its owner's quota, and holds the shared slots it will use.
    pending: HashMap<InstanceName, Pending>,
    /// The host's forwarding settings before the first server tunnel, and
    /// how many server tunnels (pending or live) share them: the last to go
    /// restores them, under the lock, so a new one cannot save the values
    /// an ending one is about to restore.
    forwarding: Option<((String, String), usize)>,
}

/// A creation under way.
#[derive(Debug)]
struct Pending {
    owner: u32,
    claim: Claim,
}

/// The shared things a creation holds while it is under way; once it is
/// registered its [`Kind`] holds them.
#[derive(Debug, Clone, Copy)]
enum Claim {
    Instance,
    /// A share of the saved forwarding settings.
    Server,
    /// Routing table / fwmark `table`; whether it switches the host's DNS
    /// and has a kill switch.
    Host {
        table: u32,
        dns: bool,
        kill_switch: bool,
    },
}

impl State {
    /// The host tunnels, pending and live, as (name, claim).
    fn host_claims(&self) -> impl Iterator<Item = (&InstanceName, Claim)> {
        let live = self.instances.iter().filter_map(|(n, i)| match &i.kind {
            Kind::Host { record, .. } => Some((
                n,
                Claim::Host {
                    table: record.table,
                    dns: record.dns.is_some(),
                    kill_switch: record.nft_table.is_some(),
                },
            )),
            _ => None,
        });
        let pending = self
            .pending
            .iter()
            .filter(|(_, p)| matches!(p.claim, Claim::Host { .. }))
            .map(|(n, p)| (n, p.claim));
        live.chain(pending)
    }

    /// Takes a share of the saved forwarding settings, enabling forwarding
    /// (and saving what it was) for the first server tunnel.
    fn share_forwarding(&mut self) -> Result<(String, String), HelperError> {
        if let Some((saved, users)) = &mut self.forwarding {
            *users += 1;
            return Ok(saved.clone());
        }
        match crate::nat::enable_forwarding() {
            Ok(saved) => {
                self.forwarding = Some((saved.clone(), 1));
                Ok(saved)
            }
            Err(e) => Err(internal(self, "enable forwarding", &e)),
        }
    }

    /// Gives a share back; the last restores the saved settings.
    fn unshare_forwarding(&mut self) {
        let last = match &mut self.forwarding {
            Some((_, users)) => {
                *users -= 1;
                *users == 0
            }
            None => false,
        };
        if last && let Some((saved, _)) = self.forwarding.take() {
            for e in crate::nat::restore_forwarding(&saved) {
                error!(error = %e, "cannot restore forwarding");
            }
        }
    }

    /// Ends a creation's claim (rolled back).
    fn release(&mut self, name: &InstanceName, journal_id: u64) {
        if let Some(p) = self.pending.remove(name)
            && matches!(p.claim, Claim::Server)
        {
            self.unshare_forwarding();
        }
        let _ = self.journal.remove(journal_id);
    }
}

/// A creation under way, from [`Registry::reserve`] until
/// [`Registry::register`]; dropped before that (the build failed), it
/// releases its name and shared slots and drops its journal entry (the
/// build undid its own work).
struct Reservation {
    registry: Registry,
    name: InstanceName,
    journal_id: u64,
    armed: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            self.registry.lock().release(&self.name, self.journal_id);
        }
    }
}

/// The helper's instances.
#[derive(Debug, Clone)]
pub struct Registry {
    state: Arc<Mutex<State>>,
}

fn internal(state: &mut State, what: &str, err: &dyn std::fmt::Display) -> HelperError {
    state.incidents += 1;
    error!(incident = state.incidents, "{what}: {err}");
    HelperError::Internal {
        incident: state.incidents,
    }
}

impl Registry {
    /// Opens the journal at `journal_path` and removes everything a previous
    /// helper recorded there (its leases died with it).
    pub fn open(journal_path: PathBuf) -> Result<Registry, crate::journal::JournalError> {
        let (mut journal, corrupt) = Journal::<JournalEntry>::open(&journal_path)?;
        if let Some(e) = corrupt {
            warn!(error = %e, "journal set aside; orphans it named cannot be removed automatically");
        }
        reconcile(&mut journal);
        let state_dir = journal_path
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/run/warren"));
        Ok(Registry {
            state: Arc::new(Mutex::new(State {
                instances: HashMap::new(),
                procs: HashMap::new(),
                starting: HashMap::new(),
                events: HashMap::new(),
                orphans: journal
                    .entries()
                    .iter()
                    .filter(|(_, e)| !matches!(e, JournalEntry::KillSwitch { .. }))
                    .map(|(id, _)| *id)
                    .collect(),
                journal,
                state_dir,
                incidents: 0,
                pending: HashMap::new(),
                forwarding: None,
            })),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of resources held (instances).
    pub fn count(&self) -> usize {
        self.lock().instances.len()
    }

    /// Registers a connection's event channel.
    pub fn connect(&self, conn: u64, events: mpsc::Sender<Event>) {
        self.lock().events.insert(conn, events);
    }

    /// Checks that `name` is free (also in the kernel when `in_kernel`) and
    /// the caller under quota, takes what `make` claims, and journals the
    /// entry `make` builds, all under the lock: from here until
    /// [`Self::register`] (or the returned reservation's drop), the
    /// creation is pending and counted for names, quotas and shared slots
    /// (issue 14, finding 5). The journal entry comes before anything is
    /// created, so a crash from here on leaves an orphan that the next
    /// start removes.
    ///
    /// With `adopt_kill_switch`, a kill switch of the caller's left under
    /// `name` does not count as taking the name, and its journal id is
    /// returned: the new host tunnel takes it over.
    fn reserve<T>(
        &self,
        name: &InstanceName,
        peer: &PeerCred,
        in_kernel: bool,
        adopt_kill_switch: bool,
        make: impl FnOnce(&mut State) -> Result<(JournalEntry, Claim, T), HelperError>,
    ) -> Result<(Reservation, T, Option<u64>), HelperError> {
        let mut st = self.lock();
        let mut adopted = None;
        for (id, e) in leftovers(&st).filter(|(_, e)| e.who().0 == name.as_str()) {
            match e {
                JournalEntry::KillSwitch { owner, .. }
                    if adopt_kill_switch && *owner == peer.uid =>
                {
                    adopted = Some(id);
                }
                JournalEntry::KillSwitch { .. } => {
                    return Err(HelperError::Exists {
                        what: format!(
                            "kill switch {name}, blocking the host's traffic since its tunnel ended \
                             (`warren down {name}` releases it; `warren up --host {name} --kill-switch` takes it over)"
                        ),
                    });
                }
                _ => {
                    return Err(HelperError::Exists {
                        what: format!("resource {name}"),
                    });
                }
            }
        }
        if st.instances.contains_key(name)
            || st.pending.contains_key(name)
            || (in_kernel && netns::exists(name))
        {
            return Err(HelperError::Exists {
                what: format!("resource {name}"),
            });
        }
        let mine = st
            .instances
            .values()
            .filter(|i| i.owner == peer.uid)
            .count()
            + st.pending.values().filter(|p| p.owner == peer.uid).count();
        if peer.uid != 0 && mine >= MAX_INSTANCES_PER_UID {
            return Err(HelperError::TooManyResources {
                limit: MAX_INSTANCES_PER_UID as u32,
            });
        }
        let (entry, claim, extra) = make(&mut st)?;
        st.pending.insert(
            name.clone(),
            Pending {
                owner: peer.uid,
                claim,
            },
        );
        match st.journal.add(entry) {
            Ok(journal_id) => Ok((
                Reservation {
                    registry: self.clone(),
                    name: name.clone(),
                    journal_id,
                    armed: true,
                },
                extra,
                adopted,
            )),
            Err(e) => {
                st.release(name, u64::MAX);
                Err(internal(&mut st, "journal", &e))
            }
        }
    }

    /// Runs kernel work on a blocking thread. The work undoes its own
    /// partial effects on failure (and only its own); the reservation's
    /// drop then releases the name and drops the journal entry, and the
    /// refusal the work made is answered (something about the request or
    /// the host's state the caller can act on), or else an incident.
    async fn build<T: Send + 'static>(
        &self,
        what: String,
        work: impl FnOnce() -> Result<T, netns::NetError> + Send + 'static,
    ) -> Result<T, HelperError> {
        let why = match tokio::task::spawn_blocking(work).await {
            Ok(Ok(x)) => return Ok(x),
            Ok(Err(e)) => match refusal_of(&e) {
                Some(refused) => {
                    warn!(what, error = %refused, "refused");
                    return Err(refused.clone());
                }
                None => format!(
                    "{e}: {}",
                    std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                ),
            },
            Err(_) => "creation task failed".to_string(),
        };
        Err(internal(&mut self.lock(), &what, &why))
    }

    /// Records a created resource (and its final journal entry, if it
    /// changed) leased to `conn`: no longer pending.
    fn register(
        &self,
        mut reservation: Reservation,
        kind: Kind,
        peer: &PeerCred,
        conn: u64,
        final_entry: Option<JournalEntry>,
    ) -> InstanceName {
        let mut st = self.lock();
        reservation.armed = false;
        let (name, journal_id) = (reservation.name.clone(), reservation.journal_id);
        st.pending.remove(&name);
        if let Some(e) = final_entry {
            let _ = st.journal.update(journal_id, e);
        }
        st.instances.insert(
            name.clone(),
            Instance {
                kind,
                owner: peer.uid,
                lease: Lease::Connection(conn),
                creator: conn,
                journal_id,
            },
        );
        info!(resource = %name, uid = peer.uid, "created");
        name
    }

    /// Creates an instance leased to `conn`; returns its description and
    /// the TUN descriptor.
    pub async fn create(
        &self,
        spec: InstanceSpec,
        peer: &PeerCred,
        conn: u64,
    ) -> Result<(InstanceInfo, OwnedFd), HelperError> {
        let name = spec.name.clone();
        let entry = JournalEntry::Instance {
            name: name.to_string(),
            owner: peer.uid,
        };
        let (reservation, (), _) = self.reserve(&name, peer, true, false, |_| {
            Ok((entry, Claim::Instance, ()))
        })?;
        let spec2 = spec.clone();
        let (ns, tun) = self
            .build(format!("create instance {name}"), move || {
                // Removed on failure only once this request made it: a
                // namespace of that name it did not create is not its own.
                let ns = netns::create_netns(&spec2.name)?;
                let made = (|| {
                    netns::write_resolv_conf(&spec2.name, &spec2.dns, &spec2.search)?;
                    netns::write_nsswitch_conf(&spec2.name)?;
                    netns::create_tun_and_configure(&ns, &spec2)
                })();
                match made {
                    Ok(tun) => Ok((ns, tun)),
                    Err(e) => {
                        let _ = netns::destroy(&spec2.name);
                        Err(e)
                    }
                }
            })
            .await?;
        let kind = Kind::Instance {
            spec,
            netns: Arc::new(ns),
        };
        let name = self.register(reservation, kind, peer, conn, None);
        let info = describe(
            &name,
            self.lock().instances.get(&name).expect("just registered"),
        );
        Ok((info, tun))
    }

    /// Creates a server tunnel leased to `conn`: TUN in the helper's
    /// namespace, forwarding, warren's NAT table. Returns its description
    /// and the TUN descriptor.
    pub async fn create_server(
        &self,
        spec: ServerTunnelSpec,
        peer: &PeerCred,
        conn: u64,
    ) -> Result<(ServerTunnelInfo, OwnedFd), HelperError> {
        check_pools(&spec.addresses, &crate::config::server_tunnel_pools())?;
        let name = spec.name.clone();
        let table = crate::nat::table_name(&spec);
        // Forwarding is shared: the first server tunnel saves it, every one
        // records the saved values (so a crash's reconcile restores them),
        // and the last to go restores them.
        // Host tunnels' links: their routes (0.0.0.0/1 and the like) do not
        // keep a server tunnel out; other server tunnels' subnets do.
        let (reservation, (saved, host_links), _) =
            self.reserve(&name, peer, false, false, |st| {
                let host_links: Vec<String> = st
                    .instances
                    .values()
                    .filter_map(|i| match &i.kind {
                        Kind::Host { spec, .. } => Some(spec.ifname()),
                        _ => None,
                    })
                    .collect();
                let saved = st.share_forwarding()?;
                let entry = JournalEntry::ServerTunnel {
                    name: name.to_string(),
                    owner: peer.uid,
                    record: crate::nat::ServerRecord {
                        table: table.clone(),
                        saved_forwarding: Some(saved.clone()),
                    },
                };
                Ok((entry, Claim::Server, (saved, host_links)))
            })?;
        let spec2 = spec.clone();
        // Its table is the last step and atomic: on failure there is none
        // of ours to delete (and a table of that name that was there before
        // is not ours); its TUN goes with the descriptor.
        let (tun, egress, _) = self
            .build(format!("create server tunnel {name}"), move || {
                crate::nat::create(&spec2, &host_links)
            })
            .await?;
        let record = crate::nat::ServerRecord {
            table,
            saved_forwarding: Some(saved),
        };
        let info = ServerTunnelInfo {
            name: name.clone(),
            ifname: spec.ifname(),
            egress: egress.clone(),
        };
        let kind = Kind::Server {
            spec,
            record,
            egress,
        };
        self.register(reservation, kind, peer, conn, None);
        Ok((info, tun))
    }

    /// Creates a host tunnel leased to `conn`. Returns its description, the
    /// TUN descriptor and the marked UDP socket.
    pub async fn create_host(
        &self,
        spec: HostTunnelSpec,
        peer: &PeerCred,
        conn: u64,
    ) -> Result<(HostTunnelInfo, OwnedFd, OwnedFd), HelperError> {
        let name = spec.name.clone();
        let entry = |record| JournalEntry::HostTunnel {
            name: name.to_string(),
            owner: peer.uid,
            record,
        };
        let reserved = self.reserve(&name, peer, false, spec.kill_switch, |st| {
            host_tunnel_fits(st, &spec)?;
            let used: Vec<u32> = st
                .host_claims()
                .filter_map(|(_, c)| match c {
                    Claim::Host { table, .. } => Some(table),
                    _ => None,
                })
                .collect();
            let slot = (0..HOST_TUNNEL_SLOTS)
                .find(|s| !used.contains(&(crate::hosttun::TABLE_BASE + s)))
                .ok_or_else(|| HelperError::HostState {
                    reason: format!(
                        "all {HOST_TUNNEL_SLOTS} host-tunnel routing tables are in use"
                    ),
                })?;
            let plan = crate::hosttun::plan(&spec, slot, &st.state_dir);
            let claim = Claim::Host {
                table: plan.table,
                dns: plan.dns.is_some(),
                kill_switch: plan.nft_table.is_some(),
            };
            Ok((entry(plan.clone()), claim, plan))
        });
        let (reservation, plan, adopted) = reserved?;
        let spec2 = spec.clone();
        // hosttun::create undoes its own partial work on failure (and keeps
        // a block in place when it took one over).
        let (tun, udp, record) = self
            .build(format!("create host tunnel {name}"), move || {
                crate::hosttun::create(&spec2, &plan, adopted.is_some())
            })
            .await?;
        if let Some(id) = adopted {
            let _ = self.lock().journal.remove(id);
            info!(tunnel = %name, "took over the kill switch left by its previous tunnel");
        }
        let info = HostTunnelInfo {
            name: name.clone(),
            ifname: record.ifname.clone(),
            table: record.table,
            fwmark: record.table,
        };
        let kind = Kind::Host {
            spec,
            record: record.clone(),
        };
        self.register(reservation, kind, peer, conn, Some(entry(record)));
        Ok((info, tun, udp))
    }

    /// Destroys an instance the caller owns (root: any).
    pub async fn destroy(&self, name: &InstanceName, peer: &PeerCred) -> Result<(), HelperError> {
        let orphan = {
            let st = self.lock();
            leftovers(&st)
                .find(|(_, e)| {
                    let (n, owner) = e.who();
                    n == name.as_str() && (owner == peer.uid || peer.uid == 0)
                })
                .map(|(id, _)| id)
        };
        if let Some(id) = orphan {
            return self.retry_orphan(id).await;
        }
        let id = {
            let st = self.lock();
            match st.instances.get(name) {
                None => {
                    return Err(HelperError::NotFound {
                        what: format!("instance {name}"),
                    });
                }
                Some(i) if i.owner != peer.uid && peer.uid != 0 => {
                    // Same answer as for a missing one: others' instances
                    // are not the caller's business.
                    return Err(HelperError::NotFound {
                        what: format!("instance {name}"),
                    });
                }
                Some(i) => i.journal_id,
            }
        };
        let _ = self.remove(name, id, "destroyed on request", true).await;
        Ok(())
    }

    /// Tries again to remove what a previous helper left (journal entry `id`).
    async fn retry_orphan(&self, id: u64) -> Result<(), HelperError> {
        let entry = self
            .lock()
            .journal
            .entries()
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, e)| e.clone());
        let Some(entry) = entry else { return Ok(()) };
        let errs = tokio::task::spawn_blocking(move || undo(&entry, false, false))
            .await
            .unwrap_or_default();
        let mut st = self.lock();
        if errs.is_empty() {
            let _ = st.journal.remove(id);
            st.orphans.remove(&id);
            return Ok(());
        }
        let why = errs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        Err(internal(&mut st, "remove an orphan", &why))
    }

    /// The caller's instances (root: all).
    pub fn list(&self, peer: &PeerCred) -> Vec<InstanceInfo> {
        let st = self.lock();
        let mut v: Vec<InstanceInfo> = st
            .instances
            .iter()
            .filter(|(_, i)| peer.uid == 0 || i.owner == peer.uid)
            .map(|(n, i)| describe(n, i))
            .collect();
        // What could not be removed, and kill switches left blocking: shown,
        // never hidden, so `warren status` tells and `warren down` removes.
        v.extend(leftovers(&st).filter_map(|(_, e)| {
            let (name, owner) = e.who();
            let name = InstanceName::new(name).ok()?;
            let lease = match e {
                JournalEntry::KillSwitch { .. } => KILL_SWITCH_LEASE,
                _ => ORPHAN_LEASE,
            };
            (peer.uid == 0 || owner == peer.uid).then(|| InstanceInfo {
                name,
                netns: String::new(),
                tun: String::new(),
                owner_uid: owner,
                lease: lease.into(),
                addresses: Vec::new(),
            })
        }));
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Spawns a program in an instance the caller owns, as the caller.
    pub async fn spawn(
        &self,
        spec: SpawnSpec,
        peer: &PeerCred,
        conn: u64,
        fds: Vec<OwnedFd>,
    ) -> Result<i32, HelperError> {
        if fds.len() != usize::from(spec.n_fds) {
            let sent = fds.len();
            crate::closer::close(fds).await;
            return Err(HelperError::InvalidArgument {
                field: "n_fds".into(),
                reason: format!("{} announced, {sent} sent", spec.n_fds),
            });
        }
        let ns = {
            let mut st = self.lock();
            match st.instances.get(&spec.instance) {
                Some(Instance {
                    kind: Kind::Instance { netns, .. },
                    owner,
                    ..
                }) if *owner == peer.uid || peer.uid == 0 => {
                    let ns = netns.clone();
                    // Counted from here, so concurrent spawns cannot pass
                    // the limit together.
                    let running = st.procs.values().filter(|p| p.uid == peer.uid).count()
                        + st.starting.get(&peer.uid).copied().unwrap_or(0);
                    if peer.uid != 0 && running >= MAX_PROGRAMS_PER_UID {
                        Err(HelperError::TooManyPrograms {
                            limit: MAX_PROGRAMS_PER_UID as u32,
                        })
                    } else {
                        *st.starting.entry(peer.uid).or_insert(0) += 1;
                        Ok(ns)
                    }
                }
                _ => Err(HelperError::NotFound {
                    what: format!("instance {}", spec.instance),
                }),
            }
        };
        let ns = match ns {
            Ok(ns) => ns,
            Err(e) => {
                crate::closer::close(fds).await;
                return Err(e);
            }
        };
        // The spawn is no longer under way once it is a proc or failed.
        let starting = Starting {
            registry: Some(self.clone()),
            uid: peer.uid,
        };
        let name = spec.instance.clone();
        let peer2 = peer.clone();
        // Outer error: the user's cgroup (the helper's fault or the host's);
        // inner: the program could not be started.
        let spawned = tokio::task::spawn_blocking(move || {
            let etc = spec.private_resolv.then(|| netns::paths(&spec.instance).1);
            let cgroup = crate::cgroups::procs_for(peer2.uid).transpose()?;
            Ok::<_, std::io::Error>(
                runas::spawn(
                    cgroup.as_ref(),
                    &ns,
                    etc.as_deref(),
                    &peer2,
                    &spec.argv,
                    &spec.env,
                    &spec.cwd,
                    fds,
                    spec.controlling_tty,
                )
                .map(|s| (s, spec.bind_lease)),
            )
        })
        .await;
        let (sp, bind) = match spawned {
            Ok(Ok(Ok(x))) => x,
            Ok(Ok(Err(e))) => {
                // The program could not be started (not found, cwd not
                // accessible to the user...): say so, it is the caller's.
                return Err(HelperError::InvalidArgument {
                    field: "argv".into(),
                    reason: format!("cannot start the program: {e}"),
                });
            }
            Ok(Err(e)) => {
                let mut st = self.lock();
                return Err(internal(&mut st, "the user's cgroup", &e));
            }
            Err(e) => {
                let mut st = self.lock();
                return Err(internal(&mut st, "spawn task", &e));
            }
        };
        let pid = sp.pid;
        let pidfd = Arc::new(sp.pidfd);
        {
            let mut st = self.lock();
            if bind && let Some(i) = st.instances.get_mut(&name) {
                i.lease = Lease::Worker(pid);
            }
            st.procs.insert(
                pid,
                Proc {
                    pidfd: pidfd.clone(),
                    conn,
                    instance: name.clone(),
                    uid: peer.uid,
                },
            );
            starting.done(&mut st);
        }
        info!(instance = %name, uid = peer.uid, pid, bind, "program spawned");
        let reg = self.clone();
        tokio::spawn(async move { reg.watch(pid, pidfd).await });
        Ok(pid)
    }

    /// Waits for a spawned program to end, reports it, and ends the
    /// instance if the program held its lease.
    async fn watch(&self, pid: i32, pidfd: Arc<OwnedFd>) {
        // SAFETY: the AsyncFd owns a clone of the Arc, so the pidfd stays
        // open and unchanged for the AsyncFd's whole life.
        let registered = unsafe {
            AsyncFd::register_with_interest(pidfd.clone(), tokio::io::Interest::READABLE)
        };
        match registered {
            // A pidfd becomes readable when the process exits.
            Ok(afd) => {
                let _ = afd.readable().await;
            }
            Err(e) => warn!(pid, error = %e, "cannot watch a spawned program"),
        }
        let status = runas::reap(&pidfd);
        let (conn, instance, leased) = {
            let mut st = self.lock();
            let Some(p) = st.procs.remove(&pid) else {
                return;
            };
            let leased = st
                .instances
                .get(&p.instance)
                .filter(|i| i.lease == Lease::Worker(pid))
                .map(|i| i.journal_id);
            (p.conn, p.instance, leased)
        };
        info!(pid, instance = %instance, status = ?status, "program ended");
        if let Ok(status) = status {
            self.send_event(conn, Event::Exited { pid, status });
        }
        if let Some(id) = leased {
            let _ = self.remove(&instance, id, "its worker ended", false).await;
        }
    }

    fn send_event(&self, conn: u64, ev: Event) {
        let st = self.lock();
        if let Some(tx) = st.events.get(&conn)
            && tx.try_send(ev).is_err()
        {
            warn!(conn, "client not reading its events; one dropped");
        }
    }

    /// A connection closed: remove the instances leased to it.
    pub async fn disconnect(&self, conn: u64) {
        let leased: Vec<(InstanceName, u64)> = {
            let mut st = self.lock();
            st.events.remove(&conn);
            st.instances
                .iter()
                .filter(|(_, i)| i.lease == Lease::Connection(conn))
                .map(|(n, i)| (n.clone(), i.journal_id))
                .collect()
        };
        for (name, id) in leased {
            let _ = self
                .remove(&name, id, "its client disconnected", false)
                .await;
        }
    }

    /// Removes everything (shutdown).
    pub async fn remove_all(&self) {
        let all: Vec<(InstanceName, u64)> = self
            .lock()
            .instances
            .iter()
            .map(|(n, i)| (n.clone(), i.journal_id))
            .collect();
        for (n, id) in all {
            // Shutdown waits for the journal too, so it is left clean.
            if let Some(books) = self.remove(&n, id, "helper stopping", false).await {
                let _ = books.await;
            }
        }
    }

    /// Ends the programs in `name`, removes its kernel objects, forgets it.
    /// Returns the task finishing the bookkeeping (journal, events).
    ///
    /// Only the resource whose journal id is `id` is removed: the caller
    /// looked it up before an await, and by now `name` may be another
    /// resource (the old one removed and the name taken again; issue 14,
    /// finding 5).
    ///
    /// A host tunnel's kill switch stays unless `explicit` (`warren down`):
    /// its journal entry becomes a [`JournalEntry::KillSwitch`].
    async fn remove(
        &self,
        name: &InstanceName,
        id: u64,
        why: &str,
        explicit: bool,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let (inst, procs) = {
            let mut st = self.lock();
            if st.instances.get(name)?.journal_id != id {
                return None;
            }
            let inst = st.instances.remove(name)?;
            let procs: Vec<Arc<OwnedFd>> = st
                .procs
                .values()
                .filter(|p| &p.instance == name)
                .map(|p| p.pidfd.clone())
                .collect();
            (inst, procs)
        };
        let kill = || {
            for p in &procs {
                let _ = runas::signal(p, libc::SIGKILL);
            }
        };
        let n = name.clone();
        let server = match &inst.kind {
            Kind::Server { record, .. } => Some(record.clone()),
            _ => None,
        };
        let host = match &inst.kind {
            Kind::Host { record, .. } => Some(record.clone()),
            _ => None,
        };
        // A server or host tunnel's process stops before its NAT, routes
        // or kill switch go (otherwise packets could leave unprotected for
        // a moment). A namespace instance is unpublished first instead: its
        // name carries no routing, and unmounting before the worker's exit
        // tears down its mount namespace avoids waiting on that teardown.
        let namespace = server.is_none() && host.is_none();
        if !namespace {
            kill();
        }
        let was_server = server.is_some();
        let held = host
            .as_ref()
            .and_then(|r| r.nft_table.clone())
            .filter(|_| !explicit);
        let keep_block = held.is_some();
        let errs = tokio::task::spawn_blocking(move || match (server, host) {
            (Some(rec), _) => undo_server(&rec, false),
            (_, Some(rec)) => crate::hosttun::end(&rec, keep_block),
            _ => netns::destroy(&n),
        })
        .await
        .unwrap_or_default();
        if namespace {
            kill();
        }
        if was_server {
            // Its table is gone (or an orphan): its share of forwarding
            // ends; the last share restores it.
            self.lock().unshare_forwarding();
        }
        // The journal and the events are bookkeeping: the caller's answer
        // does not wait for them.
        let (reg, name, why) = (self.clone(), name.clone(), why.to_string());
        Some(tokio::spawn(async move {
            let mut st = reg.lock();
            if errs.is_empty()
                && let Some(table) = held
            {
                let entry = JournalEntry::KillSwitch {
                    name: name.to_string(),
                    owner: inst.owner,
                    table,
                };
                if let Err(e) = st.journal.update(inst.journal_id, entry) {
                    warn!(error = %e, "cannot update the journal");
                }
                warn!(tunnel = %name, reason = why, "host tunnel ended; its kill switch keeps blocking until `warren down`");
            } else if errs.is_empty() {
                if let Err(e) = st.journal.remove(inst.journal_id) {
                    warn!(error = %e, "cannot update the journal");
                }
                info!(instance = %name, reason = why, "instance removed");
            } else {
                for e in &errs {
                    error!(instance = %name, error = %e, cause = ?std::error::Error::source(e).map(|s| s.to_string()), "removal step failed; kept in the journal and shown as an orphan");
                }
                st.orphans.insert(inst.journal_id);
            }
            let creator = inst.creator;
            drop(st);
            reg.send_event(creator, Event::InstanceGone { name });
        }))
    }
}

/// A spawn under way for `uid`, counted in `State::starting` until it is
/// done (became a proc) or dropped (failed).
struct Starting {
    /// None once done.
    registry: Option<Registry>,
    uid: u32,
}

impl Starting {
    /// Stops counting it (its proc is counted instead), under `st`'s lock.
    fn done(mut self, st: &mut State) {
        uncount_start(st, self.uid);
        self.registry = None;
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(r) = self.registry.take() {
            uncount_start(&mut r.lock(), self.uid);
        }
    }
}

fn uncount_start(st: &mut State, uid: u32) {
    if let Some(n) = st.starting.get_mut(&uid) {
        *n -= 1;
        if *n == 0 {
            st.starting.remove(&uid);
        }
    }
}

/// Refuses a host tunnel that cannot work beside the host tunnels and
/// kill switches already there (pending ones included), rather than let it
/// come up broken: the host has one resolv.conf (two tunnels switching it
/// would restore each other's copy), and a kill switch drops everything
/// that does not leave through its own tunnel, so it excludes every other
/// host tunnel. Host tunnels are host-wide by design (docs/security.md), so
/// naming the other tunnel tells the caller nothing `ip link` does not.
fn host_tunnel_fits(st: &State, spec: &HostTunnelSpec) -> Result<(), HelperError> {
    let held = leftovers(st).filter_map(|(_, e)| match e {
        JournalEntry::KillSwitch { name, .. } if name != spec.name.as_str() => Some(name.clone()),
        _ => None,
    });
    if let Some(other) = held.into_iter().next() {
        return Err(HelperError::HostState {
            reason: format!(
                "the kill switch of host tunnel {other} blocks every other tunnel (`warren down {other}` releases it)"
            ),
        });
    }
    for (other, claim) in st.host_claims() {
        let Claim::Host {
            dns, kill_switch, ..
        } = claim
        else {
            continue;
        };
        if kill_switch || spec.kill_switch {
            let whose = if kill_switch {
                format!("host tunnel {other} has a kill switch, which")
            } else {
                "a kill switch".to_string()
            };
            return Err(HelperError::HostState {
                reason: format!(
                    "{whose} blocks every other host tunnel, and host tunnel {other} is up"
                ),
            });
        }
        if dns && !spec.dns.is_empty() {
            return Err(HelperError::HostState {
                reason: format!(
                    "host tunnel {other} has switched the host's DNS; only one host tunnel at a time can (bring this one up without DNS servers)"
                ),
            });
        }
    }
    Ok(())
}

/// Refuses a server tunnel whose subnet is not inside one of `pools` (the
/// root-owned config's `server_tunnel_pools`; issue 14, finding 4): its
/// addresses and subnet route are added in the host's namespace, so
/// elsewhere they could take over traffic meant for someone else (all the
/// host's traffic to `1.1.1.1` with `1.1.1.2/24`). The answer names the
/// pools of the address's family.
fn check_pools(addresses: &[IpPrefix], pools: &[IpPrefix]) -> Result<(), HelperError> {
    for a in addresses {
        if pools.iter().any(|p| p.contains(a)) {
            continue;
        }
        let same: Vec<String> = pools
            .iter()
            .filter(|p| p.addr().is_ipv4() == a.addr().is_ipv4())
            .map(ToString::to_string)
            .collect();
        let family = if a.addr().is_ipv4() { 4 } else { 6 };
        let reason = if same.is_empty() {
            format!(
                "{a}: this helper has no IPv{family} server-tunnel pool (root sets server_tunnel_pools in the helper's config)"
            )
        } else {
            format!(
                "{a} ({}) is not inside the server-tunnel pool{} {} (root sets server_tunnel_pools in the helper's config)",
                a.network(),
                if same.len() == 1 { "" } else { "s" },
                same.join(", ")
            )
        };
        return Err(HelperError::InvalidArgument {
            field: "addresses".into(),
            reason,
        });
    }
    Ok(())
}

/// The refusal (see [`crate::nat::refusal`]) a failed step carries, if any.
fn refusal_of(e: &netns::NetError) -> Option<&HelperError> {
    e.source.get_ref()?.downcast_ref::<HelperError>()
}

/// Removes a server tunnel's table; the last one restores forwarding.
fn undo_server(rec: &crate::nat::ServerRecord, last: bool) -> Vec<netns::NetError> {
    let mut errs = Vec::new();
    if let Err(e) = crate::nat::delete_table(&rec.table) {
        errs.push(e);
    }
    if last && let Some(saved) = &rec.saved_forwarding {
        errs.extend(crate::nat::restore_forwarding(saved));
    }
    errs
}

fn describe(name: &InstanceName, i: &Instance) -> InstanceInfo {
    let (netns, tun, addresses) = match &i.kind {
        Kind::Instance { spec, .. } => (
            name.netns(),
            netns::TUN_NAME.to_string(),
            spec.addresses.clone(),
        ),
        Kind::Host { spec, record } => (
            format!("(helper's, table {})", record.table),
            spec.ifname(),
            spec.addresses.clone(),
        ),
        Kind::Server { spec, egress, .. } => (
            format!("(helper's, NAT out of {egress})"),
            spec.ifname(),
            spec.addresses.clone(),
        ),
    };
    InstanceInfo {
        name: name.clone(),
        netns,
        tun,
        owner_uid: i.owner,
        lease: match i.lease {
            Lease::Connection(_) => "connection".into(),
            Lease::Worker(pid) => format!("worker {pid}"),
        },
        addresses,
    }
}

/// Journal entries with no live resource: what could not be removed
/// (orphans) and kill switches left blocking. Their owners see them
/// (`warren status`) and `warren down NAME` removes them.
fn leftovers(st: &State) -> impl Iterator<Item = (u64, &JournalEntry)> {
    st.journal.entries().iter().filter_map(|(id, e)| {
        (st.orphans.contains(id) || matches!(e, JournalEntry::KillSwitch { .. }))
            .then_some((*id, e))
    })
}

/// Removes what one journal entry names; a host tunnel's kill switch stays
/// when `keep_block`. Forwarding is restored only `at_start` (reconcile:
/// no server tunnel lives); a running helper's shares restore it.
fn undo(e: &JournalEntry, keep_block: bool, at_start: bool) -> Vec<netns::NetError> {
    match e {
        JournalEntry::Instance { name, .. } => match InstanceName::new(name) {
            Ok(n) => netns::destroy(&n),
            Err(_) => Vec::new(),
        },
        JournalEntry::HostTunnel { record, .. } => crate::hosttun::end(record, keep_block),
        JournalEntry::ServerTunnel { record, .. } => undo_server(record, at_start),
        JournalEntry::KillSwitch { table, .. } if !keep_block => {
            crate::nat::delete_table(table).err().into_iter().collect()
        }
        JournalEntry::KillSwitch { .. } => Vec::new(),
    }
}

/// Removes everything the journal names (after a crash, or from
/// `warren-helper cleanup`), keeping entries whose removal failed, and the
/// kill switches of host tunnels (they block until `warren down`).
pub fn reconcile(journal: &mut Journal<JournalEntry>) -> usize {
    let entries: Vec<(u64, JournalEntry)> = journal.entries().to_vec();
    let mut removed = 0;
    for (id, e) in entries {
        let (name, owner) = e.who();
        let errs = undo(&e, true, true);
        let held = match &e {
            JournalEntry::KillSwitch { .. } => continue,
            JournalEntry::HostTunnel { record, .. } => record.nft_table.clone(),
            _ => None,
        };
        if !errs.is_empty() {
            for err in errs {
                error!(resource = name, owner, error = %err, cause = ?std::error::Error::source(&err).map(|s| s.to_string()), "cannot remove orphan; kept in the journal and shown by `warren status`");
            }
        } else if let Some(table) = held {
            warn!(
                tunnel = name,
                owner,
                "removed a host tunnel a previous helper left; its kill switch keeps blocking until `warren down`"
            );
            let entry = JournalEntry::KillSwitch {
                name: name.to_string(),
                owner,
                table,
            };
            let _ = journal.update(id, entry);
            removed += 1;
        } else {
            info!(
                resource = name,
                owner, "removed an orphan left by a previous helper"
            );
            let _ = journal.remove(id);
            removed += 1;
        }
    }
    removed
}

/// Journal entries that reconcile could not remove (kill switches, which
/// stay on purpose, not counted).
pub fn unremoved(journal: &Journal<JournalEntry>) -> usize {
    journal
        .entries()
        .iter()
        .filter(|(_, e)| !matches!(e, JournalEntry::KillSwitch { .. }))
        .count()
}
