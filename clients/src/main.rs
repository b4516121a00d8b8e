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
use remote_client::ssh::{Client, ClientOptions};
use remote_client::target::Target;
use remote_client::{config, shell, terminal};

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
    }
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
