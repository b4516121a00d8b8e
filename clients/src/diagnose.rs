//! `remote test TARGET` (design.md §6): walks the chain from this machine to a target and
//! stops at the first broken link, printing each step as it goes and, on failure, what
//! happened, where, and what to do next. This module owns the steps, their report (text, or
//! one JSON object per step with `--json`), the probe that tells which service answers on a
//! port (SSH version line, HTTP, TLS), and the exit codes. Connections, trust and logins
//! are the client's own ([`crate::net`], [`crate::ssh`], [`crate::winrm`], [`crate::relay`],
//! [`crate::session`]), so a test sees what `remote run` and `remote session new` would.
//!
//! The steps, and the exit code when a step fails:
//!
//! | step | checks | exit |
//! |---|---|---|
//! | name | the host name resolves (the relay's, for `relay://`) | 11 |
//! | tcp | a TCP connection opens | 12 |
//! | protocol | the port speaks the scheme's protocol (SSH version line, HTTP, TLS), the host key or certificate is trusted | 13 |
//! | auth | the credentials `remote` would use log in (key, ssh-agent, password; the relay token) | 14 |
//! | endpoint | a session opens on `--endpoint NAME` (default `default`) | 15 |
//! | command | `echo remote-test-ok` runs there and prints that | 16 |
//!
//! 0 means healthy; 255 that the test could not start (a target that does not parse).
//!
//! A test changes no trust: a host key or certificate seen for the first time is reported as
//! "would be trusted on first use", accepted for the test's own connections, and not
//! recorded (the next `remote` command to that host records it, as usual). A recorded key
//! that differs fails loudly, with the file and line, as every command does. The session a
//! test opens is closed again (SSH, relay) or its WinRM shell deleted.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use remote_proto::session::{
    CloseSession, ErrorCode, OpenSession, RunCommand, Shape, Stream, client_frame, record,
    server_frame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::{CredentialError, CredentialOptions, Credentials};
use crate::config;
use crate::known_hosts::{KnownHosts, Verdict};
use crate::net::{self, ConnectFailure};
use crate::relay::{RelayClient, RelayError, RelayOptions};
use crate::run::json_string;
use crate::session::{SessionChannel, SessionError};
use crate::ssh::{self, ProcessEvent, SshError};
use crate::target::{
    DEFAULT_RELAY_PORT, DEFAULT_SSH_PORT, DEFAULT_WINRM_PORT, DEFAULT_WINRMS_PORT, Scheme, Target,
};
use crate::winrm::tls::{self, TlsError, Trust};
use crate::winrm::{self, AuthMethod, WinrmError};

/// The command the last step runs, and what it must print.
pub const PROBE_COMMAND: &str = "echo remote-test-ok";
const PROBE_OUTPUT: &str = "remote-test-ok";
/// How long a port may stay silent before the probe speaks first (an SSH server sends its
/// version line at once; HTTP and TLS servers wait for the client).
const SILENCE: Duration = Duration::from_secs(2);
/// Limit for opening the session and for running the command.
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);

/// What `remote test` was asked to check, and with which credentials and trust.
#[derive(Debug, Clone)]
pub struct TestOptions {
    /// The target as written.
    pub target: String,
    /// `--endpoint NAME` (`None`: the agent's `default`).
    pub endpoint: Option<String>,
    /// One JSON object per step on stdout instead of text.
    pub json: bool,
    pub connect_timeout: Duration,
    pub credentials: CredentialOptions,
    /// WinRM login method (`--auth`).
    pub auth: AuthMethod,
    /// `--ca FILE` (winrms://, relay).
    pub ca: Option<PathBuf>,
    /// `--fingerprint SHA256:…` (winrms://, relay).
    pub fingerprint: Option<String>,
    /// `--relay HOST[:PORT]` / REMOTE_RELAY, for relay:// targets.
    pub relay: Option<String>,
    /// REMOTE_TOKEN.
    pub relay_token: Option<String>,
}

/// The links of the chain, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Name,
    Tcp,
    Protocol,
    Auth,
    Endpoint,
    Command,
}

impl Step {
    /// The exit code of `remote test` when this step fails.
    pub fn exit_code(self) -> i32 {
        match self {
            Step::Name => 11,
            Step::Tcp => 12,
            Step::Protocol => 13,
            Step::Auth => 14,
            Step::Endpoint => 15,
            Step::Command => 16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Step::Name => "name",
            Step::Tcp => "tcp",
            Step::Protocol => "protocol",
            Step::Auth => "auth",
            Step::Endpoint => "endpoint",
            Step::Command => "command",
        }
    }
}

/// A broken link: a short summary for the step's line, and the whole story (what, where,
/// next step) for the line under it.
struct Failure {
    step: Step,
    /// What the line is about (`ssh`, `host key`, `tls`, …; usually the step's name).
    check: &'static str,
    summary: String,
    message: String,
}

impl Failure {
    fn new(
        step: Step,
        check: &'static str,
        summary: impl Into<String>,
        message: impl Into<String>,
    ) -> Failure {
        Failure {
            step,
            check,
            summary: summary.into(),
            message: message.into(),
        }
    }
}

/// Prints the steps as they complete.
struct Report {
    json: bool,
}

impl Report {
    fn ok(&self, step: Step, check: &str, detail: &str) {
        if self.json {
            out(format_args!(
                "{{\"step\":{},\"check\":{},\"ok\":true,\"detail\":{}}}",
                json_string(step.name()),
                json_string(check),
                json_string(detail)
            ));
        } else {
            out(format_args!("ok   {check:<9} {detail}"));
        }
    }

    fn fail(&self, f: &Failure) -> i32 {
        let code = f.step.exit_code();
        if self.json {
            out(format_args!(
                "{{\"step\":{},\"check\":{},\"ok\":false,\"detail\":{},\"message\":{},\"exit_code\":{code}}}",
                json_string(f.step.name()),
                json_string(f.check),
                json_string(&f.summary),
                json_string(&f.message)
            ));
        } else {
            out(format_args!("FAIL {:<9} {}", f.check, f.summary));
            out(format_args!("     {}", f.message));
        }
        code
    }

    fn healthy(&self, target: &Target) -> i32 {
        if self.json {
            out(format_args!(
                "{{\"step\":\"result\",\"check\":\"result\",\"ok\":true,\"detail\":{},\"exit_code\":0}}",
                json_string(&format!("{} is healthy", target.spec))
            ));
        } else {
            out(format_args!("ok: {} is healthy", target.spec));
        }
        0
    }
}

