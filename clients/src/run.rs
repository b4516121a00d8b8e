//! `remote run`: one command on many targets at once. Each target gets its own tokio task
//! and connection (SSH, or WinRM for `winrm://`/`winrms://` targets: a shell of its own,
//! deleted after the command; `relay://AGENT` targets share one connection to the relay,
//! which runs the command there in a session of its own); a semaphore keeps at most `throttle` of them going. With one target
//! the output passes through unchanged and stdin is forwarded; with several, every line is
//! prefixed `label: ` and stdin is not read (the commands see EOF at once); `--json`
//! collects everything into one JSON object per target instead.
//!
//! Interrupts ([`Interrupt`]) reach the remote commands as SSH `signal` requests (INT), or
//! WinRM `ctrl_c` signals; targets still connecting when one arrives give up before starting
//! the command.
//!
//! In JSON, `exit_code` is the code `remote` would report for that target (the status, or
//! 128 + signal number when `signal` is set); it and `signal` are `null` when `error` is set.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use russh::Sig;
use thiserror::Error;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::output::{LinePrefixer, Output, Stream};
use crate::relay::{RelayClient, RelayError};
use crate::ssh::{Client, Exit, ProcessEvent, ProcessInput, SshError};
use crate::target::Target;
use crate::winrm::{self, WinrmError};

/// Why a target could not run the command.
#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(transparent)]
    Winrm(#[from] WinrmError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error("{agent} (via relay): {message}")]
    RelayRun { agent: String, message: String },
    #[error(
        "{agent} (via relay): interrupted before the command ended; it may still be running there"
    )]
    RelayInterrupted { agent: String },
}

/// The clients for each transport, shared by all targets.
#[derive(Clone)]
pub struct Clients {
    pub ssh: Arc<Client>,
    pub winrm: Arc<winrm::Client>,
    /// The relay, when a target is `relay://`.
    pub relay: Option<RelayClient>,
}

/// How output is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// Unchanged, binary-safe (one target).
    Passthrough,
    /// `label: line` (several targets).
    Prefixed,
    /// Collected; one JSON object per target at the end.
    Json,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// At most this many targets at once (≥ 1).
    pub throttle: usize,
    pub mode: OutputMode,
    /// Forward local stdin to the command (one target only); otherwise it gets EOF.
    pub forward_stdin: bool,
    /// The agents' endpoint (session configuration) to run on; `None`: their default.
    pub endpoint: Option<String>,
}

/// Ctrl+C, shared between the signal handler and the running targets.
pub struct Interrupt {
    count: watch::Sender<u64>,
    started: AtomicUsize,
}

impl Interrupt {
    pub fn new() -> Arc<Interrupt> {
        Arc::new(Interrupt {
            count: watch::Sender::new(0),
            started: AtomicUsize::new(0),
        })
    }

    /// Send INT to every running command; stop targets that have not started yet.
    pub fn fire(&self) {
        self.count.send_modify(|n| *n += 1);
    }

    pub fn fired(&self) -> bool {
        *self.count.borrow() > 0
    }

    /// How many remote commands have been started (0: nothing to interrupt remotely).
    pub fn commands_started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// A receiver that wakes on each interrupt from now on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.count.subscribe()
    }

    /// Count a started command (for front ends driving [`crate::ssh`] directly).
    pub fn command_started(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
    }
}

