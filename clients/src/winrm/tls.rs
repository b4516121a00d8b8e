//! TLS for `winrms://` targets (rustls on the ring provider), never without a check of the
//! server's certificate. Three ways to trust it:
//!
//! * `--ca FILE`: the certificate must chain to one of the PEM certificates in FILE and name
//!   the host (ordinary WebPKI verification);
//! * `--fingerprint SHA256:…`: the certificate must be exactly that one (the SHA-256 of its
//!   DER, as `remote-agent` prints it at start);
//! * otherwise, like a browser: a certificate that chains to one of the system's trusted
//!   roots (`SSL_CERT_FILE` / `SSL_CERT_DIR`, else the usual bundle; loaded once) and names
//!   the host is trusted, and nothing is recorded;
//! * failing that (a self-signed certificate such as the one remote-agent generates), like
//!   ssh's known_hosts, trust on first use, but only for hosts listed in
//!   `$XDG_CONFIG_HOME/remote/trusted_hosts` (as WinRM's TrustedHosts gates unverifiable
//!   servers): the first certificate seen for `host:port` is recorded in
//!   `$XDG_CONFIG_HOME/remote/winrm_known_hosts` (one `HOST:PORT SHA256:…` line each); later
//!   connections must present the same one, and a changed certificate is refused with the
//!   file and line to edit. An unlisted host's unverifiable certificate is refused before
//!   anything is sent, with its fingerprint to check and pin.
//!
//! With a pinned certificate the handshake signatures are still verified against its key, so
//! only the holder of that certificate's private key gets through. Also here: the TLS
//! channel binding (`tls-server-end-point`, RFC 5929) that NTLM carries over HTTPS.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot use --ca {path}: {reason}; give a PEM file with one or more CA certificates")]
    CaFile { path: PathBuf, reason: String },
    #[error(
        "--fingerprint {given}: not a SHA-256 fingerprint; write it as remote-agent prints it, SHA256:<43 base64 characters>"
    )]
    BadFingerprint { given: String },
    #[error(
        "TLS handshake with {addr} timed out after {secs} s: is that port remote-agent's HTTPS listener (remote-agent status; --winrm-https)?"
    )]
    Timeout { addr: String, secs: u64 },
    #[error(
        "TLS handshake with {addr} failed ({reason}): is that port an HTTPS listener (remote-agent's --winrm-https, default 5986)? For plain HTTP use winrm://"
    )]
    Handshake { addr: String, reason: String },
    #[error(
        "the certificate of {addr} is not trusted ({reason}) by the CA certificates in {ca}: check --ca, or pin the server's certificate with --fingerprint SHA256:… (remote-agent prints it when it starts)"
    )]
    Untrusted {
        addr: String,
        reason: String,
        ca: PathBuf,
    },
    #[error(
        "the certificate of {addr} is {seen}, not the pinned {expected}: check --fingerprint against what remote-agent printed at start (remote-agent status)"
    )]
    Mismatch {
        addr: String,
        seen: String,
        expected: String,
    },
    #[error(
        "the TLS certificate of {addr} has CHANGED: it is now {seen}, but {path}:{line} records {recorded}. \
         Someone may be intercepting the connection, or the agent got a new certificate (reinstalled, new state directory). \
         If you trust the new certificate (compare with the fingerprint remote-agent prints at start), delete line {line} of {path} and connect again"
    )]
    Changed {
        addr: String,
        seen: String,
        recorded: String,
        path: PathBuf,
        line: usize,
    },
    #[error(
        "the TLS certificate of {addr} ({seen}) is not signed by a CA this machine trusts, and {host} is not in {trusted_hosts}, \
         so it is not trusted on first contact and nothing was sent. Compare {seen} with the fingerprint the server printed at start \
         (remote-agent status; remote-relay's log), then pass --fingerprint {seen}, or add {host} to {trusted_hosts} to trust \
         its certificate on first contact"
    )]
    FirstContact {
        addr: String,
        host: String,
        seen: String,
        trusted_hosts: PathBuf,
    },
    #[error("cannot read {path}: {error}; fix its permissions, or move it away to start afresh")]
    StoreRead {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "cannot record the certificate of {addr} in {path}: {error}; make the directory writable (or set XDG_CONFIG_HOME), or pass --fingerprint"
    )]
    StoreWrite {
        addr: String,
        path: PathBuf,
        error: std::io::Error,
    },
}

