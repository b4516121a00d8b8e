//! `remote-proto`: the wire types shared by the agent, the relay and the clients
//! (design.md §3), and the framing of the session protocol. Generated message types live in
//! [`session`] and [`relay`] (with the relay's gRPC services); [`FrameCodec`] turns a byte
//! stream into frames and back. No I/O policy here.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

pub mod tls;
pub mod tunnel;

/// The gRPC codec of the relay's services: prost messages, like tonic's default, with small
/// initial buffers. A relay holds one stream per agent, mostly idle; tonic's 8 KiB encode
/// and decode buffers per stream would be a third of what an idle tunnel costs. Buffers
/// still grow to any message's size when one comes.
pub mod codec {
    use std::marker::PhantomData;

    use prost::Message;
    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// Initial buffer size, and how much output is gathered before it is yielded.
    const BUFFER: usize = 512;
    const YIELD_THRESHOLD: usize = 32 * 1024;

    #[derive(Debug)]
    pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for LeanCodec<T, U> {
        fn default() -> Self {
            LeanCodec(PhantomData)
        }
    }

    impl<T, U> Codec for LeanCodec<T, U>
    where
        T: Message + Send + 'static,
        U: Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
        }
    }
}
pub mod wsman;

/// The session protocol's messages (proto/session.proto).
pub mod session {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/remote.session.v1.rs"));
}

/// The relay's services and messages (proto/relay.proto): the agent tunnel and the
/// client-facing relay service, with tonic servers and clients.
pub mod relay {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/remote.relay.v1.rs"));
}

/// Version of the session protocol spoken by this build (exchanged in `Hello`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame accepted or sent, in bytes (length prefix excluded).
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// Default port of `remote-relay`.
pub const DEFAULT_RELAY_PORT: u16 = 7443;

/// Environment variable a client sets (an SSH channel's `env` request, a WinRM shell's
/// variable or option) to choose the agent's endpoint where its protocol has no other way.
pub const ENDPOINT_ENV: &str = "REMOTE_ENDPOINT";

/// A relay address as people write it: `HOST`, `HOST:PORT`, `[V6]:PORT`, optionally
/// prefixed with `https://` or `relay://` (default port [`DEFAULT_RELAY_PORT`]). Returns
/// `(host, "host:port" to connect to)`, or `None` when it is not an address.
pub fn parse_relay_addr(url: &str) -> Option<(String, String)> {
    let t = url.trim();
    let rest = t
        .strip_prefix("https://")
        .or_else(|| t.strip_prefix("relay://"))
        .unwrap_or(t)
        .trim_end_matches('/');
    if rest.is_empty() || rest.contains(['/', '@', ' ']) {
        return None;
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, tail) = v6.split_once(']')?;
        match tail.strip_prefix(':') {
            Some(p) => (h, p.parse::<u16>().ok()?),
            None if tail.is_empty() => (h, DEFAULT_RELAY_PORT),
            None => return None,
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().ok()?),
            None => (rest, DEFAULT_RELAY_PORT),
        }
    };
    if host.is_empty() || port == 0 {
        return None;
    }
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Some((host.to_string(), addr))
}

/// Bytes of frames an agent may send on a relay channel before the relay grants more
/// (relay.proto `ChannelWindow`).
pub const CHANNEL_WINDOW_BYTES: u64 = 4 << 20;

/// Output chunks are cut to this size so that a record always fits in a frame.
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;

/// Why a frame could not be decoded. The stream stays usable after each of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge { len: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Length-prefixed protobuf frames: decodes `In`, encodes `Out`.
///
/// An oversized frame is reported once as [`FrameError::TooLarge`] and its body skipped as it
/// arrives, without buffering it; a malformed one as [`FrameError::Malformed`]. Real I/O
/// errors are the only `Err` of the decoder.
pub struct FrameCodec<In, Out> {
    skipping: usize,
    _types: PhantomData<fn() -> (In, Out)>,
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        FrameCodec {
            skipping: 0,
            _types: PhantomData,
        }
    }
}

/// The codec a server uses: reads client frames, writes server frames.
pub type ServerCodec = FrameCodec<session::ClientFrame, session::ServerFrame>;
/// The codec a client uses: reads server frames, writes client frames.
pub type ClientCodec = FrameCodec<session::ServerFrame, session::ClientFrame>;

impl<In: Message + Default, Out> Decoder for FrameCodec<In, Out> {
    type Item = Result<In, FrameError>;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        if self.skipping > 0 {
            let n = self.skipping.min(src.len());
            src.advance(n);
            self.skipping -= n;
            if self.skipping > 0 {
                return Ok(None);
            }
        }
        if src.len() < 4 {
            src.reserve(4);
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > MAX_FRAME_BYTES {
            src.advance(4);
            let n = len.min(src.len());
            src.advance(n);
            self.skipping = len - n;
            return Ok(Some(Err(FrameError::TooLarge { len })));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let body = src.split_to(len);
        Ok(Some(
            In::decode(body.freeze()).map_err(|e| FrameError::Malformed(e.to_string())),
        ))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() && self.skipping == 0 => Ok(None),
            None => {
                src.clear();
                self.skipping = 0;
                Ok(Some(Err(FrameError::Malformed(
                    "stream ended in the middle of a frame".into(),
                ))))
            }
        }
    }
}

