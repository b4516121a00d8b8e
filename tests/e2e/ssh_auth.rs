//! Authentication: passwords and keys against the agent's accounts, refusals, per-account
//! keys, and account removal taking effect without a restart.

use std::time::{Duration, Instant};

use remote_tests::*;

const T: Duration = Duration::from_secs(60);

#[test]
fn password_right_and_wrong() {
    let mut agent = Agent::start();
    agent.add_user("alice", Some("correct horse"), None);
    let out = run_with_timeout(
        agent.ssh_password("alice", "correct horse").arg("echo in"),
        None,
        T,
    );
    assert_eq!(stdout(&out), "in\n", "{}", stderr(&out));

    let started = Instant::now();
    let out = run_with_timeout(
        agent.ssh_password("alice", "Wr0ng-Passw0rd").arg("echo in"),
        None,
        T,
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");
    // Failures are slowed down (at least the rejection delay).
    assert!(started.elapsed() >= Duration::from_millis(250));
    // And logged with the peer address.
    assert!(
        agent.wait_log("authentication failed", Duration::from_secs(5)),
        "{}",
        agent.log()
    );
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("authentication failed"))
        .unwrap();
    assert!(line.contains("127.0.0.1"), "{line}");
    assert!(
        !log.contains("Wr0ng-Passw0rd"),
        "the password must never be logged"
    );

    // Unknown user: refused the same way.
    let out = run_with_timeout(
        agent.ssh_password("mallory", "correct horse").arg("true"),
        None,
        T,
    );
    assert_eq!(out.status.code(), Some(255));
}

#[test]
fn keys_belong_to_their_account_only() {
    let agent = Agent::start();
    let alice = agent.key("alice_key");
    let bob = agent.key("bob_key");
    let stranger = agent.key("stranger_key");
    agent.add_user("alice", None, Some(&alice));
    agent.add_user("bob", None, Some(&bob));

    let ok = run_with_timeout(agent.ssh("alice", &alice).arg("echo $USER-ok"), None, T);
    assert!(stdout(&ok).ends_with("-ok\n"), "{}", stderr(&ok));
    let ok = run_with_timeout(agent.ssh("bob", &bob).arg("echo ok"), None, T);
    assert_eq!(stdout(&ok), "ok\n");

    for (user, key) in [("alice", &bob), ("bob", &alice), ("alice", &stranger)] {
        let out = run_with_timeout(agent.ssh(user, key).arg("echo in"), None, T);
        assert_eq!(
            out.status.code(),
            Some(255),
            "{user} with the wrong key got in"
        );
        assert!(
            stderr(&out).contains("Permission denied"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn removed_account_is_refused_without_restart() {
    let agent = Agent::start();
    let key = agent.key("alice_key");
    agent.add_user("alice", Some("pw-alice"), Some(&key));
    let out = run_with_timeout(agent.ssh("alice", &key).arg("echo ok"), None, T);
    assert_eq!(stdout(&out), "ok\n");

    let listed = stdout(&agent.user(&["list"], None));
    assert!(listed.starts_with("alice\t"), "{listed}");
    agent.user(&["rm", "alice"], None);
    let out = run_with_timeout(agent.ssh("alice", &key).arg("echo ok"), None, T);
    assert_eq!(
        out.status.code(),
        Some(255),
        "removed account still logs in"
    );
    let out = run_with_timeout(
        agent.ssh_password("alice", "pw-alice").arg("echo ok"),
        None,
        T,
    );
    assert_eq!(out.status.code(), Some(255));

    // Adding it back works, again without a restart.
    agent.add_user("alice", None, Some(&key));
    let out = run_with_timeout(agent.ssh("alice", &key).arg("echo ok"), None, T);
    assert_eq!(stdout(&out), "ok\n");
}

#[test]
fn account_file_is_private_and_hashes_with_argon2id() {
    let agent = Agent::start();
    agent.add_user("alice", Some("s3cret-pw"), None);
    let path = agent.state_dir.join("accounts.toml");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("$argon2id$"), "{text}");
    assert!(!text.contains("s3cret-pw"));
    let host_key = agent.state_dir.join("ssh_host_ed25519_key");
    let meta = std::fs::metadata(&host_key).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
}
