//! `warren server --mode wg`: a WireGuard exit. The helper makes the server
//! tunnel (TUN, forwarding, masquerade NAT in warren's own nftables table);
//! this process runs the engine between that TUN and its UDP socket, so any
//! standard WireGuard client (wireguard-go, wg-quick, `warren up`) can use
//! the machine as its exit.
//!
//! `warren server wg keygen` writes the server's file; `warren server wg
//! add-peer NAME` adds a client to it and prints that client's wg-quick
//! file.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;

use tracing::{error, info};
use warren_ipc::instance::{InstanceName, IpPrefix, ServerTunnelSpec};
use zeroize::Zeroizing;

use crate::autostart::HelperTarget;
use crate::exit;
use crate::helper_client::report_client_error;
use crate::wg::conf::{self, Key, PublicKey32, WgConfig};
use crate::wg::engine::{Engine, EngineConfig, PeerSpec};

/// `warren server wg ...`
#[derive(Debug, clap::Subcommand)]
pub enum WgTool {
    /// Write a new server file (private key, tunnel address, port).
    Keygen {
        /// The file to write (mode 0600; refuses to overwrite).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The server's tunnel address and subnet; clients get the next
        /// free addresses in it. The subnet must lie in the helper's
        /// server-tunnel pools (default 100.64.0.0/10 and fd00::/8).
        #[arg(long, default_value = "100.64.100.1/24")]
        address: IpPrefix,
        /// UDP port to listen on.
        #[arg(long, default_value_t = 51820)]
        listen_port: u16,
    },
    /// Add client NAME to the server file and print its wg-quick file.
    AddPeer {
        /// A label for the client (kept as a comment in the server file).
        name: String,
        /// The server file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// How clients reach this server: HOST:PORT.
        #[arg(long)]
        endpoint: String,
        /// DNS server for the client (e.g. one reachable through the exit).
        #[arg(long)]
        dns: Option<IpAddr>,
    },
}

fn random_key() -> Result<Key, String> {
    let mut b = Zeroizing::new([0u8; 32]);
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut *b)
        .map_err(|_| "no system randomness".to_string())?;
    // Clamped as X25519 wants (the engine would clamp anyway).
    b[0] &= 248;
    b[31] &= 127;
    b[31] |= 64;
    Ok(Key::from_bytes(*b))
}

fn write_new(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// The first address of `net` used by neither the server nor a peer.
fn next_free(net: &IpPrefix, used: &[IpAddr]) -> Option<IpAddr> {
    match net.addr() {
        IpAddr::V4(a) => {
            let len = u32::from(net.len());
            let base = u32::from(a) & u32::MAX.checked_shl(32 - len).unwrap_or(0);
            let size = 1u64 << (32 - len);
            (1..size.saturating_sub(1))
                .map(|i| IpAddr::V4(Ipv4Addr::from(base + i as u32)))
                .find(|c| !used.contains(c))
        }
        IpAddr::V6(a) => {
            let len = u32::from(net.len());
            let base = u128::from(a) & u128::MAX.checked_shl(128 - len).unwrap_or(0);
            (1..1024u128)
                .map(|i| IpAddr::V6(Ipv6Addr::from(base + i)))
                .find(|c| !used.contains(c))
        }
    }
}

/// Reads a server file, which (unlike a client's) may have no peer yet.
fn load_server(path: &Path) -> Result<WgConfig, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    // The parser wants a peer: parse with a placeholder, then drop it.
    let placeholder = PublicKey32([9; 32]);
    let probe = Zeroizing::new(format!(
        "{}\n[Peer]\nPublicKey = {placeholder}\nAllowedIPs = 0.0.0.0/32\n",
        *text
    ));
    let mut wg = conf::parse(path, &probe).map_err(|e| e.to_string())?;
    wg.peers.retain(|p| p.public_key != placeholder);
    Ok(wg)
}

fn peer_specs(wg: &WgConfig) -> Vec<PeerSpec> {
    wg.peers
        .iter()
        .map(|p| PeerSpec {
            public_key: p.public_key.0,
            preshared_key: p
                .preshared_key
                .as_ref()
                .map(|k| Zeroizing::new(*k.as_bytes())),
            endpoint: None,
            endpoint_name: None,
            allowed_ips: p.allowed_ips.clone(),
            keepalive: p.persistent_keepalive,
        })
        .collect()
}

/// Runs `warren server wg ...`.
pub fn run_tool(tool: WgTool) -> ExitCode {
    match tool_inner(tool) {
        Ok(()) => exit::code(exit::OK),
        Err((code, msg)) => {
            eprintln!("warren server wg: {msg}");
            exit::code(code)
        }
    }
}

