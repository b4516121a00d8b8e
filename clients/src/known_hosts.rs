//! Host key trust, OpenSSH-style ("accept new, refuse changed"): the first key seen for a
//! host is recorded in the client's `known_hosts` (OpenSSH format, `[host]:port key` when
//! the port is not 22); later connections must present a recorded key, and a host whose
//! recorded key differs is refused with the file and line of the old entry.
//!
//! The file is read once per process and kept in memory; new entries are appended. Entries
//! may be hashed (`|1|salt|hash`, as `ssh-keygen -H` writes them), carry host patterns
//! (`*`, `?`, `!negation`, comma lists) and markers (`@revoked` keys are refused,
//! `@cert-authority` lines are ignored: host certificates are not used). Lines that do not
//! parse are skipped, as OpenSSH does. russh's own `check_known_hosts_path` is not used: it
//! counts lines wrongly after comments, gives up on the whole file at one bad line, and
//! treats a host whose recorded key has another type as unknown.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use russh::keys::ssh_key::known_hosts::HostPatterns;
use russh::keys::{HashAlg, PublicKey};
use thiserror::Error;

/// What [`KnownHosts::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The key was recorded for this host.
    Known,
    /// First contact: the key has just been recorded.
    Learned {
        /// `SHA256:…`
        fingerprint: String,
    },
    /// First contact with a read-only file ([`KnownHosts::read_only`]): the key would be
    /// trusted on first use, and is accepted for this connection without being recorded.
    Unrecorded {
        /// `SHA256:…`
        fingerprint: String,
    },
}

/// A host key that must not be trusted, or a known_hosts file that cannot be used.
#[derive(Debug, Error)]
pub enum KnownHostsError {
    #[error("{0}")]
    Changed(Box<ChangedKey>),
    #[error(
        "the host key of {host_port} ({fingerprint}) is marked @revoked in {path}:{line}: refusing to connect. \
         Ask the host's admin for its new key"
    )]
    Revoked {
        host_port: String,
        fingerprint: String,
        path: PathBuf,
        line: usize,
    },
    #[error("cannot read {path}: {source}; fix its permissions, or move it away to start afresh")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot record the host key of {host_port} in {path}: {source}; make the directory writable (or set XDG_CONFIG_HOME)"
    )]
    Write {
        host_port: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A host whose key differs from the one recorded.
#[derive(Debug)]
pub struct ChangedKey {
    pub host_port: String,
    /// The name the entry is recorded under (`[host]:port`).
    pub pattern: String,
    /// The key presented now.
    pub fingerprint: String,
    /// Type and fingerprint of the recorded key.
    pub recorded: String,
    pub path: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for ChangedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ChangedKey {
            host_port,
            pattern,
            fingerprint,
            recorded,
            path,
            line,
        } = self;
        let path = path.display();
        write!(
            f,
            "the host key of {host_port} has CHANGED: it is now {fingerprint}, but {path}:{line} records {recorded}. \
             Someone may be intercepting the connection, or the agent got a new key (reinstalled, new state directory). \
             If you trust the new key, delete line {line} of {path} (or run: ssh-keygen -R '{pattern}' -f {path}) and connect again"
        )
    }
}

/// One usable line of the file.
struct Entry {
    line: usize,
    marker: Marker,
    patterns: HostPatterns,
    key: PublicKey,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

struct State {
    entries: Vec<Entry>,
    /// Number of lines in the file, so appended entries get the right line numbers.
    lines: usize,
}

/// A known_hosts file, shared by all connections of a process.
pub struct KnownHosts {
    path: PathBuf,
    state: Mutex<Option<State>>,
    /// New hosts are recorded (false: [`KnownHosts::read_only`]).
    record: bool,
}

impl KnownHosts {
    pub fn new(path: PathBuf) -> KnownHosts {
        KnownHosts {
            path,
            state: Mutex::new(None),
            record: true,
        }
    }

