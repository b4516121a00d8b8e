//! Following a session's output on the local terminal: `remote exec` (one command, to its
//! exit), `remote attach` (a whole session, live, with keystrokes for a terminal session) and
//! `remote receive` (what was produced since the last acknowledgement, then stop). Each
//! record is written to stdout or stderr first and acknowledged after, so a client that dies
//! makes the next one resume exactly where this one's output ended. The one exception is a
//! client killed (SIGKILL) after writing a record and before its acknowledgement reached the
//! socket: the next client shows that record again. Nothing is ever lost; acknowledging
//! first would turn that repeat into a loss.
//!
//! Detach from `attach` with Enter, `~`, `.` (like ssh's escape), or Ctrl+C on a commands
//! session; the session keeps running.
//!
//! WinRM sessions (a WinRM shell) have the same `exec` (Command + Receive until done) and
//! `receive`, with one difference: a WinRM shell keeps no journal, so `receive` can only
//! fetch the output of commands this machine started detached (`exec --detach`, or left
//! running with a second Ctrl+C), and each piece of output is handed out once.

use std::io::Write;
use std::time::{Duration, Instant};

use remote_proto::session::{
    Ack, Attach, Input, Record, Resize, RunCommand, ServerFrame, SessionInfo, Shape, SignalRequest,
    Stream, TerminalSize, client_frame, record, server_frame,
};
use tokio::io::AsyncReadExt;

use crate::session::{self, FrameSender, SessionChannel, SessionError, SessionRef};
use crate::ssh::{ProcessEvent, signal_number};
use crate::winrm::{self, WinrmError};

/// Acknowledgements that never hold up reading. Normally an acknowledgement is handed to
/// the connection at once, right after its record was written out, so a client that dies
/// leaves almost nothing written but unacknowledged. When the connection cannot take it at
/// once (its queues are full because output floods in), a task of its own sends the latest
/// one later: waiting for the send while not reading could deadlock with the SSH layer's
/// bounded queues. Acknowledgements are cumulative, so only the latest matters.
struct Acker {
    sender: FrameSender,
    latest: tokio::sync::watch::Sender<u64>,
    sent: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Acker {
    fn start(sender: FrameSender) -> Acker {
        let (latest, mut wanted) = tokio::sync::watch::channel(0u64);
        let sent = std::sync::Arc::new(tokio::sync::watch::channel(0u64).0);
        let (task_sender, task_sent) = (sender.clone(), sent.clone());
        let task = tokio::spawn(async move {
            while wanted.changed().await.is_ok() {
                let seq = *wanted.borrow_and_update();
                if *task_sent.borrow() >= seq {
                    continue;
                }
                if task_sender
                    .send(client_frame::Msg::Ack(Ack { seq }))
                    .await
                    .is_err()
                {
                    break;
                }
                task_sent.send_if_modified(|s| std::mem::replace(s, (*s).max(seq)) < seq);
            }
        });
        Acker {
            sender,
            latest,
            sent,
            task,
        }
    }

    /// Everything up to `seq` was written out.
    fn ack(&self, seq: u64) {
        use futures::FutureExt;
        let inline = self
            .sender
            .send(client_frame::Msg::Ack(Ack { seq }))
            .now_or_never();
        if let Some(Ok(_)) = inline {
            self.sent
                .send_if_modified(|s| std::mem::replace(s, (*s).max(seq)) < seq);
        }
        self.latest.send_if_modified(|s| {
            let newer = seq > *s;
            if newer {
                *s = seq;
            }
            newer
        });
    }

    /// Wait until the latest acknowledgement has been handed to the connection.
    async fn flush(self) {
        let want = *self.latest.borrow();
        let mut sent = self.sent.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(10), sent.wait_for(|s| *s >= want)).await;
        self.task.abort();
    }
}

