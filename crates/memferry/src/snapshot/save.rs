//! Saving a snapshot, with a crash-safe commit.
//!
//! Protocol: (1) validate everything, touch nothing; (2) take the snapshot's
//! lock and remove provable leftovers of earlier crashes; (3) stage the new
//! snapshot under a temporary name (shards on each root in their own
//! directory, manifest in the staging directory), each directory carrying an
//! owner marker; (4) fsync every file and directory; (5) publish by atomic
//! rename, or by RENAME_EXCHANGE when a snapshot is already there, so readers
//! see the old snapshot until the instant the new one is complete; (6) only
//! then delete the previous snapshot. A failure before (5) removes the
//! staging and leaves the previous snapshot untouched.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use super::gc::{GcReport, collect, committed_manifest, recorded_roots, remove_owned_tree};
use super::manifest::{
    AllocationEntry, ChecksumSpec, Extent, FORMAT_VERSION, KIND, MANIFEST_NAME, MAX_CHECKSUM_CHUNK,
    Manifest, RootEntry, SaveIdentity, ShardEntry,
};
use super::ownership::{LOCAL_SHARDS, OWNER_NAME, Owner, SnapshotPaths, shard_file_name};
use super::placement::{Placement, place};
use super::report::{Phases, Report};
use super::source::SnapshotSource;
use crate::error::IoContext;
use crate::integrity::DEFAULT_CHUNK;
use crate::memory::Region;
use crate::storage::durable::{
    LockFile, fsync_dir, parent_of, preallocate, publish_dir, unique_id, write_atomic,
    write_new_file,
};
use crate::storage::roots::{absolute, check_writable_root};
use crate::transfer::{
    Backend, BackendKind, Checksums, Direction, FileTarget, IO_ALIGN, PlanBuilder, TransferJob,
    TransferPlan, TransferStats, Tuning, backend,
};
use crate::{Error, Result};

/// Default shard size: 1 GiB.
pub const DEFAULT_SHARD_SIZE: u64 = 1 << 30;
/// Largest `--shard-size` (1 PiB), far below where sizes would overflow.
pub const MAX_SHARD_SIZE: u64 = 1 << 50;

/// How to save.
#[derive(Clone)]
pub struct SaveOptions {
    /// Stripe shards over these directories; `None` keeps them inside the
    /// snapshot directory.
    pub roots: Option<Vec<PathBuf>>,
    /// Largest shard file.
    pub shard_size: u64,
    /// Checksum granularity.
    pub checksum_chunk: u64,
    /// Backend to run.
    pub backend: BackendKind,
    /// Backend settings.
    pub tuning: Tuning,
    /// Written atomically after a successful save.
    pub complete_file: Option<PathBuf>,
    /// Bytes moved so far.
    pub progress: Option<Arc<AtomicU64>>,
    /// Set to cancel.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            roots: None,
            shard_size: DEFAULT_SHARD_SIZE,
            checksum_chunk: DEFAULT_CHUNK,
            backend: BackendKind::Auto,
            tuning: Tuning::default(),
            complete_file: None,
            progress: None,
            cancel: None,
        }
    }
}

