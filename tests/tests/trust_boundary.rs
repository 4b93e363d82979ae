//! Regression tests for issue 14 ("Trust boundary"), one per finding, named
//! after it. Root e2e tests (CI runs them as root; they fail, never skip,
//! there otherwise). Everything that touches routing or nftables runs in a
//! throwaway namespace that plays the host, never the machine's own.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use warren::helper_client::HelperClient;
use warren_ipc::instance::{HostTunnelSpec, InstanceName, ServerTunnelSpec};
use warren_tests::{Proc, TestDir, TestNs, require_root, run_limited};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn pid() -> u32 {
    std::process::id() % 100_000
}

/// A namespace playing the host (optionally with a veth to a neighbour and
/// a default route through it), and a helper serving inside it with a
/// private /etc/resolv.conf.
struct Lab {
    host: TestNs,
    _other: Option<TestNs>,
    sock: std::path::PathBuf,
    helper: Proc,
    _dir: TestDir,
}

impl Lab {
    fn new(tag: &str, default_route: bool, env: &[(&str, &str)]) -> Lab {
        let host = TestNs::new(&format!("wrtb{tag}{}h", pid()));
        let other = default_route.then(|| {
            let other = TestNs::new(&format!("wrtb{tag}{}o", pid()));
            host.veth(
                &format!("tb{tag}{}h", pid()),
                "198.18.54.1/24",
                &other,
                &format!("tb{tag}{}o", pid()),
                "198.18.54.2/24",
            );
            host.ip(&["route", "add", "default", "via", "198.18.54.2"]);
            other
        });
        let dir = TestDir::new(&format!("trust-{tag}"));
        let resolv = dir.join("resolv.conf");
        std::fs::write(&resolv, "nameserver 198.18.54.53\n").expect("resolv");
        let sock = dir.join("helper.sock");
        let helper =
            warren_tests::start_lab_helper_env(&host, &resolv, &sock, &dir.join("helper.log"), env);
        Lab {
            host,
            _other: other,
            sock,
            helper,
            _dir: dir,
        }
    }

    /// The lab host's nftables ruleset.
    fn ruleset(&self) -> String {
        let out = run_limited(
            self.host.exec("nft").args(["list", "ruleset"]),
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- helper log ----\n{}", self.helper.log());
        }
        self.helper.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = self.helper.wait_timeout(Duration::from_secs(10));
    }
}

fn name(s: &str) -> InstanceName {
    InstanceName::new(s).expect("name")
}

fn server_spec(n: &str) -> ServerTunnelSpec {
    ServerTunnelSpec::new(name(n), 1420, vec!["198.19.61.1/24".parse().expect("p")]).expect("spec")
}

fn host_spec(n: &str) -> HostTunnelSpec {
    HostTunnelSpec::new(
        name(n),
        1420,
        vec!["198.19.72.2/32".parse().expect("p")],
        vec!["0.0.0.0/0".parse().expect("p")],
        vec![],
        true,
    )
    .expect("spec")
}

/// Finding 1: a helper started with a hostile `PATH` (a marker-writing
/// `nft` first) creates and destroys a server tunnel and a host tunnel with
/// kill switch, and never runs that `nft`.
#[test]
fn finding_1_helper_never_runs_nft_found_through_path() {
    if !require_root("finding_1_helper_never_runs_nft_found_through_path") {
        return;
    }
    let hostile = TestDir::new("trust-path");
    let marker = hostile.join("ran");
    let fake = hostile.join("nft");
    // Does what the real one does, so only the marker tells them apart.
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$@\" >>{}\nexec /usr/sbin/nft \"$@\"\n",
            marker.display()
        ),
    )
    .expect("fake nft");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", hostile.path().display());
    let lab = Lab::new("p", true, &[("PATH", &path)]);
    let (s, h) = (format!("ps{}", pid()), format!("ph{}", pid()));
    rt().block_on(async {
        let mut c = HelperClient::connect(&lab.sock).await.expect("connect");
        let (_, _tun) = c
            .create_server_tunnel(server_spec(&s))
            .await
            .expect("server tunnel");
        let (_, _tun2, _udp) = c
            .create_host_tunnel(host_spec(&h))
            .await
            .expect("host tunnel with kill switch");
        let rules = lab.ruleset();
        assert!(
            rules.contains("masquerade"),
            "server NAT installed: {rules}"
        );
        assert!(
            rules.contains("policy drop"),
            "kill switch installed: {rules}"
        );
        c.destroy_instance(&name(&h)).await.expect("destroy host");
        c.destroy_instance(&name(&s)).await.expect("destroy server");
    });
    assert_eq!(lab.ruleset().trim(), "", "every table removed");
    assert!(
        !marker.exists(),
        "the helper ran the nft found through PATH: {}",
        std::fs::read_to_string(&marker).unwrap_or_default()
    );
}
