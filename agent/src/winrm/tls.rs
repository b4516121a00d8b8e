//! The HTTPS listener's certificate: loaded from the configured PEM files, or generated on
//! first start (self-signed, ECDSA P-256) and kept in the state directory with mode 0600.
//! Also what clients need to trust or bind to it: its SHA-256 fingerprint (printed at start,
//! `SHA256:<base64>` like SSH host keys) and the channel-binding hash of spec §5.5.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

use crate::paths;

/// Generated certificate and key, inside the state directory.
pub const CERT_FILE: &str = "winrm_cert.pem";
pub const KEY_FILE: &str = "winrm_key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read the WinRM TLS {what} {path}: {message}. Check [winrm] cert_file/key_file, or remove them from the config to use a generated certificate"
    )]
    Read {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("cannot generate the WinRM TLS certificate: {0}")]
    Generate(String),
    #[error("cannot write {path}: {source}. Check that the state dir is writable by this user")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the WinRM TLS certificate and key do not work together: {0}")]
    Config(String),
}

/// A TLS identity ready to serve.
pub struct Identity {
    pub config: Arc<rustls::ServerConfig>,
    /// `SHA256:<base64 without padding>` of the certificate (DER).
    pub fingerprint: String,
    /// `tls-server-end-point:` ‖ hash of the certificate: the channel-binding application
    /// data NTLM clients bind their login to.
    pub channel_binding: Vec<u8>,
    /// Whether the certificate was generated just now.
    pub generated: bool,
    pub cert_path: PathBuf,
}

/// Load the configured certificate and key, or the generated ones from `state_dir`
/// (generating them when absent).
pub fn load_or_generate(
    state_dir: &Path,
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
    host_name: &str,
) -> Result<Identity, TlsError> {
    let (cert_path, key_path, generated) = match (cert_file, key_file) {
        (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf(), false),
        _ => {
            let c = state_dir.join(CERT_FILE);
            let k = state_dir.join(KEY_FILE);
            let fresh = !(c.exists() && k.exists());
            if fresh {
                generate(&c, &k, host_name)?;
            }
            (c, k, fresh)
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Read {
            what: "certificate",
            path: cert_path.clone(),
            message: e.to_string(),
        })?;
    let Some(leaf) = certs.first().cloned() else {
        return Err(TlsError::Read {
            what: "certificate",
            path: cert_path,
            message: "no CERTIFICATE block in the file".into(),
        });
    };
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Read {
        what: "key",
        path: key_path.clone(),
        message: e.to_string(),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Identity {
        config: Arc::new(config),
        fingerprint: fingerprint(&leaf),
        channel_binding: channel_binding(&leaf),
        generated,
        cert_path,
    })
}

fn generate(cert_path: &Path, key_path: &Path, host_name: &str) -> Result<(), TlsError> {
    let (cert, key) = remote_proto::tls::self_signed(host_name).map_err(TlsError::Generate)?;
    // The key first, so a crash in between never leaves a certificate without its key.
    paths::write_private_atomic(key_path, key.as_bytes()).map_err(|source| TlsError::Write {
        path: key_path.to_path_buf(),
        source,
    })?;
    paths::write_private_atomic(cert_path, cert.as_bytes()).map_err(|source| TlsError::Write {
        path: cert_path.to_path_buf(),
        source,
    })?;
    Ok(())
}

pub use remote_proto::tls::fingerprint;

/// RFC 5929 `tls-server-end-point` channel-binding data: the certificate hashed with its
/// signature's hash function, SHA-256 when that is MD5, SHA-1 or unknown.
pub fn channel_binding(cert: &[u8]) -> Vec<u8> {
    let mut data = b"tls-server-end-point:".to_vec();
    match signature_hash(cert) {
        SigHash::Sha384 => data.extend_from_slice(&sha2::Sha384::digest(cert)),
        SigHash::Sha512 => data.extend_from_slice(&sha2::Sha512::digest(cert)),
        SigHash::Sha256 => data.extend_from_slice(&sha2::Sha256::digest(cert)),
    }
    data
}

#[derive(Debug, PartialEq, Eq)]
enum SigHash {
    Sha256,
    Sha384,
    Sha512,
}

/// The hash of the certificate's signatureAlgorithm (the second element of the outer
/// SEQUENCE), read with a minimal DER walk.
fn signature_hash(cert: &[u8]) -> SigHash {
    const SHA384: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    let oid = (|| {
        let (_, outer) = der_element(cert, 0x30)?;
        let (rest, _tbs) = der_element(outer, 0x30)?;
        let (_, alg) = der_element(rest, 0x30)?;
        der_element(alg, 0x06).map(|(_, oid)| oid)
    })();
    match oid {
        Some(o) if SHA384.contains(&o) => SigHash::Sha384,
        Some(o) if SHA512.contains(&o) => SigHash::Sha512,
        _ => SigHash::Sha256,
    }
}

/// One DER element with tag `tag` at the start of `data`: (what follows it, its content).
fn der_element(data: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *data.first()? != tag {
        return None;
    }
    let first = *data.get(1)?;
    let (len, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *data.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((data.get(end..)?, data.get(header..end)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_reloads_the_same_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_generate(dir.path(), None, None, "agent-host").unwrap();
        assert!(a.generated);
        let b = load_or_generate(dir.path(), None, None, "agent-host").unwrap();
        assert!(!b.generated);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert!(a.fingerprint.starts_with("SHA256:"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // rcgen signs with ECDSA P-256 / SHA-256: the binding hash is SHA-256 (32 bytes).
        assert_eq!(a.channel_binding.len(), "tls-server-end-point:".len() + 32);
    }

    #[test]
    fn bad_files_are_reported_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("c.pem");
        std::fs::write(&c, "not a certificate").unwrap();
        let err = load_or_generate(dir.path(), Some(&c), Some(&c), "h")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("c.pem"), "{err}");
    }

    #[test]
    fn der_walk_survives_garbage() {
        assert_eq!(signature_hash(&[]), SigHash::Sha256);
        assert_eq!(
            signature_hash(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            SigHash::Sha256
        );
        assert_eq!(signature_hash(&[0x30, 0x82]), SigHash::Sha256);
    }
}
