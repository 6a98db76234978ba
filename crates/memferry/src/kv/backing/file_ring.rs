//! One worker's I/O engine for block files: an io_uring ring kept for the
//! worker's life, with staging slots (one block file each) registered
//! once, so the worker keeps `depth` transfers in flight and verifies,
//! scatters or publishes each block as soon as its own request completes,
//! while the others are still moving. No barrier per batch.
//!
//! It holds up to `depth` more keys ahead of the transfers: their stores
//! create and allocate files (loads open them) while the data of others
//! moves, so the device sees `depth` transfers whenever work is queued,
//! not fewer while keys sit in file-system steps. A key ready to transfer
//! waits for a free transfer place: loads first, so a load waits for one
//! transfer in flight to finish, not for the stores ready before it; oldest
//! first within loads and within stores.
//!
//! Where io_uring runs and the tensors are host memory the kernel can
//! address (4096-aligned pages for O_DIRECT, any through the page cache), a
//! request moves the block straight between the file and the KV pages with
//! a vectored read or write ([`super::placement`]): no staging copy, and
//! the checksum is computed on the pages themselves. Otherwise (device
//! memory, pages O_DIRECT cannot address, no io_uring) the whole file goes
//! through the key's staging slot and is gathered or scattered there. For
//! device tensors the staging is page-locked and a key's pages are queued
//! on the engine's own streams and awaited once ([`StreamCopies`]).
//!
//! A store's file-system steps run on the same ring as the data, one
//! request each: create the temporary file (and its directories when they
//! are missing), allocate it, write it, flush it (`fsync` configured) and
//! rename it into place. The kernel runs them asynchronously, so a worker
//! does not stall its other keys on a slow create or allocation (a load's
//! open and size check still run on the worker). Kernels without these
//! opcodes get the same steps as system calls.
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
//!   engine waits for every request in flight before it goes away (if the
//!   ring itself fails, it leaks what the kernel may still use instead,
//!   and still waits for requests that write the caller's pages);
//! - short reads and writes are resumed for the remainder; a read that
//!   ends before the block does fails that key as truncated;
//! - a store is published (renamed) only after its whole file was written;
//!   a failed or cancelled one removes its temporary file (after a ring
//!   failure, the scan of leftovers does);
//! - a zero-copy load writes the pages while it reads, so a key that fails
//!   (damaged, foreign, cancelled) leaves its pages unspecified; it is
//!   never reported loaded.

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::KeyPipeline;
use super::files::{BlockFiles, outcome_of, quarantine, temp_path};
use super::placement::Placement;
use crate::kv::format::HEADER_BYTES;
use crate::kv::job::{JobKind, KeyOutcome, KeyTask};
use std::mem::ManuallyDrop;

use crate::memory::{HostRegion, HostRegistration, Region, StreamCopies};
use crate::storage::durable::settle_allocation;
use crate::transfer::IO_ALIGN;
use crate::transfer::uring::{Meta, Ring};
use crate::units::align_up;
use crate::{Error, Result};

/// Which engine to build: the best the kernel offers, or a fallback.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    /// io_uring, with a store's file-system steps on the ring when the
    /// kernel has the opcodes.
    Best,
    /// io_uring for the data, system calls for the file-system steps (a
    /// kernel before 5.15).
    #[cfg_attr(not(test), allow(dead_code))]
    DataOnRing,
    /// System calls only (no io_uring).
    #[cfg_attr(not(test), allow(dead_code))]
    NoRing,
}

/// How requests reach the kernel.
enum Submitter {
    /// io_uring; `registered` when the staging is a fixed buffer.
    Ring { ring: Box<Ring>, registered: bool },
    /// Synchronous pread/pwrite (io_uring unavailable).
    Sync,
}

/// Where a key stands: a load only transfers; a store goes through every
/// step in order (directories only when the create finds them missing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Creating the block's directories: 0 the outer one, 1 the inner one.
    MakeDir(usize),
    /// Creating the temporary file.
    Create,
    /// Allocating its bytes (a full disk fails here, before data moves).
    Allocate,
    /// Moving the bytes.
    Transfer,
    /// Flushing the written file (`fsync` configured).
    Flush,
    /// Renaming it to the block's name (a concurrent store of the same key
    /// publishes identical bytes).
    Publish,
}

/// A store's paths as C strings for requests on the ring (they stay put
/// while a request points at them).
struct StorePaths {
    /// The outer and inner directory of the block file.
    dirs: [CString; 2],
    temp: CString,
    block: CString,
    /// The directories were created once already.
    made_dirs: bool,
    /// The namespace directory was recreated once already.
    made_namespace: bool,
}

impl StorePaths {
    fn new(temp: &Path, block: &Path) -> Self {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("paths hold no NUL");
        let inner = block.parent().expect("block paths have two directories");
        let outer = inner.parent().expect("block paths have two directories");
        Self {
            dirs: [c(outer), c(inner)],
            temp: c(temp),
            block: c(block),
            made_dirs: false,
            made_namespace: false,
        }
    }
}

/// A key whose request is in flight on a slot.
struct Op {
    tag: u64,
    kind: JobKind,
    task: KeyTask,
    cancel: Arc<AtomicBool>,
    step: Step,
    /// `None` until a store's temporary file is created.
    file: Option<File>,
    /// The block file (load) or the temporary file being written (store).
    path: PathBuf,
    /// A store's paths for the requests of its steps.
    store: Option<Box<StorePaths>>,
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
    /// Holds one of the `depth` transfer places.
    transferring: bool,
}

