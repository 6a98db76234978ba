//! `pinned`: O_DIRECT through io_uring into a small ring of pinned staging
//! buffers, overlapped with asynchronous copies to and from the device.
//!
//! Per root, one thread owns one io_uring ring and `slots` staging buffers
//! of one chunk each, allocated (and registered with the ring) once: the
//! staging held is `slots x chunk` per root, whatever the snapshot size.
//! A load reads a chunk into a free slot, verifies its checksums *in the
//! slot*, then queues `cuMemcpyHtoDAsync` on the root's stream for the
//! destination device and records an event; the slot is reused once the
//! event has fired. Meanwhile the other slots keep reads in flight, so disk
//! reads and PCIe copies overlap (slot i+1 fills while slot i is copied).
//! A store runs the same pipeline backwards: an asynchronous device-to-host
//! copy into a slot, then the checksum of exactly those bytes, zero padding
//! to 4096 and an O_DIRECT write.
//!
//! Ordering: each device's stream is created non-blocking when the root
//! starts and, before its first copy, made to wait for the work queued so
//! far on the device's legacy default stream, so a store reads what the
//! caller's last kernel on a blocking stream (or memferry's own synchronous
//! copies) wrote, and a load does not overwrite memory such work still
//! reads. Writers on the caller's non-blocking streams are not waited for:
//! the caller synchronises them before the job.
//!
//! Staging is page-locked memory from `cuMemHostAlloc` whenever the job
//! touches device memory. A job on host memory only (no CUDA needed) stages
//! through page-aligned host memory and copies synchronously, and the
//! report says so. Polling never blocks on the device while reads could be
//! completing, except for the short wait on the oldest copy when nothing
//! else can make progress. When io_uring or O_DIRECT are unavailable the
//! root runs `buffered` (synchronous copies) and the report says why.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;

use super::direct::{open_ring, register_hint, slot_size};
use super::job::TransferJob;
use super::plan::Direction;
use super::request::{Outcome, Request, per_call_cap};
use super::threads::{RootRun, SingleRoot, run_roots};
use super::uring::Ring;
use super::{Backend, IO_ALIGN, TransferStats, Tuning};
use crate::memory::cuda::{Context, Event, Stream};
use crate::memory::{AlignedBuf, PinnedBuf};
use crate::units::align_up;
use crate::{Error, Result};

/// Most staging slots per root.
pub const MAX_SLOTS: usize = 32;

/// The pinned-staging pipeline backend.
pub struct PinnedBackend {
    tuning: Tuning,
}

impl PinnedBackend {
    /// A pinned backend; `queue_depth` sets the slots per root (2..=32).
    pub fn new(tuning: Tuning) -> Self {
        Self { tuning }
    }
}

/// What a root that ran the pipeline reports beside staging and notes.
#[derive(Default)]
struct Copies {
    pinned: bool,
    device_copies: bool,
}

impl Backend for PinnedBackend {
    fn name(&self) -> &'static str {
        "pinned"
    }

    fn run(&self, job: &TransferJob<'_>) -> Result<TransferStats> {
        job.validate()?;
        // A single root runs on a thread of its own too, so the caller's
        // thread keeps no state of the pipeline's (every CUDA call restores
        // the current context anyway).
        run_roots(
            job,
            SingleRoot::Spawn,
            |ops| run_root(job, ops, &self.tuning),
            |piped, fallbacks| {
                let pinned = piped.iter().any(|r| r.pinned);
                let device = piped.iter().any(|r| r.device_copies);
                if !piped.is_empty() && !device {
                    fallbacks.push(
                        "pinned: no CUDA device memory in this job, so staging is page-aligned host memory and copies are synchronous".into(),
                    );
                }
                match (pinned, device) {
                    (true, true) => "odirect-uring-pinned-async-copy",
                    (true, false) => "odirect-uring-pinned",
                    (false, _) => "odirect-uring-staged-host",
                }
                .into()
            },
        )
    }
}

fn run_root(job: &TransferJob<'_>, ops: &[usize], tuning: &Tuning) -> Result<RootRun<Copies>> {
    match Pipeline::setup(job, ops, tuning)? {
        Ok(mut p) => {
            let outcome = p.run(job, ops);
            let run = RootRun {
                fallback: None,
                notes: std::mem::take(&mut p.notes),
                staging: p.staging.len() as u64,
                extra: Copies {
                    pinned: p.staging.is_pinned(),
                    device_copies: !p.devices.is_empty(),
                },
            };
            outcome.map(|()| run)
        }
        Err(reason) => RootRun::buffered(job, ops, tuning, "pinned pipeline", reason),
    }
}

/// Staging memory: pinned when the job touches a device, else plain.
enum Staging {
    Pinned(PinnedBuf),
    Host(AlignedBuf),
}

