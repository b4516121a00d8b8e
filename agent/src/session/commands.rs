//! The commands shape: a context in which commands run one after another or at once, each
//! with its own stdout, stderr and exit code. The working directory and the exported
//! environment one command leaves are what the next starts with: each command runs in a
//! small POSIX-shell wrapper that restores them from the session's state directory and saves
//! them again when the command's shell exits.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use nix::sys::signal::Signal;
use remote_proto::MAX_CHUNK_BYTES;
use remote_proto::session::{CommandStarted, Output, Stream, record};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use super::SessionError;
use super::journal::Journal;
use super::terminal::exit_of;
use crate::audit::{Audit, Event, Transport};
use crate::endpoints::{Endpoint, EndpointError, RunPolicy};
use crate::process::{self, Identity, Input, Program, Spec};

/// The wrapper: `$1` is the state directory, `$2` the command line. One file, `env`, holds
/// the state as `export -p` output (valid input for the same shell, so values round-trip
/// exactly), the working directory in it as `__RS_PWD`. The directory is made, and the file
/// rewritten (write, then rename), only when a command changed something: an ordinary
/// command costs the shell and two forks of it, and no other program.
const WRAPPER: &str = r#"[ -f "$1/env" ] && . "$1/env"
__rs_dir=$1; __rs_cmd=$2; shift 2
if [ -n "${__RS_PWD+x}" ]; then cd -- "$__RS_PWD" 2>/dev/null || true; fi
__RS_PWD=$PWD; export __RS_PWD
__rs_old=$(export -p)
unset __RS_PWD
__rs_save() {
  __rs_rc=$?
  __RS_PWD=$PWD; export __RS_PWD
  __rs_new=$(export -p)
  if [ "$__rs_new" != "$__rs_old" ]; then
    [ -d "$__rs_dir" ] || mkdir -m 700 -- "$__rs_dir" 2>/dev/null
    if [ -w "$__rs_dir" ]; then
      { printf '%s\n' "$__rs_new" > "$__rs_dir/env.$$" && mv -f "$__rs_dir/env.$$" "$__rs_dir/env"; } 2>/dev/null
    fi
  fi
  exit $__rs_rc
}
trap __rs_save EXIT
eval "$__rs_cmd"
"#;

/// The shell that runs commands: POSIX sh, whatever the user's login shell is, so that the
/// saved environment can always be read back.
const SHELL: &str = "/bin/sh";

/// A command to start.
#[derive(Debug, Clone)]
pub enum Line {
    /// A shell command line; the working directory and exported variables carry over.
    Shell(String),
    /// A program and its arguments, run directly (PATH lookup) in the session's starting
    /// directory and environment: without a shell, nothing carries over to or from it.
    Exec(Vec<String>),
}

/// What a new commands session starts with (a WinRM shell's WorkingDirectory and
/// Environment).
#[derive(Debug, Clone, Default)]
pub struct StartState {
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, String)>,
}

/// Names that `sh -c` would not look up in PATH: reserved words, and dash's builtins (which
/// may behave differently from the program of the same name, or change the shell's state).
/// `true` and `false` are missing on purpose: the programs do exactly what the builtins do.
const SHELL_WORDS: &[&str] = &[
    ".", ":", "[", "alias", "bg", "break", "case", "cd", "chdir", "command", "continue", "do",
    "done", "echo", "elif", "else", "esac", "eval", "exec", "exit", "export", "fc", "fg", "fi",
    "for", "getopts", "hash", "if", "in", "jobs", "kill", "local", "printf", "pwd", "read",
    "readonly", "return", "set", "shift", "test", "then", "times", "trap", "type", "ulimit",
    "umask", "unalias", "unset", "until", "wait", "while",
];