impl<In, Out: Message> Encoder<Out> for FrameCodec<In, Out> {
    type Error = std::io::Error;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), Self::Error> {
        let len = item.encoded_len();
        if len > MAX_FRAME_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("frame of {len} bytes exceeds the {MAX_FRAME_BYTES}-byte limit"),
            ));
        }
        dst.reserve(4 + len);
        dst.put_u32(len as u32);
        item.encode(dst)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
    }
}

/// Shorthand constructors for frames.
pub mod frames {
    use super::session::{self, client_frame, server_frame};

    pub fn client(request_id: u64, msg: client_frame::Msg) -> session::ClientFrame {
        session::ClientFrame {
            request_id,
            msg: Some(msg),
        }
    }

    pub fn server(request_id: u64, msg: server_frame::Msg) -> session::ServerFrame {
        session::ServerFrame {
            request_id,
            msg: Some(msg),
        }
    }

    pub fn error(
        request_id: u64,
        code: session::ErrorCode,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> session::ServerFrame {
        server(
            request_id,
            server_frame::Msg::Error(session::Error {
                code: code as i32,
                message: message.into(),
                hint: hint.into(),
            }),
        )
    }

    pub fn hello(software: &str) -> session::Hello {
        session::Hello {
            protocol_version: super::PROTOCOL_VERSION,
            software: software.to_string(),
        }
    }
}

#[cfg(test)]
mod relay_addr_tests {
    use super::parse_relay_addr;

    #[test]
    fn relay_addresses() {
        let p = |s: &str| parse_relay_addr(s).map(|(_, a)| a);
        assert_eq!(p("relay.example").as_deref(), Some("relay.example:7443"));
        assert_eq!(p("https://r:9000/").as_deref(), Some("r:9000"));
        assert_eq!(p("[::1]:7000").as_deref(), Some("[::1]:7000"));
        assert_eq!(p("[::1]").as_deref(), Some("[::1]:7443"));
        for bad in ["", "r:0", "r:x", "u@r", "r/path", "[::1"] {
            assert_eq!(p(bad), None, "{bad}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::session::{ClientFrame, ListSessions, client_frame};
    use super::*;

    fn encode(frame: &ClientFrame) -> BytesMut {
        let mut codec = ClientCodec::default();
        let mut buf = BytesMut::new();
        // ClientCodec encodes ClientFrame.
        codec.encode(frame.clone(), &mut buf).unwrap();
        buf
    }

    fn decode_all(bytes: &[u8]) -> Vec<Result<ClientFrame, FrameError>> {
        let mut codec = ServerCodec::default();
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(item) = codec.decode(&mut buf).unwrap() {
            out.push(item);
        }
        if let Some(item) = codec.decode_eof(&mut buf).unwrap() {
            out.push(item);
        }
        out
    }

    fn list(id: u64) -> ClientFrame {
        frames::client(id, client_frame::Msg::List(ListSessions {}))
    }

    #[test]
    fn round_trip_and_byte_by_byte() {
        let mut bytes = encode(&list(1)).to_vec();
        bytes.extend_from_slice(&encode(&list(2)));
        assert_eq!(decode_all(&bytes), vec![Ok(list(1)), Ok(list(2))]);
        // Delivered one byte at a time.
        let mut codec = ServerCodec::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in &bytes {
            buf.extend_from_slice(&[*b]);
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                got.push(item);
            }
        }
        assert_eq!(got, vec![Ok(list(1)), Ok(list(2))]);
    }

    #[test]
    fn oversized_frame_is_skipped_and_stream_recovers() {
        let mut bytes = ((MAX_FRAME_BYTES + 10) as u32).to_be_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(0xAA, MAX_FRAME_BYTES + 10));
        bytes.extend_from_slice(&encode(&list(3)));
        let got = decode_all(&bytes);
        assert_eq!(got.len(), 2);
        assert!(matches!(got[0], Err(FrameError::TooLarge { .. })));
        assert_eq!(got[1], Ok(list(3)));
    }

    #[test]
    fn malformed_and_truncated_frames_are_errors_not_panics() {
        let mut bytes = vec![0, 0, 0, 3, 0xff, 0xff, 0xff];
        bytes.extend_from_slice(&encode(&list(4)));
        let got = decode_all(&bytes);
        assert!(matches!(got[0], Err(FrameError::Malformed(_))));
        assert_eq!(got[1], Ok(list(4)));
        let truncated = &encode(&list(5))[..3];
        assert!(matches!(
            decode_all(truncated)[..],
            [Err(FrameError::Malformed(_))]
        ));
    }

    #[test]
    fn unknown_message_decodes_with_no_msg() {
        // Field 99 (unknown to this version) only: decodes, msg is None.
        let body = [0xf8u8, 0x06, 0x01];
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let got = decode_all(&bytes);
        assert_eq!(
            got,
            vec![Ok(ClientFrame {
                request_id: 0,
                msg: None
            })]
        );
    }
}
