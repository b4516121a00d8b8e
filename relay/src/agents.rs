//! The agent-facing side: enrolment with a one-time join token (relay.proto `AgentTunnel`),
//! and the tunnel each agent holds open (a TLS connection of its own, see
//! [`remote_proto::tunnel`]). On a tunnel the relay mirrors the agent's sessions
//! into the store, persists the journal records the agent spills and acknowledges them
//! (SpillAck) once they are durable, and routes channel traffic to the conversations.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use remote_proto::relay::agent_tunnel_server::AgentTunnel;
use remote_proto::relay::{
    AgentHello, AgentMessage, EnrolRequest, EnrolResponse, RelayHello, RelayMessage, SpillAck,
    SpillBatch, TunnelOpen, TunnelRefused, agent_message, relay_message,
};
use remote_proto::session::SessionState;
use remote_proto::tunnel::{self, FrameReader, TunnelError};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::mirror;
use crate::server::{Shared, store_status};
use crate::tunnels::Tunnel;

/// How long an agent has to say Hello on a new tunnel.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Spill batches queued per tunnel before the tunnel's reader waits for the store.
const SPILL_QUEUE: usize = 16;
/// How often an agent's last-seen time is written while its tunnel is up.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// Longest audit line stored (the agent's writer cuts its fields well below this).
const MAX_AUDIT_LINE: usize = 16 * 1024;
/// Sessions one agent may report.
const MAX_SESSIONS_PER_AGENT: usize = 10_000;

pub struct AgentService {
    pub shared: Arc<Shared>,
}

#[tonic::async_trait]
impl AgentTunnel for AgentService {
    async fn enrol(&self, req: Request<EnrolRequest>) -> Result<Response<EnrolResponse>, Status> {
        let req = req.into_inner();
        let name = req.agent_name.trim();
        let credential = self
            .shared
            .store
            .redeem_join_token(req.join_token.trim(), name)
            .await
            .map_err(|e| {
                tracing::warn!(agent = %name, "enrolment refused: {e}");
                store_status(e)
            })?;
        tracing::info!(agent = %name, software = %req.software.chars().take(64).collect::<String>(), "agent enrolled");
        Ok(Response::new(EnrolResponse {
            credential,
            relay_fingerprint: self.shared.fingerprint.clone(),
        }))
    }
}

/// Serve one tunnel connection (TLS with ALPN `remote-tunnel/1`, relay.proto top): the
/// agent authenticates with TunnelOpen and says AgentHello, then the tunnel is served until
/// it ends. `permit` holds the connection's place among `max_connections`.
pub async fn serve_connection(
    shared: Arc<Shared>,
    tls: TlsStream<TcpStream>,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut reader = FrameReader::new(tunnel::MAX_OPEN_BYTES);
    let greeted = tokio::time::timeout(HELLO_TIMEOUT, greet(&shared, &mut reader, &mut rd)).await;
    let (agent, hello) = match greeted {
        Ok(Ok(greeted)) => greeted,
        Ok(Err(status)) => return refuse(&mut wr, peer, status).await,
        Err(_) => {
            let status = Status::deadline_exceeded("no TunnelOpen and AgentHello within 30 s");
            return refuse(&mut wr, peer, status).await;
        }
    };
    let software: String = hello.software.chars().take(64).collect();
    let (tunnel, to_agent) = shared.registry.prepare(&agent, &software);
    let closed = tunnel.closed.clone();
    // The writer ends with the tunnel; the tunnel ends when the writer fails.
    let writer = tokio::spawn(write_tunnel(wr, to_agent, closed.clone()));
    let reason = tokio::select! {
        r = serve_tunnel(shared.clone(), tunnel.clone(), hello, Inbound { reader, rd }) => r,
        () = closed.cancelled() => "replaced by a newer connection, or the agent stopped reading".to_string(),
        () = shared.shutdown.cancelled() => "the relay is shutting down".to_string(),
    };
    tracing::info!(agent = %tunnel.agent, "tunnel down: {reason}");
    shared.registry.unregister(&tunnel, &reason);
    let _ = writer.await;
    let _ = shared.store.touch_agent(&tunnel.agent).await;
    drop(permit);
}

