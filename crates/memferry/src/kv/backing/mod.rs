//! Where a store's blocks live at rest, behind one interface the job engine
//! ([`super::store`]) drives:
//!
//! - [`files`]: block files in a directory on a local or shared filesystem,
//!   moved by a per-worker io_uring engine ([`file_ring`], O_DIRECT or
//!   page cache), published by rename, access recorded in the file's mtime;
//! - [`s3`]: block objects under a prefix of an S3-compatible bucket, moved
//!   by concurrent whole-object PUTs and GETs, access recorded by small
//!   marker objects.
//!
//! Both keep the same namespaces, key layout and block image
//! ([`super::codec`]), so a block means the same thing wherever it is.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use super::codec::BlockCodec;
use super::job::{JobKind, KeyOutcome, KeyTask};
use super::key::BlockKey;
use super::scan::ScannedBlock;
use super::stats::Counters;
use crate::Result;

mod file_ring;
pub(crate) mod files;
mod placement;
pub(crate) mod s3;

pub(crate) use files::BlockFiles;
pub(crate) use s3::BlockObjects;

/// A stored block as seen by a probe.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Found {
    /// Size of the block's file or object.
    pub file_bytes: u64,
    /// Last recorded access.
    pub accessed: SystemTime,
}

/// A block's last recorded access, as [`Backing::last_access`] read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Accessed {
    /// The access.
    pub at: SystemTime,
    /// The stored object it was read from (files: the inode), where the
    /// backing can tell one from another stored under the same key.
    pub identity: Option<u64>,
}

/// What [`Backing::evict`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Evicted {
    /// The block that was seen is removed.
    Removed,
    /// It was gone already (where the backing can tell without another
    /// request).
    Gone,
    /// Another block was stored under the key since it was seen: that one
    /// is kept.
    Replaced,
}

/// What the job engine needs from the place blocks live. Every method is
/// safe to call from several threads at once.
pub(crate) trait Backing: Send + Sync {
    /// Sizes and identity of the namespace's blocks.
    fn codec(&self) -> &BlockCodec;
    /// The namespace's directory or URL, for messages.
    fn location(&self) -> String;
    /// The namespace directory, for blocks on a filesystem.
    fn local_dir(&self) -> Option<&Path> {
        None
    }
    /// The I/O mechanism last used, with any fallback reason.
    fn mode(&self) -> String;
    /// Keys probed together by a lookup (requests in flight at once).
    fn probe_batch(&self) -> usize;
    /// Whether each key's block exists (any size), with its last access.
    fn stat_many(&self, keys: &[BlockKey]) -> Vec<Option<Found>>;
    /// Whether each key's block exists with a header naming this namespace,
    /// the key and the right payload length.
    fn valid_many(&self, keys: &[BlockKey]) -> Vec<bool>;
    /// True when a store started on the [`Backing::pipeline`] itself finds
    /// valid blocks already stored and reports them `AlreadyStored` (one
    /// create-only request instead of a probe, then a write); otherwise the
    /// engine probes with [`Backing::valid_many`] first.
    fn store_checks_existing(&self) -> bool {
        false
    }
    /// One worker's engine for moving blocks (see [`KeyPipeline`]), with
    /// room for `depth` keys in flight where the backing can overlap them.
    fn pipeline(&self, depth: usize) -> Result<Box<dyn KeyPipeline + '_>>;
    /// Removes `key`'s block; false when it was not there.
    fn remove(&self, key: &BlockKey) -> Result<bool>;
    /// Removes the block of `key` that [`Backing::last_access`] returned
    /// `seen` for, and only that one where `seen` has its identity: a block
    /// stored again under the key since is kept ([`Evicted::Replaced`]).
    fn evict(&self, key: &BlockKey, seen: &Accessed) -> Result<Evicted>;
    /// Records a use of every key now: at `when` (this process's clock), or
    /// by the storage's own clock where it has one (files: `UTIME_NOW`).
    /// Best effort: a key evicted meanwhile is skipped.
    fn record_access(&self, keys: &[BlockKey], when: SystemTime);
    /// The last recorded access of `key`'s block, with the identity of the
    /// object it was read from; `None` when it is gone.
    fn last_access(&self, key: &BlockKey) -> Option<Accessed>;
    /// Every block of the namespace (and clean-up of leftovers of stores
    /// that died).
    fn scan(&self) -> Result<Vec<ScannedBlock>>;
    /// Adds this process's counters since the last call to the namespace's
    /// shared record.
    fn add_counters(&self, delta: &Counters) -> Result<()>;
    /// Bytes used and total of the filesystem holding the blocks (for
    /// watermarks); `None` where there is no such thing.
    fn usage(&self) -> Option<(f64, f64)>;
}

/// One worker's engine: keys are started one at a time and finish in any
/// order. A load reads, verifies and scatters its block; a store gathers
/// and publishes it (readers see no block or a whole one).
pub(crate) trait KeyPipeline {
    /// Keys that may be started now (0 while finished keys wait to be
    /// reaped).
    fn room(&self) -> usize;
    /// Keys started and not yet finished.
    fn in_flight(&self) -> usize;
    /// Starts `task`; its outcome comes back from [`KeyPipeline::reap`]
    /// with `tag`. Only called while [`KeyPipeline::room`] is above 0.
    ///
    /// # Safety
    /// Until that outcome is reaped, nobody may access the pages of
    /// `task.ids` (load), or write them (store).
    unsafe fn start(&mut self, tag: u64, kind: JobKind, task: KeyTask, cancel: Arc<AtomicBool>);
    /// The keys finished since the last call; when none has and some are
    /// in flight, waits until one finishes.
    fn reap(&mut self) -> Vec<(u64, KeyOutcome)>;
}

/// The engine of a worker whose own could not be built (say, its staging
/// memory could not be allocated): every key fails with the reason, so jobs
/// still finish instead of waiting for a worker that never runs them.
pub(crate) struct NoEngine {
    why: String,
    finished: Option<(u64, KeyOutcome)>,
}

impl NoEngine {
    pub fn new(why: String) -> Self {
        Self {
            why,
            finished: None,
        }
    }
}

impl KeyPipeline for NoEngine {
    fn room(&self) -> usize {
        usize::from(self.finished.is_none())
    }

    fn in_flight(&self) -> usize {
        0
    }

    unsafe fn start(&mut self, tag: u64, _kind: JobKind, _task: KeyTask, _cancel: Arc<AtomicBool>) {
        self.finished = Some((tag, KeyOutcome::Failed(self.why.clone())));
    }

    fn reap(&mut self) -> Vec<(u64, KeyOutcome)> {
        self.finished.take().into_iter().collect()
    }
}
