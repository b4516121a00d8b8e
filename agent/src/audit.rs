//! The agent's audit log: one JSON line per security-relevant event, appended to
//! `audit.jsonl` in the state directory, rotated by size, and offered to the relay link so the
//! events also reach the relay's store, where a user on the host cannot erase them.
//!
//! This module owns the event vocabulary ([`Event`]), the on-disk format, the writer thread,
//! rotation, and the agent-side API the relay link reads from ([`AuditReader`],
//! [`Audit::written`], [`Audit::subscribe`]). The transports (SSH, WinRM, the relay tunnel,
//! the local socket) and the session host only call [`Audit::record`].
//!
//! # Format
//!
//! Every line is one JSON object, in this key order: `ts` (RFC 3339 UTC with milliseconds,
//! e.g. `2026-11-21T17:00:00.123Z`: when the event was recorded), `seq` (a number that grows
//! by one per line of this log, across rotations and agent restarts), `event` (the kind), then
//! the kind's keys. Keys marked *optional* are omitted when they have no value. The names are
//! stable: add keys, never rename them.
//!
//! | `event`         | keys |
//! |-----------------|------|
//! | `connection`    | `transport`, `peer`, `local` |
//! | `auth`          | `transport`, `peer`, `account`, `method`, `success`, `reason` (optional, failures) |
//! | `session`       | `action` (`open`/`attach`/`detach`/`close`), `session`, `account`, `endpoint`, `transport`, `peer` (optional) |
//! | `command`       | `session` (optional), `peer` (optional), `account`, `endpoint`, `transport`, `command` (optional), `exit_code` (optional), `signal` (optional), `bytes_out`, `duration_ms`, `reason` (optional), `truncated` (optional, `true` when `command` was cut) |
//! | `refused`       | `account`, `endpoint`, `transport`, `reason`, `peer` (optional) |
//! | `audit_start`   | `log`, `pid`, `version`: the writer started (each agent start) |
//! | `audit_dropped` | `count`, `reason` (`queue_full` or `write_error`): events that did not make it into this file |
//!
//! `transport` is one of `ssh`, `winrm`, `winrms`, `relay`, `local` (the local socket that
//! `remote-agent subsystem` bridges to under sshd). Addresses are `ip:port` strings.
//!
//! # What is never written
//!
//! Passwords, NT hashes, tokens and keys: no event has a field for them, and `reason` must
//! name what failed ("bad password", "unknown account"), never carry the secret.
//!
//! Command lines *are* written, because what was run is the point of an audit log, cut to
//! [`AuditSettings::command_chars`] characters (default 1024; `truncated: true` says so). A
//! command line can contain a secret someone passed as an argument, just as shell history and
//! auditd's execve records can: the file is 0600 in the agent's private state directory and
//! the relay's store is access-controlled, and users should pass secrets on stdin or in the
//! environment. Setting `command_chars` to 0 omits command lines altogether.
//!
//! Every free-text field is capped in length (accounts and peers come from the network), and
//! JSON escaping keeps control characters from forging lines.
//!
//! # Writing
//!
//! [`Audit::record`] never blocks and never panics: it stamps the time and puts the event on a
//! bounded queue ([`AuditSettings::queue`], default 4096) to a dedicated writer thread. When the
//! queue is full the event is counted, and the writer later writes one `audit_dropped` line
//! with the count, so the loss itself is never silent. The writer appends whole lines to
//! `audit.jsonl` (created 0600, `O_APPEND`, never through a symlink), one `write` per batch, so
//! lines never interleave; there is no fsync per line (the relay copy is the durable one).
//!
//! # Rotation
//!
//! When the next line would take `audit.jsonl` past [`AuditSettings::max_bytes`] (default
//! 10 MiB), `audit.jsonl.{keep}` is deleted, `.N` is renamed to `.N+1`, `audit.jsonl` becomes
//! `audit.jsonl.1`, and a new `audit.jsonl` is started. At most `keep` (default 5) rotated files
//! are kept besides the current one. A single line bigger than `max_bytes` gets a file of its
//! own rather than being lost.
//!
//! # Delivery to the relay
//!
//! Durable, by sequence number, in the manner of journald's seqnum: a log is identified by
//! [`Audit::log_id`] (a UUID kept in `audit.id`, renewed when no earlier line is found, for
//! instance after the files were erased), and its lines by `seq`. The relay link asks the
//! relay for the last `seq` it stored for this log id, opens [`Audit::reader`] after it and
//! sends batches of [`AuditLine`]s (the JSON line verbatim plus its `seq`) until the reader is
//! empty, then waits on [`Audit::written`] for more. The reader follows the files across
//! rotations, so events recorded while the tunnel is down are sent when it is back, as long
//! as they are still in the retained files; a jump in `seq` tells the relay how many were
//! lost. [`Audit::subscribe`] is a live, best-effort broadcast of the same lines for other
//! consumers (it misses everything while nobody listens).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// The current audit file, in the state directory. Rotated files are `audit.jsonl.1` (newest)
/// to `audit.jsonl.{keep}` (oldest).
pub const FILE_NAME: &str = "audit.jsonl";
/// The file holding the id of the log (see [`Audit::log_id`]).
pub const ID_FILE_NAME: &str = "audit.id";
/// Default size at which `audit.jsonl` is rotated: 10 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Default number of rotated files kept.
pub const DEFAULT_KEEP: usize = 5;
/// Default number of characters of a command line written.
pub const DEFAULT_COMMAND_CHARS: usize = 1024;
/// Default number of events that may wait for the writer.
pub const DEFAULT_QUEUE: usize = 4096;

/// Cap on every free-text field but the command line (accounts, endpoints, peers, reasons).
const TEXT_CHARS: usize = 256;
/// Cap on `reason` fields, which may carry an error message.
const REASON_CHARS: usize = 1024;
/// Most events handled per batch (one `write` each).
const BATCH: usize = 512;
/// Lines kept by the broadcast of [`Audit::subscribe`] for a slow receiver.
const BROADCAST: usize = 1024;
/// How much of a file is read at a time; lines are far shorter.
const CHUNK: usize = 64 * 1024;

