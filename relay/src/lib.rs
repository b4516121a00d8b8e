//! `remote-relay`: the relay that agents dial out to (design.md §1, §3, §4). This crate is a
//! skeleton in the workspace layout; the gRPC tunnel, the client service and the session
//! store arrive with the relay issue (issue 5). It depends only on `remote-proto`, never on
//! the agent.

pub use remote_proto::PROTOCOL_VERSION;
