//! WS-Management SOAP layer of the WinRM server (spec: `winrm.md` §2–§4, §7).
//!
//! This module owns the envelope: it parses a request body into a typed [`Request`]
//! (header fields of §2.2 and the cmd-shell bodies of §3), enforces hard parser limits
//! (nesting depth, element/attribute counts, base64 sizes; DOCTYPE/DTDs and entities other
//! than the five predefined ones are refused), maps every parse problem to a WS-Man fault
//! (§4) and serializes the response envelopes (§2.3 header + §3 bodies + faults).
//!
//! It does not own transport (HTTP, size limit of the whole body, encryption), shell state or
//! processes: the caller checks the body size first, then calls [`parse_request`], dispatches
//! on [`Body`], and answers with one of the `*_response` functions (or [`fault_response`]
//! with HTTP 500).
//!
//! Namespaces are matched by URI, never by prefix (quick-xml's `NsReader` resolves them);
//! attributes are matched by local name when unprefixed (`Name`, `CommandId`, `End`, …),
//! prefixed attributes (`s:mustUnderstand`, `xml:lang`) are ignored.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;

pub use remote_proto::wsman::{
    ACTION_COMMAND, ACTION_CREATE, ACTION_DELETE, ACTION_FAULT, ACTION_RECEIVE, ACTION_SEND,
    ACTION_SIGNAL, ANONYMOUS, CODE_INVALID_PARAMETER, CODE_INVALID_SELECTORS, CODE_TIMED_OUT,
    NS_ADDRESSING, NS_MS_WSMAN, NS_SHELL, NS_SOAP, NS_TRANSFER, NS_WMI_ERROR, NS_WSMAN,
    NS_WSMAN_FAULT, RESOURCE_CMD,
};

/// PowerShell namespace (`creationXml`).
pub const NS_POWERSHELL: &str = "http://schemas.microsoft.com/powershell";

const STATE_PREFIX: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/";
const SIGNAL_PREFIX: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/";

/// Longest value quoted inside an error message.
const ERR_VALUE_MAX: usize = 120;

/// Hard limits applied by the parser. Everything a peer can make us allocate is bounded by
/// the input length and by these numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Absolute cap on the input length (the caller normally enforces a smaller one).
    pub max_input_bytes: usize,
    /// Maximum element nesting depth (the Envelope is depth 1).
    pub max_depth: usize,
    /// Maximum number of elements in the document.
    pub max_elements: usize,
    /// Maximum number of attributes (including `xmlns` declarations) on one element.
    pub max_attributes: usize,
    /// Maximum number of namespace bindings in scope at once.
    pub max_namespace_bindings: usize,
    /// Maximum length of one base64 text (a `rsp:Stream`), in characters.
    pub max_base64_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_input_bytes: 16 * 1024 * 1024,
            max_depth: 64,
            max_elements: 10_000,
            max_attributes: 32,
            max_namespace_bindings: 64,
            max_base64_len: 8 * 1024 * 1024,
        }
    }
}

/// A parse/validation failure. [`SoapError::fault`] gives the fault to send (§4).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SoapError {
    /// The body is not UTF-8.
    #[error("request envelope is not valid UTF-8")]
    NotUtf8,
    /// XML syntax / well-formedness error.
    #[error("malformed XML: {0}")]
    Malformed(String),
    /// A DOCTYPE (DTD) was present; refused to rule out entity expansion attacks.
    #[error("DOCTYPE declarations are not allowed")]
    Doctype,
    /// An entity reference other than the five predefined ones or a character reference.
    #[error("unknown entity reference &{0};")]
    UnknownEntity(String),
    /// A hard parser limit was exceeded.
    #[error("{what} limit exceeded (limit {limit})")]
    Limit {
        /// Which limit.
        what: &'static str,
        /// Its value.
        limit: usize,
    },
    /// An element was found with the right local name but a wrong namespace URI.
    #[error("element {element} is in namespace {found:?}, expected {expected}")]
    WrongNamespace {
        /// Local name of the element.
        element: &'static str,
        /// Expected namespace URI.
        expected: &'static str,
        /// Namespace URI found (`None` = no namespace).
        found: Option<String>,
    },
    /// A required element or attribute is missing.
    #[error("missing required {0}")]
    Missing(&'static str),
    /// A value could not be parsed.
    #[error("invalid value for {field}: {value:?}")]
    InvalidValue {
        /// Which field.
        field: &'static str,
        /// The (possibly truncated) offending value.
        value: String,
    },
    /// No (or empty) `a:Action` header.
    #[error("missing a:Action header")]
    MissingAction,
    /// The action is not supported (the parser itself returns [`Body::Other`]; the server
    /// uses this variant to build the fault).
    #[error("action not supported: {0}")]
    ActionNotSupported(String),
    /// The operation needs a `ShellId` selector and there is none.
    #[error("missing ShellId selector")]
    MissingShellId,
}

/// WSManFault code: action not supported.
pub const CODE_ACTION_NOT_SUPPORTED: u64 = 2_150_858_771;
/// WSManFault code: destination unreachable (unknown ResourceURI).
pub const CODE_DESTINATION_UNREACHABLE: u64 = 2_150_858_752;
/// WSManFault code: schema validation error (malformed request).
pub const CODE_SCHEMA_VALIDATION: u64 = 2_150_858_817;
/// WSManFault code: unsupported MustComply option.
pub const CODE_INVALID_OPTIONS: u64 = 2_150_858_809;
/// WSManFault code: request envelope over a limit.
pub const CODE_ENCODING_LIMIT: u64 = 2_150_858_825;
/// WSManFault code: access denied.
pub const CODE_ACCESS_DENIED: u64 = 5;
/// WSManFault code: too many shells for this user.
pub const CODE_QUOTA_SHELLS: u64 = 2_150_859_173;
/// WSManFault code: too many operations (processes) in this shell.
pub const CODE_QUOTA_OPERATIONS: u64 = 2_150_859_174;

impl SoapError {
    /// The fault the server answers with (HTTP 500).
    pub fn fault(&self) -> Fault {
        let reason = self.to_string();
        match self {
            SoapError::Limit { .. } => {
                Fault::new("s:Sender", "w:EncodingLimit", reason, CODE_ENCODING_LIMIT)
            }
            SoapError::MissingAction | SoapError::ActionNotSupported(_) => Fault::new(
                "s:Sender",
                "a:ActionNotSupported",
                reason,
                CODE_ACTION_NOT_SUPPORTED,
            ),
            SoapError::MissingShellId => Fault::new(
                "s:Sender",
                "w:InvalidSelectors",
                reason,
                CODE_INVALID_SELECTORS,
            ),
            SoapError::NotUtf8
            | SoapError::Malformed(_)
            | SoapError::Doctype
            | SoapError::UnknownEntity(_)
            | SoapError::WrongNamespace { .. }
            | SoapError::Missing(_)
            | SoapError::InvalidValue { .. } => Fault::new(
                "s:Sender",
                "w:SchemaValidationError",
                reason,
                CODE_SCHEMA_VALIDATION,
            ),
        }
    }
}

/// A WS-Management fault (§4), serialized by [`fault_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// `s:Code/s:Value`: `s:Sender` or `s:Receiver`.
    pub code: &'static str,
    /// `s:Code/s:Subcode/s:Value`, e.g. `w:TimedOut` (prefix `w` or `a`, declared by the writer).
    pub subcode: &'static str,
    /// `s:Reason/s:Text` and `f:Message`.
    pub reason: String,
    /// `f:WSManFault/@Code` (decimal HRESULT or Win32 code).
    pub wsman_code: u64,
    /// `f:WSManFault/@Machine`.
    pub machine: String,
    /// When set, an `MSFT_WmiError/error_Code` element is added to `s:Detail` (§3.7).
    pub wmi_error_code: Option<u64>,
}

impl Fault {
    /// A fault with `Machine="localhost"` and no `MSFT_WmiError`.
    pub fn new(
        code: &'static str,
        subcode: &'static str,
        reason: impl Into<String>,
        wsman_code: u64,
    ) -> Self {
        Self {
            code,
            subcode,
            reason: reason.into(),
            wsman_code,
            machine: "localhost".to_owned(),
            wmi_error_code: None,
        }
    }

    /// Replaces the reason text (`s:Reason/s:Text` and `f:Message`).
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = reason.into();
        self
    }

    /// Sets `f:WSManFault/@Machine`.
    pub fn with_machine(mut self, machine: impl Into<String>) -> Self {
        self.machine = machine.into();
        self
    }

    /// OperationTimeout elapsed (Receive long-poll, §1.6).
    pub fn timed_out() -> Self {
        Self::new(
            "s:Receiver",
            "w:TimedOut",
            "The WS-Management operation did not complete within the OperationTimeout.",
            CODE_TIMED_OUT,
        )
    }

    /// Shell missing/unknown/foreign/deleted.
    pub fn shell_not_found(shell_id: &str) -> Self {
        Self::new(
            "s:Sender",
            "w:InvalidSelectors",
            format!(
                "The request for the Windows Remote Shell with ShellId {} failed because the shell was not found on the server.",
                truncate(shell_id)
            ),
            CODE_INVALID_SELECTORS,
        )
    }

    /// Unknown CommandId, unknown signal code, …
    pub fn invalid_parameter(reason: impl Into<String>) -> Self {
        Self::new(
            "s:Sender",
            "w:InvalidParameter",
            reason,
            CODE_INVALID_PARAMETER,
        )
    }

    /// Unknown/unsupported Action (answer to [`Body::Other`]).
    pub fn action_not_supported(action: &str) -> Self {
        SoapError::ActionNotSupported(truncate(action)).fault()
    }

    /// Unknown ResourceURI.
    pub fn destination_unreachable(resource_uri: &str) -> Self {
        Self::new(
            "s:Sender",
            "a:DestinationUnreachable",
            format!(
                "The resource URI {} is not supported.",
                truncate(resource_uri)
            ),
            CODE_DESTINATION_UNREACHABLE,
        )
    }

    /// A `MustComply="true"` option that is not supported.
    pub fn invalid_options(name: &str) -> Self {
        Self::new(
            "s:Sender",
            "w:InvalidOptions",
            format!("The option {} is not supported.", truncate(name)),
            CODE_INVALID_OPTIONS,
        )
    }

    /// Request envelope over the server's size limit.
    pub fn encoding_limit(reason: impl Into<String>) -> Self {
        Self::new("s:Sender", "w:EncodingLimit", reason, CODE_ENCODING_LIMIT)
    }

    /// Authenticated but not authorised.
    pub fn access_denied() -> Self {
        Self::new(
            "s:Sender",
            "w:AccessDenied",
            "Access is denied.",
            CODE_ACCESS_DENIED,
        )
    }

    /// Too many shells for this user (§3.7).
    pub fn quota_shells() -> Self {
        Self::new(
            "s:Receiver",
            "w:QuotaLimit",
            "The maximum number of concurrent shells for this user has been exceeded.",
            CODE_QUOTA_SHELLS,
        )
    }

    /// Too many operations in this shell; carries `MSFT_WmiError` so Ansible recreates the shell.
    pub fn quota_operations() -> Self {
        let mut f = Self::new(
            "s:Receiver",
            "w:QuotaLimit",
            "The maximum number of concurrent operations for this user has been exceeded.",
            CODE_QUOTA_OPERATIONS,
        );
        f.wmi_error_code = Some(CODE_QUOTA_OPERATIONS);
        f
    }

    /// Spawn failure, bad working directory, … `win32_code` e.g. 2, 5, 267.
    pub fn internal_error(win32_code: u64, reason: impl Into<String>) -> Self {
        Self::new("s:Receiver", "w:InternalError", reason, win32_code)
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Header fields.
    pub header: Header,
    /// The operation.
    pub body: Body,
}

