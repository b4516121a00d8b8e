//! One SSH session channel's process: starting it on pipes or a pty, copying the client's
//! input to it and its output back (stdout as data, stderr as extended data), and reporting
//! how it ended (`exit-status`, or `exit-signal` when a signal killed it). Input reaches the
//! process through a bounded queue, so a process that does not read its input slows the
//! client down instead of filling the agent's memory.

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nix::sys::signal::Signal;
use russh::server::Handle;
use russh::{ChannelId, Sig};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audit::{Audit, Event, Transport};
use crate::process::{self, Identity, Input, ProcessError, PtySettings, Spec};

/// Queued input messages per channel (each at most one SSH packet, 32 KiB).
const INPUT_QUEUE: usize = 64;
/// Output read size.
const READ_CHUNK: usize = 64 * 1024;

/// A process attached to a channel. Dropping it (channel closed, connection lost) hangs up
/// on the process group if the process is still running.
pub struct Running {
    input: mpsc::Sender<Input>,
    pid: Option<u32>,
    exited: Arc<AtomicBool>,
    quota: Option<Arc<Quota>>,
    input_bytes: std::sync::atomic::AtomicU64,
}

/// An exec's limits (the endpoint's per-command quotas) and, once one is hit, why the
/// process was stopped.
#[derive(Debug)]
pub struct Quota {
    pub max_output: u64,
    pub output_exceeded: String,
    pub max_input: u64,
    pub input_exceeded: String,
    /// The endpoint's operation timeout, and what to say when it strikes.
    pub deadline: Option<(Duration, String)>,
    stopped: std::sync::Mutex<Option<String>>,
}

impl Quota {
    pub fn new(
        max_output: u64,
        output_exceeded: String,
        max_input: u64,
        input_exceeded: String,
    ) -> Quota {
        Quota {
            max_output,
            output_exceeded,
            max_input,
            input_exceeded,
            deadline: None,
            stopped: std::sync::Mutex::new(None),
        }
    }

    /// Kill the process group for `why` (the first reason wins).
    fn stop(&self, pid: Option<u32>, why: &str) {
        let mut s = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        if s.is_none() {
            *s = Some(why.to_string());
            if let Some(pid) = pid {
                process::signal_group(pid, Signal::SIGKILL);
            }
        }
    }

    fn reason(&self) -> Option<String> {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Running {
    /// Queue input for the process; waits while the queue is full (backpressure). Input
    /// beyond the quota stops the process instead.
    pub async fn send(&self, input: Input) {
        if let (Some(q), Input::Data(d)) = (&self.quota, &input) {
            let total = self
                .input_bytes
                .fetch_add(d.len() as u64, Ordering::Relaxed)
                + d.len() as u64;
            if total > q.max_input {
                q.stop(self.pid, &q.input_exceeded);
                return;
            }
        }
        // A closed queue means the process is gone; its input is discarded, like a pipe's.
        let _ = self.input.send(input).await;
    }

    /// Deliver a signal requested by the client to the process group.
    pub fn signal(&self, sig: &Sig) -> bool {
        match (self.pid, to_signal(sig)) {
            (Some(pid), Some(signal)) if !self.exited.load(Ordering::Acquire) => {
                process::signal_group(pid, signal);
                true
            }
            _ => false,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pid) = self.pid
            && !self.exited.load(Ordering::Acquire)
        {
            process::signal_group(pid, Signal::SIGHUP);
        }
    }
}

/// What a channel's process is recorded as in the audit log when it ends.
#[derive(Debug, Clone)]
pub struct ExecAudit {
    pub audit: Audit,
    pub account: String,
    pub endpoint: String,
    pub peer: String,
    /// The command line; empty for an interactive shell.
    pub command: String,
}

impl ExecAudit {
    fn record(
        self,
        status: Option<&std::process::ExitStatus>,
        bytes_out: u64,
        started: std::time::Instant,
        reason: Option<String>,
    ) {
        let exit = crate::session::terminal::exit_of(status.copied());
        self.audit.record(Event::Command {
            session: None,
            peer: Some(self.peer),
            account: self.account,
            endpoint: self.endpoint,
            transport: Transport::Ssh,
            command: self.command,
            exit_code: exit.signal.is_empty().then_some(exit.code),
            signal: (!exit.signal.is_empty()).then_some(exit.signal),
            bytes_out,
            duration_ms: started.elapsed().as_millis() as u64,
            reason,
        });
    }
}

/// Start `spec` for channel `id` and wire it to the connection behind `handle`.
#[allow(clippy::too_many_arguments)]
pub fn start(
    handle: Handle,
    id: ChannelId,
    identity: &Identity,
    spec: &Spec,
    pty: Option<&PtySettings>,
    shutdown: CancellationToken,
    quota: Option<Quota>,
    audit: ExecAudit,
) -> Result<Running, ProcessError> {
    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    let exited = Arc::new(AtomicBool::new(false));
    let quota = quota.map(Arc::new);
    let pid = match pty {
        None => {
            let mut child = process::spawn_piped(identity, spec)?;
            let pid = child.id();
            let stdin = child.stdin.take();
            tokio::spawn(process::feed_stdin(rx, stdin));
            tokio::spawn(pump_piped(
                handle,
                id,
                child,
                exited.clone(),
                shutdown,
                quota.clone(),
                audit,
            ));
            pid
        }
        Some(settings) => {
            let p = process::spawn_pty(identity, spec, settings)?;
            let pid = p.child.id();
            let (reader, writer) = p.pty.into_split();
            tokio::spawn(process::feed_pty(rx, writer));
            tokio::spawn(pump_pty(
                handle,
                id,
                p.child,
                reader,
                exited.clone(),
                shutdown,
                audit,
            ));
            pid
        }
    };
    Ok(Running {
        input: tx,
        pid,
        exited,
        quota,
        input_bytes: std::sync::atomic::AtomicU64::new(0),
    })
}

/// Serve an in-agent service (not a process) on channel `id`: `service` gets a byte stream
/// whose reads are the client's data and whose writes go back to the client. When the
/// service ends, the channel gets EOF, exit-status 0 and close.
pub fn start_service<F, Fut>(handle: Handle, id: ChannelId, service: F) -> Running
where
    F: FnOnce(tokio::io::DuplexStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut from_service, to_service) = tokio::io::split(ours);
    let exited = Arc::new(AtomicBool::new(false));
    tokio::spawn(service(theirs));
    tokio::spawn(feed_service(rx, to_service));
    let done = exited.clone();
    tokio::spawn(async move {
        while let Some(data) = read_chunk(&mut from_service).await {
            if handle.data(id, data).await.is_err() {
                break;
            }
        }
        done.store(true, Ordering::Release);
        let _ = handle.eof(id).await;
        let _ = handle.exit_status_request(id, 0).await;
        let _ = handle.close(id).await;
    });
    Running {
        input: tx,
        pid: None,
        exited,
        quota: None,
        input_bytes: std::sync::atomic::AtomicU64::new(0),
    }
}

async fn feed_service(
    mut rx: mpsc::Receiver<Input>,
    mut w: tokio::io::WriteHalf<tokio::io::DuplexStream>,
) {
    use tokio::io::AsyncWriteExt;
    let mut open = true;
    while let Some(msg) = rx.recv().await {
        match msg {
            Input::Data(data) if open => open = w.write_all(&data).await.is_ok(),
            Input::Eof => {
                let _ = w.shutdown().await;
                open = false;
            }
            _ => {}
        }
    }
}

/// Read one chunk into a fresh buffer; `None` at end of stream or on error.
async fn read_chunk<R: AsyncRead + Unpin>(r: &mut R) -> Option<Bytes> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    match r.read_buf(&mut buf).await {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(buf.freeze()),
    }
}

