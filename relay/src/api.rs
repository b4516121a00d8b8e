//! The client-facing service (relay.proto `Relay`): which agents there are, the caller's
//! sessions on all of them, conversations with one agent ([`crate::converse`]), and one
//! command run on many agents at once. Every call names its user with a token; a user sees
//! and touches only their own sessions.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use prost::Message;
use remote_proto::frames;
use remote_proto::relay::relay_server::Relay;
use remote_proto::relay::{
    AgentInfo, ConverseRequest, ConverseResponse, ListAgentsRequest, ListAgentsResponse,
    ListSessionsRequest, ListSessionsResponse, RelaySessionInfo, RunEvent, RunRequest, run_event,
};
use remote_proto::session::{
    self, CloseSession, Input, OpenSession, RunCommand, ServerFrame, Shape, client_frame, record,
    server_frame,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::mirror;
use crate::server::{Outbound, Shared, outbound, store_status, user_of};
use crate::tunnels::{Channel, ChannelEvent};

/// Agents a Run reaches at once when the request does not say.
const DEFAULT_THROTTLE: usize = 32;
/// Most agents one Run may name.
const MAX_RUN_AGENTS: usize = 10_000;
/// How long an agent has to answer each step of a Run before it counts as failed there.
const RUN_STEP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct RelayService {
    pub shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Relay for RelayService {
    async fn list_agents(
        &self,
        req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        user_of(&self.shared, req.metadata()).await?;
        let rows = self
            .shared
            .store
            .list_agents()
            .await
            .map_err(store_status)?;
        let agents = rows
            .into_iter()
            .map(|a| {
                let tunnel = self.shared.registry.get(&a.name);
                AgentInfo {
                    online: tunnel.is_some(),
                    software: tunnel.map(|t| t.software.clone()).unwrap_or_default(),
                    name: a.name,
                    enrolled_unix: a.enrolled_unix,
                    last_seen_unix: a.last_seen_unix.unwrap_or(0),
                }
            })
            .collect();
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn list_sessions(
        &self,
        req: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        let user = user_of(&self.shared, req.metadata()).await?;
        let req = req.into_inner();
        if req.all_users {
            return Err(Status::permission_denied(
                "only your own sessions can be listed through the relay",
            ));
        }
        let store = &self.shared.store;
        let rows = store
            .list_sessions(Some(&user))
            .await
            .map_err(store_status)?;
        let mut sessions = Vec::new();
        for row in rows
            .into_iter()
            .filter(|r| req.agent.is_empty() || r.agent == req.agent)
        {
            let js = store.journal_state(&row.id).await.map_err(store_status)?;
            sessions.push(RelaySessionInfo {
                agent: row.agent.clone(),
                agent_online: self.shared.registry.is_online(&row.agent),
                session: Some(mirror::session_info(&row, js.stored_seq + 1, js.client_ack)),
                persisted_seq: js.stored_seq,
            });
        }
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    type ConverseStream = Outbound<ConverseResponse>;

    async fn converse(
        &self,
        req: Request<Streaming<ConverseRequest>>,
    ) -> Result<Response<Self::ConverseStream>, Status> {
        let user = user_of(&self.shared, req.metadata()).await?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let opened = crate::converse::open(self.shared.clone(), user, &mut inbound, tx).await?;
        tokio::spawn(crate::converse::serve(opened, inbound));
        Ok(Response::new(outbound(rx)))
    }

    type RunStream = Outbound<RunEvent>;

    async fn run(&self, req: Request<RunRequest>) -> Result<Response<Self::RunStream>, Status> {
        let user = user_of(&self.shared, req.metadata()).await?;
        let req = req.into_inner();
        if req.agents.is_empty() || req.agents.len() > MAX_RUN_AGENTS {
            return Err(Status::invalid_argument(format!(
                "name between 1 and {MAX_RUN_AGENTS} agents to run on"
            )));
        }
        if req.command.trim().is_empty() {
            return Err(Status::invalid_argument("the command line is empty"));
        }
        let throttle = match req.throttle {
            0 => DEFAULT_THROTTLE,
            n => n as usize,
        };
        let (tx, rx) = mpsc::channel(256);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let command = Arc::new(req.command);
            let stdin = Arc::new(req.stdin);
            let endpoint = Arc::new(req.endpoint);
            futures::stream::iter(req.agents)
                .map(|agent| {
                    let (shared, user, tx) = (shared.clone(), user.clone(), tx.clone());
                    let (command, stdin, endpoint) =
                        (command.clone(), stdin.clone(), endpoint.clone());
                    async move {
                        let on = RunOn {
                            agent: &agent,
                            endpoint: &endpoint,
                            command: &command,
                            stdin: &stdin,
                        };
                        let result = run_on(&shared, &user, on, &tx).await;
                        if let Err(e) = result {
                            let _ = tx
                                .send(Ok(RunEvent {
                                    agent,
                                    event: Some(run_event::Event::Error(e)),
                                }))
                                .await;
                        }
                    }
                })
                .buffer_unordered(throttle)
                .collect::<()>()
                .await;
        });
        Ok(Response::new(outbound(rx)))
    }
}

fn run_error(code: session::ErrorCode, message: String) -> session::Error {
    session::Error {
        code: code as i32,
        message,
        hint: String::new(),
    }
}

/// One agent's part of a Run.
struct RunOn<'a> {
    agent: &'a str,
    /// The agent's endpoint ("": its default).
    endpoint: &'a str,
    command: &'a str,
    stdin: &'a [u8],
}

/// Run the command on the agent in a commands session made for it (on the endpoint asked
/// for), streaming its records as events; the session is removed afterwards.
async fn run_on(
    shared: &Shared,
    user: &str,
    on: RunOn<'_>,
    tx: &mpsc::Sender<Result<RunEvent, Status>>,
) -> Result<(), session::Error> {
    use session::ErrorCode as C;
    let RunOn {
        agent,
        endpoint,
        command,
        stdin,
    } = on;
    let tunnel = shared.registry.get(agent).ok_or_else(|| {
        run_error(
            C::ErrorUnavailable,
            format!("agent '{agent}' is offline (no tunnel to this relay)"),
        )
    })?;
    let mut ch = tunnel
        .open_channel(user)
        .await
        .ok_or_else(|| run_error(C::ErrorUnavailable, format!("agent '{agent}' went offline")))?;
    let software = format!("remote-relay {}", env!("CARGO_PKG_VERSION"));
    request(
        &mut ch,
        1,
        client_frame::Msg::Hello(frames::hello(&software)),
    )
    .await?;
    let open = OpenSession {
        shape: Shape::Commands as i32,
        name: "remote-run".into(),
        endpoint: endpoint.to_string(),
        ..Default::default()
    };
    let opened = request(&mut ch, 2, client_frame::Msg::Open(open)).await?;
    let Some(server_frame::Msg::Opened(o)) = opened.msg else {
        return Err(run_error(C::ErrorInternal, "no session was opened".into()));
    };
    let id = o.session.map(|s| s.id).unwrap_or_default();
    let result = async {
        let run = RunCommand {
            session_id: id.clone(),
            command: command.to_string(),
            follow: true,
        };
        request(&mut ch, 3, client_frame::Msg::Run(run)).await?;
        for chunk in stdin.chunks(remote_proto::MAX_CHUNK_BYTES) {
            let input = client_frame::Msg::Input(Input {
                data: chunk.to_vec(),
                eof: false,
            });
            send(&ch, 3, input).await?;
        }
        let eof = client_frame::Msg::Input(Input {
            data: Vec::new(),
            eof: true,
        });
        send(&ch, 3, eof).await?;
        loop {
            let frame = next_frame(&mut ch, None).await?;
            match frame.msg {
                Some(server_frame::Msg::Record(r)) => {
                    let event = match r.kind {
                        Some(record::Kind::Output(o)) => run_event::Event::Output(o),
                        Some(record::Kind::Exit(e)) => run_event::Event::Exit(e),
                        _ => continue,
                    };
                    let done = matches!(event, run_event::Event::Exit(_));
                    let ev = RunEvent {
                        agent: agent.to_string(),
                        event: Some(event),
                    };
                    if tx.send(Ok(ev)).await.is_err() || done {
                        return Ok(());
                    }
                }
                Some(server_frame::Msg::Error(e)) => return Err(e),
                Some(server_frame::Msg::Done(_)) => return Ok(()),
                _ => {}
            }
        }
    }
    .await;
    // Wait for the agent to confirm, or closing the channel could overtake the request.
    let close = client_frame::Msg::Close(CloseSession { session_id: id });
    let _ = request(&mut ch, 4, close).await;
    result
}

async fn send(ch: &Channel, rid: u64, msg: client_frame::Msg) -> Result<(), session::Error> {
    if ch.send(frames::client(rid, msg).encode_to_vec()).await {
        Ok(())
    } else {
        Err(run_error(
            session::ErrorCode::ErrorUnavailable,
            "the agent went offline".into(),
        ))
    }
}

/// Send a request and wait for its first answer (an Error answer is `Err`).
async fn request(
    ch: &mut Channel,
    rid: u64,
    msg: client_frame::Msg,
) -> Result<ServerFrame, session::Error> {
    send(ch, rid, msg).await?;
    loop {
        let frame = next_frame(ch, Some(RUN_STEP_TIMEOUT)).await?;
        if frame.request_id != rid && frame.request_id != 0 {
            continue;
        }
        if let Some(server_frame::Msg::Error(e)) = frame.msg {
            return Err(e);
        }
        return Ok(frame);
    }
}

async fn next_frame(
    ch: &mut Channel,
    timeout: Option<Duration>,
) -> Result<ServerFrame, session::Error> {
    use session::ErrorCode as C;
    let event = match timeout {
        Some(t) => tokio::time::timeout(t, ch.next()).await.map_err(|_| {
            run_error(
                C::ErrorUnavailable,
                "the agent did not answer in 30 s".into(),
            )
        })?,
        None => ch.next().await,
    };
    match event {
        ChannelEvent::Frame(f) => ServerFrame::decode(f.as_slice())
            .map_err(|e| run_error(C::ErrorBadFrame, format!("unreadable answer: {e}"))),
        ChannelEvent::Closed(reason) => Err(run_error(
            C::ErrorUnavailable,
            format!("the agent closed the conversation: {reason}"),
        )),
    }
}
