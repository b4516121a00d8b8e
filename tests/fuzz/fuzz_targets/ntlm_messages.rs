//! The WinRM NTLM/SPNEGO acceptor (remote_agent::winrm::ntlm) and the message-encryption
//! framing (remote_proto::wsman) on arbitrary bytes. The first byte picks the mode:
//! 0 – any token as the first leg (NEGOTIATE, NegTokenInit, garbage), then again;
//! 1 – a raw AUTHENTICATE after a real CHALLENGE, its NTProofStr fixed up to match the
//!     account's hash so that the later guards and sspi's own parsing are reached;
//! 2 – a SPNEGO NegTokenResp after a real SPNEGO CHALLENGE (inner AUTHENTICATE fixed up the
//!     same way when one can be found);
//! 3 – the encrypted-body parser, whose result must survive a rebuild.
//! Every input yields a step, a challenge or an AuthError/FramingError, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remote_agent::winrm::ntlm::{
    Acceptor, Lookup, Step, av_pairs, nt_proof_str, ntowf_v2, parse_authenticate,
};
use remote_proto::wsman::{build_encrypted, parse_encrypted};

/// NEGOTIATE_MESSAGE as sspi's client sends it (flags 0xe20882b7, version 10.0.17763).
const NEGOTIATE: &[u8] = &[
    0x4e, 0x54, 0x4c, 0x4d, 0x53, 0x53, 0x50, 0x00, 0x01, 0x00, 0x00, 0x00, 0xb7, 0x82, 0x08, 0xe2,
    0x00, 0x00, 0x00, 0x00, 0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x28, 0x00, 0x00, 0x00,
    0x0a, 0x00, 0x63, 0x45, 0x00, 0x00, 0x00, 0x0f,
];
const HASH: [u8; 16] = [7; 16];

fn lookup(name: &str) -> Lookup {
    match name {
        "nohash" => Lookup::NoNtlm,
        "unknown" => Lookup::Unknown,
        _ => Lookup::Found(HASH),
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

fn neg_token_init(mech_token: &[u8]) -> Vec<u8> {
    let ntlm_oid = der(
        0x06,
        &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x02, 0x0a],
    );
    let mut seq = der(0xa0, &der(0x30, &ntlm_oid));
    seq.extend(der(0xa2, &der(0x04, mech_token)));
    let mut app = der(0x06, &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x02]);
    app.extend(der(0xa0, &der(0x30, &seq)));
    der(0x60, &app)
}

/// Make the NTProofStr of an AUTHENTICATE found at `at..` in `buf` valid for [`HASH`].
fn fix_proof(buf: &mut [u8], at: usize, challenge: &[u8]) {
    let Some(msg) = buf.get(at..) else { return };
    let Ok(auth) = parse_authenticate(msg) else {
        return;
    };
    if auth.nt_response.len() < 44 || challenge.len() < 32 {
        return;
    }
    let _ = av_pairs(auth.nt_response);
    let v2 = ntowf_v2(&HASH, &auth.user, auth.domain);
    let proof = nt_proof_str(&v2, &challenge[24..32], &auth.nt_response[16..]);
    let off = u32::from_le_bytes([msg[24], msg[25], msg[26], msg[27]]) as usize;
    if let Some(slot) = buf.get_mut(at + off..at + off + 16) {
        slot.copy_from_slice(&proof);
    }
}

fn after_login(acceptor: &mut Acceptor, step: Step, data: &[u8]) {
    if let Step::Done { .. } = step {
        assert!(acceptor.user().is_some());
        let (sig, sealed) = acceptor.seal(data).expect("seal after login");
        assert_eq!((sig.len(), sealed.len()), (16, data.len()));
        let _ = acceptor.unseal(data.get(..16).unwrap_or(data), data);
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    let _ = parse_authenticate(data);
    match mode % 4 {
        0 => {
            let mut acceptor = Acceptor::new(None);
            if let Ok(Step::Continue(t)) = acceptor.step(data, &lookup) {
                assert!(!t.is_empty());
            }
            let _ = acceptor.step(data, &lookup);
            assert!(acceptor.seal(b"x").is_err() || acceptor.user().is_some());
        }
        1 => {
            let mut acceptor = Acceptor::new(None);
            let Ok(Step::Continue(challenge)) = acceptor.step(NEGOTIATE, &lookup) else {
                panic!("no CHALLENGE for a valid NEGOTIATE");
            };
            let mut auth = data.to_vec();
            fix_proof(&mut auth, 0, &challenge);
            if let Ok(step) = acceptor.step(&auth, &lookup) {
                after_login(&mut acceptor, step, data);
            }
        }
        2 => {
            let mut acceptor = Acceptor::new(None);
            let Ok(Step::Continue(resp)) = acceptor.step(&neg_token_init(NEGOTIATE), &lookup)
            else {
                panic!("no SPNEGO CHALLENGE for a valid NegTokenInit");
            };
            let challenge = resp
                .windows(8)
                .position(|w| w == b"NTLMSSP\0")
                .and_then(|i| resp.get(i..))
                .unwrap_or_default()
                .to_vec();
            let mut token = data.to_vec();
            if let Some(at) = data.windows(8).position(|w| w == b"NTLMSSP\0") {
                fix_proof(&mut token, at, &challenge);
            }
            if let Ok(step) = acceptor.step(&token, &lookup) {
                after_login(&mut acceptor, step, data);
            }
        }
        _ => {
            if let Ok(part) = parse_encrypted(data) {
                let rebuilt = build_encrypted(
                    part.protocol,
                    part.original_length,
                    part.signature,
                    part.sealed,
                );
                assert_eq!(parse_encrypted(&rebuilt), Ok(part));
            }
        }
    }
});
