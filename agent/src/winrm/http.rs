//! The WinRM HTTP(S) listeners (spec §1, §5): a bounded accept loop per listener, HTTP/1.1
//! keep-alive connections served by hyper, and per connection the state WinRM ties to it —
//! the NTLM/Negotiate security context and its sealing keys. Each request is authenticated
//! (Basic, or the connection's NTLM login), unsealed when message-encrypted, bounded in size,
//! parsed by [`super::soap`] and carried out by [`super::shell`]; the response is sealed again
//! when the request was.

use crate::audit::{Event, Transport};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::Digest;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::ntlm::{self, Acceptor, ChannelBinding, Lookup, Step};
use super::shell::{RequestContext, Shells};
use super::soap::{self, Fault};
use crate::accounts::{Account, AccountDb};
use crate::config::{ChannelBindingPolicy, WinrmSettings};
use crate::login::{PasswordChecker, Throttle};
use crate::process::Identity;
use crate::session::Principal;
use remote_proto::wsman;

/// Bodies larger than this are refused with 413 without being read (spec §1.3).
const HARD_BODY_LIMIT_MIN: usize = 2 << 20;
/// Time a client has to send a request's headers, and how long an idle keep-alive
/// connection stays open (spec §1.4: at least 120 s).
const HEADER_TIMEOUT: Duration = Duration::from_secs(150);
/// Time for the TLS handshake.
const TLS_TIMEOUT: Duration = Duration::from_secs(15);
/// Time to read a request body once its headers are in.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// A Basic login is re-verified with argon2id at most this often per user and password.
const BASIC_CACHE_TTL: Duration = Duration::from_secs(300);
const BASIC_CACHE_MAX: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum WinrmError {
    #[error(
        "cannot listen for WinRM {what} on {addr}: {source}. Is another server using that port? Pick another with --winrm-{what} HOST:PORT, or turn it off with --winrm-{what} off"
    )]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
}

/// State shared by every connection of both listeners.
pub struct Shared {
    accounts: AccountDb,
    shells: Shells,
    settings: WinrmSettings,
    passwords: PasswordChecker,
    throttle: Throttle,
    basic_cache: BasicCache,
    connections: Arc<Semaphore>,
    shutdown: CancellationToken,
}

/// The bound listeners, ready to run.
pub struct WinrmServer {
    http: Option<TcpListener>,
    https: Option<(TcpListener, tokio_rustls::TlsAcceptor, Vec<u8>)>,
    shared: Arc<Shared>,
}

/// What `bind` reports for the log and the banner.
pub struct Bound {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub fingerprint: Option<String>,
}

impl WinrmServer {
    pub async fn bind(
        settings: WinrmSettings,
        tls: Option<super::tls::Identity>,
        accounts: AccountDb,
        shells: Shells,
        shutdown: CancellationToken,
    ) -> Result<(WinrmServer, Bound), WinrmError> {
        let listen = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| WinrmError::Bind { what, addr, source })
        };
        let http = match settings.http {
            Some(addr) => Some(listen("http", addr).await?),
            None => None,
        };
        let mut fingerprint = None;
        let https = match (settings.https, tls) {
            (Some(addr), Some(identity)) => {
                fingerprint = Some(identity.fingerprint.clone());
                Some((
                    listen("https", addr).await?,
                    tokio_rustls::TlsAcceptor::from(identity.config),
                    identity.channel_binding,
                ))
            }
            _ => None,
        };
        let bound = Bound {
            http: http.as_ref().and_then(|l| l.local_addr().ok()),
            https: https.as_ref().and_then(|(l, _, _)| l.local_addr().ok()),
            fingerprint,
        };
        let shared = Arc::new(Shared {
            accounts,
            shells,
            connections: Arc::new(Semaphore::new(settings.max_connections)),
            settings,
            passwords: PasswordChecker::default(),
            throttle: Throttle::default(),
            basic_cache: BasicCache::default(),
            shutdown,
        });
        Ok((
            WinrmServer {
                http,
                https,
                shared,
            },
            bound,
        ))
    }

    /// Serve until shutdown; then let connections finish their current request.
    pub async fn run(self) {
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(listener) = self.http {
            tasks.spawn(accept_loop(listener, None, self.shared.clone()));
        }
        if let Some((listener, acceptor, binding)) = self.https {
            tasks.spawn(accept_loop(
                listener,
                Some((acceptor, Arc::new(binding))),
                self.shared.clone(),
            ));
        }
        while tasks.join_next().await.is_some() {}
    }
}

