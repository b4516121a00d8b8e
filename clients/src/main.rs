//! The `remote` command (design.md §5): `run` a command on many targets, or open a `shell`
//! on one, over SSH to remote-agent, or over WinRM (`winrm://`, `winrms://`) to remote-agent
//! or Windows. Exit code: the remote command's (several targets: the
//! first non-zero in target order), 255 when a target could not be reached or logged into,
//! 130 after a second Ctrl+C.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use remote_client::auth::{CredentialOptions, Credentials};
use remote_client::known_hosts::KnownHosts;
use remote_client::output::{Output, Stream};
use remote_client::relay::{RelayClient, RelayOptions};
use remote_client::run::{self, Clients, Interrupt, OutputMode, RunOptions};
use remote_client::session::{self, SessionChannel, SessionRef};
use remote_client::ssh::{Client, ClientOptions};
use remote_client::target::Target;
use remote_client::winrm::{self, AuthMethod};
use remote_client::{config, follow, shell, terminal};
use remote_proto::session::{
    Buffering, CloseSession, ListSessions, OpenSession, SessionInfo, SessionState, Shape,
    TerminalSize, client_frame, server_frame,
};

#[derive(Parser)]
#[command(
    name = "remote",
    version,
    about = "Run commands on servers that run remote-agent",
    after_help = "TARGET is [ssh://|winrm://|winrms://][user@]host[:port]; a bare host means SSH to the agent's\n\
                  port 2222. winrm:// is WinRM over HTTP (port 5985), winrms:// over HTTPS (5986), to remote-agent\n\
                  or Windows; they log in with a password (REMOTE_PASSWORD, --password-stdin, or asked).\n\
                  SSH host keys are trusted on first use and recorded in $XDG_CONFIG_HOME/remote/known_hosts\n\
                  (~/.config/remote/known_hosts), WinRM HTTPS certificates likewise in winrm_known_hosts there;\n\
                  a changed key or certificate is refused."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct GlobalArgs {
    /// More detail on stderr: -v the client's steps, -vv also the SSH protocol
    /// (or set REMOTE_LOG, e.g. REMOTE_LOG=debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Seconds to wait for the TCP connection, and again for the SSH handshake.
    #[arg(long, value_name = "SECS", default_value_t = 10, global = true,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    connect_timeout: u64,
    /// Private key to log in with (repeatable; then only these keys are offered).
    /// Default: the ssh-agent's keys, then ~/.ssh/id_ed25519, id_ecdsa, id_rsa.
    #[arg(short, long, value_name = "FILE", global = true)]
    identity: Vec<PathBuf>,
    /// Read the password from the first line of stdin (then `run` does not forward stdin).
    /// The password can also come from REMOTE_PASSWORD, or is asked on the terminal.
    #[arg(long, global = true)]
    password_stdin: bool,
    /// Never ask anything on the terminal (password, key passphrase): fail instead.
    #[arg(long, global = true)]
    batch: bool,
    /// WinRM: how to log in. ntlm (the default) encrypts every message over http://;
    /// basic sends the password with every request, so over http:// it is refused unless
    /// the host is listed in $XDG_CONFIG_HOME/remote/trusted_hosts.
    #[arg(long, value_name = "ntlm|basic", global = true, default_value = "ntlm",
          value_parser = parse_auth)]
    auth: AuthMethod,
    /// winrms://: trust server certificates that chain to the CA certificates in FILE (PEM)
    /// and name the host, instead of the fingerprints recorded on first contact.
    #[arg(
        long,
        value_name = "FILE",
        global = true,
        conflicts_with = "fingerprint"
    )]
    ca: Option<PathBuf>,
    /// winrms:// and the relay: accept only the server certificate with this fingerprint (as
    /// remote-agent prints it at start: SHA256:<base64>). Without --ca or --fingerprint, a
    /// certificate no trusted CA vouches for is trusted on first contact only if the host is
    /// listed in $XDG_CONFIG_HOME/remote/trusted_hosts, and is recorded then.
    #[arg(long, value_name = "SHA256:...", global = true)]
    fingerprint: Option<String>,
    /// The relay for relay://AGENT targets and for sessions not opened from this machine,
    /// HOST[:PORT] (default port 7443). Your token goes in REMOTE_TOKEN.
    #[arg(long, value_name = "HOST[:PORT]", global = true, env = "REMOTE_RELAY")]
    relay: Option<String>,
}

