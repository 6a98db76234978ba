//! Moving block files between the registered KV tensors and storage.
//!
//! Bytes go through the snapshot transfer backends (`buffered`, `direct`):
//! a batch of keys becomes one [`TransferPlan`] with one whole-file
//! operation per key (header + payload + padding) against a page-aligned
//! staging region, so direct I/O runs in place with no extra copy. Pages
//! are gathered into / scattered out of staging block-major.
//!
//! Guarantees:
//! - a store writes a temporary file next to the final name and publishes it
//!   with `rename`, so readers see either no block or a whole one; a failed
//!   or cancelled store removes its temporary file and publishes nothing;
//! - a load accepts a file only when its header names this namespace, the
//!   key and the expected payload length, and the payload's CRC32C matches;
//!   otherwise that key fails with a reason naming the file.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use super::format::{BlockHeader, HEADER_BYTES, HeaderError};
use super::job::{KeyOutcome, KeyTask};
use super::key::BlockKey;
use super::scan::TEMP_MARK;
use super::tensors::KvLayout;
use crate::integrity::crc32c;
use crate::memory::{HostRegion, Region};
use crate::storage::durable::{preallocate, unique_id};
use crate::transfer::{
    Backend, Checksums, Direction, FileTarget, IO_ALIGN, PlanBuilder, TransferJob,
};
use crate::units::align_up;
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

/// Everything needed to read and write one namespace's block files.
pub(crate) struct BlockFiles {
    pub dir: PathBuf,
    pub namespace_hash: u64,
    pub layout: KvLayout,
    pub per_file: usize,
    pub payload_len: u64,
    pub file_len: u64,
    pub backend: Box<dyn Backend>,
    pub io_chunk: u64,
    pub fsync: bool,
    /// What the backend last reported running, with any fallback reason.
    pub mode: std::sync::Mutex<String>,
}

impl BlockFiles {
    pub fn new(
        dir: PathBuf,
        namespace_hash: u64,
        layout: KvLayout,
        per_file: usize,
        backend: Box<dyn Backend>,
        io_chunk: u64,
        fsync: bool,
    ) -> Self {
        let payload_len = layout.block_bytes() * per_file as u64;
        Self {
            dir,
            namespace_hash,
            layout,
            per_file,
            payload_len,
            file_len: HEADER_BYTES as u64 + align_up(payload_len, IO_ALIGN),
            backend,
            io_chunk,
            fsync,
            mode: std::sync::Mutex::new(String::new()),
        }
    }

    /// Where `key`'s block file lives.
    pub fn path(&self, key: &BlockKey) -> PathBuf {
        self.dir.join(key.rel_path())
    }

    /// True when a block for `key` is stored with a header that names this
    /// namespace, the key and the right payload length (the payload
    /// checksum is checked by loads and `kv verify`).
    pub fn stored_and_valid(&self, key: &BlockKey) -> bool {
        let Ok(file) = File::open(self.path(key)) else {
            return false;
        };
        if file.metadata().map_or(true, |m| m.len() != self.file_len) {
            return false;
        }
        let mut header = vec![0u8; HEADER_BYTES];
        if file.read_exact_at(&mut header, 0).is_err() {
            return false;
        }
        BlockHeader::decode(&header)
            .and_then(|h| h.expect(self.namespace_hash, key, self.payload_len))
            .is_ok()
    }

