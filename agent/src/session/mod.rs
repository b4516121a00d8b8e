//! The session host (design.md §2): sessions that belong to one user, outlive any connection,
//! and keep their output in a journal until a client consumes it. Two shapes: a terminal (a
//! pty running the user's shell) and commands (a context in which commands run with their
//! own stdout, stderr and exit code, the working directory and exported variables carrying
//! over). Transports (the SSH subsystem, the local socket, later WinRM and the relay) are
//! adapters onto this API and never touch processes themselves.

pub mod commands;
pub mod journal;
pub mod payload;
pub mod terminal;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use remote_proto::session::{Buffering, SessionInfo, SessionState, Shape};
use tokio_util::sync::CancellationToken;

use crate::audit::{Audit, Event, SessionAction, Transport};
use crate::endpoints::{Caller, Endpoint, EndpointError, Endpoints};
use crate::process::{Identity, ProcessError, PtySettings};
use journal::{Journal, Mode};

/// Defaults for new sessions.
#[derive(Debug, Clone)]
pub struct SessionDefaults {
    pub journal_bytes: usize,
    pub idle_timeout: Duration,
    pub buffering: Mode,
    /// Largest journal a client may ask for.
    pub max_journal_bytes: usize,
    /// Sessions one user may have open at once.
    pub max_sessions_per_user: usize,
    /// Commands running at once in one commands session.
    pub max_running_commands: usize,
    /// Who may open sessions, what runs in them, their quotas (crate::endpoints).
    pub endpoints: Endpoints,
    /// Whether spill buffering has a relay to spill to (else an endpoint's spill is block).
    pub spill_possible: bool,
}

impl Default for SessionDefaults {
    fn default() -> Self {
        SessionDefaults {
            journal_bytes: 64 << 20,
            idle_timeout: Duration::from_secs(2 * 3600),
            buffering: Mode::Block,
            max_journal_bytes: 2 << 30,
            max_sessions_per_user: 64,
            max_running_commands: 64,
            endpoints: Endpoints::default(),
            spill_possible: false,
        }
    }
}

/// Who is asking: an authenticated user, the OS identity their processes run as, and the
/// transport they came through.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub admin: bool,
    /// The account's groups (endpoints admit by group).
    pub groups: Vec<String>,
    pub identity: Identity,
    pub transport: &'static str,
}

impl Principal {
    /// Who this is, as endpoints see it.
    pub fn caller(&self) -> Caller<'_> {
        Caller {
            name: &self.name,
            admin: self.admin,
            groups: &self.groups,
        }
    }
}

/// What account `account`'s processes (otherwise run as `identity`) run as on `endpoint`:
/// the endpoint's `run_as` user when it names one.
pub fn endpoint_identity(
    account: &str,
    identity: &Identity,
    endpoint: &Endpoint,
) -> Result<Identity, ProcessError> {
    match &endpoint.run_as {
        Some(user) => Identity::for_run_as(account, user),
        None => Ok(identity.clone()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Also returned for sessions of other users: a session id is never a capability.
    #[error("no session '{0}' for you on this agent")]
    NotFound(String),
    #[error("session '{0}' is closed: open a new one with `remote session new`")]
    Closed(String),
    #[error("session '{id}' is a {shape} session: {what}")]
    WrongShape {
        id: String,
        shape: &'static str,
        what: &'static str,
    },
    #[error(
        "no command {command} in session '{id}': `remote receive {id}` shows the session's commands"
    )]
    NoCommand { id: String, command: u64 },
    #[error("invalid request: {0} (a client of another release? use matching versions)")]
    Invalid(String),
    #[error("quota exceeded: {what} (at most {limit}; [sessions] {setting} in the agent's config)")]
    Quota {
        what: &'static str,
        limit: usize,
        setting: &'static str,
    },
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(
        "cannot prepare the session's state directory {path}: {source}. Check that the agent's state dir is writable and not full"
    )]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "opening the session failed inside the agent ({0}); this is a bug: please report it with the agent's log"
    )]
    Internal(String),
}

