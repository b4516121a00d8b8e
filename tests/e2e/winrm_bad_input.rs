//! Malformed and hostile WinRM requests (raw HTTP with valid Basic credentials): each gets
//! the fault or HTTP status of spec §1.3/§4, and the agent still serves a normal run_cmd
//! after every one of them.

use remote_tests::winrm::*;
use remote_tests::*;

const PW: &str = "Alice-pw-1";
const SHELL: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell";

/// What a case must get back.
enum Expect {
    /// HTTP 500 with a SOAP fault carrying this WSManFault Code.
    Fault(u64),
    /// HTTP 500 with a SOAP fault, whatever its code.
    AnyFault,
    Status(u64),
    /// 413, or the connection cut (never a hang).
    TooLarge,
}

fn check(label: &str, r: &Value, expect: &Expect) {
    let status = r["status"].as_u64();
    match expect {
        Expect::Fault(code) => {
            assert_eq!(status, Some(500), "{label}: {r:#}");
            assert_eq!(r["fault_code"].as_u64(), Some(*code), "{label}: {r:#}");
        }
        Expect::AnyFault => {
            assert_eq!(status, Some(500), "{label}: {r:#}");
            assert!(r["fault_code"].as_u64().is_some(), "{label}: {r:#}");
        }
        Expect::Status(s) => assert_eq!(status, Some(*s), "{label}: {r:#}"),
        Expect::TooLarge => {
            let cut = r["error"]["type"]
                .as_str()
                .is_some_and(|t| !t.to_lowercase().contains("timeout"));
            assert!(status == Some(413) || cut, "{label}: {r:#}");
            assert!(r["elapsed"].as_f64().unwrap() < 20.0, "{label}: {r:#}");
        }
    }
    if status == Some(500) {
        assert!(
            r["content_type"]
                .as_str()
                .is_some_and(|t| t.to_ascii_lowercase().starts_with("application/soap+xml")),
            "{label}: {r:#}"
        );
    }
}

