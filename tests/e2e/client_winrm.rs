//! The `remote` client over WinRM (`winrm://`, `winrms://`) against a real agent: `run` with
//! Basic over HTTPS and over plain HTTP (trusted hosts only), NTLM with message encryption
//! over HTTP and with channel binding over HTTPS, the certificate trust (first use for trusted
//! hosts only, pinned fingerprint, CA file, changed certificate refused), several targets at once, and the
//! session commands (session new, exec, exec --detach + receive, session rm). Every test has
//! its own client HOME and XDG_CONFIG_HOME.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use remote_tests::*;

const T: Duration = Duration::from_secs(90);
const PW: &str = "Alice-pw-1";

fn agent(allow_unencrypted: bool) -> Agent {
    let agent = Agent::start_winrm(
        AgentOptions::default(),
        WinrmOptions {
            allow_unencrypted,
            ..WinrmOptions::both()
        },
    );
    agent.add_user("alice", Some(PW), None);
    agent
}

fn https(agent: &Agent) -> String {
    format!(
        "winrms://alice@{}",
        agent.winrm_https.expect("https listener")
    )
}

fn http(agent: &Agent) -> String {
    format!("winrm://alice@{}", agent.winrm_http.expect("http listener"))
}

/// `remote --batch ARGS...` with alice's password in REMOTE_PASSWORD.
fn remote(client: &Client, args: &[&str]) -> Output {
    let mut cmd: Command = client.remote();
    cmd.env("REMOTE_PASSWORD", PW).args(args);
    run_with_timeout(&mut cmd, None, T)
}

fn winrm_known_hosts(client: &Client) -> PathBuf {
    client.config_home().join("remote/winrm_known_hosts")
}

