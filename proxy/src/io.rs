//! Small I/O pieces shared by the proxy intake and the transports.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// A byte stream both ways.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// A boxed [`Duplex`].
pub type BoxStream = Box<dyn Duplex>;

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `prefix` is returned by reads before anything from `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads until `parse` returns a value or fails; `limit` caps the bytes
/// buffered. Returns the value and whatever followed it.
pub async fn read_until<R, T, E>(
    r: &mut R,
    limit: usize,
    mut parse: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, E>,
) -> Result<Result<(T, Vec<u8>), E>, io::Error>
where
    R: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(512);
    loop {
        match parse(&buf) {
            Ok(Some((v, used))) => return Ok(Ok((v, buf.split_off(used)))),
            Ok(None) => {}
            Err(e) => return Ok(Err(e)),
        }
        if buf.len() > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "message too long",
            ));
        }
        if buf.len() == buf.capacity() {
            buf.reserve(4096);
        }
        // Into the spare capacity: nothing to zero or copy.
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn prefix_comes_first() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" world").await.expect("write");
        drop(b);
        let mut p = Prefixed::new(b"hello".to_vec(), a);
        let mut s = String::new();
        p.read_to_string(&mut s).await.expect("read");
        assert_eq!(s, "hello world");
    }

    #[tokio::test]
    async fn read_until_returns_rest() {
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"ab|cd").await.expect("write");
        let r = read_until(&mut a, 100, |buf: &[u8]| -> Result<_, ()> {
            Ok(buf.iter().position(|&c| c == b'|').map(|i| (i, i + 1)))
        })
        .await
        .expect("io");
        assert_eq!(r, Ok((2, b"cd".to_vec())));
    }
}

/// Datagrams as [`super::target::udp_frame`]s over a stream, both ways (one
/// UDP association: the SOCKS5 side of a tunnel, the transport server's
/// relay, the userspace stack's).
#[derive(Debug)]
pub struct UdpFrames<S> {
    rd: tokio::io::ReadHalf<S>,
    wr: tokio::io::WriteHalf<S>,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite> UdpFrames<S> {
    /// Frames over `stream`.
    pub fn new(stream: S) -> UdpFrames<S> {
        let (rd, wr) = tokio::io::split(stream);
        UdpFrames {
            rd,
            wr,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one datagram for (or from) `target`.
    pub async fn send(&mut self, target: &super::target::Target, payload: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let f = super::target::udp_frame(target, payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        self.wr.write_all(&f).await
    }

    /// The next datagram: its target (or source) and payload. Cancel-safe:
    /// bytes read stay buffered for the next call.
    pub async fn recv(&mut self) -> io::Result<(super::target::Target, Vec<u8>)> {
        loop {
            match super::target::parse_udp_frame(&self.buf) {
                Ok(Some(((t, payload), n))) => {
                    let p = payload.to_vec();
                    self.buf.drain(..n);
                    return Ok((t, p));
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            // Into the spare capacity: no buffer in the future's state
            // (which every connection task would carry).
            self.buf.reserve(16 * 1024);
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}