#[test]
fn malformed_requests_get_faults_and_the_agent_keeps_serving() {
    let agent = Agent::start_winrm(
        AgentOptions::default(),
        WinrmOptions {
            allow_unencrypted: true,
            ..WinrmOptions::both()
        },
    );
    agent.add_user("alice", Some(PW), None);
    let http = agent.winrm_http.unwrap().port();
    let https = agent.winrm_https.unwrap().port();
    let cases: Vec<(&str, bool, Value, Expect)> = vec![
        (
            "not XML",
            false,
            json!({"body": {"kind": "text", "text": "this is not XML <"}}),
            Expect::Fault(2150858817),
        ),
        (
            "truncated envelope",
            false,
            json!({"body": {"kind": "text", "text":
                "<s:Envelope xmlns:s=\"http://www.w3.org/2003/05/soap-envelope\"><s:Header><a:Action"}}),
            Expect::Fault(2150858817),
        ),
        (
            "not XML over https",
            true,
            json!({"body": {"kind": "text", "text": "<<<>>>"}}),
            Expect::Fault(2150858817),
        ),
        (
            "Envelope in a wrong namespace",
            false,
            json!({"body": {"kind": "envelope", "env_ns": "http://example.com/not-soap"}}),
            Expect::AnyFault,
        ),
        (
            "addressing headers in a wrong namespace",
            false,
            json!({"body": {"kind": "envelope", "addr_ns": "http://example.com/not-addressing"}}),
            Expect::AnyFault,
        ),
        (
            "unknown action",
            false,
            json!({"body": {"kind": "envelope", "action": "http://example.com/Frobnicate"}}),
            Expect::Fault(2150858771),
        ),
        (
            "unknown resource URI",
            false,
            json!({"body": {"kind": "envelope", "resource_uri": "http://example.com/nothing",
                             "body": "<rsp:Shell/>"}}),
            Expect::Fault(2150858752),
        ),
        (
            "Send of 600 KB base64 (over the 512000-byte envelope limit)",
            false,
            json!({"body": {"kind": "send_big", "raw_bytes": 450_000}}),
            Expect::Fault(2150858825),
        ),
        (
            "100k nested elements, unclosed",
            false,
            json!({"body": {"kind": "nested", "depth": 100_000, "closed": false}}),
            Expect::AnyFault,
        ),
        (
            "70k nested elements, closed",
            false,
            json!({"body": {"kind": "nested", "depth": 70_000, "closed": true}}),
            Expect::AnyFault,
        ),
        (
            "10 MB body",
            false,
            json!({"body": {"kind": "filler", "size": 10_000_000}}),
            Expect::TooLarge,
        ),
        (
            "10 MB body over https",
            true,
            json!({"body": {"kind": "filler", "size": 10_000_000}}),
            Expect::TooLarge,
        ),
        (
            "GET /wsman",
            false,
            json!({"method": "GET", "body": {"kind": "text", "text": ""}}),
            Expect::Status(405),
        ),
        (
            "POST /other",
            false,
            json!({"path": "/other", "body": {"kind": "create"}}),
            Expect::Status(404),
        ),
        (
            "Content-Type text/plain",
            false,
            json!({"content_type": "text/plain", "body": {"kind": "create"}}),
            Expect::Status(415),
        ),
        (
            "POST /wsman/ (trailing slash is the same endpoint)",
            false,
            json!({"path": "/wsman/", "body": {"kind": "create"}}),
            Expect::Status(200),
        ),
        (
            "Create with an OperationTimeout of 1.8e19 seconds (no overflow, no crash)",
            false,
            json!({"body": {"kind": "envelope",
                             "action": "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create",
                             "timeout": "PT18000000000000000000S",
                             "body": "<rsp:Shell><rsp:InputStreams>stdin</rsp:InputStreams><rsp:OutputStreams>stdout stderr</rsp:OutputStreams></rsp:Shell>"}}),
            Expect::Status(200),
        ),
        (
            "Receive for an unknown ShellId",
            false,
            json!({"body": {"kind": "envelope", "action": format!("{SHELL}/Receive"),
                             "shell_id": "0F0F0F0F-0000-4000-8000-000000000000",
                             "body": "<rsp:Receive><rsp:DesiredStream CommandId=\"0F0F0F0F-0000-4000-8000-000000000001\">stdout stderr</rsp:DesiredStream></rsp:Receive>"}}),
            Expect::Fault(2150858843),
        ),
    ];
    let health = with(
        &pywinrm(&https_url(&agent), "basic", "alice", PW),
        json!({"op": "run_cmd", "command": "echo alive"}),
    );
    let mut ops = Vec::new();
    for (label, tls, req, _) in &cases {
        ops.push(
            json!({"op": "raw", "label": label, "port": if *tls { https } else { http },
                        "tls": tls, "basic": ["alice", PW], "requests": [req]}),
        );
        ops.push(with(
            &health,
            json!({"label": format!("run_cmd after {label}")}),
        ));
    }
    // A fault does not cost the keep-alive connection.
    ops.push(
        json!({"op": "raw", "label": "keep-alive", "port": http, "basic": ["alice", PW],
                    "requests": [{"body": {"kind": "text", "text": "junk"}},
                                 {"body": {"kind": "create"}}]}),
    );
    let results = py(&ops);
    for (i, (label, _, _, expect)) in cases.iter().enumerate() {
        let raw = ok(&results[2 * i]);
        check(label, &raw["responses"][0], expect);
        let after = ok(&results[2 * i + 1]);
        assert_eq!(after["stdout"], "alive\n", "after {label}: {after:#}");
    }
    let keep = &ok(results.last().unwrap())["responses"];
    check(
        "junk on a keep-alive connection",
        &keep[0],
        &Expect::Fault(2150858817),
    );
    assert_eq!(keep[1]["status"], 200, "{keep:#}");
    assert_eq!(
        keep[0]["local_port"], keep[1]["local_port"],
        "the connection was closed after the fault: {keep:#}"
    );
    assert!(
        keep[1]["body"].as_str().unwrap().contains("ShellId"),
        "{keep:#}"
    );
}
