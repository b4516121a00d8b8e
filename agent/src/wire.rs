//! The session protocol (proto/session.proto) served on any byte stream for one principal:
//! the SSH subsystem `remote` and the local socket both hand their streams here. Requests
//! map onto the session host; one connection follows at most one session or command at a
//! time, and frames that cannot be decoded get an error while the connection goes on.

use crate::endpoints::EndpointError;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use remote_proto::session::{
    Attached, CommandAccepted, Done, ErrorCode, ServerFrame, SessionList, SessionOpened, Shape,
    client_frame, record, server_frame,
};
use remote_proto::{FrameError, PROTOCOL_VERSION, ServerCodec, frames};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::process::PtySettings;
use crate::session::journal::{Journal, JournalError, Mode};
use crate::session::{
    AttachGuard, OpenRequest, Principal, Session, SessionError, SessionHost, parse_signal,
};

/// Payload bytes read from the journal per batch sent to a client.
const BATCH_BYTES: usize = 256 * 1024;

/// Serve one connection until the peer closes it.
pub async fn serve<S>(host: Arc<SessionHost>, who: Principal, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sink, mut incoming) = Framed::new(stream, ServerCodec::default()).split();
    let (out, mut out_rx) = mpsc::channel::<ServerFrame>(64);
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if sink.send(frame).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut conn = Conn {
        host,
        who,
        out,
        follow: None,
        greeted: false,
    };
    while let Some(item) = incoming.next().await {
        let keep_going = match item {
            Err(_) => false,
            Ok(Err(FrameError::TooLarge { len })) => {
                conn.error(
                    0,
                    ErrorCode::ErrorFrameTooLarge,
                    format!(
                        "frame of {len} bytes refused: the limit is {} bytes",
                        remote_proto::MAX_FRAME_BYTES
                    ),
                    "send input and commands in smaller pieces",
                )
                .await;
                true
            }
            Ok(Err(FrameError::Malformed(why))) => {
                conn.error(
                    0,
                    ErrorCode::ErrorBadFrame,
                    format!("malformed frame: {why}"),
                    "is the client speaking the remote session protocol?",
                )
                .await;
                true
            }
            Ok(Ok(frame)) => conn.handle(frame.request_id, frame.msg).await,
        };
        if !keep_going {
            break;
        }
    }
    conn.stop_follow();
    drop(conn);
    let _ = writer.await;
}

/// What the connection is following: a session (attach/receive) or one command (exec).
struct Follow {
    session: Arc<Session>,
    command: Option<u64>,
    cancel: CancellationToken,
    _attached: Option<Attachment>,
}

/// A client attached to a session: counted by the session, and in the audit log from attach
/// to detach.
struct Attachment {
    _guard: AttachGuard,
    audit: crate::audit::Audit,
    event: (String, String, String, crate::audit::Transport),
}

impl Attachment {
    fn new(session: &Arc<Session>, who: &Principal, audit: &crate::audit::Audit) -> Attachment {
        let a = Attachment {
            _guard: session.attach(),
            audit: audit.clone(),
            event: (
                session.id.clone(),
                who.name.clone(),
                session.endpoint.name.clone(),
                crate::audit::Transport::from_label(who.transport),
            ),
        };
        a.record(crate::audit::SessionAction::Attach);
        a
    }

    fn record(&self, action: crate::audit::SessionAction) {
        let (session, account, endpoint, transport) = self.event.clone();
        self.audit.record(crate::audit::Event::Session {
            action,
            session,
            account,
            endpoint,
            transport,
            peer: None,
        });
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.record(crate::audit::SessionAction::Detach);
    }
}

struct Conn {
    host: Arc<SessionHost>,
    who: Principal,
    out: mpsc::Sender<ServerFrame>,
    follow: Option<Follow>,
    greeted: bool,
}

impl Conn {
    async fn send(&self, frame: ServerFrame) {
        let _ = self.out.send(frame).await;
    }

    async fn error(
        &self,
        request_id: u64,
        code: ErrorCode,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.send(frames::error(request_id, code, message, hint))
            .await;
    }

