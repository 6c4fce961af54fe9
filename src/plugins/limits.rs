//! Per-call resource limits: a wall-clock deadline (wasmtime epochs ticked by
//! a background thread) and a memory cap per instance (a resource limiter).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Engine, ResourceLimiter};

/// Period of the epoch ticker: the resolution of the time limit.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Most table elements one instance may have.
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Most core instances, memories and tables in one plugin instance.
const MAX_INSTANCES: usize = 64;
const MAX_MEMORIES: usize = 16;
const MAX_TABLES: usize = 64;

/// The limits every hook call of a plugin runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time one call (instantiation, `init`, a hook) may take.
    pub time_limit: Duration,
    /// Bytes of linear memory one plugin instance may have, all memories together.
    pub memory_bytes: u64,
    /// Largest string a plugin may return, in bytes.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            time_limit: Duration::from_millis(50),
            memory_bytes: 64 << 20,
            max_output_bytes: 1 << 20,
        }
    }
}

impl Limits {
    /// The epoch deadline, in ticks, that covers `time_limit` (rounded up,
    /// plus one tick because the current tick is already partly over).
    pub(crate) fn deadline_ticks(&self) -> u64 {
        let tick = EPOCH_TICK.as_micros();
        (self.time_limit.as_micros().div_ceil(tick) as u64).max(1) + 1
    }
}

/// Caps the linear memory of one store (one plugin instance) and records
/// whether the cap was hit, so a resulting trap is reported as what it is.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    limit: usize,
    used: usize,
    hit: bool,
}

impl MemoryLimiter {
    pub(crate) fn new(limit: u64) -> Self {
        MemoryLimiter {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            used: 0,
            hit: false,
        }
    }

    /// Whether a memory growth was refused since the instance was created.
    pub(crate) fn hit(&self) -> bool {
        self.hit
    }

    /// The limit in bytes.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let used = self.used.saturating_sub(current).saturating_add(desired);
        if used > self.limit {
            self.hit = true;
            return Ok(false);
        }
        self.used = used;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// A thread that advances the engine's epoch every [`EPOCH_TICK`]; stores
/// set their deadline in ticks before each call. Stopped on drop.
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub(crate) fn start(engine: Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_covers_the_limit() {
        let limits = Limits {
            time_limit: Duration::from_millis(50),
            ..Limits::default()
        };
        let ticks = limits.deadline_ticks();
        assert!(EPOCH_TICK * (ticks as u32 - 1) >= limits.time_limit);
        let tiny = Limits {
            time_limit: Duration::from_micros(10),
            ..Limits::default()
        };
        assert_eq!(tiny.deadline_ticks(), 2);
    }

    #[test]
    fn limiter_counts_all_memories_and_records_a_hit() {
        let mut limiter = MemoryLimiter::new(100);
        assert!(limiter.memory_growing(0, 60, None).unwrap());
        assert!(limiter.memory_growing(0, 30, None).unwrap());
        assert!(!limiter.hit());
        assert!(!limiter.memory_growing(30, 50, None).unwrap());
        assert!(limiter.hit());
        assert!(limiter.memory_growing(60, 70, None).unwrap());
    }
}