    /// The same checks, but a new host is answered [`Verdict::Unrecorded`] and the file is
    /// never written (`remote test`: a diagnosis changes no trust).
    pub fn read_only(path: PathBuf) -> KnownHosts {
        KnownHosts {
            record: false,
            ..KnownHosts::new(path)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Check `key` for `host`:`port`; record it when the host is new.
    pub fn verify(
        &self,
        host: &str,
        port: u16,
        key: &PublicKey,
    ) -> Result<Verdict, KnownHostsError> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let loaded = match guard.take() {
            Some(state) => state,
            None => load(&self.path)?,
        };
        let state = guard.insert(loaded);
        let pattern = host_pattern(host, port);
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let host_port = display_host_port(host, port);
        let mut mismatch: Option<&Entry> = None;
        let mut known = false;
        for entry in state
            .entries
            .iter()
            .filter(|e| matches(&e.patterns, &pattern))
        {
            let same = entry.key.key_data() == key.key_data();
            match entry.marker {
                Marker::Revoked if same => {
                    return Err(KnownHostsError::Revoked {
                        host_port,
                        fingerprint,
                        path: self.path.clone(),
                        line: entry.line,
                    });
                }
                Marker::Revoked | Marker::CertAuthority => {}
                Marker::None if same => known = true,
                Marker::None => {
                    // Report the entry of the same key type first, as OpenSSH does.
                    let better = match mismatch {
                        None => true,
                        Some(m) => {
                            m.key.algorithm() != key.algorithm()
                                && entry.key.algorithm() == key.algorithm()
                        }
                    };
                    if better {
                        mismatch = Some(entry);
                    }
                }
            }
        }
        if known {
            return Ok(Verdict::Known);
        }
        if let Some(old) = mismatch {
            return Err(KnownHostsError::Changed(Box::new(ChangedKey {
                host_port,
                pattern,
                fingerprint,
                recorded: format!(
                    "{} {}",
                    old.key.algorithm().as_str(),
                    old.key.fingerprint(HashAlg::Sha256)
                ),
                path: self.path.clone(),
                line: old.line,
            })));
        }
        if !self.record {
            return Ok(Verdict::Unrecorded { fingerprint });
        }
        let line = append(&self.path, &pattern, key).map_err(|source| KnownHostsError::Write {
            host_port,
            path: self.path.clone(),
            source,
        })?;
        state.lines = line.max(state.lines + 1);
        state.entries.push(Entry {
            line: state.lines,
            marker: Marker::None,
            patterns: HostPatterns::Patterns(vec![pattern]),
            key: key.clone(),
        });
        Ok(Verdict::Learned { fingerprint })
    }
}

/// The name under which a host is recorded: `host`, or `[host]:port` when port ≠ 22.
/// Host names are compared in lower case, as OpenSSH does.
pub fn host_pattern(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if port == 22 {
        host
    } else {
        format!("[{host}]:{port}")
    }
}

fn display_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn load(path: &Path) -> Result<State, KnownHostsError> {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(KnownHostsError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut entries = Vec::new();
    let mut lines = 0;
    for (i, line) in text.lines().enumerate() {
        lines = i + 1;
        if let Some(entry) = parse_line(line, i + 1) {
            entries.push(entry);
        } else if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            tracing::debug!("{}:{}: unreadable line skipped", path.display(), i + 1);
        }
    }
    Ok(State { entries, lines })
}

fn parse_line(line: &str, number: usize) -> Option<Entry> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = line.split_whitespace();
    let mut first = fields.next()?;
    let marker = match first {
        "@revoked" => Marker::Revoked,
        "@cert-authority" => Marker::CertAuthority,
        m if m.starts_with('@') => return None,
        _ => Marker::None,
    };
    if marker != Marker::None {
        first = fields.next()?;
    }
    let patterns: HostPatterns = first.parse().ok()?;
    let key_type = fields.next()?;
    let key_data = fields.next()?;
    let key = PublicKey::from_openssh(&format!("{key_type} {key_data}")).ok()?;
    Some(Entry {
        line: number,
        marker,
        patterns,
        key,
    })
}

/// Whether `name` (`host` or `[host]:port`) is matched by an entry's host patterns.
fn matches(patterns: &HostPatterns, name: &str) -> bool {
    match patterns {
        HostPatterns::HashedName { salt, hash } => {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
            ring::hmac::verify(&key, name.as_bytes(), hash).is_ok()
        }
        HostPatterns::Patterns(list) => {
            let mut matched = false;
            for p in list {
                let (negated, p) = match p.strip_prefix('!') {
                    Some(rest) => (true, rest),
                    None => (false, p.as_str()),
                };
                if glob(&p.to_ascii_lowercase(), name) {
                    if negated {
                        return false;
                    }
                    matched = true;
                }
            }
            matched
        }
    }
}

/// OpenSSH's `match_pattern`: `*` any run of characters, `?` one character.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Append `pattern key` to the file (created 0600 in a 0700 directory); returns the line
/// number of the new entry.
fn append(path: &Path, pattern: &str, key: &PublicKey) -> std::io::Result<usize> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let existing = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut key = key.clone();
    key.set_comment("");
    let key_text = key.to_openssh().map_err(std::io::Error::other)?;
    let mut record = String::new();
    if !existing.is_empty() && !existing.ends_with(b"\n") {
        record.push('\n');
    }
    record.push_str(&format!("{pattern} {}\n", key_text.trim_end()));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    // One write: concurrent `remote` processes append whole lines.
    f.write_all(record.as_bytes())?;
    let before = existing.iter().filter(|&&b| b == b'\n').count()
        + usize::from(!existing.is_empty() && !existing.ends_with(b"\n"));
    Ok(before + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    const K2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILIG2T/B0l0gaqj3puu510tu9N1OkQ4znY3LYuEm5zCF";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
    }

