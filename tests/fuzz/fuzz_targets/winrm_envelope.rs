//! The WinRM SOAP request parser (remote_agent::winrm::soap::parse_request) on arbitrary
//! bytes: every input yields a request or a SoapError, never a panic; the fault built from an
//! error (echoing whatever MessageID could be recovered) and the responses built from a
//! parsed request's ids are themselves well-formed envelopes that the parser accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remote_agent::winrm::soap::{
    Body, command_response, fault_response, parse_request, request_message_id,
};

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(req) => {
            let id = match &req.body {
                Body::Command {
                    command_id: Some(id),
                    ..
                } => id.as_str(),
                _ => req.header.shell_id.as_deref().unwrap_or(""),
            };
            let resp = command_response(id, &req.header.message_id);
            assert!(parse_request(resp.as_bytes()).is_ok(), "{resp}");
        }
        Err(err) => {
            let relates_to = request_message_id(data);
            let resp = fault_response(&err.fault(), relates_to.as_deref());
            assert!(parse_request(resp.as_bytes()).is_ok(), "{resp}");
        }
    }
});
