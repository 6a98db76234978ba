//! Settings of a KV block store.

use std::time::Duration;

use super::namespace::Namespace;
use crate::storage::location::Location;
use crate::storage::s3::S3Config;
use crate::transfer::{BackendKind, Tuning};
use crate::{Error, Result};

/// With a capacity, eviction frees space down to this fraction of it.
pub const CAPACITY_LOW_FRACTION: f64 = 0.9;

/// How a [`super::KvStore`] is opened.
#[derive(Debug, Clone)]
pub struct KvConfig {
    /// Where namespaces live: a directory on a local disk or a shared
    /// filesystem, or `s3://bucket/prefix`.
    pub root: Location,
    /// S3 settings for an `s3://` root (default: the standard AWS
    /// environment, read when the store opens).
    pub s3: Option<S3Config>,
    /// Which blocks this store reads and writes.
    pub namespace: Namespace,
    /// How block files are opened (filesystem roots only): `buffered`
    /// through the page cache, anything else O_DIRECT where the filesystem
    /// allows it.
    pub backend: BackendKind,
    /// Test hooks (`max_bytes_per_call`); the other knobs are snapshot ones.
    pub tuning: Tuning,
    /// I/O worker threads. Whenever one of a worker's keys finishes, it
    /// takes queued loads before queued stores, and a load it took goes
    /// ahead of the stores waiting for a transfer place, so it waits for at
    /// most one of the worker's transfers in flight to finish.
    pub workers: usize,
    /// Workers stores may never occupy, so a load starts at once even while
    /// stores run (at the cost of store throughput). At most `workers - 1`.
    pub load_reserved_workers: usize,
    /// Block transfers each worker keeps in flight (one request per block
    /// file, each finished on its own: no barrier per batch). On
    /// filesystems a worker holds as many keys more ahead of them (creating
    /// and allocating files, or opened), so the device sees `workers x
    /// batch` transfers while keys sit in file-system steps. On an S3 root the store
    /// runs `workers x batch` workers of one key each instead (the same
    /// requests in flight).
    pub batch: usize,
    /// Store keys allowed to wait for a worker; a store job that would
    /// exceed it is reported `dropped`.
    pub store_queue: usize,
    /// Most bytes of block files this namespace may hold; a store that would
    /// exceed it first evicts least recently used blocks down to 90% (less
    /// deep when stores in flight hold much of it: never more than it
    /// needs). Every store in flight holds room for its block; a store
    /// that finds the room held by them waits for them to finish, and is
    /// reported `dropped` if it stays taken for seconds.
    pub capacity: Option<u64>,
    /// Fraction of the filesystem's space in use above which background
    /// eviction starts (filesystem roots only; on S3 use `capacity`).
    pub high_watermark: Option<f64>,
    /// Fraction background eviction frees down to (default: high - 0.1).
    pub low_watermark: Option<f64>,
    /// How long the in-memory index trusts an entry before checking the
    /// file again. Longer than `rescan_interval`, so a steady-state lookup
    /// never touches the disk; other processes' evictions show up within
    /// this bound (a stale hit costs one failed key on load, never wrong
    /// bytes).
    pub index_ttl: Duration,
    /// How often the whole namespace is rescanned to pick up other
    /// processes' stores and evictions.
    pub rescan_interval: Duration,
    /// fsync each block file before publishing it (off: a crash may leave a
    /// block that fails verification, which loads report and `kv verify
    /// --repair` removes; never wrong bytes).
    pub fsync: bool,
}

impl KvConfig {
    /// Defaults for everything but the root and namespace.
    pub fn new(root: impl Into<Location>, namespace: Namespace) -> Self {
        Self {
            root: root.into(),
            s3: None,
            namespace,
            backend: BackendKind::Auto,
            tuning: Tuning::default(),
            workers: 4,
            load_reserved_workers: 0,
            batch: 4,
            store_queue: 4096,
            capacity: None,
            high_watermark: None,
            low_watermark: None,
            index_ttl: Duration::from_secs(30),
            rescan_interval: Duration::from_secs(20),
            fsync: false,
        }
    }

    /// Rejects settings that cannot work, saying which one to change.
    pub fn validate(&self) -> Result<()> {
        self.namespace.validate()?;
        self.tuning.validate()?;
        let bad = |m: String| Err(Error::InvalidInput(m));
        if !(1..=256).contains(&self.workers) {
            return bad(format!(
                "workers {} is out of range: use 1..=256",
                self.workers
            ));
        }
        if self.load_reserved_workers >= self.workers {
            return bad(format!(
                "load_reserved_workers {} must be below workers {}: stores need at least one",
                self.load_reserved_workers, self.workers
            ));
        }
        if !(1..=1024).contains(&self.batch) {
            return bad(format!(
                "batch {} is out of range: use 1..=1024",
                self.batch
            ));
        }
        if self.capacity == Some(0) {
            return bad("a capacity of 0 bytes cannot hold any block".into());
        }
        let (high, low) = self.watermarks();
        if let Some(h) = high {
            if !(h > 0.0 && h <= 1.0) {
                return bad(format!("high watermark {h} must be in (0, 1]"));
            }
            let l = low.expect("derived from high");
            if !(0.0..h).contains(&l) {
                return bad(format!(
                    "low watermark {l} must be in [0, high watermark {h})"
                ));
            }
        } else if self.low_watermark.is_some() {
            return bad("a low watermark needs a high watermark".into());
        }
        if self.root.is_s3() && high.is_some() {
            return bad(format!(
                "{} is a bucket, which has no filesystem watermarks: bound it with a capacity instead",
                self.root
            ));
        }
        Ok(())
    }

    /// High and low watermarks, the low one defaulted.
    pub fn watermarks(&self) -> (Option<f64>, Option<f64>) {
        match self.high_watermark {
            Some(h) => (
                Some(h),
                Some(self.low_watermark.unwrap_or((h - 0.1).max(0.0))),
            ),
            None => (None, self.low_watermark),
        }
    }
}
