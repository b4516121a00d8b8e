//! WS-Management requests the client sends (spec/winrm.md §2, §3, §7) and the parsing of the
//! answers: Create, Command, Send, Receive, Signal and Delete of the WinRS cmd shell, and
//! SOAP faults (§4).
//!
//! Requests are written as text with every value escaped. Responses are parsed into a small
//! tree with a namespace-aware reader (namespaces matched by URI, never by prefix), bounded in
//! size, depth, element and attribute count; DOCTYPEs and unknown entities are refused.

use std::borrow::Cow;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;
use thiserror::Error;

pub use remote_proto::wsman::{
    ACTION_COMMAND, ACTION_CREATE, ACTION_DELETE, ACTION_RECEIVE, ACTION_SEND, ACTION_SIGNAL,
    ANONYMOUS, CODE_INVALID_PARAMETER, CODE_INVALID_SELECTORS, CODE_TIMED_OUT, NS_ADDRESSING,
    NS_MS_WSMAN, NS_SHELL, NS_SOAP, NS_TRANSFER, NS_WSMAN, NS_WSMAN_FAULT, RESOURCE_CMD,
    SIGNAL_CTRL_C, SIGNAL_TERMINATE,
};
const STATE_DONE: &str = "CommandState/Done";

/// The largest response envelope we accept, as told to the server (pywinrm's value, which
/// every server accepts).
pub const MAX_ENVELOPE_SIZE: usize = 153_600;

/// One request: its MessageID (for checking RelatesTo) and the envelope.
#[derive(Debug, Clone)]
pub struct Request {
    pub message_id: String,
    pub action: &'static str,
    pub xml: String,
}

/// Text that cannot go into a request.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error(
        "the command line contains the control character U+{0:04X}, which a WinRM (XML) request cannot carry: remove it, or use an SSH target"
    )]
    ControlCharacter(u32),
}

/// Shell settings for Create.
#[derive(Debug, Clone, Default)]
pub struct ShellOptions {
    /// Close the shell after this long without requests (server default otherwise).
    pub idle_timeout: Option<Duration>,
    /// A name for the shell (informational; Windows shows it in its shell list).
    pub name: Option<String>,
    /// The remote-agent endpoint to open the shell on, sent as the shell variable
    /// `REMOTE_ENDPOINT` (a Windows host just sets the variable).
    pub endpoint: Option<String>,
}

/// Escape text for XML content or a double-quoted attribute.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text
        .chars()
        .any(|c| matches!(c, '&' | '<' | '>' | '"' | '\'' | '\r'))
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // A literal CR would be normalised away by the parser.
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The first character XML 1.0 cannot carry at all (control characters other than tab,
/// newline and carriage return).
fn invalid_xml_char(text: &str) -> Option<char> {
    text.chars().find(|&c| {
        let n = c as u32;
        (n < 0x20 && !matches!(c, '\t' | '\n' | '\r')) || n == 0xFFFE || n == 0xFFFF
    })
}

/// `PT20S`, `PT1.500S`.
pub fn duration(d: Duration) -> String {
    let ms = d.subsec_millis();
    if ms == 0 {
        format!("PT{}S", d.as_secs())
    } else {
        format!("PT{}.{ms:03}S", d.as_secs())
    }
}

fn new_message_id() -> String {
    let id = uuid::Uuid::new_v4().as_hyphenated().to_string();
    format!("uuid:{}", id.to_ascii_uppercase())
}

/// The common envelope: header for `action` (+ ShellId selector, options), then `body`.
/// One `w:Option` of a request's OptionSet.
struct WsOption<'a> {
    name: &'a str,
    value: &'a str,
    /// The server must refuse the request if it does not know the option.
    must_comply: bool,
}

/// An option the server may ignore.
fn opt<'a>(name: &'a str, value: &'a str) -> WsOption<'a> {
    WsOption {
        name,
        value,
        must_comply: false,
    }
}

