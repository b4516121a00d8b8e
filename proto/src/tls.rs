//! TLS pieces the agent, the relay and the clients share (on rustls' ring provider): the
//! self-signed certificate a server makes on first start, the `SHA256:<base64>` fingerprint
//! people compare and pin (the form of SSH host keys), and a certificate verifier that
//! accepts exactly one pinned certificate, or on first contact any certificate, remembering
//! which, so that the caller can pin it from then on.

use std::sync::{Arc, Mutex};

use base64::Engine;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::Digest;

/// The ring crypto provider every TLS config of the project uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `SHA256:<base64 without padding>` of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(der))
    )
}

/// Normalise a fingerprint given by a person: `SHA256:` prefix and base64 padding optional.
/// `None` when it is not a SHA-256 fingerprint.
pub fn parse_fingerprint(given: &str) -> Option<String> {
    let t = given.trim();
    let b64 = match t.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("sha256:") => &t[7..],
        _ => t,
    }
    .trim_end_matches('=');
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(b64)
        .ok()?;
    (bytes.len() == 32).then(|| {
        format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
        )
    })
}

/// A self-signed ECDSA P-256 certificate for `host_name` (and localhost, 127.0.0.1, ::1),
/// valid 2025–2035: `(certificate PEM, private key PEM)`.
pub fn self_signed(host_name: &str) -> Result<(String, String), String> {
    let mut names = vec![host_name.to_string(), "localhost".to_string()];
    names.dedup();
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| e.to_string())?;
    for ip in ["127.0.0.1", "::1"] {
        if let Ok(addr) = ip.parse() {
            params
                .subject_alt_names
                .push(rcgen::SanType::IpAddress(addr));
        }
    }
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, host_name);
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2035, 1, 1);
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Accepts the server certificate whose fingerprint is `expected`; with none expected
/// (first contact), any certificate. Either way the handshake signatures are checked
/// against the certificate's key, so only the holder of its private key gets through, and
/// the fingerprint seen is kept for [`PinnedCert::seen`].
#[derive(Debug)]
pub struct PinnedCert {
    expected: Option<String>,
    seen: Mutex<Option<String>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedCert {
    pub fn new(expected: Option<String>) -> PinnedCert {
        PinnedCert {
            expected,
            seen: Mutex::new(None),
            algorithms: provider().signature_verification_algorithms,
        }
    }

    /// The fingerprint of the certificate the server presented, once it did.
    pub fn seen(&self) -> Option<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A client config that trusts only this verifier.
    pub fn client_config(self: &Arc<Self>) -> Result<rustls::ClientConfig, rustls::Error> {
        Ok(rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth())
    }

    /// Check a handshake signature (TLS 1.2 when `tls13` is false).
    pub fn check_signature(
        &self,
        tls13: bool,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if tls13 {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        } else {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity.as_ref());
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp.clone());
        match &self.expected {
            Some(expected) if *expected != fp => Err(rustls::Error::General(format!(
                "certificate {fp} is not the expected {expected}"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check_signature(false, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check_signature(true, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A gRPC channel to `addr` (`host:port`, for the URI only) over the streams `connect`
/// makes (TCP plus TLS, each caller with its own trust rules), with HTTP/2 keepalives that
/// notice a dead peer within a minute. Connects once before returning.
pub async fn grpc_channel<F, Fut, S>(
    addr: &str,
    connect: F,
) -> Result<tonic::transport::Channel, tonic::transport::Error>
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = std::io::Result<S>> + Send + 'static,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let connect = connect.clone();
        async move { connect().await.map(hyper_util::rt::TokioIo::new) }
    });
    endpoint.connect_with_connector(connector).await
}

/// The innermost cause of an error: what a person needs from a transport error chain.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_normalise() {
        let fp = fingerprint(b"certificate");
        assert!(fp.starts_with("SHA256:"));
        assert_eq!(parse_fingerprint(&fp).as_deref(), Some(fp.as_str()));
        let bare = fp.trim_start_matches("SHA256:");
        assert_eq!(
            parse_fingerprint(&format!("{bare}=")).as_deref(),
            Some(fp.as_str())
        );
        assert_eq!(parse_fingerprint("SHA256:short"), None);
        assert_eq!(parse_fingerprint(""), None);
    }

    #[test]
    fn self_signed_makes_a_certificate_and_key() {
        let (cert, key) = self_signed("relay.example").expect("generate");
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(key.contains("PRIVATE KEY"));
    }
}
