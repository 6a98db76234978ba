//! One worker's I/O engine for block files: an io_uring ring kept for the
//! worker's life, with `depth` staging slots (one block file each)
//! registered once, so the worker keeps `depth` keys in flight and
//! verifies, scatters or publishes each block as soon as its own request
//! completes, while the others are still moving. No barrier per batch.
//!
//! Where the tensors are host memory the kernel can address (page-aligned
//! pages for O_DIRECT), a request moves the block straight between the file
//! and the KV pages with a vectored read or write ([`super::placement`]):
//! no staging copy, and the checksum is computed on the pages themselves.
//! Otherwise (device memory, odd page sizes) the whole file goes through
//! the key's staging slot and is gathered or scattered there.
//!
//! Files are opened with O_DIRECT (`direct`/`auto`) or through the page
//! cache (`buffered`); a filesystem that refuses O_DIRECT gets page-cache
//! requests on the same ring, and a kernel without io_uring (or a policy
//! that forbids it) gets synchronous `pread`/`pwrite`. The mode reports say
//! which ran and why.
//!
//! Guarantees (on top of [`super::files`]'):
//! - a staging slot is owned by the kernel from submission until its
//!   completion arrives; it is never read, written or freed before, and the
//!   engine waits for every request in flight before it goes away;
//! - short reads and writes are resumed for the remainder; a read that
//!   ends before the block does fails that key as truncated;
//! - a store is published (renamed) only after its whole file was written;
//!   a failed or cancelled one removes its temporary file;
//! - a zero-copy load writes the pages while it reads, so a key that fails
//!   (damaged, foreign, cancelled) leaves its pages unspecified; it is
//!   never reported loaded.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::KeyPipeline;
use super::files::{BlockFiles, outcome_of, quarantine};
use super::placement::Placement;
use crate::kv::format::HEADER_BYTES;
use crate::kv::job::{JobKind, KeyOutcome, KeyTask};
use std::mem::ManuallyDrop;

use crate::memory::{HostRegion, Region};
use crate::transfer::IO_ALIGN;
use crate::transfer::uring::Ring;
use crate::units::align_up;
use crate::{Error, Result};

/// How requests reach the kernel.
enum Submitter {
    /// io_uring; `registered` when the staging is a fixed buffer.
    Ring { ring: Box<Ring>, registered: bool },
    /// Synchronous pread/pwrite (io_uring unavailable).
    Sync,
}

/// A key whose request is in flight on a slot.
struct Op {
    tag: u64,
    kind: JobKind,
    task: KeyTask,
    cancel: Arc<AtomicBool>,
    file: File,
    /// The block file (load) or the temporary file being written (store).
    path: PathBuf,
    /// Inode of the file read (loads), so only that file is quarantined.
    inode: u64,
    /// Bytes transferred so far.
    done: u64,
    /// Opened with O_DIRECT.
    direct: bool,
    /// Zero-copy: the file's bytes in memory (the pages, and the slot for
    /// the header and padding); `None` moves the whole file through the slot.
    placement: Option<Placement>,
    /// The iovecs of the request in flight (kept until its completion).
    iov: Vec<libc::iovec>,
}

/// The engine: see the module docs.
pub(crate) struct FileRing<'a> {
    files: &'a BlockFiles,
    submitter: Submitter,
    /// `depth` slots of `slot_len` bytes; slot `i` belongs to `ops[i]`.
    /// Freed on drop unless the ring failed with requests in flight.
    staging: ManuallyDrop<HostRegion>,
    slot_len: usize,
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    finished: Vec<(u64, KeyOutcome)>,
    /// Largest request (test hook for short transfers).
    cap: u64,
    /// Set when the ring failed: every later key fails with this reason.
    broken: Option<String>,
    /// Blocks move straight between files and pages (see the module docs).
    zero_copy: bool,
}

