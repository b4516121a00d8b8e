//! Credentials for logging in, gathered once per run and shared by every connection:
//!
//! * keys: the `--identity` files if any were given (and nothing else, like OpenSSH's
//!   `IdentitiesOnly`); otherwise the ssh-agent's keys (`SSH_AUTH_SOCK`), then
//!   `~/.ssh/id_ed25519`, `id_ecdsa`, `id_rsa` when present and not encrypted;
//! * a password: `--password-stdin` (first line of stdin), `REMOTE_PASSWORD`, or a prompt
//!   on `/dev/tty` without echo (asked once, then reused for every target) unless `--batch`.
//!
//! Keys are tried first, then the password, as OpenSSH does. Keys that had to be skipped
//! are kept as notes for the error message when authentication fails.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{PrivateKey, PublicKey};
use thiserror::Error;
use tokio::sync::OnceCell;

use crate::{config, terminal};

/// Where credentials come from.
#[derive(Debug, Clone, Default)]
pub struct CredentialOptions {
    /// `--identity FILE`, in order.
    pub identities: Vec<PathBuf>,
    /// `--password-stdin`: the first line of stdin is the password.
    pub password_stdin: bool,
    /// `--batch`: never ask anything on the terminal.
    pub batch: bool,
}

/// One key to offer.
pub enum Key {
    /// A private key read from a file.
    File { path: PathBuf, key: Arc<PrivateKey> },
    /// A key held by the ssh-agent, which signs for us.
    Agent { public: PublicKey, comment: String },
}

impl Key {
    /// How the key is named in messages.
    pub fn describe(&self) -> String {
        match self {
            Key::File { path, .. } => path.display().to_string(),
            Key::Agent { public, comment } if comment.is_empty() => {
                format!(
                    "ssh-agent key {}",
                    public.fingerprint(russh::keys::HashAlg::Sha256)
                )
            }
            Key::Agent { comment, .. } => format!("ssh-agent key {comment}"),
        }
    }
}

enum PasswordSource {
    None,
    Given(String),
    /// Asked on the terminal the first time a server wants a password.
    Prompt(OnceCell<Option<String>>),
}

/// Everything a connection may log in with.
pub struct Credentials {
    keys: Vec<Key>,
    agent_socket: Option<PathBuf>,
    password: PasswordSource,
    notes: Vec<String>,
}

/// A credential option that cannot be used as given.
#[derive(Debug, Error)]
pub enum CredentialError {
    #[error("cannot read identity file {path}: {source}; check the path given to --identity")]
    ReadIdentity {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is a public key: give --identity the private key file (the one without .pub)")]
    PublicKeyGiven { path: PathBuf },
    #[error(
        "{path} is not a private key this client can read ({reason}): give --identity an OpenSSH private key (ssh-keygen -t ed25519)"
    )]
    BadIdentity { path: PathBuf, reason: String },
    #[error(
        "wrong passphrase for {path} (3 tries): load the key into ssh-agent (ssh-add {path}) or try again"
    )]
    WrongPassphrase { path: PathBuf },
    #[error(
        "--password-stdin: stdin is empty: pipe the password in, e.g. printf '%s\\n' \"$PW\" | remote ..."
    )]
    EmptyPasswordStdin,
    #[error(
        "--password-stdin: cannot read stdin: {0}; pipe the password in, e.g. printf '%s\\n' \"$PW\" | remote ..."
    )]
    ReadStdin(std::io::Error),
}