/// One `w:Option` of the `w:OptionSet`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsOption {
    /// Text value (trimmed).
    pub value: String,
    /// `MustComply="true"` was set.
    pub must_comply: bool,
}

/// Request header fields (§2.2). Unknown headers are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    /// `a:Action` (trimmed; required).
    pub action: String,
    /// `a:To` (not validated; pywinrm hard-codes it).
    pub to: Option<String>,
    /// `w:ResourceURI`.
    pub resource_uri: Option<String>,
    /// `a:MessageID`, verbatim (trimmed) — echo it in `a:RelatesTo`. Required.
    pub message_id: String,
    /// `a:ReplyTo/a:Address`.
    pub reply_to: Option<String>,
    /// `w:MaxEnvelopeSize`: the largest response envelope the client accepts.
    pub max_envelope_size: Option<u64>,
    /// `w:OperationTimeout` (xs:duration); `None` when absent (caller applies its default).
    pub operation_timeout: Option<Duration>,
    /// `p:SessionId` (MS-WSMV).
    pub session_id: Option<String>,
    /// `w:SelectorSet/w:Selector[@Name="ShellId"]`.
    pub shell_id: Option<String>,
    /// `w:OptionSet/w:Option`, by `Name` (first occurrence wins).
    pub options: BTreeMap<String, WsOption>,
}

impl Header {
    /// Value of an option, by name (exact match first, then ASCII case-insensitive).
    pub fn option(&self, name: &str) -> Option<&str> {
        if let Some(o) = self.options.get(name) {
            return Some(&o.value);
        }
        self.options
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, o)| o.value.as_str())
    }

    /// Boolean option (`TRUE`/`True`/`true`/`1`, `FALSE`/…/`0`); `None` if absent or not boolean.
    pub fn option_bool(&self, name: &str) -> Option<bool> {
        self.option(name).and_then(parse_bool)
    }
}

/// `rsp:Shell` of a Create request (§3.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateShell {
    /// Client-chosen `ShellId` attribute (pypsrp).
    pub shell_id: Option<String>,
    /// `rsp:Name` (pypsrp).
    pub name: Option<String>,
    /// `rsp:InputStreams`, whitespace-separated.
    pub input_streams: Vec<String>,
    /// `rsp:OutputStreams`, whitespace-separated.
    pub output_streams: Vec<String>,
    /// `rsp:WorkingDirectory`, verbatim.
    pub working_directory: Option<String>,
    /// `rsp:Environment/rsp:Variable`, (Name, verbatim value) in document order.
    pub environment: Vec<(String, String)>,
    /// `rsp:IdleTimeOut`, leniently parsed (xs:duration or bare seconds); `None` if absent or
    /// unparsable.
    pub idle_timeout: Option<Duration>,
    /// `creationXml` (PowerShell namespace) text: base64 PSRP fragments, undecoded.
    pub creation_xml: Option<String>,
}

/// One `rsp:Stream` of a Send request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendStream {
    /// `Name` (`stdin`, or `pr` for PSRP).
    pub name: String,
    /// `CommandId` (absent for PSRP pool-level sends).
    pub command_id: Option<String>,
    /// `End="true"` (any case).
    pub end: bool,
    /// Base64-decoded content.
    pub data: Vec<u8>,
}

/// `rsp:Signal/rsp:Code`, compared case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalCode {
    /// `S/signal/terminate`.
    Terminate,
    /// `S/signal/ctrl_c`, and PSRP's `powershell/signal/ctrl_c` (also misspelt `crtl_c`).
    CtrlC,
    /// `S/signal/ctrl_break`.
    CtrlBreak,
    /// Anything else, verbatim (trimmed); the server answers `w:InvalidParameter`.
    Other(String),
}

/// The operation requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Create a shell.
    Create(CreateShell),
    /// Start a command (`rsp:CommandLine`).
    Command {
        /// Client-supplied `CommandId` attribute (PSRP).
        command_id: Option<String>,
        /// `rsp:Command` text, verbatim (may be empty).
        command: String,
        /// `rsp:Arguments` texts, verbatim, in order.
        arguments: Vec<String>,
    },
    /// Send input.
    Send {
        /// CommandId of the first stream (convenience).
        command_id: Option<String>,
        /// All `rsp:Stream` elements.
        streams: Vec<SendStream>,
    },
    /// Receive output.
    Receive {
        /// `rsp:DesiredStream/@CommandId` (absent = shell-level receive, PSRP).
        command_id: Option<String>,
        /// `rsp:DesiredStream` text, whitespace-separated.
        streams: Vec<String>,
        /// `rsp:Receive/@SequenceId`.
        sequence_id: Option<u64>,
    },
    /// Signal a command.
    Signal {
        /// `rsp:Signal/@CommandId`.
        command_id: Option<String>,
        /// `rsp:Code`.
        code: SignalCode,
    },
    /// Delete the shell.
    Delete,
    /// Any other action (answer with [`Fault::action_not_supported`] unless implemented).
    Other {
        /// The action URI.
        action: String,
    },
}

/// Parses a request envelope with the default [`Limits`].
pub fn parse_request(body: &[u8]) -> Result<Request, SoapError> {
    parse_request_with_limits(body, &Limits::default())
}

/// Parses a request envelope with explicit [`Limits`].
pub fn parse_request_with_limits(body: &[u8], limits: &Limits) -> Result<Request, SoapError> {
    let root = parse_tree(body, limits)?;
    let (header_node, body_node) = envelope_parts(&root)?;
    let header = parse_header(header_node)?;
    let body = parse_body(&header, body_node, limits)?;
    Ok(Request { header, body })
}

/// Best effort: the `a:MessageID` of a request that may otherwise be invalid, so a fault for
/// it can still carry `a:RelatesTo`. `None` if the XML itself is unusable.
pub fn request_message_id(body: &[u8]) -> Option<String> {
    let root = parse_tree(body, &Limits::default()).ok()?;
    let (header, _) = envelope_parts(&root).ok()?;
    let header = header?;
    header
        .child(Ns::Addressing, "MessageID")
        .map(|n| n.text.trim().to_owned())
        .filter(|s| !s.is_empty())
}

// ---------------------------------------------------------------------------------------
// Bounded tree builder
// ---------------------------------------------------------------------------------------

/// Known namespaces; anything else is `Other`, no namespace is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ns {
    None,
    Soap,
    Addressing,
    Wsman,
    MsWsman,
    Shell,
    Powershell,
    Other,
}

impl Ns {
    fn from_uri(uri: &str) -> Ns {
        match uri {
            NS_SOAP => Ns::Soap,
            NS_ADDRESSING => Ns::Addressing,
            NS_WSMAN => Ns::Wsman,
            NS_MS_WSMAN => Ns::MsWsman,
            NS_SHELL => Ns::Shell,
            NS_POWERSHELL => Ns::Powershell,
            _ => Ns::Other,
        }
    }

    fn uri(self) -> &'static str {
        match self {
            Ns::None => "",
            Ns::Soap => NS_SOAP,
            Ns::Addressing => NS_ADDRESSING,
            Ns::Wsman => NS_WSMAN,
            Ns::MsWsman => NS_MS_WSMAN,
            Ns::Shell => NS_SHELL,
            Ns::Powershell => NS_POWERSHELL,
            Ns::Other => "(other)",
        }
    }
}

#[derive(Debug)]
struct Node {
    ns: Ns,
    /// Namespace URI when `ns == Ns::Other` (for error messages).
    other_uri: Option<String>,
    local: String,
    /// Unprefixed attributes (name, normalized value).
    attrs: Vec<(String, String)>,
    /// Concatenated direct character data (entities resolved).
    text: String,
    children: Vec<Node>,
}

impl Node {
    fn is(&self, ns: Ns, local: &str) -> bool {
        self.ns == ns && self.local == local
    }

    fn child(&self, ns: Ns, local: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.is(ns, local))
    }

    fn children_named<'a>(&'a self, ns: Ns, local: &'a str) -> impl Iterator<Item = &'a Node> {
        self.children.iter().filter(move |c| c.is(ns, local))
    }

    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn found_ns(&self) -> Option<String> {
        match self.ns {
            Ns::None => None,
            Ns::Other => self.other_uri.clone(),
            ns => Some(ns.uri().to_owned()),
        }
    }

    /// A required child; reports a wrong namespace if the local name matches elsewhere.
    fn required_child(&self, ns: Ns, local: &'static str) -> Result<&Node, SoapError> {
        if let Some(c) = self.child(ns, local) {
            return Ok(c);
        }
        match self.children.iter().find(|c| c.local == local) {
            Some(c) => Err(SoapError::WrongNamespace {
                element: local,
                expected: ns.uri(),
                found: c.found_ns(),
            }),
            None => Err(SoapError::Missing(local)),
        }
    }
}

fn malformed(e: impl std::fmt::Display) -> SoapError {
    SoapError::Malformed(truncate(&e.to_string()))
}

