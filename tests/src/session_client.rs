//! A minimal, synchronous client of the session protocol for tests: frames over the stdin
//! and stdout of a transport command (`ssh -s … remote`, or `remote-agent subsystem`).

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use prost::Message;
use remote_proto::session::{
    Attach, ClientFrame, OpenSession, RunCommand, ServerFrame, SessionInfo, client_frame, record,
    server_frame,
};

pub use remote_proto::session;

pub struct ProtoClient {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<ServerFrame>,
    next_id: u64,
}

/// Output and exit collected from records.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub terminal: Vec<u8>,
    pub exit: Option<(i32, String)>,
    pub last_seq: u64,
}

impl Collected {
    pub fn add(&mut self, rec: &session::Record) {
        self.last_seq = rec.seq;
        match &rec.kind {
            Some(record::Kind::Output(o)) => match o.stream {
                1 => self.stdout.extend_from_slice(&o.data),
                2 => self.stderr.extend_from_slice(&o.data),
                _ => self.terminal.extend_from_slice(&o.data),
            },
            Some(record::Kind::Exit(e)) => self.exit = Some((e.code, e.signal.clone())),
            _ => {}
        }
    }
}

impl ProtoClient {
    /// Start `cmd` (which must speak the protocol on its stdin/stdout) and say Hello.
    pub fn over(mut cmd: Command) -> ProtoClient {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start transport");
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            loop {
                let mut len = [0u8; 4];
                if stdout.read_exact(&mut len).is_err() {
                    break;
                }
                let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                if stdout.read_exact(&mut body).is_err() {
                    break;
                }
                match ServerFrame::decode(&body[..]) {
                    Ok(f) => {
                        if tx.send(f).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let mut c = ProtoClient {
            child,
            stdin,
            rx,
            next_id: 1,
        };
        let hello = c.request(client_frame::Msg::Hello(remote_proto::frames::hello(
            "tests",
        )));
        assert!(
            matches!(hello.msg, Some(server_frame::Msg::Hello(_))),
            "no Hello from the agent: {hello:?}"
        );
        c
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Write raw bytes to the transport (for malformed-frame tests).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let w = self.stdin.as_mut().expect("stdin open");
        w.write_all(bytes).expect("write");
        w.flush().expect("flush");
    }

    pub fn send(&mut self, msg: client_frame::Msg) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let frame = ClientFrame {
            request_id: id,
            msg: Some(msg),
        };
        let body = frame.encode_to_vec();
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        self.send_raw(&bytes);
        id
    }

    /// The next frame, or panic after `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> ServerFrame {
        self.rx
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("no frame from the agent within {timeout:?}: {e}"))
    }

    pub fn try_recv(&mut self, timeout: Duration) -> Option<ServerFrame> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Send a request and return the first answer to it.
    pub fn request(&mut self, msg: client_frame::Msg) -> ServerFrame {
        let id = self.send(msg);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let f = self.recv(deadline.saturating_duration_since(Instant::now()));
            if f.request_id == id || f.request_id == 0 {
                return f;
            }
        }
    }

    pub fn open(&mut self, open: OpenSession) -> SessionInfo {
        match self.request(client_frame::Msg::Open(open)).msg {
            Some(server_frame::Msg::Opened(o)) => o.session.expect("session info"),
            other => panic!("open failed: {other:?}"),
        }
    }

    pub fn open_commands(&mut self) -> SessionInfo {
        self.open(OpenSession {
            shape: session::Shape::Commands as i32,
            ..Default::default()
        })
    }

    pub fn list(&mut self) -> Vec<SessionInfo> {
        match self
            .request(client_frame::Msg::List(session::ListSessions {}))
            .msg
        {
            Some(server_frame::Msg::Sessions(l)) => l.sessions,
            other => panic!("list failed: {other:?}"),
        }
    }

    /// Run `command` in `session` and follow it to its exit.
    pub fn exec(&mut self, session: &str, command: &str) -> Collected {
        let id = self.send(client_frame::Msg::Run(RunCommand {
            session_id: session.to_string(),
            command: command.to_string(),
            follow: true,
        }));
        let mut out = Collected::default();
        loop {
            let f = self.recv(Duration::from_secs(60));
            if f.request_id != id {
                continue;
            }
            match f.msg {
                Some(server_frame::Msg::Accepted(_)) => {}
                Some(server_frame::Msg::Record(r)) => {
                    out.add(&r);
                    self.ack(r.seq);
                }
                Some(server_frame::Msg::Done(_)) => return out,
                other => panic!("exec {command:?}: unexpected {other:?}"),
            }
        }
    }

    /// Start `command` without following it; returns its command id.
    pub fn start(&mut self, session: &str, command: &str) -> u64 {
        match self
            .request(client_frame::Msg::Run(RunCommand {
                session_id: session.to_string(),
                command: command.to_string(),
                follow: false,
            }))
            .msg
        {
            Some(server_frame::Msg::Accepted(a)) => a.command_id,
            other => panic!("run {command:?} failed: {other:?}"),
        }
    }

    /// Attach (follow) or receive (not follow); returns the Attached answer or the error.
    pub fn attach(&mut self, session: &str, follow: bool) -> ServerFrame {
        self.request(client_frame::Msg::Attach(Attach {
            session_id: session.to_string(),
            from_seq: None,
            follow,
        }))
    }

    pub fn ack(&mut self, seq: u64) {
        self.send(client_frame::Msg::Ack(session::Ack { seq }));
    }

    /// Kill the transport process (SIGKILL), as a client machine dying would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Close stdin and wait for the transport to exit.
    pub fn close(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Drop for ProtoClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
