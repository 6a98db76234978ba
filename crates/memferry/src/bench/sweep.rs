//! The sweep: backends x settings x cold/warm, every figure a median of
//! several runs, next to the limits measured on the same files.

use std::path::PathBuf;
use std::time::Instant;

use super::limits::{self, RootFile, drop_page_cache};
use super::stats::Measurement;
use super::{BenchReport, Limit, Limits, Row, Setting};
use crate::snapshot::source::synthetic;
use crate::snapshot::{LoadOptions, OpenedSnapshot, SaveOptions, restore, save};
use crate::storage::durable::unique_id;
use crate::storage::roots::check_writable_root;
use crate::transfer::BackendKind;
use crate::{Error, Result};

/// Request size and depth of the raw O_DIRECT limit loops (fio-like).
const LIMIT_BS: usize = 4 << 20;
const LIMIT_QD: usize = 32;

/// Which page-cache state restores are measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Temperature {
    /// Page cache dropped before each run (needs root).
    Cold,
    /// Files cached.
    Warm,
    /// Both.
    Both,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Snapshot size.
    pub size: u64,
    /// Roots to stripe over (one directory per disk).
    pub roots: Vec<PathBuf>,
    /// Backends to measure.
    pub backends: Vec<BackendKind>,
    /// Cold, warm or both.
    pub temperature: Temperature,
    /// Runs per figure (median taken).
    pub runs: usize,
    /// Buffered worker counts to try.
    pub workers: Vec<usize>,
    /// Direct queue depths to try.
    pub queue_depths: Vec<usize>,
    /// Chunk sizes to try.
    pub chunk_sizes: Vec<u64>,
    /// Shard size of the bench snapshot.
    pub shard_size: u64,
    /// Where the model lives: saves run from it and restores go to it
    /// (`cuda:N` measures the GPU paths).
    pub device: crate::memory::Device,
}

impl BenchOptions {
    /// The settings the sweep visits, in order.
    pub fn settings(&self) -> Vec<Setting> {
        let mut out = Vec::new();
        for &backend in &self.backends {
            for &chunk_size in &self.chunk_sizes {
                match backend {
                    BackendKind::Buffered => {
                        for &workers in &self.workers {
                            out.push(Setting {
                                backend,
                                workers,
                                queue_depth: 1,
                                chunk_size,
                            });
                        }
                    }
                    _ => {
                        for &queue_depth in &self.queue_depths {
                            out.push(Setting {
                                backend,
                                workers: 1,
                                queue_depth,
                                chunk_size,
                            });
                        }
                    }
                }
            }
        }
        out
    }
}

/// Removes the bench's own directories on every exit path.
struct Workdirs(Vec<PathBuf>);

