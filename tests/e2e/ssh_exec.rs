//! OpenSSH's `ssh` running commands on the agent: output streams, exit codes and signals,
//! stdin, bulk data, environment, and refused forwarding.

use std::time::Duration;

use remote_tests::*;

const T: Duration = Duration::from_secs(60);

fn agent_with_alice() -> (Agent, ClientKey) {
    let agent = Agent::start();
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    (agent, key)
}

#[test]
fn exec_separates_stdout_stderr_and_returns_exit_code() {
    let (agent, key) = agent_with_alice();
    let out = run_with_timeout(
        agent
            .ssh("alice", &key)
            .arg("echo out; echo err >&2; exit 3"),
        None,
        T,
    );
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn exec_reports_death_by_signal() {
    let (agent, key) = agent_with_alice();
    // OpenSSH's client logs the exit-signal request at debug level and exits 255.
    let out = run_with_timeout(
        agent.ssh("alice", &key).arg("-v").arg("kill -TERM $$"),
        None,
        T,
    );
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("rtype exit-signal"),
        "the agent did not send exit-signal: {}",
        stderr(&out)
    );
    // And the signal's name, read with an SSH library.
    let (sig, code) = russh_exec(&agent, &key, "alice", "kill -TERM $$", None);
    assert_eq!(sig.as_deref(), Some("TERM"));
    assert_eq!(code, None);
    let (sig, code) = russh_exec(&agent, &key, "alice", "exit 0", None);
    assert_eq!((sig, code), (None, Some(0)));
}

#[test]
fn signal_requests_reach_the_command() {
    let (agent, key) = agent_with_alice();
    // `exec` replaces the shell, so the signal lands on sleep itself.
    let (sig, code) = russh_exec(
        &agent,
        &key,
        "alice",
        "exec sleep 100",
        Some(russh::Sig::INT),
    );
    assert_eq!((sig.as_deref(), code), (Some("INT"), None));
    // A shell that traps the signal reports its own exit code.
    let (sig, code) = russh_exec(
        &agent,
        &key,
        "alice",
        "trap 'exit 42' USR1; sleep 100 & wait",
        Some(russh::Sig::USR1),
    );
    assert_eq!((sig, code), (None, Some(42)));
}

#[test]
fn stdin_is_passed_through() {
    let (agent, key) = agent_with_alice();
    let out = run_with_timeout(agent.ssh("alice", &key).arg("cat"), Some(b"abc"), T);
    assert_eq!(stdout(&out), "abc");
    assert!(out.status.success());
    // EOF reaches the command: wc sees the end of input.
    let out = run_with_timeout(agent.ssh("alice", &key).arg("wc -c"), Some(&[7u8; 1000]), T);
    assert_eq!(stdout(&out).trim(), "1000");
}

#[test]
fn hundred_mib_through_cat_arrives_intact() {
    let (agent, key) = agent_with_alice();
    let input = agent.dir.path().join("in.bin");
    let output = agent.dir.path().join("out.bin");
    random_file(&input, 100 << 20, 7);
    let status = agent
        .ssh("alice", &key)
        .arg("cat")
        .stdin(std::fs::File::open(&input).unwrap())
        .stdout(std::fs::File::create(&output).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(same_contents(&input, &output), "100 MiB through cat differ");
}

#[test]
fn only_allow_listed_environment_is_accepted() {
    let (agent, key) = agent_with_alice();
    let out = run_with_timeout(
        agent
            .ssh("alice", &key)
            .args([
                "-o",
                "SendEnv=LANG",
                "-o",
                "SendEnv=LC_TIME",
                "-o",
                "SendEnv=EVIL",
            ])
            .env("LANG", "C.UTF-8")
            .env("LC_TIME", "POSIX")
            .env("EVIL", "1")
            .arg("echo \"$LANG|$LC_TIME|${EVIL:-unset}|$SSH_CONNECTION\""),
        None,
        T,
    );
    let line = stdout(&out);
    assert!(line.starts_with("C.UTF-8|POSIX|unset|127.0.0.1 "), "{line}");
}

#[test]
fn forwarding_is_refused_with_a_clear_reason() {
    let (agent, key) = agent_with_alice();
    let out = run_with_timeout(
        agent.ssh("alice", &key).args(["-v", "-W", "127.0.0.1:9"]),
        None,
        T,
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("port forwarding is disabled"),
        "{}",
        stderr(&out)
    );
    let out = run_with_timeout(
        agent.ssh("alice", &key).args([
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            "127.0.0.1:0:127.0.0.1:9",
            "-N",
        ]),
        None,
        T,
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("forwarding failed"),
        "{}",
        stderr(&out)
    );
}

/// Run `command` with russh's client, sending `signal` half a second in; returns
/// (exit signal name, exit status).
fn russh_exec(
    agent: &Agent,
    key: &ClientKey,
    user: &str,
    command: &str,
    signal: Option<russh::Sig>,
) -> (Option<String>, Option<u32>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        struct Accept;
        impl russh::client::Handler for Accept {
            type Error = russh::Error;
            async fn check_server_key(
                &mut self,
                _: &russh::keys::PublicKeyOrCertificate,
            ) -> Result<bool, Self::Error> {
                Ok(true)
            }
        }
        let config = std::sync::Arc::new(russh::client::Config::default());
        let mut session = russh::client::connect(config, agent.addr, Accept)
            .await
            .unwrap();
        let private = russh::keys::load_secret_key(&key.private, None).unwrap();
        let auth = session
            .authenticate_publickey(
                user,
                russh::keys::PrivateKeyWithHashAlg::new(std::sync::Arc::new(private), None),
            )
            .await
            .unwrap();
        assert!(auth.success());
        let mut channel = session.channel_open_session().await.unwrap();
        channel.exec(true, command).await.unwrap();
        if let Some(signal) = signal {
            tokio::time::sleep(Duration::from_millis(500)).await;
            channel.signal(signal).await.unwrap();
        }
        let (mut sig, mut code) = (None, None);
        while let Some(msg) = channel.wait().await {
            match msg {
                russh::ChannelMsg::ExitSignal { signal_name, .. } => {
                    sig = Some(format!("{signal_name:?}"))
                }
                russh::ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status),
                _ => {}
            }
        }
        (sig, code)
    })
}