/// What a client asks for when opening a session.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    pub shape: Shape,
    pub name: String,
    pub endpoint: String,
    pub buffering: Option<Mode>,
    pub journal_bytes: Option<usize>,
    pub idle_timeout: Option<Duration>,
    /// The client's session options; the shorter of these and the endpoint's apply.
    pub operation_timeout: Option<Duration>,
    pub max_received_mb: Option<u64>,
    pub terminal: PtySettings,
    /// Commands shape: what the first command starts with.
    pub start: commands::StartState,
    /// Commands shape: commands running at once (default and ceiling: the host's limit).
    pub max_running: Option<usize>,
    /// The client's open timeout and what it is called (for the message); the shorter of it
    /// and the endpoint's applies.
    pub open_timeout: Option<(Duration, &'static str)>,
}

enum Kind {
    Terminal(terminal::Terminal),
    Commands(commands::Commands),
}

struct Status {
    attached: u32,
    last_activity: Instant,
    closed: bool,
}

pub struct Session {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub endpoint: Arc<Endpoint>,
    /// The session's place among its endpoint's `max_connections`, given back on close.
    connection: Mutex<Option<crate::endpoints::EndpointUse>>,
    pub transport: &'static str,
    pub created: SystemTime,
    pub idle_timeout: Duration,
    journal: Arc<Journal>,
    kind: Kind,
    status: Mutex<Status>,
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Session {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn shape(&self) -> Shape {
        match self.kind {
            Kind::Terminal(_) => Shape::Terminal,
            Kind::Commands(_) => Shape::Commands,
        }
    }

    pub fn info(&self) -> SessionInfo {
        let st = self.status();
        let stats = self.journal.stats();
        let state = if st.closed {
            SessionState::StateClosed
        } else if st.attached > 0 {
            SessionState::StateOpened
        } else {
            SessionState::StateDisconnected
        };
        let running = match &self.kind {
            Kind::Terminal(t) => u32::from(t.running()),
            Kind::Commands(c) => c.running() as u32,
        };
        SessionInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            owner: self.owner.clone(),
            shape: self.shape() as i32,
            state: state as i32,
            endpoint: self.endpoint.name.clone(),
            buffering: match self.journal.mode() {
                Mode::Block => Buffering::Block,
                Mode::Drop => Buffering::Drop,
                Mode::Spill => Buffering::Spill,
            } as i32,
            created_unix: unix(self.created),
            last_output_unix: stats.last_output.map(unix).unwrap_or(0),
            attached_clients: st.attached,
            running_commands: running,
            next_seq: stats.next_seq,
            acked_seq: stats.acked,
            journal_bytes_used: stats.bytes as u64,
            journal_bytes_max: stats.capacity as u64,
            dropped_bytes: stats.dropped,
            transport: self.transport.to_string(),
        }
    }

    /// Count a client as attached until the guard is dropped.
    pub fn attach(self: &Arc<Self>) -> AttachGuard {
        let mut st = self.status();
        st.attached += 1;
        st.last_activity = Instant::now();
        AttachGuard {
            session: self.clone(),
        }
    }

    /// Count as activity (the idle timeout starts again).
    pub fn touch(&self) {
        self.status().last_activity = Instant::now();
    }

    pub fn is_closed(&self) -> bool {
        self.status().closed
    }

