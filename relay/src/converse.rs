//! One client conversation (relay.proto `Converse`): the session protocol between a client
//! and an agent, relayed over the agent's tunnel as one channel, under the user the relay
//! authenticated.
//!
//! Most frames pass through untouched. Attach is spliced: the agent may already have trimmed
//! records the relay persisted (spill mode), so the relay sends the client every record it
//! holds from the asked seq on, then the agent's live stream, dropping what it already sent;
//! records travel by seq, so the client sees each exactly once and in order. While the agent
//! is offline the relay answers Hello, Attach (from its store, read-only) and List itself,
//! and refuses what needs the agent; an attached client that follows is resumed on the
//! agent as soon as its tunnel is back, from the next seq it has not seen.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use remote_proto::relay::{ConverseRequest, ConverseResponse, ConverseState, converse_response};
use remote_proto::session::{
    Attach, Attached, ClientFrame, Done, ErrorCode, Hello, ServerFrame, SessionList, SessionState,
    client_frame, server_frame,
};
use remote_proto::{PROTOCOL_VERSION, frames};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::mirror;
use crate::server::Shared;
use crate::tunnels::{Channel, ChannelEvent};

/// How long a client has to name its target.
const TARGET_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent has to answer the relay's Hello on a new channel.
const AGENT_HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Request id of the relay's own requests to the agent (its Hello).
const RELAY_RID: u64 = u64::MAX;
/// Payload bytes read from the store per batch.
const STORE_BATCH: usize = 256 * 1024;

type Out = mpsc::Sender<Result<ConverseResponse, Status>>;

/// An Attach being spliced.
struct Splice {
    rid: u64,
    session: String,
    follow: bool,
    /// The next seq the client should get; `None` until the agent said where it starts.
    expected: Option<u64>,
    /// An Attach re-sent to the agent after it came back: its Attached is not forwarded.
    resumed: bool,
}

struct Conv {
    shared: Arc<Shared>,
    user: String,
    agent: String,
    out: Out,
    link: Option<Channel>,
    splice: Option<Splice>,
    /// The client's latest acknowledgement not yet written to the store (session, seq),
    /// and when one was last written: acknowledgements come with every record, the store
    /// hears of them at most every [`ACK_WRITE_EVERY`] and when the conversation ends.
    ack: Option<(String, u64)>,
    ack_written: std::time::Instant,
}

/// How often a conversation writes its client's acknowledgement to the store (and trims
/// the records it covers).
const ACK_WRITE_EVERY: Duration = Duration::from_millis(500);

/// Why a conversation ends early, for the client.
enum End {
    Quiet,
    Status(Status),
}

/// A conversation whose target was named, checked and (when online) greeted.
pub struct Opened(Conv);

/// Read the target, check the caller may use it, and connect to the agent. Failures are
/// returned before the response starts (a trailers-only answer), which every client reads
/// reliably; an error inside a stream can be lost to a stream reset that overtakes it.
pub async fn open(
    shared: Arc<Shared>,
    user: String,
    inbound: &mut Streaming<ConverseRequest>,
    out: Out,
) -> Result<Opened, Status> {
    let target = match tokio::time::timeout(TARGET_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(ConverseRequest {
            msg: Some(remote_proto::relay::converse_request::Msg::Target(t)),
        }))) => t,
        Ok(Ok(_)) => {
            return Err(Status::invalid_argument(
                "the first message of a conversation must name its target (agent or session)",
            ));
        }
        Ok(Err(s)) => return Err(s),
        Err(_) => return Err(Status::deadline_exceeded("no target named within 30 s")),
    };
    let agent = resolve(&shared, &user, &target.agent, &target.session_id).await?;
    let mut conv = Conv {
        shared,
        user,
        agent,
        out,
        link: None,
        splice: None,
        ack: None,
        ack_written: std::time::Instant::now(),
    };
    match conv.connect(!target.agent.is_empty()).await {
        Ok(()) => Ok(Opened(conv)),
        Err(End::Status(s)) => Err(s),
        Err(End::Quiet) => Err(Status::cancelled("the client left")),
    }
}