/// The argv of a command line the shell would run as one program with these words as its
/// arguments: words of letters, digits and `_ . / - + , : @ % =` separated by spaces or
/// tabs, the first naming no builtin or reserved word and assigning nothing.
fn simple_command(line: &str) -> Option<Vec<String>> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./-+,:@%".contains(c);
    if !line
        .chars()
        .all(|c| plain(c) || c == '=' || c == ' ' || c == '\t')
    {
        return None;
    }
    let argv: Vec<String> = line
        .split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect();
    let first = argv.first()?;
    if first.contains('=') || SHELL_WORDS.contains(&first.as_str()) {
        return None;
    }
    Some(argv)
}

/// `export NAME='value'` lines the wrapper's shell reads back; names that are not valid
/// shell identifiers are skipped.
fn export_lines(env: &[(String, String)]) -> String {
    let mut out = String::new();
    for (name, value) in env {
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid || value.contains('\0') {
            continue;
        }
        out.push_str("export ");
        out.push_str(name);
        out.push_str("='");
        out.push_str(&value.replace('\'', "'\\''"));
        out.push_str("'\n");
    }
    out
}

/// A session a command started (its leader's pid) and when that leader started. Once the
/// session is empty its number can be reused by an unrelated process: such entries are
/// pruned as soon as their process group is seen gone, and a leader with another start time
/// means the number was reused.
#[derive(Debug, Clone, Copy)]
struct Sid {
    pid: u32,
    start: Option<u64>,
}

impl Sid {
    /// Still ours: the group may have members, and pid is not a newer process's.
    fn ours(&self) -> bool {
        process::any_group_alive(&[self.pid])
            && match (self.start, process::start_time(self.pid)) {
                (Some(then), Some(now)) => then == now,
                _ => true,
            }
    }
}

/// Drop the sessions that are over (see [`Sid`]).
fn prune(sids: &Mutex<Vec<Sid>>) -> Vec<u32> {
    let mut g = sids.lock().unwrap_or_else(|p| p.into_inner());
    g.retain(Sid::ours);
    g.iter().map(|s| s.pid).collect()
}

struct RunningCommand {
    input: mpsc::Sender<Input>,
    pid: Option<u32>,
    /// Input bytes taken so far (bounded by the endpoint's input quota).
    input_bytes: u64,
    /// Why the agent stopped the command (a quota, the operation timeout), for its output.
    stopped: Arc<Mutex<Option<String>>>,
}

pub struct Commands {
    identity: Identity,
    dir: PathBuf,
    next_id: AtomicU64,
    running: Arc<Mutex<HashMap<u64, RunningCommand>>>,
    /// Session ids (= pids) of every command started, for finding what they left behind.
    sids: Arc<Mutex<Vec<Sid>>>,
    max_running: usize,
    start: StartState,
    /// What may run here.
    endpoint: Arc<Endpoint>,
    /// The per-command quotas and timeout.
    limits: CommandLimits,
    /// Who runs the commands (counted against `max_commands_per_user`), where, for the
    /// audit log.
    audited: Audited,
}

/// Per-command limits of a session: the endpoint's, or the client's session options where
/// they are shorter; with what to say when one strikes.
#[derive(Debug, Clone)]
pub struct CommandLimits {
    pub max_received_bytes: u64,
    pub output_exceeded: String,
    pub operation: Option<Duration>,
    pub timeout_exceeded: String,
}

impl CommandLimits {
    pub fn new(
        endpoint: &Endpoint,
        client_mb: Option<u64>,
        client_operation: Option<Duration>,
    ) -> CommandLimits {
        let theirs = endpoint.limits.max_received_mb_per_command;
        let (mb, output_exceeded) = match client_mb {
            Some(mine) if mine < theirs => (
                mine,
                format!(
                    "output quota exceeded: this session allows {mine} MB per command (max_received_mb_per_command, the client's session option; endpoint '{}' allows {theirs})",
                    endpoint.name
                ),
            ),
            _ => (theirs, endpoint.output_quota().to_string()),
        };
        let endpoint_timeout = |d: Duration| {
            EndpointError::OperationTimeout {
                endpoint: endpoint.name.clone(),
                secs: d.as_secs(),
            }
            .to_string()
        };
        let (operation, timeout_exceeded) = match (endpoint.timeouts.operation, client_operation) {
            (Some(e), Some(c)) if c < e => (Some(c), client_timeout(c)),
            (Some(e), _) => (Some(e), endpoint_timeout(e)),
            (None, Some(c)) => (Some(c), client_timeout(c)),
            (None, None) => (None, String::new()),
        };
        CommandLimits {
            max_received_bytes: mb.saturating_mul(1_000_000),
            output_exceeded,
            operation,
            timeout_exceeded,
        }
    }
}