type TlsParts = (tokio_rustls::TlsAcceptor, Arc<Vec<u8>>);

async fn accept_loop(listener: TcpListener, tls: Option<TlsParts>, shared: Arc<Shared>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shared.shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("winrm accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            tracing::warn!(peer = %peer, limit = shared.settings.max_connections, "winrm connection refused: too many connections ([winrm] max_connections)");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let local = stream.local_addr().ok();
            match tls {
                None => serve(TokioIo::new(stream), peer, local, None, shared).await,
                Some((acceptor, binding)) => {
                    match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            serve(TokioIo::new(tls), peer, local, Some(binding), shared).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, "winrm TLS handshake failed: {e}")
                        }
                        Err(_) => tracing::debug!(peer = %peer, "winrm TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    // Shutdown: connections finish their request in flight (long-polls end with TimedOut).
    let grace = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(grace);
    loop {
        tokio::select! {
            next = conns.join_next() => if next.is_none() { break },
            () = &mut grace => { conns.abort_all(); break }
        }
    }
}

/// Per-connection state: requests on one connection are sequential, so the lock is never
/// contended; it only makes the state reachable from hyper's service closure.
struct Conn {
    peer: SocketAddr,
    local: Option<SocketAddr>,
    /// `Some` on HTTPS: the channel-binding data of our certificate.
    tls_binding: Option<Arc<Vec<u8>>>,
    ntlm: Option<Acceptor>,
    /// Scheme name the client used for Negotiate/NTLM ("Negotiate" or "NTLM").
    ntlm_scheme: String,
    /// Account logged in with NTLM on this connection.
    ntlm_user: Option<String>,
    failures: u32,
    /// Identity of the last principal, reused while the account is unchanged.
    principal: Option<(Account, Principal)>,
}

async fn serve<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    tls_binding: Option<Arc<Vec<u8>>>,
    shared: Arc<Shared>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(tokio::sync::Mutex::new(Conn {
        peer,
        local,
        tls_binding,
        ntlm: None,
        ntlm_scheme: "Negotiate".into(),
        ntlm_user: None,
        failures: 0,
        principal: None,
    }));
    let svc_shared = shared.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        let shared = svc_shared.clone();
        async move {
            let mut conn = conn.lock().await;
            Ok::<_, Infallible>(handle(req, &mut conn, &shared).await)
        }
    });
    let http = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(io, service);
    tokio::pin!(http);
    tokio::select! {
        r = http.as_mut() => if let Err(e) = r {
            tracing::debug!(peer = %peer, "winrm connection ended: {e}");
        },
        () = shared.shutdown.cancelled() => {
            http.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
        }
    }
}

type Reply = Response<Full<Bytes>>;

/// Read and drop a request body that will not be used (so the connection stays usable for
/// the next leg of a login), within the size and time limits; `reply` is sent after it, or
/// with `Connection: close` when the body is over the limits.
async fn discard(body: Incoming, limit: usize, reply: Reply, peer: SocketAddr) -> Reply {
    let drain = async {
        let mut body = body;
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                seen += data.len();
                if seen > limit {
                    return false;
                }
            }
        }
        true
    };
    match tokio::time::timeout(BODY_TIMEOUT, drain).await {
        Ok(true) => reply,
        _ => {
            tracing::debug!(peer = %peer, "winrm: unauthenticated request body over the limits; closing");
            close(reply)
        }
    }
}