/// Serve an opened conversation until the client or the agent ends it.
pub async fn serve(opened: Opened, mut inbound: Streaming<ConverseRequest>) {
    let mut conv = opened.0;
    let result = conv.run(&mut inbound).await;
    conv.write_ack().await;
    if let Err(End::Status(s)) = result {
        let _ = conv.out.send(Err(s)).await;
    }
}

/// The agent a target names, after checking the caller may use it.
async fn resolve(
    shared: &Shared,
    user: &str,
    agent: &str,
    session: &str,
) -> Result<String, Status> {
    match (agent.is_empty(), session.is_empty()) {
        (false, true) => {
            if shared.registry.is_online(agent) {
                return Ok(agent.to_string());
            }
            let known = shared
                .store
                .list_agents()
                .await
                .map_err(crate::server::store_status)?
                .iter()
                .any(|a| a.name == agent);
            Err(if known {
                Status::unavailable(format!(
                    "agent '{agent}' is offline (no tunnel to this relay): check that remote-agent runs there with --relay; its sessions can still be listed and received"
                ))
            } else {
                Status::not_found(format!(
                    "no agent '{agent}' is enrolled at this relay: see `remote-relay agent list`, or enrol it with a join token"
                ))
            })
        }
        (true, false) => match shared.store.get_session(session).await {
            Ok(Some(row)) if row.owner == user => Ok(row.agent),
            Ok(_) => Err(Status::not_found(format!(
                "no session '{session}' for you at this relay: list yours with `remote session list`"
            ))),
            Err(e) => Err(crate::server::store_status(e)),
        },
        _ => Err(Status::invalid_argument(
            "name either an agent or a session as the conversation's target",
        )),
    }
}

impl Conv {
    async fn state(&self, live: bool) -> Result<(), End> {
        let msg = converse_response::Msg::State(ConverseState {
            agent: self.agent.clone(),
            live,
        });
        self.out
            .send(Ok(ConverseResponse { msg: Some(msg) }))
            .await
            .map_err(|_| End::Quiet)
    }

    async fn to_client(&self, frame: Vec<u8>) -> Result<(), End> {
        let msg = converse_response::Msg::Frame(frame);
        self.out
            .send(Ok(ConverseResponse { msg: Some(msg) }))
            .await
            .map_err(|_| End::Quiet)
    }

    async fn send_frame(&self, frame: ServerFrame) -> Result<(), End> {
        self.to_client(frame.encode_to_vec()).await
    }

    async fn error(
        &self,
        rid: u64,
        code: ErrorCode,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Result<(), End> {
        self.send_frame(frames::error(rid, code, message, hint))
            .await
    }

    fn offline_message(&self) -> String {
        format!(
            "agent '{}' is offline: this conversation is read-only until it is back",
            self.agent
        )
    }

    /// Open a channel to the agent and greet it. `required`: fail if the agent is offline
    /// (a conversation that targets the agent itself); otherwise stay offline.
    async fn connect(&mut self, required: bool) -> Result<(), End> {
        let tunnel = self.shared.registry.get(&self.agent);
        let channel = match tunnel {
            Some(t) => t.open_channel(&self.user).await,
            None => None,
        };
        let Some(mut channel) = channel else {
            if required {
                return Err(End::Status(Status::unavailable(self.offline_message())));
            }
            return self.state(false).await;
        };
        let hello = frames::client(
            RELAY_RID,
            client_frame::Msg::Hello(frames::hello(&format!(
                "remote-relay {}",
                env!("CARGO_PKG_VERSION")
            ))),
        );
        if !channel.send(hello.encode_to_vec()).await {
            return Err(End::Status(Status::unavailable(self.offline_message())));
        }
        let answer = tokio::time::timeout(AGENT_HELLO_TIMEOUT, channel.next()).await;
        match answer {
            Ok(ChannelEvent::Frame(f)) => match ServerFrame::decode(f.as_slice()) {
                Ok(ServerFrame {
                    msg: Some(server_frame::Msg::Hello(_)),
                    ..
                }) => {}
                Ok(ServerFrame {
                    msg: Some(server_frame::Msg::Error(e)),
                    ..
                }) => {
                    return Err(End::Status(Status::permission_denied(format!(
                        "agent '{}': {}{}",
                        self.agent,
                        e.message,
                        if e.hint.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", e.hint)
                        }
                    ))));
                }
                _ => {
                    return Err(End::Status(Status::internal(format!(
                        "agent '{}' did not answer Hello: is it of the same release as the relay?",
                        self.agent
                    ))));
                }
            },
            Ok(ChannelEvent::Closed(reason)) => {
                // The agent refused the channel (e.g. no such account there).
                return Err(End::Status(Status::permission_denied(format!(
                    "agent '{}' refused the conversation: {reason}",
                    self.agent
                ))));
            }
            Err(_) => {
                return Err(End::Status(Status::deadline_exceeded(format!(
                    "agent '{}' did not answer within 30 s",
                    self.agent
                ))));
            }
        }
        self.link = Some(channel);
        self.state(true).await
    }

