//! Persistent sessions through the agent's `remote` SSH subsystem (session protocol over
//! OpenSSH's `ssh -s`): commands that share state, output kept while nobody is attached,
//! reattaching from another connection with every record exactly once, buffering modes,
//! isolation between accounts, idle timeout, and hostile frames.

use std::time::{Duration, Instant};

use remote_tests::session_client::{Collected, ProtoClient, session};
use remote_tests::*;
use session::{client_frame, server_frame};

fn client(agent: &Agent, user: &str, key: &ClientKey) -> ProtoClient {
    let mut cmd = agent.ssh(user, key);
    cmd.args(["-s", "remote"]);
    ProtoClient::over(cmd)
}

fn setup() -> (Agent, ClientKey) {
    let agent = Agent::start();
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    (agent, key)
}

fn error_code(f: &session::ServerFrame) -> Option<i32> {
    match &f.msg {
        Some(server_frame::Msg::Error(e)) => Some(e.code),
        _ => None,
    }
}

#[test]
fn commands_share_directory_and_exports_and_keep_their_own_streams() {
    let (agent, key) = setup();
    let mut c = client(&agent, "alice", &key);
    let s = c.open_commands();
    let first = c.exec(&s.id, "cd /tmp; export X=1; Y=local");
    assert_eq!(first.exit, Some((0, String::new())));
    let second = c.exec(&s.id, "pwd; echo \"$X|${Y:-}\"");
    assert_eq!(String::from_utf8_lossy(&second.stdout), "/tmp\n1|\n");
    let third = c.exec(&s.id, "echo out; echo err >&2; exit 4");
    assert_eq!(third.stdout, b"out\n");
    assert_eq!(third.stderr, b"err\n");
    assert_eq!(third.exit, Some((4, String::new())));
    // A new connection sees the same context.
    c.close();
    let mut c2 = client(&agent, "alice", &key);
    let again = c2.exec(&s.id, "pwd; echo $X");
    assert_eq!(String::from_utf8_lossy(&again.stdout), "/tmp\n1\n");
}

#[test]
fn reattach_from_another_connection_gets_every_line_exactly_once() {
    let (agent, key) = setup();
    let mut a = client(&agent, "alice", &key);
    let s = a.open_commands();
    a.start(
        &s.id,
        "i=0; while [ $i -lt 400 ]; do echo line $i; i=$((i+1)); sleep 0.01; done",
    );
    assert!(matches!(
        a.attach(&s.id, true).msg,
        Some(server_frame::Msg::Attached(_))
    ));
    // Client A prints (collects) and acknowledges records for a while...
    let mut seen = Collected::default();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        if let Some(f) = a.try_recv(Duration::from_millis(100))
            && let Some(server_frame::Msg::Record(r)) = f.msg
        {
            seen.add(&r);
            a.ack(r.seq);
        }
    }
    // ...then dies without a goodbye (its last acks have had time to arrive).
    std::thread::sleep(Duration::from_millis(200));
    a.kill();
    let a_lines = String::from_utf8_lossy(&seen.stdout).into_owned();
    assert!(
        a_lines.lines().count() > 10,
        "client A saw too little: {a_lines:?}"
    );
    // Output goes on with nobody attached.
    std::thread::sleep(Duration::from_secs(3));
    let mut b = client(&agent, "alice", &key);
    let listed = b.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].state,
        session::SessionState::StateDisconnected as i32
    );
    assert!(matches!(
        b.attach(&s.id, true).msg,
        Some(server_frame::Msg::Attached(_))
    ));
    let mut rest = Collected::default();
    while rest.exit.is_none() {
        let f = b.recv(Duration::from_secs(30));
        if let Some(server_frame::Msg::Record(r)) = f.msg {
            rest.add(&r);
            b.ack(r.seq);
        }
    }
    let all = format!("{a_lines}{}", String::from_utf8_lossy(&rest.stdout));
    let expected: String = (0..400).map(|i| format!("line {i}\n")).collect();
    assert_eq!(all, expected, "lines lost, repeated or out of order");
}

