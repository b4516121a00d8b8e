//! HTTP for WinRM (spec/winrm.md §1, §5): one hyper HTTP/1.1 connection per target (plain
//! TCP, or TLS for `winrms://`), kept for every request because NTLM authenticates the
//! connection, not the request. Basic sends its header on every request; NTLM runs its two
//! legs (raw NTLMSSP under the scheme `Negotiate`, empty bodies) when the connection opens,
//! and then over plain HTTP seals every SOAP body in the `multipart/encrypted` framing of
//! §5.3. When the server closed the connection between requests (keep-alive timeout), the
//! next request opens and authenticates a new one.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, USER_AGENT, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use remote_proto::wsman;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::ntlm::NtlmClient;
use super::tls::{Trust, channel_binding};
use super::{AuthMethod, WinrmError};
use crate::net::ConnectFailure;
use crate::target::{Scheme, Target};

/// `Content-Type` of a plain SOAP body.
pub const SOAP_CONTENT_TYPE: &str = "application/soap+xml;charset=UTF-8";

/// Largest response body read (responses are bounded by MaxEnvelopeSize, ~150 KB).
const MAX_RESPONSE: usize = 8 << 20;

/// Everything needed to open (and re-open) an authenticated connection.
pub struct Endpoint {
    pub target: Target,
    pub user: String,
    pub password: String,
    pub auth: AuthMethod,
    pub trust: Option<Trust>,
    pub connect_timeout: Duration,
}

impl Endpoint {
    pub fn addr(&self) -> String {
        self.target.host_port()
    }

    fn tls(&self) -> bool {
        self.target.scheme == Scheme::Winrms
    }

    fn listener_flag(&self) -> &'static str {
        if self.tls() {
            "--winrm-https"
        } else {
            "--winrm-http"
        }
    }
}

/// A plain HTTP response.
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One open HTTP connection.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
    /// The server's certificate (HTTPS).
    cert: Option<Vec<u8>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An authenticated connection to one WinRM endpoint.
pub struct Transport {
    endpoint: Endpoint,
    conn: Option<Conn>,
    /// The NTLM context of the current connection (NTLM only).
    ntlm: Option<NtlmClient>,
}

impl Transport {
    /// Connect and authenticate.
    pub async fn connect(endpoint: Endpoint) -> Result<Transport, WinrmError> {
        let mut t = Transport {
            endpoint,
            conn: None,
            ntlm: None,
        };
        t.open().await?;
        Ok(t)
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Open a connection and authenticate it (NTLM); Basic authenticates each request.
    async fn open(&mut self) -> Result<(), WinrmError> {
        self.conn = None;
        self.ntlm = None;
        let conn = connect(&self.endpoint).await?;
        self.conn = Some(conn);
        if self.endpoint.auth == AuthMethod::Ntlm {
            self.ntlm_handshake().await?;
        }
        Ok(())
    }

    fn base_request(&self, body: Bytes, content_type: &str) -> http::request::Builder {
        Request::builder()
            .method(Method::POST)
            .uri("/wsman")
            .header(HOST, self.endpoint.addr())
            .header(USER_AGENT, concat!("remote/", env!("CARGO_PKG_VERSION")))
            .header(CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
    }

    /// Send one request on the open connection and read the whole response.
    async fn exchange(
        &mut self,
        request: Request<Full<Bytes>>,
        what: &'static str,
        timeout: Duration,
    ) -> Result<Response, WinrmError> {
        let addr = self.endpoint.addr();
        let conn = self.conn.as_mut().ok_or_else(|| WinrmError::Lost {
            addr: addr.clone(),
            reason: "not connected".into(),
        })?;
        let io = async {
            conn.sender.ready().await?;
            let resp = conn.sender.send_request(request).await?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| LimitedError(e.to_string()))?
                .to_bytes();
            Ok::<_, ExchangeError>(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, io).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.conn = None;
                Err(match e {
                    ExchangeError::Hyper(e) => WinrmError::Lost {
                        addr,
                        reason: describe_hyper(&e),
                    },
                    ExchangeError::Body(LimitedError(reason)) => WinrmError::Lost {
                        addr,
                        reason: format!("reading the response: {reason}"),
                    },
                })
            }
            Err(_) => {
                self.conn = None;
                Err(WinrmError::Timeout {
                    addr,
                    what,
                    secs: timeout.as_secs().max(1),
                })
            }
        }
    }

