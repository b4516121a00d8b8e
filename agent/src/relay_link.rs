//! The agent's outbound tunnel to a relay (design.md §1; relay.proto's tunnel messages over
//! [`remote_proto::tunnel`]), for hosts nobody can dial into. The agent enrols once (the
//! `AgentTunnel/Enrol` gRPC call) with a join token and keeps the
//! per-agent credential it gets in its state dir (0600); the relay's certificate is pinned
//! on first contact (or given). It then holds one tunnel, reconnecting with jittered
//! exponential backoff (capped at a minute), and on it:
//!
//! * mirrors its sessions to the relay (AgentHello, then SessionUpdate as they change);
//! * spills the journal of every spill-mode session: records go to the relay, which
//!   acknowledges them once durable, and the journal then trims them; after a reconnect the
//!   agent resends everything not acknowledged;
//! * serves each channel the relay opens as a session-protocol connection
//!   ([`crate::wire::serve`]) for the user the relay asserts, under this agent's own accounts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use remote_proto::relay::agent_tunnel_client::AgentTunnelClient;
use remote_proto::relay::{
    AgentHello, AgentMessage, AuditBatch, AuditLine as ProtoAuditLine, ChannelClosed, ChannelData,
    EnrolRequest, Keepalive, RelayMessage, SessionUpdate, SpillBatch, TunnelOpen, agent_message,
    relay_message,
};
use remote_proto::session::SessionInfo;
use remote_proto::tls::PinnedCert;
use remote_proto::tunnel::{self, FrameReader};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::accounts::AccountDb;
use crate::config::RelaySettings;
use crate::process::Identity;
use crate::session::journal::Mode;
use crate::session::{Principal, Session, SessionHost};

/// The credential from enrolment, in the state dir.
pub const CREDENTIAL_FILE: &str = "relay_credential";
/// The pinned relay certificate, in the state dir: `HOST:PORT SHA256:…`.
pub const FINGERPRINT_FILE: &str = "relay_fingerprint";