fn parse_auth(s: &str) -> Result<AuthMethod, String> {
    AuthMethod::parse(s).ok_or_else(|| format!("unknown method '{s}': use ntlm or basic"))
}

#[derive(Subcommand)]
enum Command {
    /// Run a command on one or more targets at once.
    ///
    /// With one target, output passes through unchanged, stdin is forwarded, and the exit
    /// code is the command's. With several, each line is prefixed with its target, a summary
    /// goes to stderr, and the exit code is the first non-zero in target order. Ctrl+C is
    /// sent to the commands; a second Ctrl+C within 2 s disconnects.
    Run(RunArgs),
    /// Open an interactive shell on a target (with a terminal when stdin is one; SSH only).
    Shell(ShellArgs),
    /// Persistent sessions: open, list, remove. They outlive every connection to them.
    #[command(subcommand)]
    Session(SessionCommand),
    /// Run a command in a session and follow it to its exit. Its working directory and
    /// exported variables carry over to the session's next command (WinRM shells of a
    /// remote-agent too; a Windows host runs each in a fresh cmd /c). stdin is forwarded;
    /// Ctrl+C is sent to the command, a second Ctrl+C leaves it running.
    Exec(ExecArgs),
    /// Attach to a session: what it produced since it was last seen, then live output; a
    /// terminal session gets your keystrokes. Detach with Enter ~ . (or Ctrl+C on a commands
    /// session); the session keeps running. SSH sessions only.
    Attach(SessionArg),
    /// Print what a session produced since it was last seen, without attaching. On a WinRM
    /// session: the output of the commands started from here with `exec --detach`.
    Receive(SessionArg),
    /// Check the way to a target link by link: name, TCP, protocol (SSH version line and host
    /// key, HTTP, or TLS and certificate), authentication, endpoint permission, a trivial
    /// command. Stops at the first broken link with its cause and fix.
    ///
    /// Exit code: 0 healthy; 11 name, 12 tcp, 13 protocol/host key/TLS, 14 authentication,
    /// 15 endpoint, 16 command; 255 when the test could not start. Nothing is recorded: a
    /// new host key or certificate is reported as "would be trusted on first use".
    Test(TestArgs),
}

#[derive(Args)]
struct TestArgs {
    /// What to check: [ssh://|winrm://|winrms://|relay://][user@]host[:port].
    #[arg(value_name = "TARGET")]
    target: String,
    /// The session configuration to open a session on (default: the agent's `default`).
    #[arg(long)]
    endpoint: Option<String>,
    /// One JSON object per step on stdout (step, check, ok, detail; message and exit_code on
    /// failure) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum SessionCommand {
    /// Open a session on TARGET and print its id (alone, on the last line of stdout). On a
    /// WinRM target the session is a WinRM shell, printed as TARGET/SHELLID.
    New(SessionNewArgs),
    /// List your sessions on TARGET (default: the targets of sessions opened from here).
    List {
        #[arg(value_name = "TARGET")]
        target: Option<String>,
    },
    /// Close a session and end everything running in it.
    Rm(SessionArg),
}

#[derive(Args)]
struct SessionNewArgs {
    /// Where: [ssh://|winrm://|winrms://][user@]host[:port].
    #[arg(value_name = "TARGET")]
    target: String,
    /// A name to recognise it by in `remote session list`.
    #[arg(long)]
    name: Option<String>,
    /// The session configuration to use on the agent.
    #[arg(long)]
    endpoint: Option<String>,
    /// A terminal session (your login shell on a pty) instead of a commands session.
    #[arg(long)]
    terminal: bool,
    /// What to do when its output buffer is full and nobody reads: block (the process
    /// waits; nothing is lost) or drop (oldest output is discarded and counted).
    #[arg(long, value_name = "block|drop")]
    buffering: Option<String>,
    /// Output kept while nobody reads, in MiB (default: the agent's, 64).
    #[arg(long, value_name = "MIB")]
    journal_mb: Option<u64>,
    /// Close the session after this long without a client (default: the agent's, 2 h).
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// Stop a command of the session that runs longer than this (the agent's endpoint may
    /// allow less; the shorter wins). Default: config.toml [session] operation_timeout_secs.
    #[arg(long, value_name = "SECS")]
    operation_timeout: Option<u64>,
    /// Stop a command that prints more than this many MB (the shorter of this and the
    /// endpoint's max_received_mb_per_command wins).
    #[arg(long, value_name = "MB")]
    max_received_mb: Option<u64>,
    /// Give up when connecting and opening the session take longer than this; the agent
    /// also gives up opening it after this long (or its endpoint's open_timeout_secs).
    #[arg(long, value_name = "SECS")]
    open_timeout: Option<u64>,
}

