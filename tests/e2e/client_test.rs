//! `remote test TARGET` against real agents on 127.0.0.1: the diagnosis and exit code for
//! each broken link (nothing listening, an unknown name, the wrong port in both directions,
//! a wrong password, a changed host key, Basic over plain HTTP refused by the client and by
//! the agent, endpoint permission denied) and for a healthy host over SSH, WinRM and
//! WinRM over HTTPS. Every test has its own client HOME and XDG_CONFIG_HOME.

use std::process::Output;
use std::time::Duration;

use remote_tests::*;

const T: Duration = Duration::from_secs(90);
const PW: &str = "Alice-pw-1";

/// An agent with SSH and both WinRM listeners, and `alice`, an admin (the built-in
/// `default` endpoint admits admins only) with a key and a password.
fn agent() -> (Agent, ClientKey) {
    agent_with(AgentOptions::default())
}

/// The same, with `opts` (agent config).
fn agent_with(opts: AgentOptions) -> (Agent, ClientKey) {
    let agent = Agent::start_winrm(opts, WinrmOptions::both());
    let key = agent.key("alice_key");
    let public = key.public.to_string_lossy().into_owned();
    agent.user(
        &[
            "add",
            "alice",
            "--admin",
            "--password-stdin",
            "--authorized-key",
            &public,
        ],
        Some(&format!("{PW}\n")),
    );
    (agent, key)
}

/// `remote --batch ARGS...`, with `password` in REMOTE_PASSWORD.
fn remote(client: &Client, args: &[&str], password: Option<&str>) -> Output {
    let mut cmd = client.remote();
    if let Some(pw) = password {
        cmd.env("REMOTE_PASSWORD", pw);
    }
    cmd.args(args);
    run_with_timeout(&mut cmd, None, T)
}

fn ssh_target(agent: &Agent, user: &str) -> String {
    format!("{user}@127.0.0.1:{}", agent.port())
}

fn http_port(agent: &Agent) -> u16 {
    agent.winrm_http.expect("http listener").port()
}

fn https_port(agent: &Agent) -> u16 {
    agent.winrm_https.expect("https listener").port()
}

/// The report's lines, and a failure message if the run is not what is expected: exit code
/// `code`, every line before the failing one an `ok` line, and `needles` in the report.
fn check(out: &Output, code: i32, needles: &[&str]) -> Vec<String> {
    let text = stdout(out);
    let context = format!("stdout:\n{text}\nstderr:\n{}", stderr(out));
    assert_eq!(out.status.code(), Some(code), "{context}");
    for n in needles {
        assert!(text.contains(n), "missing {n:?} in\n{context}");
    }
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let fail = lines.iter().position(|l| l.starts_with("FAIL "));
    let before = fail.unwrap_or(lines.len());
    for l in &lines[..before] {
        assert!(
            l.starts_with("ok"),
            "{l:?} before the failure in\n{context}"
        );
    }
    if code == 0 {
        assert!(fail.is_none(), "{context}");
    } else {
        let at = fail.unwrap_or_else(|| panic!("no FAIL line in\n{context}"));
        assert_eq!(
            lines.len(),
            at + 2,
            "the test goes on after a failure:\n{context}"
        );
    }
    lines
}

/// A local port with nothing listening on it.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn nothing_listening_is_a_tcp_failure_that_names_the_listener() {
    let client = Client::new();
    let port = closed_port();
    let out = remote(&client, &["test", &format!("alice@127.0.0.1:{port}")], None);
    let lines = check(
        &out,
        12,
        &[&format!(
            "nothing is listening on 127.0.0.1:{port}: is remote-agent running there and listening on that port? (remote-agent status; --ssh, default port 2222)"
        )],
    );
    assert_eq!(
        lines[0],
        "ok   name      127.0.0.1 (an address, nothing to resolve)"
    );
    assert_eq!(
        lines[1],
        format!("FAIL tcp       127.0.0.1:{port}: connection refused")
    );
    // The WinRM schemes name their own listener.
    let out = remote(
        &client,
        &["test", &format!("winrms://127.0.0.1:{port}")],
        None,
    );
    check(
        &out,
        12,
        &["(remote-agent status; --winrm-https, default port 5986)"],
    );
}

