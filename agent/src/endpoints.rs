//! Endpoints (session configurations, design.md §4): who may use them (accounts, groups),
//! what runs there (the account's shell, or an allow-list of commands executed without a
//! shell), as whom, in which directory and environment, with which quotas and timeouts.
//! SSH, WinRM and the relay all ask this module, so one rule reads the same everywhere.
//!
//! The built-in `default` endpoint admits admins only, as PowerShell's defaults admit only
//! Administrators; the config file may redefine it (`[endpoints.default]`) and add others.
//! The running agent re-reads the endpoints when the config file changes (`remote-agent
//! endpoint add|set|rm`, or an edit): new sessions and channels get the new rules, those
//! already open keep the ones they started with, and the use counters carry over by name.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::process::Program;
use crate::session::journal::Mode;

/// The endpoint used when a client names none.
pub const DEFAULT_ENDPOINT: &str = "default";
/// The group every admin account is in.
pub const ADMINS_GROUP: &str = "admins";
pub use remote_proto::ENDPOINT_ENV;
/// Where allow-listed command names are looked up (never the client's PATH).
const SAFE_PATH: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

const DEFAULT_MAX_RECEIVED_MB: u64 = 50;
const DEFAULT_MAX_INPUT_MB: u64 = 10;
const DEFAULT_MAX_SESSIONS_PER_USER: usize = 64;
const DEFAULT_MAX_COMMANDS_PER_USER: usize = 64;
const DEFAULT_MAX_CONNECTIONS: usize = 256;
const DEFAULT_OPEN_SECS: u64 = 60;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    #[error(
        "no endpoint '{name}' on this agent (endpoints: {known}): check --endpoint, or run `remote-agent endpoint list` on the host"
    )]
    Unknown { name: String, known: String },
    #[error(
        "access denied: user '{user}' may not use endpoint '{endpoint}' (allowed: {allowed}). Ask an admin to add you, or pick --endpoint"
    )]
    AccessDenied {
        user: String,
        endpoint: String,
        allowed: String,
    },
    #[error(
        "endpoint '{endpoint}' does not allow '{command}' (allowed: {allowed}; run without a shell): run one of those, or ask an admin for an endpoint that allows it"
    )]
    CommandRefused {
        endpoint: String,
        command: String,
        allowed: String,
    },
    #[error(
        "endpoint '{endpoint}' runs only the commands {allowed}; it has no interactive shell: run one of them, or pick another --endpoint"
    )]
    ShellRefused { endpoint: String, allowed: String },
    #[error(
        "output quota exceeded: endpoint '{endpoint}' allows {limit_mb} MB per command (max_received_mb_per_command)"
    )]
    OutputQuota { endpoint: String, limit_mb: u64 },
    #[error(
        "input quota exceeded: endpoint '{endpoint}' allows {limit_mb} MB of input per command (max_input_mb_per_command)"
    )]
    InputQuota { endpoint: String, limit_mb: u64 },
    #[error(
        "operation timeout: endpoint '{endpoint}' stops commands after {secs} s (operation_timeout_secs)"
    )]
    OperationTimeout { endpoint: String, secs: u64 },
    #[error(
        "open timeout: opening a session on endpoint '{endpoint}' took longer than {secs} s ({whose}); nothing was opened. \
         The host may be slow to look up accounts or to start processes: try again, and if it persists ask an admin to check the agent's log"
    )]
    OpenTimeout {
        endpoint: String,
        secs: u64,
        /// Whose limit: the endpoint's setting or the client's option.
        whose: String,
    },
    #[error(
        "quota exceeded: endpoint '{endpoint}' allows {limit} {what} per user ({setting}); close some first"
    )]
    PerUser {
        endpoint: String,
        what: &'static str,
        limit: usize,
        setting: &'static str,
    },
    #[error(
        "endpoint '{endpoint}' is busy: it allows {limit} sessions and connections at once (max_connections); try again later"
    )]
    Busy { endpoint: String, limit: usize },
    #[error("endpoint '{endpoint}' in the agent's config: {problem}")]
    Invalid { endpoint: String, problem: String },
}