/// TunnelOpen (authenticated against the store), then AgentHello of a protocol this relay
/// speaks.
async fn greet(
    shared: &Shared,
    reader: &mut FrameReader,
    rd: &mut ReadHalf<TlsStream<TcpStream>>,
) -> Result<(String, AgentHello), Status> {
    let broken = |e: TunnelError| Status::invalid_argument(format!("bad tunnel greeting: {e}"));
    let open: TunnelOpen = reader
        .message(rd)
        .await
        .map_err(broken)?
        .ok_or_else(|| Status::cancelled("the agent closed the connection"))?;
    let agent = shared
        .store
        .verify_agent(open.credential.trim())
        .await
        .map_err(store_status)?;
    reader.set_max(tunnel::MAX_MESSAGE_BYTES);
    let first: AgentMessage = reader
        .message(rd)
        .await
        .map_err(broken)?
        .ok_or_else(|| Status::cancelled("the agent closed the connection"))?;
    let Some(agent_message::Msg::Hello(hello)) = first.msg else {
        return Err(Status::invalid_argument(
            "the first message of a tunnel after TunnelOpen must be AgentHello",
        ));
    };
    if hello.protocol_version != remote_proto::PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "protocol version {} is not supported; this relay speaks version {}: use an agent of the same release",
            hello.protocol_version,
            remote_proto::PROTOCOL_VERSION
        )));
    }
    Ok((agent, hello))
}

/// Tell the agent why its tunnel is refused, then close.
async fn refuse(wr: &mut WriteHalf<TlsStream<TcpStream>>, peer: SocketAddr, status: Status) {
    tracing::info!("tunnel from {peer} refused: {}", status.message());
    let msg = RelayMessage {
        msg: Some(relay_message::Msg::Refused(TunnelRefused {
            code: status.code() as i32,
            message: status.message().to_string(),
        })),
    };
    let bye = async {
        tunnel::write(wr, &msg).await?;
        wr.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), bye).await;
}

/// Write what is queued for the agent until the tunnel closes; flush whenever the queue
/// runs dry. A write that fails (or stalls past the idle timeout) closes the tunnel.
async fn write_tunnel(
    mut wr: WriteHalf<TlsStream<TcpStream>>,
    mut to_agent: mpsc::Receiver<Box<RelayMessage>>,
    closed: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = to_agent.recv() => match m {
                Some(m) => m,
                None => break,
            },
            () = closed.cancelled() => break,
        };
        let write = async {
            tunnel::write(&mut wr, &*msg).await?;
            if to_agent.is_empty() {
                wr.flush().await?;
            }
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(tunnel::IDLE_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            _ => {
                closed.cancel();
                break;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), wr.shutdown()).await;
}

/// The agent → relay half of a tunnel connection.
struct Inbound {
    reader: FrameReader,
    rd: ReadHalf<TlsStream<TcpStream>>,
}

impl Inbound {
    /// The next message, or why there is none.
    async fn message(&mut self) -> Result<AgentMessage, String> {
        match tokio::time::timeout(tunnel::IDLE_TIMEOUT, self.reader.message(&mut self.rd)).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => Err("the agent closed the tunnel".into()),
            Ok(Err(e)) => Err(format!("the tunnel broke: {e}")),
            Err(_) => Err(format!(
                "nothing heard from the agent in {} s",
                tunnel::IDLE_TIMEOUT.as_secs()
            )),
        }
    }
}

