//! Endpoints (issue 6): who may use an endpoint and what runs there, enforced alike over
//! SSH (OpenSSH `ssh -o SetEnv=REMOTE_ENDPOINT=…`), WinRM (pywinrm, the endpoint in the
//! shell's environment) and the relay (`remote session new relay://… --endpoint …`); the
//! built-in `default` endpoint admits admins only; output quotas stop a command and leave
//! its session alive; `remote-agent endpoint` edits the config file.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use remote_tests::relay::Relay;
use remote_tests::winrm::*;
use remote_tests::*;

const T: Duration = Duration::from_secs(60);
const PW: &str = "Carol-pw-1";

/// Endpoints of the agents here. `default` is the built-in one (admins only).
const CONFIG: &str = r#"
[endpoints.restricted]
users = ["carol"]
commands = ["uptime", "df"]

[endpoints.small]
groups = ["ops"]
max_received_mb_per_command = 1

[endpoints.ops]
groups = ["ops"]

[endpoints.slow]
groups = ["ops"]
max_commands_per_user = 1
operation_timeout_secs = 4
"#;

/// An agent with SSH and WinRM (HTTPS), the endpoints above, the built-in `default`, and
/// accounts `admin` (an admin) and `carol` (in no group).
fn agent(extra: &[String]) -> (Agent, ClientKey) {
    let agent = Agent::start_winrm(
        AgentOptions {
            config: CONFIG.into(),
            open_default_endpoint: false,
        },
        WinrmOptions {
            https: true,
            extra_args: extra.to_vec(),
            ..Default::default()
        },
    );
    let key = agent.key("carol_key");
    agent.user(
        &["add", "admin", "--admin", "--password-stdin"],
        Some("Admin-pw-1\n"),
    );
    agent.add_user("carol", Some(PW), Some(&key));
    (agent, key)
}

fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, None, T)
}

/// pywinrm (Basic over HTTPS) as carol: a shell on `endpoint`, then each command.
fn winrm_cmds(agent: &Agent, endpoint: Option<&str>, commands: Value) -> Value {
    let mut op = with(
        &pywinrm(&https_url(agent), "basic", "carol", PW),
        json!({"op": "shell_cmds", "commands": commands}),
    );
    if let Some(e) = endpoint {
        op = with(&op, json!({"env": {"REMOTE_ENDPOINT": e}}));
    }
    py1(op)
}

/// `remote` as relay user `token`, trusting the relay (127.0.0.1) on first contact.
fn relay_remote(client: &Client, relay: &Relay, token: &str) -> Command {
    client.trust_hosts("127.0.0.1");
    let mut cmd = client.remote();
    cmd.env("REMOTE_RELAY", relay.addr.to_string())
        .env("REMOTE_TOKEN", token);
    cmd
}

/// Account `erin` (group ops, key login) on an agent with the endpoints above, and a client
/// machine for her.
struct Erin {
    _agent: Agent,
    key: ClientKey,
    client: Client,
    target: String,
}

impl Erin {
    fn start() -> Erin {
        let (agent, _) = agent(&[]);
        let key = agent.key("erin_key");
        agent.user(
            &[
                "add",
                "erin",
                "--group",
                "ops",
                "--authorized-key",
                &key.public.to_string_lossy(),
            ],
            None,
        );
        let target = format!("erin@127.0.0.1:{}", agent.port());
        Erin {
            _agent: agent,
            key,
            client: Client::new(),
            target,
        }
    }

    /// `remote ARGS` as erin on her client machine.
    fn remote(&self, args: &[&str]) -> Output {
        let mut cmd = self.client.remote();
        cmd.arg("--identity").arg(&self.key.private).args(args);
        run(&mut cmd)
    }

    /// `remote session new TARGET EXTRA…`: the session's TARGET/ID.
    fn session(&self, extra: &[&str]) -> String {
        let mut args = vec!["session", "new", self.target.as_str()];
        args.extend(extra);
        let out = self.remote(&args);
        assert!(out.status.success(), "session new: {}", stderr(&out));
        format!(
            "{}/{}",
            self.target,
            stdout(&out).lines().last().unwrap_or_default()
        )
    }
}

/// A WinRM client's results for `df -h` then commands the restricted endpoint refuses.
#[track_caller]
fn df_ran_and_the_rest_was_refused(r: &Value) {
    let results = ok(r)["results"].as_array().expect("results");
    assert_eq!(results[0]["status"], 0, "{r:#}");
    let out = results[0]["stdout"].as_str().unwrap_or("");
    assert!(out.contains("Filesystem"), "{r:#}");
    for refused in &results[1..] {
        let msg = refused["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains("endpoint 'restricted' does not allow"),
            "{r:#}"
        );
    }
}

