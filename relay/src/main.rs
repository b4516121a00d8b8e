//! The `remote-relay` command line. So far the administration of the relay's store: join
//! tokens for agents (`token create`), users and their tokens (`user add|list|rm`), and the
//! agents that enrolled (`agent list|rm`). The relay server itself (`run`) comes with the rest
//! of issue 5.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use remote_relay::store::Store;

#[derive(Parser)]
#[command(
    name = "remote-relay",
    version,
    about = "The relay that remote agents dial out to: administration of its store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join tokens for agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Users of the relay and their tokens.
    #[command(subcommand)]
    User(UserCommand),
    /// Agents that enrolled.
    #[command(subcommand)]
    Agent(AgentCommand),
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
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(dispatch(cli.command)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remote-relay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
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
