//! WinRM cmd shells (spec §3) on the session host. Each shell is a commands-shape session
//! owned by the authenticated user, so it is listed by `remote session list` and its output
//! can be received over any transport, exactly once. This module owns the WinRM view of it:
//! ShellId and CommandId ↔ session and command numbers, the Receive long-poll with its
//! per-command cursor, Signal and Delete, the per-user shell quota, and turning session-host
//! errors into WS-Management faults.

use crate::endpoints::{ENDPOINT_ENV, EndpointError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::Signal;
use remote_proto::session::{Shape, Stream, record};
use tokio::time::Instant;

use super::soap::{self, Body, CommandStateKind, Fault, OutputStream, Request, SignalCode};
use crate::process::PtySettings;
use crate::session::commands::{Line, StartState};
use crate::session::{OpenRequest, Principal, Session, SessionError, SessionHost};

/// Limits and choices for WinRM shells.
#[derive(Debug, Clone)]
pub struct ShellSettings {
    pub max_shells_per_user: usize,
    pub max_commands_per_shell: usize,
    /// Longest idle timeout a shell may have (a client may ask for less).
    pub idle_timeout: Duration,
    /// Program run for a Command of `powershell`/`powershell.exe`.
    pub powershell: String,
    /// Name reported as `Machine` in faults.
    pub machine: String,
    /// The largest response envelope a client may ask for (its MaxEnvelopeSize).
    pub max_envelope_bytes: usize,
    /// Output a shell keeps for its commands until they are received.
    pub journal_bytes: usize,
}

/// Where a request came from, for the Create response.
pub struct RequestContext {
    pub client_ip: String,
    /// `http(s)://host:port/wsman` as the client addressed us.
    pub address: String,
}

/// Time between a terminate signal (SIGTERM) and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// After the first output of a Receive, wait this long for more before answering.
const COALESCE: Duration = Duration::from_millis(50);
/// Commands remembered per shell after they finished, before the oldest are forgotten.
const MAX_FINISHED_COMMANDS: usize = 256;
/// The default OperationTimeout when a request has none.
const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a request may wait, whatever OperationTimeout the client asks for.
const MAX_OPERATION_TIMEOUT: Duration = Duration::from_secs(600);
/// Input for a command is queued in pieces of at most this size (the queue holds 64).
const INPUT_PIECE: usize = 16 * 1024;
/// Shells whose session was closed elsewhere are forgotten this often.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Answer a long-poll this much before the client's OperationTimeout.
const DEADLINE_MARGIN: Duration = Duration::from_millis(500);

pub struct Shells {
    host: Arc<SessionHost>,
    settings: ShellSettings,
    shells: Mutex<HashMap<String, Arc<Shell>>>,
    last_sweep: Mutex<Instant>,
    shutdown: tokio_util::sync::CancellationToken,
}

struct Shell {
    id: String,
    owner: String,
    session: Arc<Session>,
    commands: Mutex<HashMap<String, Arc<Cmd>>>,
    /// CommandIds in start order, to forget the oldest finished ones.
    order: Mutex<Vec<String>>,
}

/// One command as WinRM sees it.
struct Cmd {
    /// The session's command number.
    num: u64,
    /// Held by the Receive in progress, so two never deliver the same output.
    state: tokio::sync::Mutex<CmdState>,
    finished: std::sync::atomic::AtomicBool,
}

struct CmdState {
    /// Next journal seq to look at.
    cursor: u64,
    /// Part of a record taken from the journal that did not fit into the last response.
    pending: Option<(Stream, Bytes)>,
    exit: Option<i64>,
}

impl Shell {
    fn commands(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Cmd>>> {
        self.commands.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn command(&self, id: &str) -> Option<Arc<Cmd>> {
        self.commands().get(id).cloned()
    }
}

impl Shells {
    /// The audit log of the session host the shells live in.
    pub fn audit(&self) -> &crate::audit::Audit {
        self.host.audit()
    }

    /// `shutdown`: when cancelled, waiting Receives end at once with the TimedOut fault
    /// (spec §3.7), so connections can finish their request and close.
    pub fn new(
        host: Arc<SessionHost>,
        settings: ShellSettings,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Shells {
        Shells {
            host,
            settings,
            shutdown,
            shells: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Forget shells whose session was closed (idle, `remote session rm`), so their journals
    /// are freed; at most every [`SWEEP_EVERY`].
    fn sweep(&self) {
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < SWEEP_EVERY {
                return;
            }
            *last = Instant::now();
        }
        self.map().retain(|_, s| !s.session.is_closed());
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Shell>>> {
        self.shells.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn machine(&self) -> &str {
        &self.settings.machine
    }

    /// Carry out one authenticated request; the response envelope, or the fault to send.
    pub async fn handle(
        &self,
        who: &Principal,
        req: &Request,
        ctx: &RequestContext,
    ) -> Result<String, Fault> {
        let rel = req.header.message_id.as_str();
        let timeout = req
            .header
            .operation_timeout
            .unwrap_or(DEFAULT_OPERATION_TIMEOUT)
            .min(MAX_OPERATION_TIMEOUT);
        let deadline =
            Instant::now() + timeout.saturating_sub(DEADLINE_MARGIN).max(DEADLINE_MARGIN);
        self.sweep();
        match &req.body {
            Body::Create(create) => self.create(who, req, create, ctx).await,
            Body::Command {
                command_id,
                command,
                arguments,
            } => {
                let shell = self.shell(who, req)?;
                let _active = shell.session.attach();
                let id = self
                    .command(req, &shell, command_id.as_deref(), command, arguments)
                    .await?;
                Ok(soap::command_response(&id, rel))
            }
            Body::Send { streams, .. } => {
                let shell = self.shell(who, req)?;
                let _active = shell.session.attach();
                for s in streams
                    .iter()
                    .filter(|s| s.name.eq_ignore_ascii_case("stdin"))
                {
                    let id = s.command_id.as_deref().unwrap_or_default();
                    let cmd = shell.command(id).ok_or_else(|| unknown_command(id))?;
                    send(&shell.session, &cmd, &s.data, s.end, deadline).await?;
                }
                Ok(soap::send_response(rel))
            }
            Body::Receive { command_id, .. } => {
                let shell = self.shell(who, req)?;
                let _active = shell.session.attach();
                let Some(id) = command_id.as_deref() else {
                    return Err(Fault::invalid_parameter(
                        "a Receive without CommandId is for PowerShell remoting, which this agent does not serve; give rsp:DesiredStream/@CommandId",
                    ));
                };
                let cmd = shell.command(id).ok_or_else(|| unknown_command(id))?;
                let envelope = req
                    .header
                    .max_envelope_size
                    .unwrap_or(153_600)
                    .clamp(8192, self.settings.max_envelope_bytes as u64);
                let max = soap::max_receive_payload(envelope);
                tokio::select! {
                    r = receive(&shell, &cmd, id, max, deadline, rel) => r,
                    () = self.shutdown.cancelled() => Err(Fault::timed_out()),
                }
            }
            Body::Signal { command_id, code } => {
                let shell = self.shell(who, req)?;
                let _active = shell.session.attach();
                self.signal(&shell, command_id.as_deref(), code)?;
                Ok(soap::signal_response(rel))
            }
            Body::Delete => {
                let shell = self.shell(who, req)?;
                self.map().remove(&shell.id);
                let _ = self.host.close(who, &shell.session.id);
                tracing::debug!(shell = %shell.id, session = %shell.session.id, owner = %who.name, "winrm shell deleted");
                Ok(soap::delete_response(rel))
            }
            Body::Other { action } => Err(Fault::action_not_supported(action)),
        }
    }

    /// The caller's live shell named by the request's ShellId selector. Other users' shells,
    /// and shells whose session has been closed (idle, `remote session rm`), are not found.
    fn shell(&self, who: &Principal, req: &Request) -> Result<Arc<Shell>, Fault> {
        let id = req.header.shell_id.as_deref().unwrap_or_default();
        let mut map = self.map();
        match map.get(id) {
            Some(s) if s.owner == who.name && !s.session.is_closed() => Ok(s.clone()),
            Some(s) if s.session.is_closed() => {
                map.remove(id);
                Err(Fault::shell_not_found(id))
            }
            _ => Err(Fault::shell_not_found(id)),
        }
    }

    async fn create(
        &self,
        who: &Principal,
        req: &Request,
        create: &soap::CreateShell,
        ctx: &RequestContext,
    ) -> Result<String, Fault> {
        let uri = req.header.resource_uri.as_deref().unwrap_or_default();
        // The cmd shell, or the cmd shell of endpoint NAME as `…/shell/cmd/NAME` (as a
        // PowerShell endpoint is named in its ResourceURI).
        let named = uri
            .get(..soap::RESOURCE_CMD.len())
            .filter(|head| head.eq_ignore_ascii_case(soap::RESOURCE_CMD))
            .and_then(|_| uri[soap::RESOURCE_CMD.len()..].strip_prefix('/'));
        if let Some(name) = named {
            crate::endpoints::validate_name(name).map_err(|why| {
                Fault::destination_unreachable(uri).with_reason(format!(
                    "the ResourceURI {uri} names no valid endpoint: {why}"
                ))
            })?;
        } else if !uri.eq_ignore_ascii_case(soap::RESOURCE_CMD) {
            return Err(if uri.starts_with(soap::NS_POWERSHELL) {
                Fault::destination_unreachable(uri).with_reason(format!(
                    "PowerShell remoting (PSRP, resource {uri}) is not served by this agent; use the cmd shell resource {}",
                    soap::RESOURCE_CMD
                ))
            } else {
                Fault::destination_unreachable(uri)
            });
        }
        for (name, opt) in &req.header.options {
            let known = [
                "WINRS_NOPROFILE",
                "WINRS_CODEPAGE",
                "WINRS_CONSOLEMODE_STDIN",
                ENDPOINT_ENV,
            ]
            .iter()
            .any(|k| k.eq_ignore_ascii_case(name));
            if opt.must_comply && !known {
                return Err(Fault::invalid_options(name));
            }
        }
        {
            let mut map = self.map();
            map.retain(|_, s| !s.session.is_closed());
            let mine = map.values().filter(|s| s.owner == who.name).count();
            if mine >= self.settings.max_shells_per_user {
                tracing::warn!(owner = %who.name, limit = self.settings.max_shells_per_user, "winrm shell refused: too many shells ([winrm] max_shells_per_user)");
                return Err(Fault::quota_shells());
            }
        }
        let cwd = match create.working_directory.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(dir) => {
                let path = PathBuf::from(dir);
                if !path.is_absolute() || !path.is_dir() {
                    return Err(Fault::internal_error(
                        267,
                        format!(
                            "The working directory {dir} does not exist on this host (or is not an absolute path)."
                        ),
                    ));
                }
                Some(path)
            }
        };
        let idle = create
            .idle_timeout
            .map(|d| d.clamp(Duration::from_secs(1), self.settings.idle_timeout))
            .unwrap_or(self.settings.idle_timeout);
        // The endpoint: named in the ResourceURI, else option REMOTE_ENDPOINT, else the
        // variable of that name in the shell's environment (what pywinrm's
        // open_shell(env_vars=…) can send); default `default`. Two that differ are refused.
        let asked = req
            .header
            .option(ENDPOINT_ENV)
            .map(str::to_string)
            .or_else(|| {
                create
                    .environment
                    .iter()
                    .find(|(k, _)| k == ENDPOINT_ENV)
                    .map(|(_, v)| v.clone())
            });
        let endpoint = match (named, asked) {
            (Some(n), Some(a)) if n != a.trim() => {
                return Err(Fault::invalid_options(ENDPOINT_ENV).with_reason(format!(
                    "the ResourceURI names endpoint '{n}' but {ENDPOINT_ENV} says '{}': give one of them",
                    a.chars().take(64).collect::<String>()
                )));
            }
            (Some(n), _) => n.to_string(),
            (None, a) => a.unwrap_or_default(),
        };
        // The wrapper's own variables are not the client's to set.
        let env = create
            .environment
            .iter()
            .filter(|(k, _)| !k.starts_with("__rs_") && !k.starts_with("__RS_"))
            .filter(|(k, _)| k != ENDPOINT_ENV)
            .cloned()
            .collect();
        let mut start = StartState { cwd, env };
        if req
            .header
            .option("WINRS_CODEPAGE")
            .is_some_and(|c| c.trim() == "65001")
            && !start.env.iter().any(|(k, _)| k == "LANG")
        {
            start.env.push(("LANG".into(), "C.UTF-8".into()));
        }
        let shell_id = match create.shell_id.as_deref() {
            Some(id) if valid_id(id) && !self.map().contains_key(id) => id.to_string(),
            _ => soap::new_uuid(),
        };
        let session = self
            .host
            .open(
                who,
                OpenRequest {
                    shape: Shape::Commands,
                    name: format!("winrm-{shell_id}"),
                    endpoint: endpoint.trim().to_string(),
                    buffering: None,
                    journal_bytes: Some(self.settings.journal_bytes),
                    idle_timeout: Some(idle),
                    operation_timeout: None,
                    max_received_mb: None,
                    terminal: PtySettings {
                        term: "dumb".into(),
                        rows: 24,
                        cols: 80,
                        modes: Vec::new(),
                    },
                    start,
                    max_running: Some(self.settings.max_commands_per_shell),
                    // The client waits OperationTimeout for the answer.
                    open_timeout: req.header.operation_timeout.map(|t| {
                        let t = t
                            .saturating_sub(DEADLINE_MARGIN)
                            .max(Duration::from_secs(1));
                        (t, "the request's OperationTimeout")
                    }),
                },
            )
            .await
            .map_err(|e| match e {
                SessionError::Quota { .. } => Fault::quota_shells(),
                SessionError::Endpoint(e) => {
                    tracing::info!(owner = %who.name, "winrm shell refused: {e}");
                    endpoint_fault(&e)
                }
                other => internal(&other),
            })?;
        // Another Create may have taken a client-chosen id meanwhile: never replace it.
        let shell_id = {
            let mut map = self.map();
            let mut id = shell_id;
            while map.contains_key(&id) {
                id = soap::new_uuid();
            }
            map.insert(
                id.clone(),
                Arc::new(Shell {
                    id: id.clone(),
                    owner: who.name.clone(),
                    session: session.clone(),
                    commands: Mutex::new(HashMap::new()),
                    order: Mutex::new(Vec::new()),
                }),
            );
            id
        };
        tracing::debug!(session = %session.id, shell = %shell_id, client = %ctx.client_ip, "winrm shell created");
        let details = soap::ShellDetails {
            address: ctx.address.clone(),
            owner: who.name.clone(),
            client_ip: ctx.client_ip.clone(),
            idle_timeout: idle,
            input_streams: vec!["stdin".into()],
            output_streams: vec!["stdout".into(), "stderr".into()],
            shell_run_time: Some(Duration::ZERO),
            shell_inactivity: Some(Duration::ZERO),
        };
        Ok(soap::create_response(
            &shell_id,
            soap::RESOURCE_CMD,
            &req.header.message_id,
            &details,
        ))
    }

    async fn command(
        &self,
        req: &Request,
        shell: &Shell,
        command_id: Option<&str>,
        command: &str,
        arguments: &[String],
    ) -> Result<String, Fault> {
        let command = self.map_powershell(command.trim());
        if command.is_empty() {
            return Err(Fault::invalid_parameter(
                "rsp:CommandLine/rsp:Command is empty: give the program or command line to run",
            ));
        }
        let line = if req.header.option_bool("WINRS_SKIP_CMD_SHELL") == Some(true) {
            Line::Exec(
                std::iter::once(command)
                    .chain(arguments.iter().cloned())
                    .collect(),
            )
        } else {
            let mut line = command;
            for a in arguments {
                line.push(' ');
                line.push_str(a);
            }
            Line::Shell(line)
        };
        let (num, seq) = shell.session.run_line(line).await.map_err(|e| match e {
            SessionError::Quota { .. } => Fault::quota_operations(),
            SessionError::Endpoint(e) => endpoint_fault(&e),
            SessionError::Closed(_) => Fault::shell_not_found(&shell.id),
            SessionError::Process(p) => Fault::internal_error(2, p.to_string()),
            other => internal(&other),
        })?;
        let id = match command_id {
            Some(id) if valid_id(id) && shell.command(id).is_none() => id.to_string(),
            _ => soap::new_uuid(),
        };
        let cmd = Arc::new(Cmd {
            num,
            state: tokio::sync::Mutex::new(CmdState {
                cursor: seq,
                pending: None,
                exit: None,
            }),
            finished: std::sync::atomic::AtomicBool::new(false),
        });
        shell.commands().insert(id.clone(), cmd);
        let mut order = shell.order.lock().unwrap_or_else(|p| p.into_inner());
        order.push(id.clone());
        if order.len() > MAX_FINISHED_COMMANDS {
            let mut commands = shell.commands();
            let mut excess = order.len() - MAX_FINISHED_COMMANDS;
            // The oldest that are over: received to the end, or exited and never received
            // (their output is then let go). Running ones stay (there are few: a quota).
            let journal = shell.session.journal();
            order.retain(|c| {
                let forget = excess > 0
                    && commands.get(c).is_none_or(|cmd| {
                        cmd.finished.load(std::sync::atomic::Ordering::Relaxed)
                            || journal.exit_of(cmd.num).is_some()
                    });
                if forget {
                    excess -= 1;
                    if let Some(cmd) = commands.remove(c) {
                        journal.ack_command(cmd.num, u64::MAX);
                    }
                }
                !forget
            });
        }
        Ok(id)
    }

    /// `powershell`/`powershell.exe` as the program → the configured PowerShell (spec §3.2).
    fn map_powershell(&self, command: &str) -> String {
        let (first, rest) = command
            .split_once(char::is_whitespace)
            .unwrap_or((command, ""));
        if first.eq_ignore_ascii_case("powershell") || first.eq_ignore_ascii_case("powershell.exe")
        {
            if rest.is_empty() {
                self.settings.powershell.clone()
            } else {
                format!("{} {rest}", self.settings.powershell)
            }
        } else {
            command.to_string()
        }
    }

    fn signal(
        &self,
        shell: &Arc<Shell>,
        command_id: Option<&str>,
        code: &SignalCode,
    ) -> Result<(), Fault> {
        let signal = match code {
            SignalCode::Terminate => Signal::SIGTERM,
            SignalCode::CtrlC => Signal::SIGINT,
            SignalCode::CtrlBreak => Signal::SIGQUIT,
            SignalCode::Other(code) => {
                return Err(Fault::invalid_parameter(format!(
                    "unknown signal code {code}: use …/windows/shell/signal/terminate, ctrl_c or ctrl_break"
                )));
            }
        };
        let Some(id) = command_id else {
            return Err(Fault::invalid_parameter(
                "rsp:Signal has no CommandId: name the command to signal",
            ));
        };
        // Signals for finished or forgotten commands succeed: clients clean up after Done.
        let cmd = if matches!(code, SignalCode::Terminate) {
            shell.commands().remove(id)
        } else {
            shell.command(id)
        };
        let Some(cmd) = cmd else {
            return Ok(());
        };
        let session = &shell.session;
        if cmd.finished.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let _ = session.signal(cmd.num, signal);
        if matches!(code, SignalCode::Terminate) {
            let session = session.clone();
            let eof = session.clone();
            let num = cmd.num;
            // End of input may wait behind a full queue: not in the way of the kill timer.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(KILL_GRACE * 2, eof.command_input(num, None)).await;
            });
            tokio::spawn(async move {
                let forget = drain(&session, &cmd);
                if tokio::time::timeout(KILL_GRACE, forget).await.is_err() {
                    let _ = session.signal(cmd.num, Signal::SIGKILL);
                    let _ = tokio::time::timeout(KILL_GRACE, drain(&session, &cmd)).await;
                }
            });
        }
        Ok(())
    }
}

/// Client-chosen ShellId/CommandId: honoured when it looks like an id.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn unknown_command(id: &str) -> Fault {
    Fault::invalid_parameter(format!(
        "no command with CommandId {id} in this shell (it may have been terminated)"
    ))
}

/// An endpoint's refusal as a fault that carries its message (what, where, next step).
fn endpoint_fault(e: &EndpointError) -> Fault {
    match e {
        EndpointError::OutputQuota { .. }
        | EndpointError::InputQuota { .. }
        | EndpointError::OperationTimeout { .. }
        | EndpointError::Busy { .. }
        | EndpointError::PerUser { .. } => Fault::quota_operations().with_reason(e.to_string()),
        EndpointError::Invalid { .. } => Fault::internal_error(1359, e.to_string()),
        EndpointError::OpenTimeout { .. } => Fault::timed_out().with_reason(e.to_string()),
        EndpointError::Unknown { .. }
        | EndpointError::AccessDenied { .. }
        | EndpointError::CommandRefused { .. }
        | EndpointError::ShellRefused { .. } => Fault::access_denied().with_reason(e.to_string()),
    }
}

fn internal(e: &SessionError) -> Fault {
    Fault::internal_error(1359, e.to_string())
}

async fn send(
    session: &Session,
    cmd: &Cmd,
    data: &[u8],
    end: bool,
    deadline: Instant,
) -> Result<(), Fault> {
    let work = async {
        // Input for a command that already exited is accepted and discarded (spec §3.3).
        // In small pieces: the queue to the process holds a bounded number of them.
        for piece in data.chunks(INPUT_PIECE) {
            let _ = session
                .command_input(cmd.num, Some(Bytes::copy_from_slice(piece)))
                .await;
        }
        if end {
            let _ = session.command_input(cmd.num, None).await;
        }
    };
    tokio::time::timeout_at(deadline, work)
        .await
        .map_err(|_| Fault::timed_out())
}

/// Exit code as WinRM reports it: the status, or 128+N for a process killed by signal N.
fn exit_code(exit: &remote_proto::session::Exit) -> i64 {
    if exit.signal.is_empty() {
        return i64::from(exit.code);
    }
    let name = format!("SIG{}", exit.signal);
    match name.parse::<Signal>() {
        Ok(sig) => 128 + sig as i64,
        Err(_) => exit.signal.parse::<i64>().map(|n| 128 + n).unwrap_or(-1),
    }
}

/// Take the command's output from the journal, up to `max` bytes: (stream, bytes) chunks
/// with neighbours of the same stream merged. Sets `st.exit` when its exit record is read.
/// Everything taken counts as consumed.
/// What one `rsp:Stream` element costs beyond its payload, counted in payload bytes: the
/// element with its Name and CommandId, after base64's 4/3 (spec §3.4: responses stay
/// within the client's MaxEnvelopeSize however finely stdout and stderr interleave).
const ELEMENT_COST: usize = 128;

/// Budget used by the output gathered so far.
fn used(out: &[(Stream, Vec<u8>)]) -> usize {
    out.iter().map(|(_, d)| d.len() + ELEMENT_COST).sum()
}

/// Add as much of `data` as the budget `max` allows (a new element costs [`ELEMENT_COST`]);
/// returns how many bytes were taken.
fn take(
    out: &mut Vec<(Stream, Vec<u8>)>,
    total: &mut usize,
    max: usize,
    stream: Stream,
    data: &[u8],
) -> usize {
    let same = out.last().is_some_and(|(s, _)| *s == stream);
    let cost = if same { 0 } else { ELEMENT_COST };
    let n = data.len().min(max.saturating_sub(*total + cost));
    if n == 0 {
        return 0;
    }
    match out.last_mut() {
        Some((_, d)) if same => d.extend_from_slice(&data[..n]),
        _ => out.push((stream, data[..n].to_vec())),
    }
    *total += n + cost;
    n
}

fn collect(
    session: &Session,
    cmd: &Cmd,
    st: &mut CmdState,
    max: usize,
    out: &mut Vec<(Stream, Vec<u8>)>,
) {
    let mut total = used(out);
    if let Some((stream, data)) = st.pending.take() {
        let n = take(out, &mut total, max, stream, &data);
        if n < data.len() {
            st.pending = Some((stream, data.slice(n..)));
            return;
        }
    }
    let journal = session.journal();
    // What another client acknowledged (e.g. `remote receive` over SSH) was delivered.
    st.cursor = st.cursor.max(journal.resume_seq());
    while total < max && st.exit.is_none() {
        let batch = journal.read(st.cursor, max - total);
        if batch.next <= st.cursor {
            // Everything in the journal is read. An exit whose record someone else
            // consumed still ends the command here, all its output having come before it.
            if st.pending.is_none()
                && let Some(e) = journal.exit_of(cmd.num)
            {
                st.exit = Some(exit_code(&e));
            }
            break;
        }
        let mut stop_at = batch.next;
        for rec in batch.records {
            if rec.command_id != cmd.num {
                continue;
            }
            match rec.kind {
                Some(record::Kind::Output(o)) => {
                    let stream = Stream::try_from(o.stream).unwrap_or(Stream::Stdout);
                    let n = take(out, &mut total, max, stream, &o.data);
                    if n < o.data.len() {
                        st.pending = Some((stream, Bytes::from(o.data).slice(n..)));
                        stop_at = rec.seq + 1;
                        break;
                    }
                }
                Some(record::Kind::Exit(e)) => {
                    st.exit = Some(exit_code(&e));
                    stop_at = rec.seq + 1;
                    break;
                }
                _ => {}
            }
        }
        journal.ack_command(cmd.num, stop_at - 1);
        st.cursor = stop_at;
        if st.pending.is_some() {
            break;
        }
    }
}

async fn receive(
    shell: &Shell,
    cmd: &Cmd,
    id: &str,
    max: usize,
    deadline: Instant,
    rel: &str,
) -> Result<String, Fault> {
    let session = &shell.session;
    let mut st = tokio::time::timeout_at(deadline, cmd.state.lock())
        .await
        .map_err(|_| Fault::timed_out())?;
    let mut out: Vec<(Stream, Vec<u8>)> = Vec::new();
    let mut coalesce_until: Option<Instant> = None;
    loop {
        collect(session, cmd, &mut st, max, &mut out);
        if st.exit.is_some() || st.pending.is_some() || used(&out) + ELEMENT_COST >= max {
            break;
        }
        if !out.is_empty() {
            // Some output: wait briefly for more, to save round trips.
            let until =
                *coalesce_until.get_or_insert_with(|| (Instant::now() + COALESCE).min(deadline));
            if Instant::now() >= until {
                break;
            }
            let _ = tokio::time::timeout_at(until, session.journal().wait_for(st.cursor)).await;
            continue;
        }
        match tokio::time::timeout_at(deadline, session.journal().wait_for(st.cursor)).await {
            Err(_) => return Err(Fault::timed_out()),
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                // The journal closed: take what is left; without it the shell is gone.
                collect(session, cmd, &mut st, max, &mut out);
                if out.is_empty() && st.exit.is_none() {
                    return Err(Fault::shell_not_found(&shell.id));
                }
                break;
            }
        }
    }
    let done = st.exit.filter(|_| st.pending.is_none());
    if done.is_some() {
        cmd.finished
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let name = |s: Stream| {
        if s == Stream::Stderr {
            "stderr"
        } else {
            "stdout"
        }
    };
    let mut streams: Vec<OutputStream<'_>> = out
        .iter()
        .map(|(s, d)| OutputStream {
            name: name(*s),
            command_id: Some(id),
            data: d,
            end: false,
        })
        .collect();
    if done.is_some() {
        for n in ["stdout", "stderr"] {
            streams.push(OutputStream {
                name: n,
                command_id: Some(id),
                data: &[],
                end: true,
            });
        }
    }
    let state = soap::CommandState {
        command_id: Some(id),
        state: match done {
            Some(exit_code) => CommandStateKind::Done { exit_code },
            None => CommandStateKind::Running,
        },
    };
    Ok(soap::receive_response(&streams, Some(state), rel))
}

/// Consume a forgotten command's remaining records until its exit, so a terminated
/// command never holds journal space.
async fn drain(session: &Session, cmd: &Cmd) {
    let mut st = cmd.state.lock().await;
    let mut sink = Vec::new();
    while st.exit.is_none() {
        sink.clear();
        collect(session, cmd, &mut st, usize::MAX / 2, &mut sink);
        if st.exit.is_some() {
            break;
        }
        if session.journal().wait_for(st.cursor).await.is_err() {
            break;
        }
    }
    cmd.finished
        .store(true, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let e = |code, signal: &str| remote_proto::session::Exit {
            code,
            signal: signal.into(),
        };
        assert_eq!(exit_code(&e(3, "")), 3);
        assert_eq!(exit_code(&e(-1, "INT")), 130);
        assert_eq!(exit_code(&e(-1, "KILL")), 137);
    }

    #[test]
    fn ids() {
        assert!(valid_id("A39F1931-AB90-4404-B7FA-2673A0C50FF0"));
        assert!(!valid_id(""));
        assert!(!valid_id("../x"));
        assert!(!valid_id(&"A".repeat(65)));
    }
}
