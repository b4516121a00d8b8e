//! `remote-relay`: the relay that agents dial out to (design.md §1, §3, §4). Agents hold a
//! tunnel to it ([`agents`]); clients list agents and sessions and converse with sessions
//! through it ([`api`], [`converse`]); it persists the sessions' output ([`store`]) so that
//! a session can be received and attached from any machine, even while its agent is offline.
//! [`server`] is the accept loop and authentication; [`tunnels`] the registry of online
//! agents and their channels. It depends only on `remote-proto`, never on the agent.

pub mod agents;
pub mod api;
pub mod converse;
pub mod mirror;
pub mod segments;
pub mod server;
pub mod store;
pub mod tls;
pub mod tunnels;

pub use remote_proto::PROTOCOL_VERSION;