/// One line of the report on stdout; a closed stdout (`remote test … | head -1`) is not an
/// error of the test.
fn out(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// Run `remote test`; returns the exit code (see the module comment).
pub async fn test(opts: TestOptions) -> i32 {
    let target = match Target::parse(&opts.target) {
        Ok(t) => t,
        Err(e) => {
            crate::notice(&e.to_string());
            return 255;
        }
    };
    let report = Report { json: opts.json };
    let t = Tester {
        opts,
        target,
        report,
    };
    match t.walk().await {
        Ok(()) => t.report.healthy(&t.target),
        Err(f) => t.report.fail(&f),
    }
}

struct Tester {
    opts: TestOptions,
    target: Target,
    report: Report,
}

/// Where the TCP connection goes: the target, or for relay:// the relay.
struct Dest {
    host: String,
    port: u16,
    /// `host:port` for messages.
    addr: String,
}

impl Tester {
    fn timeout(&self) -> Duration {
        self.opts.connect_timeout
    }

    async fn walk(&self) -> Result<(), Failure> {
        let dest = self.dest()?;
        let addrs = self.resolve(&dest).await?;
        let (stream, reached) = self.connect(&dest, &addrs).await?;
        match self.target.scheme {
            Scheme::Ssh => self.ssh(stream, reached, &dest).await,
            Scheme::Winrm | Scheme::Winrms => self.winrm(stream, reached, &dest).await,
            Scheme::Relay => self.relay(stream, reached, &dest).await,
        }
    }

    fn dest(&self) -> Result<Dest, Failure> {
        if !self.target.is_relay() {
            return Ok(Dest {
                host: self.target.host.clone(),
                port: self.target.port,
                addr: self.target.host_port(),
            });
        }
        let Some(given) = self.opts.relay.clone().filter(|r| !r.trim().is_empty()) else {
            let e = RelayError::NoRelay {
                what: format!("target {}", self.target.spec),
            };
            return Err(Failure::new(
                Step::Name,
                "relay",
                "no relay named",
                e.to_string(),
            ));
        };
        let Some((host, addr)) = remote_proto::parse_relay_addr(&given) else {
            let e = RelayError::BadAddress(given);
            return Err(Failure::new(
                Step::Name,
                "relay",
                "invalid relay address",
                e.to_string(),
            ));
        };
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(DEFAULT_RELAY_PORT);
        Ok(Dest { host, port, addr })
    }

    /// Step 1: the name.
    async fn resolve(&self, dest: &Dest) -> Result<Vec<SocketAddr>, Failure> {
        let whose = if self.target.is_relay() {
            "the relay's host name"
        } else {
            "host name"
        };
        match net::resolve(&dest.host, dest.port, self.timeout()).await {
            Ok(addrs) => {
                let mut ips: Vec<String> = Vec::new();
                for a in &addrs {
                    let ip = a.ip().to_string();
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
                let detail = if dest.host.parse::<std::net::IpAddr>().is_ok() {
                    format!("{} (an address, nothing to resolve)", dest.host)
                } else {
                    format!("{} → {}", dest.host, ips.join(", "))
                };
                self.report.ok(Step::Name, "name", &detail);
                Ok(addrs)
            }
            Err(failure) => {
                let reason = match failure {
                    ConnectFailure::Resolve(r) => r,
                    other => format!("{other:?}"),
                };
                Err(Failure::new(
                    Step::Name,
                    "name",
                    format!("cannot resolve '{}'", dest.host),
                    format!(
                        "cannot resolve {whose} '{host}' ({reason}): check the spelling, its DNS record \
                         (getent hosts {host}) or /etc/hosts on this machine, or use an IP address",
                        host = dest.host
                    ),
                ))
            }
        }
    }

    /// Step 2: TCP.
    async fn connect(
        &self,
        dest: &Dest,
        addrs: &[SocketAddr],
    ) -> Result<(TcpStream, SocketAddr), Failure> {
        let started = Instant::now();
        match net::connect_addrs(addrs, self.timeout()).await {
            Ok((stream, reached)) => {
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                self.report
                    .ok(Step::Tcp, "tcp", &format!("{reached} ({ms:.1} ms)"));
                Ok((stream, reached))
            }
            Err(ConnectFailure::Refused) => {
                let (service, flag, port) = self.listener();
                Err(Failure::new(
                    Step::Tcp,
                    "tcp",
                    format!("{}: connection refused", dest.addr),
                    format!(
                        "nothing is listening on {}: is {service} running there and listening on that port? \
                         ({flag}, default port {port})",
                        dest.addr
                    ),
                ))
            }
            Err(ConnectFailure::Timeout) => Err(Failure::new(
                Step::Tcp,
                "tcp",
                format!("{}: no answer", dest.addr),
                format!(
                    "no answer from {} within {} s: is the host up, and port {} open in its firewall \
                     and in any firewall on the way? (raise the limit with --connect-timeout SECS)",
                    dest.addr,
                    self.timeout().as_secs().max(1),
                    dest.port
                ),
            )),
            Err(ConnectFailure::Io(e)) => Err(Failure::new(
                Step::Tcp,
                "tcp",
                format!("{}: {e}", dest.addr),
                format!(
                    "cannot connect to {}: {e}; check this machine's network and its route to that host",
                    dest.addr
                ),
            )),
            Err(ConnectFailure::Resolve(reason)) => Err(Failure::new(
                Step::Name,
                "name",
                format!("cannot resolve '{}'", dest.host),
                format!("cannot resolve '{}' ({reason}): check the name", dest.host),
            )),
        }
    }

    /// Who should be listening for this scheme: the program, how to check it, its port.
    fn listener(&self) -> (&'static str, &'static str, u16) {
        match self.target.scheme {
            Scheme::Ssh => (
                "remote-agent",
                "remote-agent status; --ssh",
                DEFAULT_SSH_PORT,
            ),
            Scheme::Winrm => (
                "remote-agent (or the Windows WinRM service)",
                "remote-agent status; --winrm-http",
                DEFAULT_WINRM_PORT,
            ),
            Scheme::Winrms => (
                "remote-agent (or the Windows WinRM service)",
                "remote-agent status; --winrm-https",
                DEFAULT_WINRMS_PORT,
            ),
            Scheme::Relay => (
                "remote-relay",
                "remote-relay run --listen ADDR",
                DEFAULT_RELAY_PORT,
            ),
        }
    }

    /// The host tested (the relay's, for relay://) written with `scheme` and `port`.
    fn as_scheme(&self, dest: &Dest, scheme: Scheme, port: u16) -> String {
        let user = match &self.target.user {
            Some(u) if !self.target.is_relay() => format!("{u}@"),
            _ => String::new(),
        };
        let host = if dest.host.contains(':') {
            format!("[{}]", dest.host)
        } else {
            dest.host.clone()
        };
        format!("{}://{user}{host}:{port}", scheme.name())
    }

    /// A port that answered with the wrong protocol (or not at all): say which one answered
    /// and what to write instead.
    fn wrong_port(&self, dest: &Dest, heard: &Heard) -> Failure {
        let addr = &dest.addr;
        let port = dest.port;
        let scheme = self.target.scheme;
        let expected = match scheme {
            Scheme::Ssh => "an SSH version line",
            Scheme::Winrm => "HTTP",
            Scheme::Winrms => "TLS (HTTPS)",
            Scheme::Relay => "TLS (the relay)",
        };
        let check = match scheme {
            Scheme::Ssh => "ssh",
            Scheme::Winrm => "http",
            Scheme::Winrms | Scheme::Relay => "tls",
        };
        let (service, flag, default_port) = self.listener();
        let right_port = || match scheme {
            Scheme::Relay => format!("the relay's port (--relay HOST:{DEFAULT_RELAY_PORT})"),
            Scheme::Ssh => format!(
                "the agent's SSH port: {}",
                self.as_scheme(dest, scheme, default_port)
            ),
            Scheme::Winrm => format!(
                "the WinRM HTTP port: {}",
                self.as_scheme(dest, scheme, default_port)
            ),
            Scheme::Winrms => format!(
                "the WinRM HTTPS port: {}",
                self.as_scheme(dest, scheme, default_port)
            ),
        };
        let (summary, message) = match heard {
            Heard::Ssh(line) => (
                format!("{addr} speaks SSH, not {expected}"),
                format!(
                    "{addr} answered with an SSH version line ('{line}'), not {expected}: that port is an SSH \
                     listener (remote-agent's --ssh, default port {DEFAULT_SSH_PORT}). To use it, write {}; \
                     otherwise use {}",
                    self.as_scheme(dest, Scheme::Ssh, port),
                    right_port()
                ),
            ),
            Heard::Http { status, .. } => {
                let instead = if scheme == Scheme::Relay {
                    "it is not a relay".to_string()
                } else {
                    format!(
                        "to use it, write {}",
                        self.as_scheme(dest, Scheme::Winrm, port)
                    )
                };
                (
                    format!("{addr} speaks HTTP, not {expected}"),
                    format!(
                        "{addr} answered in plain HTTP ('{status}'), not {expected}: that port is a web or WinRM \
                         HTTP listener (remote-agent's --winrm-http, default port {DEFAULT_WINRM_PORT}); \
                         {instead}; otherwise use {}",
                        right_port()
                    ),
                )
            }
            Heard::Tls => (
                format!("{addr} speaks TLS, not {expected}"),
                format!(
                    "{addr} speaks TLS, not {expected}: that port is an HTTPS listener (remote-agent's \
                     --winrm-https, default port {DEFAULT_WINRMS_PORT}) or a relay (default port \
                     {DEFAULT_RELAY_PORT}). To use it for WinRM, write {}; otherwise use {}",
                    self.as_scheme(dest, Scheme::Winrms, port),
                    right_port()
                ),
            ),
            Heard::Closed => (
                format!("{addr} closed the connection without a word"),
                format!(
                    "{addr} accepted the connection and closed it without sending {expected}: is that port \
                     {service}'s listener? ({flag}, default port {default_port}); the server may also be \
                     refusing this machine (check its log)"
                ),
            ),
            Heard::Silent => (
                format!("{addr} said nothing"),
                format!(
                    "{addr} accepted the connection but answered neither with {expected} nor to an HTTP \
                     request within {} s: is that port {service}'s listener? ({flag}, default port {default_port})",
                    self.timeout().as_secs().max(1)
                ),
            ),
            Heard::Other(text) => (
                format!("{addr} speaks something else"),
                format!(
                    "{addr} answered '{text}', which is not {expected}: another service owns that port; \
                     {service}'s listener is {flag} (default port {default_port})"
                ),
            ),
        };
        Failure::new(Step::Protocol, check, summary, message)
    }

    /// The credentials `remote` would use; a credential option that cannot be used is an
    /// authentication failure, reported when that step comes.
    async fn credentials(&self) -> (Arc<Credentials>, Option<CredentialError>) {
        match Credentials::load(&self.opts.credentials).await {
            Ok(c) => (Arc::new(c), None),
            Err(e) => (Arc::new(Credentials::new(Vec::new(), None)), Some(e)),
        }
    }

    /// The trust `--ca`/`--fingerprint` ask for, with `store` for first contact, recording
    /// nothing (a test leaves no trace).
    fn trust(&self, store: std::path::PathBuf) -> Result<Trust, Failure> {
        Trust::new(
            self.opts.ca.as_deref(),
            self.opts.fingerprint.as_deref(),
            store,
            config::trusted_hosts_file(),
        )
        .map(|t| t.without_recording())
        .map_err(|e| {
            Failure::new(
                Step::Protocol,
                "tls",
                "unusable trust option",
                e.to_string(),
            )
        })
    }

    fn endpoint(&self) -> String {
        self.opts
            .endpoint
            .clone()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "default".into())
    }

    // ---- SSH ----

    async fn ssh(
        &self,
        mut stream: TcpStream,
        reached: SocketAddr,
        dest: &Dest,
    ) -> Result<(), Failure> {
        // Step 3: the version line, then the host key.
        let heard = identify(&mut stream, reached, dest, self.timeout(), false).await;
        drop(stream);
        match &heard {
            Heard::Ssh(line) => self.report.ok(Step::Protocol, "ssh", line),
            other => return Err(self.wrong_port(dest, other)),
        }
        let (credentials, credential_error) = self.credentials().await;
        let known_hosts = KnownHosts::read_only(config::known_hosts_file());
        let path = known_hosts.path().display().to_string();
        let client = ssh::Client::new(
            credentials,
            Arc::new(known_hosts),
            ssh::ClientOptions {
                connect_timeout: self.timeout(),
                default_user: config::default_user(),
            },
        );
        let handshake = match client.handshake(&self.target).await {
            Ok(h) => h,
            Err(e) => return Err(ssh_failure(e)),
        };
        match handshake.host_key() {
            Some(k) => {
                let detail = match &k.verdict {
                    Verdict::Known | Verdict::Learned { .. } => {
                        format!("{} {}, as recorded in {path}", k.algorithm, k.fingerprint)
                    }
                    Verdict::Unrecorded { .. } => format!(
                        "{} {} is new: it would be trusted on first use (remote test records nothing; \
                         the next remote command to this host records it in {path})",
                        k.algorithm, k.fingerprint
                    ),
                };
                self.report.ok(Step::Protocol, "host key", &detail);
            }
            None => self.report.ok(Step::Protocol, "host key", "accepted"),
        }
        // Step 4: log in.
        if let Some(e) = credential_error {
            return Err(Failure::new(
                Step::Auth,
                "auth",
                "credentials unusable",
                e.to_string(),
            ));
        }
        let user = handshake.user().to_string();
        let addr = handshake.addr().to_string();
        let conn = match client.login(handshake).await {
            Ok(c) => c,
            Err(e) => return Err(ssh_failure(e)),
        };
        self.report.ok(
            Step::Auth,
            "auth",
            &format!("logged in as '{user}' at {addr}"),
        );
        // Steps 5 and 6: a session on the endpoint, a command in it.
        let result = match SessionChannel::open(&conn).await {
            Ok(mut ch) => {
                let r = self.session_steps(&mut ch).await;
                ch.close().await;
                r
            }
            Err(SessionError::Ssh(SshError::RequestRefused { .. })) => self.plain_exec(&conn).await,
            Err(e) => Err(Failure::new(
                Step::Endpoint,
                "session",
                "the session service did not answer",
                e.to_string(),
            )),
        };
        conn.disconnect().await;
        result
    }

    /// Steps 5 and 6 without the session service (an SSH server that is not remote-agent,
    /// or has no `remote` subsystem): the command alone, on the endpoint asked for.
    async fn plain_exec(&self, conn: &ssh::Connection) -> Result<(), Failure> {
        let addr = conn.addr().to_string();
        let run = async {
            let endpoint = self.opts.endpoint.as_deref().filter(|e| !e.is_empty());
            let mut process = conn.exec(PROBE_COMMAND.as_bytes(), endpoint).await?;
            let _ = process.input().eof().await;
            let (mut out, mut err) = (Vec::new(), Vec::new());
            while let Some(ev) = process.next_event().await? {
                match ev {
                    ProcessEvent::Stdout(d) => out.extend_from_slice(&d),
                    ProcessEvent::Stderr(d) => err.extend_from_slice(&d),
                }
            }
            Ok::<_, SshError>((process.finish()?.code(), out, err))
        };
        let (code, out, err) = match tokio::time::timeout(SESSION_TIMEOUT, run).await {
            Err(_) => return Err(self.command_timeout(&addr)),
            Ok(Err(e)) => return Err(command_failed(e)),
            Ok(Ok(r)) => r,
        };
        let stderr = String::from_utf8_lossy(&err).trim().to_string();
        if let Some(denied) = access_denied(&stderr) {
            return Err(Failure::new(
                Step::Endpoint,
                "endpoint",
                format!("access denied to endpoint '{}'", self.endpoint()),
                format!("{addr}: {denied}"),
            ));
        }
        self.report.ok(
            Step::Endpoint,
            "endpoint",
            &format!(
                "no session service there (no `remote` subsystem): checked with a plain command on endpoint '{}'",
                self.endpoint()
            ),
        );
        self.check_output(&addr, code, &String::from_utf8_lossy(&out), &stderr)
    }

    /// Steps 5 and 6 over the session protocol (SSH subsystem or relay): open a commands
    /// session on the endpoint, run the command in it, close it.
    async fn session_steps(&self, ch: &mut SessionChannel) -> Result<(), Failure> {
        let endpoint = self.endpoint();
        let addr = ch.addr().to_string();
        let open = OpenSession {
            shape: Shape::Commands as i32,
            name: "remote-test".into(),
            endpoint: self.opts.endpoint.clone().unwrap_or_default(),
            idle_timeout_secs: 300,
            ..Default::default()
        };
        let opened =
            tokio::time::timeout(SESSION_TIMEOUT, ch.request(client_frame::Msg::Open(open))).await;
        let id = match opened {
            Err(_) => {
                return Err(Failure::new(
                    Step::Endpoint,
                    "endpoint",
                    "no answer",
                    format!(
                        "{addr} did not open a session within {} s: the agent may be overloaded or stuck \
                         (remote-agent status on that host)",
                        SESSION_TIMEOUT.as_secs()
                    ),
                ));
            }
            Ok(Ok(frame)) => match frame.msg {
                Some(server_frame::Msg::Opened(o)) => o.session.map(|s| s.id).unwrap_or_default(),
                other => {
                    return Err(Failure::new(
                        Step::Endpoint,
                        "endpoint",
                        "unexpected answer",
                        SessionError::Protocol {
                            addr,
                            detail: format!("expected SessionOpened, got {other:?}"),
                        }
                        .to_string(),
                    ));
                }
            },
            Ok(Err(e)) => return Err(self.endpoint_failure(e)),
        };
        self.report.ok(
            Step::Endpoint,
            "endpoint",
            &format!("'{endpoint}': session {id} opened"),
        );
        let ran = tokio::time::timeout(SESSION_TIMEOUT, run_in_session(ch, &id)).await;
        // The session was the test's own: close it whatever happened.
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            ch.request(client_frame::Msg::Close(CloseSession { session_id: id })),
        )
        .await;
        match ran {
            Err(_) => Err(self.command_timeout(&addr)),
            Ok(Err(SessionError::Remote { message, hint, .. }))
                if message.contains("does not allow") =>
            {
                // A restricted endpoint: the allow-list answered, which is what it is for.
                let text = if hint.is_empty() {
                    message
                } else {
                    format!("{message}: {hint}")
                };
                self.report.ok(
                    Step::Command,
                    "command",
                    &format!("'{endpoint}' runs only allow-listed commands and refused `{PROBE_COMMAND}` ({text})"),
                );
                Ok(())
            }
            Ok(Err(e)) => Err(command_failed(e)),
            Ok(Ok((code, out, err))) => self.check_output(&addr, code, &out, &err),
        }
    }

    /// An Error answer to OpenSession: access denied, an unknown endpoint, a quota.
    fn endpoint_failure(&self, e: SessionError) -> Failure {
        let endpoint = self.endpoint();
        let summary = match &e {
            SessionError::Remote { code, message, .. }
                if *code == ErrorCode::ErrorPermissionDenied
                    || access_denied(message).is_some() =>
            {
                format!("access denied to endpoint '{endpoint}'")
            }
            SessionError::Remote {
                code: ErrorCode::ErrorQuota,
                ..
            } => {
                format!("endpoint '{endpoint}': quota reached")
            }
            SessionError::Remote { .. } => format!("endpoint '{endpoint}' refused the session"),
            _ => "the session did not open".to_string(),
        };
        Failure::new(Step::Endpoint, "endpoint", summary, e.to_string())
    }

    fn command_timeout(&self, addr: &str) -> Failure {
        Failure::new(
            Step::Command,
            "command",
            "no answer",
            format!(
                "`{PROBE_COMMAND}` on {addr} did not finish within {} s: the account's shell may be waiting \
                 for input at startup, or the host is overloaded; try `remote run {} -- true`",
                SESSION_TIMEOUT.as_secs(),
                self.target.spec
            ),
        )
    }

    /// Step 6's verdict on what the command printed.
    fn check_output(&self, addr: &str, code: i32, out: &str, err: &str) -> Result<(), Failure> {
        if code == 0 && out.lines().any(|l| l.trim() == PROBE_OUTPUT) {
            self.report.ok(
                Step::Command,
                "command",
                &format!("`{PROBE_COMMAND}` printed {PROBE_OUTPUT} (exit 0)"),
            );
            return Ok(());
        }
        let mut message = format!(
            "`{PROBE_COMMAND}` on {addr} exited with code {code} and printed {}",
            if out.trim().is_empty() {
                "nothing".to_string()
            } else {
                format!("'{}'", snippet(out.trim().as_bytes()))
            }
        );
        if !err.trim().is_empty() {
            let _ = write!(message, " (stderr: '{}')", snippet(err.trim().as_bytes()));
        }
        message.push_str(
            ": the account's shell or its startup files may be broken, or the endpoint runs something else; \
             check with `remote run TARGET -- echo hi`, and the agent's log on that host",
        );
        Err(Failure::new(
            Step::Command,
            "command",
            format!("unexpected result (exit {code})"),
            message.replace("TARGET", &self.target.spec),
        ))
    }

    // ---- WinRM ----

    async fn winrm(
        &self,
        mut stream: TcpStream,
        reached: SocketAddr,
        dest: &Dest,
    ) -> Result<(), Failure> {
        let tls = self.target.scheme == Scheme::Winrms;
        let trust = self.trust(config::winrm_known_hosts_file())?;
        // Step 3: plain HTTP, or the TLS handshake and the certificate.
        if tls {
            self.tls_step(stream, reached, dest, &trust).await?;
        } else {
            let heard = identify(&mut stream, reached, dest, self.timeout(), true).await;
            drop(stream);
            match &heard {
                Heard::Http { status, auth } => {
                    let offers = if auth.is_empty() {
                        String::new()
                    } else {
                        format!("; offers {}", auth.join(", "))
                    };
                    self.report.ok(
                        Step::Protocol,
                        "http",
                        &format!("{} speaks HTTP ({status}{offers})", dest.addr),
                    );
                }
                other => return Err(self.wrong_port(dest, other)),
            }
        }
        // Step 4: log in (Basic logs in with the first request, which opens the shell).
        let (credentials, credential_error) = self.credentials().await;
        if let Some(e) = credential_error {
            return Err(Failure::new(
                Step::Auth,
                "auth",
                "credentials unusable",
                e.to_string(),
            ));
        }
        let client = Arc::new(winrm::Client::new(
            credentials,
            winrm::ClientOptions {
                auth: self.opts.auth,
                connect_timeout: self.timeout(),
                default_user: config::default_user(),
                trust,
                trusted_hosts: config::trusted_hosts_file(),
            },
        ));
        let mut conn = client
            .connect(&self.target)
            .await
            .map_err(|e| self.winrm_failure(e))?;
        let method = match self.opts.auth {
            AuthMethod::Ntlm => "NTLM",
            AuthMethod::Basic => "Basic",
        };
        let logged_in = format!(
            "logged in as '{}' at {} ({method})",
            conn.user(),
            conn.addr()
        );
        if self.opts.auth == AuthMethod::Ntlm {
            self.report.ok(Step::Auth, "auth", &logged_in);
        }
        // Step 5: a shell on the endpoint.
        let options = winrm::soap::ShellOptions {
            idle_timeout: Some(Duration::from_secs(300)),
            name: Some("remote-test".into()),
            endpoint: self.opts.endpoint.clone(),
        };
        let created = tokio::time::timeout(SESSION_TIMEOUT, conn.create_shell(&options)).await;
        let shell = match created {
            Err(_) => return Err(self.command_timeout(conn.addr())),
            Ok(Ok(id)) => id,
            Ok(Err(e)) => return Err(self.winrm_failure(e)),
        };
        if self.opts.auth == AuthMethod::Basic {
            self.report.ok(Step::Auth, "auth", &logged_in);
        }
        self.report.ok(
            Step::Endpoint,
            "endpoint",
            &format!("'{}': WinRM shell {shell} opened", self.endpoint()),
        );
        // Step 6: the command, then the shell is deleted.
        let addr = conn.addr().to_string();
        let ran = tokio::time::timeout(SESSION_TIMEOUT, run_in_shell(&mut conn, &shell)).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.delete_shell(&shell)).await;
        match ran {
            Err(_) => Err(self.command_timeout(&addr)),
            Ok(Err(e)) => Err(command_failed(e)),
            Ok(Ok((code, out, err))) => self.check_output(&addr, code, &out, &err),
        }
    }

    /// Step 3 for TLS (winrms://, the relay): the handshake and the certificate's trust.
    /// Returns the fingerprint of a certificate seen for the first time (not recorded).
    async fn tls_step(
        &self,
        stream: TcpStream,
        reached: SocketAddr,
        dest: &Dest,
        trust: &Trust,
    ) -> Result<Option<String>, Failure> {
        match trust
            .connect(stream, &dest.host, &dest.addr, self.timeout())
            .await
        {
            Ok((_tls, cert)) => {
                let fp = tls::fingerprint(&cert);
                let mut first_use = None;
                let how = match trust {
                    Trust::Ca { path, .. } => format!("chains to a CA in {}", path.display()),
                    Trust::Pinned(_) => "matches --fingerprint".to_string(),
                    Trust::FirstUse(store) => match store.lookup(&dest.addr.to_ascii_lowercase()) {
                        Ok(Some((_, line))) => {
                            format!("as recorded in {}:{line}", store.path().display())
                        }
                        _ if store.may_trust_first(&dest.host, &dest.addr) => {
                            first_use = Some(fp.clone());
                            format!(
                                "is new, and {} is listed in {}: it would be trusted on first use, unless it \
                                 chains to a CA this machine trusts (remote test records nothing; the next \
                                 remote command records it in {})",
                                dest.host,
                                store.trusted_hosts().display(),
                                store.path().display()
                            )
                        }
                        _ => {
                            first_use = Some(fp.clone());
                            "chains to a CA this machine trusts and names the host (nothing is recorded)"
                                .to_string()
                        }
                    },
                };
                self.report.ok(
                    Step::Protocol,
                    "tls",
                    &format!("{}: certificate {fp} {how}", dest.addr),
                );
                Ok(first_use)
            }
            Err(e @ (TlsError::Handshake { .. } | TlsError::Timeout { .. })) => {
                // Perhaps another protocol on this port: ask it, on a new connection.
                let heard = match net::connect_addrs(&[reached], self.timeout()).await {
                    Ok((mut s, _)) => identify(&mut s, reached, dest, self.timeout(), false).await,
                    Err(_) => Heard::Closed,
                };
                match heard {
                    Heard::Ssh(_) | Heard::Http { .. } | Heard::Other(_) => {
                        Err(self.wrong_port(dest, &heard))
                    }
                    _ => Err(Failure::new(
                        Step::Protocol,
                        "tls",
                        "TLS handshake failed",
                        e.to_string(),
                    )),
                }
            }
            Err(e) => {
                let summary = match &e {
                    TlsError::Changed { .. } => "certificate CHANGED",
                    TlsError::Mismatch { .. } => "certificate is not the pinned one",
                    TlsError::Untrusted { .. } => "certificate not trusted",
                    TlsError::FirstContact { .. } => {
                        "unverifiable certificate of a host not in trusted_hosts"
                    }
                    _ => "certificate check failed",
                };
                Err(Failure::new(Step::Protocol, "tls", summary, e.to_string()))
            }
        }
    }

    /// A WinRM error, as the step it belongs to.
    fn winrm_failure(&self, e: WinrmError) -> Failure {
        let text = e.to_string();
        match &e {
            WinrmError::Resolve { host, .. } => {
                Failure::new(Step::Name, "name", format!("cannot resolve '{host}'"), text)
            }
            WinrmError::Refused { addr, .. }
            | WinrmError::ConnectTimeout { addr, .. }
            | WinrmError::Connect { addr, .. } => {
                Failure::new(Step::Tcp, "tcp", format!("cannot connect to {addr}"), text)
            }
            WinrmError::Tls(_) => Failure::new(Step::Protocol, "tls", "TLS failed", text),
            WinrmError::BasicOverHttp { .. } => Failure::new(
                Step::Auth,
                "auth",
                "Basic over http:// refused by this client",
                text,
            ),
            WinrmError::AuthNotOffered {
                method: "Basic", ..
            } if self.target.scheme == Scheme::Winrm => Failure::new(
                Step::Auth,
                "auth",
                "Basic over http:// refused by the server",
                text,
            ),
            WinrmError::AuthRejected {
                user,
                addr,
                method,
                hint,
            } if hint.starts_with("check the user name and password") => Failure::new(
                Step::Auth,
                "auth",
                format!("wrong password for '{user}' at {addr}"),
                format!(
                    "{addr} rejected the password of account '{user}' ({method}): the password is wrong, or \
                     there is no such account. Check the password (REMOTE_PASSWORD or --password-stdin); on \
                     that host, `remote-agent user list` shows the accounts and `remote-agent user add {user} \
                     --password-stdin` creates one"
                ),
            ),
            WinrmError::AuthRejected { .. }
            | WinrmError::AuthNotOffered { .. }
            | WinrmError::NoPassword { .. }
            | WinrmError::Ntlm { .. } => Failure::new(Step::Auth, "auth", "login failed", text),
            WinrmError::Fault { fault, .. } => {
                let all = format!("{} {}", fault.reason, fault.message);
                if access_denied(&all).is_some() || fault.wsman_code == Some(5) {
                    Failure::new(
                        Step::Endpoint,
                        "endpoint",
                        format!("access denied to endpoint '{}'", self.endpoint()),
                        text,
                    )
                } else {
                    Failure::new(Step::Endpoint, "endpoint", "the shell did not open", text)
                }
            }
            WinrmError::Status { .. } | WinrmError::Protocol { .. } | WinrmError::Lost { .. } => {
                Failure::new(Step::Protocol, "http", "not a WinRM answer", text)
            }
            _ => Failure::new(Step::Endpoint, "endpoint", "the shell did not open", text),
        }
    }

    // ---- relay ----

    async fn relay(
        &self,
        stream: TcpStream,
        reached: SocketAddr,
        dest: &Dest,
    ) -> Result<(), Failure> {
        let trust = self.trust(config::relay_known_hosts_file())?;
        // Step 3: TLS and the relay's certificate.
        let first_use = self.tls_step(stream, reached, dest, &trust).await?;
        // Step 4: the token. A certificate seen for the first time is pinned for this test
        // only, so nothing is recorded.
        let options = RelayOptions {
            address: self.opts.relay.clone(),
            token: self.opts.relay_token.clone(),
            ca: self.opts.ca.clone(),
            fingerprint: first_use.or_else(|| self.opts.fingerprint.clone()),
            connect_timeout: self.timeout(),
            known_hosts: config::relay_known_hosts_file(),
            trusted_hosts: config::trusted_hosts_file(),
        };
        let agent = self.target.host.clone();
        let auth = |e: RelayError| {
            let summary = match &e {
                RelayError::NoToken => "no relay token".to_string(),
                RelayError::Refused { code, .. } if *code == tonic::Code::Unauthenticated => {
                    "the relay refused the token".to_string()
                }
                _ => "the relay did not log you in".to_string(),
            };
            Failure::new(Step::Auth, "auth", summary, e.to_string())
        };
        let client = RelayClient::connect(&options, "remote test")
            .await
            .map_err(auth)?;
        client.list_sessions(&agent).await.map_err(auth)?;
        self.report.ok(
            Step::Auth,
            "auth",
            &format!("REMOTE_TOKEN accepted by the relay at {}", client.addr()),
        );
        // Steps 5 and 6: a conversation with the agent, a session on the endpoint.
        let mut ch = match SessionChannel::over_relay(&client, &agent, "").await {
            Ok(ch) => ch,
            Err(e) => {
                return Err(Failure::new(
                    Step::Endpoint,
                    "agent",
                    format!("agent '{agent}' not reachable through the relay"),
                    e.to_string(),
                ));
            }
        };
        let result = self.session_steps(&mut ch).await;
        ch.close().await;
        result
    }
}