pub use remote_proto::tls::{fingerprint, provider};

/// Normalise a fingerprint given on the command line (`SHA256:` prefix optional, padding
/// optional).
pub fn parse_fingerprint(given: &str) -> Result<String, TlsError> {
    remote_proto::tls::parse_fingerprint(given).ok_or_else(|| TlsError::BadFingerprint {
        given: given.to_string(),
    })
}

/// The system's trusted CA certificates, loaded on first need and kept for the process. A
/// missing or unreadable store only means none (logged at debug level).
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!("system CA certificates: {e}");
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!("system CA certificates: {added} loaded, {ignored} unusable");
            Arc::new(roots)
        })
        .clone()
}

/// WebPKI verification (chain to `roots`, host name, validity) on the ring provider; `None`
/// when there are no roots.
fn webpki_verifier(roots: Arc<RootCertStore>) -> Option<Arc<WebPkiServerVerifier>> {
    if roots.is_empty() {
        return None;
    }
    WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .inspect_err(|e| tracing::debug!("system CA certificates unusable: {e}"))
        .ok()
}

/// How server certificates are checked.
#[derive(Clone)]
pub enum Trust {
    Ca {
        roots: Arc<RootCertStore>,
        path: PathBuf,
    },
    Pinned(String),
    FirstUse(Arc<CertStore>),
}

