//! What agents and clients send the relay, on arbitrary bytes: tunnel messages, conversation
//! requests and the session frames inside them decode or fail, never panic; whatever an
//! agent reports (sessions, spilled records) maps onto store rows and back without panics,
//! with every text clipped; relay addresses as people type them parse or are refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use remote_proto::relay::{AgentMessage, ConverseRequest, agent_message, converse_request};
use remote_proto::session::{ClientFrame, ServerFrame};
use remote_relay::mirror;

fuzz_target!(|data: &[u8]| {
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