#[derive(Args)]
struct SessionArg {
    /// TARGET/ID, or an ID printed by `remote session new` on this machine.
    #[arg(value_name = "SESSION")]
    session: String,
}

#[derive(Args)]
struct ExecArgs {
    /// TARGET/ID, or an ID printed by `remote session new` on this machine.
    #[arg(value_name = "SESSION")]
    session: String,
    /// Do not forward stdin (the command sees end of input at once).
    #[arg(short = 'n', long)]
    no_stdin: bool,
    /// Start the command and return at once; its output stays in the session
    /// (remote receive / remote attach).
    #[arg(short = 'd', long)]
    detach: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(Args)]
struct RunArgs {
    /// Where to run: [ssh://|winrm://|winrms://][user@]host[:port], several separated by
    /// commas.
    #[arg(value_name = "TARGET[,TARGET...]")]
    targets: String,
    /// Work on at most N targets at once.
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    throttle: u64,
    /// Print one JSON object per target at the end (target, exit_code, signal, stdout,
    /// stderr, error) and nothing else on stdout.
    #[arg(long)]
    json: bool,
    /// The session configuration (endpoint) to run on, on every target: over SSH the
    /// channel variable REMOTE_ENDPOINT, over WinRM the shell's, through the relay the run's.
    #[arg(long, value_name = "NAME")]
    endpoint: Option<String>,
    /// The command and its arguments, after `--`. A single argument is a shell command line
    /// as-is ('ls | wc -l'); several are quoted for the remote shell one by one.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(Args)]
struct ShellArgs {
    /// Where: [ssh://][user@]host[:port], or relay://AGENT.
    #[arg(value_name = "TARGET")]
    target: String,
    /// The session configuration (endpoint) to open the shell on; default: the agent's
    /// `default`.
    #[arg(long, value_name = "NAME")]
    endpoint: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    init_tracing(cli.global.verbose);
    terminal::install_panic_hook();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("remote: cannot start the async runtime: {e}");
            std::process::exit(255);
        }
    };
    let code = runtime.block_on(async {
        match dispatch(cli).await {
            Ok(code) => code,
            Err(e) => {
                let _ = terminal::restore();
                eprintln!("remote: {e:#}");
                255
            }
        }
    });
    let _ = terminal::restore();
    // Do not wait for the stdin and output threads (a blocked read of a terminal).
    std::process::exit(code);
}