/// How the audit log is sized. Proposed config keys: `[audit] max_mb = 10, keep = 5`
/// (see [`AuditSettings::from_mb`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditSettings {
    /// Rotate `audit.jsonl` before it would exceed this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.jsonl.1` ..= `audit.jsonl.{keep}`); 0 keeps none.
    pub keep: usize,
    /// Characters of a command line written; 0 writes no command lines.
    pub command_chars: usize,
    /// Events that may wait for the writer before new ones are dropped (and counted).
    pub queue: usize,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
            command_chars: DEFAULT_COMMAND_CHARS,
            queue: DEFAULT_QUEUE,
        }
    }
}

impl AuditSettings {
    /// Settings from the proposed config keys `[audit] max_mb` and `keep`.
    pub fn from_mb(max_mb: u64, keep: usize) -> Self {
        AuditSettings {
            max_bytes: max_mb.saturating_mul(1024 * 1024).max(1),
            keep,
            ..AuditSettings::default()
        }
    }
}

/// The transport an event came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Ssh,
    /// WinRM over plain HTTP.
    Winrm,
    /// WinRM over HTTPS.
    Winrms,
    /// A conversation on the relay tunnel.
    Relay,
    /// The local socket (`remote-agent subsystem` under sshd).
    Local,
}

impl Transport {
    /// The transport of a [`crate::session::Principal`] (`ssh`, `winrm`, `relay`,
    /// `ssh-subsystem`).
    pub fn from_label(label: &str) -> Transport {
        match label {
            "winrm" => Transport::Winrm,
            "winrms" => Transport::Winrms,
            "relay" => Transport::Relay,
            "ssh-subsystem" | "local" => Transport::Local,
            _ => Transport::Ssh,
        }
    }
}

/// What happened to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionAction {
    Open,
    Attach,
    Detach,
    Close,
}

/// One audited event. The JSON keys are the field names (see the module documentation);
/// `None` fields are left out of the line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A network connection was accepted (before authentication).
    Connection {
        transport: Transport,
        /// The client's address (`ip:port`), or a description of a local peer.
        peer: String,
        /// The address it connected to.
        local: String,
    },
    /// An authentication attempt, successful or not. Never carries the secret.
    Auth {
        transport: Transport,
        peer: String,
        /// The account name as the client gave it.
        account: String,
        /// `password`, `publickey`, `ntlm`, `basic`, `token`, `peercred`, ...
        method: String,
        success: bool,
        /// Why it failed ("bad password", "unknown account"): never the secret.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A session was opened, attached to, detached from or closed.
    Session {
        action: SessionAction,
        session: String,
        account: String,
        endpoint: String,
        transport: Transport,
        #[serde(skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
    },
    /// A command ended.
    Command {
        /// The session it ran in; `None` for a one-shot command (SSH exec, a WinRM shell
        /// outside a session), which `peer` ties to its connection.
        #[serde(skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
        account: String,
        endpoint: String,
        transport: Transport,
        /// The command line as received; cut to [`AuditSettings::command_chars`] when written.
        /// Empty for none (an interactive shell).
        #[serde(skip_serializing_if = "String::is_empty")]
        command: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        /// The signal that ended it, as a name without `SIG` (`KILL`, `TERM`).
        #[serde(skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
        /// Bytes of stdout and stderr sent to the client.
        bytes_out: u64,
        duration_ms: u64,
        /// Why it was ended early (quota, timeout, client gone), if it was.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// An endpoint or quota refusal.
    Refused {
        account: String,
        endpoint: String,
        transport: Transport,
        /// The message the client was given.
        reason: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
    },
}

/// The writer's own lines.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Meta<'a> {
    AuditStart {
        log: &'a str,
        pid: u32,
        version: &'a str,
    },
    AuditDropped {
        count: u64,
        reason: &'a str,
    },
}

/// The envelope of every line: `ts`, `seq`, then the event's keys.
#[derive(Serialize)]
struct Line<'a, B: Serialize> {
    ts: &'a str,
    seq: u64,
    #[serde(flatten)]
    body: &'a B,
    #[serde(skip_serializing_if = "Option::is_none")]
    truncated: Option<bool>,
}

/// One line of the log as written: its `seq` and the JSON text (no trailing newline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditLine {
    pub seq: u64,
    pub line: Arc<str>,
}

/// The audit log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(
        "cannot open the audit log {}: {error}: check that the state directory is writable by the agent (--state-dir)",
        path.display()
    )]
    Open { path: PathBuf, error: io::Error },
    #[error("cannot start the audit writer thread: {0}")]
    Spawn(io::Error),
}

/// The handle the agent's parts record events through. Cheap to clone; when the last clone
/// is dropped the writer writes what is queued and stops.
#[derive(Clone)]
pub struct Audit {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(inner) => f
                .debug_struct("Audit")
                .field("dir", &inner.dir)
                .field("log_id", &inner.log_id)
                .finish(),
            None => f.write_str("Audit(disabled)"),
        }
    }
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    dir: PathBuf,
    log_id: String,
}

/// What the handles and the writer share.
struct Shared {
    /// Events refused because the queue was full, not yet reported.
    dropped: AtomicU64,
    /// The `seq` of the last line handed to the kernel.
    written: watch::Sender<u64>,
    live: broadcast::Sender<AuditLine>,
}

#[expect(
    clippy::large_enum_variant,
    reason = "events are nearly all the messages; boxing them would only add an allocation"
)]
enum Msg {
    Event { at: SystemTime, event: Event },
    Flush(oneshot::Sender<()>),
}