/// Saves `source` as a snapshot at `to`, atomically replacing any snapshot
/// already there. On error nothing is committed and the previous snapshot
/// is intact.
pub fn save(source: &SnapshotSource, to: &Path, opts: &SaveOptions) -> Result<Report> {
    let t = Instant::now();
    let mut phases = Phases::default();
    let paths = SnapshotPaths::new(to)?;
    let roots = validate(source, &paths, opts)?;

    let _lock = LockFile::acquire(&paths.lock(), &paths.target)?;
    // Checked again under the lock: this is what the commit replaces.
    let previous = previous_snapshot(&paths)?;
    // Leftovers are searched on the new roots and on those the previous
    // snapshot used, which the commit below makes leftovers too.
    let mut cleanup_roots = roots.clone().unwrap_or_default();
    if let Some(p) = &previous {
        cleanup_roots.extend(recorded_roots(&paths, p));
    }
    let mut leftovers = GcReport::default();
    collect(&paths, previous.as_ref(), &cleanup_roots, &mut leftovers)?;
    for r in &leftovers.removed {
        tracing::info!("removed leftover of an earlier save: {}", r.display());
    }
    let lineage = previous
        .as_ref()
        .map(|m| m.identity.lineage.clone())
        .or_else(|| Owner::read(&paths.target).map(|o| o.lineage))
        .unwrap_or_else(unique_id);
    let identity = SaveIdentity {
        name: paths.name.clone(),
        lineage,
        save_id: unique_id(),
    };
    let sizes: Vec<u64> = source.layout.allocations.iter().map(|a| a.size).collect();
    let root_count = roots.as_ref().map_or(1, Vec::len);
    let placement = place(&sizes, opts.shard_size, root_count, IO_ALIGN);
    phases.plan = t.elapsed().as_secs_f64();

    // Stage: everything below is removed again unless the commit happens.
    let t = Instant::now();
    let stage = paths.stage(&identity.save_id);
    let mut staged = Staged {
        dirs: Vec::new(),
        armed: true,
    };
    let owner = Owner {
        kind: "memferry-owner".into(),
        name: paths.name.clone(),
        lineage: identity.lineage.clone(),
        save_id: identity.save_id.clone(),
        roots: roots.clone().unwrap_or_default(),
    };
    let owner_json = serde_json::to_vec_pretty(&owner).expect("owner serialises");
    let mkdir = |dir: &Path, staged: &mut Staged| -> Result<()> {
        fs::create_dir(dir).map_err(|e| Error::writing("creating directory", dir, e))?;
        staged.dirs.push(dir.to_path_buf());
        write_new_file(&dir.join(OWNER_NAME), &owner_json)
    };
    mkdir(&stage, &mut staged)?;
    let shard_dirs: Vec<PathBuf> = match &roots {
        None => {
            let d = stage.join(LOCAL_SHARDS);
            fs::create_dir(&d).map_err(|e| Error::writing("creating directory", &d, e))?;
            vec![d]
        }
        Some(list) => {
            let mut dirs = Vec::new();
            for r in list {
                let d = r.join(paths.shard_dir_name(&identity.save_id));
                mkdir(&d, &mut staged)?;
                dirs.push(d);
            }
            dirs
        }
    };
    let mut builder = PlanBuilder::new(
        Direction::Store,
        opts.checksum_chunk,
        opts.tuning.chunk_size,
    );
    let mut shards = Vec::new();
    let mut files = Vec::new();
    for (i, &size) in placement.shard_sizes.iter().enumerate() {
        let root = i % root_count;
        let path = shard_dirs[root].join(shard_file_name(i));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::writing("creating", &path, e))?;
        preallocate(&file, &path, size)?;
        builder.add_file(FileTarget {
            path: path.clone(),
            root,
            size,
        });
        let rel = match &roots {
            None => format!("{LOCAL_SHARDS}/{}", shard_file_name(i)),
            Some(_) => format!(
                "{}/{}",
                paths.shard_dir_name(&identity.save_id),
                shard_file_name(i)
            ),
        };
        shards.push(ShardEntry {
            index: i,
            root,
            path: rel,
            size,
        });
        files.push((file, path));
    }
    let extent_sums = add_extents(&mut builder, &placement);
    let plan = builder.build();
    phases.allocate = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let backend = backend(opts.backend, opts.tuning.clone());
    let (sums, stats) = write_recording(&plan, source, opts, backend.as_ref())?;
    phases.transfer = t.elapsed().as_secs_f64();

    let t = Instant::now();
    for (file, path) in &files {
        file.sync_all()
            .map_err(|e| Error::writing("syncing", path, e))?;
    }
    drop(files);
    for d in &shard_dirs {
        fsync_dir(d)?;
    }
    if let Some(list) = &roots {
        for r in list {
            fsync_dir(r)?;
        }
    }
    let root_entries = match &roots {
        None => vec![RootEntry::here()],
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(index, r)| RootEntry {
                index,
                recorded_path: r.to_string_lossy().into_owned(),
            })
            .collect(),
    };
    let recorded = Recorded {
        extent_sums: &extent_sums,
        sums: &sums,
        chunk: opts.checksum_chunk,
    };
    let manifest = new_manifest(
        source,
        &identity,
        &placement,
        recorded,
        root_entries,
        shards,
    )?;
    write_new_file(&stage.join(MANIFEST_NAME), &manifest.to_json())?;
    fsync_dir(&stage)?;
    fault_point("before-publish");

    let swapped = publish_dir(&stage, &paths.target)?;
    // Committed: the new snapshot owns its directories, and after an
    // exchange `stage` holds the previous snapshot, so nothing below may
    // remove what was staged, whatever fails.
    staged.armed = false;
    fsync_dir(&paths.parent).map_err(|e| Error::NotDurable {
        path: paths.target.clone(),
        cause: Box::new(e),
    })?;
    fault_point("after-publish");
    if swapped {
        let mut report = GcReport::default();
        remove_previous(&stage, previous.as_ref(), &mut report);
        collect(&paths, Some(&manifest), &cleanup_roots, &mut report)?;
        for k in &report.kept {
            tracing::warn!("kept after commit: {k}");
        }
    }
    if let Some(c) = &opts.complete_file {
        write_complete_file(c, "save", &paths.target)?;
    }
    phases.commit = t.elapsed().as_secs_f64();

    let mut report = Report {
        op: "save".into(),
        backend: opts.backend.name().into(),
        mode: String::new(),
        bytes: 0,
        seconds: 0.0,
        gib_per_s: 0.0,
        transfer_gib_per_s: 0.0,
        verified: true,
        fallbacks: Vec::new(),
        phases,
        peak_staging_bytes: 0,
        checksum_cpu_seconds: 0.0,
        snapshot: paths.target.display().to_string(),
        allocations: manifest.allocations.len(),
        shards: manifest.shards.len(),
        roots: manifest.roots.len(),
        workers: opts.tuning.workers,
        queue_depth: opts.tuning.queue_depth,
        chunk_size: opts.tuning.chunk_size,
        profile: None,
    };
    report.finish(&stats);
    Ok(report)
}