/// One endpoint as written in the config file (`[endpoints.NAME]`). Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    /// Accounts admitted (`*`: every account).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Groups admitted (`admins`: accounts with the admin flag).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// `shell` (default: the account's shell, any command line) or `commands` (only the
    /// allow-listed commands, run without a shell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// With `run = "commands"`: command names (looked up in a fixed safe PATH) or absolute
    /// paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// OS user the commands run as (the agent must run as root), instead of the account's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
    /// Working directory of new processes (default: the user's home).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<PathBuf>,
    /// Extra environment of new processes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_received_mb_per_command: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_input_mb_per_command: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sessions_per_user: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_commands_per_user: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_timeout_secs: Option<u64>,
    /// How long opening a session may take on the agent (default 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_timeout_secs: Option<u64>,
    /// `block`, `drop` or `spill` (default: the agent's `[sessions] buffering`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffering: Option<String>,
}

/// What runs on an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunPolicy {
    /// The account's shell: any command line, interactive shells, SFTP.
    Shell,
    /// Only these programs, each started directly with the client's words as its argv.
    Commands(Vec<Allowed>),
}

/// An allow-listed command: the name clients use and the file that runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub name: String,
    pub path: PathBuf,
}

/// Per-endpoint limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_received_mb_per_command: u64,
    pub max_input_mb_per_command: u64,
    pub max_sessions_per_user: usize,
    pub max_commands_per_user: usize,
    pub max_connections: usize,
}

impl Limits {
    pub fn max_received_bytes(&self) -> u64 {
        self.max_received_mb_per_command.saturating_mul(1_000_000)
    }
    pub fn max_input_bytes(&self) -> u64 {
        self.max_input_mb_per_command.saturating_mul(1_000_000)
    }
}

/// Per-endpoint timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A session with no client for this long is closed (default: `[sessions]
    /// idle_timeout_secs`).
    pub idle: Option<Duration>,
    /// A command running longer than this is stopped (none by default).
    pub operation: Option<Duration>,
    /// Opening a session (account lookups, its state directory, starting its shell) may
    /// take this long on the agent.
    pub open: Duration,
}

/// A resolved endpoint, with what is using it now (for `max_connections` and
/// `max_commands_per_user`).
#[derive(Debug)]
pub struct Endpoint {
    pub name: String,
    users: Vec<String>,
    groups: Vec<String>,
    pub run: RunPolicy,
    pub run_as: Option<String>,
    pub workdir: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub limits: Limits,
    /// Whether the config set the per-command quotas itself (plain SSH channels are bound
    /// by them only then).
    pub explicit_quotas: bool,
    pub timeouts: Timeouts,
    pub buffering: Option<Mode>,
    /// What uses the endpoint now (shared with its successor when the config is reloaded).
    usage: Arc<Usage>,
}

/// What is using an endpoint now.
#[derive(Debug, Default)]
struct Usage {
    /// Sessions and SSH channels.
    connections: AtomicUsize,
    /// Running commands, per account.
    commands: Mutex<HashMap<String, usize>>,
}

/// One session or SSH channel on an endpoint, counted against `max_connections` until
/// dropped.
#[derive(Debug)]
pub struct EndpointUse {
    endpoint: Arc<Endpoint>,
}

impl Drop for EndpointUse {
    fn drop(&mut self) {
        self.endpoint
            .usage
            .connections
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// One running command of an account, counted against `max_commands_per_user` until dropped.
#[derive(Debug)]
pub struct CommandSlot {
    endpoint: Arc<Endpoint>,
    user: String,
}

impl Drop for CommandSlot {
    fn drop(&mut self) {
        let mut map = self
            .endpoint
            .usage
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.user);
            }
        }
    }
}

/// Who asks to use an endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub name: &'a str,
    pub admin: bool,
    pub groups: &'a [String],
}