    async fn session_error(&self, request_id: u64, e: SessionError) {
        let (code, hint) = match &e {
            SessionError::NotFound(_) => (
                ErrorCode::ErrorNotFound,
                "list your sessions with `remote session list`",
            ),
            SessionError::Closed(_) => (
                ErrorCode::ErrorSessionClosed,
                "open a new one with `remote session new`",
            ),
            SessionError::WrongShape { .. }
            | SessionError::NoCommand { .. }
            | SessionError::Invalid(_) => (ErrorCode::ErrorInvalidRequest, ""),
            SessionError::Quota { .. } => (ErrorCode::ErrorQuota, ""),
            SessionError::Endpoint(e) => (endpoint_code(e), ""),
            SessionError::Process(_)
            | SessionError::StateDir { .. }
            | SessionError::Internal(_) => {
                (ErrorCode::ErrorInternal, "see the agent's log for details")
            }
        };
        self.error(request_id, code, e.to_string(), hint).await;
    }

    fn stop_follow(&mut self) {
        if let Some(f) = self.follow.take() {
            f.cancel.cancel();
        }
    }

    /// Handle one request. Returns false when the connection should end.
    async fn handle(&mut self, rid: u64, msg: Option<client_frame::Msg>) -> bool {
        use client_frame::Msg;
        let Some(msg) = msg else {
            self.error(
                rid,
                ErrorCode::ErrorBadFrame,
                "unknown or empty request",
                "the client may be newer than this agent: upgrade remote-agent",
            )
            .await;
            return true;
        };
        if !self.greeted {
            let Msg::Hello(hello) = msg else {
                self.error(
                    rid,
                    ErrorCode::ErrorInvalidRequest,
                    "the first frame must be Hello",
                    "",
                )
                .await;
                return false;
            };
            if hello.protocol_version != PROTOCOL_VERSION {
                self.error(
                    rid,
                    ErrorCode::ErrorUnsupportedVersion,
                    format!("protocol version {} is not supported; this agent speaks version {PROTOCOL_VERSION}", hello.protocol_version),
                    "use a remote client of the same release as the agent",
                )
                .await;
                return false;
            }
            self.greeted = true;
            let software = format!("remote-agent {}", env!("CARGO_PKG_VERSION"));
            self.send(frames::server(
                rid,
                server_frame::Msg::Hello(frames::hello(&software)),
            ))
            .await;
            return true;
        }
        match msg {
            Msg::Hello(_) => {
                self.error(
                    rid,
                    ErrorCode::ErrorInvalidRequest,
                    "Hello was already exchanged",
                    "",
                )
                .await
            }
            Msg::List(_) => {
                let sessions = self.host.list(&self.who);
                self.send(frames::server(
                    rid,
                    server_frame::Msg::Sessions(SessionList { sessions }),
                ))
                .await;
            }
            Msg::Open(req) => self.open(rid, req).await,
            Msg::Attach(a) => match self.host.get(&self.who, &a.session_id) {
                Ok(session) => {
                    let from = a.from_seq.unwrap_or_else(|| session.journal().resume_seq());
                    self.start_follow(rid, session, None, from, a.follow).await;
                }
                Err(e) => self.session_error(rid, e).await,
            },
            Msg::Run(r) => match self.host.get(&self.who, &r.session_id) {
                Ok(session) => match session.run(&r.command).await {
                    Ok((command, seq)) => {
                        self.send(frames::server(
                            rid,
                            server_frame::Msg::Accepted(CommandAccepted {
                                command_id: command,
                            }),
                        ))
                        .await;
                        if r.follow {
                            self.start_follow(rid, session, Some(command), seq, true)
                                .await;
                        }
                    }
                    Err(e) => self.session_error(rid, e).await,
                },
                Err(e) => self.session_error(rid, e).await,
            },
            Msg::Input(input) => {
                let Some(f) = &self.follow else {
                    self.error(
                        rid,
                        ErrorCode::ErrorInvalidRequest,
                        "input without an attached session or command",
                        "attach first",
                    )
                    .await;
                    return true;
                };
                let result = match f.command {
                    Some(cmd) => {
                        let data = (!input.data.is_empty()).then(|| bytes::Bytes::from(input.data));
                        let mut r = Ok(());
                        if let Some(d) = data {
                            r = f.session.command_input(cmd, Some(d)).await;
                        }
                        if r.is_ok() && input.eof {
                            r = f.session.command_input(cmd, None).await;
                        }
                        r
                    }
                    None if input.data.is_empty() => Ok(()),
                    None => {
                        f.session
                            .terminal_input(bytes::Bytes::from(input.data))
                            .await
                    }
                };
                if let Err(e) = result {
                    self.session_error(rid, e).await;
                }
            }
            Msg::Resize(r) => {
                if let (Some(f), Some(size)) = (&self.follow, r.size) {
                    let (rows, cols) = (clamp(size.rows, 24), clamp(size.cols, 80));
                    if let Err(e) = f.session.resize(rows, cols).await {
                        self.session_error(rid, e).await;
                    }
                }
            }
            Msg::Signal(s) => {
                let session = if s.session_id.is_empty() {
                    self.follow
                        .as_ref()
                        .map(|f| f.session.clone())
                        .ok_or_else(|| {
                            SessionError::Invalid("no session named and none attached".into())
                        })
                } else {
                    self.host.get(&self.who, &s.session_id)
                };
                let command = match (&self.follow, s.command_id) {
                    (Some(f), 0) if s.session_id.is_empty() => f.command.unwrap_or(0),
                    (_, c) => c,
                };
                let result = session.and_then(|session| match parse_signal(&s.signal) {
                    Some(sig) => session.signal(command, sig),
                    None => Err(SessionError::Invalid(format!(
                        "unknown signal '{}' (use INT, TERM, KILL, HUP, QUIT, USR1, USR2)",
                        s.signal
                    ))),
                });
                if let Err(e) = result {
                    self.session_error(rid, e).await;
                }
            }
            Msg::Ack(a) => {
                if let Some(f) = &self.follow {
                    match f.command {
                        Some(command) => f.session.journal().ack_command(command, a.seq),
                        None => f.session.journal().ack(a.seq),
                    }
                }
            }
            Msg::Detach(_) => {
                self.stop_follow();
                self.send(frames::server(rid, server_frame::Msg::Done(Done {})))
                    .await;
            }
            Msg::Close(c) => match self.host.close(&self.who, &c.session_id) {
                Ok(()) => {
                    self.send(frames::server(rid, server_frame::Msg::Done(Done {})))
                        .await
                }
                Err(e) => self.session_error(rid, e).await,
            },
        }
        true
    }

