//! The vfork-style spawner for commands on pipes: what glibc's posix_spawn does, plus the
//! agent's own steps (a new session, default signal dispositions, the switch of user). It
//! owns everything between a [`Spec`] and a running child on pipes: the PATH search, the
//! child's stack, the `clone(CLONE_VM | CLONE_VFORK)` and the raw-syscall code the child
//! runs up to `execve`, and the reaping of the child through a pidfd.
//!
//! Why: `fork` copies the agent's page tables, and every page the agent writes afterwards
//! takes a copy-on-write fault with TLB shootdowns on all its threads; a child that shares
//! the agent's memory until `execve` costs neither. x86_64 and aarch64 Linux only; on other
//! targets, and whenever something fails before the child exists, [`super::spawn_piped`]
//! starts the process instead (the result has the same shape either way).

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

use super::{Identity, ProcessError, Spec};

/// A child started by [`spawn_vfork`], on pipes. It is reaped by [`Child::wait`], or, if
/// dropped before that, in the background: it never stays a zombie.
pub struct Child {
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    pid: u32,
    waiter: Waiter,
}

enum Waiter {
    /// Started here: a pidfd turns readable when the child exits, then `waitpid` reaps it.
    Pidfd(AsyncFd<OwnedFd>),
    /// Started here, but no pidfd could be registered: a thread waits for it.
    Thread(tokio::sync::oneshot::Receiver<io::Result<ExitStatus>>),
    /// Started by the fallback ([`super::spawn_piped`]); tokio reaps it.
    Tokio(tokio::process::Child),
    /// Reaped.
    Exited(ExitStatus),
}

impl Child {
    /// The child's pid; it leads its own session and process group.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Wait for the child to exit and reap it. Cancel-safe: dropping the future before it
    /// completes loses nothing, so it can be a branch of a `select!` loop.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            let status = match &mut self.waiter {
                Waiter::Exited(status) => return Ok(*status),
                Waiter::Tokio(child) => child.wait().await?,
                Waiter::Thread(rx) => rx
                    .await
                    .map_err(|_| io::Error::other("the thread waiting for the child is gone"))??,
                Waiter::Pidfd(fd) => {
                    let mut ready = fd.readable().await?;
                    match try_reap(self.pid)? {
                        Some(status) => status,
                        None => {
                            ready.clear_ready();
                            continue;
                        }
                    }
                }
            };
            self.waiter = Waiter::Exited(status);
        }
    }

    #[cfg(test)]
    fn vforked(&self) -> bool {
        matches!(self.waiter, Waiter::Pidfd(_))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let waiter = std::mem::replace(&mut self.waiter, Waiter::Exited(ExitStatus::from_raw(0)));
        let Waiter::Pidfd(fd) = waiter else {
            // Exited: nothing to do; Tokio: tokio's orphan queue reaps it; Thread: the thread.
            return;
        };
        let pid = self.pid;
        if !matches!(try_reap(pid), Ok(None)) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    while let Ok(mut ready) = fd.readable().await {
                        match try_reap(pid) {
                            Ok(None) => ready.clear_ready(),
                            _ => break,
                        }
                    }
                });
            }
            Err(_) => {
                drop(fd);
                let _ = std::thread::Builder::new()
                    .name("reap-child".into())
                    .spawn(move || reap_blocking(pid));
            }
        }
    }
}

