//! The relay's TLS identity: a self-signed certificate generated on first start and kept in
//! the data directory (key 0600), or the PEM files an operator gives. Agents and clients pin
//! its fingerprint on first contact (or are given it, or a CA).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub const CERT_FILE: &str = "relay_cert.pem";
pub const KEY_FILE: &str = "relay_key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the relay's TLS {what} {path}: {message}")]
    Read {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("cannot generate the relay's TLS certificate: {0}")]
    Generate(String),
    #[error(
        "cannot write {path}: {source}. Check that the data directory is writable by this user"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the relay's TLS certificate and key do not work together: {0}")]
    Config(String),
}

/// A TLS identity ready to serve.
pub struct Identity {
    pub config: Arc<rustls::ServerConfig>,
    /// `SHA256:<base64>` of the certificate.
    pub fingerprint: String,
    pub generated: bool,
    pub cert_path: PathBuf,
}

/// The given certificate and key, or those in `data_dir` (generated when absent).
pub fn load_or_generate(
    data_dir: &Path,
    given: Option<(&Path, &Path)>,
    host_name: &str,
) -> Result<Identity, TlsError> {
    let (cert_path, key_path, generated) = match given {
        Some((c, k)) => (c.to_path_buf(), k.to_path_buf(), false),
        None => {
            let (c, k) = (data_dir.join(CERT_FILE), data_dir.join(KEY_FILE));
            let fresh = !(c.exists() && k.exists());
            if fresh {
                let (cert, key) =
                    remote_proto::tls::self_signed(host_name).map_err(TlsError::Generate)?;
                // The key first: a crash in between never leaves a certificate without it.
                write_private(&k, key.as_bytes())?;
                write_private(&c, cert.as_bytes())?;
            }
            (c, k, fresh)
        }
    };
    let read_err = |what, path: &Path, message: String| TlsError::Read {
        what,
        path: path.to_path_buf(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| read_err("certificate", &cert_path, e.to_string()))?;
    let leaf = certs.first().cloned().ok_or_else(|| {
        read_err(
            "certificate",
            &cert_path,
            "no CERTIFICATE block in the file".into(),
        )
    })?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| read_err("key", &key_path, e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(remote_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    // gRPC calls, and agents' tunnels (remote_proto::tunnel).
    config.alpn_protocols = vec![b"h2".to_vec(), remote_proto::tunnel::ALPN.to_vec()];
    Ok(Identity {
        config: Arc::new(config),
        fingerprint: remote_proto::tls::fingerprint(leaf.as_ref()),
        generated,
        cert_path,
    })
}

/// Write `data` to `path` with mode 0600, atomically (a temporary file renamed).
fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused_with_a_private_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_generate(dir.path(), None, "relay1").expect("generate");
        assert!(first.generated);
        let again = load_or_generate(dir.path(), None, "relay1").expect("load");
        assert!(!again.generated);
        assert_eq!(first.fingerprint, again.fingerprint);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