fn empty(status: StatusCode) -> Reply {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// How the request body arrived, and so how the response must be sent.
enum Sealing {
    Plain,
    /// Encrypted with the connection's NTLM context; the protocol string to echo.
    Sealed(String),
}

async fn handle(req: Request<Incoming>, conn: &mut Conn, shared: &Shared) -> Reply {
    let path = req.uri().path();
    if path != "/wsman" && path != "/wsman/" {
        return empty(StatusCode::NOT_FOUND);
    }
    if req.method() != Method::POST {
        let mut r = empty(StatusCode::METHOD_NOT_ALLOWED);
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let https = conn.tls_binding.is_some();
    let hard_limit = (shared.settings.max_envelope_bytes * 4).max(HARD_BODY_LIMIT_MIN);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > hard_limit as u64) {
        tracing::warn!(peer = %conn.peer, bytes = declared, "winrm request refused: body larger than {hard_limit} bytes");
        return close(empty(StatusCode::PAYLOAD_TOO_LARGE));
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| h.len() < 256 && !h.contains(['<', '>', '&', '"']))
        .map(str::to_string)
        .or_else(|| conn.local.map(|a| a.to_string()))
        .unwrap_or_else(|| "localhost".into());
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = req.into_body();

    // Authentication first, from the headers: Basic on each request, or the connection's
    // NTLM login. A request that carries credentials starts from nothing, so a failed
    // attempt never leaves an earlier login in place. Until someone is logged in, bodies
    // are read and thrown away, never kept.
    let mut final_token: Option<String> = None;
    let mut ntlm_leg = false;
    let scheme = authorization.as_deref().map(split_scheme);
    if let Some((name, _)) = scheme {
        // (The cached principal stays: it is used only for the account it was built for.)
        conn.ntlm_user = None;
        if !name.eq_ignore_ascii_case("negotiate") && !name.eq_ignore_ascii_case("ntlm") {
            conn.ntlm = None;
        }
    }
    let login = match scheme {
        Some((name, value)) if name.eq_ignore_ascii_case("basic") => {
            basic(conn, shared, value, https).await
        }
        Some((name, value))
            if name.eq_ignore_ascii_case("negotiate") || name.eq_ignore_ascii_case("ntlm") =>
        {
            ntlm_leg = true;
            negotiate(conn, shared, name, value)
                .await
                .map(|(user, token)| {
                    final_token = token.map(|t| format!("{} {}", conn.ntlm_scheme, B64.encode(t)));
                    user
                })
        }
        Some((name, _)) => {
            tracing::warn!(peer = %conn.peer, scheme = ?name, "winrm login refused: authentication scheme not supported (use Basic or Negotiate/NTLM)");
            Err(challenge(shared, https))
        }
        None => conn
            .ntlm_user
            .clone()
            .ok_or_else(|| challenge(shared, https)),
    };
    let user = match login {
        Ok(user) => user,
        Err(reply) => return discard(body, hard_limit, reply, conn.peer).await,
    };
    let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, hard_limit).collect())
        .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            tracing::warn!(peer = %conn.peer, "winrm request refused: body larger than {hard_limit} bytes, or the connection broke");
            return close(empty(StatusCode::PAYLOAD_TOO_LARGE));
        }
        Err(_) => {
            tracing::warn!(peer = %conn.peer, "winrm request body not received within {BODY_TIMEOUT:?}");
            return close(empty(StatusCode::REQUEST_TIMEOUT));
        }
    };
    if ntlm_leg && body.is_empty() {
        // pywinrm and pypsrp set up the context with an empty request.
        let mut r = empty(StatusCode::OK);
        add_final_token(&mut r, final_token.as_deref());
        return r;
    }

    // The body: sealed with the NTLM context, or plaintext (HTTPS, or allowed).
    let (plain, sealing) = match wsman::encrypted_protocol(&content_type) {
        Some(protocol) => {
            let Some(acceptor) = conn.ntlm.as_mut().filter(|_| conn.ntlm_user.is_some()) else {
                tracing::warn!(peer = %conn.peer, "winrm: encrypted body on a connection without an NTLM login");
                return empty(StatusCode::BAD_REQUEST);
            };
            let part = match wsman::parse_encrypted(&body) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(peer = %conn.peer, "winrm: bad encrypted body: {e}");
                    return empty(StatusCode::BAD_REQUEST);
                }
            };
            match acceptor.unseal(part.signature, part.sealed) {
                Ok(p) if p.len() == part.original_length => {
                    (Bytes::from(p), Sealing::Sealed(protocol))
                }
                Ok(_) => {
                    tracing::warn!(peer = %conn.peer, "winrm: decrypted length differs from OriginalContent Length");
                    return empty(StatusCode::BAD_REQUEST);
                }
                Err(e) => {
                    tracing::warn!(peer = %conn.peer, "winrm: cannot decrypt the request: {e}");
                    return empty(StatusCode::BAD_REQUEST);
                }
            }
        }
        None if is_soap(&content_type) => {
            if !https && !shared.settings.allow_unencrypted {
                tracing::warn!(peer = %conn.peer, user = ?user, "winrm request refused: plaintext SOAP over HTTP; use HTTPS (port 5986), NTLM with message encryption, or set allow_unencrypted (--allow-unencrypted)");
                return challenge(shared, https);
            }
            (body, Sealing::Plain)
        }
        None => return empty(StatusCode::UNSUPPORTED_MEDIA_TYPE),
    };

    let (status, xml) = soap_exchange(conn, shared, &user, &plain, https, &host).await;
    let mut reply = match sealing {
        Sealing::Plain => {
            let mut r = Response::new(Full::new(Bytes::from(xml)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/soap+xml;charset=UTF-8"),
            );
            r
        }
        Sealing::Sealed(protocol) => {
            let Some(acceptor) = conn.ntlm.as_mut() else {
                return empty(StatusCode::INTERNAL_SERVER_ERROR);
            };
            match acceptor.seal(xml.as_bytes()) {
                Ok((sig, sealed)) => {
                    let body = wsman::build_encrypted(&protocol, xml.len(), &sig, &sealed);
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    if let Ok(v) = HeaderValue::from_str(&wsman::encrypted_content_type(&protocol))
                    {
                        r.headers_mut().insert(header::CONTENT_TYPE, v);
                    }
                    r
                }
                Err(e) => {
                    tracing::error!(peer = %conn.peer, "winrm: cannot encrypt the response: {e}");
                    return close(empty(StatusCode::INTERNAL_SERVER_ERROR));
                }
            }
        }
    };
    *reply.status_mut() = status;
    add_final_token(&mut reply, final_token.as_deref());
    reply
}

