//! Subsystem mode, for hosts that keep their own sshd (as PowerShell over SSH does): a
//! private OpenSSH sshd on 127.0.0.1 runs `remote-agent subsystem` for `ssh -s … remote`,
//! which bridges to the running agent's local socket. The sessions live in the agent, so
//! they outlive the SSH connection that created them. Needs root (CI runs as root).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use remote_tests::session_client::{Collected, ProtoClient, session};
use remote_tests::*;
use session::server_frame;

struct Sshd {
    child: Child,
    port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_sshd(agent: &Agent, client_key: &ClientKey) -> Sshd {
    let sshd = require_tool("sshd", "openssh-server");
    let dir = agent.dir.path();
    let host_key = dir.join("sshd_host_key");
    let st = Command::new(require_tool("ssh-keygen", "openssh-client"))
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::copy(&client_key.public, dir.join("authorized_keys")).unwrap();
    let _ = std::fs::create_dir_all("/run/sshd");
    let port = free_port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nLogLevel ERROR\n\
             Subsystem remote {agent} subsystem --socket {sock}\n",
            hk = host_key.display(),
            d = dir.display(),
            agent = bin("remote-agent").display(),
            sock = agent.socket.display(),
        ),
    )
    .unwrap();
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .spawn()
        .expect("start sshd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "sshd did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Sshd { child, port }
}

fn via_sshd(sshd: &Sshd, key: &ClientKey) -> ProtoClient {
    let mut cmd = Command::new(require_tool("ssh", "openssh-client"));
    cmd.args(ssh_options(sshd.port))
        .args(["-o", "BatchMode=yes", "-i"])
        .arg(&key.private)
        .args(["-s", "root@127.0.0.1", "remote"]);
    ProtoClient::over(cmd)
}

#[test]
fn sessions_opened_through_sshd_outlive_the_ssh_connection() {
    if !is_root() {
        eprintln!(
            "sessions_opened_through_sshd_outlive_the_ssh_connection: NOT RUN — needs root (CI runs as root)"
        );
        return;
    }
    let agent = Agent::start();
    let key = agent.key("root_key");
    let sshd = start_sshd(&agent, &key);

    let mut first = via_sshd(&sshd, &key);
    let s = first.open_commands();
    assert_eq!(
        s.owner, "root",
        "the OS user sshd authenticated owns the session"
    );
    assert_eq!(
        first.exec(&s.id, "cd /tmp; echo $(id -un)").stdout,
        b"root\n"
    );
    first.start(&s.id, "sleep 1; echo produced-while-away");
    first.close(); // the SSH connection that created the session is gone

    std::thread::sleep(Duration::from_secs(2));
    let mut second = via_sshd(&sshd, &key);
    let listed = second.list();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, s.id);
    assert!(matches!(
        second.attach(&s.id, false).msg,
        Some(server_frame::Msg::Attached(_))
    ));
    let mut got = Collected::default();
    loop {
        match second.recv(Duration::from_secs(20)).msg {
            Some(server_frame::Msg::Record(r)) => {
                got.add(&r);
                second.ack(r.seq);
            }
            Some(server_frame::Msg::Done(_)) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        String::from_utf8_lossy(&got.stdout).contains("produced-while-away"),
        "{:?}",
        String::from_utf8_lossy(&got.stdout)
    );
    // State carried over from the first connection.
    assert_eq!(second.exec(&s.id, "pwd").stdout, b"/tmp\n");
}

#[test]
fn remote_client_through_sshd_disconnects_and_reattaches() {
    if !is_root() {
        eprintln!(
            "remote_client_through_sshd_disconnects_and_reattaches: NOT RUN — needs root (CI runs as root)"
        );
        return;
    }
    let agent = Agent::start();
    let key = agent.key("root_key");
    let sshd = start_sshd(&agent, &key);
    let target = format!("ssh://root@127.0.0.1:{}", sshd.port);
    let client = Client::new();
    let remote = |args: &[&str]| {
        let mut cmd = client.remote();
        cmd.arg("--identity").arg(&key.private).args(args);
        run_with_timeout(&mut cmd, None, Duration::from_secs(60))
    };
    let out = remote(&["session", "new", &target]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    let out = remote(&["exec", &id, "--", "cd /tmp; echo started"]);
    assert_eq!(stdout(&out), "started\n", "{}", stderr(&out));
    let out = remote(&["exec", "--detach", &id, "--", "sleep 1; echo while-away"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Every SSH connection above is gone; the session is not.
    std::thread::sleep(Duration::from_millis(1500));
    let other = Client::new();
    let mut cmd = other.remote();
    cmd.arg("--identity")
        .arg(&key.private)
        .args(["receive", &format!("{target}/{id}")]);
    let out = run_with_timeout(&mut cmd, None, Duration::from_secs(60));
    assert_eq!(stdout(&out), "while-away\n", "{}", stderr(&out));
    let out = remote(&["exec", &id, "--", "pwd"]);
    assert_eq!(stdout(&out), "/tmp\n");
}

#[test]
fn agent_without_ssh_listener_serves_the_subsystem_socket() {
    // Hosts that keep their own sshd may turn the agent's SSH listener off.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut agent = Command::new(bin("remote-agent"))
        .args(["run", "--ssh", "off", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no local socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let bridge = || {
        let mut cmd = Command::new(bin("remote-agent"));
        cmd.arg("subsystem").arg("--socket").arg(&socket);
        ProtoClient::over(cmd)
    };
    let mut first = bridge();
    let s = first.open_commands();
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    assert_eq!(s.owner, me, "the socket's peer credentials name the owner");
    assert_eq!(first.exec(&s.id, "echo via-socket").stdout, b"via-socket\n");
    first.close();
    let mut second = bridge();
    assert_eq!(second.list().len(), 1);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert_eq!(agent.wait().unwrap().code(), Some(0));
    assert!(!socket.exists(), "the socket file is removed on shutdown");
}

#[test]
fn subsystem_without_a_running_agent_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_with_timeout(
        Command::new(bin("remote-agent"))
            .arg("subsystem")
            .arg("--socket")
            .arg(dir.path().join("nobody-here.sock")),
        None,
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("no remote-agent is running"), "{err}");
    assert!(err.contains("remote-agent run"), "{err}");
}