#[test]
fn an_unknown_name_is_a_name_failure() {
    let client = Client::new();
    let out = remote(&client, &["test", "alice@no-such-host.invalid"], None);
    let lines = check(
        &out,
        11,
        &[
            "cannot resolve host name 'no-such-host.invalid'",
            "/etc/hosts",
        ],
    );
    assert_eq!(
        lines[0],
        "FAIL name      cannot resolve 'no-such-host.invalid'"
    );
}

#[test]
fn the_wrong_port_says_which_protocol_answered_and_what_to_write() {
    let (agent, key) = agent();
    let client = Client::new();
    let identity = key.private.to_string_lossy().into_owned();
    let (ssh, http, https) = (agent.port(), http_port(&agent), https_port(&agent));

    // An ssh:// target on the WinRM HTTP port: the port answers in HTTP.
    let out = remote(
        &client,
        &[
            "--identity",
            &identity,
            "test",
            &format!("alice@127.0.0.1:{http}"),
        ],
        None,
    );
    check(
        &out,
        13,
        &[
            &format!("FAIL ssh       127.0.0.1:{http} speaks HTTP, not an SSH version line"),
            "answered in plain HTTP ('HTTP/1.1 ",
            &format!("write winrm://alice@127.0.0.1:{http}"),
            "ssh://alice@127.0.0.1:2222",
        ],
    );

    // An ssh:// target on the HTTPS port: TLS.
    let out = remote(
        &client,
        &[
            "--identity",
            &identity,
            "test",
            &format!("alice@127.0.0.1:{https}"),
        ],
        None,
    );
    check(
        &out,
        13,
        &[
            &format!("FAIL ssh       127.0.0.1:{https} speaks TLS, not an SSH version line"),
            &format!("write winrms://alice@127.0.0.1:{https}"),
        ],
    );

    // A winrm:// target on the SSH port: the peer sends its SSH version line.
    let out = remote(
        &client,
        &["test", &format!("winrm://alice@127.0.0.1:{ssh}")],
        Some(PW),
    );
    check(
        &out,
        13,
        &[
            &format!("FAIL http      127.0.0.1:{ssh} speaks SSH, not HTTP"),
            "answered with an SSH version line ('SSH-2.0-",
            &format!("write ssh://alice@127.0.0.1:{ssh}"),
            "winrm://alice@127.0.0.1:5985",
        ],
    );

    // winrms:// on the plain HTTP port, and winrm:// on the HTTPS port.
    let out = remote(
        &client,
        &["test", &format!("winrms://alice@127.0.0.1:{http}")],
        Some(PW),
    );
    check(
        &out,
        13,
        &[
            &format!("FAIL tls       127.0.0.1:{http} speaks HTTP, not TLS (HTTPS)"),
            &format!("write winrm://alice@127.0.0.1:{http}"),
        ],
    );
    let out = remote(
        &client,
        &["test", &format!("winrm://alice@127.0.0.1:{https}")],
        Some(PW),
    );
    check(
        &out,
        13,
        &[
            &format!("FAIL http      127.0.0.1:{https} speaks TLS, not HTTP"),
            &format!("write winrms://alice@127.0.0.1:{https}"),
        ],
    );
    // Nothing was recorded by any of it.
    assert!(!client.config_home().join("remote").exists());
}

#[test]
fn a_wrong_password_names_the_account_and_the_host() {
    let (agent, _key) = agent();
    let client = Client::new();
    let advice = "`remote-agent user add alice --password-stdin` creates one";

    let t = ssh_target(&agent, "alice");
    let out = remote(&client, &["test", &t], Some("not-the-password"));
    let lines = check(
        &out,
        14,
        &[
            &format!(
                "FAIL auth      wrong password for 'alice' at 127.0.0.1:{}",
                agent.port()
            ),
            &format!(
                "127.0.0.1:{} rejected the password of account 'alice' (tried: password): the password is wrong",
                agent.port()
            ),
            advice,
        ],
    );
    assert!(
        lines.iter().any(|l| l.starts_with("ok   host key")),
        "{lines:?}"
    );

    client.trust_hosts("127.0.0.1");
    for scheme in ["winrm", "winrms"] {
        let port = if scheme == "winrm" {
            http_port(&agent)
        } else {
            https_port(&agent)
        };
        let out = remote(
            &client,
            &["test", &format!("{scheme}://alice@127.0.0.1:{port}")],
            Some("not-the-password"),
        );
        check(
            &out,
            14,
            &[
                &format!("FAIL auth      wrong password for 'alice' at 127.0.0.1:{port}"),
                "(NTLM): the password is wrong",
                advice,
            ],
        );
    }
}

