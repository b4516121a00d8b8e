//! Login checks every transport shares: password verification (argon2id, a few at a time,
//! with the same cost for unknown accounts so timing does not tell which names exist), and
//! slowing down password guessing: every failed attempt is delayed, more so the more a
//! connection and its source address have failed recently (in the spirit of sshd's
//! PerSourcePenalties). The table is bounded, so a flood of addresses cannot grow it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::accounts;

/// Password hashes checked at once: argon2id takes ~19 MiB and tens of ms by design.
pub struct PasswordChecker {
    slots: Semaphore,
}

impl Default for PasswordChecker {
    fn default() -> Self {
        PasswordChecker {
            slots: Semaphore::new(4),
        }
    }
}

impl PasswordChecker {
    /// Whether `password` matches the PHC string `hash`; with `None` (no such account, or no
    /// password) a dummy hash is checked so that the answer takes as long, and is false.
    pub async fn verify(&self, password: &str, hash: Option<String>) -> bool {
        let Ok(_slot) = self.slots.acquire().await else {
            return false;
        };
        let password = password.to_string();
        tokio::task::spawn_blocking(move || match hash {
            Some(h) => accounts::verify_password(&password, &h),
            None => {
                let _ = accounts::verify_password(&password, dummy_hash());
                false
            }
        })
        .await
        .unwrap_or(false)
    }
}

fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        accounts::hash_password("remote-agent timing equaliser").unwrap_or_default()
    })
}

/// Failures older than this are forgotten.
const WINDOW: Duration = Duration::from_secs(300);
/// Most addresses remembered at once.
const MAX_SOURCES: usize = 10_000;
/// Longest delay applied to one failed attempt.
const MAX_DELAY: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Throttle {
    sources: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Throttle {
    /// Record a failure from `ip` and return how long to delay the answer, given that the
    /// connection has now failed `conn_failures` times.
    pub fn failure(&self, ip: IpAddr, conn_failures: u32) -> Duration {
        let now = Instant::now();
        let mut map = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_SOURCES {
            map.retain(|_, (_, last)| now.duration_since(*last) < WINDOW);
            if map.len() >= MAX_SOURCES {
                map.clear();
            }
        }
        let entry = map.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= WINDOW {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        let source_failures = entry.0;
        delay_for(conn_failures, source_failures)
    }

    /// A successful login from `ip` clears its record.
    pub fn success(&self, ip: IpAddr) {
        let mut map = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&ip);
    }
}

/// 250 ms doubled for each earlier failure of the connection, plus 100 ms for each failure
/// of the address beyond the first ten in the window; at most `MAX_DELAY`.
fn delay_for(conn_failures: u32, source_failures: u32) -> Duration {
    let conn =
        Duration::from_millis(250) * 2u32.saturating_pow(conn_failures.saturating_sub(1).min(5));
    let source = Duration::from_millis(100) * source_failures.saturating_sub(10);
    (conn + source).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        assert_eq!(delay_for(1, 1), Duration::from_millis(250));
        assert_eq!(delay_for(2, 2), Duration::from_millis(500));
        assert!(delay_for(3, 30) > delay_for(3, 3));
        assert_eq!(delay_for(50, 5000), MAX_DELAY);
    }

    #[test]
    fn success_clears_and_table_is_bounded() {
        let t = Throttle::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for i in 1..=20 {
            t.failure(ip, i);
        }
        assert!(t.failure(ip, 1) > Duration::from_millis(250));
        t.success(ip);
        assert_eq!(t.failure(ip, 1), Duration::from_millis(250));
        for i in 0..(MAX_SOURCES as u32 + 10) {
            t.failure(IpAddr::from(i.to_be_bytes()), 1);
        }
        assert!(t.sources.lock().unwrap().len() <= MAX_SOURCES);
    }
}