    async fn run(&mut self, inbound: &mut Streaming<ConverseRequest>) -> Result<(), End> {
        let mut online = self.shared.registry.watch();
        let mut client_done = false;
        loop {
            let waiting_for_agent =
                self.link.is_none() && self.splice.as_ref().is_some_and(|s| s.follow);
            tokio::select! {
                m = inbound.message(), if !client_done => match m {
                    Ok(Some(ConverseRequest { msg: Some(remote_proto::relay::converse_request::Msg::Frame(f)) })) => {
                        self.on_client_frame(f).await?;
                    }
                    Ok(Some(_)) => {
                        self.error(0, ErrorCode::ErrorInvalidRequest, "the target was already named", "").await?;
                    }
                    Ok(None) => {
                        // Half-closed: the agent still answers what was asked, then ends
                        // the channel, which ends the conversation.
                        match &self.link {
                            Some(link) if link.close_input().await => client_done = true,
                            _ => return Ok(()),
                        }
                    }
                    // E.g. a message over the size limit: the client learns why.
                    Err(s) => return Err(End::Status(s)),
                },
                ev = next_event(&mut self.link) => match ev {
                    ChannelEvent::Frame(f) => self.on_agent_frame(f).await?,
                    ChannelEvent::Closed(_) if client_done => return Ok(()),
                    ChannelEvent::Closed(reason) => self.lost_agent(reason).await?,
                },
                r = online.changed(), if waiting_for_agent => {
                    if r.is_err() {
                        return Ok(());
                    }
                    if self.shared.registry.is_online(&self.agent) {
                        self.resume().await?;
                    }
                }
                () = self.shared.shutdown.cancelled() => {
                    return Err(End::Status(Status::unavailable("the relay is shutting down; reconnect in a moment")));
                }
            }
        }
    }

    async fn lost_agent(&mut self, reason: String) -> Result<(), End> {
        self.link = None;
        tracing::debug!(agent = %self.agent, "conversation lost its channel: {reason}");
        self.state(false).await?;
        if self.splice.as_ref().is_some_and(|s| s.follow) {
            // An attached client waits, read-only, for the agent to come back.
            if self.shared.registry.is_online(&self.agent) {
                self.resume().await?;
            }
            return Ok(());
        }
        self.error(
            0,
            ErrorCode::ErrorUnavailable,
            format!("agent '{}' went offline ({reason})", self.agent),
            "the session keeps running there: `remote attach` it when the agent is back",
        )
        .await?;
        Err(End::Quiet)
    }