/// Every check that can fail before anything is written.
fn validate(
    source: &SnapshotSource,
    paths: &SnapshotPaths,
    opts: &SaveOptions,
) -> Result<Option<Vec<PathBuf>>> {
    source.validate()?;
    opts.tuning.validate()?;
    if opts.shard_size < IO_ALIGN {
        return Err(Error::InvalidInput(format!(
            "--shard-size {} is too small: use at least 4KiB (default 1GiB)",
            opts.shard_size
        )));
    }
    if opts.shard_size > MAX_SHARD_SIZE {
        return Err(Error::InvalidInput(format!(
            "--shard-size {} is too large: use at most 1PiB (default 1GiB)",
            opts.shard_size
        )));
    }
    if opts.checksum_chunk == 0
        || !opts.checksum_chunk.is_multiple_of(IO_ALIGN)
        || opts.checksum_chunk > MAX_CHECKSUM_CHUNK
    {
        return Err(Error::InvalidInput(
            "the checksum chunk must be a multiple of 4096 of at most 1GiB".into(),
        ));
    }
    check_writable_root(&paths.parent).map_err(|_| {
        Error::InvalidInput(format!(
            "cannot save to {}: its parent directory {} does not exist or is not writable; create it first",
            paths.target.display(),
            paths.parent.display()
        ))
    })?;
    if let Some(c) = &opts.complete_file {
        check_complete_file(c)?;
    }
    previous_snapshot(paths)?;
    let Some(list) = &opts.roots else {
        return Ok(None);
    };
    if list.is_empty() {
        return Err(Error::InvalidInput("--roots lists no directory".into()));
    }
    let mut out = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    for r in list {
        check_writable_root(r)?;
        // Compared by their real places: `paths.target` is the snapshot
        // directory's real place (its parent resolved, and it is no symlink).
        let real = r
            .canonicalize()
            .map_err(|e| Error::io(format!("resolving root {}", r.display()), e))?;
        if real.starts_with(&paths.target) {
            return Err(Error::InvalidInput(format!(
                "root {} lies inside the snapshot path {}: roots must be outside it",
                r.display(),
                paths.target.display()
            )));
        }
        if seen.contains(&real) {
            return Err(Error::InvalidInput(format!(
                "root {} is listed twice in --roots",
                r.display()
            )));
        }
        seen.push(real);
        out.push(absolute(r)?);
    }
    Ok(Some(out))
}