/// The trivial command could not be run (the connection broke, the agent refused it).
fn command_failed(e: impl std::fmt::Display) -> Failure {
    Failure::new(
        Step::Command,
        "command",
        "the command did not run",
        e.to_string(),
    )
}

/// The step an SSH error belongs to.
fn ssh_failure(e: SshError) -> Failure {
    let text = e.to_string();
    match &e {
        SshError::Resolve { host, .. } => {
            Failure::new(Step::Name, "name", format!("cannot resolve '{host}'"), text)
        }
        SshError::Refused { addr }
        | SshError::ConnectTimeout { addr, .. }
        | SshError::Connect { addr, .. } => {
            Failure::new(Step::Tcp, "tcp", format!("cannot connect to {addr}"), text)
        }
        SshError::HandshakeTimeout { .. } | SshError::Handshake { .. } => {
            Failure::new(Step::Protocol, "ssh", "SSH handshake failed", text)
        }
        SshError::HostKey(k) => {
            let summary = match k {
                crate::known_hosts::KnownHostsError::Changed(c) => {
                    format!("host key of {} CHANGED", c.host_port)
                }
                crate::known_hosts::KnownHostsError::Revoked { .. } => "host key revoked".into(),
                _ => "known_hosts unusable".into(),
            };
            Failure::new(Step::Protocol, "host key", summary, text)
        }
        SshError::AuthFailed {
            user, addr, tried, ..
        } if tried.split(", ").any(|t| t == "password") => Failure::new(
            Step::Auth,
            "auth",
            format!("wrong password for '{user}' at {addr}"),
            format!(
                "{addr} rejected the password of account '{user}' (tried: {tried}): the password is wrong, or \
                 there is no such account. Check the password (REMOTE_PASSWORD or --password-stdin); on that \
                 host, `remote-agent user list` shows the accounts and `remote-agent user add {user} \
                 --password-stdin` creates one"
            ),
        ),
        SshError::AuthFailed { user, addr, .. } => Failure::new(
            Step::Auth,
            "auth",
            format!("no key accepted for '{user}' at {addr}"),
            text,
        ),
        SshError::NoCredentials { user, .. } => Failure::new(
            Step::Auth,
            "auth",
            format!("nothing to log in as '{user}' with"),
            text,
        ),
        _ => Failure::new(
            Step::Auth,
            "auth",
            "connection failed while logging in",
            text,
        ),
    }
}

