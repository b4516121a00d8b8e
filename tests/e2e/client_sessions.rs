//! Persistent sessions with the `remote` client against real agents: `session new|list|rm`,
//! `exec`, `attach`, `receive`; a client killed mid-stream and a second machine (another
//! HOME) that picks up exactly where it stopped; terminal sessions detached and reattached.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use remote_tests::*;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(60);

fn setup() -> (Agent, ClientKey, String) {
    let agent = Agent::start();
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    let target = format!("alice@127.0.0.1:{}", agent.port());
    (agent, key, target)
}

fn remote(client: &Client, key: &ClientKey, args: &[&str]) -> Command {
    let mut cmd = client.remote();
    cmd.arg("--identity").arg(&key.private).args(args);
    cmd
}

fn new_session(client: &Client, key: &ClientKey, target: &str, extra: &[&str]) -> String {
    let mut args = vec!["session", "new", target];
    args.extend(extra);
    let out = run_with_timeout(&mut remote(client, key, &args), None, T);
    assert!(out.status.success(), "session new: {}", stderr(&out));
    let id = stdout(&out)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert_eq!(
        id.len(),
        16,
        "the id alone on the last line: {:?}",
        stdout(&out)
    );
    id
}

#[test]
fn exec_keeps_context_streams_and_exit_codes() {
    let (_agent, key, target) = setup();
    let client = Client::new();
    let id = new_session(&client, &key, &target, &["--name", "build"]);
    // Simple commands (run without the shell while the session has no state) behave as
    // under the shell: output, exit status, and "not found" with 127.
    let simple = |line: &str| {
        run_with_timeout(
            &mut remote(&client, &key, &["exec", &id, "--", line]),
            None,
            T,
        )
    };
    let out = simple("ls -d /tmp");
    assert_eq!(
        (stdout(&out).as_str(), out.status.code()),
        ("/tmp\n", Some(0))
    );
    assert_eq!(simple("false").status.code(), Some(1));
    let out = simple("no-such-program-here --flag");
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    // A bare id works on the machine that opened the session.
    let out = run_with_timeout(
        &mut remote(&client, &key, &["exec", &id, "--", "cd /tmp; export X=42"]),
        None,
        T,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run_with_timeout(
        &mut remote(
            &client,
            &key,
            &["exec", &id, "--", "pwd; echo $X; echo oops >&2; exit 3"],
        ),
        None,
        T,
    );
    assert_eq!(stdout(&out), "/tmp\n42\n");
    assert_eq!(stderr(&out), "oops\n");
    assert_eq!(out.status.code(), Some(3));
    // Once the session has state, simple commands see it too.
    let out = simple("env");
    assert!(
        stdout(&out).lines().any(|l| l == "X=42"),
        "{}",
        stdout(&out)
    );
    // stdin is forwarded; a signal death is 128+n.
    let out = run_with_timeout(
        &mut remote(&client, &key, &["exec", &id, "--", "cat; kill -TERM $$"]),
        Some(b"from stdin\n"),
        T,
    );
    assert_eq!(stdout(&out), "from stdin\n");
    assert_eq!(out.status.code(), Some(143));
    // Listed with its name and state; removed; then gone.
    let out = run_with_timeout(&mut remote(&client, &key, &["session", "list"]), None, T);
    let listing = stdout(&out);
    let row = listing
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{listing}"));
    assert!(
        row.contains("build") && row.contains("commands") && row.contains("disconnected"),
        "{row}"
    );
    let out = run_with_timeout(&mut remote(&client, &key, &["session", "rm", &id]), None, T);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_with_timeout(
        &mut remote(&client, &key, &["session", "list", &target]),
        None,
        T,
    );
    assert!(!stdout(&out).contains(&id));
    let out = run_with_timeout(
        &mut remote(&client, &key, &["receive", &format!("{target}/{id}")]),
        None,
        T,
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(stderr(&out).contains("no session"), "{}", stderr(&out));
}

#[test]
fn client_killed_mid_stream_then_another_machine_sees_every_line_exactly_once() {
    let (_agent, key, target) = setup();
    let first = Client::new();
    let second = Client::new();
    let id = new_session(&first, &key, &target, &[]);
    // A counter, one line every 10 ms, followed by client A.
    let mut a = remote(
        &first,
        &key,
        &[
            "exec",
            "-n",
            &id,
            "--",
            "i=0; while [ $i -lt 700 ]; do echo line $i; i=$((i+1)); sleep 0.01; done",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut a_out = a.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = a_out.read_to_string(&mut all);
        all
    });
    std::thread::sleep(Duration::from_millis(1500));
    a.kill().unwrap(); // SIGKILL, mid-stream
    let _ = a.wait();
    let seen_by_a = reader.join().unwrap();
    assert!(
        seen_by_a.lines().count() > 20,
        "client A saw too little: {seen_by_a:?}"
    );
    // Five more seconds of output with nobody attached.
    std::thread::sleep(Duration::from_secs(5));
    // Another machine (its own HOME, no record of the session) attaches by TARGET/ID.
    let mut b = remote(&second, &key, &["attach", &format!("{target}/{id}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut b_out = b.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = b_out.read(&mut buf) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut seen_by_b = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen_by_b.contains("line 699\n") {
        assert!(
            Instant::now() < deadline,
            "attach never got to the end: {seen_by_b:?}"
        );
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            seen_by_b.push_str(&chunk);
        }
    }
    // Ctrl+C detaches from a commands session; the session stays.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = b.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let all = format!("{seen_by_a}{seen_by_b}");
    let expected: String = (0..700).map(|i| format!("line {i}\n")).collect();
    let a_tail: Vec<&str> = seen_by_a.lines().rev().take(3).collect();
    let b_head: Vec<&str> = seen_by_b.lines().take(3).collect();
    assert!(
        all == expected,
        "lines lost, repeated or out of order: A ended with {a_tail:?} (last first), B began with {b_head:?}; {} lines in all",
        all.lines().count()
    );
    // The session is still there, for both machines.
    let out = run_with_timeout(
        &mut remote(&second, &key, &["session", "list", &target]),
        None,
        T,
    );
    assert!(stdout(&out).contains(&id));
}

#[test]
fn receive_prints_only_what_was_not_seen_and_another_account_gets_nothing() {
    let (agent, key, target) = setup();
    let bob_key = agent.key("bob_key");
    agent.add_user("bob", None, Some(&bob_key));
    let client = Client::new();
    let id = new_session(&client, &key, &target, &[]);
    let out = run_with_timeout(
        &mut remote(&client, &key, &["exec", &id, "--", "echo one"]),
        None,
        T,
    );
    assert_eq!(stdout(&out), "one\n");
    // Background output while nobody watches.
    let out = run_with_timeout(
        &mut remote(
            &client,
            &key,
            &["exec", "--detach", &id, "--", "sleep 0.5; echo two"],
        ),
        None,
        T,
    );
    assert!(
        out.status.success() && stdout(&out).is_empty(),
        "{}",
        stderr(&out)
    );
    std::thread::sleep(Duration::from_millis(1200));
    let out = run_with_timeout(&mut remote(&client, &key, &["receive", &id]), None, T);
    assert_eq!(stdout(&out), "two\n", "{}", stderr(&out));
    let out = run_with_timeout(&mut remote(&client, &key, &["receive", &id]), None, T);
    assert_eq!(stdout(&out), "", "received twice");
    // Bob, with the id, sees nothing and can do nothing.
    let bob_target = format!("bob@127.0.0.1:{}/{id}", agent.port());
    let bob = Client::new();
    for args in [
        vec!["receive", bob_target.as_str()],
        vec!["attach", bob_target.as_str()],
        vec!["exec", bob_target.as_str(), "--", "true"],
        vec!["session", "rm", bob_target.as_str()],
    ] {
        let out = run_with_timeout(&mut remote(&bob, &bob_key, &args), None, T);
        assert_eq!(out.status.code(), Some(255), "{args:?}");
        assert!(
            stderr(&out).contains(&format!("no session '{id}'")),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let out = run_with_timeout(
        &mut remote(
            &bob,
            &bob_key,
            &[
                "session",
                "list",
                &format!("bob@127.0.0.1:{}", agent.port()),
            ],
        ),
        None,
        T,
    );
    assert!(!stdout(&out).contains(&id));
}

#[tokio::test]
async fn terminal_session_detach_with_escape_and_reattach_from_elsewhere() {
    let (_agent, key, target) = setup();
    let first = Client::new();
    let id = new_session(&first, &key, &target, &["--terminal"]);
    let full = format!("{target}/{id}");
    let attach = |client: &Client| {
        let (pty, pts) = pty_process::open().unwrap();
        pty.resize(pty_process::Size::new(30, 100)).unwrap();
        let mut cmd = pty_process::Command::new(bin("remote"));
        cmd = cmd
            .env("HOME", client.home.path())
            .env("XDG_CONFIG_HOME", client.config_home())
            .env("TERM", "xterm")
            .args(["--batch", "--identity"])
            .arg(&key.private)
            .args(["attach", &full]);
        let child = cmd.spawn(pts).unwrap();
        let (reader, writer) = pty.into_split();
        (child, Screen::new(reader), writer)
    };
    let t = Duration::from_secs(20);
    let (mut child, mut screen, mut keys) = attach(&first);
    keys.write_all(b"echo M$((6*7)) $(stty size)\r")
        .await
        .unwrap();
    screen.expect("M42 30 100", t).await;
    // Leave something running that prints while nobody is attached, then Enter ~ .
    keys.write_all(b"sleep 1; echo AWAY$((1+1))\r")
        .await
        .unwrap();
    keys.write_all(b"~.").await.unwrap();
    let status = tokio::time::timeout(t, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "detach exits 0");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Another machine attaches and sees what was printed meanwhile; the shell's exit
    // code ends the attach.
    let second = Client::new();
    let (mut child, mut screen, mut keys) = attach(&second);
    screen.expect("AWAY2", t).await;
    keys.write_all(b"exit 4\r").await.unwrap();
    let status = tokio::time::timeout(t, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(4));
}
