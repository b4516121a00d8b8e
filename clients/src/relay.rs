//! The client side of the relay (relay.proto `Relay`): a TLS connection to `remote-relay`
//! (its certificate trusted like a winrms:// server's: --ca, --fingerprint, or pinned on
//! first contact in `relay_known_hosts`), the user's token on every call, and the calls:
//! agents, sessions, a conversation with an agent or a session (the session protocol,
//! carried by [`crate::session::SessionChannel`]) and a command run on an agent.

use std::path::PathBuf;
use std::time::Duration;

use remote_proto::relay::relay_client::RelayClient as Grpc;
use remote_proto::relay::{
    AgentInfo, ConverseRequest, ConverseResponse, ConverseTarget, ListAgentsRequest,
    ListSessionsRequest, RelaySessionInfo, RunEvent, RunRequest, converse_request,
};
use thiserror::Error;
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::winrm::tls::{TlsError, Trust};

#[derive(Debug, Error)]
pub enum RelayError {
    #[error(
        "{what} needs a relay: give --relay HOST[:PORT] or set REMOTE_RELAY (e.g. REMOTE_RELAY=relay.example:7443)"
    )]
    NoRelay { what: String },
    #[error("invalid relay address '{0}': use HOST[:PORT] (default port 7443)")]
    BadAddress(String),
    #[error(
        "no relay token: set REMOTE_TOKEN to the token `remote-relay user add NAME` printed for you"
    )]
    NoToken,
    #[error("REMOTE_TOKEN is not a valid token (it must be plain text): copy it again")]
    BadToken,
    #[error(
        "cannot connect to the relay at {addr}: {reason}. Is remote-relay running there (remote-relay run; default port 7443)?"
    )]
    Connect { addr: String, reason: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("relay {addr}: {message}")]
    Refused {
        addr: String,
        code: Code,
        message: String,
    },
}

impl RelayError {
    fn from_status(addr: &str, s: Status) -> RelayError {
        let message = match s.code() {
            Code::Unavailable if s.message().is_empty() => {
                "the relay is unavailable; try again in a moment".to_string()
            }
            _ => s.message().to_string(),
        };
        RelayError::Refused {
            addr: addr.to_string(),
            code: s.code(),
            message,
        }
    }
}

/// Where the relay is and how to trust and log in to it.
#[derive(Debug, Clone, Default)]
pub struct RelayOptions {
    /// `HOST[:PORT]` (--relay / REMOTE_RELAY).
    pub address: Option<String>,
    /// The user's token (REMOTE_TOKEN).
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
    pub fingerprint: Option<String>,
    pub connect_timeout: Duration,
    pub known_hosts: PathBuf,
    /// The hosts whose certificate may be trusted on first contact.
    pub trusted_hosts: PathBuf,
}

impl RelayOptions {
    pub fn configured(&self) -> bool {
        self.address
            .as_deref()
            .is_some_and(|a| !a.trim().is_empty())
    }
}

/// A connection to the relay, cheap to clone.
#[derive(Clone)]
pub struct RelayClient {
    grpc: Grpc<Channel>,
    auth: MetadataValue<tonic::metadata::Ascii>,
    addr: String,
}

