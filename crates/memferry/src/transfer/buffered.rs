//! `buffered`: pread/pwrite through the page cache with a pool of workers.
//!
//! Workers take operations from one queue that interleaves the roots, so all
//! disks are busy at once. Loads into host memory land directly in the
//! destination region and are verified there before the op counts as done;
//! other memory goes through a per-worker staging buffer.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::job::TransferJob;
use super::plan::{Direction, IoOp};
use super::threads::run_pool;
use super::{Backend, IO_ALIGN, TransferStats, Tuning};
use crate::memory::AlignedBuf;
use crate::storage::file_io::{read_exact_at, write_all_at};
use crate::{Error, Result};

/// The page-cache backend.
pub struct BufferedBackend {
    tuning: Tuning,
}

impl BufferedBackend {
    /// A buffered backend with these settings.
    pub fn new(tuning: Tuning) -> Self {
        Self { tuning }
    }
}

impl Backend for BufferedBackend {
    fn name(&self) -> &'static str {
        "buffered"
    }

    fn run(&self, job: &TransferJob<'_>) -> Result<TransferStats> {
        job.validate()?;
        let all: Vec<usize> = (0..job.plan.ops.len()).collect();
        let start = Instant::now();
        let peak = run_ops(job, &all, &self.tuning)?;
        job.settle_devices()?;
        Ok(TransferStats {
            mode: "buffered-pread".into(),
            bytes: job.plan.bytes(),
            seconds: start.elapsed().as_secs_f64(),
            fallbacks: Vec::new(),
            peak_staging_bytes: peak,
            checksum_cpu_seconds: job.checksum_seconds(),
            ..TransferStats::default()
        })
    }
}

/// Opens the plan's files for the job's direction (no O_DIRECT).
pub(crate) fn open_files(job: &TransferJob<'_>, needed: &[usize]) -> Result<Vec<Option<File>>> {
    let mut files: Vec<Option<File>> = (0..job.plan.files.len()).map(|_| None).collect();
    for &i in needed {
        let target = &job.plan.files[i];
        let opened = match job.plan.direction {
            Direction::Load => File::open(&target.path),
            Direction::Store => OpenOptions::new().write(true).open(&target.path),
        };
        files[i] = Some(opened.map_err(|e| open_error(&target.path, e))?);
    }
    Ok(files)
}

/// Maps an open failure to a clear error (a missing shard is named as such).
pub(crate) fn open_error(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::MissingShard {
            path: path.to_path_buf(),
            offset: 0,
            length: 0,
        }
    } else {
        Error::io(format!("opening {}", path.display()), e)
    }
}

/// Runs the ops whose indices are in `subset` with `tuning.workers` threads.
/// Returns the peak staging bytes held.
pub(crate) fn run_ops(job: &TransferJob<'_>, subset: &[usize], tuning: &Tuning) -> Result<u64> {
    if subset.is_empty() {
        return Ok(0);
    }
    let mut needed: Vec<usize> = subset.iter().map(|&i| job.plan.ops[i].file).collect();
    needed.sort_unstable();
    needed.dedup();
    let files = open_files(job, &needed)?;
    let order = interleave_by_root(job, subset);
    let staged = AtomicUsize::new(0);
    run_pool(
        job,
        tuning.workers,
        order.len(),
        |scratch: &mut Option<AlignedBuf>, i| {
            let op = &job.plan.ops[order[i]];
            let file = files[op.file].as_ref().expect("opened above");
            run_op(job, op, file, tuning, scratch, &staged)
        },
    )?;
    Ok(staged.load(Ordering::Relaxed) as u64)
}

/// Orders ops so consecutive ones belong to different roots.
fn interleave_by_root(job: &TransferJob<'_>, subset: &[usize]) -> Vec<usize> {
    let roots = job.plan.root_count().max(1);
    let mut per_root: Vec<std::collections::VecDeque<usize>> = vec![Default::default(); roots];
    for &i in subset {
        per_root[job.plan.files[job.plan.ops[i].file].root].push_back(i);
    }
    let mut out = Vec::with_capacity(subset.len());
    while out.len() < subset.len() {
        for q in per_root.iter_mut() {
            if let Some(i) = q.pop_front() {
                out.push(i);
            }
        }
    }
    out
}

fn run_op(
    job: &TransferJob<'_>,
    op: &IoOp,
    file: &File,
    tuning: &Tuning,
    scratch: &mut Option<AlignedBuf>,
    staged: &AtomicUsize,
) -> Result<()> {
    let path = &job.plan.files[op.file].path;
    let limit = tuning.max_bytes_per_call;
    let region = job.regions[op.region];
    let len = op.len as usize;
    match job.plan.direction {
        Direction::Load => {
            if let Some(base) = region.host_ptr_mut() {
                // SAFETY: the job was validated, so the range is inside the
                // region, and plans never overlap in a region, so this worker
                // has exclusive access to it until the op completes.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(base.add(op.mem_offset as usize), len)
                };
                read_exact_at(file, path, dst, op.file_offset, limit)?;
                job.verify_loaded(op, dst)?;
                job.op_done(op);
            } else {
                let buf = staging(scratch, len, staged)?;
                read_exact_at(file, path, &mut buf[..len], op.file_offset, limit)?;
                job.accept_loaded(op, &buf[..len])?;
            }
        }
        Direction::Store => {
            if let Some(base) = region.host_ptr() {
                // SAFETY: in bounds (validated); sources are not written
                // during a store.
                let src =
                    unsafe { std::slice::from_raw_parts(base.add(op.mem_offset as usize), len) };
                job.record_stored(op, src);
                write_all_at(file, path, src, op.file_offset, limit)?;
            } else {
                let buf = staging(scratch, len, staged)?;
                job.fetch_for_store(op, &mut buf[..len])?;
                write_all_at(file, path, &buf[..len], op.file_offset, limit)?;
            }
            let pad = (crate::units::align_up(op.len, IO_ALIGN) - op.len) as usize;
            if pad > 0 {
                static ZEROS: [u8; IO_ALIGN as usize] = [0; IO_ALIGN as usize];
                write_all_at(file, path, &ZEROS[..pad], op.file_offset + op.len, limit)?;
            }
            job.op_done(op);
        }
    }
    Ok(())
}

fn staging<'b>(
    scratch: &'b mut Option<AlignedBuf>,
    len: usize,
    staged: &AtomicUsize,
) -> Result<&'b mut [u8]> {
    if scratch.as_ref().is_none_or(|b| b.len() < len) {
        let grown = scratch.as_ref().map_or(0, |b| b.len());
        *scratch = Some(AlignedBuf::new(len)?);
        staged.fetch_add(len - grown, Ordering::Relaxed);
    }
    Ok(scratch.as_mut().expect("allocated above").as_mut_slice())
}