#[test]
fn following_one_command_does_not_consume_another_commands_output() {
    let (agent, key) = setup();
    let mut c = client(&agent, "alice", &key);
    let s = c.open_commands();
    // A background command prints while another is followed (and acknowledged) to its end.
    c.start(&s.id, "for i in 1 2 3 4 5; do echo bg $i; sleep 0.1; done");
    let fg = c.exec(&s.id, "sleep 0.3; echo fg");
    assert_eq!(fg.stdout, b"fg\n");
    std::thread::sleep(Duration::from_millis(600));
    // Receiving the session shows every background line, none of the followed command's.
    assert!(matches!(
        c.attach(&s.id, false).msg,
        Some(server_frame::Msg::Attached(_))
    ));
    let mut rest = Collected::default();
    loop {
        match c.recv(Duration::from_secs(20)).msg {
            Some(server_frame::Msg::Record(r)) => rest.add(&r),
            Some(server_frame::Msg::Done(_)) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&rest.stdout),
        "bg 1\nbg 2\nbg 3\nbg 4\nbg 5\n"
    );
}

#[test]
fn other_accounts_cannot_touch_a_session_even_with_its_id() {
    let (agent, key) = setup();
    let bob_key = agent.key("bob_key");
    agent.add_user("bob", None, Some(&bob_key));
    let mut alice = client(&agent, "alice", &key);
    let s = alice.open_commands();
    alice.start(&s.id, "sleep 30");
    let mut bob = client(&agent, "bob", &bob_key);
    assert!(bob.list().is_empty());
    let not_found = session::ErrorCode::ErrorNotFound as i32;
    assert_eq!(error_code(&bob.attach(&s.id, true)), Some(not_found));
    assert_eq!(error_code(&bob.attach(&s.id, false)), Some(not_found));
    let signal = bob.request(client_frame::Msg::Signal(session::SignalRequest {
        session_id: s.id.clone(),
        command_id: 0,
        signal: "KILL".into(),
    }));
    assert_eq!(error_code(&signal), Some(not_found));
    let run = bob.request(client_frame::Msg::Run(session::RunCommand {
        session_id: s.id.clone(),
        command: "touch /tmp/bob-was-here".into(),
        follow: false,
    }));
    assert_eq!(error_code(&run), Some(not_found));
    let rm = bob.request(client_frame::Msg::Close(session::CloseSession {
        session_id: s.id.clone(),
    }));
    assert_eq!(error_code(&rm), Some(not_found));
    // Alice's session is untouched.
    let listed = alice.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].running_commands, 1);
}

#[test]
fn terminal_session_survives_detach() {
    let (agent, key) = setup();
    let mut c = client(&agent, "alice", &key);
    let s = c.open(session::OpenSession {
        shape: session::Shape::Terminal as i32,
        size: Some(session::TerminalSize {
            rows: 30,
            cols: 100,
        }),
        term: "xterm".into(),
        attach: true,
        ..Default::default()
    });
    let mut screen = Collected::default();
    let wait_for = |c: &mut ProtoClient, screen: &mut Collected, needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !String::from_utf8_lossy(&screen.terminal).contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on screen: {:?}",
                String::from_utf8_lossy(&screen.terminal)
            );
            if let Some(f) = c.try_recv(Duration::from_millis(200))
                && let Some(server_frame::Msg::Record(r)) = f.msg
            {
                screen.add(&r);
                c.ack(r.seq);
            }
        }
    };
    c.send(client_frame::Msg::Input(session::Input {
        data: b"echo M$((6*7)) $(stty size)\n".to_vec(),
        eof: false,
    }));
    wait_for(&mut c, &mut screen, "M42 30 100");
    // Leave; type something that prints later; come back on a new connection.
    c.send(client_frame::Msg::Input(session::Input {
        data: b"sleep 1; echo LATER$((1+1))\n".to_vec(),
        eof: false,
    }));
    c.close();
    std::thread::sleep(Duration::from_millis(1500));
    let mut d = client(&agent, "alice", &key);
    assert!(matches!(
        d.attach(&s.id, true).msg,
        Some(server_frame::Msg::Attached(_))
    ));
    let mut screen2 = Collected::default();
    wait_for(&mut d, &mut screen2, "LATER2");
    d.send(client_frame::Msg::Input(session::Input {
        data: b"exit 3\n".to_vec(),
        eof: false,
    }));
    let deadline = Instant::now() + Duration::from_secs(20);
    while screen2.exit.is_none() {
        assert!(Instant::now() < deadline, "shell did not exit");
        if let Some(f) = d.try_recv(Duration::from_millis(200))
            && let Some(server_frame::Msg::Record(r)) = f.msg
        {
            screen2.add(&r);
        }
    }
    assert_eq!(screen2.exit, Some((3, String::new())));
}