/// Staged copies to and from device tensors: streams of the engine's own
/// (each key's pages are queued together and awaited once, never on the
/// device's legacy stream alone), and the staging page-locked for them.
struct DeviceStaging {
    copies: StreamCopies,
    /// Held for its drop. `None` when the driver would not page-lock the
    /// staging: copies then go through the driver's own bounce buffers
    /// (slower, same bytes).
    _pinned: Option<HostRegistration>,
}

/// Keys held per transfer place: one transferring, one preparing.
const KEYS_PER_TRANSFER: usize = 2;

/// The engine: see the module docs.
pub(crate) struct FileRing<'a> {
    files: &'a BlockFiles,
    submitter: Submitter,
    /// `KEYS_PER_TRANSFER * depth` slots of `slot_len` bytes; slot `i`
    /// belongs to `ops[i]`.
    /// Freed on drop unless the ring failed with requests in flight.
    staging: ManuallyDrop<HostRegion>,
    slot_len: usize,
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Transfers in flight (at most `depth`).
    transferring: usize,
    depth: usize,
    /// Slots ready to transfer, waiting for a place: loads, then stores,
    /// each oldest first ([`FileRing::wait_for_place`]). No request of
    /// theirs is in flight.
    waiting: VecDeque<usize>,
    finished: Vec<(u64, KeyOutcome)>,
    /// Largest request (test hook for short transfers).
    cap: u64,
    /// Set when the ring failed: every later key fails with this reason.
    broken: Option<String>,
    /// Once broken: slots whose failed store had its create in flight, and
    /// the temporary file it creates (closed and removed if it completes).
    stray_creates: Vec<(u64, PathBuf)>,
    /// Blocks move straight between files and pages (see the module docs).
    zero_copy: bool,
    /// A store's file-system steps run on the ring (else as system calls).
    meta_on_ring: bool,
    /// Set when tensors live in device memory (staged keys only).
    device: Option<DeviceStaging>,
}

impl<'a> FileRing<'a> {
    /// An engine with `depth` transfers in flight (and as many keys ahead).
    pub fn new(files: &'a BlockFiles, depth: usize) -> Result<Self> {
        Self::build(files, depth, Shape::Best)
    }