    /// Keystrokes for the terminal.
    pub async fn terminal_input(&self, data: bytes::Bytes) -> Result<(), SessionError> {
        self.touch();
        match &self.kind {
            Kind::Terminal(t) => {
                t.input(data).await;
                Ok(())
            }
            Kind::Commands(_) => {
                Err(self.wrong_shape("commands", "it has no terminal to type into"))
            }
        }
    }

    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), SessionError> {
        match &self.kind {
            Kind::Terminal(t) => {
                t.resize(rows, cols).await;
                Ok(())
            }
            Kind::Commands(_) => Err(self.wrong_shape("commands", "it has no terminal to resize")),
        }
    }

    /// Start a command line (commands shape). Returns its id and the seq of its first record.
    pub async fn run(&self, command: &str) -> Result<(u64, u64), SessionError> {
        self.run_line(commands::Line::Shell(command.to_string()))
            .await
    }

    /// Start a command (commands shape): a shell line, or a program with its arguments.
    pub async fn run_line(&self, line: commands::Line) -> Result<(u64, u64), SessionError> {
        self.touch();
        match &self.kind {
            Kind::Commands(c) => c.run(line, &self.journal).await.map_err(|e| match e {
                SessionError::Closed(_) => SessionError::Closed(self.id.clone()),
                other => other,
            }),
            Kind::Terminal(_) => {
                Err(self.wrong_shape("terminal", "type commands into it with `remote attach`"))
            }
        }
    }

    /// Input for a running command (commands shape).
    pub async fn command_input(
        &self,
        command: u64,
        data: Option<bytes::Bytes>,
    ) -> Result<(), SessionError> {
        self.touch();
        match &self.kind {
            Kind::Commands(c) => c.input(command, data).await.ok_or(SessionError::NoCommand {
                id: self.id.clone(),
                command,
            }),
            Kind::Terminal(_) => Err(self.wrong_shape("terminal", "it has no separate commands")),
        }
    }

    /// Deliver a signal: to the terminal's foreground job, to one command, or (command 0) to
    /// every running command.
    pub fn signal(
        &self,
        command: u64,
        signal: nix::sys::signal::Signal,
    ) -> Result<(), SessionError> {
        self.touch();
        match &self.kind {
            Kind::Terminal(t) => {
                t.signal(signal);
                Ok(())
            }
            Kind::Commands(c) => {
                if c.signal(command, signal) {
                    Ok(())
                } else {
                    Err(SessionError::NoCommand {
                        id: self.id.clone(),
                        command,
                    })
                }
            }
        }
    }

    fn wrong_shape(&self, shape: &'static str, what: &'static str) -> SessionError {
        SessionError::WrongShape {
            id: self.id.clone(),
            shape,
            what,
        }
    }

    /// End the session: stop its processes and wake every reader and writer.
    fn close(&self) {
        {
            let mut st = self.status();
            if st.closed {
                return;
            }
            st.closed = true;
        }
        self.connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match &self.kind {
            Kind::Terminal(t) => t.kill(),
            Kind::Commands(c) => c.kill_all(),
        }
        self.journal.close();
    }
}

/// Keeps a session counted as attached.
pub struct AttachGuard {
    session: Arc<Session>,
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        let mut st = self.session.status();
        st.attached = st.attached.saturating_sub(1);
        st.last_activity = Instant::now();
    }
}

/// All sessions of this agent.
pub struct SessionHost {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    defaults: SessionDefaults,
    /// Where session, command and refusal events go (crate::audit).
    audit: Audit,
    /// Where commands-shape sessions keep their carried-over state.
    user_roots: UserRoots,
}

/// `state_root/u<UID>`: where the commands-shape sessions of one OS user keep their state
/// (one directory each), owned by that user so their commands can make their session's
/// directory; each made once.
#[derive(Clone)]
struct UserRoots {
    root: std::path::PathBuf,
    /// UIDs whose directory exists.
    made: Arc<Mutex<std::collections::HashSet<u32>>>,
}

impl UserRoots {
    fn get(&self, identity: &Identity) -> Result<std::path::PathBuf, SessionError> {
        let dir = self.root.join(format!("u{}", identity.uid));
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if made.contains(&identity.uid.as_raw()) && dir.is_dir() {
            return Ok(dir);
        }
        let err = |source| SessionError::StateDir {
            path: dir.clone(),
            source,
        };
        use std::os::unix::fs::PermissionsExt;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(e)),
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        if identity.switch {
            nix::unistd::chown(&dir, Some(identity.uid), Some(identity.gid))
                .map_err(|e| err(e.into()))?;
        }
        made.insert(identity.uid.as_raw());
        Ok(dir)
    }
}

/// Run `work` (blocking: account lookups, directories, starting processes) on a blocking
/// thread, giving up after `limit` with `timeout`. What work that finishes after that made
/// is handed to `undo` (which stops and removes it).
async fn within<T: Send + 'static>(
    limit: Duration,
    timeout: EndpointError,
    work: impl FnOnce() -> Result<T, SessionError> + Send + 'static,
    undo: impl FnOnce(T) + Send + 'static,
) -> Result<T, SessionError> {
    let mut task = tokio::task::spawn_blocking(work);
    match tokio::time::timeout(limit, &mut task).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(SessionError::Internal(format!(
            "opening the session failed: {e}"
        ))),
        Err(_) => {
            tokio::spawn(async move {
                if let Ok(Ok(late)) = task.await {
                    undo(late);
                }
            });
            Err(timeout.into())
        }
    }
}