fn canary(dir: &Path) -> std::path::PathBuf {
    dir.join("canary")
}

#[test]
fn a_restricted_endpoint_runs_only_its_commands_over_ssh_winrm_and_the_relay() {
    let mut relay = Relay::start();
    let token = relay.join_token();
    let (mut agent, key) = agent(&relay.agent_args("agent1", &token, None));
    assert!(agent.wait_log("tunnel up", T), "{}", agent.log());
    let dir = tempfile::tempdir().unwrap();
    let _ = std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    );
    let can = canary(dir.path());
    let touch = format!("touch {}", can.display());

    // SSH.
    let out = run(agent.ssh_on("carol", &key, Some("restricted")).arg("df -h"));
    assert!(out.status.success(), "df -h: {}", stderr(&out));
    assert!(stdout(&out).contains("Filesystem"), "{}", stdout(&out));
    let out = run(agent
        .ssh_on("carol", &key, Some("restricted"))
        .arg(format!("df; {touch}")));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("endpoint 'restricted' does not allow 'df;'"),
        "{}",
        stderr(&out)
    );
    let out = run(agent
        .ssh_on("carol", &key, Some("restricted"))
        .arg(format!("sh -c '{touch}'")));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("endpoint 'restricted' does not allow 'sh'")
            && stderr(&out).contains("allowed: uptime, df"),
        "{}",
        stderr(&out)
    );
    // No interactive shell there either (a shell request, no command).
    let mut shell = agent.ssh_on("carol", &key, Some("restricted"));
    let out = run_with_timeout(&mut shell, Some(b"echo hi\n"), T);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("endpoint 'restricted' runs only the commands uptime, df"),
        "{}",
        stderr(&out)
    );

    // WinRM.
    let r = winrm_cmds(
        &agent,
        Some("restricted"),
        json!([
            ["df", ["-h"]],
            [format!("df; {touch}"), []],
            ["sh", ["-c", format!("'{touch}'")]]
        ]),
    );
    df_ran_and_the_rest_was_refused(&r);

    // pypsrp, the endpoint named in the shell's ResourceURI (…/shell/cmd/NAME).
    let cmd_uri = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd";
    let psrp = |uri: &str, commands: Value| {
        py1(json!({
            "op": "psrp_shell_cmds", "port": agent.winrm_https.expect("https").port(),
            "ssl": true, "auth": "basic", "user": "carol", "password": PW,
            "resource_uri": uri, "commands": commands,
        }))
    };
    let r = psrp(
        &format!("{cmd_uri}/restricted"),
        json!([["df", ["-h"]], [format!("df; {touch}"), []]]),
    );
    df_ran_and_the_rest_was_refused(&r);
    let r = psrp(cmd_uri, json!([["uptime", []]]));
    let denied = r["error"]["message"].as_str().unwrap_or("");
    assert!(
        denied.contains("access denied: user 'carol' may not use endpoint 'default'"),
        "{r:#}"
    );
    let r = psrp(&format!("{cmd_uri}/no/such"), json!([["uptime", []]]));
    let unknown = r["error"]["message"].as_str().unwrap_or("");
    assert!(unknown.contains("names no valid endpoint"), "{r:#}");

    // The relay.
    let client = Client::new();
    let carol = relay.add_user("carol");
    let out = run(relay_remote(&client, &relay, &carol).args([
        "session",
        "new",
        "relay://agent1",
        "--endpoint",
        "restricted",
    ]));
    assert!(out.status.success(), "session new: {}", stderr(&out));
    let id = stdout(&out).lines().last().unwrap_or_default().to_string();
    let out = run(relay_remote(&client, &relay, &carol).args(["exec", &id, "--", "df", "-h"]));
    assert!(out.status.success(), "exec df -h: {}", stderr(&out));
    assert!(stdout(&out).contains("Filesystem"), "{}", stdout(&out));
    for line in [format!("df; {touch}"), format!("sh -c '{touch}'")] {
        let out = run(relay_remote(&client, &relay, &carol).args(["exec", &id, "--", &line]));
        assert!(!out.status.success(), "{line}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("endpoint 'restricted' does not allow"),
            "{line}: {}",
            stderr(&out)
        );
    }

    // Nothing anywhere ran the shell's second command.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!can.exists(), "a refused command ran");
    relay.stop();
}

