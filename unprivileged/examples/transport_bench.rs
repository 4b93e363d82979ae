//! Benchmark of warren's TLS transports against direct TCP, side by side in
//! one run (bench/transports.sh drives it; results in docs/benchmarks.md).
//!
//! Needs a running `warren server --allow-local-targets` for each mode; this
//! process runs the targets itself (a bulk source and an echo server on
//! loopback) and measures:
//!
//! * bulk: one stream reading SIZE MiB from the source — direct, a plain
//!   user-space TCP relay (the tls path's copies without TLS), tls, tls-mux;
//! * short connections: N open + 64-byte request + 64-byte reply + close,
//!   with C concurrent — direct, tls, tls-mux; rate and p50/p99 latency.
//!
//! Usage: transport_bench --tls ADDR --mux ADDR --pin PIN [--size-mib 1024]
//!        [--requests 1000] [--concurrency 50]   (secret in WARREN_PASSWORD)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use warren::transport::auth::{AuthKey, Mode};
use warren::transport::client::{Client, ClientSettings};
use warren::transport::tlsconf::{self, Trust};
use warren::transport::wire::{Command, Target};

struct Args {
    tls: SocketAddr,
    mux: SocketAddr,
    pin: String,
    size_mib: u64,
    requests: usize,
    concurrency: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        tls: "127.0.0.1:0".parse().expect("addr"),
        mux: "127.0.0.1:0".parse().expect("addr"),
        pin: String::new(),
        size_mib: 1024,
        requests: 1000,
        concurrency: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().expect("flag value");
        match k.as_str() {
            "--tls" => a.tls = v.parse().expect("--tls ADDR"),
            "--mux" => a.mux = v.parse().expect("--mux ADDR"),
            "--pin" => a.pin = v,
            "--size-mib" => a.size_mib = v.parse().expect("number"),
            "--requests" => a.requests = v.parse().expect("number"),
            "--concurrency" => a.concurrency = v.parse().expect("number"),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// Sends `size` bytes to every connection, then closes.
async fn bulk_source(size: u64) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let chunk = vec![0u8; 256 * 1024];
        while let Ok((mut s, _)) = l.accept().await {
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let mut left = size;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Answers one 64-byte request with 64 bytes, then closes.
async fn echo64() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut b = [0u8; 64];
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(&b).await;
                }
            });
        }
    });
    addr
}

/// A plain TCP relay (read/write through user space, 64 KiB buffers, as
/// the tls server relays) on a thread and runtime of its own, standing in
/// for a separate process: the tls path's copies without TLS, i.e. what
/// any user-space relay can reach here.
fn relay(target: SocketAddr) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    l.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = TcpListener::from_std(l).expect("listener");
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    if let Ok(mut t) = TcpStream::connect(target).await {
                        let _ = t.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional_with_sizes(
                            &mut s,
                            &mut t,
                            64 * 1024,
                            64 * 1024,
                        )
                        .await;
                    }
                });
            }
        });
    });
    addr
}

type Open = Arc<
    dyn Fn() -> futures::future::BoxFuture<'static, Box<dyn warren::transport::io::Duplex>>
        + Send
        + Sync,
>;

fn direct(target: SocketAddr) -> Open {
    Arc::new(move || {
        Box::pin(async move {
            let s = TcpStream::connect(target).await.expect("direct connect");
            let _ = s.set_nodelay(true);
            Box::new(s) as Box<dyn warren::transport::io::Duplex>
        })
    })
}

fn through(client: Arc<Client>, target: SocketAddr) -> Open {
    Arc::new(move || {
        let c = client.clone();
        Box::pin(async move {
            c.open(Command::Connect, &Target::Addr(target))
                .await
                .expect("open through transport")
                .0
        })
    })
}

async fn bulk(open: &Open, size: u64) -> f64 {
    let t = Instant::now();
    let mut s = open().await;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, size, "whole transfer");
    size as f64 / (1024.0 * 1024.0) / t.elapsed().as_secs_f64()
}

async fn short(open: &Open, n: usize, c: usize) -> (f64, f64, f64) {
    let t = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(c));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("sem");
        let open = open.clone();
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let mut s = open().await;
            s.write_all(&[7u8; 64]).await.expect("write");
            let mut b = [0u8; 64];
            s.read_exact(&mut b).await.expect("read");
            drop(permit);
            t0.elapsed()
        }));
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(n);
    for t in tasks {
        lat.push(t.await.expect("task"));
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    lat.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (rate, ms(lat[n / 2]), ms(lat[(n * 99) / 100]))
}

fn main() {
    let a = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let secret = std::env::var("WARREN_PASSWORD").expect("WARREN_PASSWORD");
        let trust = Trust::Pin(tlsconf::parse_pin(&a.pin).expect("--pin"));
        let mk = |mode: Mode, server: SocketAddr| {
            Arc::new(Client::new(
                mode,
                ClientSettings {
                    server: server.to_string(),
                    server_name: ServerName::try_from("bench.warren.test").expect("name"),
                    tls: tlsconf::client_config(&trust).expect("tls"),
                    key: Arc::new(AuthKey::derive(secret.as_bytes())),
                    connect_timeout: Duration::from_secs(10),
                },
            ))
        };
        let tls = mk(Mode::Tls, a.tls);
        let mux = mk(Mode::TlsMux, a.mux);
        let size = a.size_mib * 1024 * 1024;
        let src = bulk_source(size).await;
        let echo = echo64().await;
        let paths: Vec<(&str, Open, Open)> = vec![
            ("direct", direct(src), direct(echo)),
            ("relay", direct(relay(src)), direct(relay(echo))),
            ("tls", through(tls.clone(), src), through(tls.clone(), echo)),
            ("tls-mux", through(mux.clone(), src), through(mux.clone(), echo)),
        ];
        // Warm up (TLS session set-up, mux session) outside the measurement.
        for (_, _, e) in &paths {
            short(e, 20, 5).await;
        }
        for (name, b, e) in &paths {
            let mib_s = bulk(b, size).await;
            let (rate, p50, p99) = short(e, a.requests, a.concurrency).await;
            println!(
                "{{\"path\":\"{name}\",\"bulk_mib_s\":{mib_s:.1},\"short_rps\":{rate:.0},\"short_p50_ms\":{p50:.2},\"short_p99_ms\":{p99:.2}}}"
            );
        }
    });
}
