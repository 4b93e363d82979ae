//! One host-side UDP relay socket shared by every SOCKS5 UDP association
//! of an instance.
//!
//! The worker lives in the instance's namespace and cannot bind sockets in
//! the host namespace, so `warren up` binds one relay socket there and
//! hands it over. Datagrams are told apart by their source address: an
//! association learns its client's address from the first datagram that
//! matches it (the address the client announced in its request, or else
//! the first new source from the client's IP), as a per-association
//! socket would.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::debug;

/// Datagrams queued per association before new ones are dropped.
const QUEUE: usize = 256;

type Tx = mpsc::Sender<(Vec<u8>, SocketAddr)>;

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    by_src: HashMap<SocketAddr, (u64, Tx)>,
    /// (id, client IP, announced source if any, sender), oldest first.
    pending: Vec<(u64, IpAddr, Option<SocketAddr>, Tx)>,
}

/// The shared relay socket.
#[derive(Debug)]
pub struct UdpMux {
    sock: UdpSocket,
    state: Mutex<State>,
}

/// One association's end of the mux; unregisters when dropped.
#[derive(Debug)]
pub struct Association {
    id: u64,
    mux: Arc<UdpMux>,
    rx: mpsc::Receiver<(Vec<u8>, SocketAddr)>,
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), v6.port())),
        a => a,
    }
}

impl UdpMux {
    /// Adopts the inherited socket and starts its reader task (call inside
    /// a tokio runtime).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Arc<UdpMux>> {
        let std = std::net::UdpSocket::from(fd);
        std.set_nonblocking(true)?;
        let mux = Arc::new(UdpMux {
            sock: UdpSocket::from_std(std)?,
            state: Mutex::default(),
        });
        let m = Arc::downgrade(&mux);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Some(mux) = m.upgrade() else { return };
                let (n, src) = match mux.sock.recv_from(&mut buf).await {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(error = %e, "UDP relay receive failed");
                        continue;
                    }
                };
                mux.dispatch(buf[..n].to_vec(), unmap(src));
            }
        });
        Ok(mux)
    }

    /// The relay's address (for the SOCKS5 reply).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr().map(unmap)
    }

    fn dispatch(&self, d: Vec<u8>, src: SocketAddr) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if let Some((_, tx)) = st.by_src.get(&src) {
            let _ = tx.try_send((d, src));
            return;
        }
        let pos = st
            .pending
            .iter()
            .position(|(_, _, announced, _)| *announced == Some(src))
            .or_else(|| {
                st.pending.iter().position(|(_, ip, announced, _)| {
                    announced.is_none() && same_host(*ip, src.ip())
                })
            });
        let Some(pos) = pos else {
            debug!(%src, "datagram from no known association dropped");
            return;
        };
        let (id, _, _, tx) = st.pending.remove(pos);
        let _ = tx.try_send((d, src));
        st.by_src.insert(src, (id, tx));
    }

    /// Registers an association for a client at `client_ip` that may have
    /// announced its source address.
    pub fn register(
        self: &Arc<Self>,
        client_ip: IpAddr,
        announced: Option<SocketAddr>,
    ) -> Association {
        let (tx, rx) = mpsc::channel(QUEUE);
        let id = match self.state.lock() {
            Ok(mut st) => {
                st.next_id += 1;
                let id = st.next_id;
                st.pending
                    .push((id, client_ip, announced.filter(|a| a.port() != 0), tx));
                id
            }
            Err(_) => 0,
        };
        Association {
            id,
            mux: self.clone(),
            rx,
        }
    }
}

fn same_host(a: IpAddr, b: IpAddr) -> bool {
    a == b || (a.is_loopback() && b.is_loopback())
}

impl Association {
    /// The next datagram from the client and its source.
    pub async fn recv(&mut self) -> Option<(Vec<u8>, SocketAddr)> {
        self.rx.recv().await
    }

    /// Sends a datagram to the client.
    pub async fn send_to(&self, b: &[u8], to: SocketAddr) -> io::Result<usize> {
        let to = match (to, self.mux.sock.local_addr()?) {
            (SocketAddr::V4(v4), SocketAddr::V6(_)) => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            (a, _) => a,
        };
        self.mux.sock.send_to(b, to).await
    }
}

impl Drop for Association {
    fn drop(&mut self) {
        if let Ok(mut st) = self.mux.state.lock() {
            let id = self.id;
            st.pending.retain(|p| p.0 != id);
            st.by_src.retain(|_, v| v.0 != id);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn associations_learn_their_clients() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let relay = s.local_addr().unwrap();
        let mux = UdpMux::from_fd(s.into()).unwrap();
        let c1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let c2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut a1 = mux.register("127.0.0.1".parse().unwrap(), None);
        let mut a2 = mux.register("127.0.0.1".parse().unwrap(), Some(c2.local_addr().unwrap()));
        c2.send_to(b"two", relay).await.unwrap();
        c1.send_to(b"one", relay).await.unwrap();
        let (d, src) = a1.recv().await.unwrap();
        assert_eq!((&d[..], src), (&b"one"[..], c1.local_addr().unwrap()));
        let (d, src) = a2.recv().await.unwrap();
        assert_eq!((&d[..], src), (&b"two"[..], c2.local_addr().unwrap()));
        a1.send_to(b"back", src).await.unwrap();
        let mut b = [0u8; 8];
        let (n, _) = c2.recv_from(&mut b).await.unwrap();
        assert_eq!(&b[..n], b"back");
        drop(a1);
        // A stranger with no association is dropped, not delivered.
        c1.send_to(b"late", relay).await.unwrap();
        c2.send_to(b"again", relay).await.unwrap();
        let (d, _) = a2.recv().await.unwrap();
        assert_eq!(&d[..], b"again");
        assert!(mux.state.lock().unwrap().by_src.len() == 1);
    }
}
