//! Host tunnels: the helper's network namespace (the host) routed through a
//! TUN device the way wg-quick does it, DNS switched and restored, and an
//! optional kill switch in warren's own nftables table.
//!
//! Routing: the tunnel's routes go into a table of their own (`T`, 51820 +
//! slot); a rule `not fwmark T lookup T` sends everything unmarked there,
//! and a rule `lookup main suppress_prefixlength 0` before it keeps the main
//! table's specific routes (but not its default) in force. The encrypted
//! traffic leaves through a UDP socket the helper creates with mark `T`, so
//! it bypasses the tunnel and the endpoint stays reachable; the unprivileged
//! client could not set that mark itself.
//!
//! DNS: `/etc/resolv.conf` (from a thread in the host's mount namespace: the
//! unit's is read-only there) is saved beside the journal and rewritten in
//! place, or a symlink is replaced by a file; both are restored on removal.
//! Where systemd-resolved is in charge, the tunnel's link gets the DNS
//! servers and the `~.` routing domain instead (resolved's D-Bus API, through
//! `resolvectl`), and resolved drops them when the link goes.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use warren_ipc::HelperError;
use warren_ipc::instance::HostTunnelSpec;

use crate::netns::NetError;

/// First routing table / fwmark used by host tunnels (wg-quick's 51820).
pub const TABLE_BASE: u32 = 51820;
/// Priorities of the two rules (lower runs first; main is 32766).
const PRIO_SUPPRESS: u32 = 32760;
const PRIO_FWMARK: u32 = 32761;
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// How DNS was before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DnsBackup {
    /// systemd-resolved is in charge: the tunnel's DNS was set on its link
    /// through resolved's D-Bus API, and goes with the link (resolved
    /// forgets a removed link's settings, after a crash too).
    Resolved,
    /// resolv.conf was a file; its content was saved to this path.
    File(PathBuf),
    /// resolv.conf was a symlink to this target.
    Symlink(PathBuf),
}

/// What must be undone (kept in the journal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The TUN device.
    pub ifname: String,
    /// Routing table and fwmark.
    pub table: u32,
    /// Whether IPv4 / IPv6 rules were added.
    pub families: (bool, bool),
    /// warren's nftables table for the kill switch.
    pub nft_table: Option<String>,
    /// How to put DNS back.
    pub dns: Option<DnsBackup>,
}

