//! `remote-agent enable --root D` (issue 6): the one-shot host setup writes the config, host
//! key, HTTPS certificate, systemd unit and sshd's `Subsystem remote` line under D; a second
//! run changes nothing and says so; a changed file is kept; the agent starts with what enable
//! wrote and serves enable's host key and certificate.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use remote_tests::*;

const T: Duration = Duration::from_secs(60);

const SSHD_CONFIG: &str = "Include /etc/ssh/sshd_config.d/*.conf\nPort 22\n\
Subsystem sftp /usr/lib/openssh/sftp-server\n\n# backups only\nMatch User backup\n\
\tForceCommand internal-sftp\n";

const SUBSYSTEM: &str =
    "Subsystem remote /usr/bin/remote-agent subsystem --socket /run/remote-agent/agent.sock";

fn enable(root: &Path, extra: &[&str]) -> Output {
    let out = run_with_timeout(
        Command::new(bin("remote-agent"))
            .arg("enable")
            .arg("--root")
            .arg(root)
            .args(extra),
        None,
        T,
    );
    eprintln!(
        "remote-agent enable --root {} {extra:?}: {}\n{}{}",
        root.display(),
        out.status,
        stdout(&out),
        stderr(&out)
    );
    out
}

/// Every file under `root`: contents and mode.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32)> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                dirs.push(path);
            } else {
                let mode = meta.permissions().mode() & 0o7777;
                files.insert(path.clone(), (std::fs::read(&path).unwrap(), mode));
            }
        }
    }
    files
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A root with an sshd_config that has a Match block.
fn root_with_sshd() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let sshd = dir.path().join("etc/ssh/sshd_config");
    std::fs::create_dir_all(sshd.parent().unwrap()).unwrap();
    std::fs::write(&sshd, SSHD_CONFIG).unwrap();
    std::fs::set_permissions(&sshd, std::fs::Permissions::from_mode(0o644)).unwrap();
    dir
}

