//! pywinrm 0.5.0 (what Ansible's `winrm` connection uses) against the agent's WinRM server:
//! `Session.run_cmd` with Basic over HTTPS and NTLM over HTTP (message encryption) and
//! HTTPS, stdin through Send/End, 1 MiB of output, and Ansible's stdin-streaming pattern.

use remote_tests::winrm::*;
use remote_tests::*;

const PW: &str = "Alice-pw-1";
const SCRIPT: &str = "echo out; echo err >&2; exit 3";

fn agent() -> Agent {
    let agent = Agent::start_winrm(AgentOptions::default(), WinrmOptions::both());
    agent.add_user("alice", Some(PW), None);
    agent
}

/// stdout, stderr and the exit code of `sh -c SCRIPT` and of a few other lines, over one
/// connection setup; `conn` is the pywinrm endpoint/transport/credentials.
fn run_cmd_checks(conn: &Value) {
    let ops = [
        // run_cmd(command, args) joins args with spaces; the agent runs /bin/sh -c LINE.
        with(
            conn,
            json!({"op": "run_cmd", "label": "sh -c", "command": "sh", "args": ["-c", format!("'{SCRIPT}'")]}),
        ),
        with(
            conn,
            json!({"op": "run_cmd", "label": "line", "command": SCRIPT}),
        ),
        with(
            conn,
            json!({"op": "run_cmd", "label": "utf8", "command": "printf", "args": ["'h\\303\\251llo\\n'"]}),
        ),
        with(
            conn,
            json!({"op": "run_cmd", "label": "signal", "command": "kill -TERM $$"}),
        ),
        with(
            conn,
            json!({"op": "run_cmd", "label": "identity", "command": "id -un; pwd; echo $HOME"}),
        ),
    ];
    let r = py(&ops);
    for (i, label) in ["sh -c", "line"].iter().enumerate() {
        let r = ok(&r[i]);
        assert_eq!(r["stdout"], "out\n", "{label}: {r:#}");
        assert_eq!(r["stderr"], "err\n", "{label}: {r:#}");
        assert_eq!(r["status"], 3, "{label}: {r:#}");
    }
    let utf8 = ok(&r[2]);
    assert_eq!(
        utf8["stdout"], "h\u{e9}llo\n",
        "bytes passed through: {utf8:#}"
    );
    assert_eq!(utf8["status"], 0);
    let signal = ok(&r[3]);
    assert_eq!(signal["status"], 128 + 15, "killed by SIGTERM: {signal:#}");
    // Without run_as, the command runs as the agent's own account, in a real directory.
    let ident = ok(&r[4]);
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    let lines: Vec<&str> = ident["stdout"].as_str().unwrap().lines().collect();
    assert_eq!(lines.len(), 3, "{ident:#}");
    assert_eq!(lines[0], me, "{ident:#}");
    assert!(std::path::Path::new(lines[1]).is_dir(), "{ident:#}");
    assert_eq!(ident["status"], 0);
}

#[test]
fn pywinrm_basic_over_https_runs_commands() {
    let agent = agent();
    assert!(
        agent
            .winrm_fingerprint
            .as_deref()
            .is_some_and(|f| f.starts_with("SHA256:")),
        "{:?}",
        agent.winrm_fingerprint
    );
    run_cmd_checks(&pywinrm(&https_url(&agent), "basic", "alice", PW));
    // transport 'ssl' is pywinrm's name for Basic over HTTPS as well.
    run_cmd_checks(&pywinrm(&https_url(&agent), "ssl", "alice", PW));
}

#[test]
fn pywinrm_ntlm_over_http_with_message_encryption() {
    let agent = agent();
    // 'auto' encrypts on http:// URLs; 'always' too.
    run_cmd_checks(&pywinrm(&http_url(&agent), "ntlm", "alice", PW));
    run_cmd_checks(&with(
        &pywinrm(&http_url(&agent), "ntlm", "alice", PW),
        json!({"encryption": "always"}),
    ));
}

#[test]
fn pywinrm_ntlm_over_https() {
    let agent = agent();
    // 'auto' does not encrypt on https:// (TLS only, channel binding in the AUTHENTICATE);
    // 'always' seals inside TLS as well.
    run_cmd_checks(&pywinrm(&https_url(&agent), "ntlm", "alice", PW));
    run_cmd_checks(&with(
        &pywinrm(&https_url(&agent), "ntlm", "alice", PW),
        json!({"encryption": "always"}),
    ));
}

