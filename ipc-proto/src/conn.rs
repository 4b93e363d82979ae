//! An async framed connection over a Unix stream socket, carrying file
//! descriptors with `SCM_RIGHTS`.
//!
//! Descriptors are attached to the first byte of the frame that announces
//! them. The receiver keeps a FIFO of descriptors as they arrive and hands a
//! frame exactly the number its header announces; descriptors nobody
//! announced stay queued until [`FramedConn::take_fds`] (or are closed with
//! the connection). Received descriptors carry `O_CLOEXEC`
//! (`MSG_CMSG_CLOEXEC`).

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::frame::{
    FrameError, FrameHeader, HEADER_LEN, MAX_FDS_PER_FRAME, decode_body, encode_frame,
};
use crate::handshake::{ClientHello, HANDSHAKE_LEN, HandshakeError, ServerHello};

/// Most descriptors buffered ahead of the frames that announce them.
const MAX_QUEUED_FDS: usize = 2 * MAX_FDS_PER_FRAME;
/// Bytes read per `recvmsg` call.
const READ_CHUNK: usize = 16 * 1024;

/// Transport-level failures.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The socket failed.
    #[error("socket error")]
    Io(#[from] io::Error),
    /// The peer closed the connection between frames.
    #[error("connection closed by peer")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The peer started a frame and did not finish it in time.
    #[error("peer stalled in the middle of a frame")]
    Stalled,
    /// A frame was malformed.
    #[error("bad frame")]
    Frame(#[from] FrameError),
    /// The version handshake failed.
    #[error("version handshake failed")]
    Handshake(#[from] HandshakeError),
    /// A frame announced descriptors that did not arrive with it.
    #[error("frame announced {expected} file descriptors but {got} arrived")]
    FdsMissing {
        /// Announced.
        expected: usize,
        /// Received.
        got: usize,
    },
    /// The peer sent more descriptors than any frame announced, or more
    /// than fit in the control buffer (`MSG_CTRUNC`).
    #[error("peer sent unexpected file descriptors")]
    UnexpectedFds,
}

impl TransportError {
    /// True when the peer simply went away (no protocol violation).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, TransportError::Closed)
            || matches!(self, TransportError::Io(e) if e.kind() == io::ErrorKind::ConnectionReset
                || e.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// A Unix stream connection speaking warren frames.
#[derive(Debug)]
pub struct FramedConn {
    stream: UnixStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    cmsg: Vec<u8>,
    spin: Option<Duration>,
}

impl FramedConn {
    /// Wraps a connected stream. No handshake is performed.
    pub fn new(stream: UnixStream) -> Self {
        FramedConn {
            stream,
            rbuf: Vec::with_capacity(READ_CHUNK),
            wbuf: Vec::new(),
            fds: VecDeque::new(),
            cmsg: nix::cmsg_space!([RawFd; MAX_FDS_PER_FRAME]),
            spin: None,
        }
    }

    /// Before sleeping on a read, poll the socket for up to `spin` first.
    ///
    /// For a client waiting on a reply that usually comes within tens of
    /// microseconds: it saves the cross-core wake-up of its own thread (about
    /// 15 µs on small VMs) at the cost of at most `spin` of CPU per read. The
    /// helper never spins.
    pub fn set_spin(&mut self, spin: Option<Duration>) {
        self.spin = spin;
    }

    /// The underlying stream (for peer credentials).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Client side of the handshake: offers this build's versions and
    /// returns the one the helper chose.
    pub async fn client_handshake(&mut self) -> Result<u16, TransportError> {
        let offered = ClientHello::CURRENT;
        self.write_raw(&offered.encode()).await?;
        let answer = self.read_raw::<HANDSHAKE_LEN>(None).await?;
        Ok(ServerHello::decode(&answer)?.accept(offered)?)
    }

    /// Reads exactly `N` bytes that are not part of a frame (the handshake).
    /// Once the first byte has arrived, the rest must follow within `stall`.
    pub async fn read_raw<const N: usize>(
        &mut self,
        stall: Option<Duration>,
    ) -> Result<[u8; N], TransportError> {
        self.fill(N, stall).await?;
        if !self.fds.is_empty() {
            return Err(TransportError::UnexpectedFds);
        }
        let mut out = [0u8; N];
        out.copy_from_slice(&self.rbuf[..N]);
        self.rbuf.drain(..N);
        Ok(out)
    }

    /// Writes bytes that are not part of a frame (the handshake).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.write_all_with_fds(bytes, &[]).await
    }

    /// Reads one frame and the descriptors it announced.
    ///
    /// Waits as long as needed for the frame's first byte; once it has
    /// arrived, the whole frame must arrive within `stall` (if given). A
    /// header announcing an oversized body fails at once, before any of the
    /// body is read.
    pub async fn read_frame<T: DeserializeOwned>(
        &mut self,
        stall: Option<Duration>,
    ) -> Result<(T, Vec<OwnedFd>), TransportError> {
        let deadline = self.fill(HEADER_LEN, stall).await?;
        let head = self
            .rbuf
            .first_chunk::<HEADER_LEN>()
            .copied()
            .unwrap_or_default();
        let header = FrameHeader::decode(&head)?;
        let total = HEADER_LEN + header.len;
        self.fill_until(total, deadline).await?;
        if self.fds.len() < header.n_fds {
            return Err(TransportError::FdsMissing {
                expected: header.n_fds,
                got: self.fds.len(),
            });
        }
        let msg = decode_body(&self.rbuf[HEADER_LEN..total]);
        self.rbuf.drain(..total);
        // On a decode error the descriptors stay queued (see `take_fds`).
        let msg = msg?;
        Ok((msg, self.fds.drain(..header.n_fds).collect()))
    }

    /// Takes every descriptor received but not handed out with a frame, so
    /// the caller decides where they are closed (closing a peer's socket
    /// can block, e.g. a TCP socket with `SO_LINGER` and unsent data).
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        self.fds.drain(..).collect()
    }

    /// The stream, once done with framing. Descriptors still queued are
    /// closed: call [`FramedConn::take_fds`] first to close them elsewhere.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Writes one frame with `fds` attached to its first byte.
    pub async fn write_frame<T: Serialize>(
        &mut self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        let mut buf = std::mem::take(&mut self.wbuf);
        buf.clear();
        encode_frame(msg, fds.len(), &mut buf)?;
        let res = self.write_all_with_fds(&buf, fds).await;
        self.wbuf = buf;
        res
    }

    /// Waits until at least `want` bytes are buffered. Returns the deadline
    /// that applies to the rest of the current unit (set once its first
    /// byte arrived).
    async fn fill(
        &mut self,
        want: usize,
        stall: Option<Duration>,
    ) -> Result<Option<Instant>, TransportError> {
        if self.rbuf.is_empty() && self.recv_some(None).await? == 0 {
            return Err(TransportError::Closed);
        }
        let deadline = stall.map(|d| Instant::now() + d);
        self.fill_until(want, deadline).await?;
        Ok(deadline)
    }

    async fn fill_until(
        &mut self,
        want: usize,
        deadline: Option<Instant>,
    ) -> Result<(), TransportError> {
        while self.rbuf.len() < want {
            if self.recv_some(deadline).await? == 0 {
                return Err(TransportError::Truncated);
            }
        }
        Ok(())
    }

    async fn recv_some(&mut self, deadline: Option<Instant>) -> Result<usize, TransportError> {
        match deadline {
            None => self.recv_once().await,
            Some(d) => tokio::time::timeout_at(d, self.recv_once())
                .await
                .map_err(|_| TransportError::Stalled)?,
        }
    }

    /// Receives once. Cancel-safe: the buffer only grows inside the
    /// synchronous receive, so dropping this future (a `select!` that took
    /// another branch) never leaves unfilled bytes behind.
    async fn recv_once(&mut self) -> Result<usize, TransportError> {
        let res = match self.spin_recv() {
            Some(r) => r,
            None => self.wait_recv().await,
        };
        if self.fds.len() > MAX_QUEUED_FDS {
            return Err(TransportError::UnexpectedFds);
        }
        res
    }

    /// Polls without sleeping for up to `self.spin`; `None` if nothing came.
    fn spin_recv(&mut self) -> Option<Result<usize, TransportError>> {
        let spin = self.spin?;
        let began = std::time::Instant::now();
        let fd = self.stream.as_raw_fd();
        loop {
            match recv_into(fd, &mut self.rbuf, &mut self.cmsg, &mut self.fds) {
                Ok(n) => return Some(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if began.elapsed() >= spin {
                        return None;
                    }
                    std::hint::spin_loop();
                }
                Err(e) => return Some(Err(map_recv_err(e))),
            }
        }
    }

    async fn wait_recv(&mut self) -> Result<usize, TransportError> {
        loop {
            self.stream.readable().await?;
            let (rbuf, cmsg, fds) = (&mut self.rbuf, &mut self.cmsg, &mut self.fds);
            let fd = self.stream.as_raw_fd();
            match self
                .stream
                .try_io(Interest::READABLE, || recv_into(fd, rbuf, cmsg, fds))
            {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(map_recv_err(e)),
            }
        }
    }

    async fn write_all_with_fds(
        &mut self,
        mut bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut pending_fds: &[RawFd] = &raw;
        while !bytes.is_empty() {
            self.stream.writable().await?;
            let res = self.stream.try_io(Interest::WRITABLE, || {
                let iov = [IoSlice::new(bytes)];
                let cmsgs: &[ControlMessage<'_>] = if pending_fds.is_empty() {
                    &[]
                } else {
                    &[ControlMessage::ScmRights(pending_fds)]
                };
                sendmsg::<()>(
                    self.stream.as_fd().as_raw_fd(),
                    &iov,
                    cmsgs,
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match res {
                Ok(n) => {
                    bytes = &bytes[n..];
                    pending_fds = &[];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(TransportError::Io(e)),
            }
        }
        Ok(())
    }
}

fn map_recv_err(e: io::Error) -> TransportError {
    if e.kind() == io::ErrorKind::InvalidData {
        TransportError::UnexpectedFds
    } else {
        TransportError::Io(e)
    }
}

/// Appends what one non-blocking `recvmsg` returns to `rbuf`.
#[allow(
    clippy::ptr_arg,
    reason = "nix::recvmsg takes the cmsg buffer as &mut Vec"
)]
fn recv_into(
    fd: RawFd,
    rbuf: &mut Vec<u8>,
    cmsg: &mut Vec<u8>,
    fds: &mut VecDeque<OwnedFd>,
) -> io::Result<usize> {
    let start = rbuf.len();
    rbuf.resize(start + READ_CHUNK, 0);
    let r = recv_with_fds(fd, &mut rbuf[start..], cmsg, fds);
    rbuf.truncate(start + *r.as_ref().unwrap_or(&0));
    r
}

/// One non-blocking `recvmsg`, queueing any descriptors that came with it.
/// A truncated control message is reported as `InvalidData` after closing
/// whatever did arrive.
#[allow(
    clippy::ptr_arg,
    reason = "nix::recvmsg takes the cmsg buffer as &mut Vec"
)]
fn recv_with_fds(
    fd: RawFd,
    buf: &mut [u8],
    cmsg: &mut Vec<u8>,
    fds: &mut VecDeque<OwnedFd>,
) -> io::Result<usize> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    let n = msg.bytes;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = c {
            for raw in received {
                // SAFETY: the kernel just installed `raw` in our descriptor
                // table for this message; nothing else owns it.
                fds.push_back(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
    }
    if truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control message truncated",
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{ClientFrame, Request};
    use std::io::{Read, Seek, Write};
    use tokio::io::AsyncWriteExt;

    fn pair() -> (FramedConn, FramedConn) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (FramedConn::new(a), FramedConn::new(b))
    }

    #[tokio::test]
    async fn frames_carry_fds() {
        let (mut a, mut b) = pair();
        let mut file = tempfile_with(b"hello through SCM_RIGHTS");
        let msg = ClientFrame {
            id: 1,
            request: Request::Status,
        };
        a.write_frame(&msg, &[file.as_fd(), file.as_fd()])
            .await
            .expect("write");
        let (back, fds): (ClientFrame, _) = b.read_frame(None).await.expect("read");
        assert_eq!(back, msg);
        assert_eq!(fds.len(), 2);
        let mut got = std::fs::File::from(fds.into_iter().next().expect("fd"));
        got.rewind().expect("seek");
        let mut s = String::new();
        got.read_to_string(&mut s).expect("read");
        assert_eq!(s, "hello through SCM_RIGHTS");
        file.flush().expect("flush");
    }

    #[tokio::test]
    async fn read_frame_is_cancel_safe() {
        let (mut a, mut b) = pair();
        // Cancel a read that is waiting, many times, then read for real.
        for _ in 0..5 {
            let r =
                tokio::time::timeout(Duration::from_millis(5), b.read_frame::<ClientFrame>(None))
                    .await;
            assert!(r.is_err(), "nothing to read yet");
        }
        a.write_frame(
            &ClientFrame {
                id: 9,
                request: Request::Status,
            },
            &[],
        )
        .await
        .expect("write");
        let (m, _): (ClientFrame, _) = b.read_frame(None).await.expect("read");
        assert_eq!(m.id, 9);
    }

    #[tokio::test]
    async fn back_to_back_frames_with_several_fds() {
        let (mut a, mut b) = pair();
        let f = tempfile_with(b"x");
        for id in 0..4 {
            a.write_frame(
                &ClientFrame {
                    id,
                    request: Request::Status,
                },
                &[f.as_fd(), f.as_fd(), f.as_fd()],
            )
            .await
            .expect("write");
        }
        for id in 0..4 {
            let (m, fds): (ClientFrame, _) = b.read_frame(None).await.expect("read");
            assert_eq!(m.id, id);
            assert_eq!(fds.len(), 3);
        }
    }

    #[tokio::test]
    async fn several_frames_in_one_read() {
        let (mut a, mut b) = pair();
        for id in 0..5 {
            a.write_frame(
                &ClientFrame {
                    id,
                    request: Request::Status,
                },
                &[],
            )
            .await
            .expect("write");
        }
        for id in 0..5 {
            let (m, fds): (ClientFrame, _) = b.read_frame(None).await.expect("read");
            assert_eq!(m.id, id);
            assert!(fds.is_empty());
        }
    }

    #[tokio::test]
    async fn spinning_reader_gets_frames_and_fds_and_falls_back_to_sleeping() {
        let (mut a, mut b) = pair();
        b.set_spin(Some(Duration::from_micros(200)));
        let file = tempfile_with(b"x");
        let writer = tokio::spawn(async move {
            for id in 0..3 {
                // The second frame comes after the spin window: the reader
                // must fall back to waiting for readiness.
                if id == 1 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                a.write_frame(
                    &ClientFrame {
                        id,
                        request: Request::Status,
                    },
                    &[file.as_fd()],
                )
                .await
                .expect("write");
            }
            a
        });
        for id in 0..3 {
            let (m, fds): (ClientFrame, _) = b.read_frame(None).await.expect("read");
            assert_eq!(m.id, id);
            assert_eq!(fds.len(), 1);
        }
        drop(writer.await.expect("join"));
        assert!(matches!(
            b.read_frame::<ClientFrame>(None).await,
            Err(TransportError::Closed)
        ));
    }

    #[tokio::test]
    async fn announced_fds_that_never_came_are_an_error() {
        let (a, mut b) = pair();
        let mut raw = a.into_std_stream();
        let mut buf = Vec::new();
        encode_frame(
            &ClientFrame {
                id: 1,
                request: Request::Status,
            },
            3,
            &mut buf,
        )
        .expect("encode");
        raw.write_all(&buf).expect("write");
        let err = b.read_frame::<ClientFrame>(None).await.expect_err("no fds");
        assert!(matches!(
            err,
            TransportError::FdsMissing {
                expected: 3,
                got: 0
            }
        ));
    }

    #[tokio::test]
    async fn fds_of_a_frame_that_does_not_decode_stay_queued() {
        let (a, mut b) = pair();
        let f = tempfile_with(b"x");
        let raw = a.into_std_stream();
        raw.set_nonblocking(false).expect("blocking");
        let bytes = [0u8, 0, 0, 3, 1, 0, 0xff, 0xff, 0xff];
        let fd = [f.as_raw_fd()];
        let sent = nix::sys::socket::sendmsg::<()>(
            raw.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            &[ControlMessage::ScmRights(&fd)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        assert_eq!(sent, bytes.len());
        assert!(matches!(
            b.read_frame::<ClientFrame>(None).await,
            Err(TransportError::Frame(_))
        ));
        assert_eq!(b.take_fds().len(), 1, "left for the caller to close");
        drop(raw);
    }

    #[tokio::test]
    async fn stall_mid_frame_times_out() {
        let (a, mut b) = pair();
        let mut a = a.into_inner_stream();
        a.write_all(&[0, 0, 0, 10, 0]).await.expect("write");
        let err = b
            .read_frame::<ClientFrame>(Some(Duration::from_millis(50)))
            .await
            .expect_err("stall");
        assert!(matches!(err, TransportError::Stalled));
    }

    #[tokio::test]
    async fn eof_between_and_inside_frames() {
        let (a, mut b) = pair();
        drop(a);
        assert!(matches!(
            b.read_frame::<ClientFrame>(None).await,
            Err(TransportError::Closed)
        ));
        let (a, mut b) = pair();
        let mut a = a.into_inner_stream();
        a.write_all(&[0, 0]).await.expect("write");
        drop(a);
        assert!(matches!(
            b.read_frame::<ClientFrame>(None).await,
            Err(TransportError::Truncated)
        ));
    }

    #[tokio::test]
    async fn handshake_round_trip() {
        let (mut client, mut server) = pair();
        let srv = tokio::spawn(async move {
            let hello = server.read_raw::<HANDSHAKE_LEN>(None).await.expect("read");
            let v = ClientHello::decode(&hello)
                .expect("decode")
                .negotiate()
                .expect("v");
            server
                .write_raw(
                    &ServerHello {
                        chosen: v,
                        helper_max: v,
                    }
                    .encode(),
                )
                .await
                .expect("write");
        });
        assert_eq!(
            client.client_handshake().await.expect("handshake"),
            crate::PROTOCOL_VERSION
        );
        srv.await.expect("join");
    }

    impl FramedConn {
        fn into_std_stream(self) -> std::os::unix::net::UnixStream {
            self.stream.into_std().expect("into_std")
        }
        fn into_inner_stream(self) -> UnixStream {
            self.into_stream()
        }
    }

    fn tempfile_with(content: &[u8]) -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "warren-ipc-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("tempfile");
        std::fs::remove_file(&path).expect("unlink");
        f.write_all(content).expect("write");
        f
    }
}
