//! The agent's configuration: the TOML file, the command-line flags that override it, and
//! the resolved settings every other module reads. Defaults live here and nowhere else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default SSH port of the agent (sshd keeps 22).
pub const DEFAULT_SSH_PORT: u16 = 2222;
/// WinRM's standard ports (spec §1.1).
pub const DEFAULT_WINRM_HTTP_PORT: u16 = 5985;
pub const DEFAULT_WINRM_HTTPS_PORT: u16 = 5986;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config file {path}: {source}. Check the path (--config) and its permissions; `remote-agent enable` writes a commented one"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "config file {path} is not valid: {message}. Fix the line named above; README.md shows every setting"
    )]
    Parse { path: PathBuf, message: String },
    #[error(
        "invalid listen address '{value}' for {what}: use HOST:PORT (e.g. 0.0.0.0:{DEFAULT_SSH_PORT}) or 'off'"
    )]
    Listen { what: &'static str, value: String },
    #[error("{0}; fix it in the config file (or with `remote-agent endpoint set`)")]
    Endpoint(#[from] crate::endpoints::EndpointError),
    #[error("invalid value '{value}' for {what}: {expected}")]
    Invalid {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// The configuration file as written by people. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub name: Option<String>,
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub ssh: SshFileConfig,
    #[serde(default)]
    pub sessions: SessionsFileConfig,
    #[serde(default)]
    pub local: LocalFileConfig,
    #[serde(default)]
    pub winrm: WinrmFileConfig,
    #[serde(default)]
    pub relay: RelayFileConfig,
    /// Endpoints (session configurations): `[endpoints.NAME]`; see crate::endpoints.
    #[serde(default)]
    pub endpoints: std::collections::BTreeMap<String, crate::endpoints::EndpointFile>,
    #[serde(default)]
    pub audit: AuditFileConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFileConfig {
    /// Size of `audit.jsonl` before it is rotated, MiB (default 10).
    pub max_mb: Option<u64>,
    /// Rotated files kept (default 5).
    pub keep: Option<usize>,
    /// Characters of a command line recorded (default 1024; 0 leaves command lines out).
    pub command_chars: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayFileConfig {
    /// The relay to dial out to, `HOST[:PORT]` or `https://HOST[:PORT]` (port 7443).
    pub url: Option<String>,
    /// The relay's certificate, `SHA256:…` as `remote-relay run` prints it (default: trusted
    /// on first contact and pinned in the state dir).
    pub fingerprint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WinrmFileConfig {
    /// HTTP listener, `HOST:PORT` or `off` (default 0.0.0.0:5985).
    pub http_listen: Option<String>,
    /// HTTPS listener, `HOST:PORT` or `off` (default 0.0.0.0:5986).
    pub https_listen: Option<String>,
    /// Serve plaintext SOAP (Basic, or NTLM without sealing) over plain HTTP (default false).
    pub allow_unencrypted: Option<bool>,
    /// TLS certificate and key (PEM); generated in the state dir when absent.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Largest request envelope, bytes (default 512000, at least 153600).
    pub max_envelope_bytes: Option<usize>,
    /// Open shells per user (default 30).
    pub max_shells_per_user: Option<usize>,
    /// Commands per shell (default 25).
    pub max_commands_per_shell: Option<usize>,
    /// A shell with no request for this long is closed (default 7200; a client's
    /// IdleTimeOut may ask for less, never more).
    pub idle_timeout_secs: Option<u64>,
    /// HTTP connections open at once (default 1024).
    pub max_connections: Option<usize>,
    /// Channel binding on HTTPS: `none`, `relaxed` (default) or `strict`.
    pub channel_binding: Option<String>,
    /// Program that runs for a Command of `powershell`/`powershell.exe` (default `pwsh`).
    pub powershell: Option<String>,
    /// Output kept per shell until its commands are received, MiB (default 16).
    pub journal_mb: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsFileConfig {
    /// Journal size per session, MiB (default 64).
    pub journal_mb: Option<u64>,
    /// A session with no client for this long is closed (default 7200 = 2 h).
    pub idle_timeout_secs: Option<u64>,
    /// `block` (default without a relay), `drop` or `spill` (default with a relay).
    pub buffering: Option<String>,
    /// Sessions one user may have open at once (default 64).
    pub max_sessions_per_user: Option<usize>,
    /// Commands running at once in one commands session (default 64).
    pub max_running_commands: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalFileConfig {
    /// Unix socket for `remote-agent subsystem` (sshd subsystem mode), or `off`.
    pub socket: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshFileConfig {
    /// `HOST:PORT` or `off`.
    pub listen: Option<String>,
    pub max_connections: Option<usize>,
    pub max_startups: Option<usize>,
    pub login_grace_time_secs: Option<u64>,
    pub max_auth_tries: Option<usize>,
    pub keepalive_interval_secs: Option<u64>,
    pub keepalive_max: Option<usize>,
    /// Extra environment variable names clients may set (beyond LANG, LC_*, TERM, TZ, …).
    #[serde(default)]
    pub accept_env: Vec<String>,
}

/// Flags given on the command line; `Some` overrides the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    pub ssh: Option<String>,
    pub name: Option<String>,
    pub socket: Option<String>,
    pub winrm_http: Option<String>,
    pub winrm_https: Option<String>,
    pub allow_unencrypted: bool,
    pub relay: Option<String>,
    pub relay_fingerprint: Option<String>,
    pub join_token: Option<String>,
}

/// Resolved settings of the relay link.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// `host:port` of the relay.
    pub addr: String,
    /// The host name, for TLS and messages.
    pub host: String,
    pub fingerprint: Option<String>,
    /// The one-time join token, while the agent has no credential yet.
    pub join_token: Option<String>,
}

/// Parse a relay address: `HOST[:PORT]` or `https://HOST[:PORT]` (port 7443).
pub fn parse_relay_url(url: &str) -> Result<RelaySettings, ConfigError> {
    let (host, addr) = remote_proto::parse_relay_addr(url).ok_or_else(|| ConfigError::Invalid {
        what: "relay url",
        value: url.to_string(),
        expected: "HOST[:PORT] or https://HOST[:PORT] (default port 7443)",
    })?;
    Ok(RelaySettings {
        addr,
        host,
        fingerprint: None,
        join_token: None,
    })
}

/// Resolved settings of the WinRM listeners.
#[derive(Debug, Clone)]
pub struct WinrmSettings {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub allow_unencrypted: bool,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub max_envelope_bytes: usize,
    pub max_shells_per_user: usize,
    pub max_commands_per_shell: usize,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub channel_binding: ChannelBindingPolicy,
    pub powershell: String,
    pub journal_bytes: usize,
}

/// How HTTPS logins with NTLM check channel binding tokens (spec §5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBindingPolicy {
    None,
    Relaxed,
    Strict,
}

/// Resolved settings of the SSH listener.
#[derive(Debug, Clone)]
pub struct SshSettings {
    pub listen: SocketAddr,
    /// Connections open at once; more are closed right after accept.
    pub max_connections: usize,
    /// Connections not yet authenticated at once (sshd's MaxStartups).
    pub max_startups: usize,
    /// Time a client has from connect to successful authentication (sshd's LoginGraceTime).
    pub login_grace_time: Duration,
    /// Authentication attempts per connection (sshd's MaxAuthTries).
    pub max_auth_tries: usize,
    pub keepalive_interval: Duration,
    pub keepalive_max: usize,
    pub accept_env: Vec<String>,
}

/// Everything the agent needs to start.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub state_dir: PathBuf,
    pub ssh: Option<SshSettings>,
    pub sessions: crate::session::SessionDefaults,
    /// The local socket for subsystem mode; `None` when off.
    pub socket: Option<PathBuf>,
    /// WinRM; `None` when both listeners are off.
    pub winrm: Option<WinrmSettings>,
    /// The relay this agent dials out to, if any.
    pub relay: Option<RelaySettings>,
    /// The audit log in the state dir (crate::audit).
    pub audit: crate::audit::AuditSettings,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        FileConfig::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Combine the file with the flags and the built-in defaults.
    pub fn resolve(self, flags: &Overrides) -> Result<AgentConfig, ConfigError> {
        let name = flags.name.clone().or(self.name).unwrap_or_else(hostname);
        let state_dir = flags
            .state_dir
            .clone()
            .or(self.state_dir)
            .unwrap_or_else(crate::paths::default_state_dir);
        // Processes run elsewhere (in the user's home): paths handed to them must be absolute.
        let state_dir = if state_dir.is_relative() {
            std::env::current_dir()
                .map(|d| d.join(&state_dir))
                .unwrap_or(state_dir)
        } else {
            state_dir
        };
        let f = self.ssh;
        let listen = flags
            .ssh
            .clone()
            .or(f.listen)
            .unwrap_or_else(|| format!("0.0.0.0:{DEFAULT_SSH_PORT}"));
        let ssh = match parse_listen("ssh", &listen)? {
            None => None,
            Some(listen) => Some(SshSettings {
                listen,
                max_connections: f.max_connections.unwrap_or(1024).max(1),
                max_startups: f.max_startups.unwrap_or(100).max(1),
                login_grace_time: Duration::from_secs(f.login_grace_time_secs.unwrap_or(60).max(1)),
                max_auth_tries: f.max_auth_tries.unwrap_or(6).max(1),
                keepalive_interval: Duration::from_secs(
                    f.keepalive_interval_secs.unwrap_or(30).max(1),
                ),
                keepalive_max: f.keepalive_max.unwrap_or(4).max(1),
                accept_env: f.accept_env,
            }),
        };
        let mut sessions = crate::session::SessionDefaults::default();
        if let Some(mb) = self.sessions.journal_mb {
            sessions.journal_bytes = (mb.clamp(1, 2048) as usize) << 20;
        }
        if let Some(n) = self.sessions.max_sessions_per_user {
            sessions.max_sessions_per_user = n.max(1);
        }
        if let Some(n) = self.sessions.max_running_commands {
            sessions.max_running_commands = n.max(1);
        }
        if let Some(secs) = self.sessions.idle_timeout_secs {
            sessions.idle_timeout = Duration::from_secs(secs.max(1));
        }
        let relay = match flags.relay.clone().or(self.relay.url) {
            Some(url) if !url.eq_ignore_ascii_case("off") && !url.is_empty() => {
                let mut r = parse_relay_url(&url)?;
                r.fingerprint = flags.relay_fingerprint.clone().or(self.relay.fingerprint);
                r.join_token = flags.join_token.clone();
                Some(r)
            }
            _ => None,
        };
        use crate::session::journal::Mode;
        sessions.buffering = match self.sessions.buffering.as_deref() {
            None if relay.is_some() => Mode::Spill,
            None | Some("block") => Mode::Block,
            Some("drop") => Mode::Drop,
            // Spill needs a relay to spill to; without one it is block.
            Some("spill") if relay.is_some() => Mode::Spill,
            Some("spill") => Mode::Block,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    what: "sessions.buffering",
                    value: other.to_string(),
                    expected: "block, drop or spill",
                });
            }
        };
        sessions.spill_possible = relay.is_some();
        sessions.endpoints = crate::endpoints::Endpoints::from_files(&self.endpoints)?;
        let socket = match flags.socket.clone().or(self.local.socket) {
            Some(s) if s.eq_ignore_ascii_case("off") || s.is_empty() => None,
            Some(s) => Some(PathBuf::from(s)),
            None => Some(crate::paths::default_socket()),
        };
        let winrm = resolve_winrm(self.winrm, flags)?;
        let mut audit = crate::audit::AuditSettings::default();
        if let Some(mb) = self.audit.max_mb {
            audit.max_bytes = mb.max(1) << 20;
        }
        if let Some(keep) = self.audit.keep {
            audit.keep = keep;
        }
        if let Some(chars) = self.audit.command_chars {
            audit.command_chars = chars;
        }
        Ok(AgentConfig {
            name,
            state_dir,
            ssh,
            sessions,
            socket,
            winrm,
            relay,
            audit,
        })
    }
}

fn resolve_winrm(
    f: WinrmFileConfig,
    flags: &Overrides,
) -> Result<Option<WinrmSettings>, ConfigError> {
    let http = flags
        .winrm_http
        .clone()
        .or(f.http_listen)
        .unwrap_or_else(|| format!("0.0.0.0:{DEFAULT_WINRM_HTTP_PORT}"));
    let https = flags
        .winrm_https
        .clone()
        .or(f.https_listen)
        .unwrap_or_else(|| format!("0.0.0.0:{DEFAULT_WINRM_HTTPS_PORT}"));
    let http = parse_listen("winrm http", &http)?;
    let https = parse_listen("winrm https", &https)?;
    if http.is_none() && https.is_none() {
        return Ok(None);
    }
    let channel_binding = match f.channel_binding.as_deref() {
        None | Some("relaxed") => ChannelBindingPolicy::Relaxed,
        Some("strict") => ChannelBindingPolicy::Strict,
        Some("none") => ChannelBindingPolicy::None,
        Some(other) => {
            return Err(ConfigError::Invalid {
                what: "winrm.channel_binding",
                value: other.to_string(),
                expected: "none, relaxed or strict",
            });
        }
    };
    if f.cert_file.is_some() != f.key_file.is_some() {
        return Err(ConfigError::Invalid {
            what: "winrm.cert_file/key_file",
            value: "only one of them".into(),
            expected: "both a certificate and its key, or neither (one is generated)",
        });
    }
    Ok(Some(WinrmSettings {
        http,
        https,
        allow_unencrypted: flags.allow_unencrypted || f.allow_unencrypted.unwrap_or(false),
        cert_file: f.cert_file,
        key_file: f.key_file,
        max_envelope_bytes: f
            .max_envelope_bytes
            .unwrap_or(512_000)
            .clamp(153_600, 8 << 20),
        max_shells_per_user: f.max_shells_per_user.unwrap_or(30).max(1),
        max_commands_per_shell: f.max_commands_per_shell.unwrap_or(25).max(1),
        idle_timeout: Duration::from_secs(f.idle_timeout_secs.unwrap_or(7200).max(1)),
        max_connections: f.max_connections.unwrap_or(1024).max(1),
        channel_binding,
        powershell: f.powershell.unwrap_or_else(|| "pwsh".into()),
        journal_bytes: (f.journal_mb.unwrap_or(16).clamp(1, 2048) as usize) << 20,
    }))
}

/// `off` (or `none`, empty) disables a listener; anything else must be `HOST:PORT`.
pub fn parse_listen(what: &'static str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let v = value.trim();
    if v.is_empty() || v.eq_ignore_ascii_case("off") || v.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    use std::net::ToSocketAddrs;
    v.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(Some)
        .ok_or_else(|| ConfigError::Listen {
            what,
            value: value.to_string(),
        })
}

/// The host's name (`/proc/sys/kernel/hostname`), `localhost` when unknown: the agent's
/// default name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_defaults_fill_in() {
        let f = FileConfig::parse(
            "name = \"web1\"\n[ssh]\nlisten = \"127.0.0.1:2022\"\nmax_auth_tries = 3\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let c = f
            .resolve(&Overrides {
                ssh: Some("127.0.0.1:4000".into()),
                state_dir: Some("/tmp/x".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(c.name, "web1");
        let ssh = c.ssh.unwrap();
        assert_eq!(ssh.listen.port(), 4000);
        assert_eq!(ssh.max_auth_tries, 3);
        assert_eq!(ssh.login_grace_time, Duration::from_secs(60));
    }

    #[test]
    fn off_and_bad_values() {
        let c = FileConfig::default()
            .resolve(&Overrides {
                ssh: Some("off".into()),
                ..Default::default()
            })
            .unwrap();
        assert!(c.ssh.is_none());
        assert!(parse_listen("ssh", "nonsense").is_err());
        assert!(FileConfig::parse("bogus = 1", Path::new("t")).is_err());
    }
}
