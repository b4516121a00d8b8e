//! `remote-agent enable`: one-shot host setup, the analog of PowerShell's Enable-PSRemoting.
//!
//! This module owns what a host needs before the agent can run as a service: the config file
//! (listeners, the local socket, the `default` endpoint), the SSH host key, the WinRM HTTPS
//! certificate, the systemd unit and, when asked (`--sshd-subsystem`), the `Subsystem remote`
//! line of an existing sshd_config. It is idempotent and safe to re-run: each file is compared
//! with what enable would write; a missing one is created, an identical one is reported as
//! already in place, and a changed one is kept, with enable's version written beside it as
//! `FILE.remote-new` (`--force` replaces it after saving it as `FILE.bak`). The host key and
//! the certificate are made by [`crate::hostkey`] and [`crate::winrm::tls`] and never
//! regenerated; sshd_config only ever gains one line. `--root DIR` writes under DIR instead
//! of `/`, for packages and tests.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::{ConfigError, FileConfig, Overrides};
use crate::hostkey::{self, HostKeyError};
use crate::paths;
use crate::winrm::tls::{self, TlsError};

/// Where enable puts things on the host (under `--root` when given).
pub const CONFIG_FILE: &str = "/etc/remote-agent/agent.toml";
pub const STATE_DIR: &str = "/var/lib/remote-agent";
pub const SOCKET: &str = "/run/remote-agent/agent.sock";
pub const UNIT_FILE: &str = "/etc/systemd/system/remote-agent.service";
pub const SSHD_CONFIG: &str = "/etc/ssh/sshd_config";
/// The binary the unit and sshd run when `--root` is given without `--binary` (where a
/// package installs it).
pub const PACKAGED_BINARY: &str = "/usr/bin/remote-agent";
/// Suffix of enable's proposed version of a file someone changed.
pub const NEW_SUFFIX: &str = ".remote-new";

/// The config file enable writes. Only defaults and explicit listeners: `FileConfig::parse`
/// and `resolve` accept it (tested below).
pub const CONFIG_TEXT: &str = r#"# remote-agent configuration, written by `remote-agent enable`.
# Edit it freely: enable never overwrites a changed file (it writes its own version beside it
# as agent.toml.remote-new). A running agent applies changes to [endpoints.*] by itself, to new
# sessions and connections; other changes need a restart: systemctl restart remote-agent
# Every setting and its default is described in the README ("Running the agent").

# Host key, HTTPS certificate, accounts (`remote-agent user add`) and sessions live here.
state_dir = "/var/lib/remote-agent"
# name = "web1"                  # the agent's name (default: the host name)

# The agent's own SSH server; sshd keeps port 22. "off" leaves SSH to sshd (subsystem mode).
[ssh]
listen = "0.0.0.0:2222"

# WinRM (pywinrm, pypsrp, Ansible, `remote run winrm://...`) over HTTP and HTTPS, "off" to
# disable one. Basic authentication over plain HTTP is refused unless allow_unencrypted = true.
[winrm]
http_listen = "0.0.0.0:5985"
https_listen = "0.0.0.0:5986"
# HTTPS uses the certificate enable generated in state_dir (winrm_cert.pem, winrm_key.pem);
# to use your own, set both:
# cert_file = "/etc/remote-agent/winrm.pem"
# key_file = "/etc/remote-agent/winrm.key"

# Persistent sessions (defaults shown): output kept per session, idle timeout, what happens
# when the journal is full ("block", "drop", or "spill" to a relay).
[sessions]
# journal_mb = 64
# idle_timeout_secs = 7200
# buffering = "block"

# The local socket `remote-agent subsystem` connects to (sshd's `Subsystem remote` line).
[local]
socket = "/run/remote-agent/agent.sock"

# Dial out to a relay; the first start also needs --join-token.
[relay]
# url = "relay.example:7443"

# Endpoints (session configurations): who may connect and what they may run. `default` is
# used when a client names none; it admits admins only (accounts added with --admin), as
# PowerShell's default admits only Administrators. Add more with
# `remote-agent endpoint add NAME users=... commands=...`.
[endpoints.default]
groups = ["admins"]
"#;

#[derive(Debug, thiserror::Error)]
pub enum EnableError {
    #[error(
        "remote-agent enable writes to /etc and /var/lib: run it as root (sudo remote-agent enable), or give --root DIR to write under DIR instead"
    )]
    NotRoot,
    #[error(
        "--binary {0}: give the absolute path of remote-agent on this host, without spaces, quotes or characters special to a shell or systemd (% $ ; & | * ?), e.g. {PACKAGED_BINARY}"
    )]
    Binary(PathBuf),
    #[error("--binary {0}: no such file on this host: give the path remote-agent is installed at")]
    BinaryMissing(PathBuf),
    #[error("cannot find the path of this remote-agent binary ({0}): give it with --binary PATH")]
    CurrentExe(std::io::Error),
    #[error("--start runs systemctl on this host; it cannot be combined with --root")]
    StartWithRoot,
    #[error("cannot read {path}: {error}. Check its permissions (run as root?)")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "cannot write {path}: {error}. Check that its directory is writable (run as root, or pick another --root)"
    )]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{}\nenable changed nothing: fix the file (the agent would not start with it either), or run `remote-agent enable --force` to replace it with the default (the old file is saved as .bak)",
        .0.to_string().trim_end()
    )]
    InvalidConfig(ConfigError),
    #[error(transparent)]
    HostKey(#[from] HostKeyError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "`{command}` failed: {message}. Run it by hand to see why (journalctl -u remote-agent)"
    )]
    Systemctl { command: String, message: String },
    #[error("cannot print the report: {0}")]
    Output(std::io::Error),
}

