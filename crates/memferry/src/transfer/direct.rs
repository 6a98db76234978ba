//! `direct`: O_DIRECT through io_uring, one submitter thread per root.
//!
//! Each root gets its own ring with up to `queue_depth` requests in flight.
//! Requests on page-aligned host memory run in place, with no copy and no
//! staging: loads land in the destination and are verified there before the
//! op counts as done (a failed job leaves the destination unspecified);
//! stores are checksummed and written straight from the source. Every other
//! request (device memory, unaligned sources such as tensors inside a
//! mapped safetensors file, verification sinks) goes through one of
//! `queue_depth` page-aligned staging slots registered with the ring once:
//! loads are verified in the slot before being copied on; stores are copied
//! in, checksummed, zero-padded to 4096 and written.
//! Short transfers are resubmitted for the remainder. When the filesystem refuses O_DIRECT
//! or io_uring cannot be set up or register buffers (EPERM, ENOSYS, ENOMEM
//! under a small memlock limit), that root runs `buffered` instead and the
//! report says why.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;

use super::buffered::open_error;
use super::job::{Checksums, TransferJob};
use super::plan::Direction;
use super::request::{Outcome, Request, per_call_cap};
use super::threads::{RootRun, SingleRoot, run_roots};
use super::uring::Ring;
use super::{Backend, IO_ALIGN, TransferStats, Tuning};
use crate::memory::AlignedBuf;
use crate::units::align_up;
use crate::{Error, Result};

/// The O_DIRECT + io_uring backend.
pub struct DirectBackend {
    tuning: Tuning,
}

impl DirectBackend {
    /// A direct backend with these settings.
    pub fn new(tuning: Tuning) -> Self {
        Self { tuning }
    }
}

impl Backend for DirectBackend {
    fn name(&self) -> &'static str {
        "direct"
    }

    fn run(&self, job: &TransferJob<'_>) -> Result<TransferStats> {
        job.validate()?;
        // One root (the common case for small KV jobs) runs on the calling
        // thread: no thread to spawn per call.
        run_roots(
            job,
            SingleRoot::Inline,
            |ops| run_root(job, ops, &self.tuning),
            |_, _| "odirect-uring".into(),
        )
    }
}

fn run_root(job: &TransferJob<'_>, ops: &[usize], tuning: &Tuning) -> Result<RootRun<()>> {
    match Engine::setup(job, ops, tuning)? {
        Ok(mut engine) => {
            let staging = engine.staging.as_ref().map_or(0, |b| b.len() as u64);
            engine.run(job, ops)?;
            Ok(RootRun {
                fallback: None,
                notes: Vec::new(),
                staging,
                extra: (),
            })
        }
        Err(reason) => RootRun::buffered(job, ops, tuning, "direct I/O", reason),
    }
}

/// Per-slot bookkeeping of an in-flight request.
#[derive(Clone, Copy)]
struct Slot {
    req: Request,
    /// Where the request's bytes live: the destination itself or a slot.
    buf: *mut u8,
    /// True when `buf` is the registered staging slot of the same index.
    staged: bool,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            req: Request::default(),
            buf: std::ptr::null_mut(),
            staged: false,
        }
    }
}

/// One root's ring, staging slots and open files.
struct Engine {
    ring: Ring,
    /// Registered with `ring` (when any op needs staging): must outlive
    /// every in-flight request.
    staging: Option<AlignedBuf>,
    slot_size: usize,
    slots: Vec<Slot>,
    files: Vec<Option<File>>,
    /// Bytes the kernel may move per request (test hook), multiple of 4096.
    cap: u64,
    /// Requests the kernel holds: waited for before the engine (its
    /// staging, and the caller's memory) goes, also when unwinding.
    in_flight: usize,
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            self.drain();
        }
    }
}