impl Staging {
    fn base(&mut self) -> *mut u8 {
        match self {
            Staging::Pinned(p) => p.as_mut_ptr(),
            Staging::Host(h) => h.as_mut_ptr(),
        }
    }
    fn len(&self) -> usize {
        match self {
            Staging::Pinned(p) => p.len(),
            Staging::Host(h) => h.len(),
        }
    }
    fn is_pinned(&self) -> bool {
        matches!(self, Staging::Pinned(_))
    }
}

/// Where a slot is in the pipeline.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Free,
    /// A read or write is in the kernel.
    Io,
    /// An asynchronous device copy is queued on `dev`'s stream.
    Copy,
}

#[derive(Clone, Copy)]
struct Slot {
    req: Request,
    stage: Stage,
    /// Index into `Pipeline::devices` of the device the op's region is on.
    dev: Option<usize>,
    /// Order in which copies were queued (oldest is waited for first).
    seq: u64,
}

/// One device's stream and one event per slot.
struct DeviceQueue {
    stream: Stream,
    events: Vec<Event>,
}

impl DeviceQueue {
    /// A stream on device `ordinal` that waits for the work queued so far
    /// on the device's legacy stream, and `slots` events.
    fn new(ordinal: u32, slots: usize) -> Result<Self> {
        let ctx: Arc<Context> = crate::memory::cuda::context(ordinal)?;
        let stream = Stream::new(ctx.clone())?;
        stream.wait_for_legacy()?;
        let events = (0..slots)
            .map(|_| Event::new(ctx.clone()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { stream, events })
    }
}

/// One root's pipeline.
struct Pipeline {
    ring: Ring,
    /// Streams and events: dropped (synchronised) before `staging`.
    devices: Vec<DeviceQueue>,
    device_index: HashMap<u32, usize>,
    /// Registered with `ring` when `registered`: outlives every request.
    staging: Staging,
    registered: bool,
    slot_size: usize,
    slots: Vec<Slot>,
    files: Vec<Option<File>>,
    cap: u64,
    notes: Vec<String>,
    seq: u64,
}

impl Pipeline {
    /// Opens files, builds the ring and allocates (and registers) staging.
    /// `Ok(Err(reason))` means "fall back to buffered"; `Err` is fatal.
    fn setup(
        job: &TransferJob<'_>,
        ops: &[usize],
        tuning: &Tuning,
    ) -> Result<std::result::Result<Self, String>> {
        let plan = job.plan;
        let depth = tuning.queue_depth.clamp(2, MAX_SLOTS).min(ops.len()).max(1);
        let (files, ring) = match open_ring(job, ops, depth)? {
            Ok(opened) => opened,
            Err(reason) => return Ok(Err(reason)),
        };
        let slot_size = slot_size(job, ops);
        // The devices this root copies to or from, in order of first use.
        let mut ordinals: Vec<u32> = Vec::new();
        for &i in ops {
            if let Some((ctx, _)) = job.regions[plan.ops[i].region].cuda()
                && !ordinals.contains(&ctx.ordinal())
            {
                ordinals.push(ctx.ordinal());
            }
        }
        let mut staging = match ordinals.first() {
            Some(&first) => Staging::Pinned(PinnedBuf::new(first, slot_size * depth)?),
            None => Staging::Host(AlignedBuf::new(slot_size * depth)?),
        };
        let base = staging.base();
        let mut notes = Vec::new();
        // SAFETY: the staging holds `depth` slots of `slot_size` bytes and is
        // owned by the pipeline together with the ring, and `run` returns
        // only when no request is in flight, so the buffers outlive every
        // use the kernel makes of them.
        let registered = match unsafe { ring.register_slots(base, slot_size, depth) } {
            Ok(()) => true,
            Err(e) => {
                notes.push(format!(
                    "pinned: io_uring buffer registration failed: {e}{}; reading into unregistered staging",
                    register_hint(&e, (slot_size * depth) as u64)
                ));
                false
            }
        };
        let cap = per_call_cap(tuning);
        let mut devices = Vec::with_capacity(ordinals.len());
        let mut device_index = HashMap::new();
        for ordinal in ordinals {
            device_index.insert(ordinal, devices.len());
            devices.push(DeviceQueue::new(ordinal, depth)?);
        }
        Ok(Ok(Self {
            ring,
            devices,
            device_index,
            staging,
            registered,
            slot_size,
            slots: vec![
                Slot {
                    req: Request::default(),
                    stage: Stage::Free,
                    dev: None,
                    seq: 0,
                };
                depth
            ],
            files,
            cap,
            notes,
            seq: 0,
        }))
    }

