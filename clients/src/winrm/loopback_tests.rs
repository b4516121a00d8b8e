//! The client against an in-process WinRM server (hyper + sspi's NTLM acceptor): the NTLM
//! legs, sealed requests and responses in the §5.3 framing, the TimedOut retry, faults, and
//! a whole command from Create to Delete. No agent needed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::http::{Request, Response, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use remote_proto::wsman;
use sspi::{
    AuthIdentity, AuthIdentityBuffers, BufferType, CredentialUse, DataRepresentation,
    EncryptionFlags, Ntlm, SecurityBuffer, SecurityBufferRef, ServerRequestFlags, Sspi, SspiImpl,
    Username,
};

use super::*;
use crate::auth::Credentials;

const NS: &str = "xmlns:s=\"http://www.w3.org/2003/05/soap-envelope\" xmlns:a=\"http://schemas.xmlsoap.org/ws/2004/08/addressing\" xmlns:w=\"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd\" xmlns:x=\"http://schemas.xmlsoap.org/ws/2004/09/transfer\" xmlns:rsp=\"http://schemas.microsoft.com/wbem/wsman/1/windows/shell\"";
const SHELL: &str = "A39F1931-AB90-4404-B7FA-2673A0C50FF0";
const CMD: &str = "5D0C7E4B-91A2-4E3F-8C6D-0F1E2D3C4B5A";

struct Server {
    ntlm: Ntlm,
    creds: Option<AuthIdentityBuffers>,
    authenticated: bool,
    receives: usize,
    /// Requests seen: their Actions (last path segment).
    log: Vec<String>,
    /// Plain-text Basic requests are refused (as remote-agent without allow_unencrypted).
    require_sealing: bool,
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    text.split_once(start)
        .and_then(|(_, rest)| rest.split_once(end))
        .map(|(v, _)| v)
        .unwrap_or_default()
}

fn envelope(action: &str, relates_to: &str, body: &str) -> String {
    format!(
        "<s:Envelope xml:lang=\"en-US\" {NS}><s:Header><a:Action>{action}</a:Action>\
         <a:MessageID>uuid:9E8D7C6B-5A49-4382-9170-6F5E4D3C2B1A</a:MessageID>\
         <a:RelatesTo>{relates_to}</a:RelatesTo></s:Header><s:Body>{body}</s:Body></s:Envelope>"
    )
}

fn timed_out(relates_to: &str) -> String {
    envelope(
        "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault",
        relates_to,
        "<s:Fault><s:Code><s:Value>s:Receiver</s:Value><s:Subcode><s:Value>w:TimedOut</s:Value></s:Subcode></s:Code>\
         <s:Reason><s:Text xml:lang=\"en-US\">timed out</s:Text></s:Reason>\
         <s:Detail><f:WSManFault xmlns:f=\"http://schemas.microsoft.com/wbem/wsman/1/wsmanfault\" Code=\"2150858793\" Machine=\"h\">\
         <f:Message>timed out</f:Message></f:WSManFault></s:Detail></s:Fault>",
    )
}

/// The SOAP answer to one plaintext request.
fn answer(state: &mut Server, xml: &str) -> (StatusCode, String) {
    let action = between(xml, "<a:Action s:mustUnderstand=\"true\">", "</a:Action>");
    let id = between(xml, "<a:MessageID>", "</a:MessageID>").to_string();
    let op = action.rsplit('/').next().unwrap_or_default().to_string();
    state.log.push(op.clone());
    let ok = |body: String| {
        (
            StatusCode::OK,
            envelope(&format!("{action}Response"), &id, &body),
        )
    };
    match op.as_str() {
        "Create" => ok(format!(
            "<x:ResourceCreated><a:ReferenceParameters><w:SelectorSet>\
             <w:Selector Name=\"ShellId\">{SHELL}</w:Selector></w:SelectorSet></a:ReferenceParameters></x:ResourceCreated>"
        )),
        "Command" => {
            assert!(
                xml.contains("<rsp:Command>echo hi &amp;&amp; exit 3</rsp:Command>"),
                "{xml}"
            );
            ok(format!(
                "<rsp:CommandResponse><rsp:CommandId>{CMD}</rsp:CommandId></rsp:CommandResponse>"
            ))
        }
        "Send" => ok("<rsp:SendResponse/>".into()),
        "Receive" => {
            state.receives += 1;
            match state.receives {
                1 => ok(format!(
                    "<rsp:ReceiveResponse><rsp:Stream Name=\"stdout\" CommandId=\"{CMD}\">aGkK</rsp:Stream>\
                     <rsp:CommandState CommandId=\"{CMD}\" State=\"http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Running\"/></rsp:ReceiveResponse>"
                )),
                2 => (StatusCode::INTERNAL_SERVER_ERROR, timed_out(&id)),
                _ => ok(format!(
                    "<rsp:ReceiveResponse><rsp:Stream Name=\"stderr\" CommandId=\"{CMD}\">d2Fybgo=</rsp:Stream>\
                     <rsp:Stream Name=\"stdout\" CommandId=\"{CMD}\" End=\"true\"></rsp:Stream>\
                     <rsp:CommandState CommandId=\"{CMD}\" State=\"http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done\">\
                     <rsp:ExitCode>3</rsp:ExitCode></rsp:CommandState></rsp:ReceiveResponse>"
                )),
            }
        }
        "Signal" => ok("<rsp:SignalResponse/>".into()),
        "Delete" => ok(String::new()),
        _ => panic!("unexpected action {action}"),
    }
}