/// The fingerprint after `marker` in enable's output (`SSH host key SHA256:…`).
fn fingerprint_after(text: &str, marker: &str) -> String {
    let rest = text
        .split(marker)
        .nth(1)
        .unwrap_or_else(|| panic!("no '{marker}' in:\n{text}"));
    rest.split(|c: char| c == ')' || c == ',' || c.is_whitespace())
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn enable_twice_the_second_run_changes_nothing_and_says_so() {
    let dir = root_with_sshd();
    let root = dir.path();
    let config = root.join("etc/remote-agent/agent.toml");
    let state = root.join("var/lib/remote-agent");
    let unit = root.join("etc/systemd/system/remote-agent.service");
    let sshd = root.join("etc/ssh/sshd_config");

    let first = enable(root, &["--sshd-subsystem"]);
    assert!(first.status.success());
    let out = stdout(&first);
    for created in [
        &config,
        &state.join("ssh_host_ed25519_key"),
        &state.join("winrm_cert.pem"),
        &unit,
    ] {
        assert!(
            out.contains(&format!("created {} (", created.display())),
            "{out}"
        );
    }
    assert!(
        out.contains(&format!("added to {} (line ", sshd.display())),
        "{out}"
    );
    assert!(
        out.contains("enable: 5 created, 0 already in place, 0 kept (changed by someone)"),
        "{out}"
    );
    assert!(!out.contains("nothing to do"), "{out}");
    assert!(
        out.contains(
            "next, on the host: systemctl daemon-reload && systemctl enable --now remote-agent"
        ),
        "{out}"
    );

    assert_eq!(mode(&config), 0o600);
    assert_eq!(mode(&state.join("ssh_host_ed25519_key")), 0o600);
    assert_eq!(mode(&state.join("winrm_key.pem")), 0o600);
    assert_eq!(mode(&state.join("winrm_cert.pem")), 0o600);
    assert_eq!(mode(&state) & 0o077, 0, "the state dir is private");
    assert_eq!(mode(&unit), 0o644);
    assert_eq!(mode(&sshd), 0o644, "sshd_config keeps its mode");

    let unit_text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        unit_text.contains(
            "\nExecStart=/usr/bin/remote-agent run --config /etc/remote-agent/agent.toml\n"
        ),
        "{unit_text}"
    );
    assert!(unit_text.contains("\nRestart=on-failure\n"), "{unit_text}");
    let config_text = std::fs::read_to_string(&config).unwrap();
    assert!(
        config_text.contains("[endpoints.default]\ngroups = [\"admins\"]"),
        "{config_text}"
    );
    // sshd_config: one line (and its comment) added before the Match block, nothing else.
    let sshd_text = std::fs::read_to_string(&sshd).unwrap();
    let ours = sshd_text.find(SUBSYSTEM).expect("Subsystem line");
    assert!(
        ours < sshd_text.find("# backups only").unwrap(),
        "{sshd_text}"
    );
    let without: String = sshd_text
        .lines()
        .filter(|l| *l != SUBSYSTEM && !l.starts_with("# Sessions of remote-agent"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        without.replace("\n\n\n", "\n\n"),
        SSHD_CONFIG,
        "{sshd_text}"
    );

    let before = snapshot(root);
    let second = enable(root, &["--sshd-subsystem"]);
    assert!(second.status.success());
    let out = stdout(&second);
    assert_eq!(out.matches("already in place: ").count(), 5, "{out}");
    assert!(
        !out.lines()
            .any(|l| l.starts_with("created ") || l.starts_with("added ")),
        "{out}"
    );
    assert!(
        out.contains("enable: 0 created, 5 already in place, 0 kept (changed by someone)"),
        "{out}"
    );
    assert!(
        out.trim_end()
            .ends_with("nothing to do: this host is already set up"),
        "{out}"
    );
    assert_eq!(
        snapshot(root),
        before,
        "the second run changed, added or removed a file"
    );
}

#[test]
fn a_changed_config_is_kept_and_an_invalid_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    assert!(enable(root, &[]).status.success());
    let config = root.join("etc/remote-agent/agent.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let changed = original.replace("0.0.0.0:2222", "0.0.0.0:2022");
    std::fs::write(&config, &changed).unwrap();

    let out = enable(root, &[]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "kept {}: it differs from what enable would write (it was changed); compare with {}.remote-new",
            config.display(),
            config.display()
        )),
        "{text}"
    );
    assert!(
        text.contains("enable: 0 created, 3 already in place, 1 kept (changed by someone)"),
        "{text}"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), changed);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/remote-agent/agent.toml.remote-new")).unwrap(),
        original
    );

    std::fs::write(&config, "[ssh]\nlisten = 2222\n").unwrap();
    let out = enable(root, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&config.display().to_string()), "{err}");
    assert!(err.contains("enable changed nothing"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "[ssh]\nlisten = 2222\n"
    );
}

/// A `remote-agent run`, stopped on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_agent_starts_with_the_generated_config_and_serves_enables_keys() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = enable(root, &[]);
    assert!(out.status.success());
    let text = stdout(&out);
    let host_key = fingerprint_after(&text, "SSH host key ");
    let certificate = fingerprint_after(&text, "HTTPS certificate ");

    // The generated config listens on 0.0.0.0: loopback only here, on free ports.
    let mut child = Command::new(bin("remote-agent"))
        .arg("run")
        .arg("--config")
        .arg(root.join("etc/remote-agent/agent.toml"))
        .arg("--state-dir")
        .arg(root.join("var/lib/remote-agent"))
        .args(["--ssh", "127.0.0.1:0"])
        .args(["--winrm-http", "off", "--winrm-https", "127.0.0.1:0"])
        .arg("--socket")
        .arg(root.join("run/remote-agent/agent.sock"))
        .env("REMOTE_AGENT_LOG", "info,russh=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start remote-agent");
    let lines = lines_of(child.stderr.take().expect("stderr"));
    let _agent = Running(child);
    let (mut ssh, mut https) = (None, None);
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ssh.is_none() || https.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the agent did not start; log:\n{}", log.join("\n")));
        if line.contains("ssh listening on 127.0.0.1:") {
            ssh = Some(line.clone());
        }
        if line.contains("winrm https listening on 127.0.0.1:") {
            https = Some(line.clone());
        }
        log.push(line);
    }
    let ssh = ssh.unwrap_or_default();
    let https = https.unwrap_or_default();
    assert!(ssh.contains(&format!("(host key {host_key})")), "{ssh}");
    assert!(
        https.contains(&format!("(certificate {certificate})")),
        "{https}"
    );
    assert!(
        !log.iter().any(|l| l.contains("generated")),
        "the agent used enable's key and certificate:\n{}",
        log.join("\n")
    );
}
