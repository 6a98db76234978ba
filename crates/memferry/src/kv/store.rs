//! The KV block store: an asynchronous job engine over one namespace.
//!
//! The API maps one to one onto vLLM's offloading manager
//! (`lookup`, `prepare_load`/`complete_load` = [`KvStore::protect`]/
//! [`KvStore::unprotect`], `touch`, `prepare_store` =
//! [`KvStore::contains`], `complete_store`) and handler
//! (`transfer_async` = [`KvStore::submit_load`]/[`KvStore::submit_store`],
//! `get_finished` = [`KvStore::poll`], `wait` = [`KvStore::wait`]).
//!
//! Guarantees:
//! - `poll` never blocks and never does I/O on the caller's thread; `wait`
//!   returns by its timeout;
//! - every submitted job yields exactly one [`JobResult`] with an outcome
//!   per key;
//! - loads run before stores: whenever a key finishes, queued loads are
//!   taken first, and `load_reserved_workers` keeps workers free of stores
//!   altogether;
//! - at most `store_queue` store keys wait; a store job beyond that is
//!   reported `dropped`, distinct from success and failure;
//! - under a capacity, every store in flight holds room for its block; a
//!   store that finds the room held by stores in flight waits for them
//!   (never evicts for them, never fails for them) and is reported
//!   `dropped` after 5 seconds; it fails only when blocks that cannot
//!   be evicted fill the capacity, saying which;
//! - a block protected (explicitly, or because a load job names it) is
//!   never evicted by this process: an eviction checks the protection
//!   before it reads the block's access record and again right before its
//!   removal request (a key protected while that request runs is reported
//!   missing by its load, never as wrong bytes); `protect`, `unprotect`
//!   and `cancel` never wait for an eviction's I/O;
//! - on a filesystem, an eviction removes only the block file whose access
//!   record it checked: one another process stored again meanwhile is kept
//!   and not counted as evicted (on S3, with no cheap conditional delete,
//!   it may go: its next load then reports it missing);
//! - a block a load refuses as foreign (another namespace, format version
//!   or page layout) or damaged leaves the answers of `lookup` and
//!   `contains` (also when a rescan finds its file again) until a valid
//!   block is stored under its key, so the engine stores it again and the
//!   store replaces the file.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::backing::{Backing, BlockFiles, BlockObjects, Evicted, NoEngine};
use super::config::{CAPACITY_LOW_FRACTION, KvConfig};
use super::index::Index;
use super::job::{JobId, JobKind, JobResult, KeyOutcome, KeyResult, KeyTask, split_groups};
use super::key::BlockKey;
use super::stats::{Counters, Flushed, LiveCounters};
use super::tensors::KvLayout;
use crate::storage::location::Location;
use crate::storage::s3::{S3Config, S3Overrides};
use crate::{Error, Result};

/// How often the housekeeper flushes touches and counters and checks the
/// watermarks.
const TICK: Duration = Duration::from_millis(500);
/// A file whose access time is this much newer than the index believed was
/// used by someone else since: eviction skips it.
const ACCESS_SLACK: Duration = Duration::from_secs(1);
/// A store that finds the capacity held by other stores in flight waits at
/// most this long for them to make room, then is reported `Dropped`.
const ROOM_WAIT: Duration = Duration::from_secs(5);
/// Longest single wait for a store in flight to release its room (a
/// worker waiting for room looks for queued loads in between).
const ROOM_POLL: Duration = Duration::from_millis(50);

/// What a store holds now, and what it did.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct KvStats {
    /// Block files in the namespace (as far as the index knows).
    pub blocks: u64,
    /// Bytes of those files.
    pub bytes: u64,
    /// This process's counters since the store was opened.
    #[serde(flatten)]
    pub counters: Counters,
}

/// An open KV block store. Dropping it cancels jobs that have not started,
/// finishes running ones and flushes the access record and counters.
pub struct KvStore {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    blocks: Box<dyn Backing>,
    config: KvConfig,
    sched: Mutex<Sched>,
    /// Signalled when work is queued or a store worker frees up.
    work: Condvar,
    /// Signalled when a job finishes.
    done: Condvar,
    index: Mutex<Space>,
    /// Signalled (with `index`) when a store in flight releases its room.
    room_freed: Condvar,
    /// Protections, and the removals in progress they are checked against.
    /// Held only for bookkeeping, never across I/O, so `protect`,
    /// `unprotect` and `cancel` never wait for an eviction's requests.
    guards: Mutex<Guards>,
    touches: Mutex<Vec<BlockKey>>,
    counters: LiveCounters,
    flushed: Flushed,
    housekeeping: Mutex<bool>,
    wake_housekeeper: Condvar,
    next_job: AtomicU64,
}

/// Protections and removals in progress.
#[derive(Default)]
struct Guards {
    /// How many times each key is protected.
    protected: HashMap<BlockKey, u32>,
    /// Keys whose block this process is evicting or removing now (its
    /// requests run outside the lock); no second removal starts meanwhile.
    removing: HashSet<BlockKey>,
}

/// The index plus bytes reserved by stores in flight.
struct Space {
    index: Index,
    reserved: u64,
    /// Reservations released so far (a store waiting for room waits for
    /// this to move).
    released: u64,
}

/// What a store's request for room under the capacity found.
enum Room {
    /// The bytes are reserved.
    Reserved,
    /// Stores in flight hold the room (their reservations, or the blocks
    /// they publish, which can be evicted once published): ask again once
    /// one of them finished. Carries `Space::released` as it was.
    Wait(u64),
    /// The store cannot be taken, and why.
    Full(String),
}

/// What a store key needs before its write.
enum BeforeStore {
    /// Room is reserved: write it.
    Write,
    /// Nothing to write: the key's outcome.
    Done(KeyOutcome),
    /// Stores in flight hold the room: try again once one finished
    /// (`Space::released` as it was).
    WaitForRoom(u64),
}

/// What one eviction pass did and what it had to leave.
#[derive(Default)]
struct EvictPass {
    /// Blocks removed.
    evicted: u64,
    /// Blocks kept because this process protects them (or evicts them
    /// already).
    protected: u64,
    /// Blocks kept because another process used (or stored again) them
    /// since the index looked.
    used_elsewhere: u64,
    /// Blocks that could not be removed, with the first error.
    errors: u64,
    first_error: Option<String>,
}