#[test]
fn a_changed_host_key_fails_loudly_and_a_new_one_is_not_recorded() {
    let (agent, key) = agent();
    let client = Client::new();
    let identity = key.private.to_string_lossy().into_owned();
    let t = ssh_target(&agent, "alice");
    let known_hosts = client.known_hosts();

    // First contact: reported, accepted for the test, not written.
    let out = remote(&client, &["--identity", &identity, "test", &t], None);
    let lines = check(&out, 0, &["would be trusted on first use"]);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ok   host key  ssh-ed25519 SHA256:")),
        "{lines:?}"
    );
    assert!(!known_hosts.exists(), "remote test recorded the host key");
    assert_eq!(stderr(&out), "");

    // Recorded by an ordinary command: then the test says so.
    let run = client.run(&key, &t, &[], &["true"], None);
    assert!(run.status.success(), "{}", stderr(&run));
    let out = remote(&client, &["--identity", &identity, "test", &t], None);
    check(
        &out,
        0,
        &[&format!("as recorded in {}", known_hosts.display())],
    );

    // Another key recorded for this host, on line 2: a loud failure naming file and line.
    let other = agent.key("not_the_host_key");
    let other_pub = std::fs::read_to_string(&other.public).unwrap();
    let other_pub: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    let recorded = format!(
        "# recorded earlier\n[127.0.0.1]:{} {}\n",
        agent.port(),
        other_pub.join(" ")
    );
    std::fs::write(&known_hosts, &recorded).unwrap();
    let out = remote(&client, &["--identity", &identity, "test", &t], None);
    let lines = check(
        &out,
        13,
        &[
            &format!(
                "FAIL host key  host key of 127.0.0.1:{} CHANGED",
                agent.port()
            ),
            "has CHANGED",
            &format!("{}:2 records ssh-ed25519", known_hosts.display()),
            "delete line 2",
        ],
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ok   ssh       SSH-2.0-")),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains(" auth ")), "{lines:?}");
    assert_eq!(std::fs::read_to_string(&known_hosts).unwrap(), recorded);
}

#[test]
fn basic_over_plain_http_is_refused_by_the_client_then_by_the_agent() {
    // The agent runs without --allow-unencrypted.
    let (agent, _key) = agent();
    let client = Client::new();
    let port = http_port(&agent);
    let t = format!("winrm://alice@127.0.0.1:{port}");

    // The client refuses unless the host is in trusted_hosts.
    let out = remote(&client, &["--auth", "basic", "test", &t], Some(PW));
    let list = client.config_home().join("remote/trusted_hosts");
    check(
        &out,
        14,
        &[
            "FAIL auth      Basic over http:// refused by this client",
            &format!("Basic authentication over http:// to 127.0.0.1:{port} is refused"),
            "Use winrms://",
            &list.display().to_string(),
        ],
    );

    // Trusted here, refused by the agent.
    std::fs::create_dir_all(list.parent().unwrap()).unwrap();
    std::fs::write(&list, "127.0.0.1\n").unwrap();
    let out = remote(&client, &["--auth", "basic", "test", &t], Some(PW));
    let lines = check(
        &out,
        14,
        &[
            "FAIL auth      Basic over http:// refused by the server",
            "Basic authentication over http:// is refused by the server",
            "--allow-unencrypted",
            "Use winrms://",
        ],
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ok   http") && l.contains("offers Negotiate")),
        "{lines:?}"
    );

    // Over HTTPS, Basic is fine.
    let out = remote(
        &client,
        &[
            "--auth",
            "basic",
            "test",
            &format!("winrms://alice@127.0.0.1:{}", https_port(&agent)),
        ],
        Some(PW),
    );
    check(&out, 0, &["(Basic)"]);
}