#[test]
fn several_clients_attached_at_once_all_see_output_and_any_can_type() {
    let (agent, key) = setup();
    let mut one = client(&agent, "alice", &key);
    let s = one.open(session::OpenSession {
        shape: session::Shape::Terminal as i32,
        attach: true,
        ..Default::default()
    });
    let mut two = client(&agent, "alice", &key);
    assert!(matches!(
        two.attach(&s.id, true).msg,
        Some(server_frame::Msg::Attached(_))
    ));
    assert_eq!(two.list()[0].attached_clients, 2);
    // The second client types; both see the answer.
    two.send(client_frame::Msg::Input(session::Input {
        data: b"echo BOTH$((20+3))\n".to_vec(),
        eof: false,
    }));
    for c in [&mut one, &mut two] {
        let mut screen = Collected::default();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !String::from_utf8_lossy(&screen.terminal).contains("BOTH23") {
            assert!(
                Instant::now() < deadline,
                "{:?}",
                String::from_utf8_lossy(&screen.terminal)
            );
            if let Some(f) = c.try_recv(Duration::from_millis(200))
                && let Some(server_frame::Msg::Record(r)) = f.msg
            {
                screen.add(&r);
            }
        }
    }
}

#[test]
fn sessions_per_user_and_running_commands_are_bounded() {
    let agent = Agent::start_with(AgentOptions {
        config: "[sessions]\nmax_sessions_per_user = 2\nmax_running_commands = 2\n".into(),
        ..Default::default()
    });
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    let mut c = client(&agent, "alice", &key);
    let s = c.open_commands();
    c.open_commands();
    let third = c.request(client_frame::Msg::Open(session::OpenSession {
        shape: session::Shape::Commands as i32,
        ..Default::default()
    }));
    let Some(server_frame::Msg::Error(e)) = third.msg else {
        panic!("third session allowed: {third:?}")
    };
    assert_eq!(e.code, session::ErrorCode::ErrorQuota as i32);
    assert!(e.message.contains("max_sessions_per_user"), "{}", e.message);
    c.start(&s.id, "sleep 30");
    c.start(&s.id, "sleep 30");
    let run = c.request(client_frame::Msg::Run(session::RunCommand {
        session_id: s.id.clone(),
        command: "true".into(),
        follow: false,
    }));
    assert_eq!(
        error_code(&run),
        Some(session::ErrorCode::ErrorQuota as i32)
    );
}

#[test]
fn block_mode_stalls_the_writer_and_delivers_everything() {
    // 200 MiB from one command: above the default endpoint's 50 MB output quota.
    let agent = Agent::start_with(AgentOptions {
        config: "[endpoints.default]\nusers = [\"*\"]\nmax_received_mb_per_command = 1000\n".into(),
        ..Default::default()
    });
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    let mut c = client(&agent, "alice", &key);
    let s = c.open(session::OpenSession {
        shape: session::Shape::Commands as i32,
        buffering: session::Buffering::Block as i32,
        journal_bytes: 8 << 20,
        ..Default::default()
    });
    let size: u64 = 200 << 20;
    c.start(&s.id, &format!("yes 0123456789abcdef | head -c {size}"));
    // Nobody attached: the journal fills and the command stalls instead of losing data.
    std::thread::sleep(Duration::from_secs(2));
    let info = c.list().remove(0);
    assert_eq!(
        info.running_commands, 1,
        "the writer should be stalled, not finished"
    );
    assert!(
        info.journal_bytes_used >= (7 << 20),
        "journal not full: {info:?}"
    );
    assert_eq!(info.dropped_bytes, 0);
    // Attach and read everything.
    assert!(matches!(
        c.attach(&s.id, true).msg,
        Some(server_frame::Msg::Attached(_))
    ));
    let mut total: u64 = 0;
    let mut hash = Fnv::default();
    let mut exit = None;
    while exit.is_none() {
        let f = c.recv(Duration::from_secs(60));
        if let Some(server_frame::Msg::Record(r)) = f.msg {
            match &r.kind {
                Some(session::record::Kind::Output(o)) => {
                    total += o.data.len() as u64;
                    hash.update(&o.data);
                }
                Some(session::record::Kind::Exit(e)) => exit = Some(e.code),
                _ => {}
            }
            c.ack(r.seq);
        }
    }
    assert_eq!(exit, Some(0));
    assert_eq!(total, size);
    let mut expected = Fnv::default();
    let line = b"0123456789abcdef\n";
    let mut left = size as usize;
    while left > 0 {
        let n = left.min(line.len());
        expected.update(&line[..n]);
        left -= n;
    }
    assert_eq!(hash.0, expected.0, "content differs");
}

