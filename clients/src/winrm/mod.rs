//! The WinRM transport (`winrm://` over HTTP, port 5985; `winrms://` over HTTPS, 5986; path
//! `/wsman`): WS-Management's WinRS cmd shell, as Windows and remote-agent serve it
//! (../shared/spec/winrm.md §1–§5).
//!
//! * [`soap`]: the requests (Create, Command, Send, Receive, Signal, Delete) and the parsing
//!   of their answers and of SOAP faults;
//! * [`http`]: one HTTP/1.1 connection per target, Basic or NTLM authentication, message
//!   sealing over plain HTTP;
//! * [`ntlm`]: the NTLM client context (sspi); [`tls`]: certificate trust for HTTPS;
//! * [`command`]: a command running in a shell, its output as events ([`RemoteCommand`]).
//!
//! How the `remote` commands map onto WinRM: `run` = Create a shell, Command, Receive until
//! done, Signal terminate, Delete; `session new` = Create (the ShellId is the session id);
//! `exec` = Command + Receive in that shell; `receive` = Receive for the commands this machine
//! started detached in it; `session rm` = Delete. A WinRM shell has no journal: output is
//! handed out once, to whoever asks for it first.

pub mod command;
pub mod http;
#[cfg(test)]
mod loopback_tests;
pub mod ntlm;
pub mod soap;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;

use crate::auth::Credentials;
use crate::target::{Scheme, Target};
pub use command::{Cleanup, RemoteCommand, Stdin};
use http::{Endpoint, Transport};
use soap::{Fault, Received, Request, ShellOptions};
use tls::{TlsError, Trust};

/// Time given to the server for an ordinary operation (its OperationTimeout).
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one Receive may wait for output before the server answers TimedOut.
pub const RECEIVE_WAIT: Duration = Duration::from_secs(20);
/// Added to the OperationTimeout for the HTTP round trip (pywinrm uses read timeout 30 s
/// over an operation timeout of 20 s).
const HTTP_SLACK: Duration = Duration::from_secs(30);

/// How the client logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// NTLM under `Negotiate`; over HTTP every message is encrypted with its keys.
    Ntlm,
    /// User and password in every request; clear text over HTTP.
    Basic,
}

impl AuthMethod {
    pub fn parse(s: &str) -> Option<AuthMethod> {
        match s.to_ascii_lowercase().as_str() {
            "ntlm" | "negotiate" => Some(AuthMethod::Ntlm),
            "basic" => Some(AuthMethod::Basic),
            _ => None,
        }
    }
}

/// Why a WinRM operation failed; every message says where and what to do next.
#[derive(Debug, Error)]
pub enum WinrmError {
    #[error(
        "cannot resolve host name '{host}' ({reason}): check the spelling, or use an IP address"
    )]
    Resolve { host: String, reason: String },
    #[error(
        "connection to {addr} refused: is remote-agent (or the Windows WinRM service) running there and listening on that port? (remote-agent status; {flag})"
    )]
    Refused { addr: String, flag: &'static str },
    #[error(
        "connection to {addr} timed out after {secs} s: is the host up, and port {port} open in its firewall? (raise the limit with --connect-timeout SECS)"
    )]
    ConnectTimeout { addr: String, port: u16, secs: u64 },
    #[error("cannot connect to {addr}: {error}; check the network route to that host")]
    Connect { addr: String, error: std::io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "connection to {addr} lost ({reason}): is that port a WinRM listener (winrm:// is plain HTTP, winrms:// HTTPS)? If it is, the server may have stopped or the network dropped; try again"
    )]
    Lost { addr: String, reason: String },
    #[error(
        "{addr} did not answer the {what} request within {secs} s: the server may be overloaded or stuck; try again, or check it (remote-agent status)"
    )]
    Timeout {
        addr: String,
        what: &'static str,
        secs: u64,
    },
    #[error(
        "Basic authentication over http:// to {addr} is refused: it would send the password and every command in clear text. \
         Use winrms://, or leave out --auth basic (NTLM encrypts over http://), or add '{host}' to {path} if this network is trusted"
    )]
    BasicOverHttp {
        addr: String,
        host: String,
        path: PathBuf,
    },
    #[error(
        "no password to log in as '{user}' to {addr}: WinRM needs one; set REMOTE_PASSWORD, use --password-stdin, or run where a terminal can ask"
    )]
    NoPassword { user: String, addr: String },
    #[error("{method} authentication as '{user}' to {addr} was rejected: {hint}")]
    AuthRejected {
        user: String,
        addr: String,
        method: &'static str,
        hint: String,
    },
    #[error("{addr} does not offer {method} authentication (it offers: {offered}): {hint}")]
    AuthNotOffered {
        addr: String,
        method: &'static str,
        offered: String,
        hint: &'static str,
    },
    #[error("{addr}: {error}")]
    Ntlm {
        addr: String,
        error: ntlm::NtlmError,
    },
    #[error(
        "{addr} answered the {what} request with HTTP {status}{detail}; is that a WinRM listener (path /wsman)?"
    )]
    Status {
        addr: String,
        what: &'static str,
        status: u16,
        detail: String,
    },
    #[error("{addr}: {what} failed: {}{hint}", fault.describe())]
    Fault {
        addr: String,
        what: &'static str,
        fault: Box<Fault>,
        hint: String,
    },
    #[error(
        "{addr} sent an answer to {what} that this client cannot read ({detail}): is that a WinRM server? (remote --version; remote-agent --version)"
    )]
    Protocol {
        addr: String,
        what: &'static str,
        detail: String,
    },
    #[error(transparent)]
    Request(#[from] soap::RequestError),
    #[error("{addr}: interrupted before the command started")]
    Interrupted { addr: String },
    #[error("{what} is not available over WinRM ({target}): {hint}")]
    Unsupported {
        what: &'static str,
        target: String,
        hint: &'static str,
    },
    #[error("{addr}: internal error: {detail}")]
    Internal { addr: String, detail: String },
}

