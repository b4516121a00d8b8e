//! File transfer with OpenSSH's `sftp` and `scp` (which speaks SFTP in current OpenSSH).

use std::time::Duration;

use remote_tests::*;

const T: Duration = Duration::from_secs(120);

fn sftp(agent: &Agent, key: &ClientKey, batch: &str) -> std::process::Output {
    let batch_file = agent.dir.path().join("batch");
    std::fs::write(&batch_file, batch).unwrap();
    let mut cmd = std::process::Command::new(require_tool("sftp", "openssh-client"));
    let opts = sftp_options(agent.port());
    cmd.args(opts)
        .args(["-o", "BatchMode=yes", "-i"])
        .arg(&key.private)
        .arg("-b")
        .arg(&batch_file)
        .arg("alice@127.0.0.1");
    run_with_timeout(&mut cmd, None, T)
}

fn scp(agent: &Agent, key: &ClientKey, from: &str, to: &str) -> std::process::Output {
    let mut cmd = std::process::Command::new(require_tool("scp", "openssh-client"));
    let opts = sftp_options(agent.port());
    cmd.args(opts)
        .args(["-o", "BatchMode=yes", "-i"])
        .arg(&key.private)
        .args([from, to]);
    run_with_timeout(&mut cmd, None, T)
}

#[test]
fn sftp_put_and_get_fifty_mib_byte_for_byte() {
    let agent = Agent::start();
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    let d = agent.dir.path();
    let local = d.join("local.bin");
    random_file(&local, 50 << 20, 11);
    let remote_dir = d.join("remote");
    std::fs::create_dir(&remote_dir).unwrap();
    let back = d.join("back.bin");
    let out = sftp(
        &agent,
        &key,
        &format!(
            "cd {r}\nput {l} up.bin\nls -l\nmkdir sub\nrename up.bin sub/moved.bin\nget sub/moved.bin {b}\nrm sub/moved.bin\nrmdir sub\n",
            r = remote_dir.display(),
            l = local.display(),
            b = back.display()
        ),
    );
    assert!(
        out.status.success(),
        "sftp failed: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("up.bin"),
        "ls -l shows the file: {}",
        stdout(&out)
    );
    assert!(same_contents(&local, &back), "50 MiB differ after put/get");
    assert_eq!(
        std::fs::read_dir(&remote_dir).unwrap().count(),
        0,
        "rm and rmdir worked"
    );
}

#[test]
fn sftp_reports_missing_files() {
    let agent = Agent::start();
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    let out = sftp(&agent, &key, "get /nonexistent/file /tmp/x-never\n");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("not found") || err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn scp_both_ways() {
    let agent = Agent::start();
    let key = agent.key("alice_key");
    agent.add_user("alice", None, Some(&key));
    let d = agent.dir.path();
    let local = d.join("scp-local.bin");
    random_file(&local, 3 << 20, 5);
    let remote = d.join("scp-remote.bin");
    let back = d.join("scp-back.bin");
    let out = scp(
        &agent,
        &key,
        &local.to_string_lossy(),
        &format!("alice@127.0.0.1:{}", remote.display()),
    );
    assert!(out.status.success(), "scp upload: {}", stderr(&out));
    assert!(same_contents(&local, &remote));
    let out = scp(
        &agent,
        &key,
        &format!("alice@127.0.0.1:{}", remote.display()),
        &back.to_string_lossy(),
    );
    assert!(out.status.success(), "scp download: {}", stderr(&out));
    assert!(same_contents(&local, &back));
}
