//! A command running in a WinRM shell, seen like an SSH exec: output events, then how it
//! ended. A task of its own owns the main connection and loops Receive (re-issuing it after
//! each TimedOut) until the command is done, then cleans up (Signal terminate; Delete of the
//! shell when the shell was made for this command). Because Receive long-polls on that
//! connection, stdin and Ctrl+C go through a second connection, opened when first needed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::soap::{self, OutStream, ShellOptions};
use super::{Client, Connection, RECEIVE_WAIT, WinrmError, exit_of};
use crate::ssh::{Exit, ProcessEvent};
use crate::target::Target;

/// What happens to the command's stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdin {
    /// Closed at once (the command sees end of input).
    Closed,
    /// Fed through [`CommandInput`]; closed with [`CommandInput::eof`].
    Open,
}

/// What to free when the command is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// Signal terminate, then delete the shell (`remote run`: the shell was made for it).
    DeleteShell,
    /// Signal terminate; the shell stays (`remote exec` in a session).
    Terminate,
}

/// Where the command runs.
pub enum Shell<'a> {
    /// A new shell made for it.
    New(&'a ShellOptions),
    /// An existing shell (a session).
    Existing(&'a str),
}

enum Event {
    Output(ProcessEvent),
    Done(Result<Exit, WinrmError>),
}

enum Control {
    Stdin(Bytes),
    Eof,
    CtrlC,
}

/// Sends stdin and Ctrl+C to the command (over a second connection); cheap to clone.
#[derive(Clone)]
pub struct CommandInput {
    tx: mpsc::UnboundedSender<Control>,
}

impl CommandInput {
    pub fn data(&self, data: Bytes) {
        let _ = self.tx.send(Control::Stdin(data));
    }

    pub fn eof(&self) {
        let _ = self.tx.send(Control::Eof);
    }

    /// Interrupt the command (WinRM ctrl_c: SIGINT on remote-agent).
    pub fn ctrl_c(&self) {
        let _ = self.tx.send(Control::CtrlC);
    }
}

/// A started command.
pub struct RemoteCommand {
    events: mpsc::Receiver<Event>,
    input: CommandInput,
    exit: Option<Result<Exit, WinrmError>>,
    shell_id: String,
    command_id: String,
    addr: String,
}

impl RemoteCommand {
    /// Start `line` over `conn` (in a new shell, or an existing one) and follow its output.
    /// `client` and `target` open the second connection for stdin and Ctrl+C.
    pub async fn start(
        client: Arc<Client>,
        target: &Target,
        mut conn: Connection,
        shell: Shell<'_>,
        line: &str,
        stdin: Stdin,
        cleanup: Cleanup,
    ) -> Result<RemoteCommand, WinrmError> {
        let addr = conn.addr().to_string();
        let (shell_id, made) = match shell {
            Shell::New(options) => (conn.create_shell(options).await?, true),
            Shell::Existing(id) => (id.to_string(), false),
        };
        let started = async {
            let command_id = conn.command(&shell_id, line).await?;
            if stdin == Stdin::Closed {
                conn.send_input(&shell_id, &command_id, &[], true).await?;
            }
            Ok::<_, WinrmError>(command_id)
        }
        .await;
        let command_id = match started {
            Ok(id) => id,
            Err(e) => {
                if made {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(10), conn.delete_shell(&shell_id))
                            .await;
                }
                return Err(e);
            }
        };
        tracing::debug!(%addr, shell = %shell_id, command = %command_id, "command started");
        let (tx, events) = mpsc::channel(16);
        tokio::spawn(receive_loop(
            conn,
            shell_id.clone(),
            command_id.clone(),
            cleanup,
            tx,
        ));
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        tokio::spawn(control_loop(
            client,
            target.clone(),
            shell_id.clone(),
            command_id.clone(),
            ctl_rx,
        ));
        Ok(RemoteCommand {
            events,
            input: CommandInput { tx: ctl_tx },
            exit: None,
            shell_id,
            command_id,
            addr,
        })
    }

    pub fn shell_id(&self) -> &str {
        &self.shell_id
    }

    pub fn command_id(&self) -> &str {
        &self.command_id
    }

    /// stdin and Ctrl+C.
    pub fn input(&self) -> CommandInput {
        self.input.clone()
    }

    /// The next output; `None` once the command is done (then see [`RemoteCommand::finish`]).
    /// Cancel-safe.
    pub async fn next_event(&mut self) -> Option<ProcessEvent> {
        if self.exit.is_some() {
            return None;
        }
        match self.events.recv().await {
            Some(Event::Output(e)) => Some(e),
            Some(Event::Done(r)) => {
                self.exit = Some(r);
                None
            }
            None => {
                self.exit = Some(Err(WinrmError::Internal {
                    addr: self.addr.clone(),
                    detail: "the receiving task ended without a result".into(),
                }));
                None
            }
        }
    }

    /// How the command ended (after [`RemoteCommand::next_event`] returned `None`).
    pub fn finish(self) -> Result<Exit, WinrmError> {
        self.exit.unwrap_or_else(|| {
            Err(WinrmError::Internal {
                addr: self.addr,
                detail: "finish() before the command ended".into(),
            })
        })
    }
}