/// `waitpid(pid, WNOHANG)`: the status if the child has exited (it is reaped then).
fn try_reap(pid: u32) -> io::Result<Option<ExitStatus>> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waitpid only writes the status into the local it is given.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if r > 0 {
            return Ok(Some(ExitStatus::from_raw(status)));
        }
        if r == 0 {
            return Ok(None);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `waitpid(pid, 0)`: wait for the child to exit and reap it.
fn reap_blocking(pid: u32) -> io::Result<ExitStatus> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waitpid only writes the status into the local it is given.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if r > 0 {
            return Ok(ExitStatus::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Start `spec` as `identity` with stdin/stdout/stderr on pipes, like
/// [`super::spawn_piped`] (the child leads its own session; failures to start, such as a
/// program that is not found, are errors), but without `fork`. Must be called within a
/// tokio runtime.
pub fn spawn_vfork(identity: &Identity, spec: &Spec) -> Result<Child, ProcessError> {
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    match imp::spawn(identity, spec) {
        Ok(child) => return Ok(child),
        Err(imp::Failure::Spawn(source)) => {
            return Err(ProcessError::Spawn {
                what: spec.describe(),
                source,
            });
        }
        Err(imp::Failure::Setup(e)) => {
            tracing::debug!("vfork spawner unavailable ({e}); starting the process with fork");
        }
    }
    fallback(identity, spec)
}

/// The same through [`super::spawn_piped`] (std's fork + exec), in the same shape.
fn fallback(identity: &Identity, spec: &Spec) -> Result<Child, ProcessError> {
    let mut child = super::spawn_piped(identity, spec)?;
    let err = |source| ProcessError::Spawn {
        what: spec.describe(),
        source,
    };
    let pid = child
        .id()
        .ok_or_else(|| err(io::Error::other("the child has no pid")))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut out = Child {
        stdin: None,
        stdout: None,
        stderr: None,
        pid,
        waiter: Waiter::Tokio(child),
    };
    let wrap = || -> io::Result<()> {
        if let Some(s) = stdin {
            out.stdin = Some(pipe::Sender::from_owned_fd(s.into_owned_fd()?)?);
        }
        if let Some(s) = stdout {
            out.stdout = Some(pipe::Receiver::from_owned_fd(s.into_owned_fd()?)?);
        }
        if let Some(s) = stderr {
            out.stderr = Some(pipe::Receiver::from_owned_fd(s.into_owned_fd()?)?);
        }
        Ok(())
    };
    match wrap() {
        Ok(()) => Ok(out),
        Err(e) => {
            super::signal_process(pid, nix::sys::signal::Signal::SIGKILL);
            Err(err(e))
        }
    }
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod imp {
    //! The clone itself. The parent prepares everything that allocates; the child, which
    //! shares the agent's memory until `execve`, makes raw system calls only.

    use std::cell::RefCell;
    use std::ffi::{CString, OsStr};
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::sync::atomic::{AtomicI32, Ordering};

    use libc::{c_char, c_int, c_long, c_void};
    use tokio::io::unix::AsyncFd;
    use tokio::net::unix::pipe;

    use super::{Child, Identity, Spec, Waiter};

    pub(super) enum Failure {
        /// Nothing was started, for a reason the fallback may not share (mmap, clone...).
        Setup(io::Error),
        /// The process could not be started (not found, not executable, bad directory...).
        Spawn(io::Error),
    }

    /// Usable stack of the child. It runs one small function: no recursion, no allocation.
    const STACK_SIZE: usize = 64 * 1024;

    /// The child's stack: one per thread, reused (the thread is suspended while its child
    /// runs on it), unmapped when the thread ends. A guard page below it.
    struct Stack {
        base: *mut c_void,
        len: usize,
        top: *mut c_void,
    }

    impl Stack {
        fn new() -> io::Result<Stack> {
            // SAFETY: sysconf has no preconditions.
            let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
                .ok()
                .filter(|p| *p > 0)
                .unwrap_or(4096);
            let len = STACK_SIZE.div_ceil(page) * page + page;
            // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                    -1,
                    0,
                )
            };
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: the first page of the mapping just made; nothing else uses it.
            if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
                let e = io::Error::last_os_error();
                // SAFETY: the mapping made above, not shared with anything.
                unsafe { libc::munmap(base, len) };
                return Err(e);
            }
            // The stack grows down from the end of the mapping (page aligned, so 16-aligned).
            let top = base.wrapping_byte_add(len);
            Ok(Stack { base, len, top })
        }
    }

    impl Drop for Stack {
        fn drop(&mut self) {
            // SAFETY: the mapping made in Stack::new; no child runs on it (a child runs only
            // while the thread that owns it is suspended in clone).
            unsafe { libc::munmap(self.base, self.len) };
        }
    }

    thread_local! {
        static STACK: RefCell<Option<Stack>> = const { RefCell::new(None) };
    }

    /// What the child needs, all prepared (and owned) by the parent. The parent is
    /// suspended until the child has called execve or exited, so the pointers stay valid.
    #[repr(C)]
    struct ChildArgs {
        /// Paths to try in order, as execvp would (one if the program names a path).
        paths: *const *const c_char,
        npaths: usize,
        argv: *const *const c_char,
        /// `/bin/sh`, a path, then argv[1..]: for a program without `#!` (ENOEXEC), as
        /// execvp does. Slot 1 is filled by the child.
        script_argv: *mut *const c_char,
        envp: *const *const c_char,
        cwd: *const c_char,
        /// Become stdin, stdout, stderr (all >= 3, close-on-exec).
        fds: [c_int; 3],
        switch: bool,
        uid: libc::uid_t,
        gid: libc::gid_t,
        groups: *const libc::gid_t,
        ngroups: usize,
        /// Set by the child to the errno of what failed, before it exits.
        err: AtomicI32,
    }

    const SH: &[u8] = b"/bin/sh\0";

    fn cstring(bytes: &[u8]) -> Result<CString, Failure> {
        CString::new(bytes).map_err(|_| {
            Failure::Spawn(io::Error::new(
                io::ErrorKind::InvalidInput,
                "nul byte found in provided data",
            ))
        })
    }

    /// The environment as `NAME=value`, a later value for a name replacing an earlier one
    /// (as std's Command does).
    fn environment(env: &[(String, String)]) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = Vec::with_capacity(env.len());
        for (k, v) in env {
            match out.iter_mut().find(|(name, _)| *name == k.as_str()) {
                Some(slot) => slot.1 = v.as_str(),
                None => out.push((k.as_str(), v.as_str())),
            }
        }
        out
    }

    /// The paths execvp would try for `program` with `path` as PATH: the program itself if
    /// it names a path, else each PATH entry joined with it, leaving out those that do not
    /// exist (absolute entries only; relative ones are relative to the child's directory).
    fn candidates(program: &Path, path: Option<&str>) -> Result<Vec<CString>, Failure> {
        let name = program.as_os_str().as_bytes();
        if name.is_empty() {
            return Err(Failure::Spawn(io::Error::from_raw_os_error(libc::ENOENT)));
        }
        if name.contains(&b'/') {
            return Ok(vec![cstring(name)?]);
        }
        let mut out = Vec::new();
        for dir in path.unwrap_or("/bin:/usr/bin").split(':') {
            let full = if dir.is_empty() {
                name.to_vec()
            } else {
                let mut full = Vec::with_capacity(dir.len() + 1 + name.len());
                full.extend_from_slice(dir.as_bytes());
                if !dir.ends_with('/') {
                    full.push(b'/');
                }
                full.extend_from_slice(name);
                full
            };
            if dir.starts_with('/') {
                match std::fs::metadata(OsStr::from_bytes(&full)) {
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOENT | libc::ENOTDIR | libc::ENAMETOOLONG)
                        ) =>
                    {
                        continue;
                    }
                    _ => {}
                }
            }
            out.push(cstring(&full)?);
        }
        if out.is_empty() {
            return Err(Failure::Spawn(io::Error::from_raw_os_error(libc::ENOENT)));
        }
        Ok(out)
    }

    /// A pipe, both ends close-on-exec; `child_end` 0 for the read end, 1 for the write
    /// end. The child's end is moved to fd 3 or above, so that putting it on 0, 1 or 2 in
    /// the child cannot overwrite another of them.
    fn pipe_pair(child_end: usize) -> io::Result<(OwnedFd, OwnedFd)> {
        let mut fds = [-1 as c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and belong to nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let (mut child, parent) = if child_end == 0 { (r, w) } else { (w, r) };
        if child.as_raw_fd() < 3 {
            // SAFETY: fcntl duplicates a descriptor we own.
            let fd = unsafe { libc::fcntl(child.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd was just created by fcntl and belongs to nobody else.
            child = unsafe { OwnedFd::from_raw_fd(fd) };
        }
        Ok((child, parent))
    }

    pub(super) fn spawn(identity: &Identity, spec: &Spec) -> Result<Child, Failure> {
        // The pidfd and the pipes are registered with the runtime of the caller.
        tokio::runtime::Handle::try_current().map_err(|e| Failure::Setup(io::Error::other(e)))?;

        let (program, arg0, args) = spec.argv(identity);
        let env = environment(&spec.env);
        let path_var = env.iter().find(|(k, _)| *k == "PATH").map(|(_, v)| *v);
        let paths = candidates(&program, path_var)?;

        let mut argv_c = Vec::with_capacity(args.len() + 1);
        argv_c.push(match &arg0 {
            Some(a) => cstring(a.as_bytes())?,
            None => cstring(program.as_os_str().as_bytes())?,
        });
        for a in &args {
            argv_c.push(cstring(a.as_bytes())?);
        }
        let mut envp_c = Vec::with_capacity(env.len());
        for (k, v) in &env {
            let mut kv = Vec::with_capacity(k.len() + 1 + v.len());
            kv.extend_from_slice(k.as_bytes());
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            envp_c.push(cstring(&kv)?);
        }
        let cwd = spec.cwd.clone().unwrap_or_else(|| identity.workdir());
        let cwd_c = cstring(cwd.as_os_str().as_bytes())?;

        let paths_p: Vec<*const c_char> = paths.iter().map(|c| c.as_ptr()).collect();
        let argv_p: Vec<*const c_char> = argv_c
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let mut script_p: Vec<*const c_char> = [SH.as_ptr().cast(), std::ptr::null()]
            .into_iter()
            .chain(argv_c.iter().skip(1).map(|c| c.as_ptr()))
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp_p: Vec<*const c_char> = envp_c
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let groups: Vec<libc::gid_t> = identity.groups.iter().map(|g| g.as_raw()).collect();

        let (stdin_child, stdin_parent) = pipe_pair(0).map_err(Failure::Setup)?;
        let (stdout_child, stdout_parent) = pipe_pair(1).map_err(Failure::Setup)?;
        let (stderr_child, stderr_parent) = pipe_pair(1).map_err(Failure::Setup)?;

        let args = ChildArgs {
            paths: paths_p.as_ptr(),
            npaths: paths_p.len(),
            argv: argv_p.as_ptr(),
            script_argv: script_p.as_mut_ptr(),
            envp: envp_p.as_ptr(),
            cwd: cwd_c.as_ptr(),
            fds: [
                stdin_child.as_raw_fd(),
                stdout_child.as_raw_fd(),
                stderr_child.as_raw_fd(),
            ],
            switch: identity.switch,
            uid: identity.uid.as_raw(),
            gid: identity.gid.as_raw(),
            groups: groups.as_ptr(),
            ngroups: groups.len(),
            err: AtomicI32::new(0),
        };

        let (pid, pidfd) = STACK.with(|cell| -> Result<(c_int, c_int), Failure> {
            let mut slot = cell.try_borrow_mut().map_err(|_| {
                Failure::Setup(io::Error::other("the spawn stack of this thread is in use"))
            })?;
            if slot.is_none() {
                *slot = Some(Stack::new().map_err(Failure::Setup)?);
            }
            let top = slot.as_ref().map_or(std::ptr::null_mut(), |s| s.top);
            clone_child(top, &args).map_err(Failure::Setup)
        })?;
        // The child has called execve, or exited: its ends of the pipes are no longer ours
        // to keep open.
        drop((stdin_child, stdout_child, stderr_child));

        let err = args.err.load(Ordering::Acquire);
        if err != 0 {
            if pidfd >= 0 {
                // SAFETY: the pidfd clone gave us; nothing else holds it.
                drop(unsafe { OwnedFd::from_raw_fd(pidfd) });
            }
            let _ = super::reap_blocking(pid as u32);
            return Err(Failure::Spawn(io::Error::from_raw_os_error(err)));
        }
        drop((
            paths_p, argv_p, script_p, envp_p, groups, paths, argv_c, envp_c, cwd_c,
        ));

        let pid_u = pid as u32;
        let mut child = Child {
            stdin: None,
            stdout: None,
            stderr: None,
            pid: pid_u,
            waiter: waiter(pid, pidfd),
        };
        let wrap = |child: &mut Child| -> io::Result<()> {
            child.stdin = Some(pipe::Sender::from_owned_fd(stdin_parent)?);
            child.stdout = Some(pipe::Receiver::from_owned_fd(stdout_parent)?);
            child.stderr = Some(pipe::Receiver::from_owned_fd(stderr_parent)?);
            Ok(())
        };
        if let Err(e) = wrap(&mut child) {
            // Running, but unreachable: stop it (dropping the Child reaps it).
            super::super::signal_process(pid_u, nix::sys::signal::Signal::SIGKILL);
            return Err(Failure::Spawn(e));
        }
        Ok(child)
    }

    /// How to wait for the child: its pidfd from clone (or pidfd_open), registered with the
    /// runtime; failing that, a thread in waitpid.
    fn waiter(pid: c_int, pidfd: c_int) -> Waiter {
        let pidfd = if pidfd >= 0 {
            pidfd
        } else {
            // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
            unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) as c_int }
        };
        if pidfd >= 0 {
            // SAFETY: a pidfd made for us above; nothing else holds it.
            let fd = unsafe { OwnedFd::from_raw_fd(pidfd) };
            // SAFETY: an OwnedFd keeps its descriptor open, and the same, for as long as it
            // is owned (by the AsyncFd here). We are in a runtime (checked in spawn()).
            let registered =
                unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
            if let Ok(fd) = registered {
                return Waiter::Pidfd(fd);
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pid = pid as u32;
        // Should even the thread fail to start, wait() reports an error (the sender is
        // dropped with it) and the child is left unreaped: no better option remains.
        let _ = std::thread::Builder::new()
            .name("reap-child".into())
            .spawn(move || {
                let _ = tx.send(super::reap_blocking(pid));
            });
        Waiter::Thread(rx)
    }

    /// Block every signal in this thread, clone the child onto `stack_top` sharing our
    /// memory (this thread is suspended until it calls execve or exits), restore the mask.
    /// Returns the child's pid and its pidfd (-1 if the kernel gave none).
    fn clone_child(stack_top: *mut c_void, args: &ChildArgs) -> io::Result<(c_int, c_int)> {
        let all: u64 = !0;
        let mut old: u64 = 0;
        // SAFETY: rt_sigprocmask reads and writes 8-byte signal sets we own. Blocking every
        // signal here means no handler of the agent can run in the child, which shares our
        // memory, before it has reset them.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &all as *const u64,
                &mut old as *mut u64,
                8usize,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut pidfd: c_int = -1;
        // SAFETY: the stack is a mapping of ours nobody else uses (this thread's, and this
        // thread waits); args and everything it points to live on until clone returns,
        // which with CLONE_VFORK is after the child's execve or exit. The child function
        // makes raw system calls only.
        let pid = unsafe {
            libc::clone(
                child_main,
                stack_top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
                args as *const ChildArgs as *mut c_void,
                &mut pidfd as *mut c_int,
            )
        };
        let clone_err = io::Error::last_os_error();
        // SAFETY: as above; restores the mask saved then.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &old as *const u64,
                std::ptr::null_mut::<u64>(),
                8usize,
            )
        };
        if pid <= 0 {
            return Err(clone_err);
        }
        Ok((pid, pidfd))
    }

    /// The kernel's `struct sigaction` on x86_64 and aarch64 (both have sa_restorer).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }

    const KERNEL_SIGACTION_DEFAULT: KernelSigaction = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };

    /// The child. It shares the agent's memory (not its signal handlers, nor its file
    /// descriptor table) and runs with every signal blocked, on its own stack. It makes raw
    /// system calls only: glibc's wrappers may take locks another thread of the agent holds,
    /// and its setuid/setgid/setgroups would signal every thread of the agent to change
    /// their ids too. On failure it stores errno for the parent and ends with
    /// exit_group(127): it is a thread group of its own (no CLONE_THREAD), so exit_group
    /// ends only it, like exit would, and says so.
    extern "C" fn child_main(arg: *mut c_void) -> c_int {
        // SAFETY: arg is the ChildArgs the parent passed to clone; the parent is suspended
        // until we exec or exit, so it is alive and unchanged.
        let args = unsafe { &*(arg as *const ChildArgs) };
        // SAFETY: run_child makes raw system calls with pointers prepared by the parent.
        let err = unsafe { run_child(args) };
        args.err
            .store(if err == 0 { libc::EIO } else { err }, Ordering::Release);
        // SAFETY: exit_group ends this process (the child) only.
        unsafe { libc::syscall(libc::SYS_exit_group, 127 as c_long) };
        127
    }

    /// errno after a failed `libc::syscall` (which stores it where the parent thread keeps
    /// its own: that thread is suspended, and reads it only right after its own calls).
    fn errno() -> c_int {
        // SAFETY: __errno_location returns the calling thread's errno slot, always valid.
        unsafe { *libc::__errno_location() }
    }

    /// A raw system call's result: Ok, or Err(errno).
    fn check(ret: c_long) -> Result<c_long, c_int> {
        if ret < 0 { Err(errno()) } else { Ok(ret) }
    }

    /// Everything the child does up to execve; returns the errno that stopped it.
    ///
    /// # Safety
    /// Only in the child of `clone_child`, with `a` as the parent prepared it.
    unsafe fn run_child(a: &ChildArgs) -> c_int {
        // SAFETY: the caller's contract; each call is documented in steps().
        match unsafe { steps(a) } {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    enum Never {}

    /// # Safety
    /// As for run_child.
    unsafe fn steps(a: &ChildArgs) -> Result<Never, c_int> {
        // Signals: what has a handler in the agent goes back to the default (the handler
        // is agent code); SIGPIPE, SIGINT, SIGTERM and SIGHUP to the default in any case
        // (the agent ignores SIGPIPE); other ignored signals stay ignored, as with fork.
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old = KernelSigaction {
                ..KERNEL_SIGACTION_DEFAULT
            };
            // SAFETY: rt_sigaction writes the current action into `old`, a struct of the
            // kernel's layout; 8 is the kernel's signal set size.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig as c_long,
                    std::ptr::null::<KernelSigaction>(),
                    &mut old as *mut KernelSigaction,
                    8usize,
                )
            };
            if r != 0 {
                continue;
            }
            let always = matches!(
                sig,
                libc::SIGPIPE | libc::SIGINT | libc::SIGTERM | libc::SIGHUP
            );
            if always || (old.handler != libc::SIG_DFL && old.handler != libc::SIG_IGN) {
                // SAFETY: as above, setting the default action.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig as c_long,
                        &KERNEL_SIGACTION_DEFAULT as *const KernelSigaction,
                        std::ptr::null_mut::<KernelSigaction>(),
                        8usize,
                    )
                };
                check(r)?;
            }
        }
        // SAFETY: setsid takes no arguments.
        check(unsafe { libc::syscall(libc::SYS_setsid) })?;
        for (target, fd) in a.fds.iter().enumerate() {
            // SAFETY: dup3 of a descriptor the parent opened for us onto 0, 1 or 2 (the
            // source is >= 3, so never equal; the copy is not close-on-exec).
            check(unsafe { libc::syscall(libc::SYS_dup3, *fd as c_long, target as c_long, 0) })?;
        }
        // SAFETY: cwd is a NUL-terminated string owned by the parent.
        check(unsafe { libc::syscall(libc::SYS_chdir, a.cwd) })?;
        if a.switch {
            // SAFETY: setgroups reads ngroups gid_t from the parent's vector.
            check(unsafe { libc::syscall(libc::SYS_setgroups, a.ngroups, a.groups) })?;
            let (g, u) = (a.gid as c_long, a.uid as c_long);
            // SAFETY: plain integer arguments.
            check(unsafe { libc::syscall(libc::SYS_setresgid, g, g, g) })?;
            // SAFETY: plain integer arguments.
            check(unsafe { libc::syscall(libc::SYS_setresuid, u, u, u) })?;
        }
        let none: u64 = 0;
        // SAFETY: rt_sigprocmask reads an 8-byte set from our stack.
        check(unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &none as *const u64,
                std::ptr::null_mut::<u64>(),
                8usize,
            )
        })?;
        // execvp's search: go on past what is not there (remembering EACCES), stop at any
        // other error; a file without #! runs under /bin/sh.
        let search = a.npaths > 1;
        let mut eacces = false;
        for i in 0..a.npaths {
            // SAFETY: i < npaths, the length of the parent's array.
            let path = unsafe { *a.paths.add(i) };
            // SAFETY: NUL-terminated strings and NULL-terminated arrays from the parent.
            unsafe { libc::syscall(libc::SYS_execve, path, a.argv, a.envp) };
            let mut e = errno();
            if e == libc::ENOEXEC {
                // SAFETY: script_argv has at least 3 slots (sh, path, ..., NULL); slot 1
                // is ours to fill; the strings are the parent's.
                unsafe {
                    *a.script_argv.add(1) = path;
                    libc::syscall(
                        libc::SYS_execve,
                        SH.as_ptr().cast::<c_char>(),
                        a.script_argv,
                        a.envp,
                    );
                }
                e = errno();
            }
            if !search {
                return Err(e);
            }
            match e {
                libc::EACCES => eacces = true,
                libc::ENOENT | libc::ESTALE | libc::ENOTDIR | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => return Err(e),
            }
        }
        Err(if eacces { libc::EACCES } else { libc::ENOENT })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::process::Program;

    fn me() -> Identity {
        Identity::for_uid(nix::unistd::geteuid()).expect("identity")
    }

    fn sh(script: &str) -> Spec {
        Spec {
            program: Program::Exec(PathBuf::from("/bin/sh"), vec!["-c".into(), script.into()]),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: None,
        }
    }

    async fn run(identity: &Identity, spec: &Spec, input: &[u8]) -> (String, String, ExitStatus) {
        let mut child = spawn_vfork(identity, spec).expect("spawn");
        assert!(child.vforked());
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).await.expect("write");
        drop(stdin);
        let mut out = String::new();
        let mut err = String::new();
        let mut so = child.stdout.take().expect("stdout");
        let mut se = child.stderr.take().expect("stderr");
        let (a, b) = tokio::join!(so.read_to_string(&mut out), se.read_to_string(&mut err));
        a.expect("read stdout");
        b.expect("read stderr");
        let status = child.wait().await.expect("wait");
        // Reaped: no zombie left behind.
        assert!(matches!(try_reap(child.id()), Err(e) if e.raw_os_error() == Some(libc::ECHILD)));
        (out, err, status)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipes_and_exit_code() {
        let spec = sh("echo out; echo err >&2; read x; echo $x; exit 3");
        let (out, err, status) = run(&me(), &spec, b"hello\n").await;
        assert_eq!(out, "out\nhello\n");
        assert_eq!(err, "err\n");
        assert_eq!(status.code(), Some(3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missing_program_is_an_error() {
        for program in ["no-such-program-here", "/no/such/program"] {
            let spec = Spec {
                program: Program::Exec(PathBuf::from(program), vec![]),
                env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                cwd: None,
            };
            match spawn_vfork(&me(), &spec) {
                Err(ProcessError::Spawn { source, .. }) => {
                    assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{program}")
                }
                Err(e) => panic!("{program}: unexpected error {e}"),
                Ok(_) => panic!("{program}: started"),
            }
        }
        // Found in PATH but not executable, and a directory that does not exist.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("data");
        std::fs::write(&file, "x").expect("write");
        let spec = Spec {
            program: Program::Exec(file, vec![]),
            env: vec![],
            cwd: None,
        };
        assert!(matches!(
            spawn_vfork(&me(), &spec),
            Err(ProcessError::Spawn { .. })
        ));
        let mut spec = sh("true");
        spec.cwd = Some(dir.path().join("missing"));
        match spawn_vfork(&me(), &spec) {
            Err(ProcessError::Spawn { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT))
            }
            _ => panic!("a missing working directory must fail"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn script_without_shebang_runs_under_sh() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("script");
        std::fs::write(&file, "echo from-script\n").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let spec = Spec {
            program: Program::Exec(PathBuf::from("script"), vec![]),
            env: vec![("PATH".into(), dir.path().to_string_lossy().into_owned())],
            cwd: None,
        };
        let (out, _, status) = run(&me(), &spec, b"").await;
        assert_eq!(out, "from-script\n");
        assert!(status.success());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_by_a_signal() {
        let mut child = spawn_vfork(&me(), &sh("sleep 30")).expect("spawn");
        assert!(child.vforked());
        tokio::time::sleep(Duration::from_millis(50)).await;
        crate::process::signal_group(child.id(), nix::sys::signal::Signal::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("exits")
            .expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        // wait again: the same status.
        assert_eq!(
            child.wait().await.expect("wait").signal(),
            Some(libc::SIGTERM)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cwd_env_session_and_signals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = Spec {
            program: Program::Exec(
                PathBuf::from("sh"),
                vec![
                    "-c".into(),
                    "pwd; echo $FOO; read -r pid comm state ppid pgrp sid rest < /proc/self/stat; \
                     echo $pid $pgrp $sid; grep -E '^Sig(Blk|Ign)' /proc/self/status"
                        .into(),
                ],
            ),
            env: vec![
                ("PATH".into(), "/nonexistent:/usr/bin:/bin".into()),
                ("FOO".into(), "first".into()),
                ("FOO".into(), "bar baz".into()),
            ],
            cwd: Some(dir.path().to_path_buf()),
        };
        let mut child = spawn_vfork(&me(), &spec).expect("spawn");
        let pid = child.id();
        drop(child.stdin.take());
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .await
            .expect("read");
        assert!(child.wait().await.expect("wait").success());
        let lines: Vec<&str> = out.lines().collect();
        let real = std::fs::canonicalize(dir.path()).expect("canonicalize");
        assert_eq!(lines[0], real.to_string_lossy());
        assert_eq!(lines[1], "bar baz");
        assert_eq!(
            lines[2],
            format!("{pid} {pid} {pid}"),
            "own session and group"
        );
        let mask = |name: &str| {
            let line = lines
                .iter()
                .find(|l| l.starts_with(name))
                .expect("status line");
            u64::from_str_radix(line.split_whitespace().nth(1).expect("value"), 16).expect("hex")
        };
        assert_eq!(mask("SigBlk:"), 0, "no signal blocked");
        let bit = |s: libc::c_int| 1u64 << (s - 1);
        let reset = bit(libc::SIGPIPE) | bit(libc::SIGINT) | bit(libc::SIGTERM) | bit(libc::SIGHUP);
        assert_eq!(mask("SigIgn:") & reset, 0, "SIGPIPE and co. not ignored");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn child_inherits_only_its_stdio() {
        let spec = Spec {
            program: Program::Exec(PathBuf::from("ls"), vec!["/proc/self/fd".into()]),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: None,
        };
        let (out, _, status) = run(&me(), &spec, b"").await;
        assert!(status.success());
        // What this test process itself inherited and passes on (from cargo, a shell...).
        let inherited: Vec<i32> = std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|fd| {
                // SAFETY: F_GETFD only reads a descriptor's flags (or fails on a closed one).
                let flags = unsafe { libc::fcntl(*fd, libc::F_GETFD) };
                flags >= 0 && flags & libc::FD_CLOEXEC == 0
            })
            .collect();
        let extra: Vec<i32> = out
            .lines()
            .map(|l| l.parse().expect("fd"))
            .filter(|fd| *fd > 2 && !inherited.contains(fd))
            .collect();
        // Only the directory ls reads: none of the pipes, pidfds and such of the agent.
        assert_eq!(extra.len(), 1, "{out}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_spawns() {
        let identity = me();
        let mut tasks = Vec::new();
        for t in 0..4 {
            let identity = identity.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    let spec = sh(&format!("echo {t}-{i}"));
                    let (out, _, status) = run(&identity, &spec, b"").await;
                    assert_eq!(out, format!("{t}-{i}\n"));
                    assert!(status.success());
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_child_is_reaped() {
        let child = spawn_vfork(&me(), &sh("sleep 0.2")).expect("spawn");
        let pid = child.id();
        drop(child);
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        panic!("child {pid} was not reaped");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn switches_user_when_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: not root");
            return;
        }
        let Ok(Some(user)) = nix::unistd::User::from_name("remote-bench") else {
            eprintln!("skipped: no OS user remote-bench");
            return;
        };
        let identity = Identity::for_uid(user.uid).expect("identity");
        assert!(identity.switch);
        let mut spec = sh("id -un; id -u; id -g; id -G; echo $$ > /dev/null");
        spec.env = identity.base_env();
        let (out, err, status) = run(&identity, &spec, b"").await;
        assert!(status.success(), "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "remote-bench");
        assert_eq!(lines[1], user.uid.to_string());
        assert_eq!(lines[2], user.gid.to_string());
        let mut got: Vec<u32> = lines[3]
            .split_whitespace()
            .map(|g| g.parse().expect("gid"))
            .collect();
        let mut want: Vec<u32> = identity.groups.iter().map(|g| g.as_raw()).collect();
        got.sort_unstable();
        got.dedup();
        want.sort_unstable();
        want.dedup();
        assert_eq!(got, want);
    }
}
