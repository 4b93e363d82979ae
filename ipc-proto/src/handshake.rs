//! The version handshake that opens every connection.
//!
//! Before any frame, the client writes 8 bytes: the magic `WRNP`, then the
//! lowest and highest protocol versions it speaks (big-endian `u16` each).
//! The helper answers with 8 bytes: the magic, the chosen version (0 when no
//! common version exists) and the highest version it speaks. With version 0
//! the helper closes the connection after its answer.
//!
//! The layout is fixed for all versions, so a client and helper of any two
//! releases can always tell each other what they speak.

use thiserror::Error;

/// The protocol version this build speaks best.
pub const PROTOCOL_VERSION: u16 = 5;
/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 5;
/// Magic bytes at the start of both handshake messages.
pub const MAGIC: [u8; 4] = *b"WRNP";
/// Length of either handshake message.
pub const HANDSHAKE_LEN: usize = 8;

/// Why a handshake message was rejected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The first four bytes were not `WRNP`: the peer does not speak this protocol.
    #[error("peer does not speak the warren helper protocol (bad magic)")]
    BadMagic,
    /// The offered range is empty or starts at version 0.
    #[error("peer offered an invalid version range {min}..={max}")]
    BadRange {
        /// Lowest version offered.
        min: u16,
        /// Highest version offered.
        max: u16,
    },
    /// No version is spoken by both sides.
    #[error(
        "no common protocol version: helper speaks up to {helper_max}, client {client_min}..={client_max}"
    )]
    NoCommonVersion {
        /// Lowest version the client speaks.
        client_min: u16,
        /// Highest version the client speaks.
        client_max: u16,
        /// Highest version the helper speaks.
        helper_max: u16,
    },
}

/// The client's opening message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello {
    /// Lowest version the client speaks.
    pub min: u16,
    /// Highest version the client speaks.
    pub max: u16,
}

impl ClientHello {
    /// The hello of this build.
    pub const CURRENT: ClientHello = ClientHello {
        min: MIN_PROTOCOL_VERSION,
        max: PROTOCOL_VERSION,
    };

    /// Encodes the hello into its 8 wire bytes.
    pub fn encode(self) -> [u8; HANDSHAKE_LEN] {
        encode(self.min, self.max)
    }

    /// Decodes the client's 8 bytes.
    pub fn decode(b: &[u8; HANDSHAKE_LEN]) -> Result<Self, HandshakeError> {
        let (min, max) = decode(b)?;
        if min == 0 || min > max {
            return Err(HandshakeError::BadRange { min, max });
        }
        Ok(ClientHello { min, max })
    }

    /// The version the helper picks for this client: the highest both speak.
    pub fn negotiate(self) -> Result<u16, HandshakeError> {
        let top = self.max.min(PROTOCOL_VERSION);
        if top < self.min.max(MIN_PROTOCOL_VERSION) {
            return Err(HandshakeError::NoCommonVersion {
                client_min: self.min,
                client_max: self.max,
                helper_max: PROTOCOL_VERSION,
            });
        }
        Ok(top)
    }
}

/// The helper's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerHello {
    /// Chosen version; 0 means "none in common, closing".
    pub chosen: u16,
    /// Highest version the helper speaks.
    pub helper_max: u16,
}

impl ServerHello {
    /// Encodes the answer into its 8 wire bytes.
    pub fn encode(self) -> [u8; HANDSHAKE_LEN] {
        encode(self.chosen, self.helper_max)
    }

    /// Decodes the helper's 8 bytes.
    pub fn decode(b: &[u8; HANDSHAKE_LEN]) -> Result<Self, HandshakeError> {
        let (chosen, helper_max) = decode(b)?;
        Ok(ServerHello { chosen, helper_max })
    }

    /// Checks the answer against what this client offered.
    pub fn accept(self, offered: ClientHello) -> Result<u16, HandshakeError> {
        if self.chosen == 0 || self.chosen < offered.min || self.chosen > offered.max {
            return Err(HandshakeError::NoCommonVersion {
                client_min: offered.min,
                client_max: offered.max,
                helper_max: self.helper_max,
            });
        }
        Ok(self.chosen)
    }
}

fn encode(a: u16, b: u16) -> [u8; HANDSHAKE_LEN] {
    let mut out = [0u8; HANDSHAKE_LEN];
    out[..4].copy_from_slice(&MAGIC);
    out[4..6].copy_from_slice(&a.to_be_bytes());
    out[6..8].copy_from_slice(&b.to_be_bytes());
    out
}

fn decode(b: &[u8; HANDSHAKE_LEN]) -> Result<(u16, u16), HandshakeError> {
    if b[..4] != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    Ok((
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_versions_agree() {
        let hello = ClientHello::decode(&ClientHello::CURRENT.encode()).expect("decodes");
        let v = hello.negotiate().expect("common version");
        assert_eq!(v, PROTOCOL_VERSION);
        let answer = ServerHello {
            chosen: v,
            helper_max: PROTOCOL_VERSION,
        };
        let back = ServerHello::decode(&answer.encode()).expect("decodes");
        assert_eq!(back.accept(ClientHello::CURRENT), Ok(PROTOCOL_VERSION));
    }

    #[test]
    fn future_only_client_is_refused() {
        let hello = ClientHello {
            min: PROTOCOL_VERSION + 1,
            max: PROTOCOL_VERSION + 5,
        };
        assert!(matches!(
            hello.negotiate(),
            Err(HandshakeError::NoCommonVersion { .. })
        ));
    }

    #[test]
    fn newer_client_falls_back() {
        let hello = ClientHello {
            min: 1,
            max: PROTOCOL_VERSION + 3,
        };
        assert_eq!(hello.negotiate(), Ok(PROTOCOL_VERSION));
    }

    #[test]
    fn bad_magic_and_range() {
        assert_eq!(
            ClientHello::decode(b"HTTP/1.1"),
            Err(HandshakeError::BadMagic)
        );
        let mut b = encode(3, 2);
        assert_eq!(
            ClientHello::decode(&b),
            Err(HandshakeError::BadRange { min: 3, max: 2 })
        );
        b = encode(0, 2);
        assert!(ClientHello::decode(&b).is_err());
    }

    #[test]
    fn zero_answer_is_refusal() {
        let answer = ServerHello {
            chosen: 0,
            helper_max: 1,
        };
        assert!(answer.accept(ClientHello::CURRENT).is_err());
    }
}
