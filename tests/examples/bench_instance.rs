//! Benchmark: CreateInstance (request to TUN descriptor in hand) and
//! DestroyInstance through a running helper, N times; prints one JSON line
//! with medians and p90s in milliseconds. bench/instance.sh runs it beside
//! the same set-up done with `ip` commands.
//!
//! Usage: bench_instance SOCKET [N]

use std::time::{Duration, Instant};

use warren::helper_client::HelperClient;
use warren_ipc::instance::{InstanceName, InstanceSpec};

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

fn main() {
    let mut args = std::env::args().skip(1);
    let socket = args.next().expect("socket path");
    let n: usize = args.next().map_or(50, |s| s.parse().expect("count"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut c = HelperClient::connect(std::path::Path::new(&socket))
            .await
            .expect("connect");
        let name = InstanceName::new(&format!("bench{}", std::process::id() % 100_000))
            .expect("name");
        let spec = InstanceSpec::new(
            name.clone(),
            1420,
            vec!["198.19.88.2/32".parse().expect("p")],
            vec!["0.0.0.0/0".parse().expect("p")],
            vec!["198.19.88.1".parse().expect("ip")],
        )
        .expect("spec");
        let (mut create, mut destroy) = (Vec::new(), Vec::new());
        for i in 0..n + 3 {
            let t = Instant::now();
            let (_info, tun) = c.create_instance(spec.clone()).await.expect("create");
            let made = t.elapsed();
            drop(tun);
            let t = Instant::now();
            c.destroy_instance(&name).await.expect("destroy");
            let gone = t.elapsed();
            if i >= 3 {
                create.push(made);
                destroy.push(gone);
            }
        }
        println!(
            "{{\"n\":{n},\"create_p50_ms\":{:.2},\"create_p90_ms\":{:.2},\"destroy_p50_ms\":{:.2},\"destroy_p90_ms\":{:.2}}}",
            pct(&mut create, 0.5),
            pct(&mut create, 0.9),
            pct(&mut destroy, 0.5),
            pct(&mut destroy, 0.9)
        );
    });
}
