//! As root, an account with `run_as` runs everything as that OS user: commands, terminals
//! and SFTP; so does an endpoint with `run_as`, for the commands run on it. Needs root (CI
//! runs as root); elsewhere the test says so and does nothing.

use std::process::Command;
use std::time::Duration;

use remote_tests::*;

const OS_USER: &str = "remote-test-runas";
const T: Duration = Duration::from_secs(60);

fn ensure_os_user() {
    let exists = Command::new("id")
        .arg(OS_USER)
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        let st = Command::new(require_tool("useradd", "passwd"))
            .args(["--create-home", "--shell", "/bin/sh", OS_USER])
            .status()
            .unwrap();
        assert!(st.success(), "useradd failed");
    }
}

#[test]
fn run_as_account_runs_as_that_os_user() {
    if !is_root() {
        eprintln!("run_as_account_runs_as_that_os_user: NOT RUN — needs root (CI runs as root)");
        return;
    }
    ensure_os_user();
    let agent = Agent::start();
    let key = agent.key("carol_key");
    agent.user(
        &[
            "add",
            "carol",
            "--authorized-key",
            &key.public.to_string_lossy(),
            "--run-as",
            OS_USER,
        ],
        None,
    );
    let out = run_with_timeout(
        agent.ssh("carol", &key).arg(
            "id -un; echo $HOME; touch made-by-carol; stat -c %U made-by-carol; id -G | wc -w",
        ),
        None,
        T,
    );
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(OS_USER),
        "{text}{}",
        stderr(&out)
    );
    assert_eq!(
        lines.get(1).copied(),
        Some(format!("/home/{OS_USER}").as_str())
    );
    assert_eq!(lines.get(2).copied(), Some(OS_USER), "file owner");
    // Supplementary groups are the user's, not root's.
    let root_in_groups = run_with_timeout(agent.ssh("carol", &key).arg("id -G"), None, T);
    assert!(
        !stdout(&root_in_groups).split_whitespace().any(|g| g == "0"),
        "kept root's group"
    );

    // A terminal belongs to the user too.
    let out = run_with_timeout(
        agent
            .ssh("carol", &key)
            .arg("-tt")
            .arg("id -un; stat -c %U $(tty)"),
        None,
        T,
    );
    let text = stdout(&out);
    assert!(
        text.lines().filter(|l| l.trim() == OS_USER).count() >= 2,
        "{text}"
    );

    // SFTP runs as the user: an uploaded file belongs to them, and root's files are closed.
    let local = agent.dir.path().join("up.txt");
    std::fs::write(&local, "hello").unwrap();
    let batch = agent.dir.path().join("batch");
    std::fs::write(&batch, format!("put {} sftp-up.txt\n", local.display())).unwrap();
    let opts = sftp_options(agent.port());
    let out = run_with_timeout(
        Command::new(require_tool("sftp", "openssh-client"))
            .args(opts)
            .args(["-o", "BatchMode=yes", "-i"])
            .arg(&key.private)
            .arg("-b")
            .arg(&batch)
            .arg("carol@127.0.0.1"),
        None,
        T,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let uploaded = format!("/home/{OS_USER}/sftp-up.txt");
    let owner = Command::new("stat")
        .args(["-c", "%U", &uploaded])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&owner.stdout).trim(), OS_USER);
    let denied = run_with_timeout(
        agent
            .ssh("carol", &key)
            .arg("cat /root/.bashrc /etc/shadow"),
        None,
        T,
    );
    assert!(
        stderr(&denied).contains("Permission denied"),
        "{}",
        stderr(&denied)
    );
    let _ = std::fs::remove_file(&uploaded);
    let _ = std::fs::remove_file(format!("/home/{OS_USER}/made-by-carol"));
}

/// A run_as account's commands session: the wrapper that carries the working directory and
/// variables over must reach its state dir (inside the root agent's state dir), and never
/// turn a command's exit status into its own.
#[test]
fn run_as_commands_session_keeps_exit_codes_and_context() {
    if !is_root() {
        eprintln!(
            "run_as_commands_session_keeps_exit_codes_and_context: NOT RUN — needs root (CI runs as root)"
        );
        return;
    }
    ensure_os_user();
    let agent = Agent::start();
    let key = agent.key("dave_key");
    agent.user(
        &[
            "add",
            "dave",
            "--authorized-key",
            &key.public.to_string_lossy(),
            "--run-as",
            OS_USER,
        ],
        None,
    );
    let client = Client::new();
    let target = format!("dave@127.0.0.1:{}", agent.port());
    let remote = |args: &[&str]| {
        let mut cmd = client.remote();
        cmd.arg("--identity").arg(&key.private).args(args);
        run_with_timeout(&mut cmd, None, T)
    };
    let out = remote(&["session", "new", &target]);
    assert!(out.status.success(), "session new: {}", stderr(&out));
    let id = stdout(&out)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    let session = format!("{target}/{id}");
    let out = remote(&["exec", &session, "--", "cd /tmp; export DAVE=1; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = remote(&["exec", &session, "--", "id -un; pwd; echo $DAVE"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{OS_USER}\n/tmp\n1\n"));
    let mode = std::fs::metadata(&agent.state_dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        mode.permissions().mode() & 0o777,
        0o711,
        "state dir: traversable, not listable"
    );
}

/// An endpoint with `run_as`: an ordinary account's commands there run as that OS user, over
/// plain SSH and in a session; on `default` they run as the account's own identity.
#[test]
fn an_endpoints_run_as_runs_its_commands_as_that_os_user() {
    if !is_root() {
        eprintln!(
            "an_endpoints_run_as_runs_its_commands_as_that_os_user: NOT RUN — needs root (CI runs as root)"
        );
        return;
    }
    ensure_os_user();
    let agent = Agent::start_with(AgentOptions {
        config: format!("[endpoints.svc]\nusers = [\"dave\"]\nrun_as = \"{OS_USER}\"\n"),
        ..AgentOptions::default()
    });
    let key = agent.key("dave_key");
    agent.add_user("dave", None, Some(&key));
    let whoami = |endpoint: Option<&str>| {
        let mut cmd = agent.ssh_on("dave", &key, endpoint);
        let out = run_with_timeout(cmd.arg("id -un"), None, T);
        stdout(&out).trim().to_string()
    };
    assert_eq!(whoami(Some("svc")), OS_USER);
    assert_eq!(whoami(None), "root", "default: the agent's own identity");

    // The same in a session opened on the endpoint.
    let client = Client::new();
    let target = format!("dave@127.0.0.1:{}", agent.port());
    let identity = key.private.to_string_lossy().into_owned();
    let remote = |args: &[&str]| {
        let mut cmd = client.remote();
        cmd.args(["--identity", &identity]).args(args);
        run_with_timeout(&mut cmd, None, T)
    };
    let out = remote(&["session", "new", &target, "--endpoint", "svc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).lines().last().unwrap_or_default().to_string();
    let out = remote(&["exec", &format!("{target}/{id}"), "--", "id -un"]);
    assert_eq!(stdout(&out).trim(), OS_USER, "{}", stderr(&out));
}
