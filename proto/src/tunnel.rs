//! The relay tunnel's framing (relay.proto, top of file): a TLS connection negotiated with
//! ALPN [`ALPN`], carrying length-prefixed protobuf messages (a 4-byte big-endian length,
//! then the message). The agent, the relay and the load tool read and write tunnels through
//! this module only; nothing else knows the byte layout.
//!
//! The reader keeps no buffer while idle: it reads the 4-byte length into the struct and
//! allocates exactly one message's bytes once the length is known. That is what lets a relay
//! hold thousands of idle tunnels cheaply, where HTTP/2 keeps ~24 KiB per connection.

use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The ALPN protocol id of a tunnel connection (gRPC calls on the same port use "h2").
pub const ALPN: &[u8] = b"remote-tunnel/1";
/// Largest message either side accepts on a tunnel (a 1 MiB frame or a spill batch, with
/// room to spare).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Largest first message (TunnelOpen), read before the peer is authenticated.
pub const MAX_OPEN_BYTES: usize = 4096;
/// How often the agent sends a Keepalive (the relay echoes it).
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(30);
/// A tunnel on which nothing arrived for this long is dropped by either side.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer announced a {len}-byte message; at most {max} bytes are accepted")]
    TooLarge { len: usize, max: usize },
    #[error("the connection ended in the middle of a message")]
    Truncated,
    #[error("a message could not be decoded: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Reads one message at a time. Cancel-safe: progress lives in the reader, so a `select!`
/// may drop a pending [`FrameReader::next`] and call it again without losing bytes.
#[derive(Debug)]
pub struct FrameReader {
    head: [u8; 4],
    head_got: u8,
    body: Vec<u8>,
    body_got: usize,
    max: usize,
}

impl FrameReader {
    /// A reader accepting messages of at most `max` bytes.
    pub fn new(max: usize) -> FrameReader {
        FrameReader {
            head: [0; 4],
            head_got: 0,
            body: Vec::new(),
            body_got: 0,
            max,
        }
    }

    /// Change the size limit (e.g. once the peer is authenticated).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// The next message's bytes; `None` when the peer closed between messages.
    pub async fn next<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<Vec<u8>>, TunnelError> {
        while self.head_got < 4 {
            let n = r.read(&mut self.head[usize::from(self.head_got)..]).await?;
            if n == 0 {
                return if self.head_got == 0 {
                    Ok(None)
                } else {
                    Err(TunnelError::Truncated)
                };
            }
            self.head_got += n as u8;
            if self.head_got == 4 {
                let len = u32::from_be_bytes(self.head) as usize;
                if len > self.max {
                    return Err(TunnelError::TooLarge { len, max: self.max });
                }
                self.body = vec![0; len];
                self.body_got = 0;
            }
        }
        while self.body_got < self.body.len() {
            let n = r.read(&mut self.body[self.body_got..]).await?;
            if n == 0 {
                return Err(TunnelError::Truncated);
            }
            self.body_got += n;
        }
        self.head_got = 0;
        Ok(Some(std::mem::take(&mut self.body)))
    }

    /// The next message, decoded as `M`; `None` when the peer closed between messages.
    pub async fn message<M: Message + Default, R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<M>, TunnelError> {
        match self.next(r).await? {
            Some(bytes) => Ok(Some(M::decode(bytes.as_slice())?)),
            None => Ok(None),
        }
    }
}

/// `msg` with its length prefix, ready to write.
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    // Cannot fail: the vector grows as needed.
    let _ = msg.encode(&mut out);
    out
}

/// Write one message (not flushed: the caller flushes when its queue runs dry).
pub async fn write<M: Message, W: AsyncWrite + Unpin>(w: &mut W, msg: &M) -> std::io::Result<()> {
    w.write_all(&encode(msg)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::{Keepalive, TunnelOpen};

    #[tokio::test]
    async fn messages_round_trip_and_a_close_between_messages_is_clean() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for nonce in 0..100u64 {
                write(&mut a, &Keepalive { nonce }).await.expect("write");
            }
            write(
                &mut a,
                &TunnelOpen {
                    credential: "x".repeat(1000),
                },
            )
            .await
            .expect("write");
        });
        let mut reader = FrameReader::new(MAX_OPEN_BYTES);
        for nonce in 0..100u64 {
            let k: Keepalive = reader.message(&mut b).await.expect("read").expect("some");
            assert_eq!(k.nonce, nonce);
        }
        let open: TunnelOpen = reader.message(&mut b).await.expect("read").expect("some");
        assert_eq!(open.credential.len(), 1000);
        writer.await.expect("writer");
        assert!(reader.next(&mut b).await.expect("eof").is_none());
    }

    #[tokio::test]
    async fn oversized_and_truncated_messages_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&5000u32.to_be_bytes()).await.expect("write");
        let mut reader = FrameReader::new(MAX_OPEN_BYTES);
        assert!(matches!(
            reader.next(&mut b).await,
            Err(TunnelError::TooLarge { len: 5000, .. })
        ));

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 9, 1, 2]).await.expect("write");
        drop(a);
        let mut reader = FrameReader::new(MAX_OPEN_BYTES);
        assert!(matches!(
            reader.next(&mut b).await,
            Err(TunnelError::Truncated)
        ));

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0]).await.expect("write");
        drop(a);
        let mut reader = FrameReader::new(MAX_OPEN_BYTES);
        assert!(matches!(
            reader.next(&mut b).await,
            Err(TunnelError::Truncated)
        ));
    }

    #[tokio::test]
    async fn a_dropped_read_loses_nothing() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let bytes = encode(&Keepalive { nonce: 7 });
        let mut reader = FrameReader::new(MAX_OPEN_BYTES);
        // Half a message, then the pending read is dropped (as a select! would).
        a.write_all(&bytes[..3]).await.expect("write");
        let pending = tokio::time::timeout(Duration::from_millis(20), reader.next(&mut b)).await;
        assert!(pending.is_err());
        a.write_all(&bytes[3..]).await.expect("write");
        let k: Keepalive = reader.message(&mut b).await.expect("read").expect("some");
        assert_eq!(k.nonce, 7);
    }
}
