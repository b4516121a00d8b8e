//! `remote-agent endpoint list|add|set|rm`: edits the `[endpoints.NAME]` tables of the
//! agent's config file in place, keeping everything else in it (comments, order, other
//! tables) as written, and refuses any edit that would leave the file invalid.

use std::path::{Path, PathBuf};

use toml_edit::{Array, DocumentMut, Item, Table, value};

use crate::config::FileConfig;
use crate::endpoints::{DEFAULT_ENDPOINT, Endpoint, Endpoints, RunPolicy, validate_name};

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML: {message}; fix it by hand first")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "endpoint '{0}' already exists: change it with `remote-agent endpoint set {0} KEY=VALUE…`"
    )]
    Exists(String),
    #[error("no endpoint '{name}' in {path}: `remote-agent endpoint list` shows them")]
    Missing { name: String, path: PathBuf },
}

const LISTS: &[&str] = &["users", "groups", "commands"];
const NUMBERS: &[&str] = &[
    "max_received_mb_per_command",
    "max_input_mb_per_command",
    "max_sessions_per_user",
    "max_commands_per_user",
    "max_connections",
    "idle_timeout_secs",
    "operation_timeout_secs",
    "open_timeout_secs",
];
const TEXTS: &[&str] = &["run", "run_as", "workdir", "buffering"];

/// Settings `endpoint add|set` understands, as `KEY=VALUE` (lists comma-separated,
/// `env.NAME=VALUE` for the environment, `KEY=` to remove a setting), for messages.
fn keys() -> String {
    let all: Vec<&str> = LISTS
        .iter()
        .chain(TEXTS)
        .chain(&["env.NAME"])
        .chain(NUMBERS)
        .copied()
        .collect();
    all.join(", ")
}

/// The config file's text (empty when the file does not exist yet).
fn read(path: &Path) -> Result<String, EditError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(EditError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The endpoints a config text defines, with the built-in `default` when it does not;
/// refused when the text is not a valid configuration.
fn endpoints_of(text: &str, path: &Path) -> Result<Endpoints, EditError> {
    let file = FileConfig::parse(text, path).map_err(|e| EditError::Invalid(e.to_string()))?;
    Endpoints::from_files(&file.endpoints).map_err(|e| EditError::Invalid(e.to_string()))
}

/// The config file as a document to edit (empty when the file does not exist yet).
fn load(path: &Path) -> Result<DocumentMut, EditError> {
    read(path)?
        .parse::<DocumentMut>()
        .map_err(|e| EditError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Every endpoint the config at `path` defines, with the built-in `default` when it does not.
pub fn list(path: &Path) -> Result<Endpoints, EditError> {
    endpoints_of(&read(path)?, path)
}

/// A table of endpoints for people: name, who, what runs, quotas.
pub fn render(endpoints: &Endpoints) -> String {
    let rows: Vec<[String; 4]> = endpoints
        .all()
        .iter()
        .map(|e| {
            let runs = match &e.run {
                RunPolicy::Shell => "shell".to_string(),
                RunPolicy::Commands(_) => format!("only: {}", e.allowed_commands()),
            };
            let quotas = format!(
                "out {} MB, in {} MB per command; {} sessions/user",
                e.limits.max_received_mb_per_command,
                e.limits.max_input_mb_per_command,
                e.limits.max_sessions_per_user
            );
            [e.name.clone(), e.allowed(), runs, quotas]
        })
        .collect();
    let head = ["NAME", "WHO", "RUNS", "QUOTAS"];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 4]| {
        for (i, c) in cells.iter().enumerate() {
            if i + 1 < cells.len() {
                out.push_str(&format!("{c:<w$}  ", w = width[i]));
            } else {
                out.push_str(c);
            }
        }
        out.push('\n');
    };
    line(head);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3]]);
    }
    out
}

/// Add endpoint `name` with `settings`.
pub fn add(path: &Path, name: &str, settings: &[String]) -> Result<(), EditError> {
    validate_name(name).map_err(EditError::Invalid)?;
    let mut doc = load(path)?;
    if endpoint_table(&mut doc, name, false)?.is_some() {
        return Err(EditError::Exists(name.to_string()));
    }
    if name == DEFAULT_ENDPOINT {
        return Err(EditError::Exists(name.to_string()));
    }
    let table = endpoint_table(&mut doc, name, true)?
        .ok_or_else(|| EditError::Invalid(format!("cannot make [endpoints.{name}]")))?;
    apply(table, settings)?;
    save(path, &doc)
}

/// Change settings of endpoint `name` (the built-in `default` is written out first).
pub fn set(path: &Path, name: &str, settings: &[String]) -> Result<(), EditError> {
    let mut doc = load(path)?;
    let exists = endpoint_table(&mut doc, name, false)?.is_some();
    if !exists && name != DEFAULT_ENDPOINT {
        return Err(EditError::Missing {
            name: name.to_string(),
            path: path.to_path_buf(),
        });
    }
    let table = endpoint_table(&mut doc, name, true)?
        .ok_or_else(|| EditError::Invalid(format!("cannot make [endpoints.{name}]")))?;
    if !exists {
        // The built-in definition, so that `set default users=…` keeps admins in.
        let builtin = Endpoint::builtin_default();
        table.insert("groups", value(string_array(&builtin.groups)));
    }
    apply(table, settings)?;
    save(path, &doc)
}