    async fn open(&mut self, rid: u64, req: remote_proto::session::OpenSession) {
        let shape = Shape::try_from(req.shape).unwrap_or(Shape::Unspecified);
        let size = req.size.unwrap_or_default();
        let open = OpenRequest {
            shape,
            name: req.name.chars().take(128).collect(),
            endpoint: req.endpoint.chars().take(128).collect(),
            buffering: match req.buffering {
                1 => Some(Mode::Block),
                2 => Some(Mode::Drop),
                // Spill only where the agent has a relay (its default buffering is spill).
                3 if self.host.defaults().buffering == Mode::Spill => Some(Mode::Spill),
                3 => Some(Mode::Block),
                _ => None,
            },
            journal_bytes: (req.journal_bytes > 0).then_some(req.journal_bytes as usize),
            idle_timeout: (req.idle_timeout_secs > 0)
                .then(|| std::time::Duration::from_secs(req.idle_timeout_secs)),
            operation_timeout: (req.operation_timeout_secs > 0)
                .then(|| std::time::Duration::from_secs(req.operation_timeout_secs)),
            max_received_mb: (req.max_received_mb_per_command > 0)
                .then_some(req.max_received_mb_per_command),
            terminal: PtySettings {
                term: if req.term.is_empty() || req.term.len() > 64 {
                    "xterm".into()
                } else {
                    req.term.clone()
                },
                rows: clamp(size.rows, 24),
                cols: clamp(size.cols, 80),
                modes: Vec::new(),
            },
            start: Default::default(),
            max_running: None,
            open_timeout: (req.open_timeout_secs > 0).then(|| {
                (
                    std::time::Duration::from_secs(req.open_timeout_secs),
                    "the client's open timeout, --open-timeout",
                )
            }),
        };
        match self.host.open(&self.who, open).await {
            Ok(session) => {
                self.send(frames::server(
                    rid,
                    server_frame::Msg::Opened(SessionOpened {
                        session: Some(session.info()),
                    }),
                ))
                .await;
                if req.attach {
                    let from = session.journal().resume_seq();
                    self.start_follow(rid, session, None, from, true).await;
                }
            }
            Err(e) => self.session_error(rid, e).await,
        }
    }