#[derive(Default)]
struct Sched {
    jobs: HashMap<JobId, JobState>,
    loads: VecDeque<JobId>,
    stores: VecDeque<JobId>,
    store_keys_waiting: usize,
    finished: VecDeque<JobResult>,
    shutdown: bool,
}

struct JobState {
    kind: JobKind,
    tasks: Arc<Vec<KeyTask>>,
    outcomes: Vec<Option<KeyOutcome>>,
    next: usize,
    /// Tasks `..handed` went to workers, which release a load's
    /// protections themselves before reporting (so a result is never
    /// visible while its keys are still protected).
    handed: usize,
    running: usize,
    bytes: u64,
    submitted: Instant,
    cancel: Arc<AtomicBool>,
    /// Every outcome is set and the job is being finished.
    finishing: bool,
}

/// One key of a job, handed to a worker.
struct Piece {
    job: JobId,
    kind: JobKind,
    tasks: Arc<Vec<KeyTask>>,
    /// Which of the job's tasks.
    index: usize,
    cancel: Arc<AtomicBool>,
    /// A store waiting for room under the capacity: since when.
    room_wait: Option<Instant>,
}

impl EvictPass {
    /// Why a store found no room under `cap` with `held` bytes of blocks
    /// stored after this pass (and no store in flight).
    fn full_message(&self, cap: u64, held: u64) -> String {
        let mut why = Vec::new();
        if self.protected > 0 {
            why.push(format!(
                "{} blocks are protected (being loaded, or protected by the caller)",
                self.protected
            ));
        }
        if self.used_elsewhere > 0 {
            why.push(format!(
                "{} blocks were just used by another process",
                self.used_elsewhere
            ));
        }
        if let Some(e) = &self.first_error {
            why.push(format!("{} blocks could not be removed ({e})", self.errors));
        }
        if why.is_empty() {
            why.push("no block could be evicted".into());
        }
        format!(
            "the store is at its capacity of {cap} bytes ({held} bytes of blocks held) and {}: raise the capacity or unprotect blocks",
            why.join(", ")
        )
    }
}

impl Piece {
    fn task(&self) -> &KeyTask {
        &self.tasks[self.index]
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("KV store lock poisoned by a panic")
}

impl KvStore {
    /// Opens (creating if needed) the namespace under `config.root` for the
    /// registered tensors in `layout`, scans it to warm the index and starts
    /// the workers.
    pub fn open(mut config: KvConfig, layout: KvLayout) -> Result<Self> {
        config.validate()?;
        if config.root.is_s3() {
            // Requests to a bucket have long, uneven latencies: instead of
            // `workers` threads that each wait for a batch of `batch` keys,
            // run `workers x batch` threads of one key each, the same
            // requests in flight without a barrier per batch.
            config.load_reserved_workers *= config.batch;
            config.workers *= config.batch;
            config.batch = 1;
        }
        let blocks: Box<dyn Backing> = match &config.root {
            Location::Local(root) => Box::new(BlockFiles::open(&config, root, layout)?),
            Location::S3(url) => {
                let s3 = match &config.s3 {
                    Some(c) => c.clone(),
                    None => S3Config::from_env(&S3Overrides::default())?,
                };
                Box::new(BlockObjects::open(&config, url, &s3, layout)?)
            }
        };
        Self::start(config, blocks)
    }