/// Where a request can run in place, with no staging: host memory that is
/// 4096-aligned at the op's offset with room for the aligned length. Loads
/// land in the destination; stores write straight from the source.
///
/// The request moves whole 4096-byte blocks, so an op of unaligned length
/// runs in place only when it ends the region: its padding then falls in
/// the region's slack, never on bytes another op loads (or, for a store,
/// never writes a neighbour's bytes where the file holds zero padding).
fn in_place_target(job: &TransferJob<'_>, op_index: usize) -> Option<*mut u8> {
    let op = &job.plan.ops[op_index];
    let region = job.regions[op.region];
    let base = match job.plan.direction {
        Direction::Load => region.host_ptr_mut()?,
        Direction::Store => region.host_ptr()?.cast_mut(),
    };
    let want = align_up(op.len, IO_ALIGN);
    let padding_stays_in_slack = op.len == want || op.mem_offset + op.len == region.len();
    if !(base as usize + op.mem_offset as usize).is_multiple_of(IO_ALIGN as usize)
        || op.mem_offset + want > region.host_capacity()
        || !padding_stays_in_slack
    {
        return None;
    }
    // SAFETY: in bounds of the region's addressable capacity (checked above).
    Some(unsafe { base.add(op.mem_offset as usize) })
}

/// Opens the files `ops` touch with O_DIRECT for the job's direction.
/// `Ok(Err(reason))` means the filesystem refuses O_DIRECT (fall back).
pub(super) fn open_direct(
    job: &TransferJob<'_>,
    ops: &[usize],
) -> Result<std::result::Result<Vec<Option<File>>, String>> {
    let plan = job.plan;
    let mut files: Vec<Option<File>> = (0..plan.files.len()).map(|_| None).collect();
    for &i in ops {
        let f = plan.ops[i].file;
        if files[f].is_some() {
            continue;
        }
        let path = &plan.files[f].path;
        let mut oo = OpenOptions::new();
        match plan.direction {
            Direction::Load => oo.read(true),
            Direction::Store => oo.write(true),
        };
        match oo.custom_flags(libc::O_DIRECT).open(path) {
            Ok(file) => files[f] = Some(file),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(Err(format!(
                    "the filesystem holding {} refuses O_DIRECT (EINVAL)",
                    path.display()
                )));
            }
            Err(e) => return Err(open_error(path, e)),
        }
    }
    Ok(Ok(files))
}

/// A root's files, indexed like the plan's (`None`: not touched by the root).
pub(super) type RootFiles = Vec<Option<File>>;

/// The start of every io_uring root: the files `ops` touch, opened with
/// O_DIRECT, and a ring for `depth` requests. `Ok(Err(reason))` means "fall
/// back to buffered"; `Err` is fatal.
pub(super) fn open_ring(
    job: &TransferJob<'_>,
    ops: &[usize],
    depth: usize,
) -> Result<std::result::Result<(RootFiles, Ring), String>> {
    let files = match open_direct(job, ops)? {
        Ok(files) => files,
        Err(reason) => return Ok(Err(reason)),
    };
    let ring = match Ring::new(depth as u32) {
        Ok(r) => r,
        Err(e) => return Ok(Err(format!("io_uring setup failed: {e}"))),
    };
    Ok(Ok((files, ring)))
}

/// Bytes of one staging slot for `ops`: the largest op, rounded up to 4096
/// (at least 4096).
pub(super) fn slot_size(job: &TransferJob<'_>, ops: &[usize]) -> usize {
    let largest = ops.iter().map(|&i| job.plan.ops[i].len).max().unwrap_or(0);
    align_up(largest.max(1), IO_ALIGN) as usize
}

/// What to tell the user when registering `bytes` of buffers with io_uring
/// failed with `e`.
pub(super) fn register_hint(e: &std::io::Error, bytes: u64) -> String {
    match e.raw_os_error() {
        Some(libc::ENOMEM) => format!(
            " (the memlock limit is too small for {} of staging: raise `ulimit -l`, lower --queue-depth or --chunk-size, or grant CAP_IPC_LOCK)",
            crate::units::format_bytes(bytes)
        ),
        Some(libc::EPERM) => " (not permitted: io_uring may be disabled by policy)".into(),
        _ => String::new(),
    }
}

