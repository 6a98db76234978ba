//! Blocks as files in a namespace directory on a local or shared
//! filesystem: `<root>/<namespace>/hh/hh/<hex>.kvb`.
//!
//! Bytes move through [`super::file_ring`]: each worker keeps its
//! transfers in flight on its own io_uring ring, the whole file (header, payload and
//! padding) in one request per key where it fits, O_DIRECT unless the
//! `buffered` backend was chosen or the filesystem refuses it; a store's
//! create, allocate and rename are requests on the same ring. The request moves the pages
//! themselves where the kernel can address them (zero copy, host memory),
//! otherwise a registered staging slot that pages are gathered into and
//! scattered out of block-major.
//!
//! Guarantees:
//! - a store writes a temporary file next to the final name and publishes it
//!   with `rename`, so readers see either no block or a whole one; a failed
//!   or cancelled store publishes nothing and removes its temporary file
//!   (the scan removes leftovers of stores that died);
//! - a load accepts a file only when its header names this namespace, the
//!   key and the expected payload length, and the payload's CRC32C matches;
//!   otherwise that key fails with a reason naming the file, and a damaged
//!   file is removed (only the very file that was read);
//! - the access record is the file's mtime ([`crate::kv::access`]);
//! - a namespace directory removed while the store is open (an operator
//!   emptying the cache) is recreated, with its records, by the next store.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use super::file_ring::FileRing;
use super::{Accessed, Backing, Evicted, Found, KeyPipeline};
use crate::kv::access::record_access_now;
use crate::kv::codec::BlockCodec;
use crate::kv::config::KvConfig;
use crate::kv::format::HEADER_BYTES;
use crate::kv::job::KeyOutcome;
use crate::kv::key::BlockKey;
use crate::kv::namespace::{BlockLayout, Namespace, check_layout};
use crate::kv::scan::{ScannedBlock, TEMP_MARK, scan};
use crate::kv::stats::{Counters, add_to_file};
use crate::kv::tensors::KvLayout;
use crate::storage::durable::unique_id;
use crate::storage::roots::check_dir;
use crate::transfer::BackendKind;
use crate::{Error, Result};