    /// Runs a store over `blocks` (opened for `config`): scans them to warm
    /// the index and starts the workers.
    fn start(config: KvConfig, blocks: Box<dyn Backing>) -> Result<Self> {
        let started = Instant::now();
        let file_len = blocks.codec().file_len;
        let mut found = blocks.scan()?;
        found.retain(|b| b.file_bytes == file_len);
        let mut index = Index::new(config.index_ttl);
        index.replace_with_scan(found, started);
        let shared = Arc::new(Shared {
            blocks,
            sched: Mutex::new(Sched::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            index: Mutex::new(Space {
                index,
                reserved: 0,
                released: 0,
            }),
            room_freed: Condvar::new(),
            guards: Mutex::new(Guards::default()),
            touches: Mutex::new(Vec::new()),
            counters: LiveCounters::default(),
            flushed: Flushed::default(),
            housekeeping: Mutex::new(false),
            wake_housekeeper: Condvar::new(),
            next_job: AtomicU64::new(1),
            config,
        });
        // Threads join the store: if a later one fails to start, dropping
        // it stops and joins those already running.
        let mut store = Self {
            shared,
            threads: Vec::new(),
        };
        let shared = store.shared.clone();
        for i in 0..shared.config.workers {
            let s = shared.clone();
            store.threads.push(
                std::thread::Builder::new()
                    .name(format!("memferry-kv-io-{i}"))
                    .spawn(move || s.worker(i))
                    .map_err(|e| Error::io("starting a KV worker thread", e))?,
            );
        }
        let s = shared.clone();
        store.threads.push(
            std::thread::Builder::new()
                .name("memferry-kv-housekeeper".into())
                .spawn(move || s.housekeeper())
                .map_err(|e| Error::io("starting the KV housekeeper thread", e))?,
        );
        Ok(store)
    }

    /// The namespace directory, when blocks live on a filesystem.
    pub fn dir(&self) -> Option<&Path> {
        self.shared.blocks.local_dir()
    }

    /// The namespace's directory or `s3://` URL.
    pub fn location(&self) -> String {
        self.shared.blocks.location()
    }

    /// The I/O mechanism that ran (e.g. `odirect-uring, zero-copy`,
    /// `odirect-uring, staged`, `buffered-fallback, zero-copy (why)`,
    /// `s3 (...)`); empty before any I/O on a filesystem. `zero-copy`: the
    /// kernel moved the registered pages themselves; `staged`: through a
    /// staging buffer (device memory, or pages O_DIRECT cannot address).
    pub fn mode(&self) -> String {
        self.shared.blocks.mode()
    }

    /// Bytes of one stored block file (header, payload, padding).
    pub fn file_bytes(&self) -> u64 {
        self.shared.blocks.codec().file_len
    }

    /// Length of the longest prefix of `keys` that is stored. Known keys
    /// confirmed within the index TTL cost a hash lookup; others are
    /// checked in storage (and remembered): one `stat` at a time on a
    /// filesystem, batches of concurrent HEADs on S3.
    pub fn lookup(&self, keys: &[BlockKey]) -> usize {
        let s = &self.shared;
        let now = Instant::now();
        let mut n = 0;
        {
            let space = lock(&s.index);
            while n < keys.len() && space.index.fresh(&keys[n], now) {
                n += 1;
            }
        }
        let batch = s.blocks.probe_batch().max(1);
        while n < keys.len() {
            let probe = &keys[n..(n + batch).min(keys.len())];
            let present = s.confirm(probe);
            let run = present.iter().take_while(|p| **p).count();
            n += run;
            if run < probe.len() {
                break;
            }
        }
        s.counters.hits.fetch_add(n as u64, Ordering::Relaxed);
        s.counters
            .misses
            .fetch_add((keys.len() - n) as u64, Ordering::Relaxed);
        n
    }

    /// For each key, whether it is stored (vLLM's `prepare_store` stores
    /// only the keys for which this is false).
    pub fn contains(&self, keys: &[BlockKey]) -> Vec<bool> {
        let now = Instant::now();
        let mut out: Vec<bool> = {
            let space = lock(&self.shared.index);
            keys.iter().map(|k| space.index.fresh(k, now)).collect()
        };
        let unknown: Vec<usize> = (0..keys.len()).filter(|&i| !out[i]).collect();
        let probe: Vec<BlockKey> = unknown.iter().map(|&i| keys[i].clone()).collect();
        for (i, present) in unknown.into_iter().zip(self.shared.confirm(&probe)) {
            out[i] = present;
        }
        out
    }

    /// Records a use of `keys` now (for LRU eviction). The index is updated
    /// at once; the on-disk record within a housekeeping tick.
    pub fn touch(&self, keys: &[BlockKey]) {
        let now = SystemTime::now();
        {
            let mut space = lock(&self.shared.index);
            for k in keys {
                space.index.touch(k, now);
            }
        }
        lock(&self.shared.touches).extend(keys.iter().cloned());
    }

    /// Removes stored blocks (protected ones are kept, and so are blocks
    /// this process is evicting already); returns how many files were
    /// removed. A key protected once its removal started is still removed
    /// (a load of it then reports it missing).
    pub fn remove(&self, keys: &[BlockKey]) -> Result<usize> {
        let s = &self.shared;
        let mut removed = 0;
        for k in keys {
            if !s.start_removal(k) {
                continue;
            }
            let gone = s.blocks.remove(k);
            s.end_removal(k);
            if gone? {
                removed += 1;
            }
            lock(&s.index).index.remove(k);
        }
        Ok(removed)
    }

    /// Keeps `keys` from being evicted until as many [`KvStore::unprotect`]
    /// calls (counted per key).
    pub fn protect(&self, keys: &[BlockKey]) {
        self.shared.protect(keys);
    }

    /// Undoes one [`KvStore::protect`] of `keys`.
    pub fn unprotect(&self, keys: &[BlockKey]) {
        self.shared.unprotect(keys);
    }

    /// Queues a load of `keys` into `block_ids`: every key fills
    /// `blocks_per_file` ids, except the first, which may fill fewer (the
    /// last blocks of its file) when a request starts mid-group. The keys
    /// are protected from eviction until the job finishes.
    ///
    /// # Safety
    /// The pages of `block_ids` must not be read or written by anyone else
    /// until the job's result has been returned by `poll` or `wait`.
    pub unsafe fn submit_load(&self, keys: &[BlockKey], block_ids: &[u64]) -> Result<JobId> {
        let tasks = self.shared.tasks(JobKind::Load, keys, block_ids)?;
        let mut seen = HashSet::new();
        if let Some(dup) = block_ids.iter().find(|id| !seen.insert(**id)) {
            return Err(Error::InvalidInput(format!(
                "block id {dup} appears twice in one load: name each destination block once (split the request into two jobs)"
            )));
        }
        self.shared.protect(keys);
        Ok(self.shared.enqueue(JobKind::Load, tasks))
    }

    /// Queues a store of `keys` from `block_ids` (`blocks_per_file` ids per
    /// key). When the store queue is full the job finishes at once with
    /// every key `Dropped`.
    ///
    /// # Safety
    /// The pages of `block_ids` must not be written by anyone until the
    /// job's result has been returned by `poll` or `wait`.
    pub unsafe fn submit_store(&self, keys: &[BlockKey], block_ids: &[u64]) -> Result<JobId> {
        let tasks = self.shared.tasks(JobKind::Store, keys, block_ids)?;
        Ok(self.shared.enqueue(JobKind::Store, tasks))
    }

    /// Results of every job that finished since the last call. Never blocks
    /// on I/O: it only takes the queue's lock.
    pub fn poll(&self) -> Vec<JobResult> {
        lock(&self.shared.sched).finished.drain(..).collect()
    }

    /// Waits until every job in `jobs` has finished or `timeout` passed;
    /// returns (and removes from the poll queue) the results of those of
    /// `jobs` that finished. Jobs already returned earlier count as
    /// finished and yield nothing. A timeout too long to reach (say
    /// `Duration::MAX`) waits until the jobs finish.
    pub fn wait(&self, jobs: &[JobId], timeout: Duration) -> Vec<JobResult> {
        let deadline = Instant::now().checked_add(timeout);
        let s = &self.shared;
        let mut sched = lock(&s.sched);
        loop {
            let pending = jobs.iter().any(|j| sched.jobs.contains_key(j));
            let now = Instant::now();
            if !pending || deadline.is_some_and(|d| now >= d) {
                let wanted: HashSet<JobId> = jobs.iter().copied().collect();
                let (mine, rest): (Vec<JobResult>, Vec<JobResult>) = sched
                    .finished
                    .drain(..)
                    .partition(|r| wanted.contains(&r.job));
                sched.finished = rest.into();
                return mine;
            }
            let poisoned = "KV store lock poisoned by a panic";
            sched = match deadline {
                Some(d) => s.done.wait_timeout(sched, d - now).expect(poisoned).0,
                None => s.done.wait(sched).expect(poisoned),
            };
        }
    }

    /// Cancels a job: keys not started yet finish as `Cancelled`, and the
    /// backend stops issuing I/O for the keys in flight. Returns false when
    /// the job had already finished.
    pub fn cancel(&self, job: JobId) -> bool {
        let s = &self.shared;
        let mut sched = lock(&s.sched);
        let Some(state) = sched.jobs.get_mut(&job) else {
            return false;
        };
        if state.finishing {
            return false;
        }
        state.cancel.store(true, Ordering::Relaxed);
        let kind = state.kind;
        let skipped = state.tasks.len() - state.next;
        for o in &mut state.outcomes[state.next..] {
            *o = Some(KeyOutcome::Cancelled);
        }
        state.next = state.tasks.len();
        let idle = state.running == 0;
        match kind {
            JobKind::Load => sched.loads.retain(|j| *j != job),
            JobKind::Store => {
                sched.stores.retain(|j| *j != job);
                sched.store_keys_waiting -= skipped;
            }
        }
        if idle {
            s.finish(sched, job);
        }
        true
    }

    /// Blocks and bytes held, and this process's counters.
    pub fn stats(&self) -> KvStats {
        let space = lock(&self.shared.index);
        KvStats {
            blocks: space.index.len() as u64,
            bytes: space.index.total_bytes(),
            counters: self.shared.counters.snapshot(),
        }
    }

    /// Rescans the namespace now (the housekeeper also does it every
    /// `rescan_interval`), so the index reflects other processes' work.
    pub fn rescan(&self) -> Result<()> {
        self.shared.rescan()
    }

    /// Evicts least recently used, unprotected blocks until the namespace
    /// holds at most `bytes`; returns how many blocks were removed.
    pub fn evict_to(&self, bytes: u64) -> u64 {
        self.shared.evict_to(bytes)
    }

    /// Writes pending access records and counters to disk now.
    pub fn flush(&self) -> Result<()> {
        self.shared.flush_touches();
        self.shared.flush_counters()
    }
}

impl Drop for KvStore {
    fn drop(&mut self) {
        let s = &self.shared;
        {
            let mut sched = lock(&s.sched);
            sched.shutdown = true;
            let queued: Vec<JobId> = sched.loads.iter().chain(&sched.stores).copied().collect();
            drop(sched);
            for job in queued {
                self.cancel(job);
            }
        }
        s.work.notify_all();
        *lock(&s.housekeeping) = true;
        s.wake_housekeeper.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Err(e) = self.flush() {
            tracing::warn!("could not flush the KV store's records: {e}");
        }
    }
}

impl Shared {
    fn tasks(&self, kind: JobKind, keys: &[BlockKey], ids: &[u64]) -> Result<Vec<KeyTask>> {
        let codec = self.blocks.codec();
        codec.layout.check_ids(ids)?;
        split_groups(kind, keys, ids, codec.per_file).map_err(Error::InvalidInput)
    }

