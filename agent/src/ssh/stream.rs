//! The TCP stream under one SSH connection, guarded: the client's version line is checked
//! as it arrives (it must start with `SSH-` and end within 255 bytes, RFC 4253 §4.2), and
//! the connection can be killed from outside (login grace time, shutdown) even while the
//! protocol engine is stuck waiting in a key exchange.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Longest version line a client may send, CR LF included.
const MAX_VERSION_LINE: usize = 255;

pub struct GuardedStream<S> {
    inner: S,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Bytes of the client's version line seen so far; `None` once it is complete.
    version_seen: Option<usize>,
}

impl<S> GuardedStream<S> {
    pub fn new(inner: S, kill: CancellationToken) -> Self {
        GuardedStream {
            inner,
            killed: Box::pin(kill.cancelled_owned()),
            version_seen: Some(0),
        }
    }

    fn check_killed(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed by the agent",
            )),
            Poll::Pending => Ok(()),
        }
    }

    /// Check newly read bytes that belong to the version line.
    fn check_version(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(seen) = self.version_seen else {
            return Ok(());
        };
        const PREFIX: &[u8] = b"SSH-";
        for (i, &b) in bytes.iter().enumerate() {
            let at = seen + i;
            if at < PREFIX.len() && b != PREFIX[at] {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "client did not send an SSH version line",
                ));
            }
            if b == b'\n' {
                self.version_seen = None;
                return Ok(());
            }
            if at + 1 >= MAX_VERSION_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "client version line too long",
                ));
            }
        }
        self.version_seen = Some(seen + bytes.len());
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GuardedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_killed(cx)?;
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if self.version_seen.is_some() {
                    let fresh = buf.filled()[before..].to_vec();
                    if let Err(e) = self.check_version(&fresh) {
                        // An error must leave the buffer as it was.
                        buf.set_filled(before);
                        return Poll::Ready(Err(e));
                    }
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GuardedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_killed(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_killed(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_all(input: &[u8]) -> io::Result<Vec<u8>> {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        a.write_all(input).await?;
        drop(a);
        let mut g = GuardedStream::new(b, CancellationToken::new());
        let mut out = Vec::new();
        g.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn version_line_rules() {
        assert!(
            read_all(b"SSH-2.0-OpenSSH_9.2\r\nbinary\x00\xff")
                .await
                .is_ok()
        );
        assert!(read_all(b"GET / HTTP/1.1\r\n").await.is_err());
        assert!(read_all(b"\n").await.is_err());
        assert!(read_all(&[b'S'; 10]).await.is_err());
        let mut long = b"SSH-2.0-".to_vec();
        long.extend(std::iter::repeat_n(b'x', 300));
        assert!(read_all(&long).await.is_err());
    }

    #[tokio::test]
    async fn kill_wakes_a_pending_read() {
        let (_a, b) = tokio::io::duplex(64);
        let kill = CancellationToken::new();
        let mut g = GuardedStream::new(b, kill.clone());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            g.read(&mut buf).await
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        kill.cancel();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
    }
}
