//! Relay between two TCP sockets. Bulk data goes zero-copy with splice(2):
//! socket → pipe → socket inside the kernel, never through user space;
//! small messages (most short connections carry nothing else) take one
//! read and one write through a per-thread buffer, which costs fewer
//! syscalls than making a pipe. Half-close is propagated: when one side
//! ends, the other's write side is shut down, and the relay ends when both
//! directions have.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use nix::fcntl::{SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice call (and the pipe's capacity). Measured
/// against 256 KiB and 64 KiB (docs/benchmarks.md): 1 MiB is fastest.
const CHUNK: usize = 1 << 20;

/// Bytes copied through user space per read before a direction switches
/// to splice (a read that fills it means bulk traffic).
const SMALL: usize = 16 * 1024;

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes sitting in the pipe.
    held: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(io::Error::from)?;
        // A bigger pipe means fewer round trips; the default is 64 KiB.
        // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own; failure is harmless.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Ok(Pipe { r, w, held: 0 })
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// What one copy through the thread's buffer did.
enum Small {
    /// Nothing to read now.
    WouldBlock,
    /// End of stream.
    Eof,
    /// `n` bytes read; `rest` of them could not be written yet.
    Moved { n: usize, rest: Option<Vec<u8>> },
}

/// Reads once from `from` into this thread's buffer and writes what it
/// got to `to` without waiting. The buffer is never held across an await,
/// so an idle connection's task holds none.
fn copy_small(from: &TcpStream, to: &TcpStream) -> io::Result<Small> {
    thread_local! {
        // Zeroed once per thread, not per read.
        static BUF: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; SMALL].into_boxed_slice());
    }
    BUF.with_borrow_mut(|buf| {
        // A short read drained the socket (epoll is edge-triggered): report WouldBlock
        // to tokio so it forgets the readiness and the next wait sleeps
        // instead of costing a read that fails with EAGAIN (what tokio's
        // own poll_read does).
        let mut got = 0;
        let r = from.try_io(Interest::READABLE, || {
            let n = nix::unistd::read(from, &mut buf[..]).map_err(io::Error::from)?;
            got = n;
            if n > 0 && n < SMALL {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        });
        let n = match r {
            Ok(0) => return Ok(Small::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Small::WouldBlock),
            Err(e) => return Err(e),
        };
        let mut off = 0;
        while off < n {
            match to.try_write(&buf[off..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => off += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Small::Moved {
                        n,
                        rest: Some(buf[off..n].to_vec()),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Small::Moved { n, rest: None })
    })
}

async fn write_all(to: &TcpStream, mut b: &[u8]) -> io::Result<()> {
    while !b.is_empty() {
        to.writable().await?;
        match to.try_write(b) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(w) => b = &b[w..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One direction: `from` → `to` until `from` ends; then shuts `to`'s write
/// side (see [`Activity::end_one_way`]). Returns the bytes moved.
///
/// Small messages are copied through the thread's buffer (one read, one
/// write); once a read fills that buffer the direction carries bulk data
/// and switches to splice(2) through a pipe of its own. So short
/// connections and idle ones hold no pipe.
async fn one_way(from: &TcpStream, to: &TcpStream, seen: &Activity) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        from.readable().await?;
        match copy_small(from, to)? {
            Small::WouldBlock => continue,
            Small::Eof => {
                seen.end_one_way(to);
                return Ok(total);
            }
            Small::Moved { n, rest } => {
                if let Some(rest) = rest {
                    write_all(to, &rest).await?;
                }
                total += n as u64;
                seen.touch();
                if n == SMALL {
                    break;
                }
            }
        }
    }
    let mut pipe = Pipe::new()?;
    let mut eof = false;
    loop {
        if pipe.held == 0 && eof {
            break;
        }
        if pipe.held == 0 {
            let n = from
                .async_io(Interest::READABLE, || {
                    splice(from.as_fd(), None, pipe.w.as_fd(), None, CHUNK, flags())
                        .map_err(io::Error::from)
                })
                .await?;
            if n == 0 {
                eof = true;
                continue;
            }
            pipe.held = n;
        }
        let n = to
            .async_io(Interest::WRITABLE, || {
                splice(pipe.r.as_fd(), None, to.as_fd(), None, pipe.held, flags())
                    .map_err(io::Error::from)
            })
            .await?;
        pipe.held -= n;
        total += n as u64;
        seen.touch();
    }
    seen.end_one_way(to);
    Ok(total)
}

/// When bytes last moved, in ms since the relay started.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// Directions that have ended.
    ended: AtomicU8,
}

impl Activity {
    /// A direction ended: propagate the half-close to `to`, unless the
    /// other direction has ended too. Then the relay is over and the
    /// caller's close of both sockets sends the FIN (one syscall less per
    /// connection).
    fn end_one_way(&self, to: &TcpStream) {
        if self.ended.fetch_add(1, Relaxed) == 0 {
            let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Relaxed)))
    }
}

/// Relays both ways until both directions have ended, or until no byte
/// moved either way for `idle` (then `TimedOut`). Returns bytes (a → b,
/// b → a). The caller closes both sockets when it returns (the last
/// direction to end leaves its FIN to that close).
pub async fn relay(a: &TcpStream, b: &TcpStream, idle: Duration) -> io::Result<(u64, u64)> {
    let seen = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        ended: AtomicU8::new(0),
    };
    let watch = async {
        let step = (idle / 4).max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(step).await;
            if seen.idle_for() >= idle {
                return io::Error::from(io::ErrorKind::TimedOut);
            }
        }
    };
    tokio::select! {
        r = async { tokio::try_join!(one_way(a, b, &seen), one_way(b, a, &seen)) } => r,
        e = watch => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (b, _) = l.accept().await.expect("accept");
        (a, b)
    }

    #[tokio::test]
    async fn relays_both_ways_and_propagates_half_close() {
        // client <-> (c1 | relay | o1) <-> origin
        let (mut client, c1) = pair().await;
        let (o1, mut origin) = pair().await;
        let relay = tokio::spawn(async move { relay(&c1, &o1, Duration::from_secs(30)).await });
        let big = vec![7u8; 3 << 20];
        client.write_all(&big).await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        origin
            .read_to_end(&mut got)
            .await
            .expect("origin reads to EOF");
        assert_eq!(got.len(), big.len(), "all bytes, then EOF");
        // The other direction still works after the client's half-close.
        origin.write_all(b"answer").await.expect("write");
        origin.shutdown().await.expect("close");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("client reads");
        assert_eq!(back, b"answer");
        let (up, down) = relay.await.expect("join").expect("relay");
        assert_eq!((up, down), (big.len() as u64, 6));
    }

    #[tokio::test]
    async fn an_idle_relay_times_out_but_a_busy_one_does_not() {
        let (mut client, c1) = pair().await;
        let (o1, mut origin) = pair().await;
        let idle = Duration::from_millis(300);
        let relay = tokio::spawn(async move { relay(&c1, &o1, idle).await });
        // Traffic every 100 ms for a second keeps it alive.
        let mut buf = [0u8; 1];
        for _ in 0..10 {
            client.write_all(b"x").await.expect("write");
            origin.read_exact(&mut buf).await.expect("read");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!relay.is_finished(), "a busy relay timed out");
        // Then silence: it ends with TimedOut.
        let r = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("relay did not time out")
            .expect("join");
        assert_eq!(r.expect_err("idle").kind(), io::ErrorKind::TimedOut);
    }
}