    /// An engine of the given shape (tests force the fallbacks).
    fn build(files: &'a BlockFiles, depth: usize, shape: Shape) -> Result<Self> {
        let depth = depth.clamp(1, u16::MAX as usize / KEYS_PER_TRANSFER);
        let slots = depth * KEYS_PER_TRANSFER;
        let slot_len = files.codec.file_len as usize;
        let staging = HostRegion::new((slot_len * slots) as u64)?;
        staging.populate(0, staging.len());
        // One entry per slot: a slot has at most one request in flight.
        let ring = match shape {
            Shape::NoRing => Err(std::io::Error::from_raw_os_error(libc::ENOSYS)),
            _ => Ring::new(slots as u32),
        };
        let submitter = match ring {
            Ok(ring) => {
                let base = staging.host_ptr_mut().expect("host memory");
                // SAFETY: the staging region is owned by this engine with
                // the ring, never moves, and the engine drains every request
                // before either is dropped (see `Drop`).
                let registered = match unsafe { ring.register(&[(base, slot_len * slots)]) } {
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
        let meta_on_ring = match &submitter {
            Submitter::Ring { ring, .. } => shape == Shape::Best && ring.supports_meta(),
            Submitter::Sync => false,
        };
        let device = if zero_copy {
            None
        } else {
            device_staging(files, &staging)
        };
        let cap = files
            .max_bytes_per_call()
            .unwrap_or(1 << 30)
            .clamp(1, 1 << 30);
        Ok(Self {
            files,
            submitter,
            staging: ManuallyDrop::new(staging),
            slot_len,
            ops: (0..slots).map(|_| None).collect(),
            free: (0..slots).rev().collect(),
            transferring: 0,
            depth,
            waiting: VecDeque::new(),
            finished: Vec::new(),
            cap,
            broken: None,
            stray_creates: Vec::new(),
            zero_copy,
            meta_on_ring,
            device,
        })
    }

    /// Start of `slot` in the staging.
    fn slot_ptr(&self, slot: usize) -> *mut u8 {
        let base = self.staging.host_ptr_mut().expect("host memory");
        // SAFETY: `slot < slots`, so the offset lies inside the staging.
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

    /// Prepares `task`'s block file image: the whole of it in `slot`, or
    /// with zero copy the header and padding there and a placement naming
    /// the pages.
    ///
    /// # Safety
    /// Nobody may write the pages of `task.ids` during the call.
    unsafe fn prepare_image(
        &mut self,
        slot: usize,
        task: &KeyTask,
    ) -> std::result::Result<Option<Placement>, KeyOutcome> {
        let codec = &self.files.codec;
        let failed = |e: Error| KeyOutcome::Failed(e.to_string());
        if self.zero_copy {
            let p = Placement::new(codec, task, self.slot_ptr(slot)).map_err(failed)?;
            let end = HEADER_BYTES + codec.payload_len as usize;
            // SAFETY: the caller rules out writers of the pages, and the
            // slot is free (the kernel does not own it).
            let crc = unsafe { p.crc32c(HEADER_BYTES as u64..end as u64) };
            // SAFETY: `slot` was just taken from the free list.
            let image = unsafe { self.slot_bytes(slot) };
            image[..HEADER_BYTES].copy_from_slice(&codec.header(&task.key, crc));
            image[end..].fill(0);
            Ok(Some(p))
        } else {
            // SAFETY: `slot` was just taken from the free list, so the
            // kernel does not own it; slots do not overlap.
            let image =
                unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(slot), self.slot_len) };
            let copies = self.device.as_mut().map(|d| &mut d.copies);
            // SAFETY: forwarded from the caller; the copies into `image`
            // finish before `encode` returns.
            unsafe { codec.encode(task, image, copies) }.map_err(failed)?;
            Ok(None)
        }
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
        let op = self.ops[slot].as_mut().expect("slot in use");
        if op.step != Step::Transfer {
            return self.push_meta(slot);
        }
        if !op.transferring {
            if self.transferring == self.depth {
                self.wait_for_place(slot);
                return None;
            }
            self.transferring += 1;
            op.transferring = true;
        }
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
                let fd = op.file.as_ref().expect("transfers have a file").as_fd();
                // SAFETY: the iovecs name this key's pages (given to us by
                // `start`'s caller until the outcome is reaped) and its slot
                // (not in flight otherwise); they, the iovec array (kept in
                // the op) and the file stay untouched until the completion
                // arrives (`Drop` drains). For O_DIRECT every range is
                // aligned (`pages_addressable(IO_ALIGN)`, aligned cap).
                unsafe { ring.push_iov(op.kind.io(), fd, &op.iov, offset, slot as u64) }
                None
            }
            Submitter::Ring { ring, registered } => {
                let fd = op.file.as_ref().expect("transfers have a file").as_fd();
                // SAFETY: the slot is not in flight (a slot is submitted
                // once per completion) and neither it, the file nor the
                // ring is touched or dropped until its completion arrives
                // (`Drop` drains). The ring has `depth` entries, one per
                // slot, so the queue has room.
                unsafe {
                    let fixed = registered.then_some(0);
                    ring.push_io(
                        op.kind.io(),
                        fd,
                        ptr,
                        len as u32,
                        offset,
                        fixed,
                        slot as u64,
                    )
                }
                None
            }
            Submitter::Sync => {
                // SAFETY: the slot belongs to this op and nothing else uses
                // it during the call.
                let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) };
                let file = op.file.as_ref().expect("transfers have a file");
                let res = match op.kind {
                    JobKind::Load => file.read_at(buf, offset),
                    JobKind::Store => file.write_at(buf, offset),
                };
                Some(match res {
                    Ok(n) => n as i32,
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                })
            }
        }
    }

    /// Queues (or, without the opcodes, runs) the file-system request of
    /// `slot`'s current store step.
    fn push_meta(&mut self, slot: usize) -> Option<i32> {
        let file_len = self.files.codec.file_len;
        let op = self.ops[slot].as_ref().expect("slot in use");
        let paths = op.store.as_deref().expect("store steps have paths");
        let fd = || op.file.as_ref().expect("created").as_fd();
        let meta = match op.step {
            Step::MakeDir(i) => Meta::MakeDir(&paths.dirs[i]),
            Step::Create => Meta::Create(&paths.temp, libc::O_WRONLY),
            Step::Allocate => Meta::Allocate(fd(), file_len),
            Step::Flush => Meta::Flush(fd()),
            Step::Publish => Meta::Rename(&paths.temp, &paths.block),
            Step::Transfer => unreachable!("transfers are pushed by `push`"),
        };
        match &mut self.submitter {
            Submitter::Ring { ring, .. } if self.meta_on_ring => {
                // SAFETY: the paths live in the op's boxed `StorePaths` and
                // the fd in its file; neither is dropped or moved until the
                // completion arrives (`Drop` drains; `break_down` leaks).
                unsafe { ring.push_meta(meta, slot as u64) };
                None
            }
            _ => Some(meta.run_now()),
        }
    }

    /// Handles the completion of a store step other than the transfer;
    /// true when the next step must be submitted.
    fn complete_meta(&mut self, slot: usize, res: i32) -> bool {
        let files = self.files;
        let file_len = files.codec.file_len;
        let op = self.ops[slot]
            .as_mut()
            .expect("completion for a slot in use");
        let paths = op.store.as_deref_mut().expect("store steps have paths");
        let err = || std::io::Error::from_raw_os_error(-res);
        let next = match op.step {
            Step::MakeDir(i) if res >= 0 || res == -libc::EEXIST => Ok(if i == 0 {
                Step::MakeDir(1)
            } else {
                Step::Create
            }),
            // The namespace directory itself is gone: recreate it (a rare,
            // synchronous step) and try once more.
            Step::MakeDir(0) if res == -libc::ENOENT && !paths.made_namespace => {
                paths.made_namespace = true;
                files.recreate_namespace().map(|()| Step::MakeDir(0))
            }
            Step::MakeDir(i) => {
                let dir = Path::new(std::ffi::OsStr::from_bytes(paths.dirs[i].as_bytes()));
                Err(Error::writing("block directory", dir, err()))
            }
            Step::Create if res >= 0 => {
                // SAFETY: a successful create returns a new fd that nothing
                // else owns.
                let file = unsafe { File::from_raw_fd(res) };
                op.direct = make_direct(files, &file, &op.path);
                op.file = Some(file);
                files.note_ran(op.direct, op.placement.is_some());
                Ok(Step::Allocate)
            }
            Step::Create if res == -libc::ENOENT && !paths.made_dirs => {
                paths.made_dirs = true;
                Ok(Step::MakeDir(0))
            }
            Step::Create => Err(Error::writing("block file", &op.path, err())),
            Step::Allocate => {
                let allocated = match res {
                    0.. => Ok(()),
                    _ => Err(rustix::io::Errno::from_raw_os_error(-res)),
                };
                let file = op.file.as_ref().expect("created");
                settle_allocation(file, &op.path, file_len, allocated).map(|()| Step::Transfer)
            }
            Step::Flush if res >= 0 => Ok(Step::Publish),
            Step::Flush => Err(Error::writing("block file", &op.path, err())),
            Step::Publish if res >= 0 => {
                self.finish(slot, Ok(()));
                return false;
            }
            Step::Publish => {
                let block = files.path(&op.task.key);
                Err(Error::writing("block file", &block, err()))
            }
            Step::Transfer => unreachable!("transfers complete in `complete`"),
        };
        self.advance(slot, next)
    }

    /// Moves a store on to its `next` step (true: submit it), or finishes
    /// it with the error, or as cancelled when its job was cancelled (the
    /// temporary file, if created, is removed by `finish`).
    fn advance(&mut self, slot: usize, next: Result<Step>) -> bool {
        let op = self.ops[slot].as_mut().expect("advancing a slot in use");
        let next = next.and_then(|step| match op.cancel.load(Ordering::Relaxed) {
            true => Err(Error::Cancelled),
            false => Ok(step),
        });
        match next {
            Ok(step) => {
                if op.transferring && step != Step::Transfer {
                    op.transferring = false;
                    self.transferring -= 1;
                }
                op.step = step;
                true
            }
            Err(e) => {
                self.finish(slot, Err(e));
                false
            }
        }
    }

    /// Handles the completion of `slot`'s request with result `res`; true
    /// when the next request (the rest of the transfer, or the next step)
    /// must be submitted.
    #[must_use]
    fn complete(&mut self, slot: usize, res: i32) -> bool {
        let file_len = self.files.codec.file_len;
        let fsync = self.files.fsync();
        if self.ops[slot]
            .as_ref()
            .is_some_and(|op| op.step != Step::Transfer)
        {
            return self.complete_meta(slot, res);
        }
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
                    file_size: op
                        .file
                        .as_ref()
                        .and_then(|f| f.metadata().ok())
                        .map_or(0, |m| m.len()),
                },
                JobKind::Store => Error::io(
                    format!("writing {} at offset {}", op.path.display(), op.done),
                    std::io::ErrorKind::WriteZero.into(),
                ),
            };
            self.finish(slot, Err(error));
            return false;
        }
        if op.kind == JobKind::Load {
            self.finish(slot, Ok(()));
            return false;
        }
        self.advance(slot, Ok(if fsync { Step::Flush } else { Step::Publish }))
    }

    /// Turns a finished transfer into the key's outcome and frees the slot.
    fn finish(&mut self, slot: usize, moved: Result<()>) {
        let op = self.ops[slot].take().expect("finishing a slot in use");
        if op.transferring {
            self.transferring -= 1;
        }
        let cancelled = op.cancel.load(Ordering::Relaxed);
        let outcome = match (op.kind, moved) {
            (JobKind::Load, Err(e)) => outcome_of(e),
            (JobKind::Load, Ok(())) if cancelled => KeyOutcome::Cancelled,
            (JobKind::Load, Ok(())) => {
                let origin = op.path.display().to_string();
                // SAFETY: the slot's request completed, so the kernel no
                // longer writes it; it is freed only below.
                let image: &[u8] =
                    unsafe { std::slice::from_raw_parts(self.slot_ptr(slot), self.slot_len) };
                let codec = &self.files.codec;
                let copies = self.device.as_mut().map(|d| &mut d.copies);
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
                    // The copies from `image` finish before it returns.
                    None => unsafe { codec.decode_into(image, &op.task, &origin, copies) },
                };
                match checked {
                    Ok(()) => KeyOutcome::Loaded,
                    Err(r) if r.damaged => {
                        KeyOutcome::Failed(quarantine(&op.path, op.inode, r.reason))
                    }
                    Err(r) => KeyOutcome::Failed(r.reason),
                }
            }
            // `Ok` only once renamed into place.
            (JobKind::Store, Ok(())) => KeyOutcome::Stored,
            (JobKind::Store, Err(e)) => {
                if op.file.is_some() {
                    let _ = std::fs::remove_file(&op.path);
                }
                outcome_of(e)
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
        self.submit_waiting();
        Ok(())
    }

    /// Queues `slot` for a transfer place: a load goes ahead of every
    /// store waiting (it waits for one transfer in flight, not for them),
    /// behind the loads waiting before it; a store goes last.
    fn wait_for_place(&mut self, slot: usize) {
        let kind = |s: usize| self.ops[s].as_ref().expect("waiting slots are in use").kind;
        let at = match kind(slot) {
            JobKind::Load => self
                .waiting
                .iter()
                .position(|&s| kind(s) == JobKind::Store)
                .unwrap_or(self.waiting.len()),
            JobKind::Store => self.waiting.len(),
        };
        self.waiting.insert(at, slot);
    }

    /// Starts waiting transfers while places are free, in queue order.
    fn submit_waiting(&mut self) {
        while self.transferring < self.depth
            && let Some(slot) = self.waiting.pop_front()
        {
            self.submit(slot);
        }
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
                self.files.note_ran(direct, placement.is_some());
                let path = self.files.path(&task.key);
                Ok(Op {
                    tag,
                    kind,
                    task,
                    cancel,
                    step: Step::Transfer,
                    file: Some(file),
                    path,
                    store: None,
                    inode,
                    done: 0,
                    direct,
                    placement,
                    iov: Vec::new(),
                    transferring: false,
                })
            }),
            // SAFETY: forwarded from the caller.
            JobKind::Store => unsafe { self.prepare_image(slot, &task) }.map(|placement| {
                let block = self.files.path(&task.key);
                let temp = temp_path(&block);
                let store = StorePaths::new(&temp, &block);
                Op {
                    tag,
                    kind,
                    task,
                    cancel,
                    step: Step::Create,
                    file: None,
                    path: temp,
                    store: Some(Box::new(store)),
                    inode: 0,
                    done: 0,
                    direct: false,
                    placement,
                    iov: Vec::new(),
                    transferring: false,
                }
            }),
        };
        match opened {
            Ok(op) => self.ops[slot] = Some(op),
            Err(outcome) => {
                self.free.push(slot);
                self.finished.push((tag, outcome));
                return;
            }
        }
        self.submit(slot);
        self.submit_waiting();
    }

    fn reap(&mut self) -> Vec<(u64, KeyOutcome)> {
        while self.finished.is_empty() && self.in_flight_count() > 0 {
            self.wait_or_break_down();
        }
        std::mem::take(&mut self.finished)
    }
}