fn err(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let step = step.into();
    move |source| NetError { step, source }
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// The record a tunnel in `slot` will have (computed before anything is
/// changed, so it can be journaled first).
pub fn plan(spec: &HostTunnelSpec, slot: u32, state_dir: &Path) -> HostRecord {
    let has = |v6: bool| spec.routes.iter().any(|r| r.addr().is_ipv6() == v6);
    let names = spec.names();
    HostRecord {
        ifname: spec.ifname(),
        table: TABLE_BASE + slot,
        families: (has(false), has(true)),
        nft_table: names.nft_table.filter(|_| spec.kill_switch),
        dns: (!spec.dns.is_empty())
            .then(|| DnsBackup::File(state_dir.join(names.state_file.unwrap_or_default()))),
    }
}

/// Serializes every change to the host tunnels' rules in this process:
/// the shared `suppress_prefixlength` rule is added by the first tunnel of
/// a family and removed with the last, and "the last" is decided by the
/// kernel's own rule list under this lock (issue 14, finding 5), so a
/// failed or ending tunnel never removes the rule another still needs, and
/// a crash leaves nothing a later removal would not collect.
static RULES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The rule `lookup main suppress_prefixlength 0` (shared by all host
/// tunnels of a family) or `not fwmark T lookup T` (table `T`'s own).
fn rule_msg(
    handle: &rtnetlink::Handle,
    v6: bool,
    table: Option<u32>,
) -> rtnetlink::packet_route::rule::RuleMessage {
    use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags};
    let base = handle.rule().add();
    let mut msg = if v6 {
        base.v6().message_mut().clone()
    } else {
        base.v4().message_mut().clone()
    };
    msg.header.action = RuleAction::ToTable;
    match table {
        None => {
            msg.header.table = 254; // main
            msg.attributes.push(RuleAttribute::Table(254));
            msg.attributes.push(RuleAttribute::SuppressPrefixLen(0));
            msg.attributes.push(RuleAttribute::Priority(PRIO_SUPPRESS));
        }
        Some(t) => {
            msg.header.table = 252; // RT_TABLE_COMPAT: the real id is the attribute
            msg.attributes.push(RuleAttribute::Table(t));
            msg.attributes.push(RuleAttribute::FwMark(t));
            msg.attributes.push(RuleAttribute::Priority(PRIO_FWMARK));
            msg.header.flags |= RuleFlags::Invert;
        }
    }
    msg
}

/// The host tunnels' rules of one family now in the kernel: whether the
/// shared suppress rule is there, and the tables of the fwmark rules.
async fn rules_present(handle: &rtnetlink::Handle, v6: bool) -> std::io::Result<(bool, Vec<u32>)> {
    use rtnetlink::packet_route::rule::RuleAttribute;
    let version = if v6 {
        rtnetlink::IpVersion::V6
    } else {
        rtnetlink::IpVersion::V4
    };
    let mut dump = handle.rule().get(version).execute();
    let (mut suppress, mut tables) = (false, Vec::new());
    while let Some(m) = dump.try_next().await.map_err(other)? {
        let prio = m.attributes.iter().find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        });
        let mark = m.attributes.iter().find_map(|a| match a {
            RuleAttribute::FwMark(f) => Some(*f),
            _ => None,
        });
        match (prio, mark) {
            (Some(PRIO_SUPPRESS), None) => suppress = true,
            (Some(PRIO_FWMARK), Some(t)) => tables.push(t),
            _ => {}
        }
    }
    Ok((suppress, tables))
}

/// Adds table `rec.table`'s rules for the families `rec.families` asks
/// for (and the shared suppress rule where no tunnel has added it yet).
/// `added` records, per family, that its fwmark rule is in: what a
/// rollback may remove.
async fn add_rules(
    handle: &rtnetlink::Handle,
    rec: &HostRecord,
    added: &mut (bool, bool),
) -> std::io::Result<()> {
    for v6 in [false, true] {
        if !(if v6 { rec.families.1 } else { rec.families.0 }) {
            continue;
        }
        let (suppress, tables) = rules_present(handle, v6).await?;
        if tables.contains(&rec.table) {
            return Err(crate::nat::refusal(HelperError::HostState {
                reason: format!(
                    "routing table {} already has a fwmark rule that warren did not make",
                    rec.table
                ),
            }));
        }
        if !suppress {
            let mut req = handle.rule().add();
            *req.message_mut() = rule_msg(handle, v6, None);
            req.execute().await.map_err(other)?;
        }
        let mut req = handle.rule().add();
        *req.message_mut() = rule_msg(handle, v6, Some(rec.table));
        req.execute().await.map_err(other)?;
        if v6 {
            added.1 = true;
        } else {
            added.0 = true;
        }
    }
    Ok(())
}

/// Removes table `rec.table`'s rules for `rec.families`, then, in both
/// families, the shared suppress rule if no host tunnel's fwmark rule is
/// left to need it. Missing rules are fine.
async fn del_rules(handle: &rtnetlink::Handle, rec: &HostRecord) -> std::io::Result<()> {
    for v6 in [false, true] {
        if if v6 { rec.families.1 } else { rec.families.0 } {
            let _ = handle
                .rule()
                .del(rule_msg(handle, v6, Some(rec.table)))
                .execute()
                .await;
        }
        let (suppress, tables) = rules_present(handle, v6).await?;
        if suppress && tables.is_empty() {
            let _ = handle
                .rule()
                .del(rule_msg(handle, v6, None))
                .execute()
                .await;
        }
    }
    Ok(())
}

