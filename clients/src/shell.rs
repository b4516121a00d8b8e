//! `remote shell TARGET`: the login shell on a target. From a terminal it gets a remote pty
//! (TERM, size and line-discipline settings from the local terminal, window changes
//! forwarded on SIGWINCH) and the local terminal goes into raw mode, restored on every way
//! out. With stdin not a terminal, the shell runs without a pty and reads its commands
//! from stdin, like `ssh host < script`.

use std::sync::Arc;

use russh::Sig;
use thiserror::Error;

use crate::output::{Output, Stream};
use crate::run::{Interrupt, forward_stdin};
use crate::ssh::{Client, Exit, ProcessEvent, PtyRequest, SshError};
use crate::target::Target;
use crate::terminal::{self, RawMode};

#[derive(Debug, Error)]
pub enum ShellError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(
        "cannot put the local terminal into raw mode ({0}): run remote shell from a terminal, or pipe commands into it"
    )]
    Terminal(std::io::Error),
}

/// Run the login shell on `target` (on its agent's `endpoint` when given); returns how it
/// ended.
pub async fn shell(
    client: &Client,
    target: &Target,
    endpoint: Option<&str>,
    interrupt: Arc<Interrupt>,
    output: Output,
) -> Result<Exit, ShellError> {
    let tty = terminal::stdin_is_tty();
    let conn = client.connect(target).await?;
    let pty = tty.then(|| {
        let (cols, rows) = terminal::window_size().unwrap_or((80, 24));
        PtyRequest {
            term: std::env::var("TERM")
                .ok()
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "dumb".into()),
            cols,
            rows,
            modes: terminal::pty_modes(std::io::stdin()),
        }
    });
    let mut process = conn.shell(pty.as_ref(), endpoint).await?;
    interrupt.command_started();
    let input = process.input();
    let raw = if tty {
        Some(RawMode::enter().map_err(ShellError::Terminal)?)
    } else {
        None
    };
    let resizer = tty.then(|| {
        let input = input.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut winch) = signal(SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some((cols, rows)) = terminal::window_size()
                    && input.resize(cols, rows).await.is_err()
                {
                    return;
                }
            }
        })
    });
    forward_stdin(input.clone());
    let mut intr = interrupt.subscribe();
    let result = loop {
        tokio::select! {
            event = process.next_event() => match event {
                Ok(Some(ProcessEvent::Stdout(data))) => output.write(Stream::Stdout, data).await,
                Ok(Some(ProcessEvent::Stderr(data))) => output.write(Stream::Stderr, data).await,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            },
            Ok(()) = intr.changed() => {
                let _ = input.signal(Sig::INT).await;
            }
        }
    };
    if let Some(task) = resizer {
        task.abort();
    }
    output.flush().await;
    drop(raw);
    conn.disconnect().await;
    result?;
    Ok(process.finish()?)
}
