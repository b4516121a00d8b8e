//! A private `remote-relay run` for tests (127.0.0.1, its own data dir, restartable on the
//! same port with SIGKILL or SIGTERM), its administration commands, a loopback TCP proxy
//! that can cut an agent's tunnel without touching the agent, and a raw gRPC channel for
//! probing the relay with calls the `remote` client would never make.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crate::{bin, run_with_timeout, stderr, stdout};

/// A running relay.
pub struct Relay {
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub addr: SocketAddr,
    pub fingerprint: String,
    child: Option<Child>,
    log: mpsc::Receiver<String>,
    log_lines: Vec<String>,
}

impl Relay {
    /// A new relay with a fresh data directory.
    pub fn start() -> Relay {
        let dir = tempfile::Builder::new()
            .prefix("remote-relay-test-")
            .tempdir()
            .expect("tempdir");
        let data_dir = dir.path().join("data");
        let (child, log, log_lines, addr, fingerprint) = spawn(&data_dir, "127.0.0.1:0");
        Relay {
            dir,
            data_dir,
            addr,
            fingerprint,
            child: Some(child),
            log,
            log_lines,
        }
    }

    /// Kill the relay at once (SIGKILL): no goodbye to anyone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop with SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same address with the same data (after `kill` or `stop`).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The port may linger a moment after a kill: retry until the deadline.
        let (child, log, log_lines, addr, fingerprint) = loop {
            match try_spawn(&self.data_dir, &self.addr.to_string()) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => panic!("relay did not restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        assert_eq!(addr, self.addr);
        assert_eq!(
            fingerprint, self.fingerprint,
            "the certificate must persist"
        );
        self.child = Some(child);
        self.log = log;
        self.log_lines = log_lines;
    }

    /// Everything the relay logged so far (since its last start).
    pub fn log(&mut self) -> String {
        while let Ok(line) = self.log.try_recv() {
            self.log_lines.push(line);
        }
        self.log_lines.join("\n")
    }

    /// `remote-relay ARGS... --data-dir DIR`; returns the last line of stdout, panicking
    /// on failure.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = run_with_timeout(
            Command::new(bin("remote-relay"))
                .args(args)
                .arg("--data-dir")
                .arg(&self.data_dir),
            None,
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "remote-relay {args:?}: {}",
            stderr(&out)
        );
        stdout(&out).lines().last().unwrap_or_default().to_string()
    }

    /// A one-time join token.
    pub fn join_token(&self) -> String {
        self.admin(&["token", "create", "--agent", "--ttl", "10m"])
    }

    /// Add a relay user; returns their token.
    pub fn add_user(&self, name: &str) -> String {
        self.admin(&["user", "add", name])
    }

    /// `remote-agent run` arguments that make an agent dial this relay (through `via`, a
    /// proxy, when given) under `name`.
    pub fn agent_args(&self, name: &str, token: &str, via: Option<SocketAddr>) -> Vec<String> {
        vec![
            "--relay".into(),
            via.unwrap_or(self.addr).to_string(),
            "--join-token".into(),
            token.into(),
            "--name".into(),
            name.into(),
        ]
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

type Spawned = (
    Child,
    mpsc::Receiver<String>,
    Vec<String>,
    SocketAddr,
    String,
);

fn spawn(data_dir: &Path, listen: &str) -> Spawned {
    try_spawn(data_dir, listen).unwrap_or_else(|e| panic!("{e}"))
}

fn try_spawn(data_dir: &Path, listen: &str) -> Result<Spawned, String> {
    let mut child = Command::new(bin("remote-relay"))
        .arg("run")
        .args(["--listen", listen])
        .arg("--data-dir")
        .arg(data_dir)
        .env("REMOTE_RELAY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start remote-relay: {e}"))?;
    let err = child.stderr.take().ok_or("no stderr")?;
    let rx = crate::lines_of(err);
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let found = line.split("listening on ").nth(1).and_then(|rest| {
                    let mut it = rest.split_whitespace();
                    let addr = it.next()?.parse::<SocketAddr>().ok()?;
                    let fp = rest.split("(certificate ").nth(1)?.trim_end_matches(')');
                    Some((addr, fp.to_string()))
                });
                lines.push(line);
                if let Some((addr, fp)) = found {
                    return Ok((child, rx, lines, addr, fp));
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "relay did not report its address; log:\n{}",
                    lines.join("\n")
                ));
            }
        }
    }
}

/// A TCP proxy on 127.0.0.1 to `upstream` whose connections can be cut, and new ones
/// refused, for a while: an agent's tunnel dies while the agent and the relay live on.
pub struct CutProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
    _runtime: tokio::runtime::Runtime,
}

impl CutProxy {
    pub fn start(upstream: SocketAddr) -> CutProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let (c, g) = (cut.clone(), generation.clone());
        runtime.spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    continue;
                };
                if c.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let mut cut_now = g.subscribe();
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = cut_now.changed() => {}
                    }
                });
            }
        });
        CutProxy {
            addr,
            cut,
            generation,
            _runtime: runtime,
        }
    }

    /// Drop every connection and refuse new ones until [`CutProxy::heal`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|n| *n += 1);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// A TLS connection to the relay offering `alpn` (any certificate: these are probes, not
/// clients).
pub async fn tls_connect(
    addr: SocketAddr,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let verifier = Arc::new(remote_proto::tls::PinnedCert::new(None));
    let mut config = verifier.client_config().map_err(std::io::Error::other)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name =
        rustls::pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// A gRPC channel to the relay over TLS (see [`tls_connect`]).
pub async fn grpc_channel(addr: SocketAddr) -> tonic::transport::Channel {
    let connect = move || tls_connect(addr, b"h2");
    remote_proto::tls::grpc_channel(&addr.to_string(), connect)
        .await
        .expect("grpc channel to the relay")
}
