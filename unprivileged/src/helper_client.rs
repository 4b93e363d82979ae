//! A typed async client for the root helper.
//!
//! Later features (namespace instances, host tunnels, the wg server) call
//! the helper through [`HelperClient`]; the CLI's `warren helper ...`
//! commands are thin wrappers around it.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tokio::net::UnixStream;
use warren_ipc::msg::{HelloInfo, StatusInfo};
use warren_ipc::{
    ClientFrame, Event, FramedConn, HelperError, Request, Response, ServerFrame, TransportError,
};

use crate::exit;

/// Why a helper call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket file does not exist.
    #[error("no helper socket at {0}")]
    NoSocket(PathBuf),
    /// The socket exists but nobody is listening (a stale socket).
    #[error("nothing is listening on {0}")]
    NotListening(PathBuf),
    /// The socket's permissions keep this user out.
    #[error("permission denied connecting to {0}")]
    PermissionDenied(PathBuf),
    /// Connecting failed for another reason.
    #[error("cannot connect to the helper at {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The helper answered with an error.
    #[error(transparent)]
    Helper(#[from] HelperError),
    /// The connection failed or the helper spoke garbage.
    #[error("talking to the helper failed")]
    Transport(#[from] TransportError),
    /// The helper answered something that does not fit the request.
    #[error("the helper sent an unexpected reply")]
    UnexpectedReply,
    /// The helper was not running and could not be started.
    #[error(transparent)]
    Autostart(#[from] crate::autostart::AutostartError),
}

impl ClientError {
    /// The process exit code this error maps to (see [`crate::exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NoSocket(_)
            | ClientError::NotListening(_)
            | ClientError::Connect { .. } => exit::HELPER_UNAVAILABLE,
            ClientError::PermissionDenied(_)
            | ClientError::Helper(HelperError::NotAuthorized { .. }) => exit::NOT_AUTHORIZED,
            ClientError::Transport(TransportError::Handshake(_)) | ClientError::UnexpectedReply => {
                exit::PROTOCOL
            }
            ClientError::Transport(e) if !e.is_disconnect() => exit::PROTOCOL,
            ClientError::Transport(_) => exit::HELPER_UNAVAILABLE,
            ClientError::Helper(_) => exit::FAILURE,
            ClientError::Autostart(crate::autostart::AutostartError::Refused(_)) => {
                exit::NOT_AUTHORIZED
            }
            ClientError::Autostart(_) => exit::HELPER_UNAVAILABLE,
        }
    }

    /// What the user can do about it, if there is something.
    pub fn hint(&self) -> Option<String> {
        match self {
            ClientError::NoSocket(p) | ClientError::NotListening(p) => Some(format!(
                "start the helper with `sudo systemctl start warren-helper.socket` (packaged install)\n\
                 or run it by hand: `sudo warren-helper serve --socket {}`\n\
                 (set WARREN_HELPER_SOCKET or --helper-socket if it listens elsewhere)",
                p.display()
            )),
            ClientError::PermissionDenied(_)
            | ClientError::Helper(HelperError::NotAuthorized { .. }) => Some(
                "add yourself to the helper's group (`sudo usermod -aG warren $USER`), then log in again"
                    .into(),
            ),
            ClientError::Transport(TransportError::Handshake(_)) => Some(
                "the helper and this client come from different warren releases; install matching versions"
                    .into(),
            ),
            ClientError::Autostart(e) => Some(e.hint().to_string()),
            _ => None,
        }
    }
}

/// Where the helper's socket is: the explicit path if given, else the
/// default. (`--helper-socket` also reads `WARREN_HELPER_SOCKET`.)
pub fn socket_path(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(warren_ipc::DEFAULT_SOCKET_PATH))
}

/// How long the client polls for a reply before sleeping (see
/// [`FramedConn::set_spin`]): the helper answers most requests within this.
pub const REPLY_SPIN: std::time::Duration = std::time::Duration::from_micros(100);

/// A connection to the helper.
#[derive(Debug)]
pub struct HelperClient {
    conn: FramedConn,
    next_id: u32,
    protocol: u16,
}

impl HelperClient {
    /// Connects and performs the version handshake.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => ClientError::NoSocket(path.into()),
                io::ErrorKind::ConnectionRefused => ClientError::NotListening(path.into()),
                io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.into()),
                _ => ClientError::Connect {
                    path: path.into(),
                    source: e,
                },
            })?;
        let mut conn = FramedConn::new(stream);
        conn.set_spin(Some(REPLY_SPIN));
        let protocol = conn.client_handshake().await?;
        Ok(HelperClient {
            conn,
            next_id: 1,
            protocol,
        })
    }

    /// Changes how long a read polls before sleeping (`None`: never polls).
    pub fn set_spin(&mut self, spin: Option<std::time::Duration>) {
        self.conn.set_spin(spin);
    }

    /// The protocol version negotiated with the helper.
    pub fn protocol(&self) -> u16 {
        self.protocol
    }

    /// Sends one request and waits for its reply.
    pub async fn call(&mut self, request: Request) -> Result<Response, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let sent = self
            .conn
            .write_frame(&ClientFrame { id, request }, &[])
            .await;
        loop {
            // Even if the write failed (the helper may have refused us and
            // closed), a reply explaining why may be waiting.
            let frame = match self.conn.read_frame::<ServerFrame>(None).await {
                Ok((frame, _fds)) => frame,
                Err(e) => {
                    sent?;
                    return Err(e.into());
                }
            };
            match frame {
                ServerFrame::Reply { id: rid, result } if rid == id || rid == 0 => {
                    return Ok(result?);
                }
                ServerFrame::Reply { .. } => return Err(ClientError::UnexpectedReply),
                ServerFrame::Event(Event::ShuttingDown) => {
                    return Err(HelperError::ShuttingDown.into());
                }
                ServerFrame::Event(_) => continue,
            }
        }
    }

    /// Hello: identifies the helper and how it sees us.
    pub async fn hello(&mut self) -> Result<HelloInfo, ClientError> {
        match self
            .call(Request::Hello {
                client: format!("warren {}", env!("CARGO_PKG_VERSION")),
            })
            .await?
        {
            Response::Hello(info) => Ok(info),
            _ => Err(ClientError::UnexpectedReply),
        }
    }

    /// Status: the helper's version, uptime, clients and resources.
    pub async fn status(&mut self) -> Result<StatusInfo, ClientError> {
        match self.call(Request::Status).await? {
            Response::Status(info) => Ok(info),
            _ => Err(ClientError::UnexpectedReply),
        }
    }
}