/// What opening a session made, undone: its processes stopped, its state removed; its
/// place on the endpoint is given back when it is dropped here.
fn undo_open((kind, _connection): (Kind, crate::endpoints::EndpointUse)) {
    match kind {
        Kind::Terminal(t) => t.kill(),
        Kind::Commands(c) => {
            c.kill_all();
            c.remove_state();
        }
    }
}

impl SessionHost {
    pub fn new(defaults: SessionDefaults, state_root: std::path::PathBuf) -> Arc<SessionHost> {
        SessionHost::with_audit(defaults, state_root, Audit::disabled())
    }

    /// A host whose events go to `audit`.
    pub fn with_audit(
        defaults: SessionDefaults,
        state_root: std::path::PathBuf,
        audit: Audit,
    ) -> Arc<SessionHost> {
        Arc::new(SessionHost {
            sessions: Mutex::new(HashMap::new()),
            defaults,
            audit,
            user_roots: UserRoots {
                root: state_root,
                made: Arc::default(),
            },
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn defaults(&self) -> &SessionDefaults {
        &self.defaults
    }

    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    pub async fn open(
        &self,
        who: &Principal,
        req: OpenRequest,
    ) -> Result<Arc<Session>, SessionError> {
        let endpoint = req.endpoint.clone();
        let result = self.open_inner(who, req).await;
        let transport = Transport::from_label(who.transport);
        match &result {
            Ok(s) => self.audit.record(Event::Session {
                action: SessionAction::Open,
                session: s.id.clone(),
                account: who.name.clone(),
                endpoint: s.endpoint.name.clone(),
                transport,
                peer: None,
            }),
            Err(SessionError::Endpoint(e)) => self.audit.record(Event::Refused {
                account: who.name.clone(),
                endpoint: if endpoint.is_empty() {
                    crate::endpoints::DEFAULT_ENDPOINT.into()
                } else {
                    endpoint
                },
                transport,
                reason: e.to_string(),
                peer: None,
            }),
            Err(_) => {}
        }
        result
    }

    async fn open_inner(
        &self,
        who: &Principal,
        req: OpenRequest,
    ) -> Result<Arc<Session>, SessionError> {
        let endpoint = self.defaults.endpoints.admit(&req.endpoint, who.caller())?;
        let (mine, mine_here) =
            self.map()
                .values()
                .filter(|s| s.owner == who.name)
                .fold((0, 0), |(all, here), s| {
                    (
                        all + 1,
                        here + usize::from(s.endpoint.name == endpoint.name),
                    )
                });
        if mine >= self.defaults.max_sessions_per_user {
            return Err(SessionError::Quota {
                what: "too many open sessions; remove some with `remote session rm`",
                limit: self.defaults.max_sessions_per_user,
                setting: "max_sessions_per_user",
            });
        }
        if mine_here >= endpoint.limits.max_sessions_per_user {
            return Err(EndpointError::PerUser {
                endpoint: endpoint.name.clone(),
                what: "open sessions",
                limit: endpoint.limits.max_sessions_per_user,
                setting: "max_sessions_per_user",
            }
            .into());
        }
        // Counted from here, also while a slow open is still at work after its timeout.
        let connection = endpoint.connect()?;
        let id = new_id();
        let journal_bytes = req
            .journal_bytes
            .unwrap_or(self.defaults.journal_bytes)
            .clamp(64 << 10, self.defaults.max_journal_bytes);
        let buffering = match req.buffering.or(endpoint.buffering) {
            Some(Mode::Spill) if !self.defaults.spill_possible => Mode::Block,
            Some(mode) => mode,
            None => self.defaults.buffering,
        };
        let journal = Arc::new(Journal::new(journal_bytes, buffering));
        // What may block (account lookups for run_as, the state directory, starting the
        // shell) runs within the open timeout.
        let (limit, timed_out) = endpoint.open_limit(req.open_timeout);
        let start = {
            let connection = connection;
            let (endpoint, req, id) = (endpoint.clone(), req.clone(), id.clone());
            let (account, identity) = (who.name.clone(), who.identity.clone());
            let roots = self.user_roots.clone();
            let max_running_here = self.defaults.max_running_commands;
            let audited = commands::Audited {
                audit: self.audit.clone(),
                session: id.clone(),
                account: who.name.clone(),
                transport: Transport::from_label(who.transport),
            };
            move || -> Result<(Kind, crate::endpoints::EndpointUse), SessionError> {
                let identity = endpoint_identity(&account, &identity, &endpoint)?;
                let kind = match req.shape {
                    Shape::Terminal => {
                        endpoint.interactive()?;
                        Kind::Terminal(terminal::Terminal::start(
                            &identity,
                            &req.terminal,
                            &endpoint.env,
                            endpoint.workdir.clone(),
                        )?)
                    }
                    Shape::Commands | Shape::Unspecified => {
                        let dir = roots.get(&identity)?.join(&id);
                        let max_running = req
                            .max_running
                            .unwrap_or(max_running_here)
                            .clamp(1, max_running_here.max(1));
                        let mut start = req.start.clone();
                        let mut env = endpoint.env.clone();
                        env.append(&mut start.env);
                        start.env = env;
                        if start.cwd.is_none() {
                            start.cwd = endpoint.workdir.clone();
                        }
                        let limits = commands::CommandLimits::new(
                            &endpoint,
                            req.max_received_mb,
                            req.operation_timeout,
                        );
                        Kind::Commands(commands::Commands::new(
                            identity,
                            dir,
                            max_running,
                            &start,
                            endpoint.clone(),
                            limits,
                            audited,
                        )?)
                    }
                };
                Ok((kind, connection))
            }
        };
        let (kind, connection) = within(limit, timed_out, start, undo_open).await?;
        let name = if req.name.is_empty() {
            id.clone()
        } else {
            req.name.clone()
        };
        let session = Arc::new(Session {
            id: id.clone(),
            name,
            owner: who.name.clone(),
            transport: who.transport,
            created: SystemTime::now(),
            // The shorter of what the client asks and what the endpoint allows.
            idle_timeout: req
                .idle_timeout
                .unwrap_or(Duration::MAX)
                .min(endpoint.timeouts.idle.unwrap_or(self.defaults.idle_timeout)),
            endpoint,
            connection: Mutex::new(Some(connection)),
            journal,
            kind,
            status: Mutex::new(Status {
                attached: 0,
                last_activity: Instant::now(),
                closed: false,
            }),
        });
        if let Kind::Terminal(t) = &session.kind {
            t.start_pump(session.clone());
        }
        tracing::info!(session = %id, owner = %who.name, endpoint = %session.endpoint.name, shape = ?req.shape, transport = who.transport, "session opened");
        self.map().insert(id, session.clone());
        Ok(session)
    }

    /// The session `id` if `who` owns it. Other users' sessions are reported as missing.
    pub fn get(&self, who: &Principal, id: &str) -> Result<Arc<Session>, SessionError> {
        match self.map().get(id) {
            Some(s) if s.owner == who.name => Ok(s.clone()),
            _ => Err(SessionError::NotFound(id.to_string())),
        }
    }

    pub fn list(&self, who: &Principal) -> Vec<SessionInfo> {
        let mut list: Vec<SessionInfo> = self
            .map()
            .values()
            .filter(|s| s.owner == who.name)
            .map(|s| s.info())
            .collect();
        list.sort_by(|a, b| a.created_unix.cmp(&b.created_unix).then(a.id.cmp(&b.id)));
        list
    }

    /// Every session, whoever owns it (the relay link mirrors them all).
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.map().values().cloned().collect()
    }

    /// Session `id`, whoever owns it; for the agent's own bookkeeping, never for a client.
    pub fn find(&self, id: &str) -> Option<Arc<Session>> {
        self.map().get(id).cloned()
    }

    pub fn close(&self, who: &Principal, id: &str) -> Result<(), SessionError> {
        let session = self.get(who, id)?;
        self.remove(&session, "closed by its owner");
        Ok(())
    }

    fn remove(&self, session: &Arc<Session>, why: &str) {
        self.map().remove(&session.id);
        session.close();
        self.audit.record(Event::Session {
            action: SessionAction::Close,
            session: session.id.clone(),
            account: session.owner.clone(),
            endpoint: session.endpoint.name.clone(),
            transport: Transport::from_label(session.transport),
            peer: None,
        });
        if let Kind::Commands(c) = &session.kind {
            c.remove_state();
        }
        tracing::info!(session = %session.id, owner = %session.owner, "session closed: {why}");
        // A journal can be large; give its memory back to the system once the session's
        // tasks let go of it, or every later fork would copy page tables for it.
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            release_free_memory();
        });
    }

