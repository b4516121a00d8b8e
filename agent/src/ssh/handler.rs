//! One SSH connection: authentication against the agent's accounts, and the session-channel
//! requests (pty-req, env, shell, exec, subsystem, window-change, signal) that configure and
//! start a process. Forwarding of ports, agents and X11 is refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use russh::keys::PublicKey;
use russh::server::ChannelOpenHandle;
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet, Pty, Sig};
use tokio::sync::OwnedSemaphorePermit;

use super::Shared;
use super::channel::{self, Running};
use crate::accounts::Account;
use crate::audit::{Event, Transport};
use crate::endpoints::{Caller, CommandSlot, ENDPOINT_ENV, EndpointUse};
use crate::process::{Identity, Input, Program, PtySettings, Spec};
use crate::session::Principal;

/// Most `env` requests honoured per channel, and longest accepted value.
const MAX_ENV: usize = 64;
const MAX_ENV_VALUE: usize = 4096;
/// Most session channels open at once on one connection (sshd's MaxSessions is 10).
const MAX_CHANNELS: usize = 64;

/// Environment variables a client may set, as sshd's usual `AcceptEnv LANG LC_*`.
/// The environment of a process started for a connection from `p` to `l`.
fn connection_env(
    identity: &Identity,
    p: std::net::SocketAddr,
    l: std::net::SocketAddr,
) -> Vec<(String, String)> {
    let mut env = identity.base_env();
    env.push((
        "SSH_CONNECTION".into(),
        format!("{} {} {} {}", p.ip(), p.port(), l.ip(), l.port()),
    ));
    env.push((
        "SSH_CLIENT".into(),
        format!("{} {} {}", p.ip(), p.port(), l.port()),
    ));
    env
}

fn env_allowed(name: &str, extra: &[String]) -> bool {
    matches!(
        name,
        "LANG" | "TERM" | "TZ" | "COLORTERM" | "NO_COLOR" | "LANGUAGE" | ENDPOINT_ENV
    ) || name.starts_with("LC_")
        || extra.iter().any(|e| e == name)
}

struct Login {
    account: Account,
    identity: Identity,
}

#[derive(Default)]
struct ChannelState {
    env: Vec<(String, String)>,
    pty: Option<PtySettings>,
    running: Option<Running>,
    /// The channel's place on its endpoint (`max_connections`, and for an exec
    /// `max_commands_per_user`), held while the channel is open.
    endpoint_use: Option<(EndpointUse, Option<CommandSlot>)>,
}

pub struct Connection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    local: SocketAddr,
    authenticated: Arc<AtomicBool>,
    startup_permit: Option<OwnedSemaphorePermit>,
    failures: u32,
    login: Option<Login>,
    channels: HashMap<ChannelId, ChannelState>,
}

impl Connection {
    pub fn new(
        shared: Arc<Shared>,
        peer: SocketAddr,
        local: SocketAddr,
        authenticated: Arc<AtomicBool>,
        startup_permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        shared.sessions.audit().record(Event::Connection {
            transport: Transport::Ssh,
            peer: peer.to_string(),
            local: local.to_string(),
        });
        Connection {
            shared,
            peer,
            local,
            authenticated,
            startup_permit,
            failures: 0,
            login: None,
            channels: HashMap::new(),
        }
    }

    /// Accept `account`: resolve who its processes run as, or refuse when that is impossible.
    fn accept(&mut self, account: Account, method: &str) -> Auth {
        let (name, kind) = (
            account.name.clone(),
            method.split(' ').next().unwrap_or(method),
        );
        let result = Identity::for_account(&account);
        self.audit_auth(&name, kind, result.as_ref().err().map(|e| e.to_string()));
        match result {
            Ok(identity) => {
                tracing::info!(peer = %self.peer, account = %account.name, os_user = %identity.user, "accepted {method}");
                self.shared.throttle.success(self.peer.ip());
                self.authenticated.store(true, Ordering::Release);
                self.startup_permit = None;
                self.login = Some(Login { account, identity });
                Auth::Accept
            }
            Err(e) => {
                tracing::error!(peer = %self.peer, account = %account.name, "login refused: {e}");
                retry()
            }
        }
    }

    async fn reject(&mut self, user: &str, method: &str, why: &str) -> Auth {
        self.audit_auth(user, method, Some(why.to_string()));
        self.failures += 1;
        let delay = self.shared.throttle.failure(self.peer.ip(), self.failures);
        tracing::warn!(peer = %self.peer, user = %user, attempt = self.failures, "authentication failed: {why}");
        tokio::time::sleep(delay).await;
        retry()
    }