    #[test]
    fn learn_then_know_then_refuse_a_changed_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/known_hosts");
        let kh = KnownHosts::new(path.clone());
        assert!(matches!(
            kh.verify("Web1", 2222, &key(K1)).unwrap(),
            Verdict::Learned { .. }
        ));
        assert_eq!(kh.verify("web1", 2222, &key(K1)).unwrap(), Verdict::Known);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("[web1]:2222 {K1}\n"));
        // A fresh reader (another process) sees the same.
        let kh2 = KnownHosts::new(path.clone());
        assert_eq!(kh2.verify("web1", 2222, &key(K1)).unwrap(), Verdict::Known);
        match kh2.verify("web1", 2222, &key(K2)) {
            Err(KnownHostsError::Changed(c)) => {
                assert_eq!(c.line, 1);
                assert_eq!(c.pattern, "[web1]:2222");
            }
            other => panic!("{other:?}"),
        }
        // Another port is another host.
        assert!(matches!(
            kh2.verify("web1", 2223, &key(K2)).unwrap(),
            Verdict::Learned { .. }
        ));
    }

    #[test]
    fn read_only_checks_but_never_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        let kh = KnownHosts::read_only(path.clone());
        assert!(matches!(
            kh.verify("h", 2222, &key(K1)).unwrap(),
            Verdict::Unrecorded { .. }
        ));
        assert!(!path.exists());
        std::fs::write(&path, format!("[h]:2222 {K1}\n")).unwrap();
        let kh = KnownHosts::read_only(path.clone());
        assert_eq!(kh.verify("h", 2222, &key(K1)).unwrap(), Verdict::Known);
        assert!(matches!(
            kh.verify("h", 2222, &key(K2)),
            Err(KnownHostsError::Changed(c)) if c.line == 1
        ));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("[h]:2222 {K1}\n")
        );
    }

    #[test]
    fn line_numbers_count_comments_blank_and_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(
            &path,
            format!("# comment\n\ngarbage line\nother {K2}\n[h]:2222\t{K1}  comment here\n"),
        )
        .unwrap();
        let kh = KnownHosts::new(path.clone());
        match kh.verify("h", 2222, &key(K2)) {
            Err(e @ KnownHostsError::Changed(_)) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("{}:5", path.display())), "{msg}");
                assert!(msg.contains("delete line 5"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(kh.verify("h", 2222, &key(K1)).unwrap(), Verdict::Known);
        // A new entry after a file without a final newline.
        std::fs::write(&path, format!("other {K2}")).unwrap();
        let kh = KnownHosts::new(path.clone());
        kh.verify("new", 22, &key(K1)).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("other {K2}\nnew {K1}\n")
        );
    }

    #[test]
    fn hashed_patterns_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        // From russh's own tests: |1|...| is example.com (port 22).
        std::fs::write(
            &path,
            format!(
                "|1|O33ESRMWPVkMYIwJ1Uw+n877jTo=|nuuC5vEqXlEZ/8BXQR7m619W6Ak= {K2}\n*.example.org,!bad.example.org {K1}\n@revoked * {K2}\n"
            ),
        )
        .unwrap();
        let kh = KnownHosts::new(path.clone());
        assert!(matches!(
            kh.verify("example.com", 22, &key(K1)),
            Err(KnownHostsError::Changed(c)) if c.line == 1
        ));
        assert_eq!(
            kh.verify("a.example.org", 22, &key(K1)).unwrap(),
            Verdict::Known
        );
        assert!(matches!(
            kh.verify("bad.example.org", 22, &key(K1)).unwrap(),
            Verdict::Learned { .. }
        ));
        assert!(matches!(
            kh.verify("x.example.org", 22, &key(K2)),
            Err(KnownHostsError::Revoked { line: 3, .. })
        ));
    }

    #[test]
    fn globs() {
        assert!(glob("*.example.org", "a.example.org"));
        assert!(glob("web?", "web1"));
        assert!(!glob("web?", "web12"));
        assert!(glob("*", ""));
        assert!(glob("[h]:*", "[h]:2222"));
        assert!(!glob("a*b", "acbd"));
        assert!(glob("a*b*", "acbd"));
    }
}
