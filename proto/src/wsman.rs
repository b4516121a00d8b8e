//! What the WinRM server (agent) and client share: the WS-Management names both speak
//! (namespaces, actions, the cmd shell's resource and signal URIs, the fault codes clients
//! act on), and message-encryption framing (MS-WSMV 2.2.9.1 as pywinrm and pypsrp implement
//! it; ../shared/spec/winrm.md §5.3): the `multipart/encrypted` Content-Type and the body that
//! carries one sealed SOAP message (`u32 LE sigLen ‖ signature ‖ sealed bytes`). Pure
//! constants and functions; no I/O, no cryptography.

// ---------------------------------------------------------------------------------------
// WS-Management names both sides use (spec §2.1, §2.4, §3.5, §4)

/// SOAP 1.2 envelope namespace.
pub const NS_SOAP: &str = "http://www.w3.org/2003/05/soap-envelope";
/// WS-Addressing (2004/08) namespace.
pub const NS_ADDRESSING: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing";
/// DMTF WS-Management namespace.
pub const NS_WSMAN: &str = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd";
/// Microsoft WS-Management extensions namespace (`p:`/`wsmv:`).
pub const NS_MS_WSMAN: &str = "http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd";
/// WS-Transfer namespace.
pub const NS_TRANSFER: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer";
/// Windows remote shell namespace (`rsp:`), also the prefix of shell Action URIs.
pub const NS_SHELL: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell";
/// WSManFault detail namespace.
pub const NS_WSMAN_FAULT: &str = "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault";
/// Namespace of the `MSFT_WmiError` element in quota faults (§3.7).
pub const NS_WMI_ERROR: &str = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/MSFT_WmiError";

/// Action URI: Create (WS-Transfer).
pub const ACTION_CREATE: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create";
/// Action URI: Delete (WS-Transfer).
pub const ACTION_DELETE: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete";
/// Action URI: Command.
pub const ACTION_COMMAND: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Command";
/// Action URI: Send.
pub const ACTION_SEND: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Send";
/// Action URI: Receive.
pub const ACTION_RECEIVE: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Receive";
/// Action URI: Signal.
pub const ACTION_SIGNAL: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Signal";
/// Action URI of every fault response.
pub const ACTION_FAULT: &str = "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault";
/// Resource URI of the cmd shell.
pub const RESOURCE_CMD: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd";
/// The anonymous WS-Addressing address (`a:ReplyTo`, and `a:To` of every response).
pub const ANONYMOUS: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous";
/// Signal code: end the command (pywinrm's cleanup_command).
pub const SIGNAL_TERMINATE: &str =
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/terminate";
/// Signal code: interrupt the command.
pub const SIGNAL_CTRL_C: &str =
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/ctrl_c";

/// WSManFault code: operation timed out (0x80338029); clients re-issue the Receive.
pub const CODE_TIMED_OUT: u64 = 2_150_858_793;
/// WSManFault code: shell not found / invalid selectors (0x8033805B).
pub const CODE_INVALID_SELECTORS: u64 = 2_150_858_843;
/// WSManFault code: invalid parameter (e.g. unknown CommandId).
pub const CODE_INVALID_PARAMETER: u64 = 2_150_858_810;

// ---------------------------------------------------------------------------------------
// Message encryption framing (spec §5.3)

/// The protocol string of NTLM/Kerberos (SPNEGO) session encryption.
pub const SPNEGO_ENCRYPTED: &str = "application/HTTP-SPNEGO-session-encrypted";

/// The MIME boundary every client and Windows use.
pub const BOUNDARY: &str = "Encrypted Boundary";

/// Largest signature (`sigLen`) accepted: 16 for NTLM, a GSS wrap-token header for Kerberos.
pub const MAX_SIGNATURE_LEN: usize = 64;

/// Why an encrypted body could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("encrypted body does not start with the \"--{BOUNDARY}\" line")]
    NoOpeningBoundary,
    #[error("encrypted body ends inside the MIME headers (no second \"--{BOUNDARY}\" line)")]
    TruncatedHeaders,
    #[error("encrypted body has no Content-Type header in its first part (the protocol)")]
    NoProtocol,
    #[error("encrypted body has no OriginalContent header with a Length")]
    NoOriginalLength,
    #[error(
        "encrypted body's OriginalContent Length is not a number no larger than the body: {0:?}"
    )]
    BadOriginalLength(String),
    #[error("encrypted body's second part is not application/octet-stream (first line: {0:?})")]
    NotOctetStream(String),
    #[error("encrypted body ends before the 4-byte signature length")]
    NoSignatureLength,
    #[error("encrypted body's signature length {0} exceeds {MAX_SIGNATURE_LEN}")]
    SignatureTooLong(usize),
    #[error(
        "encrypted body ends inside the signature or the sealed payload ({needed} bytes announced, {available} present)"
    )]
    Truncated { needed: usize, available: usize },
    #[error("encrypted body does not end with \"--{BOUNDARY}--\" right after the sealed payload")]
    NoClosingBoundary,
    #[error("encrypted body's MIME headers are not UTF-8 text")]
    NotText,
}

