//! Server tunnels: a TUN device in the helper's own network namespace,
//! IPv4 and IPv6 forwarding, and masquerade NAT out of the default route's
//! interface — all NAT and filtering in an nftables table of warren's own
//! (`inet warren_s_NAME`), created and deleted whole, so no table warren did
//! not create is ever flushed, replaced or edited.
//!
//! nftables is driven through its JSON interface (`nft -j -f -`, run by
//! absolute path with an empty environment); links,
//! addresses and the default route's interface through rtnetlink.

use std::io::Write;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use warren_ipc::HelperError;
use warren_ipc::instance::ServerTunnelSpec;

use crate::netns::NetError;

/// What must be undone for a server tunnel (kept in the journal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// warren's nftables table for it.
    pub table: String,
    /// Forwarding sysctls before the first server tunnel turned them on
    /// (`None`: left as they were).
    pub saved_forwarding: Option<(String, String)>,
}

fn err(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let step = step.into();
    move |source| NetError { step, source }
}

/// The nftables table of a server tunnel (`warren_s_NAME`).
pub fn table_name(spec: &ServerTunnelSpec) -> String {
    spec.names().nft_table.unwrap_or_default()
}

/// A refusal the caller can act on (carried inside an `io::Error` through
/// the kernel code, and answered as is instead of as an incident).
pub fn refusal(e: HelperError) -> std::io::Error {
    std::io::Error::other(e)
}

const V4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const V6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

fn read_knob(p: &str) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Turns forwarding on; returns the previous values.
pub fn enable_forwarding() -> Result<(String, String), NetError> {
    let saved = (read_knob(V4_FORWARD), read_knob(V6_FORWARD));
    std::fs::write(V4_FORWARD, b"1").map_err(err("enable IPv4 forwarding"))?;
    if std::path::Path::new(V6_FORWARD).exists() {
        std::fs::write(V6_FORWARD, b"1").map_err(err("enable IPv6 forwarding"))?;
    }
    Ok(saved)
}

/// Puts forwarding back as it was.
pub fn restore_forwarding(saved: &(String, String)) -> Vec<NetError> {
    let mut errs = Vec::new();
    for (p, v) in [(V4_FORWARD, &saved.0), (V6_FORWARD, &saved.1)] {
        if !v.is_empty()
            && std::path::Path::new(p).exists()
            && let Err(e) = std::fs::write(p, v.as_bytes())
        {
            errs.push(err(format!("restore {p}"))(e));
        }
    }
    errs
}

/// Where `nft` may be: a fixed list, never `PATH` (the helper's
/// environment is not trusted; sudo may not even reset it).
const NFT_PATHS: [&str; 3] = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"];

/// A program the helper runs, by the first absolute path of `paths` that is
/// root-owned, writable by root alone and in root-owned directories (never
/// found through `PATH`), with an empty environment and no input.
pub fn trusted_command(paths: &[&str], args: &[&str]) -> std::io::Result<Command> {
    let path = paths
        .iter()
        .find(|p| crate::config::check_root_controlled(std::path::Path::new(p)).is_ok())
        .ok_or_else(|| std::io::Error::other(format!("no root-owned program in {paths:?}")))?;
    let mut c = Command::new(path);
    c.args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Ok(c)
}

/// `nft ARGS`, as a [`trusted_command`].
fn nft(args: &[&str]) -> std::io::Result<Command> {
    trusted_command(&NFT_PATHS, args)
}