    fn enqueue(&self, kind: JobKind, tasks: Vec<KeyTask>) -> JobId {
        let id = JobId(self.next_job.fetch_add(1, Ordering::Relaxed));
        let n = tasks.len();
        let mut sched = lock(&self.sched);
        let dropped = kind == JobKind::Store
            && (sched.shutdown || sched.store_keys_waiting + n > self.config.store_queue);
        let mut state = JobState {
            kind,
            tasks: Arc::new(tasks),
            outcomes: vec![None; n],
            next: 0,
            handed: 0,
            running: 0,
            bytes: 0,
            submitted: Instant::now(),
            cancel: Arc::new(AtomicBool::new(false)),
            finishing: false,
        };
        if dropped || sched.shutdown {
            let outcome = if dropped {
                self.counters.dropped.fetch_add(n as u64, Ordering::Relaxed);
                KeyOutcome::Dropped
            } else {
                KeyOutcome::Cancelled
            };
            state.outcomes.fill(Some(outcome));
            state.next = n;
            sched.jobs.insert(id, state);
            self.finish(sched, id);
            return id;
        }
        sched.jobs.insert(id, state);
        match kind {
            JobKind::Load => sched.loads.push_back(id),
            JobKind::Store => {
                sched.stores.push_back(id);
                sched.store_keys_waiting += n;
            }
        }
        drop(sched);
        self.work.notify_all();
        id
    }

    /// Hands out the next key of the oldest job of `kind`.
    fn take(&self, sched: &mut Sched, kind: JobKind) -> Option<Piece> {
        let queue = match kind {
            JobKind::Load => &mut sched.loads,
            JobKind::Store => &mut sched.stores,
        };
        let &id = queue.front()?;
        let state = sched.jobs.get_mut(&id).expect("queued jobs exist");
        let index = state.next;
        state.next += 1;
        state.handed = state.next;
        state.running += 1;
        let piece = Piece {
            job: id,
            kind,
            tasks: state.tasks.clone(),
            index,
            cancel: state.cancel.clone(),
            room_wait: None,
        };
        if state.next == state.tasks.len() {
            queue.pop_front();
        }
        if kind == JobKind::Store {
            sched.store_keys_waiting -= 1;
        }
        Some(piece)
    }

