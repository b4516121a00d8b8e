//! `remote-relay run`: the accept loop (TCP, a bounded number of connections, the TLS
//! handshake under a deadline), then by ALPN either an agent's tunnel
//! ([`crate::agents::serve_connection`]) or the gRPC services (tonic over HTTP/2, with
//! keepalives, per-connection stream limits and message size limits), authentication of
//! every call from its metadata, and graceful shutdown. What the services do lives in
//! [`crate::agents`] and [`crate::api`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use remote_proto::relay::agent_tunnel_server::AgentTunnelServer;
use remote_proto::relay::relay_server::RelayServer;
use remote_proto::tunnel;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::transport::server::Connected;
use tonic::{Code, Status};

use crate::store::{Store, StoreError};
use crate::tunnels::Registry;

/// Largest gRPC message accepted: a 1 MiB frame or a spill batch with room to spare.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Streams one HTTP/2 connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}. Is another relay running there? Pick --listen")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// What every service shares.
pub struct Shared {
    pub store: Arc<Store>,
    pub registry: Registry,
    /// The relay certificate's fingerprint (given to agents at enrolment).
    pub fingerprint: String,
    pub shutdown: CancellationToken,
    /// Audit lines kept per agent's log (the newest; older ones are deleted).
    pub audit_keep_lines: u64,
}

/// Settings of `remote-relay run`.
pub struct Settings {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub tls: Arc<rustls::ServerConfig>,
}

/// A bound relay, ready to serve.
pub struct RelayServerHandle {
    listener: TcpListener,
    settings: Settings,
    shared: Arc<Shared>,
}

impl RelayServerHandle {
    pub async fn bind(settings: Settings, shared: Arc<Shared>) -> Result<Self, ServerError> {
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        Ok(RelayServerHandle {
            listener,
            settings,
            shared,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve until the shutdown token is cancelled; then close every tunnel.
    pub async fn run(self) -> Result<(), ServerError> {
        let RelayServerHandle {
            listener,
            settings,
            shared,
        } = self;
        let (conn_tx, conn_rx) = mpsc::channel::<std::io::Result<Conn>>(64);
        let accept = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(settings.tls.clone()),
            Arc::new(Semaphore::new(settings.max_connections.max(1))),
            conn_tx,
            shared.clone(),
        ));
        let agents = AgentTunnelServer::new(crate::agents::AgentService {
            shared: shared.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let relay = RelayServer::new(crate::api::RelayService {
            shared: shared.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let shutdown = shared.shutdown.clone();
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .tcp_nodelay(true)
            .add_service(agents)
            .add_service(relay)
            .serve_with_incoming_shutdown(receiver_stream(conn_rx), shutdown.cancelled())
            .await;
        shared.registry.close_all("the relay is shutting down");
        accept.abort();
        result.map_err(ServerError::from)
    }
}

/// Accept connections while permits last; each does its TLS handshake in its own task.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    permits: Arc<Semaphore>,
    conns: mpsc::Sender<std::io::Result<Conn>>,
    shared: Arc<Shared>,
) {
    let shutdown = shared.shutdown.clone();
    let mut refused_logged = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if refused_logged.elapsed() > Duration::from_secs(10) {
                refused_logged = std::time::Instant::now();
                tracing::warn!("connection from {peer} refused: max_connections reached");
            }
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let conns = conns.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(tunnel::ALPN) => {
                    // An agent's tunnel: served by a task of its own, apart from gRPC, so
                    // that an idle one costs little (remote_proto::tunnel).
                    tokio::spawn(crate::agents::serve_connection(shared, tls, peer, permit));
                }
                Ok(Ok(tls)) => {
                    let _ = conns
                        .send(Ok(Conn {
                            inner: tls,
                            peer,
                            _permit: permit,
                        }))
                        .await;
                }
                Ok(Err(e)) => tracing::debug!("TLS handshake with {peer} failed: {e}"),
                Err(_) => tracing::debug!("TLS handshake with {peer} timed out"),
            }
        });
    }
}

/// One accepted TLS connection, holding its place among `max_connections`.
pub struct Conn {
    inner: TlsStream<TcpStream>,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = SocketAddr;
    fn connect_info(&self) -> SocketAddr {
        self.peer
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A server-streaming response.
pub type Outbound<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The response stream fed by `rx`.
pub fn outbound<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> Outbound<T> {
    Box::pin(receiver_stream(rx))
}

fn receiver_stream<T: Send + 'static>(rx: mpsc::Receiver<T>) -> impl Stream<Item = T> + Send {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

/// The credential after `scheme` in the `authorization` metadata.
fn credential<'m>(md: &'m MetadataMap, scheme: &str, what: &str) -> Result<&'m str, Status> {
    let value = md
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim();
    match value.split_once(' ') {
        Some((s, c)) if s.eq_ignore_ascii_case(scheme) && !c.trim().is_empty() => Ok(c.trim()),
        _ => Err(Status::unauthenticated(format!(
            "no {what} given: send 'authorization: {scheme} …'"
        ))),
    }
}

/// The user a client call comes from.
pub async fn user_of(shared: &Shared, md: &MetadataMap) -> Result<String, Status> {
    let token = credential(
        md,
        "Bearer",
        "user token (set REMOTE_TOKEN to the token `remote-relay user add NAME` printed)",
    )?;
    shared.store.verify_user(token).await.map_err(store_status)
}

/// A store error as a gRPC status: refusals are UNAUTHENTICATED or the like, with the store's
/// message (which never holds a secret); database failures are logged and kept vague.
pub fn store_status(e: StoreError) -> Status {
    let code = match &e {
        StoreError::JoinTokenMalformed
        | StoreError::JoinTokenUnknown
        | StoreError::JoinTokenReused
        | StoreError::JoinTokenExpired
        | StoreError::AgentCredentialMalformed
        | StoreError::AgentCredentialRefused
        | StoreError::UserTokenMalformed
        | StoreError::UserTokenRefused => Code::Unauthenticated,
        StoreError::InvalidName { .. } => Code::InvalidArgument,
        StoreError::AgentNotFound(_)
        | StoreError::UserNotFound(_)
        | StoreError::SessionNotFound(_) => Code::NotFound,
        StoreError::SessionConflict { .. } | StoreError::UserExists(_) => Code::AlreadyExists,
        _ => {
            tracing::error!("store failure: {e}");
            return Status::internal(
                "the relay's store failed; see the relay's log (remote-relay run) for details",
            );
        }
    };
    Status::new(code, e.to_string())
}