impl Credentials {
    /// Gather credentials as described in the module comment. Reads files, stdin (for
    /// `--password-stdin`) and may ask for key passphrases on the terminal.
    pub async fn load(opts: &CredentialOptions) -> Result<Credentials, CredentialError> {
        let mut keys = Vec::new();
        let mut notes = Vec::new();
        let mut agent_socket = None;
        if !opts.identities.is_empty() {
            for path in &opts.identities {
                if let Some(key) = load_identity(path, opts.batch, &mut notes)? {
                    keys.push(Key::File {
                        path: path.clone(),
                        key: Arc::new(key),
                    });
                }
            }
        } else {
            if let Some(sock) = std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty()) {
                let sock = PathBuf::from(sock);
                match agent_keys(&sock).await {
                    Ok(list) => {
                        if !list.is_empty() {
                            agent_socket = Some(sock);
                        }
                        keys.extend(list);
                    }
                    Err(e) => {
                        notes.push(format!("ssh-agent at {} not usable ({e})", sock.display()))
                    }
                }
            }
            let ssh_dir = config::home_dir().join(".ssh");
            for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
                let path = ssh_dir.join(name);
                if !path.exists() {
                    continue;
                }
                match read_key_file(&path) {
                    Ok(KeyFile::Plain(key)) => {
                        let in_agent = keys.iter().any(|k| match k {
                            Key::Agent { public, .. } => {
                                public.key_data() == key.public_key().key_data()
                            }
                            Key::File { .. } => false,
                        });
                        if !in_agent {
                            keys.push(Key::File {
                                path,
                                key: Arc::new(key),
                            });
                        }
                    }
                    Ok(KeyFile::Encrypted(enc)) => {
                        let in_agent = keys.iter().any(|k| match k {
                            Key::Agent { public, .. } => {
                                public.key_data() == enc.public_key().key_data()
                            }
                            Key::File { .. } => false,
                        });
                        if !in_agent {
                            notes.push(format!(
                                "skipped {}: it is encrypted; load it into ssh-agent (ssh-add {}) or pass it with --identity",
                                path.display(),
                                path.display()
                            ));
                        }
                    }
                    Err(e) => notes.push(format!("skipped {}: {e}", path.display())),
                }
            }
        }
        let password = if opts.password_stdin {
            PasswordSource::Given(read_password_stdin()?)
        } else if let Some(pw) = std::env::var("REMOTE_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty())
        {
            PasswordSource::Given(pw)
        } else if !opts.batch && terminal::can_prompt() {
            PasswordSource::Prompt(OnceCell::new())
        } else {
            PasswordSource::None
        };
        Ok(Credentials {
            keys,
            agent_socket,
            password,
            notes,
        })
    }

    /// Credentials made of the given parts (for tests and other front ends).
    pub fn new(keys: Vec<Key>, password: Option<String>) -> Credentials {
        Credentials {
            keys,
            agent_socket: None,
            password: match password {
                Some(p) => PasswordSource::Given(p),
                None => PasswordSource::None,
            },
            notes: Vec::new(),
        }
    }

    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The ssh-agent socket, when agent keys are offered.
    pub fn agent_socket(&self) -> Option<&Path> {
        self.agent_socket.as_deref()
    }

    /// Keys that were skipped, and why.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Whether a password could be offered (given, or asked on the terminal).
    pub fn has_password(&self) -> bool {
        !matches!(self.password, PasswordSource::None)
    }

    /// The password for `user` at `where_`: the given one, or asked once on the terminal.
    pub async fn password(&self, user: &str, where_: &str) -> Option<String> {
        match &self.password {
            PasswordSource::None => None,
            PasswordSource::Given(p) => Some(p.clone()),
            PasswordSource::Prompt(cell) => cell
                .get_or_init(|| async {
                    let prompt = format!("{user}@{where_}'s password: ");
                    tokio::task::spawn_blocking(move || terminal::read_secret(&prompt).ok())
                        .await
                        .ok()
                        .flatten()
                })
                .await
                .clone(),
        }
    }
}

/// The agent's plain keys (certificates are not used).
async fn agent_keys(sock: &Path) -> Result<Vec<Key>, russh::keys::Error> {
    let mut agent = AgentClient::connect_uds(sock).await?;
    let identities = agent.request_identities().await?;
    Ok(identities
        .into_iter()
        .filter_map(|id| match id {
            AgentIdentity::PublicKey { key, comment } => Some(Key::Agent {
                public: key,
                comment,
            }),
            AgentIdentity::Certificate { .. } => None,
        })
        .collect())
}

enum KeyFile {
    Plain(PrivateKey),
    Encrypted(PrivateKey),
}

fn read_key_file(path: &Path) -> Result<KeyFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    match russh::keys::decode_secret_key(&text, None) {
        Ok(key) => Ok(KeyFile::Plain(key)),
        Err(russh::keys::Error::KeyIsEncrypted) => match PrivateKey::from_openssh(&text) {
            Ok(key) => Ok(KeyFile::Encrypted(key)),
            // An encrypted key in an older format: no public half to show, still encrypted.
            Err(_) => Err("it is encrypted in a format this client cannot decrypt; load it into ssh-agent (ssh-add)".into()),
        },
        Err(e) => Err(e.to_string()),
    }
}

/// An explicitly given identity: read it, asking for its passphrase when it is encrypted
/// and a terminal is available; otherwise skip it with a note.
fn load_identity(
    path: &Path,
    batch: bool,
    notes: &mut Vec<String>,
) -> Result<Option<PrivateKey>, CredentialError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialError::ReadIdentity {
        path: path.to_path_buf(),
        source,
    })?;
    match russh::keys::decode_secret_key(&text, None) {
        Ok(key) => Ok(Some(key)),
        Err(russh::keys::Error::KeyIsEncrypted) => {
            let encrypted = PrivateKey::from_openssh(&text).ok();
            if batch || !terminal::can_prompt() {
                notes.push(format!(
                    "skipped {}: it is encrypted and there is no terminal to ask for its passphrase; load it into ssh-agent (ssh-add {})",
                    path.display(),
                    path.display()
                ));
                return Ok(None);
            }
            for _ in 0..3 {
                let prompt = format!("Enter passphrase for key {}: ", path.display());
                let Ok(pass) = terminal::read_secret(&prompt) else {
                    break;
                };
                let decrypted = match &encrypted {
                    Some(k) => k.decrypt(pass.as_bytes()).ok(),
                    None => russh::keys::decode_secret_key(&text, Some(&pass)).ok(),
                };
                if let Some(key) = decrypted {
                    return Ok(Some(key));
                }
            }
            Err(CredentialError::WrongPassphrase {
                path: path.to_path_buf(),
            })
        }
        Err(e) => {
            if PublicKey::from_openssh(text.trim()).is_ok() {
                return Err(CredentialError::PublicKeyGiven {
                    path: path.to_path_buf(),
                });
            }
            Err(CredentialError::BadIdentity {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    }
}

fn read_password_stdin() -> Result<String, CredentialError> {
    let mut line = String::new();
    let n = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(CredentialError::ReadStdin)?;
    if n == 0 {
        return Err(CredentialError::EmptyPasswordStdin);
    }
    while line.ends_with('\n') || line.ends_with('\r') {
        line.pop();
    }
    Ok(line)
}