/// The agent's access-denied message, if `text` holds one.
fn access_denied(text: &str) -> Option<&str> {
    text.find("access denied")
        .map(|i| text[i..].lines().next().unwrap_or_default().trim())
}

/// Run the probe command in session `id`; its exit code, stdout and stderr.
async fn run_in_session(
    ch: &mut SessionChannel,
    id: &str,
) -> Result<(i32, String, String), SessionError> {
    let rid = ch
        .send(client_frame::Msg::Run(RunCommand {
            session_id: id.to_string(),
            command: PROBE_COMMAND.to_string(),
            follow: true,
        }))
        .await?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut command = None;
    let mut code = None;
    loop {
        let Some(frame) = ch.next().await? else {
            return Err(SessionError::Closed {
                addr: ch.addr().to_string(),
            });
        };
        if frame.request_id != rid && frame.request_id != 0 {
            continue;
        }
        match ch.check(frame)?.msg {
            Some(server_frame::Msg::Accepted(a)) => command = Some(a.command_id),
            Some(server_frame::Msg::Record(rec)) => {
                if command.is_some_and(|c| c != rec.command_id) {
                    continue;
                }
                match rec.kind {
                    Some(record::Kind::Output(o)) if o.stream == Stream::Stderr as i32 => {
                        err.extend_from_slice(&o.data)
                    }
                    Some(record::Kind::Output(o)) => out.extend_from_slice(&o.data),
                    Some(record::Kind::Exit(e)) => {
                        code = Some(if e.signal.is_empty() {
                            e.code
                        } else {
                            128 + ssh::signal_number(&e.signal).unwrap_or(127)
                        })
                    }
                    _ => {}
                }
            }
            Some(server_frame::Msg::Done(_)) => break,
            _ => {}
        }
    }
    Ok((
        code.unwrap_or(-1),
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    ))
}