    async fn start_follow(
        &mut self,
        rid: u64,
        session: Arc<Session>,
        command: Option<u64>,
        from: u64,
        follow: bool,
    ) {
        self.stop_follow();
        let journal = session.journal().clone();
        let batch = journal.read(from, 0);
        if command.is_none() {
            self.send(frames::server(
                rid,
                server_frame::Msg::Attached(Attached {
                    session: Some(session.info()),
                    from_seq: from,
                    dropped_bytes: batch.dropped_before,
                }),
            ))
            .await;
        }
        let cancel = CancellationToken::new();
        let attached = (follow && command.is_none())
            .then(|| Attachment::new(&session, &self.who, self.host.audit()));
        tokio::spawn(follow_journal(
            journal,
            from,
            command,
            follow,
            rid,
            self.out.clone(),
            cancel.clone(),
        ));
        self.follow = Some(Follow {
            session,
            command,
            cancel,
            _attached: attached,
        });
    }
}

fn clamp(v: u32, default: u16) -> u16 {
    match v {
        0 => default,
        v => v.min(u16::MAX as u32) as u16,
    }
}

/// Send records from `from` on: all of them (a session), or one command's until its exit.
/// Without `follow`, stop at the end of what is there.
async fn follow_journal(
    journal: Arc<Journal>,
    from: u64,
    command: Option<u64>,
    follow: bool,
    rid: u64,
    out: mpsc::Sender<ServerFrame>,
    cancel: CancellationToken,
) {
    let reader = journal.register_reader(from);
    let mut next = from;
    'outer: loop {
        let batch = journal.read(next, BATCH_BYTES);
        if batch.records.is_empty() && batch.next > next {
            // Only records consumed on their own: step over them.
            next = batch.next;
            journal.move_reader(reader, next);
            continue;
        }
        if batch.records.is_empty() {
            if !follow {
                let _ = out
                    .send(frames::server(rid, server_frame::Msg::Done(Done {})))
                    .await;
                break;
            }
            tokio::select! {
                r = journal.wait_for(next) => {
                    if r == Err(JournalError::Closed) && journal.read(next, 1).records.is_empty() {
                        let _ = out.send(frames::error(rid, ErrorCode::ErrorSessionClosed, "the session was closed", "")).await;
                        break;
                    }
                }
                () = cancel.cancelled() => break,
            }
            continue;
        }
        let batch_next = batch.next;
        for rec in batch.records {
            next = rec.seq + 1;
            let ends_command = command.is_some_and(|c| c == rec.command_id)
                && matches!(rec.kind, Some(record::Kind::Exit(_)));
            if command.is_none_or(|c| c == rec.command_id) {
                let frame = frames::server(rid, server_frame::Msg::Record(rec));
                tokio::select! {
                    r = out.send(frame) => if r.is_err() { break 'outer },
                    () = cancel.cancelled() => break 'outer,
                }
            }
            if ends_command {
                let _ = out
                    .send(frames::server(rid, server_frame::Msg::Done(Done {})))
                    .await;
                break 'outer;
            }
        }
        next = next.max(batch_next);
        journal.move_reader(reader, next);
    }
    journal.unregister_reader(reader);
}

/// The protocol's error code for an endpoint's refusal.
fn endpoint_code(e: &EndpointError) -> ErrorCode {
    match e {
        EndpointError::Unknown { .. } => ErrorCode::ErrorNotFound,
        EndpointError::AccessDenied { .. }
        | EndpointError::CommandRefused { .. }
        | EndpointError::ShellRefused { .. } => ErrorCode::ErrorPermissionDenied,
        EndpointError::OutputQuota { .. }
        | EndpointError::InputQuota { .. }
        | EndpointError::OperationTimeout { .. }
        | EndpointError::Busy { .. }
        | EndpointError::PerUser { .. } => ErrorCode::ErrorQuota,
        EndpointError::Invalid { .. } => ErrorCode::ErrorInternal,
        EndpointError::OpenTimeout { .. } => ErrorCode::ErrorUnavailable,
    }
}
