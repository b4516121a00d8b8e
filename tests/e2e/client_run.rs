//! The `remote` client against real agents: `remote run` on one and several targets (output,
//! exit codes, stdin, quoting, JSON, throttle, Ctrl+C), trust on first use and refusal of a
//! changed host key, authentication failures and passwords, and `remote shell` in a terminal.
//! Every test has its own HOME and XDG_CONFIG_HOME, so known_hosts is private to it.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use remote_tests::*;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(60);

/// A private client environment: HOME and XDG_CONFIG_HOME in a temp dir, no ssh-agent,
/// no password from the environment, never a prompt.
fn target(agent: &Agent, user: &str) -> String {
    format!("{user}@127.0.0.1:{}", agent.port())
}

fn label(agent: &Agent) -> String {
    format!("127.0.0.1:{}", agent.port())
}

fn agent_with_alice() -> (Agent, ClientKey) {
    let agent = Agent::start();
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    (agent, key)
}

#[test]
fn one_target_passes_output_and_exit_code_through() {
    let (agent, key) = agent_with_alice();
    let client = Client::new();
    let t = target(&agent, "alice");
    let out = client.run(&key, &t, &[], &["echo out; echo err >&2; exit 3"], None);
    assert_eq!(stdout(&out), "out\n");
    assert!(stderr(&out).ends_with("err\n"), "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(3));

    // Binary-safe, no newline added.
    let out = client.run(&key, &t, &[], &[r"printf '\000\001\377x'"], None);
    assert_eq!(out.stdout, b"\x00\x01\xffx");
    assert_eq!(stderr(&out), "", "second contact is silent");
    assert_eq!(out.status.code(), Some(0));

    // Death by signal: 128 + signal number, like a shell.
    let out = client.run(&key, &t, &[], &["kill -TERM $$"], None);
    assert_eq!(out.status.code(), Some(128 + 15));
}

#[test]
fn arguments_are_quoted_and_one_argument_is_a_command_line() {
    let (agent, key) = agent_with_alice();
    let client = Client::new();
    let t = target(&agent, "alice");
    let out = client.run(&key, &t, &[], &["echo", "a b", "$HOME", "it's"], None);
    assert_eq!(stdout(&out), "a b $HOME it's\n");
    // A single argument is a shell command line: a pipeline, expansions.
    let out = client.run(&key, &t, &[], &["echo one two | wc -w"], None);
    assert_eq!(stdout(&out).trim(), "2");
    assert!(out.status.success());
}

#[test]
fn stdin_is_forwarded_to_a_single_target() {
    let (agent, key) = agent_with_alice();
    let client = Client::new();
    let t = target(&agent, "alice");
    let out = client.run(&key, &t, &[], &["cat"], Some(b"abc"));
    assert_eq!(stdout(&out), "abc");
    assert!(out.status.success());
    // EOF arrives after a larger input.
    let input = vec![7u8; 3 << 20];
    let out = client.run(&key, &t, &[], &["wc -c"], Some(&input));
    assert_eq!(stdout(&out).trim(), (3 << 20).to_string());
}

#[test]
fn several_targets_get_prefixed_lines_a_summary_and_the_first_nonzero_exit() {
    let a = Agent::start();
    let key = a.key("alice_key");
    let b = Agent::start();
    let c = Agent::start();
    for agent in [&a, &b, &c] {
        agent.add_user("alice", None, Some(&key));
    }
    let client = Client::new();
    let targets = [&a, &b, &c].map(|x| target(x, "alice")).join(",");
    // Exit codes 0, 3, 5 by port order; stdin is not forwarded (cat sees EOF at once).
    let ports = [a.port(), b.port(), c.port()];
    let script = format!(
        "cat; echo line1; printf 'no-newline'; echo warn >&2; \
         case $SSH_CONNECTION in *' {}') exit 0;; *' {}') exit 3;; *) exit 5;; esac",
        ports[0], ports[1]
    );
    let out = client.run(&key, &targets, &[], &[&script], Some(b"must not arrive\n"));
    let so = stdout(&out);
    let se = stderr(&out);
    for agent in [&a, &b, &c] {
        let l = label(agent);
        // Lines of one target stay whole and in order; other targets may come between.
        let mine: Vec<&str> = so
            .lines()
            .filter(|x| x.starts_with(&format!("{l}: ")))
            .collect();
        assert_eq!(
            mine,
            [format!("{l}: line1"), format!("{l}: no-newline")],
            "{so}"
        );
        assert!(se.contains(&format!("{l}: warn\n")), "{se}");
    }
    assert!(!so.contains("must not arrive"), "{so}");
    assert_eq!(so.lines().count(), 6, "{so}");
    // The summary comes last, in target order.
    let summary: Vec<&str> = se
        .lines()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert_eq!(
        summary,
        [
            format!("{}: exit 0", label(&a)),
            format!("{}: exit 3", label(&b)),
            format!("{}: exit 5", label(&c)),
        ],
        "{se}"
    );
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn json_gives_one_object_per_target_and_nothing_else() {
    let (agent, key) = agent_with_alice();
    let client = Client::new();
    let closed = closed_port();
    let targets = format!(
        "{},{},alice@127.0.0.1:{closed}",
        target(&agent, "alice"),
        target(&agent, "alice")
    );
    let out = client.run(
        &key,
        &targets,
        &["--json"],
        &["printf 'x\\n\"q\"\\t'; echo e >&2; exit 2"],
        None,
    );
    let so = stdout(&out);
    let lines: Vec<&str> = so.lines().collect();
    assert_eq!(lines.len(), 3, "{so}");
    let ok = format!(
        r#"{{"target":"{}","exit_code":2,"signal":null,"stdout":"x\n\"q\"\t","stderr":"e\n","error":null}}"#,
        target(&agent, "alice")
    );
    assert_eq!(lines[0], ok);
    assert_eq!(lines[1], ok);
    let failed = format!(
        r#"{{"target":"alice@127.0.0.1:{closed}","exit_code":null,"signal":null,"stdout":"","stderr":"","error":"connection to 127.0.0.1:{closed} refused: "#
    );
    assert!(lines[2].starts_with(&failed), "{}", lines[2]);
    assert!(lines[2].ends_with("\"}"), "{}", lines[2]);
    assert_eq!(out.status.code(), Some(2));

    // A signal is reported by name.
    let out = client.run(
        &key,
        &target(&agent, "alice"),
        &["--json"],
        &["kill -KILL $$"],
        None,
    );
    assert_eq!(
        stdout(&out),
        format!(
            "{{\"target\":\"{}\",\"exit_code\":137,\"signal\":\"KILL\",\"stdout\":\"\",\"stderr\":\"\",\"error\":null}}\n",
            target(&agent, "alice")
        )
    );
    assert_eq!(out.status.code(), Some(137));
}

#[test]
fn throttle_one_runs_targets_one_after_another_and_completes_all() {
    let (agent, key) = agent_with_alice();
    let client = Client::new();
    let t = target(&agent, "alice");
    let targets = [t.as_str(); 5].join(",");
    // Record first contact once, so the runs below do not race on known_hosts.
    client.run(&key, &t, &[], &["true"], None);
    let started = Instant::now();
    let out = client.run(
        &key,
        &targets,
        &["--throttle", "1"],
        &["sleep 0.3; echo done"],
        None,
    );
    let serial = started.elapsed();
    assert_eq!(
        stdout(&out).matches(": done\n").count(),
        5,
        "{}",
        stdout(&out)
    );
    assert_eq!(
        stderr(&out).matches(": exit 0\n").count(),
        5,
        "{}",
        stderr(&out)
    );
    assert!(serial >= Duration::from_millis(1500), "took {serial:?}");
    // Unthrottled, they overlap.
    let started = Instant::now();
    let out = client.run(&key, &targets, &[], &["sleep 1; echo done"], None);
    assert_eq!(stdout(&out).matches(": done\n").count(), 5);
    assert!(
        started.elapsed() < Duration::from_millis(4500),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn host_keys_are_learned_then_checked_and_a_changed_key_is_refused() {
    let (agent, key) = agent_with_alice();
    let client = Client::new();
    let t = target(&agent, "alice");
    let out = client.run(&key, &t, &[], &["true"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let known_hosts = client.known_hosts();
    let first = stderr(&out);
    assert!(
        first.starts_with(&format!(
            "remote: added host key for 127.0.0.1:{} (SHA256:",
            agent.port()
        )) && first
            .trim_end()
            .ends_with(&format!("to {}", known_hosts.display())),
        "{first}"
    );
    let text = std::fs::read_to_string(&known_hosts).unwrap();
    let prefix = format!("[127.0.0.1]:{} ssh-ed25519 ", agent.port());
    assert!(
        text.starts_with(&prefix) && text.lines().count() == 1,
        "{text}"
    );

    // Second contact: silent.
    let out = client.run(&key, &t, &[], &["true"], None);
    assert_eq!(stderr(&out), "");
    assert!(out.status.success());

    // Another key recorded for this host (on line 2): refused before anything runs.
    let other = agent.key("not_the_host_key");
    let other_pub = std::fs::read_to_string(&other.public).unwrap();
    let other_pub: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    std::fs::write(
        &known_hosts,
        format!(
            "# recorded earlier\n[127.0.0.1]:{} {}\n",
            agent.port(),
            other_pub.join(" ")
        ),
    )
    .unwrap();
    let marker = agent.dir.path().join("ran");
    let out = client.run(
        &key,
        &t,
        &[],
        &[&format!("touch {}", marker.display())],
        None,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert!(err.contains("CHANGED"), "{err}");
    assert!(
        err.contains(&format!("{}:2", known_hosts.display())),
        "{err}"
    );
    assert!(err.contains("delete line 2"), "{err}");
    assert!(!marker.exists(), "the command ran despite the changed key");
    // The file is left alone.
    assert_eq!(
        std::fs::read_to_string(&known_hosts)
            .unwrap()
            .lines()
            .count(),
        2
    );
}

#[test]
fn unauthorized_key_or_no_credentials_fail_clearly_with_255() {
    let (agent, _key) = agent_with_alice();
    let stranger = agent.key("stranger");
    let client = Client::new();
    let t = target(&agent, "alice");
    let out = client.run(&stranger, &t, &[], &["true"], None);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert!(
        err.contains(&format!(
            "remote: authentication as 'alice' to {} failed (tried: {})",
            label(&agent),
            stranger.private.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("remote-agent user add alice --authorized-key"),
        "{err}"
    );

    // No --identity, no agent, no ~/.ssh keys, no password, --batch.
    let mut cmd = client.remote();
    cmd.args(["run", &t, "--", "true"]);
    let out = run_with_timeout(&mut cmd, None, T);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert!(err.contains("no credentials to log in as 'alice'"), "{err}");
    assert!(err.contains("--identity FILE"), "{err}");
}

#[test]
fn default_key_files_and_the_ssh_agent_are_used_without_identity() {
    let (agent, key) = agent_with_alice();
    let t = target(&agent, "alice");

    // ~/.ssh/id_ed25519, unencrypted: used.
    let client = Client::new();
    let ssh_dir = client.home.path().join(".ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    std::fs::copy(&key.private, ssh_dir.join("id_ed25519")).unwrap();
    let mut cmd = client.remote();
    cmd.args(["run", &t, "--", "echo default-key"]);
    let out = run_with_timeout(&mut cmd, None, T);
    assert_eq!(stdout(&out), "default-key\n", "{}", stderr(&out));

    // An encrypted default key is skipped, and the failure says so.
    let client = Client::new();
    let ssh_dir = client.home.path().join(".ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    let status = Command::new(require_tool("ssh-keygen", "openssh-client"))
        .args(["-q", "-t", "ed25519", "-N", "secret phrase", "-f"])
        .arg(ssh_dir.join("id_ed25519"))
        .status()
        .unwrap();
    assert!(status.success());
    let mut cmd = client.remote();
    cmd.args(["run", &t, "--", "true"]);
    let out = run_with_timeout(&mut cmd, None, T);
    assert_eq!(out.status.code(), Some(255));
    let err = stderr(&out);
    assert!(err.contains("no credentials to log in as 'alice'"), "{err}");
    assert!(err.contains("id_ed25519: it is encrypted"), "{err}");
    assert!(err.contains("ssh-add"), "{err}");

    // The ssh-agent's keys (the encrypted file is still there, and still skipped).
    let sock = client.home.path().join("agent.sock");
    let mut ssh_agent = Command::new(require_tool("ssh-agent", "openssh-client"))
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let added = Command::new(require_tool("ssh-add", "openssh-client"))
        .arg("-q")
        .arg(&key.private)
        .env("SSH_AUTH_SOCK", &sock)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(added.success());
    let mut cmd = client.remote();
    cmd.env("SSH_AUTH_SOCK", &sock)
        .args(["run", &t, "--", "echo agent-key"]);
    let out = run_with_timeout(&mut cmd, None, T);
    let _ = ssh_agent.kill();
    let _ = ssh_agent.wait();
    assert_eq!(stdout(&out), "agent-key\n", "{}", stderr(&out));
    assert!(out.status.success());
}

#[test]
fn connection_refused_says_what_to_check() {
    let (agent, key) = agent_with_alice();
    let client = Client::new();
    let port = closed_port();
    let out = client.run(
        &key,
        &format!("alice@127.0.0.1:{port}"),
        &[],
        &["true"],
        None,
    );
    assert_eq!(out.status.code(), Some(255));
    assert_eq!(
        stderr(&out),
        format!(
            "remote: connection to 127.0.0.1:{port} refused: is remote-agent running there and listening on that port? (remote-agent status; --ssh)\n"
        )
    );
    // A relay:// target needs a relay to go through, and says how to name one.
    let out = client.run(&key, "relay://agent1", &[], &["true"], None);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("needs a relay: give --relay HOST[:PORT] or set REMOTE_RELAY"),
        "{}",
        stderr(&out)
    );
    drop(agent);
}

#[test]
fn password_from_stdin_or_environment_logs_in() {
    let agent = Agent::start();
    agent.add_user("bob", Some("s3cret pass"), None);
    let client = Client::new();
    let t = target(&agent, "bob");
    // The password is the first line; the rest of stdin is not forwarded.
    let mut cmd = client.remote();
    cmd.args(["--password-stdin", "run", &t, "--", "echo ok; cat"]);
    let out = run_with_timeout(&mut cmd, Some(b"s3cret pass\nnot for cat\n"), T);
    assert_eq!(stdout(&out), "ok\n", "{}", stderr(&out));
    assert!(out.status.success());

    let mut cmd = client.remote();
    cmd.env("REMOTE_PASSWORD", "s3cret pass")
        .args(["run", &t, "--", "echo env-ok"]);
    let out = run_with_timeout(&mut cmd, None, T);
    assert_eq!(stdout(&out), "env-ok\n", "{}", stderr(&out));

    let mut cmd = client.remote();
    cmd.args(["--password-stdin", "run", &t, "--", "true"]);
    let out = run_with_timeout(&mut cmd, Some(b"wrong\n"), T);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("failed (tried: password)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn ctrl_c_reaches_the_remote_command_and_twice_disconnects() {
    let (agent, key) = agent_with_alice();
    let client = Client::new();
    let t = target(&agent, "alice");
    let start = |script: &str| {
        let mut cmd = client.remote();
        cmd.arg("--identity")
            .arg(&key.private)
            .args(["run", &t, "--", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn remote");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read");
        assert_eq!(line, "ready\n");
        (child, out)
    };
    let interrupt = |pid: u32| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .expect("kill");
    };

    // One Ctrl+C: the command's trap runs and its exit code comes back.
    let (mut child, mut out) = start("trap 'echo got-int; exit 9' INT; echo ready; sleep 30");
    interrupt(child.id());
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    assert_eq!(rest, "got-int\n");
    assert_eq!(status.code(), Some(9));

    // A command that ignores INT: the second Ctrl+C disconnects at once.
    let (mut child, _out) = start("trap '' INT; echo ready; sleep 30");
    let started = Instant::now();
    interrupt(child.id());
    std::thread::sleep(Duration::from_millis(300));
    interrupt(child.id());
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(130));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn shell_without_a_terminal_reads_commands_from_stdin() {
    let (agent, key) = agent_with_alice();
    let client = Client::new();
    let mut cmd = client.remote();
    cmd.arg("--identity")
        .arg(&key.private)
        .args(["shell", &target(&agent, "alice")]);
    let out = run_with_timeout(
        &mut cmd,
        Some(b"echo S$((6*7)); test -t 0 || echo NOTTY; exit 4\n"),
        T,
    );
    assert_eq!(stdout(&out), "S42\nNOTTY\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(4));
}

/// `remote shell` inside a local terminal, wrapped in `sh` that saves the terminal settings
/// (`stty -g`) before and after, and exits with remote's exit code.
fn shell_in_terminal(
    client: &Client,
    key: &ClientKey,
    target: &str,
) -> (
    pty_process::OwnedReadPty,
    pty_process::OwnedWritePty,
    tokio::process::Child,
    PathBuf,
) {
    let dir = client.home.path().to_path_buf();
    let (pty, pts) = pty_process::open().unwrap();
    pty.resize(pty_process::Size::new(24, 80)).unwrap();
    let script = r#"stty -g > "$D/before"; "$R" --batch --identity "$K" shell "$TGT"; rc=$?; stty -g > "$D/after"; echo "remote-exit=$rc"; exit $rc"#;
    let child = pty_process::Command::new("/bin/sh")
        .args(["-c", script])
        .env("D", &dir)
        .env("R", bin("remote"))
        .env("K", &key.private)
        .env("TGT", target)
        .env("TERM", "xterm")
        .env("HOME", client.home.path())
        .env("XDG_CONFIG_HOME", client.config_home())
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("REMOTE_PASSWORD")
        .spawn(pts)
        .unwrap();
    let (reader, writer) = pty.into_split();
    (reader, writer, child, dir)
}

#[tokio::test]
async fn shell_in_a_terminal_has_a_pty_follows_resizes_and_restores_the_terminal() {
    let (agent, key) = agent_with_alice();
    let client = Client::new();
    let (reader, mut writer, mut child, dir) =
        shell_in_terminal(&client, &key, &target(&agent, "alice"));
    let mut screen = Screen::new(reader);
    let t = Duration::from_secs(20);
    writer
        .write_all(b"export PS1='$ '; echo M$((6*7)) $(tty) $TERM\n")
        .await
        .unwrap();
    screen.expect("M42 /dev/pts/", t).await;
    screen.expect(" xterm", t).await;
    writer.write_all(b"echo S $(stty size)\n").await.unwrap();
    screen.expect("S 24 80", t).await;
    // The local terminal is in raw mode: ^C travels as a byte and the remote pty turns it
    // into SIGINT for the foreground command.
    writer.write_all(b"sleep 100; echo SLEPT\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    writer.write_all(&[3]).await.unwrap();
    writer.write_all(b"echo A$((6*7))\n").await.unwrap();
    screen.expect("A42", t).await;
    assert!(!screen.seen.contains("SLEPT"));
    // A local resize (SIGWINCH) becomes a window-change.
    writer.resize(pty_process::Size::new(40, 120)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    writer.write_all(b"echo S $(stty size)\n").await.unwrap();
    screen.expect("S 40 120", t).await;
    writer.write_all(b"exit 5\n").await.unwrap();
    screen.expect("remote-exit=5", t).await;
    let status = tokio::time::timeout(t, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(5));
    let before = std::fs::read_to_string(dir.join("before")).unwrap();
    let after = std::fs::read_to_string(dir.join("after")).unwrap();
    assert!(!before.trim().is_empty());
    assert_eq!(before, after, "terminal settings not restored");
}

#[tokio::test]
async fn shell_restores_the_terminal_when_the_connection_drops() {
    let (mut agent, key) = agent_with_alice();
    let client = Client::new();
    let (reader, mut writer, mut child, dir) =
        shell_in_terminal(&client, &key, &target(&agent, "alice"));
    let mut screen = Screen::new(reader);
    let t = Duration::from_secs(20);
    writer.write_all(b"echo M$((6*7))\n").await.unwrap();
    screen.expect("M42", t).await;
    // The agent goes away under the session.
    let stopper = tokio::task::spawn_blocking(move || {
        agent.stop();
        agent
    });
    screen.expect("remote-exit=", t).await;
    let status = tokio::time::timeout(t, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(status.code(), Some(0));
    let _agent = stopper.await.unwrap();
    let before = std::fs::read_to_string(dir.join("before")).unwrap();
    let after = std::fs::read_to_string(dir.join("after")).unwrap();
    assert_eq!(before, after, "terminal settings not restored");
}

#[test]
fn help_lists_the_commands_of_the_contract() {
    let client = Client::new();
    let mut cmd = client.remote();
    cmd.arg("--help");
    let out = run_with_timeout(&mut cmd, None, T);
    let text = stdout(&out);
    for command in [
        "run", "shell", "session", "exec", "attach", "receive", "test",
    ] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "{command} not listed:\n{text}"
        );
    }
}

/// A local port with nothing listening on it.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn wait_timeout(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("remote did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
