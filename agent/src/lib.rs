//! `remote-agent`: the agent that runs on every server. It accepts commands over its
//! built-in SSH server, WinRM and a tunnel to a relay, authenticates them against its own
//! accounts, and runs them as the account's OS user.

pub mod accounts;
pub mod audit;
pub mod config;
pub mod enable;
pub mod endpoint_config;
pub mod endpoints;
pub mod hostkey;
pub mod local;
pub mod login;
pub mod paths;
pub mod process;
pub mod relay_link;
pub mod session;
pub mod sftp;
pub mod ssh;
pub mod winrm;
pub mod wire;
