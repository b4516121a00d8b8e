//! `remote-relay`: the relay that agents dial out to (design.md §1, §3, §4). Issue 5 is in
//! progress: [`store`] (agents, join tokens, users, sessions and their persisted journal, on
//! SQLite or PostgreSQL through sqlx) and the administration commands of the binary are
//! here; the gRPC services of proto/relay.proto, `remote-relay run` and the agent's tunnel
//! come next. It depends only on `remote-proto`, never on the agent.

pub mod store;

pub use remote_proto::PROTOCOL_VERSION;