/// What the snapshot path holds before a save: `None` when nothing (or an
/// empty directory) is there, the manifest when a snapshot saved under this
/// name is. Anything else (a file, a non-empty directory without a
/// manifest, such as a user's directory or a root's shard directory, a
/// manifest that does not load or names another snapshot) is refused, since
/// the commit would swap it out and delete the files a save creates.
fn previous_snapshot(paths: &SnapshotPaths) -> Result<Option<Manifest>> {
    let target = &paths.target;
    let meta = match fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("inspecting {}", target.display()), e)),
    };
    if !meta.is_dir() {
        return Err(Error::InvalidInput(format!(
            "{} exists and is not a directory: choose another --to",
            target.display()
        )));
    }
    if let Some(m) = committed_manifest(paths, "save")? {
        if m.identity.name != paths.name {
            return Err(Error::InvalidInput(format!(
                "{} holds a memferry snapshot saved as {:?} (moved or copied here): refusing to replace it, because its files carry the other name and could not be proven its own; save to another path, or remove it first",
                target.display(),
                m.identity.name
            )));
        }
        return Ok(Some(m));
    }
    let empty = fs::read_dir(target)
        .ctx(|| format!("listing {}", target.display()))?
        .next()
        .is_none();
    if !empty {
        return Err(Error::InvalidInput(format!(
            "{} exists and holds something that is not a memferry snapshot (no manifest.json): refusing to replace it; choose another --to",
            target.display()
        )));
    }
    Ok(None)
}

/// After an exchange, `stage` holds what the snapshot path held before:
/// removed only when it is provably the previous snapshot (its owner marker
/// names the same name, lineage and save as its manifest), or an empty
/// directory. Anything else is kept and reported.
fn remove_previous(stage: &Path, previous: Option<&Manifest>, report: &mut GcReport) {
    match previous {
        None => {
            if fs::remove_dir(stage).is_ok() {
                report.removed.push(stage.to_path_buf());
            } else {
                report.kept.push(format!(
                    "{}: what the snapshot path held before this save is not empty; remove it by hand",
                    stage.display()
                ));
            }
        }
        Some(m) => match Owner::read(stage) {
            Some(o)
                if o.name == m.identity.name
                    && o.lineage == m.identity.lineage
                    && o.save_id == m.identity.save_id =>
            {
                remove_owned_tree(stage, report);
            }
            _ => report.kept.push(format!(
                "{}: the previous snapshot carries no owner marker matching its manifest; remove it by hand",
                stage.display()
            )),
        },
    }
}

/// Checks before a save that `--complete-file` can be written: its
/// directory exists and is writable, and it is no directory itself.
fn check_complete_file(path: &Path) -> Result<()> {
    let dir = parent_of(path);
    let bad = |why: &str| {
        Error::InvalidInput(format!(
            "--complete-file {}: {why}; create the directory or choose another path",
            path.display()
        ))
    };
    if path.file_name().is_none() {
        return Err(bad("names no file"));
    }
    check_writable_root(&dir).map_err(|_| {
        bad(&format!(
            "its directory {} does not exist or is not writable",
            dir.display()
        ))
    })?;
    if fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(bad("it is a directory"));
    }
    Ok(())
}

/// Writes the completion sentinel atomically.
pub fn write_complete_file(path: &Path, op: &str, snapshot: &Path) -> Result<()> {
    let body = serde_json::json!({
        "op": op,
        "snapshot": snapshot.display().to_string(),
        "completed_unix_ms": crate::units::now_ms(),
    });
    write_atomic(path, body.to_string().as_bytes())
}

