//! Garbage collection of interrupted and superseded saves.
//!
//! `gc` deletes only what it can prove belongs to the snapshot: directories
//! that carry the snapshot's naming pattern *and* an owner marker naming the
//! snapshot and a lineage it has used, and inside them only file names a
//! save creates. Paths claimed by a manifest are never trusted for deletion.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::manifest::{MANIFEST_NAME, Manifest};
use super::ownership::{LOCAL_SHARDS, Owner, SnapshotPaths, is_owned_file_name};
use crate::storage::durable::LockFile;
use crate::{Error, Result};

/// What gc removed and what it left, with reasons.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Directories removed.
    pub removed: Vec<PathBuf>,
    /// Directories that looked like leftovers but were kept, with the reason.
    pub kept: Vec<String>,
}

/// Removes leftovers of crashed or superseded saves of the snapshot at
/// `target`. `roots` adds places to search besides those recorded in the
/// committed manifest and in staging markers.
pub fn gc(target: &Path, roots: &[PathBuf]) -> Result<GcReport> {
    let paths = SnapshotPaths::new(target)?;
    if !paths.parent.is_dir() {
        return Err(crate::Error::InvalidInput(format!(
            "{} does not exist: nothing to collect",
            paths.parent.display()
        )));
    }
    // Checked before the lock file is created too, so that a refusal
    // changes nothing on disk; the check under the lock is what counts.
    committed_manifest(&paths, "gc")?;
    let _lock = LockFile::acquire(&paths.lock(), &paths.target)?;
    let committed = committed_manifest(&paths, "gc")?;
    let mut report = GcReport::default();
    collect(&paths, committed.as_ref(), roots, &mut report)?;
    Ok(report)
}

/// The committed manifest of the snapshot at `paths.target`: `None` when
/// there is none (no directory, or no `manifest.json` in it). A manifest
/// that is there but does not load (newer format, damaged, I/O error) is
/// [`Error::UnreadableManifest`]: without its save id nobody can tell the
/// committed shards from leftovers, so `action` must not delete anything.
pub(crate) fn committed_manifest(paths: &SnapshotPaths, action: &str) -> Result<Option<Manifest>> {
    if !fs::symlink_metadata(&paths.target).is_ok_and(|m| m.is_dir()) {
        return Ok(None);
    }
    match Manifest::load(&paths.target) {
        Ok(m) => Ok(Some(m)),
        Err(Error::NoSnapshot { .. }) => Ok(None),
        Err(e) => Err(Error::UnreadableManifest {
            action: format!("{action} of {}", paths.target.display()),
            path: paths.target.join(MANIFEST_NAME),
            cause: Box::new(e),
        }),
    }
}

/// The collection itself; the caller holds the snapshot's lock.
pub(crate) fn collect(
    paths: &SnapshotPaths,
    committed: Option<&Manifest>,
    extra_roots: &[PathBuf],
    report: &mut GcReport,
) -> Result<()> {
    let mut lineages = BTreeSet::new();
    let mut roots: BTreeSet<PathBuf> = extra_roots.iter().cloned().collect();
    // Saves that are never collected: the committed one, and the one the
    // snapshot directory's own marker names (the same save, unless the
    // manifest is gone).
    let mut kept_saves = BTreeSet::new();
    if let Some(m) = committed {
        kept_saves.insert(m.identity.save_id.clone());
        lineages.insert(m.identity.lineage.clone());
        roots.extend(recorded_roots(paths, m));
    }
    if let Some(o) = Owner::read(&paths.target) {
        kept_saves.insert(o.save_id);
        lineages.insert(o.lineage);
    }
    let stage_prefix = paths.stage_prefix();
    let mut stages = Vec::new();
    for dir in dirs_with_prefix(&paths.parent, &stage_prefix) {
        match Owner::read(&dir) {
            Some(o) if o.name == paths.name => {
                lineages.insert(o.lineage.clone());
                roots.extend(o.roots.iter().cloned());
                stages.push(dir);
            }
            _ => stages.push(dir),
        }
    }
    // Shard directories on roots first, stages last: a stage marker is what
    // lets an interrupted gc find the shard directories again.
    let prefix = paths.shard_dir_prefix();
    for root in &roots {
        for dir in dirs_with_prefix(root, &prefix) {
            let Some(o) = Owner::read(&dir) else {
                remove_if_empty(&dir, report, "no owner marker");
                continue;
            };
            let name_ok = dir.file_name().and_then(|n| n.to_str())
                == Some(paths.shard_dir_name(&o.save_id).as_str());
            if o.name != paths.name || !lineages.contains(&o.lineage) || !name_ok {
                report.kept.push(format!(
                    "{}: owner marker names another snapshot or lineage",
                    dir.display()
                ));
                continue;
            }
            if kept_saves.contains(&o.save_id) {
                continue;
            }
            remove_owned_tree(&dir, report);
        }
    }
    for dir in stages {
        match Owner::read(&dir) {
            Some(o) if o.name == paths.name => remove_owned_tree(&dir, report),
            Some(_) => report.kept.push(format!(
                "{}: owner marker names another snapshot",
                dir.display()
            )),
            None => remove_if_empty(&dir, report, "no owner marker"),
        }
    }
    Ok(())
}

