//! Persistent sessions from the client's side: the session protocol
//! (proto/session.proto) on the agent's `remote` SSH subsystem or through a relay
//! conversation ([`SessionChannel`]), how a
//! session is named on the command line ([`SessionRef`]: `TARGET/ID`, or a bare id found in
//! the client's record of the sessions it opened), and that record itself. A WinRM session
//! is a WinRM shell (its ShellId is the id); the commands started in one with
//! `remote exec --detach` are recorded too ([`record_command`]), because WinRM hands a
//! command's output only to a client that names the command.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use remote_proto::session::{ClientFrame, ErrorCode, ServerFrame, client_frame, server_frame};
use remote_proto::{ClientCodec, FrameError, frames};
use thiserror::Error;
use tokio_util::codec::{Decoder, Encoder};

use crate::relay::{RelayClient, RelayError};
use crate::ssh::{Connection, ProcessEvent, ProcessInput, RemoteProcess, SshError};
use crate::target::Target;
use remote_proto::relay::{ConverseRequest, ConverseResponse, converse_request, converse_response};

#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error("{addr}: {message}{}", if hint.is_empty() { String::new() } else { format!(": {hint}") })]
    Remote {
        addr: String,
        code: ErrorCode,
        message: String,
        hint: String,
    },
    #[error(
        "{addr} broke the session protocol ({detail}): are client and agent the same release? (remote --version; remote-agent --version)"
    )]
    Protocol { addr: String, detail: String },
    #[error(
        "{addr} closed the session channel: the agent may have stopped (remote-agent status on that host)"
    )]
    Closed { addr: String },
    #[error(
        "unknown session '{0}': give it as TARGET/ID (e.g. alice@web1:2222/{0}), or run `remote session list TARGET`; this machine has no record of it"
    )]
    Unknown(String),
    #[error("invalid session '{0}': expected TARGET/ID or an id printed by `remote session new`")]
    BadRef(String),
    #[error(
        "cannot write the session record {path}: {source}; make that directory writable (or set XDG_CONFIG_HOME)"
    )]
    Record {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where frames come from: the SSH subsystem's output, or a relay conversation.
enum Link {
    Ssh(RemoteProcess),
    Relay {
        stream: Box<tonic::Streaming<ConverseResponse>>,
        client: RelayClient,
        /// Whether the agent is online (as the relay last said).
        live: Option<bool>,
    },
}

/// Where frames go.
#[derive(Clone)]
enum Sink {
    Ssh(ProcessInput),
    Relay(tokio::sync::mpsc::Sender<ConverseRequest>),
}

/// A session channel: frames to and from the agent's session host.
pub struct SessionChannel {
    link: Link,
    sink: Sink,
    codec: ClientCodec,
    buf: BytesMut,
    queued: VecDeque<ServerFrame>,
    next_id: Arc<AtomicU64>,
    addr: String,
}

/// Sends frames on a session channel from another task (stdin, signals) while the channel
/// itself reads; shares the request-id counter.
#[derive(Clone)]
pub struct FrameSender {
    sink: Sink,
    next_id: Arc<AtomicU64>,
    addr: String,
}

impl FrameSender {
    pub async fn send(&self, msg: client_frame::Msg) -> Result<u64, SessionError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = ClientFrame {
            request_id: id,
            msg: Some(msg),
        };
        match &self.sink {
            Sink::Ssh(input) => {
                let mut out = BytesMut::new();
                let mut codec = ClientCodec::default();
                if codec.encode(frame, &mut out).is_ok() {
                    input.data(out.freeze()).await?;
                }
            }
            Sink::Relay(tx) => {
                use prost::Message;
                let req = ConverseRequest {
                    msg: Some(converse_request::Msg::Frame(frame.encode_to_vec())),
                };
                if tx.send(req).await.is_err() {
                    return Err(SessionError::Closed {
                        addr: self.addr.clone(),
                    });
                }
            }
        }
        Ok(id)
    }
}

impl SessionChannel {
    /// Open the `remote` subsystem on `conn` and exchange Hello.
    pub async fn open(conn: &Connection) -> Result<SessionChannel, SessionError> {
        let process = conn.subsystem("remote").await?;
        let input = process.input();
        let ch = SessionChannel {
            link: Link::Ssh(process),
            sink: Sink::Ssh(input),
            codec: ClientCodec::default(),
            buf: BytesMut::new(),
            queued: VecDeque::new(),
            next_id: Arc::new(AtomicU64::new(1)),
            addr: conn.addr().to_string(),
        };
        ch.greet().await
    }