/// One namespace's block files.
pub(crate) struct BlockFiles {
    pub dir: PathBuf,
    /// What `dir` holds, to recreate it when it was removed under us.
    namespace: Namespace,
    root: PathBuf,
    pub(super) codec: BlockCodec,
    /// O_DIRECT unless `buffered` was chosen.
    direct: bool,
    fsync: bool,
    /// Test hook: the most bytes one request may move.
    max_bytes_per_call: Option<u64>,
    /// What ran: O_DIRECT requests, page-cache requests.
    ran_direct: AtomicBool,
    ran_buffered: AtomicBool,
    /// What ran: zero-copy requests, requests through staging.
    ran_zero_copy: AtomicBool,
    ran_staged: AtomicBool,
    /// A worker's staging was page-locked for copies to and from a device.
    ran_pinned: AtomicBool,
    /// A worker's staging could not be page-locked.
    pin_refused: AtomicBool,
    /// Why something ran otherwise than asked (first reason).
    fallback: Mutex<Option<String>>,
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
        let block_layout = BlockLayout {
            page_bytes: layout.page_bytes(),
        };
        check_layout(&dir, &block_layout)?;
        Ok(Self {
            dir,
            namespace: config.namespace.clone(),
            root: root.to_path_buf(),
            codec: BlockCodec::new(
                block_layout.header_hash(&config.namespace),
                layout,
                config.namespace.blocks_per_file as usize,
            ),
            direct: config.backend != BackendKind::Buffered,
            fsync: config.fsync,
            max_bytes_per_call: config.tuning.max_bytes_per_call,
            ran_direct: AtomicBool::new(false),
            ran_buffered: AtomicBool::new(false),
            ran_zero_copy: AtomicBool::new(false),
            ran_staged: AtomicBool::new(false),
            ran_pinned: AtomicBool::new(false),
            pin_refused: AtomicBool::new(false),
            fallback: Mutex::new(None),
        })
    }

    /// Recreates the namespace directory with its records after someone
    /// removed it while this store was open (an operator emptying the
    /// cache), so stores go on. Safe against other processes doing the
    /// same, and against a namespace recreated differently meanwhile (an
    /// error, as at open).
    pub(super) fn recreate_namespace(&self) -> Result<()> {
        let dir = self.namespace.open(&self.root)?;
        check_layout(
            &dir,
            &BlockLayout {
                page_bytes: self.codec.layout.page_bytes(),
            },
        )?;
        tracing::warn!(
            "KV namespace directory {} was removed while in use; recreated it",
            dir.display()
        );
        Ok(())
    }

    /// True when block files should be opened with O_DIRECT.
    pub(super) fn wants_direct(&self) -> bool {
        self.direct
    }

    pub(super) fn max_bytes_per_call(&self) -> Option<u64> {
        self.max_bytes_per_call
    }

    /// Records that a request ran with or without O_DIRECT, and zero-copy
    /// or through staging.
    pub(super) fn note_ran(&self, direct: bool, zero_copy: bool) {
        let flag = if direct {
            &self.ran_direct
        } else {
            &self.ran_buffered
        };
        flag.store(true, Ordering::Relaxed);
        let flag = if zero_copy {
            &self.ran_zero_copy
        } else {
            &self.ran_staged
        };
        flag.store(true, Ordering::Relaxed);
    }

    /// Records that staging was page-locked for device copies.
    pub(super) fn note_pinned(&self) {
        self.ran_pinned.store(true, Ordering::Relaxed);
    }

    /// Records that a worker's staging could not be page-locked, and why.
    pub(super) fn note_pin_refused(&self, why: String) {
        self.pin_refused.store(true, Ordering::Relaxed);
        self.note_fallback(why);
    }

    /// Records why something ran otherwise than asked (the first reason is
    /// kept, and logged once).
    pub(super) fn note_fallback(&self, why: String) {
        let mut f = self.fallback.lock().expect("fallback lock");
        if f.is_none() {
            tracing::warn!("KV block files: {why}");
            *f = Some(why);
        }
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

    /// True when stores flush their file before publishing it.
    pub(super) fn fsync(&self) -> bool {
        self.fsync
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
        let direct = self.ran_direct.load(Ordering::Relaxed);
        let buffered = self.ran_buffered.load(Ordering::Relaxed);
        let fallback = self.fallback.lock().expect("fallback lock").clone();
        let mut mode = match (direct, buffered, self.direct) {
            (false, false, _) => return String::new(),
            (true, false, _) => "odirect-uring",
            (false, true, false) => "buffered-uring",
            (false, true, true) => "buffered-fallback",
            (true, true, _) => "odirect-uring+buffered-fallback",
        }
        .to_string();
        mode.push_str(
            match (
                self.ran_zero_copy.load(Ordering::Relaxed),
                self.ran_staged.load(Ordering::Relaxed),
            ) {
                (true, false) => ", zero-copy",
                (true, true) => ", zero-copy+staged",
                _ => ", staged",
            },
        );
        // Only when every worker's staging is page-locked.
        if self.ran_pinned.load(Ordering::Relaxed) && !self.pin_refused.load(Ordering::Relaxed) {
            mode.push_str(" through pinned memory");
        }
        if let Some(why) = fallback {
            mode.push_str(&format!(" ({why})"));
        }
        mode
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

    fn pipeline(&self, depth: usize) -> Result<Box<dyn KeyPipeline + '_>> {
        Ok(Box::new(FileRing::new(self, depth)?))
    }

    fn remove(&self, key: &BlockKey) -> Result<bool> {
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }

    /// Removes the file only while it is the inode `seen` was read from
    /// ([`remove_if_read`]); a file republished since stays.
    fn evict(&self, key: &BlockKey, seen: &Accessed) -> Result<Evicted> {
        // `last_access` always records the inode; without one the file
        // seen could not be told from a newer one.
        let Some(inode) = seen.identity else {
            return Ok(Evicted::Replaced);
        };
        let path = self.path(key);
        match remove_if_read(&path, inode) {
            Ok(true) => Ok(Evicted::Removed),
            Ok(false) => Ok(Evicted::Replaced),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Evicted::Gone),
            Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }

    fn record_access(&self, keys: &[BlockKey], _when: SystemTime) {
        // The filesystem's clock: on a shared one, every node's accesses
        // are ordered by the same clock.
        for k in keys {
            record_access_now(&self.path(k));
        }
    }

    fn last_access(&self, key: &BlockKey) -> Option<Accessed> {
        // One stat: the access and the inode it belongs to.
        let m = std::fs::metadata(self.path(key)).ok()?;
        Some(Accessed {
            at: m.modified().ok()?,
            identity: Some(m.ino()),
        })
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

/// A fresh temporary name next to the block file at `block` (the scan
/// removes leftovers of stores that died).
pub(super) fn temp_path(block: &Path) -> PathBuf {
    let mut path = block.as_os_str().to_owned();
    path.push(format!("{TEMP_MARK}{}", unique_id()));
    path.into()
}

/// Removes a block file that failed verification, so lookups stop
/// reporting it and the next store of the key writes it again (a store
/// skips keys whose header is valid). Only the file that was read goes
/// ([`remove_if_read`]). Returns `reason`, saying whether it was removed.
pub(super) fn quarantine(path: &Path, inode: u64, reason: String) -> String {
    if matches!(remove_if_read(path, inode), Ok(true)) {
        format!("{reason}; the file was removed")
    } else {
        reason
    }
}

/// Removes the file at `path` only when it is still the one that was read
/// (inode `inode`): it is first moved aside (a temporary name the scan
/// cleans up), and when it is another file (a concurrent store republished
/// the key) it is put back, never over a newer copy. A good block is
/// therefore never lost to a removal meant for a damaged one. `Ok(true)`
/// when the file that was read is gone from `path`, `Ok(false)` when
/// another file was there, and the error of moving it aside otherwise
/// (`NotFound`: nothing was at `path`).
pub(crate) fn remove_if_read(path: &Path, inode: u64) -> std::io::Result<bool> {
    let aside = temp_path(path);
    std::fs::rename(path, &aside)?;
    let same = std::fs::metadata(&aside).is_ok_and(|m| m.ino() == inode);
    if same {
        let _ = std::fs::remove_file(&aside);
        return Ok(true);
    }
    if crate::storage::durable::rename_noreplace(&aside, path).is_err() {
        // Another copy was published meanwhile, or the move back failed:
        // the copy moved aside is not needed (the scan removes it if this
        // removal fails).
        let _ = std::fs::remove_file(&aside);
    }
    Ok(false)
}

pub(crate) fn outcome_of(e: Error) -> KeyOutcome {
    match e {
        Error::Cancelled => KeyOutcome::Cancelled,
        e => KeyOutcome::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn quarantine_removes_only_the_file_that_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00.kvb");
        std::fs::write(&path, b"torn").unwrap();
        let torn = std::fs::metadata(&path).unwrap().ino();
        // A concurrent store republishes the key before the quarantine.
        let fresh = dir.path().join("00.kvb.tmp-x");
        std::fs::write(&fresh, b"good").unwrap();
        std::fs::rename(&fresh, &path).unwrap();

        let why = quarantine(&path, torn, "bad checksum".into());
        assert_eq!(why, "bad checksum", "nothing was removed");
        assert_eq!(std::fs::read(&path).unwrap(), b"good");
        assert_eq!(names(dir.path()), ["00.kvb"], "no file moved aside is left");

        // The file that was read goes.
        let good = std::fs::metadata(&path).unwrap().ino();
        let why = quarantine(&path, good, "bad checksum".into());
        assert_eq!(why, "bad checksum; the file was removed");
        assert!(names(dir.path()).is_empty());
        // Nothing there: nothing to do.
        assert_eq!(quarantine(&path, good, "gone".into()), "gone");
    }
}
