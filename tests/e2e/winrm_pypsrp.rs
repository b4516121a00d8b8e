//! pypsrp 0.9.1 (Ansible's `psrp` connection library) against the agent's WinRM server:
//! `Client.execute_cmd` with Negotiate (SPNEGO) + message encryption and the other auth
//! modes, and `WinRS`/`Process` with a short OperationTimeout, stdin and ctrl_c.

use remote_tests::winrm::*;
use remote_tests::*;

const PW: &str = "Alice-pw-1";

fn agent() -> Agent {
    let agent = Agent::start_winrm(AgentOptions::default(), WinrmOptions::both());
    agent.add_user("alice", Some(PW), None);
    agent
}

fn psrp(port: u16, ssl: bool, auth: &str, encryption: &str) -> Value {
    json!({"port": port, "ssl": ssl, "auth": auth, "encryption": encryption,
           "user": "alice", "password": PW})
}

#[test]
fn pypsrp_execute_cmd_with_negotiate_and_encryption() {
    let agent = agent();
    let http = agent.winrm_http.unwrap().port();
    let https = agent.winrm_https.unwrap().port();
    let cases = [
        (
            "negotiate http auto",
            psrp(http, false, "negotiate", "auto"),
        ),
        (
            "negotiate http always",
            psrp(http, false, "negotiate", "always"),
        ),
        ("ntlm http auto", psrp(http, false, "ntlm", "auto")),
        (
            "negotiate https (cbt)",
            psrp(https, true, "negotiate", "auto"),
        ),
        (
            "negotiate https always",
            psrp(https, true, "negotiate", "always"),
        ),
        ("basic https", psrp(https, true, "basic", "auto")),
    ];
    let ops: Vec<Value> = cases
        .iter()
        .map(|(label, conn)| {
            with(
                conn,
                json!({"op": "psrp_cmd", "label": label,
                       "command": "echo out; echo err >&2; exit 3"}),
            )
        })
        .collect();
    for r in py(&ops) {
        let r = ok(&r);
        assert_eq!(r["stdout"], "out\n", "{r:#}");
        assert_eq!(r["stderr"], "err\n", "{r:#}");
        assert_eq!(r["status"], 3, "{r:#}");
    }
}

#[test]
fn pypsrp_process_with_timeout_stdin_and_ctrl_c() {
    let agent = agent();
    let http = agent.winrm_http.unwrap().port();
    let https = agent.winrm_https.unwrap().port();
    for conn in [
        psrp(http, false, "negotiate", "auto"),
        psrp(https, true, "basic", "auto"),
    ] {
        // OperationTimeout 1 s: the 2-second command spans TimedOut faults, which pypsrp
        // ignores only for code 2150858793.
        let r = py1(with(
            &conn,
            json!({"op": "psrp_process", "op_timeout": 1, "slow_secs": 2}),
        ));
        let r = ok(&r);
        assert_eq!(r["slow"]["stdout"], "hi there\n", "environment: {r:#}");
        assert_eq!(r["slow"]["status"], 0, "{r:#}");
        assert!(r["slow"]["elapsed"].as_f64().unwrap() >= 1.9, "{r:#}");
        // Arguments one element each (pypsrp), joined for /bin/sh -c; stdin with End.
        assert_eq!(r["stdin"]["stdout"], "STDIN VIA PYPSRP\n", "{r:#}");
        assert_eq!(r["stdin"]["status"], 0, "{r:#}");
        // ctrl_c = SIGINT to the command's process group: `sleep 100` ends at once, 128+2.
        assert_eq!(r["ctrl_c"]["state"], "Done", "{r:#}");
        assert_eq!(r["ctrl_c"]["status"], 128 + 2, "{r:#}");
        assert!(r["ctrl_c"]["elapsed"].as_f64().unwrap() < 5.0, "{r:#}");
    }
}
