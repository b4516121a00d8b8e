//! The SSH transport on russh's client: connect (TCP with a timeout, handshake, host key
//! checked against known_hosts), authenticate (keys, then password), and run a command or a
//! shell on a session channel ([`RemoteProcess`]: output events, then the exit status;
//! [`ProcessInput`]: stdin, EOF, signals, window changes).
//!
//! Every error names what failed, where, and what to try next (design.md §6).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use russh::client::{self, AuthResult, Handle, Msg};
use russh::keys::agent::client::AgentClient;
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, MethodKind, Pty, Sig};
use thiserror::Error;
use tokio::net::TcpStream;

use crate::auth::{Credentials, Key};
use crate::known_hosts::{KnownHosts, KnownHostsError, Verdict};
use crate::net::ConnectFailure;
use crate::target::Target;

/// Ciphers offered, in preference order.
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_128_CTR,
    russh::cipher::AES_256_CTR,
];

/// Connection settings shared by all targets.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Limit for the TCP connection and, separately, for the SSH handshake.
    pub connect_timeout: Duration,
    /// Login name for targets without `user@`.
    pub default_user: String,
}

/// What a refused endpoint request is called in errors.
const ENDPOINT_REQUEST: &str = "endpoint choice REMOTE_ENDPOINT (only remote-agent accepts it: for another SSH server, leave out --endpoint)";

/// Why talking to a target failed.
#[derive(Debug, Error)]
pub enum SshError {
    #[error(
        "cannot resolve host name '{host}' ({reason}): check the spelling, or use an IP address"
    )]
    Resolve { host: String, reason: String },
    #[error(
        "connection to {addr} refused: is remote-agent running there and listening on that port? (remote-agent status; --ssh)"
    )]
    Refused { addr: String },
    #[error(
        "connection to {addr} timed out after {secs} s: is the host up, and port {port} open in its firewall? (raise the limit with --connect-timeout SECS)"
    )]
    ConnectTimeout { addr: String, port: u16, secs: u64 },
    #[error("cannot connect to {addr}: {source}; check the network route to that host")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "{addr} accepted the connection but did not complete the SSH handshake within {secs} s: is that port remote-agent's SSH listener? (remote-agent status; --connect-timeout SECS)"
    )]
    HandshakeTimeout { addr: String, secs: u64 },
    #[error(
        "SSH handshake with {addr} failed ({reason}): is that port remote-agent's SSH listener and not another service? (remote-agent status; --ssh)"
    )]
    Handshake { addr: String, reason: String },
    #[error(transparent)]
    HostKey(#[from] KnownHostsError),
    /// `advice`: keys skipped, then what to do (starts with "; " or ": ").
    #[error("authentication as '{user}' to {addr} failed (tried: {tried}){advice}")]
    AuthFailed {
        user: String,
        addr: String,
        tried: String,
        advice: String,
    },
    #[error(
        "no credentials to log in as '{user}' to {addr}{notes}: pass --identity FILE, load a key into ssh-agent (ssh-add), or give a password (--password-stdin or REMOTE_PASSWORD)"
    )]
    NoCredentials {
        user: String,
        addr: String,
        notes: String,
    },
    #[error(
        "{addr} refused to open a session ({reason}): the agent may be at its limit of channels; try again"
    )]
    ChannelRefused { addr: String, reason: String },
    #[error("{addr} could not start the {what}{detail}: check the agent's log on that host")]
    RequestRefused {
        addr: String,
        what: &'static str,
        detail: String,
    },
    #[error(
        "connection to {addr} lost ({reason}): the agent may have stopped or the network dropped; try again"
    )]
    Lost { addr: String, reason: String },
    #[error(
        "connection to {addr} closed before the command reported how it ended: the agent may have stopped or the network dropped (remote-agent status on that host)"
    )]
    NoExitStatus { addr: String },
    #[error("{addr}: interrupted before the command started")]
    Interrupted { addr: String },
    #[error("{addr}: internal error: {detail}")]
    Internal { addr: String, detail: String },
}

