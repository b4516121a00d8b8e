//! WinRM quotas, faults and housekeeping with pywinrm: shells per user and commands per
//! shell (QuotaLimit), unknown ShellId (InvalidSelectors), the Receive long-poll's TimedOut
//! fault and pywinrm's retry, and idle shells reaped (config and the client's IdleTimeOut).

use std::time::Duration;

use remote_tests::winrm::*;
use remote_tests::*;

const PW: &str = "Alice-pw-1";
const NO_SUCH_SHELL: &str = "0F0F0F0F-0000-4000-8000-000000000000";

fn agent(config: &str) -> Agent {
    let agent = Agent::start_winrm(
        AgentOptions {
            config: config.into(),
            ..Default::default()
        },
        WinrmOptions::both(),
    );
    agent.add_user("alice", Some(PW), None);
    agent.add_user("bob", Some("Bob-pw-2"), None);
    agent
}

#[test]
fn shells_per_user_are_limited() {
    let agent = agent("[winrm]\nmax_shells_per_user = 3\n");
    let alice = pywinrm(&https_url(&agent), "basic", "alice", PW);
    let bob = pywinrm(&https_url(&agent), "basic", "bob", "Bob-pw-2");
    let r = py(&[
        with(&alice, json!({"op": "open_shells", "count": 4})),
        with(&bob, json!({"op": "open_shells", "count": 1})),
    ]);
    let shells = r[0]["shells"].as_array().unwrap();
    assert_eq!(shells.len(), 3, "{:#}", r[0]);
    assert_eq!(
        fault_code(&r[0]),
        Some(2150859173),
        "QuotaLimit: {:#}",
        r[0]
    );
    assert_eq!(
        r[0]["error"]["fault_subcode"]
            .as_str()
            .map(|s| s.ends_with("QuotaLimit")),
        Some(true),
        "{:#}",
        r[0]
    );
    // The quota is per user.
    assert_eq!(ok(&r[1])["shells"].as_array().unwrap().len(), 1);
    // Closing one makes room for one.
    let r = py(&[
        with(&alice, json!({"op": "close_shell", "shell": shells[0]})),
        with(&alice, json!({"op": "open_shells", "count": 2})),
        with(
            &alice,
            json!({"op": "run_in_shell", "shell": shells[1], "command": "echo still here"}),
        ),
    ]);
    ok(&r[0]);
    assert_eq!(r[1]["shells"].as_array().unwrap().len(), 1, "{:#}", r[1]);
    assert_eq!(fault_code(&r[1]), Some(2150859173), "{:#}", r[1]);
    assert_eq!(ok(&r[2])["stdout"], "still here\n");
}

#[test]
fn commands_per_shell_are_limited() {
    let agent = agent("[winrm]\nmax_commands_per_shell = 2\n");
    let alice = pywinrm(&https_url(&agent), "basic", "alice", PW);
    let r = py1(with(
        &alice,
        json!({"op": "commands_quota", "count": 3, "command": "sleep 30"}),
    ));
    assert_eq!(r["started"], 2, "{r:#}");
    assert_eq!(fault_code(&r), Some(2150859174), "{r:#}");
    // Ansible recreates its shell on exactly this (spec §3.7).
    assert_eq!(r["error"]["wmierror_code"], 2150859174u64, "{r:#}");
    assert_eq!(r["after"]["stdout"], "again\n", "{r:#}");
}

#[test]
fn unknown_shell_ids_fault() {
    let agent = agent("");
    let basic = pywinrm(&https_url(&agent), "basic", "alice", PW);
    // Over NTLM with message encryption the fault comes back sealed.
    let ntlm = pywinrm(&http_url(&agent), "ntlm", "alice", PW);
    let mut ops = Vec::new();
    for conn in [&basic, &ntlm] {
        ops.push(with(
            conn,
            json!({"op": "run_in_shell", "shell": NO_SUCH_SHELL, "command": "true"}),
        ));
        ops.push(with(
            conn,
            json!({"op": "close_shell", "shell": NO_SUCH_SHELL}),
        ));
    }
    let r = py(&ops);
    for r in &r {
        assert_eq!(error_type(r), Some("WSManFaultError"), "{r:#}");
        assert_eq!(fault_code(r), Some(2150858843), "{r:#}");
        assert_eq!(r["error"]["code"], 500, "{r:#}");
    }
}

