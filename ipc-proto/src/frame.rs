//! Frames: a 6-byte header, then a postcard-encoded body.
//!
//! ```text
//! +---------------------+--------+--------+------------------------+
//! | body length u32 BE  | n_fds  | flags  | postcard body (length) |
//! +---------------------+--------+--------+------------------------+
//! ```
//!
//! * the body length is at most [`MAX_FRAME_LEN`]; a header announcing more is
//!   rejected before a single body byte is read;
//! * `n_fds` is the number of file descriptors sent with the frame's first
//!   byte (`SCM_RIGHTS`), at most [`MAX_FDS_PER_FRAME`];
//! * `flags` is reserved and must be 0;
//! * the body must decode completely: trailing bytes are an error.
//!
//! Everything here is a pure function over byte slices, so the decoder can be
//! fuzzed and tested without sockets.

use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;

/// Length of the frame header.
pub const HEADER_LEN: usize = 6;
/// Hard cap on a frame body, in bytes.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// Hard cap on file descriptors carried by one frame.
pub const MAX_FDS_PER_FRAME: usize = 8;

/// Why a frame was rejected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The header announces a body larger than the cap.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The header announces an empty body; no message encodes to zero bytes.
    #[error("empty frame")]
    Empty,
    /// The header announces more file descriptors than a frame may carry.
    #[error("frame announces {n} file descriptors, at most {max} allowed")]
    TooManyFds {
        /// Announced count.
        n: usize,
        /// The cap.
        max: usize,
    },
    /// Reserved header bits were set.
    #[error("reserved frame flags {0:#04x} set")]
    BadFlags(u8),
    /// The body is not a valid message (truncated, unknown variant, bad value).
    #[error("undecodable frame body: {0}")]
    Decode(String),
    /// The body decoded but bytes were left over.
    #[error("{0} trailing bytes after the frame body")]
    TrailingBytes(usize),
    /// The message could not be encoded (only for messages over the cap).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Body length in bytes.
    pub len: usize,
    /// Number of file descriptors carried with the frame.
    pub n_fds: usize,
}

impl FrameHeader {
    /// Decodes and validates a header. Called before reading the body, so an
    /// oversized frame is refused without buffering it.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let n_fds = b[4] as usize;
        if b[5] != 0 {
            return Err(FrameError::BadFlags(b[5]));
        }
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if n_fds > MAX_FDS_PER_FRAME {
            return Err(FrameError::TooManyFds {
                n: n_fds,
                max: MAX_FDS_PER_FRAME,
            });
        }
        Ok(FrameHeader { len, n_fds })
    }

    /// Encodes the header.
    pub fn encode(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        // len <= MAX_FRAME_LEN < u32::MAX and n_fds <= MAX_FDS_PER_FRAME < 256,
        // guaranteed by `encode_frame`, the only producer.
        out[..4].copy_from_slice(&(self.len as u32).to_be_bytes());
        out[4] = self.n_fds as u8;
        out
    }
}

/// Encodes `msg` as one frame (header and body) announcing `n_fds`
/// descriptors, appending to `out`.
pub fn encode_frame<T: Serialize>(
    msg: &T,
    n_fds: usize,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    if n_fds > MAX_FDS_PER_FRAME {
        return Err(FrameError::TooManyFds {
            n: n_fds,
            max: MAX_FDS_PER_FRAME,
        });
    }
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let body = postcard::to_extend(msg, std::mem::take(out))
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    *out = body;
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let header = FrameHeader { len, n_fds }.encode();
    out[start..start + HEADER_LEN].copy_from_slice(&header);
    Ok(())
}

/// Decodes a complete body. Trailing bytes are an error.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|e| FrameError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Decodes the first frame of `buf`, if it is complete.
///
/// Returns `Ok(None)` when more bytes are needed, or the message, the number
/// of descriptors it announced and the bytes it used.
pub fn decode_frame<T: DeserializeOwned>(
    buf: &[u8],
) -> Result<Option<(T, usize, usize)>, FrameError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = FrameHeader::decode(head)?;
    let end = HEADER_LEN + header.len;
    let Some(body) = buf.get(HEADER_LEN..end) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, header.n_fds, end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{ClientFrame, Request};

    fn hello_frame() -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(
            &ClientFrame {
                id: 7,
                request: Request::Hello {
                    client: "test".into(),
                },
            },
            0,
            &mut out,
        )
        .expect("encodes");
        out
    }

    #[test]
    fn round_trip() {
        let buf = hello_frame();
        let (msg, n_fds, used) = decode_frame::<ClientFrame>(&buf)
            .expect("valid")
            .expect("complete");
        assert_eq!(used, buf.len());
        assert_eq!(n_fds, 0);
        assert_eq!(msg.id, 7);
    }

    #[test]
    fn partial_frames_need_more() {
        let buf = hello_frame();
        for cut in 0..buf.len() {
            assert_eq!(
                decode_frame::<ClientFrame>(&buf[..cut]).expect("no error on a prefix"),
                None,
                "prefix of {cut} bytes"
            );
        }
    }

    #[test]
    fn header_one_over_cap_is_refused() {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes());
        assert_eq!(
            FrameHeader::decode(&h),
            Err(FrameError::TooLarge {
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            })
        );
        h[..4].copy_from_slice(&(MAX_FRAME_LEN as u32).to_be_bytes());
        assert!(FrameHeader::decode(&h).is_ok());
    }

    #[test]
    fn encoding_over_cap_fails_cleanly() {
        let big = Request::Hello {
            client: "x".repeat(MAX_FRAME_LEN + 10),
        };
        let mut out = vec![1, 2, 3];
        let err = encode_frame(
            &ClientFrame {
                id: 1,
                request: big,
            },
            0,
            &mut out,
        );
        assert!(matches!(err, Err(FrameError::TooLarge { .. })));
        assert_eq!(out, vec![1, 2, 3]);
    }
}