/// A client that connects to targets with shared credentials and trust.
pub struct Client {
    config: Arc<client::Config>,
    credentials: Arc<Credentials>,
    known_hosts: Arc<KnownHosts>,
    options: ClientOptions,
}

impl Client {
    pub fn new(
        credentials: Arc<Credentials>,
        known_hosts: Arc<KnownHosts>,
        options: ClientOptions,
    ) -> Client {
        let config = client::Config {
            // Small writes (keystrokes, short commands) must not wait for Nagle.
            nodelay: true,
            // A dead peer (host down, cable cut) is noticed within a minute or two.
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            // AES-GCM first: with the CPU's AES instructions it is much cheaper than
            // chacha20-poly1305 (russh's first choice), which matters for bulk output.
            preferred: russh::Preferred {
                cipher: std::borrow::Cow::Borrowed(CIPHERS),
                ..russh::Preferred::DEFAULT
            },
            ..Default::default()
        };
        Client {
            config: Arc::new(config),
            credentials,
            known_hosts,
            options,
        }
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Connect to `target`, check its host key and log in.
    pub async fn connect(&self, target: &Target) -> Result<Connection, SshError> {
        let handshake = self.handshake(target).await?;
        self.login(handshake).await
    }

    /// The first half of [`Client::connect`]: TCP, the SSH handshake and the host key check,
    /// without logging in (`remote test` reports them apart).
    pub async fn handshake(&self, target: &Target) -> Result<Handshake, SshError> {
        let addr = target.host_port();
        let user = target
            .user
            .clone()
            .unwrap_or_else(|| self.options.default_user.clone());
        let timeout = self.options.connect_timeout;
        let secs = timeout.as_secs().max(1);
        let stream = self.tcp_connect(target, &addr).await?;
        let seen: Arc<std::sync::Mutex<Option<HostKeyInfo>>> = Arc::default();
        let checker = HostKeyCheck {
            known_hosts: self.known_hosts.clone(),
            host: target.host.clone(),
            port: target.port,
            seen: seen.clone(),
        };
        let handshake = client::connect_stream(self.config.clone(), stream, checker);
        let handle = match tokio::time::timeout(timeout, handshake).await {
            Err(_) => return Err(SshError::HandshakeTimeout { addr, secs }),
            Ok(Err(HandlerError::HostKey(e))) => return Err(SshError::HostKey(e)),
            Ok(Err(HandlerError::Ssh(e))) => {
                return Err(SshError::Handshake {
                    addr,
                    reason: describe(&e),
                });
            }
            Ok(Ok(handle)) => handle,
        };
        tracing::debug!(%addr, "handshake done");
        let host_key = seen.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(Handshake {
            handle,
            addr,
            user,
            host_key,
        })
    }

    /// The second half of [`Client::connect`]: log in on a finished handshake.
    pub async fn login(&self, handshake: Handshake) -> Result<Connection, SshError> {
        let Handshake {
            mut handle,
            addr,
            user,
            ..
        } = handshake;
        self.authenticate(&mut handle, &user, &addr).await?;
        tracing::debug!(%addr, %user, "logged in");
        Ok(Connection { handle, addr })
    }

    async fn tcp_connect(&self, target: &Target, addr: &str) -> Result<TcpStream, SshError> {
        let timeout = self.options.connect_timeout;
        crate::net::connect(&target.host, target.port, timeout)
            .await
            .map_err(|failure| match failure {
                ConnectFailure::Resolve(reason) => SshError::Resolve {
                    host: target.host.clone(),
                    reason,
                },
                ConnectFailure::Refused => SshError::Refused { addr: addr.into() },
                ConnectFailure::Timeout => SshError::ConnectTimeout {
                    addr: addr.into(),
                    port: target.port,
                    secs: timeout.as_secs().max(1),
                },
                ConnectFailure::Io(source) => SshError::Connect {
                    addr: addr.into(),
                    source,
                },
            })
    }

    async fn authenticate(
        &self,
        handle: &mut Handle<HostKeyCheck>,
        user: &str,
        addr: &str,
    ) -> Result<(), SshError> {
        let creds = &self.credentials;
        let notes = || {
            if creds.notes().is_empty() {
                String::new()
            } else {
                format!("; {}", creds.notes().join("; "))
            }
        };
        if creds.keys().is_empty() && !creds.has_password() {
            return Err(SshError::NoCredentials {
                user: user.into(),
                addr: addr.into(),
                notes: notes(),
            });
        }
        let lost = |e: russh::Error| SshError::Lost {
            addr: addr.into(),
            reason: describe(&e),
        };
        let mut tried = Vec::new();
        let mut allow_key = true;
        let mut allow_password = true;
        let mut agent: Option<AgentClient<tokio::net::UnixStream>> = None;
        let update = |result: &AuthResult, allow_key: &mut bool, allow_password: &mut bool| {
            if let AuthResult::Failure {
                remaining_methods, ..
            } = result
            {
                *allow_key = remaining_methods.contains(&MethodKind::PublicKey);
                *allow_password = remaining_methods.contains(&MethodKind::Password);
            }
        };
        for key in creds.keys() {
            if !allow_key {
                break;
            }
            let result = match key {
                Key::File { key, .. } => {
                    let hash = rsa_hash(handle, key.algorithm()).await.map_err(lost)?;
                    let offer = PrivateKeyWithHashAlg::new(key.clone(), hash);
                    handle
                        .authenticate_publickey(user, offer)
                        .await
                        .map_err(lost)?
                }
                Key::Agent { public, .. } => {
                    if agent.is_none()
                        && let Some(sock) = creds.agent_socket()
                    {
                        agent = AgentClient::connect_uds(sock).await.ok();
                    }
                    let Some(signer) = agent.as_mut() else {
                        continue;
                    };
                    let hash = rsa_hash(handle, public.algorithm()).await.map_err(lost)?;
                    match handle
                        .authenticate_publickey_with(user, public.clone(), hash, signer)
                        .await
                    {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::debug!("ssh-agent could not sign: {e}");
                            tried.push(format!("{} (agent refused to sign)", key.describe()));
                            continue;
                        }
                    }
                }
            };
            tried.push(key.describe());
            if result.success() {
                return Ok(());
            }
            update(&result, &mut allow_key, &mut allow_password);
            if handle.is_closed() {
                break;
            }
        }
        if allow_password
            && !handle.is_closed()
            && let Some(password) = creds.password(user, addr).await
        {
            let result = handle
                .authenticate_password(user, password)
                .await
                .map_err(lost)?;
            tried.push("password".into());
            if result.success() {
                return Ok(());
            }
        }
        let used_password = tried.iter().any(|t| t == "password");
        if tried.is_empty() {
            tried.push("nothing the server accepts".into());
        }
        let add_key = format!(
            "ask an admin to add your key (remote-agent user add {user} --authorized-key KEY.pub)"
        );
        let hint = if used_password {
            format!("check the user name and the password, or {add_key}")
        } else {
            format!(
                "check the user name, or {add_key}; to log in with a password use --password-stdin or REMOTE_PASSWORD"
            )
        };
        Err(SshError::AuthFailed {
            user: user.into(),
            addr: addr.into(),
            tried: tried.join(", "),
            advice: format!("{}: {hint}", notes()),
        })
    }
}