/// A UDP socket marked with `mark` (bypasses the tunnel), unbound;
/// dual-stack where IPv6 exists.
fn marked_udp(mark: u32) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socket, sockopt};
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = match socket(AddressFamily::Inet6, SockType::Datagram, flags, None) {
        Ok(fd) => {
            setsockopt(&fd, sockopt::Ipv6V6Only, &false).map_err(other)?;
            fd
        }
        Err(_) => socket(AddressFamily::Inet, SockType::Datagram, flags, None).map_err(other)?,
    };
    setsockopt(&fd, sockopt::Mark, &mark).map_err(other)?;
    Ok(fd)
}

/// Where systemd-resolved answers varlink and D-Bus clients (it exists only
/// while resolved runs).
const RESOLVED_SOCKET: &str = "/run/systemd/resolve/io.systemd.Resolve";
/// resolved's command-line client (a [`crate::nat::trusted_command`]).
const RESOLVECTL: [&str; 2] = ["/usr/bin/resolvectl", "/bin/resolvectl"];

/// Whether systemd-resolved is in charge of the host's DNS: it runs, and
/// /etc/resolv.conf points to it (a link into /run/systemd/resolve, or its
/// stub address). Then rewriting resolv.conf would be wrong: resolved's
/// per-link settings are the interface.
fn resolved_in_charge() -> bool {
    if !Path::new(RESOLVED_SOCKET).exists() {
        return false;
    }
    match std::fs::read_link(RESOLV_CONF) {
        Ok(t) => t.to_string_lossy().contains("/run/systemd/resolve/"),
        Err(_) => std::fs::read_to_string(RESOLV_CONF).is_ok_and(|t| {
            t.lines()
                .any(|l| l.split_whitespace().eq(["nameserver", "127.0.0.53"]))
        }),
    }
}