impl<'a> FileRing<'a> {
    /// An engine with room for `depth` keys in flight.
    pub fn new(files: &'a BlockFiles, depth: usize) -> Result<Self> {
        let depth = depth.clamp(1, u16::MAX as usize);
        let slot_len = files.codec.file_len as usize;
        let staging = HostRegion::new((slot_len * depth) as u64)?;
        staging.populate(0, staging.len());
        let submitter = match Ring::new(depth as u32) {
            Ok(ring) => {
                let base = staging.host_ptr_mut().expect("host memory");
                // SAFETY: the staging region is owned by this engine with
                // the ring, never moves, and the engine drains every request
                // before either is dropped (see `Drop`).
                let registered = match unsafe { ring.register(&[(base, slot_len * depth)]) } {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::debug!(
                            "KV staging not registered with io_uring ({e}); using plain requests"
                        );
                        false
                    }
                };
                Submitter::Ring {
                    ring: Box::new(ring),
                    registered,
                }
            }
            Err(e) => {
                files.note_fallback(format!(
                    "io_uring setup failed ({e}): synchronous reads and writes"
                ));
                Submitter::Sync
            }
        };
        // O_DIRECT needs every iovec aligned; the page cache takes any.
        let align = if files.wants_direct() { IO_ALIGN } else { 1 };
        let zero_copy = matches!(submitter, Submitter::Ring { .. })
            && files.codec.layout.pages_addressable(align);
        let cap = files
            .max_bytes_per_call()
            .unwrap_or(1 << 30)
            .clamp(1, 1 << 30);
        Ok(Self {
            files,
            submitter,
            staging: ManuallyDrop::new(staging),
            slot_len,
            ops: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            finished: Vec::new(),
            cap,
            broken: None,
            zero_copy,
        })
    }

    /// Start of `slot` in the staging.
    fn slot_ptr(&self, slot: usize) -> *mut u8 {
        let base = self.staging.host_ptr_mut().expect("host memory");
        // SAFETY: `slot < depth`, so the offset lies inside the staging.
        unsafe { base.add(slot * self.slot_len) }
    }

    /// The bytes of `slot`.
    ///
    /// # Safety
    /// `slot` must not be in flight, and the slice must be dropped before
    /// the slot is submitted.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot_bytes(&self, slot: usize) -> &mut [u8] {
        // SAFETY: forwarded to the caller; slots do not overlap.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(slot), self.slot_len) }
    }

    /// Opens `task`'s block file and checks its size; an outcome when the
    /// key cannot be read at all.
    fn open_block(&self, task: &KeyTask) -> std::result::Result<(File, u64, bool), KeyOutcome> {
        let path = self.files.path(&task.key);
        let file_len = self.files.codec.file_len;
        let direct = self.files.wants_direct();
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        let (file, direct) = match open(direct) {
            Ok(f) => (f, direct),
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.files.note_fallback(format!(
                    "the filesystem holding {} refuses O_DIRECT (EINVAL): buffered",
                    path.display()
                ));
                match open(false) {
                    Ok(f) => (f, false),
                    Err(e) => return Err(cannot_read(&path, e)),
                }
            }
            Err(e) => return Err(cannot_read(&path, e)),
        };
        let meta = file.metadata().map_err(|e| cannot_read(&path, e))?;
        if meta.len() < file_len {
            return Err(KeyOutcome::Failed(format!(
                "truncated: {} is {} bytes, a block of this namespace needs {file_len}",
                path.display(),
                meta.len(),
            )));
        }
        if meta.len() > file_len {
            return Err(KeyOutcome::Failed(format!(
                "foreign: {} is {} bytes, a block of this namespace is {file_len}: written with other page sizes?",
                path.display(),
                meta.len(),
            )));
        }
        Ok((file, meta.ino(), direct))
    }

    /// Prepares `task`'s block file image (the whole of it in `slot`, or
    /// with zero copy the header and padding there and a placement naming
    /// the pages) and creates its temporary file.
    ///
    /// # Safety
    /// Nobody may write the pages of `task.ids` during the call.
    unsafe fn prepare_store(
        &mut self,
        slot: usize,
        task: &KeyTask,
    ) -> std::result::Result<(File, PathBuf, bool, Option<Placement>), KeyOutcome> {
        let files = self.files;
        let codec = &files.codec;
        let failed = |e: Error| KeyOutcome::Failed(e.to_string());
        let placement = if self.zero_copy {
            let p = Placement::new(codec, task, self.slot_ptr(slot)).map_err(failed)?;
            let end = HEADER_BYTES + codec.payload_len as usize;
            // SAFETY: the caller rules out writers of the pages, and the
            // slot is free (the kernel does not own it).
            let crc = unsafe { p.crc32c(HEADER_BYTES as u64..end as u64) };
            // SAFETY: `slot` was just taken from the free list.
            let image = unsafe { self.slot_bytes(slot) };
            image[..HEADER_BYTES].copy_from_slice(&codec.header(&task.key, crc));
            image[end..].fill(0);
            Some(p)
        } else {
            // SAFETY: forwarded from the caller; `slot` was just taken from
            // the free list, so the kernel does not own it.
            unsafe { codec.encode(task, self.slot_bytes(slot)) }.map_err(failed)?;
            None
        };
        let (temp, file) = files.create_temp(&task.key).map_err(outcome_of)?;
        let mut direct = files.wants_direct();
        if direct {
            let flags = rustix::fs::fcntl_getfl(&file)
                .map(|f| f | rustix::fs::OFlags::DIRECT)
                .and_then(|f| rustix::fs::fcntl_setfl(&file, f));
            if let Err(e) = flags {
                files.note_fallback(format!(
                    "the filesystem holding {} refuses O_DIRECT ({e}): buffered",
                    temp.display()
                ));
                direct = false;
            }
        }
        Ok((file, temp, direct, placement))
    }

    /// Queues the rest of `slot`'s transfer or, without io_uring, performs
    /// all of it.
    fn submit(&mut self, slot: usize) {
        while let Some(res) = self.push(slot) {
            if !self.complete(slot, res) {
                return;
            }
        }
    }

    /// Queues the next request of `slot` on the ring (`None`), or performs
    /// it synchronously and returns its result.
    fn push(&mut self, slot: usize) -> Option<i32> {
        let file_len = self.files.codec.file_len;
        let op = self.ops[slot].as_ref().expect("slot in use");
        let cap = if op.direct {
            align_up(self.cap, IO_ALIGN)
        } else {
            self.cap
        };
        let len = (file_len - op.done).min(cap);
        let offset = op.done;
        // SAFETY: `offset + len <= file_len`, inside this slot of the staging.
        let ptr = unsafe { self.slot_ptr(slot).add(offset as usize) };
        let op = self.ops[slot].as_mut().expect("slot in use");
        match &mut self.submitter {
            Submitter::Ring { ring, .. } if op.placement.is_some() => {
                let placement = op.placement.as_ref().expect("zero-copy op");
                placement.iovecs(offset, len, &mut op.iov);
                let fd = op.file.as_fd();
                // SAFETY: the iovecs name this key's pages (given to us by
                // `start`'s caller until the outcome is reaped) and its slot
                // (not in flight otherwise); they, the iovec array (kept in
                // the op) and the file stay untouched until the completion
                // arrives (`Drop` drains). For O_DIRECT every range is
                // aligned (`pages_addressable(IO_ALIGN)`, aligned cap).
                unsafe {
                    match op.kind {
                        JobKind::Load => ring.push_readv(fd, &op.iov, offset, slot as u64),
                        JobKind::Store => ring.push_writev(fd, &op.iov, offset, slot as u64),
                    }
                }
                None
            }
            Submitter::Ring { ring, registered } => {
                let fd = op.file.as_fd();
                // SAFETY: the slot is not in flight (a slot is submitted
                // once per completion) and neither it, the file nor the
                // ring is touched or dropped until its completion arrives
                // (`Drop` drains). The ring has `depth` entries, one per
                // slot, so the queue has room.
                unsafe {
                    match (op.kind, *registered) {
                        (JobKind::Load, true) => {
                            ring.push_read(fd, ptr, len as u32, offset, 0, slot as u64)
                        }
                        (JobKind::Load, false) => {
                            ring.push_read_plain(fd, ptr, len as u32, offset, slot as u64)
                        }
                        (JobKind::Store, true) => {
                            ring.push_write(fd, ptr, len as u32, offset, 0, slot as u64)
                        }
                        (JobKind::Store, false) => {
                            ring.push_write_plain(fd, ptr, len as u32, offset, slot as u64)
                        }
                    }
                }
                None
            }
            Submitter::Sync => {
                // SAFETY: the slot belongs to this op and nothing else uses
                // it during the call.
                let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) };
                let res = match op.kind {
                    JobKind::Load => op.file.read_at(buf, offset),
                    JobKind::Store => op.file.write_at(buf, offset),
                };
                Some(match res {
                    Ok(n) => n as i32,
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                })
            }
        }
    }

    /// Handles the completion of `slot`'s request with result `res`; true
    /// when the rest of the transfer must be submitted.
    #[must_use]
    fn complete(&mut self, slot: usize, res: i32) -> bool {
        let file_len = self.files.codec.file_len;
        let op = self.ops[slot]
            .as_mut()
            .expect("completion for a slot in use");
        if res < 0 {
            let e = std::io::Error::from_raw_os_error(-res);
            let error = if crate::error::is_no_space(&e) {
                Error::NoSpace {
                    path: op.path.clone(),
                    needed: file_len - op.done,
                }
            } else {
                Error::io(
                    format!(
                        "{} {} at offset {}, length {}",
                        match op.kind {
                            JobKind::Load => "reading",
                            JobKind::Store => "writing",
                        },
                        op.path.display(),
                        op.done,
                        file_len - op.done
                    ),
                    e,
                )
            };
            self.finish(slot, Err(error));
            return false;
        }
        let n = res as u64;
        op.done += n;
        if op.done < file_len {
            let at_end = n == 0 || (op.direct && !op.done.is_multiple_of(512));
            if !at_end {
                return true;
            }
            let error = match op.kind {
                JobKind::Load => Error::Truncated {
                    path: op.path.clone(),
                    offset: 0,
                    length: file_len,
                    file_size: op.file.metadata().map_or(0, |m| m.len()),
                },
                JobKind::Store => Error::io(
                    format!("writing {} at offset {}", op.path.display(), op.done),
                    std::io::ErrorKind::WriteZero.into(),
                ),
            };
            self.finish(slot, Err(error));
            return false;
        }
        self.finish(slot, Ok(()));
        false
    }

    /// Turns a finished transfer into the key's outcome and frees the slot.
    fn finish(&mut self, slot: usize, moved: Result<()>) {
        let op = self.ops[slot].take().expect("finishing a slot in use");
        let cancelled = op.cancel.load(Ordering::Relaxed);
        let outcome = match (op.kind, moved) {
            (JobKind::Load, Err(e)) => outcome_of(e),
            (JobKind::Load, Ok(())) if cancelled => KeyOutcome::Cancelled,
            (JobKind::Load, Ok(())) => {
                let origin = op.path.display().to_string();
                // SAFETY: the slot's request completed, so the kernel no
                // longer writes it; it is freed only below.
                let image: &[u8] = unsafe { self.slot_bytes(slot) };
                let codec = &self.files.codec;
                let checked = match &op.placement {
                    Some(p) => codec
                        .check_header(image, &op.task.key, &origin)
                        .and_then(|crc| {
                            let end = HEADER_BYTES as u64 + codec.payload_len;
                            // SAFETY: the request completed, so the kernel no
                            // longer writes the pages or the slot, and
                            // `start`'s caller keeps everyone else off the
                            // pages until the outcome is reaped.
                            let found = unsafe { p.crc32c(HEADER_BYTES as u64..end) };
                            codec.check_crc(crc, found, &origin)
                        }),
                    // SAFETY: `start`'s caller gave us exclusive access to
                    // the pages of the task's ids until the outcome is reaped.
                    None => unsafe { codec.decode_into(image, &op.task, &origin) },
                };
                match checked {
                    Ok(()) => KeyOutcome::Loaded,
                    Err(r) if r.damaged => {
                        KeyOutcome::Failed(quarantine(&op.path, op.inode, r.reason))
                    }
                    Err(r) => KeyOutcome::Failed(r.reason),
                }
            }
            (JobKind::Store, moved) => {
                let published = moved.and_then(|()| {
                    if cancelled {
                        Err(Error::Cancelled)
                    } else {
                        self.files.publish(&op.path, &op.file, &op.task.key)
                    }
                });
                match published {
                    Ok(()) => KeyOutcome::Stored,
                    Err(e) => {
                        let _ = std::fs::remove_file(&op.path);
                        outcome_of(e)
                    }
                }
            }
        };
        self.free.push(slot);
        self.finished.push((op.tag, outcome));
    }

    fn in_flight_count(&self) -> usize {
        self.ops.iter().filter(|o| o.is_some()).count()
    }

    /// Submits what is queued and handles at least one completion.
    /// `Err` means the ring itself failed: requests may still be in flight.
    fn wait_one(&mut self) -> std::io::Result<()> {
        let Submitter::Ring { ring, .. } = &mut self.submitter else {
            return Ok(());
        };
        ring.submit_and_wait(1)?;
        for (slot, res) in ring.completions() {
            if self.complete(slot as usize, res) {
                self.submit(slot as usize);
            }
        }
        Ok(())
    }
}