    /// Loads every task's file, verifies it and scatters its pages.
    ///
    /// # Safety
    /// Nobody may access the pages of the tasks' block ids during the call.
    pub unsafe fn load(
        &self,
        staging: &mut Staging,
        tasks: &[KeyTask],
        cancel: &AtomicBool,
    ) -> Vec<KeyOutcome> {
        let mut out: Vec<Option<KeyOutcome>> = vec![None; tasks.len()];
        let mut reading = Vec::new();
        let mut inodes = Vec::new();
        for (i, t) in tasks.iter().enumerate() {
            let path = self.path(&t.key);
            match std::fs::metadata(&path) {
                Ok(m) if m.len() == self.file_len => {
                    reading.push(i);
                    inodes.push(m.ino());
                }
                Ok(m) if m.len() < self.file_len => {
                    out[i] = Some(KeyOutcome::Failed(format!(
                        "truncated: {} is {} bytes, a block of this namespace needs {}",
                        path.display(),
                        m.len(),
                        self.file_len
                    )))
                }
                Ok(m) => {
                    out[i] = Some(KeyOutcome::Failed(format!(
                        "foreign: {} is {} bytes, a block of this namespace is {}: written with other page sizes?",
                        path.display(),
                        m.len(),
                        self.file_len
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
        let staging = match staging.at_least(reading.len() as u64 * self.file_len) {
            Ok(s) => s,
            Err(e) => return fail_rest(out, &e.to_string()),
        };
        let results = self.run_each(Direction::Load, staging, &paths, cancel);
        let fl = self.file_len as usize;
        for ((slot, &i), result) in reading.iter().enumerate().zip(results) {
            let t = &tasks[i];
            out[i] = Some(match result {
                Err(e) => outcome_of(e),
                Ok(()) => {
                    let file = &staging.as_slice()[slot * fl..(slot + 1) * fl];
                    match self.check_file(file, &t.key, &paths[slot]) {
                        Err((reason, true)) => {
                            KeyOutcome::Failed(quarantine(&paths[slot], inodes[slot], reason))
                        }
                        Err((reason, false)) => KeyOutcome::Failed(reason),
                        Ok(payload) => {
                            // SAFETY: the caller guarantees exclusive access
                            // to the pages of `t.ids`.
                            match unsafe {
                                self.layout.scatter(payload, t.file_blocks.clone(), &t.ids)
                            } {
                                Ok(()) => KeyOutcome::Loaded,
                                Err(e) => KeyOutcome::Failed(e.to_string()),
                            }
                        }
                    }
                }
            });
        }
        out.into_iter()
            .map(|o| o.expect("every key has an outcome"))
            .collect()
    }

    /// Checks a whole block file held in memory; returns its payload, or
    /// why it was refused and whether the file is damaged (as opposed to a
    /// valid block of another namespace, format version or layout, which is
    /// never deleted).
    pub fn check_file<'a>(
        &self,
        file: &'a [u8],
        key: &BlockKey,
        path: &Path,
    ) -> std::result::Result<&'a [u8], (String, bool)> {
        let header = BlockHeader::decode(file)
            .and_then(|h| {
                h.expect(self.namespace_hash, key, self.payload_len)
                    .map(|()| h)
            })
            .map_err(|e| {
                let damaged = !matches!(
                    e,
                    HeaderError::Namespace { .. }
                        | HeaderError::Version(_)
                        | HeaderError::PayloadLength { .. }
                );
                let what = if damaged { "corrupt" } else { "foreign" };
                (format!("{what}: {}: {e}", path.display()), damaged)
            })?;
        let payload = &file[HEADER_BYTES..HEADER_BYTES + self.payload_len as usize];
        let found = crc32c(payload);
        if found != header.payload_crc32c {
            return Err((
                format!(
                    "corrupt: {}: payload checksum mismatch (recorded {:08x}, found {found:08x})",
                    path.display(),
                    header.payload_crc32c
                ),
                true,
            ));
        }
        Ok(payload)
    }

    /// Writes and publishes a block file for every task.
    ///
    /// # Safety
    /// Nobody may write the pages of the tasks' block ids during the call.
    pub unsafe fn store(
        &self,
        staging: &mut Staging,
        tasks: &[KeyTask],
        cancel: &AtomicBool,
    ) -> Vec<KeyOutcome> {
        let mut out: Vec<Option<KeyOutcome>> = vec![None; tasks.len()];
        let fl = self.file_len as usize;
        let pl = self.payload_len as usize;
        let staging = match staging.at_least(tasks.len() as u64 * self.file_len) {
            Ok(s) => s,
            Err(e) => return fail_rest(out, &e.to_string()),
        };
        let mut writing = Vec::new();
        let mut temps = Vec::new();
        for (i, t) in tasks.iter().enumerate() {
            let slot = writing.len();
            let buf = &mut staging.as_mut_slice()[slot * fl..(slot + 1) * fl];
            let (head, body) = buf.split_at_mut(HEADER_BYTES);
            let (payload, padding) = body.split_at_mut(pl);
            // SAFETY: the caller rules out writers of these pages.
            if let Err(e) = unsafe { self.layout.gather(&t.ids, payload) } {
                out[i] = Some(KeyOutcome::Failed(e.to_string()));
                continue;
            }
            padding.fill(0);
            let header = BlockHeader {
                namespace_hash: self.namespace_hash,
                key: t.key.clone(),
                payload_len: self.payload_len,
                payload_crc32c: crc32c(payload),
            };
            head.copy_from_slice(&header.encode());
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
        if let Err(e) = preallocate(&file, &temp, self.file_len) {
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
        let mut plan = PlanBuilder::new(direction, crate::integrity::DEFAULT_CHUNK, self.io_chunk);
        for &i in which {
            let file = plan.add_file(FileTarget {
                path: paths[i].clone(),
                root: 0,
                size: self.file_len,
            });
            plan.add_extent(file, 0, self.file_len, 0, i as u64 * self.file_len);
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

fn outcome_of(e: Error) -> KeyOutcome {
    match e {
        Error::Cancelled => KeyOutcome::Cancelled,
        e => KeyOutcome::Failed(e.to_string()),
    }
}

fn fail_rest(out: Vec<Option<KeyOutcome>>, reason: &str) -> Vec<KeyOutcome> {
    out.into_iter()
        .map(|o| o.unwrap_or_else(|| KeyOutcome::Failed(reason.to_string())))
        .collect()
}