/// Run the probe command in WinRM shell `shell`; its exit code, stdout and stderr.
async fn run_in_shell(
    conn: &mut winrm::Connection,
    shell: &str,
) -> Result<(i32, String, String), WinrmError> {
    let command = conn.command(shell, PROBE_COMMAND).await?;
    conn.send_input(shell, &command, &[], true).await?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = loop {
        let Some(received) = conn.receive(shell, &command, winrm::RECEIVE_WAIT).await? else {
            continue;
        };
        for (stream, data) in received.output {
            match stream {
                winrm::soap::OutStream::Stdout => out.extend_from_slice(&data),
                winrm::soap::OutStream::Stderr => err.extend_from_slice(&data),
            }
        }
        if let Some(code) = received.exit_code {
            break winrm::exit_of(code).code();
        }
    };
    Ok((
        code,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    ))
}

// ---- the protocol probe ----

/// What a port answered.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Heard {
    /// An SSH version line (`SSH-2.0-…`).
    Ssh(String),
    /// An HTTP response: its status line and the schemes its WWW-Authenticate headers offer.
    Http { status: String, auth: Vec<String> },
    /// A TLS record, or a TLS handshake completed on a second connection.
    Tls,
    /// The connection was closed without a byte.
    Closed,
    /// Nothing within the time given.
    Silent,
    /// Something else (its start, printable).
    Other(String),
}

