//! paramiko (pinned in tests/interop/requirements.txt) against the agent.

use std::time::Duration;

use remote_tests::*;

#[test]
fn paramiko_runs_commands_and_reads_exit_codes() {
    let agent = Agent::start();
    let key = agent.key("alice_key");
    agent.add_user("alice", Some("pw-alice"), Some(&key));
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/paramiko_client.py");
    let out = run_with_timeout(
        std::process::Command::new(python())
            .arg(&script)
            .arg(agent.port().to_string())
            .arg(&key.private),
        None,
        Duration::from_secs(90),
    );
    assert_eq!(
        stdout(&out).trim(),
        "OK",
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}