    /// NTLM's two legs on the fresh connection (empty bodies, as pywinrm does before it
    /// encrypts): NEGOTIATE → 401 + CHALLENGE, AUTHENTICATE → 200.
    async fn ntlm_handshake(&mut self) -> Result<(), WinrmError> {
        let addr = self.endpoint.addr();
        let ntlm_err = |error| WinrmError::Ntlm {
            addr: addr.clone(),
            error,
        };
        let mut ctx = NtlmClient::new(
            &self.endpoint.user,
            &self.endpoint.password,
            &self.endpoint.target.host,
        )
        .map_err(ntlm_err)?;
        let negotiate = ctx.negotiate().map_err(ntlm_err)?;
        let timeout = self.endpoint.connect_timeout.max(Duration::from_secs(10));
        let req = self
            .base_request(Bytes::new(), SOAP_CONTENT_TYPE)
            .header(
                AUTHORIZATION,
                format!("Negotiate {}", B64.encode(&negotiate)),
            )
            .header(CONNECTION, "Keep-Alive")
            .body(Full::new(Bytes::new()))
            .map_err(|e| internal(&addr, e))?;
        let resp = self.exchange(req, "authentication", timeout).await?;
        if resp.status != StatusCode::UNAUTHORIZED {
            return Err(self.unexpected_auth_status(&resp));
        }
        let Some(challenge) = negotiate_token(&resp.headers) else {
            let offered = offered_schemes(&resp.headers);
            let basic_hint = if self.endpoint.tls() {
                "use --auth basic"
            } else {
                "use --auth basic with winrms://"
            };
            if offered
                .split(", ")
                .any(|s| s.eq_ignore_ascii_case("negotiate"))
            {
                // Offered, but our NEGOTIATE message got no CHALLENGE back.
                return Err(WinrmError::AuthRejected {
                    user: self.endpoint.user.clone(),
                    addr,
                    method: "NTLM",
                    hint: format!(
                        "the server offers Negotiate but answered the NTLM negotiation without a challenge \
                         (it may not support raw NTLM, or NTLM is disabled for this account); see the server's log, or {basic_hint}"
                    ),
                });
            }
            return Err(WinrmError::AuthNotOffered {
                addr,
                method: "NTLM (Negotiate)",
                offered,
                hint: basic_hint,
            });
        };
        let cb = self
            .conn
            .as_ref()
            .and_then(|c| c.cert.as_deref())
            .map(channel_binding);
        let authenticate = ctx
            .authenticate(&challenge, cb.as_deref())
            .map_err(ntlm_err)?;
        let req = self
            .base_request(Bytes::new(), SOAP_CONTENT_TYPE)
            .header(
                AUTHORIZATION,
                format!("Negotiate {}", B64.encode(&authenticate)),
            )
            .header(CONNECTION, "Keep-Alive")
            .body(Full::new(Bytes::new()))
            .map_err(|e| internal(&addr, e))?;
        let resp = self.exchange(req, "authentication", timeout).await?;
        match resp.status {
            s if s.is_success() => {
                self.ntlm = Some(ctx);
                tracing::debug!(%addr, user = %self.endpoint.user, "NTLM authenticated");
                Ok(())
            }
            StatusCode::UNAUTHORIZED => Err(WinrmError::AuthRejected {
                user: self.endpoint.user.clone(),
                addr,
                method: "NTLM",
                hint: "check the user name and password (REMOTE_PASSWORD, --password-stdin); \
                       on remote-agent the account needs a password (remote-agent user add NAME --password-stdin)"
                    .into(),
            }),
            _ => Err(self.unexpected_auth_status(&resp)),
        }
    }

    fn unexpected_auth_status(&self, resp: &Response) -> WinrmError {
        WinrmError::Status {
            addr: self.endpoint.addr(),
            what: "authentication",
            status: resp.status.as_u16(),
            detail: body_snippet(&resp.body),
        }
    }

