//! Hostile and broken peers: garbage instead of a version line, clients that stall in the
//! handshake, and hundreds of connections opened and dropped at once. The agent must keep
//! serving everybody else. Also: SIGTERM stops the agent cleanly.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use remote_tests::*;

const T: Duration = Duration::from_secs(60);

fn healthy(agent: &Agent, key: &ClientKey) {
    let out = run_with_timeout(agent.ssh("alice", key).arg("echo alive"), None, T);
    assert_eq!(
        stdout(&out),
        "alive\n",
        "agent stopped serving: {}",
        stderr(&out)
    );
}

/// Read until the server closes the connection; returns what it sent and how long it took.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return (got, Some(started.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (got, Some(started.elapsed())),
        }
    }
    (got, None)
}

#[test]
fn garbage_instead_of_version_line() {
    // Some garbage is refused at once (not a version line); a well-formed version line
    // followed by a packet header that promises 64 KiB which never come is cut by the
    // login grace time, as sshd does.
    let agent = Agent::start_with(AgentOptions {
        config: "[ssh]\nlogin_grace_time_secs = 3\n".into(),
        ..Default::default()
    });
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    for garbage in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0u8; 70_000],
        (0..=255u8).cycle().take(100_000).collect(),
        b"SSH-1.5-ancient\r\n".to_vec(),
        b"SSH-2.0-ok\r\n\x00\x00\xff\xff\xff\xff garbage packet".to_vec(),
    ] {
        let mut s = TcpStream::connect(agent.addr).unwrap();
        let _ = s.write_all(&garbage);
        let (_, closed) = read_until_closed(&mut s, Duration::from_secs(15));
        assert!(closed.is_some(), "agent kept a garbage connection open");
    }
    healthy(&agent, &key);
}

#[test]
fn stalled_handshakes_are_cut_at_login_grace_time() {
    let agent = Agent::start_with(AgentOptions {
        config: "[ssh]\nlogin_grace_time_secs = 2\n".into(),
        ..Default::default()
    });
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    // One says nothing at all, one stops after its version line, one after key exchange
    // has started.
    let mut silent = TcpStream::connect(agent.addr).unwrap();
    let mut after_version = TcpStream::connect(agent.addr).unwrap();
    after_version.write_all(b"SSH-2.0-stall\r\n").unwrap();
    // Others are served while they stall.
    healthy(&agent, &key);
    for s in [&mut silent, &mut after_version] {
        let (greeting, closed) = read_until_closed(s, Duration::from_secs(15));
        assert!(
            greeting.starts_with(b"SSH-2.0-"),
            "server sends its version first"
        );
        let took = closed.expect("a stalled connection was never closed");
        assert!(took < Duration::from_secs(10), "closed only after {took:?}");
    }
    healthy(&agent, &key);
}

#[test]
fn five_hundred_connections_opened_and_dropped_at_once() {
    let agent = Agent::start();
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    let addr = agent.addr;
    let threads: Vec<_> = (0..500)
        .map(|i| {
            std::thread::spawn(move || {
                // Half of them send a version line first; all are dropped at once.
                if let Ok(mut s) = TcpStream::connect(addr)
                    && i % 2 == 0
                {
                    let _ = s.write_all(b"SSH-2.0-flood\r\n");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    healthy(&agent, &key);
    // And again right away, with a few real sessions in parallel.
    let sessions: Vec<_> = (0..5)
        .map(|_| {
            let mut cmd = agent.ssh("alice", &key);
            cmd.arg("echo parallel");
            std::thread::spawn(move || run_with_timeout(&mut cmd, None, T))
        })
        .collect();
    for s in sessions {
        assert_eq!(stdout(&s.join().unwrap()), "parallel\n");
    }
}

#[test]
fn too_many_authentication_attempts_end_the_connection() {
    let agent = Agent::start_with(AgentOptions {
        config: "[ssh]\nmax_auth_tries = 3\n".into(),
        ..Default::default()
    });
    agent.add_user("alice", Some("right"), None);
    // OpenSSH asks its askpass program once per password attempt on the one connection;
    // it would try 10 times, the agent must cut it off after max_auth_tries.
    let counter = agent.dir.path().join("attempts");
    let askpass = agent.dir.path().join("counting-askpass");
    std::fs::write(
        &askpass,
        format!(
            "#!/bin/sh\necho x >> {}\necho wrong-password\n",
            counter.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(require_tool("ssh", "openssh-client"));
    cmd.args(ssh_options(agent.port()))
        .args([
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "NumberOfPasswordPrompts=10",
        ])
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0")
        .args(["alice@127.0.0.1", "true"]);
    let out = run_with_timeout(&mut cmd, None, T);
    assert_eq!(out.status.code(), Some(255));
    let attempts = std::fs::read_to_string(&counter)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(
        (1..=3).contains(&attempts),
        "allowed {attempts} password attempts on one connection"
    );
}

#[test]
fn sigterm_stops_the_agent_cleanly_with_sessions_open() {
    let mut agent = Agent::start();
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    let mut session = agent.ssh("alice", &key);
    session.arg("sleep 300");
    let mut child = session
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(agent.wait_log("accepted publickey", Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let status = agent.stop().expect("agent was running");
    assert_eq!(status.code(), Some(0), "agent exit status after SIGTERM");
    assert!(started.elapsed() < Duration::from_secs(15));
    // The client's session ended too.
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "client still connected after agent shutdown"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The port is closed.
    assert!(TcpStream::connect(agent.addr).is_err());
}
