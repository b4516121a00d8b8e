//! The `remote-relay` command line: the relay server (`run`, the default) and the
//! administration of its store: join tokens for agents (`token create`), users and their
//! tokens (`user add|list|rm`), and the agents that enrolled (`agent list|rm`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use remote_relay::store::Store;

#[derive(Parser)]
#[command(
    name = "remote-relay",
    version,
    about = "The relay that remote agents dial out to"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve agents and clients (the default).
    Run(RunArgs),
    /// Join tokens for agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Users of the relay and their tokens.
    #[command(subcommand)]
    User(UserCommand),
    /// Agents that enrolled.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Print the audit lines agents sent (their audit.jsonl, kept here out of the hosts'
    /// reach), oldest first: `AGENT<TAB>JSON`.
    Audit {
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
        /// At most this many lines.
        #[arg(long, default_value_t = 10_000)]
        limit: i64,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args, Clone)]
struct StoreArgs {
    /// Data directory (default: /var/lib/remote-relay as root, $XDG_STATE_HOME/remote-relay
    /// otherwise). The store is relay.db in it unless --store is given.
    #[arg(long, value_name = "DIR", env = "REMOTE_RELAY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Store URL: sqlite://PATH or postgres://… (default: SQLite in the data directory).
    #[arg(long, value_name = "URL", env = "REMOTE_RELAY_STORE")]
    store: Option<String>,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Address to listen on (agents and clients alike), HOST:PORT.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7443")]
    listen: String,
    /// TLS certificate and key (PEM); default: generated in the data directory on first
    /// start.
    #[arg(long, value_name = "FILE", requires = "key_file")]
    cert_file: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// Connections served at once (agents' tunnels and clients').
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    max_connections: usize,
    /// Name in the generated certificate (default: the host name).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Audit lines kept per agent log (its newest; older ones are deleted as new ones arrive).
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    audit_keep_lines: u64,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a one-time join token for an agent (`remote-agent --relay URL --join-token T`).
    Create {
        /// The token is for an agent (the only kind so far).
        #[arg(long)]
        agent: bool,
        /// How long the token stays valid: 90s, 30m, 12h, 7d (default 1h).
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        ttl: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user and print their token once (clients use it as REMOTE_TOKEN).
    Add {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List users.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove a user; their token stops working at once.
    Rm {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// List enrolled agents.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove an agent; its credential stops working at once.
    Rm {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn main() -> std::process::ExitCode {
    limit_heap_growth();
    let cli = Cli::parse();
    // Bare `remote-relay` is `remote-relay run` with its defaults (and environment).
    let command = match cli.command {
        Some(c) => c,
        None => match Cli::parse_from(["remote-relay", "run"]).command {
            Some(c) => c,
            None => unreachable_run(),
        },
    };
    if matches!(command, Command::Run(_)) {
        init_logging();
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(dispatch(command)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remote-relay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Serve allocations of 1 MiB and more straight from the kernel. Every argon2id check of a
/// token or credential allocates a 4 MiB work area; left to the heap, glibc keeps those
/// areas and fragments around them, and a relay that verified ten thousand agents held
/// gigabytes it no longer used (measured by tests/bench/relay.sh).
fn limit_heap_growth() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a malloc tuning parameter; it is called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// `run` always parses into a command; this only satisfies the types.
fn unreachable_run() -> Command {
    eprintln!("remote-relay: internal error: `run` did not parse; use `remote-relay run`");
    std::process::exit(2)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REMOTE_RELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// `remote-relay run`: serve until SIGTERM or SIGINT.
async fn run(args: RunArgs) -> Result<()> {
    use remote_relay::server::{RelayServerHandle, Settings, Shared};
    let listen: std::net::SocketAddr = args.listen.parse().with_context(|| {
        format!(
            "invalid --listen '{}': use HOST:PORT, e.g. 0.0.0.0:7443",
            args.listen
        )
    })?;
    let data_dir = args.store.data_dir.clone().unwrap_or_else(default_data_dir);
    ensure_private_dir(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let name = args.name.clone().unwrap_or_else(host_name);
    let given = args.cert_file.as_deref().zip(args.key_file.as_deref());
    let identity = remote_relay::tls::load_or_generate(&data_dir, given, &name)?;
    if identity.generated {
        tracing::info!(
            "generated TLS certificate {} ({})",
            identity.cert_path.display(),
            identity.fingerprint
        );
    }
    let store = std::sync::Arc::new(open(&args.store).await?);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let shared = std::sync::Arc::new(Shared {
        store: store.clone(),
        registry: Default::default(),
        fingerprint: identity.fingerprint.clone(),
        shutdown: shutdown.clone(),
        audit_keep_lines: args.audit_keep_lines,
    });
    let server = RelayServerHandle::bind(
        Settings {
            listen,
            max_connections: args.max_connections,
            tls: identity.config.clone(),
        },
        shared,
    )
    .await?;
    let addr = server.local_addr()?;
    eprintln!(
        "remote-relay: listening on {addr} (certificate {})",
        identity.fingerprint
    );
    let task = tokio::spawn(server.run());
    wait_for_signal().await?;
    tracing::info!("shutting down");
    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(10), task).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => bail!("the relay server task failed: {e}"),
        Err(_) => tracing::warn!("connections still open after 10 s; stopping anyway"),
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
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

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run(args) => run(args).await,
        Command::Token(TokenCommand::Create { agent, ttl, store }) => {
            if !agent {
                bail!("say what the token is for: `remote-relay token create --agent`");
            }
            let ttl = parse_duration(&ttl)?;
            let store = open(&store).await?;
            let token = store.create_join_token(ttl).await?;
            eprintln!(
                "join token for one agent, valid for {}: remote-agent --relay URL --join-token TOKEN",
                humanize(ttl)
            );
            println!("{token}");
            Ok(())
        }
        Command::User(UserCommand::Add { name, store }) => {
            let store = open(&store).await?;
            let token = store.add_user(&name).await?;
            eprintln!(
                "added user '{name}'; their token follows and is not shown again (REMOTE_TOKEN=…)"
            );
            println!("{token}");
            Ok(())
        }
        Command::User(UserCommand::List { store }) => {
            let store = open(&store).await?;
            for u in store.list_users().await? {
                println!("{}\tcreated {}", u.name, u.created_unix);
            }
            Ok(())
        }
        Command::User(UserCommand::Rm { name, store }) => {
            open(&store).await?.remove_user(&name).await?;
            eprintln!("removed user '{name}'");
            Ok(())
        }
        Command::Agent(AgentCommand::List { store }) => {
            let store = open(&store).await?;
            for a in store.list_agents().await? {
                let seen = a
                    .last_seen_unix
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "never".into());
                println!("{}\tenrolled {}\tlast seen {seen}", a.name, a.enrolled_unix);
            }
            Ok(())
        }
        Command::Agent(AgentCommand::Rm { name, store }) => {
            open(&store).await?.remove_agent(&name).await?;
            eprintln!("removed agent '{name}'");
            Ok(())
        }
        Command::Audit {
            agent,
            limit,
            store,
        } => {
            let store = open(&store).await?;
            for (agent, line) in store.audit_lines(agent.as_deref(), limit.max(1)).await? {
                println!("{agent}\t{line}");
            }
            Ok(())
        }
    }
}

async fn open(args: &StoreArgs) -> Result<Store> {
    let url = match &args.store {
        Some(url) => url.clone(),
        None => {
            let dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
            ensure_private_dir(&dir)
                .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
            Store::sqlite_url(&dir.join("relay.db"))
        }
    };
    Ok(Store::open(&url).await?)
}

fn default_data_dir() -> PathBuf {
    if nix_is_root() {
        return PathBuf::from("/var/lib/remote-relay");
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("remote-relay");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/".into());
    home.join(".local/state/remote-relay")
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// `90s`, `30m`, `12h`, `7d`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .with_context(|| format!("invalid duration '{text}': use e.g. 90s, 30m, 12h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => bail!("invalid duration '{text}': use e.g. 90s, 30m, 12h or 7d"),
    };
    if secs > 365 * 86_400 {
        bail!("a join token may live at most a year (asked: {text})");
    }
    Ok(Duration::from_secs(secs))
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 86_400 == 0 => format!("{} d", s / 86_400),
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        for bad in ["", "0", "h", "5w", "-3s", "400d", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(humanize(Duration::from_secs(3600)), "1 h");
    }
}