fn tool_inner(tool: WgTool) -> Result<(), (u8, String)> {
    match tool {
        WgTool::Keygen {
            out,
            address,
            listen_port,
        } => {
            let key = random_key().map_err(|e| (exit::FAILURE, e))?;
            let public = PublicKey32::from_private(&key);
            let text = Zeroizing::new(format!(
                "# warren WireGuard exit; add clients with: warren server wg add-peer NAME --config {} --endpoint HOST:{listen_port}\n\
                 [Interface]\nPrivateKey = {}\nAddress = {address}\nListenPort = {listen_port}\n",
                out.display(),
                key.to_base64()
            ));
            write_new(&out, &text)
                .map_err(|e| (exit::FAILURE, format!("{}: {e}", out.display())))?;
            println!("wrote {} (public key {public})", out.display());
            Ok(())
        }
        WgTool::AddPeer {
            name,
            config,
            endpoint,
            dns,
        } => {
            let ep: conf::Endpoint = endpoint
                .parse()
                .map_err(|e| (exit::USAGE, format!("--endpoint {endpoint}: {e}")))?;
            if name.is_empty() || name.len() > 64 || name.contains(['\n', '\r']) {
                return Err((exit::USAGE, "NAME: 1 to 64 characters on one line".into()));
            }
            let server = load_server(&config).map_err(|e| (exit::CONFIG, e))?;
            let net = *server
                .interface
                .addresses
                .iter()
                .find(|a| a.addr().is_ipv4())
                .or(server.interface.addresses.first())
                .ok_or((exit::CONFIG, "the server file has no Address".to_string()))?;
            let mut used: Vec<IpAddr> = server
                .interface
                .addresses
                .iter()
                .map(|a| a.addr())
                .collect();
            used.extend(
                server
                    .peers
                    .iter()
                    .flat_map(|p| p.allowed_ips.iter().map(|a| a.addr())),
            );
            let addr = next_free(&net, &used)
                .ok_or((exit::FAILURE, format!("no free address left in {net}")))?;
            let host_len = if addr.is_ipv4() { 32 } else { 128 };
            let client_key = random_key().map_err(|e| (exit::FAILURE, e))?;
            let psk = random_key().map_err(|e| (exit::FAILURE, e))?;
            let block = format!(
                "\n# {name}\n[Peer]\nPublicKey = {}\nPresharedKey = {}\nAllowedIPs = {addr}/{host_len}\n",
                PublicKey32::from_private(&client_key),
                psk.to_base64()
            );
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&config)
                .map_err(|e| (exit::FAILURE, format!("{}: {e}", config.display())))?;
            f.write_all(block.as_bytes())
                .map_err(|e| (exit::FAILURE, format!("{}: {e}", config.display())))?;
            let mut client = format!(
                "# {name}: client of the warren exit {ep}\n[Interface]\nPrivateKey = {}\nAddress = {addr}/{host_len}\n",
                client_key.to_base64()
            );
            if let Some(d) = dns {
                client.push_str(&format!("DNS = {d}\n"));
            }
            client.push_str(&format!(
                "\n[Peer]\nPublicKey = {}\nPresharedKey = {}\nEndpoint = {ep}\nAllowedIPs = 0.0.0.0/0, ::/0\nPersistentKeepalive = 25\n",
                server.public_key(),
                psk.to_base64()
            ));
            let client = Zeroizing::new(client);
            print!("{}", *client);
            Ok(())
        }
    }
}

/// Runs `warren server --mode wg --wg FILE`.
pub fn run(file: &Path, name: &str, target: HelperTarget) -> ExitCode {
    let wg = match load_server(file) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("warren server: {e}");
            return exit::code(exit::CONFIG);
        }
    };
    if let Ok(m) = std::fs::metadata(file)
        && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o077 != 0
    {
        eprintln!(
            "warren server: warning: {} is readable by group or others; chmod 600 it",
            file.display()
        );
    }
    let name = match InstanceName::new(name) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("warren server: --name {name:?}: {}", e.reason);
            return exit::code(exit::USAGE);
        }
    };
    let mtu = wg.interface.mtu.unwrap_or(1420);
    let spec = match ServerTunnelSpec::new(name.clone(), mtu, wg.interface.addresses.clone()) {
        Ok(s) => s.with_offload(crate::wg::offload::wanted()),
        Err(e) => {
            eprintln!("warren server: {}: {e}", file.display());
            return exit::code(exit::CONFIG);
        }
    };
    let port = wg.interface.listen_port.unwrap_or(51820);
    let udp = match UdpSocket::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
        .or_else(|_| UdpSocket::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)))
    {
        Ok(u) => u,
        Err(e) => {
            eprintln!("warren server: cannot listen on UDP port {port}: {e}");
            return exit::code(exit::FAILURE);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren server: cannot start the runtime: {e}");
            return exit::code(exit::FAILURE);
        }
    };
    rt.block_on(serve(file, wg, spec, udp, target))
}

