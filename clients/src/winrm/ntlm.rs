//! The NTLM client side (spec/winrm.md §5.2–§5.5) on the `sspi` crate: the NEGOTIATE and
//! AUTHENTICATE messages (raw NTLMSSP, sent under the HTTP scheme `Negotiate` as pywinrm
//! does), channel bindings for HTTPS, and sealing of SOAP bodies over HTTP. One context per
//! TCP connection: the RC4 states and sequence numbers run for the connection's lifetime.

use sspi::{
    AuthIdentity, AuthIdentityBuffers, BufferType, ClientRequestFlags, CredentialUse,
    DataRepresentation, EncryptionFlags, Ntlm, SecurityBuffer, SecurityBufferRef, SecurityStatus,
    Sspi, SspiImpl, Username,
};
use thiserror::Error;

/// Length of an NTLM message signature.
pub const SIGNATURE_LEN: usize = 16;

#[derive(Debug, Error)]
pub enum NtlmError {
    #[error(
        "user name '{user}' cannot be used for NTLM ({reason}): write user, DOMAIN\\user or user@domain"
    )]
    BadUser { user: String, reason: String },
    #[error(
        "NTLM {step} failed: {reason}; try again, and if it persists use winrms:// (HTTPS) with --auth basic"
    )]
    Failed { step: &'static str, reason: String },
}

fn failed(step: &'static str) -> impl FnOnce(sspi::Error) -> NtlmError {
    move |e| NtlmError::Failed {
        step,
        reason: e.to_string(),
    }
}

/// An NTLM client context.
pub struct NtlmClient {
    ntlm: Ntlm,
    credentials: Option<AuthIdentityBuffers>,
    target_name: String,
}

impl std::fmt::Debug for NtlmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NtlmClient")
            .field("target_name", &self.target_name)
            .finish_non_exhaustive()
    }
}

const FLAGS: ClientRequestFlags = ClientRequestFlags::MUTUAL_AUTH
    .union(ClientRequestFlags::INTEGRITY)
    .union(ClientRequestFlags::CONFIDENTIALITY);

impl NtlmClient {
    /// A context for `user` (`user`, `DOMAIN\user` or `user@domain`) with `password`, talking
    /// to `host` (service principal `HTTP/host`).
    pub fn new(user: &str, password: &str, host: &str) -> Result<NtlmClient, NtlmError> {
        let username = Username::parse(user).map_err(|e| NtlmError::BadUser {
            user: user.to_string(),
            reason: e.to_string(),
        })?;
        let identity = AuthIdentity {
            username,
            password: password.to_string().into(),
        };
        let mut ntlm = Ntlm::new();
        let credentials = ntlm
            .acquire_credentials_handle()
            .with_credential_use(CredentialUse::Outbound)
            .with_auth_data(&identity)
            .execute(&mut ntlm)
            .map_err(failed("credentials setup"))?
            .credentials_handle;
        Ok(NtlmClient {
            ntlm,
            credentials,
            target_name: format!("HTTP/{host}"),
        })
    }

    /// The NEGOTIATE message (leg 1).
    pub fn negotiate(&mut self) -> Result<Vec<u8>, NtlmError> {
        let mut output = vec![SecurityBuffer::new(Vec::new(), BufferType::Token)];
        let mut builder = self
            .ntlm
            .initialize_security_context()
            .with_credentials_handle(&mut self.credentials)
            .with_context_requirements(FLAGS)
            .with_target_data_representation(DataRepresentation::Native)
            .with_target_name(&self.target_name)
            .with_output(&mut output);
        self.ntlm
            .initialize_security_context_impl(&mut builder)
            .and_then(|mut g| g.resolve_to_result())
            .map_err(failed("negotiate"))?;
        Ok(std::mem::take(&mut output[0].buffer))
    }

    /// The AUTHENTICATE message (leg 2) for the server's CHALLENGE. `channel_bindings`: the
    /// application data of the TLS channel binding (`tls-server-end-point:` + hash), HTTPS only.
    pub fn authenticate(
        &mut self,
        challenge: &[u8],
        channel_bindings: Option<&[u8]>,
    ) -> Result<Vec<u8>, NtlmError> {
        let mut input = vec![SecurityBuffer::new(challenge.to_vec(), BufferType::Token)];
        if let Some(app) = channel_bindings {
            input.push(SecurityBuffer::new(
                sec_channel_bindings(app),
                BufferType::ChannelBindings,
            ));
        }
        let mut output = vec![SecurityBuffer::new(Vec::new(), BufferType::Token)];
        let mut builder = self
            .ntlm
            .initialize_security_context()
            .with_credentials_handle(&mut self.credentials)
            .with_context_requirements(FLAGS)
            .with_target_data_representation(DataRepresentation::Native)
            .with_target_name(&self.target_name)
            .with_input(&mut input)
            .with_output(&mut output);
        let result = self
            .ntlm
            .initialize_security_context_impl(&mut builder)
            .and_then(|mut g| g.resolve_to_result())
            .map_err(failed("authenticate"))?;
        if matches!(
            result.status,
            SecurityStatus::CompleteNeeded | SecurityStatus::CompleteAndContinue
        ) {
            self.ntlm
                .complete_auth_token(&mut output)
                .map_err(failed("authenticate"))?;
        }
        Ok(std::mem::take(&mut output[0].buffer))
    }

    /// Seal a message: its signature and the RC4 ciphertext (same length as `plain`).
    pub fn seal(&mut self, plain: &[u8]) -> Result<([u8; SIGNATURE_LEN], Vec<u8>), NtlmError> {
        let mut signature = [0u8; SIGNATURE_LEN];
        let mut data = plain.to_vec();
        let mut buffers = [
            SecurityBufferRef::token_buf(&mut signature),
            SecurityBufferRef::data_buf(&mut data),
        ];
        self.ntlm
            .encrypt_message(EncryptionFlags::empty(), &mut buffers)
            .map_err(failed("sealing"))?;
        Ok((signature, data))
    }