    /// An authentication attempt for the audit log (never the secret).
    fn audit_auth(&self, account: &str, method: &str, failure: Option<String>) {
        self.shared.sessions.audit().record(Event::Auth {
            transport: Transport::Ssh,
            peer: self.peer.to_string(),
            account: account.chars().take(256).collect(),
            method: method.to_string(),
            success: failure.is_none(),
            reason: failure,
        });
    }

    /// Start `program` on `id`; replies success or failure on the channel.
    async fn start(
        &mut self,
        id: ChannelId,
        program: Program,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(login) = self.login.as_ref() else {
            return session.channel_failure(id);
        };
        let Some(state) = self.channels.get_mut(&id) else {
            return session.channel_failure(id);
        };
        if state.running.is_some() {
            tracing::debug!(peer = %self.peer, "second shell/exec/subsystem on one channel refused");
            return session.channel_failure(id);
        }
        // The endpoint (ssh -o SetEnv=REMOTE_ENDPOINT=NAME; default `default`) decides
        // whether this may run, and how.
        let requested = state
            .env
            .iter()
            .find(|(k, _)| k == ENDPOINT_ENV)
            .map_or("", |(_, v)| v.as_str());
        let caller = Caller {
            name: &login.account.name,
            admin: login.account.admin,
            groups: &login.account.groups,
        };
        let is_exec = matches!(program, Program::ShellCommand(_));
        let planned = self
            .shared
            .sessions
            .defaults()
            .endpoints
            .admit(requested, caller)
            .and_then(|e| {
                let program = match program {
                    Program::ShellCommand(line) => e.command_line(&line)?,
                    Program::LoginShell => e.interactive()?,
                    // SFTP: only where a shell would be allowed.
                    other => e.interactive().map(|_| other)?,
                };
                let connection = e.connect()?;
                let command = if is_exec {
                    Some(e.start_command(&login.account.name)?)
                } else {
                    None
                };
                Ok((e, program, (connection, command)))
            });
        let (endpoint, program, endpoint_use) = match planned {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(peer = %self.peer, account = %login.account.name, "refused: {e}");
                self.shared.sessions.audit().record(Event::Refused {
                    account: login.account.name.clone(),
                    endpoint: if requested.is_empty() {
                        crate::endpoints::DEFAULT_ENDPOINT.to_string()
                    } else {
                        requested.chars().take(64).collect()
                    },
                    transport: Transport::Ssh,
                    reason: e.to_string(),
                    peer: Some(self.peer.to_string()),
                });
                let handle = session.handle();
                let message = format!("remote-agent: {e}\r\n");
                tokio::spawn(async move {
                    let _ = handle
                        .extended_data(id, 1, bytes::Bytes::from(message))
                        .await;
                    let _ = handle.eof(id).await;
                    let _ = handle.exit_status_request(id, 1).await;
                    let _ = handle.close(id).await;
                });
                return session.channel_success(id);
            }
        };
        let identity = match run_as_identity(&login.account.name, &login.identity, &endpoint).await
        {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(peer = %self.peer, account = %login.account.name, "{e}");
                let _ = session.extended_data(id, 1, format!("remote-agent: {e}\r\n"));
                return session.channel_failure(id);
            }
        };
        let mut env = connection_env(&identity, self.peer, self.local);
        env.extend(endpoint.env.iter().cloned());
        env.extend(state.env.iter().filter(|(k, _)| k != ENDPOINT_ENV).cloned());
        let spec = Spec {
            program,
            env,
            cwd: endpoint.workdir.clone(),
        };
        // Plain SSH channels (ssh, scp, sftp) are bounded only when the endpoint sets its
        // quotas explicitly: a 50 MB default would break `ssh host cat big-file`, which
        // sshd users rightly expect to work. Commands in sessions always have them.
        let quota = (is_exec
            && (endpoint.explicit_quotas || endpoint.timeouts.operation.is_some()))
        .then(|| {
            let unbounded = !endpoint.explicit_quotas;
            let mut q = channel::Quota::new(
                if unbounded {
                    u64::MAX
                } else {
                    endpoint.limits.max_received_bytes()
                },
                endpoint.output_quota().to_string(),
                if unbounded {
                    u64::MAX
                } else {
                    endpoint.limits.max_input_bytes()
                },
                endpoint.input_quota().to_string(),
            );
            q.deadline = endpoint.timeouts.operation.map(|d| {
                let why = crate::endpoints::EndpointError::OperationTimeout {
                    endpoint: endpoint.name.clone(),
                    secs: d.as_secs(),
                };
                (d, why.to_string())
            });
            q
        });
        let audit = channel::ExecAudit {
            audit: self.shared.sessions.audit().clone(),
            account: login.account.name.clone(),
            endpoint: endpoint.name.clone(),
            peer: self.peer.to_string(),
            command: match &spec.program {
                Program::ShellCommand(line) => line.clone(),
                Program::Exec(p, args) => std::iter::once(p.display().to_string())
                    .chain(args.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(" "),
                Program::LoginShell => String::new(),
            },
        };
        match channel::start(
            session.handle(),
            id,
            &identity,
            &spec,
            state.pty.as_ref(),
            self.shared.shutdown.clone(),
            quota,
            audit,
        ) {
            Ok(running) => {
                state.running = Some(running);
                state.endpoint_use = Some(endpoint_use);
                session.channel_success(id)
            }
            Err(e) => {
                tracing::error!(peer = %self.peer, account = %login.account.name, "{e}");
                let _ = session.extended_data(id, 1, format!("remote-agent: {e}\r\n"));
                session.channel_failure(id)
            }
        }
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(retry())
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        let account = self.shared.accounts.get(user);
        let hash = account.as_ref().and_then(|a| a.password_hash.clone());
        let ok = self.shared.passwords.verify(password, hash).await;
        match account {
            Some(account) if ok => Ok(self.accept(account, "password")),
            Some(_) => Ok(self.reject(user, "password", "wrong password").await),
            None => Ok(self.reject(user, "password", "no such account").await),
        }
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // A probe for a key we would not accept is not counted as a failure (as in sshd).
        let known = self
            .shared
            .accounts
            .get(user)
            .is_some_and(|a| a.has_key(offer.public_key));
        Ok(if known { Auth::Accept } else { retry() })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let public: &PublicKey = key.public_key;
        match self.shared.accounts.get(user) {
            Some(account) if account.has_key(public) => {
                let fp = public.fingerprint(Default::default());
                Ok(self.accept(account, &format!("publickey {fp}")))
            }
            _ => Ok(self
                .reject(user, "publickey", "key not authorized for this account")
                .await),
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Everything arrives through the handler callbacks; the channel object is not used.
        let id = channel.id();
        drop(channel);
        if self.login.is_none() {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
        } else if self.channels.len() >= MAX_CHANNELS {
            tracing::warn!(peer = %self.peer, "session channel refused: {MAX_CHANNELS} already open");
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
        } else {
            self.channels.insert(id, ChannelState::default());
            reply.accept().await;
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        drop(channel);
        tracing::info!(peer = %self.peer, "port forwarding to {host}:{port} refused: forwarding is not enabled on this agent");
        reply
            .reject(ChannelOpenFailure::Other {
                code: 1,
                reason: "port forwarding is disabled on this remote-agent".into(),
            })
            .await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        tracing::info!(peer = %self.peer, "remote port forwarding {address}:{port} refused: not enabled on this agent");
        Ok(false)
    }

    async fn agent_request(
        &mut self,
        _id: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        tracing::info!(peer = %self.peer, "agent forwarding refused: not enabled on this agent");
        Ok(false)
    }

    async fn x11_request(
        &mut self,
        id: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(id)
    }

    async fn pty_request(
        &mut self,
        id: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(state) = self.channels.get_mut(&id).filter(|s| s.running.is_none()) else {
            return session.channel_failure(id);
        };
        let term =
            if term.is_empty() || term.len() > 64 || !term.chars().all(|c| c.is_ascii_graphic()) {
                "xterm".to_string()
            } else {
                term.to_string()
            };
        state.pty = Some(PtySettings {
            term,
            rows: clamp_dim(row_height, 24),
            cols: clamp_dim(col_width, 80),
            modes: modes.to_vec(),
        });
        session.channel_success(id)
    }

    async fn env_request(
        &mut self,
        id: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let extra = &self.shared.settings.accept_env;
        let Some(state) = self.channels.get_mut(&id).filter(|s| s.running.is_none()) else {
            return session.channel_failure(id);
        };
        if !env_allowed(name, extra)
            || value.len() > MAX_ENV_VALUE
            || value.contains('\0')
            || state.env.len() >= MAX_ENV
        {
            tracing::debug!(peer = %self.peer, "env {name} refused");
            return session.channel_failure(id);
        }
        state.env.retain(|(k, _)| k != name);
        state.env.push((name.to_string(), value.to_string()));
        session.channel_success(id)
    }

    async fn shell_request(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(id, Program::LoginShell, session).await
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let line = String::from_utf8_lossy(data).into_owned();
        if let Some(login) = &self.login {
            // Command lines can carry secrets: only at debug level (the audit log is separate).
            tracing::debug!(peer = %self.peer, account = %login.account.name, "exec {:?}", truncate(&line, 200));
        }
        self.start(id, Program::ShellCommand(line), session).await
    }

    async fn subsystem_request(
        &mut self,
        id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match name {
            "remote" => {
                let Some(login) = &self.login else {
                    return session.channel_failure(id);
                };
                let principal = Principal {
                    name: login.account.name.clone(),
                    admin: login.account.admin,
                    groups: login.account.groups.clone(),
                    identity: login.identity.clone(),
                    transport: "ssh",
                };
                let host = self.shared.sessions.clone();
                let Some(state) = self.channels.get_mut(&id).filter(|s| s.running.is_none()) else {
                    return session.channel_failure(id);
                };
                state.running = Some(channel::start_service(
                    session.handle(),
                    id,
                    move |stream| crate::wire::serve(host, principal, stream),
                ));
                session.channel_success(id)
            }
            "sftp" => {
                // Like sshd's sftp-server: a separate process running as the user.
                let exe = self.shared.self_exe.clone();
                if let Some(state) = self.channels.get_mut(&id) {
                    state.pty = None;
                }
                self.start(id, Program::Exec(exe, vec!["sftp-server".into()]), session)
                    .await
            }
            other => {
                tracing::info!(peer = %self.peer, "unknown subsystem {other:?} refused");
                session.channel_failure(id)
            }
        }
    }

    async fn window_change_request(
        &mut self,
        id: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(state) = self.channels.get_mut(&id) {
            let (rows, cols) = (clamp_dim(row_height, 24), clamp_dim(col_width, 80));
            if let Some(pty) = state.pty.as_mut() {
                pty.rows = rows;
                pty.cols = cols;
            }
            if let Some(running) = &state.running {
                running.send(Input::Resize { rows, cols }).await;
            }
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        id: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(running) = self.channels.get(&id).and_then(|s| s.running.as_ref())
            && !running.signal(&signal)
        {
            tracing::debug!(peer = %self.peer, "signal {signal:?} not delivered");
        }
        Ok(())
    }

    async fn data(
        &mut self,
        id: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(running) = self.channels.get(&id).and_then(|s| s.running.as_ref()) {
            running
                .send(Input::Data(bytes::Bytes::copy_from_slice(data)))
                .await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(running) = self.channels.get(&id).and_then(|s| s.running.as_ref()) {
            running.send(Input::Eof).await;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&id);
        Ok(())
    }
}

/// A refusal that leaves both methods open for another try (as sshd does, up to
/// max_auth_tries); russh would otherwise drop the method that just failed.
fn retry() -> Auth {
    Auth::Reject {
        proceed_with_methods: Some(MethodSet::from(
            &[MethodKind::PublicKey, MethodKind::Password][..],
        )),
        partial_success: false,
    }
}

fn clamp_dim(v: u32, default: u16) -> u16 {
    match v {
        0 => default,
        v => v.min(u16::MAX as u32) as u16,
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The identity a channel's process runs as on `endpoint`. With `run_as`, the account
/// lookups (which a slow name service can hold up) run on a blocking thread within the
/// endpoint's open timeout.
async fn run_as_identity(
    account: &str,
    identity: &Identity,
    endpoint: &Arc<crate::endpoints::Endpoint>,
) -> Result<Identity, String> {
    if endpoint.run_as.is_none() {
        return crate::session::endpoint_identity(account, identity, endpoint)
            .map_err(|e| e.to_string());
    }
    let (limit, timed_out) = endpoint.open_limit(None);
    let lookup = {
        let (account, identity, endpoint) =
            (account.to_string(), identity.clone(), endpoint.clone());
        tokio::task::spawn_blocking(move || {
            crate::session::endpoint_identity(&account, &identity, &endpoint)
        })
    };
    match tokio::time::timeout(limit, lookup).await {
        Ok(Ok(result)) => result.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(format!("the account lookup failed inside the agent ({e})")),
        Err(_) => Err(timed_out.to_string()),
    }
}