impl FileRing<'_> {
    /// Waits for completions; when the ring itself fails, breaks down, and
    /// once broken, collects what the kernel still completes.
    fn wait_or_break_down(&mut self) {
        if self.broken.is_some() {
            self.reap_broken();
        } else if let Err(e) = self.wait_one() {
            self.break_down(format!("waiting for io_uring completions: {e}"));
        }
    }

    /// After the ring itself failed, requests may still be in flight. Keys
    /// waiting for a transfer place have none: they fail at once and their
    /// files close. Keys whose requests touch only engine memory fail at
    /// once too; their files, paths, iovecs and the staging are leaked,
    /// never freed under the kernel (a store's temporary file is unlinked;
    /// its space returns when the process exits). A
    /// zero-copy load's request writes the caller's pages, so its key is
    /// held back until its completion shows up ([`Self::reap_broken`]):
    /// reporting it earlier would let the caller reuse pages the kernel
    /// may still write. Later keys fail with the same reason.
    fn break_down(&mut self, why: String) {
        tracing::error!("KV io_uring engine failed: {why}");
        // Waiting keys have no request in flight, so none holds pages back.
        let waiting = std::mem::take(&mut self.waiting);
        for (slot, op) in self.ops.iter_mut().enumerate() {
            let writes_pages = op.as_ref().is_some_and(|o| {
                o.kind == JobKind::Load && o.placement.is_some() && !waiting.contains(&slot)
            });
            if writes_pages {
                continue;
            }
            if let Some(op) = op.take() {
                if op.kind == JobKind::Store {
                    let _ = std::fs::remove_file(&op.path);
                }
                if op.kind == JobKind::Store && op.step == Step::Create {
                    self.stray_creates.push((slot as u64, op.path.clone()));
                }
                if !waiting.contains(&slot) {
                    // A request may be in flight: the kernel may still use
                    // the fd, the paths and the iovecs.
                    std::mem::forget(op.file);
                    std::mem::forget(op.store);
                    std::mem::forget(op.iov);
                }
                // A waiting key's file closes here (a store's removed
                // temporary file frees its space).
                self.finished
                    .push((op.tag, KeyOutcome::Failed(why.clone())));
            }
        }
        self.free.clear();
        self.broken = Some(why);
    }

    /// Broken: hands the kernel what is still queued (a request that never
    /// reached it would never complete), polls the completion queue (the
    /// pause lets the kernel run) and fails the held-back loads that
    /// finished. What `break_down` leaked keeps late requests sound.
    fn reap_broken(&mut self) {
        let Submitter::Ring { ring, .. } = &mut self.submitter else {
            return;
        };
        let _ = ring.submit_and_wait(0);
        std::thread::sleep(std::time::Duration::from_millis(1));
        let why = self.broken.clone().unwrap_or_default();
        for (slot, res) in ring.completions() {
            if let Some(op) = self.ops.get_mut(slot as usize).and_then(Option::take) {
                self.finished
                    .push((op.tag, KeyOutcome::Failed(why.clone())));
            } else if let Some(i) = self.stray_creates.iter().position(|(s, _)| *s == slot) {
                let (_, temp) = self.stray_creates.swap_remove(i);
                if res >= 0 {
                    // SAFETY: a create's result is a new fd owned by nobody.
                    drop(unsafe { File::from_raw_fd(res) });
                    let _ = std::fs::remove_file(temp);
                }
            }
        }
    }
}

