//! How backends spread a plan over threads: one worker per root
//! ([`run_roots`], the io_uring backends) or a pool of workers taking ops
//! from one cursor ([`run_pool`], `buffered` and `gds`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use super::buffered::run_ops;
use super::job::TransferJob;
use super::{TransferStats, Tuning};
use crate::{Error, Result};

/// What one root's worker did.
pub(super) struct RootRun<X> {
    /// `None`: the backend's own path ran; `Some`: why the root ran
    /// `buffered` instead.
    pub fallback: Option<String>,
    /// Notes on a slower path inside the backend's own path.
    pub notes: Vec<String>,
    /// Staging memory the root held.
    pub staging: u64,
    /// What else the backend reports about a root that ran its own path.
    pub extra: X,
}

impl<X: Default> RootRun<X> {
    /// Runs `ops` with `buffered` because `what` cannot run, for `reason`
    /// (logged, and reported as the root's fallback).
    pub fn buffered(
        job: &TransferJob<'_>,
        ops: &[usize],
        tuning: &Tuning,
        what: &str,
        reason: String,
    ) -> Result<Self> {
        tracing::warn!("{what} unavailable, using buffered: {reason}");
        let staging = run_ops(job, ops, tuning)?;
        Ok(Self {
            fallback: Some(reason),
            notes: Vec::new(),
            staging,
            extra: X::default(),
        })
    }
}

/// Where the worker of a job with a single root runs.
pub(super) enum SingleRoot {
    /// On the calling thread: no thread to spawn per call.
    Inline,
    /// On a scoped thread, like every root of a larger job (for workers
    /// whose thread state, such as the current CUDA context, must not leak
    /// to the caller).
    Spawn,
}

/// Runs `run_root` once per root of the job's plan, with the indices of
/// that root's ops in plan order (roots without ops are skipped), and
/// merges what the roots did into the job's stats.
///
/// Guarantees:
/// - each root runs on its own scoped thread (a single root on the calling
///   thread with [`SingleRoot::Inline`]); all of them have returned before
///   this does, and a panicking worker panics the caller;
/// - when any root failed, the error of the first failing root (in root
///   order) is returned and nothing is merged;
/// - a load that succeeded on every root has waited for its bytes to land
///   on every device it wrote ([`TransferJob::settle_devices`]);
/// - otherwise `fallbacks` lists, root by root, the root's notes and then
///   its fallback reason, each line once, followed by whatever `fast_mode`
///   adds; `peak_staging_bytes` is the sum over the roots; `mode` is
///   `fast_mode`'s name when no root fell back, `buffered-fallback` when all
///   did, and `NAME(n roots)+buffered-fallback(m roots)` otherwise.
///
/// `fast_mode` is called once with the extras of the roots that ran the
/// backend's own path, in root order, and returns that path's name.
pub(super) fn run_roots<X: Send>(
    job: &TransferJob<'_>,
    single: SingleRoot,
    run_root: impl Fn(&[usize]) -> Result<RootRun<X>> + Sync,
    fast_mode: impl FnOnce(&[X], &mut Vec<String>) -> String,
) -> Result<TransferStats> {
    let start = Instant::now();
    let mut per_root: Vec<Vec<usize>> = vec![Vec::new(); job.plan.root_count()];
    for (i, op) in job.plan.ops.iter().enumerate() {
        per_root[job.plan.files[op.file].root].push(i);
    }
    per_root.retain(|ops| !ops.is_empty());
    let results: Vec<Result<RootRun<X>>> = match single {
        SingleRoot::Inline if per_root.len() == 1 => vec![run_root(&per_root[0])],
        _ => std::thread::scope(|s| {
            let handles: Vec<_> = per_root
                .iter()
                .map(|ops| s.spawn(|| run_root(ops)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("root worker panicked"))
                .collect()
        }),
    };
    let results: Vec<RootRun<X>> = results.into_iter().collect::<Result<_>>()?;
    job.settle_devices()?;
    let mut stats = TransferStats {
        bytes: job.plan.bytes(),
        ..Default::default()
    };
    let mut fast = Vec::new();
    let mut fallback_roots = 0;
    for r in results {
        stats.peak_staging_bytes += r.staging;
        let mut push = |line: String| {
            if !stats.fallbacks.contains(&line) {
                stats.fallbacks.push(line);
            }
        };
        for n in r.notes {
            push(n);
        }
        match r.fallback {
            Some(reason) => {
                fallback_roots += 1;
                push(reason);
            }
            None => fast.push(r.extra),
        }
    }
    let name = fast_mode(&fast, &mut stats.fallbacks);
    stats.mode = match (fast.len(), fallback_roots) {
        (_, 0) => name,
        (0, _) => "buffered-fallback".into(),
        (p, f) => format!("{name}({p} roots)+buffered-fallback({f} roots)"),
    };
    stats.seconds = start.elapsed().as_secs_f64();
    stats.checksum_cpu_seconds = job.checksum_seconds();
    Ok(stats)
}

/// Runs `run(scratch, i)` for every `i` in `0..count` on up to `workers`
/// scoped threads (at least one) that take the next `i` from one shared
/// cursor, so `i`s start in order; each thread passes its own `scratch`,
/// which starts as `S::default()`.
///
/// Guarantees: before each `i` a worker checks for cancellation, which
/// ends the run with [`Error::Cancelled`]; after the first error (in the
/// order workers hit them) no worker starts another `i`, and that error is
/// returned; this returns only once every worker has stopped.
pub(super) fn run_pool<S: Default>(
    job: &TransferJob<'_>,
    workers: usize,
    count: usize,
    run: impl Fn(&mut S, usize) -> Result<()> + Sync,
) -> Result<()> {
    let cursor = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        stop.store(true, Ordering::Relaxed);
        let mut g = first_error
            .lock()
            .expect("no panics while holding the lock");
        g.get_or_insert(e);
    };
    std::thread::scope(|s| {
        for _ in 0..workers.min(count).max(1) {
            s.spawn(|| {
                let mut scratch = S::default();
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if job.cancelled() {
                        return fail(Error::Cancelled);
                    }
                    let i = cursor.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    if let Err(e) = run(&mut scratch, i) {
                        return fail(e);
                    }
                }
            });
        }
    });
    match first_error
        .into_inner()
        .expect("no panics while holding the lock")
    {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