#[derive(Debug)]
enum HandlerError {
    Ssh(russh::Error),
    HostKey(KnownHostsError),
}

impl From<russh::Error> for HandlerError {
    fn from(e: russh::Error) -> Self {
        HandlerError::Ssh(e)
    }
}

/// An SSH connection whose host key was checked, not yet logged in ([`Client::handshake`]).
pub struct Handshake {
    handle: Handle<HostKeyCheck>,
    addr: String,
    user: String,
    host_key: Option<HostKeyInfo>,
}

impl Handshake {
    /// `host:port` of the peer.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The account [`Client::login`] will log in as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The server's host key and what known_hosts said of it.
    pub fn host_key(&self) -> Option<&HostKeyInfo> {
        self.host_key.as_ref()
    }
}

/// The host key a server presented, and the known_hosts verdict on it.
#[derive(Debug, Clone)]
pub struct HostKeyInfo {
    /// `ssh-ed25519`, …
    pub algorithm: String,
    /// `SHA256:…`
    pub fingerprint: String,
    pub verdict: Verdict,
}

/// russh's client handler: checks the server's host key against known_hosts.
struct HostKeyCheck {
    known_hosts: Arc<KnownHosts>,
    host: String,
    port: u16,
    /// The key accepted, for [`Handshake::host_key`].
    seen: Arc<std::sync::Mutex<Option<HostKeyInfo>>>,
}