/// The striped roots `m` recorded (not `.`), resolved against the snapshot
/// path.
pub(crate) fn recorded_roots(paths: &SnapshotPaths, m: &Manifest) -> Vec<PathBuf> {
    m.roots
        .iter()
        .filter(|r| r.recorded_path != ".")
        .map(|r| paths.target.join(&r.recorded_path))
        .collect()
}

fn dirs_with_prefix(parent: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .map(|e| e.path())
        .collect()
}

/// Removes a pattern-named directory that proves nothing but holds nothing
/// either: empty, or holding only an empty owner marker (a save killed
/// between creating the marker and writing it).
fn remove_if_empty(dir: &Path, report: &mut GcReport, why: &str) {
    let marker = dir.join(super::ownership::OWNER_NAME);
    let only_empty_marker = fs::read_dir(dir).is_ok_and(|entries| {
        let names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
        names.len() == 1 && names[0] == super::ownership::OWNER_NAME
    }) && fs::symlink_metadata(&marker)
        .is_ok_and(|m| m.is_file() && m.len() == 0);
    if only_empty_marker {
        let _ = fs::remove_file(&marker);
    }
    if fs::remove_dir(dir).is_ok() {
        report.removed.push(dir.to_path_buf());
    } else {
        report
            .kept
            .push(format!("{}: {why}, not empty", dir.display()));
    }
}

/// Removes the files a save creates in `dir` (and its `shards/`), then the
/// directory if nothing else is left. Unknown entries are kept and reported.
pub(crate) fn remove_owned_tree(dir: &Path, report: &mut GcReport) {
    let mut unknown = Vec::new();
    remove_owned_files(dir, &mut unknown, true);
    if unknown.is_empty() && fs::remove_dir(dir).is_ok() {
        report.removed.push(dir.to_path_buf());
    } else {
        report.kept.push(format!(
            "{}: holds files memferry did not create ({}); remove them by hand",
            dir.display(),
            unknown.join(", ")
        ));
    }
}

fn remove_owned_files(dir: &Path, unknown: &mut Vec<String>, top: bool) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut owner = None;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && top && name == LOCAL_SHARDS {
            remove_owned_files(&e.path(), unknown, false);
            if fs::remove_dir(e.path()).is_err() {
                unknown.push(name);
            }
        } else if !is_dir && is_owned_file_name(&name) {
            if name == super::ownership::OWNER_NAME {
                owner = Some(e.path()); // removed last: it is the proof
            } else if fs::remove_file(e.path()).is_err() {
                unknown.push(name);
            }
        } else {
            unknown.push(name);
        }
    }
    if let Some(o) = owner
        && unknown.is_empty()
    {
        let _ = fs::remove_file(o);
    }
}
