//! The `remote-agent` command line: `run` (the default), `quickstart`, `user add|list|rm`,
//! and the internal `sftp-server` that the SSH server starts as the logged-in user.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use remote_agent::accounts::{self, Account, AccountDb, AccountStore};
use remote_agent::config::{AgentConfig, FileConfig, Overrides};
use remote_agent::session::SessionHost;
use remote_agent::{hostkey, paths};

#[derive(Parser)]
#[command(
    name = "remote-agent",
    version,
    about = "The remote agent: an SSH server for running commands on this host",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (the default when no command is given).
    Run(RunArgs),
    /// Start an agent on this machine for a first try: loopback only, with an account for
    /// you that logs in with your SSH key; prints what to type next.
    Quickstart(QuickstartArgs),
    /// Manage the agent's accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage endpoints (session configurations): who may connect, what they may run,
    /// quotas and timeouts. Changes apply when the agent starts next.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// Set up this host once (like Enable-PSRemoting): config with listeners and the default
    /// endpoint, host key, HTTPS certificate, systemd unit, and with --sshd-subsystem sshd's
    /// `Subsystem remote` line. Safe to re-run: it never overwrites a changed file.
    Enable(remote_agent::enable::EnableArgs),
    /// Bridge stdin/stdout to the running agent's session protocol: the command sshd runs
    /// for `Subsystem remote /usr/bin/remote-agent subsystem` in sshd_config.
    Subsystem {
        /// The agent's local socket (default: /run/remote-agent/agent.sock as root,
        /// $XDG_RUNTIME_DIR/remote-agent/agent.sock otherwise).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Serve SFTP on stdin/stdout (started by the agent's SSH server; not for direct use).
    #[command(hide = true)]
    SftpServer,
}

#[derive(Args, Default, Clone)]
struct StateArgs {
    /// Configuration file (TOML). Default: /etc/remote-agent/agent.toml as root,
    /// $XDG_CONFIG_HOME/remote-agent/agent.toml otherwise, when it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (host key, accounts). Default: /var/lib/remote-agent as root,
    /// $XDG_STATE_HOME/remote-agent otherwise.
    #[arg(long, value_name = "DIR", env = "REMOTE_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args, Default, Clone)]
struct RunArgs {
    #[command(flatten)]
    state: StateArgs,
    /// SSH listen address, HOST:PORT, or 'off' (default 0.0.0.0:2222).
    #[arg(long, value_name = "ADDR|off")]
    ssh: Option<String>,
    /// Name of this agent (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Local socket for subsystem mode, or 'off'.
    #[arg(long, value_name = "PATH|off")]
    socket: Option<String>,
    /// WinRM over HTTP listen address, HOST:PORT, or 'off' (default 0.0.0.0:5985).
    #[arg(long, value_name = "ADDR|off")]
    winrm_http: Option<String>,
    /// WinRM over HTTPS listen address, HOST:PORT, or 'off' (default 0.0.0.0:5986).
    #[arg(long, value_name = "ADDR|off")]
    winrm_https: Option<String>,
    /// Serve WinRM requests that are neither on HTTPS nor message-encrypted (Basic over
    /// plain HTTP): only on networks where nobody can listen in.
    #[arg(long)]
    allow_unencrypted: bool,
    /// Dial out to this relay, HOST[:PORT] (default port 7443), or 'off'.
    #[arg(long, value_name = "URL")]
    relay: Option<String>,
    /// One-time join token from `remote-relay token create --agent` (first start only).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "REMOTE_JOIN_TOKEN",
        hide_env_values = true
    )]
    join_token: Option<String>,
    /// The relay's certificate fingerprint, SHA256:… (default: pinned on first contact).
    #[arg(long, value_name = "SHA256:…")]
    relay_fingerprint: Option<String>,
}