/// Runs an nftables JSON batch.
pub fn nft_apply(batch: &serde_json::Value) -> std::io::Result<()> {
    let mut child = nft(&["-j", "-f", "-"])?
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(batch.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Whether table `inet NAME` exists.
fn table_exists(table: &str) -> std::io::Result<bool> {
    Ok(nft(&["list", "table", "inet", table])?
        .stderr(Stdio::null())
        .status()?
        .success())
}

/// Refuses (`Exists`) a link name that is taken: a link warren did not
/// create (a persistent TUN would even be adopted) is never used, nor
/// removed by a rollback.
pub fn link_free(ifname: &str) -> Result<(), NetError> {
    if nix::net::if_::if_nametoindex(ifname).is_ok() {
        return Err(err("create the link")(refusal(HelperError::Exists {
            what: format!("network interface {ifname}"),
        })));
    }
    Ok(())
}

/// Installs `batch`, whose first command adds warren's table `table`:
/// refused (never replaced) if a table of that name exists already, as
/// warren deletes only tables it recorded as its own.
pub fn install_table(table: &str, batch: &serde_json::Value) -> Result<(), NetError> {
    if table_exists(table).map_err(err("run nft"))? {
        return Err(err("install nftables table")(refusal(
            HelperError::Exists {
                what: format!("nftables table inet {table}"),
            },
        )));
    }
    nft_apply(batch).map_err(err(format!("install nftables table {table}")))
}

/// An nftables object (chain or rule) in `table` of family inet, with the
/// fields of `extra`.
pub fn in_table(table: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut v = json!({"family": "inet", "table": table});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    v
}

/// warren's table for a server tunnel: masquerade what comes from the
/// tunnel's subnets and leaves through `egress`; accept forwarding between
/// the tunnel and `egress` (replies by connection tracking).
fn nat_batch(table: &str, tun: &str, egress: &str, spec: &ServerTunnelSpec) -> serde_json::Value {
    let t = |extra| in_table(table, extra);
    let mut cmds = vec![
        json!({"add": {"table": {"family": "inet", "name": table}}}),
        json!({"add": {"chain": t(json!({"name": "postrouting", "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}))}}),
        json!({"add": {"chain": t(json!({"name": "forward", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}))}}),
        json!({"add": {"rule": t(json!({"chain": "forward", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": tun}},
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": egress}},
            {"accept": null}
        ]}))}}),
        json!({"add": {"rule": t(json!({"chain": "forward", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": tun}},
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
            {"accept": null}
        ]}))}}),
    ];
    for a in &spec.addresses {
        let (proto, net) = match a.addr() {
            IpAddr::V4(v4) => {
                let m = u32::MAX.checked_shl(32 - u32::from(a.len())).unwrap_or(0);
                ("ip", IpAddr::V4((u32::from(v4) & m).into()))
            }
            IpAddr::V6(v6) => {
                let m = u128::MAX.checked_shl(128 - u32::from(a.len())).unwrap_or(0);
                ("ip6", IpAddr::V6((u128::from(v6) & m).into()))
            }
        };
        cmds.push(
            json!({"add": {"rule": t(json!({"chain": "postrouting", "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "saddr"}},
                           "right": {"prefix": {"addr": net.to_string(), "len": a.len()}}}},
                {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": egress}},
                {"masquerade": null}
            ]}))}}),
        );
    }
    json!({"nftables": cmds})
}

/// Deletes warren's table (and only it). Missing is fine.
pub fn delete_table(table: &str) -> Result<(), NetError> {
    if !table_exists(table).map_err(err("run nft"))? {
        return Ok(());
    }
    nft_apply(&json!({"nftables": [{"delete": {"table": {"family": "inet", "name": table}}}]}))
        .map_err(err(format!("delete nftables table {table}")))
}

async fn default_egress(handle: &rtnetlink::Handle) -> std::io::Result<(u32, String)> {
    use rtnetlink::RouteMessageBuilder;
    use rtnetlink::packet_route::link::LinkAttribute;
    use rtnetlink::packet_route::route::RouteAttribute;
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
        .execute();
    let mut oif = None;
    while let Some(r) = routes.try_next().await.map_err(std::io::Error::other)? {
        if r.header.destination_prefix_length == 0 {
            oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if oif.is_some() {
                break;
            }
        }
    }
    let oif = oif.ok_or_else(|| {
        refusal(HelperError::HostState {
            reason: "the host has no IPv4 default route to masquerade the tunnel's traffic out of"
                .into(),
        })
    })?;
    let mut links = handle.link().get().match_index(oif).execute();
    let link = links
        .try_next()
        .await
        .map_err(std::io::Error::other)?
        .ok_or_else(|| std::io::Error::other("default route's interface vanished"))?;
    let name = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .ok_or_else(|| std::io::Error::other("interface without a name"))?;
    Ok((oif, name))
}

/// Serializes "check the host's routes, then add a server tunnel's
/// addresses", so two tunnels made at once cannot both pass the check with
/// overlapping subnets.
static ADDRESSES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Refuses (`HostState`) a server tunnel whose subnet overlaps a route the
/// helper's (the host's) namespace already has, in any table (issue 14,
/// finding 4): its subnet route would take over part of that traffic, or
/// make another service's address local. Default routes (`/0`) and routes
/// through `host_links` (warren's host tunnels, host-wide by design) do
/// not count; other server tunnels' subnets do.
async fn check_host_routes(
    handle: &rtnetlink::Handle,
    spec: &ServerTunnelSpec,
    host_links: &[String],
) -> std::io::Result<()> {
    use rtnetlink::RouteMessageBuilder;
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    use warren_ipc::instance::IpPrefix;
    let mut ignored = Vec::new();
    for l in host_links {
        if let Ok(i) = warren_netconf::link_index(handle, l).await {
            ignored.push(i);
        }
    }
    let mut routes = Vec::new();
    for v6 in [false, true] {
        if !spec.addresses.iter().any(|a| a.addr().is_ipv6() == v6) {
            continue;
        }
        let query = if v6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        };
        // Without strict checking the kernel dumps every table.
        let mut dump = handle.route().get(query).execute();
        while let Some(r) = dump.try_next().await.map_err(std::io::Error::other)? {
            let len = r.header.destination_prefix_length;
            let (mut dst, mut oif) = (None, None);
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(v)) => {
                        dst = Some(IpAddr::V4(*v))
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(v)) => {
                        dst = Some(IpAddr::V6(*v))
                    }
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if len == 0 || oif.is_some_and(|i| ignored.contains(&i)) {
                continue;
            }
            if let Some(p) = dst.and_then(|d| IpPrefix::new(d, len).ok()) {
                routes.push(p);
            }
        }
    }
    for a in &spec.addresses {
        let net = a.network();
        if let Some(r) = routes.iter().find(|r| r.overlaps(&net)) {
            return Err(refusal(HelperError::HostState {
                reason: format!(
                    "the tunnel's subnet {net} overlaps the host's route to {}; choose a subnet of the server-tunnel pools that the host does not route yet",
                    r.network()
                ),
            }));
        }
    }
    Ok(())
}

/// Creates the TUN and its addresses in the helper's namespace (refused
/// if its subnet overlaps a route the host has, see [`check_host_routes`]),
/// finds the egress interface and installs warren's nftables table.
/// Returns the TUN, the egress interface's name and the table's name.
/// Forwarding is the caller's (it is shared by all server tunnels).
pub fn create(
    spec: &ServerTunnelSpec,
    host_links: &[String],
) -> Result<(OwnedFd, String, String), NetError> {
    let ifname = spec.ifname();
    link_free(&ifname)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(err("start a runtime"))?;
    let (conn, handle, _) = {
        let _in_rt = rt.enter();
        rtnetlink::new_connection().map_err(err("open rtnetlink"))?
    };
    let task = rt.spawn(conn);
    let serial = ADDRESSES.lock().unwrap_or_else(|p| p.into_inner());
    let made = (|| {
        rt.block_on(check_host_routes(&handle, spec, host_links))
            .map_err(err("check the host's routes"))?;
        let tun = warren_netconf::open_tun(&ifname, spec.offload)
            .map_err(err(format!("create TUN {ifname}")))?;
        let egress = rt
            .block_on(async {
                crate::netns::link_up_with_addresses(&handle, &ifname, spec.mtu, &spec.addresses)
                    .await?;
                default_egress(&handle).await
            })
            .map_err(err(format!("configure {ifname}")))?
            .1;
        Ok((tun, egress))
    })();
    drop(serial);
    task.abort();
    let (tun, egress) = made?;
    let table = table_name(spec);
    install_table(&table, &nat_batch(&table, &ifname, &egress, spec))?;
    Ok((tun, egress, table))
}
