//! Targets as written on the command line (design.md §5): `[scheme://][user@]host[:port]`,
//! several of them separated by commas. A bare host means SSH to the agent's port 2222; IPv6
//! addresses go in brackets (`[::1]:2222`, or a bare `::1` without a port). `winrm://`
//! (HTTP, port 5985) and `winrms://` (HTTPS, 5986) reach WinRM servers; `relay://AGENT`
//! reaches an agent through the relay given by --relay / REMOTE_RELAY. Some commands need
//! the session protocol, SSH or relay ([`Target::require_ssh`]).

use std::fmt;

use thiserror::Error;

/// The agent's SSH port (not 22: the agent runs beside the host's own sshd).
pub const DEFAULT_SSH_PORT: u16 = 2222;
pub const DEFAULT_WINRM_PORT: u16 = 5985;
pub const DEFAULT_WINRMS_PORT: u16 = 5986;
pub const DEFAULT_RELAY_PORT: u16 = 7443;

/// How a target is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Ssh,
    Winrm,
    Winrms,
    Relay,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Ssh => "ssh",
            Scheme::Winrm => "winrm",
            Scheme::Winrms => "winrms",
            Scheme::Relay => "relay",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Ssh => DEFAULT_SSH_PORT,
            Scheme::Winrm => DEFAULT_WINRM_PORT,
            Scheme::Winrms => DEFAULT_WINRMS_PORT,
            Scheme::Relay => DEFAULT_RELAY_PORT,
        }
    }
}

/// One parsed target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The target as the user wrote it (trimmed).
    pub spec: String,
    pub scheme: Scheme,
    /// `None`: the local user name (see [`crate::config::default_user`]).
    pub user: Option<String>,
    /// Host name or address, without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

/// A target that cannot be used, with what to write instead.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TargetError {
    #[error(
        "no target given in '{list}': write [user@]host[:port], several separated by commas (web1,web2,alice@10.0.0.5:2222)"
    )]
    Empty { list: String },
    #[error(
        "unknown scheme '{scheme}://' in target '{target}': use ssh:// (the default for a bare host), winrm://, winrms:// or relay://"
    )]
    UnknownScheme { target: String, scheme: String },
    #[error("no host name in target '{target}': write [user@]host[:port], e.g. alice@web1:2222")]
    NoHost { target: String },
    #[error(
        "empty user name in target '{target}': write user@host, or leave out 'user@' to log in as yourself"
    )]
    EmptyUser { target: String },
    #[error(
        "invalid port '{port}' in target '{target}': a port is a number from 1 to 65535, e.g. web1:2222"
    )]
    BadPort { target: String, port: String },
    #[error(
        "invalid host '{host}' in target '{target}': a host name or address has no spaces or control characters; IPv6 addresses go in brackets: [::1]:2222"
    )]
    BadHost { target: String, host: String },
    #[error(
        "{target}: {scheme}:// targets are not supported yet by this build of remote; reach the agent over SSH instead (ssh://[user@]host, agent port {ssh_port})"
    )]
    NotSupported {
        target: String,
        scheme: &'static str,
        ssh_port: u16,
    },
    #[error(
        "{target}: `remote {command}` needs the SSH transport ({reason}); use an ssh:// target for it (remote-agent's SSH port is {ssh_port} by default)"
    )]
    NeedsSsh {
        target: String,
        command: &'static str,
        reason: &'static str,
        ssh_port: u16,
    },
}

