//! The WinRM transport (WS-Management cmd shell, ../shared/spec/winrm.md): an adapter onto the
//! session host, like the SSH one, and unaware of it. [`http`] owns the listeners, the
//! connections and who is logged in on them (Basic, or [`ntlm`]'s guarded NTLM/SPNEGO
//! acceptor with message sealing); [`soap`] turns envelopes into typed operations and
//! responses or faults into envelopes; [`shell`] carries the operations out on the session
//! host; [`tls`] owns the HTTPS certificate.

pub mod http;
pub mod ntlm;
pub mod shell;
pub mod soap;
pub mod tls;