impl RelayClient {
    /// Connect (TLS checked as the options say). `what` names the command, for errors.
    pub async fn connect(opts: &RelayOptions, what: &str) -> Result<RelayClient, RelayError> {
        let given = opts
            .address
            .clone()
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| RelayError::NoRelay {
                what: what.to_string(),
            })?;
        let (host, addr) = remote_proto::parse_relay_addr(&given)
            .ok_or_else(|| RelayError::BadAddress(given.clone()))?;
        let token = opts
            .token
            .clone()
            .filter(|t| !t.trim().is_empty())
            .ok_or(RelayError::NoToken)?;
        let auth = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| RelayError::BadToken)?;
        let trust = Trust::new(
            opts.ca.as_deref(),
            opts.fingerprint.as_deref(),
            opts.known_hosts.clone(),
            opts.trusted_hosts.clone(),
        )?;
        let timeout = opts.connect_timeout;
        let port: u16 = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(remote_proto::DEFAULT_RELAY_PORT);
        let tls_failure: std::sync::Arc<std::sync::Mutex<Option<TlsError>>> = Default::default();
        let (h, a, failure) = (host.clone(), addr.clone(), tls_failure.clone());
        let connect = move || {
            let (trust, host, addr, failure) =
                (trust.clone(), h.clone(), a.clone(), failure.clone());
            async move {
                let tcp = crate::net::connect(&host, port, timeout)
                    .await
                    .map_err(|e| {
                        use crate::net::ConnectFailure as F;
                        std::io::Error::other(match e {
                            F::Resolve(reason) => format!("cannot resolve {host}: {reason}"),
                            F::Refused => "connection refused".to_string(),
                            F::Timeout => format!("no answer within {} s", timeout.as_secs()),
                            F::Io(e) => e.to_string(),
                        })
                    })?;
                match trust.connect(tcp, &host, &addr, timeout).await {
                    Ok((tls, _cert)) => Ok(tls),
                    Err(e) => {
                        let text = e.to_string();
                        *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        Err(std::io::Error::other(text))
                    }
                }
            }
        };
        let channel = match remote_proto::tls::grpc_channel(&addr, connect).await {
            Ok(c) => c,
            Err(e) => {
                if let Some(tls) = tls_failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Err(RelayError::Tls(tls));
                }
                return Err(RelayError::Connect {
                    addr,
                    reason: remote_proto::tls::root_cause(&e),
                });
            }
        };
        let grpc = Grpc::new(channel).max_decoding_message_size(4 << 20);
        Ok(RelayClient { grpc, auth, addr })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert("authorization", self.auth.clone());
        req
    }

    fn err(&self, s: Status) -> RelayError {
        RelayError::from_status(&self.addr, s)
    }

    pub async fn list_agents(&self) -> Result<Vec<AgentInfo>, RelayError> {
        let mut g = self.grpc.clone();
        let resp = g
            .list_agents(self.request(ListAgentsRequest {}))
            .await
            .map_err(|s| self.err(s))?;
        Ok(resp.into_inner().agents)
    }

    /// The caller's sessions (on `agent` only, when not empty).
    pub async fn list_sessions(&self, agent: &str) -> Result<Vec<RelaySessionInfo>, RelayError> {
        let mut g = self.grpc.clone();
        let req = ListSessionsRequest {
            agent: agent.to_string(),
            all_users: false,
        };
        let resp = g
            .list_sessions(self.request(req))
            .await
            .map_err(|s| self.err(s))?;
        Ok(resp.into_inner().sessions)
    }

    /// Start a conversation with an agent (`agent`) or the agent of a session
    /// (`session_id`): frames go out on the sender, answers come on the stream.
    pub async fn converse(
        &self,
        agent: &str,
        session_id: &str,
    ) -> Result<(mpsc::Sender<ConverseRequest>, Streaming<ConverseResponse>), RelayError> {
        let (tx, rx) = mpsc::channel::<ConverseRequest>(64);
        let target = ConverseRequest {
            msg: Some(converse_request::Msg::Target(ConverseTarget {
                agent: agent.to_string(),
                session_id: session_id.to_string(),
            })),
        };
        let _ = tx.send(target).await;
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let mut g = self.grpc.clone();
        let resp = g
            .converse(self.request(stream))
            .await
            .map_err(|s| self.err(s))?;
        Ok((tx, resp.into_inner()))
    }

    /// Run one command line on `agent`, on its `endpoint` ("": its default); its output and
    /// exit come as events.
    pub async fn run(
        &self,
        agent: &str,
        command: &str,
        endpoint: &str,
        stdin: Vec<u8>,
    ) -> Result<Streaming<RunEvent>, RelayError> {
        let mut g = self.grpc.clone();
        let req = RunRequest {
            agents: vec![agent.to_string()],
            command: command.to_string(),
            throttle: 1,
            stdin,
            endpoint: endpoint.to_string(),
        };
        let resp = g.run(self.request(req)).await.map_err(|s| self.err(s))?;
        Ok(resp.into_inner())
    }

    /// A status from a stream, as an error.
    pub fn stream_error(&self, s: Status) -> RelayError {
        self.err(s)
    }
}
