//! Blocks as files in a namespace directory on a local or shared
//! filesystem: `<root>/<namespace>/hh/hh/<hex>.kvb`.
//!
//! Bytes go through the snapshot transfer backends (`buffered`, `direct`):
//! a batch of keys becomes one [`TransferPlan`](crate::transfer::TransferPlan)
//! with one whole-file operation per key (header + payload + padding)
//! against a page-aligned staging region, so direct I/O runs in place with
//! no extra copy. Pages are gathered into / scattered out of staging
//! block-major.
//!
//! Guarantees:
//! - a store writes a temporary file next to the final name and publishes it
//!   with `rename`, so readers see either no block or a whole one; a failed
//!   or cancelled store removes its temporary file and publishes nothing;
//! - a load accepts a file only when its header names this namespace, the
//!   key and the expected payload length, and the payload's CRC32C matches;
//!   otherwise that key fails with a reason naming the file, and a damaged
//!   file is removed (only the very file that was read);
//! - the access record is the file's mtime ([`crate::kv::access`]).

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use super::{Backing, Found};
use crate::kv::access::{last_access, record_access};
use crate::kv::codec::BlockCodec;
use crate::kv::config::KvConfig;
use crate::kv::format::HEADER_BYTES;
use crate::kv::job::{KeyOutcome, KeyTask};
use crate::kv::key::BlockKey;
use crate::kv::namespace::{BlockLayout, check_layout};
use crate::kv::scan::{ScannedBlock, TEMP_MARK, scan};
use crate::kv::stats::{Counters, add_to_file};
use crate::kv::tensors::KvLayout;
use crate::memory::{HostRegion, Region};
use crate::storage::durable::{preallocate, unique_id};
use crate::storage::roots::check_dir;
use crate::transfer::{
    Backend, Checksums, Direction, FileTarget, PlanBuilder, TransferJob, Tuning, backend,
};
use crate::{Error, Result};

/// A worker's reusable staging memory (page-aligned, grown on demand).
#[derive(Default)]
pub(crate) struct Staging(Option<HostRegion>);

impl Staging {
    fn at_least(&mut self, len: u64) -> Result<&mut HostRegion> {
        if self.0.as_ref().is_none_or(|r| r.len() < len) {
            self.0 = None;
            let region = HostRegion::new(len)?;
            region.populate(0, len);
            self.0 = Some(region);
        }
        Ok(self.0.as_mut().expect("allocated above"))
    }
}

/// One namespace's block files.
pub(crate) struct BlockFiles {
    pub dir: PathBuf,
    codec: BlockCodec,
    backend: Box<dyn Backend>,
    io_chunk: u64,
    fsync: bool,
    /// What the backend last reported running, with any fallback reason.
    mode: std::sync::Mutex<String>,
}

