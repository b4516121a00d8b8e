//! The `remote` command (design.md §5): `run` a command on many targets, or open a `shell`
//! on one, over SSH to remote-agent. Exit code: the remote command's (several targets: the
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
use remote_client::run::{self, Interrupt, OutputMode, RunOptions};
use remote_client::session::{self, SessionChannel, SessionRef};
use remote_client::ssh::{Client, ClientOptions};
use remote_client::target::Target;
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
    after_help = "TARGET is [ssh://][user@]host[:port]; a bare host means SSH to the agent's port 2222.\n\
                  Host keys are trusted on first use and recorded in $XDG_CONFIG_HOME/remote/known_hosts\n\
                  (~/.config/remote/known_hosts); a changed key is refused."
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
    /// Open an interactive shell on a target (with a terminal when stdin is one).
    Shell(ShellArgs),
    /// Persistent sessions: open, list, remove. They outlive every connection to them.
    #[command(subcommand)]
    Session(SessionCommand),
    /// Run a command in a session and follow it to its exit. Its working directory and
    /// exported variables carry over to the session's next command. stdin is forwarded;
    /// Ctrl+C is sent to the command, a second Ctrl+C leaves it running.
    Exec(ExecArgs),
    /// Attach to a session: what it produced since it was last seen, then live output; a
    /// terminal session gets your keystrokes. Detach with Enter ~ . (or Ctrl+C on a commands
    /// session); the session keeps running.
    Attach(SessionArg),
    /// Print what a session produced since it was last seen, without attaching.
    Receive(SessionArg),
}

#[derive(Subcommand)]
enum SessionCommand {
    /// Open a session on TARGET and print its id (alone, on the last line of stdout).
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
    /// Where: [ssh://][user@]host[:port].
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
    /// Where to run: [ssh://][user@]host[:port], several separated by commas.
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
    /// The command and its arguments, after `--`. A single argument is a shell command line
    /// as-is ('ls | wc -l'); several are quoted for the remote shell one by one.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(Args)]
struct ShellArgs {
    /// Where: [ssh://][user@]host[:port].
    #[arg(value_name = "TARGET")]
    target: String,
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
        Command::Shell(args) => shell_command(&cli.global, args).await,
        Command::Session(cmd) => session_command(&cli.global, cmd).await,
        Command::Exec(args) => {
            let sref = SessionRef::parse(&args.session)?;
            let forward = !args.no_stdin && !cli.global.password_stdin;
            let command = String::from_utf8_lossy(&run::command_line(&args.command)).into_owned();
            with_session(&cli.global, &sref.target, async |ch| {
                if args.detach {
                    follow::start(ch, &sref.id, &command).await
                } else {
                    follow::exec(ch, &sref.id, &command, forward).await
                }
            })
            .await
        }
        Command::Attach(args) => {
            let sref = SessionRef::parse(&args.session)?;
            restore_terminal_on_termination()?;
            with_session(&cli.global, &sref.target, async |ch| {
                follow::attach(ch, &sref.id).await
            })
            .await
        }
        Command::Receive(args) => {
            let sref = SessionRef::parse(&args.session)?;
            with_session(&cli.global, &sref.target, async |ch| {
                follow::receive(ch, &sref.id).await
            })
            .await
        }
    }
}

/// Connect to `target`, open its session channel, and run `f` on it.
async fn with_session<F>(global: &GlobalArgs, target: &Target, f: F) -> Result<i32>
where
    F: AsyncFnOnce(&mut SessionChannel) -> Result<i32, session::SessionError>,
{
    target.require_ssh()?;
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
            let buffering = match args.buffering.as_deref() {
                None => Buffering::Default,
                Some("block") => Buffering::Block,
                Some("drop") => Buffering::Drop,
                Some(other) => anyhow::bail!("--buffering {other}: use block or drop"),
            };
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
                idle_timeout_secs: args.idle_timeout.unwrap_or(0),
                size: Some(TerminalSize { rows, cols }),
                term: std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
                attach: false,
            };
            let spec = target.spec.clone();
            with_session(global, &target, async |ch| {
                let reply = ch.request(client_frame::Msg::Open(open)).await?;
                let Some(server_frame::Msg::Opened(o)) = reply.msg else {
                    return Err(session::SessionError::Protocol {
                        addr: ch.addr().to_string(),
                        detail: "no answer to open".into(),
                    });
                };
                let info = o.session.unwrap_or_default();
                session::record(&info.id, &spec)?;
                remote_client::notice(&format!(
                    "opened session {id} on {spec}; from another machine: remote attach {spec}/{id}",
                    id = info.id
                ));
                println!("{}", info.id);
                Ok(0)
            })
            .await
        }
        SessionCommand::List { target } => {
            let targets = match target {
                Some(t) => vec![t],
                None => session::recorded_targets(),
            };
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
                let listed = with_session(global, &target, async |ch| {
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
            let sref = SessionRef::parse(&args.session)?;
            let id = sref.id.clone();
            let code = with_session(global, &sref.target, async |ch| {
                ch.request(client_frame::Msg::Close(CloseSession {
                    session_id: id.clone(),
                }))
                .await?;
                Ok(0)
            })
            .await?;
            session::forget(&sref.id);
            Ok(code)
        }
    }
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
        "{:<16}  {:<16}  {:<8}  {:<12}  {:>7}  {:>8}  {:<9}  {:<11}  TARGET",
        "ID", "NAME", "SHAPE", "STATE", "CLIENTS", "COMMANDS", "CREATED", "LAST OUTPUT"
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
            "{:<16}  {:<16}  {:<8}  {:<12}  {:>7}  {:>8}  {:<9}  {:<11}  {}",
            s.id,
            name,
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

async fn make_client(global: &GlobalArgs) -> Result<Arc<Client>> {
    let credentials = Credentials::load(&CredentialOptions {
        identities: global.identity.clone(),
        password_stdin: global.password_stdin,
        batch: global.batch,
    })
    .await?;
    let known_hosts = KnownHosts::new(config::known_hosts_file());
    Ok(Arc::new(Client::new(
        Arc::new(credentials),
        Arc::new(known_hosts),
        ClientOptions {
            connect_timeout: Duration::from_secs(global.connect_timeout),
            default_user: config::default_user(),
        },
    )))
}

async fn run_command(global: &GlobalArgs, args: RunArgs) -> Result<i32> {
    let targets = Target::parse_list(&args.targets)?;
    for t in &targets {
        t.require_ssh()?;
    }
    // Like ssh: a closed stdout (`remote run … | head`) ends `remote` quietly.
    // SAFETY: setting a signal disposition to SIG_DFL has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let client = make_client(global).await?;
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
    };
    let command = run::command_line(&args.command);
    let results = run::run(client, targets, command, options, interrupt, output.clone()).await;
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
    target.require_ssh()?;
    let client = make_client(global).await?;
    let interrupt = Interrupt::new();
    handle_signals(interrupt.clone())?;
    let output = Output::start();
    let result = shell::shell(&client, &target, interrupt, output.clone()).await;
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