/// Directories a save created and removes again unless it commits.
struct Staged {
    dirs: Vec<PathBuf>,
    armed: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut report = GcReport::default();
        for d in self.dirs.iter().rev() {
            remove_owned_tree(d, &mut report);
        }
        for k in report.kept {
            tracing::warn!("could not clean up after a failed save: {k}");
        }
    }
}

/// Test hook for crash tests: with `MEMFERRY_TEST_PAUSE_AT=<point>` the save
/// sleeps at that point so a test can kill it exactly there.
fn fault_point(name: &str) {
    if let Ok(p) = std::env::var("MEMFERRY_TEST_PAUSE_AT")
        && p == name
    {
        std::thread::sleep(std::time::Duration::from_secs(30));
    }
}

/// Adds every extent of `placement` to `builder`, allocations in order;
/// returns the index of each extent's first checksum.
pub(super) fn add_extents(builder: &mut PlanBuilder, placement: &Placement) -> Vec<usize> {
    let mut extent_sums = Vec::new();
    for (region, list) in placement.extents.iter().enumerate() {
        for e in list {
            extent_sums.push(builder.add_extent(
                e.shard,
                e.offset,
                e.length,
                region,
                e.alloc_offset,
            ));
        }
    }
    extent_sums
}

/// Runs a save's transfer: `backend` writes `source` as `plan` places it,
/// recording one CRC32C per checksum chunk (returned, in plan order), with
/// the progress counter and cancel flag of `opts`.
pub(super) fn write_recording(
    plan: &TransferPlan,
    source: &SnapshotSource,
    opts: &SaveOptions,
    backend: &dyn Backend,
) -> Result<(Vec<AtomicU32>, TransferStats)> {
    let sums: Vec<AtomicU32> = (0..plan.checksum_count)
        .map(|_| AtomicU32::new(0))
        .collect();
    let regions: Vec<&dyn Region> = source.regions.iter().map(|r| r.as_ref()).collect();
    let mut job = TransferJob::new(plan, &regions, Checksums::Record(&sums));
    job.progress = opts.progress.as_deref();
    job.cancel = opts.cancel.as_deref();
    let stats = backend.run(&job)?;
    Ok((sums, stats))
}

/// The checksums a save's transfer recorded.
pub(super) struct Recorded<'a> {
    /// Index of each extent's first checksum ([`add_extents`]).
    pub extent_sums: &'a [usize],
    /// One per `chunk` bytes of every extent.
    pub sums: &'a [AtomicU32],
    pub chunk: u64,
}

/// The manifest of a save (local or S3) of `source` placed by `placement`,
/// checked before it is returned.
pub(super) fn new_manifest(
    source: &SnapshotSource,
    identity: &SaveIdentity,
    placement: &Placement,
    recorded: Recorded<'_>,
    roots: Vec<RootEntry>,
    shards: Vec<ShardEntry>,
) -> Result<Manifest> {
    let mut next = 0;
    let allocations = source
        .layout
        .allocations
        .iter()
        .zip(&placement.extents)
        .map(|(a, list)| AllocationEntry {
            allocation: a.clone(),
            extents: list
                .iter()
                .map(|e| {
                    let first = recorded.extent_sums[next];
                    next += 1;
                    let n = crate::integrity::chunk_count(e.length, recorded.chunk);
                    Extent {
                        shard: e.shard,
                        offset: e.offset,
                        length: e.length,
                        alloc_offset: e.alloc_offset,
                        crc32c: recorded.sums[first..first + n]
                            .iter()
                            .map(|s| s.load(Ordering::Relaxed))
                            .collect(),
                    }
                })
                .collect(),
        })
        .collect();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        kind: KIND.into(),
        identity: identity.clone(),
        created_unix_ms: crate::units::now_ms(),
        source: source.description.clone(),
        alignment: IO_ALIGN,
        checksum: ChecksumSpec {
            algorithm: "crc32c".into(),
            chunk_bytes: recorded.chunk,
        },
        total_bytes: source.layout.total_bytes(),
        roots,
        shards,
        allocations,
        metadata: source.layout.metadata.clone(),
    };
    manifest.validate().map_err(|e| {
        Error::InvalidInput(format!("internal error: built an invalid manifest: {e}"))
    })?;
    Ok(manifest)
}
