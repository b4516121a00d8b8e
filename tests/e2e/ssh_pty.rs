//! Interactive use: OpenSSH's `ssh -tt` run inside a local pseudo-terminal, as a person
//! would, against the agent: a remote pty, window changes, Ctrl+C, and exit codes.

use std::time::Duration;

use remote_tests::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn interactive_shell_with_pty_resize_ctrl_c_and_exit_code() {
    let agent = Agent::start();
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));

    let (pty, pts) = pty_process::open().unwrap();
    pty.resize(pty_process::Size::new(24, 80)).unwrap();
    let mut args = ssh_options(agent.port());
    args.extend(["-o", "BatchMode=yes", "-tt", "-i"].map(String::from));
    args.push(key.private.to_string_lossy().into_owned());
    args.push("alice@127.0.0.1".into());
    let mut child = pty_process::Command::new(require_tool("ssh", "openssh-client"))
        .args(&args)
        .env("TERM", "xterm")
        .spawn(pts)
        .unwrap();
    let (reader, mut writer) = pty.into_split();
    let mut screen = Screen::new(reader);
    let t = Duration::from_secs(20);

    // A remote terminal: tty names a pseudo-terminal, TERM came through.
    writer
        .write_all(b"export PS1='$ '; echo T$((40+2)) $(tty) $TERM\n")
        .await
        .unwrap();
    screen.expect("T42 /dev/pts/", t).await;
    screen.expect(" xterm", t).await;

    writer.write_all(b"echo S $(stty size)\n").await.unwrap();
    screen.expect("S 24 80", t).await;

    // Resizing the local terminal sends SIGWINCH to ssh, which sends window-change.
    writer.resize(pty_process::Size::new(40, 120)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    writer.write_all(b"echo S $(stty size)\n").await.unwrap();
    screen.expect("S 40 120", t).await;

    // Ctrl+C interrupts a foreground command through the remote line discipline.
    writer.write_all(b"sleep 100; echo SLEPT\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    writer.write_all(&[3]).await.unwrap();
    writer.write_all(b"echo A$((6*7))\n").await.unwrap();
    screen.expect("A42", Duration::from_secs(10)).await;
    assert!(!screen.seen.contains("SLEPT"));

    writer.write_all(b"exit 7\n").await.unwrap();
    let status = tokio::time::timeout(t, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(7));
}

#[test]
fn exec_with_forced_pty_gets_a_terminal() {
    let agent = Agent::start();
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    let out = run_with_timeout(
        agent
            .ssh("alice", &key)
            .arg("-tt")
            .arg("tty; test -t 0 && echo ISATTY"),
        None,
        Duration::from_secs(30),
    );
    let text = stdout(&out);
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("ISATTY"), "{text}");
    // Without -t there is no terminal.
    let out = run_with_timeout(
        agent.ssh("alice", &key).arg("test -t 0 || echo NOTTY"),
        None,
        Duration::from_secs(30),
    );
    assert_eq!(stdout(&out), "NOTTY\n");
}