fn truncate(s: &str) -> String {
    if s.len() <= ERR_VALUE_MAX {
        return s.to_owned();
    }
    let mut end = ERR_VALUE_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn resolve_entity(name: &str) -> Option<char> {
    match name {
        "lt" => Some('<'),
        "gt" => Some('>'),
        "amp" => Some('&'),
        "apos" => Some('\''),
        "quot" => Some('"'),
        _ => None,
    }
}

fn parse_tree(body: &[u8], limits: &Limits) -> Result<Node, SoapError> {
    if body.len() > limits.max_input_bytes {
        return Err(SoapError::Limit {
            what: "input size",
            limit: limits.max_input_bytes,
        });
    }
    let text = std::str::from_utf8(body).map_err(|_| SoapError::NotUtf8)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = NsReader::from_str(text);
    {
        let cfg = reader.config_mut();
        cfg.check_end_names = true;
        cfg.expand_empty_elements = false;
        cfg.allow_unmatched_ends = false;
        cfg.allow_dangling_amp = false;
    }
    reader
        .resolver_mut()
        .set_max_namespace_bindings(limits.max_namespace_bindings);

    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let mut elements = 0usize;

    loop {
        let (resolved, event) = reader.read_resolved_event().map_err(|e| match e {
            quick_xml::Error::Namespace(quick_xml::name::NamespaceError::TooManyBindings(_)) => {
                SoapError::Limit {
                    what: "namespace bindings",
                    limit: limits.max_namespace_bindings,
                }
            }
            quick_xml::Error::Namespace(quick_xml::name::NamespaceError::TooDeeplyNested(_)) => {
                SoapError::Limit {
                    what: "nesting depth",
                    limit: limits.max_depth,
                }
            }
            other => malformed(other),
        })?;
        let ns = match (&event, resolved) {
            (Event::Start(_) | Event::Empty(_), ResolveResult::Bound(ns)) => {
                let uri = ns.into_inner();
                let known = Ns::from_uri(uri);
                let other = (known == Ns::Other).then(|| truncate(uri));
                Some((known, other))
            }
            (Event::Start(_) | Event::Empty(_), ResolveResult::Unbound) => Some((Ns::None, None)),
            (Event::Start(_) | Event::Empty(_), ResolveResult::Unknown(p)) => {
                return Err(SoapError::Malformed(format!(
                    "undeclared namespace prefix {:?}",
                    truncate(&p)
                )));
            }
            _ => None,
        };
        match event {
            Event::Start(ref start) | Event::Empty(ref start) => {
                let is_empty = matches!(event, Event::Empty(_));
                if root.is_some() {
                    return Err(SoapError::Malformed(
                        "content after the root element".into(),
                    ));
                }
                elements += 1;
                if elements > limits.max_elements {
                    return Err(SoapError::Limit {
                        what: "element count",
                        limit: limits.max_elements,
                    });
                }
                if stack.len() + 1 > limits.max_depth {
                    return Err(SoapError::Limit {
                        what: "nesting depth",
                        limit: limits.max_depth,
                    });
                }
                let (ns, other_uri) = ns.unwrap_or((Ns::None, None));
                let node = new_node(start, ns, other_uri, limits)?;
                if is_empty {
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(node),
                        None => root = Some(node),
                    }
                } else {
                    stack.push(node);
                }
            }
            Event::End(_) => {
                let node = stack
                    .pop()
                    .ok_or_else(|| SoapError::Malformed("unmatched end tag".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => root = Some(node),
                }
            }
            Event::Text(t) => {
                let content = t.xml10_content();
                match stack.last_mut() {
                    Some(node) => node.text.push_str(&content),
                    None => {
                        if !content.trim().is_empty() {
                            return Err(SoapError::Malformed(
                                "text outside the root element".into(),
                            ));
                        }
                    }
                }
            }
            Event::CData(t) => {
                let content = t.xml10_content();
                match stack.last_mut() {
                    Some(node) => node.text.push_str(&content),
                    None => {
                        return Err(SoapError::Malformed(
                            "CDATA outside the root element".into(),
                        ));
                    }
                }
            }
            Event::GeneralRef(r) => {
                let ch = match r.resolve_char_ref().map_err(malformed)? {
                    Some(c) => c,
                    None => {
                        let name = r.into_inner();
                        resolve_entity(&name)
                            .ok_or_else(|| SoapError::UnknownEntity(truncate(&name)))?
                    }
                };
                match stack.last_mut() {
                    Some(node) => node.text.push(ch),
                    None => {
                        return Err(SoapError::Malformed(
                            "reference outside the root element".into(),
                        ));
                    }
                }
            }
            Event::DocType(_) => return Err(SoapError::Doctype),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(SoapError::Malformed("unexpected end of document".into()));
    }
    root.ok_or_else(|| SoapError::Malformed("no root element".into()))
}

fn new_node(
    start: &BytesStart<'_>,
    ns: Ns,
    other_uri: Option<String>,
    limits: &Limits,
) -> Result<Node, SoapError> {
    let mut attrs = Vec::new();
    let mut count = 0usize;
    for attr in start.attributes() {
        let attr = attr.map_err(malformed)?;
        count += 1;
        if count > limits.max_attributes {
            return Err(SoapError::Limit {
                what: "attribute count",
                limit: limits.max_attributes,
            });
        }
        let key = attr.key;
        if attr.value.contains('<') {
            return Err(SoapError::Malformed("'<' in an attribute value".into()));
        }
        if key.prefix().is_some() || key.as_ref() == "xmlns" {
            // xmlns declarations (handled by the resolver), s:mustUnderstand, xml:lang, …
            continue;
        }
        let value = attr
            .normalized_value_with(quick_xml::XmlVersion::Implicit1_0, 1, |name| {
                // Only the predefined entities; anything else fails below.
                match name {
                    "lt" => Some("<"),
                    "gt" => Some(">"),
                    "amp" => Some("&"),
                    "apos" => Some("'"),
                    "quot" => Some("\""),
                    _ => None,
                }
            })
            .map_err(|e| match e {
                quick_xml::Error::Escape(quick_xml::escape::EscapeError::UnrecognizedEntity(
                    _,
                    name,
                )) => SoapError::UnknownEntity(truncate(&name)),
                other => malformed(other),
            })?;
        attrs.push((key.as_ref().to_owned(), value.into_owned()));
    }
    Ok(Node {
        ns,
        other_uri,
        local: start.local_name().as_ref().to_owned(),
        attrs,
        text: String::new(),
        children: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------
// Envelope / header / body interpretation
// ---------------------------------------------------------------------------------------

fn envelope_parts(root: &Node) -> Result<(Option<&Node>, &Node), SoapError> {
    if root.local != "Envelope" {
        return Err(SoapError::Missing("Envelope"));
    }
    if root.ns != Ns::Soap {
        return Err(SoapError::WrongNamespace {
            element: "Envelope",
            expected: NS_SOAP,
            found: root.found_ns(),
        });
    }
    let header = match root.required_child(Ns::Soap, "Header") {
        Ok(h) => Some(h),
        Err(SoapError::Missing(_)) => None,
        Err(e) => return Err(e),
    };
    let body = root.required_child(Ns::Soap, "Body")?;
    Ok((header, body))
}

fn trimmed(node: &Node) -> String {
    node.text.trim().to_owned()
}

fn opt_text(parent: &Node, ns: Ns, local: &str) -> Option<String> {
    parent.child(ns, local).map(trimmed)
}

fn invalid(field: &'static str, value: &str) -> SoapError {
    SoapError::InvalidValue {
        field,
        value: truncate(value),
    }
}

fn parse_header(header: Option<&Node>) -> Result<Header, SoapError> {
    let header = header.ok_or(SoapError::MissingAction)?;
    let action = match header.required_child(Ns::Addressing, "Action") {
        Ok(a) => trimmed(a),
        Err(SoapError::Missing(_)) => return Err(SoapError::MissingAction),
        Err(e) => return Err(e),
    };
    if action.is_empty() {
        return Err(SoapError::MissingAction);
    }
    let message_id = trimmed(header.required_child(Ns::Addressing, "MessageID")?);
    if message_id.is_empty() {
        return Err(SoapError::Missing("MessageID"));
    }
    let max_envelope_size = match opt_text(header, Ns::Wsman, "MaxEnvelopeSize") {
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| invalid("MaxEnvelopeSize", &v))?,
        ),
        None => None,
    };
    let operation_timeout = match opt_text(header, Ns::Wsman, "OperationTimeout") {
        Some(v) => Some(parse_duration(&v).ok_or_else(|| invalid("OperationTimeout", &v))?),
        None => None,
    };
    let shell_id = header.child(Ns::Wsman, "SelectorSet").and_then(|set| {
        set.children_named(Ns::Wsman, "Selector")
            .find(|s| {
                s.attr("Name")
                    .is_some_and(|n| n.eq_ignore_ascii_case("ShellId"))
            })
            .map(trimmed)
            .filter(|s| !s.is_empty())
    });
    let mut options = BTreeMap::new();
    if let Some(set) = header.child(Ns::Wsman, "OptionSet") {
        for opt in set.children_named(Ns::Wsman, "Option") {
            let name = opt.attr("Name").ok_or(SoapError::Missing("Option/@Name"))?;
            let must_comply = opt.attr("MustComply").and_then(parse_bool).unwrap_or(false);
            options.entry(name.to_owned()).or_insert_with(|| WsOption {
                value: trimmed(opt),
                must_comply,
            });
        }
    }
    Ok(Header {
        action,
        to: opt_text(header, Ns::Addressing, "To"),
        resource_uri: opt_text(header, Ns::Wsman, "ResourceURI"),
        message_id,
        reply_to: header
            .child(Ns::Addressing, "ReplyTo")
            .and_then(|r| opt_text(r, Ns::Addressing, "Address")),
        max_envelope_size,
        operation_timeout,
        session_id: opt_text(header, Ns::MsWsman, "SessionId"),
        shell_id,
        options,
    })
}

fn split_list(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

fn parse_body(header: &Header, body: &Node, limits: &Limits) -> Result<Body, SoapError> {
    let needs_shell = |h: &Header| {
        if h.shell_id.is_none() {
            Err(SoapError::MissingShellId)
        } else {
            Ok(())
        }
    };
    match header.action.as_str() {
        ACTION_CREATE => {
            let shell = body.required_child(Ns::Shell, "Shell")?;
            let mut environment = Vec::new();
            if let Some(env) = shell.child(Ns::Shell, "Environment") {
                for var in env.children_named(Ns::Shell, "Variable") {
                    let name = var
                        .attr("Name")
                        .ok_or(SoapError::Missing("Variable/@Name"))?;
                    environment.push((name.to_owned(), var.text.clone()));
                }
            }
            Ok(Body::Create(CreateShell {
                shell_id: shell
                    .attr("ShellId")
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty()),
                name: opt_text(shell, Ns::Shell, "Name"),
                input_streams: shell
                    .child(Ns::Shell, "InputStreams")
                    .map(|n| split_list(&n.text))
                    .unwrap_or_default(),
                output_streams: shell
                    .child(Ns::Shell, "OutputStreams")
                    .map(|n| split_list(&n.text))
                    .unwrap_or_default(),
                working_directory: shell
                    .child(Ns::Shell, "WorkingDirectory")
                    .map(|n| n.text.clone()),
                environment,
                idle_timeout: opt_text(shell, Ns::Shell, "IdleTimeOut")
                    .and_then(|v| parse_duration_lenient(&v)),
                creation_xml: opt_text(shell, Ns::Powershell, "creationXml"),
            }))
        }
        ACTION_COMMAND => {
            needs_shell(header)?;
            let line = body.required_child(Ns::Shell, "CommandLine")?;
            Ok(Body::Command {
                command_id: line.attr("CommandId").map(|s| s.trim().to_owned()),
                command: line
                    .child(Ns::Shell, "Command")
                    .map(|n| n.text.clone())
                    .unwrap_or_default(),
                arguments: line
                    .children_named(Ns::Shell, "Arguments")
                    .map(|n| n.text.clone())
                    .collect(),
            })
        }
        ACTION_SEND => {
            needs_shell(header)?;
            let send = body.required_child(Ns::Shell, "Send")?;
            let mut streams = Vec::new();
            for s in send.children_named(Ns::Shell, "Stream") {
                let name = s.attr("Name").ok_or(SoapError::Missing("Stream/@Name"))?;
                let end = match s.attr("End") {
                    Some(v) => parse_bool(v).ok_or_else(|| invalid("Stream/@End", v))?,
                    None => false,
                };
                streams.push(SendStream {
                    name: name.to_owned(),
                    command_id: s.attr("CommandId").map(|c| c.trim().to_owned()),
                    end,
                    data: decode_base64(&s.text, limits)?,
                });
            }
            Ok(Body::Send {
                command_id: streams.first().and_then(|s| s.command_id.clone()),
                streams,
            })
        }
        ACTION_RECEIVE => {
            needs_shell(header)?;
            let recv = body.required_child(Ns::Shell, "Receive")?;
            let sequence_id = match recv.attr("SequenceId") {
                Some(v) => Some(
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| invalid("Receive/@SequenceId", v))?,
                ),
                None => None,
            };
            let desired = recv.child(Ns::Shell, "DesiredStream");
            Ok(Body::Receive {
                command_id: desired
                    .and_then(|d| d.attr("CommandId"))
                    .map(|c| c.trim().to_owned()),
                streams: desired.map(|d| split_list(&d.text)).unwrap_or_default(),
                sequence_id,
            })
        }
        ACTION_SIGNAL => {
            needs_shell(header)?;
            let sig = body.required_child(Ns::Shell, "Signal")?;
            let code = trimmed(sig.required_child(Ns::Shell, "Code")?);
            Ok(Body::Signal {
                command_id: sig.attr("CommandId").map(|c| c.trim().to_owned()),
                code: parse_signal_code(&code),
            })
        }
        ACTION_DELETE => {
            needs_shell(header)?;
            Ok(Body::Delete)
        }
        other => Ok(Body::Other {
            action: other.to_owned(),
        }),
    }
}

fn parse_signal_code(code: &str) -> SignalCode {
    let lower = code.to_ascii_lowercase();
    let shell_prefix = SIGNAL_PREFIX.to_ascii_lowercase();
    match lower.strip_prefix(&shell_prefix) {
        Some("terminate") => SignalCode::Terminate,
        Some("ctrl_c") => SignalCode::CtrlC,
        Some("ctrl_break") => SignalCode::CtrlBreak,
        _ => match lower.as_str() {
            "powershell/signal/ctrl_c" | "powershell/signal/crtl_c" => SignalCode::CtrlC,
            _ => SignalCode::Other(code.to_owned()),
        },
    }
}

fn decode_base64(text: &str, limits: &Limits) -> Result<Vec<u8>, SoapError> {
    if text.len() > limits.max_base64_len {
        return Err(SoapError::Limit {
            what: "base64 length",
            limit: limits.max_base64_len,
        });
    }
    let compact: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    BASE64
        .decode(&compact)
        .map_err(|_| invalid("Stream (base64)", text))
}

/// Parses `true`/`false`/`1`/`0` in any ASCII case (surrounding whitespace allowed).
pub fn parse_bool(s: &str) -> Option<bool> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("true") || s == "1" {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") || s == "0" {
        Some(false)
    } else {
        None
    }
}

/// Parses an xs:duration of the form `PnDTnHnMn.nS` (any subset, fractions on seconds;
/// also `nW`). Years/months, negative and overflowing durations give `None`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let rest = s.trim().strip_prefix('P')?;
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) => {
            if t.is_empty() {
                return None;
            }
            (d, Some(t))
        }
        None => (rest, None),
    };
    if date.is_empty() && time.is_none() {
        return None;
    }
    let mut secs: u64 = 0;
    let mut nanos: u32 = 0;
    let mut add = |n: u64, unit: u64| -> Option<()> {
        secs = secs.checked_add(n.checked_mul(unit)?)?;
        Some(())
    };
    let mut num = String::new();
    for c in date.chars() {
        match c {
            '0'..='9' if num.len() < 20 => num.push(c),
            'W' | 'D' if !num.is_empty() => {
                let n: u64 = num.parse().ok()?;
                add(n, if c == 'W' { 7 * 86_400 } else { 86_400 })?;
                num.clear();
            }
            _ => return None,
        }
    }
    if !num.is_empty() {
        return None;
    }
    if let Some(time) = time {
        let mut frac = String::new();
        let mut in_frac = false;
        for c in time.chars() {
            match c {
                '0'..='9' if in_frac => {
                    if frac.len() < 9 {
                        frac.push(c);
                    }
                }
                '0'..='9' if num.len() < 20 => num.push(c),
                '.' if !in_frac && !num.is_empty() => in_frac = true,
                'H' | 'M' if !in_frac && !num.is_empty() => {
                    let n: u64 = num.parse().ok()?;
                    add(n, if c == 'H' { 3600 } else { 60 })?;
                    num.clear();
                }
                'S' if !num.is_empty() => {
                    let n: u64 = num.parse().ok()?;
                    add(n, 1)?;
                    num.clear();
                    if in_frac {
                        while frac.len() < 9 {
                            frac.push('0');
                        }
                        nanos = frac.parse().ok()?;
                        frac.clear();
                        in_frac = false;
                    }
                }
                _ => return None,
            }
        }
        if !num.is_empty() || in_frac {
            return None;
        }
    }
    Some(Duration::new(secs, nanos))
}