impl client::Handler for HostKeyCheck {
    type Error = HandlerError;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            // Host certificates are not trusted through a CA here: the key inside is
            // checked like a plain key.
            PublicKeyOrCertificate::Certificate(cert) => {
                russh::keys::PublicKey::from(cert.public_key().clone())
            }
        };
        let verdict = self.known_hosts.verify(&self.host, self.port, &key);
        if let Ok(v) = &verdict {
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(HostKeyInfo {
                algorithm: key.algorithm().as_str().to_string(),
                fingerprint: key.fingerprint(russh::keys::HashAlg::Sha256).to_string(),
                verdict: v.clone(),
            });
        }
        match verdict {
            Ok(Verdict::Known | Verdict::Unrecorded { .. }) => Ok(true),
            Ok(Verdict::Learned { fingerprint }) => {
                let host_port = if self.host.contains(':') {
                    format!("[{}]:{}", self.host, self.port)
                } else {
                    format!("{}:{}", self.host, self.port)
                };
                crate::notice(&format!(
                    "added host key for {host_port} ({fingerprint}) to {}",
                    self.known_hosts.path().display()
                ));
                Ok(true)
            }
            Err(e) => Err(HandlerError::HostKey(e)),
        }
    }
}

/// A plain-words reason for a russh error.
fn describe(e: &russh::Error) -> String {
    match e {
        russh::Error::IO(io) => io.to_string(),
        russh::Error::Disconnect | russh::Error::HUP => "the server closed the connection".into(),
        russh::Error::Version => "it did not send an SSH version line".into(),
        russh::Error::NoCommonAlgo { kind, .. } => {
            format!("no common {kind:?} algorithm")
        }
        other => other.to_string(),
    }
}

/// The signature hash to use with a key: the best RSA hash the server accepts for RSA keys,
/// none for other algorithms.
async fn rsa_hash(
    handle: &Handle<HostKeyCheck>,
    algorithm: russh::keys::Algorithm,
) -> Result<Option<russh::keys::HashAlg>, russh::Error> {
    if algorithm.is_rsa() {
        Ok(handle.best_supported_rsa_hash().await?.flatten())
    } else {
        Ok(None)
    }
}

/// A logged-in connection to one target.
pub struct Connection {
    handle: Handle<HostKeyCheck>,
    addr: String,
}

/// A terminal to ask for with a shell.
#[derive(Debug, Clone)]
pub struct PtyRequest {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    pub modes: Vec<(Pty, u32)>,
}

