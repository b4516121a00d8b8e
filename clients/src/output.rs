//! Local output. One thread does all writing to stdout and stderr, so connections never block
//! a runtime thread on a slow reader, chunks are written whole (prefixed lines from several
//! targets never interleave mid-line), and a full pipe slows the remote commands down
//! through the bounded queue (and the SSH window) instead of filling memory.
//! [`LinePrefixer`] turns a target's output into `label: line` lines.

use bytes::Bytes;
use std::io::Write;
use tokio::sync::{mpsc, oneshot};

/// Which local stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

enum Msg {
    Write(Stream, Bytes),
    Flush(oneshot::Sender<()>),
}

/// Handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct Output {
    tx: mpsc::Sender<Msg>,
}

impl Output {
    /// Start the writer thread. It ends when every `Output` is dropped.
    pub fn start() -> Output {
        let (tx, mut rx) = mpsc::channel::<Msg>(256);
        std::thread::Builder::new()
            .name("remote-output".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                let stderr = std::io::stderr();
                while let Some(msg) = rx.blocking_recv() {
                    match msg {
                        Msg::Write(Stream::Stdout, data) => {
                            let mut w = stdout.lock();
                            let _ = w.write_all(&data).and_then(|()| w.flush());
                        }
                        Msg::Write(Stream::Stderr, data) => {
                            let mut w = stderr.lock();
                            let _ = w.write_all(&data).and_then(|()| w.flush());
                        }
                        Msg::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .map(drop)
            .unwrap_or_else(|e| tracing::error!("cannot start the output thread: {e}"));
        Output { tx }
    }

    /// Queue `data` for `stream`; waits while the queue is full.
    pub async fn write(&self, stream: Stream, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let _ = self.tx.send(Msg::Write(stream, data)).await;
    }

    /// Wait until everything queued so far is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// Longest partial line kept before it is written out anyway (binary output, no newlines).
const MAX_LINE: usize = 64 * 1024;

/// Prefixes every line of a target's stdout and stderr with `label: `.
pub struct LinePrefixer {
    prefix: Vec<u8>,
    partial: [Vec<u8>; 2],
}

impl LinePrefixer {
    pub fn new(label: &str) -> LinePrefixer {
        LinePrefixer {
            prefix: format!("{label}: ").into_bytes(),
            partial: [Vec::new(), Vec::new()],
        }
    }

    fn slot(stream: Stream) -> usize {
        match stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }

    /// The complete lines that `data` finishes, prefixed; the rest is kept.
    pub fn push(&mut self, stream: Stream, data: &[u8]) -> Option<Bytes> {
        let mut out = Vec::new();
        let partial = &mut self.partial[Self::slot(stream)];
        let mut rest = data;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            out.extend_from_slice(&self.prefix);
            out.append(partial);
            out.extend_from_slice(&rest[..=i]);
            rest = &rest[i + 1..];
        }
        partial.extend_from_slice(rest);
        if partial.len() >= MAX_LINE {
            out.extend_from_slice(&self.prefix);
            out.append(partial);
            out.push(b'\n');
        }
        (!out.is_empty()).then(|| Bytes::from(out))
    }

    /// A last line without newline, prefixed and with a newline added.
    pub fn finish(&mut self, stream: Stream) -> Option<Bytes> {
        let partial = &mut self.partial[Self::slot(stream)];
        if partial.is_empty() {
            return None;
        }
        let mut out = self.prefix.clone();
        out.append(partial);
        out.push(b'\n');
        Some(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_prefixed_and_partial_lines_kept() {
        let mut p = LinePrefixer::new("web1");
        assert_eq!(
            p.push(Stream::Stdout, b"a\nb"),
            Some(Bytes::from("web1: a\n"))
        );
        assert_eq!(
            p.push(Stream::Stderr, b"e1\n"),
            Some(Bytes::from("web1: e1\n"))
        );
        assert_eq!(p.push(Stream::Stdout, b"c"), None);
        assert_eq!(
            p.push(Stream::Stdout, b"\n\nd"),
            Some(Bytes::from("web1: bc\nweb1: \n"))
        );
        assert_eq!(p.finish(Stream::Stdout), Some(Bytes::from("web1: d\n")));
        assert_eq!(p.finish(Stream::Stdout), None);
        assert_eq!(p.finish(Stream::Stderr), None);
    }

    #[test]
    fn very_long_lines_are_split() {
        let mut p = LinePrefixer::new("h");
        let big = vec![b'x'; MAX_LINE + 10];
        let out = p.push(Stream::Stdout, &big).unwrap();
        assert_eq!(out.len(), 3 + MAX_LINE + 10 + 1);
        assert_eq!(p.finish(Stream::Stdout), None);
    }
}
