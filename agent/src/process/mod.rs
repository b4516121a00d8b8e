//! Starting user processes: which OS identity they run as, their environment and working
//! directory, and the two ways of wiring them up (pipes, or a pseudo-terminal). Every
//! transport starts processes through here, so privilege dropping lives in one place.
//! The fork-free spawner for commands on pipes is in [`spawn`].

mod spawn;

pub use spawn::{Child, spawn_vfork};

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use nix::unistd::{Gid, Uid, User};

use crate::accounts::Account;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(
        "account '{account}' runs as OS user '{user}', which does not exist on this host: create it or fix run_as (remote-agent user rm/add)"
    )]
    NoSuchUser { account: String, user: String },
    #[error(
        "account '{account}' names run_as '{user}', but the agent is not running as root and cannot switch users: run the agent as root or remove run_as"
    )]
    CannotSwitch { account: String, user: String },
    #[error("cannot look up OS user: {0}. Check /etc/passwd (or NSS) on the agent's host")]
    Lookup(nix::Error),
    #[error(
        "cannot start {what}: {source}. Check that it exists and is executable for the account's OS user, and the agent's log on the host"
    )]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "cannot set up a pseudo-terminal: {0}. The host may be out of ptys (kernel.pty.max) or /dev/pts is not mounted; run without a terminal meanwhile"
    )]
    Pty(String),
}

/// The OS identity a process runs as, resolved once per login.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: String,
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Whether a switch of user is needed (the agent runs as root and the account has run_as).
    pub switch: bool,
}

impl Identity {
    /// Resolve what `account`'s processes run as: its `run_as` user when the agent is root,
    /// otherwise the agent's own user.
    pub fn for_account(account: &Account) -> Result<Identity, ProcessError> {
        match &account.run_as {
            Some(user) => Identity::for_run_as(&account.name, user),
            None => Identity::own(),
        }
    }

    /// OS user `user` for account `account` (an account's or an endpoint's `run_as`): only
    /// when the agent runs as root, or already runs as that user.
    pub fn for_run_as(account: &str, user: &str) -> Result<Identity, ProcessError> {
        let me = nix::unistd::geteuid();
        let no_such = || ProcessError::NoSuchUser {
            account: account.to_string(),
            user: user.to_string(),
        };
        if me.is_root() {
            let found = User::from_name(user)
                .map_err(ProcessError::Lookup)?
                .ok_or_else(no_such)?;
            let cname = CString::new(user.as_bytes()).map_err(|_| no_such())?;
            let groups =
                nix::unistd::getgrouplist(&cname, found.gid).map_err(ProcessError::Lookup)?;
            return Ok(Identity::from_user(found, groups, true));
        }
        if User::from_uid(me).ok().flatten().map(|u| u.name).as_deref() != Some(user) {
            return Err(ProcessError::CannotSwitch {
                account: account.to_string(),
                user: user.to_string(),
            });
        }
        Identity::own()
    }

    /// The agent's own user.
    fn own() -> Result<Identity, ProcessError> {
        let me = nix::unistd::geteuid();
        let user = User::from_uid(me).map_err(ProcessError::Lookup)?;
        Ok(match user {
            Some(user) => {
                let groups = nix::unistd::getgroups().unwrap_or_default();
                Identity::from_user(user, groups, false)
            }
            None => Identity {
                user: me.to_string(),
                uid: me,
                gid: nix::unistd::getegid(),
                groups: Vec::new(),
                home: crate::paths::home_dir(),
                shell: PathBuf::from("/bin/sh"),
                switch: false,
            },
        })
    }

    /// The identity of an OS user known by uid (a local-socket peer, for instance). The agent
    /// switches to it when it runs as root and the user is someone else.
    pub fn for_uid(uid: Uid) -> Result<Identity, ProcessError> {
        let user = User::from_uid(uid)
            .map_err(ProcessError::Lookup)?
            .ok_or_else(|| ProcessError::NoSuchUser {
                account: uid.to_string(),
                user: uid.to_string(),
            })?;
        let me = nix::unistd::geteuid();
        let switch = me.is_root() && uid != me;
        let groups = match CString::new(user.name.as_bytes()) {
            Ok(name) => nix::unistd::getgrouplist(&name, user.gid).map_err(ProcessError::Lookup)?,
            Err(_) => vec![user.gid],
        };
        Ok(Identity::from_user(user, groups, switch))
    }

    fn from_user(user: User, groups: Vec<Gid>, switch: bool) -> Identity {
        let shell = if user.shell.as_os_str().is_empty() {
            PathBuf::from("/bin/sh")
        } else {
            user.shell.clone()
        };
        Identity {
            user: user.name,
            uid: user.uid,
            gid: user.gid,
            groups,
            home: user.dir,
            shell,
            switch,
        }
    }