impl Connection {
    /// `host:port` of the peer, for messages.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn open(&self) -> Result<russh::Channel<Msg>, SshError> {
        self.handle
            .channel_open_session()
            .await
            .map_err(|e| match e {
                russh::Error::ChannelOpenFailure(reason) => SshError::ChannelRefused {
                    addr: self.addr.clone(),
                    reason: format!("{reason:?}"),
                },
                other => SshError::Lost {
                    addr: self.addr.clone(),
                    reason: describe(&other),
                },
            })
    }

    fn lost(&self, e: russh::Error) -> SshError {
        SshError::Lost {
            addr: self.addr.clone(),
            reason: describe(&e),
        }
    }

    /// Run `command` (a shell command line) on a new session channel.
    /// On `endpoint` (remote-agent's session configuration, sent as the channel variable
    /// REMOTE_ENDPOINT, which another SSH server refuses) when given.
    pub async fn exec(
        &self,
        command: &[u8],
        endpoint: Option<&str>,
    ) -> Result<RemoteProcess, SshError> {
        let channel = self.open().await?;
        let mut pending = Vec::new();
        self.choose_endpoint(&channel, endpoint, &mut pending)
            .await?;
        channel
            .exec(true, command.to_vec())
            .await
            .map_err(|e| self.lost(e))?;
        pending.push("command");
        Ok(RemoteProcess::new(channel, &self.addr, pending))
    }

    /// Ask for remote-agent's endpoint `name` on `channel` (the channel variable
    /// REMOTE_ENDPOINT, which an SSH server other than remote-agent refuses).
    async fn choose_endpoint(
        &self,
        channel: &russh::Channel<Msg>,
        name: Option<&str>,
        pending: &mut Vec<&'static str>,
    ) -> Result<(), SshError> {
        if let Some(name) = name {
            channel
                .set_env(true, remote_proto::ENDPOINT_ENV, name)
                .await
                .map_err(|e| self.lost(e))?;
            pending.push(ENDPOINT_REQUEST);
        }
        Ok(())
    }

    /// Start the login shell, with a terminal when `pty` is given, on `endpoint` when given.
    pub async fn shell(
        &self,
        pty: Option<&PtyRequest>,
        endpoint: Option<&str>,
    ) -> Result<RemoteProcess, SshError> {
        let channel = self.open().await?;
        let mut pending = Vec::new();
        self.choose_endpoint(&channel, endpoint, &mut pending)
            .await?;
        if let Some(p) = pty {
            channel
                .request_pty(true, &p.term, p.cols, p.rows, 0, 0, &p.modes)
                .await
                .map_err(|e| self.lost(e))?;
            pending.push("terminal (pty)");
        }
        channel
            .request_shell(true)
            .await
            .map_err(|e| self.lost(e))?;
        pending.push("shell");
        Ok(RemoteProcess::new(channel, &self.addr, pending))
    }

    /// Start the subsystem `name` (e.g. `remote`, the agent's session protocol) on a new
    /// session channel; its stdout carries the subsystem's bytes.
    pub async fn subsystem(&self, name: &str) -> Result<RemoteProcess, SshError> {
        let channel = self.open().await?;
        channel
            .request_subsystem(true, name)
            .await
            .map_err(|e| self.lost(e))?;
        Ok(RemoteProcess::new(
            channel,
            &self.addr,
            vec!["session service (subsystem)"],
        ))
    }

    /// Say goodbye (does not wait).
    pub async fn disconnect(&self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Code(u32),
    Signal {
        /// Without the `SIG` prefix (`TERM`).
        name: String,
        core_dumped: bool,
    },
}

impl Exit {
    /// The exit code a shell would report: the status (at most 255), or 128 + the signal
    /// number for a command killed by a signal.
    pub fn code(&self) -> i32 {
        match self {
            Exit::Code(c) => (*c).min(255) as i32,
            Exit::Signal { name, .. } => 128 + signal_number(name).unwrap_or(127),
        }
    }

    pub fn signal(&self) -> Option<&str> {
        match self {
            Exit::Signal { name, .. } => Some(name),
            Exit::Code(_) => None,
        }
    }
}