#[test]
fn a_healthy_host_passes_every_step_over_ssh_winrm_and_winrms() {
    let (agent, key) = agent();
    let client = Client::new();
    let identity = key.private.to_string_lossy().into_owned();
    let t = ssh_target(&agent, "alice");

    let out = remote(&client, &["--identity", &identity, "test", &t], None);
    let lines = check(&out, 0, &[]);
    let labels: Vec<&str> = lines[..lines.len() - 1]
        .iter()
        .map(|l| l.get(5..14).unwrap_or_default().trim())
        .collect();
    assert_eq!(
        labels,
        [
            "name", "tcp", "ssh", "host key", "auth", "endpoint", "command"
        ],
        "{lines:?}"
    );
    assert_eq!(
        lines[1].split(" (").next(),
        Some(format!("ok   tcp       127.0.0.1:{}", agent.port()).as_str())
    );
    assert_eq!(
        lines[4],
        format!(
            "ok   auth      logged in as 'alice' at 127.0.0.1:{}",
            agent.port()
        )
    );
    assert!(
        lines[5].starts_with("ok   endpoint  'default': session "),
        "{lines:?}"
    );
    assert_eq!(
        lines[6],
        "ok   command   `echo remote-test-ok` printed remote-test-ok (exit 0)"
    );
    assert_eq!(lines[7], format!("ok: {t} is healthy"));
    assert_eq!(stderr(&out), "");

    // The session it opened is gone again.
    let list = remote(
        &client,
        &["--identity", &identity, "session", "list", &t],
        None,
    );
    assert!(!stdout(&list).contains("remote-test"), "{}", stdout(&list));

    // Password login works too.
    let out = remote(&client, &["test", &t], Some(PW));
    check(&out, 0, &[&format!("ok: {t} is healthy")]);

    // WinRM over HTTP (NTLM) and over HTTPS.
    let winrm = format!("winrm://alice@127.0.0.1:{}", http_port(&agent));
    let out = remote(&client, &["test", &winrm], Some(PW));
    check(
        &out,
        0,
        &[
            "speaks HTTP (HTTP/1.1 401 Unauthorized; offers Negotiate)",
            "(NTLM)",
            "WinRM shell",
            "printed remote-test-ok (exit 0)",
            &format!("ok: {winrm} is healthy"),
        ],
    );
    let winrms = format!("winrms://alice@127.0.0.1:{}", https_port(&agent));
    let fp = agent.winrm_fingerprint.clone().expect("fingerprint");
    // An unverifiable certificate of a host not in trusted_hosts: the TLS step fails, naming
    // the fingerprint and the two ways on.
    let out = remote(&client, &["test", &winrms], Some(PW));
    check(
        &out,
        13,
        &[
            "unverifiable certificate of a host not in trusted_hosts",
            &format!("pass --fingerprint {fp}, or add 127.0.0.1 to"),
        ],
    );
    client.trust_hosts("127.0.0.1");
    let out = remote(&client, &["test", &winrms], Some(PW));
    check(
        &out,
        0,
        &[
            &format!("certificate {fp} is new, and 127.0.0.1 is listed in"),
            "it would be trusted on first use",
            &format!("ok: {winrms} is healthy"),
        ],
    );
    assert!(
        !client
            .config_home()
            .join("remote/winrm_known_hosts")
            .exists()
    );
    let out = remote(&client, &["--fingerprint", &fp, "test", &winrms], Some(PW));
    check(
        &out,
        0,
        &[&format!("certificate {fp} matches --fingerprint")],
    );

    // --json: one object per step, then the result.
    let out = remote(
        &client,
        &["--identity", &identity, "test", "--json", &t],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let objects: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let steps: Vec<&str> = objects
        .iter()
        .map(|o| o["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "name", "tcp", "protocol", "protocol", "auth", "endpoint", "command", "result"
        ]
    );
    assert!(objects.iter().all(|o| o["ok"] == true), "{objects:?}");

    // And a failure in JSON carries the message and the exit code.
    let port = closed_port();
    let out = remote(
        &client,
        &["test", "--json", &format!("127.0.0.1:{port}")],
        None,
    );
    assert_eq!(out.status.code(), Some(12));
    let last: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], "tcp");
    assert_eq!(last["ok"], false);
    assert_eq!(last["exit_code"], 12);
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .starts_with("nothing is listening on"),
        "{last}"
    );
}

