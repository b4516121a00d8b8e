//! What agents and clients send the relay, on arbitrary bytes: the tunnel's framing (a
//! TunnelOpen under its 4 KiB bound, then messages), tunnel messages, conversation
//! requests and the session frames inside them decode or fail, never panic; whatever an
//! agent reports (sessions, spilled records) maps onto store rows and back without panics,
//! with every text clipped; relay addresses as people type them parse or are refused.
#![no_main]

use std::future::Future;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use remote_proto::relay::TunnelOpen;
use remote_proto::relay::{AgentMessage, ConverseRequest, agent_message, converse_request};
use remote_proto::session::{ClientFrame, ServerFrame};
use remote_proto::tunnel::{self, FrameReader};
use remote_relay::mirror;

/// The bytes as a tunnel connection: TunnelOpen, then AgentMessages. Reading from a slice
/// never waits, so one poll per message settles it.
fn framed(data: &[u8]) {
    let mut reader = FrameReader::new(tunnel::MAX_OPEN_BYTES);
    let mut input = data;
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut first = true;
    loop {
        let polled = {
            let next = std::pin::pin!(reader.next(&mut input));
            next.poll(&mut cx)
        };
        let std::task::Poll::Ready(Ok(Some(bytes))) = polled else {
            return;
        };
        if first {
            assert!(bytes.len() <= tunnel::MAX_OPEN_BYTES);
            let _ = TunnelOpen::decode(bytes.as_slice());
            reader.set_max(tunnel::MAX_MESSAGE_BYTES);
            first = false;
        } else {
            let _ = AgentMessage::decode(bytes.as_slice());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    framed(data);
    if let Ok(m) = AgentMessage::decode(data) {
        match m.msg {
            Some(agent_message::Msg::Hello(h)) => {
                for s in &h.sessions {
                    let row = mirror::session_row("agent", s);
                    assert!(row.owner.chars().count() <= 256 && row.name.chars().count() <= 256);
                    let _ = mirror::session_info(&row, 1, 0);
                }
            }
            Some(agent_message::Msg::Session(u)) => {
                if let Some(s) = &u.session {
                    let _ = mirror::session_row("agent", s);
                }
            }
            Some(agent_message::Msg::Spill(b)) => {
                for r in &b.records {
                    if let Some(row) = mirror::record_row(r.clone()) {
                        let back = mirror::record(row);
                        assert_eq!(back.seq, r.seq);
                    }
                }
            }
            Some(agent_message::Msg::Channel(c)) => {
                let _ = ServerFrame::decode(c.frame.as_slice());
            }
            _ => {}
        }
    }
    if let Ok(ConverseRequest {
        msg: Some(converse_request::Msg::Frame(f)),
    }) = ConverseRequest::decode(data)
    {
        let _ = ClientFrame::decode(f.as_slice());
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Some((host, addr)) = remote_proto::parse_relay_addr(text)
    {
        assert!(!host.is_empty() && addr.contains(':'));
    }
});