/// Signal number for an SSH signal name (`INT`, `TERM`, …) on this system.
pub fn signal_number(name: &str) -> Option<i32> {
    format!("SIG{name}")
        .parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

fn sig_name(sig: &Sig) -> String {
    match sig {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(name) => name.trim_start_matches("SIG").to_string(),
    }
}

/// Output of a remote command.
#[derive(Debug)]
pub enum ProcessEvent {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// Sends to a running remote command; cheap to clone.
#[derive(Clone)]
pub struct ProcessInput {
    write: Arc<ChannelWriteHalf<Msg>>,
    addr: Arc<str>,
}

impl ProcessInput {
    fn lost(&self, e: russh::Error) -> SshError {
        SshError::Lost {
            addr: self.addr.to_string(),
            reason: describe(&e),
        }
    }

    /// Bytes for the command's stdin (waits for the peer's window).
    pub async fn data(&self, data: Bytes) -> Result<(), SshError> {
        self.write.data_bytes(data).await.map_err(|e| self.lost(e))
    }

    /// End of stdin.
    pub async fn eof(&self) -> Result<(), SshError> {
        self.write.eof().await.map_err(|e| self.lost(e))
    }

    /// Deliver a signal to the command's process group.
    pub async fn signal(&self, sig: Sig) -> Result<(), SshError> {
        self.write.signal(sig).await.map_err(|e| self.lost(e))
    }

    /// The local terminal changed size.
    pub async fn resize(&self, cols: u32, rows: u32) -> Result<(), SshError> {
        self.write
            .window_change(cols, rows, 0, 0)
            .await
            .map_err(|e| self.lost(e))
    }

    /// Close the channel: the agent hangs up on the command (SIGHUP).
    pub async fn close(&self) -> Result<(), SshError> {
        self.write.close().await.map_err(|e| self.lost(e))
    }
}

/// A command or shell running on a session channel.
pub struct RemoteProcess {
    read: ChannelReadHalf,
    input: ProcessInput,
    /// Requests sent with want-reply whose answer is outstanding, in order.
    pending: VecDeque<&'static str>,
    /// The start of stderr, to explain a refused request.
    early_stderr: Vec<u8>,
    exit: Option<Exit>,
    addr: String,
}

impl RemoteProcess {
    fn new(channel: russh::Channel<Msg>, addr: &str, pending: Vec<&'static str>) -> RemoteProcess {
        let (read, write) = channel.split();
        RemoteProcess {
            read,
            input: ProcessInput {
                write: Arc::new(write),
                addr: addr.into(),
            },
            pending: pending.into(),
            early_stderr: Vec::new(),
            exit: None,
            addr: addr.into(),
        }
    }

    pub fn input(&self) -> ProcessInput {
        self.input.clone()
    }

    /// The next piece of output; `Ok(None)` once the channel is closed (then see
    /// [`RemoteProcess::finish`]).
    pub async fn next_event(&mut self) -> Result<Option<ProcessEvent>, SshError> {
        loop {
            let Some(msg) = self.read.wait().await else {
                return Ok(None);
            };
            match msg {
                ChannelMsg::Data { data } => return Ok(Some(ProcessEvent::Stdout(data))),
                ChannelMsg::ExtendedData { data, ext: 1 } => {
                    if !self.pending.is_empty() && self.early_stderr.len() < 4096 {
                        self.early_stderr.extend_from_slice(&data);
                    }
                    return Ok(Some(ProcessEvent::Stderr(data)));
                }
                ChannelMsg::ExtendedData { .. } => {}
                ChannelMsg::Success => {
                    self.pending.pop_front();
                }
                ChannelMsg::Failure => {
                    let what = self.pending.pop_front().unwrap_or("request");
                    let text = String::from_utf8_lossy(&self.early_stderr);
                    let text = text.trim();
                    let detail = if text.is_empty() {
                        String::new()
                    } else {
                        format!(" ({text})")
                    };
                    return Err(SshError::RequestRefused {
                        addr: self.addr.clone(),
                        what,
                        detail,
                    });
                }
                ChannelMsg::ExitStatus { exit_status } => {
                    self.exit = Some(Exit::Code(exit_status));
                }
                ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    ..
                } => {
                    self.exit = Some(Exit::Signal {
                        name: sig_name(&signal_name),
                        core_dumped,
                    });
                }
                ChannelMsg::Close => return Ok(None),
                _ => {}
            }
        }
    }

    /// How the command ended, once [`RemoteProcess::next_event`] returned `None`.
    pub fn finish(self) -> Result<Exit, SshError> {
        self.exit.ok_or(SshError::NoExitStatus { addr: self.addr })
    }
}
