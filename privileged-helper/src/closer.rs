//! Closing what peers handed over, off the event loop.
//!
//! `close()` can block: the last close of a TCP socket with `SO_LINGER`
//! and unsent data waits up to the linger time, a file on a FUSE file system
//! waits for its daemon. A peer's descriptors (received, or still in flight
//! in its connection's socket) are therefore never closed on the helper's
//! single event-loop thread but by one small thread of their own, through a
//! bounded queue: when it is full, the connection that wants to close more
//! waits (it has already been answered and cut off), never the event loop.

use std::os::fd::OwnedFd;
use std::sync::OnceLock;

use tokio::sync::mpsc;

/// Batches waiting for the closer thread.
const QUEUE: usize = 64;

static CLOSER: OnceLock<Option<mpsc::Sender<Vec<OwnedFd>>>> = OnceLock::new();

/// Started on first use, which comes after the privilege drop (capabilities
/// are per thread).
fn sender() -> Option<&'static mpsc::Sender<Vec<OwnedFd>>> {
    CLOSER
        .get_or_init(|| {
            let (tx, mut rx) = mpsc::channel::<Vec<OwnedFd>>(QUEUE);
            std::thread::Builder::new()
                .name("fd-closer".into())
                .spawn(move || {
                    while let Some(batch) = rx.blocking_recv() {
                        drop(batch);
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

/// Closes `fds` on the closer thread; waits (asynchronously) while its
/// queue is full. Without a closer thread they go to a blocking-pool thread.
/// A socket among them first gets the default linger back (the close then
/// returns at once and the kernel finishes in the background), so a
/// lingering socket does not hold the closer up either.
pub async fn close(fds: Vec<OwnedFd>) {
    if fds.is_empty() {
        return;
    }
    let off = libc::linger {
        l_onoff: 0,
        l_linger: 0,
    };
    for fd in &fds {
        // Not a socket: ENOTSOCK, nothing to do.
        let _ = nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::Linger, &off);
    }
    let Some(tx) = sender() else {
        tokio::task::spawn_blocking(move || drop(fds));
        return;
    };
    if let Err(mpsc::error::SendError(fds)) = tx.send(fds).await {
        tokio::task::spawn_blocking(move || drop(fds));
    }
}