    fn slot_ptr(&mut self, slot: usize) -> *mut u8 {
        // SAFETY: slot < depth, so the offset stays inside the staging.
        unsafe { self.staging.base().add(slot * self.slot_size) }
    }

    /// The queue of `ctx`'s device (every device of the root's ops has
    /// one from `setup`).
    fn device(&self, ctx: &Context) -> usize {
        self.device_index[&ctx.ordinal()]
    }

    /// Queues the not yet transferred part of `slot`'s request.
    fn submit_rest(&mut self, job: &TransferJob<'_>, slot: usize) {
        let ptr = self.slot_ptr(slot);
        let fixed = self.registered.then_some(slot as u16);
        // SAFETY: the slot is page-aligned, `want <= slot_size`, and it is
        // registered buffer `slot` when `registered`. It is not in flight (we
        // only (re)submit after its completion or copy) and is untouched
        // until the next completion; staging and files outlive the ring's
        // requests because `run` returns only once nothing is in flight.
        unsafe {
            self.slots[slot].req.submit_rest(
                job,
                &mut self.ring,
                &self.files,
                ptr,
                fixed,
                slot as u64,
            )
        }
        self.slots[slot].stage = Stage::Io;
    }

    /// Starts `op_index` on the free `slot`: a read (load), or fetching the
    /// source bytes (store: an async device copy or a synchronous copy
    /// followed by the write).
    fn start(&mut self, job: &TransferJob<'_>, slot: usize, op_index: usize) -> Result<()> {
        let op = &job.plan.ops[op_index];
        let want = align_up(op.len, IO_ALIGN);
        self.slots[slot] = Slot {
            req: Request {
                op: op_index,
                done: 0,
                want,
            },
            stage: Stage::Free,
            dev: None,
            seq: 0,
        };
        if job.plan.direction == Direction::Load {
            self.submit_rest(job, slot);
            return Ok(());
        }
        let region = job.regions[op.region];
        let buf = self.slot_ptr(slot);
        if let Some((ctx, base)) = region.cuda() {
            let d = self.device(ctx);
            let q = &self.devices[d];
            // SAFETY: the slot is free, so nobody uses `buf..buf+len` until
            // the event `copy_queued` records fires; the source range is
            // inside the region (validated) and not written during a store.
            unsafe {
                q.stream
                    .copy_dtoh(buf, base + op.mem_offset, op.len as usize)?
            };
            return self.copy_queued(slot, d);
        }
        // SAFETY: the slot is free and `want <= slot_size`.
        let bytes = unsafe { std::slice::from_raw_parts_mut(buf, want as usize) };
        job.fetch_for_store(op, &mut bytes[..op.len as usize])?;
        bytes[op.len as usize..].fill(0);
        self.submit_rest(job, slot);
        Ok(())
    }

    /// A copy for `slot` was just queued on device `d`'s stream: records
    /// the slot's event after it and marks the slot as copying (copies are
    /// waited for oldest first).
    fn copy_queued(&mut self, slot: usize, d: usize) -> Result<()> {
        let q = &self.devices[d];
        q.events[slot].record(&q.stream)?;
        self.seq += 1;
        self.slots[slot].stage = Stage::Copy;
        self.slots[slot].dev = Some(d);
        self.slots[slot].seq = self.seq;
        Ok(())
    }

    /// A queued copy of `slot` has completed: finish the load, or checksum
    /// and write the store.
    fn copied(&mut self, job: &TransferJob<'_>, slot: usize) {
        let s = self.slots[slot].req;
        let op = &job.plan.ops[s.op];
        match job.plan.direction {
            Direction::Load => {
                job.op_done(op);
                self.slots[slot].stage = Stage::Free;
            }
            Direction::Store => {
                let buf = self.slot_ptr(slot);
                // SAFETY: the copy into the slot has completed and the slot
                // is ours until we submit the write; `want <= slot_size`.
                let bytes = unsafe { std::slice::from_raw_parts_mut(buf, s.want as usize) };
                job.record_stored(op, &bytes[..op.len as usize]);
                bytes[op.len as usize..].fill(0);
                self.submit_rest(job, slot);
            }
        }
    }

    /// A read into `slot` completed in full: verify in the slot, then hand
    /// the bytes on (async device copy, or a synchronous host copy).
    fn loaded(&mut self, job: &TransferJob<'_>, slot: usize) -> Result<()> {
        let op = &job.plan.ops[self.slots[slot].req.op];
        let buf = self.slot_ptr(slot);
        // SAFETY: the read completed, so the kernel no longer writes the
        // slot; `op.len <= want <= slot_size`.
        let data = unsafe { std::slice::from_raw_parts(buf, op.len as usize) };
        job.verify_loaded(op, data)?;
        let region = job.regions[op.region];
        if let Some((ctx, base)) = region.cuda() {
            let d = self.device(ctx);
            let q = &self.devices[d];
            // SAFETY: the slot stays untouched until the event
            // `copy_queued` records fires; the destination range is inside
            // the region (validated) and exclusive to this op (plans never
            // overlap).
            unsafe {
                q.stream
                    .copy_htod(base + op.mem_offset, buf, op.len as usize)?
            };
            return self.copy_queued(slot, d);
        }
        // SAFETY: plans never overlap in a region, so this op has exclusive
        // use of its destination range.
        unsafe { region.copy_in(op.mem_offset, data)? };
        job.op_done(op);
        self.slots[slot].stage = Stage::Free;
        Ok(())
    }