/// Remove endpoint `name`. Returns whether the built-in `default` applies again.
pub fn rm(path: &Path, name: &str) -> Result<bool, EditError> {
    let mut doc = load(path)?;
    let removed = doc
        .get_mut("endpoints")
        .and_then(Item::as_table_like_mut)
        .and_then(|t| t.remove(name))
        .is_some();
    if !removed {
        return Err(EditError::Missing {
            name: name.to_string(),
            path: path.to_path_buf(),
        });
    }
    save(path, &doc)?;
    Ok(name == DEFAULT_ENDPOINT)
}

/// `[endpoints.NAME]`, made when `create`.
fn endpoint_table<'d>(
    doc: &'d mut DocumentMut,
    name: &str,
    create: bool,
) -> Result<Option<&'d mut Table>, EditError> {
    if !doc.contains_key("endpoints") {
        if !create {
            return Ok(None);
        }
        let mut t = Table::new();
        t.set_implicit(true);
        doc.insert("endpoints", Item::Table(t));
    }
    let Some(endpoints) = doc.get_mut("endpoints").and_then(Item::as_table_mut) else {
        return Err(EditError::Invalid(
            "`endpoints` in the config file is not a table of [endpoints.NAME] tables".into(),
        ));
    };
    if !endpoints.contains_key(name) {
        if !create {
            return Ok(None);
        }
        endpoints.insert(name, Item::Table(Table::new()));
    }
    match endpoints.get_mut(name).and_then(Item::as_table_mut) {
        Some(t) => Ok(Some(t)),
        None => Err(EditError::Invalid(format!(
            "[endpoints.{name}] in the config file is not a table"
        ))),
    }
}

/// Apply `KEY=VALUE` settings to an endpoint's table.
fn apply(table: &mut Table, settings: &[String]) -> Result<(), EditError> {
    for s in settings {
        let Some((key, val)) = s.split_once('=') else {
            return Err(EditError::Invalid(format!(
                "'{s}' is not KEY=VALUE; keys: {}",
                keys()
            )));
        };
        let (key, val) = (key.trim(), val.trim());
        if let Some(var) = key.strip_prefix("env.") {
            if var.is_empty() || var.contains('=') {
                return Err(EditError::Invalid(format!("'{key}' names no variable")));
            }
            if !table.contains_key("env") {
                table.insert("env", Item::Table(Table::new()));
            }
            let env = table
                .get_mut("env")
                .and_then(Item::as_table_like_mut)
                .ok_or_else(|| EditError::Invalid("env of the endpoint is not a table".into()))?;
            if val.is_empty() {
                env.remove(var);
            } else {
                env.insert(var, value(val));
            }
            continue;
        }
        if val.is_empty() {
            table.remove(key);
            continue;
        }
        if LISTS.contains(&key) {
            let items: Vec<String> = val
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(String::from)
                .collect();
            table.insert(key, value(string_array(&items)));
        } else if NUMBERS.contains(&key) {
            let n: i64 = val.parse().map_err(|_| {
                EditError::Invalid(format!("{key} takes a whole number, not '{val}'"))
            })?;
            table.insert(key, value(n));
        } else if TEXTS.contains(&key) {
            table.insert(key, value(val));
        } else {
            return Err(EditError::Invalid(format!(
                "unknown setting '{key}'; keys: {}",
                keys()
            )));
        }
    }
    Ok(())
}

fn string_array(items: &[String]) -> Array {
    let mut a = Array::new();
    for i in items {
        a.push(i.as_str());
    }
    a
}

/// Check the whole file still makes a valid configuration, then write it (0600 when new).
fn save(path: &Path, doc: &DocumentMut) -> Result<(), EditError> {
    let text = doc.to_string();
    endpoints_of(&text, path)?;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|source| EditError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    crate::paths::write_private_atomic(path, text.as_bytes()).map_err(|source| EditError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_set_rm_keep_the_rest_of_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "# my agent\n[ssh]\nlisten = \"127.0.0.1:2222\" # mine\n",
        )
        .expect("write");
        add(
            &path,
            "restricted",
            &["users=carol,dave".into(), "commands=uptime,df".into()],
        )
        .expect("add");
        set(
            &path,
            "restricted",
            &["max_received_mb_per_command=5".into(), "env.LANG=C".into()],
        )
        .expect("set");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("# my agent\n[ssh]\nlisten = \"127.0.0.1:2222\" # mine\n"));
        let all = list(&path).expect("list");
        let e = all.get("restricted").expect("restricted");
        assert_eq!(e.limits.max_received_mb_per_command, 5);
        assert_eq!(e.allowed_commands(), "uptime, df");
        assert!(all.get("default").is_some());
        assert!(render(&all).contains("only: uptime, df"));

        assert!(matches!(
            add(&path, "restricted", &[]),
            Err(EditError::Exists(_))
        ));
        // An edit that would make the file invalid is refused and changes nothing.
        let before = std::fs::read_to_string(&path).expect("read");
        assert!(set(&path, "restricted", &["run=shell".into()]).is_err());
        assert!(set(&path, "restricted", &["colour=blue".into()]).is_err());
        assert_eq!(std::fs::read_to_string(&path).expect("read"), before);

        // `set default` writes the built-in one out first: admins stay in.
        set(&path, "default", &["users=ops1".into()]).expect("set default");
        let d = list(&path).expect("list");
        assert_eq!(
            d.get("default").expect("default").allowed(),
            "admins, user ops1"
        );
        assert!(rm(&path, "default").expect("rm"));
        assert!(!rm(&path, "restricted").expect("rm"));
        assert!(matches!(
            rm(&path, "restricted"),
            Err(EditError::Missing { .. })
        ));
    }
}
