//! Messages: what a client may ask, what the helper answers, and the typed
//! errors it can return.
//!
//! Every request is an *intent* ("tell me your status"), never a raw system
//! operation: the helper decides which kernel objects an intent touches.
//! Enums are `#[non_exhaustive]`; new variants are only ever appended, and a
//! change to an existing variant's layout requires a new protocol version.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::instance::{
    ExitStatus, HostTunnelInfo, HostTunnelSpec, InstanceInfo, InstanceName, InstanceSpec,
    ServerTunnelInfo, ServerTunnelSpec, SpawnSpec,
};

/// Longest client description accepted in [`Request::Hello`].
pub const MAX_CLIENT_NAME: usize = 128;

/// A client's frame: a request and the id its reply will carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Chosen by the client; echoed in the reply.
    pub id: u32,
    /// What the client asks for.
    pub request: Request,
}

/// A helper's frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The answer to the request with the same id.
    Reply {
        /// The request's id.
        id: u32,
        /// The outcome.
        result: Result<Response, HelperError>,
    },
    /// Something the helper tells the client without being asked.
    Event(Event),
}

/// Operations a client may request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Identify the helper and the caller as the helper sees it.
    Hello {
        /// Free-form client description for the helper's log (at most
        /// [`MAX_CLIENT_NAME`] bytes).
        client: String,
    },
    /// The helper's state: version, uptime, clients, resources.
    Status,
    /// Create namespace instance `warren-NAME` with a TUN device, addresses,
    /// routes and DNS; the reply carries the TUN device's descriptor. The
    /// instance is leased to this connection until a program spawned with
    /// `bind_lease` takes the lease over.
    CreateInstance(InstanceSpec),
    /// Remove a resource (instance or server tunnel) the caller owns (root:
    /// any).
    Destroy {
        /// Which one.
        name: InstanceName,
    },
    /// The caller's instances (root: all).
    ListInstances,
    /// Run a program inside an instance the caller owns, as the caller; the
    /// frame carries `n_fds` descriptors for its 0, 1, 2...
    Spawn(SpawnSpec),
    /// Create a server tunnel (TUN + forwarding + masquerade NAT in warren's
    /// own nftables table) in the helper's network namespace; the reply
    /// carries the TUN descriptor. Leased like an instance.
    CreateServerTunnel(ServerTunnelSpec),
    /// Route the helper's (the host's) network namespace through a TUN
    /// device; the reply carries the TUN and a marked UDP socket.
    CreateHostTunnel(HostTunnelSpec),
}

impl Request {
    /// Short name of the operation, for logs.
    pub fn op_name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Status => "status",
            Request::CreateInstance(_) => "create-instance",
            Request::Destroy { .. } => "destroy",
            Request::ListInstances => "list-instances",
            Request::Spawn(_) => "spawn",
            Request::CreateServerTunnel(_) => "create-server-tunnel",
            Request::CreateHostTunnel(_) => "create-host-tunnel",
        }
    }
}

/// How the helper was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Activation {
    /// Run by hand (`warren-helper serve`).
    Manual,
    /// Started by systemd socket activation.
    Socket,
    /// Started on demand by a client through sudo.
    Autostarted,
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// Answer to [`Request::Hello`].
    Hello(HelloInfo),
    /// Answer to [`Request::Status`].
    Status(StatusInfo),
    /// Answer to [`Request::CreateInstance`]; the TUN descriptor comes with
    /// the frame.
    InstanceCreated(InstanceInfo),
    /// Answer to [`Request::Destroy`].
    Destroyed,
    /// Answer to [`Request::CreateServerTunnel`]; the TUN descriptor comes
    /// with the frame.
    ServerTunnelCreated(ServerTunnelInfo),
    /// Answer to [`Request::CreateHostTunnel`]; the TUN device and the
    /// marked UDP socket come with the frame, in that order.
    HostTunnelCreated(HostTunnelInfo),
    /// Answer to [`Request::ListInstances`].
    Instances(Vec<InstanceInfo>),
    /// Answer to [`Request::Spawn`]: the program runs. An
    /// [`Event::Exited`] follows when it ends.
    Spawned {
        /// Its pid (in the helper's pid namespace).
        pid: i32,
    },
}

