//! The WinRM transport (WS-Management cmd shell, ../shared/spec/winrm.md): an adapter onto the
//! session host, like the SSH one. So far it holds the SOAP layer ([`soap`]): requests parsed
//! into typed operations with hard limits and namespace checks by URI, responses and faults
//! as pywinrm and pypsrp read them. The HTTP listener, authentication and the shell
//! operations on the session host come next (issue 4).

pub mod http;
pub mod ntlm;
pub mod shell;
pub mod soap;
pub mod tls;