impl Audit {
    /// Open (or continue) the audit log in `state_dir` with the given rotation size and number
    /// of rotated files kept, and start its writer.
    pub fn open(state_dir: &Path, max_bytes: u64, keep: usize) -> Result<Audit, AuditError> {
        Audit::open_with(
            state_dir,
            &AuditSettings {
                max_bytes,
                keep,
                ..AuditSettings::default()
            },
        )
    }

    /// [`Audit::open`] with all the settings.
    pub fn open_with(state_dir: &Path, settings: &AuditSettings) -> Result<Audit, AuditError> {
        let (audit, writer) = Audit::prepare(state_dir, settings)?;
        writer.spawn()?;
        Ok(audit)
    }

    /// An audit log that records nothing, for tests and tools that have no state directory.
    pub fn disabled() -> Audit {
        Audit { inner: None }
    }

    /// Whether events are written anywhere.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Record an event. Never blocks and never fails: if the writer is behind by a full queue
    /// the event is counted and reported by an `audit_dropped` line.
    pub fn record(&self, event: Event) {
        let Some(inner) = &self.inner else { return };
        let msg = Msg::Event {
            at: SystemTime::now(),
            event,
        };
        if inner.tx.try_send(msg).is_err() {
            inner.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wait until every event recorded before this call is written (or reported dropped).
    /// For shutdown and tests; returns at once when disabled or the writer has stopped.
    pub async fn flush(&self) {
        let Some(inner) = &self.inner else { return };
        let (ack, done) = oneshot::channel();
        if inner.tx.send(Msg::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// The state directory the log is in (`None` when disabled).
    pub fn dir(&self) -> Option<&Path> {
        self.inner.as_ref().map(|i| i.dir.as_path())
    }

    /// The id of this log: the relay keys what it stored by (agent, log id, seq). It changes
    /// only when the agent finds no earlier line to continue from.
    pub fn log_id(&self) -> Option<&str> {
        self.inner.as_ref().map(|i| i.log_id.as_str())
    }

    /// The `seq` of the last line written so far, updated after each batch: the relay link
    /// waits on it (`changed().await`) for new lines to read.
    pub fn written(&self) -> Option<watch::Receiver<u64>> {
        self.inner.as_ref().map(|i| i.shared.written.subscribe())
    }

    /// A reader of the lines with a `seq` above `after_seq`, in order, across rotations: the
    /// durable feed for the relay link (see the module documentation).
    pub fn reader(&self, after_seq: u64) -> Option<AuditReader> {
        self.inner
            .as_ref()
            .map(|i| AuditReader::new(&i.dir, after_seq))
    }

    /// A live copy of every line from now on, best effort: a receiver that falls behind by
    /// more than 1024 lines gets `Lagged`, and nothing is kept while nobody listens.
    pub fn subscribe(&self) -> Option<broadcast::Receiver<AuditLine>> {
        self.inner.as_ref().map(|i| i.shared.live.subscribe())
    }

    /// Open the files and build the handle and its writer, without starting the writer.
    fn prepare(state_dir: &Path, settings: &AuditSettings) -> Result<(Audit, Writer), AuditError> {
        let path = state_dir.join(FILE_NAME);
        let open_err = |error| AuditError::Open {
            path: path.clone(),
            error,
        };
        crate::paths::ensure_private_dir(state_dir).map_err(open_err)?;
        let last_seq = find_last_seq(state_dir);
        let log_id =
            load_log_id(state_dir, last_seq.is_some()).map_err(|error| AuditError::Open {
                path: state_dir.join(ID_FILE_NAME),
                error,
            })?;
        let (file, size) = open_log(&path).map_err(open_err)?;
        let next_seq = last_seq.unwrap_or(0) + 1;
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let (live, _) = broadcast::channel(BROADCAST);
        let shared = Arc::new(Shared {
            dropped: AtomicU64::new(0),
            written: watch::Sender::new(next_seq - 1),
            live,
        });
        let writer = Writer {
            path,
            dir: state_dir.to_path_buf(),
            settings: *settings,
            file: Some(file),
            size,
            next_seq,
            log_id: log_id.clone(),
            shared: shared.clone(),
            rx,
            buf: Vec::new(),
            pending: Vec::new(),
            write_errors: 0,
            failing: false,
            rotate_slack: 0,
        };
        let audit = Audit {
            inner: Some(Arc::new(Inner {
                tx,
                shared,
                dir: state_dir.to_path_buf(),
                log_id,
            })),
        };
        Ok((audit, writer))
    }
}

/// The writer thread's state.
struct Writer {
    path: PathBuf,
    dir: PathBuf,
    settings: AuditSettings,
    file: Option<File>,
    size: u64,
    next_seq: u64,
    log_id: String,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Msg>,
    /// Encoded lines not yet written, and their records for the broadcast.
    buf: Vec<u8>,
    pending: Vec<AuditLine>,
    /// Lines that could not be written, not yet reported.
    write_errors: u64,
    /// Whether the last write failed (to warn once per failure streak).
    failing: bool,
    /// Bytes the file may exceed `max_bytes` by after a failed rotation.
    rotate_slack: u64,
}

impl Writer {
    fn spawn(self) -> Result<(), AuditError> {
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || self.run())
            .map(|_| ())
            .map_err(AuditError::Spawn)
    }

    fn run(mut self) {
        let log = self.log_id.clone();
        let start = Meta::AuditStart {
            log: &log,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION"),
        };
        self.push(SystemTime::now(), &start, None);
        self.write_out();
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let Some(first) = self.rx.blocking_recv() else {
                break;
            };
            batch.push(first);
            while batch.len() < BATCH {
                match self.rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            for msg in batch.drain(..) {
                match msg {
                    Msg::Event { at, mut event } => {
                        let truncated = clip_event(&mut event, self.settings.command_chars);
                        self.push(at, &event, truncated.then_some(true));
                    }
                    Msg::Flush(ack) => {
                        self.write_out();
                        self.report_losses();
                        let _ = ack.send(());
                    }
                }
            }
            self.write_out();
            self.report_losses();
        }
        self.write_out();
        self.report_losses();
    }

    /// Encode one line and queue it, rotating first if it would not fit.
    fn push<B: Serialize>(&mut self, at: SystemTime, body: &B, truncated: Option<bool>) {
        let ts = rfc3339_millis(at);
        let line = Line {
            ts: &ts,
            seq: self.next_seq,
            body,
            truncated,
        };
        let Ok(text) = serde_json::to_string(&line) else {
            return;
        };
        let len = text.len() as u64 + 1;
        let used = self.size + self.buf.len() as u64;
        let limit = self.settings.max_bytes.saturating_add(self.rotate_slack);
        if used > 0 && used + len > limit {
            self.write_out();
            self.rotate();
        }
        self.buf.extend_from_slice(text.as_bytes());
        self.buf.push(b'\n');
        self.pending.push(AuditLine {
            seq: self.next_seq,
            line: text.into(),
        });
        self.next_seq += 1;
    }

    /// Write the queued lines in one `write`, publish them, and note failures.
    fn write_out(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let result = match self.file.as_mut() {
            Some(f) => f.write_all(&self.buf),
            None => match open_log(&self.path) {
                Ok((mut f, size)) => {
                    self.size = size;
                    let r = f.write_all(&self.buf);
                    self.file = Some(f);
                    r
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => {
                self.size += self.buf.len() as u64;
                if self.failing {
                    tracing::info!(path = %self.path.display(), "audit log writable again");
                    self.failing = false;
                }
            }
            Err(e) => {
                // A partial write may have left a torn line: start on a fresh line next time.
                self.file = None;
                self.write_errors += self.pending.len() as u64;
                if !self.failing {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot write the audit log; events are counted and still offered to the relay");
                    self.failing = true;
                }
            }
        }
        self.buf.clear();
        let last = self.pending.last().map(|l| l.seq);
        for line in self.pending.drain(..) {
            let _ = self.shared.live.send(line);
        }
        if let Some(seq) = last {
            self.shared.written.send_replace(seq);
        }
    }

    /// Write an `audit_dropped` line for each kind of loss since the last report.
    fn report_losses(&mut self) {
        let full = self.shared.dropped.swap(0, Ordering::Relaxed);
        if full > 0 {
            let meta = Meta::AuditDropped {
                count: full,
                reason: "queue_full",
            };
            self.push(SystemTime::now(), &meta, None);
        }
        // Lines lost to a failing disk are reported once it takes lines again.
        let failed = if self.failing {
            0
        } else {
            std::mem::take(&mut self.write_errors)
        };
        if failed > 0 {
            let meta = Meta::AuditDropped {
                count: failed,
                reason: "write_error",
            };
            self.push(SystemTime::now(), &meta, None);
        }
        self.write_out();
    }

    /// Shift the rotated files up by one and start a new `audit.jsonl`.
    fn rotate(&mut self) {
        self.file = None;
        match rotate_files(&self.dir, self.settings.keep) {
            Ok(()) => {
                self.size = 0;
                self.rotate_slack = 0;
            }
            Err(e) => {
                // Keep appending to the current file rather than lose events, and try again
                // after another `max_bytes` rather than at every line.
                self.rotate_slack = self.size;
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot rotate the audit log");
            }
        }
    }
}

/// `audit.jsonl` → `.1` → ... → `.{keep}`, deleting what falls off the end.
fn rotate_files(dir: &Path, keep: usize) -> io::Result<()> {
    for (n, path) in rotated_files(dir) {
        if n >= keep {
            remove_if_exists(&path)?;
        }
    }
    let current = dir.join(FILE_NAME);
    if keep == 0 {
        return remove_if_exists(&current);
    }
    for n in (1..keep).rev() {
        match std::fs::rename(rotated_path(dir, n), rotated_path(dir, n + 1)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::rename(&current, rotated_path(dir, 1))
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn rotated_path(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("{FILE_NAME}.{n}"))
}

/// The rotated files present, as (number, path), in no particular order.
fn rotated_files(dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let n = name
                .to_str()?
                .strip_prefix(FILE_NAME)?
                .strip_prefix('.')?
                .parse::<usize>()
                .ok()?;
            (n > 0).then(|| (n, e.path()))
        })
        .collect()
}

/// The log's files from oldest to newest, `audit.jsonl` last.
fn log_files_oldest_first(dir: &Path) -> Vec<PathBuf> {
    let mut rotated = rotated_files(dir);
    rotated.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    files.push(dir.join(FILE_NAME));
    files
}

/// Open `audit.jsonl` for appending, private, and make sure what follows starts a line.
fn open_log(path: &Path) -> io::Result<(File, u64)> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    let mut size = meta.len();
    if size > 0 {
        let mut last = [0u8; 1];
        file.read_exact_at(&mut last, size - 1)?;
        if last[0] != b'\n' {
            // A line torn by a crash: end it, so the next line stands on its own.
            file.write_all(b"\n")?;
            size += 1;
        }
    }
    Ok((file, size))
}

/// The id of the log: kept when continuing an earlier log, new otherwise.
fn load_log_id(dir: &Path, continuing: bool) -> io::Result<String> {
    let path = dir.join(ID_FILE_NAME);
    if continuing
        && let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(id) = uuid::Uuid::parse_str(text.trim())
    {
        return Ok(id.to_string());
    }
    let id = uuid::Uuid::new_v4().to_string();
    crate::paths::write_private_atomic(&path, format!("{id}\n").as_bytes())?;
    Ok(id)
}

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

fn parse_seq(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<SeqOnly>(line).ok().map(|s| s.seq)
}

/// The `seq` of the newest line in the files, if any.
fn find_last_seq(dir: &Path) -> Option<u64> {
    log_files_oldest_first(dir)
        .iter()
        .rev()
        .find_map(|p| last_seq_in(p))
}

fn last_seq_in(path: &Path) -> Option<u64> {
    let file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let start = len.saturating_sub(CHUNK as u64);
    let mut tail = vec![0u8; (len - start) as usize];
    file.read_exact_at(&mut tail, start).ok()?;
    tail.split(|b| *b == b'\n').rev().find_map(parse_seq)
}

/// The `seq` of the first line of a file that has one (within its first 64 KiB).
fn first_seq_in(file: &File) -> Option<u64> {
    let mut head = vec![0u8; CHUNK];
    let n = read_at_most(file, &mut head, 0).ok()?;
    head.truncate(n);
    let complete = head.iter().rposition(|b| *b == b'\n')?;
    head[..complete].split(|b| *b == b'\n').find_map(parse_seq)
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A file's identity: device, inode and the `seq` of its first line (inodes are reused).
type FileKey = (u64, u64, Option<u64>);

/// Reads the log's lines after a given `seq`, in order, following rotations. Its methods do
/// blocking file I/O: call them from `spawn_blocking` (or a thread).
#[derive(Debug)]
pub struct AuditReader {
    dir: PathBuf,
    last: u64,
    cur: Option<Cursor>,
    /// Rotated files already read to the end (a rotated file never grows again).
    done: VecDeque<FileKey>,
}

#[derive(Debug)]
struct Cursor {
    file: File,
    dev: u64,
    ino: u64,
    pos: u64,
    /// The bytes up to the next newline are the rest of an overlong (foreign) line.
    skip_partial: bool,
}

impl AuditReader {
    fn new(dir: &Path, after_seq: u64) -> AuditReader {
        AuditReader {
            dir: dir.to_path_buf(),
            last: after_seq,
            cur: None,
            done: VecDeque::new(),
        }
    }

    /// The `seq` of the last line returned (or the starting point).
    pub fn last_seq(&self) -> u64 {
        self.last
    }

    /// Up to `max_lines` lines with a `seq` above the last one returned, oldest first; empty
    /// when there is nothing new yet (wait on [`Audit::written`], then call again). A `seq`
    /// that jumps tells how many lines were lost (rotated away before they were read, or not
    /// writable); lines that are not the log's own (torn, foreign) are skipped.
    pub fn next_batch(&mut self, max_lines: usize) -> io::Result<Vec<AuditLine>> {
        let max_lines = max_lines.max(1);
        let mut out = Vec::new();
        // Each turn either fills the batch, stops at the live file, or finishes a rotated
        // file; there are only so many files.
        for _ in 0..rotated_files(&self.dir).len() + 3 {
            if self.cur.is_none() {
                self.cur = self.locate()?;
            }
            let Some(cur) = self.cur.as_mut() else { break };
            read_lines(cur, &mut self.last, &mut out, max_lines)?;
            if out.len() >= max_lines {
                break;
            }
            let live = std::fs::metadata(self.dir.join(FILE_NAME))
                .map(|m| m.dev() == cur.dev && m.ino() == cur.ino)
                .unwrap_or(false);
            if live {
                break;
            }
            // Rotated away: read what was appended before the rename, then move on.
            read_lines(cur, &mut self.last, &mut out, max_lines)?;
            if out.len() >= max_lines {
                break;
            }
            let key = (cur.dev, cur.ino, first_seq_in(&cur.file));
            if self.done.len() >= 64 {
                self.done.pop_front();
            }
            self.done.push_back(key);
            self.cur = None;
        }
        Ok(out)
    }

    /// The file holding the line after `last`: the newest file starting at or before it;
    /// else the oldest left (those lines are lost); else the live file.
    fn locate(&self) -> io::Result<Option<Cursor>> {
        let mut candidates = Vec::new();
        for path in log_files_oldest_first(&self.dir) {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let meta = file.metadata()?;
            let first = first_seq_in(&file);
            if self.done.contains(&(meta.dev(), meta.ino(), first)) {
                continue;
            }
            let live = path.file_name().is_some_and(|n| n == FILE_NAME);
            candidates.push((file, meta, first, live));
        }
        let wanted = self.last.saturating_add(1);
        let chosen = match candidates
            .iter()
            .rposition(|(_, _, first, _)| first.is_some_and(|f| f <= wanted))
        {
            Some(i) => Some(i),
            None => candidates
                .iter()
                .position(|(_, _, first, _)| first.is_some())
                .or_else(|| candidates.iter().position(|(_, _, _, live)| *live)),
        };
        Ok(chosen.map(|i| {
            let (file, meta, _, _) = candidates.swap_remove(i);
            Cursor {
                file,
                dev: meta.dev(),
                ino: meta.ino(),
                pos: 0,
                skip_partial: false,
            }
        }))
    }
}

/// Read complete lines from the cursor until its end or `max` lines are in `out`, keeping
/// those above `last`.
fn read_lines(
    cur: &mut Cursor,
    last: &mut u64,
    out: &mut Vec<AuditLine>,
    max: usize,
) -> io::Result<()> {
    let mut chunk = vec![0u8; CHUNK];
    while out.len() < max {
        let n = read_at_most(&cur.file, &mut chunk, cur.pos)?;
        if n == 0 {
            break;
        }
        let data = &chunk[..n];
        let Some(end) = data.iter().rposition(|b| *b == b'\n') else {
            if n == CHUNK {
                // Not one of ours (lines are far shorter): skip it to its end.
                cur.pos += n as u64;
                cur.skip_partial = true;
                continue;
            }
            break; // a line still being written
        };
        let mut offset = 0;
        for raw in data[..end].split(|b| *b == b'\n') {
            let consumed = raw.len() + 1;
            if std::mem::take(&mut cur.skip_partial) {
                offset += consumed;
                continue;
            }
            if let Some(seq) = parse_seq(raw)
                && seq > *last
                && let Ok(text) = std::str::from_utf8(raw)
            {
                out.push(AuditLine {
                    seq,
                    line: text.into(),
                });
                *last = seq;
            }
            offset += consumed;
            if out.len() >= max {
                break;
            }
        }
        cur.pos += offset as u64;
    }
    Ok(())
}

/// Cut every free-text field to its cap; returns whether the command line was cut.
fn clip_event(event: &mut Event, command_chars: usize) -> bool {
    match event {
        Event::Connection { peer, local, .. } => {
            clip(peer, TEXT_CHARS);
            clip(local, TEXT_CHARS);
            false
        }
        Event::Auth {
            peer,
            account,
            method,
            reason,
            ..
        } => {
            clip(peer, TEXT_CHARS);
            clip(account, TEXT_CHARS);
            clip(method, TEXT_CHARS);
            clip_opt(reason, REASON_CHARS);
            false
        }
        Event::Session {
            session,
            account,
            endpoint,
            peer,
            ..
        } => {
            clip(session, TEXT_CHARS);
            clip(account, TEXT_CHARS);
            clip(endpoint, TEXT_CHARS);
            clip_opt(peer, TEXT_CHARS);
            false
        }
        Event::Command {
            session,
            peer,
            account,
            endpoint,
            command,
            signal,
            reason,
            ..
        } => {
            clip_opt(session, TEXT_CHARS);
            clip_opt(peer, TEXT_CHARS);
            clip(account, TEXT_CHARS);
            clip(endpoint, TEXT_CHARS);
            clip_opt(signal, TEXT_CHARS);
            clip_opt(reason, REASON_CHARS);
            if command_chars == 0 {
                command.clear();
                false
            } else {
                clip(command, command_chars)
            }
        }
        Event::Refused {
            account,
            endpoint,
            reason,
            peer,
            ..
        } => {
            clip(account, TEXT_CHARS);
            clip(endpoint, TEXT_CHARS);
            clip(reason, REASON_CHARS);
            clip_opt(peer, TEXT_CHARS);
            false
        }
    }
}

/// Cut `s` to at most `max` characters; returns whether it was cut.
fn clip(s: &mut String, max: usize) -> bool {
    match s.char_indices().nth(max) {
        Some((at, _)) => {
            s.truncate(at);
            true
        }
        None => false,
    }
}

fn clip_opt(s: &mut Option<String>, max: usize) {
    if let Some(s) = s {
        clip(s, max);
    }
}

/// `t` as RFC 3339 UTC with milliseconds: `2026-11-21T17:00:00.123Z` (times before 1970 are
/// written as the epoch).
pub fn rfc3339_millis(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::BTreeSet;
    use std::time::Duration;

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect()
    }

    fn keys(v: &Value) -> BTreeSet<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    fn command(n: usize) -> Event {
        Event::Command {
            session: Some(format!("s{n}")),
            peer: None,
            account: "alice".into(),
            endpoint: "default".into(),
            transport: Transport::Ssh,
            command: format!("echo {n}"),
            exit_code: Some(0),
            signal: None,
            bytes_out: 2,
            duration_ms: 1,
            reason: None,
        }
    }

    fn all_kinds() -> Vec<Event> {
        vec![
            Event::Connection {
                transport: Transport::Ssh,
                peer: "10.0.0.7:51234".into(),
                local: "10.0.0.5:2222".into(),
            },
            Event::Auth {
                transport: Transport::Winrm,
                peer: "10.0.0.7:51235".into(),
                account: "bob".into(),
                method: "basic".into(),
                success: false,
                reason: Some("bad password".into()),
            },
            Event::Auth {
                transport: Transport::Ssh,
                peer: "10.0.0.7:51234".into(),
                account: "alice".into(),
                method: "publickey".into(),
                success: true,
                reason: None,
            },
            Event::Session {
                action: SessionAction::Open,
                session: "0190f0c2".into(),
                account: "alice".into(),
                endpoint: "default".into(),
                transport: Transport::Relay,
                peer: None,
            },
            Event::Command {
                session: Some("0190f0c2".into()),
                peer: Some("10.0.0.7:51234".into()),
                account: "alice".into(),
                endpoint: "default".into(),
                transport: Transport::Ssh,
                command: "df -h".into(),
                exit_code: Some(0),
                signal: None,
                bytes_out: 812,
                duration_ms: 14,
                reason: None,
            },
            Event::Refused {
                account: "bob".into(),
                endpoint: "default".into(),
                transport: Transport::Winrms,
                reason: "access denied: user 'bob' may not use endpoint 'default'".into(),
                peer: Some("10.0.0.7:51236".into()),
            },
        ]
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_millis() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms);
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(at(1_795_280_400, 123)),
            "2026-11-21T17:00:00.123Z"
        );
        assert_eq!(
            rfc3339_millis(at(951_868_799, 999)),
            "2000-02-29T23:59:59.999Z"
        );
        assert_eq!(
            rfc3339_millis(at(946_684_799, 0)),
            "1999-12-31T23:59:59.000Z"
        );
        assert_eq!(
            rfc3339_millis(at(4_107_542_400, 5)),
            "2100-03-01T00:00:00.005Z"
        );
        assert_eq!(
            rfc3339_millis(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[tokio::test]
    async fn lines_are_json_with_the_documented_keys() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        for e in all_kinds() {
            audit.record(e);
        }
        audit.flush().await;
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        let got = lines(&dir.path().join(FILE_NAME));
        assert_eq!(got.len(), 7, "{text}");
        let base = ["ts", "seq", "event"];
        let with = |k: &[&'static str]| -> BTreeSet<&'static str> {
            base.iter().chain(k).copied().collect()
        };
        assert_eq!(keys(&got[0]), with(&["log", "pid", "version"]));
        assert_eq!(got[0]["event"], "audit_start");
        assert_eq!(got[0]["log"], audit.log_id().unwrap());
        assert_eq!(got[1]["event"], "connection");
        assert_eq!(keys(&got[1]), with(&["transport", "peer", "local"]));
        assert_eq!(got[2]["event"], "auth");
        assert_eq!(
            keys(&got[2]),
            with(&[
                "transport",
                "peer",
                "account",
                "method",
                "success",
                "reason"
            ])
        );
        assert_eq!(got[2]["success"], false);
        assert_eq!(got[2]["transport"], "winrm");
        assert_eq!(
            keys(&got[3]),
            with(&["transport", "peer", "account", "method", "success"])
        );
        assert_eq!(got[4]["event"], "session");
        assert_eq!(got[4]["action"], "open");
        assert_eq!(
            keys(&got[4]),
            with(&["action", "session", "account", "endpoint", "transport"])
        );
        assert_eq!(got[5]["event"], "command");
        assert_eq!(
            keys(&got[5]),
            with(&[
                "session",
                "peer",
                "account",
                "endpoint",
                "transport",
                "command",
                "exit_code",
                "bytes_out",
                "duration_ms"
            ])
        );
        assert_eq!(got[5]["bytes_out"], 812);
        assert_eq!(got[6]["event"], "refused");
        assert_eq!(
            keys(&got[6]),
            with(&["account", "endpoint", "transport", "reason", "peer"])
        );
        // ts first, then seq, then event; seq counts lines.
        for (i, l) in text.lines().enumerate() {
            assert!(l.starts_with("{\"ts\":\""), "{l}");
            assert!(
                l.contains(&format!(",\"seq\":{},\"event\":\"", i + 1)),
                "{l}"
            );
            let ts = serde_json::from_str::<Value>(l).unwrap()["ts"]
                .as_str()
                .unwrap()
                .to_owned();
            assert_eq!(ts.len(), 24, "{ts}");
            assert!(ts.ends_with('Z'));
        }
    }

    #[tokio::test]
    async fn secrets_are_not_written_and_commands_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        audit.record(Event::Auth {
            transport: Transport::Winrm,
            peer: "10.0.0.7:1".into(),
            account: "x".repeat(5000),
            method: "ntlm".into(),
            success: false,
            reason: Some("bad password".into()),
        });
        let mut long = command(1);
        if let Event::Command { command, .. } = &mut long {
            *command = "é".repeat(5000);
        }
        audit.record(long);
        audit.record(Event::Refused {
            account: "a\n{\"event\":\"forged\"}".into(),
            endpoint: "e".into(),
            transport: Transport::Local,
            reason: "r".into(),
            peer: None,
        });
        audit.flush().await;
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(
            text.lines().count(),
            4,
            "a newline in a field cannot forge a line"
        );
        let got = lines(&dir.path().join(FILE_NAME));
        for l in &got {
            for k in keys(l) {
                for secret in ["password", "secret", "hash", "token", "key", "credential"] {
                    assert!(!k.contains(secret), "key {k} in {l}");
                }
            }
        }
        assert_eq!(got[1]["account"].as_str().unwrap().len(), TEXT_CHARS);
        assert_eq!(got[2]["command"].as_str().unwrap().chars().count(), 1024);
        assert_eq!(got[2]["truncated"], true);
        assert_eq!(got[3]["account"], "a\n{\"event\":\"forged\"}");
    }

    #[tokio::test]
    async fn command_lines_can_be_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let s = AuditSettings {
            command_chars: 0,
            ..AuditSettings::default()
        };
        let audit = Audit::open_with(dir.path(), &s).unwrap();
        audit.record(command(1));
        audit.flush().await;
        let got = lines(&dir.path().join(FILE_NAME));
        assert_eq!(got[1]["event"], "command");
        assert!(got[1].get("command").is_none());
        assert!(got[1].get("truncated").is_none());
    }

    #[tokio::test]
    async fn rotation_keeps_keep_files_and_the_newest_lines_in_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let max = 2000;
        let audit = Audit::open(dir.path(), max, 2).unwrap();
        for i in 0..200 {
            audit.record(command(i));
        }
        audit.flush().await;
        let d = dir.path();
        assert!(d.join("audit.jsonl.1").exists());
        assert!(d.join("audit.jsonl.2").exists());
        assert!(!d.join("audit.jsonl.3").exists());
        let mut seqs = Vec::new();
        for name in ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"] {
            let p = d.join(name);
            assert!(
                std::fs::metadata(&p).unwrap().len() <= max,
                "{name} too big"
            );
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
            seqs.extend(lines(&p).iter().map(|l| l["seq"].as_u64().unwrap()));
        }
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        let current = lines(&d.join(FILE_NAME));
        let newest = current.last().unwrap();
        assert_eq!(newest["session"], "s199");
        assert_eq!(newest["seq"], 201);
        assert_eq!(*audit.written().unwrap().borrow(), 201);
    }

    #[tokio::test]
    async fn keep_zero_keeps_only_the_current_file() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), 1000, 0).unwrap();
        for i in 0..50 {
            audit.record(command(i));
        }
        audit.flush().await;
        assert!(!dir.path().join("audit.jsonl.1").exists());
        let current = lines(&dir.path().join(FILE_NAME));
        assert_eq!(current.last().unwrap()["session"], "s49");
    }

    #[tokio::test]
    async fn the_file_is_private_even_if_it_was_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let audit = Audit::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        audit.flush().await;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let other = tempfile::tempdir().unwrap();
        let audit = Audit::open(other.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        audit.flush().await;
        let meta = std::fs::metadata(other.path().join(FILE_NAME)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[tokio::test]
    async fn a_full_queue_is_reported_by_an_audit_dropped_line() {
        let dir = tempfile::tempdir().unwrap();
        let s = AuditSettings {
            queue: 2,
            ..AuditSettings::default()
        };
        let (audit, writer) = Audit::prepare(dir.path(), &s).unwrap();
        for i in 0..10 {
            audit.record(command(i)); // the writer is not running: 2 fit, 8 are dropped
        }
        writer.spawn().unwrap();
        audit.flush().await;
        let got = lines(&dir.path().join(FILE_NAME));
        let events: Vec<&str> = got.iter().map(|l| l["event"].as_str().unwrap()).collect();
        assert_eq!(
            events,
            ["audit_start", "command", "command", "audit_dropped"]
        );
        assert_eq!(got[3]["count"], 8);
        assert_eq!(got[3]["reason"], "queue_full");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_records_all_arrive_intact() {
        let dir = tempfile::tempdir().unwrap();
        let s = AuditSettings {
            max_bytes: 64 * 1024,
            keep: 100,
            queue: 20_000,
            ..AuditSettings::default()
        };
        let audit = Audit::open_with(dir.path(), &s).unwrap();
        let mut tasks = Vec::new();
        for t in 0..32 {
            let audit = audit.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200 {
                    let mut e = command(i);
                    if let Event::Command { command, .. } = &mut e {
                        *command = format!("task {t} event {i} {}", "x".repeat(300));
                    }
                    audit.record(e);
                    if i % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        audit.flush().await;
        let mut seen = BTreeSet::new();
        let mut seqs = Vec::new();
        for path in log_files_oldest_first(dir.path()) {
            for l in lines(&path) {
                seqs.push(l["seq"].as_u64().unwrap());
                if l["event"] == "command" {
                    assert!(seen.insert(l["command"].as_str().unwrap().to_owned()));
                }
                assert_ne!(l["event"], "audit_dropped");
            }
        }
        assert_eq!(seen.len(), 32 * 200);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[tokio::test]
    async fn a_restart_continues_the_log_and_its_seq() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        audit.record(command(1));
        audit.flush().await;
        let id = audit.log_id().unwrap().to_owned();
        drop(audit);
        // A crash left a torn line.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE_NAME))
            .unwrap();
        f.write_all(b"{\"ts\":\"2026-").unwrap();
        drop(f);
        let audit = Audit::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        assert_eq!(audit.log_id().unwrap(), id);
        audit.record(command(2));
        audit.flush().await;
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        let parsed: Vec<Option<u64>> = text.lines().map(|l| parse_seq(l.as_bytes())).collect();
        assert_eq!(parsed, [Some(1), Some(2), None, Some(3), Some(4)]);
        // Erased files start a new log.
        drop(audit);
        for p in log_files_oldest_first(dir.path()) {
            std::fs::remove_file(p).unwrap();
        }
        let audit = Audit::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        assert_ne!(audit.log_id().unwrap(), id);
    }

    #[tokio::test]
    async fn the_reader_follows_rotations_from_a_seq() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), 1500, 50).unwrap();
        for i in 0..100 {
            audit.record(command(i));
        }
        audit.flush().await;
        let mut reader = audit.reader(30).unwrap();
        let mut got = Vec::new();
        loop {
            let batch = reader.next_batch(7).unwrap();
            if batch.is_empty() {
                break;
            }
            got.extend(batch);
        }
        let seqs: Vec<u64> = got.iter().map(|l| l.seq).collect();
        assert_eq!(seqs, (31..=101).collect::<Vec<_>>());
        assert!(got[0].line.contains("\"seq\":31,"));
        // New lines, across more rotations, are picked up where it stopped.
        let mut written = audit.written().unwrap();
        for i in 100..160 {
            audit.record(command(i));
        }
        audit.flush().await;
        assert!(written.has_changed().unwrap());
        written.borrow_and_update();
        let mut more = Vec::new();
        loop {
            let batch = reader.next_batch(1000).unwrap();
            if batch.is_empty() {
                break;
            }
            more.extend(batch.into_iter().map(|l| l.seq));
        }
        assert_eq!(more, (102..=161).collect::<Vec<_>>());
        assert_eq!(reader.last_seq(), 161);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_keeps_up_with_a_writer_that_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), 20_000, 100).unwrap();
        let mut reader = audit.reader(0).unwrap();
        let mut written = audit.written().unwrap();
        let producer = {
            let audit = audit.clone();
            tokio::spawn(async move {
                for i in 0..3000 {
                    audit.record(command(i));
                    if i % 100 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                audit.flush().await;
            })
        };
        let target = 3001; // audit_start and 3000 commands
        let mut seqs = Vec::new();
        while reader.last_seq() < target {
            let (r, batch) = tokio::task::spawn_blocking(move || {
                let batch = reader.next_batch(97).unwrap();
                (reader, batch)
            })
            .await
            .unwrap();
            reader = r;
            if batch.is_empty() {
                let _ = tokio::time::timeout(Duration::from_millis(50), written.changed()).await;
            }
            seqs.extend(batch.iter().map(|l| l.seq));
        }
        producer.await.unwrap();
        assert_eq!(seqs, (1..=target).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn the_reader_reports_lost_lines_as_a_jump() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), 1500, 1).unwrap();
        for i in 0..100 {
            audit.record(command(i));
        }
        audit.flush().await;
        let mut reader = audit.reader(0).unwrap();
        let batch = reader.next_batch(10_000).unwrap();
        assert!(batch[0].seq > 1, "the oldest lines were rotated away");
        assert!(batch.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        assert_eq!(batch.last().unwrap().seq, 101);
    }

    #[tokio::test]
    async fn subscribers_get_each_line() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        audit.flush().await;
        let mut rx = audit.subscribe().unwrap();
        audit.record(command(7));
        let got = rx.recv().await.unwrap();
        assert_eq!(got.seq, 2);
        let v: Value = serde_json::from_str(&got.line).unwrap();
        assert_eq!(v["session"], "s7");
    }

    #[tokio::test]
    async fn disabled_records_nothing() {
        let audit = Audit::disabled();
        audit.record(command(1));
        audit.flush().await;
        assert!(!audit.is_enabled());
        assert!(audit.reader(0).is_none());
        assert!(audit.subscribe().is_none());
        assert!(audit.log_id().is_none());
    }
}