/// End a follow cleanly: send the last acknowledgement, then a Detach, and wait for the
/// agent's answer, which comes after it processed everything before it. Meanwhile frames are
/// drained (not printed, not acknowledged: the next client gets them), so nothing can block.
async fn finish(ch: &mut SessionChannel, acker: Acker) {
    let sender = ch.sender();
    let closing = tokio::spawn(async move {
        acker.flush().await;
        let _ = sender
            .send(client_frame::Msg::Detach(remote_proto::session::Detach {}))
            .await;
    });
    let drain = async {
        let mut detached = false;
        while let Ok(Some(frame)) = ch.next().await {
            if closing.is_finished() {
                detached = true;
            }
            if detached && matches!(frame.msg, Some(server_frame::Msg::Done(_))) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
}

/// Write a record's output where it belongs. Returns the exit it reports, if any.
fn emit(rec: &Record, command: Option<u64>) -> std::io::Result<Option<(i32, String)>> {
    if command.is_some_and(|c| c != rec.command_id) {
        return Ok(None);
    }
    match &rec.kind {
        Some(record::Kind::Output(o)) => {
            if o.stream == Stream::Stderr as i32 {
                let mut e = std::io::stderr().lock();
                e.write_all(&o.data)?;
                e.flush()?;
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(&o.data)?;
                out.flush()?;
            }
            Ok(None)
        }
        Some(record::Kind::Exit(e)) => Ok(Some((e.code, e.signal.clone()))),
        _ => Ok(None),
    }
}

/// The exit code a shell would report for an Exit record.
fn exit_code(code: i32, signal: &str) -> i32 {
    if signal.is_empty() {
        code.clamp(0, 255)
    } else {
        128 + signal_number(signal).unwrap_or(127)
    }
}

fn stdio_error(e: std::io::Error) -> SessionError {
    SessionError::Protocol {
        addr: "local".into(),
        detail: format!("cannot write output: {e}"),
    }
}

/// `remote receive`: print what the session produced since the last acknowledgement.
pub async fn receive(ch: &mut SessionChannel, id: &str) -> Result<i32, SessionError> {
    let attached = ch
        .request(client_frame::Msg::Attach(Attach {
            session_id: id.to_string(),
            from_seq: None,
            follow: false,
        }))
        .await?;
    report_drops(&attached);
    let acker = Acker::start(ch.sender());
    loop {
        let Some(frame) = ch.next().await? else {
            return Err(SessionError::Closed {
                addr: ch.addr().to_string(),
            });
        };
        let frame = ch.check(frame)?;
        match frame.msg {
            Some(server_frame::Msg::Record(rec)) => {
                if let Some((code, signal)) = emit(&rec, None).map_err(stdio_error)? {
                    crate::notice(&format!(
                        "command {} exited with code {}",
                        rec.command_id,
                        exit_code(code, &signal)
                    ));
                }
                acker.ack(rec.seq);
            }
            Some(server_frame::Msg::Done(_)) => {
                finish(ch, acker).await;
                return Ok(0);
            }
            _ => {}
        }
    }
}

fn report_drops(frame: &ServerFrame) {
    if let Some(server_frame::Msg::Attached(a)) = &frame.msg
        && a.dropped_bytes > 0
    {
        crate::notice(&format!(
            "{} bytes of output were dropped while nobody was attached (the session's buffering is drop); what follows is what was kept",
            a.dropped_bytes
        ));
    }
}

/// Ctrl+C handling shared by exec and attach: the first one is passed on, a second within
/// 2 s gives up waiting (the session keeps running).
struct Interrupts {
    stream: tokio::signal::unix::Signal,
    last: Option<Instant>,
}

impl Interrupts {
    fn new() -> Option<Interrupts> {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .ok()
            .map(|stream| Interrupts { stream, last: None })
    }

    /// Waits for Ctrl+C; true when it is the second within 2 s.
    async fn next(this: &mut Option<Interrupts>) -> bool {
        match this {
            Some(i) => {
                i.stream.recv().await;
                let twice = i.last.is_some_and(|t| t.elapsed() < Duration::from_secs(2));
                i.last = Some(Instant::now());
                twice
            }
            None => std::future::pending().await,
        }
    }
}

/// Copy local stdin to the followed command as Input frames, then EOF.
async fn forward_stdin(sender: FrameSender) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let msg = client_frame::Msg::Input(Input {
                    data: buf[..n].to_vec(),
                    eof: false,
                });
                if sender.send(msg).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = sender
        .send(client_frame::Msg::Input(Input {
            data: Vec::new(),
            eof: true,
        }))
        .await;
}

/// `remote exec`: run `command` in the session and follow it to its exit; returns the exit
/// code. Ctrl+C is sent to the command as SIGINT; a second one leaves it running.
pub async fn exec(
    ch: &mut SessionChannel,
    id: &str,
    command: &str,
    forward_input: bool,
) -> Result<i32, SessionError> {
    let rid = ch
        .send(client_frame::Msg::Run(RunCommand {
            session_id: id.to_string(),
            command: command.to_string(),
            follow: true,
        }))
        .await?;
    let sender = ch.sender();
    let acker = Acker::start(ch.sender());
    let mut stdin_task = None;
    let mut interrupts = Interrupts::new();
    let mut command_id = None;
    let mut exit = None;
    loop {
        tokio::select! {
            frame = ch.next() => {
                let Some(frame) = frame? else {
                    return Err(SessionError::Closed { addr: ch.addr().to_string() });
                };
                if frame.request_id != rid && frame.request_id != 0 {
                    continue;
                }
                match ch.check(frame)?.msg {
                    Some(server_frame::Msg::Accepted(a)) => {
                        command_id = Some(a.command_id);
                        if forward_input {
                            stdin_task = Some(tokio::spawn(forward_stdin(sender.clone())));
                        }
                    }
                    Some(server_frame::Msg::Record(rec)) => {
                        if let Some(e) = emit(&rec, command_id).map_err(stdio_error)? {
                            exit = Some(e);
                        }
                        acker.ack(rec.seq);
                    }
                    Some(server_frame::Msg::Done(_)) => break,
                    _ => {}
                }
            }
            twice = Interrupts::next(&mut interrupts) => {
                if twice {
                    crate::notice(&format!("left command running in session {id}; see its output with `remote receive`"));
                    finish(ch, acker).await;
                    return Ok(130);
                }
                ch.send(client_frame::Msg::Signal(SignalRequest {
                    session_id: String::new(),
                    command_id: 0,
                    signal: "INT".into(),
                })).await?;
            }
        }
    }
    if let Some(t) = stdin_task {
        t.abort();
    }
    finish(ch, acker).await;
    Ok(exit.map(|(code, sig)| exit_code(code, &sig)).unwrap_or(0))
}

/// `remote exec --detach`: start `command` in the session and return at once; its output
/// stays in the session for `receive` or `attach`.
pub async fn start(ch: &mut SessionChannel, id: &str, command: &str) -> Result<i32, SessionError> {
    let reply = ch
        .request(client_frame::Msg::Run(RunCommand {
            session_id: id.to_string(),
            command: command.to_string(),
            follow: false,
        }))
        .await?;
    if let Some(server_frame::Msg::Accepted(a)) = reply.msg {
        crate::notice(&format!(
            "started command {} in session {id}; its output: remote receive {id}",
            a.command_id
        ));
    }
    Ok(0)
}

fn winrm_stdio_error(e: std::io::Error) -> WinrmError {
    WinrmError::Internal {
        addr: "local".into(),
        detail: format!("cannot write output: {e}"),
    }
}

fn write_out(stdout: bool, data: &[u8]) -> std::io::Result<()> {
    if stdout {
        let mut out = std::io::stdout().lock();
        out.write_all(data)?;
        out.flush()
    } else {
        let mut err = std::io::stderr().lock();
        err.write_all(data)?;
        err.flush()
    }
}

/// Remember a WinRM command whose output was left for `remote receive`.
fn keep_for_receive(sref: &SessionRef, command_id: &str) -> String {
    let reference = sref.target.session_ref(&sref.id);
    if let Err(e) = session::record_command(&sref.id, command_id) {
        crate::notice(&format!(
            "{e}; `remote receive` will not know command {command_id}"
        ));
    }
    reference
}

/// `remote exec` on a WinRM session: run `command` in the shell and follow it to its exit;
/// returns its exit code. Ctrl+C sends ctrl_c to the command; a second one within 2 s leaves
/// it running (its further output: `remote receive`).
pub async fn winrm_exec(
    client: std::sync::Arc<winrm::Client>,
    sref: &SessionRef,
    command: &str,
    forward_input: bool,
) -> Result<i32, WinrmError> {
    let conn = client.connect(&sref.target).await?;
    let stdin = if forward_input {
        winrm::Stdin::Open
    } else {
        winrm::Stdin::Closed
    };
    let mut process = winrm::RemoteCommand::start(
        client.clone(),
        &sref.target,
        conn,
        winrm::command::Shell::Existing(&sref.id),
        command,
        stdin,
        winrm::Cleanup::Terminate,
    )
    .await?;
    let input = process.input();
    if forward_input {
        let mut chunks = crate::run::stdin_chunks();
        let input = input.clone();
        tokio::spawn(async move {
            while let Some(data) = chunks.recv().await {
                input.data(data);
            }
            input.eof();
        });
    }
    let mut interrupts = Interrupts::new();
    loop {
        tokio::select! {
            event = process.next_event() => match event {
                Some(ProcessEvent::Stdout(d)) => write_out(true, &d).map_err(winrm_stdio_error)?,
                Some(ProcessEvent::Stderr(d)) => write_out(false, &d).map_err(winrm_stdio_error)?,
                None => break,
            },
            twice = Interrupts::next(&mut interrupts) => {
                if twice {
                    let reference = keep_for_receive(sref, process.command_id());
                    crate::notice(&format!(
                        "left command {} running in session {}; its further output: remote receive {reference}",
                        process.command_id(),
                        sref.id
                    ));
                    return Ok(130);
                }
                input.ctrl_c();
            }
        }
    }
    Ok(process.finish()?.code())
}

/// `remote exec --detach` on a WinRM session: start `command` (stdin closed), record it for
/// `remote receive`, return at once.
pub async fn winrm_start(
    client: &winrm::Client,
    sref: &SessionRef,
    command: &str,
) -> Result<i32, WinrmError> {
    let mut conn = client.connect(&sref.target).await?;
    let command_id = conn.command(&sref.id, command).await?;
    conn.send_input(&sref.id, &command_id, &[], true).await?;
    let reference = keep_for_receive(sref, &command_id);
    crate::notice(&format!(
        "started command {command_id} in session {}; its output: remote receive {reference}",
        sref.id
    ));
    Ok(0)
}

/// How long `remote receive` waits for more output of one WinRM command before it moves on.
const WINRM_RECEIVE_POLL: std::time::Duration = std::time::Duration::from_secs(1);
/// And how long it keeps reading one command that never stops talking.
const WINRM_RECEIVE_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

/// `remote receive` on a WinRM session: the output not yet received of each command this
/// machine started detached in it. Finished commands are reported and forgotten.
pub async fn winrm_receive(client: &winrm::Client, sref: &SessionRef) -> Result<i32, WinrmError> {
    let reference = sref.target.session_ref(&sref.id);
    let commands = session::recorded_commands(&sref.id);
    if commands.is_empty() {
        crate::notice(&format!(
            "nothing to receive in session {reference}: over WinRM, `remote receive` fetches the output of commands \
             started from this machine with `remote exec --detach` (output of other commands went to whoever ran them, \
             and a WinRM shell keeps no journal to replay)"
        ));
        return Ok(0);
    }
    let mut conn = client.connect(&sref.target).await?;
    for command_id in commands {
        let started = Instant::now();
        loop {
            if started.elapsed() > WINRM_RECEIVE_BUDGET {
                crate::notice(&format!(
                    "command {command_id} is still running and producing output; run `remote receive {reference}` again for more"
                ));
                break;
            }
            match conn
                .receive(&sref.id, &command_id, WINRM_RECEIVE_POLL)
                .await
            {
                Ok(None) => {
                    crate::notice(&format!(
                        "command {command_id} is still running; run `remote receive {reference}` again for more"
                    ));
                    break;
                }
                Ok(Some(r)) => {
                    for (stream, data) in &r.output {
                        let out = *stream == winrm::soap::OutStream::Stdout;
                        write_out(out, data).map_err(winrm_stdio_error)?;
                    }
                    if let Some(code) = r.exit_code {
                        crate::notice(&format!("command {command_id} exited with code {code}"));
                        let _ = conn
                            .signal(&sref.id, &command_id, winrm::soap::SIGNAL_TERMINATE)
                            .await;
                        session::forget_command(&sref.id, &command_id);
                        break;
                    }
                }
                Err(e) if e.fault().is_some_and(|f| f.is_unknown_command()) => {
                    crate::notice(&format!(
                        "command {command_id} is no longer known in session {}: it was ended, or its output was \
                         received elsewhere; forgetting it",
                        sref.id
                    ));
                    session::forget_command(&sref.id, &command_id);
                    break;
                }
                Err(e) => {
                    if e.fault().is_some_and(|f| f.is_shell_not_found()) {
                        session::forget(&sref.id);
                    }
                    return Err(e);
                }
            }
        }
    }
    Ok(0)
}

/// Detects Enter ~ . in typed input (ssh's escape); passes everything else on.
#[derive(Default)]
struct Escape {
    line_start: bool,
    tilde: bool,
}

impl Escape {
    fn new() -> Escape {
        Escape {
            line_start: true,
            tilde: false,
        }
    }

    /// The bytes to send, and whether the user asked to detach.
    fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len() + 1);
        for &b in input {
            if self.tilde {
                self.tilde = false;
                match b {
                    b'.' => return (out, true),
                    b'~' => out.push(b'~'),
                    other => {
                        out.push(b'~');
                        out.push(other);
                    }
                }
            } else if self.line_start && b == b'~' {
                self.tilde = true;
                continue;
            } else {
                out.push(b);
            }
            self.line_start = b == b'\r' || b == b'\n';
        }
        (out, false)
    }
}