impl Endpoint {
    /// Resolve `file` as endpoint `name`; `relay` says whether spill buffering is possible.
    pub fn resolve(name: &str, file: &EndpointFile) -> Result<Endpoint, EndpointError> {
        let invalid = |problem: String| EndpointError::Invalid {
            endpoint: name.to_string(),
            problem,
        };
        validate_name(name).map_err(invalid)?;
        let restrict = match file.run.as_deref() {
            None => !file.commands.is_empty(),
            Some("commands") => true,
            Some("shell") => false,
            Some(other) => {
                return Err(invalid(format!(
                    "run = \"{other}\" is not known: use \"shell\" or \"commands\""
                )));
            }
        };
        let run = match (restrict, file.commands.is_empty()) {
            (false, true) => RunPolicy::Shell,
            (false, false) => {
                return Err(invalid(
                    "commands are listed but run = \"shell\": set run = \"commands\" to restrict, or drop the list".into(),
                ));
            }
            (true, true) => {
                return Err(invalid(
                    "run = \"commands\" needs a non-empty commands list".into(),
                ));
            }
            (true, false) => {
                let mut allowed = Vec::with_capacity(file.commands.len());
                for c in &file.commands {
                    allowed.push(resolve_command(c).map_err(invalid)?);
                }
                RunPolicy::Commands(allowed)
            }
        };
        if let Some(dir) = &file.workdir
            && !dir.is_absolute()
        {
            return Err(invalid(format!(
                "workdir {} must be an absolute path",
                dir.display()
            )));
        }
        for key in file.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(invalid(format!("env name '{key}' is not valid")));
            }
        }
        let buffering = match file.buffering.as_deref() {
            None => None,
            Some("block") => Some(Mode::Block),
            Some("drop") => Some(Mode::Drop),
            Some("spill") => Some(Mode::Spill),
            Some(other) => {
                return Err(invalid(format!(
                    "buffering = \"{other}\" is not known: use block, drop or spill"
                )));
            }
        };
        let positive = |v: Option<u64>, what: &str| match v {
            Some(0) => Err(invalid(format!("{what} must be at least 1"))),
            v => Ok(v),
        };
        let idle = positive(file.idle_timeout_secs, "idle_timeout_secs")?.map(Duration::from_secs);
        let operation = positive(file.operation_timeout_secs, "operation_timeout_secs")?
            .map(Duration::from_secs);
        let open = Duration::from_secs(
            positive(file.open_timeout_secs, "open_timeout_secs")?.unwrap_or(DEFAULT_OPEN_SECS),
        );
        let received = positive(
            file.max_received_mb_per_command,
            "max_received_mb_per_command",
        )?
        .unwrap_or(DEFAULT_MAX_RECEIVED_MB);
        let input = positive(file.max_input_mb_per_command, "max_input_mb_per_command")?
            .unwrap_or(DEFAULT_MAX_INPUT_MB);
        let count = |v: Option<usize>, what: &str, default: usize| match v {
            Some(0) => Err(invalid(format!("{what} must be at least 1"))),
            v => Ok(v.unwrap_or(default)),
        };
        Ok(Endpoint {
            name: name.to_string(),
            users: file.users.clone(),
            groups: file.groups.clone(),
            run,
            run_as: file.run_as.clone().filter(|s| !s.is_empty()),
            workdir: file.workdir.clone(),
            env: file
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            limits: Limits {
                max_received_mb_per_command: received,
                max_input_mb_per_command: input,
                max_sessions_per_user: count(
                    file.max_sessions_per_user,
                    "max_sessions_per_user",
                    DEFAULT_MAX_SESSIONS_PER_USER,
                )?,
                max_commands_per_user: count(
                    file.max_commands_per_user,
                    "max_commands_per_user",
                    DEFAULT_MAX_COMMANDS_PER_USER,
                )?,
                max_connections: count(
                    file.max_connections,
                    "max_connections",
                    DEFAULT_MAX_CONNECTIONS,
                )?,
            },
            explicit_quotas: file.max_received_mb_per_command.is_some()
                || file.max_input_mb_per_command.is_some(),
            timeouts: Timeouts {
                idle,
                operation,
                open,
            },
            buffering,
            usage: Arc::default(),
        })
    }

    /// Count a session or channel against `max_connections`, or refuse it.
    pub fn connect(self: &Arc<Self>) -> Result<EndpointUse, EndpointError> {
        let limit = self.limits.max_connections;
        let taken = self
            .usage
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(EndpointUse {
                endpoint: self.clone(),
            }),
            Err(_) => Err(EndpointError::Busy {
                endpoint: self.name.clone(),
                limit,
            }),
        }
    }

    /// Count a command of `user` against `max_commands_per_user`, or refuse it.
    pub fn start_command(self: &Arc<Self>, user: &str) -> Result<CommandSlot, EndpointError> {
        let limit = self.limits.max_commands_per_user;
        let mut map = self
            .usage
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = map.entry(user.to_string()).or_insert(0);
        if *n >= limit {
            return Err(EndpointError::PerUser {
                endpoint: self.name.clone(),
                what: "running commands",
                limit,
                setting: "max_commands_per_user",
            });
        }
        *n += 1;
        Ok(CommandSlot {
            endpoint: self.clone(),
            user: user.to_string(),
        })
    }

    /// How long opening a session may take: the shorter of this endpoint's open timeout and
    /// the client's (`client`: the limit and what the client calls it), with the error that
    /// says whose limit it was.
    pub fn open_limit(&self, client: Option<(Duration, &str)>) -> (Duration, EndpointError) {
        let (limit, whose) = match client {
            Some((c, name)) if c < self.timeouts.open => (c, name),
            _ => (self.timeouts.open, "open_timeout_secs"),
        };
        let error = EndpointError::OpenTimeout {
            endpoint: self.name.clone(),
            secs: limit.as_secs(),
            whose: whose.to_string(),
        };
        (limit, error)
    }

    /// The built-in `default`: admins, the account's shell, default quotas.
    pub fn builtin_default() -> EndpointFile {
        EndpointFile {
            groups: vec![ADMINS_GROUP.into()],
            ..Default::default()
        }
    }

    /// Whether `who` may use this endpoint.
    pub fn admits(&self, who: Caller<'_>) -> bool {
        self.users.iter().any(|u| u == "*" || u == who.name)
            || self.groups.iter().any(|g| {
                (g == ADMINS_GROUP && who.admin) || g == "*" || who.groups.iter().any(|m| m == g)
            })
    }

    /// Who is admitted, for messages: `admins`, `alice, bob, group ops`.
    pub fn allowed(&self) -> String {
        let mut parts: Vec<String> = self.users.iter().map(|u| format!("user {u}")).collect();
        for g in &self.groups {
            if g == ADMINS_GROUP {
                parts.insert(0, ADMINS_GROUP.to_string());
            } else {
                parts.push(format!("group {g}"));
            }
        }
        if parts.is_empty() {
            "nobody".into()
        } else {
            parts.join(", ")
        }
    }

    /// The allow-list, for messages (empty for shell endpoints).
    pub fn allowed_commands(&self) -> String {
        match &self.run {
            RunPolicy::Shell => String::new(),
            RunPolicy::Commands(list) => list
                .iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// What runs for a command line a client sent (`ssh host LINE`, a session's run, a WinRM
    /// command): the line through the shell, or on a restricted endpoint the allow-listed
    /// program with the line's other words as arguments. Nothing in the line is interpreted
    /// by a shell there: `df; rm -rf /` asks for a program called `df;`.
    pub fn command_line(&self, line: &str) -> Result<Program, EndpointError> {
        match &self.run {
            RunPolicy::Shell => Ok(Program::ShellCommand(line.to_string())),
            RunPolicy::Commands(_) => {
                let words = split_words(line);
                let Some((first, rest)) = words.split_first() else {
                    return Err(self.shell_refused());
                };
                self.argv(first, rest.to_vec())
            }
        }
    }

    /// What runs for a program and its arguments given apart (WinRM's Command and
    /// Arguments). On a shell endpoint the caller decides how to join them.
    pub fn argv(&self, program: &str, args: Vec<String>) -> Result<Program, EndpointError> {
        match &self.run {
            RunPolicy::Shell => {
                let mut line = program.to_string();
                for a in &args {
                    line.push(' ');
                    line.push_str(a);
                }
                Ok(Program::ShellCommand(line))
            }
            RunPolicy::Commands(list) => {
                let found = list
                    .iter()
                    .find(|a| a.name == program || a.path.as_os_str() == program);
                match found {
                    Some(a) => Ok(Program::Exec(a.path.clone(), args)),
                    None => Err(EndpointError::CommandRefused {
                        endpoint: self.name.clone(),
                        command: program.chars().take(64).collect(),
                        allowed: self.allowed_commands(),
                    }),
                }
            }
        }
    }

    /// An interactive shell (or SFTP): only on shell endpoints.
    pub fn interactive(&self) -> Result<Program, EndpointError> {
        match &self.run {
            RunPolicy::Shell => Ok(Program::LoginShell),
            RunPolicy::Commands(_) => Err(self.shell_refused()),
        }
    }

    fn shell_refused(&self) -> EndpointError {
        EndpointError::ShellRefused {
            endpoint: self.name.clone(),
            allowed: self.allowed_commands(),
        }
    }

    pub fn output_quota(&self) -> EndpointError {
        EndpointError::OutputQuota {
            endpoint: self.name.clone(),
            limit_mb: self.limits.max_received_mb_per_command,
        }
    }

    pub fn input_quota(&self) -> EndpointError {
        EndpointError::InputQuota {
            endpoint: self.name.clone(),
            limit_mb: self.limits.max_input_mb_per_command,
        }
    }
}

/// Endpoints by name.
type EndpointMap = BTreeMap<String, Arc<Endpoint>>;

/// Every endpoint of the agent; clones share one set, which follows the config file when
/// [`Endpoints::watching`] it.
#[derive(Debug, Clone)]
pub struct Endpoints {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    map: RwLock<Arc<EndpointMap>>,
    source: Option<Source>,
    /// Use counters by endpoint name, across re-reads: an endpoint removed and added back
    /// still counts what is open on it. Names nothing uses any more are forgotten.
    usage: Mutex<HashMap<String, Arc<Usage>>>,
}

/// The config file the endpoints come from, and the identity of the copy last read.
#[derive(Debug)]
struct Source {
    path: PathBuf,
    stamp: Mutex<Option<Stamp>>,
}

/// A file's identity: inode, size, modification time (s, ns).
type Stamp = (u64, u64, i64, i64);

fn stamp(path: &Path) -> Option<Stamp> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

impl Default for Endpoints {
    /// Just the built-in `default`.
    fn default() -> Self {
        Endpoints::from_files(&BTreeMap::new()).unwrap_or_else(|_| Endpoints::of(BTreeMap::new()))
    }
}

impl Endpoints {
    /// The endpoints of the config file, plus the built-in `default` unless it is redefined.
    pub fn from_files(files: &BTreeMap<String, EndpointFile>) -> Result<Endpoints, EndpointError> {
        Ok(Endpoints::of(resolve_all(files, &mut HashMap::new())?))
    }

    fn of(map: EndpointMap) -> Endpoints {
        Endpoints::sharing(Arc::new(map), None)
    }

    fn sharing(map: Arc<EndpointMap>, source: Option<Source>) -> Endpoints {
        let usage = map
            .iter()
            .map(|(name, e)| (name.clone(), e.usage.clone()))
            .collect();
        Endpoints {
            shared: Arc::new(Shared {
                map: RwLock::new(map),
                source,
                usage: Mutex::new(usage),
            }),
        }
    }

    /// The same endpoints, re-read from the config file at `path` whenever it changes (its
    /// inode, size or modification time; checked when an endpoint is asked for). A file
    /// that does not parse, whose endpoints are invalid, or that is gone keeps the
    /// endpoints read before and is reported in the log.
    pub fn watching(self, path: PathBuf) -> Endpoints {
        let source = Source {
            stamp: Mutex::new(stamp(&path)),
            path,
        };
        Endpoints::sharing(self.current(), Some(source))
    }

    /// The endpoints now, after re-reading the config file if it changed.
    fn current(&self) -> Arc<EndpointMap> {
        if let Some(source) = &self.shared.source {
            self.refresh(source);
        }
        self.shared
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn refresh(&self, source: &Source) {
        // Held until the new endpoints are in place, so that two re-reads of two quick
        // changes cannot install the older one last.
        let mut seen = source.stamp.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&source.path);
        if *seen == now {
            return;
        }
        // Remembered even if the file is bad, so that it is reported once per change.
        *seen = now;
        let path = source.path.display();
        if now.is_none() {
            tracing::warn!(
                "the config file {path} is gone; keeping the endpoints read before (put it back, or restart the agent to run without it)"
            );
            return;
        }
        let files = crate::config::FileConfig::load(&source.path)
            .map(|f| f.endpoints)
            .map_err(|e| e.to_string());
        let mut usage = self.shared.usage.lock().unwrap_or_else(|p| p.into_inner());
        match files.and_then(|f| resolve_all(&f, &mut usage).map_err(|e| e.to_string())) {
            Ok(new) => {
                let names: Vec<&str> = new.keys().map(String::as_str).collect();
                tracing::info!(
                    "endpoints re-read from {path}: {} (other settings there apply at the next restart)",
                    names.join(", ")
                );
                usage.retain(|name, u| new.contains_key(name) || Arc::strong_count(u) > 1);
                *self.shared.map.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
            }
            Err(e) => tracing::error!(
                "endpoints in {path} not applied: {e}; keeping the endpoints read before (fix the file, or check it with remote-agent endpoint list)"
            ),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Endpoint>> {
        self.current().get(name).cloned()
    }

    /// Every endpoint, by name.
    pub fn all(&self) -> Vec<Arc<Endpoint>> {
        self.current().values().cloned().collect()
    }

    /// The endpoint `requested` (empty: `default`) if `who` may use it.
    pub fn admit(&self, requested: &str, who: Caller<'_>) -> Result<Arc<Endpoint>, EndpointError> {
        let name = match requested.trim() {
            "" => DEFAULT_ENDPOINT,
            n => n,
        };
        let map = self.current();
        let Some(e) = map.get(name) else {
            return Err(EndpointError::Unknown {
                name: name.chars().take(64).collect(),
                known: map.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        };
        if e.admits(who) {
            Ok(e.clone())
        } else {
            Err(EndpointError::AccessDenied {
                user: who.name.to_string(),
                endpoint: e.name.clone(),
                allowed: e.allowed(),
            })
        }
    }
}

/// Resolve every endpoint of `files` (and the built-in `default` unless redefined), each
/// with the use counters of its name in `usage` (added there when new).
fn resolve_all(
    files: &BTreeMap<String, EndpointFile>,
    usage: &mut HashMap<String, Arc<Usage>>,
) -> Result<EndpointMap, EndpointError> {
    let builtin = (!files.contains_key(DEFAULT_ENDPOINT))
        .then(|| (DEFAULT_ENDPOINT.to_string(), Endpoint::builtin_default()));
    let mut map = BTreeMap::new();
    for (name, file) in files
        .iter()
        .map(|(n, f)| (n.clone(), f.clone()))
        .chain(builtin)
    {
        let mut e = Endpoint::resolve(&name, &file)?;
        e.usage = usage.entry(name.clone()).or_default().clone();
        map.insert(name, Arc::new(e));
    }
    Ok(map)
}

/// Endpoint names: what people type after `--endpoint`, and a path segment of a ResourceURI.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the name '{name}' is not valid: use 1-64 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// An allow-list entry: an absolute path that exists, or a bare name found in [`SAFE_PATH`].
fn resolve_command(entry: &str) -> Result<Allowed, String> {
    let entry = entry.trim();
    if entry.is_empty() || entry.chars().any(char::is_whitespace) {
        return Err(format!(
            "command '{entry}' is not a program name or absolute path (arguments are the client's)"
        ));
    }
    let path = Path::new(entry);
    if path.is_absolute() {
        return if is_executable(path) {
            Ok(Allowed {
                name: path
                    .file_name()
                    .map_or_else(|| entry.to_string(), |n| n.to_string_lossy().into_owned()),
                path: path.to_path_buf(),
            })
        } else {
            Err(format!("command {entry} is not an executable file"))
        };
    }
    if entry.contains('/') {
        return Err(format!(
            "command '{entry}' must be a bare name or an absolute path"
        ));
    }
    SAFE_PATH
        .iter()
        .map(|dir| Path::new(dir).join(entry))
        .find(|p| is_executable(p))
        .map(|path| Allowed {
            name: entry.to_string(),
            path,
        })
        .ok_or_else(|| {
            format!(
                "command '{entry}' was not found in {}: give its absolute path",
                SAFE_PATH.join(":")
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Split a command line into words the way a person reads it, without a shell: whitespace
/// separates words, single and double quotes group them (and are removed), a backslash
/// escapes the next character. Nothing else is special: `;`, `|`, `$(…)` are plain text.
pub fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => match chars.next() {
                Some(n @ ('"' | '\\')) => cur.push(n),
                Some(n) => {
                    cur.push('\\');
                    cur.push(n);
                }
                None => cur.push('\\'),
            },
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restricted() -> Endpoint {
        Endpoint::resolve(
            "restricted",
            &EndpointFile {
                users: vec!["carol".into()],
                groups: vec!["ops".into()],
                commands: vec!["uptime".into(), "df".into()],
                ..Default::default()
            },
        )
        .expect("resolve")
    }

    fn caller<'a>(name: &'a str, admin: bool, groups: &'a [String]) -> Caller<'a> {
        Caller {
            name,
            admin,
            groups,
        }
    }

    /// Replace the file at `path` as `endpoint add|set|rm` do (a new file renamed over it).
    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn the_open_timeout_is_the_shorter_of_the_endpoints_and_the_clients() {
        let e = restricted();
        assert_eq!(e.timeouts.open, Duration::from_secs(60));
        let (limit, err) = e.open_limit(None);
        assert_eq!(limit, Duration::from_secs(60));
        assert!(
            err.to_string()
                .contains("longer than 60 s (open_timeout_secs)"),
            "{err}"
        );
        let (limit, err) =
            e.open_limit(Some((Duration::from_secs(5), "the client's open timeout")));
        assert_eq!(limit, Duration::from_secs(5));
        assert!(
            err.to_string()
                .contains("endpoint 'restricted' took longer than 5 s (the client's open timeout)"),
            "{err}"
        );
        let (limit, _) = e.open_limit(Some((Duration::from_secs(600), "client")));
        assert_eq!(limit, Duration::from_secs(60));
        let file = EndpointFile {
            open_timeout_secs: Some(3),
            ..Default::default()
        };
        let e = Endpoint::resolve("quick", &file).unwrap();
        assert_eq!(
            e.open_limit(Some((Duration::from_secs(10), "client"))).0,
            Duration::from_secs(3)
        );
        let zero = EndpointFile {
            open_timeout_secs: Some(0),
            ..Default::default()
        };
        assert!(Endpoint::resolve("zero", &zero).is_err());
    }

    #[test]
    fn endpoints_follow_the_config_file_and_keep_their_counters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let ops = "[endpoints.ops]\nusers = [\"carol\"]\nmax_connections = 2\n";
        replace(&path, ops);
        let file = crate::config::FileConfig::load(&path).unwrap();
        let endpoints = Endpoints::from_files(&file.endpoints)
            .unwrap()
            .watching(path.clone());
        let shared = endpoints.clone();
        let none: &[String] = &[];
        let carol = caller("carol", false, none);
        let dave = caller("dave", false, none);
        let held = endpoints.admit("ops", carol).unwrap().connect().unwrap();
        assert!(endpoints.admit("ops", dave).is_err());

        // dave is added, the limit lowered to 1: the open connection still counts.
        replace(
            &path,
            &ops.replace("[\"carol\"]", "[\"carol\", \"dave\"]")
                .replace("= 2", "= 1"),
        );
        let e = shared
            .admit("ops", dave)
            .expect("dave admitted after the change");
        assert_eq!(e.limits.max_connections, 1);
        assert!(matches!(
            e.connect(),
            Err(EndpointError::Busy { limit: 1, .. })
        ));
        drop(held);
        let again = e.connect().expect("free once the old connection closed");

        // A broken file keeps what was read before.
        replace(&path, "[endpoints.ops]\nrun = \"nonsense\"\n");
        assert!(endpoints.admit("ops", dave).is_ok());
        replace(&path, "this is not toml [");
        assert!(endpoints.admit("ops", dave).is_ok());

        // A new endpoint appears; a removed one is gone. A file that is gone keeps them.
        replace(&path, "[endpoints.web]\nusers = [\"dave\"]\n");
        assert!(endpoints.admit("web", dave).is_ok());
        assert!(matches!(
            endpoints.admit("ops", dave),
            Err(EndpointError::Unknown { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(endpoints.admit("web", dave).is_ok());
        assert!(endpoints.get(DEFAULT_ENDPOINT).is_some());

        // Removed and added back: what is still open on it still counts.
        replace(
            &path,
            "[endpoints.ops]\nusers = [\"dave\"]\nmax_connections = 1\n",
        );
        let e = endpoints.admit("ops", dave).unwrap();
        assert!(matches!(
            e.connect(),
            Err(EndpointError::Busy { limit: 1, .. })
        ));
        drop(again);
        assert!(e.connect().is_ok());
    }

    #[test]
    fn the_default_endpoint_admits_admins_only() {
        let all = Endpoints::default();
        assert!(all.admit("", caller("root", true, &[])).is_ok());
        let err = all.admit("default", caller("bob", false, &[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "access denied: user 'bob' may not use endpoint 'default' (allowed: admins). Ask an admin to add you, or pick --endpoint"
        );
        let err = all.admit("nope", caller("bob", false, &[])).unwrap_err();
        assert!(err.to_string().contains("endpoints: default"), "{err}");
    }

    #[test]
    fn users_and_groups_are_admitted() {
        let e = restricted();
        assert!(e.admits(caller("carol", false, &[])));
        assert!(e.admits(caller("dave", false, &["ops".into()])));
        assert!(!e.admits(caller("dave", true, &[])));
        assert_eq!(e.allowed(), "user carol, group ops");
    }

    #[test]
    fn restricted_endpoints_run_allow_listed_programs_without_a_shell() {
        let e = restricted();
        match e.command_line("df -h").expect("df") {
            Program::Exec(path, args) => {
                assert!(path.ends_with("df"), "{path:?}");
                assert_eq!(args, vec!["-h"]);
            }
            other => panic!("{other:?}"),
        }
        // The shell's metacharacters are plain words: `df;` is not `df`.
        assert!(matches!(
            e.command_line("df; rm -rf /"),
            Err(EndpointError::CommandRefused { .. })
        ));
        match e.command_line("df '; rm -rf /'").expect("df") {
            Program::Exec(_, args) => assert_eq!(args, vec!["; rm -rf /"]),
            other => panic!("{other:?}"),
        }
        let err = e.command_line("sh -c 'rm -rf /'").unwrap_err();
        assert!(err.to_string().contains("endpoint 'restricted'"), "{err}");
        assert!(err.to_string().contains("uptime, df"), "{err}");
        assert!(matches!(
            e.interactive(),
            Err(EndpointError::ShellRefused { .. })
        ));
        assert!(matches!(
            e.command_line("   "),
            Err(EndpointError::ShellRefused { .. })
        ));
        assert!(matches!(
            e.argv("/usr/bin/uptime", vec![])
                .or_else(|_| e.argv("uptime", vec![])),
            Ok(Program::Exec(..))
        ));
    }

    #[test]
    fn shell_endpoints_pass_the_line_to_the_shell() {
        let e = Endpoint::resolve(DEFAULT_ENDPOINT, &Endpoint::builtin_default()).expect("d");
        assert!(matches!(e.command_line("df; ls"), Ok(Program::ShellCommand(l)) if l == "df; ls"));
        assert!(matches!(e.interactive(), Ok(Program::LoginShell)));
        assert_eq!(e.limits.max_received_mb_per_command, 50);
        assert_eq!(e.limits.max_input_mb_per_command, 10);
        assert_eq!(e.timeouts.idle, None);
    }

    #[test]
    fn bad_endpoint_files_say_what_to_fix() {
        let bad = |f: EndpointFile| Endpoint::resolve("x", &f).unwrap_err().to_string();
        assert!(
            bad(EndpointFile {
                run: Some("commands".into()),
                ..Default::default()
            })
            .contains("non-empty commands")
        );
        assert!(
            bad(EndpointFile {
                commands: vec!["no-such-program-here".into()],
                ..Default::default()
            })
            .contains("not found")
        );
        assert!(
            bad(EndpointFile {
                commands: vec!["df -h".into()],
                ..Default::default()
            })
            .contains("arguments are the client's")
        );
        assert!(
            bad(EndpointFile {
                max_received_mb_per_command: Some(0),
                ..Default::default()
            })
            .contains("at least 1")
        );
        assert!(Endpoint::resolve("a b", &EndpointFile::default()).is_err());
    }

    #[test]
    fn connections_and_commands_are_counted_until_dropped() {
        let e = Arc::new(
            Endpoint::resolve(
                "small",
                &EndpointFile {
                    users: vec!["*".into()],
                    max_connections: Some(2),
                    max_commands_per_user: Some(1),
                    ..Default::default()
                },
            )
            .expect("resolve"),
        );
        let a = e.connect().expect("first");
        let _b = e.connect().expect("second");
        assert!(matches!(
            e.connect(),
            Err(EndpointError::Busy { limit: 2, .. })
        ));
        drop(a);
        let _c = e.connect().expect("a place again");
        let x = e.start_command("alice").expect("alice's first");
        assert!(e.start_command("alice").is_err());
        let _y = e.start_command("bob").expect("bob's own count");
        drop(x);
        assert!(e.start_command("alice").is_ok());
    }

    #[test]
    fn words_split_without_a_shell() {
        assert_eq!(split_words("  a  b\tc "), vec!["a", "b", "c"]);
        assert_eq!(
            split_words(r#"a "b c" 'd e' f\ g"#),
            vec!["a", "b c", "d e", "f g"]
        );
        assert_eq!(split_words("a;b|c $(d)"), vec!["a;b|c", "$(d)"]);
        assert_eq!(split_words(r#""""#), vec![""]);
        assert_eq!(split_words(r#""a\"b""#), vec![r#"a"b"#]);
        assert!(split_words("").is_empty());
    }
}