/// `remote-agent enable` flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EnableArgs {
    /// Write under DIR instead of / (for packages and tests): DIR/etc/remote-agent/agent.toml,
    /// DIR/var/lib/remote-agent, DIR/etc/systemd/system/remote-agent.service. No systemctl.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Path of remote-agent on the host, for the systemd unit and sshd's Subsystem line
    /// (default: this binary; /usr/bin/remote-agent with --root).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Also add `Subsystem remote BINARY subsystem --socket …` to /etc/ssh/sshd_config, when it
    /// exists and defines no `remote` subsystem yet.
    #[arg(long)]
    pub sshd_subsystem: bool,
    /// Replace config and unit files that differ from enable's version, after saving each as
    /// FILE.bak. The host key, the certificate and sshd_config are never replaced.
    #[arg(long)]
    pub force: bool,
    /// Do not generate the host key and HTTPS certificate (for packages: each host then
    /// generates its own on the agent's first start).
    #[arg(long)]
    pub no_keys: bool,
    /// Then run `systemctl daemon-reload` and `systemctl enable --now remote-agent`.
    #[arg(long, conflicts_with = "root")]
    pub start: bool,
}

/// What one run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Files (or the sshd_config line) written now.
    pub created: usize,
    /// Already as enable would make them.
    pub in_place: usize,
    /// Different from enable's version and left as they are.
    pub kept: usize,
    /// Different and replaced (`--force`), the old one saved as `.bak`.
    pub replaced: usize,
}

impl Summary {
    /// The closing lines: the counts, and whether there was anything to do.
    pub fn lines(&self) -> Vec<String> {
        let mut first = format!(
            "enable: {} created, {} already in place, {} kept (changed by someone)",
            self.created, self.in_place, self.kept
        );
        if self.replaced > 0 {
            first.push_str(&format!(
                ", {} replaced (old copies saved as .bak)",
                self.replaced
            ));
        }
        let mut lines = vec![first];
        if self.created == 0 && self.replaced == 0 {
            lines.push("nothing to do: this host is already set up".into());
        }
        lines
    }
}

/// `remote-agent enable`: set up the host, printing each step on stdout.
pub fn run(args: &EnableArgs) -> Result<Summary, EnableError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let summary = enable(args, &mut out)?;
    if args.start {
        for argv in [
            &["daemon-reload"][..],
            &["enable", "--now", "remote-agent"][..],
        ] {
            systemctl(argv)?;
        }
        writeln!(out, "started: systemctl enable --now remote-agent")
            .map_err(EnableError::Output)?;
    }
    Ok(summary)
}