async fn pump_piped(
    handle: Handle,
    id: ChannelId,
    mut child: tokio::process::Child,
    exited: Arc<AtomicBool>,
    shutdown: CancellationToken,
    quota: Option<Arc<Quota>>,
    audit: ExecAudit,
) {
    let started = std::time::Instant::now();
    let mut sent: u64 = 0;
    let pid = child.id();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut status = None;
    let mut hung_up = false;
    let mut budget = quota.as_ref().map_or(u64::MAX, |q| q.max_output);
    let deadline = quota.as_ref().and_then(|q| q.deadline.clone());
    let timeout = async {
        match &deadline {
            Some((d, _)) => tokio::time::sleep(*d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timeout);
    let mut timed_out = false;
    // Output beyond the quota is not sent; the process is stopped.
    let mut within = |mut data: Bytes| {
        if data.len() as u64 > budget {
            data.truncate(budget as usize);
            if let Some(q) = &quota {
                q.stop(pid, &q.output_exceeded);
            }
        }
        budget -= data.len() as u64;
        sent += data.len() as u64;
        data
    };
    // Like sshd, the channel ends when the process has exited and both pipes are closed.
    while stdout.is_some() || stderr.is_some() || status.is_none() {
        tokio::select! {
            chunk = async { read_chunk(stdout.as_mut()?).await }, if stdout.is_some() => match chunk {
                Some(data) => {
                    let data = within(data);
                    if !data.is_empty() && handle.data(id, data).await.is_err() { break }
                }
                None => stdout = None,
            },
            chunk = async { read_chunk(stderr.as_mut()?).await }, if stderr.is_some() => match chunk {
                Some(data) => {
                    let data = within(data);
                    if !data.is_empty() && handle.extended_data(id, 1, data).await.is_err() { break }
                }
                None => stderr = None,
            },
            st = child.wait(), if status.is_none() => {
                exited.store(true, Ordering::Release);
                status = Some(st);
            }
            () = shutdown.cancelled(), if !hung_up => {
                hung_up = true;
                if let Some(pid) = pid { process::signal_group(pid, Signal::SIGHUP) }
            }
            () = &mut timeout, if !timed_out => {
                timed_out = true;
                if let (Some(q), Some((_, why))) = (&quota, &deadline) {
                    q.stop(pid, why);
                }
            }
        }
    }
    let why = quota.as_ref().and_then(|q| q.reason());
    if let Some(why) = &why {
        let _ = handle
            .extended_data(id, 1, Bytes::from(format!("\r\nremote-agent: {why}\r\n")))
            .await;
    }
    let status = status.and_then(Result::ok);
    audit.record(status.as_ref(), sent, started, why);
    finish(&handle, id, status).await;
}

async fn pump_pty(
    handle: Handle,
    id: ChannelId,
    mut child: tokio::process::Child,
    mut reader: pty_process::OwnedReadPty,
    exited: Arc<AtomicBool>,
    shutdown: CancellationToken,
    audit: ExecAudit,
) {
    let started = std::time::Instant::now();
    let mut sent: u64 = 0;
    let pid = child.id();
    let mut hung_up = false;
    let mut open = true;
    let status = loop {
        tokio::select! {
            chunk = read_chunk(&mut reader), if open => match chunk {
                Some(data) => {
                    sent += data.len() as u64;
                    if handle.data(id, data).await.is_err() { open = false }
                }
                // EIO: every holder of the terminal closed it; the shell is about to exit.
                None => open = false,
            },
            st = child.wait() => {
                exited.store(true, Ordering::Release);
                break st.ok();
            }
            () = shutdown.cancelled(), if !hung_up => {
                hung_up = true;
                if let Some(pid) = pid { process::signal_group(pid, Signal::SIGHUP) }
            }
        }
    };
    // Drain what the shell wrote just before exiting; background jobs that keep the
    // terminal open do not hold the channel (as with sshd).
    while open {
        match tokio::time::timeout(Duration::from_millis(100), read_chunk(&mut reader)).await {
            Ok(Some(data)) => {
                sent += data.len() as u64;
                open = handle.data(id, data).await.is_ok();
            }
            _ => open = false,
        }
    }
    audit.record(status.as_ref(), sent, started, None);
    finish(&handle, id, status).await;
}

/// EOF, then `exit-status` or `exit-signal`, then close — the order sshd uses.
async fn finish(handle: &Handle, id: ChannelId, status: Option<std::process::ExitStatus>) {
    let _ = handle.eof(id).await;
    if let Some(st) = status {
        if let Some(code) = st.code() {
            let _ = handle.exit_status_request(id, code as u32).await;
        } else if let Some(sig) = st.signal() {
            let _ = handle
                .exit_signal_request(
                    id,
                    from_signal(sig),
                    st.core_dumped(),
                    String::new(),
                    String::new(),
                )
                .await;
        }
    }
    let _ = handle.close(id).await;
}

/// SSH signal name (RFC 4254 §6.10) for a signal number.
pub fn from_signal(sig: i32) -> Sig {
    match Signal::try_from(sig) {
        Ok(Signal::SIGABRT) => Sig::ABRT,
        Ok(Signal::SIGALRM) => Sig::ALRM,
        Ok(Signal::SIGFPE) => Sig::FPE,
        Ok(Signal::SIGHUP) => Sig::HUP,
        Ok(Signal::SIGILL) => Sig::ILL,
        Ok(Signal::SIGINT) => Sig::INT,
        Ok(Signal::SIGKILL) => Sig::KILL,
        Ok(Signal::SIGPIPE) => Sig::PIPE,
        Ok(Signal::SIGQUIT) => Sig::QUIT,
        Ok(Signal::SIGSEGV) => Sig::SEGV,
        Ok(Signal::SIGTERM) => Sig::TERM,
        Ok(Signal::SIGUSR1) => Sig::USR1,
        Ok(other) => Sig::Custom(other.as_str().trim_start_matches("SIG").to_string()),
        Err(_) => Sig::Custom(format!("SIG{sig}")),
    }
}

/// The signal a client asks for, if it names one we deliver.
pub fn to_signal(sig: &Sig) -> Option<Signal> {
    Some(match sig {
        Sig::ABRT => Signal::SIGABRT,
        Sig::ALRM => Signal::SIGALRM,
        Sig::FPE => Signal::SIGFPE,
        Sig::HUP => Signal::SIGHUP,
        Sig::ILL => Signal::SIGILL,
        Sig::INT => Signal::SIGINT,
        Sig::KILL => Signal::SIGKILL,
        Sig::PIPE => Signal::SIGPIPE,
        Sig::QUIT => Signal::SIGQUIT,
        Sig::SEGV => Signal::SIGSEGV,
        Sig::TERM => Signal::SIGTERM,
        Sig::USR1 => Signal::SIGUSR1,
        Sig::Custom(name) => match name.as_str() {
            "USR2" => Signal::SIGUSR2,
            "CONT" => Signal::SIGCONT,
            "STOP" => Signal::SIGSTOP,
            "TSTP" => Signal::SIGTSTP,
            "WINCH" => Signal::SIGWINCH,
            _ => return None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_round_trip() {
        for s in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGKILL,
            Signal::SIGUSR2,
        ] {
            assert_eq!(to_signal(&from_signal(s as i32)), Some(s));
        }
        assert!(matches!(from_signal(Signal::SIGTERM as i32), Sig::TERM));
        assert_eq!(to_signal(&Sig::Custom("BOGUS".into())), None);
    }
}
