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
