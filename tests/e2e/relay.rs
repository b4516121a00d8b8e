//! The relay end to end (issue 5): real `remote-relay`, `remote-agent` and `remote` binaries
//! on loopback. Agents enrol once with a join token and dial out; sessions persist in the
//! relay, so output survives a relay killed with SIGKILL and a cut tunnel, exactly once and
//! in order, and can be attached from another machine (another HOME); users see only their
//! own sessions; `remote run` reaches several agents through the relay; bad input is refused
//! or cleaned up while the relay keeps serving others.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use remote_proto::relay::agent_tunnel_client::AgentTunnelClient;
use remote_proto::relay::relay_client::RelayClient;
use remote_proto::relay::{
    ConverseRequest, ConverseTarget, EnrolRequest, ListAgentsRequest, RelayMessage, TunnelOpen,
    converse_request, converse_response, relay_message,
};
use remote_proto::session::{
    Attach, ClientFrame, ErrorCode, ListSessions, ServerFrame, client_frame, server_frame,
};
use remote_proto::tunnel;
use remote_tests::relay::{CutProxy, Relay, grpc_channel, tls_connect};
use remote_tests::*;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(60);

/// An agent named `name` that dials `relay` (through `via` when given), with accounts
/// alice and bob.
fn agent_on(relay: &Relay, name: &str, via: Option<SocketAddr>) -> Agent {
    let token = relay.join_token();
    let mut agent = Agent::start_winrm(
        AgentOptions::default(),
        WinrmOptions {
            extra_args: relay.agent_args(name, &token, via),
            ..Default::default()
        },
    );
    agent.add_user("alice", Some("pw-alice"), None);
    agent.add_user("bob", Some("pw-bob"), None);
    assert!(
        agent.wait_log("tunnel up", T),
        "the agent's tunnel did not come up:\n{}",
        agent.log()
    );
    agent
}

/// `remote-agent run` with no listener of its own, state in `state`: add the relay flags.
fn relay_only_agent(state: &std::path::Path) -> Command {
    let mut cmd = Command::new(bin("remote-agent"));
    cmd.args(["run", "--ssh", "off", "--socket", "off"])
        .args(["--winrm-http", "off", "--winrm-https", "off", "--state-dir"])
        .arg(state);
    cmd
}

/// `remote` on machine `client` as the relay user whose token is `token`, with the relay's
/// certificate pinned as its log printed it.
fn remote(client: &Client, relay: &Relay, token: &str) -> Command {
    let mut cmd = client.remote();
    cmd.env("REMOTE_RELAY", relay.addr.to_string())
        .env("REMOTE_TOKEN", token)
        .args(["--fingerprint", &relay.fingerprint]);
    cmd
}

fn run(cmd: &mut Command) -> std::process::Output {
    run_with_timeout(cmd, None, T)
}

/// `remote session new relay://AGENT`: the id.
fn new_session(client: &Client, relay: &Relay, token: &str, agent: &str) -> String {
    let out =
        run(remote(client, relay, token).args(["session", "new", &format!("relay://{agent}")]));
    assert!(out.status.success(), "session new: {}", stderr(&out));
    let id = stdout(&out).lines().last().unwrap_or_default().to_string();
    assert_eq!(id.len(), 16, "{id:?}");
    id
}

/// Start a counter of `n` lines, one per 10 ms, detached in session `id`.
fn start_counter(client: &Client, relay: &Relay, token: &str, id: &str, n: u32) {
    let script =
        format!("i=0; while [ $i -lt {n} ]; do echo line $i; i=$((i+1)); sleep 0.01; done");
    let out = run(remote(client, relay, token).args(["exec", "-d", id, "--", &script]));
    assert!(out.status.success(), "exec -d: {}", stderr(&out));
}

/// The counter lines in `text`, checked to be 0, 1, 2, … with nothing missing, repeated or
/// out of order; returns how many.
fn check_counter(text: &str) -> usize {
    let seen: Vec<u32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("line "))
        .map(|n| n.trim().parse().expect("a counter line"))
        .collect();
    let expected: Vec<u32> = (0..seen.len() as u32).collect();
    assert_eq!(seen, expected, "lines lost, repeated or out of order");
    seen.len()
}