const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the session mirror is compared with the host's sessions.
const MIRROR_EVERY: Duration = Duration::from_millis(200);
/// Payload bytes per spill batch.
const SPILL_BATCH: usize = 256 * 1024;
/// Frames from the relay queued per channel; a channel whose session does not keep up is
/// closed rather than stalling the tunnel.
const CHANNEL_INPUT_QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "relay {addr}: this agent has no credential yet and no join token was given: create one on the relay (`remote-relay token create --agent`) and start the agent with --join-token"
    )]
    NoJoinToken { addr: String },
    #[error("relay {addr} refused to enrol this agent: {message}")]
    EnrolRefused { addr: String, message: String },
    #[error("relay {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error(
        "relay {addr} presented certificate {seen}, but {pinned} is pinned in {file}: if the relay's certificate was replaced on purpose, delete that file or set relay.fingerprint; otherwise someone may be intercepting"
    )]
    CertificateChanged {
        addr: String,
        seen: String,
        pinned: String,
        file: PathBuf,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The link to one relay.
pub struct RelayLink {
    pub settings: RelaySettings,
    pub name: String,
    pub state_dir: PathBuf,
    pub join_token: Option<String>,
    pub host: Arc<SessionHost>,
    pub accounts: AccountDb,
    pub shutdown: CancellationToken,
}

impl RelayLink {
    /// Keep a tunnel up until shutdown. Returns early only when the agent cannot enrol.
    pub async fn run(self) -> Result<(), LinkError> {
        let addr = self.settings.addr.clone();
        let mut backoff = BACKOFF_FIRST;
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            let started = Instant::now();
            match self.session().await {
                Ok(()) => return Ok(()),
                Err(e @ (LinkError::NoJoinToken { .. } | LinkError::EnrolRefused { .. })) => {
                    return Err(e);
                }
                Err(e) => tracing::warn!("relay link: {e}"),
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = BACKOFF_FIRST;
            }
            let wait = jitter(backoff);
            tracing::info!(relay = %addr, "reconnecting in {:.1} s", wait.as_secs_f64());
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.shutdown.cancelled() => return Ok(()),
            }
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
    }

    fn credential_path(&self) -> PathBuf {
        self.state_dir.join(CREDENTIAL_FILE)
    }

    /// Connect (enrolling first if needed) and serve one tunnel until it ends.
    async fn session(&self) -> Result<(), LinkError> {
        let credential = match read_secret(&self.credential_path()) {
            Some(c) => c,
            None => self.enrol().await?,
        };
        let tls = self.connect(tunnel::ALPN).await?;
        let (rd, mut wr) = tokio::io::split(tls);
        let hello = AgentMessage {
            msg: Some(agent_message::Msg::Hello(self.hello())),
        };
        let greet = async {
            tunnel::write(&mut wr, &TunnelOpen { credential }).await?;
            tunnel::write(&mut wr, &hello).await?;
            wr.flush().await
        };
        tokio::time::timeout(CONNECT_TIMEOUT, greet)
            .await
            .map_err(|_| self.err("the relay did not take the tunnel's greeting within 10 s"))?
            .map_err(|e| self.err(format!("the tunnel broke during its greeting: {e}")))?;
        let mut inbound = Inbound {
            reader: FrameReader::new(tunnel::MAX_MESSAGE_BYTES),
            rd,
        };
        let first =
            tokio::time::timeout(CONNECT_TIMEOUT, inbound.reader.message(&mut inbound.rd)).await;
        let (persisted, audit_seq) = match first {
            Ok(Ok(Some(RelayMessage {
                msg: Some(relay_message::Msg::Hello(h)),
            }))) => (h.persisted, h.audit_seq),
            Ok(Ok(Some(RelayMessage {
                msg: Some(relay_message::Msg::Refused(r)),
            }))) => return Err(self.err(format!("tunnel refused: {}", r.message))),
            Ok(Err(e)) => return Err(self.err(format!("the tunnel broke: {e}"))),
            _ => return Err(self.err("the relay did not answer the tunnel's hello")),
        };
        tracing::info!(relay = %self.settings.addr, "tunnel up");
        let (tx, rx) = mpsc::channel::<AgentMessage>(256);
        let stop = CancellationToken::new();
        let writer = tokio::spawn(write_tunnel(wr, rx, stop.clone()));
        // The audit log goes to the relay from where its store ends.
        tokio::spawn(forward_audit(
            self.host.audit().clone(),
            audit_seq,
            tx.clone(),
            stop.clone(),
        ));
        let mut tunnel = Tunnel {
            link: self,
            tx,
            channels: HashMap::new(),
            spills: HashMap::new(),
            mirror: HashMap::new(),
            stop,
        };
        for (id, seq) in persisted {
            if let Some(s) = self.host.find(&id) {
                s.journal().persisted(seq);
            }
        }
        let result = tunnel.serve(&mut inbound).await;
        tunnel.stop.cancel();
        drop(tunnel);
        let _ = writer.await;
        result
    }

    fn err(&self, message: impl Into<String>) -> LinkError {
        LinkError::Connect {
            addr: self.settings.addr.clone(),
            message: message.into(),
        }
    }

    /// The first message: every session and where its spill resumes.
    fn hello(&self) -> AgentHello {
        let mut sessions = Vec::new();
        let mut spill_from = HashMap::new();
        for s in self.host.all() {
            let info = s.info();
            let (persisted, _) = s.journal().spill_state();
            spill_from.insert(info.id.clone(), persisted + 1);
            sessions.push(info);
        }
        AgentHello {
            protocol_version: remote_proto::PROTOCOL_VERSION,
            software: format!("remote-agent {}", env!("CARGO_PKG_VERSION")),
            sessions,
            spill_from,
            audit_log: self.host.audit().log_id().unwrap_or_default().to_string(),
        }
    }

    /// Exchange the join token for a credential (a gRPC call) and keep it.
    async fn enrol(&self) -> Result<String, LinkError> {
        let addr = self.settings.addr.clone();
        let Some(token) = &self.join_token else {
            return Err(LinkError::NoJoinToken { addr });
        };
        let channel = self.grpc().await?;
        let mut client = AgentTunnelClient::new(channel);
        let req = EnrolRequest {
            join_token: token.clone(),
            agent_name: self.name.clone(),
            software: format!("remote-agent {}", env!("CARGO_PKG_VERSION")),
        };
        let resp = client.enrol(req).await.map_err(|s| match s.code() {
            tonic::Code::Unauthenticated
            | tonic::Code::InvalidArgument
            | tonic::Code::AlreadyExists => LinkError::EnrolRefused {
                addr: addr.clone(),
                message: s.message().to_string(),
            },
            _ => self.err(format!("enrolment failed: {}", s.message())),
        })?;
        let credential = resp.into_inner().credential;
        let path = self.credential_path();
        crate::paths::write_private_atomic(&path, format!("{credential}\n").as_bytes())
            .map_err(|source| LinkError::Write { path, source })?;
        tracing::info!(relay = %addr, name = %self.name, "enrolled at the relay; credential kept in {}", self.credential_path().display());
        Ok(credential)
    }

    /// A TLS connection offering `alpn`, to the pinned certificate (pinned on first contact).
    async fn connect(&self, alpn: &[u8]) -> Result<RelayStream, LinkError> {
        let pin = self.pin()?;
        let result = dial(&self.settings, pin.config(alpn)).await;
        pin.settle(self, result)
    }

    /// A gRPC channel (HTTP/2) to the relay, for enrolment.
    async fn grpc(&self) -> Result<tonic::transport::Channel, LinkError> {
        let pin = self.pin()?;
        let (settings, config) = (self.settings.clone(), pin.config(b"h2"));
        let connect = move || dial_owned(settings.clone(), config.clone());
        let result = remote_proto::tls::grpc_channel(&self.settings.addr, connect)
            .await
            .map_err(|e| remote_proto::tls::root_cause(&e));
        pin.settle(self, result.map_err(std::io::Error::other))
    }

    /// What is pinned for this relay, and a verifier that records what it sees.
    fn pin(&self) -> Result<Pin, LinkError> {
        let file = self.state_dir.join(FINGERPRINT_FILE);
        let key = self.settings.addr.to_ascii_lowercase();
        let pinned = match &self.settings.fingerprint {
            Some(fp) => Some(remote_proto::tls::parse_fingerprint(fp).ok_or_else(|| {
                self.err(format!(
                    "relay fingerprint '{fp}' is not a SHA256:… fingerprint"
                ))
            })?),
            None => read_pin(&file, &key),
        };
        let verifier = Arc::new(PinnedCert::new(pinned.clone()));
        let config = verifier
            .client_config()
            .map_err(|e| self.err(format!("TLS setup: {e}")))?;
        Ok(Pin {
            file,
            key,
            pinned,
            verifier,
            config,
        })
    }

    /// The principal the relay asserts, under this agent's accounts.
    fn principal(&self, user: &str) -> Result<Principal, String> {
        let result = self.principal_inner(user);
        self.host.audit().record(crate::audit::Event::Auth {
            transport: crate::audit::Transport::Relay,
            peer: format!("relay {}", self.settings.addr),
            account: user.chars().take(256).collect(),
            method: "relay".into(),
            success: result.is_ok(),
            reason: result.as_ref().err().cloned(),
        });
        result
    }

    fn principal_inner(&self, user: &str) -> Result<Principal, String> {
        let account = self
            .accounts
            .get(user)
            .ok_or_else(|| format!("user '{user}' has no account on agent '{}'", self.name))?;
        let identity = Identity::for_account(&account).map_err(|e| {
            tracing::error!(account = %account.name, "relay channel refused: {e}");
            format!("account '{user}' cannot run processes on this agent (see its log)")
        })?;
        Ok(Principal {
            name: account.name.clone(),
            admin: account.admin,
            groups: account.groups.clone(),
            identity,
            transport: "relay",
        })
    }
}