impl Drop for FileRing<'_> {
    fn drop(&mut self) {
        // Every request must complete before the staging and files go
        // (once broken: every request that writes the caller's pages).
        while self.in_flight_count() > 0 {
            self.wait_or_break_down();
        }
        // Give the creates of failed stores a moment to come back, so the
        // files they made are closed and removed (else the scan removes them).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while !self.stray_creates.is_empty() && std::time::Instant::now() < deadline {
            self.reap_broken();
        }
        if self.broken.is_none() {
            // The ring and the device's page-locking of the staging (its
            // copies all finished) go first.
            self.submitter = Submitter::Sync;
            self.device = None;
            // SAFETY: nothing is in flight, the ring is gone, and the
            // staging is not used after this.
            unsafe { ManuallyDrop::drop(&mut self.staging) };
        }
    }
}

/// Streams for the device tensors of `files`' layout and the staging
/// page-locked for their copies; `None` when every tensor is host memory.
/// Without a stream the copies stay synchronous; without page-locking
/// they run on the streams from pageable memory (slower): both noted.
fn device_staging(files: &BlockFiles, staging: &HostRegion) -> Option<DeviceStaging> {
    let layout = &files.codec.layout;
    let copies = match layout.stream_copies() {
        Ok(Some(c)) => c,
        Ok(None) => return None,
        Err(e) => {
            files.note_fallback(format!(
                "no copy stream on the device ({e}): synchronous copies"
            ));
            return None;
        }
    };
    let ordinal = layout.first_device().expect("device tensors have a device");
    let base = staging.host_ptr_mut().expect("host memory");
    // SAFETY: the staging is mapped for the engine's life, registered only
    // here, and the registration is dropped before the staging (`Drop`).
    let pinned = match unsafe { HostRegistration::new(ordinal, base, staging.len() as usize) } {
        Ok(r) => {
            files.note_pinned();
            Some(r)
        }
        Err(e) => {
            files.note_pin_refused(format!(
                "staging not page-locked for cuda:{ordinal} ({e}): pageable device copies"
            ));
            None
        }
    };
    Some(DeviceStaging {
        copies,
        _pinned: pinned,
    })
}

