//! A typed async client for the root helper.
//!
//! Later features (namespace instances, host tunnels, the wg server) call
//! the helper through [`HelperClient`]; the CLI's `warren helper ...`
//! commands are thin wrappers around it.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::net::UnixStream;
use warren_ipc::instance::{
    HostTunnelInfo, HostTunnelSpec, InstanceInfo, InstanceName, InstanceSpec, ServerTunnelInfo,
    ServerTunnelSpec, SpawnSpec,
};
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
    Autostart(#[from] AutostartError),
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
            ClientError::Autostart(AutostartError::Refused(_)) => exit::NOT_AUTHORIZED,
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
    events: std::collections::VecDeque<Event>,
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
        Self::from_stream(stream).await
    }

    /// Performs the handshake on an already connected stream.
    pub async fn from_stream(stream: UnixStream) -> Result<Self, ClientError> {
        let mut conn = FramedConn::new(stream);
        conn.set_spin(Some(REPLY_SPIN));
        let protocol = conn.client_handshake().await?;
        Ok(HelperClient {
            conn,
            next_id: 1,
            protocol,
            events: Default::default(),
        })
    }

    /// The connection's socket, e.g. to hand the connection (and the
    /// leases bound to it) to another process.
    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.conn.stream().as_fd()
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
        Ok(self.call_with_fds(request, &[]).await?.0)
    }

    /// Sends one request with descriptors; returns the reply and the
    /// descriptors that came with it. Events that arrive meanwhile are kept
    /// for [`HelperClient::next_event`].
    pub async fn call_with_fds(
        &mut self,
        request: Request,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(Response, Vec<std::os::fd::OwnedFd>), ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let sent = self
            .conn
            .write_frame(&ClientFrame { id, request }, fds)
            .await;
        loop {
            // Even if the write failed (the helper may have refused us and
            // closed), a reply explaining why may be waiting.
            let (frame, got) = match self.conn.read_frame::<ServerFrame>(None).await {
                Ok(x) => x,
                Err(e) => {
                    sent?;
                    return Err(e.into());
                }
            };
            match frame {
                ServerFrame::Reply { id: rid, result } if rid == id || rid == 0 => {
                    return Ok((result?, got));
                }
                ServerFrame::Reply { .. } => return Err(ClientError::UnexpectedReply),
                ServerFrame::Event(Event::ShuttingDown) => {
                    return Err(HelperError::ShuttingDown.into());
                }
                ServerFrame::Event(ev) => self.events.push_back(ev),
            }
        }
    }

    /// Waits for the next event (a spawned program ended, an instance went
    /// away, the helper is stopping).
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        if let Some(ev) = self.events.pop_front() {
            return Ok(ev);
        }
        loop {
            match self.conn.read_frame::<ServerFrame>(None).await?.0 {
                ServerFrame::Event(ev) => return Ok(ev),
                ServerFrame::Reply { .. } => continue,
            }
        }
    }

    /// Creates a namespace instance; returns its description and its TUN
    /// device. It lives until this connection closes, or until a program
    /// spawned with `bind_lease` ends.
    pub async fn create_instance(
        &mut self,
        spec: InstanceSpec,
    ) -> Result<(InstanceInfo, std::os::fd::OwnedFd), ClientError> {
        match self
            .call_with_fds(Request::CreateInstance(spec), &[])
            .await?
        {
            (Response::InstanceCreated(info), mut fds) if fds.len() == 1 => {
                Ok((info, fds.remove(0)))
            }
            _ => Err(ClientError::UnexpectedReply),
        }
    }

    /// Creates a server tunnel (TUN + forwarding + NAT in the helper's
    /// namespace); returns its description and its TUN device.
    pub async fn create_server_tunnel(
        &mut self,
        spec: ServerTunnelSpec,
    ) -> Result<(ServerTunnelInfo, std::os::fd::OwnedFd), ClientError> {
        match self
            .call_with_fds(Request::CreateServerTunnel(spec), &[])
            .await?
        {
            (Response::ServerTunnelCreated(info), mut fds) if fds.len() == 1 => {
                Ok((info, fds.remove(0)))
            }
            _ => Err(ClientError::UnexpectedReply),
        }
    }

    /// Routes the helper's (the host's) namespace through a new TUN device;
    /// returns its description, the TUN device and a UDP socket marked to
    /// bypass the tunnel (for the encrypted traffic).
    pub async fn create_host_tunnel(
        &mut self,
        spec: HostTunnelSpec,
    ) -> Result<(HostTunnelInfo, std::os::fd::OwnedFd, std::os::fd::OwnedFd), ClientError> {
        match self
            .call_with_fds(Request::CreateHostTunnel(spec), &[])
            .await?
        {
            (Response::HostTunnelCreated(info), fds) if fds.len() == 2 => {
                let mut it = fds.into_iter();
                match (it.next(), it.next()) {
                    (Some(tun), Some(udp)) => Ok((info, tun, udp)),
                    _ => Err(ClientError::UnexpectedReply),
                }
            }
            _ => Err(ClientError::UnexpectedReply),
        }
    }

    /// Removes an instance or server tunnel.
    pub async fn destroy_instance(&mut self, name: &InstanceName) -> Result<(), ClientError> {
        match self.call(Request::Destroy { name: name.clone() }).await? {
            Response::Destroyed => Ok(()),
            _ => Err(ClientError::UnexpectedReply),
        }
    }

    /// The caller's instances (root: all).
    pub async fn list_instances(&mut self) -> Result<Vec<InstanceInfo>, ClientError> {
        match self.call(Request::ListInstances).await? {
            Response::Instances(v) => Ok(v),
            _ => Err(ClientError::UnexpectedReply),
        }
    }

    /// Runs a program in an instance as the caller, with `fds` as its
    /// 0, 1, 2...; returns its pid ([`Event::Exited`] follows).
    pub async fn spawn(
        &mut self,
        mut spec: SpawnSpec,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<i32, ClientError> {
        spec.n_fds = u8::try_from(fds.len()).map_err(|_| ClientError::UnexpectedReply)?;
        match self.call_with_fds(Request::Spawn(spec), fds).await? {
            (Response::Spawned { pid }, _) => Ok(pid),
            _ => Err(ClientError::UnexpectedReply),
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

/// Prints a helper error with its cause chain and hint; returns its exit code.
pub fn report_client_error(e: &ClientError) -> std::process::ExitCode {
    let mut msg = format!("warren: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    eprintln!("{msg}");
    if let Some(h) = e.hint() {
        for line in h.lines() {
            eprintln!("  {line}");
        }
    }
    exit::code(e.exit_code())
}

/// Why the helper could not be autostarted.
#[derive(Debug, Error)]
pub enum AutostartError {
    /// Turned off in the configuration or on the command line.
    #[error("the helper is not running and autostart is turned off")]
    Disabled,
    /// Only the default socket is covered by the sudoers whitelist.
    #[error("cannot autostart a helper for {0}: autostart only serves the default socket")]
    NotDefaultSocket(PathBuf),
    /// sudo is not installed.
    #[error("cannot autostart the helper: sudo is not installed")]
    NoSudo,
    /// sudo wants a password and there is no terminal to ask on.
    #[error(
        "cannot autostart the helper: sudo needs a password and there is no terminal to ask for it"
    )]
    PasswordRequired,
    /// sudo refused the command (not whitelisted for this user).
    #[error("cannot autostart the helper: sudo refused to run {0} for this user")]
    Refused(PathBuf),
    /// sudo failed another way.
    #[error("cannot autostart the helper: sudo failed: {0}")]
    SudoFailed(String),
    /// The helper did not answer in time.
    #[error("the helper was started but its socket did not answer within {0:?}")]
    Timeout(Duration),
    /// The start lock could not be taken.
    #[error("cannot take the autostart lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl AutostartError {
    /// What the user can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            AutostartError::Disabled => {
                "start it with `sudo systemctl start warren-helper.socket` or `sudo warren-helper serve`, or enable autostart (`[helper] autostart = true` in ~/.config/warren/config.toml, and no --no-autostart)"
            }
            AutostartError::NotDefaultSocket(_) => {
                "start the helper on that socket yourself: `sudo warren-helper serve --socket PATH`"
            }
            AutostartError::NoSudo => {
                "install sudo and the sudoers snippet (/etc/sudoers.d/warren), or use the socket unit: `sudo systemctl enable --now warren-helper.socket`"
            }
            AutostartError::PasswordRequired => {
                "install /etc/sudoers.d/warren (shipped with warren) so the helper starts without a password, run warren once from a terminal, or use the socket unit"
            }
            AutostartError::Refused(_) => {
                "the sudoers snippet allows members of group 'warren': `sudo usermod -aG warren $USER`, then log in again"
            }
            AutostartError::SudoFailed(_) | AutostartError::Timeout(_) => {
                "look at the helper's log (journalctl -t sudo; the helper logs to stderr), or start it by hand: `sudo warren-helper serve`"
            }
            AutostartError::Lock { .. } => "check the permissions of $XDG_RUNTIME_DIR/warren",
        }
    }
}
