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

/// Hosts to which Basic authentication may go over plain HTTP (WinRM's `TrustedHosts`).
pub fn trusted_hosts_file() -> PathBuf {
    config_dir().join("trusted_hosts")
}

/// Whether the trusted-hosts file at `path` lists `host` (and `port`). Entries are separated
/// by newlines, commas or spaces; `#` starts a comment. An entry is `host`, `host:port` or
/// `[ipv6]:port`; `*` matches any run of characters (`*.lab.example`, `10.0.0.*`, `*`).
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
        assert!(!trusted_hosts_match("", "web1", 5985));
    }
}
