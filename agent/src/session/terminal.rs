//! The terminal shape: the user's login shell on a pseudo-terminal, started when the session
//! opens. Its output goes to the journal as one byte stream (in block mode the shell stalls
//! while the journal is full); keystrokes and resizes from any attached client go to the
//! terminal in order; when the shell exits an `Exit` record ends the stream.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use nix::sys::signal::Signal;
use remote_proto::MAX_CHUNK_BYTES;
use remote_proto::session::{Exit, Output, Stream, record};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::Session;
use crate::process::{self, Identity, Input, ProcessError, Program, PtySettings, Spec};

pub struct Terminal {
    input: mpsc::Sender<Input>,
    pid: Option<u32>,
    exited: Arc<AtomicBool>,
    /// A second handle on the terminal's master side, to find its foreground job.
    master: OwnedFd,
    pending: Mutex<Option<(tokio::process::Child, pty_process::OwnedReadPty)>>,
}

impl Terminal {
    /// Start the login shell of `identity` on a terminal, with `env` added to its
    /// environment and in `cwd` (default: the home directory).
    pub fn start(
        identity: &Identity,
        settings: &PtySettings,
        env: &[(String, String)],
        cwd: Option<std::path::PathBuf>,
    ) -> Result<Terminal, ProcessError> {
        let mut base = identity.base_env();
        base.extend(env.iter().cloned());
        let spec = Spec {
            program: Program::LoginShell,
            env: base,
            cwd,
        };
        let p = process::spawn_pty(identity, &spec, settings)?;
        let master = std::os::fd::AsFd::as_fd(&p.pty)
            .try_clone_to_owned()
            .map_err(|e| ProcessError::Pty(e.to_string()))?;
        let pid = p.child.id();
        let (reader, writer) = p.pty.into_split();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(process::feed_pty(rx, writer));
        Ok(Terminal {
            input: tx,
            pid,
            exited: Arc::new(AtomicBool::new(false)),
            master,
            pending: Mutex::new(Some((p.child, reader))),
        })
    }

    /// Start copying the terminal's output into `session`'s journal.
    pub fn start_pump(&self, session: Arc<Session>) {
        let taken = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((child, reader)) = taken {
            tokio::spawn(pump(
                session.journal().clone(),
                child,
                reader,
                self.exited.clone(),
            ));
        }
    }

    pub fn running(&self) -> bool {
        !self.exited.load(Ordering::Acquire)
    }

    pub async fn input(&self, data: bytes::Bytes) {
        let _ = self.input.send(Input::Data(data)).await;
    }

    pub async fn resize(&self, rows: u16, cols: u16) {
        let _ = self.input.send(Input::Resize { rows, cols }).await;
    }

    /// Signal the terminal's foreground job (what Ctrl+C would reach), else the shell.
    pub fn signal(&self, signal: Signal) {
        if !self.running() {
            return;
        }
        match nix::unistd::tcgetpgrp(&self.master) {
            Ok(pgrp) if pgrp.as_raw() > 0 => {
                let _ = nix::sys::signal::killpg(pgrp, signal);
            }
            _ => {
                if let Some(pid) = self.pid {
                    process::signal_group(pid, signal);
                }
            }
        }
    }

    /// Hang up on everything in the terminal's session (the shell and its jobs); kill what
    /// is still there a few seconds later.
    pub fn kill(&self) {
        let Some(pid) = self.pid else { return };
        if process::signal_sessions(&[pid], Signal::SIGHUP) == 0 {
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            process::signal_sessions(&[pid], Signal::SIGKILL);
        });
    }
}

async fn read_chunk(reader: &mut pty_process::OwnedReadPty) -> Option<bytes::Bytes> {
    let mut buf = BytesMut::with_capacity(MAX_CHUNK_BYTES.min(64 * 1024));
    match reader.read_buf(&mut buf).await {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(buf.freeze()),
    }
}

fn output(data: bytes::Bytes) -> record::Kind {
    record::Kind::Output(Output {
        stream: Stream::Terminal as i32,
        data: data.to_vec(),
    })
}

async fn pump(
    journal: Arc<super::journal::Journal>,
    mut child: tokio::process::Child,
    mut reader: pty_process::OwnedReadPty,
    exited: Arc<AtomicBool>,
) {
    let mut open = true;
    let status = loop {
        tokio::select! {
            chunk = read_chunk(&mut reader), if open => match chunk {
                Some(data) => {
                    if journal.append(0, output(data)).await.is_err() {
                        // Closed: the session is going away.
                        open = false;
                    }
                }
                None => open = false,
            },
            st = child.wait() => {
                exited.store(true, Ordering::Release);
                break st.ok();
            }
        }
    };
    // What the shell wrote just before it exited.
    while open {
        match tokio::time::timeout(Duration::from_millis(100), read_chunk(&mut reader)).await {
            Ok(Some(data)) => open = journal.append(0, output(data)).await.is_ok(),
            _ => open = false,
        }
    }
    let _ = journal.append(0, record::Kind::Exit(exit_of(status))).await;
}

/// The `Exit` record for a process status.
pub fn exit_of(status: Option<std::process::ExitStatus>) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(st) => match (st.code(), st.signal()) {
            (Some(code), _) => Exit {
                code,
                signal: String::new(),
            },
            (None, Some(sig)) => Exit {
                code: -1,
                signal: Signal::try_from(sig)
                    .map(|s| s.as_str().trim_start_matches("SIG").to_string())
                    .unwrap_or_else(|_| sig.to_string()),
            },
            (None, None) => Exit {
                code: -1,
                signal: String::new(),
            },
        },
        None => Exit {
            code: -1,
            signal: String::new(),
        },
    }
}