fn client_timeout(d: Duration) -> String {
    format!(
        "operation timeout: this session stops commands after {} s (operation_timeout_secs, the client's session option)",
        d.as_secs()
    )
}

/// What a session's commands are recorded under in the audit log.
#[derive(Debug, Clone)]
pub struct Audited {
    pub audit: Audit,
    pub session: String,
    pub account: String,
    pub transport: Transport,
}

impl Commands {
    pub fn new(
        identity: Identity,
        dir: PathBuf,
        max_running: usize,
        start: &StartState,
        endpoint: Arc<Endpoint>,
        limits: CommandLimits,
        audited: Audited,
    ) -> Result<Commands, SessionError> {
        let err = |source| SessionError::StateDir {
            path: dir.clone(),
            source,
        };
        // The directory is made when there is state to keep: now when the session starts
        // with some, else by the wrapper when a command first changes something.
        let mut env = start.env.clone();
        if let Some(cwd) = &start.cwd {
            env.push(("__RS_PWD".into(), cwd.to_string_lossy().into_owned()));
        }
        if !env.is_empty() {
            std::fs::create_dir(&dir).map_err(err)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
            let file = dir.join("env");
            std::fs::write(&file, export_lines(&env)).map_err(err)?;
            if identity.switch {
                for path in [&dir, &file] {
                    nix::unistd::chown(path, Some(identity.uid), Some(identity.gid))
                        .map_err(|e| err(e.into()))?;
                }
            }
        }
        Ok(Commands {
            identity,
            dir,
            next_id: AtomicU64::new(1),
            running: Arc::new(Mutex::new(HashMap::new())),
            sids: Arc::new(Mutex::new(Vec::new())),
            max_running,
            start: start.clone(),
            endpoint,
            limits,
            audited,
        })
    }