    /// Worker `n`: keeps up to `batch` keys in flight on its own engine,
    /// taking queued loads before queued stores whenever a key finishes.
    /// The first `load_reserved_workers` workers never take stores.
    ///
    /// A store that finds the capacity held by stores in flight is kept
    /// aside (`deferred`) and tried again, after loads, once one of them
    /// finished: this worker's own (it reaps first) or another worker's (it
    /// waits for a release, a little at a time). One that waits longer than
    /// [`ROOM_WAIT`] is reported `Dropped`.
    fn worker(&self, n: usize) {
        let may_store = n >= self.config.load_reserved_workers;
        let mut pipe = self.blocks.pipeline(self.config.batch).unwrap_or_else(|e| {
            tracing::error!("a KV worker has no I/O engine: {e}");
            Box::new(NoEngine::new(format!("no I/O engine for this worker: {e}")))
        });
        let mut running: HashMap<u64, Piece> = HashMap::new();
        let mut next_tag = 0u64;
        let mut deferred: Option<Piece> = None;
        loop {
            while pipe.room() > 0 {
                let piece = {
                    let mut sched = lock(&self.sched);
                    loop {
                        if let Some(p) = self.take(&mut sched, JobKind::Load) {
                            break Some(p);
                        }
                        if let Some(p) = deferred.take() {
                            break Some(p);
                        }
                        if may_store && let Some(p) = self.take(&mut sched, JobKind::Store) {
                            break Some(p);
                        }
                        if pipe.in_flight() > 0 {
                            break None;
                        }
                        if sched.shutdown && sched.loads.is_empty() && sched.stores.is_empty() {
                            return;
                        }
                        sched = self
                            .work
                            .wait(sched)
                            .expect("KV store lock poisoned by a panic");
                    }
                };
                let Some(mut piece) = piece else { break };
                let task = piece.task().clone();
                if piece.cancel.load(Ordering::Relaxed) {
                    self.publish(&piece, KeyOutcome::Cancelled);
                    continue;
                }
                if piece.kind == JobKind::Store {
                    match self.before_store(&task) {
                        BeforeStore::Write => {}
                        BeforeStore::Done(outcome) => {
                            self.publish(&piece, outcome);
                            continue;
                        }
                        BeforeStore::WaitForRoom(released) => {
                            let since = *piece.room_wait.get_or_insert_with(Instant::now);
                            if since.elapsed() >= ROOM_WAIT {
                                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                                self.publish(&piece, KeyOutcome::Dropped);
                                continue;
                            }
                            deferred = Some(piece);
                            if pipe.in_flight() > 0 {
                                // Reaping this worker's keys releases room.
                                break;
                            }
                            // Only other workers' stores hold room.
                            self.wait_for_room(released);
                            continue;
                        }
                    }
                }
                let tag = next_tag;
                next_tag += 1;
                // SAFETY: submit_load's / submit_store's caller keeps the
                // pages to us until the job's result is returned, which is
                // after this key's outcome is reaped.
                unsafe { pipe.start(tag, piece.kind, task, piece.cancel.clone()) };
                running.insert(tag, piece);
            }
            for (tag, outcome) in pipe.reap() {
                let piece = running.remove(&tag).expect("reaped keys were started");
                let task = piece.task();
                let outcome = match piece.kind {
                    JobKind::Load => self.after_load(task, outcome),
                    JobKind::Store => self.after_store(task, outcome),
                };
                self.publish(&piece, outcome);
            }
        }
    }

    /// Waits until a store in flight releases its room (`Space::released`
    /// moves past `seen`), for at most [`ROOM_POLL`].
    fn wait_for_room(&self, seen: u64) {
        let space = lock(&self.index);
        let _ = self
            .room_freed
            .wait_timeout_while(space, ROOM_POLL, |s| s.released == seen)
            .expect("KV store lock poisoned by a panic");
    }

    /// Reports one key's outcome; finishes its job when it was the last.
    fn publish(&self, piece: &Piece, outcome: KeyOutcome) {
        let task = piece.task();
        let bytes = if matches!(outcome, KeyOutcome::Loaded | KeyOutcome::Stored) {
            task.ids.len() as u64 * self.blocks.codec().layout.block_bytes()
        } else {
            0
        };
        if piece.kind == JobKind::Load {
            self.unprotect(std::slice::from_ref(&task.key));
        }
        let mut sched = lock(&self.sched);
        let state = sched.jobs.get_mut(&piece.job).expect("running jobs exist");
        state.outcomes[piece.index] = Some(outcome);
        state.running -= 1;
        state.bytes += bytes;
        if state.running == 0 && state.next == state.tasks.len() {
            self.finish(sched, piece.job);
        }
    }

    /// Counts a load's outcome and keeps the index current.
    fn after_load(&self, task: &KeyTask, outcome: KeyOutcome) -> KeyOutcome {
        let c = &self.counters;
        match &outcome {
            KeyOutcome::Loaded => {
                c.loads.fetch_add(1, Ordering::Relaxed);
                lock(&self.index).index.touch(&task.key, SystemTime::now());
                // The access record is written by the housekeeper within a
                // tick.
                lock(&self.touches).push(task.key.clone());
            }
            KeyOutcome::Failed(_) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                self.after_failed_load(&task.key);
            }
            _ => {}
        }
        outcome
    }

    /// Keeps the index true to a key whose load failed: a block that is
    /// gone leaves it; one that is there but not a valid block of this
    /// namespace (another namespace, format version or page layout, which
    /// loads refuse and never delete; or damaged and not removed) is
    /// refused, so lookups miss it, also after rescans, and the engine
    /// stores it again (the store replaces the file). A valid block (the
    /// load failed for another reason, or a store replaced it meanwhile)
    /// stays.
    fn after_failed_load(&self, key: &BlockKey) {
        let file_len = self.blocks.codec().file_len;
        let keys = std::slice::from_ref(key);
        let found = self.blocks.stat_many(keys)[0];
        let valid =
            found.is_some_and(|f| f.file_bytes == file_len) && self.blocks.valid_many(keys)[0];
        let mut space = lock(&self.index);
        match found {
            Some(f) if f.file_bytes == file_len => {
                if valid {
                    space.index.insert(key.clone(), f.file_bytes, f.accessed);
                } else {
                    space.index.refuse(key.clone(), f.file_bytes, f.accessed);
                }
            }
            _ => {
                space.index.remove(key);
            }
        }
    }

    /// Before a store's write: an outcome when the key needs none (a valid
    /// block is already stored) or cannot have one (no room). Otherwise
    /// the block's bytes are reserved under the capacity.
    fn before_store(&self, task: &KeyTask) -> BeforeStore {
        let file_len = self.blocks.codec().file_len;
        if !self.blocks.store_checks_existing()
            && self.blocks.valid_many(std::slice::from_ref(&task.key))[0]
        {
            lock(&self.index)
                .index
                .insert(task.key.clone(), file_len, SystemTime::now());
            lock(&self.touches).push(task.key.clone());
            self.counters.already_stored.fetch_add(1, Ordering::Relaxed);
            return BeforeStore::Done(KeyOutcome::AlreadyStored);
        }
        match self.make_room(file_len) {
            Room::Reserved => BeforeStore::Write,
            Room::Wait(released) => BeforeStore::WaitForRoom(released),
            Room::Full(reason) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                BeforeStore::Done(KeyOutcome::Failed(reason))
            }
        }
    }