/// Parse and carry out one SOAP request as `user`: (status, envelope).
async fn soap_exchange(
    conn: &mut Conn,
    shared: &Shared,
    user: &str,
    plain: &[u8],
    https: bool,
    host: &str,
) -> (StatusCode, String) {
    let machine = shared.shells.machine().to_string();
    let fault = |f: Fault, rel: Option<&str>| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            soap::fault_response(&f.with_machine(machine.clone()), rel),
        )
    };
    if plain.len() > shared.settings.max_envelope_bytes {
        let rel = soap::request_message_id(plain);
        return fault(
            Fault::encoding_limit(format!(
                "The request envelope is {} bytes; this agent accepts at most {} ([winrm] max_envelope_bytes).",
                plain.len(),
                shared.settings.max_envelope_bytes
            )),
            rel.as_deref(),
        );
    }
    let limits = soap::Limits {
        max_input_bytes: shared.settings.max_envelope_bytes,
        ..soap::Limits::default()
    };
    let req = match soap::parse_request_with_limits(plain, &limits) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(peer = %conn.peer, user = %user, "winrm request rejected: {e}");
            let rel = soap::request_message_id(plain);
            return fault(e.fault(), rel.as_deref());
        }
    };
    let rel = req.header.message_id.clone();
    let principal = match principal(conn, shared, user) {
        Ok(p) => p,
        Err(f) => return fault(f, Some(&rel)),
    };
    let ctx = RequestContext {
        client_ip: conn.peer.ip().to_string(),
        address: format!("{}://{host}/wsman", if https { "https" } else { "http" }),
    };
    match shared.shells.handle(&principal, &req, &ctx).await {
        Ok(xml) => (StatusCode::OK, xml),
        Err(f) => fault(f, Some(&rel)),
    }
}

/// The principal for `user`, built once per connection and account version.
fn principal(conn: &mut Conn, shared: &Shared, user: &str) -> Result<Principal, Fault> {
    let Some(account) = shared.accounts.get(user) else {
        return Err(Fault::access_denied());
    };
    if let Some((a, p)) = &conn.principal
        && *a == account
    {
        return Ok(p.clone());
    }
    let identity = Identity::for_account(&account).map_err(|e| {
        tracing::error!(account = %account.name, "winrm request refused: {e}");
        Fault::access_denied()
    })?;
    // First request of this account on the connection: its login, for the audit log (Basic
    // re-authenticates every request; once is enough to record).
    shared.shells.audit().record(Event::Auth {
        transport: transport_of(conn),
        peer: conn.peer.to_string(),
        account: account.name.clone(),
        method: if conn.ntlm_user.is_some() {
            "ntlm"
        } else {
            "basic"
        }
        .into(),
        success: true,
        reason: None,
    });
    let p = Principal {
        name: account.name.clone(),
        admin: account.admin,
        groups: account.groups.clone(),
        identity,
        transport: "winrm",
    };
    conn.principal = Some((account, p.clone()));
    Ok(p)
}

fn transport_of(conn: &Conn) -> Transport {
    if conn.tls_binding.is_some() {
        Transport::Winrms
    } else {
        Transport::Winrm
    }
}

