//! Store counters: live atomics in each process, summed into the namespace's
//! `stats.json` so `memferry kv stats` sees every process's work.

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::error::IoContext;
use crate::storage::durable::write_atomic;

/// Counters file inside a namespace directory.
pub const STATS_FILE: &str = "stats.json";
const STATS_LOCK: &str = "stats.lock";

/// Event counts. In [`super::KvStore::stats`] they count this process's
/// work since it opened the store; in `stats.json` every process's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Keys a lookup found.
    pub hits: u64,
    /// Keys a lookup asked for but did not find.
    pub misses: u64,
    /// Blocks written.
    pub stores: u64,
    /// Stores skipped because a valid block was already there.
    pub already_stored: u64,
    /// Stores refused because the store queue was full.
    pub dropped: u64,
    /// Blocks loaded and verified.
    pub loads: u64,
    /// Keys whose load or store failed.
    pub failed: u64,
    /// Blocks removed to respect the capacity or the watermarks.
    pub evictions: u64,
}

impl Counters {
    /// Adds `o`'s counts to these.
    pub fn add(&mut self, o: &Counters) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.stores += o.stores;
        self.already_stored += o.already_stored;
        self.dropped += o.dropped;
        self.loads += o.loads;
        self.failed += o.failed;
        self.evictions += o.evictions;
    }

    fn minus(&self, o: &Counters) -> Counters {
        Counters {
            hits: self.hits - o.hits,
            misses: self.misses - o.misses,
            stores: self.stores - o.stores,
            already_stored: self.already_stored - o.already_stored,
            dropped: self.dropped - o.dropped,
            loads: self.loads - o.loads,
            failed: self.failed - o.failed,
            evictions: self.evictions - o.evictions,
        }
    }
}

/// Live counters of one store.
#[derive(Default)]
pub(crate) struct LiveCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stores: AtomicU64,
    pub already_stored: AtomicU64,
    pub dropped: AtomicU64,
    pub loads: AtomicU64,
    pub failed: AtomicU64,
    pub evictions: AtomicU64,
}

impl LiveCounters {
    pub fn snapshot(&self) -> Counters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            hits: l(&self.hits),
            misses: l(&self.misses),
            stores: l(&self.stores),
            already_stored: l(&self.already_stored),
            dropped: l(&self.dropped),
            loads: l(&self.loads),
            failed: l(&self.failed),
            evictions: l(&self.evictions),
        }
    }
}

/// Adds `delta` to `<dir>/stats.json` under an exclusive lock, so processes
/// flushing at once never lose each other's counts.
pub fn add_to_file(dir: &Path, delta: &Counters) -> Result<()> {
    if *delta == Counters::default() {
        return Ok(());
    }
    let lock_path = dir.join(STATS_LOCK);
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| crate::Error::writing("stats lock", &lock_path, e))?;
    rustix::fs::flock(lock.as_fd(), FlockOperation::LockExclusive)
        .map_err(|e| crate::Error::io(format!("locking {}", lock_path.display()), e.into()))?;
    let mut total = read_file(dir)?;
    total.add(delta);
    let body = serde_json::to_vec_pretty(&total).expect("counters serialise");
    write_atomic(&dir.join(STATS_FILE), &body)
}

/// The counters recorded in `<dir>/stats.json` (zero when absent).
pub fn read_file(dir: &Path) -> Result<Counters> {
    let path = dir.join(STATS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!("{} is damaged ({e}); counting from zero", path.display());
            Counters::default()
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Counters::default()),
        Err(e) => Err(e).ctx(|| format!("reading {}", path.display())),
    }
}

/// Tracks what part of the live counters was already written to the file.
#[derive(Default)]
pub(crate) struct Flushed(std::sync::Mutex<Counters>);

impl Flushed {
    /// Writes the counts gathered since the last flush.
    #[cfg(test)]
    pub fn flush(&self, dir: &Path, live: &LiveCounters) -> Result<()> {
        self.flush_with(live, |delta| add_to_file(dir, delta))
    }

    /// Hands what `live` counted since the last successful call to `add`
    /// (which adds it to the shared record).
    pub fn flush_with(
        &self,
        live: &LiveCounters,
        add: impl FnOnce(&Counters) -> Result<()>,
    ) -> Result<()> {
        let mut done = self.0.lock().expect("stats lock");
        let now = live.snapshot();
        let delta = now.minus(&done);
        if delta != Counters::default() {
            add(&delta)?;
        }
        *done = now;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_add_up_across_writers() {
        let dir = tempfile::tempdir().unwrap();
        let a = LiveCounters::default();
        let b = LiveCounters::default();
        let (fa, fb) = (Flushed::default(), Flushed::default());
        a.hits.fetch_add(3, Ordering::Relaxed);
        b.hits.fetch_add(4, Ordering::Relaxed);
        b.evictions.fetch_add(1, Ordering::Relaxed);
        fa.flush(dir.path(), &a).unwrap();
        fb.flush(dir.path(), &b).unwrap();
        fa.flush(dir.path(), &a).unwrap(); // nothing new: adds nothing
        a.misses.fetch_add(2, Ordering::Relaxed);
        fa.flush(dir.path(), &a).unwrap();
        let c = read_file(dir.path()).unwrap();
        assert_eq!((c.hits, c.misses, c.evictions), (7, 2, 1));
    }
}