    /// POST one SOAP envelope; returns the status and the (unsealed) response body.
    pub async fn post(
        &mut self,
        xml: &str,
        what: &'static str,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), WinrmError> {
        // An idle connection the server closed (keep-alive timeout) is replaced before
        // anything is sent on it, so no request is lost or sent twice.
        let usable = match self.conn.as_mut() {
            Some(c) if !c.sender.is_closed() => c.sender.ready().await.is_ok(),
            _ => false,
        };
        if !usable {
            tracing::debug!(addr = %self.endpoint.addr(), "connection closed; opening a new one");
            self.open().await?;
        }
        let addr = self.endpoint.addr();
        let seal = self.ntlm.is_some() && !self.endpoint.tls();
        let (body, content_type) = if seal {
            let Some(ctx) = self.ntlm.as_mut() else {
                return Err(internal(&addr, "no NTLM context"));
            };
            let (sig, sealed) = ctx.seal(xml.as_bytes()).map_err(|error| WinrmError::Ntlm {
                addr: addr.clone(),
                error,
            })?;
            (
                Bytes::from(wsman::build_encrypted(
                    wsman::SPNEGO_ENCRYPTED,
                    xml.len(),
                    &sig,
                    &sealed,
                )),
                wsman::encrypted_content_type(wsman::SPNEGO_ENCRYPTED),
            )
        } else {
            (Bytes::from(xml.to_string()), SOAP_CONTENT_TYPE.to_string())
        };
        let mut builder = self.base_request(body.clone(), &content_type);
        if self.endpoint.auth == AuthMethod::Basic {
            let token = B64.encode(format!("{}:{}", self.endpoint.user, self.endpoint.password));
            let mut value =
                HeaderValue::from_str(&format!("Basic {token}")).map_err(|e| internal(&addr, e))?;
            value.set_sensitive(true);
            builder = builder.header(AUTHORIZATION, value);
        }
        let req = builder
            .body(Full::new(body))
            .map_err(|e| internal(&addr, e))?;
        let resp = self.exchange(req, what, timeout).await?;
        if resp.status == StatusCode::UNAUTHORIZED {
            self.conn = None;
            return Err(self.rejected(&resp.headers));
        }
        let ct = resp
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if let Some(protocol) = wsman::encrypted_protocol(&ct) {
            let Some(ctx) = self.ntlm.as_mut() else {
                return Err(WinrmError::Protocol {
                    addr,
                    what,
                    detail: format!("an encrypted response ({protocol}) to a plain request"),
                });
            };
            let part = wsman::parse_encrypted(&resp.body).map_err(|e| WinrmError::Protocol {
                addr: addr.clone(),
                what,
                detail: e.to_string(),
            })?;
            let plain =
                ctx.unseal(part.signature, part.sealed)
                    .map_err(|error| WinrmError::Ntlm {
                        addr: addr.clone(),
                        error,
                    })?;
            if plain.len() != part.original_length {
                return Err(WinrmError::Protocol {
                    addr,
                    what,
                    detail: format!(
                        "the decrypted body has {} bytes, the framing announced {}",
                        plain.len(),
                        part.original_length
                    ),
                });
            }
            return Ok((resp.status, Bytes::from(plain)));
        }
        if seal && resp.status.is_success() {
            // A server that answers a sealed request in clear text is not doing what it
            // should; do not trust that body.
            return Err(WinrmError::Protocol {
                addr,
                what,
                detail: format!("a plain-text response ({ct}) to an encrypted request"),
            });
        }
        if resp.status == StatusCode::BAD_REQUEST && seal {
            self.conn = None;
            return Err(WinrmError::Status {
                addr,
                what,
                status: 400,
                detail: ": the server could not decrypt the request (the connection's NTLM context was lost); try again".into(),
            });
        }
        Ok((resp.status, resp.body))
    }

    /// A 401 to a request: the password was wrong, or (Basic over http://, when the 401 does
    /// not offer Basic) the server refuses Basic on an unencrypted connection.
    fn rejected(&self, headers: &HeaderMap) -> WinrmError {
        let e = &self.endpoint;
        let offered = offered_schemes(headers);
        if e.auth == AuthMethod::Basic
            && !e.tls()
            && !offered.split(", ").any(|s| s.eq_ignore_ascii_case("basic"))
        {
            return WinrmError::AuthNotOffered {
                addr: e.addr(),
                method: "Basic",
                offered,
                hint: "Basic authentication over http:// is refused by the server (remote-agent accepts it \
                       only when it runs with --allow-unencrypted). Use winrms://, or leave out --auth basic \
                       (NTLM encrypts over http://)",
            };
        }
        let (method, hint) = match e.auth {
            AuthMethod::Basic => (
                "Basic",
                format!(
                    "check the user name and password (REMOTE_PASSWORD, --password-stdin); \
                     on remote-agent the account needs a password (remote-agent user add {} --password-stdin)",
                    e.user
                ),
            ),
            AuthMethod::Ntlm => (
                "NTLM",
                "the server dropped the connection's authentication; try again".to_string(),
            ),
        };
        WinrmError::AuthRejected {
            user: e.user.clone(),
            addr: e.addr(),
            method,
            hint,
        }
    }
}

enum ExchangeError {
    Hyper(hyper::Error),
    Body(LimitedError),
}

struct LimitedError(String);

impl From<hyper::Error> for ExchangeError {
    fn from(e: hyper::Error) -> Self {
        ExchangeError::Hyper(e)
    }
}

impl From<LimitedError> for ExchangeError {
    fn from(e: LimitedError) -> Self {
        ExchangeError::Body(e)
    }
}

fn internal(addr: &str, e: impl std::fmt::Display) -> WinrmError {
    WinrmError::Internal {
        addr: addr.to_string(),
        detail: e.to_string(),
    }
}

fn describe_hyper(e: &hyper::Error) -> String {
    use std::error::Error as _;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_incomplete_message() || e.is_closed() {
        text.push_str(" (the server closed the connection)");
    }
    text
}

