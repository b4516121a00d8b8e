//! The built-in SSH server: the accept loop with its limits (connections, unauthenticated
//! connections, login grace time) and graceful shutdown. Authentication lives in `auth`,
//! per-connection protocol handling in `handler`, process plumbing of one channel in
//! `channel`, and terminal modes in `pty_modes`.

pub mod channel;
pub mod handler;
pub mod pty_modes;
pub mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::{MethodKind, MethodSet};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accounts::AccountDb;
use crate::config::SshSettings;
use crate::session::SessionHost;

/// Ciphers offered, in preference order: OpenSSH's set (russh's default leaves out
/// aes128-gcm, which OpenSSH clients pick when asked for speed with `-c`).
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::AES_128_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_256_CTR,
];

/// State shared by every connection of one server.
pub struct Shared {
    pub accounts: AccountDb,
    pub throttle: crate::login::Throttle,
    pub settings: SshSettings,
    /// Path of this executable, to start `remote-agent sftp-server` as the user.
    pub self_exe: std::path::PathBuf,
    /// Cancelled when the agent shuts down; connections then close their channels.
    pub shutdown: CancellationToken,
    pub passwords: crate::login::PasswordChecker,
    /// The session host behind the `remote` subsystem.
    pub sessions: Arc<SessionHost>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "cannot listen for SSH on {addr}: {source}. Is another server (sshd, another agent) using that port? Pick another with --ssh HOST:PORT"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The protocol side of the server, independent of how connections arrive: the russh
/// configuration and the state shared by all connections.
pub struct Core {
    config: Arc<russh::server::Config>,
    shared: Arc<Shared>,
}

impl Core {
    pub fn new(
        settings: SshSettings,
        host_key: PrivateKey,
        accounts: AccountDb,
        sessions: Arc<SessionHost>,
        shutdown: CancellationToken,
    ) -> Core {
        let config = russh::server::Config {
            server_id: russh::SshId::Standard(std::borrow::Cow::Owned(format!(
                "SSH-2.0-remote_agent_{}",
                env!("CARGO_PKG_VERSION")
            ))),
            methods: MethodSet::from(&[MethodKind::PublicKey, MethodKind::Password][..]),
            auth_rejection_time: Duration::from_millis(500),
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![host_key],
            max_auth_attempts: settings.max_auth_tries,
            // Idle interactive sessions are legitimate (sshd has no idle timeout either);
            // dead peers are found by keepalives instead.
            inactivity_timeout: None,
            keepalive_interval: Some(settings.keepalive_interval),
            keepalive_max: settings.keepalive_max,
            nodelay: true,
            window_size: 2 * 1024 * 1024,
            event_buffer_size: 32,
            preferred: russh::Preferred {
                cipher: std::borrow::Cow::Borrowed(CIPHERS),
                ..russh::Preferred::DEFAULT
            },
            ..Default::default()
        };
        let self_exe = std::env::current_exe().unwrap_or_else(|_| "remote-agent".into());
        Core {
            config: Arc::new(config),
            shared: Arc::new(Shared {
                accounts,
                throttle: crate::login::Throttle::default(),
                settings,
                self_exe,
                shutdown,
                passwords: crate::login::PasswordChecker::default(),
                sessions,
            }),
        }
    }

    /// Serve one SSH connection on `stream` until it ends. `startup_permit` is held until
    /// the client authenticates (the max_startups budget).
    pub async fn serve<S>(
        &self,
        stream: S,
        peer: SocketAddr,
        local: SocketAddr,
        startup_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (config, shared) = (self.config.clone(), self.shared.clone());
        let authenticated = Arc::new(AtomicBool::new(false));
        let grace = shared.settings.login_grace_time;
        let deadline = tokio::time::Instant::now() + grace;
        let kill = CancellationToken::new();
        let socket = stream::GuardedStream::new(stream, kill.clone());
        let handler = handler::Connection::new(
            shared.clone(),
            peer,
            local,
            authenticated.clone(),
            startup_permit,
        );
        // The version exchange happens inside run_stream: bound it by the grace time too.
        let running = match tokio::time::timeout_at(
            deadline,
            russh::server::run_stream(config, socket, handler),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::debug!(%peer, "ssh handshake failed: {e}");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "ssh: no version line within {grace:?}, closing");
                return;
            }
        };
        let handle = running.handle();
        tokio::pin!(running);
        let grace_timer = tokio::time::sleep_until(deadline);
        tokio::pin!(grace_timer);
        let mut grace_armed = true;
        loop {
            tokio::select! {
                r = &mut running => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "ssh connection ended: {e}");
                    }
                    return;
                }
                () = &mut grace_timer, if grace_armed => {
                    grace_armed = false;
                    if !authenticated.load(Ordering::Acquire) {
                        tracing::info!(%peer, "ssh: not authenticated within {grace:?} (login_grace_time_secs), disconnecting");
                        let _ = handle.disconnect(russh::Disconnect::ByApplication, "login grace time exceeded".into(), "en".into()).await;
                        // During a key exchange the disconnect cannot be sent: cut the stream.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        kill.cancel();
                        let _ = tokio::time::timeout(Duration::from_secs(5), &mut running).await;
                        return;
                    }
                }
                () = shared.shutdown.cancelled() => {
                    // The handler's channels see the same token and end their processes; give
                    // them a moment to send exit status and close before the disconnect.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = handle.disconnect(russh::Disconnect::ByApplication, "remote-agent is shutting down".into(), "en".into()).await;
                    if tokio::time::timeout(Duration::from_secs(3), &mut running).await.is_err() {
                        kill.cancel();
                        let _ = tokio::time::timeout(Duration::from_secs(2), &mut running).await;
                    }
                    return;
                }
            }
        }
    }
}

/// A bound SSH listener, ready to serve.
pub struct SshServer {
    listener: TcpListener,
    core: Arc<Core>,
}

impl SshServer {
    pub async fn bind(
        settings: SshSettings,
        host_key: PrivateKey,
        accounts: AccountDb,
        sessions: Arc<SessionHost>,
        shutdown: CancellationToken,
    ) -> Result<SshServer, ServerError> {
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        Ok(SshServer {
            listener,
            core: Arc::new(Core::new(settings, host_key, accounts, sessions, shutdown)),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept connections until shutdown, then close every connection and wait (bounded)
    /// for them to finish.
    pub async fn run(self) {
        let settings = &self.core.shared.settings;
        let connections = Arc::new(Semaphore::new(settings.max_connections));
        let startups = Arc::new(Semaphore::new(settings.max_startups));
        let tasks = TaskTracker::new();
        let shutdown = self.core.shared.shutdown.clone();
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                () = shutdown.cancelled() => break,
            };
            let (socket, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("ssh accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(conn_permit) = connections.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "ssh connection refused: max_connections ({}) reached", settings.max_connections);
                continue;
            };
            let Ok(startup_permit) = startups.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "ssh connection refused: max_startups ({}) unauthenticated connections open", settings.max_startups);
                continue;
            };
            let core = self.core.clone();
            tasks.spawn(async move {
                let _ = socket.set_nodelay(true);
                let local = socket
                    .local_addr()
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                core.serve(socket, peer, local, Some(startup_permit)).await;
                drop(conn_permit);
            });
        }
        drop(self.listener);
        tasks.close();
        tracing::info!(
            "ssh: stopped accepting; closing {} connection(s)",
            tasks.len()
        );
        if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("ssh: some connections did not close within 10 s");
        }
    }
}
