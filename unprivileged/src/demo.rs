//! `warren demo`: the whole path on one machine, with nothing of the
//! user's own. It builds, in throwaway pieces:
//!
//! - an "exit" network namespace, joined to this host by a veth pair
//!   (198.18.254.0/30), with a private warren helper inside it;
//! - a warren WireGuard exit (`warren server --mode wg`) in that namespace,
//!   with a small web server behind it on the exit's tunnel address;
//! - a namespace instance (`warren up demo`) whose exit is that server,
//!   with SOCKS5 and HTTP proxies on this host;
//!
//! then prints what it made and a curl command that goes through it, runs
//! it, and tears everything down on Ctrl-C (`--once`: right after the
//! check; `warren demo --down`: from another terminal). Needs root (it
//! creates namespaces and a veth pair); the machine's routes and DNS are
//! not touched.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::exit;

const NETNS: &str = "warren-demo-exit";
const HOST_LINK: &str = "wrdemo0";
const EXIT_LINK: &str = "wrdemo1";
const HOST_ADDR: &str = "198.18.254.1/30";
const EXIT_ADDR: &str = "198.18.254.2";
const TUNNEL_NET: &str = "198.19.254.1/24";
const WEB: &str = "198.19.254.1";
const WG_PORT: u16 = 51820;

/// Arguments of `warren demo`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Run as root. Everything it makes is removed on Ctrl-C, with --once right
after the check, or by `warren demo --down` from another terminal.")]
pub struct DemoArgs {
    /// Tear down a demo left running.
    #[arg(long)]
    pub down: bool,
    /// Check the path once, tear down, and exit with the check's result.
    #[arg(long)]
    pub once: bool,
    /// Name of the demo instance.
    #[arg(long, default_value = "demo")]
    pub name: String,
}

/// What a running demo made, for `--down` and Ctrl-C.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    demo_pid: u32,
    dir: PathBuf,
    name: String,
    helper_pid: Option<u32>,
    server_pid: Option<u32>,
    web_pid: Option<u32>,
}

fn state_path() -> PathBuf {
    PathBuf::from("/run/warren-demo.json")
}

