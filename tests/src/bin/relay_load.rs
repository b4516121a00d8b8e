//! `relay-load`: a load generator for `remote-relay run` (issue 5, "Scale and speed"; run by
//! tests/bench/relay.sh). It owns simulated agents, nothing else: each is one TCP + TLS
//! tunnel connection (remote_proto::tunnel), as a real agent's would.
//!
//! * `enrol`: N agents enrol: join tokens made straight in the relay's SQLite store, then the
//!   `Enrol` RPC; credentials are cached in the data dir, so a rerun skips this.
//! * `tunnels`: N agents (enrolled first if not yet) open their tunnels, say AgentHello, wait
//!   for RelayHello and then stay idle. With
//!   `--relay-pid` it reads the relay's VmRSS after a small warm-up and once all N have been
//!   idle a while, and prints the difference per tunnel.
//! * `spill`: one agent reports one session and spills journal records for it
//!   (SpillBatch), a bounded number of batches in flight, timing until the relay has
//!   acknowledged (SpillAck) every one as durable.
//!
//! Results go to stdout as `key=value` lines (for the bench script); progress to stderr.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use futures::{Stream, StreamExt};
use remote_proto::relay::agent_tunnel_client::AgentTunnelClient;
use remote_proto::relay::{
    AgentHello, AgentMessage, EnrolRequest, Keepalive, RelayMessage, SpillBatch, TunnelOpen,
    agent_message, relay_message,
};
use remote_proto::session::{Output, Record, SessionInfo, SessionState, Shape, Stream as Std};
use remote_proto::tls::PinnedCert;
use remote_proto::tunnel::{self, FrameReader};
use remote_relay::store::Store;
use rustls::pki_types::pem::PemObject;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;

/// Credentials of enrolled simulated agents, in the relay's data dir: `NAME CREDENTIAL` lines.
const CREDENTIALS_FILE: &str = "relay-load-credentials";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const SOFTWARE: &str = concat!("relay-load ", env!("CARGO_PKG_VERSION"));

#[derive(Parser)]
#[command(
    name = "relay-load",
    version,
    about = "Simulated agents against a running remote-relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enrol N agents (those not enrolled yet) and keep their credentials in the data dir.
    Enrol(EnrolArgs),
    /// Open N idle agent tunnels (enrolling those not enrolled yet); optionally measure the
    /// relay's RSS per tunnel.
    Tunnels(TunnelsArgs),
    /// Spill journal records of one session and time their persistence.
    Spill(SpillArgs),
}

#[derive(Args, Clone)]
struct Common {
    /// The relay, HOST:PORT (loopback in the benchmark).
    #[arg(long, value_name = "ADDR")]
    relay: String,
    /// The relay's data directory (relay.db and relay_cert.pem in it).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Enrolments (and join token creations) at once.
    #[arg(long, default_value_t = 64)]
    enrol_concurrency: usize,
}

/// The simulated agents: PREFIX00001 … PREFIX{count}.
#[derive(Args, Clone)]
struct AgentSet {
    /// Agents (and so tunnels).
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Agent names are PREFIX00001, PREFIX00002, …
    #[arg(long, default_value = "load-")]
    prefix: String,
}

impl AgentSet {
    fn names(&self) -> Vec<String> {
        (1..=self.count)
            .map(|i| format!("{}{i:05}", self.prefix))
            .collect()
    }
}

#[derive(Args)]
struct EnrolArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    agents: AgentSet,
}

#[derive(Args)]
struct TunnelsArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    agents: AgentSet,
    /// Tunnels opened before the baseline RSS is taken (part of --count).
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The relay's pid: read its VmRSS before and after.
    #[arg(long, value_name = "PID")]
    relay_pid: Option<u32>,
    /// Seconds every tunnel stays idle before the final RSS reading.
    #[arg(long, default_value_t = 5.0)]
    idle_secs: f64,
    /// Seconds to settle after the warm-up before the baseline reading.
    #[arg(long, default_value_t = 2.0)]
    settle_secs: f64,
    /// Keep the tunnels open after measuring until stdin closes (for manual inspection).
    #[arg(long)]
    hold: bool,
}