async fn serve(
    file: &Path,
    wg: WgConfig,
    spec: ServerTunnelSpec,
    udp: UdpSocket,
    target: HelperTarget,
) -> ExitCode {
    let mut helper =
        match crate::autostart::connect_or_autostart(&target.path, &target.policy).await {
            Ok(h) => h,
            Err(e) => return report_client_error(&e),
        };
    let (info, tun) = match helper.create_server_tunnel(spec.clone()).await {
        Ok(x) => x,
        Err(e) => return report_client_error(&e),
    };
    let peers = peer_specs(&wg);
    let mut ecfg = EngineConfig {
        private_key: Zeroizing::new(*wg.interface.private_key.as_bytes()),
        peers,
        mtu: spec.mtu,
        gso: true,
        offload: spec.offload,
        socket_buffer: 4 << 20,
        host_dns: Vec::new(),
    };
    ecfg.tuning_from_env();
    let port = udp.local_addr().map(|a| a.port()).unwrap_or(0);
    let (engine, stop, stats) = match Engine::new(ecfg, tun, udp) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("warren server: cannot start the WireGuard engine: {e}");
            return exit::code(exit::FAILURE);
        }
    };
    let thread = std::thread::Builder::new()
        .name("wg-engine".into())
        .spawn(move || {
            if let Err(e) = engine.run() {
                error!(error = %e, "WireGuard engine failed");
                std::process::exit(1);
            }
        });
    let Ok(thread) = thread else {
        eprintln!("warren server: cannot start the engine thread");
        return exit::code(exit::FAILURE);
    };
    println!(
        "warren WireGuard exit {} on UDP port {port}: public key {}, {} peer(s), NAT out of {}",
        spec.name,
        wg.public_key(),
        wg.peers.len(),
        info.egress
    );
    let _ = std::io::stdout().flush();
    info!(tunnel = %info.ifname, port, "WireGuard exit serving");
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut t), Ok(mut i)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return exit::code(exit::FAILURE);
    };
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return exit::code(exit::FAILURE);
    };
    // Peers added with `add-peer` are picked up on SIGHUP or when the file
    // changes (checked every 2 s), like `wg syncconf`; live sessions stay.
    let mtime = || std::fs::metadata(file).and_then(|m| m.modified()).ok();
    let mut seen = mtime();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    let reload = |why: &str| match load_server(file) {
        Ok(new) if new.interface.private_key == wg.interface.private_key => {
            info!(peers = new.peers.len(), "{why}: peers reloaded");
            stop.set_peers(peer_specs(&new));
        }
        Ok(_) => error!("{why}: the private key changed; restart the server to use it"),
        Err(e) => error!(error = %e, "{why}: reload failed; keeping the current peers"),
    };
    loop {
        tokio::select! {
            _ = t.recv() => break,
            _ = i.recv() => break,
            _ = hup.recv() => reload("SIGHUP"),
            _ = tick.tick() => {
                let m = mtime();
                if m != seen {
                    seen = m;
                    reload("file change");
                }
            }
            ev = helper.next_event() => match ev {
                Ok(warren_ipc::Event::InstanceGone { .. }) => {
                    info!("the helper removed the server tunnel");
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    error!(error = %e, "lost the helper connection; the server tunnel is gone");
                    break;
                }
            }
        }
    }
    let live = stats
        .peers()
        .iter()
        .filter(|p| p.last_handshake_ms.load(Relaxed) > 0)
        .count();
    info!(
        peers_seen = live,
        offload = spec.offload,
        tun_gso_writes = stats.tun_gso_writes.load(Relaxed),
        tun_coalesced = stats.tun_coalesced.load(Relaxed),
        tun_gso_reads = stats.tun_gso_reads.load(Relaxed),
        tun_segments = stats.tun_segments.load(Relaxed),
        "stopping"
    );
    stop.stop();
    let _ = thread.join();
    // Dropping the connection ends the lease: the helper removes the TUN,
    // the NAT table and restores forwarding.
    drop(helper);
    exit::code(exit::OK)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn next_free_skips_used_and_edges() {
        let net: IpPrefix = "198.19.100.1/24".parse().unwrap();
        let used: Vec<IpAddr> = vec![
            "198.19.100.1".parse().unwrap(),
            "198.19.100.2".parse().unwrap(),
        ];
        assert_eq!(
            next_free(&net, &used),
            Some("198.19.100.3".parse().unwrap())
        );
        let tiny: IpPrefix = "198.19.100.1/30".parse().unwrap();
        let full: Vec<IpAddr> = vec![
            "198.19.100.1".parse().unwrap(),
            "198.19.100.2".parse().unwrap(),
        ];
        assert_eq!(next_free(&tiny, &full), None);
        let v6: IpPrefix = "fd00:100::1/64".parse().unwrap();
        assert_eq!(
            next_free(&v6, &["fd00:100::1".parse().unwrap()]),
            Some("fd00:100::2".parse().unwrap())
        );
    }

    #[test]
    fn keys_are_clamped_and_distinct() {
        let a = random_key().unwrap();
        let b = random_key().unwrap();
        assert_ne!(a.as_bytes(), b.as_bytes());
        assert_eq!(a.as_bytes()[0] & 7, 0);
        assert_eq!(a.as_bytes()[31] & 0xC0, 0x40);
    }
}