impl Trust {
    /// From the command-line options: `--ca`, else `--fingerprint`, else trust on first use
    /// with the store at `store`, for the hosts listed in the file `trusted_hosts`.
    pub fn new(
        ca: Option<&Path>,
        fingerprint: Option<&str>,
        store: PathBuf,
        trusted_hosts: PathBuf,
    ) -> Result<Trust, TlsError> {
        if let Some(path) = ca {
            let err = |reason: String| TlsError::CaFile {
                path: path.to_path_buf(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| err(format!("not PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| err(format!("a certificate in it is unusable: {e}")))?;
            }
            if roots.is_empty() {
                return Err(err("it holds no CERTIFICATE block".into()));
            }
            return Ok(Trust::Ca {
                roots: Arc::new(roots),
                path: path.to_path_buf(),
            });
        }
        if let Some(fp) = fingerprint {
            return Ok(Trust::Pinned(parse_fingerprint(fp)?));
        }
        Ok(Trust::FirstUse(Arc::new(CertStore::new(
            store,
            trusted_hosts,
        ))))
    }

    /// The same trust, except that trust on first use records nothing
    /// ([`CertStore::read_only`]).
    pub fn without_recording(&self) -> Trust {
        match self {
            Trust::FirstUse(store) => Trust::FirstUse(Arc::new(CertStore::read_only(
                store.path().to_path_buf(),
                store.trusted_hosts.clone(),
            ))),
            other => other.clone(),
        }
    }

    /// Handshake over `tcp` with `host` (`addr` = host:port for messages). Returns the stream
    /// and the server's certificate (DER).
    pub async fn connect(
        &self,
        tcp: TcpStream,
        host: &str,
        addr: &str,
        timeout: Duration,
    ) -> Result<(TlsStream<TcpStream>, Vec<u8>), TlsError> {
        let system = matches!(self, Trust::FirstUse(_)).then(system_roots);
        self.connect_with(tcp, host, addr, timeout, system).await
    }

    /// [`Trust::connect`] with the system's roots given (first use only; `None` = no roots).
    async fn connect_with(
        &self,
        tcp: TcpStream,
        host: &str,
        addr: &str,
        timeout: Duration,
        system: Option<Arc<RootCertStore>>,
    ) -> Result<(TlsStream<TcpStream>, Vec<u8>), TlsError> {
        let handshake_err = |reason: String| TlsError::Handshake {
            addr: addr.to_string(),
            reason,
        };
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|e| handshake_err(format!("'{host}' is not a valid TLS server name: {e}")))?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| handshake_err(e.to_string()))?;
        let key = addr.to_ascii_lowercase();
        let (config, pin) = match self {
            Trust::Ca { roots, .. } => (
                builder
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth(),
                None,
            ),
            Trust::Pinned(fp) => {
                let v = Arc::new(PinVerifier::new(Some(fp.clone()), None));
                (
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(v.clone())
                        .with_no_client_auth(),
                    Some(v),
                )
            }
            Trust::FirstUse(store) => {
                let recorded = store.lookup(&key)?;
                let v = Arc::new(PinVerifier::new(
                    recorded.map(|(fp, _)| fp),
                    system.and_then(webpki_verifier),
                ));
                (
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(v.clone())
                        .with_no_client_auth(),
                    Some(v),
                )
            }
        };
        let connector = TlsConnector::from(Arc::new(config));
        let result = tokio::time::timeout(timeout, connector.connect(server_name, tcp)).await;
        let stream = match result {
            Err(_) => {
                return Err(TlsError::Timeout {
                    addr: addr.to_string(),
                    secs: timeout.as_secs().max(1),
                });
            }
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let seen = pin.as_ref().and_then(|p| p.seen());
                return Err(self.explain(addr, &key, &e, seen)?);
            }
        };
        let cert = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
            .ok_or_else(|| handshake_err("the server sent no certificate".into()))?;
        if let Trust::FirstUse(store) = self {
            let fp = fingerprint(&cert);
            if pin.as_ref().is_some_and(|p| p.by_system()) {
                tracing::debug!(
                    "{addr}: TLS certificate {fp} verified against the system's trusted roots"
                );
            } else if let Some((recorded, line)) = store.lookup(&key)? {
                // Recorded meanwhile by another connection's first contact (the verifier
                // was made before): this certificate must be that one too.
                if recorded != fp {
                    return Err(TlsError::Changed {
                        addr: addr.to_string(),
                        seen: fp,
                        recorded,
                        path: store.path().to_path_buf(),
                        line,
                    });
                }
            } else {
                // Nothing was sent yet: an unlisted host learns nothing of our credentials.
                if !store.may_trust_first(host, addr) {
                    return Err(TlsError::FirstContact {
                        addr: addr.to_string(),
                        host: host.to_string(),
                        seen: fp,
                        trusted_hosts: store.trusted_hosts.clone(),
                    });
                }
                if !store.records() {
                    return Ok((stream, cert));
                }
                store.record(&key, &fp, addr)?;
                crate::notice(&format!(
                    "first contact with {addr}: trusting its TLS certificate {fp} and recording it in {} \
                     (check it against what remote-agent printed at start; pin it with --fingerprint to be strict)",
                    store.path().display()
                ));
            }
        }
        Ok((stream, cert))
    }

    /// Turn a failed handshake into the error that says what to do.
    fn explain(
        &self,
        addr: &str,
        key: &str,
        e: &std::io::Error,
        seen: Option<String>,
    ) -> Result<TlsError, TlsError> {
        let reason = e
            .get_ref()
            .map(|inner| inner.to_string())
            .unwrap_or_else(|| e.to_string());
        let is_cert_error = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .is_some_and(|r| {
                matches!(
                    r,
                    rustls::Error::InvalidCertificate(_) | rustls::Error::General(_)
                )
            });
        Ok(match self {
            Trust::Ca { path, .. } if is_cert_error => TlsError::Untrusted {
                addr: addr.to_string(),
                reason,
                ca: path.clone(),
            },
            Trust::Pinned(expected) if seen.as_ref().is_some_and(|s| s != expected) => {
                TlsError::Mismatch {
                    addr: addr.to_string(),
                    seen: seen.unwrap_or_default(),
                    expected: expected.clone(),
                }
            }
            Trust::FirstUse(store) => match (store.lookup(key)?, seen) {
                (Some((recorded, line)), Some(seen)) if recorded != seen => TlsError::Changed {
                    addr: addr.to_string(),
                    seen,
                    recorded,
                    path: store.path().to_path_buf(),
                    line,
                },
                _ => TlsError::Handshake {
                    addr: addr.to_string(),
                    reason,
                },
            },
            _ => TlsError::Handshake {
                addr: addr.to_string(),
                reason,
            },
        })
    }
}