/// One live tunnel's state.
struct Tunnel<'l> {
    link: &'l RelayLink,
    tx: mpsc::Sender<AgentMessage>,
    channels: HashMap<u64, ChannelHandle>,
    /// Spill tasks, by session id.
    spills: HashMap<String, CancellationToken>,
    /// What the relay was last told of each session.
    mirror: HashMap<String, SessionInfo>,
    /// Cancelled when the tunnel ends: every task of it stops.
    stop: CancellationToken,
}

/// A served channel. Dropping it ends the channel's input: the session conversation
/// handles what was queued, then ends on its own.
struct ChannelHandle {
    input: mpsc::Sender<Vec<u8>>,
    window: Arc<Semaphore>,
    /// The latest acknowledgement that arrived while the input queue was crowded: clients
    /// acknowledge every record, and acknowledgements are cumulative, so a crowd of them
    /// becomes one, delivered after the next queued frame, instead of closing the channel
    /// (losing acknowledgements would show as repeated output at the next receive).
    pending_ack: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

/// Whether `frame` is a ClientFrame carrying an Ack.
fn is_ack(frame: &[u8]) -> bool {
    use prost::Message;
    matches!(
        remote_proto::session::ClientFrame::decode(frame).map(|f| f.msg),
        Ok(Some(remote_proto::session::client_frame::Msg::Ack(_)))
    )
}

impl Tunnel<'_> {
    async fn send(&self, msg: agent_message::Msg) -> Result<(), LinkError> {
        self.tx
            .send(AgentMessage { msg: Some(msg) })
            .await
            .map_err(|_| self.link.err("the tunnel closed"))
    }