fn cannot_read(path: &std::path::Path, e: std::io::Error) -> KeyOutcome {
    if e.kind() == std::io::ErrorKind::NotFound {
        KeyOutcome::Failed(format!("missing: no block file at {}", path.display()))
    } else {
        KeyOutcome::Failed(format!("cannot read {}: {e}", path.display()))
    }
}

/// Switches a created temporary file to O_DIRECT when wanted; false when it
/// stays buffered (the filesystem refuses, which is noted).
fn make_direct(files: &BlockFiles, file: &File, temp: &Path) -> bool {
    if !files.wants_direct() {
        return false;
    }
    let flags = rustix::fs::fcntl_getfl(file)
        .map(|f| f | rustix::fs::OFlags::DIRECT)
        .and_then(|f| rustix::fs::fcntl_setfl(file, f));
    match flags {
        Ok(()) => true,
        Err(e) => {
            files.note_fallback(format!(
                "the filesystem holding {} refuses O_DIRECT ({e}): buffered",
                temp.display()
            ));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::config::KvConfig;
    use crate::kv::key::BlockKey;
    use crate::kv::namespace::Namespace;
    use crate::kv::tensors::KvLayout;
    use crate::kv::tensors::testing::patterned_layout;

    use std::os::fd::AsRawFd;

    const BLOCKS: u64 = 8;

    fn layout(seed: u8) -> (KvLayout, Vec<Arc<HostRegion>>) {
        patterned_layout(&[8192, 4096], BLOCKS, seed)
    }

    /// Starts every task and reaps until all are done.
    fn run(engine: &mut FileRing<'_>, kind: JobKind, tasks: Vec<KeyTask>) -> Vec<KeyOutcome> {
        run_with(engine, kind, tasks, false)
    }

    fn run_with(
        engine: &mut FileRing<'_>,
        kind: JobKind,
        tasks: Vec<KeyTask>,
        cancelled: bool,
    ) -> Vec<KeyOutcome> {
        let mut out = vec![None; tasks.len()];
        let mut tasks = tasks.into_iter().enumerate();
        let cancel = Arc::new(AtomicBool::new(cancelled));
        loop {
            while engine.room() > 0 {
                let Some((tag, task)) = tasks.next() else {
                    break;
                };
                // SAFETY: nothing else touches the test's pages meanwhile.
                unsafe { engine.start(tag as u64, kind, task, cancel.clone()) };
            }
            for (tag, outcome) in engine.reap() {
                out[tag as usize] = Some(outcome);
            }
            if out.iter().all(Option::is_some) {
                return out.into_iter().map(Option::unwrap).collect();
            }
        }
    }

    /// Every file under `dir` but the namespace's own records.
    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else if p.extension().is_none_or(|x| x != "json") {
                out.push(p);
            }
        }
        out
    }

    fn test_namespace() -> Namespace {
        crate::kv::namespace::testing::namespace("test/engine", 1, 1)
    }

    /// Keys `0..keys`, stored from blocks `i`, were loaded into blocks
    /// `7 - i`: every page of both tensors matches.
    fn assert_loaded_reversed(
        src: &[Arc<HostRegion>],
        dst: &[Arc<HostRegion>],
        keys: usize,
        what: &str,
    ) {
        for i in 0..keys {
            for (t, page) in [8192usize, 4096].into_iter().enumerate() {
                let want = &src[t].as_slice()[i * page..(i + 1) * page];
                let got = &dst[t].as_slice()[(7 - i) * page..(8 - i) * page];
                assert!(want == got, "{what}: key {i} tensor {t}");
            }
        }
    }

    fn task(i: u64, id: u64) -> KeyTask {
        KeyTask {
            key: BlockKey::new(format!("key-{i}").into_bytes()).unwrap(),
            ids: vec![id],
            file_blocks: 0..1,
        }
    }

    /// Starts keys `keys` without reaping them: a load of key `i` into
    /// block `7 - i`, a store of key `i` from block `i`.
    fn start(engine: &mut FileRing<'_>, kind: JobKind, keys: std::ops::Range<u64>) {
        for i in keys {
            let id = if kind == JobKind::Load { 7 - i } else { i };
            // SAFETY: nothing else touches the test's pages meanwhile.
            unsafe { engine.start(i, kind, task(i, id), Arc::default()) };
        }
    }

    #[test]
    fn keys_ahead_wait_for_a_transfer_place_and_then_move() {
        let (root, config, src_mem) = stored(6, 0x33);
        let (dst, dst_mem) = layout(0);
        let files = BlockFiles::open(&config, root.path(), dst).unwrap();
        let Some(mut engine) = ring_engine(&files, 2, Shape::Best) else {
            return;
        };
        // Depth 2 holds four keys: two transfer, two more go ahead.
        assert_eq!(engine.room(), 4);
        start(&mut engine, JobKind::Load, 0..4);
        // Loads go straight to their transfer: two move, two wait.
        assert_eq!((engine.transferring, engine.waiting.len()), (2, 2));
        assert_eq!(engine.room(), 0);
        let mut outcomes = Vec::new();
        while outcomes.len() < 4 {
            outcomes.extend(engine.reap());
            assert!(engine.transferring <= 2);
        }
        assert!(
            outcomes.iter().all(|(_, o)| *o == KeyOutcome::Loaded),
            "{outcomes:?}"
        );
        assert!(engine.waiting.is_empty());
        assert_loaded_reversed(&src_mem, &dst_mem, 4, "keys ahead");
    }

    #[test]
    fn a_load_goes_ahead_of_stores_waiting_for_a_transfer_place() {
        let (root, config, _src_mem) = stored(6, 0x36);
        let (mem, _mem) = layout(0);
        let files = BlockFiles::open(&config, root.path(), mem).unwrap();
        // A store's file-system steps run as system calls at its start, so
        // it is ready to transfer at once; nothing moves until `reap`.
        let Some(mut engine) = ring_engine(&files, 4, Shape::DataOnRing) else {
            return;
        };
        // Four loads (into blocks 7..=4) take the four transfer places;
        // two stores of new keys (from blocks 0, 1) wait behind them.
        start(&mut engine, JobKind::Load, 0..4);
        for i in 6..8 {
            // SAFETY: nothing else touches the test's pages meanwhile, and
            // no load writes blocks 0 and 1.
            unsafe { engine.start(i, JobKind::Store, task(i, i - 6), Arc::default()) };
        }
        assert_eq!((engine.transferring, engine.waiting.len()), (4, 2));
        // Loads that come now (into blocks 3, 2) go ahead of the stores,
        // oldest first.
        start(&mut engine, JobKind::Load, 4..6);
        let order: Vec<(JobKind, u64)> = engine
            .waiting
            .iter()
            .map(|&s| {
                let op = engine.ops[s].as_ref().unwrap();
                (op.kind, op.tag)
            })
            .collect();
        assert_eq!(
            order,
            [
                (JobKind::Load, 4),
                (JobKind::Load, 5),
                (JobKind::Store, 6),
                (JobKind::Store, 7)
            ]
        );
        let mut outcomes = Vec::new();
        while outcomes.len() < 8 {
            outcomes.extend(engine.reap());
        }
        assert!(
            outcomes
                .iter()
                .all(|(_, o)| matches!(o, KeyOutcome::Loaded | KeyOutcome::Stored)),
            "{outcomes:?}"
        );
    }

    /// A fresh namespace (its root, its config) holding keys `0..n`, stored
    /// from blocks `i` of a pattern-`seed` layout; and that layout's pages.
    fn stored(n: u64, seed: u8) -> (tempfile::TempDir, KvConfig, Vec<Arc<HostRegion>>) {
        let root = tempfile::tempdir().unwrap();
        let config = KvConfig::new(root.path(), test_namespace());
        let (src, src_mem) = layout(seed);
        let files = BlockFiles::open(&config, root.path(), src).unwrap();
        let mut engine = FileRing::build(&files, 2, Shape::Best).unwrap();
        let stored = run(
            &mut engine,
            JobKind::Store,
            (0..n).map(|i| task(i, i)).collect(),
        );
        assert!(
            stored.iter().all(|o| *o == KeyOutcome::Stored),
            "{stored:?}"
        );
        drop(engine);
        (root, config, src_mem)
    }

    /// An engine running on an io_uring ring; `None` (the test says it
    /// skips) where io_uring is not available.
    fn ring_engine(files: &BlockFiles, depth: usize, shape: Shape) -> Option<FileRing<'_>> {
        let engine = FileRing::build(files, depth, shape).unwrap();
        if !matches!(engine.submitter, Submitter::Ring { .. }) {
            eprintln!("skipped: io_uring is not available here");
            return None;
        }
        Some(engine)
    }

    /// Where the fd `fd` of this process points, if it is open.
    fn fd_target(fd: i32) -> Option<PathBuf> {
        std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()
    }

    #[test]
    fn a_broken_ring_fails_waiting_keys_at_once_and_closes_their_files() {
        let (root, config, _src_mem) = stored(4, 0x44);
        let (dst, _dst_mem) = layout(0);
        let files = BlockFiles::open(&config, root.path(), dst).unwrap();
        let Some(mut engine) = ring_engine(&files, 2, Shape::Best) else {
            return;
        };
        start(&mut engine, JobKind::Load, 0..4);
        assert_eq!(engine.waiting.len(), 2);
        let waiting: Vec<(u64, i32, PathBuf)> = engine
            .waiting
            .iter()
            .map(|&slot| {
                let op = engine.ops[slot].as_ref().unwrap();
                let fd = op.file.as_ref().unwrap().as_raw_fd();
                assert_eq!(fd_target(fd).as_deref(), Some(op.path.as_path()));
                (op.tag, fd, op.path.clone())
            })
            .collect();

        engine.break_down("test: the ring failed".into());
        // The waiting keys failed at once, and their files are closed (the
        // fd numbers may be reused, but not for these block files).
        let failed_now: Vec<u64> = engine.finished.iter().map(|(tag, _)| *tag).collect();
        for (tag, fd, path) in &waiting {
            assert!(failed_now.contains(tag), "{failed_now:?}");
            assert_ne!(
                fd_target(*fd).as_deref(),
                Some(path.as_path()),
                "fd {fd} leaked"
            );
        }
        // The zero-copy loads that were moving are held back until the
        // kernel completes them, then fail too; nothing hangs.
        let mut outcomes = Vec::new();
        while outcomes.len() < 4 {
            outcomes.extend(engine.reap());
        }
        assert!(
            outcomes
                .iter()
                .all(|(_, o)| matches!(o, KeyOutcome::Failed(why) if why.contains("test: the ring failed"))),
            "{outcomes:?}"
        );
        drop(engine);
    }

    #[test]
    fn a_broken_ring_removes_what_late_creates_of_failed_stores_make() {
        let (root, config, _src_mem) = stored(2, 0x45);
        let (mem, _mem) = layout(0);
        let files = BlockFiles::open(&config, root.path(), mem).unwrap();
        let mut engine = FileRing::build(&files, 2, Shape::Best).unwrap();
        if !(matches!(engine.submitter, Submitter::Ring { .. }) && engine.meta_on_ring) {
            eprintln!("skipped: io_uring (with file-system requests) is not available here");
            return;
        }
        // Two zero-copy loads move (held back once broken), two new stores
        // have their create queued; nothing is submitted yet.
        start(&mut engine, JobKind::Load, 0..2);
        start(&mut engine, JobKind::Store, 2..4);
        engine.break_down("test: the ring failed".into());
        let mut outcomes = Vec::new();
        while outcomes.len() < 4 {
            outcomes.extend(engine.reap());
        }
        assert!(
            outcomes
                .iter()
                .all(|(_, o)| matches!(o, KeyOutcome::Failed(_)))
        );
        // Reaping the loads handed the queued creates to the kernel; their
        // completions may come a little later (as `Drop` allows for).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !engine.stray_creates.is_empty() && std::time::Instant::now() < deadline {
            engine.reap_broken();
        }
        // The files they made are closed and gone: only the blocks remain.
        assert!(engine.stray_creates.is_empty());
        assert_eq!(
            files_under(&files.dir).len(),
            2,
            "{:?}",
            files_under(&files.dir)
        );
        drop(engine);
    }

    #[test]
    fn blocks_of_other_page_sizes_are_refused_even_without_the_layout_record() {
        let (root, config, _src_mem) = stored(1, 0x21);
        let (src, _) = layout(0x21);
        let files = BlockFiles::open(&config, root.path(), src).unwrap();
        // The record that keeps other layouts out is gone, as when the
        // namespace directory is removed and recreated by a process whose
        // tensors split the same block bytes differently.
        let block = files.path(&task(0, 0).key);
        std::fs::remove_file(files.dir.join(crate::kv::namespace::LAYOUT_FILE)).unwrap();
        let (other, _other_mem) = patterned_layout(&[4096, 8192], BLOCKS, 0);
        let files = BlockFiles::open(&config, root.path(), other).unwrap();
        for shape in [Shape::Best, Shape::NoRing] {
            let mut engine = FileRing::build(&files, 2, shape).unwrap();
            let loaded = run(&mut engine, JobKind::Load, vec![task(0, 1)]);
            assert!(
                matches!(&loaded[0], KeyOutcome::Failed(why) if why.contains("page layout")),
                "{shape:?}: {loaded:?}"
            );
        }
        // A valid block of another layout is refused, never deleted.
        assert!(block.exists());
    }

    #[test]
    fn every_engine_shape_stores_and_loads_the_same_bytes() {
        for shape in [Shape::Best, Shape::DataOnRing, Shape::NoRing] {
            let root = tempfile::tempdir().unwrap();
            let config = KvConfig::new(root.path(), test_namespace());
            let (src, src_mem) = layout(0x5a);
            let files = BlockFiles::open(&config, root.path(), src).unwrap();
            let mut engine = FileRing::build(&files, 2, shape).unwrap();
            let ring = matches!(engine.submitter, Submitter::Ring { .. });
            if shape == Shape::NoRing {
                assert!(!ring, "NoRing builds no ring");
            }
            // Zero copy wherever io_uring runs (a sandbox may forbid it).
            assert_eq!(engine.zero_copy, ring, "{shape:?}");
            let stored = run(
                &mut engine,
                JobKind::Store,
                (0..5).map(|i| task(i, i)).collect(),
            );
            assert!(
                stored.iter().all(|o| *o == KeyOutcome::Stored),
                "{shape:?}: {stored:?}"
            );
            // A cancelled store publishes nothing and leaves no temporary
            // file: only the five blocks are there.
            let cancelled = run_with(&mut engine, JobKind::Store, vec![task(9, 0)], true);
            assert_eq!(cancelled, [KeyOutcome::Cancelled], "{shape:?}");
            assert_eq!(files_under(&files.dir).len(), 5, "{shape:?}");
            drop(engine);
            for i in 0..5 {
                let path = files.path(&task(i, 0).key);
                assert_eq!(
                    std::fs::metadata(&path).unwrap().len(),
                    files.codec.file_len
                );
            }

            let (dst, dst_mem) = layout(0);
            let files = BlockFiles::open(&config, root.path(), dst).unwrap();
            let mut engine = FileRing::build(&files, 2, shape).unwrap();
            // Key i into block 7 - i.
            let loaded = run(
                &mut engine,
                JobKind::Load,
                (0..5).map(|i| task(i, 7 - i)).collect(),
            );
            assert!(
                loaded.iter().all(|o| *o == KeyOutcome::Loaded),
                "{shape:?}: {loaded:?}"
            );
            assert_loaded_reversed(&src_mem, &dst_mem, 5, &format!("{shape:?}"));
        }
    }
}