fn split_scheme(header: &str) -> (&str, &str) {
    let h = header.trim();
    match h.split_once(char::is_whitespace) {
        Some((s, v)) => (s, v.trim()),
        None => (h, ""),
    }
}

fn is_soap(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/soap+xml"))
}

fn close(mut r: Reply) -> Reply {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn add_final_token(r: &mut Reply, token: Option<&str>) {
    if let Some(v) = token.and_then(|t| HeaderValue::from_str(t).ok()) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
}

/// 401 with the schemes this listener offers (spec §5): Negotiate always; Basic where it may
/// be used (HTTPS, or HTTP with allow_unencrypted).
fn challenge(shared: &Shared, https: bool) -> Reply {
    let mut r = empty(StatusCode::UNAUTHORIZED);
    let h = r.headers_mut();
    h.append(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Negotiate"),
    );
    if https || shared.settings.allow_unencrypted {
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"WSMAN\""),
        );
    }
    r
}

/// A failed login: logged with why, delayed like SSH password failures, answered with 401.
async fn refuse(conn: &mut Conn, shared: &Shared, user: &str, why: &str) -> Reply {
    shared.shells.audit().record(Event::Auth {
        transport: transport_of(conn),
        peer: conn.peer.to_string(),
        account: user.chars().take(256).collect(),
        method: if why.contains("Basic") {
            "basic"
        } else {
            "ntlm"
        }
        .into(),
        success: false,
        reason: Some(why.to_string()),
    });
    conn.failures += 1;
    let delay = shared.throttle.failure(conn.peer.ip(), conn.failures);
    tracing::warn!(peer = %conn.peer, user = ?user, attempt = conn.failures, "winrm authentication failed: {why}");
    tokio::time::sleep(delay).await;
    challenge(shared, conn.tls_binding.is_some())
}