    /// The agent is back: re-attach the spliced session from the next seq not yet sent.
    async fn resume(&mut self) -> Result<(), End> {
        let Some(s) = &self.splice else {
            return Ok(());
        };
        let (rid, session, from) = (s.rid, s.session.clone(), s.expected);
        self.connect(false).await?;
        let Some(link) = &self.link else {
            return Ok(());
        };
        let attach = frames::client(
            rid,
            client_frame::Msg::Attach(Attach {
                session_id: session,
                from_seq: from,
                follow: true,
            }),
        );
        if link.send(attach.encode_to_vec()).await {
            if let Some(s) = &mut self.splice {
                s.resumed = true;
            }
        } else {
            self.link = None;
        }
        Ok(())
    }

    /// Whether `user` owns session `id` according to the store.
    async fn owns(&self, id: &str) -> Option<crate::store::SessionRow> {
        match self.shared.store.get_session(id).await {
            Ok(Some(row)) if row.owner == self.user => Some(row),
            _ => None,
        }
    }

    async fn on_client_frame(&mut self, bytes: Vec<u8>) -> Result<(), End> {
        if bytes.len() > remote_proto::MAX_FRAME_BYTES {
            return self
                .error(
                    0,
                    ErrorCode::ErrorFrameTooLarge,
                    format!(
                        "frame of {} bytes refused: the limit is {} bytes",
                        bytes.len(),
                        remote_proto::MAX_FRAME_BYTES
                    ),
                    "send input and commands in smaller pieces",
                )
                .await;
        }
        let frame = match ClientFrame::decode(bytes.as_slice()) {
            Ok(f) => f,
            Err(e) => {
                return self
                    .error(
                        0,
                        ErrorCode::ErrorBadFrame,
                        format!("malformed frame: {e}"),
                        "is the client speaking the remote session protocol?",
                    )
                    .await;
            }
        };
        let rid = frame.request_id;
        let Some(msg) = frame.msg else {
            return self
                .error(
                    rid,
                    ErrorCode::ErrorBadFrame,
                    "unknown or empty request",
                    "the client may be newer than this relay: upgrade remote-relay",
                )
                .await;
        };
        match msg {
            client_frame::Msg::Hello(h) => {
                if h.protocol_version != PROTOCOL_VERSION {
                    return self
                        .error(
                            rid,
                            ErrorCode::ErrorUnsupportedVersion,
                            format!(
                                "protocol version {} is not supported; this relay speaks version {PROTOCOL_VERSION}",
                                h.protocol_version
                            ),
                            "use a remote client of the same release as the relay",
                        )
                        .await;
                }
                let hello = Hello {
                    protocol_version: PROTOCOL_VERSION,
                    software: format!("remote-relay {}", env!("CARGO_PKG_VERSION")),
                };
                self.send_frame(frames::server(rid, server_frame::Msg::Hello(hello)))
                    .await
            }
            client_frame::Msg::Attach(a) => {
                let Some(row) = self.owns(&a.session_id).await else {
                    // Not mirrored (yet): the agent decides, with its own rules.
                    self.splice = None;
                    return self.forward_or_refuse(rid, bytes).await;
                };
                self.splice = Some(Splice {
                    rid,
                    session: a.session_id.clone(),
                    follow: a.follow,
                    expected: None,
                    resumed: false,
                });
                if self.link.is_some() {
                    return self.forward(bytes).await;
                }
                self.attach_offline(rid, row, a).await
            }
            client_frame::Msg::Ack(a) => {
                if let Some(session) = self.splice.as_ref().map(|s| s.session.clone()) {
                    if self.ack.as_ref().is_some_and(|(id, _)| *id != session) {
                        self.write_ack().await;
                    }
                    self.ack = Some((session, a.seq));
                    if self.ack_written.elapsed() >= ACK_WRITE_EVERY {
                        self.write_ack().await;
                    }
                }
                if self.link.is_some() {
                    self.forward(bytes).await?;
                }
                Ok(())
            }
            client_frame::Msg::Detach(_) => {
                self.write_ack().await;
                self.splice = None;
                if self.link.is_some() {
                    return self.forward(bytes).await;
                }
                self.send_frame(frames::server(rid, server_frame::Msg::Done(Done {})))
                    .await
            }
            client_frame::Msg::Close(c) => {
                // A session its agent no longer has (closed while the relay was away, or the
                // agent restarted) lives on only here: removing it is the relay's job.
                match self.owns(&c.session_id).await {
                    Some(row) if row.state == SessionState::StateClosed as i32 => {
                        if let Err(e) = self.shared.store.delete_session(&row.id).await {
                            tracing::warn!(session = %row.id, "closed session not removed: {e}");
                        }
                        self.send_frame(frames::server(rid, server_frame::Msg::Done(Done {})))
                            .await
                    }
                    _ => self.forward_or_refuse(rid, bytes).await,
                }
            }
            client_frame::Msg::List(_) if self.link.is_none() => {
                let rows = self
                    .shared
                    .store
                    .sessions_of_agent(&self.agent)
                    .await
                    .unwrap_or_default();
                let mut sessions = Vec::new();
                for row in rows.into_iter().filter(|r| r.owner == self.user) {
                    let js = self
                        .shared
                        .store
                        .journal_state(&row.id)
                        .await
                        .unwrap_or_default();
                    sessions.push(mirror::session_info(&row, js.stored_seq + 1, js.client_ack));
                }
                self.send_frame(frames::server(
                    rid,
                    server_frame::Msg::Sessions(SessionList { sessions }),
                ))
                .await
            }
            _ => self.forward_or_refuse(rid, bytes).await,
        }
    }