/// Runs `resolvectl ARGS` (resolved's `SetLinkDNS`/`SetLinkDomains` on
/// D-Bus), with an empty environment; its failure output becomes the error.
fn resolvectl(args: &[&str]) -> std::io::Result<()> {
    let out = crate::nat::trusted_command(&RESOLVECTL, args)?.output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(other(format!(
        "resolvectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

fn set_dns(spec: &HostTunnelSpec, backup: &DnsBackup) -> std::io::Result<DnsBackup> {
    if resolved_in_charge() {
        let ifname = spec.ifname();
        let dns: Vec<String> = spec.dns.iter().map(ToString::to_string).collect();
        // "~.": every name goes to the tunnel's servers, none to the uplink's.
        let domains: Vec<String> = std::iter::once("~.".to_string())
            .chain(spec.search.iter().cloned())
            .collect();
        let mut a = vec!["dns", ifname.as_str()];
        a.extend(dns.iter().map(String::as_str));
        resolvectl(&a)?;
        let mut a = vec!["domain", ifname.as_str()];
        a.extend(domains.iter().map(String::as_str));
        resolvectl(&a)?;
        resolvectl(&["default-route", ifname.as_str(), "yes"])?;
        return Ok(DnsBackup::Resolved);
    }
    let DnsBackup::File(saved) = backup else {
        return Err(other("unexpected plan"));
    };
    let path = Path::new(RESOLV_CONF);
    let text = warren_netconf::resolv_conf(
        "# written by warren-helper while a host tunnel is up",
        &spec.dns,
        &spec.search,
    );
    let meta = std::fs::symlink_metadata(path);
    if let Ok(m) = &meta
        && m.file_type().is_symlink()
    {
        let target = std::fs::read_link(path)?;
        crate::netns::write_public_file(path, &text)?;
        return Ok(DnsBackup::Symlink(target));
    }
    let old = std::fs::read(path).unwrap_or_default();
    std::fs::write(saved, old)?;
    // In place: keeps bind mounts and the inode other tools watch.
    std::fs::write(path, text)?;
    Ok(DnsBackup::File(saved.clone()))
}

fn restore_dns(b: &DnsBackup) -> std::io::Result<()> {
    let path = Path::new(RESOLV_CONF);
    match b {
        // Removing the link (before this) took its DNS settings with it.
        DnsBackup::Resolved => Ok(()),
        DnsBackup::File(saved) => match std::fs::read(saved) {
            Ok(old) => {
                std::fs::write(path, old)?;
                std::fs::remove_file(saved)
            }
            // Saved copy gone: already restored.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        },
        DnsBackup::Symlink(target) => {
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
                return Ok(());
            }
            // Atomically: a new link beside it, renamed over the file.
            let tmp = Path::new("/etc/.resolv.conf.warren-link");
            let _ = std::fs::remove_file(tmp);
            std::os::unix::fs::symlink(target, tmp)?;
            std::fs::rename(tmp, path)
        }
    }
}

/// The kill switch: warren's table dropping everything the host sends or
/// forwards except through the tunnel (and loopback), and the tunnel's own
/// encrypted UDP (the helper's marked socket). With `replace`, the same
/// batch first deletes the table a previous tunnel of this name left
/// blocking: nftables applies a batch atomically, so there is no moment
/// without a block.
fn kill_switch_batch(
    table: &str,
    spec: &HostTunnelSpec,
    mark: u32,
    replace: bool,
) -> serde_json::Value {
    let ifname = spec.ifname();
    let t = |extra| crate::nat::in_table(table, extra);
    let mut cmds = Vec::new();
    if replace {
        cmds.push(json!({"delete": {"table": {"family": "inet", "name": table}}}));
    }
    cmds.extend([
        json!({"add": {"table": {"family": "inet", "name": table}}}),
        json!({"add": {"chain": t(json!({"name": "output", "type": "filter", "hook": "output", "prio": 0, "policy": "drop"}))}}),
        json!({"add": {"rule": t(json!({"chain": "output", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lo"}}, {"accept": null}]}))}}),
        json!({"add": {"rule": t(json!({"chain": "output", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": ifname}}, {"accept": null}]}))}}),
        // Forwarded traffic (containers, VMs) leaves only through the tunnel.
        json!({"add": {"chain": t(json!({"name": "forward", "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}))}}),
        json!({"add": {"rule": t(json!({"chain": "forward", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": ifname}}, {"accept": null}]}))}}),
        json!({"add": {"rule": t(json!({"chain": "forward", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": ifname}}, {"accept": null}]}))}}),
        json!({"add": {"chain": t(json!({"name": "input", "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}))}}),
    ]);
    // The tunnel's own encrypted traffic: the marked socket's UDP to the
    // peers' endpoints, nothing else. The mark bypasses the tunnel, so to
    // any other address or port it would be a way out in the clear (issue
    // 14, finding 6).
    for e in &spec.endpoints {
        let (proto, ip) = match e.ip() {
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ("ip", v4.to_string()),
                None => ("ip6", v6.to_string()),
            },
            std::net::IpAddr::V4(v4) => ("ip", v4.to_string()),
        };
        cmds.push(json!({"add": {"rule": t(json!({"chain": "output", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": mark}},
            {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "daddr"}}, "right": ip}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": e.port()}},
            {"accept": null}]}))}}));
    }
    // CVE-2019-14899: nothing addressed to the tunnel's inner addresses may
    // arrive through another interface.
    for a in &spec.addresses {
        let proto = if a.addr().is_ipv4() { "ip" } else { "ip6" };
        cmds.push(json!({"add": {"rule": t(json!({"chain": "input", "expr": [
            {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": ifname}},
            {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "daddr"}}, "right": a.addr().to_string()}},
            {"drop": null}
        ]}))}}));
    }
    json!({"nftables": cmds})
}

/// Creates the host tunnel in the calling thread's namespaces as planned in
/// `rec`. Returns the TUN, the marked UDP socket and the final record. On
/// failure everything done so far is undone.
///
/// `adopt`: a kill switch of this name (left by a tunnel whose process died)
/// blocks the host; the new tunnel's replaces it atomically, and a failure
/// leaves a block in place, never none.
pub fn create(
    spec: &HostTunnelSpec,
    rec: &HostRecord,
    adopt: bool,
) -> Result<(OwnedFd, OwnedFd, HostRecord), NetError> {
    // Before anything the rollback would undo by name.
    crate::nat::link_free(&rec.ifname)?;
    // What this request has made so far, and only that, is what a
    // rollback removes (issue 14, finding 5): the link once this request
    // created it, its own rules once added, its kill switch once installed,
    // the DNS once switched.
    let mut made = HostRecord {
        ifname: String::new(),
        table: rec.table,
        families: (false, false),
        nft_table: None,
        dns: None,
    };
    let res = create_inner(spec, rec, &mut made, adopt);
    if res.is_err() {
        let _ = end(&made, adopt);
    }
    res.map(|(tun, udp)| (tun, udp, made))
}

fn create_inner(
    spec: &HostTunnelSpec,
    plan: &HostRecord,
    made: &mut HostRecord,
    adopt: bool,
) -> Result<(OwnedFd, OwnedFd), NetError> {
    let tun = crate::netns::open_tun_named(&plan.ifname)
        .map_err(err(format!("create TUN {}", plan.ifname)))?;
    made.ifname = plan.ifname.clone();
    let udp = marked_udp(plan.table).map_err(err("create the marked UDP socket"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(err("start a runtime"))?;
    let serial = RULES.lock().unwrap_or_else(|p| p.into_inner());
    let routed = rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        let r = async {
            let index = crate::netns::link_up_with_addresses(
                &handle,
                &plan.ifname,
                spec.mtu,
                &spec.addresses,
            )
            .await?;
            warren_netconf::add_routes(&handle, &spec.routes, index, Some(plan.table)).await?;
            add_rules(&handle, plan, &mut made.families).await
        }
        .await;
        task.abort();
        r
    });
    drop(serial);
    routed.map_err(err("set up routing"))?;
    if let Some(table) = plan.nft_table.clone() {
        if adopt {
            crate::nat::nft_apply(&kill_switch_batch(&table, spec, plan.table, true))
                .map_err(err(format!("replace the kill switch {table}")))?;
        } else {
            crate::nat::install_table(&table, &kill_switch_batch(&table, spec, plan.table, false))?;
        }
        made.nft_table = Some(table);
    }
    if let Some(planned) = &plan.dns {
        // /etc is read-only in the unit's sandbox: the host's file is
        // changed from the host's mount namespace.
        let set = crate::netns::in_host_mount_ns(|| set_dns(spec, planned));
        made.dns = Some(set.map_err(err("switch DNS"))?);
    }
    let _ = udp.as_fd();
    Ok((tun, udp))
}

/// Undoes a host tunnel: link, routes, rules, DNS, and its kill switch
/// unless `keep_block` (a tunnel that ended without `warren down` keeps
/// blocking the host: with the link gone, the table drops everything but
/// loopback). Keeps going after errors and returns them all. Idempotent.
pub fn end(rec: &HostRecord, keep_block: bool) -> Vec<NetError> {
    let mut errs = Vec::new();
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let serial = RULES.lock().unwrap_or_else(|p| p.into_inner());
            let r = rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection()?;
                let task = tokio::spawn(conn);
                let r = async {
                    let ruled = del_rules(&handle, rec).await;
                    // Deleting the link takes its routes (table T) with it,
                    // even while a client still holds the TUN descriptor.
                    // (No link name: the request never created its link.)
                    if rec.ifname.is_empty() {
                        return ruled;
                    }
                    let mut links = handle.link().get().match_name(rec.ifname.clone()).execute();
                    if let Ok(Some(l)) = links.try_next().await {
                        handle
                            .link()
                            .del(l.header.index)
                            .execute()
                            .await
                            .map_err(other)?;
                    }
                    ruled
                }
                .await;
                task.abort();
                r
            });
            drop(serial);
            if let Err(e) = r {
                errs.push(err("remove the tunnel's link and rules")(e));
            }
        }
        Err(e) => errs.push(err("start a runtime")(e)),
    }
    if let Some(t) = &rec.nft_table
        && !keep_block
        && let Err(e) = crate::nat::delete_table(t)
    {
        errs.push(e);
    }
    if let Some(b) = &rec.dns
        && let Err(e) = crate::netns::in_host_mount_ns(|| restore_dns(b))
    {
        errs.push(err("restore DNS")(e));
    }
    errs
}
