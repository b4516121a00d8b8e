//! Agent accounts: who may log in, with which password (argon2id hash) or SSH keys, whether
//! they are admins, and which OS user their commands run as. Owns the account file
//! (`accounts.toml` in the state dir, mode 0600, written atomically under a lock) and the
//! server-side view of it, which re-reads the file when it changes so that `user add` and
//! `user rm` take effect for new connections without a restart.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use russh::keys::PublicKey;
use serde::{Deserialize, Serialize};

use crate::paths;

/// The account file's name inside the state directory.
pub const ACCOUNTS_FILE: &str = "accounts.toml";

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error(
        "cannot read account file {path}: {source}. Check that it exists and is readable by the agent's user (0600, owned by it); `remote-agent user list` reads the same file"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "account file {path} is not valid: {message}. Fix or remove the offending entry (it is TOML)"
    )]
    Parse { path: PathBuf, message: String },
    #[error(
        "cannot write account file {path}: {source}. Check that the state dir is writable by this user"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("account '{0}' already exists: remove it first with `remote-agent user rm {0}`")]
    Exists(String),
    #[error("no account named '{0}' (see `remote-agent user list`)")]
    NotFound(String),
    #[error(
        "invalid account name '{0}': use 1-32 characters from a-z, 0-9, '_', '-', '.', starting with a letter or '_'"
    )]
    InvalidName(String),
    #[error("invalid public key in {origin}: {message}")]
    InvalidKey { origin: String, message: String },
    #[error(
        "cannot hash password: {0}. Try again; if it persists, report it with the agent's version"
    )]
    Hash(String),
}

/// One account as stored in the account file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    /// PHC string of an argon2id hash; absent when the account logs in by key only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// MD4 of the UTF-16LE password, needed for NTLM (WinRM). It is password-equivalent for
    /// NTLM, which is why the file is 0600; absent for --no-ntlm accounts. 32 lowercase hex
    /// characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nt_hash: Option<String>,
    /// OpenSSH public keys (`type base64 [comment]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorized_keys: Vec<String>,
    #[serde(default)]
    pub admin: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// OS user that this account's commands run as (only honoured when the agent runs as root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AccountFile {
    #[serde(default, rename = "account")]
    accounts: Vec<Account>,
}

/// Account names are used in logs, paths and as SSH user names: keep them boring.
pub fn validate_name(name: &str) -> Result<(), AccountError> {
    let mut chars = name.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let ok_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(c));
    if ok_first && ok_rest && name.len() <= 32 {
        Ok(())
    } else {
        Err(AccountError::InvalidName(name.to_string()))
    }
}

/// Hash a password with argon2id (default parameters, random salt) into a PHC string.
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Hash(e.to_string()))
}

/// The NT hash of a password as stored in [`Account::nt_hash`]: 32 lowercase hex characters.
pub fn nt_hash_hex(password: &str) -> String {
    crate::winrm::ntlm::nt_hash(password)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Check a password against a PHC string. Any malformed hash counts as a mismatch.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// Parse authorized_keys-style text: one key a line, `#` comments and blank lines ignored,
/// leading options (`no-pty,from="…" ssh-ed25519 AAAA…`) skipped. Returns normalised
/// `type base64 comment` lines.
pub fn parse_authorized_keys(text: &str, origin: &str) -> Result<Vec<String>, AccountError> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = tokens.iter().position(|t| is_key_type(t)) else {
            return Err(AccountError::InvalidKey {
                origin: format!("{origin} line {}", n + 1),
                message: "no key type (such as ssh-ed25519) found".into(),
            });
        };
        let candidate = tokens[at..].join(" ");
        let key = PublicKey::from_openssh(&candidate).map_err(|e| AccountError::InvalidKey {
            origin: format!("{origin} line {}", n + 1),
            message: e.to_string(),
        })?;
        let text = key.to_openssh().map_err(|e| AccountError::InvalidKey {
            origin: format!("{origin} line {}", n + 1),
            message: e.to_string(),
        })?;
        keys.push(text);
    }
    Ok(keys)
}

fn is_key_type(t: &str) -> bool {
    t.starts_with("ssh-")
        || t.starts_with("ecdsa-sha2-")
        || t.starts_with("sk-ssh-")
        || t.starts_with("sk-ecdsa-")
        || t.starts_with("rsa-sha2-")
}

/// The account file of one state directory.
#[derive(Debug, Clone)]
pub struct AccountStore {
    path: PathBuf,
}