impl KeyPipeline for FileRing<'_> {
    fn room(&self) -> usize {
        match (&self.broken, self.finished.is_empty()) {
            (_, false) => 0,
            (Some(_), true) => 1,
            (None, true) => self.free.len(),
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight_count()
    }

    unsafe fn start(&mut self, tag: u64, kind: JobKind, task: KeyTask, cancel: Arc<AtomicBool>) {
        if let Some(why) = &self.broken {
            self.finished.push((tag, KeyOutcome::Failed(why.clone())));
            return;
        }
        let slot = self.free.pop().expect("start is called only with room");
        let opened = match kind {
            JobKind::Load => self.open_block(&task).and_then(|(file, inode, direct)| {
                let placement = if self.zero_copy {
                    let p = Placement::new(&self.files.codec, &task, self.slot_ptr(slot))
                        .map_err(|e| KeyOutcome::Failed(e.to_string()))?;
                    Some(p)
                } else {
                    None
                };
                Ok((file, self.files.path(&task.key), inode, direct, placement))
            }),
            // SAFETY: forwarded from the caller.
            JobKind::Store => unsafe { self.prepare_store(slot, &task) }
                .map(|(file, temp, direct, placement)| (file, temp, 0, direct, placement)),
        };
        let (file, path, inode, direct, placement) = match opened {
            Ok(o) => o,
            Err(outcome) => {
                self.free.push(slot);
                self.finished.push((tag, outcome));
                return;
            }
        };
        self.files.note_ran(direct, placement.is_some());
        self.ops[slot] = Some(Op {
            tag,
            kind,
            task,
            cancel,
            file,
            path,
            inode,
            done: 0,
            direct,
            placement,
            iov: Vec::new(),
        });
        self.submit(slot);
    }

    fn reap(&mut self) -> Vec<(u64, KeyOutcome)> {
        while self.finished.is_empty() && self.in_flight_count() > 0 {
            if let Err(e) = self.wait_one() {
                self.break_down(format!("waiting for io_uring completions: {e}"));
            }
        }
        std::mem::take(&mut self.finished)
    }
}