fn init_tracing(verbose: u8) {
    let from_env = std::env::var("REMOTE_LOG").ok().filter(|v| !v.is_empty());
    let filter = match (from_env, verbose) {
        (Some(spec), _) => spec,
        (None, 0) => return,
        (None, 1) => "remote=debug,remote_client=debug,russh=warn".into(),
        (None, _) => "debug".into(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("debug"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run(args) => run_command(&cli.global, args).await,
        Command::Test(args) => {
            let g = &cli.global;
            let options = remote_client::diagnose::TestOptions {
                target: args.target,
                endpoint: args.endpoint,
                json: args.json,
                connect_timeout: Duration::from_secs(g.connect_timeout),
                credentials: CredentialOptions {
                    identities: g.identity.clone(),
                    password_stdin: g.password_stdin,
                    batch: g.batch,
                },
                auth: g.auth,
                ca: g.ca.clone(),
                fingerprint: g.fingerprint.clone(),
                relay: g.relay.clone(),
                relay_token: std::env::var("REMOTE_TOKEN").ok(),
            };
            Ok(remote_client::diagnose::test(options).await)
        }
        Command::Shell(args) => shell_command(&cli.global, args).await,
        Command::Session(cmd) => session_command(&cli.global, cmd).await,
        Command::Exec(args) => {
            let sref = session_ref(&cli.global, &args.session)?;
            let forward = !args.no_stdin && !cli.global.password_stdin;
            let command = String::from_utf8_lossy(&run::command_line(&args.command)).into_owned();
            if sref.target.is_winrm() {
                let clients = make_clients(&cli.global).await?;
                let code = if args.detach {
                    follow::winrm_start(&clients.winrm, &sref, &command).await?
                } else {
                    follow::winrm_exec(clients.winrm.clone(), &sref, &command, forward).await?
                };
                return Ok(code);
            }
            with_session(
                &cli.global,
                &sref.target,
                "exec",
                Some(&sref.id),
                async |ch| {
                    if args.detach {
                        follow::start(ch, &sref.id, &command).await
                    } else {
                        follow::exec(ch, &sref.id, &command, forward).await
                    }
                },
            )
            .await
        }
        Command::Attach(args) => {
            let sref = session_ref(&cli.global, &args.session)?;
            sref.target.require_ssh("attach")?;
            restore_terminal_on_termination()?;
            with_session(
                &cli.global,
                &sref.target,
                "attach",
                Some(&sref.id),
                async |ch| follow::attach(ch, &sref.id).await,
            )
            .await
        }
        Command::Receive(args) => {
            let sref = session_ref(&cli.global, &args.session)?;
            if sref.target.is_winrm() {
                let clients = make_clients(&cli.global).await?;
                return Ok(follow::winrm_receive(&clients.winrm, &sref).await?);
            }
            with_session(
                &cli.global,
                &sref.target,
                "receive",
                Some(&sref.id),
                async |ch| follow::receive(ch, &sref.id).await,
            )
            .await
        }
    }
}

/// A session as named on the command line: `TARGET/ID`, an id recorded on this machine, or
/// (with a relay configured) any id of the caller's, which the relay resolves.
fn session_ref(global: &GlobalArgs, text: &str) -> Result<SessionRef> {
    match SessionRef::parse(text) {
        Err(session::SessionError::Unknown(id)) if relay_options(global).configured() => {
            Ok(session::SessionRef {
                target: Target::parse("relay://relay")?,
                id,
            })
        }
        other => Ok(other?),
    }
}

/// How to reach the relay, from --relay / REMOTE_RELAY, REMOTE_TOKEN and the TLS options.
fn relay_options(global: &GlobalArgs) -> RelayOptions {
    RelayOptions {
        address: global.relay.clone(),
        token: std::env::var("REMOTE_TOKEN").ok(),
        ca: global.ca.clone(),
        fingerprint: global.fingerprint.clone(),
        connect_timeout: Duration::from_secs(global.connect_timeout),
        known_hosts: config::relay_known_hosts_file(),
        trusted_hosts: config::trusted_hosts_file(),
    }
}

/// Connect to `target`, open its session channel, and run `f` on it (`remote COMMAND`, over
/// SSH or through the relay). Through the relay, a conversation about session `session` is
/// addressed by the session (the relay finds its agent and checks it is the caller's).
async fn with_session<F>(
    global: &GlobalArgs,
    target: &Target,
    command: &'static str,
    session: Option<&str>,
    f: F,
) -> Result<i32>
where
    F: AsyncFnOnce(&mut SessionChannel) -> Result<i32, session::SessionError>,
{
    target.require_ssh(command)?;
    if target.is_relay() {
        let client = RelayClient::connect(&relay_options(global), command).await?;
        let mut ch = match session {
            Some(id) => SessionChannel::over_relay(&client, "", id).await?,
            None => SessionChannel::over_relay(&client, &target.host, "").await?,
        };
        let result = f(&mut ch).await;
        ch.close().await;
        return Ok(result?);
    }
    let client = make_client(global).await?;
    let conn = client.connect(target).await?;
    let mut ch = SessionChannel::open(&conn).await?;
    let result = f(&mut ch).await;
    ch.close().await;
    conn.disconnect().await;
    Ok(result?)
}

async fn session_command(global: &GlobalArgs, cmd: SessionCommand) -> Result<i32> {
    match cmd {
        SessionCommand::New(args) => {
            let target = Target::parse(&args.target)?;
            target.require_supported()?;
            if target.is_winrm() {
                return winrm_session_new(global, &target, &args).await;
            }
            let buffering = match args.buffering.as_deref() {
                None => Buffering::Default,
                Some("block") => Buffering::Block,
                Some("drop") => Buffering::Drop,
                Some("spill") => Buffering::Spill,
                Some(other) => anyhow::bail!("--buffering {other}: use block, drop or spill"),
            };
            let options = remote_client::config::load_config()?.session.overridden_by(
                remote_client::config::SessionOptions {
                    open_timeout_secs: args.open_timeout,
                    idle_timeout_secs: args.idle_timeout,
                    operation_timeout_secs: args.operation_timeout,
                    max_received_mb_per_command: args.max_received_mb,
                },
            );
            let (cols, rows) = terminal::window_size().unwrap_or((80, 24));
            let open = OpenSession {
                shape: if args.terminal {
                    Shape::Terminal
                } else {
                    Shape::Commands
                } as i32,
                name: args.name.clone().unwrap_or_default(),
                endpoint: args.endpoint.clone().unwrap_or_default(),
                buffering: buffering as i32,
                journal_bytes: args.journal_mb.map(|m| m << 20).unwrap_or(0),
                idle_timeout_secs: options.idle_timeout_secs.unwrap_or(0),
                size: Some(TerminalSize { rows, cols }),
                term: std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
                attach: false,
                operation_timeout_secs: options.operation_timeout_secs.unwrap_or(0),
                max_received_mb_per_command: options.max_received_mb_per_command.unwrap_or(0),
                open_timeout_secs: options.open_timeout_secs.unwrap_or(0),
            };
            let spec = target.spec.clone();
            let opening = with_session(global, &target, "session new", None, async |ch| {
                let reply = ch.request(client_frame::Msg::Open(open)).await?;
                let Some(server_frame::Msg::Opened(o)) = reply.msg else {
                    return Err(session::SessionError::Protocol {
                        addr: ch.addr().to_string(),
                        detail: "no answer to open".into(),
                    });
                };
                let info = o.session.unwrap_or_default();
                session::record(&info.id, &spec)?;
                let elsewhere = if spec.starts_with("relay://") {
                    format!("REMOTE_RELAY=… remote attach {}", info.id)
                } else {
                    format!("remote attach {spec}/{}", info.id)
                };
                remote_client::notice(&format!(
                    "opened session {id} on {spec}; from another machine: {elsewhere}",
                    id = info.id
                ));
                println!("{}", info.id);
                Ok(0)
            });
            match options.open_timeout_secs {
                Some(secs) => tokio::time::timeout(std::time::Duration::from_secs(secs), opening)
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!(
                            "opening a session on {} took longer than {secs} s (open_timeout_secs): is the agent overloaded or the network slow? Raise it with --open-timeout or in {}",
                            target.spec,
                            remote_client::config::config_file().display()
                        ))
                    }),
                None => opening.await,
            }
        }
        SessionCommand::List { target } => {
            if let Some(t) = &target {
                let parsed = Target::parse(t)?;
                parsed.require_ssh("session list")?;
                if parsed.is_relay() {
                    return relay_session_list(global, &parsed.host).await;
                }
            } else if relay_options(global).configured() {
                return relay_session_list(global, "").await;
            }
            let mut winrm_recorded = Vec::new();
            let targets: Vec<String> = match target {
                Some(t) => vec![t],
                None => session::recorded_targets()
                    .into_iter()
                    .filter(|t| match Target::parse(t) {
                        Ok(target) if target.is_winrm() => {
                            winrm_recorded.push(t.clone());
                            false
                        }
                        _ => true,
                    })
                    .collect(),
            };
            if !winrm_recorded.is_empty() {
                let refs: Vec<String> = session::recorded_sessions()
                    .into_iter()
                    .filter(|(_, t)| winrm_recorded.contains(t))
                    .filter_map(|(id, t)| Target::parse(&t).ok().map(|t| t.session_ref(&id)))
                    .collect();
                remote_client::notice(&format!(
                    "WinRM sessions opened from here (WinRM servers are not asked; they may have closed some): {}",
                    refs.join(" ")
                ));
                if targets.is_empty() {
                    return Ok(0);
                }
            }
            if targets.is_empty() {
                remote_client::notice(
                    "no sessions opened from this machine; name a target: remote session list TARGET",
                );
                return Ok(0);
            }
            let mut rows = Vec::new();
            let mut failed = 0;
            for t in &targets {
                let target = Target::parse(t)?;
                let listed = with_session(global, &target, "session list", None, async |ch| {
                    let reply = ch.request(client_frame::Msg::List(ListSessions {})).await?;
                    if let Some(server_frame::Msg::Sessions(l)) = reply.msg {
                        for s in l.sessions {
                            rows.push((t.clone(), s));
                        }
                    }
                    Ok(0)
                })
                .await;
                if let Err(e) = listed {
                    eprintln!("remote: {t}: {e:#}");
                    failed += 1;
                }
            }
            print_sessions(&rows);
            Ok(if failed > 0 { 255 } else { 0 })
        }
        SessionCommand::Rm(args) => {
            let sref = session_ref(global, &args.session)?;
            if sref.target.is_winrm() {
                let clients = make_clients(global).await?;
                let mut conn = clients.winrm.connect(&sref.target).await?;
                let result = conn.delete_shell(&sref.id).await;
                if result.is_ok()
                    || result
                        .as_ref()
                        .err()
                        .and_then(|e| e.fault())
                        .is_some_and(|f| f.is_shell_not_found())
                {
                    session::forget(&sref.id);
                }
                result?;
                return Ok(0);
            }
            let id = sref.id.clone();
            let code = with_session(
                global,
                &sref.target,
                "session rm",
                Some(&sref.id),
                async |ch| {
                    ch.request(client_frame::Msg::Close(CloseSession {
                        session_id: id.clone(),
                    }))
                    .await?;
                    Ok(0)
                },
            )
            .await?;
            session::forget(&sref.id);
            Ok(code)
        }
    }
}