/// `remote attach`: follow the session live. For a terminal session with a local terminal,
/// keystrokes and window size go to it; the session's shell exiting ends the attach with its
/// exit code. Detaching returns 0 and leaves the session running.
pub async fn attach(ch: &mut SessionChannel, id: &str) -> Result<i32, SessionError> {
    let attached = ch
        .request(client_frame::Msg::Attach(Attach {
            session_id: id.to_string(),
            from_seq: None,
            follow: true,
        }))
        .await?;
    report_drops(&attached);
    let info: SessionInfo = match &attached.msg {
        Some(server_frame::Msg::Attached(a)) => a.session.clone().unwrap_or_default(),
        _ => SessionInfo::default(),
    };
    let terminal = info.shape == Shape::Terminal as i32;
    let interactive = terminal && crate::terminal::stdin_is_tty();
    let sender = ch.sender();
    let _raw = if interactive {
        crate::notice(&format!("attached to session {id}; detach with Enter ~ ."));
        Some(crate::terminal::RawMode::enter().map_err(stdio_error)?)
    } else {
        crate::notice(&format!("attached to session {id}; detach with Ctrl+C"));
        None
    };
    let (detach_tx, mut detach_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut tasks = Vec::new();
    if interactive {
        if let Some((cols, rows)) = crate::terminal::window_size() {
            sender
                .send(client_frame::Msg::Resize(Resize {
                    size: Some(TerminalSize { rows, cols }),
                }))
                .await?;
        }
        let s = sender.clone();
        tasks.push(tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 4096];
            let mut escape = Escape::new();
            loop {
                let n = match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let (data, detach) = escape.feed(&buf[..n]);
                if !data.is_empty() {
                    let msg = client_frame::Msg::Input(Input { data, eof: false });
                    if s.send(msg).await.is_err() {
                        break;
                    }
                }
                if detach {
                    let _ = detach_tx.send(()).await;
                    break;
                }
            }
        }));
        let s = sender.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some((cols, rows)) = crate::terminal::window_size() {
                    let msg = client_frame::Msg::Resize(Resize {
                        size: Some(TerminalSize { rows, cols }),
                    });
                    if s.send(msg).await.is_err() {
                        break;
                    }
                }
            }
        }));
    }
    let mut interrupts = if interactive { None } else { Interrupts::new() };
    let acker = Acker::start(ch.sender());
    let result = loop {
        tokio::select! {
            frame = ch.next() => {
                let frame = match frame {
                    Ok(Some(f)) => f,
                    Ok(None) => break Err(SessionError::Closed { addr: ch.addr().to_string() }),
                    Err(e) => break Err(e),
                };
                match ch.check(frame) {
                    Ok(ServerFrame { msg: Some(server_frame::Msg::Record(rec)), .. }) => {
                        let exit = match emit(&rec, None) {
                            Ok(e) => e,
                            Err(e) => break Err(stdio_error(e)),
                        };
                        acker.ack(rec.seq);
                        if terminal && rec.command_id == 0 && let Some((code, sig)) = exit {
                            break Ok(Some(exit_code(code, &sig)));
                        }
                    }
                    Ok(_) => {}
                    Err(SessionError::Remote { code: remote_proto::session::ErrorCode::ErrorSessionClosed, .. }) => {
                        crate::notice(&format!("session {id} was closed"));
                        break Ok(Some(0));
                    }
                    Err(e) => break Err(e),
                }
            }
            // Detached: the session goes on.
            _ = detach_rx.recv() => break Ok(None),
            _ = Interrupts::next(&mut interrupts) => break Ok(None),
        }
    };
    for t in tasks {
        t.abort();
    }
    drop(_raw);
    if result.is_ok() {
        // Our acknowledgements must reach the agent before we go.
        finish(ch, acker).await;
    }
    match result {
        Ok(None) => {
            crate::notice(&format!(
                "detached; session {id} keeps running (remote attach {id})"
            ));
            Ok(0)
        }
        Ok(Some(code)) => Ok(code),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequence() {
        let mut e = Escape::new();
        assert_eq!(e.feed(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(e.feed(b"~."), (Vec::new(), true));
        let mut e = Escape::new();
        assert_eq!(e.feed(b"a~.b"), (b"a~.b".to_vec(), false));
        let mut e = Escape::new();
        assert_eq!(e.feed(b"~~x"), (b"~x".to_vec(), false));
        let mut e = Escape::new();
        assert_eq!(e.feed(b"~"), (Vec::new(), false));
        assert_eq!(e.feed(b"q"), (b"~q".to_vec(), false));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(3, ""), 3);
        assert_eq!(exit_code(-1, "TERM"), 143);
        assert_eq!(exit_code(300, ""), 255);
    }
}