    /// Finishes every queued copy that has completed; with `block`, first
    /// waits for the oldest one. Returns how many finished.
    fn poll_copies(
        &mut self,
        job: &TransferJob<'_>,
        block: bool,
        error: &mut Option<Error>,
    ) -> usize {
        if block
            && let Some(slot) = (0..self.slots.len())
                .filter(|&i| self.slots[i].stage == Stage::Copy)
                .min_by_key(|&i| self.slots[i].seq)
        {
            let d = self.slots[slot].dev.expect("copies have a device");
            if let Err(e) = self.devices[d].events[slot].wait() {
                error.get_or_insert(e);
            }
        }
        let mut finished = 0;
        for slot in 0..self.slots.len() {
            let s = self.slots[slot];
            if s.stage != Stage::Copy {
                continue;
            }
            let d = s.dev.expect("copies have a device");
            let done = match self.devices[d].events[slot].done() {
                Ok(done) => done,
                Err(e) => {
                    // The copy failed: the stream is unusable; wait for it
                    // so nothing still uses the slot, then give it back.
                    let _ = self.devices[d].stream.synchronize();
                    error.get_or_insert(e);
                    true
                }
            };
            if !done {
                continue;
            }
            finished += 1;
            if error.is_some() {
                self.slots[slot].stage = Stage::Free;
            } else {
                self.copied(job, slot);
            }
        }
        finished
    }

    /// Slots in `stage`.
    fn in_stage(&self, stage: Stage) -> usize {
        self.slots.iter().filter(|s| s.stage == stage).count()
    }

    fn run(&mut self, job: &TransferJob<'_>, ops: &[usize]) -> Result<()> {
        let mut next = 0;
        let mut error: Option<Error> = None;
        loop {
            if error.is_none() && job.cancelled() {
                error = Some(Error::Cancelled);
            }
            while error.is_none() && next < ops.len() {
                let Some(slot) =
                    (0..self.slots.len()).find(|&i| self.slots[i].stage == Stage::Free)
                else {
                    break;
                };
                let op_index = ops[next];
                next += 1;
                if let Err(e) = self.start(job, slot, op_index) {
                    self.slots[slot].stage = Stage::Free;
                    error = Some(e);
                }
            }
            let (io, copies) = (self.in_stage(Stage::Io), self.in_stage(Stage::Copy));
            if io == 0 && copies == 0 {
                break;
            }
            let mut progressed = self.poll_copies(job, false, &mut error) > 0;
            if io > 0 {
                // With copies pending, only collect what has completed;
                // otherwise sleep until a request completes.
                let want = usize::from(copies == 0 && !progressed);
                if let Err(e) = self.ring.submit_and_wait(want) {
                    // Return only once no request is outstanding (counted
                    // again: finished copies queued writes since `io`);
                    // queued device copies are synchronised when the
                    // pipeline drops, before its staging.
                    self.ring.drain(self.in_stage(Stage::Io));
                    return Err(Error::io("waiting for io_uring completions", e));
                }
            }
            for (user_data, res) in self.ring.completions() {
                progressed = true;
                let slot = user_data as usize;
                self.slots[slot].stage = Stage::Free;
                if error.is_some() {
                    continue;
                }
                if let Err(e) = self.completed(job, slot, res) {
                    self.slots[slot].stage = Stage::Free;
                    error = Some(e);
                }
            }
            if !progressed && copies > 0 {
                self.poll_copies(job, true, &mut error);
            }
        }
        error.map_or(Ok(()), Err)
    }

    /// Handles the completion of `slot`'s request with result `res`.
    fn completed(&mut self, job: &TransferJob<'_>, slot: usize, res: i32) -> Result<()> {
        let op = &job.plan.ops[self.slots[slot].req.op];
        let outcome = self.slots[slot]
            .req
            .complete(job, &self.files, self.cap, res)?;
        if let Outcome::Short = outcome {
            self.submit_rest(job, slot);
            return Ok(());
        }
        match job.plan.direction {
            Direction::Load => self.loaded(job, slot),
            Direction::Store => {
                job.op_done(op);
                Ok(())
            }
        }
    }
}