/// The helper's answer to Hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloInfo {
    /// Protocol version in use on this connection.
    pub protocol: u16,
    /// The helper's release.
    pub helper_version: String,
    /// The caller's uid as the kernel reported it (`SO_PEERCRED`).
    pub peer_uid: u32,
    /// The caller's pid as the kernel reported it.
    pub peer_pid: i32,
}

/// The helper's answer to Status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Protocol version in use on this connection.
    pub protocol: u16,
    /// The helper's release.
    pub helper_version: String,
    /// The helper's process id.
    pub pid: u32,
    /// Milliseconds since the helper started.
    pub uptime_ms: u64,
    /// Connections currently open (this one included).
    pub connected_clients: u32,
    /// Resources (namespaces, links, tables...) the helper holds.
    pub resources: u32,
    /// How the helper was started.
    pub activation: Activation,
    /// Seconds without clients after which the helper exits, if it does.
    pub idle_timeout_secs: Option<u64>,
}

/// Unsolicited messages from the helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Event {
    /// The helper is shutting down and will close this connection once the
    /// request in flight (if any) is answered.
    ShuttingDown,
    /// A program this connection spawned has ended.
    Exited {
        /// Its pid.
        pid: i32,
        /// How it ended.
        status: ExitStatus,
    },
    /// An instance this connection created was removed (its worker ended,
    /// or root removed it).
    InstanceGone {
        /// Which one.
        name: InstanceName,
    },
}