    async fn serve(&mut self, inbound: &mut Inbound) -> Result<(), LinkError> {
        let mut keepalive = tokio::time::interval(tunnel::KEEPALIVE_EVERY);
        let mut mirror = tokio::time::interval(MIRROR_EVERY);
        let mut nonce = 0u64;
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                m = inbound.reader.message(&mut inbound.rd) => match m {
                    Ok(Some(m)) => {
                        heard = Instant::now();
                        self.on_relay_message(m).await?;
                    }
                    Ok(None) => return Err(self.link.err("the relay closed the tunnel")),
                    Err(e) => return Err(self.link.err(format!("the tunnel broke: {e}"))),
                },
                () = tokio::time::sleep_until((heard + tunnel::IDLE_TIMEOUT).into()) => {
                    return Err(self.link.err(format!(
                        "nothing heard from the relay in {} s",
                        tunnel::IDLE_TIMEOUT.as_secs()
                    )));
                }
                _ = keepalive.tick() => {
                    nonce += 1;
                    self.send(agent_message::Msg::Keepalive(Keepalive { nonce })).await?;
                }
                _ = mirror.tick() => self.sync_sessions().await?,
                () = self.link.shutdown.cancelled() => return Ok(()),
            }
        }
    }

    async fn on_relay_message(&mut self, m: RelayMessage) -> Result<(), LinkError> {
        let Some(msg) = m.msg else { return Ok(()) };
        match msg {
            relay_message::Msg::Open(o) => self.open_channel(o.channel, &o.user).await?,
            relay_message::Msg::Channel(d) => {
                let full = match self.channels.get(&d.channel) {
                    Some(ch)
                        if ch.input.capacity() < CHANNEL_INPUT_QUEUE / 2 && is_ack(&d.frame) =>
                    {
                        *ch.pending_ack.lock().unwrap_or_else(|p| p.into_inner()) = Some(d.frame);
                        false
                    }
                    Some(ch) => ch.input.try_send(d.frame).is_err(),
                    None => false,
                };
                if full {
                    self.channels.remove(&d.channel);
                    self.send(agent_message::Msg::Closed(ChannelClosed {
                        channel: d.channel,
                        reason: "the session did not keep up with the client's input".into(),
                    }))
                    .await?;
                }
            }
            relay_message::Msg::Closed(c) => {
                self.channels.remove(&c.channel);
            }
            relay_message::Msg::Window(w) => {
                if let Some(ch) = self.channels.get(&w.channel) {
                    let room = (remote_proto::CHANNEL_WINDOW_BYTES as usize * 2)
                        .saturating_sub(ch.window.available_permits());
                    ch.window.add_permits((w.bytes as usize).min(room));
                }
            }
            relay_message::Msg::SpillAck(a) => {
                if let Some(s) = self.link.host.find(&a.session_id) {
                    s.journal().persisted(a.persisted_seq);
                }
            }
            relay_message::Msg::Refused(r) => {
                return Err(self
                    .link
                    .err(format!("the relay closed the tunnel: {}", r.message)));
            }
            relay_message::Msg::Hello(_) | relay_message::Msg::Keepalive(_) => {}
        }
        Ok(())
    }

    /// Serve a channel: the session protocol for the asserted user, on an in-memory pipe.
    async fn open_channel(&mut self, id: u64, user: &str) -> Result<(), LinkError> {
        let principal = match self.link.principal(user) {
            Ok(p) => p,
            Err(reason) => {
                return self
                    .send(agent_message::Msg::Closed(ChannelClosed {
                        channel: id,
                        reason,
                    }))
                    .await;
            }
        };
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let stop = self.stop.child_token();
        let window = Arc::new(Semaphore::new(remote_proto::CHANNEL_WINDOW_BYTES as usize));
        let (input_tx, mut input_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_INPUT_QUEUE);
        let host = self.link.host.clone();
        let server = tokio::spawn(crate::wire::serve(host, principal, theirs));
        let (rd, mut wr) = tokio::io::split(ours);
        let (tx, win, st) = (self.tx.clone(), window.clone(), stop.clone());
        let pending_ack = Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));
        let pending = pending_ack.clone();
        tokio::spawn(async move {
            // Relay → session: re-frame each frame with its length prefix.
            let writer = async {
                'frames: while let Some(frame) = input_rx.recv().await {
                    let ack = pending.lock().unwrap_or_else(|p| p.into_inner()).take();
                    for frame in std::iter::once(frame).chain(ack) {
                        let len = (frame.len() as u32).to_be_bytes();
                        if wr.write_all(&len).await.is_err() || wr.write_all(&frame).await.is_err()
                        {
                            break 'frames;
                        }
                    }
                }
                let _ = wr.shutdown().await;
                // The client left; keep reading until the session side finishes.
                std::future::pending::<()>().await;
            };
            // The tunnel ended: stop at once (the relay forgot the channel).
            let tunnel_end = async {
                st.cancelled().await;
            };
            // Session → relay, within the window the relay grants.
            let reader = async {
                let codec = LengthDelimitedCodec::builder()
                    .length_field_length(4)
                    .max_frame_length(remote_proto::MAX_FRAME_BYTES + 64)
                    .new_codec();
                let mut frames = FramedRead::new(rd, codec);
                while let Some(Ok(frame)) = frames.next().await {
                    let need = (frame.len() as u32).max(1);
                    match win.acquire_many(need).await {
                        Ok(p) => p.forget(),
                        Err(_) => break,
                    }
                    let msg = agent_message::Msg::Channel(ChannelData {
                        channel: id,
                        frame: Bytes::from(frame).to_vec(),
                    });
                    if tx.send(AgentMessage { msg: Some(msg) }).await.is_err() {
                        break;
                    }
                }
            };
            tokio::select! {
                () = reader => {
                    let msg = agent_message::Msg::Closed(ChannelClosed { channel: id, reason: "the session conversation ended".into() });
                    let _ = tx.send(AgentMessage { msg: Some(msg) }).await;
                }
                () = writer => {}
                () = tunnel_end => {}
            }
            server.abort();
        });
        self.channels.insert(
            id,
            ChannelHandle {
                input: input_tx,
                window,
                pending_ack,
            },
        );
        Ok(())
    }

    /// Tell the relay what changed among the sessions, and spill the new spill-mode ones.
    async fn sync_sessions(&mut self) -> Result<(), LinkError> {
        let sessions = self.link.host.all();
        let mut seen = std::collections::HashSet::with_capacity(sessions.len());
        for s in sessions {
            let info = s.info();
            seen.insert(info.id.clone());
            if s.journal().mode() == Mode::Spill && !self.spills.contains_key(&info.id) {
                let stop = self.stop.child_token();
                tokio::spawn(spill(s.clone(), self.tx.clone(), stop.clone()));
                self.spills.insert(info.id.clone(), stop);
            }
            let changed = self
                .mirror
                .get(&info.id)
                .is_none_or(|old| differs(old, &info));
            if changed {
                self.mirror.insert(info.id.clone(), info.clone());
                self.send(agent_message::Msg::Session(SessionUpdate {
                    session: Some(info),
                    removed: false,
                }))
                .await?;
            }
        }
        let gone: Vec<String> = self
            .mirror
            .keys()
            .filter(|id| !seen.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(info) = self.mirror.remove(&id) {
                if let Some(stop) = self.spills.remove(&id) {
                    stop.cancel();
                }
                self.send(agent_message::Msg::Session(SessionUpdate {
                    session: Some(info),
                    removed: true,
                }))
                .await?;
            }
        }
        Ok(())
    }
}