fn envelope(
    to: &str,
    action: &'static str,
    shell_id: Option<&str>,
    options: &[WsOption<'_>],
    timeout: Duration,
    body: &str,
) -> Request {
    let message_id = new_message_id();
    let mut xml = String::with_capacity(1600 + body.len());
    xml.push_str(&format!(
        "<s:Envelope xmlns:s=\"{NS_SOAP}\" xmlns:a=\"{NS_ADDRESSING}\" xmlns:w=\"{NS_WSMAN}\" \
         xmlns:p=\"{NS_MS_WSMAN}\" xmlns:rsp=\"{NS_SHELL}\"><s:Header>"
    ));
    xml.push_str(&format!("<a:To>{}</a:To>", escape(to)));
    xml.push_str(&format!(
        "<a:ReplyTo><a:Address s:mustUnderstand=\"true\">{ANONYMOUS}</a:Address></a:ReplyTo>"
    ));
    xml.push_str(&format!(
        "<w:MaxEnvelopeSize s:mustUnderstand=\"true\">{MAX_ENVELOPE_SIZE}</w:MaxEnvelopeSize>"
    ));
    xml.push_str(&format!("<a:MessageID>{message_id}</a:MessageID>"));
    xml.push_str("<w:Locale xml:lang=\"en-US\" s:mustUnderstand=\"false\"/>");
    xml.push_str("<p:DataLocale xml:lang=\"en-US\" s:mustUnderstand=\"false\"/>");
    xml.push_str(&format!(
        "<w:OperationTimeout>{}</w:OperationTimeout>",
        duration(timeout)
    ));
    xml.push_str(&format!(
        "<w:ResourceURI s:mustUnderstand=\"true\">{RESOURCE_CMD}</w:ResourceURI>"
    ));
    xml.push_str(&format!(
        "<a:Action s:mustUnderstand=\"true\">{action}</a:Action>"
    ));
    if let Some(id) = shell_id {
        xml.push_str(&format!(
            "<w:SelectorSet><w:Selector Name=\"ShellId\">{}</w:Selector></w:SelectorSet>",
            escape(id)
        ));
    }
    if !options.is_empty() {
        xml.push_str("<w:OptionSet>");
        for o in options {
            let comply = if o.must_comply {
                " MustComply=\"true\""
            } else {
                ""
            };
            xml.push_str(&format!(
                "<w:Option Name=\"{}\"{comply}>{}</w:Option>",
                escape(o.name),
                escape(o.value)
            ));
        }
        xml.push_str("</w:OptionSet>");
    }
    xml.push_str("</s:Header><s:Body>");
    xml.push_str(body);
    xml.push_str("</s:Body></s:Envelope>");
    Request {
        message_id,
        action,
        xml,
    }
}

/// Create a cmd shell (§3.1), UTF-8 code page.
pub fn create_shell(to: &str, options: &ShellOptions, timeout: Duration) -> Request {
    let mut body = String::from(
        "<rsp:Shell><rsp:InputStreams>stdin</rsp:InputStreams>\
         <rsp:OutputStreams>stdout stderr</rsp:OutputStreams>",
    );
    if let Some(idle) = options.idle_timeout {
        body.push_str(&format!(
            "<rsp:IdleTimeOut>{}</rsp:IdleTimeOut>",
            duration(idle)
        ));
    }
    if let Some(endpoint) = &options.endpoint {
        body.push_str(&format!(
            "<rsp:Environment><rsp:Variable Name=\"{}\">{}</rsp:Variable></rsp:Environment>",
            remote_proto::ENDPOINT_ENV,
            escape(endpoint)
        ));
    }
    if let Some(name) = &options.name {
        body.push_str(&format!("<rsp:Name>{}</rsp:Name>", escape(name)));
    }
    body.push_str("</rsp:Shell>");
    let mut opts = vec![
        opt("WINRS_NOPROFILE", "FALSE"),
        opt("WINRS_CODEPAGE", "65001"),
    ];
    if let Some(endpoint) = &options.endpoint {
        // Also an option the server must know: a WinRM server other than remote-agent
        // refuses the shell instead of opening it on its default configuration.
        opts.push(WsOption {
            name: remote_proto::ENDPOINT_ENV,
            value: endpoint,
            must_comply: true,
        });
    }
    envelope(to, ACTION_CREATE, None, &opts, timeout, &body)
}

/// Start `line` in the shell (§3.2): the whole line as `rsp:Command`, no arguments, run by
/// the shell's command interpreter.
pub fn command(
    to: &str,
    shell_id: &str,
    line: &str,
    timeout: Duration,
) -> Result<Request, RequestError> {
    if let Some(c) = invalid_xml_char(line) {
        return Err(RequestError::ControlCharacter(c as u32));
    }
    let body = format!(
        "<rsp:CommandLine><rsp:Command>{}</rsp:Command></rsp:CommandLine>",
        escape(line)
    );
    Ok(envelope(
        to,
        ACTION_COMMAND,
        Some(shell_id),
        &[
            opt("WINRS_CONSOLEMODE_STDIN", "TRUE"),
            opt("WINRS_SKIP_CMD_SHELL", "FALSE"),
        ],
        timeout,
        &body,
    ))
}

/// Input for a command's stdin (§3.3); `end` closes it.
pub fn send(
    to: &str,
    shell_id: &str,
    command_id: &str,
    data: &[u8],
    end: bool,
    timeout: Duration,
) -> Request {
    let body = format!(
        "<rsp:Send><rsp:Stream Name=\"stdin\" CommandId=\"{}\"{}>{}</rsp:Stream></rsp:Send>",
        escape(command_id),
        if end { " End=\"true\"" } else { "" },
        B64.encode(data)
    );
    envelope(to, ACTION_SEND, Some(shell_id), &[], timeout, &body)
}

/// Ask for a command's output (§3.4); the server holds it up to `timeout`.
pub fn receive(to: &str, shell_id: &str, command_id: &str, timeout: Duration) -> Request {
    let body = format!(
        "<rsp:Receive><rsp:DesiredStream CommandId=\"{}\">stdout stderr</rsp:DesiredStream></rsp:Receive>",
        escape(command_id)
    );
    envelope(to, ACTION_RECEIVE, Some(shell_id), &[], timeout, &body)
}

/// Signal a command (§3.5): [`SIGNAL_TERMINATE`] or [`SIGNAL_CTRL_C`].
pub fn signal(
    to: &str,
    shell_id: &str,
    command_id: &str,
    code: &str,
    timeout: Duration,
) -> Request {
    let body = format!(
        "<rsp:Signal CommandId=\"{}\"><rsp:Code>{}</rsp:Code></rsp:Signal>",
        escape(command_id),
        escape(code)
    );
    envelope(to, ACTION_SIGNAL, Some(shell_id), &[], timeout, &body)
}

/// Close the shell and end everything in it (§3.6).
pub fn delete(to: &str, shell_id: &str, timeout: Duration) -> Request {
    envelope(to, ACTION_DELETE, Some(shell_id), &[], timeout, "")
}

// ---------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------

/// A response that is not what the protocol says.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not well-formed XML: {0}")]
    Malformed(String),
    #[error("the XML is too large or too deeply nested ({0})")]
    Limit(&'static str),
    #[error("a DOCTYPE is not allowed in a SOAP message")]
    Doctype,
    #[error("unknown entity &{0};")]
    UnknownEntity(String),
    #[error("no {0} in the response")]
    Missing(&'static str),
    #[error("{0}")]
    Invalid(String),
}

/// A SOAP fault (§4) as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fault {
    /// `s:Code/s:Value`, e.g. `s:Receiver`.
    pub code: String,
    /// `s:Code/s:Subcode/s:Value`, e.g. `w:TimedOut`.
    pub subcode: String,
    /// `s:Reason/s:Text`.
    pub reason: String,
    /// `f:WSManFault@Code`, decimal.
    pub wsman_code: Option<u64>,
    /// `f:WSManFault/f:Message` (text content, including any provider fault text).
    pub message: String,
    /// `f:WSManFault@Machine`.
    pub machine: String,
}

impl Fault {
    /// One line for messages: the reason (or message), the WSManFault code and the subcode.
    pub fn describe(&self) -> String {
        let mut text = if !self.reason.trim().is_empty() {
            collapse(&self.reason)
        } else if !self.message.trim().is_empty() {
            collapse(&self.message)
        } else {
            "no reason given".to_string()
        };
        let message = collapse(&self.message);
        if !message.is_empty() && message != text && !text.contains(&message) {
            text.push_str(&format!(" ({message})"));
        }
        let mut tags = Vec::new();
        if let Some(code) = self.wsman_code {
            tags.push(format!("WSManFault {code}"));
        }
        if !self.subcode.is_empty() {
            tags.push(self.subcode.clone());
        } else if !self.code.is_empty() {
            tags.push(self.code.clone());
        }
        if !tags.is_empty() {
            text.push_str(&format!(" [{}]", tags.join(", ")));
        }
        text
    }

    pub fn is_timeout(&self) -> bool {
        self.wsman_code == Some(CODE_TIMED_OUT)
            || (self.wsman_code.is_none() && local(&self.subcode) == "TimedOut")
    }

    pub fn is_shell_not_found(&self) -> bool {
        self.wsman_code == Some(CODE_INVALID_SELECTORS)
    }

    pub fn is_unknown_command(&self) -> bool {
        self.wsman_code == Some(CODE_INVALID_PARAMETER)
    }
}

fn local(qname: &str) -> &str {
    qname.rsplit(':').next().unwrap_or(qname)
}

fn collapse(text: &str) -> String {
    let mut out = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.len() > 600 {
        let mut cut = 600;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// What a Receive returned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Received {
    /// Output in order: (stream, bytes); only stdout and stderr, empty chunks left out.
    pub output: Vec<(OutStream, Vec<u8>)>,
    /// The command finished, with this exit code.
    pub exit_code: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutStream {
    Stdout,
    Stderr,
}

/// Parse a fault envelope; `None` when `xml` is not one.
pub fn parse_fault(xml: &[u8]) -> Option<Fault> {
    let root = parse_tree(xml).ok()?;
    let body = root.child(NS_SOAP, "Body")?;
    let f = body.child(NS_SOAP, "Fault")?;
    let code = f.child(NS_SOAP, "Code");
    let value = code
        .and_then(|c| c.child(NS_SOAP, "Value"))
        .map(|v| v.text.trim().to_string())
        .unwrap_or_default();
    let subcode = code
        .and_then(|c| c.child(NS_SOAP, "Subcode"))
        .and_then(|s| s.child(NS_SOAP, "Value"))
        .map(|v| v.text.trim().to_string())
        .unwrap_or_default();
    let reason = f
        .child(NS_SOAP, "Reason")
        .and_then(|r| r.child(NS_SOAP, "Text"))
        .map(|t| t.text.trim().to_string())
        .unwrap_or_default();
    let wsman = f.find(NS_WSMAN_FAULT, "WSManFault");
    Some(Fault {
        code: value,
        subcode,
        reason,
        wsman_code: wsman
            .and_then(|w| w.attr("Code"))
            .and_then(|c| c.trim().parse().ok()),
        message: wsman
            .and_then(|w| w.child(NS_WSMAN_FAULT, "Message"))
            .map(|m| m.all_text().trim().to_string())
            .unwrap_or_default(),
        machine: wsman
            .and_then(|w| w.attr("Machine"))
            .unwrap_or_default()
            .to_string(),
    })
}

/// Parse a response envelope, check that it answers `request`, and return its Body.
fn response<'a>(root: &'a Node, request: &Request) -> Result<&'a Node, ParseError> {
    if root.ns != NS_SOAP || root.local != "Envelope" {
        return Err(ParseError::Missing("soap:Envelope"));
    }
    if let Some(rel) = root
        .child(NS_SOAP, "Header")
        .and_then(|h| h.child(NS_ADDRESSING, "RelatesTo"))
    {
        let rel = rel.text.trim();
        if !rel.eq_ignore_ascii_case(&request.message_id) {
            return Err(ParseError::Invalid(format!(
                "the response relates to message {rel}, not to the request {}",
                request.message_id
            )));
        }
    }
    root.child(NS_SOAP, "Body")
        .ok_or(ParseError::Missing("soap:Body"))
}

/// The ShellId from a Create response (§3.1): the `Selector Name="ShellId"`, else
/// `rsp:Shell/rsp:ShellId`.
pub fn parse_create(xml: &[u8], request: &Request) -> Result<String, ParseError> {
    let root = parse_tree(xml)?;
    let body = response(&root, request)?;
    let from_selector = body
        .find_all(NS_WSMAN, "Selector")
        .into_iter()
        .find(|s| s.attr("Name") == Some("ShellId"))
        .map(|s| s.text.trim().to_string());
    let id = from_selector
        .filter(|s| !s.is_empty())
        .or_else(|| {
            body.find(NS_SHELL, "ShellId")
                .map(|s| s.text.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .ok_or(ParseError::Missing("ShellId"))?;
    check_id(&id, "ShellId")?;
    Ok(id)
}

/// The CommandId from a Command response (§3.2).
pub fn parse_command(xml: &[u8], request: &Request) -> Result<String, ParseError> {
    let root = parse_tree(xml)?;
    let body = response(&root, request)?;
    let id = body
        .find(NS_SHELL, "CommandId")
        .map(|c| c.text.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or(ParseError::Missing("rsp:CommandId"))?;
    check_id(&id, "CommandId")?;
    Ok(id)
}

/// Output and state from a Receive response (§3.4) for `command_id`.
pub fn parse_receive(
    xml: &[u8],
    request: &Request,
    command_id: &str,
) -> Result<Received, ParseError> {
    let root = parse_tree(xml)?;
    let body = response(&root, request)?;
    let resp = body
        .child(NS_SHELL, "ReceiveResponse")
        .ok_or(ParseError::Missing("rsp:ReceiveResponse"))?;
    let mine = |n: &Node| {
        n.attr("CommandId")
            .is_none_or(|c| c.trim().eq_ignore_ascii_case(command_id))
    };
    let mut out = Received::default();
    for node in resp.children.iter() {
        if node.ns != NS_SHELL || !mine(node) {
            continue;
        }
        match node.local.as_str() {
            "Stream" => {
                let stream = match node.attr("Name") {
                    Some("stdout") => OutStream::Stdout,
                    Some("stderr") => OutStream::Stderr,
                    _ => continue,
                };
                let text: String = node.text.split_whitespace().collect();
                if text.is_empty() {
                    continue;
                }
                let data = B64.decode(text.as_bytes()).map_err(|e| {
                    ParseError::Invalid(format!("{} output is not base64: {e}", node_name(stream)))
                })?;
                if data.is_empty() {
                    continue;
                }
                match out.output.last_mut() {
                    Some((s, buf)) if *s == stream => buf.extend_from_slice(&data),
                    _ => out.output.push((stream, data)),
                }
            }
            "CommandState" => {
                let state = node.attr("State").unwrap_or_default();
                if state.ends_with(STATE_DONE) {
                    let code = node
                        .find(NS_SHELL, "ExitCode")
                        .map(|c| c.text.trim().to_string())
                        .unwrap_or_default();
                    let code = code.parse::<i64>().map_err(|_| {
                        ParseError::Invalid(format!(
                            "the command is done but its exit code {code:?} is not a number"
                        ))
                    })?;
                    out.exit_code = Some(code);
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

fn node_name(s: OutStream) -> &'static str {
    match s {
        OutStream::Stdout => "stdout",
        OutStream::Stderr => "stderr",
    }
}

/// Check that a 200 response is a well-formed envelope answering `request` (Send, Signal,
/// Delete: the body does not matter).
pub fn parse_ack(xml: &[u8], request: &Request) -> Result<(), ParseError> {
    if xml.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let root = parse_tree(xml)?;
    response(&root, request).map(drop)
}

/// Ids go into file records and the command line: keep them to safe characters.
fn check_id(id: &str, what: &str) -> Result<(), ParseError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ParseError::Invalid(format!(
            "the server's {what} {:?} is not a plain id (letters, digits, '-', '_', at most 64)",
            collapse(id)
        )))
    }
}

// ---------------------------------------------------------------------------------------
// A small bounded XML tree
// ---------------------------------------------------------------------------------------

const MAX_INPUT: usize = 16 << 20;
const MAX_DEPTH: usize = 64;
const MAX_ELEMENTS: usize = 100_000;
const MAX_ATTRIBUTES: usize = 64;
const MAX_NAMESPACES: usize = 256;

#[derive(Debug, Default)]
struct Node {
    ns: String,
    local: String,
    /// Unprefixed attributes by name (xmlns declarations and prefixed ones left out).
    attrs: Vec<(String, String)>,
    text: String,
    children: Vec<Node>,
}

impl Node {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn child(&self, ns: &str, local: &str) -> Option<&Node> {
        self.children
            .iter()
            .find(|c| c.ns == ns && c.local == local)
    }

    /// The first descendant (depth first) with that name.
    fn find(&self, ns: &str, local: &str) -> Option<&Node> {
        for c in &self.children {
            if c.ns == ns && c.local == local {
                return Some(c);
            }
            if let Some(found) = c.find(ns, local) {
                return Some(found);
            }
        }
        None
    }

    fn find_all<'a>(&'a self, ns: &str, local: &str) -> Vec<&'a Node> {
        let mut out = Vec::new();
        let mut stack: Vec<&Node> = vec![self];
        while let Some(n) = stack.pop() {
            for c in n.children.iter().rev() {
                stack.push(c);
            }
            if n.ns == ns && n.local == local && !std::ptr::eq(n, self) {
                out.push(n);
            }
        }
        out
    }

    /// Text of this element and all descendants, in document order (approximately: own text
    /// first).
    fn all_text(&self) -> String {
        let mut s = self.text.clone();
        for c in &self.children {
            let t = c.all_text();
            if !t.trim().is_empty() {
                if !s.trim().is_empty() {
                    s.push(' ');
                }
                s.push_str(&t);
            }
        }
        s
    }
}

fn malformed(e: impl std::fmt::Display) -> ParseError {
    ParseError::Malformed(e.to_string())
}

fn predefined_entity(name: &str) -> Option<&'static str> {
    match name {
        "lt" => Some("<"),
        "gt" => Some(">"),
        "amp" => Some("&"),
        "apos" => Some("'"),
        "quot" => Some("\""),
        _ => None,
    }
}

fn parse_tree(xml: &[u8]) -> Result<Node, ParseError> {
    if xml.len() > MAX_INPUT {
        return Err(ParseError::Limit("input size"));
    }
    let text = std::str::from_utf8(xml).map_err(|_| malformed("not UTF-8"))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = NsReader::from_str(text);
    {
        let cfg = reader.config_mut();
        cfg.check_end_names = true;
        cfg.expand_empty_elements = false;
        cfg.allow_unmatched_ends = false;
    }
    reader
        .resolver_mut()
        .set_max_namespace_bindings(MAX_NAMESPACES);
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let mut elements = 0usize;
    loop {
        let (resolved, event) = reader.read_resolved_event().map_err(malformed)?;
        let ns = match (&event, resolved) {
            (Event::Start(_) | Event::Empty(_), ResolveResult::Bound(ns)) => {
                ns.into_inner().to_string()
            }
            (Event::Start(_) | Event::Empty(_), ResolveResult::Unknown(p)) => {
                return Err(malformed(format!(
                    "undeclared namespace prefix {}",
                    p.chars().take(40).collect::<String>()
                )));
            }
            _ => String::new(),
        };
        match event {
            Event::Start(ref start) | Event::Empty(ref start) => {
                if root.is_some() {
                    return Err(malformed("content after the root element"));
                }
                elements += 1;
                if elements > MAX_ELEMENTS {
                    return Err(ParseError::Limit("element count"));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(ParseError::Limit("nesting depth"));
                }
                let node = new_node(start, ns)?;
                if matches!(event, Event::Empty(_)) {
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(node),
                        None => root = Some(node),
                    }
                } else {
                    stack.push(node);
                }
            }
            Event::End(_) => {
                let node = stack.pop().ok_or_else(|| malformed("unmatched end tag"))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => root = Some(node),
                }
            }
            Event::Text(t) => {
                let content = t.xml10_content();
                match stack.last_mut() {
                    Some(node) => node.text.push_str(&content),
                    None if content.trim().is_empty() => {}
                    None => return Err(malformed("text outside the root element")),
                }
            }
            Event::CData(t) => match stack.last_mut() {
                Some(node) => node.text.push_str(&t.xml10_content()),
                None => return Err(malformed("CDATA outside the root element")),
            },
            Event::GeneralRef(r) => {
                let s: String = match r.resolve_char_ref().map_err(malformed)? {
                    Some(c) => c.to_string(),
                    None => {
                        let name = r.into_inner();
                        predefined_entity(&name)
                            .ok_or_else(|| {
                                ParseError::UnknownEntity(name.chars().take(40).collect())
                            })?
                            .to_string()
                    }
                };
                match stack.last_mut() {
                    Some(node) => node.text.push_str(&s),
                    None => return Err(malformed("reference outside the root element")),
                }
            }
            Event::DocType(_) => return Err(ParseError::Doctype),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(malformed("unexpected end of document"));
    }
    root.ok_or_else(|| malformed("no root element"))
}

fn new_node(start: &BytesStart<'_>, ns: String) -> Result<Node, ParseError> {
    let mut attrs = Vec::new();
    for (i, attr) in start.attributes().enumerate() {
        if i >= MAX_ATTRIBUTES {
            return Err(ParseError::Limit("attribute count"));
        }
        let attr = attr.map_err(malformed)?;
        let key = attr.key;
        if key.prefix().is_some() || key.as_ref() == "xmlns" {
            continue;
        }
        let value =
            attr.normalized_value_with(quick_xml::XmlVersion::Implicit1_0, 1, predefined_entity)
                .map_err(|e| match e {
                    quick_xml::Error::Escape(
                        quick_xml::escape::EscapeError::UnrecognizedEntity(_, name),
                    ) => ParseError::UnknownEntity(name.chars().take(40).collect()),
                    other => malformed(other),
                })?;
        attrs.push((key.as_ref().to_string(), value.into_owned()));
    }
    Ok(Node {
        ns,
        local: start.local_name().as_ref().to_string(),
        attrs,
        text: String::new(),
        children: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "xmlns:s=\"http://www.w3.org/2003/05/soap-envelope\" xmlns:a=\"http://schemas.xmlsoap.org/ws/2004/08/addressing\" xmlns:w=\"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd\" xmlns:x=\"http://schemas.xmlsoap.org/ws/2004/09/transfer\" xmlns:rsp=\"http://schemas.microsoft.com/wbem/wsman/1/windows/shell\"";
    const CMD: &str = "5D0C7E4B-91A2-4E3F-8C6D-0F1E2D3C4B5A";

    fn req() -> Request {
        Request {
            message_id: "uuid:6c3f1b4e-0d2a-4f7e-9b1c-2a7d5e8f9012".into(),
            action: ACTION_RECEIVE,
            xml: String::new(),
        }
    }

    fn hdr(action: &str) -> String {
        format!(
            "<s:Header><a:Action>{action}</a:Action><a:MessageID>uuid:0B5E3A8C-7F21-4C55-A3D9-6E1F2B4C8D70</a:MessageID>\
             <a:To>http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:To>\
             <a:RelatesTo>uuid:6c3f1b4e-0d2a-4f7e-9b1c-2a7d5e8f9012</a:RelatesTo></s:Header>"
        )
    }

    fn env(action: &str, body: &str) -> String {
        format!(
            "<s:Envelope xml:lang=\"en-US\" {NS}>{}<s:Body>{body}</s:Body></s:Envelope>",
            hdr(action)
        )
    }

    #[test]
    fn create_response_7_2() {
        let xml = env(
            "http://schemas.xmlsoap.org/ws/2004/09/transfer/CreateResponse",
            r#"
  <x:ResourceCreated>
   <a:Address>http://agent-host:5985/wsman</a:Address>
   <a:ReferenceParameters>
    <w:ResourceURI>http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd</w:ResourceURI>
    <w:SelectorSet><w:Selector Name="ShellId">A39F1931-AB90-4404-B7FA-2673A0C50FF0</w:Selector></w:SelectorSet>
   </a:ReferenceParameters>
  </x:ResourceCreated>
  <rsp:Shell>
   <rsp:ShellId>A39F1931-AB90-4404-B7FA-2673A0C50FF0</rsp:ShellId>
   <rsp:ResourceUri>http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd</rsp:ResourceUri>
   <rsp:Owner>vagrant</rsp:Owner><rsp:ClientIP>192.0.2.10</rsp:ClientIP><rsp:IdleTimeOut>PT7200.000S</rsp:IdleTimeOut>
   <rsp:InputStreams>stdin</rsp:InputStreams><rsp:OutputStreams>stdout stderr</rsp:OutputStreams>
  </rsp:Shell>"#,
        );
        assert_eq!(
            parse_create(xml.as_bytes(), &req()).unwrap(),
            "A39F1931-AB90-4404-B7FA-2673A0C50FF0"
        );
        // Only rsp:Shell (no selector): still found. Other prefixes, same URIs.
        let xml = format!(
            "<?xml version=\"1.0\"?><env:Envelope xmlns:env=\"{NS_SOAP}\" xmlns:q=\"{NS_SHELL}\"><env:Body>\
             <q:Shell><q:ShellId>ABC-1</q:ShellId></q:Shell></env:Body></env:Envelope>"
        );
        assert_eq!(parse_create(xml.as_bytes(), &req()).unwrap(), "ABC-1");
        // A prefix bound to another namespace does not count.
        let xml = format!(
            "<s:Envelope xmlns:s=\"{NS_SOAP}\" xmlns:rsp=\"urn:other\"><s:Body>\
             <rsp:Shell><rsp:ShellId>ABC-1</rsp:ShellId></rsp:Shell></s:Body></s:Envelope>"
        );
        assert_eq!(
            parse_create(xml.as_bytes(), &req()),
            Err(ParseError::Missing("ShellId"))
        );
    }

    #[test]
    fn command_response_7_3() {
        let xml = env(
            "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandResponse",
            &format!(
                "<rsp:CommandResponse><rsp:CommandId>{CMD}</rsp:CommandId></rsp:CommandResponse>"
            ),
        );
        assert_eq!(parse_command(xml.as_bytes(), &req()).unwrap(), CMD);
        let bad = env(
            "x",
            "<rsp:CommandResponse><rsp:CommandId>a b/c</rsp:CommandId></rsp:CommandResponse>",
        );
        assert!(matches!(
            parse_command(bad.as_bytes(), &req()),
            Err(ParseError::Invalid(_))
        ));
    }

    #[test]
    fn receive_running_7_5_and_done_7_6() {
        let xml = env(
            "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/ReceiveResponse",
            &format!(
                "<rsp:ReceiveResponse>\
                 <rsp:Stream Name=\"stdout\" CommandId=\"{CMD}\">aGVsbG8g</rsp:Stream>\
                 <rsp:CommandState CommandId=\"{CMD}\" State=\"http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Running\"/>\
                 </rsp:ReceiveResponse>"
            ),
        );
        let r = parse_receive(xml.as_bytes(), &req(), CMD).unwrap();
        assert_eq!(r.output, vec![(OutStream::Stdout, b"hello ".to_vec())]);
        assert_eq!(r.exit_code, None);

        let xml = env(
            "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/ReceiveResponse",
            &format!(
                "<rsp:ReceiveResponse>\n\
                 <rsp:Stream Name=\"stdout\" CommandId=\"{CMD}\">d29ybGQK</rsp:Stream>\n\
                 <rsp:Stream Name=\"stderr\" CommandId=\"{CMD}\">d2Fybgo=</rsp:Stream>\n\
                 <rsp:Stream Name=\"stdout\" CommandId=\"{CMD}\" End=\"true\"></rsp:Stream>\n\
                 <rsp:Stream Name=\"stderr\" CommandId=\"{CMD}\" End=\"true\"></rsp:Stream>\n\
                 <rsp:CommandState CommandId=\"{CMD}\" State=\"http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done\"><rsp:ExitCode>3</rsp:ExitCode></rsp:CommandState>\n\
                 </rsp:ReceiveResponse>"
            ),
        );
        let r = parse_receive(xml.as_bytes(), &req(), &CMD.to_lowercase()).unwrap();
        assert_eq!(
            r.output,
            vec![
                (OutStream::Stdout, b"world\n".to_vec()),
                (OutStream::Stderr, b"warn\n".to_vec())
            ]
        );
        assert_eq!(r.exit_code, Some(3));

        // Another command's output is not ours.
        let r = parse_receive(xml.as_bytes(), &req(), "OTHER").unwrap();
        assert_eq!(r, Received::default());
    }

    #[test]
    fn relates_to_must_match() {
        let xml = env("x", "<rsp:ReceiveResponse/>");
        let mut other = req();
        other.message_id = "uuid:00000000-0000-0000-0000-000000000000".into();
        assert!(matches!(
            parse_receive(xml.as_bytes(), &other, CMD),
            Err(ParseError::Invalid(_))
        ));
        let mut upper = req();
        upper.message_id = upper.message_id.to_uppercase();
        assert!(parse_receive(xml.as_bytes(), &upper, CMD).is_ok());
    }

    #[test]
    fn fault_7_9() {
        let xml = format!(
            "<s:Envelope xml:lang=\"en-US\" {NS}>{}<s:Body><s:Fault>\
             <s:Code><s:Value>s:Receiver</s:Value><s:Subcode><s:Value>w:TimedOut</s:Value></s:Subcode></s:Code>\
             <s:Reason><s:Text xml:lang=\"en-US\">The WS-Management operation did not complete within the OperationTimeout.</s:Text></s:Reason>\
             <s:Detail><f:WSManFault xmlns:f=\"http://schemas.microsoft.com/wbem/wsman/1/wsmanfault\" Code=\"2150858793\" Machine=\"agent-host\">\
             <f:Message>The WS-Management operation did not complete within the OperationTimeout.</f:Message>\
             </f:WSManFault></s:Detail></s:Fault></s:Body></s:Envelope>",
            hdr("http://schemas.dmtf.org/wbem/wsman/1/wsman/fault")
        );
        let f = parse_fault(xml.as_bytes()).unwrap();
        assert!(f.is_timeout());
        assert_eq!(f.code, "s:Receiver");
        assert_eq!(f.subcode, "w:TimedOut");
        assert_eq!(f.machine, "agent-host");
        assert_eq!(
            f.describe(),
            "The WS-Management operation did not complete within the OperationTimeout. [WSManFault 2150858793, w:TimedOut]"
        );
        assert!(parse_fault(b"<x/>").is_none());
        assert!(parse_fault(b"not xml").is_none());
    }

    #[test]
    fn requests_are_well_formed_and_escaped() {
        let to = "http://h:5985/wsman";
        let t = Duration::from_secs(20);
        let r = command(to, "SHELL", "echo \"a<b\" & 'c' > /dev/null\r", t).unwrap();
        assert!(r.xml.contains(
            "<rsp:Command>echo &quot;a&lt;b&quot; &amp; &apos;c&apos; &gt; /dev/null&#13;</rsp:Command>"
        ));
        assert!(
            r.xml
                .contains("<w:Selector Name=\"ShellId\">SHELL</w:Selector>")
        );
        assert!(
            r.xml
                .contains("<w:Option Name=\"WINRS_CONSOLEMODE_STDIN\">TRUE</w:Option>")
        );
        assert!(
            r.xml
                .contains(&format!("<a:MessageID>{}</a:MessageID>", r.message_id))
        );
        assert!(r.message_id.starts_with("uuid:"));
        // Our own parser reads back the command line exactly.
        let root = parse_tree(r.xml.as_bytes()).unwrap();
        let line = root.find(NS_SHELL, "Command").unwrap();
        assert_eq!(line.text, "echo \"a<b\" & 'c' > /dev/null\r");
        let action = root.find(NS_ADDRESSING, "Action").unwrap();
        assert_eq!(action.text, ACTION_COMMAND);
        assert_eq!(
            command(to, "S", "a\u{1}b", t).unwrap_err(),
            RequestError::ControlCharacter(1)
        );

        let c = create_shell(
            to,
            &ShellOptions {
                idle_timeout: Some(Duration::from_secs(600)),
                name: Some("n&m".into()),
                endpoint: Some("jea".into()),
            },
            t,
        );
        assert!(
            c.xml.contains(
                "<rsp:Environment><rsp:Variable Name=\"REMOTE_ENDPOINT\">jea</rsp:Variable></rsp:Environment>"
            ),
            "{}",
            c.xml
        );
        assert!(
            c.xml
                .contains("<w:Option Name=\"WINRS_CODEPAGE\">65001</w:Option>")
        );
        assert!(
            c.xml
                .contains("<w:Option Name=\"REMOTE_ENDPOINT\" MustComply=\"true\">jea</w:Option>")
        );
        assert!(c.xml.contains("<rsp:IdleTimeOut>PT600S</rsp:IdleTimeOut>"));
        assert!(c.xml.contains("<rsp:Name>n&amp;m</rsp:Name>"));
        assert!(parse_tree(c.xml.as_bytes()).is_ok());

        let s = send(to, "S", "C", b"line1\n", true, t);
        assert!(s.xml.contains(
            "<rsp:Stream Name=\"stdin\" CommandId=\"C\" End=\"true\">bGluZTEK</rsp:Stream>"
        ));
        let r = receive(to, "S", "C", Duration::from_millis(1500));
        assert!(
            r.xml
                .contains("<w:OperationTimeout>PT1.500S</w:OperationTimeout>")
        );
        assert!(
            r.xml
                .contains("<rsp:DesiredStream CommandId=\"C\">stdout stderr</rsp:DesiredStream>")
        );
        let g = signal(to, "S", "C", SIGNAL_TERMINATE, t);
        assert!(
            g.xml
                .contains(&format!("<rsp:Code>{SIGNAL_TERMINATE}</rsp:Code>"))
        );
        let d = delete(to, "S", t);
        assert!(d.xml.contains(ACTION_DELETE) && d.xml.contains("<s:Body></s:Body>"));
    }

    #[test]
    fn hostile_xml_is_refused() {
        assert_eq!(
            parse_tree(b"<!DOCTYPE x [<!ENTITY a \"b\">]><x>&a;</x>").unwrap_err(),
            ParseError::Doctype
        );
        assert!(matches!(
            parse_tree(b"<x>&foo;</x>"),
            Err(ParseError::UnknownEntity(_))
        ));
        let deep = "<a>".repeat(100) + &"</a>".repeat(100);
        assert_eq!(
            parse_tree(deep.as_bytes()).unwrap_err(),
            ParseError::Limit("nesting depth")
        );
        assert!(parse_tree(b"<a><b></a>").is_err());
        assert!(parse_tree(b"<a/><b/>").is_err());
        assert!(parse_tree(b"").is_err());
        assert_eq!(parse_tree(b"<a>&lt;&#65;&#x42;</a>").unwrap().text, "<AB");
    }
}