/// `remote session list` through the relay: the caller's sessions on every agent (or one),
/// including those of agents that are offline, whose output the relay still serves.
async fn relay_session_list(global: &GlobalArgs, agent: &str) -> Result<i32> {
    let client = RelayClient::connect(&relay_options(global), "session list").await?;
    let rows: Vec<(String, SessionInfo)> = client
        .list_sessions(agent)
        .await?
        .into_iter()
        .map(|r| {
            let online = if r.agent_online { "online" } else { "offline" };
            (
                format!("relay://{} ({online})", r.agent),
                r.session.unwrap_or_default(),
            )
        })
        .collect();
    print_sessions(&rows);
    Ok(0)
}

fn print_sessions(rows: &[(String, SessionInfo)]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let age = |t: i64| -> String {
        if t <= 0 {
            return "-".into();
        }
        let s = (now - t).max(0);
        match s {
            0..60 => format!("{s}s ago"),
            60..3600 => format!("{}m ago", s / 60),
            3600..86400 => format!("{}h ago", s / 3600),
            _ => format!("{}d ago", s / 86400),
        }
    };
    println!(
        "{:<16}  {:<16}  {:<10}  {:<8}  {:<12}  {:>7}  {:>8}  {:<9}  {:<11}  TARGET",
        "ID", "NAME", "OWNER", "SHAPE", "STATE", "CLIENTS", "COMMANDS", "CREATED", "LAST OUTPUT"
    );
    for (target, s) in rows {
        let shape = if s.shape == Shape::Terminal as i32 {
            "terminal"
        } else {
            "commands"
        };
        let state = match SessionState::try_from(s.state).unwrap_or(SessionState::StateUnspecified)
        {
            SessionState::StateOpened => "opened",
            SessionState::StateDisconnected => "disconnected",
            SessionState::StateClosed => "closed",
            SessionState::StateUnspecified => "?",
        };
        let name = if s.name == s.id { "-" } else { s.name.as_str() };
        println!(
            "{:<16}  {:<16}  {:<10}  {:<8}  {:<12}  {:>7}  {:>8}  {:<9}  {:<11}  {}",
            s.id,
            name,
            s.owner,
            shape,
            state,
            s.attached_clients,
            s.running_commands,
            age(s.created_unix),
            age(s.last_output_unix),
            target
        );
    }
}