fn accept(server: &mut Server, token: Vec<u8>) -> (Option<sspi::SecurityStatus>, Vec<u8>) {
    let mut input = vec![SecurityBuffer::new(token, BufferType::Token)];
    let mut output = vec![SecurityBuffer::new(Vec::new(), BufferType::Token)];
    let builder = server
        .ntlm
        .accept_security_context()
        .with_credentials_handle(&mut server.creds)
        .with_context_requirements(ServerRequestFlags::empty())
        .with_target_data_representation(DataRepresentation::Native)
        .with_input(&mut input)
        .with_output(&mut output);
    let status = server
        .ntlm
        .accept_security_context_impl(builder)
        .and_then(|mut g| g.resolve_to_result())
        .map(|r| r.status)
        .ok();
    (status, std::mem::take(&mut output[0].buffer))
}

fn handle(
    state: &Mutex<Server>,
    parts: ::http::request::Parts,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut s = state.lock().unwrap();
    let reply = |status: StatusCode, ct: Option<&str>, body: Vec<u8>| {
        let mut r = Response::builder().status(status);
        if let Some(ct) = ct {
            r = r.header("Content-Type", ct);
        }
        r.body(Full::new(Bytes::from(body))).unwrap()
    };
    if let Some(auth) = parts
        .headers
        .get("Authorization")
        .and_then(|v| v.to_str().ok())
    {
        if let Some(b64) = auth.strip_prefix("Negotiate ") {
            let token = B64.decode(b64).unwrap();
            let (status, out) = accept(&mut s, token);
            return match status {
                Some(sspi::SecurityStatus::ContinueNeeded) => Response::builder()
                    .status(401)
                    .header("WWW-Authenticate", format!("Negotiate {}", B64.encode(out)))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
                Some(sspi::SecurityStatus::CompleteNeeded | sspi::SecurityStatus::Ok)
                    if s.ntlm.complete_auth_token(&mut []).is_ok() =>
                {
                    s.authenticated = true;
                    reply(StatusCode::OK, None, Vec::new())
                }
                _ => Response::builder()
                    .status(401)
                    .header("WWW-Authenticate", "Negotiate")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            };
        }
        if let Some(b64) = auth.strip_prefix("Basic ") {
            let cred = String::from_utf8(B64.decode(b64).unwrap()).unwrap();
            if cred != "alice:s3cret" || s.require_sealing {
                return reply(StatusCode::UNAUTHORIZED, None, Vec::new());
            }
            let (status, xml) = answer(&mut s, std::str::from_utf8(&body).unwrap());
            return reply(status, Some(http::SOAP_CONTENT_TYPE), xml.into_bytes());
        }
    }
    let ct = parts
        .headers
        .get("Content-Type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(s.authenticated, "request on an unauthenticated connection");
    assert_eq!(
        wsman::encrypted_protocol(ct).as_deref(),
        Some(wsman::SPNEGO_ENCRYPTED),
        "every request is sealed over HTTP"
    );
    let part = wsman::parse_encrypted(&body).unwrap();
    let mut sig = part.signature.to_vec();
    let mut data = part.sealed.to_vec();
    let mut bufs = [
        SecurityBufferRef::token_buf(&mut sig),
        SecurityBufferRef::data_buf(&mut data),
    ];
    s.ntlm.decrypt_message(&mut bufs).unwrap();
    let plain = bufs[1].data().to_vec();
    assert_eq!(plain.len(), part.original_length);
    let (status, xml) = answer(&mut s, std::str::from_utf8(&plain).unwrap());
    let mut sig = [0u8; 16];
    let mut data = xml.clone().into_bytes();
    let mut bufs = [
        SecurityBufferRef::token_buf(&mut sig),
        SecurityBufferRef::data_buf(&mut data),
    ];
    s.ntlm
        .encrypt_message(EncryptionFlags::empty(), &mut bufs)
        .unwrap();
    let framed = wsman::build_encrypted(wsman::SPNEGO_ENCRYPTED, xml.len(), &sig, &data);
    reply(
        status,
        Some(&wsman::encrypted_content_type(wsman::SPNEGO_ENCRYPTED)),
        framed,
    )
}

/// Serve connections on 127.0.0.1; returns the port and the shared request log.
async fn serve(require_sealing: bool) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let shared_log = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let mut ntlm = Ntlm::new();
            let identity = AuthIdentity {
                username: Username::parse("alice").unwrap(),
                password: "s3cret".to_string().into(),
            };
            let creds = ntlm
                .acquire_credentials_handle()
                .with_credential_use(CredentialUse::Inbound)
                .with_auth_data(&identity)
                .execute(&mut ntlm)
                .unwrap()
                .credentials_handle;
            // One state per connection: NTLM authenticates the connection.
            let state = Arc::new(Mutex::new(Server {
                ntlm,
                creds,
                authenticated: false,
                receives: 0,
                log: Vec::new(),
                require_sealing,
            }));
            let log = shared_log.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    let log = log.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let resp = handle(&state, parts, body);
                        let mut s = state.lock().unwrap();
                        log.lock().unwrap().append(&mut s.log);
                        Ok::<_, hyper::Error>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (port, log)
}

