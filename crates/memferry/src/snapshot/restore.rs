//! Restoring a snapshot into memory, and verifying one without restoring.
//!
//! Both stream every shard through the chosen backend; checksums are
//! checked as each request completes (before its bytes are accepted), so a
//! corrupt, truncated or missing shard fails the operation with the file,
//! offset and length named.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Instant;

use super::manifest::Manifest;
use super::open::OpenedSnapshot;
use super::report::{Phases, Report};
use crate::memory::{Device, DiscardRegion, OwnedRegion, Region};
use crate::transfer::{BackendKind, Checksums, TransferJob, TransferStats, Tuning, backend};
use crate::{Error, Result};

/// How to read a snapshot.
#[derive(Clone)]
pub struct LoadOptions {
    /// Root directories overriding the recorded ones.
    pub roots: Option<Vec<PathBuf>>,
    /// Backend to run.
    pub backend: BackendKind,
    /// Backend settings.
    pub tuning: Tuning,
    /// Verify checksums in the same pass (default true).
    pub verify: bool,
    /// Where to restore to: `None` puts each allocation on the device its
    /// layout entry names; `Some` puts every allocation there.
    pub device: Option<Device>,
    /// Written atomically after a successful restore.
    pub complete_file: Option<PathBuf>,
    /// Bytes moved so far.
    pub progress: Option<Arc<AtomicU64>>,
    /// Set to cancel.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            roots: None,
            backend: BackendKind::Auto,
            tuning: Tuning::default(),
            verify: true,
            device: None,
            complete_file: None,
            progress: None,
            cancel: None,
        }
    }
}

/// A restored snapshot: the manifest and one region (host or device
/// memory) per allocation, in layout order.
pub struct RestoredSnapshot {
    /// The manifest that was restored.
    pub manifest: Manifest,
    /// `regions[i]` holds allocation `i`.
    pub regions: Vec<OwnedRegion>,
}

impl RestoredSnapshot {
    /// The regions as trait objects (e.g. for export).
    pub fn region_refs(&self) -> Vec<&dyn Region> {
        self.regions.iter().map(|r| r as &dyn Region).collect()
    }
}

/// Restores the snapshot at `dir` into memory on the devices chosen by
/// `opts.device` (see [`LoadOptions::device`]). A device that does not
/// exist here (e.g. `cuda:0` without a CUDA driver) fails before anything
/// is read or allocated.
pub fn restore(dir: &Path, opts: &LoadOptions) -> Result<(RestoredSnapshot, Report)> {
    if let Some(d) = opts.device {
        crate::memory::cuda::check_device(d)?;
    }
    let save_id = || Manifest::load(dir).ok().map(|m| m.identity.save_id);
    let before = save_id();
    match restore_once(dir, opts) {
        // A concurrent save may have replaced the snapshot between reading
        // the manifest and opening its shards: retry once on the new one.
        Err(Error::MissingShard { .. }) if before.is_some() && save_id() != before => {
            restore_once(dir, opts)
        }
        other => other,
    }
}

/// Memory for every allocation of `manifest`: on `device` when given, else
/// where it was saved from (host or a CUDA device). Each device is checked
/// once, before anything is allocated.
pub(crate) fn allocate_destinations(
    manifest: &Manifest,
    device: Option<Device>,
) -> Result<Vec<OwnedRegion>> {
    let targets: Vec<Device> = manifest
        .allocations
        .iter()
        .map(|a| device.unwrap_or(a.allocation.device))
        .collect();
    let mut devices = targets.clone();
    devices.sort_by_key(|d| d.to_string());
    devices.dedup();
    for &d in &devices {
        crate::memory::cuda::check_device(d)?;
    }
    manifest
        .allocations
        .iter()
        .zip(&targets)
        .map(|(a, &d)| OwnedRegion::allocate(d, a.allocation.size))
        .collect()
}

fn restore_once(dir: &Path, opts: &LoadOptions) -> Result<(RestoredSnapshot, Report)> {
    let mut phases = Phases::default();
    let (snap, plan, sums) = open_and_plan(dir, opts, &mut phases)?;

    let t = Instant::now();
    let regions = allocate_destinations(&snap.manifest, opts.device)?;
    phases.allocate = t.elapsed().as_secs_f64();

    let refs: Vec<&dyn Region> = regions.iter().map(|r| r as &dyn Region).collect();
    let done = AtomicBool::new(false);
    let stats = std::thread::scope(|s| {
        // Fresh memory costs a page fault per page on first touch (slow in
        // VMs); fault it in ahead of the I/O, in the order the backends fill
        // it, so allocation overlaps the transfer instead of adding to it.
        // (buffered workers fault pages in parallel themselves.)
        if opts.backend != BackendKind::Buffered {
            s.spawn(|| prefault(&plan, &regions, &done));
        }
        let r = run_load(&plan, &refs, &sums, opts, &mut phases);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    })?;

    let t = Instant::now();
    if let Some(c) = &opts.complete_file {
        super::save::write_complete_file(c, "restore", dir)?;
    }
    phases.commit = t.elapsed().as_secs_f64();
    let report = make_report("restore", &snap, opts, phases, &stats);
    Ok((
        RestoredSnapshot {
            manifest: snap.manifest,
            regions,
        },
        report,
    ))
}