    /// Write the client's latest acknowledgement, and drop the persisted records it covers:
    /// like the agent's journal, the relay keeps what no client has consumed yet.
    async fn write_ack(&mut self) {
        self.ack_written = std::time::Instant::now();
        let Some((session, seq)) = self.ack.take() else {
            return;
        };
        let store = &self.shared.store;
        if let Err(e) = store.set_client_ack(&session, seq).await {
            tracing::warn!(session = %session, "client acknowledgement not saved: {e}");
            return;
        }
        if let Err(e) = store.trim_records(&session, seq).await {
            tracing::warn!(session = %session, "acknowledged records not trimmed: {e}");
        }
    }

    async fn forward(&mut self, bytes: Vec<u8>) -> Result<(), End> {
        if let Some(link) = &self.link
            && !link.send(bytes).await
        {
            return self.lost_agent("the tunnel ended".into()).await;
        }
        Ok(())
    }

    async fn forward_or_refuse(&mut self, rid: u64, bytes: Vec<u8>) -> Result<(), End> {
        if self.link.is_some() {
            return self.forward(bytes).await;
        }
        self.error(
            rid,
            ErrorCode::ErrorUnavailable,
            self.offline_message(),
            "output already persisted can be read with `remote receive` or `remote attach`",
        )
        .await
    }

    /// Attach while the agent is offline: what the store holds, then wait (follow) or Done.
    async fn attach_offline(
        &mut self,
        rid: u64,
        row: crate::store::SessionRow,
        a: Attach,
    ) -> Result<(), End> {
        let js = self
            .shared
            .store
            .journal_state(&row.id)
            .await
            .unwrap_or_default();
        let from = a
            .from_seq
            .unwrap_or(js.client_ack + 1)
            .max(js.trimmed_seq + 1);
        let mut info = mirror::session_info(&row, js.stored_seq + 1, js.client_ack);
        if info.state != SessionState::StateClosed as i32 {
            info.state = SessionState::StateDisconnected as i32;
        }
        let attached = Attached {
            session: Some(info),
            from_seq: from,
            dropped_bytes: 0,
        };
        self.send_frame(frames::server(rid, server_frame::Msg::Attached(attached)))
            .await?;
        if let Some(s) = &mut self.splice {
            s.expected = Some(from);
        }
        self.fill_from_store(None).await?;
        if a.follow && row.state == SessionState::StateClosed as i32 {
            self.splice = None;
            return self
                .error(
                    rid,
                    ErrorCode::ErrorSessionClosed,
                    "the session was closed",
                    "everything it printed that the relay kept was sent",
                )
                .await;
        }
        if !a.follow {
            self.splice = None;
            return self
                .send_frame(frames::server(rid, server_frame::Msg::Done(Done {})))
                .await;
        }
        Ok(())
    }