/// While attached (raw terminal), SIGTERM and SIGHUP still leave the terminal as it was.
fn restore_terminal_on_termination() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    tokio::spawn(async move {
        let code = tokio::select! {
            _ = sigterm.recv() => 143,
            _ = sighup.recv() => 129,
        };
        let _ = terminal::restore();
        std::process::exit(code);
    });
    Ok(())
}

/// The SSH and WinRM clients, sharing one set of credentials.
async fn make_clients(global: &GlobalArgs) -> Result<Clients> {
    let credentials = Arc::new(
        Credentials::load(&CredentialOptions {
            identities: global.identity.clone(),
            password_stdin: global.password_stdin,
            batch: global.batch,
        })
        .await?,
    );
    let known_hosts = KnownHosts::new(config::known_hosts_file());
    let connect_timeout = Duration::from_secs(global.connect_timeout);
    let ssh = Arc::new(Client::new(
        credentials.clone(),
        Arc::new(known_hosts),
        ClientOptions {
            connect_timeout,
            default_user: config::default_user(),
        },
    ));
    let trust = winrm::tls::Trust::new(
        global.ca.as_deref(),
        global.fingerprint.as_deref(),
        config::winrm_known_hosts_file(),
        config::trusted_hosts_file(),
    )?;
    let winrm = Arc::new(winrm::Client::new(
        credentials,
        winrm::ClientOptions {
            auth: global.auth,
            connect_timeout,
            default_user: config::default_user(),
            trust,
            trusted_hosts: config::trusted_hosts_file(),
        },
    ));
    Ok(Clients {
        ssh,
        winrm,
        relay: None,
    })
}

