//! authorized_keys text as `remote-agent user add --authorized-key` and the account file read
//! it: any input is parsed or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = remote_agent::accounts::parse_authorized_keys(text, "fuzz");
    }
});
