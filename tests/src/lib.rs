//! Test harness for end-to-end tests: finds the built binaries, starts a private agent on
//! 127.0.0.1 with its own state directory, creates accounts and client keys, and builds
//! OpenSSH command lines against it. Everything started here is stopped on drop.

pub mod relay;
pub mod session_client;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Path of a workspace binary built next to this test executable (target/debug/NAME).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/test-hash -> target/debug
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` first (./tests/run does)",
        path.display()
    );
    path
}

/// Find a program on PATH, or fail the test with what to install.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    for dir in ["/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed: apt-get install {package} (./tests/run and .ci/run do this)");
}

/// The Python interpreter of the tests' own environment (pinned paramiko etc.).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("REMOTE_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let target = exe.ancestors().nth(3).expect("target dir");
    let p = target.join("test-venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: create it with ./tests/run (python3 -m venv + pinned requirements from tests/interop/requirements.txt)",
        p.display()
    );
    p
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A client key pair made with ssh-keygen.
pub struct ClientKey {
    pub private: PathBuf,
    pub public: PathBuf,
}

impl ClientKey {
    pub fn generate(dir: &Path, name: &str) -> ClientKey {
        let private = dir.join(name);
        let status = Command::new(require_tool("ssh-keygen", "openssh-client"))
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&private)
            .status()
            .expect("ssh-keygen");
        assert!(status.success());
        ClientKey {
            public: private.with_extension("pub"),
            private,
        }
    }
}

/// Options for a test agent.
#[derive(Clone)]
pub struct AgentOptions {
    /// Extra TOML appended to the config file (e.g. `[ssh]` limits).
    pub config: String,
    /// Admit every account on the `default` endpoint (`[endpoints.default] users = ["*"]`),
    /// unless `config` defines `[endpoints.default]` itself. The built-in `default` admits
    /// admins only; tests of anything else use ordinary accounts, and tests of endpoints
    /// turn this off to meet the built-in one.
    pub open_default_endpoint: bool,
}

/// WinRM listeners for a test agent (`Agent::start_winrm`). Without them every test agent
/// runs with `--winrm-http off --winrm-https off`.
#[derive(Clone, Default)]
pub struct WinrmOptions {
    /// Pass `--allow-unencrypted` (Basic and plaintext SOAP over plain HTTP).
    pub allow_unencrypted: bool,
    /// Start the plain-HTTP listener (127.0.0.1:0).
    pub http: bool,
    /// Start the HTTPS listener (127.0.0.1:0).
    pub https: bool,
    /// More arguments for `remote-agent run`.
    pub extra_args: Vec<String>,
}

impl WinrmOptions {
    /// Both listeners on 127.0.0.1 (ephemeral ports), encryption required on HTTP.
    pub fn both() -> WinrmOptions {
        WinrmOptions {
            http: true,
            https: true,
            ..Default::default()
        }
    }
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            config: "[ssh]\n".into(),
            open_default_endpoint: true,
        }
    }
}

/// A running `remote-agent run` on 127.0.0.1 with a private state dir.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub state_dir: PathBuf,
    /// The agent's local socket (subsystem mode).
    pub socket: PathBuf,
    pub addr: SocketAddr,
    /// The WinRM plain-HTTP listener, when started (`Agent::start_winrm`).
    pub winrm_http: Option<SocketAddr>,
    /// The WinRM HTTPS listener, when started.
    pub winrm_https: Option<SocketAddr>,
    /// The HTTPS certificate's fingerprint as logged (`SHA256:...`).
    pub winrm_fingerprint: Option<String>,
    child: Option<Child>,
    log: mpsc::Receiver<String>,
    log_lines: Vec<String>,
}

impl Agent {
    pub fn start() -> Agent {
        Agent::start_with(AgentOptions::default())
    }

    pub fn start_with(opts: AgentOptions) -> Agent {
        Agent::start_inner(opts, None)
    }

    /// An agent with WinRM listeners on 127.0.0.1 (see `WinrmOptions`); their addresses are
    /// in `winrm_http` / `winrm_https`.
    pub fn start_winrm(opts: AgentOptions, winrm: WinrmOptions) -> Agent {
        Agent::start_inner(opts, Some(winrm))
    }

    fn start_inner(opts: AgentOptions, winrm: Option<WinrmOptions>) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("remote-test-")
            .tempdir()
            .expect("tempdir");
        // Readable by run_as users (their home is elsewhere, but keys and files live here).
        let _ = std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        );
        let state_dir = dir.path().join("state");
        let config = dir.path().join("agent.toml");
        let socket = dir.path().join("agent.sock");
        let mut text = opts.config.clone();
        if opts.open_default_endpoint && !text.contains("[endpoints.default]") {
            text.push_str("\n[endpoints.default]\nusers = [\"*\"]\n");
        }
        std::fs::write(&config, text).expect("write config");
        let mut child = Command::new(bin("remote-agent"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--ssh", "127.0.0.1:0"])
            .arg("--socket")
            .arg(&socket)
            .args(winrm_args(winrm.as_ref()))
            .env("REMOTE_AGENT_LOG", "info,russh=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start remote-agent");
        let stderr = child.stderr.take().expect("stderr");
        let rx = lines_of(stderr);
        let mut log_lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let want_http = winrm.as_ref().is_some_and(|w| w.http);
        let want_https = winrm.as_ref().is_some_and(|w| w.https);
        let mut addr = None;
        let mut winrm_http = None;
        let mut winrm_https = None;
        let mut winrm_fingerprint = None;
        while addr.is_none()
            || (want_http && winrm_http.is_none())
            || (want_https && winrm_https.is_none())
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = listener_addr(&line, "ssh listening on ") {
                        addr = Some(a);
                    }
                    if let Some(a) = listener_addr(&line, "winrm http listening on ") {
                        winrm_http = Some(a);
                    }
                    if let Some(a) = listener_addr(&line, "winrm https listening on ") {
                        winrm_https = Some(a);
                        winrm_fingerprint = line
                            .split("(certificate ")
                            .nth(1)
                            .map(|rest| rest.trim_end().trim_end_matches(')').to_string());
                    }
                    log_lines.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "agent did not report its listeners (ssh {addr:?}, winrm http {winrm_http:?}, \
                         winrm https {winrm_https:?}); log:\n{}",
                        log_lines.join("\n")
                    );
                }
            }
        }
        let addr = addr.expect("ssh listener");
        Agent {
            dir,
            state_dir,
            socket,
            addr,
            winrm_http,
            winrm_https,
            winrm_fingerprint,
            child: Some(child),
            log: rx,
            log_lines,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Everything the agent logged so far.
    pub fn log(&mut self) -> String {
        while let Ok(line) = self.log.try_recv() {
            self.log_lines.push(line);
        }
        self.log_lines.join("\n")
    }

    /// Wait until the log contains `needle`.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `remote-agent user ARGS... --state-dir DIR`, with `stdin` fed; panics on failure.
    pub fn user(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(bin("remote-agent"));
        cmd.arg("user")
            .args(args)
            .arg("--state-dir")
            .arg(&self.state_dir);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("remote-agent user");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write");
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "remote-agent user {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Add an account with a password and/or a key.
    pub fn add_user(&self, name: &str, password: Option<&str>, key: Option<&ClientKey>) {
        let mut args = vec!["add", name];
        let key_path;
        if let Some(k) = key {
            key_path = k.public.to_string_lossy().into_owned();
            args.extend(["--authorized-key", &key_path]);
        }
        match password {
            Some(pw) => {
                args.push("--password-stdin");
                self.user(&args, Some(&format!("{pw}\n")));
            }
            None => {
                self.user(&args, None);
            }
        }
    }

    /// A new client key in this agent's temp dir.
    pub fn key(&self, name: &str) -> ClientKey {
        ClientKey::generate(self.dir.path(), name)
    }

    /// `ssh` with options that make it deterministic against this agent, authenticating
    /// with `key`. Append the remote command with `.arg(..)`.
    pub fn ssh(&self, user: &str, key: &ClientKey) -> Command {
        self.ssh_on(user, key, None)
    }

    /// The same on `endpoint` (`-o SetEnv=REMOTE_ENDPOINT=…`; none: the default).
    pub fn ssh_on(&self, user: &str, key: &ClientKey, endpoint: Option<&str>) -> Command {
        let mut cmd = Command::new(require_tool("ssh", "openssh-client"));
        cmd.args(ssh_options(self.port()))
            .arg("-o")
            .arg("BatchMode=yes")
            .arg("-i")
            .arg(&key.private);
        if let Some(e) = endpoint {
            cmd.arg("-o").arg(format!("SetEnv=REMOTE_ENDPOINT={e}"));
        }
        cmd.arg(format!("{user}@127.0.0.1"));
        cmd
    }

    /// `ssh` authenticating with a password (through SSH_ASKPASS, no terminal needed).
    pub fn ssh_password(&self, user: &str, password: &str) -> Command {
        let askpass = self.dir.path().join(format!("askpass-{}", rand_suffix()));
        std::fs::write(
            &askpass,
            format!(
                "#!/bin/sh\nprintf '%s\\n' '{}'\n",
                password.replace('\'', "'\\''")
            ),
        )
        .expect("askpass");
        std::fs::set_permissions(
            &askpass,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        let mut cmd = Command::new(require_tool("ssh", "openssh-client"));
        cmd.args(ssh_options(self.port()))
            .args([
                "-o",
                "PreferredAuthentications=password",
                "-o",
                "PubkeyAuthentication=no",
            ])
            .args(["-o", "NumberOfPasswordPrompts=1"])
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(Stdio::null())
            .arg(format!("{user}@127.0.0.1"));
        cmd
    }

    /// Stop the agent with SIGTERM and return its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `remote-agent run` arguments for the WinRM listeners: off unless asked for.
fn winrm_args(winrm: Option<&WinrmOptions>) -> Vec<String> {
    let Some(w) = winrm else {
        return ["--winrm-http", "off", "--winrm-https", "off"]
            .map(String::from)
            .to_vec();
    };
    let listen = |on: bool| if on { "127.0.0.1:0" } else { "off" }.to_string();
    let mut args = vec![
        "--winrm-http".to_string(),
        listen(w.http),
        "--winrm-https".to_string(),
        listen(w.https),
    ];
    if w.allow_unencrypted {
        args.push("--allow-unencrypted".into());
    }
    args.extend(w.extra_args.iter().cloned());
    args
}

/// The address after `marker` in an agent log line (`... ssh listening on 127.0.0.1:PORT`).
fn listener_addr(line: &str, marker: &str) -> Option<SocketAddr> {
    line.split(marker)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse::<SocketAddr>().ok())
}

/// Client options shared by ssh, sftp and scp: no user config, no known_hosts, no agent.
pub fn ssh_options(port: u16) -> Vec<String> {
    [
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "IdentityAgent=none",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ConnectTimeout=10",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["-p".to_string(), port.to_string()])
    .collect()
}

/// The same options for `sftp` and `scp`, which spell the port option `-P`.
pub fn sftp_options(port: u16) -> Vec<String> {
    ssh_options(port)
        .into_iter()
        .map(|o| if o == "-p" { "-P".to_string() } else { o })
        .collect()
}

fn rand_suffix() -> String {
    use rand::RngExt;
    format!("{:016x}", rand::rng().random::<u64>())
}

/// Run a command with a timeout; returns its output (stdout, stderr collected).
pub fn run_with_timeout(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(data) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let pid = child.id();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if done_rx.recv_timeout(timeout).is_err() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    });
    let out = child.wait_with_output().expect("wait");
    let _ = done_tx.send(());
    out
}

/// The lines a child process writes to `pipe`, as they come, read by a thread of their own.
pub fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// stdout of an Output as a string.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A file of `size` pseudo-random bytes (fast, deterministic from `seed`).
pub fn random_file(path: &Path, size: usize, seed: u64) {
    let mut state = seed | 1;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut written = 0;
    let mut buf = vec![0u8; 1 << 16];
    while written < size {
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        let n = buf.len().min(size - written);
        f.write_all(&buf[..n]).expect("write");
        written += n;
    }
    f.flush().expect("flush");
}

/// Whether two files have identical contents.
pub fn same_contents(a: &Path, b: &Path) -> bool {
    let (Ok(x), Ok(y)) = (std::fs::read(a), std::fs::read(b)) else {
        return false;
    };
    x == y
}

/// A client machine for tests: its own HOME and XDG_CONFIG_HOME (so its own known_hosts
/// and session record), no ssh-agent, no password in the environment.
pub struct Client {
    pub home: tempfile::TempDir,
}

impl Client {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Client {
        Client {
            home: tempfile::Builder::new()
                .prefix("remote-client-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn config_home(&self) -> PathBuf {
        self.home.path().join("config")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.config_home().join("remote/known_hosts")
    }

    /// Write this machine's `trusted_hosts` (Basic over http://, and first contact with an
    /// unverifiable TLS certificate, go only to the hosts it lists).
    pub fn trust_hosts(&self, hosts: &str) {
        let dir = self.config_home().join("remote");
        std::fs::create_dir_all(&dir).expect("config dir");
        std::fs::write(dir.join("trusted_hosts"), format!("{hosts}\n")).expect("trusted_hosts");
    }

    /// `remote --batch` in this environment; add arguments with `.args(..)`.
    pub fn remote(&self) -> Command {
        let mut cmd = Command::new(bin("remote"));
        self.env(&mut cmd);
        cmd.arg("--batch");
        cmd
    }

    pub fn env(&self, cmd: &mut Command) {
        cmd.env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.config_home())
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("REMOTE_PASSWORD")
            .env_remove("REMOTE_LOG")
            .env_remove("REMOTE_RELAY")
            .env_remove("REMOTE_TOKEN");
    }

    /// `remote --batch --identity KEY run TARGETS [EXTRA...] -- COMMAND...`, run to the end.
    pub fn run(
        &self,
        key: &ClientKey,
        targets: &str,
        extra: &[&str],
        command: &[&str],
        stdin: Option<&[u8]>,
    ) -> Output {
        let mut cmd = self.remote();
        cmd.arg("--identity")
            .arg(&key.private)
            .arg("run")
            .arg(targets)
            .args(extra)
            .arg("--")
            .args(command);
        run_with_timeout(&mut cmd, stdin, Duration::from_secs(60))
    }
}

/// The output side of a terminal a test drives (pty_process): wait for text to appear.
pub struct Screen {
    reader: pty_process::OwnedReadPty,
    /// What arrived and was not matched yet.
    pub seen: String,
}

impl Screen {
    pub fn new(reader: pty_process::OwnedReadPty) -> Screen {
        Screen {
            reader,
            seen: String::new(),
        }
    }

    /// Wait until `needle` appears, then forget everything up to it, so the next
    /// expectation needs new output.
    pub async fn expect(&mut self, needle: &str, timeout: Duration) {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while !self.seen.contains(needle) {
            match tokio::time::timeout_at(deadline, self.reader.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Ok(_) => panic!(
                    "terminal closed while waiting for {needle:?}; screen:\n{}",
                    self.seen
                ),
                Err(_) => panic!("timed out waiting for {needle:?}; screen:\n{}", self.seen),
            }
        }
        let at = self.seen.find(needle).unwrap_or(0) + needle.len();
        self.seen.drain(..at);
    }
}

/// WinRM interop helpers: the Python driver (tests/interop/winrm_client.py, pywinrm and
/// pypsrp from the tests' venv) and the JSON it speaks.
pub mod winrm {
    use super::*;
    pub use serde_json::{Value, json};

    /// tests/interop/winrm_client.py
    pub fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/winrm_client.py")
    }

    /// Run `ops` (JSON objects, each with an `op`) through the driver; one result per op.
    /// Panics with the driver's stderr when it fails as a program.
    pub fn py(ops: &[Value]) -> Vec<Value> {
        let input = serde_json::to_vec(ops).expect("json");
        let out = run_with_timeout(
            Command::new(python())
                .arg(script())
                .env("PYTHONUNBUFFERED", "1"),
            Some(&input),
            Duration::from_secs(180),
        );
        assert!(
            out.status.success(),
            "winrm_client.py failed ({}): {}\nstdout: {}",
            out.status,
            stderr(&out),
            stdout(&out)
        );
        let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "winrm_client.py printed no JSON array ({e}): {}\n{}",
                stdout(&out),
                stderr(&out)
            )
        });
        assert_eq!(results.len(), ops.len(), "one result per op: {results:?}");
        results
    }

    /// One op.
    pub fn py1(op: Value) -> Value {
        py(&[op]).remove(0)
    }

    /// `base` (an object) with the fields of `extra` added or replaced.
    pub fn with(base: &Value, extra: Value) -> Value {
        let mut v = base.clone();
        if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
            m.extend(e);
        }
        v
    }

    pub fn http_url(agent: &Agent) -> String {
        format!(
            "http://{}/wsman",
            agent.winrm_http.expect("winrm http listener")
        )
    }

    pub fn https_url(agent: &Agent) -> String {
        format!(
            "https://{}/wsman",
            agent.winrm_https.expect("winrm https listener")
        )
    }

    /// pywinrm connection parameters.
    pub fn pywinrm(url: &str, transport: &str, user: &str, password: &str) -> Value {
        json!({"endpoint": url, "transport": transport, "user": user, "password": password})
    }

    /// The result of an op that must have succeeded.
    #[track_caller]
    pub fn ok(r: &Value) -> &Value {
        assert!(
            r.get("error").is_none(),
            "{} failed: {r:#}",
            r["label"].as_str().or(r["op"].as_str()).unwrap_or("op")
        );
        r
    }

    /// A result's `error.type`, if the op failed.
    pub fn error_type(r: &Value) -> Option<&str> {
        r["error"]["type"].as_str()
    }

    /// The WS-Man fault code pywinrm reported for a failed op.
    pub fn fault_code(r: &Value) -> Option<u64> {
        r["error"]["wsman_fault_code"].as_u64()
    }
}