/// Accepts exactly one certificate (or, when `expected` is `None`, any: first use), and
/// verifies the handshake signatures with its key. With `system`, a certificate that passes
/// WebPKI verification against the system's roots is accepted first, whatever is pinned.
#[derive(Debug)]
struct PinVerifier {
    system: Option<Arc<WebPkiServerVerifier>>,
    /// The pin (`None`: first use), the fingerprint seen, and the handshake signatures.
    pinned: remote_proto::tls::PinnedCert,
    /// Whether `system` accepted the certificate (so it is not to be pinned).
    by_system: std::sync::atomic::AtomicBool,
}

impl PinVerifier {
    fn new(expected: Option<String>, system: Option<Arc<WebPkiServerVerifier>>) -> PinVerifier {
        PinVerifier {
            system,
            pinned: remote_proto::tls::PinnedCert::new(expected),
            by_system: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn seen(&self) -> Option<String> {
        self.pinned.seen()
    }

    fn by_system(&self) -> bool {
        self.by_system.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The pin's verdict (which also records the fingerprint seen) stands unless the
        // system's roots vouch for the certificate.
        let pinned = self.pinned.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let Some(system) = &self.system {
            match system.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                Ok(verified) => {
                    self.by_system
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    return Ok(verified);
                }
                Err(e) => tracing::debug!(
                    "certificate {} not trusted by the system's roots ({e}); checking the pinned certificates",
                    self.seen().unwrap_or_default()
                ),
            }
        }
        pinned
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.pinned.check_signature(false, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.pinned.check_signature(true, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.pinned.supported_verify_schemes()
    }
}

/// The recorded certificate fingerprints (`winrm_known_hosts`), read once per process.
pub struct CertStore {
    path: PathBuf,
    state: Mutex<Option<StoreState>>,
    /// First contacts are recorded (false: [`CertStore::read_only`]).
    record: bool,
    /// The hosts whose certificate may be trusted on first contact (`trusted_hosts`).
    trusted_hosts: PathBuf,
}

struct StoreState {
    /// (line number, host:port in lower case, fingerprint)
    entries: Vec<(usize, String, String)>,
    lines: usize,
}

const STORE_HEADER: &str = "# remote: TLS certificates of servers (winrms:// agents, relays), trusted on first use.\n\
# One line each: HOST:PORT SHA256:<base64 SHA-256 of the certificate>. Delete a line to trust a new certificate.\n";

impl CertStore {
    /// The store at `path`; first contacts only with hosts listed in `trusted_hosts`.
    pub fn new(path: PathBuf, trusted_hosts: PathBuf) -> CertStore {
        CertStore {
            path,
            state: Mutex::new(None),
            record: true,
            trusted_hosts,
        }
    }

    /// The same lookups, but a first contact is not recorded (`remote test`: a diagnosis
    /// changes no trust); [`Trust::connect`] then accepts the certificate for that
    /// connection only, silently.
    pub fn read_only(path: PathBuf, trusted_hosts: PathBuf) -> CertStore {
        CertStore {
            record: false,
            ..CertStore::new(path, trusted_hosts)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The trusted-hosts file that gates first contacts.
    pub fn trusted_hosts(&self) -> &Path {
        &self.trusted_hosts
    }

    /// Whether an unrecorded certificate of `host` (reached at `addr`, host:port) may be
    /// trusted on first contact: the host is listed in the trusted-hosts file.
    pub fn may_trust_first(&self, host: &str, addr: &str) -> bool {
        let port = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(0);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        crate::config::is_trusted_host(&self.trusted_hosts, host, port)
    }

    /// Whether first contacts are recorded.
    pub fn records(&self) -> bool {
        self.record
    }

    fn with_state<T>(
        &self,
        f: impl FnOnce(&mut StoreState) -> Result<T, TlsError>,
    ) -> Result<T, TlsError> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(load_store(&self.path)?);
        }
        let state = guard.get_or_insert_with(|| StoreState {
            entries: Vec::new(),
            lines: 0,
        });
        f(state)
    }

    /// The recorded fingerprint for `key` (host:port, lower case) and its line.
    pub fn lookup(&self, key: &str) -> Result<Option<(String, usize)>, TlsError> {
        self.with_state(|s| {
            Ok(s.entries
                .iter()
                .find(|(_, k, _)| k == key)
                .map(|(line, _, fp)| (fp.clone(), *line)))
        })
    }

    /// Append `key fingerprint`; returns its line number. If `key` was recorded meanwhile
    /// (another connection's first contact), nothing is written and that record must match:
    /// otherwise the certificate has changed.
    pub fn record(&self, key: &str, fp: &str, addr: &str) -> Result<usize, TlsError> {
        let path = self.path.clone();
        self.with_state(|s| {
            if let Some((line, _, recorded)) = s.entries.iter().find(|(_, k, _)| k == key) {
                if recorded != fp {
                    return Err(TlsError::Changed {
                        addr: addr.to_string(),
                        seen: fp.to_string(),
                        recorded: recorded.clone(),
                        path: path.clone(),
                        line: *line,
                    });
                }
                return Ok(*line);
            }
            let err = |error| TlsError::StoreWrite {
                addr: addr.to_string(),
                path: path.clone(),
                error,
            };
            if let Some(dir) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(err)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(err)?;
            let mut text = String::new();
            let empty = f.metadata().map(|m| m.len() == 0).unwrap_or(false);
            if empty {
                text.push_str(STORE_HEADER);
                s.lines = STORE_HEADER.lines().count();
            }
            text.push_str(&format!("{key} {fp}\n"));
            f.write_all(text.as_bytes()).map_err(err)?;
            s.lines += 1;
            s.entries.push((s.lines, key.to_string(), fp.to_string()));
            Ok(s.lines)
        })
    }
}

fn load_store(path: &Path) -> Result<StoreState, TlsError> {
    let text = match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => {
            return Err(TlsError::StoreRead {
                path: path.to_path_buf(),
                error,
            });
        }
    };
    let mut entries = Vec::new();
    let mut lines = 0;
    for (i, line) in text.lines().enumerate() {
        lines = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        if let (Some(key), Some(fp)) = (fields.next(), fields.next())
            && let Ok(fp) = parse_fingerprint(fp)
        {
            entries.push((i + 1, key.to_ascii_lowercase(), fp));
        } else {
            tracing::debug!("{}:{}: unreadable line skipped", path.display(), i + 1);
        }
    }
    Ok(StoreState { entries, lines })
}

/// The TLS channel binding application data (RFC 5929 `tls-server-end-point`):
/// `tls-server-end-point:` + hash of the certificate, the hash being the certificate's own
/// signature hash, or SHA-256 for MD5, SHA-1 and anything unrecognised.
pub fn channel_binding(cert_der: &[u8]) -> Vec<u8> {
    let alg = match signature_hash(cert_der) {
        Hash::Sha384 => &ring::digest::SHA384,
        Hash::Sha512 => &ring::digest::SHA512,
        Hash::Sha256 => &ring::digest::SHA256,
    };
    let mut out = b"tls-server-end-point:".to_vec();
    out.extend_from_slice(ring::digest::digest(alg, cert_der).as_ref());
    out
}

#[derive(Debug, PartialEq, Eq)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

/// One DER TLV: (tag, content, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;

fn signature_hash(cert: &[u8]) -> Hash {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    let parse = || -> Option<Hash> {
        let (tag, cert, _) = tlv(cert)?;
        (tag == SEQUENCE).then_some(())?;
        let (_, _tbs, rest) = tlv(cert)?;
        let (tag, alg, _) = tlv(rest)?;
        (tag == SEQUENCE).then_some(())?;
        let (tag, oid, params) = tlv(alg)?;
        (tag == OID).then_some(())?;
        const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
        const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
        const SHA384: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02];
        const SHA512: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03];
        Some(match oid {
            [r @ .., 0x0c] if r == RSA => Hash::Sha384,
            [r @ .., 0x0d] if r == RSA => Hash::Sha512,
            [e @ .., 0x03] if e == ECDSA => Hash::Sha384,
            [e @ .., 0x04] if e == ECDSA => Hash::Sha512,
            // RSASSA-PSS: the hash is in the parameters.
            [r @ .., 0x0a] if r == RSA => {
                if params.windows(SHA384.len()).any(|w| w == SHA384) {
                    Hash::Sha384
                } else if params.windows(SHA512.len()).any(|w| w == SHA512) {
                    Hash::Sha512
                } else {
                    Hash::Sha256
                }
            }
            _ => Hash::Sha256,
        })
    };
    parse().unwrap_or(Hash::Sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for localhost, like remote-agent's, and its key.
    fn self_signed_localhost() -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert, key)
    }

    /// Trust on first use with the store at `store`, for `hosts` (a trusted-hosts file in
    /// `dir`).
    fn first_use(store: &Path, dir: &Path, hosts: &str) -> Trust {
        Trust::new(None, None, store.to_path_buf(), trusted(dir, hosts)).unwrap()
    }

    /// A trusted-hosts file in `dir` listing `hosts`.
    fn trusted(dir: &Path, hosts: &str) -> PathBuf {
        let path = dir.join("trusted_hosts");
        std::fs::write(&path, hosts).unwrap();
        path
    }

    #[test]
    fn fingerprints_are_normalised() {
        let fp = fingerprint(b"cert");
        assert!(fp.starts_with("SHA256:") && !fp.ends_with('='));
        assert_eq!(fp.len(), 7 + 43);
        assert_eq!(parse_fingerprint(&fp).unwrap(), fp);
        assert_eq!(parse_fingerprint(&fp[7..]).unwrap(), fp);
        assert_eq!(
            parse_fingerprint(&format!("sha256:{}=", &fp[7..])).unwrap(),
            fp
        );
        assert!(parse_fingerprint("SHA256:abc").is_err());
        assert!(parse_fingerprint("").is_err());
    }

    #[test]
    fn store_records_and_finds_with_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/winrm_known_hosts");
        let store = CertStore::new(path.clone(), PathBuf::new());
        assert_eq!(store.lookup("h:5986").unwrap(), None);
        let a = fingerprint(b"a");
        let b = fingerprint(b"b");
        let line = store.record("h:5986", &a, "h:5986").unwrap();
        assert_eq!(line, 3, "after the two header lines");
        store.record("[::1]:5986", &b, "[::1]:5986").unwrap();
        assert_eq!(store.lookup("h:5986").unwrap(), Some((a.clone(), 3)));
        // A fresh reader sees the same, skipping junk.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("junk\nx:1 SHA256:bad\n");
        std::fs::write(&path, text).unwrap();
        let again = CertStore::new(path.clone(), PathBuf::new());
        assert_eq!(again.lookup("[::1]:5986").unwrap(), Some((b.clone(), 4)));
        assert_eq!(again.lookup("x:1").unwrap(), None);
        let line = again.record("y:2", &a, "y:2").unwrap();
        assert_eq!(line, 7);
        // Recorded twice at once (two first contacts): the same certificate is the same
        // line; another one is a changed certificate, and nothing more is written.
        assert_eq!(again.record("y:2", &a, "y:2").unwrap(), 7);
        assert!(matches!(
            again.record("y:2", &b, "y:2"),
            Err(TlsError::Changed { line: 7, .. })
        ));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().lines().nth(6),
            Some(format!("y:2 {a}").as_str())
        );
    }

    #[test]
    fn channel_binding_uses_the_signature_hash() {
        // Minimal certificate shapes: SEQUENCE { SEQUENCE{} , SEQUENCE { OID }, BIT STRING }.
        fn cert(oid: &[u8]) -> Vec<u8> {
            let mut alg = vec![0x06, oid.len() as u8];
            alg.extend_from_slice(oid);
            let mut inner = vec![0x30, 0x00, 0x30, alg.len() as u8];
            inner.extend_from_slice(&alg);
            inner.extend_from_slice(&[0x03, 0x01, 0x00]);
            let mut out = vec![0x30, inner.len() as u8];
            out.extend_from_slice(&inner);
            out
        }
        let sha256_rsa = cert(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b]);
        let sha384_ec = cert(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03]);
        let sha1_rsa = cert(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05]);
        assert_eq!(signature_hash(&sha256_rsa), Hash::Sha256);
        assert_eq!(signature_hash(&sha384_ec), Hash::Sha384);
        assert_eq!(signature_hash(&sha1_rsa), Hash::Sha256);
        assert_eq!(signature_hash(b"garbage"), Hash::Sha256);
        let cb = channel_binding(&sha384_ec);
        assert!(cb.starts_with(b"tls-server-end-point:"));
        assert_eq!(cb.len(), 21 + 48);
        assert_eq!(channel_binding(&sha256_rsa).len(), 21 + 32);
    }

    /// A TLS server on 127.0.0.1 presenting `chain` (leaf first), for any number of handshakes.
    async fn tls_server(
        chain: Vec<CertificateDer<'static>>,
        key: &rcgen::KeyPair,
    ) -> std::net::SocketAddr {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        use tokio::io::AsyncReadExt;
                        let _ = tls.read(&mut [0u8; 1]).await;
                    }
                });
            }
        });
        addr
    }

    async fn connect(
        trust: &Trust,
        server: std::net::SocketAddr,
        host: &str,
        system: Option<Arc<RootCertStore>>,
    ) -> Result<Vec<u8>, TlsError> {
        let tcp = TcpStream::connect(server).await.unwrap();
        let addr = format!("{host}:{}", server.port());
        trust
            .connect_with(tcp, host, &addr, Duration::from_secs(10), system)
            .await
            .map(|(_, cert)| cert)
    }

    #[tokio::test]
    async fn system_roots_first_then_trust_on_first_use() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        // A CA in the "system" store, and a leaf for localhost that it issued.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let roots = Arc::new(roots);
        let issued = tls_server(vec![leaf.der().clone(), ca_cert.der().clone()], &leaf_key).await;

        // A self-signed certificate for localhost, like remote-agent's.
        let (own, own_key) = self_signed_localhost();
        let own_fp = fingerprint(own.der());
        let self_signed = tls_server(vec![own.der().clone()], &own_key).await;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("winrm_known_hosts");
        let trust = first_use(&path, dir.path(), "localhost 127.0.0.1");
        let key = |server: std::net::SocketAddr| format!("localhost:{}", server.port());

        // Chains to a system root and names the host: trusted, nothing pinned.
        let cert = connect(&trust, issued, "localhost", Some(roots.clone()))
            .await
            .unwrap();
        assert_eq!(cert, leaf.der().as_ref());
        assert!(
            !path.exists(),
            "nothing recorded for a CA-issued certificate"
        );

        // Self-signed: falls back to trust on first use, recorded, then held to it.
        let cert = connect(&trust, self_signed, "localhost", Some(roots.clone()))
            .await
            .unwrap();
        assert_eq!(cert, own.der().as_ref());
        let recorded = CertStore::new(path.clone(), PathBuf::new());
        assert_eq!(
            recorded.lookup(&key(self_signed)).unwrap(),
            Some((own_fp.clone(), 3))
        );
        assert_eq!(recorded.lookup(&key(issued)).unwrap(), None);
        connect(&trust, self_signed, "localhost", Some(roots.clone()))
            .await
            .unwrap();

        // A CA-issued certificate that does not name the host (an IP address here) is not
        // trusted on the system's roots: it is pinned like any other.
        let by_ip = connect(&trust, issued, "127.0.0.1", Some(roots.clone()))
            .await
            .unwrap();
        assert_eq!(by_ip, leaf.der().as_ref());
        let again = CertStore::new(path.clone(), PathBuf::new());
        let ip_key = format!("127.0.0.1:{}", issued.port());
        assert_eq!(
            again.lookup(&ip_key).unwrap(),
            Some((fingerprint(leaf.der()), 4))
        );

        // Without system roots the CA-issued certificate is pinned too, and a certificate
        // other than the pinned one is refused as changed, whatever the system trusts.
        let other = tempfile::tempdir().unwrap();
        let other_path = other.path().join("winrm_known_hosts");
        let strict = first_use(&other_path, other.path(), "localhost");
        connect(&strict, self_signed, "localhost", None)
            .await
            .unwrap();
        connect(&strict, issued, "localhost", None).await.unwrap();
        let pinned = CertStore::new(other_path.clone(), PathBuf::new());
        assert_eq!(
            pinned.lookup(&key(issued)).unwrap(),
            Some((fingerprint(leaf.der()), 4))
        );
        // The issued server's host:port pinned to another certificate: refused as changed
        // without system roots, accepted on them.
        std::fs::write(&other_path, format!("{} {own_fp}\n", key(issued))).unwrap();
        let strict = first_use(&other_path, other.path(), "localhost");
        let err = connect(&strict, issued, "localhost", None)
            .await
            .unwrap_err();
        assert!(matches!(err, TlsError::Changed { .. }), "{err}");
        connect(&strict, issued, "localhost", Some(roots.clone()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn without_recording_checks_pins_but_writes_nothing() {
        let (cert, key) = self_signed_localhost();
        let server = tls_server(vec![cert.der().clone()], &key).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("winrm_known_hosts");
        let trust = first_use(&path, dir.path(), "localhost 127.0.0.1").without_recording();
        // First contact: accepted for this connection, nothing written.
        connect(&trust, server, "localhost", None).await.unwrap();
        assert!(!path.exists());
        // A recorded other certificate is still refused as changed.
        std::fs::write(
            &path,
            format!("localhost:{} SHA256:{}\n", server.port(), "A".repeat(43)),
        )
        .unwrap();
        let trust = first_use(&path, dir.path(), "localhost 127.0.0.1").without_recording();
        let err = connect(&trust, server, "localhost", None)
            .await
            .unwrap_err();
        assert!(matches!(err, TlsError::Changed { line: 1, .. }), "{err}");
    }

    #[tokio::test]
    async fn first_contact_only_with_a_trusted_host() {
        let (cert, key) = self_signed_localhost();
        let fp = fingerprint(cert.der());
        let server = tls_server(vec![cert.der().clone()], &key).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("winrm_known_hosts");

        // Not listed (no file, or other hosts): refused with the fingerprint, nothing recorded.
        for list in [None, Some("db *.lab.example 127.0.0.1")] {
            let gate = match list {
                Some(hosts) => trusted(dir.path(), hosts),
                None => dir.path().join("missing"),
            };
            let trust = Trust::new(None, None, path.clone(), gate.clone()).unwrap();
            let err = connect(&trust, server, "localhost", None)
                .await
                .unwrap_err();
            match &err {
                TlsError::FirstContact {
                    host,
                    seen,
                    trusted_hosts,
                    ..
                } => {
                    assert_eq!(host, "localhost");
                    assert_eq!(seen, &fp);
                    assert_eq!(trusted_hosts, &gate);
                }
                other => panic!("{other}"),
            }
            let text = err.to_string();
            assert!(text.contains(&format!("--fingerprint {fp}")), "{text}");
            assert!(!path.exists(), "nothing recorded");
            // remote test's read-only trust says the same.
            let err = connect(&trust.without_recording(), server, "localhost", None)
                .await
                .unwrap_err();
            assert!(matches!(err, TlsError::FirstContact { .. }), "{err}");
        }

        // Pinned with --fingerprint: no list needed.
        let pinned = Trust::new(None, Some(&fp), path.clone(), PathBuf::new()).unwrap();
        connect(&pinned, server, "localhost", None).await.unwrap();

        // Listed (by a wildcard, with the port): trusted and recorded.
        let gate = trusted(dir.path(), &format!("# lab\nlocal*:{}\n", server.port()));
        let trust = Trust::new(None, None, path.clone(), gate).unwrap();
        connect(&trust, server, "localhost", None).await.unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains(&fp));

        // Once recorded, the certificate is held to, listed or not.
        let unlisted = Trust::new(None, None, path.clone(), dir.path().join("missing")).unwrap();
        connect(&unlisted, server, "localhost", None).await.unwrap();
    }

    #[test]
    fn system_roots_load_without_failing() {
        // Whatever this machine has (possibly nothing): loaded once, never an error.
        let a = system_roots();
        let b = system_roots();
        assert!(Arc::ptr_eq(&a, &b));
    }
}