    /// Releases a store's reservation, indexes what was published and
    /// counts the outcome.
    fn after_store(&self, task: &KeyTask, outcome: KeyOutcome) -> KeyOutcome {
        let file_len = self.blocks.codec().file_len;
        {
            let mut space = lock(&self.index);
            space.reserved -= file_len;
            space.released += 1;
            if matches!(outcome, KeyOutcome::Stored | KeyOutcome::AlreadyStored) {
                space
                    .index
                    .insert(task.key.clone(), file_len, SystemTime::now());
            }
        }
        self.room_freed.notify_all();
        let c = &self.counters;
        match &outcome {
            KeyOutcome::Stored => {
                c.stores.fetch_add(1, Ordering::Relaxed);
            }
            KeyOutcome::AlreadyStored => {
                // Found by the backing's own create-only write.
                lock(&self.touches).push(task.key.clone());
                c.already_stored.fetch_add(1, Ordering::Relaxed);
            }
            KeyOutcome::Failed(_) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        outcome
    }

    /// Reserves `need` bytes under the capacity, evicting least recently
    /// used blocks when they do not fit: down to the low mark (hysteresis),
    /// but never further than this store needs next to the room stores in
    /// flight hold. When those stores are what stands in the way, it says
    /// to wait for them (their blocks can be evicted once published)
    /// instead of evicting for them or failing.
    fn make_room(&self, need: u64) -> Room {
        let Some(cap) = self.config.capacity else {
            lock(&self.index).reserved += need;
            return Room::Reserved;
        };
        if need > cap {
            return Room::Full(format!(
                "these blocks need {need} bytes, more than the store's whole capacity of {cap}: raise the capacity"
            ));
        }
        let low = (cap as f64 * CAPACITY_LOW_FRACTION) as u64;
        let mut stalled = 0;
        loop {
            let (before, reserved, released) = {
                let mut space = lock(&self.index);
                if space.index.total_bytes() + space.reserved + need <= cap {
                    space.reserved += need;
                    return Room::Reserved;
                }
                (space.index.total_bytes(), space.reserved, space.released)
            };
            if reserved + need > cap {
                // Evicting every stored block would not make room: only
                // stores in flight hold it.
                return Room::Wait(released);
            }
            let target = (cap - reserved - need).min(low.saturating_sub(need));
            let pass = self.evict_pass(target);
            // Progress is bytes leaving the index: evicted files, files gone
            // meanwhile. Blocks found in use elsewhere get a new access time
            // and are retried on the next pass.
            let space = lock(&self.index);
            let after = space.index.total_bytes();
            if after < before {
                stalled = 0;
                continue;
            }
            stalled += 1;
            if stalled < 2 || after + space.reserved + need <= cap {
                continue;
            }
            if space.reserved > 0 {
                // What stores in flight publish can be evicted then.
                return Room::Wait(space.released);
            }
            return Room::Full(pass.full_message(cap, after));
        }
    }

    /// Evicts least recently used unprotected blocks until the index holds
    /// at most `target` bytes. Returns how many blocks were removed.
    fn evict_to(&self, target: u64) -> u64 {
        self.evict_pass(target).evicted
    }

    /// [`Shared::evict_to`], saying what it had to leave.
    fn evict_pass(&self, target: u64) -> EvictPass {
        let mut pass = EvictPass::default();
        let candidates = {
            let space = lock(&self.index);
            if space.index.total_bytes() <= target {
                return pass;
            }
            space.index.least_recently_used()
        };
        for (key, entry) in candidates {
            if lock(&self.index).index.total_bytes() <= target {
                break;
            }
            {
                let mut guards = lock(&self.guards);
                if guards.protected.contains_key(&key) {
                    pass.protected += 1;
                    continue;
                }
                if !guards.removing.insert(key.clone()) {
                    // Another caller is removing it.
                    continue;
                }
            }
            self.evict_one(&key, entry.accessed, &mut pass);
            self.end_removal(&key);
        }
        pass
    }

    /// Evicts `key`'s block, which the index last saw used at `accessed`,
    /// unless someone used it since (another process: its access record
    /// moved, or it stored the key again before the removal, where the
    /// backing can tell; this one: it protected the key while the record
    /// was read). The caller holds the key's removal mark.
    fn evict_one(&self, key: &BlockKey, accessed: SystemTime, pass: &mut EvictPass) {
        let seen = match self.blocks.last_access(key) {
            None => {
                lock(&self.index).index.remove(key);
                return;
            }
            Some(seen) if seen.at > accessed + ACCESS_SLACK => {
                pass.used_elsewhere += 1;
                lock(&self.index).index.touch(key, seen.at);
                return;
            }
            Some(seen) => seen,
        };
        // The last moment a protection can save the block: from here on,
        // a load of the key reports it missing (never wrong bytes).
        if lock(&self.guards).protected.contains_key(key) {
            pass.protected += 1;
            return;
        }
        match self.blocks.evict(key, &seen) {
            Ok(Evicted::Removed) => {
                pass.evicted += 1;
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                lock(&self.index).index.remove(key);
            }
            Ok(Evicted::Gone) => {
                lock(&self.index).index.remove(key);
            }
            Ok(Evicted::Replaced) => {
                // Stored again by another process since the check: a use.
                pass.used_elsewhere += 1;
                lock(&self.index).index.touch(key, SystemTime::now());
            }
            Err(e) => {
                tracing::warn!("cannot evict block {key}: {e}");
                pass.errors += 1;
                pass.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// Marks `key` as being removed by this caller, unless it is protected
    /// or another removal of it is in progress (false). The removal's
    /// requests then run without the lock; [`Shared::end_removal`] clears
    /// the mark.
    fn start_removal(&self, key: &BlockKey) -> bool {
        let mut guards = lock(&self.guards);
        !guards.protected.contains_key(key) && guards.removing.insert(key.clone())
    }

    fn end_removal(&self, key: &BlockKey) {
        lock(&self.guards).removing.remove(key);
    }

    fn protect(&self, keys: &[BlockKey]) {
        {
            let mut guards = lock(&self.guards);
            for k in keys {
                *guards.protected.entry(k.clone()).or_insert(0) += 1;
            }
        }
        // Protection is per process; recording an access tells evictors in
        // other processes (which skip blocks used since they looked) too.
        lock(&self.touches).extend(keys.iter().cloned());
    }

    fn unprotect(&self, keys: &[BlockKey]) {
        let mut guards = lock(&self.guards);
        for k in keys {
            if let Some(n) = guards.protected.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    guards.protected.remove(k);
                }
            }
        }
    }

    /// Checks `keys` in storage and updates the index; true for each key
    /// whose block is present with this namespace's size. A key whose
    /// block a load refused counts only once its header is valid again (a
    /// store replaced the file); unchanged, it stays a miss.
    fn confirm(&self, keys: &[BlockKey]) -> Vec<bool> {
        let file_len = self.blocks.codec().file_len;
        let found = self.blocks.stat_many(keys);
        let refused: Vec<usize> = {
            let space = lock(&self.index);
            (0..keys.len())
                .filter(|&i| {
                    found[i].is_some_and(|f| f.file_bytes == file_len)
                        && space.index.is_refused(&keys[i])
                })
                .collect()
        };
        let mut still_refused = HashSet::new();
        if !refused.is_empty() {
            let probe: Vec<BlockKey> = refused.iter().map(|&i| keys[i].clone()).collect();
            for (i, valid) in refused.into_iter().zip(self.blocks.valid_many(&probe)) {
                if !valid {
                    still_refused.insert(i);
                }
            }
        }
        let mut space = lock(&self.index);
        keys.iter()
            .zip(found)
            .enumerate()
            .map(|(i, (k, f))| match f {
                Some(f) if f.file_bytes == file_len => {
                    if still_refused.contains(&i) {
                        space.index.refuse(k.clone(), f.file_bytes, f.accessed);
                        return false;
                    }
                    space.index.insert(k.clone(), f.file_bytes, f.accessed);
                    true
                }
                _ => {
                    space.index.remove(k);
                    false
                }
            })
            .collect()
    }

    /// Moves a job whose outcomes are all set to the finished queue. A
    /// load's keys that no worker ran (and so did not release) are
    /// unprotected first, outside the scheduler lock (so `poll` never waits
    /// on eviction I/O), and before the result becomes visible (so a caller
    /// acting on it never finds them still protected).
    fn finish<'a>(&'a self, mut sched: MutexGuard<'a, Sched>, job: JobId) {
        let state = sched.jobs.get_mut(&job).expect("finishing a known job");
        state.finishing = true;
        if state.kind == JobKind::Load && state.handed < state.tasks.len() {
            let release: Vec<BlockKey> = state.tasks[state.handed..]
                .iter()
                .map(|t| t.key.clone())
                .collect();
            state.handed = state.tasks.len();
            drop(sched);
            // The job stays listed (`finishing`), so `wait` keeps waiting
            // and no one else finishes it meanwhile.
            self.unprotect(&release);
            sched = lock(&self.sched);
        }
        let state = sched.jobs.remove(&job).expect("finishing a known job");
        let keys = state
            .tasks
            .iter()
            .zip(state.outcomes)
            .map(|(t, o)| KeyResult {
                key: t.key.clone(),
                outcome: o.expect("finished jobs have every outcome"),
            })
            .collect();
        sched.finished.push_back(JobResult {
            job,
            kind: state.kind,
            keys,
            bytes: state.bytes,
            seconds: state.submitted.elapsed().as_secs_f64(),
        });
        self.done.notify_all();
    }

    fn rescan(&self) -> Result<()> {
        let started = Instant::now();
        let mut found = self.blocks.scan()?;
        // Blocks of another size are not blocks this store can load.
        let file_len = self.blocks.codec().file_len;
        found.retain(|b| b.file_bytes == file_len);
        lock(&self.index).index.replace_with_scan(found, started);
        Ok(())
    }

    fn flush_touches(&self) {
        let mut keys = std::mem::take(&mut *lock(&self.touches));
        if keys.is_empty() {
            return;
        }
        keys.sort_unstable();
        keys.dedup();
        self.blocks.record_access(&keys, SystemTime::now());
    }

    fn flush_counters(&self) -> Result<()> {
        self.flushed
            .flush_with(&self.counters, |delta| self.blocks.add_counters(delta))
    }

    /// Frees space when the filesystem is above the high watermark or the
    /// namespace above its capacity.
    fn enforce_limits(&self) {
        if let Some(cap) = self.config.capacity
            && lock(&self.index).index.total_bytes() > cap
        {
            self.evict_to((cap as f64 * CAPACITY_LOW_FRACTION) as u64);
        }
        let (Some(high), Some(low)) = self.config.watermarks() else {
            return;
        };
        let Some((used, total)) = self.blocks.usage() else {
            return;
        };
        if total > 0.0 && used / total > high {
            let to_free = (used - low * total).max(0.0) as u64;
            let held = lock(&self.index).index.total_bytes();
            self.evict_to(held.saturating_sub(to_free));
        }
    }

    fn housekeeper(&self) {
        let mut last_scan = Instant::now();
        let mut last_flush = Instant::now();
        loop {
            let stop = {
                let g = lock(&self.housekeeping);
                let (g, _) = self
                    .wake_housekeeper
                    .wait_timeout_while(g, TICK, |stop| !*stop)
                    .expect("KV store lock poisoned by a panic");
                *g
            };
            if stop {
                return;
            }
            self.flush_touches();
            if last_scan.elapsed() >= self.config.rescan_interval {
                if let Err(e) = self.rescan() {
                    tracing::warn!("KV rescan failed: {e}");
                }
                last_scan = Instant::now();
            }
            self.enforce_limits();
            if last_flush.elapsed() >= Duration::from_secs(2) {
                if let Err(e) = self.flush_counters() {
                    tracing::warn!("could not write KV counters: {e}");
                }
                last_flush = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{Receiver, Sender, channel};

    use super::*;
    use crate::kv::backing::{Accessed, Found, KeyPipeline};
    use crate::kv::codec::BlockCodec;
    use crate::kv::scan::ScannedBlock;
    use crate::kv::stats::Counters;
    use crate::kv::tensors::testing::patterned_layout;

    /// Block files with two seams: the first access-record read (an
    /// eviction's first request) says it started (`entered`) and waits
    /// until the test lets it go (`release`); the eviction of `republish`
    /// first publishes a fresh copy of its block by rename, as a store in
    /// another process sharing the root would.
    struct Gated {
        files: BlockFiles,
        entered: Mutex<Option<Sender<()>>>,
        release: Mutex<Option<Receiver<()>>>,
        republish: Mutex<Option<BlockKey>>,
    }

    impl Gated {
        fn new(files: BlockFiles) -> Self {
            Self {
                files,
                entered: Mutex::new(None),
                release: Mutex::new(None),
                republish: Mutex::new(None),
            }
        }
    }

    impl Backing for Gated {
        fn codec(&self) -> &BlockCodec {
            self.files.codec()
        }
        fn location(&self) -> String {
            self.files.location()
        }
        fn local_dir(&self) -> Option<&Path> {
            self.files.local_dir()
        }
        fn mode(&self) -> String {
            self.files.mode()
        }
        fn probe_batch(&self) -> usize {
            self.files.probe_batch()
        }
        fn stat_many(&self, keys: &[BlockKey]) -> Vec<Option<Found>> {
            self.files.stat_many(keys)
        }
        fn valid_many(&self, keys: &[BlockKey]) -> Vec<bool> {
            self.files.valid_many(keys)
        }
        fn pipeline(&self, depth: usize) -> Result<Box<dyn KeyPipeline + '_>> {
            self.files.pipeline(depth)
        }
        fn remove(&self, key: &BlockKey) -> Result<bool> {
            self.files.remove(key)
        }
        fn evict(&self, key: &BlockKey, seen: &Accessed) -> Result<Evicted> {
            if lock(&self.republish).as_ref() == Some(key) {
                let path = self.files.path(key);
                let fresh = path.with_extension("fresh");
                std::fs::copy(&path, &fresh).unwrap();
                std::fs::rename(&fresh, &path).unwrap();
            }
            self.files.evict(key, seen)
        }
        fn record_access(&self, keys: &[BlockKey], when: SystemTime) {
            self.files.record_access(keys, when)
        }
        fn last_access(&self, key: &BlockKey) -> Option<Accessed> {
            if let Some(entered) = lock(&self.entered).take() {
                entered.send(()).unwrap();
                let release = lock(&self.release).take().unwrap();
                let _ = release.recv();
            }
            self.files.last_access(key)
        }
        fn scan(&self) -> Result<Vec<ScannedBlock>> {
            self.files.scan()
        }
        fn add_counters(&self, delta: &Counters) -> Result<()> {
            self.files.add_counters(delta)
        }
        fn usage(&self) -> Option<(f64, f64)> {
            self.files.usage()
        }
    }

    fn key(i: u8) -> BlockKey {
        BlockKey::new(vec![b'k', i]).unwrap()
    }

    /// A store under `root` on a [`Gated`] backing that `arm` sets up,
    /// holding blocks of keys 0 and 1, key 0 the least recently used; with
    /// the tensors it stored from (keep them while the store lives).
    fn gated_store_of_two(
        root: &Path,
        model: &str,
        arm: impl FnOnce(&Gated),
    ) -> (KvStore, Vec<Arc<crate::memory::HostRegion>>) {
        let mut config = KvConfig::new(root, crate::kv::namespace::testing::namespace(model, 1, 1));
        config.backend = crate::transfer::BackendKind::Buffered;
        let (layout, mem) = patterned_layout(&[8192, 4096], 8, 0x17);
        let gated = Gated::new(BlockFiles::open(&config, root, layout).unwrap());
        arm(&gated);
        let store = KvStore::start(config, Box::new(gated)).unwrap();
        for i in 0..2u8 {
            // SAFETY: nothing writes the pages while the job runs.
            let job = unsafe { store.submit_store(&[key(i)], &[u64::from(i)]) }.unwrap();
            assert!(store.wait(&[job], Duration::from_secs(30))[0].succeeded());
            // Key 0 is the least recently used.
            std::thread::sleep(Duration::from_millis(20));
        }
        (store, mem)
    }

    #[test]
    fn protect_never_waits_for_eviction_io_and_saves_the_block() {
        let root = tempfile::tempdir().unwrap();
        let (entered_tx, entered) = channel();
        let (release, release_rx) = channel();
        let (store, _mem) = gated_store_of_two(root.path(), "test/gated", |gated| {
            *lock(&gated.entered) = Some(entered_tx);
            *lock(&gated.release) = Some(release_rx);
        });
        std::thread::scope(|s| {
            let evictor = s.spawn(|| store.evict_to(0));
            // The eviction of key 0 is reading its access record.
            entered.recv_timeout(Duration::from_secs(30)).unwrap();
            let (done_tx, done) = channel();
            let store = &store;
            s.spawn(move || {
                store.protect(&[key(0)]);
                store.protect(&[key(1)]);
                store.unprotect(&[key(1)]);
                done_tx.send(()).unwrap();
            });
            let waited = done.recv_timeout(Duration::from_secs(5));
            release.send(()).unwrap();
            assert!(waited.is_ok(), "protect waited for the eviction's I/O");
            // Protected while its eviction ran: kept; key 1 went instead.
            assert_eq!(evictor.join().unwrap(), 1);
        });
        let dir = store.dir().unwrap();
        assert!(
            dir.join(key(0).rel_path()).exists(),
            "a protected block went"
        );
        assert!(!dir.join(key(1).rel_path()).exists());
        store.unprotect(&[key(0)]);
        assert_eq!(store.remove(&[key(0)]).unwrap(), 1);
    }

    #[test]
    fn eviction_keeps_a_block_republished_after_its_access_check() {
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir().unwrap();
        // Another process stores key 0 again while it is being evicted.
        let (store, _mem) = gated_store_of_two(root.path(), "test/republish", |gated| {
            *lock(&gated.republish) = Some(key(0));
        });
        let dir = store.dir().unwrap().to_path_buf();
        let (old, next) = (dir.join(key(0).rel_path()), dir.join(key(1).rel_path()));
        let stored = std::fs::metadata(&old).unwrap().ino();
        let file = store.file_bytes();
        // Room for one block: key 0 goes first, is republished, is kept.
        assert_eq!(store.evict_to(file), 1);
        let kept = std::fs::metadata(&old).expect("the republished block was evicted");
        assert_ne!(kept.ino(), stored, "the file stored first is still there");
        assert!(!next.exists(), "the next victim was kept");
        let stats = store.stats();
        assert_eq!((stats.blocks, stats.bytes), (1, file));
        assert_eq!(stats.counters.evictions, 1);
        assert_eq!(store.lookup(&[key(0)]), 1, "the index forgot the block");
    }
}