impl AccountStore {
    pub fn new(state_dir: &Path) -> Self {
        AccountStore {
            path: state_dir.join(ACCOUNTS_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All accounts; a missing file means no accounts.
    pub fn load(&self) -> Result<Vec<Account>, AccountError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(AccountError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let file: AccountFile = toml::from_str(&text).map_err(|e| AccountError::Parse {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        Ok(file.accounts)
    }

    /// Apply `change` to the account list under an exclusive lock and write the result
    /// atomically, so concurrent `user add`/`user rm` never lose each other's work.
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut Vec<Account>) -> Result<T, AccountError>,
    ) -> Result<T, AccountError> {
        let write_err = |source| AccountError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        paths::ensure_private_dir(dir).map_err(write_err)?;
        let lock_path = dir.join(".accounts.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(write_err)?;
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| write_err(e.into()))?;
        let mut accounts = self.load()?;
        let out = change(&mut accounts)?;
        let text =
            toml::to_string_pretty(&AccountFile { accounts }).map_err(|e| AccountError::Parse {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        let header = "# remote-agent accounts. Edit with `remote-agent user add|rm`.\n";
        paths::write_private_atomic(&self.path, format!("{header}{text}").as_bytes())
            .map_err(write_err)?;
        Ok(out)
    }

    pub fn add(&self, account: Account) -> Result<(), AccountError> {
        validate_name(&account.name)?;
        self.update(|accounts| {
            if accounts.iter().any(|a| a.name == account.name) {
                return Err(AccountError::Exists(account.name.clone()));
            }
            accounts.push(account);
            Ok(())
        })
    }

    pub fn remove(&self, name: &str) -> Result<(), AccountError> {
        self.update(|accounts| {
            let before = accounts.len();
            accounts.retain(|a| a.name != name);
            if accounts.len() == before {
                return Err(AccountError::NotFound(name.to_string()));
            }
            Ok(())
        })
    }
}

/// The server's view of the account file: cached, re-read whenever the file's identity
/// (inode, size, mtime) changes. A file that fails to parse keeps the last good copy and is
/// reported in the log, so a typo does not lock everybody out or let anybody in.
#[derive(Debug)]
pub struct AccountDb {
    store: AccountStore,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    stamp: Option<(u64, u64, i64, i64)>,
    accounts: Vec<Account>,
}

impl AccountDb {
    pub fn new(store: AccountStore) -> Self {
        AccountDb {
            store,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The current account named `name`, if any.
    pub fn get(&self, name: &str) -> Option<Account> {
        let stamp = std::fs::metadata(self.store.path())
            .ok()
            .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()));
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.stamp != stamp || stamp.is_none() {
            match self.store.load() {
                Ok(accounts) => {
                    cache.accounts = accounts;
                    cache.stamp = stamp;
                }
                Err(e) => tracing::error!("{e}; keeping the accounts loaded before"),
            }
        }
        cache.accounts.iter().find(|a| a.name == name).cloned()
    }

    pub fn count(&self) -> usize {
        self.store.load().map(|a| a.len()).unwrap_or(0)
    }
}

impl Account {
    /// Whether `key` is one of this account's authorized keys.
    pub fn has_key(&self, key: &PublicKey) -> bool {
        self.authorized_keys.iter().any(|line| {
            PublicKey::from_openssh(line)
                .map(|k| k.key_data() == key.key_data())
                .unwrap_or(false)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHwf2HMM5TRXvo2SQJjsNkiDD5KqiiNjrGVv3UUh+mMT test@host";

    #[test]
    fn names() {
        assert!(validate_name("alice").is_ok());
        assert!(validate_name("_svc-1.x").is_ok());
        for bad in ["", "Alice", "1abc", "a b", "a/b", &"a".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn password_round_trip() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("s3cret ", &h));
        assert!(!verify_password("s3cret", "not a hash"));
    }

    #[test]
    fn nt_hash_hex_and_file_format() {
        // MS-NLMP 4.2.2.1.1: NTOWFv1("Password").
        assert_eq!(nt_hash_hex("Password"), "a4f49c406510bdcab6824ee7c30fd852");
        let without = Account {
            name: "k".into(),
            password_hash: None,
            nt_hash: None,
            authorized_keys: vec![],
            admin: false,
            groups: vec![],
            run_as: None,
        };
        let text = toml::to_string(&without).unwrap();
        assert!(!text.contains("nt_hash"), "{text}");
        let back: Account = toml::from_str(&text).unwrap();
        assert_eq!(back, without);
        let with = Account {
            nt_hash: Some(nt_hash_hex("pw")),
            ..without
        };
        let back: Account = toml::from_str(&toml::to_string(&with).unwrap()).unwrap();
        assert_eq!(back.nt_hash, with.nt_hash);
    }

    #[test]
    fn authorized_keys_with_options_and_comments() {
        let text = format!(
            "# comment\n\nno-pty,command=\"x y\" {KEY}\n{}\n",
            &KEY[..KEY.len() - 10]
        );
        let keys = parse_authorized_keys(&text, "test").unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys[0].starts_with("ssh-ed25519 AAAA"));
        assert!(parse_authorized_keys("ssh-ed25519 notbase64", "t").is_err());
        assert!(parse_authorized_keys("hello world", "t").is_err());
    }

    #[test]
    fn store_add_remove_and_db_sees_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = AccountStore::new(dir.path());
        let db = AccountDb::new(store.clone());
        assert!(db.get("alice").is_none());
        let alice = Account {
            name: "alice".into(),
            password_hash: Some(hash_password("pw").unwrap()),
            nt_hash: Some(nt_hash_hex("pw")),
            authorized_keys: parse_authorized_keys(KEY, "t").unwrap(),
            admin: true,
            groups: vec![],
            run_as: None,
        };
        store.add(alice.clone()).unwrap();
        assert!(matches!(
            store.add(alice.clone()),
            Err(AccountError::Exists(_))
        ));
        assert_eq!(db.get("alice").as_ref(), Some(&alice));
        let key = PublicKey::from_openssh(KEY).unwrap();
        assert!(db.get("alice").unwrap().has_key(&key));
        store.remove("alice").unwrap();
        assert!(db.get("alice").is_none());
        assert!(matches!(
            store.remove("alice"),
            Err(AccountError::NotFound(_))
        ));
    }
}