fn sh(what: &str, cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, String> {
    sh(
        &format!("ip {}", args.join(" ")),
        Command::new("ip").args(args),
    )
}

fn in_exit(program: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", NETNS]).arg(program);
    c
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn kill(pid: Option<u32>) {
    kill_within(pid, Duration::from_secs(5));
}

/// SIGTERM, then SIGKILL if `pid` has not ended within `patience`.
fn kill_within(pid: Option<u32>, patience: Duration) {
    let Some(pid) = pid else { return };
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill has no memory-safety preconditions; the pid is one of
    // the demo's own children, recorded when it was started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let gone = wait_until(patience, || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    if !gone {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Removes everything a demo made (best effort, each step independent).
fn teardown(st: &State, warren: &Path) {
    let sock = st.dir.join("helper.sock");
    let _ = Command::new(warren)
        .args(["--no-autostart", "down", &st.name])
        .env("WARREN_HELPER_SOCKET", &sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    kill(st.web_pid);
    kill(st.server_pid);
    // The helper removes what it still holds when it stops.
    kill(st.helper_pid);
    let _ = ip(&["netns", "del", NETNS]);
    let _ = ip(&["link", "del", HOST_LINK]);
    if st.dir.to_string_lossy().starts_with("/run/warren-demo.") {
        let _ = std::fs::remove_dir_all(&st.dir);
    }
    let _ = std::fs::remove_file(state_path());
}

/// A tiny web server for the exit (`warren demo-web`, hidden).
pub fn run_web(listen: SocketAddr) -> ExitCode {
    let l = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("warren demo-web: {listen}: {e}");
            return exit::code(exit::FAILURE);
        }
    };
    let body = format!("Hello from the warren demo exit ({listen}): you came through WireGuard.\n");
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    exit::code(exit::OK)
}

/// Runs `warren demo`.
pub fn run(args: DemoArgs) -> ExitCode {
    let warren = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot find the warren binary: {e}")),
    };
    if args.down {
        return match std::fs::read(state_path())
            .ok()
            .and_then(|b| serde_json::from_slice::<State>(&b).ok())
        {
            Some(st) => {
                // The running demo tears down itself on SIGTERM; if it is
                // gone, do it here.
                let alive = Path::new(&format!("/proc/{}", st.demo_pid)).exists();
                if alive && st.demo_pid != std::process::id() {
                    kill_within(Some(st.demo_pid), Duration::from_secs(30));
                }
                if state_path().exists() {
                    teardown(&st, &warren);
                }
                println!("warren demo: torn down");
                exit::code(exit::OK)
            }
            None => {
                // Nothing recorded: still remove what a crashed demo may have left.
                let _ = ip(&["netns", "del", NETNS]);
                let _ = ip(&["link", "del", HOST_LINK]);
                println!("warren demo: no demo running");
                exit::code(exit::OK)
            }
        };
    }
    if !nix::unistd::geteuid().is_root() {
        return fail(
            "needs root: it creates a network namespace and a veth pair (try: sudo warren demo)"
                .into(),
        );
    }
    if state_path().exists() || Path::new("/run/netns").join(NETNS).exists() {
        return fail(
            "a demo is already running (or was left behind): `warren demo --down` removes it"
                .into(),
        );
    }
    let mut st = State {
        demo_pid: std::process::id(),
        name: args.name.clone(),
        ..State::default()
    };
    let res = build(&mut st, &warren);
    let save = |st: &State| {
        let _ = std::fs::write(state_path(), serde_json::to_vec(st).unwrap_or_default());
    };
    save(&st);
    let (socks, http) = match res {
        Ok(x) => x,
        Err(e) => {
            teardown(&st, &warren);
            return fail(e);
        }
    };
    let url = format!("http://{WEB}/");
    println!("warren demo is up:");
    println!(
        "  exit namespace   {NETNS}: warren server --mode wg on {EXIT_ADDR}:{WG_PORT} (tunnel {TUNNEL_NET}), web server on {WEB}:80"
    );
    println!(
        "  instance         {} (namespace warren-{}): SOCKS5 {socks}, HTTP {http}",
        st.name, st.name
    );
    println!("  files            {}", st.dir.display());
    println!();
    println!("  curl --socks5-hostname {socks} {url}");
    println!("  curl -x http://{http} {url}");
    println!(
        "  WARREN_HELPER_SOCKET={} warren exec {} -- curl {url}",
        st.dir.join("helper.sock").display(),
        st.name
    );
    println!();
    let ok = check(socks, &url);
    match &ok {
        Ok(body) => println!("$ curl --socks5-hostname {socks} {url}\n{body}"),
        Err(e) => eprintln!("warren demo: the check failed: {e}"),
    }
    if args.once {
        teardown(&st, &warren);
        println!("warren demo: torn down");
        return exit::code(if ok.is_ok() { exit::OK } else { exit::FAILURE });
    }
    println!("Ctrl-C (or `warren demo --down`) tears it all down.");
    let _ = std::io::stdout().flush();
    wait_for_signal();
    teardown(&st, &warren);
    println!("\nwarren demo: torn down");
    exit::code(exit::OK)
}

fn fail(msg: String) -> ExitCode {
    eprintln!("warren demo: {msg}");
    exit::code(exit::FAILURE)
}

fn wait_for_signal() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    if set.thread_block().is_ok() {
        let _ = set.wait();
    }
}