fn client(auth: AuthMethod, password: &str, dir: &std::path::Path) -> Arc<Client> {
    let trusted = dir.join("trusted_hosts");
    std::fs::write(&trusted, "127.0.0.1\n").unwrap();
    Arc::new(Client::new(
        Arc::new(Credentials::new(Vec::new(), Some(password.to_string()))),
        ClientOptions {
            auth,
            connect_timeout: Duration::from_secs(5),
            default_user: "nobody".into(),
            trust: tls::Trust::new(None, None, dir.join("winrm_known_hosts"), trusted.clone())
                .unwrap(),
            trusted_hosts: trusted,
        },
    ))
}

async fn run_one(client: Arc<Client>, port: u16) -> (Vec<u8>, Vec<u8>, Result<i32, WinrmError>) {
    let target = Target::parse(&format!("winrm://alice@127.0.0.1:{port}")).unwrap();
    let conn = match client.connect(&target).await {
        Ok(c) => c,
        Err(e) => return (Vec::new(), Vec::new(), Err(e)),
    };
    let started = RemoteCommand::start(
        client.clone(),
        &target,
        conn,
        command::Shell::New(&ShellOptions::default()),
        "echo hi && exit 3",
        Stdin::Closed,
        Cleanup::DeleteShell,
    )
    .await;
    let mut process = match started {
        Ok(p) => p,
        Err(e) => return (Vec::new(), Vec::new(), Err(e)),
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(event) = process.next_event().await {
        match event {
            crate::ssh::ProcessEvent::Stdout(d) => out.extend_from_slice(&d),
            crate::ssh::ProcessEvent::Stderr(d) => err.extend_from_slice(&d),
        }
    }
    (out, err, process.finish().map(|e| e.code()))
}

#[tokio::test]
async fn ntlm_sealed_command_from_create_to_delete() {
    let (port, log) = serve(true).await;
    let dir = tempfile::tempdir().unwrap();
    let (out, err, code) = run_one(client(AuthMethod::Ntlm, "s3cret", dir.path()), port).await;
    assert_eq!(code.unwrap(), 3);
    assert_eq!(out, b"hi\n");
    assert_eq!(err, b"warn\n");
    assert_eq!(
        *log.lock().unwrap(),
        [
            "Create", "Command", "Send", "Receive", "Receive", "Receive", "Signal", "Delete"
        ]
    );
}

#[tokio::test]
async fn ntlm_wrong_password_is_rejected() {
    let (port, _) = serve(true).await;
    let dir = tempfile::tempdir().unwrap();
    let (_, _, code) = run_one(client(AuthMethod::Ntlm, "wrong", dir.path()), port).await;
    let e = code.unwrap_err();
    assert!(
        matches!(e, WinrmError::AuthRejected { method: "NTLM", .. }),
        "{e}"
    );
}

#[tokio::test]
async fn basic_plain_http_for_a_trusted_host() {
    let (port, log) = serve(false).await;
    let dir = tempfile::tempdir().unwrap();
    let (out, _, code) = run_one(client(AuthMethod::Basic, "s3cret", dir.path()), port).await;
    assert_eq!(code.unwrap(), 3);
    assert_eq!(out, b"hi\n");
    assert_eq!(
        log.lock().unwrap().first().map(String::as_str),
        Some("Create")
    );

    // Refused by a server that wants encryption: the message says why.
    let (port, _) = serve(true).await;
    let (_, _, code) = run_one(client(AuthMethod::Basic, "s3cret", dir.path()), port).await;
    let e = code.unwrap_err().to_string();
    assert!(e.contains("--allow-unencrypted"), "{e}");
}