    /// Names of the identity's groups (those that have one).
    pub fn group_names(&self) -> Vec<String> {
        self.groups
            .iter()
            .filter_map(|g| nix::unistd::Group::from_gid(*g).ok().flatten())
            .map(|g| g.name)
            .collect()
    }

    /// Working directory for new processes: the home directory if it exists, else `/`.
    pub fn workdir(&self) -> PathBuf {
        if self.home.is_dir() {
            self.home.clone()
        } else {
            PathBuf::from("/")
        }
    }

    /// The base environment of a login, like sshd's: HOME, USER, LOGNAME, SHELL, PATH.
    pub fn base_env(&self) -> Vec<(String, String)> {
        let path = if self.uid.is_root() {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        } else {
            "/usr/local/bin:/usr/bin:/bin:/usr/games"
        };
        vec![
            ("HOME".into(), self.home.to_string_lossy().into_owned()),
            ("USER".into(), self.user.clone()),
            ("LOGNAME".into(), self.user.clone()),
            ("SHELL".into(), self.shell.to_string_lossy().into_owned()),
            ("PATH".into(), path.into()),
        ]
    }

    /// A closure for `pre_exec` that drops to this identity: supplementary groups, then gid,
    /// then uid (in that order; nothing here allocates or takes locks).
    fn drop_privileges(&self) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
        let (switch, uid, gid, groups) = (self.switch, self.uid, self.gid, self.groups.clone());
        move || {
            if switch {
                nix::unistd::setgroups(&groups)?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
            }
            Ok(())
        }
    }
}

/// What to run: a command line through the user's shell (`shell -c LINE`), the user's login
/// shell, or a program with arguments and no shell.
#[derive(Debug, Clone)]
pub enum Program {
    ShellCommand(String),
    LoginShell,
    Exec(PathBuf, Vec<String>),
}

/// A complete description of a process to start.
#[derive(Debug, Clone)]
pub struct Spec {
    pub program: Program,
    pub env: Vec<(String, String)>,
    /// Working directory (default: the user's home).
    pub cwd: Option<PathBuf>,
}

impl Spec {
    fn argv(&self, identity: &Identity) -> (PathBuf, Option<String>, Vec<String>) {
        match &self.program {
            Program::ShellCommand(line) => (
                identity.shell.clone(),
                None,
                vec!["-c".into(), line.clone()],
            ),
            Program::LoginShell => {
                let base = identity
                    .shell
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "sh".into());
                (identity.shell.clone(), Some(format!("-{base}")), Vec::new())
            }
            Program::Exec(path, args) => (path.clone(), None, args.clone()),
        }
    }

    fn describe(&self) -> String {
        match &self.program {
            Program::ShellCommand(_) | Program::LoginShell => "the user's shell".into(),
            Program::Exec(p, _) => p.display().to_string(),
        }
    }
}

/// Start `spec` as `identity` with stdin/stdout/stderr on pipes. The child leads its own
/// process group, so a signal can reach everything it started.
pub fn spawn_piped(
    identity: &Identity,
    spec: &Spec,
) -> Result<tokio::process::Child, ProcessError> {
    let (program, arg0, args) = spec.argv(identity);
    let mut cmd = tokio::process::Command::new(&program);
    if let Some(arg0) = arg0 {
        cmd.arg0(arg0);
    }
    cmd.args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(spec.cwd.clone().unwrap_or_else(|| identity.workdir()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(false);
    let mut drop_privs = identity.drop_privileges();
    // SAFETY: the closure only calls async-signal-safe system calls (setsid, setgroups,
    // setgid, setuid) and does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            reset_signals();
            drop_privs()
        });
    }
    cmd.spawn().map_err(|source| ProcessError::Spawn {
        what: spec.describe(),
        source,
    })
}

/// A process running on a pseudo-terminal.
pub struct PtyProcess {
    pub child: tokio::process::Child,
    pub pty: pty_process::Pty,
    /// Path of the terminal's slave side, e.g. `/dev/pts/3`.
    pub tty_path: String,
}

/// Terminal settings requested by the client.
#[derive(Debug, Clone)]
pub struct PtySettings {
    pub term: String,
    pub rows: u16,
    pub cols: u16,
    pub modes: Vec<(russh::Pty, u32)>,
}