impl WinrmError {
    /// The SOAP fault, when the server sent one.
    pub fn fault(&self) -> Option<&Fault> {
        match self {
            WinrmError::Fault { fault, .. } => Some(fault),
            _ => None,
        }
    }
}

/// What to add to a fault's message so the user knows what to do.
fn fault_hint(fault: &Fault, what: &str) -> String {
    match fault.wsman_code {
        Some(soap::CODE_INVALID_SELECTORS) if what == "Delete shell" => {
            ": it was already closed there, or idled out".into()
        }
        Some(soap::CODE_INVALID_SELECTORS) => {
            ": the shell (session) no longer exists there: it was closed, or idled out; open a new one with `remote session new`".into()
        }
        // remote-agent's own access-denied text already names the endpoint and the fix.
        Some(5) if fault.reason.contains("access denied:") => String::new(),
        Some(5) => ": this account may not use WinRM on that host; ask its admin for access".into(),
        Some(2150859173) => {
            ": you have too many shells open there; close some (remote session rm) or wait for them to idle out".into()
        }
        Some(2150859174) => ": too many commands run in that shell; close it and open a new one".into(),
        _ => String::new(),
    }
}

/// Settings shared by every WinRM target.
#[derive(Clone)]
pub struct ClientOptions {
    pub auth: AuthMethod,
    pub connect_timeout: Duration,
    /// Login name for targets without `user@`.
    pub default_user: String,
    /// How HTTPS certificates are checked.
    pub trust: Trust,
    /// The trusted-hosts list that allows Basic over plain HTTP.
    pub trusted_hosts: PathBuf,
}

/// Connects to WinRM targets with shared credentials and trust.
pub struct Client {
    credentials: Arc<Credentials>,
    options: ClientOptions,
}