/// Like [`parse_duration`], but also accepts a bare number of seconds (pywinrm passes the
/// user's IdleTimeOut verbatim).
pub fn parse_duration_lenient(s: &str) -> Option<Duration> {
    let t = s.trim();
    if !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<u64>().ok().map(Duration::from_secs);
    }
    parse_duration(t)
}

/// Formats a duration as xs:duration with milliseconds, e.g. `PT7200.000S`.
pub fn format_duration(d: Duration) -> String {
    format!("PT{}.{:03}S", d.as_secs(), d.subsec_millis())
}

// ---------------------------------------------------------------------------------------
// Response serialization
// ---------------------------------------------------------------------------------------

/// Escapes text for element content or attribute values. Characters not allowed in XML 1.0
/// become U+FFFD; `\r` (and `\t`/`\n`, which attribute normalization would turn into
/// spaces) are written as character references.
pub fn escape_xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\u{0}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A fresh `uuid:` MessageID (uppercase, as Windows sends).
pub fn new_message_id() -> String {
    format!("uuid:{}", uuid::Uuid::new_v4().to_string().to_uppercase())
}

/// A fresh uppercase UUID (ShellId, CommandId).
pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string().to_uppercase()
}

/// Builds a whole response envelope: §2.3 header with `action`, a fresh MessageID, `a:To`
/// anonymous and `a:RelatesTo` (omitted when `None`), and `body_xml` as the content of
/// `s:Body`. `body_xml` is inserted verbatim: it must be well-formed and may use the prefixes
/// `s`, `a`, `w`, `x`, `rsp` (declared on the Envelope).
pub fn response_envelope(action: &str, relates_to: Option<&str>, body_xml: &str) -> String {
    let mut out = String::with_capacity(1024 + body_xml.len());
    out.push_str("<s:Envelope xml:lang=\"en-US\"");
    for (p, uri) in [
        ("s", NS_SOAP),
        ("a", NS_ADDRESSING),
        ("w", NS_WSMAN),
        ("x", NS_TRANSFER),
        ("rsp", NS_SHELL),
    ] {
        let _ = write!(out, " xmlns:{p}=\"{uri}\"");
    }
    out.push_str("><s:Header>");
    let _ = write!(out, "<a:Action>{}</a:Action>", escape_xml(action));
    let _ = write!(out, "<a:MessageID>{}</a:MessageID>", new_message_id());
    let _ = write!(out, "<a:To>{ANONYMOUS}</a:To>");
    if let Some(rel) = relates_to {
        let _ = write!(out, "<a:RelatesTo>{}</a:RelatesTo>", escape_xml(rel));
    }
    out.push_str("</s:Header>");
    if body_xml.is_empty() {
        out.push_str("<s:Body/>");
    } else {
        out.push_str("<s:Body>");
        out.push_str(body_xml);
        out.push_str("</s:Body>");
    }
    out.push_str("</s:Envelope>");
    out
}

/// Response Action for a request Action (`…/Create` → `…/CreateResponse`).
pub fn response_action(request_action: &str) -> String {
    format!("{request_action}Response")
}

/// Extra fields of the `rsp:Shell` element in a Create response (§3.1, §7.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellDetails {
    /// `x:ResourceCreated/a:Address` (any URL, e.g. `http://host:5985/wsman`).
    pub address: String,
    /// `rsp:Owner` (authenticated user).
    pub owner: String,
    /// `rsp:ClientIP`.
    pub client_ip: String,
    /// `rsp:IdleTimeOut`.
    pub idle_timeout: Duration,
    /// `rsp:InputStreams`.
    pub input_streams: Vec<String>,
    /// `rsp:OutputStreams`.
    pub output_streams: Vec<String>,
    /// `rsp:ShellRunTime` (omitted when `None`).
    pub shell_run_time: Option<Duration>,
    /// `rsp:ShellInactivity` (omitted when `None`).
    pub shell_inactivity: Option<Duration>,
}

impl Default for ShellDetails {
    fn default() -> Self {
        Self {
            address: "http://localhost:5985/wsman".to_owned(),
            owner: String::new(),
            client_ip: String::new(),
            idle_timeout: Duration::from_secs(7200),
            input_streams: vec!["stdin".to_owned()],
            output_streams: vec!["stdout".to_owned(), "stderr".to_owned()],
            shell_run_time: None,
            shell_inactivity: None,
        }
    }
}

fn leaf(out: &mut String, tag: &str, text: &str) {
    let _ = write!(out, "<{tag}>{}</{tag}>", escape_xml(text));
}

/// Create response (§3.1/§7.2): `x:ResourceCreated` (with the ShellId SelectorSet pypsrp copies)
/// and `rsp:Shell`.
pub fn create_response(
    shell_id: &str,
    resource_uri: &str,
    relates_to: &str,
    details: &ShellDetails,
) -> String {
    let mut b = String::with_capacity(1024);
    b.push_str("<x:ResourceCreated>");
    leaf(&mut b, "a:Address", &details.address);
    b.push_str("<a:ReferenceParameters>");
    leaf(&mut b, "w:ResourceURI", resource_uri);
    let _ = write!(
        b,
        "<w:SelectorSet><w:Selector Name=\"ShellId\">{}</w:Selector></w:SelectorSet>",
        escape_xml(shell_id)
    );
    b.push_str("</a:ReferenceParameters></x:ResourceCreated>");
    b.push_str("<rsp:Shell>");
    leaf(&mut b, "rsp:ShellId", shell_id);
    leaf(&mut b, "rsp:ResourceUri", resource_uri);
    leaf(&mut b, "rsp:Owner", &details.owner);
    leaf(&mut b, "rsp:ClientIP", &details.client_ip);
    leaf(
        &mut b,
        "rsp:IdleTimeOut",
        &format_duration(details.idle_timeout),
    );
    leaf(&mut b, "rsp:InputStreams", &details.input_streams.join(" "));
    leaf(
        &mut b,
        "rsp:OutputStreams",
        &details.output_streams.join(" "),
    );
    if let Some(d) = details.shell_run_time {
        leaf(&mut b, "rsp:ShellRunTime", &format_duration(d));
    }
    if let Some(d) = details.shell_inactivity {
        leaf(&mut b, "rsp:ShellInactivity", &format_duration(d));
    }
    b.push_str("</rsp:Shell>");
    response_envelope(&response_action(ACTION_CREATE), Some(relates_to), &b)
}

/// Command response (§3.2): `rsp:CommandResponse/rsp:CommandId`.
pub fn command_response(command_id: &str, relates_to: &str) -> String {
    let body = format!(
        "<rsp:CommandResponse><rsp:CommandId>{}</rsp:CommandId></rsp:CommandResponse>",
        escape_xml(command_id)
    );
    response_envelope(&response_action(ACTION_COMMAND), Some(relates_to), &body)
}

/// Send response (§3.3): `<rsp:SendResponse/>`.
pub fn send_response(relates_to: &str) -> String {
    response_envelope(
        &response_action(ACTION_SEND),
        Some(relates_to),
        "<rsp:SendResponse/>",
    )
}

/// Signal response (§3.5): `<rsp:SignalResponse/>`.
pub fn signal_response(relates_to: &str) -> String {
    response_envelope(
        &response_action(ACTION_SIGNAL),
        Some(relates_to),
        "<rsp:SignalResponse/>",
    )
}