/// Start `spec` as `identity` on a new pseudo-terminal sized and moded as `settings` ask.
/// The terminal device is handed to the user, as login(1) does.
pub fn spawn_pty(
    identity: &Identity,
    spec: &Spec,
    settings: &PtySettings,
) -> Result<PtyProcess, ProcessError> {
    let (pty, pts) = pty_process::open().map_err(|e| ProcessError::Pty(e.to_string()))?;
    pty.resize(pty_process::Size::new(
        settings.rows.max(1),
        settings.cols.max(1),
    ))
    .map_err(|e| ProcessError::Pty(e.to_string()))?;
    crate::ssh::pty_modes::apply(&pts, &settings.modes);
    let tty_path = std::fs::read_link(format!("/proc/self/fd/{}", pts.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if identity.switch && !tty_path.is_empty() {
        // Like login(1): the terminal belongs to the user and is not readable by others.
        let _ = nix::unistd::chown(tty_path.as_str(), Some(identity.uid), Some(identity.gid));
        let _ = nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            tty_path.as_str(),
            nix::sys::stat::Mode::from_bits_truncate(0o620),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        );
    }
    let (program, arg0, args) = spec.argv(identity);
    let mut env = spec.env.clone();
    env.push(("TERM".into(), settings.term.clone()));
    if !tty_path.is_empty() {
        env.push(("SSH_TTY".into(), tty_path.clone()));
    }
    let mut cmd = pty_process::Command::new(&program)
        .args(args)
        .env_clear()
        .envs(env)
        .current_dir(identity.workdir())
        .kill_on_drop(false);
    if let Some(arg0) = arg0 {
        cmd = cmd.arg0(arg0);
    }
    let mut drop_privs = identity.drop_privileges();
    // SAFETY: as in spawn_piped; pty-process runs setsid + TIOCSCTTY before this closure.
    cmd = unsafe {
        cmd.pre_exec(move || {
            reset_signals();
            drop_privs()
        })
    };
    let child = cmd.spawn(pts).map_err(|e| ProcessError::Spawn {
        what: spec.describe(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(PtyProcess {
        child,
        pty,
        tty_path,
    })
}

/// Children must not inherit the agent's signal dispositions (tokio and the runtime may have
/// changed SIGPIPE): restore the defaults and an empty mask.
fn reset_signals() {
    // SAFETY: signal() and sigprocmask() are async-signal-safe.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
        libc::signal(libc::SIGHUP, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Send `signal` to the process group led by `pid` (falling back to the process alone).
pub fn signal_group(pid: u32, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    if nix::sys::signal::killpg(pid, signal).is_err() {
        let _ = nix::sys::signal::kill(pid, signal);
    }
}

/// Send `signal` to every process whose session id is one of `sids`: what a session's
/// commands started, background jobs included (each command leads its own session, and
/// children keep it unless they call setsid themselves).
pub fn signal_sessions(sids: &[u32], signal: nix::sys::signal::Signal) -> usize {
    if sids.is_empty() {
        return 0;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut hit = 0;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp session …"; comm may hold anything, so skip past ')'.
        let sid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(3))
            .and_then(|s| s.parse::<u32>().ok());
        if sid.is_some_and(|sid| sids.contains(&sid))
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).is_ok()
        {
            hit += 1;
        }
    }
    hit
}

/// When process `pid` started (clock ticks since boot, /proc/PID/stat field 22): with the
/// pid, it names one process for good, as pids are reused.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid …": comm may hold anything, so count fields after the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether any of the process groups `pgids` still has a process: a cheap test before
/// [`signal_sessions`] for leaders whose children stay in their group (no job control).
pub fn any_group_alive(pgids: &[u32]) -> bool {
    pgids.iter().any(|g| {
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(*g as i32), None)
            != Err(nix::errno::Errno::ESRCH)
    })
}

/// Send `signal` to one process.
pub fn signal_process(pid: u32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

/// What a client sends towards a running process, in order.
#[derive(Debug)]
pub enum Input {
    Data(bytes::Bytes),
    Eof,
    Resize { rows: u16, cols: u16 },
}

/// Copy queued input to a child's stdin. After a write error (the child closed its stdin)
/// keep draining the queue, so a sender never waits on a reader that is gone.
pub async fn feed_stdin<W: tokio::io::AsyncWrite + Unpin>(
    mut rx: tokio::sync::mpsc::Receiver<Input>,
    mut stdin: Option<W>,
) {
    use tokio::io::AsyncWriteExt;
    while let Some(msg) = rx.recv().await {
        match msg {
            Input::Data(data) => {
                if let Some(w) = stdin.as_mut()
                    && w.write_all(&data).await.is_err()
                {
                    stdin = None;
                }
            }
            Input::Eof => stdin = None,
            Input::Resize { .. } => {}
        }
    }
}

/// Copy queued input to a terminal and apply resizes, in order.
pub async fn feed_pty(
    mut rx: tokio::sync::mpsc::Receiver<Input>,
    mut writer: pty_process::OwnedWritePty,
) {
    use tokio::io::AsyncWriteExt;
    let mut broken = false;
    while let Some(msg) = rx.recv().await {
        match msg {
            Input::Data(data) if !broken => broken = writer.write_all(&data).await.is_err(),
            Input::Resize { rows, cols } => {
                let _ = writer.resize(pty_process::Size::new(rows.max(1), cols.max(1)));
            }
            // A terminal has no half-close; EOF from a client changes nothing (as in sshd).
            _ => {}
        }
    }
}