#[derive(Args)]
struct SpillArgs {
    #[command(flatten)]
    common: Common,
    /// Payload bytes to spill (output data, excluding framing).
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Output bytes per record.
    #[arg(long, default_value_t = 64 * 1024)]
    record_bytes: usize,
    /// Records per SpillBatch.
    #[arg(long, default_value_t = 4)]
    batch_records: usize,
    /// Batches sent and not yet acknowledged, at most.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// The simulated agent's name.
    #[arg(long, default_value = "spill-bench")]
    name: String,
    /// Give up when no acknowledgement arrives for this long.
    #[arg(long, default_value_t = 60)]
    stall_secs: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    keep_large_allocations_mapped();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| {
            rt.block_on(async {
                match cli.command {
                    Command::Enrol(a) => {
                        let relay = Relay::new(&a.common)?;
                        credentials(&a.common, &relay, &a.agents.names()).await?;
                        Ok(())
                    }
                    Command::Tunnels(a) => tunnels(a).await,
                    Command::Spill(a) => spill(a).await,
                }
            })
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-load: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Creating join tokens runs argon2 here, whose 4 MiB, 64-byte aligned block buffer glibc
/// serves from its heaps once the dynamic mmap threshold has risen, and cannot reuse after
/// the alignment split: every token would leave ~4 MiB behind. A fixed threshold keeps such
/// buffers in their own mappings, returned on free, so the tool stays small.
fn keep_large_allocations_mapped() {
    // SAFETY: mallopt only changes malloc's tuning; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[relay-load] {}", msg.as_ref());
}

/// One result line for the bench script.
fn put(key: &str, value: impl std::fmt::Display) {
    println!("{key}={value}");
    let _ = std::io::stdout().flush();
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status: is the relay running?"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

fn own_rss_kib() -> u64 {
    rss_kib(std::process::id()).unwrap_or(0)
}

// ------------------------------------------------------------------------- connections

/// How to reach the relay: its address and a TLS config pinned to its certificate.
#[derive(Clone)]
struct Relay {
    addr: String,
    host: String,
    /// For gRPC (ALPN h2) and for tunnels (remote_proto::tunnel::ALPN).
    tls: Arc<rustls::ClientConfig>,
    tunnel_tls: Arc<rustls::ClientConfig>,
}

impl Relay {
    fn new(c: &Common) -> Result<Relay> {
        let cert_path = c.data_dir.join(remote_relay::tls::CERT_FILE);
        let cert =
            rustls::pki_types::CertificateDer::from_pem_file(&cert_path).with_context(|| {
                format!("cannot read the relay certificate {}", cert_path.display())
            })?;
        let pinned = Arc::new(PinnedCert::new(Some(remote_proto::tls::fingerprint(
            cert.as_ref(),
        ))));
        let plain = pinned.client_config().context("TLS setup")?;
        let mut tls = plain.clone();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let mut tunnel_tls = plain;
        tunnel_tls.alpn_protocols = vec![tunnel::ALPN.to_vec()];
        let host = match c.relay.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
            None => bail!("--relay '{}' is not HOST:PORT", c.relay),
        };
        Ok(Relay {
            addr: c.relay.clone(),
            host,
            tls: Arc::new(tls),
            tunnel_tls: Arc::new(tunnel_tls),
        })
    }

    /// A new TCP + TLS connection with `tls`.
    async fn connect(&self, tls: Arc<rustls::ClientConfig>) -> std::io::Result<TunnelStream> {
        let tcp = tokio::net::TcpStream::connect(&self.addr).await?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
    }

    /// A new HTTP/2 connection (TCP + TLS) of its own, for gRPC calls.
    async fn channel(&self) -> Result<Channel> {
        let this = Arc::new(Relay {
            addr: self.addr.clone(),
            host: self.host.clone(),
            tls: self.tls.clone(),
            tunnel_tls: self.tunnel_tls.clone(),
        });
        let connect = move || {
            let this = this.clone();
            async move { this.connect(this.tls.clone()).await }
        };
        let channel = tokio::time::timeout(
            CONNECT_TIMEOUT,
            remote_proto::tls::grpc_channel(&self.addr, connect),
        )
        .await
        .map_err(|_| anyhow!("connecting to {} timed out", self.addr))?
        .map_err(|e| {
            anyhow!(
                "cannot connect to {}: {}",
                self.addr,
                remote_proto::tls::root_cause(&e)
            )
        })?;
        Ok(channel)
    }
}

/// An open tunnel: the stream from the relay; the task writing ours runs beside it.
struct Tunnel {
    reader: FrameReader,
    rd: tokio::io::ReadHalf<TunnelStream>,
    writer: tokio::task::JoinHandle<()>,
    /// What the relay sent in RelayHello: per session, the highest seq persisted.
    persisted: HashMap<String, u64>,
}

type TunnelStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

impl Tunnel {
    /// The relay's next message; `None` when it closed the tunnel.
    async fn message(&mut self) -> Result<Option<RelayMessage>> {
        Ok(self.reader.message(&mut self.rd).await?)
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

/// Open a tunnel on a connection of its own, as an agent does (remote_proto::tunnel): say
/// TunnelOpen and `hello`, wait for RelayHello, then write whatever `rest` yields, with a
/// keepalive every 30 s.
async fn open_tunnel<S>(
    relay: &Relay,
    credential: &str,
    hello: AgentHello,
    rest: S,
) -> Result<Tunnel>
where
    S: Stream<Item = AgentMessage> + Send + 'static,
{
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, relay.connect(relay.tunnel_tls.clone()))
        .await
        .map_err(|_| anyhow!("connecting to {} timed out", relay.addr))?
        .with_context(|| format!("cannot connect to {}", relay.addr))?;
    let (rd, mut wr) = tokio::io::split(tls);
    let first = AgentMessage {
        msg: Some(agent_message::Msg::Hello(hello)),
    };
    let open = TunnelOpen {
        credential: credential.to_string(),
    };
    let mut reader = FrameReader::new(tunnel::MAX_MESSAGE_BYTES);
    let mut rd = rd;
    let greet = async {
        tunnel::write(&mut wr, &open).await?;
        tunnel::write(&mut wr, &first).await?;
        wr.flush().await?;
        Ok::<_, anyhow::Error>(reader.message::<RelayMessage, _>(&mut rd).await?)
    };
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, greet)
        .await
        .map_err(|_| anyhow!("no RelayHello within {CONNECT_TIMEOUT:?}"))??;
    let persisted = match answer.and_then(|m| m.msg) {
        Some(relay_message::Msg::Hello(h)) => h.persisted,
        Some(relay_message::Msg::Refused(r)) => bail!("tunnel refused: {}: {}", r.code, r.message),
        Some(other) => bail!("the relay's first message was not RelayHello: {other:?}"),
        None => bail!("the relay closed the tunnel before RelayHello"),
    };
    let writer = tokio::spawn(async move {
        let mut rest = std::pin::pin!(rest);
        let mut keepalive = tokio::time::interval(tunnel::KEEPALIVE_EVERY);
        keepalive.tick().await;
        loop {
            let msg = tokio::select! {
                m = rest.next() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = keepalive.tick() => AgentMessage {
                    msg: Some(agent_message::Msg::Keepalive(Keepalive { nonce: 0 })),
                },
            };
            if tunnel::write(&mut wr, &msg).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
    });
    Ok(Tunnel {
        reader,
        rd,
        writer,
        persisted,
    })
}

fn hello(sessions: Vec<SessionInfo>, spill_from: HashMap<String, u64>) -> AgentHello {
    AgentHello {
        protocol_version: remote_proto::PROTOCOL_VERSION,
        software: SOFTWARE.into(),
        sessions,
        spill_from,
        audit_log: String::new(),
    }
}

// ------------------------------------------------------------------------- enrolment

/// Credentials of agents `names`, from the cache in the data dir or by enrolling those
/// missing (join tokens created in the relay's store, then `Enrol`). Returns them in the
/// order of `names`.
async fn credentials(c: &Common, relay: &Relay, names: &[String]) -> Result<Vec<String>> {
    let cache_path = c.data_dir.join(CREDENTIALS_FILE);
    let mut cache = read_cache(&cache_path)?;
    let missing: Vec<String> = names
        .iter()
        .filter(|n| !cache.contains_key(*n))
        .cloned()
        .collect();
    if !missing.is_empty() {
        let t0 = Instant::now();
        log(format!(
            "enrolling {} agents ({} cached in {})",
            missing.len(),
            names.len() - missing.len(),
            cache_path.display()
        ));
        let store = Store::open(&Store::sqlite_url(&c.data_dir.join("relay.db")))
            .await
            .context("cannot open the relay's store")?;
        let store = Arc::new(store);
        let channel = relay.channel().await?;
        let client = AgentTunnelClient::new(channel);
        let done = Arc::new(AtomicUsize::new(0));
        let total = missing.len();
        let results: Vec<Result<(String, String)>> = futures::stream::iter(missing)
            .map(|name| {
                let (store, mut client, done) = (store.clone(), client.clone(), done.clone());
                async move {
                    let token = store
                        .create_join_token(Duration::from_secs(3600))
                        .await
                        .context("creating a join token")?;
                    let resp = client
                        .enrol(EnrolRequest {
                            join_token: token,
                            agent_name: name.clone(),
                            software: SOFTWARE.into(),
                        })
                        .await
                        .map_err(|s| {
                            anyhow!("enrolling {name}: {:?}: {}", s.code(), s.message())
                        })?;
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if n % 1000 == 0 {
                        log(format!("enrolled {n}/{total}"));
                    }
                    Ok((name, resp.into_inner().credential))
                }
            })
            .buffer_unordered(c.enrol_concurrency.max(1))
            .collect()
            .await;
        store.close().await;
        let mut enrolled = Vec::new();
        let mut first_err = None;
        for r in results {
            match r {
                Ok(pair) => enrolled.push(pair),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        append_cache(&cache_path, &enrolled)?;
        cache.extend(enrolled);
        if let Some(e) = first_err {
            return Err(e.context("enrolment failed"));
        }
        put("enrol_secs", format!("{:.3}", t0.elapsed().as_secs_f64()));
        put("enrolled", total);
    } else {
        put("enrolled", 0);
    }
    names
        .iter()
        .map(|n| {
            cache
                .get(n)
                .cloned()
                .ok_or_else(|| anyhow!("no credential for {n}"))
        })
        .collect()
}

fn read_cache(path: &Path) -> Result<HashMap<String, String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(n, c)| (n.to_string(), c.trim().to_string()))
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => Err(anyhow!("cannot read {}: {e}", path.display())),
    }
}

fn append_cache(path: &Path, pairs: &[(String, String)]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    for (n, c) in pairs {
        text.push_str(&format!("{n} {c}\n"));
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

// ------------------------------------------------------------------------- tunnels

async fn tunnels(a: TunnelsArgs) -> Result<()> {
    let count = a.agents.count;
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let warmup = a.warmup.min(count);
    let relay = Relay::new(&a.common)?;
    let names = a.agents.names();
    let creds = credentials(&a.common, &relay, &names).await?;
    put("count", count);
    put("warmup", warmup);

    let up = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let (err_tx, mut err_rx) = mpsc::unbounded_channel::<String>();
    let stop = tokio_util::sync::CancellationToken::new();
    let permits = Arc::new(Semaphore::new(a.concurrency.max(1)));

    // Open tunnels [from, to) and wait until each is up or failed.
    let open = |from: usize, to: usize| {
        let mut handles = Vec::with_capacity(to - from);
        for i in from..to {
            let (relay, cred, name) = (relay.clone(), creds[i].clone(), names[i].clone());
            let (up, dropped, err_tx, stop, permits) = (
                up.clone(),
                dropped.clone(),
                err_tx.clone(),
                stop.clone(),
                permits.clone(),
            );
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<bool>();
            tokio::spawn(async move {
                let permit = permits.acquire_owned().await;
                let opened = open_tunnel(
                    &relay,
                    &cred,
                    hello(Vec::new(), HashMap::new()),
                    futures::stream::pending(),
                )
                .await;
                drop(permit);
                let mut t = match opened {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = err_tx.send(format!("{name}: {e:#}"));
                        let _ = ready_tx.send(false);
                        return;
                    }
                };
                up.fetch_add(1, Ordering::Relaxed);
                let _ = ready_tx.send(true);
                // Idle: the relay sends nothing more to an idle agent; anything it does send
                // is read and dropped. The end of the stream is a dropped tunnel.
                let ended = tokio::select! {
                    () = stop.cancelled() => false,
                    () = async { while let Ok(Some(_)) = t.message().await {} } => true,
                };
                if ended {
                    up.fetch_sub(1, Ordering::Relaxed);
                    dropped.fetch_add(1, Ordering::Relaxed);
                    let _ = err_tx.send(format!("{name}: the relay ended the tunnel"));
                }
            });
            handles.push(ready_rx);
        }
        let up = up.clone();
        let total = to - from;
        async move {
            let mut ok = 0usize;
            let mut n = 0usize;
            let mut last = Instant::now();
            for h in handles {
                if h.await.unwrap_or(false) {
                    ok += 1;
                }
                n += 1;
                if total >= 1000 && last.elapsed() > Duration::from_secs(5) {
                    last = Instant::now();
                    log(format!(
                        "{n}/{total} tunnels set up ({} up)",
                        up.load(Ordering::Relaxed)
                    ));
                }
            }
            ok
        }
    };

    let relay_rss = |what: &str| -> Result<Option<u64>> {
        match a.relay_pid {
            Some(pid) => {
                let kib = rss_kib(pid)?;
                log(format!("relay VmRSS {what}: {kib} KiB"));
                Ok(Some(kib))
            }
            None => Ok(None),
        }
    };

    if let Some(kib) = relay_rss("before any tunnel")? {
        put("relay_rss_start_kib", kib);
    }
    let t0 = Instant::now();
    let ok_warm = open(0, warmup).await;
    if ok_warm < warmup {
        log(first_errors(&mut err_rx, 5));
        bail!("only {ok_warm} of {warmup} warm-up tunnels came up");
    }
    tokio::time::sleep(Duration::from_secs_f64(a.settle_secs)).await;
    let before = relay_rss(&format!("with {warmup} warm-up tunnels"))?;
    if let Some(kib) = before {
        put("relay_rss_before_kib", kib);
    }
    let tool_before = own_rss_kib();

    let t1 = Instant::now();
    let ok_rest = open(warmup, count).await;
    let connect_secs = t1.elapsed().as_secs_f64();
    let ok = ok_warm + ok_rest;
    put("connected", ok);
    put("connect_secs", format!("{connect_secs:.3}"));
    put(
        "connect_rate",
        format!("{:.0}", ok_rest as f64 / connect_secs.max(1e-9)),
    );
    log(format!(
        "{ok}/{} tunnels up; {} more in {connect_secs:.1} s; idling {} s",
        count,
        count - warmup,
        a.idle_secs
    ));
    tokio::time::sleep(Duration::from_secs_f64(a.idle_secs)).await;
    let still_up = up.load(Ordering::Relaxed);
    put("up_after_idle", still_up);
    put("dropped", dropped.load(Ordering::Relaxed));
    put("failed", count - ok);
    let after = relay_rss(&format!("with {still_up} idle tunnels"))?;
    if let (Some(b), Some(af)) = (before, after) {
        put("relay_rss_after_kib", af);
        let added = (count - warmup).max(1) as f64;
        put(
            "relay_kib_per_tunnel",
            format!("{:.2}", (af as f64 - b as f64) / added),
        );
        put(
            "relay_rss_per_tunnel_overall_kib",
            format!("{:.2}", af as f64 / still_up.max(1) as f64),
        );
    }
    let tool_after = own_rss_kib();
    put("tool_rss_kib", tool_after);
    put(
        "tool_kib_per_tunnel",
        format!(
            "{:.2}",
            (tool_after as f64 - tool_before as f64) / (count - warmup).max(1) as f64
        ),
    );
    put("total_secs", format!("{:.3}", t0.elapsed().as_secs_f64()));
    if ok < count || still_up < ok {
        log(first_errors(&mut err_rx, 5));
    }
    if a.hold {
        log("holding the tunnels until stdin closes");
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin()
                .read_line(&mut sink)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
        })
        .await;
    }
    stop.cancel();
    Ok(())
}

fn first_errors(rx: &mut mpsc::UnboundedReceiver<String>, n: usize) -> String {
    let mut seen = Vec::new();
    let mut count = 0usize;
    while let Ok(e) = rx.try_recv() {
        count += 1;
        if seen.len() < n {
            seen.push(e);
        }
    }
    if count == 0 {
        return "no errors reported".into();
    }
    format!("{count} error(s), first: {}", seen.join("; "))
}

// ------------------------------------------------------------------------- spill

async fn spill(a: SpillArgs) -> Result<()> {
    if a.record_bytes == 0 || a.batch_records == 0 || a.in_flight == 0 {
        bail!("--record-bytes, --batch-records and --in-flight must be at least 1");
    }
    if a.record_bytes > remote_proto::MAX_CHUNK_BYTES {
        bail!(
            "--record-bytes must be at most {} (an agent's largest output chunk)",
            remote_proto::MAX_CHUNK_BYTES
        );
    }
    let relay = Relay::new(&a.common)?;
    let cred = credentials(&a.common, &relay, std::slice::from_ref(&a.name))
        .await?
        .remove(0);

    let session_id = {
        use rand::RngExt;
        format!("{:016x}", rand::rng().random::<u64>())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let info = SessionInfo {
        id: session_id.clone(),
        name: "spill-bench".into(),
        owner: "bench".into(),
        shape: Shape::Commands as i32,
        state: SessionState::StateDisconnected as i32,
        endpoint: "bench".into(),
        created_unix: now,
        last_output_unix: now,
        transport: "ssh".into(),
        next_seq: 1,
        ..Default::default()
    };
    let records_total = a.bytes.div_ceil(a.record_bytes as u64).max(1);
    let payload_total = records_total * a.record_bytes as u64;

    let (tx, rx) = mpsc::channel::<AgentMessage>(a.in_flight);
    let rest =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut tunnel = open_tunnel(
        &relay,
        &cred,
        hello(vec![info], HashMap::from([(session_id.clone(), 1)])),
        rest,
    )
    .await?;
    let start_persisted = tunnel.persisted.get(&session_id).copied();
    if start_persisted.unwrap_or(0) != 0 {
        bail!("the relay already holds records of new session {session_id}: {start_persisted:?}");
    }
    if start_persisted.is_none() {
        bail!("the relay did not take session {session_id} from the AgentHello (see its log)");
    }
    log(format!(
        "spilling {records_total} records of {} bytes ({} MiB), {} per batch, {} batches in flight, session {session_id}",
        a.record_bytes,
        payload_total >> 20,
        a.batch_records,
        a.in_flight
    ));

    // One payload, varied per record so that nothing along the way can compress it away.
    let mut pattern = vec![0u8; a.record_bytes];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in pattern.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let batch = |first: u64| -> AgentMessage {
        let last = (first + a.batch_records as u64 - 1).min(records_total);
        let records = (first..=last)
            .map(|seq| {
                let mut data = pattern.clone();
                data[..8].copy_from_slice(&seq.to_le_bytes());
                Record {
                    seq,
                    command_id: 1,
                    kind: Some(remote_proto::session::record::Kind::Output(Output {
                        stream: Std::Stdout as i32,
                        data,
                    })),
                }
            })
            .collect();
        AgentMessage {
            msg: Some(agent_message::Msg::Spill(SpillBatch {
                session_id: session_id.clone(),
                records,
            })),
        }
    };

    let t0 = Instant::now();
    let mut next_seq = 1u64;
    let mut sent = 0usize;
    let mut acked = 0usize;
    let mut persisted = 0u64;
    let mut last_log = Instant::now();
    while persisted < records_total {
        while next_seq <= records_total && sent - acked < a.in_flight {
            let m = batch(next_seq);
            next_seq = (next_seq + a.batch_records as u64).min(records_total + 1);
            tx.send(m)
                .await
                .map_err(|_| anyhow!("the tunnel closed while spilling"))?;
            sent += 1;
        }
        let msg = tokio::time::timeout(Duration::from_secs(a.stall_secs), tunnel.message())
            .await
            .map_err(|_| {
                anyhow!(
                    "no SpillAck for {} s (persisted {persisted} of {records_total} records)",
                    a.stall_secs
                )
            })?
            .context("the tunnel broke")?;
        match msg.and_then(|m| m.msg) {
            Some(relay_message::Msg::SpillAck(ack)) if ack.session_id == session_id => {
                acked += 1;
                persisted = persisted.max(ack.persisted_seq);
            }
            Some(_) => {}
            None => bail!("the relay ended the tunnel (persisted {persisted} of {records_total})"),
        }
        if last_log.elapsed() > Duration::from_secs(5) {
            last_log = Instant::now();
            let mb = (persisted * a.record_bytes as u64) as f64 / 1e6;
            log(format!(
                "{persisted}/{records_total} records persisted, {:.0} MB/s so far",
                mb / t0.elapsed().as_secs_f64()
            ));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(tx);
    let bytes = persisted * a.record_bytes as u64;
    put("spill_session", &session_id);
    put("spill_bytes", bytes);
    put("spill_records", persisted);
    put("spill_batches", acked);
    put("spill_record_bytes", a.record_bytes);
    put("spill_batch_records", a.batch_records);
    put("spill_in_flight", a.in_flight);
    put("spill_secs", format!("{secs:.3}"));
    put("spill_mbs", format!("{:.1}", bytes as f64 / 1e6 / secs));

    // Check: what the store says is durable.
    let store = Store::open(&Store::sqlite_url(&a.common.data_dir.join("relay.db")))
        .await
        .context("cannot open the relay's store")?;
    let state = store.journal_state(&session_id).await?;
    store.close().await;
    put("spill_stored_seq", state.stored_seq);
    if state.stored_seq != records_total {
        bail!(
            "the store holds records up to {} of {records_total} after every SpillAck",
            state.stored_seq
        );
    }
    Ok(())
}