/// A `remote attach` running in the background, its stdout lines collected with the time
/// each arrived.
struct Attached {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Attached {
    fn start(mut cmd: Command) -> Attached {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("remote attach");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push((Instant::now(), line));
            }
        });
        Attached { child, lines }
    }

    /// Wait until a line equal to `last` arrived; returns all the text.
    fn wait_for(&mut self, last: &str, timeout: Duration) -> (String, Vec<Instant>) {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                if lines.iter().any(|(_, l)| l == last) || Instant::now() > deadline {
                    let text: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
                    return (text, lines.iter().map(|(t, _)| *t).collect());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_join_token_enrols_once_and_wrong_credentials_are_refused() {
    let relay = Relay::start();
    let token = relay.join_token();
    let mut agent1 = Agent::start_winrm(
        AgentOptions::default(),
        WinrmOptions {
            extra_args: relay.agent_args("agent1", &token, None),
            ..Default::default()
        },
    );
    assert!(agent1.wait_log("tunnel up", T), "{}", agent1.log());
    use std::os::unix::fs::PermissionsExt;
    let cred = agent1.state_dir.join("relay_credential");
    let mode = std::fs::metadata(&cred).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // The same token again, for another agent: refused, and the agent says why and stops.
    let other = tempfile::tempdir().unwrap();
    let out = run_with_timeout(
        relay_only_agent(&other.path().join("state"))
            .args(relay.agent_args("agent2", &token, None)),
        None,
        T,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));

    // A credential the relay never issued: the tunnel is refused (and retried, quietly).
    let forged = tempfile::tempdir().unwrap();
    let state = forged.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("relay_credential"),
        "ra_AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n",
    )
    .unwrap();
    let mut forger = relay_only_agent(&state)
        .args(["--relay", &relay.addr.to_string(), "--name", "agent3"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = forger.stderr.take().unwrap();
    let rx = lines_of(err);
    let deadline = Instant::now() + T;
    let mut log = String::new();
    while Instant::now() < deadline && !log.contains("credential was refused") {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            log.push_str(&l);
            log.push('\n');
        }
    }
    let _ = forger.kill();
    let _ = forger.wait();
    assert!(log.contains("credential was refused"), "{log}");

    // Raw calls: a reused token and a missing credential are refused before anything else.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut agents = AgentTunnelClient::new(grpc_channel(relay.addr).await);
        let e = agents
            .enrol(EnrolRequest {
                join_token: token.clone(),
                agent_name: "agent4".into(),
                software: "probe".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        // Tunnels: no credential, and a first message over its 4 KiB bound.
        let refusal = |open: TunnelOpen| async move {
            let tls = tls_connect(relay.addr, tunnel::ALPN).await.unwrap();
            let (mut rd, mut wr) = tokio::io::split(tls);
            tunnel::write(&mut wr, &open).await.unwrap();
            wr.flush().await.unwrap();
            let mut reader = tunnel::FrameReader::new(tunnel::MAX_MESSAGE_BYTES);
            let answer: Option<RelayMessage> = reader.message(&mut rd).await.unwrap();
            let Some(relay_message::Msg::Refused(r)) = answer.and_then(|m| m.msg) else {
                panic!("expected TunnelRefused");
            };
            // And the relay closes the connection.
            assert!(reader.next(&mut rd).await.unwrap_or(None).is_none());
            r
        };
        let r = refusal(TunnelOpen::default()).await;
        assert_eq!(r.code, tonic::Code::Unauthenticated as i32, "{r:?}");
        let r = refusal(TunnelOpen {
            credential: "x".repeat(5000),
        })
        .await;
        assert_eq!(r.code, tonic::Code::InvalidArgument as i32, "{r:?}");
        assert!(r.message.contains("at most 4096 bytes"), "{r:?}");
    });
    // The first agent is still connected and usable.
    agent1.add_user("alice", Some("pw"), None);
    let alice = relay.add_user("alice");
    let client = Client::new();
    let out = run(remote(&client, &relay, &alice).args(["run", "relay://agent1", "--", "echo ok"]));
    assert_eq!(stdout(&out), "ok\n", "{}", stderr(&out));
}

#[test]
fn a_counter_survives_a_killed_relay_and_attaches_exactly_once_from_another_home() {
    let mut relay = Relay::start();
    let _agent = agent_on(&relay, "agent1", None);
    let alice = relay.add_user("alice");
    let (home_a, home_b) = (Client::new(), Client::new());
    let id = new_session(&home_a, &relay, &alice, "agent1");
    start_counter(&home_a, &relay, &alice, &id, 1200);
    std::thread::sleep(Duration::from_secs(1));
    relay.kill();
    // The counter keeps running with no relay at all.
    std::thread::sleep(Duration::from_secs(5));
    relay.restart();
    let started = Instant::now();
    let mut attached = Attached::start({
        let mut cmd = remote(&home_b, &relay, &alice);
        cmd.args(["attach", &id]);
        cmd
    });
    let (text, times) = attached.wait_for("line 1199", Duration::from_secs(90));
    assert_eq!(check_counter(&text), 1200, "{text}");
    // Some lines were live: they arrived well after the attach began.
    let live = times
        .iter()
        .filter(|t| t.duration_since(started) > Duration::from_secs(2))
        .count();
    assert!(live > 0, "no live lines after the backlog");
}

#[test]
fn a_cut_tunnel_loses_nothing_and_the_session_keeps_running() {
    let relay = Relay::start();
    let proxy = CutProxy::start(relay.addr);
    let mut agent = agent_on(&relay, "agent1", Some(proxy.addr));
    let alice = relay.add_user("alice");
    let (home_a, home_b) = (Client::new(), Client::new());
    let id = new_session(&home_a, &relay, &alice, "agent1");
    start_counter(&home_a, &relay, &alice, &id, 1500);
    std::thread::sleep(Duration::from_secs(1));
    proxy.cut();
    std::thread::sleep(Duration::from_secs(10));
    proxy.heal();
    let deadline = Instant::now() + Duration::from_secs(90);
    while agent.log().matches("tunnel up").count() < 2 {
        assert!(Instant::now() < deadline, "no reconnect:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // Everything, in pieces: each receive gets what the previous ones did not.
    let mut all = String::new();
    // What each receive got (first and last line), to tell a repeat's source on failure.
    let mut pieces = Vec::new();
    while !all.contains("line 1499\n") {
        assert!(Instant::now() < deadline, "incomplete: {all}");
        let out = run(remote(&home_b, &relay, &alice).args(["receive", &id]));
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        pieces.push(format!(
            "{:?}..{:?}",
            text.lines().next().unwrap_or(""),
            text.lines().last().unwrap_or("")
        ));
        all.push_str(&text);
        std::thread::sleep(Duration::from_millis(300));
    }
    let counted = std::panic::catch_unwind(|| check_counter(&all));
    assert!(
        matches!(counted, Ok(1500)),
        "receives: {pieces:?}\nagent log:\n{}",
        agent.log()
    );
    let out = run(remote(&home_b, &relay, &alice).args(["session", "list"]));
    let row = stdout(&out);
    assert!(row.contains(&id) && row.contains("(online)"), "{row}");
}

#[test]
fn output_persisted_in_the_relay_is_listed_and_received_while_the_agent_is_gone() {
    let relay = Relay::start();
    let agent = agent_on(&relay, "agent1", None);
    let alice = relay.add_user("alice");
    let (home_a, home_b) = (Client::new(), Client::new());
    let id = new_session(&home_a, &relay, &alice, "agent1");
    start_counter(&home_a, &relay, &alice, &id, 100);
    // Give the counter time to finish and the agent time to spill it.
    std::thread::sleep(Duration::from_secs(3));
    // The agent dies without a word: only the relay has the output now.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deadline = Instant::now() + T;
    loop {
        let out = run(remote(&home_b, &relay, &alice).args(["session", "list"]));
        let listing = stdout(&out);
        if listing.contains(&id) && listing.contains("(offline)") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not listed as offline: {listing}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = run(remote(&home_b, &relay, &alice).args(["receive", &id]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(check_counter(&stdout(&out)), 100);
    assert!(stderr(&out).contains("offline"), "{}", stderr(&out));
    // Input needs the agent: refused with the reason.
    let out = run(remote(&home_b, &relay, &alice).args(["exec", &id, "--", "true"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("offline"), "{}", stderr(&out));
}

#[test]
fn bob_cannot_list_receive_or_attach_alices_session() {
    let relay = Relay::start();
    let _agent = agent_on(&relay, "agent1", None);
    let alice = relay.add_user("alice");
    let bob = relay.add_user("bob");
    let client = Client::new();
    let id = new_session(&client, &relay, &alice, "agent1");
    let out = run(remote(&client, &relay, &alice).args(["exec", &id, "--", "echo secret"]));
    assert_eq!(stdout(&out), "secret\n", "{}", stderr(&out));

    let bobs = Client::new();
    let out = run(remote(&bobs, &relay, &bob).args(["session", "list"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains(&id), "{}", stdout(&out));
    for cmd in [["receive", id.as_str()], ["attach", id.as_str()]] {
        let out = run(remote(&bobs, &relay, &bob).args(cmd));
        assert!(!out.status.success(), "{cmd:?}: {}", stdout(&out));
        assert!(!stdout(&out).contains("secret"));
        assert!(
            stderr(&out).contains("no session"),
            "{cmd:?}: {}",
            stderr(&out)
        );
    }
    let out = run(remote(&bobs, &relay, &bob).args(["session", "rm", &id]));
    assert!(!out.status.success());
    // Alice still has it, untouched.
    let out = run(remote(&client, &relay, &alice).args(["session", "list"]));
    assert!(stdout(&out).contains(&id), "{}", stdout(&out));
}

#[test]
fn run_reaches_two_agents_through_the_relay() {
    let relay = Relay::start();
    let _a1 = agent_on(&relay, "agent1", None);
    let _a2 = agent_on(&relay, "agent2", None);
    let alice = relay.add_user("alice");
    let client = Client::new();
    let out = run(remote(&client, &relay, &alice).args([
        "run",
        "relay://agent1,relay://agent2",
        "--",
        "hostname",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let text = stdout(&out);
    for agent in ["agent1", "agent2"] {
        assert!(
            text.contains(&format!("{agent}: {}", host.trim())),
            "{text}"
        );
    }
    // An agent that does not exist is a per-target failure with a reason.
    let out = run(remote(&client, &relay, &alice).args([
        "run",
        "relay://agent1,relay://nosuch",
        "--",
        "true",
    ]));
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("nosuch"), "{}", stderr(&out));
}

/// A frame for a conversation.
fn frame(rid: u64, msg: client_frame::Msg) -> ConverseRequest {
    ConverseRequest {
        msg: Some(converse_request::Msg::Frame(
            ClientFrame {
                request_id: rid,
                msg: Some(msg),
            }
            .encode_to_vec(),
        )),
    }
}

fn target(agent: &str, session: &str) -> ConverseRequest {
    ConverseRequest {
        msg: Some(converse_request::Msg::Target(ConverseTarget {
            agent: agent.into(),
            session_id: session.into(),
        })),
    }
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// The clients attached to session `id`, as the agent counts them.
async fn attached_clients(relay: &Relay, token: &str, id: &str) -> u32 {
    let mut c = RelayClient::new(grpc_channel(relay.addr).await);
    let hello = client_frame::Msg::Hello(remote_proto::frames::hello("probe"));
    let reqs = vec![
        target("agent1", ""),
        frame(1, hello),
        frame(2, client_frame::Msg::List(ListSessions {})),
    ];
    let mut stream = c
        .converse(authed(futures::stream::iter(reqs), token))
        .await
        .unwrap()
        .into_inner();
    while let Some(resp) = stream.message().await.unwrap() {
        if let Some(converse_response::Msg::Frame(f)) = resp.msg {
            let f = ServerFrame::decode(f.as_slice()).unwrap();
            if let Some(server_frame::Msg::Sessions(l)) = f.msg {
                return l
                    .sessions
                    .iter()
                    .find(|s| s.id == id)
                    .map(|s| s.attached_clients)
                    .unwrap_or(0);
            }
        }
    }
    panic!("no session list");
}

#[test]
fn bad_input_is_refused_or_cleaned_up_and_the_relay_keeps_serving() {
    let relay = Relay::start();
    let _agent = agent_on(&relay, "agent1", None);
    let alice = relay.add_user("alice");
    let client = Client::new();
    let id = new_session(&client, &relay, &alice, "agent1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Unauthenticated: no token, a malformed one, a forged one.
        let mut c = RelayClient::new(grpc_channel(relay.addr).await);
        let e = c.list_agents(ListAgentsRequest {}).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("REMOTE_TOKEN"), "{}", e.message());
        for bad in [
            "garbage",
            "ru_AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            let e = c
                .list_agents(authed(ListAgentsRequest {}, bad))
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad}");
        }
        let e = c
            .converse(futures::stream::iter(vec![target("", &id)]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);

        // Oversized: a frame over the session protocol's limit gets an error frame; a
        // message over the relay's gRPC limit fails the call.
        let big = vec![0u8; remote_proto::MAX_FRAME_BYTES + 1];
        let reqs = vec![
            target("", &id),
            ConverseRequest {
                msg: Some(converse_request::Msg::Frame(big)),
            },
        ];
        let mut s = c
            .converse(authed(futures::stream::iter(reqs), &alice))
            .await
            .unwrap()
            .into_inner();
        let mut too_large = false;
        while let Ok(Some(resp)) = s.message().await {
            if let Some(converse_response::Msg::Frame(f)) = resp.msg {
                let f = ServerFrame::decode(f.as_slice()).unwrap();
                if let Some(server_frame::Msg::Error(e)) = f.msg {
                    too_large = e.code == ErrorCode::ErrorFrameTooLarge as i32;
                    break;
                }
            }
        }
        assert!(too_large, "no FRAME_TOO_LARGE error");
        let huge = vec![0u8; 6 << 20];
        let reqs = vec![
            target("", &id),
            ConverseRequest {
                msg: Some(converse_request::Msg::Frame(huge)),
            },
        ];
        let refused = match c
            .converse(authed(futures::stream::iter(reqs), &alice))
            .await
        {
            Err(_) => true,
            Ok(r) => {
                let mut s = r.into_inner();
                loop {
                    match s.message().await {
                        Err(_) => break true,
                        Ok(None) => break false,
                        Ok(Some(_)) => {}
                    }
                }
            }
        };
        assert!(refused, "a 6 MiB message must fail the call");

        // 1,000 conversations attached to the session, then the client vanishes.
        let mut conns = Vec::new();
        let mut streams = Vec::new();
        for _ in 0..5 {
            let ch = grpc_channel(relay.addr).await;
            for _ in 0..200 {
                let mut c = RelayClient::new(ch.clone());
                let hello = client_frame::Msg::Hello(remote_proto::frames::hello("probe"));
                let attach = client_frame::Msg::Attach(Attach {
                    session_id: id.clone(),
                    from_seq: None,
                    follow: true,
                });
                let (tx, rx) = tokio::sync::mpsc::channel::<ConverseRequest>(4);
                tx.send(target("", &id)).await.unwrap();
                tx.send(frame(1, hello)).await.unwrap();
                tx.send(frame(2, attach)).await.unwrap();
                let out = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|m| (m, rx))
                });
                let resp = c.converse(authed(out, &alice)).await.unwrap();
                streams.push((tx, resp.into_inner()));
            }
            conns.push(ch);
        }
        let deadline = Instant::now() + T;
        loop {
            let n = attached_clients(&relay, &alice, &id).await;
            if n >= 1000 {
                break;
            }
            assert!(Instant::now() < deadline, "only {n} of 1000 attached");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(streams);
        drop(conns);
        let deadline = Instant::now() + T;
        loop {
            let n = attached_clients(&relay, &alice, &id).await;
            if n == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{n} abandoned attaches remain");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // Still serving.
    let out = run(remote(&client, &relay, &alice).args(["exec", &id, "--", "echo still here"]));
    assert_eq!(stdout(&out), "still here\n", "{}", stderr(&out));
}