impl Engine {
    /// Waits for every request the kernel still holds (after a ring error,
    /// or while unwinding from a panic).
    fn drain(&mut self) {
        self.ring.drain(std::mem::take(&mut self.in_flight));
    }

    /// Opens files with O_DIRECT, builds the ring and registers staging.
    /// `Ok(Err(reason))` means "fall back to buffered"; `Err` is fatal.
    fn setup(
        job: &TransferJob<'_>,
        ops: &[usize],
        tuning: &Tuning,
    ) -> Result<std::result::Result<Self, String>> {
        let depth = tuning
            .queue_depth
            .min(ops.len())
            .clamp(1, u16::MAX as usize);
        let (files, ring) = match open_ring(job, ops, depth)? {
            Ok(opened) => opened,
            Err(reason) => return Ok(Err(reason)),
        };
        let slot_size = slot_size(job, ops);
        let needs_staging = ops.iter().any(|&i| in_place_target(job, i).is_none());
        let staging = if needs_staging {
            let mut staging = match AlignedBuf::new(slot_size * depth) {
                Ok(buf) => buf,
                Err(e) => {
                    return Ok(Err(format!(
                        "{} of O_DIRECT staging could not be allocated ({e}); lower --queue-depth or --chunk-size",
                        crate::units::format_bytes((slot_size * depth) as u64)
                    )));
                }
            };
            // SAFETY: the staging buffer holds `depth` slots of `slot_size`
            // bytes and is owned by the engine with the ring, and `run`
            // (or the engine's drop) returns only when no request is in
            // flight, so the buffers outlive every use the kernel makes of
            // them.
            if let Err(e) = unsafe { ring.register_slots(staging.as_mut_ptr(), slot_size, depth) } {
                let hint = register_hint(&e, (slot_size * depth) as u64);
                return Ok(Err(format!(
                    "io_uring buffer registration failed: {e}{hint}"
                )));
            }
            Some(staging)
        } else {
            None
        };
        let cap = per_call_cap(tuning);
        Ok(Ok(Self {
            ring,
            staging,
            slot_size,
            slots: vec![Slot::default(); depth],
            files,
            cap,
            in_flight: 0,
        }))
    }

    /// The buffer a new request on `slot` uses for `op_index`.
    fn claim(&mut self, job: &TransferJob<'_>, slot: usize, op_index: usize) -> (*mut u8, bool) {
        if let Some(p) = in_place_target(job, op_index) {
            return (p, false);
        }
        let staging = self.staging.as_mut().expect("staging exists when needed");
        // SAFETY: slot < depth, so the offset stays inside the staging buffer.
        (
            unsafe { staging.as_mut_ptr().add(slot * self.slot_size) },
            true,
        )
    }

    /// Queues the not yet transferred part of `slot`'s request.
    fn submit_rest(&mut self, job: &TransferJob<'_>, slot: usize) {
        let s = self.slots[slot];
        let fixed = s.staged.then_some(slot as u16);
        // SAFETY: `buf` is 4096-aligned with room for `want` bytes: the
        // staging slot registered as buffer `slot` (`slot_size >= want`) when
        // `staged`, else the checked destination. It is not in flight (we
        // only resubmit after its completion) and is not touched again until
        // its next completion; staging, destinations and files outlive the
        // ring's requests because `run` returns only once nothing is in
        // flight.
        unsafe {
            s.req
                .submit_rest(job, &mut self.ring, &self.files, s.buf, fixed, slot as u64)
        }
    }