/// The first bytes of a body, for messages: `: "…"`, or empty.
pub fn body_snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        return String::new();
    }
    let mut cut = text.len().min(300);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        ": \"{}{}\"",
        &text[..cut],
        if cut < text.len() { "…" } else { "" }
    )
}

/// The token of a `WWW-Authenticate: Negotiate <b64>` (or `NTLM <b64>`) header.
pub fn negotiate_token(headers: &HeaderMap) -> Option<Vec<u8>> {
    for value in headers.get_all(WWW_AUTHENTICATE) {
        let Ok(value) = value.to_str() else { continue };
        for part in value.split(',') {
            let part = part.trim();
            let Some((scheme, token)) = part.split_once(' ') else {
                continue;
            };
            if (scheme.eq_ignore_ascii_case("negotiate") || scheme.eq_ignore_ascii_case("ntlm"))
                && let Ok(bytes) = B64.decode(token.trim())
                && !bytes.is_empty()
            {
                return Some(bytes);
            }
        }
    }
    None
}

/// The schemes a 401 offers, for messages (`Negotiate, Basic`), or `none`.
pub fn offered_schemes(headers: &HeaderMap) -> String {
    let mut out: Vec<String> = Vec::new();
    for value in headers.get_all(WWW_AUTHENTICATE) {
        if let Ok(v) = value.to_str() {
            let scheme = v.split_whitespace().next().unwrap_or_default().to_string();
            if !scheme.is_empty() && !out.contains(&scheme) {
                out.push(scheme);
            }
        }
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

/// TCP (+ TLS) + HTTP/1.1 handshake.
async fn connect(endpoint: &Endpoint) -> Result<Conn, WinrmError> {
    let target = &endpoint.target;
    let addr = endpoint.addr();
    let tcp = tcp_connect(
        target,
        &addr,
        endpoint.connect_timeout,
        endpoint.listener_flag(),
    )
    .await?;
    match &endpoint.trust {
        Some(trust) if endpoint.tls() => {
            let (tls, cert) = trust
                .connect(tcp, &target.host, &addr, endpoint.connect_timeout)
                .await?;
            let (sender, task) = handshake(tls, &addr).await?;
            Ok(Conn {
                sender,
                task,
                cert: Some(cert),
            })
        }
        _ => {
            let (sender, task) = handshake(tcp, &addr).await?;
            Ok(Conn {
                sender,
                task,
                cert: None,
            })
        }
    }
}

async fn handshake<T>(
    io: T,
    addr: &str,
) -> Result<(SendRequest<Full<Bytes>>, tokio::task::JoinHandle<()>), WinrmError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) =
        http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| WinrmError::Lost {
                addr: addr.to_string(),
                reason: describe_hyper(&e),
            })?;
    let a = addr.to_string();
    let task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(addr = %a, "HTTP connection ended: {e}");
        }
    });
    Ok((sender, task))
}

async fn tcp_connect(
    target: &Target,
    addr: &str,
    timeout: Duration,
    flag: &'static str,
) -> Result<TcpStream, WinrmError> {
    crate::net::connect(&target.host, target.port, timeout)
        .await
        .map_err(|failure| match failure {
            ConnectFailure::Resolve(reason) => WinrmError::Resolve {
                host: target.host.clone(),
                reason,
            },
            ConnectFailure::Refused => WinrmError::Refused {
                addr: addr.into(),
                flag,
            },
            ConnectFailure::Timeout => WinrmError::ConnectTimeout {
                addr: addr.into(),
                port: target.port,
                secs: timeout.as_secs().max(1),
            },
            ConnectFailure::Io(error) => WinrmError::Connect {
                addr: addr.into(),
                error,
            },
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiate_tokens_and_schemes() {
        let mut h = HeaderMap::new();
        h.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"WSMAN\""),
        );
        assert_eq!(negotiate_token(&h), None);
        h.append(WWW_AUTHENTICATE, HeaderValue::from_static("Negotiate"));
        assert_eq!(negotiate_token(&h), None);
        assert_eq!(offered_schemes(&h), "Basic, Negotiate");
        h.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Negotiate TlRMTVNTUAAC"),
        );
        assert_eq!(negotiate_token(&h).unwrap(), b"NTLMSSP\0\x02".to_vec());
        assert_eq!(offered_schemes(&HeaderMap::new()), "none");
    }

    #[test]
    fn snippets_are_short() {
        assert_eq!(body_snippet(b""), "");
        assert_eq!(body_snippet(b" a\n b "), ": \"a b\"");
        let long = "é".repeat(400);
        let s = body_snippet(long.as_bytes());
        assert!(s.ends_with("…\"") && s.len() < 320);
    }
}
