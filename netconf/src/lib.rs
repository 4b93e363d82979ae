//! Network configuration shared by the helper and the rootless worker:
//! TUN devices (`TUNSETIFF`) and links, addresses and routes over
//! rtnetlink, in the calling thread's network namespace.
//!
//! A TUN device or netlink socket belongs to the namespace of the thread
//! that made it; callers run these on a thread that is already inside the
//! right namespace (CRATES.md).

use std::ffi::CString;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use futures::TryStreamExt;
use warren_ipc::instance::{InstanceSpec, IpPrefix};

/// The TUN device's name inside every instance (each namespace has its own).
pub const TUN_NAME: &str = "wr0";
/// Transmit queue length of warren's TUN devices (packets).
pub const TX_QUEUE_LEN: u32 = 4096;

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from(e)
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
    open_tun(name, false)
}

/// [`open_tun_named`], with `IFF_VNET_HDR` when `vnet_hdr` (every packet
/// read or written carries a 10-byte `virtio_net_hdr`; this is what lets
/// the reader turn on TSO and the writer hand over merged TCP segments).
pub fn open_tun(name: &str, vnet_hdr: bool) -> io::Result<OwnedFd> {
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
        flags: (libc::IFF_TUN | libc::IFF_NO_PI | if vnet_hdr { libc::IFF_VNET_HDR } else { 0 })
            as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads an ifreq; `req` is a properly laid out,
    // initialized ifreq that outlives the call.
    unsafe { tunsetiff(fd.as_raw_fd(), (&raw const req) as u64) }.map_err(nix_io)?;
    Ok(fd)
}

/// A resolv.conf naming only `dns` (and the `search` domains, which the
/// specs validated to be plain names), under a `comment` line. With no
/// servers: no resolver at all (fails at once) rather than a leak.
pub fn resolv_conf(comment: &str, dns: &[std::net::IpAddr], search: &[String]) -> String {
    let mut text = format!("{comment}\n");
    for s in dns {
        text.push_str(&format!("nameserver {s}\n"));
    }
    if dns.is_empty() {
        text.push_str("options attempts:1 timeout:1\n");
    } else if !search.is_empty() {
        text.push_str(&format!("search {}\n", search.join(" ")));
    }
    text
}

/// Directories of host daemons that answer name lookups over a Unix
/// socket: systemd-resolved (`io.systemd.Resolve`, used by nss-resolve),
/// nscd (which glibc asks before any NSS module) and avahi (nss-mdns).
/// Programs of an instance see each that exists as an empty read-only
/// tmpfs, so they cannot resolve names outside the tunnel through them
/// (issue 14, finding 7). `/var/run` is `/run` on most systems; mounting
/// twice there is harmless.
pub const NAME_SERVICE_DIRS: [&std::ffi::CStr; 5] = [
    c"/run/systemd/resolve",
    c"/run/nscd",
    c"/var/run/nscd",
    c"/run/avahi-daemon",
    c"/var/run/avahi-daemon",
];

/// Files in one of [`NAME_SERVICE_DIRS`] that /etc/resolv.conf may link to
/// (systemd-resolved's): recreated in the empty directory with the
/// instance's resolv.conf bound over them, so such a link still works.
pub const RESOLVED_RESOLV_FILES: [&std::ffi::CStr; 2] = [
    c"/run/systemd/resolve/stub-resolv.conf",
    c"/run/systemd/resolve/resolv.conf",
];

/// Name-service databases' switch for an instance: the host's
/// nsswitch.conf (`host`) with every `hosts:` line replaced by
/// `hosts: files dns` (appended if it has none), under a `comment` line.
/// Names then resolve from /etc/hosts and the instance's resolv.conf only,
/// never through a module that asks a host daemon over a Unix socket
/// (nss-resolve, nss-mdns...); the other databases (users, groups...) stay
/// as the host has them.
pub fn nsswitch_conf(comment: &str, host: &str) -> String {
    const HOSTS: &str = "hosts:          files dns\n";
    let mut text = format!("{comment}\n");
    let mut replaced = false;
    for line in host.lines() {
        let db = line.trim_start().split(':').next().unwrap_or("").trim();
        if line.contains(':') && db == "hosts" {
            if !replaced {
                text.push_str(HOSTS);
            }
            replaced = true;
        } else {
            text.push_str(line);
            text.push('\n');
        }
    }
    if !replaced {
        text.push_str(HOSTS);
    }
    text
}

/// The index of link `name`.
pub async fn link_index(handle: &rtnetlink::Handle, name: &str) -> io::Result<u32> {
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
                // The default 500-packet queue overflows when the reader
                // (the WireGuard worker) falls behind for a moment.
                .txqueuelen(TX_QUEUE_LEN)
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
pub async fn configure(spec: &InstanceSpec) -> io::Result<()> {
    use rtnetlink::LinkUnspec;
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
        add_routes(&handle, &spec.routes, tun, None).await?;
        Ok(())
    }
    .await;
    task.abort();
    res
}

/// Routes `routes` through interface `index` (replacing any existing one),
/// in routing table `table` or the main table.
pub async fn add_routes(
    handle: &rtnetlink::Handle,
    routes: &[IpPrefix],
    index: u32,
    table: Option<u32>,
) -> io::Result<()> {
    for r in routes {
        let mut msg = rtnetlink::RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(r.addr(), r.len())
            .map_err(|e| io::Error::other(format!("route {r}: {e}")))?
            .output_interface(index);
        if let Some(t) = table {
            msg = msg.table_id(t);
        }
        handle
            .route()
            .add(msg.build())
            .replace()
            .execute()
            .await
            .map_err(|e| io::Error::other(format!("route {r}: {e}")))?;
    }
    Ok(())
}

pub fn set_ipv6_disabled() -> io::Result<()> {
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

/// In the calling thread's namespace: creates TUN [`TUN_NAME`], turns IPv6
/// off when `spec` has no IPv6 address (nothing can leak over it), and
/// configures loopback, the TUN's MTU, addresses and routes. Returns the
/// TUN descriptor.
pub fn create_tun_here(spec: &InstanceSpec) -> io::Result<OwnedFd> {
    let tun = open_tun(TUN_NAME, spec.offload)?;
    if !spec.has_ipv6() {
        set_ipv6_disabled()?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(configure(spec))?;
    Ok(tun)
}

#[cfg(test)]
mod tests {
    use super::nsswitch_conf;

    /// Finding 7 (issue 14): only `hosts:` changes, to `files dns`.
    #[test]
    fn finding_7_nsswitch_keeps_other_databases_and_resolves_hosts_by_files_and_dns() {
        let host = "# comment\npasswd: files systemd sss\n  hosts: files mdns4_minimal [NOTFOUND=return] resolve [!UNAVAIL=return] dns myhostname\nhosts: nis\nnetworks: files\n";
        let text = nsswitch_conf("# instance", host);
        assert_eq!(
            text,
            "# instance\n# comment\npasswd: files systemd sss\nhosts:          files dns\nnetworks: files\n"
        );
        assert_eq!(
            nsswitch_conf("# i", "passwd: files\n"),
            "# i\npasswd: files\nhosts:          files dns\n"
        );
        assert_eq!(nsswitch_conf("# i", ""), "# i\nhosts:          files dns\n");
    }
}
