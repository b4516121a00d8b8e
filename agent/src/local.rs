//! The agent's local socket: how `remote-agent subsystem` (run by the host's own sshd, as
//! PowerShell's SSH remoting is) reaches the running agent. The peer's OS user, from the
//! socket's credentials, is who the connection acts for; the sessions live in the agent, so
//! they survive the SSH connection that created them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::process::Identity;
use crate::session::{Principal, SessionHost};

/// Local connections served at once.
const MAX_LOCAL_CONNECTIONS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "cannot listen on local socket {path}: {source}. Is another agent running? (remote-agent status; [local] socket in the config)"
    )]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct LocalListener {
    listener: UnixListener,
    path: PathBuf,
}

impl LocalListener {
    /// Bind `path`, replacing a stale socket file left by an agent that is gone. Anybody may
    /// connect (mode 0666): the peer's credentials say who they are.
    pub fn bind(path: &Path) -> Result<LocalListener, LocalError> {
        let err = |source| LocalError::Bind {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "an agent is already listening there",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
        Ok(LocalListener {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn run(self, host: Arc<SessionHost>, shutdown: CancellationToken) {
        let limit = Arc::new(Semaphore::new(MAX_LOCAL_CONNECTIONS));
        let tasks = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                () = shutdown.cancelled() => break,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("local socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                tracing::warn!("local connection refused: {MAX_LOCAL_CONNECTIONS} already open");
                continue;
            };
            let cred = match stream.peer_cred() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("local connection without peer credentials refused: {e}");
                    continue;
                }
            };
            let uid = nix::unistd::Uid::from_raw(cred.uid());
            let identity = match Identity::for_uid(uid) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(uid = cred.uid(), "local connection refused: {e}");
                    continue;
                }
            };
            let principal = Principal {
                name: identity.user.clone(),
                admin: uid.is_root(),
                // OS users: endpoints admit them by their OS groups.
                groups: identity.group_names(),
                identity,
                transport: "ssh-subsystem",
            };
            tracing::info!(user = %principal.name, pid = ?cred.pid(), "local session client connected");
            let host = host.clone();
            let stop = shutdown.clone();
            tasks.spawn(async move {
                // On shutdown the connection is simply closed; the bridge then exits.
                tokio::select! {
                    () = crate::wire::serve(host, principal, stream) => {}
                    () = stop.cancelled() => {}
                }
                drop(permit);
            });
        }
        tasks.close();
        let _ = std::fs::remove_file(&self.path);
        let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    }
}

/// `remote-agent subsystem`: bridge this process's stdin/stdout to the agent's local socket.
pub async fn bridge_stdio(socket: &Path) -> Result<(), std::io::Error> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "no remote-agent is running on this host (cannot connect to {}: {e}). Start it with `remote-agent run`, or give its socket with --socket",
                socket.display()
            ),
        )
    })?;
    let (mut from_agent, mut to_agent) = stream.into_split();
    let upstream = async {
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut to_agent).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut to_agent).await;
    };
    let downstream = async {
        let mut stdout = tokio::io::stdout();
        let r = tokio::io::copy(&mut from_agent, &mut stdout).await;
        let _ = tokio::io::AsyncWriteExt::flush(&mut stdout).await;
        r
    };
    tokio::pin!(upstream);
    tokio::pin!(downstream);
    // The agent closing its side ends the bridge, whatever stdin does; the end of stdin
    // only ends what we send, and the agent's answers are still relayed.
    tokio::select! {
        r = &mut downstream => return r.map(|_| ()),
        () = &mut upstream => {}
    }
    downstream.await.map(|_| ())
}