fn systemctl(argv: &[&str]) -> Result<(), EnableError> {
    let command = format!("systemctl {}", argv.join(" "));
    let output = std::process::Command::new("systemctl")
        .args(argv)
        .output()
        .map_err(|e| EnableError::Systemctl {
            command: command.clone(),
            message: e.to_string(),
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(EnableError::Systemctl {
        message: format!(
            "{} ({})",
            String::from_utf8_lossy(&output.stderr).trim(),
            output.status
        ),
        command,
    })
}

/// Set up the host as `args` say, writing one line per step to `out`.
pub fn enable(args: &EnableArgs, out: &mut dyn Write) -> Result<Summary, EnableError> {
    if args.start && args.root.is_some() {
        return Err(EnableError::StartWithRoot);
    }
    let root = match &args.root {
        Some(dir) => Some(std::path::absolute(dir).map_err(|error| EnableError::Read {
            path: dir.clone(),
            error,
        })?),
        None if !nix::unistd::geteuid().is_root() => return Err(EnableError::NotRoot),
        None => None,
    };
    let binary = binary_path(args)?;
    let mut run = Run {
        root,
        force: args.force,
        out,
        summary: Summary::default(),
    };
    let effective = run.config()?;
    if args.no_keys {
        run.say("skipped the host key and HTTPS certificate (--no-keys): the agent generates them on its first start")?;
    } else {
        run.host_key_and_certificate(&effective)?;
    }
    let unit = unit_text(&binary);
    run.file(
        UNIT_FILE,
        &unit,
        0o644,
        &format!("systemd unit, ExecStart={} run", binary.display()),
    )?;
    if args.sshd_subsystem {
        let socket = match effective.local.socket.as_deref() {
            None => Some(SOCKET.to_string()),
            Some(s) if s.is_empty() || s.eq_ignore_ascii_case("off") => None,
            Some(s) => Some(s.to_string()),
        };
        let socket = socket.filter(|s| !s.contains(unsafe_char));
        match socket {
            Some(socket) => {
                let command = format!("{} subsystem --socket {socket}", binary.display());
                run.sshd_subsystem(&command)?;
            }
            None => run.say(&format!(
                "skipped sshd's Subsystem line: [local] socket in {} is off (or has spaces or shell characters), and `remote-agent subsystem` needs it",
                run.host(CONFIG_FILE).display()
            ))?,
        }
    }
    let summary = run.summary;
    for line in summary.lines() {
        run.say(&line)?;
    }
    if summary.created + summary.replaced > 0 {
        run.next_steps(args, &effective)?;
    }
    Ok(summary)
}

/// Characters that would change the meaning of a path in a unit's ExecStart or in the
/// command line sshd hands to the user's shell.
fn unsafe_char(c: char) -> bool {
    c.is_whitespace() || "\"'\\%$;&|<>`*?".contains(c)
}

/// The agent's path on the host: `--binary`, else this executable (else, under `--root`,
/// where packages install it).
fn binary_path(args: &EnableArgs) -> Result<PathBuf, EnableError> {
    let binary = match (&args.binary, &args.root) {
        (Some(b), _) => b.clone(),
        (None, Some(_)) => PathBuf::from(PACKAGED_BINARY),
        (None, None) => std::env::current_exe().map_err(EnableError::CurrentExe)?,
    };
    if !binary.is_absolute() || binary.to_string_lossy().contains(unsafe_char) {
        return Err(EnableError::Binary(binary));
    }
    if args.root.is_none() && !binary.is_file() {
        return Err(EnableError::BinaryMissing(binary));
    }
    Ok(binary)
}

/// The systemd unit running the agent from `binary`.
pub fn unit_text(binary: &Path) -> String {
    format!(
        r#"# remote-agent: SSH and WinRM server for running commands on this host.
# Written by `remote-agent enable`, which never overwrites a changed copy of this file.
[Unit]
Description=remote-agent (SSH and WinRM remoting server)
After=network.target

[Service]
Type=exec
ExecStart={binary} run --config {CONFIG_FILE}
Restart=on-failure
RestartSec=2s
# /run/remote-agent holds the local socket that `remote-agent subsystem` (run by sshd as
# the logged-in user) connects to: users must be able to reach it.
RuntimeDirectory=remote-agent
RuntimeDirectoryMode=0755
# Host key, certificate, accounts and sessions. 0711: session users may reach their own
# session directories, nobody but root may list it (the agent sets the same mode).
StateDirectory=remote-agent
StateDirectoryMode=0711
# No sandboxing on purpose (no NoNewPrivileges, ProtectHome, ProtectSystem, PrivateTmp,
# PrivateDevices or capability limits): the agent runs as root and starts each account's
# commands as that account's user, like sshd, and every restriction set here would also
# apply to those commands (sudo, writing to homes, /etc, /tmp shared with the host).
# Users' processes stay in this service's cgroup: no task limit, and room for many
# connections and files.
TasksMax=infinity
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"#,
        binary = binary.display()
    )
}

/// One run of enable: where it writes, what it printed, what it counted.
struct Run<'a> {
    root: Option<PathBuf>,
    force: bool,
    out: &'a mut dyn Write,
    summary: Summary,
}

/// A file enable is about to write: absent, or there with these bytes.
enum Existing {
    Absent,
    Bytes(Vec<u8>),
}

impl Run<'_> {
    fn say(&mut self, line: &str) -> Result<(), EnableError> {
        writeln!(self.out, "{line}").map_err(EnableError::Output)
    }

    /// `path` (absolute, as on the host) under the root.
    fn host(&self, path: impl AsRef<Path>) -> PathBuf {
        rooted(self.root.as_deref(), path.as_ref())
    }

    fn read(&self, path: &Path) -> Result<Existing, EnableError> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Existing::Bytes(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Existing::Absent),
            Err(error) => Err(EnableError::Read {
                path: path.to_path_buf(),
                error,
            }),
        }
    }

    /// The config file. An existing file that differs must still be a valid config (else
    /// nothing at all is done); returns the config the agent will run with.
    fn config(&mut self) -> Result<FileConfig, EnableError> {
        let path = self.host(CONFIG_FILE);
        if let Existing::Bytes(bytes) = self.read(&path)?
            && bytes != CONFIG_TEXT.as_bytes()
        {
            let text = String::from_utf8(bytes).map_err(|_| ConfigError::Parse {
                path: path.clone(),
                message: "it is not UTF-8 text".into(),
            });
            match text.and_then(|text| FileConfig::parse(&text, &path).map(|c| (c, text))) {
                Ok((existing, text)) if !self.force => {
                    // Resolving consumes the config: check a second parse.
                    FileConfig::parse(&text, &path)
                        .and_then(|c| c.resolve(&Overrides::default()))
                        .map_err(EnableError::InvalidConfig)?;
                    self.file(CONFIG_FILE, CONFIG_TEXT, 0o600, "agent config")?;
                    return Ok(existing);
                }
                Ok(_) => {}
                Err(e) if !self.force => return Err(EnableError::InvalidConfig(e)),
                Err(_) => {}
            }
        }
        self.file(
            CONFIG_FILE,
            CONFIG_TEXT,
            0o600,
            "agent config: ssh 0.0.0.0:2222, winrm 0.0.0.0:5985 and 0.0.0.0:5986, endpoint default for admins",
        )?;
        FileConfig::parse(CONFIG_TEXT, &path).map_err(EnableError::InvalidConfig)
    }

    /// Install `text` at `host_path` with `mode`: create, leave, keep (and propose) or, with
    /// --force, replace after a backup.
    fn file(
        &mut self,
        host_path: &str,
        text: &str,
        mode: u32,
        what: &str,
    ) -> Result<(), EnableError> {
        let path = self.host(host_path);
        match self.read(&path)? {
            Existing::Absent => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|error| EnableError::Write {
                        path: dir.to_path_buf(),
                        error,
                    })?;
                }
                write_file(&path, text.as_bytes(), mode)?;
                self.summary.created += 1;
                self.say(&format!("created {} ({what})", path.display()))
            }
            Existing::Bytes(current) if current == text.as_bytes() => {
                self.summary.in_place += 1;
                self.say(&format!("already in place: {}", path.display()))
            }
            Existing::Bytes(_) if self.force => {
                let backup = backup_path(&path);
                std::fs::copy(&path, &backup).map_err(|error| EnableError::Write {
                    path: backup.clone(),
                    error,
                })?;
                write_file(&path, text.as_bytes(), mode)?;
                self.summary.replaced += 1;
                self.say(&format!(
                    "replaced {} with enable's version ({what}); the old one is saved as {}",
                    path.display(),
                    backup.display()
                ))
            }
            Existing::Bytes(_) => {
                let proposed = with_suffix(&path, NEW_SUFFIX);
                let same =
                    matches!(self.read(&proposed)?, Existing::Bytes(b) if b == text.as_bytes());
                if !same {
                    write_file(&proposed, text.as_bytes(), mode)?;
                }
                self.summary.kept += 1;
                self.say(&format!(
                    "kept {path}: it differs from what enable would write (it was changed); compare with {proposed}, or run `remote-agent enable --force` to replace it (the old one is saved as {path}.bak)",
                    path = path.display(),
                    proposed = proposed.display()
                ))
            }
        }
    }

    /// The SSH host key and, when HTTPS is on and no certificate is configured, the
    /// generated HTTPS certificate, in the state dir of `config`.
    fn host_key_and_certificate(&mut self, config: &FileConfig) -> Result<(), EnableError> {
        let state_dir = self.host(config.state_dir.as_deref().unwrap_or(Path::new(STATE_DIR)));
        paths::ensure_private_dir(&state_dir).map_err(|error| EnableError::Write {
            path: state_dir.clone(),
            error,
        })?;
        let key_path = state_dir.join(hostkey::HOST_KEY_FILE);
        let (key, generated) = hostkey::load_or_generate(&state_dir)?;
        let fingerprint = hostkey::fingerprint(&key);
        if generated {
            self.summary.created += 1;
            self.say(&format!(
                "created {} (SSH host key {fingerprint})",
                key_path.display()
            ))?;
        } else {
            self.summary.in_place += 1;
            self.say(&format!(
                "already in place: {} (SSH host key {fingerprint})",
                key_path.display()
            ))?;
        }

        let https_off =
            config.winrm.https_listen.as_deref().is_some_and(|v| {
                matches!(v.trim().to_ascii_lowercase().as_str(), "" | "off" | "none")
            });
        if https_off {
            return self
                .say("no HTTPS certificate needed: [winrm] https_listen is off in the config");
        }
        if let (Some(cert), Some(key)) = (&config.winrm.cert_file, &config.winrm.key_file) {
            let (cert, key) = (self.host(cert), self.host(key));
            if cert.exists() && key.exists() {
                self.summary.in_place += 1;
                return self.say(&format!(
                    "already in place: {} (HTTPS certificate named by the config, key {})",
                    cert.display(),
                    key.display()
                ));
            }
            return self.say(&format!(
                "note: the config names the HTTPS certificate {} and key {}, which are not both there yet: put them there before starting the agent",
                cert.display(),
                key.display()
            ));
        }
        let cert = state_dir.join(tls::CERT_FILE);
        let key = state_dir.join(tls::KEY_FILE);
        if cert.exists() != key.exists() {
            // load_or_generate would replace the one that is there.
            let (there, missing) = if cert.exists() {
                (&cert, &key)
            } else {
                (&key, &cert)
            };
            self.summary.kept += 1;
            return self.say(&format!(
                "kept {}: its pair {} is missing, so no certificate was generated; restore it, or remove both to have a new one generated",
                there.display(),
                missing.display()
            ));
        }
        let name = config.name.clone().unwrap_or_else(crate::config::hostname);
        let identity = tls::load_or_generate(&state_dir, None, None, &name)?;
        if identity.generated {
            self.summary.created += 1;
            self.say(&format!(
                "created {} (HTTPS certificate {}, key in {})",
                cert.display(),
                identity.fingerprint,
                key.display()
            ))
        } else {
            self.summary.in_place += 1;
            self.say(&format!(
                "already in place: {} (HTTPS certificate {})",
                cert.display(),
                identity.fingerprint
            ))
        }
    }

    /// Add `Subsystem remote COMMAND` to sshd_config, unless it (or a file it includes)
    /// defines a `remote` subsystem already. Only ever inserts lines.
    fn sshd_subsystem(&mut self, command: &str) -> Result<(), EnableError> {
        let path = self.host(SSHD_CONFIG);
        let wanted = format!("Subsystem remote {command}");
        let text = match self.read(&path)? {
            Existing::Absent => {
                return self.say(&format!(
                    "skipped sshd's Subsystem line: there is no {} (is openssh-server installed?)",
                    path.display()
                ));
            }
            Existing::Bytes(bytes) => match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(_) => {
                    self.summary.kept += 1;
                    return self.say(&format!(
                        "kept {}: it is not UTF-8 text, so enable does not edit it; add `{wanted}` by hand (before any Match line)",
                        path.display()
                    ));
                }
            },
        };
        if let Some(found) = find_remote_subsystem(self.root.as_deref(), &path, &text, 0) {
            if same_words(&found.command, command) {
                self.summary.in_place += 1;
                return self.say(&format!(
                    "already in place: {} (line {}: {wanted})",
                    found.file.display(),
                    found.line
                ));
            }
            self.summary.kept += 1;
            return self.say(&format!(
                "kept {}: line {} already defines `Subsystem remote {}`, not `{command}`; change it by hand if sshd should reach this agent",
                found.file.display(),
                found.line,
                found.command
            ));
        }
        let meta = std::fs::symlink_metadata(&path).map_err(|error| EnableError::Read {
            path: path.clone(),
            error,
        })?;
        if meta.file_type().is_symlink() {
            self.summary.kept += 1;
            return self.say(&format!(
                "kept {}: it is a symbolic link (managed elsewhere?); add `{wanted}` where it points",
                path.display()
            ));
        }
        let (new_text, line) = insert_subsystem(&text, &wanted);
        write_file(
            &path,
            new_text.as_bytes(),
            meta.permissions().mode() & 0o7777,
        )?;
        // Keep the owner (root:root on a real host); only root may change it.
        let _ = std::os::unix::fs::chown(&path, Some(meta.uid()), Some(meta.gid()));
        self.summary.created += 1;
        self.say(&format!(
            "added to {} (line {line}): {wanted}",
            path.display()
        ))
    }

    /// What to do next, after a run that changed something.
    fn next_steps(&mut self, args: &EnableArgs, config: &FileConfig) -> Result<(), EnableError> {
        if self.root.is_some() {
            return self.say(&format!(
                "next, on the host: systemctl daemon-reload && systemctl enable --now remote-agent (files were written under {}, not to /)",
                self.root.as_deref().unwrap_or(Path::new("/")).display()
            ));
        }
        let state_dir = config.state_dir.clone().unwrap_or_else(|| STATE_DIR.into());
        let no_accounts = crate::accounts::AccountStore::new(&state_dir)
            .load()
            .map(|a| a.is_empty())
            .unwrap_or(false);
        if no_accounts {
            self.say("next: add an admin account: remote-agent user add NAME --admin --authorized-key ~/.ssh/id_ed25519.pub")?;
        }
        if !args.start {
            self.say("next: start the agent: systemctl daemon-reload && systemctl enable --now remote-agent")?;
        }
        if args.sshd_subsystem {
            self.say("next: check and reload sshd: sshd -t && systemctl reload ssh (sshd on some systems)")?;
        }
        Ok(())
    }
}