    /// Send the spliced client the stored records from its next expected seq, up to
    /// `before` (exclusive) or all there are.
    async fn fill_from_store(&mut self, before: Option<u64>) -> Result<(), End> {
        let Some(s) = &self.splice else {
            return Ok(());
        };
        let (rid, session) = (s.rid, s.session.clone());
        let Some(mut next) = s.expected else {
            return Ok(());
        };
        'outer: loop {
            if before.is_some_and(|b| next >= b) {
                break;
            }
            let rows = match self
                .shared
                .store
                .read_records(&session, next, STORE_BATCH)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(session = %session, "cannot read persisted records: {e}");
                    break;
                }
            };
            if rows.is_empty() {
                break;
            }
            for row in rows {
                if before.is_some_and(|b| row.seq >= b) {
                    break 'outer;
                }
                if row.seq < next {
                    continue;
                }
                next = row.seq + 1;
                let rec = mirror::record(row);
                self.send_frame(frames::server(rid, server_frame::Msg::Record(rec)))
                    .await?;
            }
        }
        if let Some(s) = &mut self.splice {
            s.expected = Some(next);
        }
        Ok(())
    }

    async fn on_agent_frame(&mut self, bytes: Vec<u8>) -> Result<(), End> {
        let Ok(frame) = ServerFrame::decode(bytes.as_slice()) else {
            // Not ours to judge: the client reports what it cannot read.
            return self.to_client(bytes).await;
        };
        let rid = frame.request_id;
        if rid == RELAY_RID {
            // Answers to the relay's own requests (a repeated Hello) stay here.
            return Ok(());
        }
        if let Some(server_frame::Msg::Opened(o)) = &frame.msg
            && let Some(info) = &o.session
        {
            // Mirror at once, so the new session can be named from anywhere right away.
            let row = mirror::session_row(&self.agent, info);
            if row.owner == self.user
                && let Err(e) = self.shared.store.upsert_session(&row).await
            {
                tracing::warn!(agent = %self.agent, "session not mirrored: {e}");
            }
        }
        let spliced = self.splice.as_ref().is_some_and(|s| s.rid == rid);
        if !spliced {
            return self.to_client(bytes).await;
        }
        match frame.msg {
            Some(server_frame::Msg::Attached(at)) => {
                let resumed = self.splice.as_ref().is_some_and(|s| s.resumed);
                if let Some(s) = &mut self.splice {
                    s.resumed = false;
                    if s.expected.is_none() {
                        s.expected = Some(at.from_seq);
                    }
                }
                if !resumed {
                    self.to_client(bytes).await?;
                }
                self.fill_from_store(None).await
            }
            Some(server_frame::Msg::Record(r)) => {
                let expected = self.splice.as_ref().and_then(|s| s.expected);
                match expected {
                    Some(e) if r.seq < e => Ok(()),
                    Some(e) => {
                        if r.seq > e {
                            self.fill_from_store(Some(r.seq)).await?;
                        }
                        if let Some(s) = &mut self.splice {
                            s.expected = Some(r.seq + 1);
                        }
                        self.to_client(bytes).await
                    }
                    None => self.to_client(bytes).await,
                }
            }
            Some(server_frame::Msg::Done(_)) => {
                self.fill_from_store(None).await?;
                self.splice = None;
                self.to_client(bytes).await
            }
            Some(server_frame::Msg::Error(_)) => {
                self.splice = None;
                self.to_client(bytes).await
            }
            _ => self.to_client(bytes).await,
        }
    }
}

/// The next event of the channel, or never when there is none.
async fn next_event(link: &mut Option<Channel>) -> ChannelEvent {
    match link {
        Some(ch) => ch.next().await,
        None => std::future::pending().await,
    }
}