impl Target {
    /// Parse one target.
    pub fn parse(spec: &str) -> Result<Target, TargetError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(TargetError::Empty { list: spec.into() });
        }
        let (scheme, rest) = match spec.split_once("://") {
            Some((s, rest)) => {
                let scheme = match s.to_ascii_lowercase().as_str() {
                    "ssh" => Scheme::Ssh,
                    "winrm" => Scheme::Winrm,
                    "winrms" => Scheme::Winrms,
                    "relay" => Scheme::Relay,
                    _ => {
                        return Err(TargetError::UnknownScheme {
                            target: spec.into(),
                            scheme: s.into(),
                        });
                    }
                };
                (scheme, rest)
            }
            None => (Scheme::Ssh, spec),
        };
        // A trailing slash (ssh://host/) is harmless; anything after it is not ours to read.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        // WinRM's path is always /wsman; accept it written out (winrm://host:5985/wsman).
        let rest = match scheme {
            Scheme::Winrm | Scheme::Winrms => {
                let cut = rest.len().saturating_sub(6);
                match rest.get(cut..) {
                    Some(tail) if tail.eq_ignore_ascii_case("/wsman") => &rest[..cut],
                    _ => rest,
                }
            }
            _ => rest,
        };
        let (user, hostport) = match rest.rsplit_once('@') {
            Some(("", _)) => {
                return Err(TargetError::EmptyUser {
                    target: spec.into(),
                });
            }
            Some((u, h)) => (Some(u.to_string()), h),
            None => (None, rest),
        };
        let no_host = || TargetError::NoHost {
            target: spec.into(),
        };
        let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
            let (host, after) = inner.split_once(']').ok_or_else(no_host)?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return Err(no_host()),
                },
            }
        } else if hostport.matches(':').count() > 1 {
            // A bare IPv6 address: no room for a port.
            (hostport, None)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(no_host());
        }
        if host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '@' | '[' | ']' | ','))
        {
            return Err(TargetError::BadHost {
                target: spec.into(),
                host: host.into(),
            });
        }
        let port = match port {
            None => scheme.default_port(),
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(TargetError::BadPort {
                        target: spec.into(),
                        port: p.into(),
                    });
                }
            },
        };
        Ok(Target {
            spec: spec.into(),
            scheme,
            user,
            host: host.into(),
            port,
        })
    }

    /// Parse a comma-separated list of targets (`web1,web2:2223,alice@[::1]`).
    pub fn parse_list(list: &str) -> Result<Vec<Target>, TargetError> {
        let mut targets = Vec::new();
        for part in list.split(',') {
            if part.trim().is_empty() {
                return Err(TargetError::Empty { list: list.into() });
            }
            targets.push(Target::parse(part)?);
        }
        Ok(targets)
    }

    /// Every scheme is spoken by this build (kept for the day one is not).
    pub fn require_supported(&self) -> Result<(), TargetError> {
        Ok(())
    }

    /// For `remote COMMAND`, which needs the session protocol (SSH or a relay: a terminal,
    /// live attach, listing sessions): refuse WinRM, saying why.
    pub fn require_ssh(&self, command: &'static str) -> Result<(), TargetError> {
        match self.scheme {
            Scheme::Ssh | Scheme::Relay => Ok(()),
            Scheme::Winrm | Scheme::Winrms => Err(TargetError::NeedsSsh {
                target: self.spec.clone(),
                command,
                reason: match command {
                    "shell" => "WinRM's cmd shell has no terminal",
                    "attach" => {
                        "a WinRM shell keeps no journal to replay and no live stream to join; \
                         use `remote exec` and `remote receive` on WinRM sessions"
                    }
                    "session list" => {
                        "WinRM servers do not list shells to this client; \
                         WinRM sessions opened from here are in the client's session record"
                    }
                    _ => "WinRM cannot do it",
                },
                ssh_port: DEFAULT_SSH_PORT,
            }),
        }
    }

    /// A relay target (`relay://AGENT`): the host is the agent's name at the relay.
    pub fn is_relay(&self) -> bool {
        self.scheme == Scheme::Relay
    }

    /// A WinRM target (`winrm://` or `winrms://`).
    pub fn is_winrm(&self) -> bool {
        matches!(self.scheme, Scheme::Winrm | Scheme::Winrms)
    }

    /// `TARGET/ID`: how a session on this target is named on the command line.
    pub fn session_ref(&self, id: &str) -> String {
        format!("{}/{id}", self.spec.trim_end_matches('/'))
    }

    /// `host:port` (brackets around IPv6), for messages and connecting.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The short name used to prefix output lines: the host, plus the port when it is not
    /// the scheme's default (so two agents on one host stay apart).
    pub fn label(&self) -> String {
        if self.port == self.scheme.default_port() {
            self.host.clone()
        } else {
            self.host_port()
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Target {
        Target::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn bare_host_is_ssh_on_2222() {
        let x = t("web1");
        assert_eq!(x.scheme, Scheme::Ssh);
        assert_eq!(
            (x.host.as_str(), x.port, x.user.clone()),
            ("web1", 2222, None)
        );
        assert_eq!(x.label(), "web1");
        assert_eq!(x.host_port(), "web1:2222");
    }

    #[test]
    fn user_port_scheme_and_ipv6() {
        let x = t("ssh://alice@10.0.0.5:2223");
        assert_eq!(x.user.as_deref(), Some("alice"));
        assert_eq!((x.host.as_str(), x.port), ("10.0.0.5", 2223));
        assert_eq!(x.label(), "10.0.0.5:2223");
        let x = t("bob@[::1]:2200");
        assert_eq!((x.host.as_str(), x.port), ("::1", 2200));
        assert_eq!(x.host_port(), "[::1]:2200");
        let x = t("[fe80::1]");
        assert_eq!((x.host.as_str(), x.port), ("fe80::1", 2222));
        let x = t("::1");
        assert_eq!((x.host.as_str(), x.port), ("::1", 2222));
        let x = t("me@corp@host");
        assert_eq!(x.user.as_deref(), Some("me@corp"));
    }

    #[test]
    fn winrm_and_relay_targets() {
        for (s, port) in [("winrm://h", 5985), ("winrms://h", 5986)] {
            let x = t(s);
            assert_eq!(x.port, port);
            assert!(x.is_winrm());
            assert!(x.require_supported().is_ok());
            let e = x.require_ssh("attach").unwrap_err().to_string();
            assert!(e.contains("needs the SSH transport"), "{e}");
            assert_eq!(x.label(), "h");
        }
        let x = t("WinRMs://alice@10.0.0.5:6000/");
        assert_eq!(x.scheme, Scheme::Winrms);
        assert_eq!(x.user.as_deref(), Some("alice"));
        assert_eq!(x.port, 6000);
        assert_eq!(x.label(), "10.0.0.5:6000");
        assert_eq!(x.session_ref("ABC"), "WinRMs://alice@10.0.0.5:6000/ABC");
        let x = t("winrm://h:5985/wsman/");
        assert_eq!((x.host.as_str(), x.port), ("h", 5985));
        assert_eq!(t("winrm://h/WSMAN").host, "h");
        let x = t("relay://agent1");
        assert!(x.is_relay());
        assert_eq!(x.host, "agent1");
        assert!(x.require_supported().is_ok());
        assert!(x.require_ssh("attach").is_ok());
        assert!(t("ssh://h").require_ssh("shell").is_ok());
        assert!(!t("h").is_winrm());
    }

    #[test]
    fn errors_say_what_to_write() {
        assert!(matches!(
            Target::parse("ftp://h"),
            Err(TargetError::UnknownScheme { .. })
        ));
        assert!(matches!(
            Target::parse("h:0"),
            Err(TargetError::BadPort { .. })
        ));
        assert!(matches!(
            Target::parse("h:99999"),
            Err(TargetError::BadPort { .. })
        ));
        assert!(matches!(
            Target::parse("alice@"),
            Err(TargetError::NoHost { .. })
        ));
        assert!(matches!(
            Target::parse("@h"),
            Err(TargetError::EmptyUser { .. })
        ));
        assert!(matches!(
            Target::parse("[::1"),
            Err(TargetError::NoHost { .. })
        ));
        assert!(matches!(
            Target::parse_list("a,,b"),
            Err(TargetError::Empty { .. })
        ));
    }

    #[test]
    fn lists_split_on_commas() {
        let v = Target::parse_list("a, b:2223 ,alice@[::1]:7").unwrap();
        let labels: Vec<_> = v.iter().map(Target::label).collect();
        assert_eq!(labels, ["a", "b:2223", "[::1]:7"]);
    }
}