/// The agent's audit lines for WinRM logins, once at least `n` are there.
fn winrm_logins(agent: &Agent, n: usize) -> Vec<String> {
    let path = agent.state_dir.join("audit.jsonl");
    let deadline = std::time::Instant::now() + T;
    loop {
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"event\":\"auth\"") && l.contains("\"transport\":\"winrm"))
            .map(String::from)
            .collect();
        if lines.len() >= n || std::time::Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn basic_over_https_trusts_the_certificate_on_first_use_of_a_trusted_host_only() {
    let agent = agent(false);
    let client = Client::new();
    let t = https(&agent);
    let fp = agent.winrm_fingerprint.clone().expect("fingerprint");

    // 127.0.0.1 is not in trusted_hosts: its self-signed certificate is refused before the
    // password goes out, with the fingerprint to compare and the two ways on.
    let out = remote(&client, &["--auth", "basic", "run", &t, "--", "echo no"]);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("({fp}) is not signed by a CA this machine trusts"))
            && err.contains("127.0.0.1 is not in")
            && err.contains(&format!("pass --fingerprint {fp}")),
        "{err}"
    );
    assert!(!winrm_known_hosts(&client).exists(), "nothing recorded");
    // It never reached authentication (the agent's audit log would have a login by now).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(winrm_logins(&agent, 0), Vec::<String>::new());

    client.trust_hosts("127.0.0.1");
    let out = remote(
        &client,
        &[
            "--auth",
            "basic",
            "run",
            &t,
            "--",
            "echo out; echo err >&2; exit 3",
        ],
    );
    assert_eq!(stdout(&out), "out\n", "{}", stderr(&out));
    assert!(stderr(&out).contains("err\n"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("first contact with") && stderr(&out).contains(&fp),
        "{}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(3));
    let recorded = std::fs::read_to_string(winrm_known_hosts(&client)).expect("recorded");
    assert!(recorded.contains(&fp), "{recorded}");
    let logins = winrm_logins(&agent, 1);
    assert!(
        !logins.is_empty() && logins.iter().all(|l| l.contains("\"success\":true")),
        "{logins:?}"
    );

    // Second contact: silent. Arguments are quoted; a single one is a command line.
    let out = remote(
        &client,
        &["--auth", "basic", "run", &t, "--", "echo", "a b", "it's"],
    );
    assert_eq!(stdout(&out), "a b it's\n");
    assert_eq!(stderr(&out), "");
    assert_eq!(out.status.code(), Some(0));

    // stdin goes to the command (one target).
    let mut cmd = client.remote();
    cmd.env("REMOTE_PASSWORD", PW)
        .args(["--auth", "basic", "run", &t, "--", "cat"]);
    let out = run_with_timeout(&mut cmd, Some(b"line one\nline two\n"), T);
    assert_eq!(stdout(&out), "line one\nline two\n", "{}", stderr(&out));

    // Death by signal: 128 + signal number, as the agent reports it.
    let out = remote(
        &client,
        &["--auth", "basic", "run", &t, "--", "kill -TERM $$"],
    );
    assert_eq!(out.status.code(), Some(128 + 15));

    // Wrong password: 255 and a message that says so.
    let mut cmd = client.remote();
    cmd.env("REMOTE_PASSWORD", "wrong")
        .args(["--auth", "basic", "run", &t, "--", "true"]);
    let out = run_with_timeout(&mut cmd, None, T);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("authentication as 'alice'") && stderr(&out).contains("rejected"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn certificate_pinning_ca_file_and_changed_certificate() {
    let agent = agent(false);
    let client = Client::new();
    let t = https(&agent);
    let fp = agent.winrm_fingerprint.clone().expect("fingerprint");

    let out = remote(
        &client,
        &[
            "--auth",
            "basic",
            "--fingerprint",
            &fp,
            "run",
            &t,
            "--",
            "echo pinned",
        ],
    );
    assert_eq!(stdout(&out), "pinned\n", "{}", stderr(&out));
    assert!(
        !winrm_known_hosts(&client).exists(),
        "pinning records nothing"
    );

    let other = "SHA256:0wrY5yVTPZqIs5S90ozqBddTqACY2V+ElOxcXt2smnM";
    let out = remote(
        &client,
        &[
            "--auth",
            "basic",
            "--fingerprint",
            other,
            "run",
            &t,
            "--",
            "true",
        ],
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains(&format!("is {fp}, not the pinned {other}")),
        "{}",
        stderr(&out)
    );

    // The agent's own certificate as the CA (it names 127.0.0.1).
    let ca = agent.state_dir.join("winrm_cert.pem");
    if ca.exists() {
        let ca = ca.to_string_lossy().into_owned();
        let out = remote(
            &client,
            &[
                "--auth",
                "basic",
                "--ca",
                &ca,
                "run",
                &t,
                "--",
                "echo by-ca",
            ],
        );
        assert_eq!(stdout(&out), "by-ca\n", "{}", stderr(&out));
    }

    // A recorded certificate that differs: refused, naming the file and line.
    let path = winrm_known_hosts(&client);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let key = agent.winrm_https.unwrap().to_string();
    std::fs::write(&path, format!("# test\n{key} {other}\n")).unwrap();
    let out = remote(&client, &["--auth", "basic", "run", &t, "--", "true"]);
    assert_eq!(out.status.code(), Some(255));
    let err = stderr(&out);
    assert!(err.contains("has CHANGED"), "{err}");
    assert!(
        err.contains(&format!("{}:2", path.display())),
        "names file and line: {err}"
    );
}

#[test]
fn basic_over_http_only_for_trusted_hosts() {
    let agent = agent(true);
    let client = Client::new();
    let t = http(&agent);
    let out = remote(&client, &["--auth", "basic", "run", &t, "--", "echo x"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("Basic authentication over http://")
            && stderr(&out).contains("trusted_hosts"),
        "{}",
        stderr(&out)
    );
    let list = client.config_home().join("remote/trusted_hosts");
    std::fs::create_dir_all(list.parent().unwrap()).unwrap();
    std::fs::write(&list, "# lab\n127.0.0.*\n").unwrap();
    let out = remote(&client, &["--auth", "basic", "run", &t, "--", "echo plain"]);
    assert_eq!(stdout(&out), "plain\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn several_targets_are_prefixed_and_summarised() {
    let agent = agent(true);
    let client = Client::new();
    let list = client.config_home().join("remote/trusted_hosts");
    std::fs::create_dir_all(list.parent().unwrap()).unwrap();
    std::fs::write(&list, "127.0.0.1\n").unwrap();
    let targets = format!("{},{}", http(&agent), https(&agent));
    let out = remote(
        &client,
        &[
            "--auth",
            "basic",
            "run",
            &targets,
            "--",
            "echo hello; echo warn >&2; exit 2",
        ],
    );
    let http_label = agent.winrm_http.unwrap().to_string();
    let https_label = agent.winrm_https.unwrap().to_string();
    let so = stdout(&out);
    assert!(so.contains(&format!("{http_label}: hello\n")), "{so}");
    assert!(so.contains(&format!("{https_label}: hello\n")), "{so}");
    let se = stderr(&out);
    assert!(se.contains(&format!("{http_label}: warn\n")), "{se}");
    assert!(se.contains(&format!("{https_label}: exit 2")), "{se}");
    assert_eq!(out.status.code(), Some(2));

    let out = remote(
        &client,
        &[
            "--auth", "basic", "run", "--json", &targets, "--", "printf x",
        ],
    );
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("\"stdout\":\"x\"") && l.contains("\"exit_code\":0"))
    );
}

#[test]
fn ntlm_over_http_encrypts_and_over_https_binds_the_channel() {
    // Encryption is required on plain HTTP (no --allow-unencrypted): only sealed NTLM works.
    let agent = agent(false);
    let client = Client::new();
    client.trust_hosts("127.0.0.1");
    let out = remote(
        &client,
        &[
            "run",
            &http(&agent),
            "--",
            "echo sealed; echo e >&2; exit 4",
        ],
    );
    assert_eq!(stdout(&out), "sealed\n", "{}", stderr(&out));
    assert!(stderr(&out).contains("e\n"), "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(4));

    // Larger output over several sealed responses arrives intact.
    let out = remote(&client, &["run", &http(&agent), "--", "seq 1 100000"]);
    let expected: String = (1..=100000).map(|i| format!("{i}\n")).collect();
    assert!(
        stdout(&out) == expected,
        "{} bytes; {}",
        out.stdout.len(),
        stderr(&out)
    );

    let out = remote(&client, &["run", &https(&agent), "--", "echo bound"]);
    assert_eq!(stdout(&out), "bound\n", "{}", stderr(&out));

    let mut cmd = client.remote();
    cmd.env("REMOTE_PASSWORD", "wrong")
        .args(["run", &http(&agent), "--", "true"]);
    let out = run_with_timeout(&mut cmd, None, T);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("NTLM authentication as 'alice'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn sessions_over_winrm() {
    let agent = agent(false);
    let client = Client::new();
    client.trust_hosts("127.0.0.1");
    let t = https(&agent);
    let basic = ["--auth", "basic"];
    let with = |args: &[&str]| {
        let mut all: Vec<&str> = basic.to_vec();
        all.extend_from_slice(args);
        remote(&client, &all)
    };

    let out = with(&["session", "new", &t]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let reference = stdout(&out).lines().last().unwrap_or_default().to_string();
    assert!(reference.starts_with(&format!("{t}/")), "{reference}");
    let id = reference.rsplit('/').next().unwrap().to_string();

    // Commands run in the shell; the exit code comes back; a WinRM shell on remote-agent is
    // a commands session, so the working directory and variables carry over (design.md §2).
    let out = with(&[
        "exec",
        &reference,
        "--",
        "cd /tmp && export FOO=bar && echo $PWD $FOO",
    ]);
    assert_eq!(stdout(&out), "/tmp bar\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0));
    let out = with(&["exec", "-n", &reference, "--", "echo $PWD $FOO; exit 5"]);
    assert_eq!(stdout(&out), "/tmp bar\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(5));

    // The bare id works on this machine (the session record).
    let out = with(&["exec", "-n", &id, "--", "echo by-id"]);
    assert_eq!(stdout(&out), "by-id\n", "{}", stderr(&out));

    // Detached: started, then received; the exit is reported once.
    let out = with(&[
        "exec",
        "--detach",
        &reference,
        "--",
        "echo d1; echo d2 >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("remote receive"), "{}", stderr(&out));
    let mut got = String::new();
    let mut errs = String::new();
    for _ in 0..20 {
        let out = with(&["receive", &reference]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        got.push_str(&stdout(&out));
        errs.push_str(&stderr(&out));
        if errs.contains("exited with code 7") {
            break;
        }
    }
    assert_eq!(got, "d1\n");
    assert!(errs.contains("d2\n"), "{errs}");
    assert!(errs.contains("exited with code 7"), "{errs}");
    let out = with(&["receive", &reference]);
    assert!(
        stderr(&out).contains("nothing to receive"),
        "{}",
        stderr(&out)
    );

    // attach and shell need SSH, and say so.
    let out = with(&["attach", &reference]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("needs the SSH transport"),
        "{}",
        stderr(&out)
    );

    // Removed: gone for exec, and from the record.
    let out = with(&["session", "rm", &reference]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = with(&["exec", "-n", &reference, "--", "true"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(stderr(&out).contains("2150858843"), "{}", stderr(&out));
    let out = with(&["exec", "-n", &id, "--", "true"]);
    assert!(stderr(&out).contains("unknown session"), "{}", stderr(&out));
}