/// Which service answers on `stream`: first what it says unasked (an SSH server's version
/// line), unless `http_first`; then its answer to an HTTP request; when that gets nothing,
/// whether a TLS handshake succeeds on a second connection.
async fn identify(
    stream: &mut TcpStream,
    reached: SocketAddr,
    dest: &Dest,
    timeout: Duration,
    http_first: bool,
) -> Heard {
    if !http_first {
        let heard = read_answer(stream, SILENCE.min(timeout)).await;
        if heard != Heard::Silent {
            return heard;
        }
    }
    let request = format!(
        "POST /wsman HTTP/1.1\r\nHost: {}\r\nUser-Agent: remote-test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        dest.addr
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return Heard::Closed;
    }
    let heard = read_answer(stream, timeout).await;
    if matches!(heard, Heard::Closed | Heard::Silent) && speaks_tls(reached, dest, timeout).await {
        return Heard::Tls;
    }
    heard
}

/// Read what the peer sends within `wait`, until it can be told apart.
async fn read_answer(stream: &mut TcpStream, wait: Duration) -> Heard {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(h) = classify(&buf, false) {
            return h;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) if buf.is_empty() => return Heard::Silent,
            Err(_) => return classify(&buf, true).unwrap_or(Heard::Silent),
            Ok(Ok(0)) | Ok(Err(_)) if buf.is_empty() => return Heard::Closed,
            Ok(Ok(0)) | Ok(Err(_)) => return classify(&buf, true).unwrap_or(Heard::Closed),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// What `buf` is, once that is clear (`complete`: nothing more will come).
fn classify(buf: &[u8], complete: bool) -> Option<Heard> {
    const LIMIT: usize = 8192;
    let first = *buf.first()?;
    let full = complete || buf.len() >= LIMIT;
    if matches!(first, 0x15 | 0x16) && buf.get(1).is_none_or(|&b| b == 0x03) {
        return Some(Heard::Tls);
    }
    for prefix in [&b"SSH-"[..], b"HTTP/"] {
        if buf.len() < prefix.len() && prefix.starts_with(buf) && !full {
            return None;
        }
    }
    let text = String::from_utf8_lossy(buf);
    if buf.starts_with(b"SSH-") {
        let line = text.lines().next().unwrap_or_default();
        return (text.contains('\n') || full).then(|| Heard::Ssh(snippet(line.trim().as_bytes())));
    }
    if buf.starts_with(b"HTTP/") {
        if !text.contains("\r\n\r\n") && !text.contains("\n\n") && !full {
            return None;
        }
        let mut lines = text.lines();
        let status = lines.next().unwrap_or_default().trim().to_string();
        let mut auth = Vec::new();
        for line in lines.take_while(|l| !l.trim().is_empty()) {
            if let Some((name, value)) = line.split_once(':')
                && name.trim().eq_ignore_ascii_case("www-authenticate")
                && let Some(scheme) = value.split_whitespace().next()
                && !auth.iter().any(|a: &String| a.eq_ignore_ascii_case(scheme))
            {
                auth.push(scheme.trim_end_matches(',').to_string());
            }
        }
        return Some(Heard::Http { status, auth });
    }
    (full || buf.contains(&b'\n') || buf.len() >= 256).then(|| {
        let line = text.lines().next().unwrap_or_default();
        Heard::Other(snippet(line.trim().as_bytes()))
    })
}

/// Whether a TLS handshake succeeds with `reached` (whatever its certificate), on a new
/// connection; nothing is recorded.
async fn speaks_tls(reached: SocketAddr, dest: &Dest, timeout: Duration) -> bool {
    let Ok((tcp, _)) = net::connect_addrs(&[reached], timeout).await else {
        return false;
    };
    let Ok(trust) = Trust::new(
        None,
        None,
        config::winrm_known_hosts_file(),
        config::trusted_hosts_file(),
    ) else {
        return false;
    };
    matches!(
        trust
            .without_recording()
            .connect(
                tcp,
                &dest.host,
                &dest.addr,
                timeout.min(Duration::from_secs(5))
            )
            .await,
        Ok(_)
            | Err(TlsError::Changed { .. }
                | TlsError::Mismatch { .. }
                | TlsError::Untrusted { .. }
                | TlsError::FirstContact { .. })
    )
}

/// At most 80 printable characters of `bytes`.
fn snippet(bytes: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_told_apart() {
        assert_eq!(classify(b"", true), None);
        assert_eq!(classify(b"SS", false), None);
        assert_eq!(classify(b"SSH-2.0-x", false), None);
        assert_eq!(
            classify(b"SSH-2.0-remote_0.1\r\n", false),
            Some(Heard::Ssh("SSH-2.0-remote_0.1".into()))
        );
        assert_eq!(classify(b"HTTP/1.1 401 Unauthorized\r\n", false), None);
        assert_eq!(
            classify(
                b"HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Negotiate\r\nWWW-Authenticate: Basic realm=\"WSMAN\"\r\n\r\n",
                false
            ),
            Some(Heard::Http {
                status: "HTTP/1.1 401 Unauthorized".into(),
                auth: vec!["Negotiate".into(), "Basic".into()],
            })
        );
        assert_eq!(
            classify(b"\x15\x03\x03\x00\x02\x02\x32", false),
            Some(Heard::Tls)
        );
        assert_eq!(classify(b"\x15", false), Some(Heard::Tls));
        assert_eq!(
            classify(b"+OK POP3 ready\r\n", false),
            Some(Heard::Other("+OK POP3 ready".into()))
        );
        assert_eq!(classify(b"\x00\x01", true), Some(Heard::Other("..".into())));
    }

    #[test]
    fn access_denied_is_found_in_stderr_or_faults() {
        let text = "remote-agent: access denied: user 'bob' may not use endpoint 'default' (allowed: admins). Ask an admin to add you, or pick --endpoint\nmore";
        assert_eq!(
            access_denied(text),
            Some(
                "access denied: user 'bob' may not use endpoint 'default' (allowed: admins). Ask an admin to add you, or pick --endpoint"
            )
        );
        assert_eq!(access_denied("fine"), None);
    }

    #[test]
    fn exit_codes_are_distinct_and_documented() {
        let steps = [
            Step::Name,
            Step::Tcp,
            Step::Protocol,
            Step::Auth,
            Step::Endpoint,
            Step::Command,
        ];
        let codes: Vec<i32> = steps.iter().map(|s| s.exit_code()).collect();
        assert_eq!(codes, [11, 12, 13, 14, 15, 16]);
    }
}