/// Serve one tunnel until the agent's stream ends; returns why it ended.
async fn serve_tunnel(
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    hello: remote_proto::relay::AgentHello,
    mut inbound: Inbound,
) -> String {
    let agent = tunnel.agent.clone();
    let store = shared.store.clone();
    tracing::info!(agent = %agent, software = %tunnel.software, sessions = hello.sessions.len(), "tunnel up");
    let _ = store.touch_agent(&agent).await;

    // The mirror: every session the agent holds; those it no longer holds are closed.
    let mut mine: HashSet<String> = HashSet::new();
    let mut persisted = std::collections::HashMap::new();
    for info in hello.sessions.iter().take(MAX_SESSIONS_PER_AGENT) {
        let row = mirror::session_row(&agent, info);
        match store.upsert_session(&row).await {
            Ok(()) => {
                let stored = store
                    .journal_state(&row.id)
                    .await
                    .map(|s| s.stored_seq)
                    .unwrap_or(0);
                persisted.insert(row.id.clone(), stored);
                mine.insert(row.id);
            }
            Err(e) => tracing::warn!(agent = %agent, "session not mirrored: {e}"),
        }
    }
    if let Ok(rows) = store.sessions_of_agent(&agent).await {
        for row in rows {
            if !mine.contains(&row.id) && row.state != SessionState::StateClosed as i32 {
                let _ = store
                    .set_session_state(&row.id, SessionState::StateClosed as i32)
                    .await;
            }
        }
    }
    let audit_seq = match hello.audit_log.as_str() {
        "" => 0,
        log => store.audit_seq(&agent, log).await.unwrap_or(0),
    };
    let relay_hello = relay_message::Msg::Hello(RelayHello {
        protocol_version: remote_proto::PROTOCOL_VERSION,
        persisted,
        audit_seq,
    });
    if !tunnel.send(relay_hello).await {
        return "the tunnel closed during its greeting".into();
    }
    // Only now may conversations open channels: the agent's first message is the greeting.
    shared.registry.publish(&tunnel);

    // The spill writer starts with the first batch: most tunnels are idle.
    let mut spill: Option<(mpsc::Sender<SpillBatch>, tokio::task::JoinHandle<()>)> = None;
    let mut touched = Instant::now();
    let reason = loop {
        let msg = match inbound.message().await {
            Ok(m) => m,
            Err(reason) => break reason,
        };
        let Some(msg) = msg.msg else { continue };
        match msg {
            agent_message::Msg::Channel(d) => {
                if d.frame.len() > remote_proto::MAX_FRAME_BYTES {
                    tunnel.closed_by_agent(d.channel, "the agent sent an oversized frame".into());
                } else if !tunnel.deliver(d.channel, d.frame) {
                    tracing::warn!(agent = %agent, channel = d.channel, "channel closed: the agent overran its window");
                }
            }
            agent_message::Msg::Closed(c) => {
                tunnel.closed_by_agent(c.channel, c.reason.chars().take(512).collect())
            }
            agent_message::Msg::Spill(batch) => {
                if !mine.contains(&batch.session_id) {
                    // Only sessions this agent reported; never another agent's.
                    continue;
                }
                let (tx, _) = spill.get_or_insert_with(|| {
                    let (tx, rx) = mpsc::channel::<SpillBatch>(SPILL_QUEUE);
                    let task = tokio::spawn(persist_spills(shared.clone(), tunnel.clone(), rx));
                    (tx, task)
                });
                if tx.send(batch).await.is_err() {
                    break "the journal store failed".to_string();
                }
            }
            agent_message::Msg::Session(update) => {
                let Some(info) = update.session else { continue };
                if update.removed {
                    if mine.remove(&info.id) {
                        let _ = store.delete_session(&info.id).await;
                    }
                    continue;
                }
                if !mine.contains(&info.id) && mine.len() >= MAX_SESSIONS_PER_AGENT {
                    continue;
                }
                let row = mirror::session_row(&agent, &info);
                match store.upsert_session(&row).await {
                    Ok(()) => {
                        mine.insert(row.id);
                    }
                    Err(e) => tracing::warn!(agent = %agent, "session not mirrored: {e}"),
                }
            }
            agent_message::Msg::Keepalive(k) => {
                // Echoed, so that the agent hears from a live relay at least as often.
                if !tunnel.send(relay_message::Msg::Keepalive(k)).await {
                    break "the tunnel closed".to_string();
                }
                if touched.elapsed() >= TOUCH_EVERY {
                    touched = Instant::now();
                    let _ = store.touch_agent(&agent).await;
                }
            }
            agent_message::Msg::Audit(batch) => {
                // Bounded: a line of the agent's own writer is short; refuse nonsense.
                let lines: Vec<(u64, String)> = batch
                    .lines
                    .into_iter()
                    .filter(|l| l.line.len() <= MAX_AUDIT_LINE)
                    .map(|l| (l.seq, l.line))
                    .collect();
                let log: String = batch.log_id.chars().take(64).collect();
                let keep = shared.audit_keep_lines;
                if let Err(e) = store.append_audit(&agent, &log, &lines, keep).await {
                    // Not stored: the agent resends from the relay's position on reconnect.
                    break format!("audit lines not stored: {e}");
                }
            }
            agent_message::Msg::Hello(_) => {}
        }
    };
    if let Some((tx, task)) = spill {
        drop(tx);
        let _ = task.await;
    }
    reason
}

/// Persist spilled records in arrival order and acknowledge each batch once it is durable.
async fn persist_spills(
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    mut rx: mpsc::Receiver<SpillBatch>,
) {
    while let Some(batch) = rx.recv().await {
        let session = batch.session_id;
        let rows: Vec<_> = batch
            .records
            .into_iter()
            .filter_map(mirror::record_row)
            .collect();
        let mut result = shared.store.append_records(&session, &rows).await;
        for pause in [100, 400, 1600] {
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(pause)).await;
            result = shared.store.append_records(&session, &rows).await;
        }
        match result {
            Ok(stored) => {
                let ack = relay_message::Msg::SpillAck(SpillAck {
                    session_id: session,
                    persisted_seq: stored,
                });
                if !tunnel.send(ack).await {
                    break;
                }
            }
            Err(e) => {
                // Not acknowledged: the agent keeps the records. Ending the tunnel makes it
                // reconnect and resend them.
                tracing::error!(agent = %tunnel.agent, session = %session, "spilled records not stored, closing the tunnel: {e}");
                break;
            }
        }
    }
}