impl FileRing<'_> {
    /// After the ring itself failed, requests may still be in flight: their
    /// keys fail, and their files and the staging are leaked, never freed
    /// under the kernel. Later keys fail with the same reason.
    fn break_down(&mut self, why: String) {
        for op in self.ops.iter_mut() {
            if let Some(op) = op.take() {
                if op.kind == JobKind::Store {
                    let _ = std::fs::remove_file(&op.path);
                }
                std::mem::forget(op.file);
                self.finished
                    .push((op.tag, KeyOutcome::Failed(why.clone())));
            }
        }
        self.free.clear();
        self.broken = Some(why);
    }
}

impl Drop for FileRing<'_> {
    fn drop(&mut self) {
        // Every request must complete before the staging and files go.
        while self.broken.is_none() && self.in_flight_count() > 0 {
            if let Err(e) = self.wait_one() {
                self.break_down(format!("waiting for io_uring completions: {e}"));
            }
        }
        if self.broken.is_none() {
            // The ring (and its registration of the staging) goes first.
            self.submitter = Submitter::Sync;
            // SAFETY: nothing is in flight, the ring is gone, and the
            // staging is not used after this.
            unsafe { ManuallyDrop::drop(&mut self.staging) };
        }
    }
}

fn cannot_read(path: &std::path::Path, e: std::io::Error) -> KeyOutcome {
    if e.kind() == std::io::ErrorKind::NotFound {
        KeyOutcome::Failed(format!("missing: no block file at {}", path.display()))
    } else {
        KeyOutcome::Failed(format!("cannot read {}: {e}", path.display()))
    }
}