async fn make_client(global: &GlobalArgs) -> Result<Arc<Client>> {
    Ok(make_clients(global).await?.ssh)
}

/// `remote session new winrm://…`: a WinRM shell; prints TARGET/SHELLID.
async fn winrm_session_new(
    global: &GlobalArgs,
    target: &Target,
    args: &SessionNewArgs,
) -> Result<i32> {
    let unavailable = |what: &'static str, hint: &'static str| winrm::WinrmError::Unsupported {
        what,
        target: target.spec.clone(),
        hint,
    };
    if args.terminal {
        return Err(unavailable(
            "--terminal",
            "a WinRM shell runs commands, not a terminal; use an ssh:// target for a terminal session",
        )
        .into());
    }
    if args.buffering.is_some() || args.journal_mb.is_some() {
        return Err(unavailable(
            "--buffering/--journal-mb",
            "the WinRM server decides how output is kept; leave these out",
        )
        .into());
    }
    let clients = make_clients(global).await?;
    let mut conn = clients.winrm.connect(target).await?;
    let options = winrm::soap::ShellOptions {
        idle_timeout: args.idle_timeout.map(Duration::from_secs),
        name: args.name.clone(),
        endpoint: args.endpoint.clone(),
    };
    let id = conn.create_shell(&options).await?;
    session::record(&id, &target.spec)?;
    let reference = target.session_ref(&id);
    remote_client::notice(&format!(
        "opened WinRM shell {id} on {}; run commands in it: remote exec {reference} -- COMMAND",
        target.spec
    ));
    println!("{reference}");
    Ok(0)
}

async fn run_command(global: &GlobalArgs, args: RunArgs) -> Result<i32> {
    let targets = Target::parse_list(&args.targets)?;
    for t in &targets {
        t.require_supported()?;
    }
    // Like ssh: a closed stdout (`remote run … | head`) ends `remote` quietly.
    // SAFETY: setting a signal disposition to SIG_DFL has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let mut clients = make_clients(global).await?;
    if targets.iter().any(|t| t.is_relay()) {
        clients.relay =
            Some(RelayClient::connect(&relay_options(global), "a relay:// target").await?);
    }
    let interrupt = Interrupt::new();
    handle_signals(interrupt.clone())?;
    let output = Output::start();
    let several = targets.len() > 1;
    let mode = if args.json {
        OutputMode::Json
    } else if several {
        OutputMode::Prefixed
    } else {
        OutputMode::Passthrough
    };
    let options = RunOptions {
        throttle: usize::try_from(args.throttle).unwrap_or(usize::MAX),
        mode,
        forward_stdin: !several && !global.password_stdin,
        endpoint: args.endpoint.clone(),
    };
    let command = run::command_line(&args.command);
    let results = run::run(
        clients,
        targets,
        command,
        options,
        interrupt,
        output.clone(),
    )
    .await;
    match mode {
        OutputMode::Json => {
            for r in &results {
                output
                    .write(Stream::Stdout, format!("{}\n", r.to_json()).into())
                    .await;
            }
        }
        OutputMode::Prefixed => {
            for r in &results {
                output
                    .write(Stream::Stderr, format!("{}\n", r.summary()).into())
                    .await;
            }
        }
        OutputMode::Passthrough => {
            for r in &results {
                if let Err(e) = &r.outcome {
                    output
                        .write(Stream::Stderr, format!("remote: {e}\n").into())
                        .await;
                }
            }
        }
    }
    output.flush().await;
    Ok(run::overall_exit_code(&results))
}

