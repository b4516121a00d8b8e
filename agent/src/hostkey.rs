//! The agent's SSH host key: an ed25519 key generated on first start and kept in the state
//! directory (OpenSSH format, mode 0600), so clients see the same key on every start.

use std::path::{Path, PathBuf};

use russh::keys::ssh_key::{HashAlg, LineEnding};
use russh::keys::{Algorithm, PrivateKey};

pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error(
        "cannot read host key {path}: {source}. Check the state dir's permissions, or move the file aside to have a new key generated (clients will then see a changed host key)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "host key {path} is not a valid unencrypted OpenSSH private key ({message}): restore it from backup, or move it away to generate a new one (clients will then warn about a changed key)"
    )]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write host key {path}: {source}. Check that the state dir is writable")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot generate host key: {0}. Check that the system has entropy (/dev/urandom) and try again"
    )]
    Generate(String),
}

/// Load the host key from `state_dir`, generating and saving one if there is none.
/// Returns the key and whether it was generated now.
pub fn load_or_generate(state_dir: &Path) -> Result<(PrivateKey, bool), HostKeyError> {
    let path = state_dir.join(HOST_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key =
                PrivateKey::from_openssh(text.as_bytes()).map_err(|e| HostKeyError::Invalid {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            if key.is_encrypted() {
                return Err(HostKeyError::Invalid {
                    path,
                    message: "the key is encrypted".into(),
                });
            }
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
                .map_err(|e| HostKeyError::Generate(e.to_string()))?;
            let text = key
                .to_openssh(LineEnding::LF)
                .map_err(|e| HostKeyError::Generate(e.to_string()))?;
            let write_err = |source| HostKeyError::Write {
                path: path.clone(),
                source,
            };
            crate::paths::ensure_private_dir(state_dir).map_err(write_err)?;
            crate::paths::write_private_atomic(&path, text.as_bytes()).map_err(write_err)?;
            let public = key
                .public_key()
                .to_openssh()
                .map_err(|e| HostKeyError::Generate(e.to_string()))?;
            let pub_path = state_dir.join(format!("{HOST_KEY_FILE}.pub"));
            std::fs::write(&pub_path, format!("{public}\n")).map_err(|source| {
                HostKeyError::Write {
                    path: pub_path,
                    source,
                }
            })?;
            Ok((key, true))
        }
        Err(source) => Err(HostKeyError::Read { path, source }),
    }
}

/// `SHA256:…` fingerprint, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PrivateKey) -> String {
    key.public_key().fingerprint(HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (a, fresh) = load_or_generate(dir.path()).unwrap();
        assert!(fresh);
        let (b, fresh) = load_or_generate(dir.path()).unwrap();
        assert!(!fresh);
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert!(fingerprint(&a).starts_with("SHA256:"));
        let mode = std::fs::metadata(dir.path().join(HOST_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn garbage_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(HOST_KEY_FILE), "garbage").unwrap();
        let err = load_or_generate(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a valid"), "{err}");
    }
}