/// Delete response (§3.6/§7.8): empty `s:Body`.
pub fn delete_response(relates_to: &str) -> String {
    response_envelope(&response_action(ACTION_DELETE), Some(relates_to), "")
}

/// One `rsp:Stream` of a Receive response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputStream<'a> {
    /// `stdout` / `stderr`.
    pub name: &'a str,
    /// `CommandId` (omitted for shell-level PSRP output).
    pub command_id: Option<&'a str>,
    /// Raw bytes (base64-encoded by the writer).
    pub data: &'a [u8],
    /// Adds `End="true"`.
    pub end: bool,
}

/// `rsp:CommandState/@State`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandStateKind {
    /// `…/CommandState/Pending`.
    Pending,
    /// `…/CommandState/Running`.
    Running,
    /// `…/CommandState/Done` with `rsp:ExitCode`.
    Done {
        /// Exit code (128+N for a signal).
        exit_code: i64,
    },
}

/// `rsp:CommandState` of a Receive response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandState<'a> {
    /// `CommandId` attribute.
    pub command_id: Option<&'a str>,
    /// The state.
    pub state: CommandStateKind,
}

/// Approximate envelope bytes of a Receive response besides the base64 payload.
pub const RECEIVE_OVERHEAD: usize = 2048;

/// Largest number of raw output bytes to put into one Receive response so the envelope stays
/// within the client's `MaxEnvelopeSize` (§3.4): `(max − overhead) × 3/4`, per-stream element
/// overhead included in [`RECEIVE_OVERHEAD`] for a handful of streams.
pub fn max_receive_payload(max_envelope_size: u64) -> usize {
    let max = usize::try_from(max_envelope_size).unwrap_or(usize::MAX);
    max.saturating_sub(RECEIVE_OVERHEAD) / 4 * 3
}