/// Errors the helper returns. They say what went wrong in terms the client
/// can act on, and carry no internal details (paths, kernel messages): those
/// go to the helper's log, tagged with the same `incident` number.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum HelperError {
    /// The caller is neither root nor a member of the authorized group.
    #[error("not authorized: only root and members of group '{group}' may use the warren helper")]
    NotAuthorized {
        /// The authorized group's name.
        group: String,
    },
    /// The caller's request could not be decoded.
    #[error("malformed request")]
    Malformed,
    /// The caller's frame exceeded the size limit.
    #[error("request larger than the {max}-byte limit")]
    FrameTooLarge {
        /// The limit.
        max: u32,
    },
    /// The caller already holds as many connections as allowed.
    #[error("too many connections from this user (limit {limit})")]
    TooManyConnections {
        /// The per-user limit.
        limit: u32,
    },
    /// The helper is shutting down.
    #[error("the helper is shutting down")]
    ShuttingDown,
    /// The caller may not act on this resource.
    #[error("permission denied")]
    PermissionDenied,
    /// A field of the request is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field's name.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The named resource does not exist (or is not visible to the caller).
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The operation is not supported by this helper.
    #[error("operation not supported by this helper")]
    Unsupported,
    /// A resource of that name exists already.
    #[error("{what} already exists")]
    Exists {
        /// What.
        what: String,
    },
    /// The caller holds as many resources as allowed.
    #[error("too many instances for this user (limit {limit})")]
    TooManyResources {
        /// The per-user limit.
        limit: u32,
    },
    /// The operation failed inside the helper; its log has the details under
    /// this incident number.
    #[error("the helper failed to carry out the request (incident {incident} in the helper's log)")]
    Internal {
        /// Correlates with the helper's log line.
        incident: u64,
    },
    /// The host's network state does not allow the request (protocol
    /// version 3): e.g. no default route for a server tunnel to masquerade
    /// out of.
    #[error("refused by the host's network: {reason}")]
    HostState {
        /// What is missing or in the way.
        reason: String,
    },
    /// The caller already runs as many programs (instance workers,
    /// `warren exec` programs) through the helper as allowed (protocol
    /// version 4).
    #[error("too many programs running through the helper for this user (limit {limit})")]
    TooManyPrograms {
        /// The per-user limit.
        limit: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, encode_frame};
    use proptest::prelude::*;

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            ".{0,64}".prop_map(|client| Request::Hello { client }),
            Just(Request::Status),
        ]
    }

    fn arb_error() -> impl Strategy<Value = HelperError> {
        prop_oneof![
            "[a-z]{1,16}".prop_map(|group| HelperError::NotAuthorized { group }),
            Just(HelperError::Malformed),
            any::<u32>().prop_map(|max| HelperError::FrameTooLarge { max }),
            any::<u32>().prop_map(|limit| HelperError::TooManyConnections { limit }),
            Just(HelperError::ShuttingDown),
            Just(HelperError::PermissionDenied),
            (".{0,16}", ".{0,32}")
                .prop_map(|(field, reason)| HelperError::InvalidArgument { field, reason }),
            ".{0,16}".prop_map(|what| HelperError::NotFound { what }),
            Just(HelperError::Unsupported),
            ".{0,16}".prop_map(|what| HelperError::Exists { what }),
            any::<u32>().prop_map(|limit| HelperError::TooManyResources { limit }),
            any::<u64>().prop_map(|incident| HelperError::Internal { incident }),
            ".{0,32}".prop_map(|reason| HelperError::HostState { reason }),
            any::<u32>().prop_map(|limit| HelperError::TooManyPrograms { limit }),
        ]
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        prop_oneof![
            (any::<u16>(), ".{0,16}", any::<u32>(), any::<i32>()).prop_map(
                |(protocol, helper_version, peer_uid, peer_pid)| Response::Hello(HelloInfo {
                    protocol,
                    helper_version,
                    peer_uid,
                    peer_pid
                })
            ),
            (
                any::<u16>(),
                (".{0,16}", any::<u32>()),
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                prop_oneof![
                    Just(Activation::Manual),
                    Just(Activation::Socket),
                    Just(Activation::Autostarted)
                ],
                any::<Option<u64>>()
            )
                .prop_map(|(protocol, (v, pid), up, c, r, activation, idle)| {
                    Response::Status(StatusInfo {
                        protocol,
                        helper_version: v,
                        pid,
                        uptime_ms: up,
                        connected_clients: c,
                        resources: r,
                        activation,
                        idle_timeout_secs: idle,
                    })
                }),
        ]
    }

    fn arb_server_frame() -> impl Strategy<Value = ServerFrame> {
        prop_oneof![
            (
                any::<u32>(),
                prop_oneof![arb_response().prop_map(Ok), arb_error().prop_map(Err)]
            )
                .prop_map(|(id, result)| ServerFrame::Reply { id, result }),
            Just(ServerFrame::Event(Event::ShuttingDown)),
        ]
    }

    proptest! {
        #[test]
        fn client_frames_round_trip(id in any::<u32>(), request in arb_request(), n_fds in 0usize..=8) {
            let msg = ClientFrame { id, request };
            let mut buf = Vec::new();
            encode_frame(&msg, n_fds, &mut buf).expect("encodes");
            let (back, fds, used) = decode_frame::<ClientFrame>(&buf).expect("decodes").expect("complete");
            prop_assert_eq!(back, msg);
            prop_assert_eq!(fds, n_fds);
            prop_assert_eq!(used, buf.len());
        }

        #[test]
        fn server_frames_round_trip(msg in arb_server_frame()) {
            let mut buf = Vec::new();
            encode_frame(&msg, 0, &mut buf).expect("encodes");
            let (back, _, used) = decode_frame::<ServerFrame>(&buf).expect("decodes").expect("complete");
            prop_assert_eq!(back, msg);
            prop_assert_eq!(used, buf.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<ClientFrame>(&bytes);
            let _ = decode_frame::<ServerFrame>(&bytes);
        }
    }
}
