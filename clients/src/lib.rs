//! `remote-client`: the client library and the `remote` command (design.md §5). This crate is
//! a skeleton in the workspace layout; the SSH transport and the `remote run|shell|session|
//! exec|attach|receive` commands arrive with the persistent-sessions issue (issue 3). It
//! depends only on `remote-proto`, never on the agent.

pub use remote_proto::PROTOCOL_VERSION;
