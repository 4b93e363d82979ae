//! The user side of warren's TLS transports (`warren client --mode tls|tls-mux`).
//!
//! * `tls`: every stream is its own TLS connection. The HTTP request head,
//!   token and stream request go out in one flight right after the TLS
//!   handshake, so a stream costs one TCP + one TLS handshake + one round trip.
//! * `tls-mux`: one long-lived TLS session carries every stream (yamux, with
//!   per-stream flow control). Opening a stream costs no handshake at all; the
//!   session is kept alive with pings every [`KEEPALIVE`], and re-established
//!   with exponential backoff when it breaks.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::poll_fn;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tracing::{debug, info, warn};

use super::auth::{AuthKey, Mode};
use super::http;
use super::io::{BoxStream, Prefixed, read_until};
use super::wire::{self, Command, Status, Target, WireError};

/// How often an idle tls-mux session is probed.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why a stream could not be opened.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The server could not be reached.
    #[error("cannot reach the server {server}")]
    Connect {
        /// Server address.
        server: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// TLS failed (for example the certificate did not verify).
    #[error("TLS with the server failed")]
    Tls(#[source] std::io::Error),
    /// The server answered like a plain web server: wrong secret, clock far
    /// off, or not a warren server.
    #[error(
        "the server did not accept our credentials (wrong secret, clock skew, or not a warren server)"
    )]
    Rejected,
    /// The server spoke garbage.
    #[error("protocol error")]
    Protocol(#[from] WireError),
    /// The server refused the stream.
    #[error("the server could not open the stream: {0:?}")]
    Refused(Status),
    /// The connection or session broke.
    #[error("connection to the server lost")]
    Lost(#[source] std::io::Error),
    /// Waiting before reconnecting.
    #[error("the server is unreachable; retrying in {0:?}")]
    Backoff(Duration),
    /// A step took too long.
    #[error("timed out talking to the server")]
    Timeout,
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// `host:port` of the server.
    pub server: String,
    /// Name to verify in the server's certificate (and send as SNI/Host).
    pub server_name: ServerName<'static>,
    /// TLS client configuration (trust).
    pub tls: Arc<rustls::ClientConfig>,
    /// Key derived from the shared secret.
    pub key: Arc<AuthKey>,
    /// Time for TCP + TLS + authentication.
    pub connect_timeout: Duration,
}

/// rustls reads at most 4 KiB per `read_tls`; a buffer under TLS turns
/// four system calls per 16 KiB record into one.
const SOCKET_READ_BUFFER: usize = 64 * 1024;

type TlsStream = tokio_rustls::client::TlsStream<tokio::io::BufReader<TcpStream>>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn host_of(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => "localhost".into(),
    }
}

/// TCP + TLS + authentication; `extra` goes out in the same flight as the
/// request head. Returns the stream positioned after the server's "200".
async fn open_session(
    s: &ClientSettings,
    mode: Mode,
    extra: &[u8],
) -> Result<Prefixed<TlsStream>, TransportError> {
    let fut = async {
        let tcp =
            TcpStream::connect(&s.server)
                .await
                .map_err(|source| TransportError::Connect {
                    server: s.server.clone(),
                    source,
                })?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(s.tls.clone());
        let mut tls = connector
            .connect(
                s.server_name.clone(),
                tokio::io::BufReader::with_capacity(SOCKET_READ_BUFFER, tcp),
            )
            .await
            .map_err(TransportError::Tls)?;
        let mut nonce = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| TransportError::Tls(std::io::Error::other("no randomness")))?;
        let token = s.key.token(unix_now(), nonce, mode);
        let mut flight = http::client_request(&host_of(&s.server_name), &token);
        flight.extend_from_slice(extra);
        tls.write_all(&flight).await.map_err(TransportError::Lost)?;
        let (status, rest) = read_until(&mut tls, http::MAX_HEAD, parse_status)
            .await
            .map_err(TransportError::Lost)?
            .map_err(|()| TransportError::Rejected)?;
        if !status {
            return Err(TransportError::Rejected);
        }
        Ok(Prefixed::new(rest, tls))
    };
    tokio::time::timeout(s.connect_timeout, fut)
        .await
        .map_err(|_| TransportError::Timeout)?
}

/// Whether the response head is our "accepted" answer (true), a decoy
/// answer (false).
fn parse_status(b: &[u8]) -> Result<Option<(bool, usize)>, ()> {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if b.len() > http::MAX_HEAD {
            Err(())
        } else {
            Ok(None)
        };
    };
    let accepted = &b[..end + 4] == http::ACCEPTED;
    Ok(Some((accepted, end + 4)))
}

/// Sends a stream request (unless already sent) and reads the reply.
async fn finish_stream<S: super::io::Duplex + 'static>(
    mut io: S,
    request_sent: bool,
    cmd: Command,
    target: &Target,
) -> Result<(BoxStream, Target), TransportError> {
    if !request_sent {
        io.write_all(&wire::request(cmd, target))
            .await
            .map_err(TransportError::Lost)?;
    }
    let ((status, bound), rest) = read_until(&mut io, 1024, wire::parse_reply)
        .await
        .map_err(TransportError::Lost)??;
    if status != Status::Ok {
        return Err(TransportError::Refused(status));
    }
    Ok((Box::new(Prefixed::new(rest, io)), bound))
}

/// A client opening streams through the server.
#[derive(Debug)]
pub enum Client {
    /// One TLS connection per stream.
    Tls(ClientSettings),
    /// One multiplexed session.
    Mux(MuxClient),
}