/// Receive response (§3.4/§7.5/§7.6).
pub fn receive_response(
    streams: &[OutputStream<'_>],
    command_state: Option<CommandState<'_>>,
    relates_to: &str,
) -> String {
    let payload: usize = streams.iter().map(|s| s.data.len() / 3 * 4 + 4).sum();
    let mut b = String::with_capacity(256 + payload + streams.len() * 128);
    b.push_str("<rsp:ReceiveResponse>");
    for s in streams {
        let _ = write!(b, "<rsp:Stream Name=\"{}\"", escape_xml(s.name));
        if let Some(id) = s.command_id {
            let _ = write!(b, " CommandId=\"{}\"", escape_xml(id));
        }
        if s.end {
            b.push_str(" End=\"true\"");
        }
        b.push('>');
        BASE64.encode_string(s.data, &mut b);
        b.push_str("</rsp:Stream>");
    }
    if let Some(cs) = command_state {
        b.push_str("<rsp:CommandState");
        if let Some(id) = cs.command_id {
            let _ = write!(b, " CommandId=\"{}\"", escape_xml(id));
        }
        let state = match cs.state {
            CommandStateKind::Pending => "Pending",
            CommandStateKind::Running => "Running",
            CommandStateKind::Done { .. } => "Done",
        };
        let _ = write!(b, " State=\"{STATE_PREFIX}{state}\"");
        match cs.state {
            CommandStateKind::Done { exit_code } => {
                let _ = write!(
                    b,
                    "><rsp:ExitCode>{exit_code}</rsp:ExitCode></rsp:CommandState>"
                );
            }
            _ => b.push_str("/>"),
        }
    }
    b.push_str("</rsp:ReceiveResponse>");
    response_envelope(&response_action(ACTION_RECEIVE), Some(relates_to), &b)
}

/// Fault response (§4/§7.9), to be sent with HTTP 500. `relates_to` is the request's MessageID
/// when known (see [`request_message_id`]).
pub fn fault_response(fault: &Fault, relates_to: Option<&str>) -> String {
    let reason = escape_xml(&fault.reason);
    let mut b = String::with_capacity(1024 + 2 * reason.len());
    let _ = write!(
        b,
        "<s:Fault><s:Code><s:Value>{}</s:Value><s:Subcode><s:Value>{}</s:Value></s:Subcode></s:Code>",
        escape_xml(fault.code),
        escape_xml(fault.subcode)
    );
    let _ = write!(
        b,
        "<s:Reason><s:Text xml:lang=\"en-US\">{reason}</s:Text></s:Reason>"
    );
    let _ = write!(
        b,
        "<s:Detail><f:WSManFault xmlns:f=\"{NS_WSMAN_FAULT}\" Code=\"{}\" Machine=\"{}\"><f:Message>{reason}</f:Message></f:WSManFault>",
        fault.wsman_code,
        escape_xml(&fault.machine)
    );
    if let Some(code) = fault.wmi_error_code {
        let _ = write!(
            b,
            "<p:MSFT_WmiError xmlns:p=\"{NS_WMI_ERROR}\"><p:error_Code>{code}</p:error_Code></p:MSFT_WmiError>"
        );
    }
    b.push_str("</s:Detail></s:Fault>");
    response_envelope(ACTION_FAULT, relates_to, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS_REQ: &str = r#"xmlns:env="http://www.w3.org/2003/05/soap-envelope" xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing" xmlns:w="http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd" xmlns:rsp="http://schemas.microsoft.com/wbem/wsman/1/windows/shell" xmlns:p="http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd""#;
    const CMD_ID: &str = "5D0C7E4B-91A2-4E3F-8C6D-0F1E2D3C4B5A";
    const SHELL: &str = "A39F1931-AB90-4404-B7FA-2673A0C50FF0";
    const MID: &str = "uuid:6c3f1b4e-0d2a-4f7e-9b1c-2a7d5e8f9012";

    /// §7.1 verbatim (namespace declarations filled in).
    fn create_request() -> String {
        format!(
            r#"<env:Envelope {NS_REQ}><env:Header>
 <a:To>http://windows-host:5985/wsman</a:To>
 <a:ReplyTo><a:Address mustUnderstand="true">http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:Address></a:ReplyTo>
 <w:MaxEnvelopeSize mustUnderstand="true">153600</w:MaxEnvelopeSize>
 <a:MessageID>{MID}</a:MessageID>
 <w:Locale xml:lang="en-US" mustUnderstand="false"/>
 <p:SessionId mustUnderstand="false">uuid:11111111-2222-3333-4444-555555555555</p:SessionId>
 <w:OperationTimeout>PT20S</w:OperationTimeout>
 <w:ResourceURI mustUnderstand="true">http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd</w:ResourceURI>
 <a:Action mustUnderstand="true">http://schemas.xmlsoap.org/ws/2004/09/transfer/Create</a:Action>
 <w:OptionSet><w:Option Name="WINRS_NOPROFILE">FALSE</w:Option><w:Option Name="WINRS_CODEPAGE">65001</w:Option></w:OptionSet>
</env:Header><env:Body><rsp:Shell><rsp:InputStreams>stdin</rsp:InputStreams><rsp:OutputStreams>stdout stderr</rsp:OutputStreams></rsp:Shell></env:Body></env:Envelope>"#
        )
    }

    /// A request with the given action, options and body, in the pywinrm style.
    fn request(action: &str, options: &str, body: &str, shell: bool) -> String {
        let selector = if shell {
            format!(
                r#"<w:SelectorSet><w:Selector Name="ShellId">{SHELL}</w:Selector></w:SelectorSet>"#
            )
        } else {
            String::new()
        };
        format!(
            r#"<?xml version="1.0" encoding="utf-8"?>
<env:Envelope {NS_REQ}><env:Header>
 <a:To>http://windows-host:5985/wsman</a:To>
 <a:ReplyTo><a:Address mustUnderstand="true">http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:Address></a:ReplyTo>
 <w:MaxEnvelopeSize mustUnderstand="true">153600</w:MaxEnvelopeSize>
 <a:MessageID>{MID}</a:MessageID>
 <w:OperationTimeout>PT60.000S</w:OperationTimeout>
 <w:ResourceURI mustUnderstand="true">http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd</w:ResourceURI>
 <a:Action mustUnderstand="true">{action}</a:Action>
 {selector}{options}
</env:Header><env:Body>{body}</env:Body></env:Envelope>"#
        )
    }

    fn parse(s: &str) -> Request {
        match parse_request(s.as_bytes()) {
            Ok(r) => r,
            Err(e) => panic!("parse failed: {e}\n{s}"),
        }
    }

    #[test]
    fn create_7_1() {
        let r = parse(&create_request());
        let h = &r.header;
        assert_eq!(h.action, ACTION_CREATE);
        assert_eq!(h.to.as_deref(), Some("http://windows-host:5985/wsman"));
        assert_eq!(h.message_id, MID);
        assert_eq!(h.reply_to.as_deref(), Some(ANONYMOUS));
        assert_eq!(h.max_envelope_size, Some(153_600));
        assert_eq!(h.operation_timeout, Some(Duration::from_secs(20)));
        assert_eq!(h.resource_uri.as_deref(), Some(RESOURCE_CMD));
        assert_eq!(
            h.session_id.as_deref(),
            Some("uuid:11111111-2222-3333-4444-555555555555")
        );
        assert_eq!(h.shell_id, None);
        assert_eq!(h.option("WINRS_CODEPAGE"), Some("65001"));
        assert_eq!(h.option_bool("winrs_noprofile"), Some(false));
        assert_eq!(
            r.body,
            Body::Create(CreateShell {
                input_streams: vec!["stdin".into()],
                output_streams: vec!["stdout".into(), "stderr".into()],
                ..CreateShell::default()
            })
        );
    }

    #[test]
    fn create_full_pypsrp_style() {
        let body = r#"<rsp:Shell ShellId="C0FFEE00-0000-0000-0000-000000000001"><rsp:Name>Runspace1</rsp:Name>
<rsp:InputStreams>stdin pr</rsp:InputStreams><rsp:OutputStreams>stdout</rsp:OutputStreams>
<rsp:WorkingDirectory>/srv/app</rsp:WorkingDirectory>
<rsp:Environment><rsp:Variable Name="FOO">bar &amp; baz</rsp:Variable><rsp:Variable Name="E"></rsp:Variable></rsp:Environment>
<rsp:IdleTimeOut>600</rsp:IdleTimeOut>
<creationXml xmlns="http://schemas.microsoft.com/powershell">AAAA</creationXml></rsp:Shell>"#;
        let opts = r#"<w:OptionSet><w:Option Name="WINRS_NOPROFILE" MustComply="true">False</w:Option></w:OptionSet>"#;
        let r = parse(&request(ACTION_CREATE, opts, body, false));
        assert_eq!(
            r.header.options.get("WINRS_NOPROFILE"),
            Some(&WsOption {
                value: "False".into(),
                must_comply: true
            })
        );
        let Body::Create(c) = r.body else {
            panic!("not create")
        };
        assert_eq!(
            c.shell_id.as_deref(),
            Some("C0FFEE00-0000-0000-0000-000000000001")
        );
        assert_eq!(c.name.as_deref(), Some("Runspace1"));
        assert_eq!(c.input_streams, ["stdin", "pr"]);
        assert_eq!(c.working_directory.as_deref(), Some("/srv/app"));
        assert_eq!(
            c.environment,
            [
                ("FOO".into(), "bar & baz".into()),
                ("E".into(), String::new())
            ]
        );
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(c.creation_xml.as_deref(), Some("AAAA"));
        assert_eq!(r.header.operation_timeout, Some(Duration::from_secs(60)));
    }

    #[test]
    fn command_7_3() {
        let opts = r#"<w:OptionSet><w:Option Name="WINRS_CONSOLEMODE_STDIN">TRUE</w:Option><w:Option Name="WINRS_SKIP_CMD_SHELL">FALSE</w:Option></w:OptionSet>"#;
        let body = r#"<rsp:CommandLine><rsp:Command>echo</rsp:Command><rsp:Arguments>hello world</rsp:Arguments></rsp:CommandLine>"#;
        let r = parse(&request(ACTION_COMMAND, opts, body, true));
        assert_eq!(r.header.shell_id.as_deref(), Some(SHELL));
        assert_eq!(r.header.option_bool("WINRS_CONSOLEMODE_STDIN"), Some(true));
        assert_eq!(r.header.option_bool("WINRS_SKIP_CMD_SHELL"), Some(false));
        assert_eq!(
            r.body,
            Body::Command {
                command_id: None,
                command: "echo".into(),
                arguments: vec!["hello world".into()],
            }
        );
    }

    #[test]
    fn command_pypsrp_args_and_id() {
        let body = format!(
            r#"<rsp:CommandLine CommandId="{CMD_ID}"><rsp:Command/><rsp:Arguments>-a</rsp:Arguments><rsp:Arguments> b &lt;c&gt; </rsp:Arguments></rsp:CommandLine>"#
        );
        let r = parse(&request(ACTION_COMMAND, "", &body, true));
        assert_eq!(
            r.body,
            Body::Command {
                command_id: Some(CMD_ID.into()),
                command: String::new(),
                arguments: vec!["-a".into(), " b <c> ".into()],
            }
        );
    }

    #[test]
    fn send_7_4() {
        let body = format!(
            r#"<rsp:Send><rsp:Stream Name="stdin" CommandId="{CMD_ID}" End="true">bGluZTEK</rsp:Stream></rsp:Send>"#
        );
        let r = parse(&request(ACTION_SEND, "", &body, true));
        assert_eq!(
            r.body,
            Body::Send {
                command_id: Some(CMD_ID.into()),
                streams: vec![SendStream {
                    name: "stdin".into(),
                    command_id: Some(CMD_ID.into()),
                    end: true,
                    data: b"line1\n".to_vec(),
                }],
            }
        );
    }

    #[test]
    fn send_variants() {
        let body = format!(
            "<rsp:Send><rsp:Stream Name=\"stdin\" CommandId=\"{CMD_ID}\">bGlu\n ZTEK</rsp:Stream>\
             <rsp:Stream Name=\"stdin\" CommandId=\"{CMD_ID}\" End=\"True\"></rsp:Stream>\
             <rsp:Stream Name=\"pr\" End=\"FALSE\"/></rsp:Send>"
        );
        let r = parse(&request(ACTION_SEND, "", &body, true));
        let Body::Send { streams, .. } = r.body else {
            panic!("not send")
        };
        assert_eq!(streams.len(), 3);
        assert_eq!(streams[0].data, b"line1\n");
        assert!(!streams[0].end);
        assert!(streams[1].end && streams[1].data.is_empty());
        assert_eq!(streams[2].command_id, None);
        assert!(!streams[2].end);

        let bad = format!(
            r#"<rsp:Send><rsp:Stream Name="stdin" CommandId="{CMD_ID}">!!!notbase64</rsp:Stream></rsp:Send>"#
        );
        let e = parse_request(request(ACTION_SEND, "", &bad, true).as_bytes()).unwrap_err();
        assert!(matches!(e, SoapError::InvalidValue { .. }), "{e:?}");
        assert_eq!(e.fault().subcode, "w:SchemaValidationError");
        let bad_end = format!(
            r#"<rsp:Send><rsp:Stream Name="stdin" CommandId="{CMD_ID}" End="yes"></rsp:Stream></rsp:Send>"#
        );
        assert!(parse_request(request(ACTION_SEND, "", &bad_end, true).as_bytes()).is_err());
    }

    #[test]
    fn receive_7_5() {
        let body = format!(
            r#"<rsp:Receive><rsp:DesiredStream CommandId="{CMD_ID}">stdout stderr</rsp:DesiredStream></rsp:Receive>"#
        );
        let opts = r#"<w:OptionSet><w:Option Name="WSMAN_CMDSHELL_OPTION_KEEPALIVE">True</w:Option></w:OptionSet>"#;
        let r = parse(&request(ACTION_RECEIVE, opts, &body, true));
        assert_eq!(
            r.body,
            Body::Receive {
                command_id: Some(CMD_ID.into()),
                streams: vec!["stdout".into(), "stderr".into()],
                sequence_id: None,
            }
        );
        let body = r#"<rsp:Receive SequenceId="3"><rsp:DesiredStream>stdout</rsp:DesiredStream></rsp:Receive>"#;
        let r = parse(&request(ACTION_RECEIVE, "", body, true));
        assert_eq!(
            r.body,
            Body::Receive {
                command_id: None,
                streams: vec!["stdout".into()],
                sequence_id: Some(3),
            }
        );
    }

    #[test]
    fn signal_7_7_and_codes() {
        for (code, want) in [
            (
                "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/terminate",
                SignalCode::Terminate,
            ),
            (
                "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/Terminate",
                SignalCode::Terminate,
            ),
            (
                "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/ctrl_c",
                SignalCode::CtrlC,
            ),
            (
                "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/ctrl_break",
                SignalCode::CtrlBreak,
            ),
            ("powershell/signal/crtl_c", SignalCode::CtrlC),
            ("urn:bogus", SignalCode::Other("urn:bogus".into())),
        ] {
            let body = format!(
                r#"<rsp:Signal CommandId="{CMD_ID}"><rsp:Code>{code}</rsp:Code></rsp:Signal>"#
            );
            let r = parse(&request(ACTION_SIGNAL, "", &body, true));
            assert_eq!(
                r.body,
                Body::Signal {
                    command_id: Some(CMD_ID.into()),
                    code: want
                }
            );
        }
    }

    #[test]
    fn delete_7_8() {
        let r = parse(&request(ACTION_DELETE, "", "", true));
        assert_eq!(r.body, Body::Delete);
        assert_eq!(r.header.shell_id.as_deref(), Some(SHELL));
    }

    #[test]
    fn other_prefixes_parse_the_same() {
        let original = create_request();
        let renamed = original
            .replace("env:", "soap12:")
            .replace("xmlns:env=", "xmlns:soap12=")
            .replace("<a:", "<wsa:")
            .replace("</a:", "</wsa:")
            .replace("xmlns:a=", "xmlns:wsa=")
            .replace("<w:", "<wsman:")
            .replace("</w:", "</wsman:")
            .replace("xmlns:w=", "xmlns:wsman=")
            .replace("<p:", "<wsmv:")
            .replace("</p:", "</wsmv:")
            .replace("xmlns:p=", "xmlns:wsmv=")
            .replace("<rsp:", "<r:")
            .replace("</rsp:", "</r:")
            .replace("xmlns:rsp=", "xmlns:r=")
            .replace("mustUnderstand=", "soap12:mustUnderstand=");
        assert!(renamed.contains("<wsman:OptionSet>"));
        assert_eq!(parse(&original), parse(&renamed));

        // Default namespaces and namespaces declared on inner elements work too.
        let default_ns = format!(
            r#"<Envelope xmlns="{NS_SOAP}"><Header><Action xmlns="{NS_ADDRESSING}">{ACTION_CREATE}</Action><x:MessageID xmlns:x="{NS_ADDRESSING}">{MID}</x:MessageID></Header><Body><Shell xmlns="{NS_SHELL}"><InputStreams>stdin</InputStreams><OutputStreams>stdout stderr</OutputStreams></Shell></Body></Envelope>"#
        );
        assert_eq!(parse(&default_ns).body, parse(&original).body);

        // A prefix that usually means something else is irrelevant: only the URI counts.
        let swapped = original
            .replace("<rsp:", "<a2:")
            .replace("</rsp:", "</a2:")
            .replace("xmlns:rsp=", "xmlns:a2=");
        assert_eq!(parse(&swapped), parse(&original));
    }

    #[test]
    fn wrong_namespace_uris_are_rejected() {
        let original = create_request();
        // Envelope not SOAP 1.2 (e.g. SOAP 1.1).
        let soap11 = original.replace(NS_SOAP, "http://schemas.xmlsoap.org/soap/envelope/");
        let e = parse_request(soap11.as_bytes()).unwrap_err();
        assert!(
            matches!(
                e,
                SoapError::WrongNamespace {
                    element: "Envelope",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.fault().subcode, "w:SchemaValidationError");
        assert_eq!(e.fault().wsman_code, CODE_SCHEMA_VALIDATION);
        // Shell namespace wrong: rsp:Shell of Create is in the wrong namespace.
        let bad_rsp = original.replace(NS_SHELL, "http://example.com/shell");
        let e = parse_request(bad_rsp.as_bytes()).unwrap_err();
        assert!(
            matches!(
                e,
                SoapError::WrongNamespace {
                    element: "Shell",
                    ..
                }
            ),
            "{e:?}"
        );
        // Addressing namespace wrong: Action no longer recognised.
        let bad_a = original.replace(NS_ADDRESSING, "http://example.com/addressing");
        let e = parse_request(bad_a.as_bytes()).unwrap_err();
        assert!(
            matches!(
                e,
                SoapError::WrongNamespace {
                    element: "Action",
                    ..
                }
            ),
            "{e:?}"
        );
        // Right prefix, no namespace declaration at all.
        let undeclared = original.replace(&format!(" xmlns:rsp=\"{NS_SHELL}\""), "");
        let e = parse_request(undeclared.as_bytes()).unwrap_err();
        assert!(matches!(e, SoapError::Malformed(_)), "{e:?}");
        // Unprefixed elements in no namespace.
        let none = "<Envelope><Header/><Body/></Envelope>";
        assert!(matches!(
            parse_request(none.as_bytes()),
            Err(SoapError::WrongNamespace {
                element: "Envelope",
                found: None,
                ..
            })
        ));
    }

    #[test]
    fn unknown_and_missing_action() {
        let r = parse(&request(
            "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Enumerate",
            "",
            "<n:Enumerate xmlns:n=\"http://schemas.xmlsoap.org/ws/2004/09/enumeration\"/>",
            false,
        ));
        let Body::Other { action } = &r.body else {
            panic!("not other")
        };
        let f = Fault::action_not_supported(action);
        assert_eq!(f.subcode, "a:ActionNotSupported");
        assert_eq!(f.wsman_code, CODE_ACTION_NOT_SUPPORTED);
        assert_eq!(f.code, "s:Sender");

        let missing = create_request().replace(
            "<a:Action mustUnderstand=\"true\">http://schemas.xmlsoap.org/ws/2004/09/transfer/Create</a:Action>",
            "",
        );
        let e = parse_request(missing.as_bytes()).unwrap_err();
        assert_eq!(e, SoapError::MissingAction);
        assert_eq!(e.fault().subcode, "a:ActionNotSupported");
        let empty = request("  ", "", "", true);
        assert_eq!(
            parse_request(empty.as_bytes()),
            Err(SoapError::MissingAction)
        );
    }

    #[test]
    fn missing_shell_id() {
        for (action, body) in [
            (
                ACTION_COMMAND,
                "<rsp:CommandLine><rsp:Command>x</rsp:Command></rsp:CommandLine>",
            ),
            (ACTION_SEND, "<rsp:Send/>"),
            (ACTION_RECEIVE, "<rsp:Receive/>"),
            (
                ACTION_SIGNAL,
                "<rsp:Signal><rsp:Code>x</rsp:Code></rsp:Signal>",
            ),
            (ACTION_DELETE, ""),
        ] {
            let e = parse_request(request(action, "", body, false).as_bytes()).unwrap_err();
            assert_eq!(e, SoapError::MissingShellId, "{action}");
            let f = e.fault();
            assert_eq!(
                (f.code, f.subcode, f.wsman_code),
                ("s:Sender", "w:InvalidSelectors", CODE_INVALID_SELECTORS)
            );
        }
        // A selector with another name is not a ShellId.
        let other_sel =
            request(ACTION_DELETE, "", "", true).replace("Name=\"ShellId\"", "Name=\"Foo\"");
        assert_eq!(
            parse_request(other_sel.as_bytes()),
            Err(SoapError::MissingShellId)
        );
    }

    #[test]
    fn malformed_xml() {
        let full = create_request();
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"not xml".to_vec(),
            b"<".to_vec(),
            full.as_bytes()[..full.len() / 2].to_vec(),
            full.replace("</env:Header>", "</env:Headr>").into_bytes(),
            format!("{full}<extra/>").into_bytes(),
            format!("{full}trailing").into_bytes(),
            full.replace("<a:To>", "<a:To a=\"1\" a=\"2\">")
                .into_bytes(),
            full.replace("stdin<", "std&bogus;in<").into_bytes(),
            full.replace("Name=\"WINRS_CODEPAGE\"", "Name=\"&x;\"")
                .into_bytes(),
            vec![0xff, 0xfe, b'<'],
            b"<a:Envelope xmlns:a=\"urn:x\"></b:Envelope>".to_vec(),
            full.replace("<a:Action", "<a:Action x=\"<\"").into_bytes(),
            full.replace("PT20S", "PT").into_bytes(),
            full.replace("153600", "-1").into_bytes(),
        ];
        for (i, c) in cases.iter().enumerate() {
            let e = parse_request(c).expect_err(&format!("case {i} parsed"));
            let f = e.fault();
            assert_eq!(f.code, "s:Sender", "case {i}: {e:?}");
            assert_eq!(f.subcode, "w:SchemaValidationError", "case {i}: {e:?}");
        }
        // Unknown entity gives the dedicated error.
        assert!(matches!(
            parse_request(full.replace("stdin<", "std&bogus;in<").as_bytes()),
            Err(SoapError::UnknownEntity(ref n)) if n == "bogus"
        ));
        // Character references and predefined entities are fine.
        let ok = full.replace(">stdin<", ">&#115;td&#x69;n&amp;<");
        let Body::Create(c) = parse(&ok).body else {
            panic!()
        };
        assert_eq!(c.input_streams, ["stdin&"]);
    }

    #[test]
    fn deeply_nested_is_rejected_fast() {
        let n = 100_000;
        let mut s = String::with_capacity(n * 12);
        s.push_str(&format!("<s:Envelope xmlns:s=\"{NS_SOAP}\"><s:Body>"));
        for _ in 0..n {
            s.push_str("<x>");
        }
        for _ in 0..n {
            s.push_str("</x>");
        }
        s.push_str("</s:Body></s:Envelope>");
        let start = std::time::Instant::now();
        let e = parse_request(s.as_bytes()).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(
            e,
            SoapError::Limit {
                what: "nesting depth",
                limit: 64
            }
        );
        assert_eq!(e.fault().subcode, "w:EncodingLimit");
        assert_eq!(e.fault().wsman_code, CODE_ENCODING_LIMIT);

        // Unclosed nesting (no end tags at all) too.
        let open = "<a>".repeat(n);
        assert!(matches!(
            parse_request(open.as_bytes()),
            Err(SoapError::Limit {
                what: "nesting depth",
                ..
            })
        ));
    }

    #[test]
    fn element_and_attribute_limits() {
        let many = "<rsp:Stream Name=\"stdin\"/>".repeat(20_000);
        let s = request(
            ACTION_SEND,
            "",
            &format!("<rsp:Send>{many}</rsp:Send>"),
            true,
        );
        assert!(matches!(
            parse_request(s.as_bytes()),
            Err(SoapError::Limit {
                what: "element count",
                ..
            })
        ));
        let attrs: String = (0..100).map(|i| format!(" a{i}=\"x\"")).collect();
        let s = create_request().replace("<a:To>", &format!("<a:To{attrs}>"));
        assert!(matches!(
            parse_request(s.as_bytes()),
            Err(SoapError::Limit {
                what: "attribute count",
                ..
            })
        ));
        // Many nested namespace declarations.
        let decls: String = (0..30)
            .map(|i| {
                format!("<e xmlns:p{i}=\"urn:{i}\" xmlns:q{i}=\"urn:{i}\" xmlns:r{i}=\"urn:{i}\">")
            })
            .collect();
        let s = create_request().replace("<a:To>", &format!("{decls}<a:To>"));
        assert!(parse_request(s.as_bytes()).is_err());
        let limits = Limits {
            max_input_bytes: 100,
            ..Limits::default()
        };
        assert!(matches!(
            parse_request_with_limits(create_request().as_bytes(), &limits),
            Err(SoapError::Limit {
                what: "input size",
                ..
            })
        ));
    }

    #[test]
    fn doctype_and_entities_refused() {
        let xxe = format!(
            "<?xml version=\"1.0\"?><!DOCTYPE foo [<!ENTITY xxe SYSTEM \"file:///etc/passwd\">]>{}",
            create_request().replace(">stdin<", ">&xxe;<")
        );
        let e = parse_request(xxe.as_bytes()).unwrap_err();
        assert_eq!(e, SoapError::Doctype);
        assert_eq!(e.fault().subcode, "w:SchemaValidationError");
        let bomb = "<!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;\">]><lolz>&lol2;</lolz>";
        assert_eq!(parse_request(bomb.as_bytes()), Err(SoapError::Doctype));
        // Entity without DOCTYPE.
        let e = parse_request(create_request().replace(">stdin<", ">&xxe;<").as_bytes());
        assert_eq!(e, Err(SoapError::UnknownEntity("xxe".into())));
    }

    #[test]
    fn huge_base64_rejected() {
        let limits = Limits::default();
        let huge = "A".repeat(limits.max_base64_len + 4);
        let body = format!(
            r#"<rsp:Send><rsp:Stream Name="stdin" CommandId="{CMD_ID}">{huge}</rsp:Stream></rsp:Send>"#
        );
        let e = parse_request(request(ACTION_SEND, "", &body, true).as_bytes()).unwrap_err();
        assert_eq!(
            e,
            SoapError::Limit {
                what: "base64 length",
                limit: limits.max_base64_len
            }
        );
        assert_eq!(e.fault().subcode, "w:EncodingLimit");
        // Just below the limit (as Ansible's 445 KB put_file chunks) is fine.
        let ok = "QUJD".repeat(120_000);
        let body = format!(
            r#"<rsp:Send><rsp:Stream Name="stdin" CommandId="{CMD_ID}">{ok}</rsp:Stream></rsp:Send>"#
        );
        let r = parse(&request(ACTION_SEND, "", &body, true));
        let Body::Send { streams, .. } = r.body else {
            panic!()
        };
        assert_eq!(streams[0].data.len(), 360_000);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("PT20S"), Some(Duration::from_secs(20)));
        assert_eq!(parse_duration("PT60.000S"), Some(Duration::from_secs(60)));
        assert_eq!(
            parse_duration("P1DT2H3M4.5S"),
            Some(Duration::new(86_400 + 7_200 + 180 + 4, 500_000_000))
        );
        assert_eq!(
            parse_duration("PT0.123456789123S"),
            Some(Duration::new(0, 123_456_789))
        );
        assert_eq!(parse_duration("P2D"), Some(Duration::from_secs(172_800)));
        for bad in [
            "",
            "P",
            "PT",
            "20",
            "PT20",
            "PT1.5M",
            "-PT1S",
            "P1Y",
            "PT99999999999999999999999H",
            "PTS",
            "PT.5S",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(
            parse_duration_lenient("600"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            parse_duration_lenient("PT600S"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(parse_duration_lenient("abc"), None);
        assert_eq!(format_duration(Duration::from_secs(7200)), "PT7200.000S");
    }

    #[test]
    fn message_id_of_invalid_request() {
        let r = request(ACTION_DELETE, "", "", false);
        assert!(parse_request(r.as_bytes()).is_err());
        assert_eq!(request_message_id(r.as_bytes()).as_deref(), Some(MID));
        assert_eq!(request_message_id(b"<x"), None);
    }

    // ---- serializers ----------------------------------------------------------------

    /// Parses a response with the module's own tree builder and returns the root.
    fn tree(s: &str) -> Node {
        match parse_tree(s.as_bytes(), &Limits::default()) {
            Ok(n) => n,
            Err(e) => panic!("response does not parse: {e}\n{s}"),
        }
    }

    fn check_header(root: &Node, action: &str, relates_to: Option<&str>) {
        assert!(root.is(Ns::Soap, "Envelope"));
        let h = root.child(Ns::Soap, "Header").expect("header");
        assert_eq!(
            h.child(Ns::Addressing, "Action").expect("action").text,
            action
        );
        let mid = &h.child(Ns::Addressing, "MessageID").expect("mid").text;
        assert!(mid.starts_with("uuid:") && mid.len() == 41, "{mid}");
        assert_eq!(mid[5..], mid[5..].to_uppercase());
        assert_eq!(h.child(Ns::Addressing, "To").expect("to").text, ANONYMOUS);
        assert_eq!(
            h.child(Ns::Addressing, "RelatesTo")
                .map(|n| n.text.as_str()),
            relates_to
        );
    }

    fn body_of(root: &Node) -> &Node {
        root.child(Ns::Soap, "Body").expect("body")
    }

    #[test]
    fn create_response_shape() {
        let details = ShellDetails {
            address: "http://agent-host:5985/wsman".into(),
            owner: "vagrant".into(),
            client_ip: "192.0.2.10".into(),
            ..ShellDetails::default()
        };
        let s = create_response(SHELL, RESOURCE_CMD, MID, &details);
        let root = tree(&s);
        check_header(
            &root,
            "http://schemas.xmlsoap.org/ws/2004/09/transfer/CreateResponse",
            Some(MID),
        );
        assert!(s.starts_with("<s:Envelope xml:lang=\"en-US\""));
        let body = body_of(&root);
        let rc = body
            .child(Ns::Other, "ResourceCreated")
            .expect("ResourceCreated");
        assert_eq!(rc.other_uri.as_deref(), Some(NS_TRANSFER));
        let rp = rc.child(Ns::Addressing, "ReferenceParameters").expect("rp");
        assert_eq!(
            rp.child(Ns::Wsman, "ResourceURI").expect("uri").text,
            RESOURCE_CMD
        );
        let sel = rp
            .child(Ns::Wsman, "SelectorSet")
            .and_then(|s| s.child(Ns::Wsman, "Selector"))
            .expect("selector");
        assert_eq!(
            (sel.attr("Name"), sel.text.as_str()),
            (Some("ShellId"), SHELL)
        );
        let shell = body.child(Ns::Shell, "Shell").expect("shell");
        assert_eq!(shell.child(Ns::Shell, "ShellId").expect("id").text, SHELL);
        assert_eq!(
            shell.child(Ns::Shell, "ResourceUri").expect("ru").text,
            RESOURCE_CMD
        );
        assert_eq!(shell.child(Ns::Shell, "Owner").expect("o").text, "vagrant");
        assert_eq!(
            shell.child(Ns::Shell, "IdleTimeOut").expect("t").text,
            "PT7200.000S"
        );
        assert_eq!(
            shell.child(Ns::Shell, "OutputStreams").expect("os").text,
            "stdout stderr"
        );
        assert!(s.contains(&format!("<rsp:ShellId>{SHELL}</rsp:ShellId>")));
        assert!(s.contains(&format!(
            "<w:Selector Name=\"ShellId\">{SHELL}</w:Selector>"
        )));
    }

    #[test]
    fn command_send_signal_delete_responses() {
        let s = command_response(CMD_ID, MID);
        let root = tree(&s);
        check_header(&root, &format!("{ACTION_COMMAND}Response"), Some(MID));
        let cr = body_of(&root)
            .child(Ns::Shell, "CommandResponse")
            .expect("cr");
        assert_eq!(cr.child(Ns::Shell, "CommandId").expect("id").text, CMD_ID);
        assert!(s.contains(&format!("<rsp:CommandId>{CMD_ID}</rsp:CommandId>")));

        let s = send_response(MID);
        let root = tree(&s);
        check_header(&root, &format!("{ACTION_SEND}Response"), Some(MID));
        assert!(body_of(&root).child(Ns::Shell, "SendResponse").is_some());

        let s = signal_response("uuid:ABC");
        let root = tree(&s);
        check_header(&root, &format!("{ACTION_SIGNAL}Response"), Some("uuid:ABC"));
        assert!(body_of(&root).child(Ns::Shell, "SignalResponse").is_some());

        let s = delete_response(MID);
        let root = tree(&s);
        check_header(
            &root,
            "http://schemas.xmlsoap.org/ws/2004/09/transfer/DeleteResponse",
            Some(MID),
        );
        assert!(body_of(&root).children.is_empty());
        assert!(s.contains("<s:Body/>"));

        // MessageIDs are fresh.
        assert_ne!(
            tree(&send_response(MID))
                .child(Ns::Soap, "Header")
                .and_then(|h| h.child(Ns::Addressing, "MessageID"))
                .map(|n| n.text.clone()),
            tree(&send_response(MID))
                .child(Ns::Soap, "Header")
                .and_then(|h| h.child(Ns::Addressing, "MessageID"))
                .map(|n| n.text.clone()),
        );
    }

    #[test]
    fn receive_response_shapes() {
        // §7.5: output, still running.
        let s = receive_response(
            &[OutputStream {
                name: "stdout",
                command_id: Some(CMD_ID),
                data: b"hello ",
                end: false,
            }],
            Some(CommandState {
                command_id: Some(CMD_ID),
                state: CommandStateKind::Running,
            }),
            MID,
        );
        let root = tree(&s);
        check_header(&root, &format!("{ACTION_RECEIVE}Response"), Some(MID));
        assert!(s.contains(&format!(
            "<rsp:Stream Name=\"stdout\" CommandId=\"{CMD_ID}\">aGVsbG8g</rsp:Stream>"
        )));
        assert!(s.contains(&format!("<rsp:CommandState CommandId=\"{CMD_ID}\" State=\"http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Running\"/>")));

        // §7.6: finished.
        let streams = [
            OutputStream {
                name: "stdout",
                command_id: Some(CMD_ID),
                data: b"world\n",
                end: false,
            },
            OutputStream {
                name: "stderr",
                command_id: Some(CMD_ID),
                data: b"warn\n",
                end: false,
            },
            OutputStream {
                name: "stdout",
                command_id: Some(CMD_ID),
                data: b"",
                end: true,
            },
            OutputStream {
                name: "stderr",
                command_id: Some(CMD_ID),
                data: b"",
                end: true,
            },
        ];
        let s = receive_response(
            &streams,
            Some(CommandState {
                command_id: Some(CMD_ID),
                state: CommandStateKind::Done { exit_code: 3 },
            }),
            MID,
        );
        let root = tree(&s);
        let rr = body_of(&root)
            .child(Ns::Shell, "ReceiveResponse")
            .expect("rr");
        type Row<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>, Vec<u8>);
        let got: Vec<Row<'_>> = rr
            .children_named(Ns::Shell, "Stream")
            .map(|n| {
                (
                    n.attr("Name"),
                    n.attr("CommandId"),
                    n.attr("End"),
                    BASE64.decode(&n.text).expect("b64"),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (Some("stdout"), Some(CMD_ID), None, b"world\n".to_vec()),
                (Some("stderr"), Some(CMD_ID), None, b"warn\n".to_vec()),
                (Some("stdout"), Some(CMD_ID), Some("true"), vec![]),
                (Some("stderr"), Some(CMD_ID), Some("true"), vec![]),
            ]
        );
        assert!(s.contains("d29ybGQK") && s.contains("d2Fybgo="));
        let cs = rr.child(Ns::Shell, "CommandState").expect("cs");
        assert_eq!(cs.attr("CommandId"), Some(CMD_ID));
        assert_eq!(
            cs.attr("State"),
            Some("http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done")
        );
        assert_eq!(cs.child(Ns::Shell, "ExitCode").expect("ec").text, "3");
        // pywinrm: exactly one element whose State ends in CommandState/Done.
        assert_eq!(s.matches("CommandState/Done\"").count(), 1);

        // No state = pending for pypsrp; no CommandId for PSRP pool output.
        let s = receive_response(
            &[OutputStream {
                name: "stdout",
                command_id: None,
                data: &[0, 255, 1],
                end: false,
            }],
            None,
            MID,
        );
        let root = tree(&s);
        let rr = body_of(&root)
            .child(Ns::Shell, "ReceiveResponse")
            .expect("rr");
        assert!(rr.child(Ns::Shell, "CommandState").is_none());
        assert_eq!(
            rr.children[0].attrs,
            vec![("Name".to_owned(), "stdout".to_owned())]
        );
        assert_eq!(max_receive_payload(153_600), 113_664);
        assert_eq!(max_receive_payload(10), 0);
    }

    #[test]
    fn fault_response_shape() {
        let f = Fault::timed_out().with_machine("agent-host");
        let s = fault_response(&f, Some(MID));
        let root = tree(&s);
        check_header(&root, ACTION_FAULT, Some(MID));
        let fault = body_of(&root).child(Ns::Soap, "Fault").expect("fault");
        let code = fault.child(Ns::Soap, "Code").expect("code");
        assert_eq!(code.child(Ns::Soap, "Value").expect("v").text, "s:Receiver");
        assert_eq!(
            code.child(Ns::Soap, "Subcode")
                .and_then(|s| s.child(Ns::Soap, "Value"))
                .expect("sv")
                .text,
            "w:TimedOut"
        );
        let reason = fault
            .child(Ns::Soap, "Reason")
            .and_then(|r| r.child(Ns::Soap, "Text"))
            .expect("r");
        assert!(reason.text.contains("OperationTimeout"));
        let wf = fault
            .child(Ns::Soap, "Detail")
            .and_then(|d| d.child(Ns::Other, "WSManFault"))
            .expect("wsmanfault");
        assert_eq!(wf.other_uri.as_deref(), Some(NS_WSMAN_FAULT));
        assert_eq!(wf.attr("Code"), Some("2150858793"));
        assert_eq!(wf.attr("Machine"), Some("agent-host"));
        assert_eq!(wf.child(Ns::Other, "Message").expect("m").text, reason.text);

        // Escaping of peer-controlled text; WMI error; no RelatesTo.
        let f = Fault::shell_not_found("<evil & \"id\">\u{1}");
        let s = fault_response(&f, None);
        let root = tree(&s);
        check_header(&root, ACTION_FAULT, None);
        assert!(s.contains("2150858843") && s.contains("w:InvalidSelectors"));
        assert!(s.contains("&lt;evil &amp; &quot;id&quot;&gt;\u{fffd}"));
        let s = fault_response(&Fault::quota_operations(), Some(MID));
        let root = tree(&s);
        let wmi = body_of(&root)
            .child(Ns::Soap, "Fault")
            .and_then(|f| f.child(Ns::Soap, "Detail"))
            .and_then(|d| d.child(Ns::Other, "MSFT_WmiError"))
            .expect("wmi");
        assert_eq!(wmi.other_uri.as_deref(), Some(NS_WMI_ERROR));
        assert_eq!(
            wmi.child(Ns::Other, "error_Code").expect("ec").text,
            "2150859174"
        );

        // Every SoapError maps to a fault that serializes.
        let errors = [
            SoapError::NotUtf8,
            SoapError::Malformed("x".into()),
            SoapError::Doctype,
            SoapError::UnknownEntity("e".into()),
            SoapError::Limit {
                what: "nesting depth",
                limit: 64,
            },
            SoapError::Missing("Body"),
            SoapError::InvalidValue {
                field: "f",
                value: "v".into(),
            },
            SoapError::MissingAction,
            SoapError::ActionNotSupported("urn:x".into()),
            SoapError::MissingShellId,
        ];
        for e in errors {
            tree(&fault_response(&e.fault(), Some(MID)));
        }
    }

    #[test]
    fn escape_round_trip() {
        let nasty = "a&b<c>d\"e'f\tg\nh\ri";
        let s = command_response(nasty, nasty);
        let root = tree(&s);
        check_header(&root, &format!("{ACTION_COMMAND}Response"), Some(nasty));
        let resp = receive_response(
            &[OutputStream {
                name: nasty,
                command_id: Some(nasty),
                data: b"",
                end: true,
            }],
            None,
            MID,
        );
        let root = tree(&resp);
        let st = &body_of(&root).children[0].children[0];
        assert_eq!(st.attr("Name"), Some(nasty));
        assert_eq!(st.attr("CommandId"), Some(nasty));
    }

    #[test]
    fn no_panic_on_garbage() {
        // Cheap deterministic fuzzing: truncations and byte flips of a valid request.
        let base = request(
            ACTION_SEND,
            "",
            &format!(r#"<rsp:Send><rsp:Stream Name="stdin" CommandId="{CMD_ID}" End="true">bGluZTEK</rsp:Stream></rsp:Send>"#),
            true,
        )
        .into_bytes();
        for cut in 0..base.len() {
            let _ = parse_request(&base[..cut]);
        }
        let mut seed: u32 = 0x1234_5678;
        for _ in 0..3000 {
            let mut v = base.clone();
            for _ in 0..3 {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let i = (seed as usize >> 8) % v.len();
                v[i] = (seed >> 24) as u8;
            }
            match parse_request(&v) {
                Ok(req) => {
                    let resp = command_response(
                        req.header.shell_id.as_deref().unwrap_or(""),
                        &req.header.message_id,
                    );
                    assert!(parse_request(resp.as_bytes()).is_ok(), "{resp}");
                }
                Err(e) => {
                    let rel = request_message_id(&v);
                    let resp = fault_response(&e.fault(), rel.as_deref());
                    assert!(parse_request(resp.as_bytes()).is_ok(), "{resp}");
                }
            }
        }
    }
}