/// Builds the pieces; returns the instance's SOCKS5 and HTTP addresses.
fn build(st: &mut State, warren: &Path) -> Result<(SocketAddr, SocketAddr), String> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = PathBuf::from(format!("/run/warren-demo.{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    st.dir = dir.clone();
    // The exit's namespace and its link to this host.
    ip(&["netns", "add", NETNS])?;
    ip(&["-n", NETNS, "link", "set", "lo", "up"])?;
    ip(&[
        "link", "add", HOST_LINK, "type", "veth", "peer", "name", EXIT_LINK, "netns", NETNS,
    ])?;
    ip(&["addr", "add", HOST_ADDR, "dev", HOST_LINK])?;
    ip(&["link", "set", HOST_LINK, "up"])?;
    ip(&[
        "-n",
        NETNS,
        "addr",
        "add",
        &format!("{EXIT_ADDR}/30"),
        "dev",
        EXIT_LINK,
    ])?;
    ip(&["-n", NETNS, "link", "set", EXIT_LINK, "up"])?;
    ip(&[
        "-n",
        NETNS,
        "route",
        "add",
        "default",
        "via",
        "198.18.254.1",
    ])?;
    // A private helper inside the exit namespace.
    let helper_bin = warren.with_file_name("warren-helper");
    let sock = dir.join("helper.sock");
    let log = |n: &str| std::fs::File::create(dir.join(n)).map_err(|e| e.to_string());
    // Its server tunnel's subnet must lie in the helper's pools.
    let config = dir.join("helper.toml");
    let net: warren_ipc::instance::IpPrefix = TUNNEL_NET.parse().map_err(|e| format!("{e}"))?;
    std::fs::write(
        &config,
        format!("server_tunnel_pools = [\"{}\"]\n", net.network()),
    )
    .and_then(|()| {
        std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644))
    })
    .map_err(|e| format!("{}: {e}", config.display()))?;
    let helper = in_exit(&helper_bin)
        .args(["serve", "--socket"])
        .arg(&sock)
        .args(["--group", "0", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log("helper.log")?)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", helper_bin.display()))?;
    st.helper_pid = Some(helper.id());
    if !wait_until(Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    }) {
        return Err(format!(
            "the helper did not start; see {}",
            dir.join("helper.log").display()
        ));
    }
    // The exit's WireGuard file and one client.
    let exit_conf = dir.join("exit.conf");
    let run = |what: &str, c: &mut Command| sh(what, c.env("WARREN_HELPER_SOCKET", &sock));
    run(
        "warren server wg keygen",
        Command::new(warren)
            .args(["server", "wg", "keygen", "--out"])
            .arg(&exit_conf)
            .args([
                "--address",
                TUNNEL_NET,
                "--listen-port",
                &WG_PORT.to_string(),
            ]),
    )?;
    let client = run(
        "warren server wg add-peer",
        Command::new(warren)
            .args(["server", "wg", "add-peer", &st.name, "--config"])
            .arg(&exit_conf)
            .args([
                "--endpoint",
                &format!("{EXIT_ADDR}:{WG_PORT}"),
                "--dns",
                WEB,
            ]),
    )?;
    let client_conf = dir.join("client.conf");
    write_private(&client_conf, &client)?;
    let server = in_exit(warren)
        .args(["--no-autostart", "server", "--mode", "wg", "--wg"])
        .arg(&exit_conf)
        .args(["--name", "exit"])
        .env("WARREN_HELPER_SOCKET", &sock)
        .stdin(Stdio::null())
        .stdout(log("server.out")?)
        .stderr(log("server.log")?)
        .spawn()
        .map_err(|e| format!("cannot start the WireGuard exit: {e}"))?;
    st.server_pid = Some(server.id());
    let listening = wait_until(Duration::from_secs(10), || {
        sh(
            "ss",
            Command::new("ip").args([
                "netns",
                "exec",
                NETNS,
                "ss",
                "-Hlun",
                &format!("sport = :{WG_PORT}"),
            ]),
        )
        .is_ok_and(|o| !o.trim().is_empty())
            && ip(&["-n", NETNS, "-br", "addr", "show", "dev", "wrsexit"])
                .is_ok_and(|o| o.contains(WEB))
    });
    if !listening {
        return Err(format!(
            "the WireGuard exit did not start; see {}",
            dir.join("server.log").display()
        ));
    }
    let web = in_exit(warren)
        .args(["demo-web", "--listen", &format!("{WEB}:80")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log("web.log")?)
        .spawn()
        .map_err(|e| format!("cannot start the web server: {e}"))?;
    st.web_pid = Some(web.id());
    // The instance, on this host, through the exit.
    let out = run(
        "warren up",
        Command::new(warren)
            .args(["--no-autostart", "up", &st.name, "--wg"])
            .arg(&client_conf)
            .arg("--json")
            .env("XDG_RUNTIME_DIR", &dir),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).map_err(|e| format!("warren up answered {out:?}: {e}"))?;
    let addr = |k: &str| {
        v[k].as_str()
            .and_then(|s| s.parse::<SocketAddr>().ok())
            .ok_or(format!("warren up did not report its {k} port"))
    };
    Ok((addr("socks")?, addr("http")?))
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// One HTTP GET through the SOCKS5 proxy (what the printed curl does),
/// done here so the demo needs no curl.
fn check(socks: SocketAddr, url: &str) -> Result<String, String> {
    let host = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut s =
        TcpStream::connect_timeout(&socks, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(&[5, 1, 0]).map_err(|e| e.to_string())?;
    let mut b = [0u8; 2];
    s.read_exact(&mut b).map_err(|e| e.to_string())?;
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&80u16.to_be_bytes());
    s.write_all(&req).map_err(|e| e.to_string())?;
    let mut r = [0u8; 10];
    s.read_exact(&mut r).map_err(|e| e.to_string())?;
    if r[1] != 0 {
        return Err(format!("SOCKS5 reply {}", r[1]));
    }
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.take(1 << 16)
        .read_to_string(&mut resp)
        .map_err(|e| e.to_string())?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    if resp.starts_with("HTTP/1.1 200") {
        Ok(body.to_string())
    } else {
        Err(format!(
            "unexpected answer: {}",
            resp.lines().next().unwrap_or("")
        ))
    }
}