impl Client {
    pub fn new(credentials: Arc<Credentials>, options: ClientOptions) -> Client {
        Client {
            credentials,
            options,
        }
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Connect to `target` (winrm:// or winrms://) and log in.
    pub async fn connect(&self, target: &Target) -> Result<Connection, WinrmError> {
        let addr = target.host_port();
        let user = target
            .user
            .clone()
            .unwrap_or_else(|| self.options.default_user.clone());
        let tls = target.scheme == Scheme::Winrms;
        if self.options.auth == AuthMethod::Basic
            && !tls
            && !crate::config::is_trusted_host(
                &self.options.trusted_hosts,
                &target.host,
                target.port,
            )
        {
            return Err(WinrmError::BasicOverHttp {
                addr,
                host: target.host.clone(),
                path: self.options.trusted_hosts.clone(),
            });
        }
        let password = self
            .credentials
            .password(&user, &addr)
            .await
            .ok_or_else(|| WinrmError::NoPassword {
                user: user.clone(),
                addr: addr.clone(),
            })?;
        let transport = Transport::connect(Endpoint {
            target: target.clone(),
            user,
            password,
            auth: self.options.auth,
            trust: tls.then(|| self.options.trust.clone()),
            connect_timeout: self.options.connect_timeout,
        })
        .await?;
        let scheme = if tls { "https" } else { "http" };
        Ok(Connection {
            transport,
            url: format!("{scheme}://{addr}/wsman"),
            addr,
        })
    }
}

/// A logged-in connection to one WinRM endpoint; requests on it are sequential.
pub struct Connection {
    transport: Transport,
    url: String,
    addr: String,
}

impl Connection {
    /// `host:port`, for messages.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The user logged in as.
    pub fn user(&self) -> &str {
        &self.transport.endpoint().user
    }

    /// Send `request`; a 200 gives the body, a 500 the SOAP fault as an error.
    async fn call(
        &mut self,
        request: &Request,
        what: &'static str,
        timeout: Duration,
    ) -> Result<Bytes, WinrmError> {
        tracing::debug!(addr = %self.addr, what, "WinRM request");
        let (status, body) = self
            .transport
            .post(&request.xml, what, timeout + HTTP_SLACK)
            .await?;
        if status.is_success() {
            return Ok(body);
        }
        if let Some(fault) = soap::parse_fault(&body) {
            let hint = fault_hint(&fault, what);
            return Err(WinrmError::Fault {
                addr: self.addr.clone(),
                what,
                fault: Box::new(fault),
                hint,
            });
        }
        Err(WinrmError::Status {
            addr: self.addr.clone(),
            what,
            status: status.as_u16(),
            detail: http::body_snippet(&body),
        })
    }

    fn protocol(&self, what: &'static str) -> impl FnOnce(soap::ParseError) -> WinrmError {
        let addr = self.addr.clone();
        move |e| WinrmError::Protocol {
            addr,
            what,
            detail: e.to_string(),
        }
    }

    /// Create a cmd shell; returns its ShellId.
    pub async fn create_shell(&mut self, options: &ShellOptions) -> Result<String, WinrmError> {
        let req = soap::create_shell(&self.url, options, OPERATION_TIMEOUT);
        let body = self.call(&req, "Create shell", OPERATION_TIMEOUT).await?;
        soap::parse_create(&body, &req).map_err(self.protocol("Create shell"))
    }

    /// Start `line` in `shell`; returns its CommandId.
    pub async fn command(&mut self, shell: &str, line: &str) -> Result<String, WinrmError> {
        let req = soap::command(&self.url, shell, line, OPERATION_TIMEOUT)?;
        let body = self.call(&req, "Command", OPERATION_TIMEOUT).await?;
        soap::parse_command(&body, &req).map_err(self.protocol("Command"))
    }

    /// Write to the command's stdin; `end` closes it.
    pub async fn send_input(
        &mut self,
        shell: &str,
        command: &str,
        data: &[u8],
        end: bool,
    ) -> Result<(), WinrmError> {
        let req = soap::send(&self.url, shell, command, data, end, OPERATION_TIMEOUT);
        let body = self.call(&req, "Send", OPERATION_TIMEOUT).await?;
        soap::parse_ack(&body, &req).map_err(self.protocol("Send"))
    }

    /// Output and state of a command, waiting up to `wait` for something to happen; `None`
    /// when nothing did (the server's TimedOut fault).
    pub async fn receive(
        &mut self,
        shell: &str,
        command: &str,
        wait: Duration,
    ) -> Result<Option<Received>, WinrmError> {
        let req = soap::receive(&self.url, shell, command, wait);
        match self.call(&req, "Receive", wait).await {
            Ok(body) => soap::parse_receive(&body, &req, command)
                .map(Some)
                .map_err(self.protocol("Receive")),
            Err(WinrmError::Fault { fault, .. }) if fault.is_timeout() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Signal a command: [`soap::SIGNAL_TERMINATE`] or [`soap::SIGNAL_CTRL_C`].
    pub async fn signal(
        &mut self,
        shell: &str,
        command: &str,
        code: &str,
    ) -> Result<(), WinrmError> {
        let req = soap::signal(&self.url, shell, command, code, OPERATION_TIMEOUT);
        let body = self.call(&req, "Signal", OPERATION_TIMEOUT).await?;
        soap::parse_ack(&body, &req).map_err(self.protocol("Signal"))
    }

    /// Close the shell and everything running in it.
    pub async fn delete_shell(&mut self, shell: &str) -> Result<(), WinrmError> {
        let req = soap::delete(&self.url, shell, OPERATION_TIMEOUT);
        let body = self.call(&req, "Delete shell", OPERATION_TIMEOUT).await?;
        soap::parse_ack(&body, &req).map_err(self.protocol("Delete shell"))
    }
}

/// `exit code` of a WinRM command as the `remote` exit status: 0–255 as is; anything else
/// (Windows NTSTATUS values, negative codes) becomes 255 via [`crate::ssh::Exit::code`].
pub fn exit_of(code: i64) -> crate::ssh::Exit {
    let c = u32::try_from(code).unwrap_or((code as i32) as u32);
    crate::ssh::Exit::Code(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_methods() {
        assert_eq!(AuthMethod::parse("NTLM"), Some(AuthMethod::Ntlm));
        assert_eq!(AuthMethod::parse("negotiate"), Some(AuthMethod::Ntlm));
        assert_eq!(AuthMethod::parse("basic"), Some(AuthMethod::Basic));
        assert_eq!(AuthMethod::parse("kerberos"), None);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_of(3).code(), 3);
        assert_eq!(exit_of(143).code(), 143);
        assert_eq!(exit_of(3221225786).code(), 255);
        assert_eq!(exit_of(-1).code(), 255);
    }

    #[test]
    fn faults_get_hints() {
        let f = Fault {
            wsman_code: Some(soap::CODE_INVALID_SELECTORS),
            reason: "The shell was not found.".into(),
            ..Fault::default()
        };
        let e = WinrmError::Fault {
            addr: "h:5985".into(),
            what: "Command",
            hint: fault_hint(&f, "Command"),
            fault: Box::new(f),
        };
        let text = e.to_string();
        assert!(
            text.starts_with(
                "h:5985: Command failed: The shell was not found. [WSManFault 2150858843]"
            ),
            "{text}"
        );
        assert!(text.contains("remote session new"), "{text}");
    }
}