#[test]
fn pywinrm_stdin_through_send_with_end() {
    let agent = agent();
    for conn in [
        pywinrm(&https_url(&agent), "basic", "alice", PW),
        pywinrm(&http_url(&agent), "ntlm", "alice", PW),
    ] {
        let r = py(&[
            with(
                &conn,
                json!({"op": "stdin", "command": "cat", "chunks": ["line1\n", "line2\n", "last line, no newline"]}),
            ),
            // The command sees EOF only with End: it counts what it got, then exits 5.
            with(
                &conn,
                json!({"op": "stdin", "command": "wc -c; exit 5", "chunks": ["12345", "6789\n"]}),
            ),
            // An empty last chunk with End (Ansible sends "" for empty files).
            with(
                &conn,
                json!({"op": "stdin", "command": "cat; echo EOF", "chunks": ["abc", ""]}),
            ),
        ]);
        let cat = ok(&r[0]);
        assert_eq!(
            cat["stdout"], "line1\nline2\nlast line, no newline",
            "{cat:#}"
        );
        assert_eq!(cat["status"], 0);
        let wc = ok(&r[1]);
        assert_eq!(wc["stdout"].as_str().unwrap().trim(), "10", "{wc:#}");
        assert_eq!(wc["status"], 5);
        let empty = ok(&r[2]);
        assert_eq!(empty["stdout"], "abcEOF\n", "{empty:#}");
    }
}

#[test]
fn pywinrm_one_mib_of_output_arrives_whole() {
    let agent = agent();
    for conn in [
        pywinrm(&https_url(&agent), "basic", "alice", PW),
        pywinrm(&http_url(&agent), "ntlm", "alice", PW),
    ] {
        let r = py1(with(&conn, json!({"op": "big_output", "size": 1 << 20})));
        let r = ok(&r);
        assert_eq!(r["length"], 1 << 20, "{r:#}");
        assert_eq!(r["status"], 0, "{r:#}");
        assert_eq!(r["remote_sha256"].as_str().unwrap().len(), 64, "{r:#}");
        assert_eq!(r["sha256"], r["remote_sha256"], "output corrupted: {r:#}");
        // Every Receive response fits pywinrm's MaxEnvelopeSize of 153600 (spec §1.5), so
        // 1 MiB takes several of them.
        let max = r["max_response_bytes"].as_u64().unwrap();
        assert!(max <= 153_600, "a response of {max} bytes: {r:#}");
        assert!(r["receives"].as_u64().unwrap() >= 8, "{r:#}");
    }
}

/// Finely interleaved stdout and stderr (one element per chunk) still fits each response
/// into the client's MaxEnvelopeSize (spec §3.4), and arrives whole.
#[test]
fn interleaved_output_stays_within_max_envelope_size() {
    let agent = agent();
    let conn = pywinrm(&https_url(&agent), "basic", "alice", PW);
    let r = py1(with(&conn, json!({"op": "interleaved_output", "n": 20000})));
    let r = ok(&r);
    assert_eq!(r["stdout_ok"], true, "{r:#}");
    assert_eq!(r["stderr_ok"], true, "{r:#}");
    assert_eq!(r["status"], 0, "{r:#}");
    let max = r["max_response_bytes"].as_u64().unwrap();
    assert!(max <= 153_600, "a response of {max} bytes: {r:#}");
}

#[test]
fn ansible_pattern_streams_a_megabyte_of_stdin_byte_exact() {
    let agent = agent();
    for conn in [
        pywinrm(&https_url(&agent), "basic", "alice", PW),
        pywinrm(&http_url(&agent), "ntlm", "alice", PW),
    ] {
        let r = py1(with(
            &conn,
            json!({"op": "ansible", "size": 1_012_345, "chunk": 200_000}),
        ));
        let r = ok(&r);
        assert_eq!(r["sends"], 6, "{r:#}");
        assert_eq!(r["status"], 0, "{r:#}");
        assert_eq!(
            r["remote_sha256"], r["sent_sha256"],
            "stdin corrupted: {r:#}"
        );
        assert_eq!(r["length"], 1_012_345, "{r:#}");
        assert_eq!(r["sha256"], r["sent_sha256"], "output corrupted: {r:#}");
    }
    // put_file's size: 333000 raw bytes → a ~445 KB Send envelope, under the default
    // 512000-byte request limit (spec §1.5), far over the 153600 pywinrm advertises.
    let r = py1(with(
        &pywinrm(&https_url(&agent), "basic", "alice", PW),
        json!({"op": "ansible", "size": 700_000, "chunk": 333_000}),
    ));
    let r = ok(&r);
    assert_eq!(r["sends"], 3, "{r:#}");
    assert_eq!(r["sha256"], r["sent_sha256"], "{r:#}");
    assert_eq!(r["remote_sha256"], r["sent_sha256"], "{r:#}");
}

#[test]
fn pywinrm_concurrent_shells_over_several_connections() {
    let agent = agent();
    for conn in [
        pywinrm(&https_url(&agent), "basic", "alice", PW),
        pywinrm(&http_url(&agent), "ntlm", "alice", PW),
    ] {
        let r = py1(with(
            &conn,
            json!({"op": "concurrent", "workers": 6, "rounds": 3}),
        ));
        let r = ok(&r);
        for w in r["workers"].as_array().unwrap() {
            assert_eq!(
                w["ok"], true,
                "a worker's output was wrong or missing: {r:#}"
            );
            assert_eq!(w["rounds"], 3, "{r:#}");
        }
    }
}
