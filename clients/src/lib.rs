//! `remote-client`: the client library behind the `remote` command (design.md §5).
//!
//! * [`target`]: `[scheme://][user@]host[:port]` targets;
//! * [`config`]: where client state lives (`$XDG_CONFIG_HOME/remote`);
//! * [`known_hosts`]: host key trust (accept new, refuse changed);
//! * [`auth`]: credentials (keys, ssh-agent, password);
//! * [`net`]: resolving and connecting over TCP, for every transport;
//! * [`ssh`]: connect, authenticate, run commands and shells over russh's client;
//! * [`winrm`]: the same commands over WS-Management (`winrm://`, `winrms://`): HTTP(S),
//!   Basic or NTLM with message encryption, the WinRS cmd shell;
//! * [`run`]: `remote run`, one command on many targets at once;
//! * [`session`]: persistent sessions: the session protocol on the `remote` subsystem, and
//!   how sessions are named; [`follow`]: `exec`, `attach` and `receive` on the terminal;
//! * [`shell`]: `remote shell`, an interactive shell;
//! * [`diagnose`]: `remote test`, the chain to a target checked link by link;
//! * [`output`], [`terminal`]: local stdout/stderr and the local terminal.
//!
//! It depends only on `remote-proto`, never on the agent.

pub mod auth;
pub mod config;
pub mod diagnose;
pub mod follow;
pub mod known_hosts;
pub mod net;
pub mod output;
pub mod relay;
pub mod run;
pub mod session;
pub mod shell;
pub mod ssh;
pub mod target;
pub mod terminal;
pub mod winrm;

pub use remote_proto::PROTOCOL_VERSION;

/// A note for the user on stderr: `remote: MESSAGE`.
pub fn notice(message: &str) {
    eprintln!("remote: {message}");
}