#[derive(Args)]
struct QuickstartArgs {
    #[command(flatten)]
    state: StateArgs,
    /// SSH listen address (loopback by default).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:2222")]
    ssh: String,
    /// WinRM over HTTP (loopback by default), or 'off'.
    #[arg(long, value_name = "ADDR|off", default_value = "127.0.0.1:5985")]
    winrm_http: String,
    /// WinRM over HTTPS (loopback by default), or 'off'.
    #[arg(long, value_name = "ADDR|off", default_value = "127.0.0.1:5986")]
    winrm_https: String,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add an account.
    Add {
        name: String,
        /// Read the account's password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Do not store the NT hash that NTLM/Negotiate logins over WinRM need; the account can
        /// then use WinRM only with Basic auth over HTTPS.
        #[arg(long)]
        no_ntlm: bool,
        /// Authorized SSH public keys (authorized_keys format); repeatable.
        #[arg(long = "authorized-key", value_name = "FILE")]
        authorized_keys: Vec<PathBuf>,
        /// Make the account an administrator.
        #[arg(long)]
        admin: bool,
        /// OS user the account's commands run as (needs the agent to run as root).
        #[arg(long, value_name = "OS_USER")]
        run_as: Option<String>,
        /// Groups the account belongs to (for endpoint rules); repeatable.
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// List accounts.
    List {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Remove an account; takes effect for new connections at once.
    Rm {
        name: String,
        #[command(flatten)]
        state: StateArgs,
    },
}

#[derive(Subcommand)]
enum EndpointCommand {
    /// List endpoints (the built-in `default` admits admins only).
    List {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Add an endpoint: `endpoint add jea users=carol commands=uptime,df`.
    Add {
        name: String,
        /// KEY=VALUE settings: users, groups (lists, comma-separated; `admins` is every
        /// admin), run (shell|commands), commands, run_as, workdir, env.NAME,
        /// max_received_mb_per_command, max_input_mb_per_command, max_sessions_per_user,
        /// max_commands_per_user, max_connections, idle_timeout_secs,
        /// operation_timeout_secs, buffering (block|drop|spill).
        #[arg(value_name = "KEY=VALUE")]
        settings: Vec<String>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Change settings of an endpoint (`KEY=` removes one).
    Set {
        name: String,
        #[arg(value_name = "KEY=VALUE", required = true)]
        settings: Vec<String>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Remove an endpoint (removing `default` brings back the built-in one).
    Rm {
        name: String,
        #[command(flatten)]
        state: StateArgs,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run(cli.run));
    let default_log = match command {
        Command::Run(_) | Command::Quickstart(_) => "info",
        // sftp-server's and the subsystem's stderr go to the SSH client: stay quiet.
        Command::SftpServer | Command::Subsystem { .. } => "off",
        Command::User(_) | Command::Endpoint(_) | Command::Enable(_) => "warn",
    };
    init_logging(default_log);
    match dispatch(command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remote-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REMOTE_AGENT_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run(args) => {
            let mut config = load_config(
                &args.state,
                &Overrides {
                    ssh: args.ssh.clone(),
                    name: args.name.clone(),
                    winrm_http: args.winrm_http.clone(),
                    winrm_https: args.winrm_https.clone(),
                    allow_unencrypted: args.allow_unencrypted,
                    relay: args.relay.clone(),
                    relay_fingerprint: args.relay_fingerprint.clone(),
                    join_token: args.join_token.clone(),
                    ..Default::default()
                },
            )?;
            if let Some(socket) = &args.socket {
                config.socket =
                    (!socket.eq_ignore_ascii_case("off")).then(|| PathBuf::from(socket));
            }
            runtime()?.block_on(run(config, None))
        }
        Command::Subsystem { socket } => {
            let socket = socket.unwrap_or_else(paths::default_socket);
            runtime()?
                .block_on(remote_agent::local::bridge_stdio(&socket))
                .context("remote-agent subsystem")
        }
        Command::Quickstart(args) => quickstart(args),
        Command::User(cmd) => user(cmd),
        Command::Endpoint(cmd) => endpoint(cmd),
        Command::Enable(args) => remote_agent::enable::run(&args)
            .map(drop)
            .map_err(Into::into),
        Command::SftpServer => runtime()?
            .block_on(remote_agent::sftp::serve_stdio())
            .context("sftp-server"),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The agent's config: the file (--config, or the default location if it exists) under the
/// flags. Its endpoints follow later changes of that file (`endpoint add|set|rm`).
fn load_config(state: &StateArgs, flags: &Overrides) -> Result<AgentConfig> {
    let path = config_path(state);
    let file = if state.config.is_some() || path.exists() {
        FileConfig::load(&path)?
    } else {
        FileConfig::default()
    };
    let mut config = file.resolve(&Overrides {
        state_dir: state.state_dir.clone(),
        ..flags.clone()
    })?;
    config.sessions.endpoints = config.sessions.endpoints.clone().watching(path);
    Ok(config)
}

fn state_dir(state: &StateArgs) -> Result<PathBuf> {
    let flags = Overrides {
        ssh: Some("off".into()),
        winrm_http: Some("off".into()),
        winrm_https: Some("off".into()),
        ..Default::default()
    };
    Ok(load_config(state, &flags)?.state_dir)
}

/// Printed once the listener is up: the bound address and the host key fingerprint.
type Banner = Box<dyn FnOnce(&Listening) + Send>;

/// Where the agent listens, for the quickstart banner.
struct Listening {
    ssh: std::net::SocketAddr,
    host_key: String,
    /// WinRM over HTTP, and over HTTPS with the certificate's fingerprint.
    winrm_http: Option<std::net::SocketAddr>,
    winrm_https: Option<(std::net::SocketAddr, String)>,
}

/// Run the agent until SIGTERM or SIGINT. `banner` is printed once the listener is up.
async fn run(config: AgentConfig, banner: Option<Banner>) -> Result<()> {
    paths::ensure_private_dir(&config.state_dir)
        .with_context(|| format!("cannot create state dir {}", config.state_dir.display()))?;
    let (key, fresh) = hostkey::load_or_generate(&config.state_dir)?;
    let fingerprint = hostkey::fingerprint(&key);
    if fresh {
        tracing::info!("generated host key {fingerprint}");
    }
    let store = AccountStore::new(&config.state_dir);
    let db = AccountDb::new(store.clone());
    if db.count() == 0 {
        tracing::warn!(
            "no accounts in {}: nobody can log in. Add one with `remote-agent user add NAME --authorized-key ~/.ssh/id_ed25519.pub`",
            store.path().display()
        );
    }
    let shutdown = CancellationToken::new();
    if config.ssh.is_none()
        && config.socket.is_none()
        && config.winrm.is_none()
        && config.relay.is_none()
    {
        bail!(
            "no listener is enabled (--ssh off, --socket off, --winrm-http off, --winrm-https off) and no --relay: nothing to serve. Give --ssh HOST:PORT"
        );
    }
    let sessions_root = config.state_dir.join("sessions");
    prepare_sessions_root(&config.state_dir, &sessions_root)?;
    let audit = remote_agent::audit::Audit::open_with(&config.state_dir, &config.audit)
        .context("cannot open the audit log")?;
    let sessions = SessionHost::with_audit(config.sessions.clone(), sessions_root, audit.clone());
    // Subsystem mode alone (--ssh off) is valid: the host's own sshd is the way in.
    let server = match config.ssh.clone() {
        Some(ssh) => Some(
            remote_agent::ssh::SshServer::bind(ssh, key, db, sessions.clone(), shutdown.clone())
                .await?,
        ),
        None => None,
    };
    let local = match &config.socket {
        Some(path) => {
            let listener = remote_agent::local::LocalListener::bind(path)?;
            eprintln!("remote-agent: local socket {}", path.display());
            Some(tokio::spawn(
                listener.run(sessions.clone(), shutdown.clone()),
            ))
        }
        None => None,
    };
    let (winrm, winrm_bound) = match config.winrm.clone() {
        Some(settings) => {
            let (task, bound) =
                start_winrm(&config, settings, &store, &sessions, &shutdown).await?;
            (Some(task), Some(bound))
        }
        None => (None, None),
    };
    let reaper = tokio::spawn(sessions.clone().run_reaper(shutdown.clone()));
    let mut link = config.relay.clone().map(|settings| {
        eprintln!("remote-agent: dialing out to relay {}", settings.addr);
        let join_token = settings.join_token.clone();
        tokio::spawn(
            remote_agent::relay_link::RelayLink {
                settings,
                name: config.name.clone(),
                state_dir: config.state_dir.clone(),
                join_token,
                host: sessions.clone(),
                accounts: AccountDb::new(store.clone()),
                shutdown: shutdown.clone(),
            }
            .run(),
        )
    });
    tracing::info!(name = %config.name, state_dir = %config.state_dir.display(), "remote-agent started");
    let server_task = match server {
        Some(server) => {
            let addr = server.local_addr()?;
            eprintln!("remote-agent: ssh listening on {addr} (host key {fingerprint})");
            if let Some(banner) = banner {
                banner(&Listening {
                    ssh: addr,
                    host_key: fingerprint.clone(),
                    winrm_http: winrm_bound.as_ref().and_then(|b| b.http),
                    winrm_https: winrm_bound
                        .as_ref()
                        .and_then(|b| b.https.zip(b.fingerprint.clone())),
                });
            }
            Some(tokio::spawn(server.run()))
        }
        None => None,
    };
    let link_failed = tokio::select! {
        r = wait_for_signal() => { r?; None }
        Ok(Err(e)) = async { match link.as_mut() { Some(l) => l.await, None => std::future::pending().await } } => Some(e),
    };
    tracing::info!("shutting down");
    shutdown.cancel();
    if let Some(e) = link_failed {
        bail!(e);
    }
    if let Some(link) = link {
        let _ = link.await;
    }
    if let Some(task) = server_task {
        task.await.context("ssh server task failed")?;
    }
    if let Some(local) = local {
        let _ = local.await;
    }
    if let Some(winrm) = winrm {
        let _ = winrm.await;
    }
    let _ = reaper.await;
    // Sessions closed by the reaper are in the audit log before the process ends.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), audit.flush()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Commands sessions keep per-session state in `root/ID`, owned by the session's user. When
/// the agent runs as root, those users must be able to reach it: the state dir and `root`
/// become traversable but not listable (0711); every file in them stays 0600 or 0700.
fn prepare_sessions_root(state_dir: &Path, root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root)
        .with_context(|| format!("cannot create the sessions dir {}", root.display()))?;
    let mode = if nix::unistd::geteuid().is_root() {
        0o711
    } else {
        0o700
    };
    for dir in [state_dir, root] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the permissions of {}", dir.display()))?;
    }
    Ok(())
}

/// Bind the WinRM listeners (generating the TLS certificate on first start) and serve them.
async fn start_winrm(
    config: &AgentConfig,
    settings: remote_agent::config::WinrmSettings,
    store: &AccountStore,
    sessions: &std::sync::Arc<SessionHost>,
    shutdown: &CancellationToken,
) -> Result<(
    tokio::task::JoinHandle<()>,
    remote_agent::winrm::http::Bound,
)> {
    use remote_agent::winrm::{http::WinrmServer, shell, tls};
    let identity = match settings.https {
        Some(_) => {
            let id = tls::load_or_generate(
                &config.state_dir,
                settings.cert_file.as_deref(),
                settings.key_file.as_deref(),
                &config.name,
            )?;
            if id.generated {
                tracing::info!(
                    "generated WinRM TLS certificate {} ({})",
                    id.cert_path.display(),
                    id.fingerprint
                );
            }
            Some(id)
        }
        None => None,
    };
    let shells = shell::Shells::new(
        sessions.clone(),
        shell::ShellSettings {
            max_shells_per_user: settings.max_shells_per_user,
            max_commands_per_shell: settings.max_commands_per_shell,
            idle_timeout: settings.idle_timeout,
            powershell: settings.powershell.clone(),
            machine: config.name.clone(),
            max_envelope_bytes: settings.max_envelope_bytes,
            journal_bytes: settings.journal_bytes,
        },
        shutdown.clone(),
    );
    let (server, bound) = WinrmServer::bind(
        settings,
        identity,
        AccountDb::new(store.clone()),
        shells,
        shutdown.clone(),
    )
    .await?;
    if let Some(addr) = bound.http {
        eprintln!("remote-agent: winrm http listening on {addr}");
    }
    if let (Some(addr), Some(fp)) = (bound.https, &bound.fingerprint) {
        eprintln!("remote-agent: winrm https listening on {addr} (certificate {fp})");
    }
    Ok((tokio::spawn(server.run()), bound))
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn quickstart(args: QuickstartArgs) -> Result<()> {
    let config = load_config(
        &args.state,
        &Overrides {
            ssh: Some(args.ssh.clone()),
            winrm_http: Some(args.winrm_http.clone()),
            winrm_https: Some(args.winrm_https.clone()),
            ..Default::default()
        },
    )?;
    paths::ensure_private_dir(&config.state_dir)?;
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .context("cannot find the name of the current OS user")?;
    accounts::validate_name(&me).with_context(|| {
        format!("your user name '{me}' cannot be an account name; add one with `remote-agent user add NAME`")
    })?;
    let store = AccountStore::new(&config.state_dir);
    let key_file = config.state_dir.join("quickstart_ed25519");
    let mut identity_hint = String::new();
    if !store.load()?.iter().any(|a| a.name == me) {
        let mut keys = Vec::new();
        let ssh_dir = paths::home_dir().join(".ssh");
        for name in ["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"] {
            if let Ok(text) = std::fs::read_to_string(ssh_dir.join(name)) {
                keys.extend(accounts::parse_authorized_keys(&text, name).unwrap_or_default());
            }
        }
        if keys.is_empty() {
            keys.push(generate_client_key(&key_file)?);
        }
        store.add(Account {
            name: me.clone(),
            password_hash: None,
            nt_hash: None,
            authorized_keys: keys,
            admin: true,
            groups: Vec::new(),
            run_as: None,
        })?;
        eprintln!("remote-agent: created admin account '{me}' (logs in with your SSH key)");
    }
    let mut identity_flag = String::new();
    if key_file.exists() {
        identity_hint = format!(" -i {}", key_file.display());
        identity_flag = format!(" --identity {}", key_file.display());
    }
    let banner = Box::new(move |l: &Listening| {
        let (addr, fp) = (l.ssh, &l.host_key);
        let port = addr.port();
        let host = addr.ip();
        println!();
        println!("remote-agent is running on {addr} (host key {fp}). Next, in another terminal:");
        println!("  ssh -p {port}{identity_hint} {me}@{host} 'uname -a'      # run a command");
        println!("  ssh -p {port}{identity_hint} {me}@{host}                 # interactive shell");
        println!("  sftp -P {port}{identity_hint} {me}@{host}                # file transfer");
        println!(
            "  remote{identity_flag} session new {me}@{host}:{port}   # a persistent session (target/release/remote)"
        );
        if l.winrm_http.is_some() || l.winrm_https.is_some() {
            let mut urls = Vec::new();
            if let Some(a) = l.winrm_http {
                urls.push(format!("http://{a}/wsman"));
            }
            if let Some((a, cert)) = &l.winrm_https {
                urls.push(format!("https://{a}/wsman (certificate {cert})"));
            }
            println!(
                "WinRM (pywinrm, pypsrp, Ansible, `remote run winrm://…`): {}",
                urls.join(", ")
            );
            println!(
                "  WinRM logs in with a password: echo PASSWORD | remote-agent user add NAME --password-stdin"
            );
            if let Some((a, cert)) = &l.winrm_https {
                println!(
                    "  remote --fingerprint {cert} run winrms://NAME@{a} -- uptime   # this certificate, pinned"
                );
            }
        }
        println!(
            "Accounts: remote-agent user list | user add NAME --authorized-key FILE. Ctrl+C stops the agent."
        );
        println!();
    });
    runtime()?.block_on(run(config, Some(banner)))
}

fn generate_client_key(path: &Path) -> Result<String> {
    use russh::keys::ssh_key::LineEnding;
    if !path.exists() {
        let key =
            russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
                .map_err(|e| anyhow::anyhow!("cannot generate a key: {e}"))?;
        let text = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| anyhow::anyhow!("cannot encode a key: {e}"))?;
        paths::write_private_atomic(path, text.as_bytes())?;
    }
    let text = std::fs::read_to_string(path)?;
    let key = russh::keys::PrivateKey::from_openssh(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    key.public_key()
        .to_openssh()
        .map_err(|e| anyhow::anyhow!("cannot encode a key: {e}"))
}

/// The config file `endpoint` edits: --config, or the default location.
fn config_path(state: &StateArgs) -> PathBuf {
    state
        .config
        .clone()
        .unwrap_or_else(paths::default_config_file)
}

/// What `endpoint add|set|rm` say of a running agent (it re-reads its endpoints).
const APPLIES: &str = "a running agent applies it to new sessions and connections";

fn endpoint(cmd: EndpointCommand) -> Result<()> {
    use remote_agent::endpoint_config as ec;
    match cmd {
        EndpointCommand::List { state } => {
            print!("{}", ec::render(&ec::list(&config_path(&state))?));
        }
        EndpointCommand::Add {
            name,
            settings,
            state,
        } => {
            let path = config_path(&state);
            ec::add(&path, &name, &settings)?;
            eprintln!(
                "remote-agent: added endpoint '{name}' to {}; {APPLIES}",
                path.display()
            );
        }
        EndpointCommand::Set {
            name,
            settings,
            state,
        } => {
            let path = config_path(&state);
            ec::set(&path, &name, &settings)?;
            eprintln!(
                "remote-agent: changed endpoint '{name}' in {}; {APPLIES}",
                path.display()
            );
        }
        EndpointCommand::Rm { name, state } => {
            let path = config_path(&state);
            let builtin = ec::rm(&path, &name)?;
            let note = if builtin {
                " (the built-in default, admins only, applies again)"
            } else {
                ""
            };
            eprintln!(
                "remote-agent: removed endpoint '{name}' from {}{note}; {APPLIES}",
                path.display()
            );
        }
    }
    Ok(())
}

fn user(cmd: UserCommand) -> Result<()> {
    match cmd {
        UserCommand::Add {
            name,
            password_stdin,
            no_ntlm,
            authorized_keys,
            admin,
            run_as,
            groups,
            state,
        } => {
            accounts::validate_name(&name)?;
            let store = AccountStore::new(&state_dir(&state)?);
            let mut keys = Vec::new();
            for file in &authorized_keys {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read key file {}", file.display()))?;
                let parsed = accounts::parse_authorized_keys(&text, &file.display().to_string())?;
                if parsed.is_empty() {
                    bail!("{} holds no public key", file.display());
                }
                keys.extend(parsed);
            }
            let (password_hash, nt_hash) = if password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .context("cannot read the password from standard input")?;
                let password = line.trim_end_matches(['\n', '\r']);
                if password.is_empty() {
                    bail!(
                        "empty password on standard input: give a password, or use --authorized-key only"
                    );
                }
                let nt_hash = (!no_ntlm).then(|| accounts::nt_hash_hex(password));
                (Some(accounts::hash_password(password)?), nt_hash)
            } else {
                (None, None)
            };
            if password_hash.is_none() && keys.is_empty() {
                bail!(
                    "account '{name}' would have no way to log in: give --password-stdin and/or --authorized-key FILE"
                );
            }
            if let Some(os_user) = &run_as {
                if nix::unistd::User::from_name(os_user)
                    .ok()
                    .flatten()
                    .is_none()
                {
                    bail!(
                        "OS user '{os_user}' (--run-as) does not exist on this host: create it first (useradd {os_user})"
                    );
                }
                if !nix::unistd::geteuid().is_root() {
                    eprintln!("note: --run-as takes effect only when the agent runs as root");
                }
            } else if nix::unistd::geteuid().is_root() {
                eprintln!(
                    "note: '{name}' has no --run-as: its commands will run as the agent's user (root)"
                );
            }
            store.add(Account {
                name: name.clone(),
                password_hash,
                nt_hash,
                authorized_keys: keys,
                admin,
                groups,
                run_as,
            })?;
            eprintln!("added account '{name}' to {}", store.path().display());
            Ok(())
        }
        UserCommand::List { state } => {
            let store = AccountStore::new(&state_dir(&state)?);
            let accounts = store.load()?;
            if accounts.is_empty() {
                eprintln!("no accounts in {}", store.path().display());
            }
            for a in accounts {
                let mut auth = Vec::new();
                if a.password_hash.is_some() {
                    auth.push("password".to_string());
                }
                if a.nt_hash.is_some() {
                    auth.push("ntlm".to_string());
                }
                if !a.authorized_keys.is_empty() {
                    auth.push(format!("{} key(s)", a.authorized_keys.len()));
                }
                println!(
                    "{}\t{}\t{}\trun_as={}",
                    a.name,
                    if a.admin { "admin" } else { "user" },
                    auth.join("+"),
                    a.run_as.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        UserCommand::Rm { name, state } => {
            let store = AccountStore::new(&state_dir(&state)?);
            store.remove(&name)?;
            eprintln!("removed account '{name}'");
            Ok(())
        }
    }
}