/// The result for one target.
#[derive(Debug)]
pub struct TargetResult {
    pub target: Target,
    pub outcome: Result<Exit, RunError>,
    /// Collected output (JSON mode only).
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl TargetResult {
    /// The exit code for this target: the command's, or 255 when it could not be run.
    pub fn exit_code(&self) -> i32 {
        match &self.outcome {
            Ok(exit) => exit.code(),
            Err(_) => 255,
        }
    }

    /// `label: exit 3`, `label: exit 130 (signal INT)`, `label: error: …`.
    pub fn summary(&self) -> String {
        let label = self.target.label();
        match &self.outcome {
            Ok(exit @ Exit::Code(_)) => format!("{label}: exit {}", exit.code()),
            Ok(exit @ Exit::Signal { name, core_dumped }) => format!(
                "{label}: exit {} (signal {name}{})",
                exit.code(),
                if *core_dumped { ", core dumped" } else { "" }
            ),
            Err(e) => format!("{label}: error: {e}"),
        }
    }

    /// One JSON object: {"target","exit_code","signal","stdout","stderr","error"}.
    pub fn to_json(&self) -> String {
        let (code, signal, error) = match &self.outcome {
            Ok(exit) => (
                exit.code().to_string(),
                exit.signal().map_or("null".into(), json_string),
                "null".to_string(),
            ),
            Err(e) => ("null".into(), "null".into(), json_string(&e.to_string())),
        };
        format!(
            "{{\"target\":{},\"exit_code\":{code},\"signal\":{signal},\"stdout\":{},\"stderr\":{},\"error\":{error}}}",
            json_string(&self.target.spec),
            json_string(&String::from_utf8_lossy(&self.stdout)),
            json_string(&String::from_utf8_lossy(&self.stderr)),
        )
    }
}

/// The first non-zero exit code in target order, or 0.
pub fn overall_exit_code(results: &[TargetResult]) -> i32 {
    results
        .iter()
        .map(TargetResult::exit_code)
        .find(|&c| c != 0)
        .unwrap_or(0)
}

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The command line sent to the targets: a single argument as-is (so it can be a
/// pipeline); otherwise the command followed by each argument, shell-quoted when needed
/// (`echo 'a b'` prints `a b` remotely).
pub fn command_line(args: &[OsString]) -> Vec<u8> {
    let mut line = Vec::new();
    let mut it = args.iter();
    if let Some(first) = it.next() {
        line.extend_from_slice(first.as_bytes());
    }
    for arg in it {
        line.push(b' ');
        line.extend_from_slice(&shell_quote(arg.as_bytes()));
    }
    line
}

/// POSIX shell quoting: unchanged when only safe characters, else in single quotes.
pub fn shell_quote(arg: &[u8]) -> Vec<u8> {
    let safe = |b: &u8| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(b);
    if !arg.is_empty() && arg.iter().all(safe) {
        return arg.to_vec();
    }
    let mut q = Vec::with_capacity(arg.len() + 2);
    q.push(b'\'');
    for &b in arg {
        if b == b'\'' {
            q.extend_from_slice(b"'\\''");
        } else {
            q.push(b);
        }
    }
    q.push(b'\'');
    q
}

/// Run `command` on every target; results in target order.
pub async fn run(
    clients: Clients,
    targets: Vec<Target>,
    command: Vec<u8>,
    options: RunOptions,
    interrupt: Arc<Interrupt>,
    output: Output,
) -> Vec<TargetResult> {
    let command: Arc<[u8]> = command.into();
    let endpoint: Option<Arc<str>> = options.endpoint.map(Into::into);
    let permits = Arc::new(Semaphore::new(options.throttle.max(1)));
    let mut tasks = Vec::with_capacity(targets.len());
    for target in targets {
        let job = Job {
            clients: clients.clone(),
            command: command.clone(),
            mode: options.mode,
            forward_stdin: options.forward_stdin,
            endpoint: endpoint.clone(),
            interrupt: interrupt.clone(),
            output: output.clone(),
        };
        let permits = permits.clone();
        let spawned_target = target.clone();
        let task = tokio::spawn(async move {
            // Fair semaphore: targets start in the order given.
            let _permit = permits.acquire_owned().await;
            job.run(spawned_target).await
        });
        tasks.push((target, task));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for (target, task) in tasks {
        results.push(match task.await {
            Ok(r) => r,
            Err(e) => TargetResult {
                outcome: Err(RunError::Ssh(SshError::Internal {
                    addr: target.host_port(),
                    detail: e.to_string(),
                })),
                target,
                stdout: Vec::new(),
                stderr: Vec::new(),
            },
        });
    }
    output.flush().await;
    results
}

struct Job {
    clients: Clients,
    command: Arc<[u8]>,
    mode: OutputMode,
    forward_stdin: bool,
    endpoint: Option<Arc<str>>,
    interrupt: Arc<Interrupt>,
    output: Output,
}

impl Job {
    async fn run(self, target: Target) -> TargetResult {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let outcome = if target.is_winrm() {
            self.drive_winrm(&target, &mut stdout, &mut stderr)
                .await
                .map_err(RunError::from)
        } else if target.is_relay() {
            self.drive_relay(&target, &mut stdout, &mut stderr).await
        } else {
            self.drive(&target, &mut stdout, &mut stderr)
                .await
                .map_err(RunError::from)
        };
        TargetResult {
            target,
            outcome,
            stdout,
            stderr,
        }
    }

    async fn drive(
        &self,
        target: &Target,
        stdout: &mut Vec<u8>,
        stderr: &mut Vec<u8>,
    ) -> Result<Exit, SshError> {
        let interrupted = || SshError::Interrupted {
            addr: target.host_port(),
        };
        let mut intr = self.interrupt.subscribe();
        if self.interrupt.fired() {
            return Err(interrupted());
        }
        let conn = tokio::select! {
            c = self.clients.ssh.connect(target) => c?,
            _ = intr.changed() => return Err(interrupted()),
        };
        if self.interrupt.fired() {
            conn.disconnect().await;
            return Err(interrupted());
        }
        let mut process = conn.exec(&self.command, self.endpoint.as_deref()).await?;
        self.interrupt.command_started();
        let input = process.input();
        if self.forward_stdin {
            forward_stdin(input.clone());
        } else {
            let _ = input.eof().await;
        }
        let mut prefixer = LinePrefixer::new(&target.label());
        loop {
            tokio::select! {
                event = process.next_event() => {
                    let event = match event {
                        Ok(Some(e)) => e,
                        Ok(None) => break,
                        Err(e) => {
                            let _ = input.close().await;
                            conn.disconnect().await;
                            return Err(e);
                        }
                    };
                    self.emit(event, &mut prefixer, stdout, stderr).await;
                }
                Ok(()) = intr.changed() => {
                    tracing::debug!(target = %target, "sending INT");
                    let _ = input.signal(Sig::INT).await;
                }
            }
        }
        self.finish_lines(&mut prefixer).await;
        conn.disconnect().await;
        process.finish()
    }

    /// The same over WinRM: a shell of its own, the command, its output until it is done,
    /// then the shell is deleted.
    async fn drive_winrm(
        &self,
        target: &Target,
        stdout: &mut Vec<u8>,
        stderr: &mut Vec<u8>,
    ) -> Result<Exit, WinrmError> {
        let interrupted = || WinrmError::Interrupted {
            addr: target.host_port(),
        };
        let mut intr = self.interrupt.subscribe();
        if self.interrupt.fired() {
            return Err(interrupted());
        }
        let line = String::from_utf8_lossy(&self.command).into_owned();
        let stdin = if self.forward_stdin {
            winrm::Stdin::Open
        } else {
            winrm::Stdin::Closed
        };
        let client = self.clients.winrm.clone();
        let shell = winrm::soap::ShellOptions {
            endpoint: self.endpoint.as_deref().map(String::from),
            ..Default::default()
        };
        let start = async {
            let conn = client.connect(target).await?;
            winrm::RemoteCommand::start(
                client.clone(),
                target,
                conn,
                winrm::command::Shell::New(&shell),
                &line,
                stdin,
                winrm::Cleanup::DeleteShell,
            )
            .await
        };
        let mut process = tokio::select! {
            p = start => p?,
            _ = intr.changed() => return Err(interrupted()),
        };
        self.interrupt.command_started();
        let input = process.input();
        if self.forward_stdin {
            let mut chunks = stdin_chunks();
            let input = input.clone();
            tokio::spawn(async move {
                while let Some(data) = chunks.recv().await {
                    input.data(data);
                }
                input.eof();
            });
        }
        let mut prefixer = LinePrefixer::new(&target.label());
        loop {
            tokio::select! {
                event = process.next_event() => match event {
                    Some(event) => self.emit(event, &mut prefixer, stdout, stderr).await,
                    None => break,
                },
                Ok(()) = intr.changed() => {
                    tracing::debug!(target = %target, "sending ctrl_c");
                    input.ctrl_c();
                }
            }
        }
        self.finish_lines(&mut prefixer).await;
        process.finish()
    }

    /// Through the relay: the command in a session of its own on the agent, its output and
    /// exit streamed back. Local stdin (one target) is read to its end first and given to
    /// the command; an interrupt stops following (the relay's Run has no signal).
    async fn drive_relay(
        &self,
        target: &Target,
        stdout: &mut Vec<u8>,
        stderr: &mut Vec<u8>,
    ) -> Result<Exit, RunError> {
        use remote_proto::relay::run_event::Event;
        use remote_proto::session::Stream as S;
        let agent = target.host.clone();
        let Some(client) = &self.clients.relay else {
            return Err(RelayError::NoRelay {
                what: format!("target {}", target.spec),
            }
            .into());
        };
        let mut stdin = Vec::new();
        if self.forward_stdin && !crate::terminal::stdin_is_tty() {
            let mut chunks = stdin_chunks();
            while let Some(c) = chunks.recv().await {
                stdin.extend_from_slice(&c);
                if stdin.len() > MAX_RELAY_STDIN {
                    return Err(RunError::RelayRun {
                        agent,
                        message: format!(
                            "stdin is larger than {} MiB, the most a relay run takes: copy the data there first",
                            MAX_RELAY_STDIN >> 20
                        ),
                    });
                }
            }
        }
        let line = String::from_utf8_lossy(&self.command).into_owned();
        let mut intr = self.interrupt.subscribe();
        let endpoint = self.endpoint.as_deref().unwrap_or_default();
        let mut events = client.run(&agent, &line, endpoint, stdin).await?;
        self.interrupt.command_started();
        let mut prefixer = LinePrefixer::new(&target.label());
        let exit = loop {
            let ev = tokio::select! {
                m = events.message() => m,
                Ok(()) = intr.changed() => {
                    return Err(RunError::RelayInterrupted { agent });
                }
            };
            let ev = match ev {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    break Err(RunError::RelayRun {
                        agent: agent.clone(),
                        message: "the relay ended the run without the command's exit".into(),
                    });
                }
                Err(s) => break Err(client.stream_error(s).into()),
            };
            match ev.event {
                Some(Event::Output(o)) => {
                    let data = Bytes::from(o.data);
                    let event = if o.stream == S::Stderr as i32 {
                        ProcessEvent::Stderr(data)
                    } else {
                        ProcessEvent::Stdout(data)
                    };
                    self.emit(event, &mut prefixer, stdout, stderr).await;
                }
                Some(Event::Exit(e)) => {
                    break Ok(if e.signal.is_empty() {
                        Exit::Code(e.code.clamp(0, 255) as u32)
                    } else {
                        Exit::Signal {
                            name: e.signal,
                            core_dumped: false,
                        }
                    });
                }
                Some(Event::Error(e)) => {
                    break Err(RunError::RelayRun {
                        agent: agent.clone(),
                        message: if e.hint.is_empty() {
                            e.message
                        } else {
                            format!("{}: {}", e.message, e.hint)
                        },
                    });
                }
                None => {}
            }
        };
        self.finish_lines(&mut prefixer).await;
        exit
    }

    /// Show or collect one piece of output.
    async fn emit(
        &self,
        event: ProcessEvent,
        prefixer: &mut LinePrefixer,
        stdout: &mut Vec<u8>,
        stderr: &mut Vec<u8>,
    ) {
        let (stream, data) = match event {
            ProcessEvent::Stdout(d) => (Stream::Stdout, d),
            ProcessEvent::Stderr(d) => (Stream::Stderr, d),
        };
        match self.mode {
            OutputMode::Passthrough => self.output.write(stream, data).await,
            OutputMode::Prefixed => {
                if let Some(lines) = prefixer.push(stream, &data) {
                    self.output.write(stream, lines).await;
                }
            }
            OutputMode::Json => match stream {
                Stream::Stdout => stdout.extend_from_slice(&data),
                Stream::Stderr => stderr.extend_from_slice(&data),
            },
        }
    }

    /// Last lines without a newline, when prefixing.
    async fn finish_lines(&self, prefixer: &mut LinePrefixer) {
        if self.mode == OutputMode::Prefixed {
            for stream in [Stream::Stdout, Stream::Stderr] {
                if let Some(line) = prefixer.finish(stream) {
                    self.output.write(stream, line).await;
                }
            }
        }
    }
}

/// Most stdin a relay run takes (it travels in the one request).
const MAX_RELAY_STDIN: usize = 1 << 20;

/// Copy local stdin to the remote command, then send EOF.
pub fn forward_stdin(input: ProcessInput) {
    let mut rx = stdin_chunks();
    tokio::spawn(async move {
        while let Some(data) = rx.recv().await {
            if input.data(data).await.is_err() {
                return;
            }
        }
        let _ = input.eof().await;
    });
}

/// Local stdin in chunks; the channel closes at end of input. A plain thread reads stdin
/// (blocking reads, stdin left in blocking mode for whoever shares it); the process does
/// not wait for it when it exits.
pub fn stdin_chunks() -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let reader = std::thread::Builder::new()
        .name("remote-stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            let mut lock = stdin.lock();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match lock.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::debug!("stdin: {e}");
                        break;
                    }
                }
            }
        });
    if let Err(e) = reader {
        tracing::warn!("cannot read stdin: {e}");
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(args: &[&str]) -> String {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        String::from_utf8(command_line(&args)).unwrap()
    }

    #[test]
    fn one_argument_is_passed_as_is() {
        assert_eq!(line(&["echo $HOME | wc -c"]), "echo $HOME | wc -c");
    }

    #[test]
    fn arguments_are_quoted_when_needed() {
        assert_eq!(line(&["echo", "a b"]), "echo 'a b'");
        assert_eq!(line(&["ls", "-l", "/tmp"]), "ls -l /tmp");
        assert_eq!(line(&["echo", "it's", ""]), "echo 'it'\\''s' ''");
        assert_eq!(line(&["echo", "$x", "*", "a;b"]), "echo '$x' '*' 'a;b'");
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_string("a\"b\\c\n\u{1}é"), "\"a\\\"b\\\\c\\n\\u0001é\"");
    }
}