/// The `Content-Type` of an encrypted request or response body.
pub fn encrypted_content_type(protocol: &str) -> String {
    format!("multipart/encrypted;protocol=\"{protocol}\";boundary=\"{BOUNDARY}\"")
}

/// If `content_type` is `multipart/encrypted`, its `protocol` parameter (parsed loosely: any
/// case, spaces, with or without quotes). `None` for any other type or without the parameter.
pub fn encrypted_protocol(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    let media = parts.next()?.trim();
    if !media.eq_ignore_ascii_case("multipart/encrypted") {
        return None;
    }
    parts.find_map(|p| param(p, "protocol"))
}

/// The value of `name=value` (name case-insensitive, value unquoted), if `p` is that parameter.
fn param(p: &str, name: &str) -> Option<String> {
    let (k, v) = p.split_once('=')?;
    if !k.trim().eq_ignore_ascii_case(name) {
        return None;
    }
    let v = v.trim();
    let v = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v);
    Some(v.trim().to_string())
}

/// One parsed encrypted body; the slices borrow from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedPart<'a> {
    /// The first part's Content-Type, e.g. [`SPNEGO_ENCRYPTED`].
    pub protocol: &'a str,
    /// `Length=N` of `OriginalContent`: the plaintext length (and, for NTLM, the sealed length).
    pub original_length: usize,
    pub signature: &'a [u8],
    pub sealed: &'a [u8],
}

/// A cursor over the text lines at the start of the body.
struct Lines<'a> {
    body: &'a [u8],
    pos: usize,
}

impl<'a> Lines<'a> {
    /// The next line without its line end (CRLF or LF), or `None` at the end of the body.
    fn next_line(&mut self) -> Option<&'a [u8]> {
        let rest = self.body.get(self.pos..)?;
        if rest.is_empty() {
            return None;
        }
        let end = rest.iter().position(|&b| b == b'\n')?;
        self.pos += end + 1;
        let line = rest.get(..end)?;
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    }
}

fn is_boundary(line: &[u8]) -> bool {
    let line = line.trim_ascii();
    line.strip_prefix(b"--")
        .is_some_and(|b| b == BOUNDARY.as_bytes())
}

/// Parse one encrypted body by lengths: the headers as text, then `u32 LE sigLen`, `sigLen`
/// signature bytes, `N` sealed bytes (`N` from `OriginalContent: …;Length=N`) and the closing
/// boundary, with or without a CRLF before it.
pub fn parse_encrypted(body: &[u8]) -> Result<EncryptedPart<'_>, FramingError> {
    let mut lines = Lines { body, pos: 0 };
    // Skip leading blank lines, then the opening boundary.
    loop {
        match lines.next_line() {
            Some(l) if l.trim_ascii().is_empty() => continue,
            Some(l) if is_boundary(l) => break,
            _ => return Err(FramingError::NoOpeningBoundary),
        }
    }
    let mut protocol = None;
    let mut length = None;
    loop {
        let line = lines.next_line().ok_or(FramingError::TruncatedHeaders)?;
        if is_boundary(line) {
            break;
        }
        let text = std::str::from_utf8(line).map_err(|_| FramingError::NotText)?;
        let Some((name, value)) = text.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("Content-Type") {
            protocol = Some(value.trim());
        } else if name.eq_ignore_ascii_case("OriginalContent") {
            length = value.split(';').find_map(|p| param(p, "length"));
        }
    }
    let protocol = protocol
        .filter(|p| !p.is_empty())
        .ok_or(FramingError::NoProtocol)?;
    let length = length.ok_or(FramingError::NoOriginalLength)?;
    let original_length = match length.parse::<usize>() {
        Ok(n)
            if !length.is_empty()
                && length.bytes().all(|b| b.is_ascii_digit())
                && n <= body.len() =>
        {
            n
        }
        _ => {
            return Err(FramingError::BadOriginalLength(
                length.chars().take(32).collect(),
            ));
        }
    };
    // Second part: exactly one header line, then the binary payload.
    let line = lines.next_line().ok_or(FramingError::TruncatedHeaders)?;
    let text = String::from_utf8_lossy(line);
    let octet = text.split_once(':').is_some_and(|(n, v)| {
        n.trim().eq_ignore_ascii_case("Content-Type")
            && v.trim()
                .to_ascii_lowercase()
                .starts_with("application/octet-stream")
    });
    if !octet {
        return Err(FramingError::NotOctetStream(
            text.chars().take(64).collect(),
        ));
    }
    let bin = body.get(lines.pos..).unwrap_or_default();
    let sig_len_bytes: [u8; 4] = bin
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(FramingError::NoSignatureLength)?;
    let sig_len = u32::from_le_bytes(sig_len_bytes) as usize;
    if sig_len > MAX_SIGNATURE_LEN {
        return Err(FramingError::SignatureTooLong(sig_len));
    }
    let rest = bin.get(4..).unwrap_or_default();
    let needed = sig_len + original_length;
    let (signature, sealed) = match (rest.get(..sig_len), rest.get(sig_len..needed)) {
        (Some(s), Some(p)) => (s, p),
        _ => {
            return Err(FramingError::Truncated {
                needed,
                available: rest.len(),
            });
        }
    };
    let tail = rest.get(needed..).unwrap_or_default();
    let tail = tail.strip_prefix(b"\r\n").unwrap_or(tail);
    let closing = format!("--{BOUNDARY}--");
    let after = tail
        .strip_prefix(closing.as_bytes())
        .ok_or(FramingError::NoClosingBoundary)?;
    if !after.trim_ascii().is_empty() {
        return Err(FramingError::NoClosingBoundary);
    }
    Ok(EncryptedPart {
        protocol,
        original_length,
        signature,
        sealed,
    })
}