    /// Converse through a relay with `agent` (a new session, or a list) or with the agent
    /// of session `session_id` (the relay checks it is the caller's).
    pub async fn over_relay(
        client: &RelayClient,
        agent: &str,
        session_id: &str,
    ) -> Result<SessionChannel, SessionError> {
        let (tx, stream) = client.converse(agent, session_id).await?;
        let addr = if agent.is_empty() {
            format!("relay {}", client.addr())
        } else {
            format!("{agent} (via relay {})", client.addr())
        };
        let ch = SessionChannel {
            link: Link::Relay {
                stream: Box::new(stream),
                client: client.clone(),
                live: None,
            },
            sink: Sink::Relay(tx),
            codec: ClientCodec::default(),
            buf: BytesMut::new(),
            queued: VecDeque::new(),
            next_id: Arc::new(AtomicU64::new(1)),
            addr,
        };
        ch.greet().await
    }

    /// Exchange Hello.
    async fn greet(self) -> Result<SessionChannel, SessionError> {
        let mut ch = self;
        let software = format!("remote {}", env!("CARGO_PKG_VERSION"));
        match ch
            .request(client_frame::Msg::Hello(frames::hello(&software)))
            .await?
            .msg
        {
            Some(server_frame::Msg::Hello(_)) => Ok(ch),
            other => Err(ch.protocol(format!("expected Hello, got {other:?}"))),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn protocol(&self, detail: String) -> SessionError {
        SessionError::Protocol {
            addr: self.addr.clone(),
            detail,
        }
    }

    /// A sender for other tasks.
    pub fn sender(&self) -> FrameSender {
        FrameSender {
            sink: self.sink.clone(),
            next_id: self.next_id.clone(),
            addr: self.addr.clone(),
        }
    }

    /// Send a request; returns its id.
    pub async fn send(&mut self, msg: client_frame::Msg) -> Result<u64, SessionError> {
        self.sender().send(msg).await
    }

    /// The next frame from the agent; `None` when the channel closed.
    pub async fn next(&mut self) -> Result<Option<ServerFrame>, SessionError> {
        loop {
            if let Some(f) = self.queued.pop_front() {
                return Ok(Some(f));
            }
            match self.codec.decode(&mut self.buf) {
                Ok(Some(Ok(frame))) => return Ok(Some(frame)),
                Ok(Some(Err(FrameError::TooLarge { len }))) => {
                    return Err(self.protocol(format!("frame of {len} bytes")));
                }
                Ok(Some(Err(FrameError::Malformed(why)))) => return Err(self.protocol(why)),
                Err(e) => return Err(self.protocol(e.to_string())),
                Ok(None) => {}
            }
            match &mut self.link {
                Link::Ssh(process) => match process.next_event().await? {
                    Some(ProcessEvent::Stdout(data)) => self.buf.extend_from_slice(&data),
                    Some(ProcessEvent::Stderr(data)) => {
                        let _ = std::io::stderr().write_all(&data);
                    }
                    None => return Ok(None),
                },
                Link::Relay {
                    stream,
                    client,
                    live,
                } => match stream.message().await {
                    Ok(Some(resp)) => match resp.msg {
                        Some(converse_response::Msg::Frame(f)) => {
                            use prost::Message;
                            return match ServerFrame::decode(f.as_slice()) {
                                Ok(frame) => Ok(Some(frame)),
                                Err(e) => Err(self.protocol(e.to_string())),
                            };
                        }
                        Some(converse_response::Msg::State(s)) => {
                            let was = live.replace(s.live);
                            if !s.live && was != Some(false) {
                                crate::notice(&format!(
                                    "agent '{}' is offline: showing the output the relay kept; live output resumes when the agent is back",
                                    s.agent
                                ));
                            } else if s.live && was == Some(false) {
                                crate::notice(&format!("agent '{}' is back: live", s.agent));
                            }
                        }
                        None => {}
                    },
                    Ok(None) => return Ok(None),
                    Err(status) => return Err(client.stream_error(status).into()),
                },
            }
        }
    }

    /// Send a request and wait for its first answer; an Error answer becomes `Err`. Frames
    /// for other requests that arrive meanwhile are kept for [`SessionChannel::next`].
    pub async fn request(&mut self, msg: client_frame::Msg) -> Result<ServerFrame, SessionError> {
        let id = self.send(msg).await?;
        let mut others = Vec::new();
        let result = loop {
            let Some(frame) = self.next().await? else {
                break Err(SessionError::Closed {
                    addr: self.addr.clone(),
                });
            };
            if frame.request_id == id || frame.request_id == 0 {
                break self.check(frame);
            }
            others.push(frame);
        };
        for f in others.into_iter().rev() {
            self.queued.push_front(f);
        }
        result
    }

    /// Turn an Error frame into `Err`.
    pub fn check(&self, frame: ServerFrame) -> Result<ServerFrame, SessionError> {
        match frame.msg {
            Some(server_frame::Msg::Error(e)) => Err(SessionError::Remote {
                addr: self.addr.clone(),
                code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::ErrorUnspecified),
                message: e.message,
                hint: e.hint,
            }),
            _ => Ok(frame),
        }
    }

    /// Close the channel (the agent detaches this connection; sessions stay).
    pub async fn close(self) {
        if let Sink::Ssh(input) = &self.sink {
            let _ = input.eof().await;
            let _ = input.close().await;
        }
    }
}

/// A session as named on the command line.
#[derive(Debug, Clone)]
pub struct SessionRef {
    pub target: Target,
    pub id: String,
}

impl SessionRef {
    /// `TARGET/ID`, or a bare id looked up in the record of sessions opened here.
    pub fn parse(text: &str) -> Result<SessionRef, SessionError> {
        let text = text.trim();
        let bad = || SessionError::BadRef(text.to_string());
        match text.rsplit_once('/') {
            Some((target, id))
                if !id.is_empty() && !target.ends_with(':') && !target.ends_with('/') =>
            {
                let target = Target::parse(target).map_err(|_| bad())?;
                valid_id(id)
                    .then(|| SessionRef {
                        target,
                        id: id.to_string(),
                    })
                    .ok_or_else(bad)
            }
            Some(_) => Err(bad()),
            None if valid_id(text) => {
                let target =
                    record_lookup(text).ok_or_else(|| SessionError::Unknown(text.to_string()))?;
                Ok(SessionRef {
                    target,
                    id: text.to_string(),
                })
            }
            None => Err(bad()),
        }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The record of sessions this client opened: `$XDG_CONFIG_HOME/remote/sessions`, one
/// `ID TARGET` line each.
pub fn record_file() -> PathBuf {
    crate::config::config_dir().join("sessions")
}

fn record_lookup(id: &str) -> Option<Target> {
    let text = std::fs::read_to_string(record_file()).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| l.split_once(' '))
        .find(|(i, _)| *i == id)
        .and_then(|(_, t)| Target::parse(t.trim()).ok())
}

/// The distinct targets of recorded sessions (for `remote session list` without a target).
pub fn recorded_targets() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Ok(text) = std::fs::read_to_string(record_file()) {
        for (_, t) in text.lines().filter_map(|l| l.split_once(' ')) {
            let t = t.trim().to_string();
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out
}

/// Remember that session `id` lives on `target`.
pub fn record(id: &str, target: &str) -> Result<(), SessionError> {
    append_line(&record_file(), &format!("{id} {target}"))
}

/// Append one line to a client record file, making its directory when needed.
fn append_line(path: &std::path::Path, line: &str) -> Result<(), SessionError> {
    let err = |source| SessionError::Record {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    writeln!(f, "{line}").map_err(err)
}

/// Every recorded session: (id, target as written), oldest first.
pub fn recorded_sessions() -> Vec<(String, String)> {
    std::fs::read_to_string(record_file())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(i, t)| (i.to_string(), t.trim().to_string()))
        .collect()
}

/// Forget session `id` (and the commands recorded in it).
pub fn forget(id: &str) {
    remove_lines(&record_file(), |first, _| first == id);
    remove_lines(&commands_file(), |first, _| first == id);
}

fn remove_lines(path: &std::path::Path, drop: impl Fn(&str, &str) -> bool) {
    if let Ok(text) = std::fs::read_to_string(path) {
        let kept: String = text
            .lines()
            .filter(|l| {
                let mut f = l.split_whitespace();
                let (a, b) = (f.next().unwrap_or_default(), f.next().unwrap_or_default());
                !drop(a, b)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let _ = std::fs::write(path, kept);
    }
}

/// Commands started detached in WinRM sessions, whose output `remote receive` fetches:
/// `$XDG_CONFIG_HOME/remote/winrm_commands`, one `SESSION_ID COMMAND_ID` line each.
pub fn commands_file() -> PathBuf {
    crate::config::config_dir().join("winrm_commands")
}

/// Remember that command `command` runs in session `session`.
pub fn record_command(session: &str, command: &str) -> Result<(), SessionError> {
    append_line(&commands_file(), &format!("{session} {command}"))
}

/// The commands recorded in session `session`, oldest first.
pub fn recorded_commands(session: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in std::fs::read_to_string(commands_file())
        .unwrap_or_default()
        .lines()
    {
        let mut f = line.split_whitespace();
        if let (Some(s), Some(c)) = (f.next(), f.next())
            && s == session
            && valid_id(c)
            && !out.iter().any(|x| x == c)
        {
            out.push(c.to_string());
        }
    }
    out
}

/// Forget command `command` of session `session`.
pub fn forget_command(session: &str, command: &str) {
    remove_lines(&commands_file(), |s, c| s == session && c == command);
}
