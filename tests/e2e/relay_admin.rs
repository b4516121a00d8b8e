//! `remote-relay` administration: join tokens for agents and user tokens are printed alone on
//! the last line of stdout; a join token enrols one agent, once; a user's token identifies
//! them until they are removed. Enrolment here goes through the relay's store directly, as the
//! relay server's Enrol call does (tests/e2e/relay.rs drives the server itself).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use remote_relay::store::Store;
use remote_tests::*;

const T: Duration = Duration::from_secs(60);

fn relay(data: &Path, args: &[&str]) -> std::process::Output {
    run_with_timeout(
        Command::new(bin("remote-relay"))
            .args(args)
            .arg("--data-dir")
            .arg(data),
        None,
        T,
    )
}

fn last_line(out: &std::process::Output) -> String {
    stdout(out).lines().last().unwrap_or_default().to_string()
}

#[tokio::test]
async fn join_tokens_enrol_once_and_user_tokens_identify_until_removed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let out = relay(&data, &["token", "create", "--agent", "--ttl", "10m"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = last_line(&out);
    assert!(token.starts_with("rj_"), "{token:?}");
    let out = relay(&data, &["token", "create"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--agent"), "{}", stderr(&out));

    let out = relay(&data, &["user", "add", "alice"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let alice = last_line(&out);
    assert!(alice.starts_with("ru_"), "{alice:?}");
    let out = relay(&data, &["user", "add", "alice"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("relay.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let store = Store::open(&Store::sqlite_url(&data.join("relay.db")))
        .await
        .unwrap();
    let credential = store.redeem_join_token(&token, "agent1").await.unwrap();
    assert_eq!(store.verify_agent(&credential).await.unwrap(), "agent1");
    assert!(
        store.redeem_join_token(&token, "agent2").await.is_err(),
        "a token enrols once"
    );
    assert!(
        store
            .verify_agent("ra_AAAAAAAAAAAAAAAA.wrong")
            .await
            .is_err()
    );
    assert_eq!(store.verify_user(&alice).await.unwrap(), "alice");
    store.close().await;

    let out = relay(&data, &["agent", "list"]);
    assert!(stdout(&out).starts_with("agent1\t"), "{}", stdout(&out));
    let out = relay(&data, &["user", "rm", "alice"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let store = Store::open(&Store::sqlite_url(&data.join("relay.db")))
        .await
        .unwrap();
    assert!(
        store.verify_user(&alice).await.is_err(),
        "removed users are refused"
    );
}
