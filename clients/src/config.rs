//! Where the client keeps its state (design.md §5): `$XDG_CONFIG_HOME/remote`, or
//! `~/.config/remote` when that variable is unset or not an absolute path; and who the
//! local user is (the default login name).

use std::path::PathBuf;

/// The client's configuration directory.
pub fn config_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from)
        && dir.is_absolute()
    {
        return dir.join("remote");
    }
    home_dir().join(".config/remote")
}

/// The client's known_hosts file (OpenSSH format).
pub fn known_hosts_file() -> PathBuf {
    config_dir().join("known_hosts")
}

/// The invoking user's home directory: `$HOME`, else the password database, else `/`.
pub fn home_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.dir)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// The login name used when a target has no `user@`: `$USER`, else the OS user name.
pub fn default_user() -> String {
    if let Ok(user) = std::env::var("USER")
        && !user.is_empty()
    {
        return user;
    }
    let uid = nix::unistd::getuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

/// The client's record of WinRM HTTPS certificates (trust on first use).
pub fn winrm_known_hosts_file() -> PathBuf {
    config_dir().join("winrm_known_hosts")
}

/// Relay certificates trusted on first use (same format as winrm_known_hosts).
pub fn relay_known_hosts_file() -> PathBuf {
    config_dir().join("relay_known_hosts")
}

/// The client's settings file.
pub fn config_file() -> PathBuf {
    config_dir().join("config.toml")
}

/// `config.toml` as written by people; every field optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub session: SessionOptions,
}

/// Session options (PowerShell's New-PSSessionOption): what this client asks of the
/// sessions it opens. The agent applies the shorter of these and its endpoint's limits.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionOptions {
    /// How long connecting and opening a session may take, in seconds.
    pub open_timeout_secs: Option<u64>,
    /// Close the session after this long without a client.
    pub idle_timeout_secs: Option<u64>,
    /// Stop a command that runs longer than this.
    pub operation_timeout_secs: Option<u64>,
    /// Stop a command that prints more than this many MB.
    pub max_received_mb_per_command: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path} is not valid: {message}; fix it or move it aside")]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

/// The client's config.toml (defaults when there is none).
pub fn load_config() -> Result<ConfigFile, ConfigError> {
    let path = config_file();
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_config(&text).map_err(|message| ConfigError { path, message }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
        Err(e) => Err(ConfigError {
            path,
            message: e.to_string(),
        }),
    }
}

fn parse_config(text: &str) -> Result<ConfigFile, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

impl SessionOptions {
    /// These options with every flag that was given taking precedence.
    pub fn overridden_by(self, flags: SessionOptions) -> SessionOptions {
        SessionOptions {
            open_timeout_secs: flags.open_timeout_secs.or(self.open_timeout_secs),
            idle_timeout_secs: flags.idle_timeout_secs.or(self.idle_timeout_secs),
            operation_timeout_secs: flags.operation_timeout_secs.or(self.operation_timeout_secs),
            max_received_mb_per_command: flags
                .max_received_mb_per_command
                .or(self.max_received_mb_per_command),
        }
    }
}

/// Hosts to which Basic authentication may go over plain HTTP (WinRM's `TrustedHosts`).
pub fn trusted_hosts_file() -> PathBuf {
    config_dir().join("trusted_hosts")
}

/// Whether the trusted-hosts file at `path` lists `host` (and `port`). Entries are separated
/// by newlines, commas or spaces; `#` starts a comment. An entry is `host`, `host:port` or
/// `[ipv6]:port`; `*` matches any run of characters (`*.lab.example`, `10.0.0.*`, `*`), and
/// an address pattern (digits, dots and `*`) matches IPv4 addresses only.
/// Names are compared without regard to case. A missing file lists nothing.
pub fn is_trusted_host(path: &std::path::Path, host: &str, port: u16) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    trusted_hosts_match(&text, host, port)
}

fn trusted_hosts_match(text: &str, host: &str, port: u16) -> bool {
    let host = host.to_ascii_lowercase();
    let with_port = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .flat_map(|l| l.split([',', ' ', '\t']))
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .any(|entry| {
            let bare = entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .unwrap_or(&entry);
            // An address pattern (`10.0.0.*`) matches addresses only, never a name that
            // happens to start like one (`10.0.0.1.example.net`).
            let address_pattern = |e: &str| {
                let e = e.split(':').next().unwrap_or_default();
                e.contains('.')
                    && e.bytes()
                        .all(|c| c.is_ascii_digit() || c == b'.' || c == b'*')
            };
            if address_pattern(&entry) && host.parse::<std::net::Ipv4Addr>().is_err() {
                return false;
            }
            glob(bare, &host) || glob(&entry, &with_port)
        })
}

/// `*` matches any run of characters; everything else literally.
fn glob(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_options_come_from_the_file_and_flags_win() {
        let file =
            parse_config("[session]\nidle_timeout_secs = 600\nmax_received_mb_per_command = 5\n")
                .expect("parse");
        let flags = SessionOptions {
            idle_timeout_secs: Some(60),
            ..Default::default()
        };
        let o = file.session.overridden_by(flags);
        assert_eq!(o.idle_timeout_secs, Some(60));
        assert_eq!(o.max_received_mb_per_command, Some(5));
        assert_eq!(o.operation_timeout_secs, None);
        assert!(parse_config("[session]\nidle = 1\n").is_err());
    }

    #[test]
    fn trusted_hosts_entries() {
        let list = "# lab\nweb1, 10.0.0.*\n*.lab.example db:5985 [::1]:5985\n";
        assert!(trusted_hosts_match(list, "web1", 5985));
        assert!(trusted_hosts_match(list, "WEB1", 1234));
        assert!(trusted_hosts_match(list, "10.0.0.7", 5985));
        assert!(trusted_hosts_match(list, "a.lab.example", 5985));
        assert!(!trusted_hosts_match(list, "lab.example", 5985));
        assert!(trusted_hosts_match(list, "db", 5985));
        assert!(!trusted_hosts_match(list, "db", 5986));
        assert!(trusted_hosts_match(list, "::1", 5985));
        assert!(!trusted_hosts_match(list, "::1", 5986));
        assert!(!trusted_hosts_match(list, "web2", 5985));
        assert!(!trusted_hosts_match("# web2\n", "web2", 5985));
        assert!(trusted_hosts_match("*", "anything", 1));
        // An address pattern matches addresses only.
        assert!(trusted_hosts_match("10.0.0.*", "10.0.0.99", 1));
        assert!(trusted_hosts_match("10.0.0.*:5986", "10.0.0.99", 5986));
        assert!(!trusted_hosts_match("10.0.0.*", "10.0.0.1.evil.example", 1));
        assert!(!trusted_hosts_match(
            "10.0.0.*:5986",
            "10.0.0.1.evil.example",
            5986
        ));
        assert!(!trusted_hosts_match("", "web1", 5985));
    }
}