impl Drop for Workdirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Removes the bench snapshot and its shard directories (all inside the
/// bench's own work directories).
fn remove_bench_snapshot(snap: &std::path::Path, dirs: &[PathBuf]) {
    let _ = std::fs::remove_dir_all(snap);
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with("snap.memferry-")
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn measure<F: FnMut() -> Result<f64>>(runs: usize, mut f: F) -> Result<Measurement> {
    let mut xs = Vec::with_capacity(runs);
    for _ in 0..runs {
        xs.push(f()?);
    }
    Ok(Measurement::from_runs(xs).expect("runs >= 1"))
}

fn limit<F: FnMut() -> Result<f64>>(name: String, runs: usize, f: F) -> Limit {
    match measure(runs, f) {
        Ok(m) => Limit {
            name,
            result: Some(m),
            unavailable: None,
        },
        Err(e) => Limit {
            name,
            result: None,
            unavailable: Some(e.to_string()),
        },
    }
}

/// The shard files of a snapshot, with their roots.
pub fn snapshot_files(opened: &OpenedSnapshot) -> Vec<RootFile> {
    let m = &opened.manifest;
    (0..m.shards.len())
        .map(|i| RootFile {
            path: opened.shard_path(i),
            root: m.shards[i].root,
            size: m.shards[i].size,
        })
        .collect()
}

/// Measures every limit on the shard files of the snapshot at `dir`.
pub fn limits_of_snapshot(dir: &std::path::Path, runs: usize) -> Result<Limits> {
    if runs == 0 {
        return Err(Error::InvalidInput("--runs must be at least 1".into()));
    }
    let opened = OpenedSnapshot::open(dir, None)?;
    let files = snapshot_files(&opened);
    Ok(measure_limits(&files, runs, opened.manifest.total_bytes))
}

/// Measures every limit on `files`, each a median of `runs` runs.
pub fn measure_limits(files: &[RootFile], runs: usize, size: u64) -> Limits {
    let odirect_read = limit(
        format!("O_DIRECT read, io_uring qd={LIMIT_QD} bs=4MiB"),
        runs,
        || {
            let _ = drop_page_cache();
            limits::odirect_read(files, LIMIT_BS, LIMIT_QD)
        },
    );
    let odirect_write = limit(
        format!("O_DIRECT write, io_uring qd={LIMIT_QD} bs=4MiB, fsync"),
        runs,
        || limits::odirect_write(files, LIMIT_BS, LIMIT_QD),
    );
    let pread_direct = limit("O_DIRECT pread, bs=4MiB, qd=1".into(), runs, || {
        let _ = drop_page_cache();
        limits::pread_direct(files, LIMIT_BS)
    });
    let mut first = true;
    let buffered_read = limit(
        "buffered read of cached files, bs=4MiB".into(),
        runs,
        || {
            let warm_first = std::mem::take(&mut first);
            limits::buffered_read(files, LIMIT_BS, warm_first)
        },
    );
    let copy_bytes = (size as usize).clamp(64 << 20, 1 << 30);
    let memcpy = limit("host memcpy, 1 thread".into(), runs, || {
        limits::memcpy(copy_bytes)
    });
    Limits {
        odirect_read,
        odirect_write,
        pread_direct,
        buffered_read,
        memcpy,
        pinned_h2d: None,
        pinned_d2h: None,
    }
}

/// Pinned host<->device copy bandwidth on `ordinal`, or `None` without a
/// CUDA device.
pub fn measure_gpu_limits(ordinal: u32, runs: usize, size: u64) -> (Option<Limit>, Option<Limit>) {
    if !crate::memory::cuda::available() {
        return (None, None);
    }
    let bytes = (size as usize).clamp(64 << 20, 1 << 30);
    let h2d = limit(
        format!("pinned host-to-device copy, cuda:{ordinal}"),
        runs,
        || limits::pinned_copy(ordinal, bytes, true),
    );
    let d2h = limit(
        format!("pinned device-to-host copy, cuda:{ordinal}"),
        runs,
        || limits::pinned_copy(ordinal, bytes, false),
    );
    (Some(h2d), Some(d2h))
}

/// Runs the bench; `say` receives one line per step (for a progress log).
pub fn run(opts: &BenchOptions, say: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    let started = Instant::now();
    if opts.runs == 0 || opts.size == 0 || opts.roots.is_empty() {
        return Err(Error::InvalidInput(
            "bench needs --runs >= 1, a --size above 0 and at least one root".into(),
        ));
    }
    let settings = opts.settings();
    if settings.is_empty() {
        return Err(Error::InvalidInput(
            "the sweep is empty: name at least one backend".into(),
        ));
    }
    for s in &settings {
        s.tuning().validate()?;
    }
    for r in &opts.roots {
        check_writable_root(r)?;
    }
    let id = unique_id();
    let dirs = Workdirs(
        opts.roots
            .iter()
            .map(|r| r.join(format!("memferry-bench-{id}")))
            .collect(),
    );
    for d in &dirs.0 {
        std::fs::create_dir(d).map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
    }
    let snap = dirs.0[0].join("snap");
    let shard_roots = (dirs.0.len() > 1).then(|| dirs.0.clone());
    let cold = match opts.temperature {
        Temperature::Warm => Err("not requested (--warm)".to_string()),
        _ => drop_page_cache(),
    };
    let warm = opts.temperature != Temperature::Cold;

    say(&format!(
        "building a {} synthetic model in memory",
        crate::units::format_bytes(opts.size)
    ));
    crate::memory::cuda::check_device(opts.device)?;
    let source = synthetic(opts.size, 1)?
        .into_source()
        .to_device(opts.device)?;
    let mut rows = Vec::new();

    for s in &settings {
        say(&format!("save: {}", s.label()));
        let mut last = None;
        let m = measure(opts.runs, || {
            // Every save writes fresh files, like the write limit: the
            // previous bench snapshot is removed first, outside the timing.
            remove_bench_snapshot(&snap, &dirs.0);
            let r = save(
                &source,
                &snap,
                &SaveOptions {
                    roots: shard_roots.clone(),
                    shard_size: opts.shard_size,
                    backend: s.backend,
                    tuning: s.tuning(),
                    ..SaveOptions::default()
                },
            )?;
            let g = r.gib_per_s;
            last = Some(r);
            Ok(g)
        })?;
        let r = last.expect("measured at least once");
        rows.push(row("save", "-", s, Some(m), None, r.mode, r.fallbacks));
    }

    let opened = OpenedSnapshot::open(&snap, None)?;
    let files = snapshot_files(&opened);

    say("measuring the limits on the same files");
    let mut lims = measure_limits(&files, opts.runs, opts.size);
    let ordinal = match opts.device {
        crate::memory::Device::Cuda(n) => n,
        crate::memory::Device::Cpu => 0,
    };
    (lims.pinned_h2d, lims.pinned_d2h) = measure_gpu_limits(ordinal, opts.runs, opts.size);

    for s in &settings {
        let load = LoadOptions {
            backend: s.backend,
            tuning: s.tuning(),
            device: Some(opts.device),
            ..LoadOptions::default()
        };
        let restore_rows = |temp: &str, before: &dyn Fn()| -> Result<Row> {
            let mut last = None;
            let m = measure(opts.runs, || {
                before();
                let (restored, r) = restore(&snap, &load)?;
                drop(restored);
                let g = r.gib_per_s;
                last = Some(r);
                Ok(g)
            })?;
            let r = last.expect("measured at least once");
            Ok(row("restore", temp, s, Some(m), None, r.mode, r.fallbacks))
        };
        match &cold {
            Ok(()) => {
                say(&format!("restore cold: {}", s.label()));
                rows.push(restore_rows("cold", &|| {
                    let _ = drop_page_cache();
                })?);
            }
            Err(why) if opts.temperature != Temperature::Warm => {
                rows.push(row(
                    "restore",
                    "cold",
                    s,
                    None,
                    Some(why.clone()),
                    String::new(),
                    vec![],
                ));
            }
            Err(_) => {}
        }
        if warm {
            say(&format!("restore warm: {}", s.label()));
            let _ = limits::buffered_read(&files, LIMIT_BS, false);
            rows.push(restore_rows("warm", &|| {})?);
        }
    }

    for r in &mut rows {
        let l = match (r.op.as_str(), r.temperature.as_str()) {
            ("save", _) => &lims.odirect_write,
            (_, "cold") => &lims.odirect_read,
            _ => &lims.buffered_read,
        };
        r.limit = l.name.clone();
        r.limit_gib_per_s = l.gib_per_s();
        r.percent_of_limit = match (&r.result, l.gib_per_s()) {
            (Some(m), Some(lim)) if lim > 0.0 => Some(100.0 * m.median / lim),
            _ => None,
        };
    }
    mark_best(&mut rows);
    let best_restore = ["cold", "warm"].iter().find_map(|t| {
        rows.iter()
            .find(|r| r.best && r.op == "restore" && r.temperature == *t)
            .map(|r| r.setting.clone())
    });
    Ok(BenchReport {
        op: "bench".into(),
        size: opts.size,
        roots: opts.roots.iter().map(|r| r.display().to_string()).collect(),
        runs: opts.runs,
        cold_available: cold.is_ok(),
        cold_note: cold.err(),
        limits: lims,
        rows,
        best_restore,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn row(
    op: &str,
    temperature: &str,
    s: &Setting,
    result: Option<Measurement>,
    unavailable: Option<String>,
    mode: String,
    fallbacks: Vec<String>,
) -> Row {
    Row {
        op: op.into(),
        temperature: temperature.into(),
        setting: s.clone(),
        label: s.label(),
        result,
        unavailable,
        mode,
        fallbacks,
        limit: String::new(),
        limit_gib_per_s: None,
        percent_of_limit: None,
        best: false,
    }
}

/// Marks the fastest available row of each (op, temperature) group.
fn mark_best(rows: &mut [Row]) {
    let groups: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.op.clone(), r.temperature.clone()))
        .collect();
    for (op, t) in groups {
        let best = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.op == op && r.temperature == t)
            .filter_map(|(i, r)| r.result.as_ref().map(|m| (i, m.median)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i);
        if let Some(i) = best {
            rows[i].best = true;
        }
    }
}
