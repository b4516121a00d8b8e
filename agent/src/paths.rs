//! Where the agent keeps its state and configuration, and how files holding secrets are
//! written: atomically (temp file + rename) and with mode 0600.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The default state directory: `/var/lib/remote-agent` as root,
/// `$XDG_STATE_HOME/remote-agent` (or `~/.local/state/remote-agent`) otherwise.
pub fn default_state_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/remote-agent");
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("remote-agent");
    }
    home_dir().join(".local/state/remote-agent")
}

/// The default configuration file, used when it exists and no `--config` is given:
/// `/etc/remote-agent/agent.toml` as root, `$XDG_CONFIG_HOME/remote-agent/agent.toml` otherwise.
pub fn default_config_file() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/etc/remote-agent/agent.toml");
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("remote-agent/agent.toml");
    }
    home_dir().join(".config/remote-agent/agent.toml")
}

/// The default local socket of the agent, where `remote-agent subsystem` connects:
/// `/run/remote-agent/agent.sock` as root, `$XDG_RUNTIME_DIR/remote-agent/agent.sock` (or in
/// the state directory) otherwise.
pub fn default_socket() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/remote-agent/agent.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("remote-agent/agent.sock"),
        None => default_state_dir().join("agent.sock"),
    }
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

/// Create `dir` (and parents) if needed and make sure only its owner can list, read or write it.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let meta = std::fs::metadata(dir)?;
    // Others may traverse (0711, see the sessions dir) but never read or write.
    if meta.permissions().mode() & 0o066 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Write `contents` to `path` atomically with mode 0600: a temporary file beside it is
/// written, synced and renamed over the target, so readers see the old or the new file,
/// never a torn one.
pub fn write_private_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_is_private_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        write_private_atomic(&p, b"one").unwrap();
        write_private_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }
}