/// Whether the relay should hear of a change (not every new record: those it spills).
fn differs(old: &SessionInfo, new: &SessionInfo) -> bool {
    old.state != new.state
        || old.name != new.name
        || old.attached_clients != new.attached_clients
        || old.running_commands != new.running_commands
        || old.last_output_unix != new.last_output_unix
}

/// Stream a spill-mode session's records to the relay from the first one it has not
/// persisted, as they are appended, until the session closes or the tunnel ends.
async fn spill(session: Arc<Session>, tx: mpsc::Sender<AgentMessage>, stop: CancellationToken) {
    let journal = session.journal().clone();
    let id = session.info().id;
    let (persisted, first) = journal.spill_state();
    let mut next = (persisted + 1).max(first);
    loop {
        let records = journal.read_raw(next, SPILL_BATCH);
        if let Some(last) = records.last() {
            next = last.seq + 1;
            let msg = agent_message::Msg::Spill(SpillBatch {
                session_id: id.clone(),
                records,
            });
            tokio::select! {
                r = tx.send(AgentMessage { msg: Some(msg) }) => if r.is_err() { return },
                () = stop.cancelled() => return,
            }
            continue;
        }
        tokio::select! {
            r = journal.wait_for(next) => {
                if r.is_err() && journal.read_raw(next, 1).is_empty() {
                    return;
                }
            }
            () = stop.cancelled() => return,
        }
    }
}