#[test]
fn the_default_endpoint_admits_admins_only_over_ssh_winrm_and_the_relay() {
    let mut relay = Relay::start();
    let token = relay.join_token();
    let (mut agent, key) = agent(&relay.agent_args("agent1", &token, None));
    assert!(agent.wait_log("tunnel up", T), "{}", agent.log());
    let denied = "access denied: user 'carol' may not use endpoint 'default' (allowed: admins). Ask an admin to add you, or pick --endpoint";

    // SSH: refused on default, admitted where the endpoint lists carol.
    let out = run(agent.ssh_on("carol", &key, None).arg("echo hi"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains(denied), "{}", stderr(&out));
    let out = run(agent
        .ssh_on("carol", &key, Some("restricted"))
        .arg("uptime"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("load average"), "{}", stdout(&out));

    // WinRM: the shell is refused with the same message; on `restricted` it opens.
    let r = winrm_cmds(&agent, None, json!([["echo", ["hi"]]]));
    let msg = r["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains(denied), "{r:#}");
    let r = winrm_cmds(&agent, Some("restricted"), json!([["uptime", []]]));
    assert_eq!(ok(&r)["results"][0]["status"], 0, "{r:#}");
    // The same with this project's client (`--endpoint` becomes the shell's REMOTE_ENDPOINT).
    let client = Client::new();
    client.trust_hosts("127.0.0.1");
    let winrms = format!(
        "winrms://carol@{}",
        agent.winrm_https.expect("https listener")
    );
    let remote_winrm = |args: &[&str]| {
        let mut cmd = client.remote();
        cmd.env("REMOTE_PASSWORD", PW).args(args);
        run(&mut cmd)
    };
    let out = remote_winrm(&["session", "new", &winrms]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(denied), "{}", stderr(&out));
    let out = remote_winrm(&["session", "new", &winrms, "--endpoint", "restricted"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shell = stdout(&out).lines().last().unwrap_or_default().to_string();
    let out = remote_winrm(&["exec", &shell, "--", "uptime"]);
    assert!(stdout(&out).contains("load average"), "{}", stderr(&out));

    // `remote run --endpoint` over SSH and WinRM: without it the default refuses carol.
    let ssh_target = format!("carol@127.0.0.1:{}", agent.port());
    let identity = key.private.to_string_lossy().into_owned();
    let remote_run = |target: &str, endpoint: Option<&str>, command: &str| {
        let mut args = vec!["--identity", &identity, "run", target];
        if let Some(e) = endpoint {
            args.extend(["--endpoint", e]);
        }
        args.extend(["--", command]);
        remote_winrm(&args)
    };
    let out = remote_run(&ssh_target, None, "uptime");
    assert!(!out.status.success());
    assert!(stderr(&out).contains(denied), "{}", stderr(&out));
    for target in [ssh_target.as_str(), winrms.as_str()] {
        let out = remote_run(target, Some("restricted"), "df -h");
        assert!(out.status.success(), "{target}: {}", stderr(&out));
        assert!(
            stdout(&out).contains("Filesystem"),
            "{target}: {}",
            stdout(&out)
        );
        let out = remote_run(target, Some("restricted"), "df; echo ran");
        assert!(!out.status.success());
        assert!(!stdout(&out).contains("ran"), "{target}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("endpoint 'restricted' does not allow 'df;'"),
            "{target}: {}",
            stderr(&out)
        );
    }

    // The relay.
    let carol = relay.add_user("carol");
    let out = run(relay_remote(&client, &relay, &carol).args(["session", "new", "relay://agent1"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains(denied), "{}", stderr(&out));
    let out =
        run(relay_remote(&client, &relay, &carol).args(["run", "relay://agent1", "--", "echo hi"]));
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains(denied), "{}", stderr(&out));
    let on_restricted = ["run", "relay://agent1", "--endpoint", "restricted", "--"];
    let out = run(relay_remote(&client, &relay, &carol)
        .args(on_restricted)
        .arg("uptime"));
    assert!(stdout(&out).contains("load average"), "{}", stderr(&out));
    let out = run(relay_remote(&client, &relay, &carol)
        .args(on_restricted)
        .arg("sh -c 'echo ran'"));
    assert!(!out.status.success());
    assert!(!stdout(&out).contains("ran"), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("endpoint 'restricted' does not allow 'sh'"),
        "{}",
        stderr(&out)
    );

    // An admin is admitted on default.
    let admin = relay.add_user("admin");
    let out =
        run(relay_remote(&client, &relay, &admin).args(["run", "relay://agent1", "--", "echo hi"]));
    assert_eq!(stdout(&out), "hi\n", "{}", stderr(&out));

    // The agent's audit lines reach the relay's store, where a user on the host cannot
    // erase them: emptying audit.jsonl on the host takes nothing away there.
    let relay_audit = || {
        let out = run(Command::new(bin("remote-relay"))
            .args(["audit", "--agent", "agent1", "--data-dir"])
            .arg(&relay.data_dir));
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let arrived = |text: &str| {
        text.lines().any(|l| {
            l.starts_with("agent1\t")
                && l.contains("\"event\":\"refused\"")
                && l.contains("\"transport\":\"relay\"")
                && l.contains("access denied")
        }) && text.lines().any(|l| {
            l.contains("\"event\":\"command\"")
                && l.contains("\"account\":\"admin\"")
                && l.contains("\"transport\":\"relay\"")
        }) && text
            .lines()
            .any(|l| l.contains("\"event\":\"auth\"") && l.contains("\"transport\":\"winrms\""))
    };
    let deadline = std::time::Instant::now() + T;
    let mut text = relay_audit();
    while !arrived(&text) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        text = relay_audit();
    }
    assert!(arrived(&text), "the relay's audit lines:\n{text}");
    std::fs::write(agent.state_dir.join("audit.jsonl"), "").unwrap();
    assert!(arrived(&relay_audit()));
    relay.stop();
}

#[test]
fn an_output_quota_stops_the_command_names_the_setting_and_the_session_survives() {
    let erin = Erin::start();
    let remote = |args: &[&str]| erin.remote(args);
    let id = erin.session(&["--endpoint", "small"]);
    // 3 MB from one command against a 1 MB quota.
    let out = remote(&["exec", &id, "--", "head -c 3000000 /dev/zero"]);
    assert!(!out.status.success());
    assert!(
        stdout(&out).len() <= 1_000_000,
        "{} bytes passed the quota",
        stdout(&out).len()
    );
    assert!(
        stderr(&out).contains(
            "output quota exceeded: endpoint 'small' allows 1 MB per command (max_received_mb_per_command)"
        ),
        "{}",
        stderr(&out)
    );
    // The session lives on.
    let out = remote(&["exec", &id, "--", "echo still here"]);
    assert_eq!(stdout(&out), "still here\n", "{}", stderr(&out));
}

#[test]
fn commands_per_user_and_the_operation_timeout_are_enforced() {
    let erin = Erin::start();
    let remote = |args: &[&str]| erin.remote(args);
    let id = erin.session(&["--endpoint", "slow"]);
    let out = remote(&["exec", "-d", &id, "--", "sleep 30"]);
    assert!(out.status.success(), "exec -d: {}", stderr(&out));
    // One running command per user on this endpoint.
    let out = remote(&["exec", &id, "--", "echo second"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out)
            .contains("endpoint 'slow' allows 1 running commands per user (max_commands_per_user)"),
        "{}",
        stderr(&out)
    );
    // The sleep is stopped after 4 s, with the reason in its output.
    std::thread::sleep(Duration::from_secs(6));
    let out = remote(&["receive", &id]);
    assert!(
        stderr(&out).contains(
            "operation timeout: endpoint 'slow' stops commands after 4 s (operation_timeout_secs)"
        ) || stdout(&out).contains(
            "operation timeout: endpoint 'slow' stops commands after 4 s (operation_timeout_secs)"
        ),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    let out = remote(&["exec", &id, "--", "echo second"]);
    assert_eq!(stdout(&out), "second\n", "{}", stderr(&out));
}

#[test]
fn the_clients_session_options_apply_where_shorter_than_the_endpoints() {
    let erin = Erin::start();
    let client = &erin.client;
    let config = client.config_home().join("remote/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        "[session]\nmax_received_mb_per_command = 1\noperation_timeout_secs = 2\n",
    )
    .unwrap();
    let (remote, target) = (|args: &[&str]| erin.remote(args), erin.target.clone());
    let new = |extra: &[&str]| {
        let mut args = vec!["--endpoint", "ops"];
        args.extend(extra);
        erin.session(&args)
    };
    let id = new(&[]);
    let out = remote(&["exec", &id, "--", "head -c 3000000 /dev/zero"]);
    assert!(
        stderr(&out).contains("output quota exceeded: this session allows 1 MB per command (max_received_mb_per_command, the client's session option; endpoint 'ops' allows 50)"),
        "{}",
        stderr(&out)
    );
    let out = remote(&["exec", &id, "--", "sleep 20"]);
    assert!(
        stderr(&out).contains("operation timeout: this session stops commands after 2 s"),
        "{}",
        stderr(&out)
    );
    // A flag overrides the file; the endpoint's 50 MB still bounds it.
    let id = new(&["--max-received-mb", "40", "--operation-timeout", "30"]);
    let out = remote(&["exec", &id, "--", "head -c 3000000 /dev/zero | wc -c"]);
    assert_eq!(stdout(&out).trim(), "3000000", "{}", stderr(&out));
    // A bad config file is an error that names it.
    std::fs::write(&config, "[session]\nidle = 1\n").unwrap();
    let out = remote(&["session", "new", &target, "--endpoint", "ops"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("config.toml is not valid"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn remote_shell_opens_on_the_endpoint_asked_for() {
    let erin = Erin::start();
    let shell = |extra: &[&str]| {
        let mut cmd = erin.client.remote();
        cmd.arg("--identity")
            .arg(&erin.key.private)
            .arg("shell")
            .arg(&erin.target)
            .args(extra);
        run_with_timeout(&mut cmd, Some(b"echo in-shell; exit 3\n"), T)
    };
    // erin (group ops, not an admin) is refused on `default`, admitted on `ops`.
    let out = shell(&[]);
    assert_eq!(stdout(&out), "", "{}", stderr(&out));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("access denied: user 'erin' may not use endpoint 'default'"),
        "{}",
        stderr(&out)
    );
    let out = shell(&["--endpoint", "ops"]);
    assert_eq!(stdout(&out), "in-shell\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(3));
    // An endpoint that runs only listed commands has no shell.
    let out = shell(&["--endpoint", "restricted"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("endpoint 'restricted'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn endpoint_commands_edit_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "# mine\n[ssh]\n").unwrap();
    let agent_cmd = |args: &[&str]| {
        let mut cmd = Command::new(bin("remote-agent"));
        cmd.arg("endpoint").args(args).arg("--config").arg(&config);
        run(&mut cmd)
    };
    let out = agent_cmd(&["add", "jea", "users=carol", "commands=uptime,df"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("a running agent applies it to new sessions and connections"),
        "{}",
        stderr(&out)
    );
    let out = agent_cmd(&["set", "jea", "max_received_mb_per_command=5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = agent_cmd(&["list"]);
    let list = stdout(&out);
    assert!(
        list.contains("default") && list.contains("admins"),
        "{list}"
    );
    assert!(
        list.contains("jea") && list.contains("only: uptime, df"),
        "{list}"
    );
    assert!(list.contains("out 5 MB"), "{list}");
    let out = agent_cmd(&["set", "jea", "run=shell"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("endpoint 'jea'"), "{}", stderr(&out));
    let out = agent_cmd(&["add", "jea"]);
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let out = agent_cmd(&["rm", "jea"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .starts_with("# mine\n[ssh]\n")
    );
}

#[test]
fn a_running_agent_applies_endpoint_changes_without_a_restart() {
    let (mut agent, key) = agent(&[]);
    let config = agent.dir.path().join("agent.toml");
    let endpoint = |args: &[&str]| {
        let mut cmd = Command::new(bin("remote-agent"));
        cmd.arg("endpoint").args(args).arg("--config").arg(&config);
        let out = run(&mut cmd);
        assert!(out.status.success(), "endpoint {args:?}: {}", stderr(&out));
    };
    let carol_on_jea =
        |agent: &Agent, command: &str| run(agent.ssh_on("carol", &key, Some("jea")).arg(command));

    let out = carol_on_jea(&agent, "uptime");
    assert!(
        stderr(&out).contains("no endpoint 'jea' on this agent"),
        "{}",
        stderr(&out)
    );
    endpoint(&["add", "jea", "users=carol", "commands=uptime"]);
    let out = carol_on_jea(&agent, "uptime");
    assert!(out.status.success(), "after add: {}", stderr(&out));
    let out = carol_on_jea(&agent, "df");
    assert!(
        stderr(&out).contains("endpoint 'jea' does not allow 'df'"),
        "{}",
        stderr(&out)
    );
    endpoint(&["set", "jea", "commands=uptime,df"]);
    let out = carol_on_jea(&agent, "df");
    assert!(out.status.success(), "after set: {}", stderr(&out));
    // An edit that breaks the file is not applied: the last good endpoints stay.
    let good = std::fs::read_to_string(&config).unwrap();
    let broken = config.with_extension("broken");
    std::fs::write(
        &broken,
        format!("{good}\n[endpoints.bad]\nrun = \"nonsense\"\n"),
    )
    .unwrap();
    std::fs::rename(&broken, &config).unwrap();
    let out = carol_on_jea(&agent, "df");
    assert!(
        out.status.success(),
        "after a broken edit: {}",
        stderr(&out)
    );
    assert!(
        agent.wait_log("endpoints in", T) && agent.log().contains("not applied"),
        "{}",
        agent.log()
    );
    std::fs::write(&broken, good).unwrap();
    std::fs::rename(&broken, &config).unwrap();
    endpoint(&["rm", "jea"]);
    let out = carol_on_jea(&agent, "uptime");
    assert!(
        stderr(&out).contains("no endpoint 'jea' on this agent"),
        "after rm: {}",
        stderr(&out)
    );
    assert!(
        agent.log().contains("endpoints re-read from"),
        "{}",
        agent.log()
    );
}

/// The agent's audit log: logins (good and bad), refusals, sessions and commands, one JSON
/// line each, with account, endpoint and transport.
#[test]
fn the_audit_log_records_logins_refusals_sessions_and_commands() {
    let (agent, key) = agent(&[]);
    // A wrong password, an exec, a refused command, a refused endpoint.
    let r = py1(with(
        &pywinrm(&https_url(&agent), "basic", "carol", "not-the-password"),
        json!({"op": "run_cmd", "command": "uptime"}),
    ));
    assert!(r.get("error").is_some(), "{r:#}");
    let out = run(agent.ssh_on("carol", &key, Some("restricted")).arg("df -h"));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(agent
        .ssh_on("carol", &key, Some("restricted"))
        .arg("sh -c id"));
    assert!(!out.status.success());
    let out = run(agent.ssh_on("carol", &key, None).arg("id"));
    assert!(!out.status.success());
    // WinRM: a session (shell) with a command in it.
    let r = winrm_cmds(&agent, Some("restricted"), json!([["uptime", []]]));
    assert_eq!(ok(&r)["results"][0]["status"], 0, "{r:#}");

    let path = agent.state_dir.join("audit.jsonl");
    let wanted = |lines: &[serde_json::Value]| {
        let has = |f: &dyn Fn(&serde_json::Value) -> bool| lines.iter().any(f);
        has(&|l| l["event"] == "connection" && l["transport"] == "ssh")
            && has(&|l| {
                l["event"] == "auth"
                    && l["account"] == "carol"
                    && l["success"] == false
                    && l["method"] == "basic"
                    && l["transport"] == "winrms"
            })
            && has(&|l| l["event"] == "auth" && l["account"] == "carol" && l["success"] == true)
            && has(&|l| {
                l["event"] == "command"
                    && l["command"].as_str().unwrap_or("").ends_with("/df -h")
                    && l["exit_code"] == 0
            })
            && has(&|l| {
                l["event"] == "refused"
                    && l["endpoint"] == "restricted"
                    && l["reason"]
                        .as_str()
                        .unwrap_or("")
                        .contains("does not allow 'sh'")
            })
            && has(&|l| {
                l["event"] == "refused"
                    && l["endpoint"] == "default"
                    && l["reason"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("access denied")
            })
            && has(&|l| l["event"] == "auth" && l["transport"] == "winrms" && l["success"] == true)
            && has(&|l| {
                l["event"] == "session" && l["action"] == "open" && l["transport"] == "winrm"
            })
            && has(&|l| {
                l["event"] == "command"
                    && l["command"].as_str().unwrap_or("").ends_with("uptime")
                    && l["transport"] == "winrm"
                    && l["bytes_out"].as_u64().unwrap_or(0) > 0
            })
            && has(&|l| l["event"] == "session" && l["action"] == "close")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("every audit line is JSON"))
            .collect();
        if wanted(&lines) || std::time::Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    assert!(wanted(&lines), "audit lines:\n{}", text.join("\n"));
    // Never a secret.
    let all = std::fs::read_to_string(&path).unwrap();
    assert!(!all.contains(PW) && !all.contains("not-the-password"));
    let mode = std::fs::metadata(&path).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
}