/// `path` (absolute on the host; a relative one counts from `/`) under `root`.
pub fn rooted(root: Option<&Path>, path: &Path) -> PathBuf {
    match root {
        None if path.is_absolute() => path.to_path_buf(),
        None => Path::new("/").join(path),
        Some(root) => root.join(path.strip_prefix("/").unwrap_or(path)),
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// `FILE.bak`, or `FILE.bak.N` when earlier backups exist (they are never overwritten).
fn backup_path(path: &Path) -> PathBuf {
    let first = with_suffix(path, ".bak");
    if !first.exists() {
        return first;
    }
    (1..)
        .map(|n| with_suffix(path, &format!(".bak.{n}")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

/// Write atomically (temporary file + rename), then give the file `mode`.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), EnableError> {
    let err = |error| EnableError::Write {
        path: path.to_path_buf(),
        error,
    };
    paths::write_private_atomic(path, contents).map_err(err)?;
    if mode != 0o600 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    Ok(())
}

/// A `Subsystem remote …` line found in sshd's configuration.
#[derive(Debug, PartialEq, Eq)]
struct SubsystemLine {
    file: PathBuf,
    /// 1-based.
    line: usize,
    command: String,
}

/// An sshd_config directive: its keyword (lower case) and its arguments.
fn directive(line: &str) -> Option<(String, &str)> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    let end = t
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(t.len());
    let (keyword, rest) = t.split_at(end);
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
    Some((keyword.to_ascii_lowercase(), rest))
}

/// The `Subsystem remote` line of `text` (the file at `file`, under `root`) or of the files it
/// includes, in the global part (before the first `Match`; sshd refuses a second definition
/// anywhere, so either way enable must not add one).
fn find_remote_subsystem(
    root: Option<&Path>,
    file: &Path,
    text: &str,
    depth: usize,
) -> Option<SubsystemLine> {
    for (i, line) in text.lines().enumerate() {
        let Some((keyword, rest)) = directive(line) else {
            continue;
        };
        match keyword.as_str() {
            "match" => return None,
            "subsystem" => {
                let mut words = rest.split_whitespace();
                if words.next() == Some("remote") {
                    return Some(SubsystemLine {
                        file: file.to_path_buf(),
                        line: i + 1,
                        command: words.collect::<Vec<_>>().join(" "),
                    });
                }
            }
            "include" if depth < 8 => {
                for pattern in rest.split_whitespace() {
                    let pattern = pattern.trim_matches('"');
                    let host = if pattern.starts_with('/') {
                        PathBuf::from(pattern)
                    } else {
                        Path::new("/etc/ssh").join(pattern)
                    };
                    for included in expand_glob(&rooted(root, &host)) {
                        let Ok(text) = std::fs::read_to_string(&included) else {
                            continue;
                        };
                        if let Some(found) =
                            find_remote_subsystem(root, &included, &text, depth + 1)
                        {
                            return Some(found);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// The files a pattern names, sorted; wildcards (`*`, `?`) only in the last component.
fn expand_glob(pattern: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
        return Vec::new();
    };
    let name = name.to_string_lossy();
    if !name.contains(['*', '?']) {
        return vec![pattern.to_path_buf()];
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (!n.starts_with('.') || name.starts_with('.')) && wildcard(&name, &n)
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// Shell-style match of `*` and `?`.
fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn same_words(a: &str, b: &str) -> bool {
    a.split_whitespace().eq(b.split_whitespace())
}

/// `text` with `line` (and a comment) added where it applies to every connection: before
/// the first `Match` block (and the comments right above it), else at the end. Returns the
/// new text and the 1-based number of the added line.
fn insert_subsystem(text: &str, line: &str) -> (String, usize) {
    const COMMENT: &str =
        "# Sessions of remote-agent through sshd (added by `remote-agent enable`).";
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let first_match = lines
        .iter()
        .position(|l| directive(l).is_some_and(|(k, _)| k == "match"));
    match first_match {
        Some(mut at) => {
            while at > 0 && lines[at - 1].trim_start().starts_with('#') {
                at -= 1;
            }
            let mut out = String::with_capacity(text.len() + line.len() + 100);
            out.extend(lines[..at].iter().copied());
            if at > 0 && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!("{COMMENT}\n{line}\n\n"));
            out.extend(lines[at..].iter().copied());
            (out, at + 2)
        }
        None => {
            let mut out = text.to_string();
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            let blank = !out.is_empty() && !out.ends_with("\n\n");
            if blank {
                out.push('\n');
            }
            let number = out.lines().count() + 2;
            out.push_str(&format!("{COMMENT}\n{line}\n"));
            (out, number)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(root: &Path) -> EnableArgs {
        EnableArgs {
            root: Some(root.to_path_buf()),
            ..Default::default()
        }
    }

    fn run(args: &EnableArgs) -> (Summary, String) {
        let mut out = Vec::new();
        let summary = enable(args, &mut out).unwrap();
        (summary, String::from_utf8(out).unwrap())
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn fresh_root_gets_everything_and_the_config_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (summary, out) = run(&args(root));
        assert_eq!(
            summary,
            Summary {
                created: 4,
                ..Default::default()
            },
            "{out}"
        );
        let config = root.join("etc/remote-agent/agent.toml");
        let state = root.join("var/lib/remote-agent");
        let unit = root.join("etc/systemd/system/remote-agent.service");
        for p in [&config, &state.join(hostkey::HOST_KEY_FILE), &unit] {
            assert!(out.contains(&format!("created {}", p.display())), "{out}");
        }
        assert!(out.contains(&format!("created {}", state.join(tls::CERT_FILE).display())));
        assert!(out.contains("enable: 4 created, 0 already in place, 0 kept (changed by someone)"));
        assert!(!out.contains("nothing to do"), "{out}");
        assert!(
            out.contains("next, on the host: systemctl daemon-reload"),
            "{out}"
        );
        assert_eq!(mode(&config), 0o600);
        assert_eq!(mode(&state.join(hostkey::HOST_KEY_FILE)), 0o600);
        assert_eq!(mode(&state.join(tls::KEY_FILE)), 0o600);
        assert_eq!(mode(&unit), 0o644);

        let text = std::fs::read_to_string(&config).unwrap();
        assert_eq!(text, CONFIG_TEXT);
        let parsed = FileConfig::parse(&text, &config).unwrap();
        assert_eq!(
            parsed.endpoints["default"].groups,
            vec!["admins".to_string()]
        );
        let resolved = parsed.resolve(&Overrides::default()).unwrap();
        assert_eq!(resolved.state_dir, Path::new(STATE_DIR));
        assert_eq!(resolved.socket.as_deref(), Some(Path::new(SOCKET)));
        assert_eq!(resolved.ssh.unwrap().listen.port(), 2222);
        let winrm = resolved.winrm.unwrap();
        assert_eq!(winrm.http.unwrap().port(), 5985);
        assert_eq!(winrm.https.unwrap().port(), 5986);
        assert!(!winrm.allow_unencrypted);

        let unit_text = std::fs::read_to_string(&unit).unwrap();
        assert!(
            unit_text.contains(
                "ExecStart=/usr/bin/remote-agent run --config /etc/remote-agent/agent.toml"
            )
        );
        assert!(unit_text.contains("Restart=on-failure"));
        for line in unit_text.lines().filter(|l| !l.starts_with('#')) {
            for forbidden in [
                "NoNewPrivileges",
                "ProtectHome",
                "ProtectSystem",
                "PrivateTmp",
            ] {
                assert!(!line.contains(forbidden), "{line}");
            }
        }
    }

    #[test]
    fn second_run_changes_nothing_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        run(&args(dir.path()));
        let key = dir
            .path()
            .join("var/lib/remote-agent")
            .join(hostkey::HOST_KEY_FILE);
        let before = std::fs::read(&key).unwrap();
        let (summary, out) = run(&args(dir.path()));
        assert_eq!(
            summary,
            Summary {
                in_place: 4,
                ..Default::default()
            },
            "{out}"
        );
        assert_eq!(out.matches("already in place: ").count(), 4, "{out}");
        assert!(out.contains("enable: 0 created, 4 already in place, 0 kept (changed by someone)"));
        assert!(
            out.contains("nothing to do: this host is already set up"),
            "{out}"
        );
        assert!(!out.contains("next, on the host"), "{out}");
        assert_eq!(
            std::fs::read(&key).unwrap(),
            before,
            "the host key is never regenerated"
        );
    }

    #[test]
    fn a_changed_config_is_kept_and_the_proposal_written_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        run(&args(dir.path()));
        let config = dir.path().join("etc/remote-agent/agent.toml");
        let changed = CONFIG_TEXT.replace("0.0.0.0:2222", "0.0.0.0:2022");
        std::fs::write(&config, &changed).unwrap();
        let (summary, out) = run(&args(dir.path()));
        assert_eq!(summary.kept, 1, "{out}");
        assert_eq!(summary.created, 0, "{out}");
        assert!(out.contains(&format!(
            "kept {}: it differs from what enable would write (it was changed); compare with {}.remote-new",
            config.display(),
            config.display()
        )), "{out}");
        assert!(out.contains("nothing to do"), "{out}");
        assert_eq!(std::fs::read_to_string(&config).unwrap(), changed);
        let proposed = with_suffix(&config, NEW_SUFFIX);
        assert_eq!(std::fs::read_to_string(&proposed).unwrap(), CONFIG_TEXT);
        assert_eq!(mode(&proposed), 0o600);

        // --force replaces it, keeping the changed one as .bak.
        let (summary, out) = run(&EnableArgs {
            force: true,
            ..args(dir.path())
        });
        assert_eq!(summary.replaced, 1, "{out}");
        assert_eq!(std::fs::read_to_string(&config).unwrap(), CONFIG_TEXT);
        assert_eq!(
            std::fs::read_to_string(with_suffix(&config, ".bak")).unwrap(),
            changed
        );
        assert!(out.contains("1 replaced"), "{out}");
    }

    #[test]
    fn an_invalid_config_is_an_error_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("etc/remote-agent/agent.toml");
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::write(&config, "bogus = 1\n").unwrap();
        let mut out = Vec::new();
        let err = enable(&args(dir.path()), &mut out).unwrap_err().to_string();
        assert!(err.contains(&config.display().to_string()), "{err}");
        assert!(err.contains("enable changed nothing"), "{err}");
        assert!(err.contains("--force"), "{err}");
        assert_eq!(std::fs::read_to_string(&config).unwrap(), "bogus = 1\n");
        assert!(!dir.path().join("var").exists());
        assert!(!with_suffix(&config, NEW_SUFFIX).exists());

        // An endpoint that does not resolve is invalid too.
        std::fs::write(&config, "[endpoints.x]\nrun = \"nonsense\"\n").unwrap();
        let err = enable(&args(dir.path()), &mut out).unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
    }

    #[test]
    fn a_kept_config_decides_where_the_keys_go() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("etc/remote-agent/agent.toml");
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::write(
            &config,
            "state_dir = \"/srv/agent\"\n[winrm]\nhttps_listen = \"off\"\n",
        )
        .unwrap();
        let (summary, out) = run(&args(dir.path()));
        assert!(
            dir.path()
                .join("srv/agent")
                .join(hostkey::HOST_KEY_FILE)
                .exists()
        );
        assert!(!dir.path().join("srv/agent").join(tls::CERT_FILE).exists());
        assert!(out.contains("https_listen is off"), "{out}");
        assert_eq!(summary.kept, 1);
        assert_eq!(summary.created, 2, "key and unit: {out}");
    }

    #[test]
    fn no_keys_leaves_them_to_the_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let (summary, out) = run(&EnableArgs {
            no_keys: true,
            ..args(dir.path())
        });
        assert_eq!(summary.created, 2, "{out}");
        assert!(!dir.path().join("var/lib/remote-agent").exists());
    }

    #[test]
    fn binary_paths_that_would_break_the_unit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            "relative/remote-agent",
            "/opt/my agent/remote-agent",
            "/opt/%i/x",
        ] {
            let mut out = Vec::new();
            let err = enable(
                &EnableArgs {
                    binary: Some(bad.into()),
                    ..args(dir.path())
                },
                &mut out,
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("--binary"), "{err}");
        }
        let mut out = Vec::new();
        let err = enable(
            &EnableArgs {
                start: true,
                ..args(dir.path())
            },
            &mut out,
        )
        .unwrap_err();
        assert!(matches!(err, EnableError::StartWithRoot));
        assert!(
            EnableError::NotRoot
                .to_string()
                .contains("sudo remote-agent enable")
        );
    }

    fn sshd(root: &Path, text: &str) -> PathBuf {
        let path = root.join("etc/ssh/sshd_config");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        path
    }

    fn with_sshd(root: &Path) -> EnableArgs {
        EnableArgs {
            sshd_subsystem: true,
            ..args(root)
        }
    }

    const WANTED: &str =
        "Subsystem remote /usr/bin/remote-agent subsystem --socket /run/remote-agent/agent.sock";

    #[test]
    fn sshd_line_goes_before_the_first_match_block_once() {
        let dir = tempfile::tempdir().unwrap();
        let original = "Port 22\nSubsystem sftp /usr/lib/openssh/sftp-server\n\n# only for backups\nMatch User backup\n    ForceCommand internal-sftp\n";
        let path = sshd(dir.path(), original);
        let (summary, out) = run(&with_sshd(dir.path()));
        assert_eq!(summary.created, 5, "{out}");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let ours = lines.iter().position(|l| *l == WANTED).unwrap();
        let matched = lines.iter().position(|l| l.starts_with("Match")).unwrap();
        assert!(ours < matched, "{text}");
        assert_eq!(lines[matched - 1], "# only for backups", "{text}");
        assert!(
            out.contains(&format!("(line {}): {WANTED}", ours + 1)),
            "{out}"
        );
        // Every original line is still there, in order.
        let kept: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| *l != WANTED && !l.starts_with("# Sessions of remote-agent"))
            .filter(|l| !l.is_empty())
            .collect();
        let before: Vec<&str> = original.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(kept, before);
        assert_eq!(mode(&path), 0o644);

        let (summary, out) = run(&with_sshd(dir.path()));
        assert_eq!(summary.created, 0, "{out}");
        assert_eq!(summary.in_place, 5, "{out}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn sshd_line_is_appended_without_match_and_an_existing_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = sshd(dir.path(), "Port 22");
        run(&with_sshd(dir.path()));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("Port 22\n\n# Sessions"), "{text}");
        assert!(text.ends_with(&format!("{WANTED}\n")), "{text}");

        let other = "Port 22\nsubsystem=remote /usr/local/bin/remote-agent subsystem\n";
        let path = sshd(dir.path(), other);
        let (summary, out) = run(&with_sshd(dir.path()));
        assert_eq!(summary.kept, 1, "{out}");
        assert!(
            out.contains(
                "line 2 already defines `Subsystem remote /usr/local/bin/remote-agent subsystem`"
            ),
            "{out}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), other);
    }

    #[test]
    fn sshd_line_in_an_included_file_counts_and_a_missing_sshd_config_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (summary, out) = run(&with_sshd(dir.path()));
        assert!(
            out.contains("skipped sshd's Subsystem line: there is no"),
            "{out}"
        );
        assert_eq!(summary.created, 4);

        let path = sshd(
            dir.path(),
            "Include /etc/ssh/sshd_config.d/*.conf\nPort 22\n",
        );
        let drop_in = dir.path().join("etc/ssh/sshd_config.d/50-remote.conf");
        std::fs::create_dir_all(drop_in.parent().unwrap()).unwrap();
        std::fs::write(&drop_in, format!("# mine\n{WANTED}\n")).unwrap();
        let (_, out) = run(&with_sshd(dir.path()));
        assert!(
            out.contains(&format!("already in place: {} (line 2:", drop_in.display())),
            "{out}"
        );
        assert!(
            !std::fs::read_to_string(&path)
                .unwrap()
                .contains("Subsystem")
        );
    }

    #[test]
    fn an_sshd_config_that_is_not_utf8_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = sshd(dir.path(), "");
        let bytes = b"# caf\xe9\nPort 22\n".to_vec();
        std::fs::write(&path, &bytes).unwrap();
        let (summary, out) = run(&with_sshd(dir.path()));
        assert_eq!(summary.kept, 1, "{out}");
        assert!(out.contains("not UTF-8"), "{out}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn sshd_subsystem_after_match_does_not_count_as_global() {
        let text = "Match User x\n  Subsystem remote /bin/false\n";
        assert_eq!(find_remote_subsystem(None, Path::new("c"), text, 0), None);
        let (new, line) = insert_subsystem(text, "Subsystem remote y");
        assert!(new.starts_with("# Sessions"), "{new}");
        assert_eq!(line, 2);
        assert!(new.ends_with(text));
    }

    #[test]
    fn wildcards() {
        assert!(wildcard("*.conf", "50-remote.conf"));
        assert!(!wildcard("*.conf", "50-remote.conf.bak"));
        assert!(wildcard("a?c*", "abcdef"));
        assert!(!wildcard("a?c", "ac"));
        assert!(wildcard("*", ""));
    }

    #[test]
    fn rooted_paths() {
        assert_eq!(
            rooted(Some(Path::new("/d")), Path::new("/etc/x")),
            Path::new("/d/etc/x")
        );
        assert_eq!(rooted(None, Path::new("/etc/x")), Path::new("/etc/x"));
        assert_eq!(rooted(None, Path::new("var/x")), Path::new("/var/x"));
    }
}