impl Client {
    /// A client for `mode`.
    pub fn new(mode: Mode, settings: ClientSettings) -> Client {
        match mode {
            Mode::Tls => Client::Tls(settings),
            Mode::TlsMux => Client::Mux(MuxClient::new(settings)),
        }
    }

    /// Opens a stream: a TCP connection to `target` (`Command::Connect`),
    /// a UDP relay (`Command::Udp`) or a ping. Returns the stream and the
    /// server's bound address.
    pub async fn open(
        &self,
        cmd: Command,
        target: &Target,
    ) -> Result<(BoxStream, Target), TransportError> {
        match self {
            Client::Tls(s) => {
                let req = wire::request(cmd, target);
                let io = open_session(s, Mode::Tls, &req).await?;
                finish_stream(io, true, cmd, target).await
            }
            Client::Mux(m) => m.open(cmd, target).await,
        }
    }
}

type Opener = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

#[derive(Debug)]
struct Session {
    opener: mpsc::Sender<Opener>,
    dead: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, Default)]
struct MuxState {
    session: Option<Session>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// The tls-mux client: one session, re-established on demand with backoff.
#[derive(Debug)]
pub struct MuxClient {
    settings: ClientSettings,
    state: Arc<Mutex<MuxState>>,
}

impl MuxClient {
    /// A client; the session is opened by the first stream.
    pub fn new(settings: ClientSettings) -> Self {
        MuxClient {
            settings,
            state: Arc::new(Mutex::new(MuxState::default())),
        }
    }

    async fn session(&self) -> Result<mpsc::Sender<Opener>, TransportError> {
        let mut st = self.state.lock().await;
        if let Some(s) = &st.session {
            if !s.dead.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(s.opener.clone());
            }
            st.session = None;
        }
        if let Some(at) = st.retry_at {
            let now = Instant::now();
            if at > now {
                return Err(TransportError::Backoff(at - now));
            }
        }
        match open_session(&self.settings, Mode::TlsMux, &[]).await {
            Ok(io) => {
                st.failures = 0;
                st.retry_at = None;
                let sess = spawn_driver(io);
                let opener = sess.opener.clone();
                st.session = Some(sess);
                info!(server = self.settings.server, "tls-mux session established");
                Ok(opener)
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                let backoff = Duration::from_millis(100)
                    .saturating_mul(1 << st.failures.min(10))
                    .min(MAX_BACKOFF);
                st.retry_at = Some(Instant::now() + backoff);
                warn!(server = self.settings.server, error = %e, ?backoff, "tls-mux session failed");
                Err(e)
            }
        }
    }

    /// Opens a stream on the session (establishing it if needed).
    pub async fn open(
        &self,
        cmd: Command,
        target: &Target,
    ) -> Result<(BoxStream, Target), TransportError> {
        let opener = self.session().await?;
        let (tx, rx) = oneshot::channel();
        let lost = || TransportError::Lost(std::io::Error::other("tls-mux session closed"));
        opener.send(tx).await.map_err(|_| lost())?;
        let stream = rx
            .await
            .map_err(|_| lost())?
            .map_err(|e| TransportError::Lost(std::io::Error::other(e)))?;
        finish_stream(stream.compat(), false, cmd, target).await
    }

    /// Closes the session (it is re-established by the next stream).
    pub async fn reset(&self) {
        self.state.lock().await.session = None;
    }
}

/// Runs the yamux connection on its own task: hands out outbound streams
/// on request, drives all I/O, and pings the server every [`KEEPALIVE`].
fn spawn_driver(io: Prefixed<TlsStream>) -> Session {
    let (tx, mut rx) = mpsc::channel::<Opener>(64);
    let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut conn: yamux::Connection<Compat<Prefixed<TlsStream>>> =
        yamux::Connection::new(io.compat(), yamux::Config::default(), yamux::Mode::Client);
    let flag = dead.clone();
    // Weak, so the keepalive never keeps a dropped session alive.
    let ping_tx = tx.downgrade();
    tokio::spawn(async move {
        let mut waiting: std::collections::VecDeque<Opener> = Default::default();
        let end = poll_fn(|cx| {
            use std::task::Poll;
            loop {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(o)) => waiting.push_back(o),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            while !waiting.is_empty() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(Ok(s)) => {
                        if let Some(o) = waiting.pop_front() {
                            let _ = o.send(Ok(s));
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            loop {
                match conn.poll_next_inbound(cx) {
                    // The server never opens streams towards us.
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        match end {
            Ok(()) => debug!("tls-mux session closed"),
            Err(e) => warn!(error = %e, "tls-mux session lost"),
        }
    });
    // Keepalive: a ping stream every KEEPALIVE; a missing answer kills the
    // session so the next stream reconnects.
    let flag = dead.clone();
    tokio::spawn(async move {
        let ping_target = Target::Addr(std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        loop {
            tokio::time::sleep(KEEPALIVE).await;
            if flag.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            let Some(ping) = ping_tx.upgrade() else {
                break;
            };
            let (otx, orx) = oneshot::channel();
            if ping.send(otx).await.is_err() {
                break;
            }
            drop(ping);
            let ok = tokio::time::timeout(Duration::from_secs(10), async {
                let s = orx.await.ok()?.ok()?;
                finish_stream(s.compat(), false, Command::Ping, &ping_target)
                    .await
                    .ok()
            })
            .await
            .ok()
            .flatten()
            .is_some();
            if !ok {
                warn!("tls-mux keepalive unanswered; dropping the session");
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                break;
            }
        }
    });
    Session { opener: tx, dead }
}