    /// Unseal a message from the server; fails when the signature does not verify.
    pub fn unseal(&mut self, signature: &[u8], sealed: &[u8]) -> Result<Vec<u8>, NtlmError> {
        if signature.len() != SIGNATURE_LEN {
            return Err(NtlmError::Failed {
                step: "unsealing",
                reason: format!(
                    "the signature is {} bytes, not {SIGNATURE_LEN}",
                    signature.len()
                ),
            });
        }
        let mut sig = signature.to_vec();
        let mut data = sealed.to_vec();
        let mut buffers = [
            SecurityBufferRef::token_buf(&mut sig),
            SecurityBufferRef::data_buf(&mut data),
        ];
        self.ntlm
            .decrypt_message(&mut buffers)
            .map_err(failed("unsealing"))?;
        let plain = buffers[1].data().to_vec();
        Ok(plain)
    }
}

/// A SEC_CHANNEL_BINDINGS structure with only application data (as Windows and pyspnego
/// build it for TLS channel binding): eight u32 fields, then the data at offset 32.
pub fn sec_channel_bindings(application_data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + application_data.len());
    // initiator type, length, offset; acceptor type, length, offset: all zero.
    out.extend_from_slice(&[0u8; 24]);
    out.extend_from_slice(&(application_data.len() as u32).to_le_bytes());
    out.extend_from_slice(&32u32.to_le_bytes());
    out.extend_from_slice(application_data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sspi::ServerRequestFlags;

    /// A full round trip against sspi's own acceptor: three legs, then sealed messages both
    /// ways, and a tampered one refused.
    #[test]
    fn round_trip_against_sspi_server() {
        let mut client = NtlmClient::new("alice", "s3cret", "127.0.0.1").unwrap();
        let mut server = Ntlm::new();
        let identity = AuthIdentity {
            username: Username::parse("alice").unwrap(),
            password: "s3cret".to_string().into(),
        };
        let mut creds = server
            .acquire_credentials_handle()
            .with_credential_use(CredentialUse::Inbound)
            .with_auth_data(&identity)
            .execute(&mut server)
            .unwrap()
            .credentials_handle;

        let negotiate = client.negotiate().unwrap();
        assert!(negotiate.starts_with(b"NTLMSSP\0"));

        let accept =
            |server: &mut Ntlm, token: Vec<u8>, creds: &mut Option<AuthIdentityBuffers>| {
                let mut input = vec![SecurityBuffer::new(token, BufferType::Token)];
                let mut output = vec![SecurityBuffer::new(Vec::new(), BufferType::Token)];
                let builder = server
                    .accept_security_context()
                    .with_credentials_handle(creds)
                    .with_context_requirements(ServerRequestFlags::empty())
                    .with_target_data_representation(DataRepresentation::Native)
                    .with_input(&mut input)
                    .with_output(&mut output);
                let status = server
                    .accept_security_context_impl(builder)
                    .unwrap()
                    .resolve_to_result()
                    .unwrap()
                    .status;
                (status, std::mem::take(&mut output[0].buffer))
            };
        let (status, challenge) = accept(&mut server, negotiate, &mut creds);
        assert_eq!(status, SecurityStatus::ContinueNeeded);
        let auth = client.authenticate(&challenge, None).unwrap();
        let (status, _) = accept(&mut server, auth, &mut creds);
        assert_eq!(status, SecurityStatus::CompleteNeeded);
        server.complete_auth_token(&mut []).unwrap();

        // client → server
        let (sig, sealed) = client.seal(b"<s:Envelope/>").unwrap();
        assert_ne!(sealed, b"<s:Envelope/>");
        let mut s = sig.to_vec();
        let mut d = sealed.clone();
        let mut bufs = [
            SecurityBufferRef::token_buf(&mut s),
            SecurityBufferRef::data_buf(&mut d),
        ];
        server.decrypt_message(&mut bufs).unwrap();
        assert_eq!(bufs[1].data(), b"<s:Envelope/>");

        // server → client, twice (sequence numbers advance)
        for text in [&b"reply one"[..], b"reply two"] {
            let mut sig = [0u8; 16];
            let mut data = text.to_vec();
            let mut bufs = [
                SecurityBufferRef::token_buf(&mut sig),
                SecurityBufferRef::data_buf(&mut data),
            ];
            server
                .encrypt_message(EncryptionFlags::empty(), &mut bufs)
                .unwrap();
            assert_eq!(client.unseal(&sig, &data).unwrap(), text);
        }

        // A tampered message does not verify.
        let mut sig = [0u8; 16];
        let mut data = b"reply three".to_vec();
        let mut bufs = [
            SecurityBufferRef::token_buf(&mut sig),
            SecurityBufferRef::data_buf(&mut data),
        ];
        server
            .encrypt_message(EncryptionFlags::empty(), &mut bufs)
            .unwrap();
        data[0] ^= 1;
        assert!(client.unseal(&sig, &data).is_err());
    }

    #[test]
    fn channel_bindings_layout() {
        let b = sec_channel_bindings(b"tls-server-end-point:abc");
        assert_eq!(b.len(), 32 + 24);
        assert_eq!(&b[24..28], &24u32.to_le_bytes());
        assert_eq!(&b[28..32], &32u32.to_le_bytes());
        assert!(sspi::channel_bindings::ChannelBindings::from_bytes(&b).is_ok());
    }
}
