//! A WinRM shell is a commands session of the agent's session host: `remote session list`
//! over SSH shows it to the same account and to no other; it is gone once the shell is
//! deleted; another account cannot use it by its ShellId.

use std::time::Duration;

use remote_tests::winrm::*;
use remote_tests::*;

const T: Duration = Duration::from_secs(60);

/// The session rows (not the header) `remote session list` shows `user`.
fn sessions(agent: &Agent, client: &Client, key: &ClientKey, user: &str) -> Vec<String> {
    let target = format!("{user}@127.0.0.1:{}", agent.port());
    let mut cmd = client.remote();
    cmd.arg("--identity")
        .arg(&key.private)
        .args(["session", "list", &target]);
    let out = run_with_timeout(&mut cmd, None, T);
    assert!(out.status.success(), "session list: {}", stderr(&out));
    stdout(&out)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("ID "))
        .map(String::from)
        .collect()
}

#[test]
fn winrm_shell_is_a_session_listed_for_its_owner_only() {
    let agent = Agent::start_winrm(AgentOptions::default(), WinrmOptions::both());
    let alice_key = agent.key("alice_key");
    let bob_key = agent.key("bob_key");
    agent.add_user("alice", Some("Alice-pw-1"), Some(&alice_key));
    agent.add_user("bob", Some("Bob-pw-2"), Some(&bob_key));
    let client = Client::new();
    assert_eq!(
        sessions(&agent, &client, &alice_key, "alice"),
        Vec::<String>::new()
    );
    let alice = pywinrm(&https_url(&agent), "basic", "alice", "Alice-pw-1");
    let bob = pywinrm(&https_url(&agent), "basic", "bob", "Bob-pw-2");
    let r = py1(with(&alice, json!({"op": "open_shells", "count": 1})));
    let shell = ok(&r)["shells"][0].as_str().unwrap().to_string();
    // Left open by the client (no Delete): alice sees one commands session, bob none.
    let rows = sessions(&agent, &client, &alice_key, "alice");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].contains("commands"), "{rows:?}");
    assert_eq!(
        sessions(&agent, &client, &bob_key, "bob"),
        Vec::<String>::new()
    );
    // Bob's own shell is his alone.
    let r = py1(with(&bob, json!({"op": "open_shells", "count": 1})));
    ok(&r);
    assert_eq!(sessions(&agent, &client, &bob_key, "bob").len(), 1);
    assert_eq!(sessions(&agent, &client, &alice_key, "alice").len(), 1);
    // Bob cannot use or close alice's shell: it does not exist for him (spec §4).
    let r = py(&[
        with(
            &bob,
            json!({"op": "run_in_shell", "shell": shell, "command": "echo hijacked"}),
        ),
        with(&bob, json!({"op": "close_shell", "shell": shell})),
        with(
            &alice,
            json!({"op": "run_in_shell", "shell": shell, "command": "echo mine"}),
        ),
    ]);
    assert_eq!(fault_code(&r[0]), Some(2150858843), "{:#}", r[0]);
    assert_eq!(fault_code(&r[1]), Some(2150858843), "{:#}", r[1]);
    assert_eq!(ok(&r[2])["stdout"], "mine\n");
    // Deleted by its owner: the session is gone.
    let r = py1(with(&alice, json!({"op": "close_shell", "shell": shell})));
    ok(&r);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let rows = sessions(&agent, &client, &alice_key, "alice");
        if rows.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still listed after Delete: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Output of a command started over WinRM is received over SSH with `remote receive`
/// (TARGET/ID of the session), and then not again over WinRM: exactly once, whichever
/// transport asks.
#[test]
fn winrm_output_is_received_over_ssh_exactly_once() {
    let agent = Agent::start_winrm(AgentOptions::default(), WinrmOptions::both());
    let key = agent.key("alice_key");
    agent.add_user("alice", Some("Alice-pw-1"), Some(&key));
    let client = Client::new();
    let alice = pywinrm(&https_url(&agent), "basic", "alice", "Alice-pw-1");
    let r = py1(with(&alice, json!({"op": "open_shells", "count": 1})));
    let shell = ok(&r)["shells"][0].as_str().unwrap().to_string();
    let r = py1(with(
        &alice,
        json!({"op": "start_in_shell", "shell": shell, "command": "echo from-winrm; echo warn >&2; exit 4"}),
    ));
    let command = ok(&r)["command"].as_str().unwrap().to_string();
    let rows = sessions(&agent, &client, &key, "alice");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let id = rows[0].split_whitespace().next().unwrap().to_string();
    let target = format!("alice@127.0.0.1:{}/{id}", agent.port());
    let mut got = (String::new(), String::new());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !got.1.contains("exit") && std::time::Instant::now() < deadline {
        let mut cmd = client.remote();
        cmd.arg("--identity")
            .arg(&key.private)
            .args(["receive", &target]);
        let out = run_with_timeout(&mut cmd, None, T);
        assert!(out.status.success(), "receive: {}", stderr(&out));
        got.0.push_str(&stdout(&out));
        got.1.push_str(&stderr(&out));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(got.0, "from-winrm\n", "stderr: {}", got.1);
    assert!(got.1.contains("warn"), "{}", got.1);
    assert!(got.1.contains('4'), "the exit code is reported: {}", got.1);
    // Over WinRM the command is done, and its output is not delivered a second time.
    let r = py1(with(
        &alice,
        json!({"op": "receive_command", "shell": shell, "command_id": command}),
    ));
    let r = ok(&r);
    assert_eq!(r["stdout"], "", "{r:#}");
    assert_eq!(r["stderr"], "", "{r:#}");
}
