//! The `log` import: plugin log lines go to the daemon log, attributed to the
//! plugin, sanitized, cut to a maximum length and rate-limited per plugin.

use std::sync::Mutex;
use std::time::Instant;

use super::bindings::Level;

/// Lines a plugin may log in a burst.
const BURST: f64 = 20.0;
/// Lines per second a plugin may log on average.
const RATE: f64 = 10.0;
/// Longest line kept, in bytes.
const MAX_LINE: usize = 1024;

/// The rate-limited log of one plugin, shared by all its instances.
#[derive(Debug)]
pub(crate) struct GuestLog {
    plugin: String,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    dropped: u64,
}

impl GuestLog {
    pub(crate) fn new(plugin: &str) -> Self {
        GuestLog {
            plugin: plugin.to_owned(),
            bucket: Mutex::new(Bucket {
                tokens: BURST,
                refilled: Instant::now(),
                dropped: 0,
            }),
        }
    }

    /// Logs `message` unless the plugin is over its budget.
    pub(crate) fn log(&self, level: Level, message: &str) {
        let dropped = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * RATE).min(BURST);
            bucket.refilled = now;
            if bucket.tokens < 1.0 {
                bucket.dropped += 1;
                return;
            }
            bucket.tokens -= 1.0;
            std::mem::take(&mut bucket.dropped)
        };
        if dropped > 0 {
            log::warn!(target: "mistrald::plugin", "plugin '{}': {dropped} log lines dropped (rate limit)", self.plugin);
        }
        let line = sanitize(message);
        let level = match level {
            Level::Error => log::Level::Error,
            Level::Warn => log::Level::Warn,
            Level::Info => log::Level::Info,
            Level::Debug => log::Level::Debug,
        };
        log::log!(target: "mistrald::plugin", level, "plugin '{}': {line}", self.plugin);
    }
}

/// Replaces control characters (no forged log lines) and cuts long lines.
fn sanitize(message: &str) -> String {
    let mut line = String::with_capacity(message.len().min(MAX_LINE + 4));
    for c in message.chars() {
        if line.len() + c.len_utf8() > MAX_LINE {
            line.push('…');
            break;
        }
        line.push(if c.is_control() { ' ' } else { c });
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_removes_newlines_and_cuts() {
        assert_eq!(sanitize("a\nb\rc"), "a b c");
        let long = "é".repeat(2000);
        let cut = sanitize(&long);
        assert!(cut.len() <= MAX_LINE + '…'.len_utf8());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn budget_runs_out() {
        let log = GuestLog::new("t");
        for _ in 0..100 {
            log.log(Level::Debug, "x");
        }
        let bucket = log.bucket.lock().unwrap();
        assert!(
            bucket.dropped >= 100 - BURST as u64 - 2,
            "{}",
            bucket.dropped
        );
    }
}
