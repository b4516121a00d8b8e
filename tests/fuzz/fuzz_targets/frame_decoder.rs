//! The session protocol's frame decoder (remote_proto::FrameCodec) on arbitrary bytes, cut
//! into arbitrary pieces: every input yields frames or frame errors, never a panic, and the
//! decoder never holds more than one frame's worth of buffered input.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use remote_proto::{MAX_FRAME_BYTES, ServerCodec};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let (cuts, body) = data.split_at(data.len().min(4));
    let step = cuts.iter().map(|b| *b as usize).sum::<usize>().max(1);
    let mut codec = ServerCodec::default();
    let mut buf = BytesMut::new();
    for chunk in body.chunks(step) {
        buf.extend_from_slice(chunk);
        while let Ok(Some(_)) = codec.decode(&mut buf) {}
        assert!(buf.len() <= MAX_FRAME_BYTES + 4 + step);
    }
    while let Ok(Some(_)) = codec.decode_eof(&mut buf) {}
});