    fn run(&mut self, job: &TransferJob<'_>, ops: &[usize]) -> Result<()> {
        let plan = job.plan;
        let mut free: Vec<usize> = (0..self.slots.len()).rev().collect();
        let mut next = 0;
        self.in_flight = 0;
        let mut error: Option<Error> = None;
        // Loads that landed in place, to verify once the requests that
        // replace them are with the kernel: (op index, where it landed).
        let mut landed: Vec<(usize, *const u8)> = Vec::with_capacity(self.slots.len());
        loop {
            if error.is_none() && job.cancelled() {
                error = Some(Error::Cancelled);
            }
            while error.is_none() && next < ops.len() {
                let Some(slot) = free.pop() else { break };
                let op_index = ops[next];
                let op = &plan.ops[op_index];
                next += 1;
                let (len, want) = (op.len as usize, align_up(op.len, IO_ALIGN));
                let (buf, staged) = self.claim(job, slot, op_index);
                if plan.direction == Direction::Store && !staged {
                    // SAFETY: in-place source: `len` readable bytes at `buf`,
                    // not written by anyone during a store.
                    job.record_stored(op, unsafe { std::slice::from_raw_parts(buf, len) });
                } else if plan.direction == Direction::Store {
                    // SAFETY: the slot is free (not in flight) and `want` is
                    // at most the slot size.
                    let bytes = unsafe { std::slice::from_raw_parts_mut(buf, want as usize) };
                    if let Err(e) = job.fetch_for_store(op, &mut bytes[..len]) {
                        error = Some(e);
                        free.push(slot);
                        break;
                    }
                    bytes[len..].fill(0);
                }
                self.slots[slot] = Slot {
                    req: Request {
                        op: op_index,
                        done: 0,
                        want,
                    },
                    buf,
                    staged,
                };
                self.submit_rest(job, slot);
                self.in_flight += 1;
            }
            if !landed.is_empty() {
                // Checksumming takes CPU time; hand the refilled requests to
                // the kernel first so the device's queue stays full meanwhile.
                if self.in_flight > 0
                    && !matches!(job.checksums, Checksums::Skip)
                    && let Err(e) = self.ring.submit_and_wait(0)
                {
                    self.drain();
                    return Err(Error::io("submitting io_uring requests", e));
                }
                for (op_index, at) in landed.drain(..) {
                    if error.is_some() {
                        break;
                    }
                    let op = &plan.ops[op_index];
                    // SAFETY: the request that filled these `op.len` bytes of
                    // the destination has completed and no later request
                    // targets them (load ops cover disjoint memory).
                    let data = unsafe { std::slice::from_raw_parts(at, op.len as usize) };
                    match job.verify_loaded(op, data) {
                        Ok(()) => job.op_done(op),
                        Err(e) => error = Some(e),
                    }
                }
            }
            if self.in_flight == 0 {
                break;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                // Requests may write the caller's memory in place: return
                // only once none is outstanding.
                self.drain();
                return Err(Error::io("waiting for io_uring completions", e));
            }
            for (user_data, res) in self.ring.completions() {
                self.in_flight -= 1;
                let slot = user_data as usize;
                let s = self.slots[slot];
                let op = &plan.ops[s.req.op];
                if error.is_some() {
                    free.push(slot);
                    continue;
                }
                match self.slots[slot]
                    .req
                    .complete(job, &self.files, self.cap, res)
                {
                    Ok(Outcome::Complete) => {}
                    Ok(Outcome::Short) => {
                        self.submit_rest(job, slot);
                        self.in_flight += 1;
                        continue;
                    }
                    Err(e) => {
                        error = Some(e);
                        free.push(slot);
                        continue;
                    }
                }
                if plan.direction == Direction::Load && s.staged {
                    // SAFETY: the request for this slot has completed, so the
                    // kernel no longer writes its buffer; `op.len <= want`.
                    let data = unsafe { std::slice::from_raw_parts(s.buf, op.len as usize) };
                    if let Err(e) = job.accept_loaded(op, data) {
                        error = Some(e);
                    }
                } else if plan.direction == Direction::Load {
                    // Landed in place: verified there (above) before it counts.
                    landed.push((s.req.op, s.buf));
                } else {
                    job.op_done(op);
                }
                free.push(slot);
            }
        }
        error.map_or(Ok(()), Err)
    }
}