async fn shell_command(global: &GlobalArgs, args: ShellArgs) -> Result<i32> {
    let target = Target::parse(&args.target)?;
    target.require_ssh("shell")?;
    if target.is_relay() {
        return relay_shell(global, &target, args.endpoint.as_deref()).await;
    }
    let client = make_client(global).await?;
    let interrupt = Interrupt::new();
    handle_signals(interrupt.clone())?;
    let output = Output::start();
    let endpoint = args.endpoint.as_deref();
    let result = shell::shell(&client, &target, endpoint, interrupt, output.clone()).await;
    output.flush().await;
    let _ = terminal::restore();
    match result {
        Ok(exit) => Ok(exit.code()),
        Err(e) => {
            eprintln!("remote: {e}");
            Ok(255)
        }
    }
}

/// `remote shell relay://AGENT`: a terminal session on the agent, attached at once; when
/// its shell exits the session is removed, and a detached one keeps running.
async fn relay_shell(global: &GlobalArgs, target: &Target, endpoint: Option<&str>) -> Result<i32> {
    restore_terminal_on_termination()?;
    let (cols, rows) = terminal::window_size().unwrap_or((80, 24));
    let open = OpenSession {
        shape: Shape::Terminal as i32,
        endpoint: endpoint.unwrap_or_default().to_string(),
        size: Some(TerminalSize { rows, cols }),
        term: std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
        ..Default::default()
    };
    let spec = target.spec.clone();
    let code = with_session(global, target, "shell", None, async |ch| {
        let reply = ch.request(client_frame::Msg::Open(open)).await?;
        let Some(server_frame::Msg::Opened(o)) = reply.msg else {
            return Err(session::SessionError::Protocol {
                addr: ch.addr().to_string(),
                detail: "no answer to open".into(),
            });
        };
        let id = o.session.map(|s| s.id).unwrap_or_default();
        session::record(&id, &spec)?;
        let code = follow::attach(ch, &id).await?;
        let listed = ch.request(client_frame::Msg::List(ListSessions {})).await?;
        let running = match listed.msg {
            Some(server_frame::Msg::Sessions(l)) => l
                .sessions
                .iter()
                .any(|s| s.id == id && s.running_commands > 0),
            _ => false,
        };
        if running {
            remote_client::notice(&format!("session {id} keeps running: remote attach {id}"));
        } else {
            let _ = ch
                .request(client_frame::Msg::Close(CloseSession {
                    session_id: id.clone(),
                }))
                .await;
            session::forget(&id);
        }
        Ok(code)
    })
    .await;
    let _ = terminal::restore();
    code
}

/// Ctrl+C goes to the remote commands (INT); a second one within 2 s, or one before any
/// command started, ends `remote` at once (130). SIGTERM and SIGHUP end it too, with the
/// terminal restored.
fn handle_signals(interrupt: Arc<Interrupt>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    tokio::spawn(async move {
        let mut last: Option<Instant> = None;
        loop {
            tokio::select! {
                Some(()) = sigint.recv() => {
                    let now = Instant::now();
                    let again = last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(2));
                    if again || interrupt.commands_started() == 0 {
                        if terminal::restore() {
                            // Interrupted at a prompt or in raw mode: end the line.
                            eprintln!();
                        }
                        std::process::exit(130);
                    }
                    last = Some(now);
                    interrupt.fire();
                }
                Some(()) = sigterm.recv() => {
                    let _ = terminal::restore();
                    std::process::exit(128 + libc::SIGTERM);
                }
                Some(()) = sighup.recv() => {
                    let _ = terminal::restore();
                    std::process::exit(128 + libc::SIGHUP);
                }
                else => return,
            }
        }
    });
    Ok(())
}
