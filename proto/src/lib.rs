//! `remote-proto`: the wire types shared by the agent, the relay and the clients
//! (design.md §3). The session protocol (`session.proto`, length-delimited frames on the SSH
//! subsystem `remote`) lands here with the persistent-sessions work (issue 3) and the relay
//! tunnel protocol (`relay.proto`) with the relay (issue 5). Until then this crate holds only
//! the protocol version that every part agrees on.

/// Version of the `remote` wire protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;