/// Populates destination pages in plan order, in steps of up to 64 MiB,
/// until `done` is set or the kernel does not support populating.
fn prefault(plan: &crate::transfer::TransferPlan, regions: &[OwnedRegion], done: &AtomicBool) {
    const STEP: u64 = 64 << 20;
    let mut pending: Option<(usize, u64, u64)> = None;
    // Device memory needs no faulting in: skip it.
    let flush = |p: (usize, u64, u64)| {
        regions[p.0]
            .host()
            .is_none_or(|h| h.populate(p.1, p.2 - p.1))
    };
    for op in &plan.ops {
        if done.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let end = op.mem_offset + op.len;
        pending = match pending {
            Some((r, start, e)) if r == op.region && e == op.mem_offset && end - start <= STEP => {
                Some((r, start, end))
            }
            Some(p) => {
                if !flush(p) {
                    return;
                }
                Some((op.region, op.mem_offset, end))
            }
            None => Some((op.region, op.mem_offset, end)),
        };
    }
    if let Some(p) = pending {
        flush(p);
    }
}

/// Checks every byte of the snapshot at `dir` against its checksums
/// without keeping it in memory.
pub fn verify(dir: &Path, opts: &LoadOptions) -> Result<Report> {
    let mut phases = Phases::default();
    let (snap, plan, sums) = open_and_plan(dir, opts, &mut phases)?;
    let sinks: Vec<DiscardRegion> = snap
        .manifest
        .allocations
        .iter()
        .map(|a| DiscardRegion::new(a.allocation.size))
        .collect();
    let refs: Vec<&dyn Region> = sinks.iter().map(|r| r as &dyn Region).collect();
    let opts = LoadOptions {
        verify: true,
        ..opts.clone()
    };
    let stats = run_load(&plan, &refs, &sums, &opts, &mut phases)?;
    Ok(make_report("verify", &snap, &opts, phases, &stats))
}

/// The plan phase shared by restore and verify: validate settings, read the
/// manifest, check the shards and build the plan.
fn open_and_plan(
    dir: &Path,
    opts: &LoadOptions,
    phases: &mut Phases,
) -> Result<(OpenedSnapshot, crate::transfer::TransferPlan, Vec<u32>)> {
    let t = Instant::now();
    opts.tuning.validate()?;
    let snap = OpenedSnapshot::open(dir, opts.roots.as_deref())?;
    let (plan, sums) = snap.load_plan(opts.tuning.chunk_size)?;
    phases.plan = t.elapsed().as_secs_f64();
    Ok((snap, plan, sums))
}

fn run_load(
    plan: &crate::transfer::TransferPlan,
    regions: &[&dyn Region],
    sums: &[u32],
    opts: &LoadOptions,
    phases: &mut Phases,
) -> Result<TransferStats> {
    let t = Instant::now();
    let checks = if opts.verify {
        Checksums::Verify(sums)
    } else {
        Checksums::Skip
    };
    let mut job = TransferJob::new(plan, regions, checks);
    job.progress = opts.progress.as_deref();
    job.cancel = opts.cancel.as_deref();
    let stats = backend(opts.backend, opts.tuning.clone()).run(&job)?;
    phases.transfer = t.elapsed().as_secs_f64();
    // Verification ran in-line during the transfer: no separate pass.
    phases.verify = 0.0;
    Ok(stats)
}

fn make_report(
    op: &str,
    snap: &OpenedSnapshot,
    opts: &LoadOptions,
    phases: Phases,
    stats: &TransferStats,
) -> Report {
    let mut r = Report {
        op: op.into(),
        backend: opts.backend.name().into(),
        mode: String::new(),
        bytes: 0,
        seconds: 0.0,
        gib_per_s: 0.0,
        transfer_gib_per_s: 0.0,
        verified: opts.verify,
        fallbacks: Vec::new(),
        phases,
        peak_staging_bytes: 0,
        checksum_cpu_seconds: 0.0,
        snapshot: snap.dir.display().to_string(),
        allocations: snap.manifest.allocations.len(),
        shards: snap.manifest.shards.len(),
        roots: snap.roots.len(),
        workers: opts.tuning.workers,
        queue_depth: opts.tuning.queue_depth,
        chunk_size: opts.tuning.chunk_size,
        profile: None,
    };
    r.finish(stats);
    r
}