    /// Close sessions that have had no client for longer than their idle timeout, until
    /// `shutdown`; then close every session.
    pub async fn run_reaper(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let now = Instant::now();
            let idle: Vec<Arc<Session>> = self
                .map()
                .values()
                .filter(|s| {
                    let st = s.status();
                    st.attached == 0 && now.duration_since(st.last_activity) >= s.idle_timeout
                })
                .cloned()
                .collect();
            for s in idle {
                self.remove(&s, &format!("idle for {:?} with no client", s.idle_timeout));
            }
        }
        let all: Vec<Arc<Session>> = self.map().values().cloned().collect();
        for s in all {
            self.remove(&s, "the agent is shutting down");
        }
    }
}

/// Return freed heap memory to the operating system (glibc keeps it otherwise).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A new session id: 16 hex digits from the OS's random source.
fn new_id() -> String {
    use rand::RngExt;
    format!("{:016x}", rand::rng().random::<u64>())
}

/// Signal names accepted from clients.
pub fn parse_signal(name: &str) -> Option<nix::sys::signal::Signal> {
    use nix::sys::signal::Signal::*;
    Some(match name.trim_start_matches("SIG") {
        "INT" => SIGINT,
        "TERM" => SIGTERM,
        "KILL" => SIGKILL,
        "HUP" => SIGHUP,
        "QUIT" => SIGQUIT,
        "USR1" => SIGUSR1,
        "USR2" => SIGUSR2,
        "CONT" => SIGCONT,
        "STOP" => SIGSTOP,
        "TSTP" => SIGTSTP,
        "WINCH" => SIGWINCH,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn timed_out() -> EndpointError {
        EndpointError::OpenTimeout {
            endpoint: "slow".into(),
            secs: 0,
            whose: "open_timeout_secs".into(),
        }
    }

    /// Sets its flag when dropped.
    struct Made(Arc<AtomicBool>);
    impl Drop for Made {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn opening_gives_up_at_the_open_timeout_and_drops_what_comes_late() {
        let fast = within(Duration::from_secs(5), timed_out(), || Ok(7), |_| {}).await;
        assert_eq!(fast.unwrap(), 7);

        let dropped = Arc::new(AtomicBool::new(false));
        let flag = dropped.clone();
        let began = Instant::now();
        let undone = Arc::new(AtomicBool::new(false));
        let undo_flag = undone.clone();
        let slow = within(
            Duration::from_millis(100),
            timed_out(),
            move || {
                std::thread::sleep(Duration::from_millis(600));
                Ok(Made(flag))
            },
            move |made: Made| {
                undo_flag.store(true, Ordering::SeqCst);
                drop(made);
            },
        )
        .await;
        assert!(began.elapsed() < Duration::from_millis(500));
        match slow {
            Err(SessionError::Endpoint(EndpointError::OpenTimeout { endpoint, .. })) => {
                assert_eq!(endpoint, "slow")
            }
            other => panic!("{:?}", other.err()),
        }
        // What the slow work made is undone when it finishes.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dropped.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(undone.load(Ordering::SeqCst) && dropped.load(Ordering::SeqCst));

        // Errors of the work itself come through as they are.
        let failed: Result<(), _> = within(
            Duration::from_secs(5),
            timed_out(),
            || Err(SessionError::Invalid("nope".into())),
            |_| {},
        )
        .await;
        assert!(matches!(failed, Err(SessionError::Invalid(_))));
    }
}