fn jitter(d: Duration) -> Duration {
    use rand::RngExt;
    d.mul_f64(rand::rng().random_range(0.5..1.5))
}

fn read_secret(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The fingerprint pinned for `key` (`host:port`) in `file`.
fn read_pin(file: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, fp)| fp.trim().to_string())
}

/// Lines of the audit log to send at once.
const AUDIT_BATCH_LINES: usize = 256;

/// Send the audit log's lines after `from` to the relay, then each new one as it is
/// written, until the tunnel stops. The relay stores each line once; after a reconnect its
/// hello says where to resume, so lines written while the tunnel was down arrive too (as
/// long as they are still in the kept files).
async fn forward_audit(
    audit: crate::audit::Audit,
    from: u64,
    tx: mpsc::Sender<AgentMessage>,
    stop: CancellationToken,
) {
    let (Some(mut reader), Some(mut written), Some(log_id)) = (
        audit.reader(from),
        audit.written(),
        audit.log_id().map(str::to_string),
    ) else {
        return;
    };
    loop {
        let read = tokio::task::spawn_blocking(move || {
            let batch = reader.next_batch(AUDIT_BATCH_LINES);
            (reader, batch)
        });
        let batch = match read.await {
            Ok((r, batch)) => {
                reader = r;
                batch
            }
            Err(_) => return,
        };
        let lines = match batch {
            Ok(lines) => lines,
            Err(e) => {
                tracing::warn!("audit log not readable for the relay: {e}; retrying in 5 s");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    () = stop.cancelled() => return,
                }
            }
        };
        if lines.is_empty() {
            tokio::select! {
                r = written.changed() => if r.is_err() { return },
                () = stop.cancelled() => return,
            }
            continue;
        }
        let msg = AgentMessage {
            msg: Some(agent_message::Msg::Audit(AuditBatch {
                log_id: log_id.clone(),
                lines: lines
                    .into_iter()
                    .map(|l| ProtoAuditLine {
                        seq: l.seq,
                        line: l.line.to_string(),
                    })
                    .collect(),
            })),
        };
        tokio::select! {
            r = tx.send(msg) => if r.is_err() { return },
            () = stop.cancelled() => return,
        }
    }
}