#[test]
fn endpoint_permission_denied_is_its_own_diagnosis() {
    // The built-in `default` (admins only): the harness does not open it here.
    let (agent, _key) = agent_with(AgentOptions {
        open_default_endpoint: false,
        ..AgentOptions::default()
    });
    agent.add_user("bob", Some("Bob-pw-1"), None);
    let client = Client::new();
    let denied = "access denied: user 'bob' may not use endpoint 'default' (allowed: admins). Ask an admin to add you, or pick --endpoint";

    // SSH: the session protocol's Error frame.
    let t = ssh_target(&agent, "bob");
    let out = remote(&client, &["test", &t], Some("Bob-pw-1"));
    let lines = check(
        &out,
        15,
        &["FAIL endpoint  access denied to endpoint 'default'", denied],
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ok   auth      logged in as 'bob'")),
        "{lines:?}"
    );

    // WinRM: the SOAP fault of Create shell.
    let winrm = format!("winrm://bob@127.0.0.1:{}", http_port(&agent));
    let out = remote(&client, &["test", &winrm], Some("Bob-pw-1"));
    check(
        &out,
        15,
        &["FAIL endpoint  access denied to endpoint 'default'", denied],
    );

    // An endpoint that does not exist is an endpoint failure too.
    let out = remote(
        &client,
        &["test", "--endpoint", "no-such-endpoint", &t],
        Some("Bob-pw-1"),
    );
    check(&out, 15, &["FAIL endpoint", "no-such-endpoint"]);
}

#[test]
fn a_port_that_never_answers_is_a_tcp_timeout() {
    // A listener whose accept queue is full: the kernel drops further SYNs, as a firewall
    // that drops packets would, so the connection neither succeeds nor is refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    let full = (0..4096).any(|_| {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => {
                queued.push(s);
                false
            }
            Err(_) => true,
        }
    });
    assert!(full, "the accept queue never filled");
    let client = Client::new();
    let t = format!("alice@{addr}");
    let out = remote(&client, &["--connect-timeout", "1", "test", &t], Some(PW));
    check(
        &out,
        12,
        &[
            &format!("FAIL tcp       {addr}: no answer"),
            &format!(
                "no answer from {addr} within 1 s: is the host up, and port {} open in its firewall",
                addr.port()
            ),
            "--connect-timeout SECS",
        ],
    );
    drop(queued);
}

#[test]
fn a_relay_target_is_checked_through_the_relay_with_its_certificate_gated() {
    let mut relay = remote_tests::relay::Relay::start();
    let join = relay.join_token();
    let opts = WinrmOptions {
        extra_args: relay.agent_args("agent1", &join, None),
        ..WinrmOptions::default()
    };
    let mut agent = Agent::start_winrm(AgentOptions::default(), opts);
    agent.add_user("alice", Some(PW), None);
    assert!(agent.wait_log("tunnel up", T), "{}", agent.log());
    let token = relay.add_user("alice");
    let client = Client::new();
    let test = |args: &[&str], token: &str| {
        let mut cmd = client.remote();
        cmd.env("REMOTE_RELAY", relay.addr.to_string())
            .env("REMOTE_TOKEN", token)
            .args(args);
        run_with_timeout(&mut cmd, None, T)
    };
    let fp = relay.fingerprint.clone();

    // The relay's self-signed certificate, 127.0.0.1 not in trusted_hosts: the TLS step
    // fails before the token is sent.
    let out = test(&["test", "relay://agent1"], &token);
    check(
        &out,
        13,
        &[
            "FAIL tls",
            "unverifiable certificate of a host not in trusted_hosts",
            &format!("pass --fingerprint {fp}"),
        ],
    );

    // Pinned: every step passes, through the relay to the agent and a command there.
    let out = test(&["--fingerprint", &fp, "test", "relay://agent1"], &token);
    check(
        &out,
        0,
        &[
            &format!("certificate {fp} matches --fingerprint"),
            "REMOTE_TOKEN accepted by the relay",
            "printed remote-test-ok (exit 0)",
            "ok: relay://agent1 is healthy",
        ],
    );

    // Listed in trusted_hosts instead: the same, and nothing is recorded by a test.
    client.trust_hosts("127.0.0.1");
    let out = test(&["test", "relay://agent1"], &token);
    check(
        &out,
        0,
        &[
            "is new, and 127.0.0.1 is listed in",
            "ok: relay://agent1 is healthy",
        ],
    );
    assert!(
        !client
            .config_home()
            .join("remote/relay_known_hosts")
            .exists()
    );

    // A token the relay does not know: the authentication step.
    let out = test(&["test", "relay://agent1"], "ru_not-a-token");
    check(&out, 14, &["FAIL auth", "the relay refused the token"]);

    // An agent the relay has never seen.
    let out = test(&["test", "relay://nowhere"], &token);
    check(
        &out,
        15,
        &["agent 'nowhere' not reachable through the relay"],
    );
    relay.stop();
}