async fn basic(
    conn: &mut Conn,
    shared: &Shared,
    value: &str,
    https: bool,
) -> Result<String, Reply> {
    let decoded = B64
        .decode(value.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    let Some((user, password)) = decoded.as_deref().and_then(|s| s.split_once(':')) else {
        return Err(refuse(conn, shared, "?", "malformed Basic credentials").await);
    };
    // Logged with escapes (Debug): a name from the peer may hold anything.
    let user = user.to_ascii_lowercase();
    if !https && !shared.settings.allow_unencrypted {
        // Refuse before checking: the password crossed the network in the clear already,
        // but at least nothing runs on it.
        tracing::warn!(peer = %conn.peer, user = ?user, "winrm Basic login over plain HTTP refused: use HTTPS (port 5986) or NTLM, or set allow_unencrypted (--allow-unencrypted) if this network is trusted");
        shared.shells.audit().record(Event::Auth {
            transport: Transport::Winrm,
            peer: conn.peer.to_string(),
            account: user.chars().take(256).collect(),
            method: "basic".into(),
            success: false,
            reason: Some("Basic over plain HTTP refused".into()),
        });
        return Err(challenge(shared, https));
    }
    let account = shared.accounts.get(&user);
    let hash = account.as_ref().and_then(|a| a.password_hash.clone());
    let ok = match &hash {
        Some(h) if shared.basic_cache.hit(&user, password, h) => true,
        _ => {
            let ok = shared.passwords.verify(password, hash.clone()).await;
            if let (true, Some(h)) = (ok, &hash) {
                shared.basic_cache.insert(&user, password, h);
            }
            ok
        }
    };
    match account {
        Some(_) if ok => {
            shared.throttle.success(conn.peer.ip());
            Ok(user)
        }
        Some(_) => Err(refuse(conn, shared, &user, "wrong password (Basic)").await),
        None => Err(refuse(conn, shared, &user, "no such account (Basic)").await),
    }
}

/// One leg of Negotiate/NTLM. `Ok` once the connection is logged in (with the SPNEGO final
/// token to send, if any); `Err` holds the 401 to send (a challenge, or a refusal).
async fn negotiate(
    conn: &mut Conn,
    shared: &Shared,
    scheme: &str,
    value: &str,
) -> Result<(String, Option<Vec<u8>>), Reply> {
    let Ok(token) = B64.decode(value.trim()) else {
        return Err(refuse(conn, shared, "?", "malformed Negotiate token (not base64)").await);
    };
    // A new login on this connection starts over (spec §5.2 step 4).
    let starting = token.starts_with(b"NTLMSSP\0\x01\0\0\0") || token.first() == Some(&0x60);
    if starting || conn.ntlm.is_none() {
        conn.ntlm_user = None;
        conn.principal = None;
        let binding = conn.tls_binding.as_ref().and_then(|b| {
            let policy = match shared.settings.channel_binding {
                ChannelBindingPolicy::None => return None,
                ChannelBindingPolicy::Relaxed => ntlm::CbtPolicy::Relaxed,
                ChannelBindingPolicy::Strict => ntlm::CbtPolicy::Strict,
            };
            Some(ChannelBinding {
                application_data: b.as_ref().clone(),
                policy,
            })
        });
        conn.ntlm = Some(Acceptor::new(binding));
        conn.ntlm_scheme = if scheme.eq_ignore_ascii_case("ntlm") {
            "NTLM".into()
        } else {
            "Negotiate".into()
        };
    }
    let accounts = &shared.accounts;
    let lookup = |name: &str| -> Lookup {
        match accounts.get(name) {
            None => Lookup::Unknown,
            Some(a) => match a.nt_hash.as_deref().and_then(parse_hex16) {
                Some(h) => Lookup::Found(h),
                None => Lookup::NoNtlm,
            },
        }
    };
    let Some(acceptor) = conn.ntlm.as_mut() else {
        return Err(challenge(shared, conn.tls_binding.is_some()));
    };
    match acceptor.step(&token, &lookup) {
        Ok(Step::Continue(out)) => {
            let mut r = empty(StatusCode::UNAUTHORIZED);
            if let Ok(v) =
                HeaderValue::from_str(&format!("{} {}", conn.ntlm_scheme, B64.encode(out)))
            {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            Err(r)
        }
        Ok(Step::Done { user, token }) => {
            tracing::info!(peer = %conn.peer, account = %user, "winrm login accepted (NTLM)");
            shared.throttle.success(conn.peer.ip());
            conn.ntlm_user = Some(user.clone());
            Ok((user, token))
        }
        Err(e) => {
            conn.ntlm = None;
            let user = e.user().unwrap_or("?").to_string();
            Err(refuse(conn, shared, &user, &e.to_string()).await)
        }
    }
}

fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    let s = s.trim();
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Recently verified Basic credentials, so that clients sending Basic on every request
/// (pywinrm) do not pay for an argon2id check each time. Entries hold a keyed hash of the
/// password, never the password, and only count while the account's password hash is
/// unchanged.
struct BasicCache {
    key: [u8; 32],
    entries: Mutex<HashMap<String, CachedLogin>>,
}

/// (keyed digest of user and password, the account's PHC hash then, when verified)
type CachedLogin = ([u8; 32], String, Instant);

impl Default for BasicCache {
    fn default() -> Self {
        use rand::RngExt;
        BasicCache {
            key: rand::rng().random(),
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl BasicCache {
    fn digest(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        h.update(self.key);
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn hit(&self, user: &str, password: &str, phc: &str) -> bool {
        let d = self.digest(user, password);
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.get(user).is_some_and(|(digest, hash, at)| {
            at.elapsed() < BASIC_CACHE_TTL && hash == phc && constant_eq(digest, &d)
        })
    }

    fn insert(&self, user: &str, password: &str, phc: &str) {
        let d = self.digest(user, password);
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= BASIC_CACHE_MAX {
            map.retain(|_, (_, _, at)| at.elapsed() < BASIC_CACHE_TTL);
            if map.len() >= BASIC_CACHE_MAX {
                map.clear();
            }
        }
        map.insert(user.to_string(), (d, phc.to_string(), Instant::now()));
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_cache_needs_same_password_and_hash() {
        let c = BasicCache::default();
        c.insert("alice", "pw", "$argon2id$a");
        assert!(c.hit("alice", "pw", "$argon2id$a"));
        assert!(!c.hit("alice", "other", "$argon2id$a"));
        assert!(!c.hit("alice", "pw", "$argon2id$b"));
        assert!(!c.hit("bob", "pw", "$argon2id$a"));
    }

    #[test]
    fn hex_and_content_types() {
        assert_eq!(parse_hex16(&"0a".repeat(16)), Some([10; 16]));
        assert_eq!(parse_hex16("zz"), None);
        assert!(is_soap("application/soap+xml;charset=UTF-8"));
        assert!(is_soap(" Application/SOAP+XML ; charset=utf-8"));
        assert!(!is_soap("text/xml"));
        assert_eq!(split_scheme("Negotiate  abc"), ("Negotiate", "abc"));
        assert_eq!(split_scheme("Negotiate"), ("Negotiate", ""));
    }
}