/// The TLS connection to the relay.
type RelayStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// The relay → agent half of a tunnel.
struct Inbound {
    reader: FrameReader,
    rd: ReadHalf<RelayStream>,
}

/// Write what the tunnel's tasks queue, flushing whenever the queue runs dry, until the
/// tunnel stops or a write fails (the reader then notices the dead connection).
async fn write_tunnel(
    mut wr: WriteHalf<RelayStream>,
    mut rx: mpsc::Receiver<AgentMessage>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
            () = stop.cancelled() => break,
        };
        let write = async {
            tunnel::write(&mut wr, &msg).await?;
            if rx.is_empty() {
                wr.flush().await?;
            }
            Ok::<(), std::io::Error>(())
        };
        if !matches!(
            tokio::time::timeout(tunnel::IDLE_TIMEOUT, write).await,
            Ok(Ok(()))
        ) {
            stop.cancel();
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), wr.shutdown()).await;
}

/// The pin state of one connection attempt.
struct Pin {
    file: PathBuf,
    key: String,
    pinned: Option<String>,
    verifier: Arc<PinnedCert>,
    config: rustls::ClientConfig,
}

impl Pin {
    fn config(&self, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        let mut config = self.config.clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    }

    /// After connecting: a changed certificate is refused loudly, a first one is pinned.
    fn settle<T>(self, link: &RelayLink, result: std::io::Result<T>) -> Result<T, LinkError> {
        let seen = self.verifier.seen();
        let value = match result {
            Ok(v) => v,
            Err(e) => {
                if let (Some(seen), Some(pin)) = (seen, &self.pinned)
                    && seen != *pin
                {
                    return Err(LinkError::CertificateChanged {
                        addr: link.settings.addr.clone(),
                        seen,
                        pinned: pin.clone(),
                        file: self.file,
                    });
                }
                return Err(link.err(format!(
                    "cannot connect: {}. Is remote-relay running there?",
                    remote_proto::tls::root_cause(&e)
                )));
            }
        };
        if self.pinned.is_none()
            && let Some(seen) = seen
        {
            let line = format!("{} {seen}\n", self.key);
            crate::paths::write_private_atomic(&self.file, line.as_bytes()).map_err(|source| {
                LinkError::Write {
                    path: self.file.clone(),
                    source,
                }
            })?;
            tracing::info!(relay = %link.settings.addr, "first contact: pinned the relay's certificate {seen} in {}", self.file.display());
        }
        Ok(value)
    }
}

/// TCP, then TLS with `config`, each under [`CONNECT_TIMEOUT`].
async fn dial(
    settings: &RelaySettings,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<RelayStream> {
    let timed_out = |what: &str| std::io::Error::new(std::io::ErrorKind::TimedOut, what);
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(&settings.addr),
    )
    .await
    .map_err(|_| timed_out("connection timed out"))??;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(settings.host.clone())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| timed_out("TLS handshake timed out"))?
}

async fn dial_owned(
    settings: RelaySettings,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<RelayStream> {
    dial(&settings, config).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_read_by_relay_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(FINGERPRINT_FILE);
        std::fs::write(&file, "relay.example:7443 SHA256:abc\n").expect("write");
        assert_eq!(
            read_pin(&file, "relay.example:7443").as_deref(),
            Some("SHA256:abc")
        );
        assert_eq!(read_pin(&file, "other:7443"), None);
    }

    #[test]
    fn backoff_jitter_stays_within_half_either_way() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(10));
            assert!(d >= Duration::from_secs(5) && d <= Duration::from_secs(15));
        }
    }
}