/// The body for one sealed message, byte for byte as §5.3 (TABs, CRLFs, no CRLF between the
/// sealed bytes and the closing boundary).
pub fn build_encrypted(
    protocol: &str,
    original_length: usize,
    signature: &[u8],
    sealed: &[u8],
) -> Vec<u8> {
    let head = format!(
        "--{BOUNDARY}\r\n\tContent-Type: {protocol}\r\n\tOriginalContent: \
         type=application/soap+xml;charset=UTF-8;Length={original_length}\r\n\
         --{BOUNDARY}\r\n\tContent-Type: application/octet-stream\r\n"
    );
    let tail = format!("--{BOUNDARY}--\r\n");
    let mut out = Vec::with_capacity(head.len() + 4 + signature.len() + sealed.len() + tail.len());
    out.extend_from_slice(head.as_bytes());
    // A signature never approaches 4 GiB; saturate rather than wrap if a caller misbehaves.
    let sig_len = u32::try_from(signature.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&sig_len.to_le_bytes());
    out.extend_from_slice(signature);
    out.extend_from_slice(sealed);
    out.extend_from_slice(tail.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: [u8; 16] = [
        1, 0, 0, 0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0, 0, 0, 0,
    ];

    #[test]
    fn content_type_round_trip_and_loose_parsing() {
        let ct = encrypted_content_type(SPNEGO_ENCRYPTED);
        assert_eq!(
            ct,
            "multipart/encrypted;protocol=\"application/HTTP-SPNEGO-session-encrypted\";boundary=\"Encrypted Boundary\""
        );
        assert_eq!(encrypted_protocol(&ct).as_deref(), Some(SPNEGO_ENCRYPTED));
        assert_eq!(
            encrypted_protocol(
                " Multipart/Encrypted ; Boundary=\"Encrypted Boundary\" ; PROTOCOL = application/HTTP-Kerberos-session-encrypted "
            )
            .as_deref(),
            Some("application/HTTP-Kerberos-session-encrypted")
        );
        assert_eq!(
            encrypted_protocol("application/soap+xml;charset=UTF-8"),
            None
        );
        assert_eq!(encrypted_protocol("multipart/encrypted;boundary=x"), None);
        assert_eq!(encrypted_protocol(""), None);
    }

    #[test]
    fn build_is_exactly_the_spec_bytes() {
        let body = build_encrypted(SPNEGO_ENCRYPTED, 3, &SIG, b"xyz");
        let mut want = b"--Encrypted Boundary\r\n\
\tContent-Type: application/HTTP-SPNEGO-session-encrypted\r\n\
\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=3\r\n\
--Encrypted Boundary\r\n\
\tContent-Type: application/octet-stream\r\n"
            .to_vec();
        want.extend_from_slice(&[0x10, 0, 0, 0]);
        want.extend_from_slice(&SIG);
        want.extend_from_slice(b"xyz--Encrypted Boundary--\r\n");
        assert_eq!(body, want);
    }

    #[test]
    fn round_trip() {
        let sealed: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let body = build_encrypted(SPNEGO_ENCRYPTED, sealed.len(), &SIG, &sealed);
        let part = parse_encrypted(&body).unwrap();
        assert_eq!(
            part,
            EncryptedPart {
                protocol: SPNEGO_ENCRYPTED,
                original_length: 5000,
                signature: &SIG,
                sealed: &sealed,
            }
        );
        // Sealed bytes that look like boundaries do not confuse the length-based parser.
        let tricky = b"--Encrypted Boundary--\r\n--Encrypted Boundary\r\n";
        let body = build_encrypted(SPNEGO_ENCRYPTED, tricky.len(), &SIG, tricky);
        assert_eq!(parse_encrypted(&body).unwrap().sealed, tricky);
    }

    #[test]
    fn observed_pywinrm_prefix_and_crlf_variants() {
        // pywinrm `ntlm`, first sealed request: sigLen 16, version 1, checksum, seq 0.
        let mut body = b"--Encrypted Boundary\r\n\tContent-Type: application/HTTP-SPNEGO-session-encrypted\r\n\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=4\r\n--Encrypted Boundary\r\n\tContent-Type: application/octet-stream\r\n".to_vec();
        body.extend_from_slice(&[0x10, 0, 0, 0, 1, 0, 0, 0]);
        body.extend_from_slice(&[9, 8, 7, 6, 5, 4, 3, 2, 0, 0, 0, 0]);
        body.extend_from_slice(b"\x01\x02\x03\x04");
        let mut plain = body.clone();
        plain.extend_from_slice(b"--Encrypted Boundary--\r\n");
        let p = parse_encrypted(&plain).unwrap();
        assert_eq!(p.signature.len(), 16);
        assert_eq!(p.signature[..4], [1, 0, 0, 0]);
        assert_eq!(p.sealed, b"\x01\x02\x03\x04");
        // With a CRLF before the closing boundary, and without the final CRLF.
        let mut crlf = body.clone();
        crlf.extend_from_slice(b"\r\n--Encrypted Boundary--\r\n");
        assert_eq!(parse_encrypted(&crlf).unwrap().sealed, b"\x01\x02\x03\x04");
        let mut bare = body.clone();
        bare.extend_from_slice(b"--Encrypted Boundary--");
        assert!(parse_encrypted(&bare).is_ok());
        // LF-only header lines and odd spacing/case.
        let mut lf = b"--Encrypted Boundary\n Content-Type:application/HTTP-SPNEGO-session-encrypted\n originalcontent: type=application/soap+xml; charset=UTF-8; length=4\n--Encrypted Boundary\n content-type: Application/Octet-Stream\n".to_vec();
        lf.extend_from_slice(&body[body.len() - 24..]);
        lf.extend_from_slice(b"--Encrypted Boundary--\r\n");
        let p = parse_encrypted(&lf).unwrap();
        assert_eq!(p.protocol, SPNEGO_ENCRYPTED);
        assert_eq!(p.original_length, 4);
    }

    #[test]
    fn truncated_and_garbage_inputs_are_errors() {
        let body = build_encrypted(SPNEGO_ENCRYPTED, 10, &SIG, b"0123456789");
        for cut in 0..body.len() - "--Encrypted Boundary--".len() {
            assert!(parse_encrypted(&body[..cut]).is_err(), "cut at {cut}");
        }
        for garbage in [
            &b""[..],
            b"\r\n\r\n",
            b"hello",
            b"--Encrypted Boundary\r\n",
            &[0xff; 100],
        ] {
            assert!(parse_encrypted(garbage).is_err());
        }
        // Sealed payload longer than announced: the closing boundary is not where it must be.
        let long = build_encrypted(SPNEGO_ENCRYPTED, 9, &SIG, b"0123456789");
        assert_eq!(parse_encrypted(&long), Err(FramingError::NoClosingBoundary));
        // Oversized signature length and absurd Length values.
        let mut big_sig = build_encrypted(SPNEGO_ENCRYPTED, 0, &SIG, b"");
        let at = big_sig.len() - 16 - 4 - "--Encrypted Boundary--\r\n".len();
        big_sig[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            parse_encrypted(&big_sig),
            Err(FramingError::SignatureTooLong(1000))
        );
        let huge = String::from_utf8_lossy(&body)
            .replace("Length=10", "Length=99999999999999999999999999");
        assert!(matches!(
            parse_encrypted(huge.as_bytes()),
            Err(FramingError::BadOriginalLength(_))
        ));
        let neg = String::from_utf8_lossy(&body).replace("Length=10", "Length=-1");
        assert!(matches!(
            parse_encrypted(neg.as_bytes()),
            Err(FramingError::BadOriginalLength(_))
        ));
        let no_len = String::from_utf8_lossy(&body).replace("Length=10", "Size=10");
        assert_eq!(
            parse_encrypted(no_len.as_bytes()),
            Err(FramingError::NoOriginalLength)
        );
        let not_octet = String::from_utf8_lossy(&body).replace("octet-stream", "soap+xml");
        assert!(matches!(
            parse_encrypted(not_octet.as_bytes()),
            Err(FramingError::NotOctetStream(_))
        ));
    }
}