#[test]
fn receive_times_out_with_a_fault_and_pywinrm_retries() {
    let agent = agent("");
    for conn in [
        pywinrm(&http_url(&agent), "ntlm", "alice", PW),
        pywinrm(&https_url(&agent), "basic", "alice", PW),
    ] {
        // OperationTimeout PT1S; `sleep 2` says nothing for 2 s.
        let r = py1(with(
            &conn,
            json!({"op": "receive_timeout", "op_timeout": 1, "read_timeout": 10,
                   "command": "sleep 2; echo done", "command2": "sleep 1.2; echo done"}),
        ));
        let r = ok(&r);
        assert!(
            r["timeouts"].as_u64().unwrap() >= 1,
            "no TimedOut fault: {r:#}"
        );
        for w in r["timeout_waits"].as_array().unwrap() {
            let w = w.as_f64().unwrap();
            // Held (a long-poll), but answered no later than the OperationTimeout.
            assert!((0.3..=1.5).contains(&w), "a TimedOut after {w} s: {r:#}");
        }
        assert_eq!(r["stdout"], "done\n", "{r:#}");
        assert_eq!(r["status"], 0, "{r:#}");
        assert_eq!(r["stdout2"], "done\n", "{r:#}");
        assert_eq!(r["status2"], 0, "{r:#}");
        let elapsed = r["elapsed"].as_f64().unwrap();
        assert!((1.9..8.0).contains(&elapsed), "{r:#}");
    }
}

#[test]
fn idle_shells_are_reaped_after_the_configured_timeout() {
    let agent = agent("[winrm]\nidle_timeout_secs = 2\n");
    let alice = pywinrm(&https_url(&agent), "basic", "alice", PW);
    let r = py1(with(&alice, json!({"op": "open_shells", "count": 2})));
    let shells: Vec<String> = ok(&r)["shells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    // The second one is kept busy, the first left alone.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(4500) {
        let r = py1(with(
            &alice,
            json!({"op": "run_in_shell", "shell": shells[1], "command": "echo busy"}),
        ));
        assert_eq!(ok(&r)["stdout"], "busy\n");
        std::thread::sleep(Duration::from_millis(300));
    }
    let r = py(&[
        with(
            &alice,
            json!({"op": "run_in_shell", "shell": shells[0], "command": "true"}),
        ),
        with(
            &alice,
            json!({"op": "run_in_shell", "shell": shells[1], "command": "echo alive"}),
        ),
    ]);
    assert_eq!(
        fault_code(&r[0]),
        Some(2150858843),
        "not reaped: {:#}",
        r[0]
    );
    assert_eq!(ok(&r[1])["stdout"], "alive\n");
}

#[test]
fn idle_timeout_asked_by_the_client_is_honoured() {
    let agent = agent("");
    let alice = pywinrm(&https_url(&agent), "basic", "alice", PW);
    let r = py(&[
        with(
            &alice,
            json!({"op": "open_shells", "count": 1, "idle_timeout": "PT2S"}),
        ),
        with(&alice, json!({"op": "open_shells", "count": 1})),
    ]);
    let short = ok(&r[0])["shells"][0].as_str().unwrap().to_string();
    let long = ok(&r[1])["shells"][0].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(5));
    let r = py(&[
        with(
            &alice,
            json!({"op": "run_in_shell", "shell": short, "command": "true"}),
        ),
        with(
            &alice,
            json!({"op": "run_in_shell", "shell": long, "command": "echo alive"}),
        ),
    ]);
    assert_eq!(
        fault_code(&r[0]),
        Some(2150858843),
        "not reaped: {:#}",
        r[0]
    );
    assert_eq!(ok(&r[1])["stdout"], "alive\n");
}