async fn receive_loop(
    mut conn: Connection,
    shell: String,
    command: String,
    cleanup: Cleanup,
    tx: mpsc::Sender<Event>,
) {
    let result = loop {
        match conn.receive(&shell, &command, RECEIVE_WAIT).await {
            Ok(None) => continue,
            Ok(Some(r)) => {
                for (stream, data) in r.output {
                    let event = match stream {
                        OutStream::Stdout => ProcessEvent::Stdout(Bytes::from(data)),
                        OutStream::Stderr => ProcessEvent::Stderr(Bytes::from(data)),
                    };
                    // A receiver that went away still gets the cleanup below.
                    let _ = tx.send(Event::Output(event)).await;
                }
                if let Some(code) = r.exit_code {
                    break Ok(exit_of(code));
                }
            }
            Err(e) => break Err(e),
        }
    };
    // Free the command (and the shell made for it). The connection may be broken after an
    // error; do not wait long for it.
    let tidy = async {
        let _ = conn.signal(&shell, &command, soap::SIGNAL_TERMINATE).await;
        if cleanup == Cleanup::DeleteShell
            && let Err(e) = conn.delete_shell(&shell).await
        {
            tracing::debug!("deleting shell {shell}: {e}");
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(15), tidy).await;
    let _ = tx.send(Event::Done(result)).await;
}

async fn control_loop(
    client: Arc<Client>,
    target: Target,
    shell: String,
    command: String,
    mut rx: mpsc::UnboundedReceiver<Control>,
) {
    let mut conn: Option<Connection> = None;
    let mut stdin_open = true;
    while let Some(msg) = rx.recv().await {
        if matches!(msg, Control::Stdin(_) | Control::Eof) && !stdin_open {
            continue;
        }
        if conn.is_none() {
            match client.connect(&target).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    crate::notice(&format!(
                        "cannot forward input or Ctrl+C to the command on {target}: {e}"
                    ));
                    return;
                }
            }
        }
        let Some(c) = conn.as_mut() else { return };
        let is_input = !matches!(msg, Control::CtrlC);
        let result = match msg {
            Control::Stdin(data) => {
                let mut r = Ok(());
                // Keep each Send envelope well inside every server's limit.
                for chunk in data.chunks(64 * 1024) {
                    r = c.send_input(&shell, &command, chunk, false).await;
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
            Control::Eof => {
                stdin_open = false;
                c.send_input(&shell, &command, &[], true).await
            }
            Control::CtrlC => c.signal(&shell, &command, soap::SIGNAL_CTRL_C).await,
        };
        if let Err(e) = result {
            // The command may have ended meanwhile; input for it is moot.
            tracing::debug!("input to command {command}: {e}");
            if e.fault().is_none() {
                conn = None;
            }
            if is_input {
                stdin_open = false;
            }
        }
    }
}