#[test]
fn drop_mode_tells_the_next_client_what_it_missed() {
    let (agent, key) = setup();
    let mut c = client(&agent, "alice", &key);
    let s = c.open(session::OpenSession {
        shape: session::Shape::Commands as i32,
        buffering: session::Buffering::Drop as i32,
        journal_bytes: 1 << 20,
        ..Default::default()
    });
    let size: u64 = 5 << 20;
    c.start(&s.id, &format!("head -c {size} /dev/zero"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.list()[0].running_commands > 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(server_frame::Msg::Attached(att)) = c.attach(&s.id, false).msg else {
        panic!("receive failed")
    };
    assert!(att.dropped_bytes > 0, "no drop reported");
    let mut got: u64 = 0;
    loop {
        let f = c.recv(Duration::from_secs(30));
        match f.msg {
            Some(server_frame::Msg::Record(r)) => {
                if let Some(session::record::Kind::Output(o)) = r.kind {
                    got += o.data.len() as u64;
                }
            }
            Some(server_frame::Msg::Done(_)) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        got + att.dropped_bytes,
        size,
        "received {got} + dropped {} != {size}",
        att.dropped_bytes
    );
}

#[test]
fn idle_timeout_closes_a_disconnected_session_and_kills_its_processes() {
    let (agent, key) = setup();
    let mut c = client(&agent, "alice", &key);
    let s = c.open(session::OpenSession {
        shape: session::Shape::Commands as i32,
        idle_timeout_secs: 2,
        ..Default::default()
    });
    let pid_out = c.exec(&s.id, "sleep 1000 > /dev/null 2>&1 & echo $!");
    let pid: i32 = String::from_utf8_lossy(&pid_out.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok());
    // Attached: not idle, whatever the timeout.
    assert!(matches!(
        c.attach(&s.id, true).msg,
        Some(server_frame::Msg::Attached(_))
    ));
    let mut other = client(&agent, "alice", &key);
    assert_eq!(
        other.list()[0].state,
        session::SessionState::StateOpened as i32
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        other.list().len(),
        1,
        "an attached session must not time out"
    );
    c.close();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        other.list()[0].state,
        session::SessionState::StateDisconnected as i32
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !other.list().is_empty() {
        assert!(Instant::now() < deadline, "idle session not closed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the session's process {pid} survived"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn malformed_truncated_and_oversized_frames_get_errors_and_service_goes_on() {
    let (agent, key) = setup();
    let mut c = client(&agent, "alice", &key);
    // Malformed protobuf.
    c.send_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
    let f = c.recv(Duration::from_secs(10));
    assert_eq!(
        error_code(&f),
        Some(session::ErrorCode::ErrorBadFrame as i32)
    );
    // Oversized: announced 16 MiB, sent in full; refused without buffering, then skipped.
    let len: u32 = 16 << 20;
    let mut big = len.to_be_bytes().to_vec();
    big.resize(4 + len as usize, 0x41);
    c.send_raw(&big);
    let f = c.recv(Duration::from_secs(30));
    assert_eq!(
        error_code(&f),
        Some(session::ErrorCode::ErrorFrameTooLarge as i32)
    );
    // An empty frame (no request) and an unknown session.
    c.send_raw(&[0, 0, 0, 0]);
    let f = c.recv(Duration::from_secs(10));
    assert_eq!(
        error_code(&f),
        Some(session::ErrorCode::ErrorBadFrame as i32)
    );
    assert_eq!(
        error_code(&c.attach("does-not-exist", true)),
        Some(session::ErrorCode::ErrorNotFound as i32)
    );
    // The same connection still works.
    let s = c.open_commands();
    assert_eq!(c.exec(&s.id, "echo ok").stdout, b"ok\n");
    // A truncated frame followed by a hang-up leaves the agent serving others.
    c.send_raw(&[0, 0, 1, 0, 1, 2, 3]);
    c.kill();
    let mut d = client(&agent, "alice", &key);
    assert_eq!(d.list().len(), 1);
}

/// FNV-1a, enough to compare 200 MiB streams without keeping them.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf29ce484222325)
    }
}

impl Fnv {
    fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}
