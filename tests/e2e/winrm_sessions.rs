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