    /// `line` as the endpoint lets it run: unchanged on a shell endpoint; on a restricted
    /// one, the allow-listed program with the line's words as arguments, never a shell.
    fn permitted(&self, line: Line) -> Result<Line, SessionError> {
        Ok(match (&self.endpoint.run, line) {
            (RunPolicy::Shell, line) => line,
            (RunPolicy::Commands(_), Line::Shell(text)) => {
                Line::Exec(restricted_argv(self.endpoint.command_line(&text)?)?)
            }
            (RunPolicy::Commands(_), Line::Exec(argv)) => {
                let Some((program, args)) = argv.split_first() else {
                    return Err(SessionError::Invalid("an empty command".into()));
                };
                Line::Exec(restricted_argv(
                    self.endpoint.argv(program, args.to_vec())?,
                )?)
            }
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, RunningCommand>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn running(&self) -> usize {
        self.map().len()
    }

    /// Start `command`; its records go to `journal` under the returned id. Also returns the
    /// seq of its `started` record, where a client following it starts reading.
    pub async fn run(
        &self,
        line: Line,
        journal: &Arc<Journal>,
    ) -> Result<(u64, u64), SessionError> {
        let nul = match &line {
            Line::Shell(l) => l.contains('\0'),
            Line::Exec(argv) => argv.iter().any(|a| a.contains('\0')),
        };
        if nul {
            return Err(SessionError::Invalid(
                "the command contains a NUL byte".into(),
            ));
        }
        if self.running() >= self.max_running {
            return Err(SessionError::Quota {
                what: "too many commands running in this session; wait for some to finish",
                limit: self.max_running,
                setting: "max_running_commands",
            });
        }
        // A restricted endpoint runs allow-listed programs only, never a shell.
        let permitted = self
            .permitted(line)
            .and_then(|line| Ok((line, self.endpoint.start_command(&self.audited.account)?)));
        let (line, counted) = permitted.inspect_err(|e| {
            if let SessionError::Endpoint(e) = e {
                self.audited.audit.record(Event::Refused {
                    account: self.audited.account.clone(),
                    endpoint: self.endpoint.name.clone(),
                    transport: self.audited.transport,
                    reason: e.to_string(),
                    peer: None,
                });
            }
        })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // A simple command (one program and plain words) in a session with no state yet runs
        // directly, as `sh -c` would run it, without the shell. Should that fail (not found,
        // not executable, a script without #!), the shell runs it and reports as usual.
        if let Line::Shell(text) = &line
            && let Some(argv) = simple_command(text)
            && !self.dir.join("env").exists()
        {
            let (program, args) = argv.split_at(1);
            let spec = Spec {
                program: Program::Exec(PathBuf::from(&program[0]), args.to_vec()),
                env: self.identity.base_env(),
                cwd: None,
            };
            if let Ok(child) = process::spawn_vfork(&self.identity, &spec) {
                return self
                    .started(id, text.clone(), child, journal, counted)
                    .await;
            }
        }
        let mut env = self.identity.base_env();
        let mut cwd = None;
        let (program, command) = match line {
            Line::Shell(command) => (
                Program::Exec(
                    PathBuf::from(SHELL),
                    vec![
                        "-c".into(),
                        WRAPPER.into(),
                        "remote-session".into(),
                        self.dir.to_string_lossy().into_owned(),
                        command.clone(),
                    ],
                ),
                command,
            ),
            Line::Exec(argv) => {
                // No shell to carry state: the session's starting directory and variables.
                let Some((program, args)) = argv.split_first() else {
                    return Err(SessionError::Invalid("an empty command".into()));
                };
                env.extend(self.start.env.iter().cloned());
                cwd = self.start.cwd.clone();
                (
                    Program::Exec(PathBuf::from(program), args.to_vec()),
                    argv.join(" "),
                )
            }
        };
        let spec = Spec { program, env, cwd };
        let child = process::spawn_vfork(&self.identity, &spec)?;
        self.started(id, command, child, journal, counted).await
    }

    /// Book-keeping for a command just spawned: its input feeder, its `started` record and
    /// the pump that journals its output and exit.
    async fn started(
        &self,
        id: u64,
        command: String,
        mut child: process::Child,
        journal: &Arc<Journal>,
        counted: crate::endpoints::CommandSlot,
    ) -> Result<(u64, u64), SessionError> {
        let pid = child.id();
        prune(&self.sids);
        self.sids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Sid {
                pid,
                start: process::start_time(pid),
            });
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(process::feed_stdin(rx, child.stdin.take()));
        let stopped = Arc::new(Mutex::new(None));
        self.map().insert(
            id,
            RunningCommand {
                input: tx,
                pid: Some(pid),
                input_bytes: 0,
                stopped: stopped.clone(),
            },
        );
        let line = command.clone();
        let started = record::Kind::Started(CommandStarted { command });
        let Ok(seq) = journal.append(id, started).await else {
            process::signal_group(pid, Signal::SIGHUP);
            self.map().remove(&id);
            return Err(SessionError::Closed(String::new()));
        };
        tokio::spawn(pump(
            journal.clone(),
            id,
            child,
            self.running.clone(),
            self.sids.clone(),
            Stop {
                endpoint: self.endpoint.clone(),
                limits: self.limits.clone(),
                reason: stopped,
                _counted: counted,
                audited: self.audited.clone(),
                command: line,
                started: std::time::Instant::now(),
            },
        ));
        Ok((id, seq))
    }

    /// Input for command `id`: data, or `None` for end of input. `None` if no such command was ever started.
    /// Input beyond the endpoint's `max_input_mb_per_command` stops the command. Input for a
    /// command that already finished is dropped, as a pipe to an exited process would: the
    /// client cannot know it raced the exit.
    pub async fn input(&self, id: u64, data: Option<bytes::Bytes>) -> Option<()> {
        let tx = {
            let mut map = self.map();
            let Some(cmd) = map.get_mut(&id) else {
                let started = id != 0 && id < self.next_id.load(Ordering::Relaxed);
                return started.then_some(());
            };
            if let Some(d) = &data {
                cmd.input_bytes += d.len() as u64;
                if cmd.input_bytes > self.endpoint.limits.max_input_bytes() {
                    if let Some(pid) = cmd.pid {
                        stop(&cmd.stopped, pid, self.endpoint.input_quota());
                    }
                    return Some(());
                }
            }
            cmd.input.clone()
        };
        let _ = tx
            .send(match data {
                Some(d) => Input::Data(d),
                None => Input::Eof,
            })
            .await;
        Some(())
    }

    /// Signal command `id` (0: every running command). False if there was none.
    pub fn signal(&self, id: u64, signal: Signal) -> bool {
        let map = self.map();
        let targets: Vec<u32> = map
            .iter()
            .filter(|(k, _)| id == 0 || **k == id)
            .filter_map(|(_, c)| c.pid)
            .collect();
        drop(map);
        for pid in &targets {
            process::signal_group(*pid, signal);
        }
        !targets.is_empty()
    }

    /// Hang up on everything the session's commands started (background jobs too), and
    /// kill what remains a few seconds later.
    pub fn kill_all(&self) {
        // Commands run under sh without job control: what they leave behind stays in their
        // process group, so when no group is left, nothing is (and /proc need not be read).
        let sids = prune(&self.sids);
        if sids.is_empty() || process::signal_sessions(&sids, Signal::SIGHUP) == 0 {
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            process::signal_sessions(&sids, Signal::SIGKILL);
        });
    }

    pub fn remove_state(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn read_chunk<R: AsyncRead + Unpin>(r: &mut R) -> Option<bytes::Bytes> {
    let mut buf = BytesMut::with_capacity(MAX_CHUNK_BYTES.min(64 * 1024));
    match r.read_buf(&mut buf).await {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(buf.freeze()),
    }
}

fn output(stream: Stream, data: bytes::Bytes) -> record::Kind {
    record::Kind::Output(Output {
        stream: stream as i32,
        data: data.to_vec(),
    })
}

/// A [`RunningCommand`]'s endpoint limits and stop reason, as its pump sees them.
struct Stop {
    endpoint: Arc<Endpoint>,
    limits: CommandLimits,
    reason: Arc<Mutex<Option<String>>>,
    /// Counts the command against `max_commands_per_user` until it is over.
    _counted: crate::endpoints::CommandSlot,
    /// For the audit line written when it ends.
    audited: Audited,
    command: String,
    started: std::time::Instant,
}

/// Stop a command's process group for `why` (the first reason wins).
fn stop(reason: &Mutex<Option<String>>, pid: u32, why: impl ToString) {
    let mut r = reason.lock().unwrap_or_else(|p| p.into_inner());
    if r.is_none() {
        *r = Some(why.to_string());
        process::signal_group(pid, Signal::SIGKILL);
    }
}

async fn pump(
    journal: Arc<Journal>,
    id: u64,
    mut child: process::Child,
    running: Arc<Mutex<HashMap<u64, RunningCommand>>>,
    sids: Arc<Mutex<Vec<Sid>>>,
    limits: Stop,
) {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut status = None;
    let mut closed = false;
    let group = child.id();
    // Output beyond the endpoint's quota is not journaled; the command is stopped.
    let mut budget = limits.limits.max_received_bytes;
    let deadline = limits.limits.operation;
    let timeout = async {
        match deadline {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timeout);
    let mut timed_out = false;
    while !closed && (stdout.is_some() || stderr.is_some() || status.is_none()) {
        let (stream, chunk) = tokio::select! {
            chunk = async { read_chunk(stdout.as_mut()?).await }, if stdout.is_some() => match chunk {
                Some(data) => (Stream::Stdout, data),
                None => { stdout = None; continue }
            },
            chunk = async { read_chunk(stderr.as_mut()?).await }, if stderr.is_some() => match chunk {
                Some(data) => (Stream::Stderr, data),
                None => { stderr = None; continue }
            },
            st = child.wait(), if status.is_none() => { status = Some(st.ok()); continue }
            () = &mut timeout, if !timed_out => {
                timed_out = true;
                if deadline.is_some() {
                    stop(&limits.reason, group, &limits.limits.timeout_exceeded);
                }
                continue;
            }
        };
        let mut data = chunk;
        if data.len() as u64 > budget {
            data.truncate(budget as usize);
            stop(&limits.reason, group, &limits.limits.output_exceeded);
        }
        budget -= data.len() as u64;
        if !data.is_empty() {
            closed = journal.append(id, output(stream, data)).await.is_err();
        }
    }
    let why = limits
        .reason
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let why_stopped = why.clone();
    if let Some(why) = why
        && !closed
    {
        let text = bytes::Bytes::from(format!("\nremote-agent: {why}\n"));
        closed = journal
            .append(id, output(Stream::Stderr, text))
            .await
            .is_err();
    }
    if closed && status.is_none() {
        status = Some(child.wait().await.ok());
    }
    running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    let pid = child.id();
    if !process::any_group_alive(&[pid]) {
        sids.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|s| s.pid != pid);
    }
    let exit = exit_of(status.flatten());
    limits.audited.audit.record(Event::Command {
        session: Some(limits.audited.session.clone()),
        peer: None,
        account: limits.audited.account.clone(),
        endpoint: limits.endpoint.name.clone(),
        transport: limits.audited.transport,
        command: limits.command.clone(),
        exit_code: exit.signal.is_empty().then_some(exit.code),
        signal: (!exit.signal.is_empty()).then(|| exit.signal.clone()),
        bytes_out: limits.limits.max_received_bytes - budget,
        duration_ms: limits.started.elapsed().as_millis() as u64,
        reason: why_stopped,
    });
    let _ = journal.append(id, record::Kind::Exit(exit)).await;
}

/// The argv of an allow-listed program (what a restricted endpoint resolved a line to).
fn restricted_argv(program: Program) -> Result<Vec<String>, SessionError> {
    match program {
        Program::Exec(path, args) => {
            let mut argv = vec![path.to_string_lossy().into_owned()];
            argv.extend(args);
            Ok(argv)
        }
        Program::ShellCommand(_) | Program::LoginShell => Err(SessionError::Invalid(
            "a restricted endpoint resolved a command to a shell".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_commands_are_one_program_and_plain_words() {
        let argv = |l| simple_command(l);
        assert_eq!(argv("true"), Some(vec!["true".to_string()]));
        assert_eq!(
            argv("  systemctl status\tnginx.service --no-pager  "),
            Some(vec![
                "systemctl".into(),
                "status".into(),
                "nginx.service".into(),
                "--no-pager".into()
            ])
        );
        assert_eq!(
            argv("ls -l /srv/app_1 key=value"),
            Some(vec![
                "ls".into(),
                "-l".into(),
                "/srv/app_1".into(),
                "key=value".into()
            ])
        );
        // Anything the shell would treat specially goes through the shell.
        for line in [
            "",
            "   ",
            "cd /tmp",
            "export A=1",
            "echo hi",
            "FOO=1 env",
            "ls *.txt",
            "ls ~",
            "echo $HOME",
            "a; b",
            "a && b",
            "a | b",
            "a > f",
            "'quoted'",
            "a\nb",
            "if true",
            "ls # comment",
            "sleep 1 &",
        ] {
            assert_eq!(argv(line), None, "{line:?}");
        }
    }
}