impl BlockFiles {
    /// Opens (creating if needed) the namespace directory under `root`,
    /// checks it is writable and records or checks the page sizes.
    pub fn open(config: &KvConfig, root: &Path, layout: KvLayout) -> Result<Self> {
        check_dir(root).map_err(|_| {
            Error::InvalidInput(format!(
                "KV root {} does not exist or is not a directory: create it or fix --root",
                root.display()
            ))
        })?;
        let dir = config.namespace.open(root).map_err(|e| match e {
            Error::Io { ref source, .. }
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EROFS | libc::EACCES | libc::EPERM)
                ) =>
            {
                Error::InvalidInput(format!(
                    "KV root {} is not writable ({e}): stores need write access; fix the permissions or the mount",
                    root.display()
                ))
            }
            e => e,
        })?;
        probe_writable(&dir)?;
        check_layout(
            &dir,
            &BlockLayout {
                page_bytes: layout.page_bytes(),
            },
        )?;
        let tuning = Tuning {
            queue_depth: config.batch,
            workers: config.batch,
            ..config.tuning.clone()
        };
        Ok(Self {
            dir,
            codec: BlockCodec::new(
                config.namespace.hash(),
                layout,
                config.namespace.blocks_per_file as usize,
            ),
            backend: backend(config.backend, tuning.clone()),
            io_chunk: tuning.chunk_size,
            fsync: config.fsync,
            mode: std::sync::Mutex::new(String::new()),
        })
    }

    /// Where `key`'s block file lives.
    pub fn path(&self, key: &BlockKey) -> PathBuf {
        self.dir.join(key.rel_path())
    }

    /// True when a block for `key` is stored with a header that names this
    /// namespace, the key and the right payload length (the payload
    /// checksum is checked by loads and `kv verify`).
    fn stored_and_valid(&self, key: &BlockKey) -> bool {
        let Ok(file) = File::open(self.path(key)) else {
            return false;
        };
        if file
            .metadata()
            .map_or(true, |m| m.len() != self.codec.file_len)
        {
            return false;
        }
        let mut header = vec![0u8; HEADER_BYTES];
        if file.read_exact_at(&mut header, 0).is_err() {
            return false;
        }
        self.codec.header_matches(&header, key)
    }

    /// Loads every task's file, verifies it and scatters its pages.
    ///
    /// # Safety
    /// Nobody may access the pages of the tasks' block ids during the call.
    unsafe fn load_files(
        &self,
        staging: &mut Staging,
        tasks: &[KeyTask],
        cancel: &AtomicBool,
    ) -> Vec<KeyOutcome> {
        let file_len = self.codec.file_len;
        let mut out: Vec<Option<KeyOutcome>> = vec![None; tasks.len()];
        let mut reading = Vec::new();
        let mut inodes = Vec::new();
        for (i, t) in tasks.iter().enumerate() {
            let path = self.path(&t.key);
            match std::fs::metadata(&path) {
                Ok(m) if m.len() == file_len => {
                    reading.push(i);
                    inodes.push(m.ino());
                }
                Ok(m) if m.len() < file_len => {
                    out[i] = Some(KeyOutcome::Failed(format!(
                        "truncated: {} is {} bytes, a block of this namespace needs {file_len}",
                        path.display(),
                        m.len(),
                    )))
                }
                Ok(m) => {
                    out[i] = Some(KeyOutcome::Failed(format!(
                        "foreign: {} is {} bytes, a block of this namespace is {file_len}: written with other page sizes?",
                        path.display(),
                        m.len(),
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    out[i] = Some(KeyOutcome::Failed(format!(
                        "missing: no block file at {}",
                        path.display()
                    )))
                }
                Err(e) => {
                    out[i] = Some(KeyOutcome::Failed(format!(
                        "cannot read {}: {e}",
                        path.display()
                    )))
                }
            }
        }
        let paths: Vec<PathBuf> = reading.iter().map(|&i| self.path(&tasks[i].key)).collect();
        let staging = match staging.at_least(reading.len() as u64 * file_len) {
            Ok(s) => s,
            Err(e) => return fail_rest(out, &e.to_string()),
        };
        let results = self.run_each(Direction::Load, staging, &paths, cancel);
        let fl = file_len as usize;
        for ((slot, &i), result) in reading.iter().enumerate().zip(results) {
            out[i] = Some(match result {
                Err(e) => outcome_of(e),
                Ok(()) => {
                    let image = &staging.as_slice()[slot * fl..(slot + 1) * fl];
                    let origin = paths[slot].display().to_string();
                    // SAFETY: the caller guarantees exclusive access to the
                    // pages of the task's ids.
                    match unsafe { self.codec.decode_into(image, &tasks[i], &origin) } {
                        Ok(()) => KeyOutcome::Loaded,
                        Err(r) if r.damaged => {
                            KeyOutcome::Failed(quarantine(&paths[slot], inodes[slot], r.reason))
                        }
                        Err(r) => KeyOutcome::Failed(r.reason),
                    }
                }
            });
        }
        out.into_iter()
            .map(|o| o.expect("every key has an outcome"))
            .collect()
    }

    /// Writes and publishes a block file for every task.
    ///
    /// # Safety
    /// Nobody may write the pages of the tasks' block ids during the call.
    unsafe fn store_files(
        &self,
        staging: &mut Staging,
        tasks: &[KeyTask],
        cancel: &AtomicBool,
    ) -> Vec<KeyOutcome> {
        let mut out: Vec<Option<KeyOutcome>> = vec![None; tasks.len()];
        let fl = self.codec.file_len as usize;
        let staging = match staging.at_least(tasks.len() as u64 * self.codec.file_len) {
            Ok(s) => s,
            Err(e) => return fail_rest(out, &e.to_string()),
        };
        let mut writing = Vec::new();
        let mut temps = Vec::new();
        for (i, t) in tasks.iter().enumerate() {
            let slot = writing.len();
            let image = &mut staging.as_mut_slice()[slot * fl..(slot + 1) * fl];
            // SAFETY: the caller rules out writers of these pages.
            if let Err(e) = unsafe { self.codec.encode(t, image) } {
                out[i] = Some(KeyOutcome::Failed(e.to_string()));
                continue;
            }
            match self.create_temp(&t.key) {
                Ok(temp) => {
                    writing.push(i);
                    temps.push(temp);
                }
                Err(e) => out[i] = Some(KeyOutcome::Failed(e.to_string())),
            }
        }
        let results = self.run_each(Direction::Store, staging, &temps, cancel);
        for ((&i, temp), result) in writing.iter().zip(&temps).zip(results) {
            let outcome = match result.and_then(|()| self.publish(temp, &tasks[i].key)) {
                Ok(()) => KeyOutcome::Stored,
                Err(e) => {
                    let _ = std::fs::remove_file(temp);
                    outcome_of(e)
                }
            };
            out[i] = Some(outcome);
        }
        out.into_iter()
            .map(|o| o.expect("every key has an outcome"))
            .collect()
    }

    /// Creates an empty temporary file next to `key`'s final path.
    fn create_temp(&self, key: &BlockKey) -> Result<PathBuf> {
        let path = self.path(key);
        let parent = path.parent().expect("block paths have a parent");
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::writing("block directory", parent, e))?;
        let mut name = path.file_name().expect("file name").to_os_string();
        name.push(format!("{TEMP_MARK}{}", unique_id()));
        let temp = parent.join(name);
        let file = File::create_new(&temp).map_err(|e| Error::writing("block file", &temp, e))?;
        // Allocated up front: a full disk fails here, before data moves, and
        // direct writes land inside the file instead of extending it (which
        // filesystems serialise).
        if let Err(e) = preallocate(&file, &temp, self.codec.file_len) {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        Ok(temp)
    }

    /// Makes a written temporary file the block for `key` (atomic rename;
    /// a concurrent store of the same key publishes identical bytes).
    fn publish(&self, temp: &Path, key: &BlockKey) -> Result<()> {
        if self.fsync {
            File::open(temp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::writing("block file", temp, e))?;
        }
        let path = self.path(key);
        std::fs::rename(temp, &path).map_err(|e| Error::writing("block file", &path, e))
    }

    /// Runs one whole-file operation per path against consecutive slots of
    /// `staging`; when the batch fails, retries each file alone so the
    /// error lands on the key that caused it.
    fn run_each(
        &self,
        direction: Direction,
        staging: &HostRegion,
        paths: &[PathBuf],
        cancel: &AtomicBool,
    ) -> Vec<Result<()>> {
        if paths.is_empty() {
            return Vec::new();
        }
        let all: Vec<usize> = (0..paths.len()).collect();
        match self.run_files(direction, staging, paths, &all, cancel) {
            Ok(()) => paths.iter().map(|_| Ok(())).collect(),
            Err(Error::Cancelled) => paths.iter().map(|_| Err(Error::Cancelled)).collect(),
            Err(e) if paths.len() == 1 => vec![Err(e)],
            Err(_) => (0..paths.len())
                .map(|i| self.run_files(direction, staging, paths, &[i], cancel))
                .collect(),
        }
    }

    fn run_files(
        &self,
        direction: Direction,
        staging: &HostRegion,
        paths: &[PathBuf],
        which: &[usize],
        cancel: &AtomicBool,
    ) -> Result<()> {
        let file_len = self.codec.file_len;
        let mut plan = PlanBuilder::new(direction, crate::integrity::DEFAULT_CHUNK, self.io_chunk);
        for &i in which {
            let file = plan.add_file(FileTarget {
                path: paths[i].clone(),
                root: 0,
                size: file_len,
            });
            plan.add_extent(file, 0, file_len, 0, i as u64 * file_len);
        }
        let plan = plan.build();
        let regions: [&dyn Region; 1] = [staging];
        let mut job = TransferJob::new(&plan, &regions, Checksums::Skip);
        job.cancel = Some(cancel);
        let stats = self.backend.run(&job)?;
        let mut mode = stats.mode;
        for f in &stats.fallbacks {
            mode.push_str(&format!(" ({f})"));
        }
        *self.mode.lock().expect("mode lock") = mode;
        Ok(())
    }
}

impl Backing for BlockFiles {
    fn codec(&self) -> &BlockCodec {
        &self.codec
    }

    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn local_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }

    fn mode(&self) -> String {
        self.mode.lock().expect("mode lock").clone()
    }

    fn probe_batch(&self) -> usize {
        // A stat is a cheap system call: probe one key at a time and stop
        // at the first miss.
        1
    }

    fn stat_many(&self, keys: &[BlockKey]) -> Vec<Option<Found>> {
        keys.iter()
            .map(|k| {
                let m = std::fs::metadata(self.path(k)).ok()?;
                Some(Found {
                    file_bytes: m.len(),
                    accessed: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                })
            })
            .collect()
    }

    fn valid_many(&self, keys: &[BlockKey]) -> Vec<bool> {
        keys.iter().map(|k| self.stored_and_valid(k)).collect()
    }

    unsafe fn load(
        &self,
        staging: &mut Staging,
        tasks: &[KeyTask],
        cancel: &AtomicBool,
    ) -> Vec<KeyOutcome> {
        // SAFETY: forwarded from the caller.
        unsafe { self.load_files(staging, tasks, cancel) }
    }

    unsafe fn store(
        &self,
        staging: &mut Staging,
        tasks: &[KeyTask],
        cancel: &AtomicBool,
    ) -> Vec<KeyOutcome> {
        // SAFETY: forwarded from the caller.
        unsafe { self.store_files(staging, tasks, cancel) }
    }

    fn remove(&self, key: &BlockKey) -> Result<bool> {
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }

    fn record_access(&self, keys: &[BlockKey], when: SystemTime) {
        for k in keys {
            record_access(&self.path(k), when);
        }
    }

    fn last_access(&self, key: &BlockKey) -> Option<SystemTime> {
        last_access(&self.path(key))
    }

    fn scan(&self) -> Result<Vec<ScannedBlock>> {
        let found = scan(&self.dir)?;
        for temp in found.stale_temps {
            let _ = std::fs::remove_file(temp);
        }
        Ok(found.blocks)
    }

    fn add_counters(&self, delta: &Counters) -> Result<()> {
        add_to_file(&self.dir, delta)
    }

    fn usage(&self) -> Option<(f64, f64)> {
        let fs = rustix::fs::statvfs(&self.dir).ok()?;
        let total = fs.f_blocks as f64 * fs.f_frsize as f64;
        let used = (fs.f_blocks - fs.f_bfree) as f64 * fs.f_frsize as f64;
        Some((used, total))
    }
}

/// Fails with a clear message unless files can be created in `dir`.
fn probe_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".probe-{}", unique_id()));
    match std::fs::File::create_new(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(Error::InvalidInput(format!(
            "KV namespace directory {} is not writable ({e}): stores need write access; fix the permissions or the mount",
            dir.display()
        ))),
    }
}

/// Removes a block file that failed verification, so lookups stop
/// reporting it and the next store of the key writes it again (a store
/// skips keys whose header is valid). Only the file that was read is
/// removed: when the inode at `path` changed meanwhile (a concurrent store
/// republished the key), it is left alone.
fn quarantine(path: &Path, inode: u64, reason: String) -> String {
    let same = std::fs::metadata(path).is_ok_and(|m| m.ino() == inode);
    if same && std::fs::remove_file(path).is_ok() {
        format!("{reason}; the file was removed")
    } else {
        reason
    }
}

pub(crate) fn outcome_of(e: Error) -> KeyOutcome {
    match e {
        Error::Cancelled => KeyOutcome::Cancelled,
        e => KeyOutcome::Failed(e.to_string()),
    }
}

pub(crate) fn fail_rest(out: Vec<Option<KeyOutcome>>, reason: &str) -> Vec<KeyOutcome> {
    out.into_iter()
        .map(|o| o.unwrap_or_else(|| KeyOutcome::Failed(reason.to_string())))
        .collect()
}
