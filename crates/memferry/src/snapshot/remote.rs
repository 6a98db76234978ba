//! Snapshots in an S3-compatible bucket: save, restore, verify, open
//! (inspect) and gc, with the same manifest (format v1) as on local disks.
//!
//! A snapshot at `s3://BUCKET/PREFIX` is:
//! - `PREFIX/manifest.json`: the commit point, exactly the local manifest
//!   with one root (`.` = the prefix) and shard paths relative to it;
//! - `PREFIX/shards/<save_id>/shard-NNNNN.bin`: shard objects, byte for byte
//!   the local shard files (4096-aligned extents, zero padding). Names are
//!   unique per save, so two saves never write the same shard object;
//! - `PREFIX/saves/<save_id>.json`: the marker of a save in progress (its
//!   multipart upload ids and a heartbeat), removed when the save commits
//!   or fails; what a killed save leaves is found by `gc` through it.
//!
//! Commit protocol: (1) validate everything, write nothing; (2) write the
//! marker, then create the multipart uploads and record them in it; (3)
//! upload every part, checksumming the bytes as they are assembled, while a
//! heartbeat rewrites the marker every [`HEARTBEAT`]; (4) complete the
//! uploads; (5) check that the marker is still the version this save wrote
//! (gc takes over the marker of a save it judges abandoned) and PUT the
//! manifest last, create-only (`If-None-Match: *`) for a new snapshot or
//! `If-Match: <etag of the manifest read in (1)>` for a re-save, so a
//! concurrent save that committed meanwhile makes this one fail with
//! [`Error::Conflict`] instead of replacing it unseen; a failed PUT is
//! resolved by reading the manifest back (the request may have been
//! applied); (6) only then delete the marker and the previous save's
//! shards. Any failure before (5) aborts the uploads and deletes this
//! save's objects: no manifest appears, and the previous snapshot is
//! untouched. A reader therefore sees a manifest only once all its shards
//! exist, and never a manifest naming another save's shards.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::gc::GcReport;
use super::manifest::{MANIFEST_NAME, Manifest, RootEntry, SaveIdentity, ShardEntry};
use super::ownership::shard_file_name;
use super::placement::place;
use super::report::{Phases, Report};
use super::restore::{LoadOptions, RestoredSnapshot, allocate_destinations};
use super::save::{Recorded, SaveOptions, add_extents, new_manifest, write_recording};
use super::source::SnapshotSource;
use crate::memory::{DiscardRegion, OwnedRegion, Region};
use crate::storage::durable::unique_id;
use crate::storage::location::S3Url;
use crate::storage::s3::{ObjectClient, ObjectInfo, PutCondition};
use crate::transfer::{
    Backend, Checksums, Direction, FileTarget, IO_ALIGN, ObjectBackend, PlanBuilder, TransferJob,
    TransferPlan, TransferStats,
};
use crate::units::now_ms;
use crate::{Error, Result};

/// Folder of shard objects under the snapshot prefix.
pub const SHARDS_DIR: &str = "shards";
/// Folder of in-progress save markers under the snapshot prefix.
pub const SAVES_DIR: &str = "saves";
/// Smallest S3 request: ranged GETs and parts are at least this large.
pub const MIN_REQUEST: u64 = 8 << 20;

/// The marker of a save in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaveMarker {
    /// Always `memferry-s3-save`.
    pub kind: String,
    /// The save.
    pub save_id: String,
    /// Its lineage.
    pub lineage: String,
    /// When it started, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// When the save last refreshed the marker (its heartbeat; the
    /// object's modification time is what gc goes by).
    #[serde(default)]
    pub heartbeat_unix_ms: u64,
    /// Set when `memferry gc` took the marker over to remove the save (the
    /// save then fails before it commits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collected_unix_ms: Option<u64>,
    /// `(key, upload id)` of every multipart upload it started.
    pub uploads: Vec<(String, String)>,
}

/// A committed snapshot in a bucket.
#[derive(Debug, Clone)]
pub struct RemoteSnapshot {
    /// Where it is.
    pub url: S3Url,
    /// Its validated manifest.
    pub manifest: Manifest,
    /// The manifest object (its ETag makes re-saves conditional).
    pub manifest_object: ObjectInfo,
}

impl RemoteSnapshot {
    /// Key of shard `i`.
    pub fn shard_key(&self, i: usize) -> String {
        self.url.key(&self.manifest.shards[i].path)
    }
}

/// Reads and validates the manifest; `Ok(None)` when there is none.
pub fn read_manifest(client: &ObjectClient, url: &S3Url) -> Result<Option<RemoteSnapshot>> {
    let key = url.key(MANIFEST_NAME);
    let Some((bytes, info)) = client.get(&key)? else {
        return Ok(None);
    };
    let manifest = Manifest::parse(&bytes, &PathBuf::from(url.url_of(MANIFEST_NAME)))?;
    if manifest.roots.len() != 1 || manifest.roots[0].recorded_path != "." {
        return Err(Error::InvalidManifest {
            path: PathBuf::from(url.url_of(MANIFEST_NAME)),
            reason: "a snapshot in a bucket has exactly one root, \".\" (its prefix)".into(),
        });
    }
    Ok(Some(RemoteSnapshot {
        url: url.clone(),
        manifest,
        manifest_object: info,
    }))
}

/// Opens the committed snapshot at `url` ([`Error::NoSnapshot`] when none).
pub fn open(client: &ObjectClient, url: &S3Url) -> Result<RemoteSnapshot> {
    read_manifest(client, url)?.ok_or_else(|| Error::NoSnapshot {
        path: PathBuf::from(url.to_string()),
        reason: format!(
            "there is no {MANIFEST_NAME} under the prefix (nothing was committed there; an interrupted save leaves nothing visible, `memferry gc` removes its leftovers)"
        ),
    })
}

fn request_size(chunk: u64) -> u64 {
    chunk.max(MIN_REQUEST)
}

/// Saves `source` as a snapshot at `url`, replacing a snapshot already
/// there only if it is still the one read at the start (see the module
/// docs). On error nothing is committed.
pub fn save(
    source: &SnapshotSource,
    client: &ObjectClient,
    url: &S3Url,
    opts: &SaveOptions,
) -> Result<Report> {
    let t = Instant::now();
    let mut phases = Phases::default();
    validate_save(source, opts)?;
    let conditional = client.config().conditional_put;
    if !conditional {
        tracing::warn!(
            "conditional PUTs are off (MEMFERRY_S3_CONDITIONAL_PUT=false): a save that runs concurrently with this one can replace its snapshot unseen (lost-update detection is off); the last manifest wins and is still complete"
        );
    }
    let previous = read_manifest(client, url)?;
    if previous.is_none() {
        refuse_foreign(client, url)?;
    }
    let identity = SaveIdentity {
        name: url.prefix.rsplit('/').next().unwrap_or(&url.prefix).into(),
        lineage: previous
            .as_ref()
            .map_or_else(unique_id, |p| p.manifest.identity.lineage.clone()),
        save_id: unique_id(),
    };
    let sizes: Vec<u64> = source.layout.allocations.iter().map(|a| a.size).collect();
    let placement = place(&sizes, opts.shard_size, 1, IO_ALIGN);
    let request = request_size(opts.tuning.chunk_size);
    let mut builder = PlanBuilder::new(Direction::Store, opts.checksum_chunk, request);
    let mut shards = Vec::new();
    let mut keys = Vec::new();
    for (i, &size) in placement.shard_sizes.iter().enumerate() {
        let rel = format!("{SHARDS_DIR}/{}/{}", identity.save_id, shard_file_name(i));
        builder.add_file(FileTarget {
            path: PathBuf::from(url.url_of(&rel)),
            root: 0,
            size,
        });
        keys.push(url.key(&rel));
        shards.push(ShardEntry {
            index: i,
            root: 0,
            path: rel,
            size,
        });
    }
    let extent_sums = add_extents(&mut builder, &placement);
    let plan = builder.build();
    phases.plan = t.elapsed().as_secs_f64();

    // The marker goes first, before any upload exists, so whatever this save
    // leaves behind carries its save id where gc looks. From here on,
    // `pending` cleans up unless the commit happens.
    let t = Instant::now();
    let mut marker = MarkerWriter::new(
        client,
        url.key(&format!("{SAVES_DIR}/{}.json", identity.save_id)),
        SaveMarker {
            kind: "memferry-s3-save".into(),
            save_id: identity.save_id.clone(),
            lineage: identity.lineage.clone(),
            created_unix_ms: now_ms(),
            heartbeat_unix_ms: now_ms(),
            collected_unix_ms: None,
            uploads: Vec::new(),
        },
    );
    marker.create()?;
    let mut pending = Pending {
        client,
        keys: keys.clone(),
        uploads: Vec::new(),
        marker: Some(marker.key.clone()),
        armed: true,
    };
    let created: Vec<Result<String>> = client.run(
        futures::stream::iter(keys.iter().map(|k| client.create_multipart_async(k)))
            .buffered(client.config().concurrency)
            .collect(),
    );
    for (k, r) in keys.iter().zip(created.iter()) {
        if let Ok(id) = r {
            pending.uploads.push((k.clone(), id.clone()));
        }
    }
    let uploads: Vec<String> = created.into_iter().collect::<Result<_>>()?;
    crate::storage::s3::fault::pause("s3-after-create");
    marker.marker.uploads = pending.uploads.clone();
    marker.refresh()?;
    phases.allocate = t.elapsed().as_secs_f64();

    // Upload, while a heartbeat keeps the marker fresh: gc judges a save
    // abandoned only once its marker has gone unrefreshed for --grace.
    let t = Instant::now();
    let backend = ObjectBackend::for_store(client, keys, uploads, request);
    let (sums, stats) = std::thread::scope(|sc| {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let marker = &mut marker;
        let beat = sc.spawn(move || marker.heartbeat(&stopped, heartbeat_interval()));
        let written = write_recording(&plan, source, opts, &backend);
        if written.is_ok() {
            crate::storage::s3::fault::pause("s3-before-commit");
        }
        drop(stop);
        beat.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        written
    })?;
    phases.transfer = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let recorded = Recorded {
        extent_sums: &extent_sums,
        sums: &sums,
        chunk: opts.checksum_chunk,
    };
    let roots = vec![RootEntry::here()];
    let manifest = new_manifest(source, &identity, &placement, recorded, roots, shards)?;
    // gc may have judged this save abandoned (a save stalled for longer than
    // its --grace) and removed the marker and shards: then commit nothing.
    marker.check(url)?;
    let condition = if !conditional {
        PutCondition::Overwrite
    } else {
        match &previous {
            None => PutCondition::Create,
            Some(p) => match &p.manifest_object.e_tag {
                Some(tag) => PutCondition::IfMatch(tag.clone()),
                None => PutCondition::Overwrite,
            },
        }
    };
    let put = client.put(
        &url.key(MANIFEST_NAME),
        Bytes::from(manifest.to_json()),
        condition.clone(),
    );
    if let Err(e) = put {
        // The request may have been applied even though it failed: a 5xx
        // or a timeout after the server wrote the manifest, then a retry
        // that the condition refuses. Only the manifest itself can tell.
        resolve_failed_commit(client, url, &identity.save_id, &condition, e, &mut pending)?;
    }
    pending.armed = false; // committed: the shards belong to the manifest now
    marker.after_commit(url)?;
    if let Some(prev) = &previous
        && prev.manifest.identity.save_id != identity.save_id
    {
        let old: Vec<String> = (0..prev.manifest.shards.len())
            .map(|i| prev.shard_key(i))
            .filter(|k| k.starts_with(&url.key(&format!("{SHARDS_DIR}/"))))
            .collect();
        if let Err(e) = client.delete_many(&old) {
            tracing::warn!("could not remove every shard of the previous save (gc will): {e}");
        }
    }
    if let Some(c) = &opts.complete_file {
        super::save::write_complete_file(c, "save", &PathBuf::from(url.to_string()))?;
    }
    phases.commit = t.elapsed().as_secs_f64();
    let mut report = report("save", url, &manifest, phases, client, opts.tuning.clone());
    report.verified = true;
    report.finish(&stats);
    Ok(report)
}

/// Decides what a failed manifest PUT means by reading the manifest back:
/// `Ok(())` when it is this save's (the PUT was applied, its answer lost);
/// otherwise the error to return, with `pending` disarmed whenever the PUT
/// might still be applied (so the shards stay for gc, which re-reads the
/// manifest before it deletes anything).
fn resolve_failed_commit(
    client: &ObjectClient,
    url: &S3Url,
    save_id: &str,
    condition: &PutCondition,
    e: Error,
    pending: &mut Pending<'_>,
) -> Result<()> {
    let conflict = matches!(e, Error::Conflict(_));
    // The outcome is unknown: keep the shards (a committed manifest may name
    // them) and say how to find out.
    let left_in_place = |pending: &mut Pending<'_>, why: String, gc_when: &str| {
        pending.armed = false;
        Error::ObjectStore {
            context: format!("S3 PUT of the manifest of {url} failed"),
            message: e.to_string(),
            hint: format!(
                "; {why}, so this save's shards were left in place: run `memferry inspect {url}` to see which save is committed, and `memferry gc {url}`{gc_when} removes this one's objects if it is not"
            ),
        }
    };
    let observed = match read_manifest(client, url) {
        Ok(m) => m,
        Err(re) => {
            return Err(left_in_place(
                pending,
                format!(
                    "reading the manifest back to tell whether the PUT was applied failed too ({re})"
                ),
                " once the server is back",
            ));
        }
    };
    if observed
        .as_ref()
        .is_some_and(|m| m.manifest.identity.save_id == save_id)
    {
        tracing::warn!(
            "the manifest PUT of {url} answered with an error ({e}), but the manifest there now is this save's: the save committed"
        );
        return Ok(());
    }
    // A refusal of the condition is final; any other error may come from a
    // request the server still applies, unless what is there now makes the
    // condition fail.
    let could_still_land = !conflict
        && match condition {
            PutCondition::Create => observed.is_none(),
            PutCondition::IfMatch(tag) => observed
                .as_ref()
                .is_some_and(|m| same_etag(m.manifest_object.e_tag.as_deref(), Some(tag))),
            PutCondition::Overwrite => true,
        };
    if could_still_land {
        return Err(left_in_place(
            pending,
            "the server may still apply the request".into(),
            "",
        ));
    }
    if conflict {
        return Err(Error::Conflict(format!(
            "another save committed a snapshot at {url} while this one ran: this save committed nothing and its objects were removed; the other snapshot is intact"
        )));
    }
    Err(e)
}

/// True when two ETags name the same version (quotes and a weak prefix
/// aside); `None` on either side never matches.
fn same_etag(a: Option<&str>, b: Option<&str>) -> bool {
    let norm = |t: &str| {
        t.trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_string()
    };
    matches!((a, b), (Some(a), Some(b)) if norm(a) == norm(b))
}

/// How often a running save rewrites its marker. `memferry gc` removes a
/// save only once its marker is older than `--grace` (1h by default), so
/// any grace well above this interval never touches a running save.
pub const HEARTBEAT: Duration = Duration::from_secs(60);

fn heartbeat_interval() -> Duration {
    crate::storage::s3::fault::heartbeat().unwrap_or(HEARTBEAT)
}

/// The marker of this save and the ETag of the version last written, so
/// that the save notices when gc removed it (and never writes it back).
struct MarkerWriter<'c> {
    client: &'c ObjectClient,
    key: String,
    marker: SaveMarker,
    /// The marker's ETag after our last write (`None`: not known).
    e_tag: Option<String>,
    /// Set once the marker was found removed or replaced.
    lost: bool,
}

impl<'c> MarkerWriter<'c> {
    fn new(client: &'c ObjectClient, key: String, marker: SaveMarker) -> Self {
        Self {
            client,
            key,
            marker,
            e_tag: None,
            lost: false,
        }
    }

    fn body(&self) -> Bytes {
        Bytes::from(serde_json::to_vec_pretty(&self.marker).expect("marker serialises"))
    }

    /// Writes the first version of the marker.
    fn create(&mut self) -> Result<()> {
        let info = self
            .client
            .put(&self.key, self.body(), PutCondition::Overwrite)?;
        self.e_tag = info.e_tag;
        Ok(())
    }

    /// Rewrites the marker (its uploads, its heartbeat), only over the
    /// version we wrote last: a marker gc removed stays removed.
    fn refresh(&mut self) -> Result<()> {
        if self.lost {
            return Err(self.gone_error());
        }
        self.marker.heartbeat_unix_ms = now_ms();
        let body = self.body();
        let conditional = self.client.config().conditional_put;
        let cond = match (&self.e_tag, conditional) {
            (Some(tag), true) => PutCondition::IfMatch(tag.clone()),
            _ => {
                // No conditional write: look first (a short race remains).
                if !self.still_ours()? {
                    self.lost = true;
                    return Err(self.gone_error());
                }
                PutCondition::Overwrite
            }
        };
        match self.client.put(&self.key, body.clone(), cond) {
            Ok(info) => {
                self.e_tag = info.e_tag;
                Ok(())
            }
            Err(e) => match self.client.get(&self.key) {
                // The write landed and its answer was lost.
                Ok(Some((now, info))) if now == body => {
                    self.e_tag = info.e_tag;
                    Ok(())
                }
                Ok(_) if matches!(e, Error::Conflict(_)) => {
                    self.lost = true;
                    Err(self.gone_error())
                }
                Ok(None) => {
                    self.lost = true;
                    Err(self.gone_error())
                }
                _ => Err(e),
            },
        }
    }

    /// True while the marker is the version we wrote last.
    fn still_ours(&self) -> Result<bool> {
        Ok(match self.client.head(&self.key)? {
            None => false,
            Some(info) => {
                self.e_tag.is_none() || same_etag(info.e_tag.as_deref(), self.e_tag.as_deref())
            }
        })
    }

    /// Refreshes the marker every `every` until `stop` is dropped; errors
    /// other than a lost marker are only logged (the check before the
    /// commit decides).
    fn heartbeat(&mut self, stop: &std::sync::mpsc::Receiver<()>, every: Duration) {
        use std::sync::mpsc::RecvTimeoutError;
        while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
            if self.lost {
                continue;
            }
            if let Err(e) = self.refresh() {
                tracing::warn!(
                    "could not refresh the save marker {}: {e}",
                    self.client.url(&self.key)
                );
            }
        }
    }

    /// Fails unless the marker is still the version this save wrote last.
    fn check(&mut self, url: &S3Url) -> Result<()> {
        if self.lost || !self.still_ours()? {
            self.lost = true;
            return Err(Error::Conflict(format!(
                "{} while this save ran; this save committed nothing at {url} and its remaining objects were removed: run the save again, and run gc with a --grace well above {}s (the default is 1h)",
                self.gone_reason(),
                HEARTBEAT.as_secs()
            )));
        }
        Ok(())
    }

    /// After the commit: removes the marker. A marker already gone means a
    /// gc ran right at the commit and may have removed shards the manifest
    /// now names.
    fn after_commit(&self, url: &S3Url) -> Result<()> {
        match self.still_ours() {
            Ok(false) => {
                return Err(Error::Conflict(format!(
                    "{} right as this save committed at {url}: that gc may have removed shards the new manifest names; run `memferry verify {url}` and save again if it fails",
                    self.gone_reason()
                )));
            }
            Ok(true) => {}
            Err(e) => tracing::warn!("could not check the save marker after the commit: {e}"),
        }
        if let Err(e) = self.client.delete(&self.key) {
            tracing::warn!(
                "could not remove the save marker {} (gc will): {e}",
                self.client.url(&self.key)
            );
        }
        Ok(())
    }

    fn gone_reason(&self) -> String {
        format!(
            "the save marker {} was removed or taken over by `memferry gc` (it judged the save abandoned: no heartbeat within its --grace)",
            self.client.url(&self.key)
        )
    }

    fn gone_error(&self) -> Error {
        Error::Conflict(format!("{}; this save cannot commit", self.gone_reason()))
    }
}

fn validate_save(source: &SnapshotSource, opts: &SaveOptions) -> Result<()> {
    source.validate()?;
    opts.tuning.validate()?;
    if opts.roots.is_some() {
        return Err(Error::InvalidInput(
            "--roots does not apply to an S3 location: shards go under the snapshot prefix; drop --roots".into(),
        ));
    }
    if opts.shard_size < IO_ALIGN {
        return Err(Error::InvalidInput(format!(
            "--shard-size {} is too small: use at least 4KiB (default 1GiB)",
            opts.shard_size
        )));
    }
    if opts.checksum_chunk == 0 || !opts.checksum_chunk.is_multiple_of(IO_ALIGN) {
        return Err(Error::InvalidInput(
            "the checksum chunk must be a multiple of 4096".into(),
        ));
    }
    Ok(())
}

/// Refuses to save into a prefix that holds objects a save does not create.
fn refuse_foreign(client: &ObjectClient, url: &S3Url) -> Result<()> {
    let base = format!("{}/", url.prefix);
    for o in client.list(&base)? {
        let rel = o.key.strip_prefix(&base).unwrap_or(&o.key);
        let ours = rel == MANIFEST_NAME
            || rel
                .strip_prefix(&format!("{SHARDS_DIR}/"))
                .and_then(shard_save)
                .is_some()
            || rel
                .strip_prefix(&format!("{SAVES_DIR}/"))
                .and_then(marker_save)
                .is_some();
        if !ours {
            return Err(Error::InvalidInput(format!(
                "{url} holds objects that are not part of a memferry snapshot (e.g. {}): refusing to save there; choose another prefix",
                client.url(&o.key)
            )));
        }
    }
    Ok(())
}

/// What a failed save removes again: its uploads, its objects, its marker.
struct Pending<'c> {
    client: &'c ObjectClient,
    keys: Vec<String>,
    uploads: Vec<(String, String)>,
    marker: Option<String>,
    armed: bool,
}

/// The most time a failed save spends removing what it wrote: cleanup
/// requests run concurrently under this one deadline (bounded by the retry
/// bound of one request), and gc removes whatever is left.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(30);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let c = self.client;
        let deadline = c.config().retry.total.min(CLEANUP_DEADLINE);
        let n = c.config().concurrency;
        let aborts = futures::stream::iter(
            self.uploads
                .iter()
                .map(|(k, id)| async move { c.abort_multipart_async(k, id).await }),
        )
        .buffer_unordered(n)
        .collect::<Vec<Result<()>>>();
        let deletes = futures::stream::iter(self.keys.iter().map(|k| c.delete_async(k)))
            .buffer_unordered(n)
            .collect::<Vec<Result<()>>>();
        let marker = self.marker.as_deref();
        let work = async {
            let (aborted, deleted) = futures::future::join(aborts, deletes).await;
            let mut failed: Vec<Error> = deleted.into_iter().filter_map(|r| r.err()).collect();
            // An upload the save completed is gone, and some servers refuse
            // to abort it (403) rather than answer NoSuchUpload: only a
            // failed deletion keeps the marker (and its upload ids) for gc.
            if failed.is_empty()
                && let Some(m) = marker
                && let Err(e) = c.delete_async(m).await
            {
                failed.push(e);
            }
            let not_aborted: Vec<Error> = aborted.into_iter().filter_map(|r| r.err()).collect();
            (failed, not_aborted)
        };
        let gc_hint = format!(
            "`memferry gc` removes the rest (save marker {})",
            self.marker.as_deref().map(|m| c.url(m)).unwrap_or_default()
        );
        match c.run(async { tokio::time::timeout(deadline, work).await }) {
            Ok((failed, not_aborted)) => {
                if let Some(first) = not_aborted.first() {
                    tracing::warn!(
                        "{} of {} multipart upload(s) of the failed save were not aborted (the first: {first}); harmless for uploads it had completed, otherwise {gc_hint}",
                        not_aborted.len(),
                        self.uploads.len()
                    );
                }
                if let Some(first) = failed.first() {
                    tracing::warn!(
                        "could not remove every object of the failed save ({} request(s) failed, the first: {first}); {gc_hint}",
                        failed.len()
                    );
                }
            }
            Err(_) => tracing::warn!(
                "removing the {} upload(s), {} object(s) and the marker of the failed save did not finish within {}s; {gc_hint}",
                self.uploads.len(),
                self.keys.len(),
                deadline.as_secs_f64()
            ),
        }
    }
}

/// Restores the snapshot at `url` into memory (host, or CUDA devices as
/// `opts.device` or the manifest says): ranged GETs, verified in the same
/// pass before the bytes are copied in, staging bounded by concurrency x
/// request size.
pub fn restore(
    client: &ObjectClient,
    url: &S3Url,
    opts: &LoadOptions,
) -> Result<(RestoredSnapshot, Report)> {
    // A failed read fails the restore now (after one retry bound) rather
    // than being retried again by the load.
    let before = read_manifest(client, url)?.map(|s| s.manifest.identity.save_id);
    let save_id = || {
        read_manifest(client, url)
            .ok()
            .flatten()
            .map(|s| s.manifest.identity.save_id)
    };
    match load(client, url, opts, true) {
        // A concurrent save may have replaced the snapshot (and removed the
        // old shards) after we read the manifest: retry once on the new one.
        Err(Error::MissingShard { .. }) if before.is_some() && save_id() != before => {
            load(client, url, opts, true)
        }
        other => other,
    }
    .map(|(r, rep)| (r.expect("restore keeps regions"), rep))
}

/// Checks every byte of the snapshot at `url` against its checksums.
pub fn verify(client: &ObjectClient, url: &S3Url, opts: &LoadOptions) -> Result<Report> {
    let opts = LoadOptions {
        verify: true,
        ..opts.clone()
    };
    load(client, url, &opts, false).map(|(_, r)| r)
}

fn load(
    client: &ObjectClient,
    url: &S3Url,
    opts: &LoadOptions,
    keep: bool,
) -> Result<(Option<RestoredSnapshot>, Report)> {
    let t = Instant::now();
    let mut phases = Phases::default();
    opts.tuning.validate()?;
    if opts.roots.is_some() {
        return Err(Error::InvalidInput(
            "--roots does not apply to an S3 location; drop --roots".into(),
        ));
    }
    let snap = open(client, url)?;
    let (plan, sums, keys) = load_plan(client, &snap, request_size(opts.tuning.chunk_size))?;
    phases.plan = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let m = &snap.manifest;
    let host: Vec<OwnedRegion> = if keep {
        // Each allocation goes where --device says, else where it was saved
        // from (host or a CUDA device); region copies do the rest.
        allocate_destinations(m, opts.device)?
    } else {
        Vec::new()
    };
    let sinks: Vec<DiscardRegion> = if keep {
        Vec::new()
    } else {
        m.allocations
            .iter()
            .map(|a| DiscardRegion::new(a.allocation.size))
            .collect()
    };
    let refs: Vec<&dyn Region> = if keep {
        host.iter().map(|r| r as &dyn Region).collect()
    } else {
        sinks.iter().map(|r| r as &dyn Region).collect()
    };
    phases.allocate = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let checks = if opts.verify {
        Checksums::Verify(&sums)
    } else {
        Checksums::Skip
    };
    let mut job = TransferJob::new(&plan, &refs, checks);
    job.progress = opts.progress.as_deref();
    job.cancel = opts.cancel.as_deref();
    let backend = ObjectBackend::for_load(client, keys, request_size(opts.tuning.chunk_size));
    let done = AtomicBool::new(false);
    let stats: TransferStats = std::thread::scope(|sc| {
        // Fresh memory costs a page fault per page on first touch: fault
        // the destination in ahead of the GETs on another thread, as local
        // restores do, so allocation overlaps the transfer.
        if keep {
            sc.spawn(|| prefault(&host, &done));
        }
        let r = backend.run(&job);
        done.store(true, Ordering::Relaxed);
        r
    })?;
    // The object backend copies into device memory synchronously: wait
    // until those bytes have landed before reporting success.
    job.settle_devices()?;
    phases.transfer = t.elapsed().as_secs_f64();
    drop(refs);

    let t = Instant::now();
    let op = if keep { "restore" } else { "verify" };
    if keep && let Some(c) = &opts.complete_file {
        super::save::write_complete_file(c, "restore", &PathBuf::from(url.to_string()))?;
    }
    phases.commit = t.elapsed().as_secs_f64();
    let mut r = report(op, url, m, phases, client, opts.tuning.clone());
    r.verified = opts.verify;
    r.finish(&stats);
    let restored = keep.then(|| RestoredSnapshot {
        manifest: snap.manifest.clone(),
        regions: host,
    });
    Ok((restored, r))
}

/// Populates `regions` in order, 64 MiB at a time, until `done` is set or
/// the kernel does not support populating.
fn prefault(regions: &[OwnedRegion], done: &AtomicBool) {
    const STEP: u64 = 64 << 20;
    for r in regions.iter().filter_map(OwnedRegion::host) {
        let mut off = 0;
        while off < r.len() {
            if done.load(Ordering::Relaxed) || !r.populate(off, STEP.min(r.len() - off)) {
                return;
            }
            off += STEP;
        }
    }
}

/// The load plan of a remote snapshot: every shard HEADed first (missing or
/// short shards fail by name before any byte moves), then one op per
/// request of at most `request` bytes.
pub fn load_plan(
    client: &ObjectClient,
    snap: &RemoteSnapshot,
    request: u64,
) -> Result<(TransferPlan, Vec<u32>, Vec<String>)> {
    let m = &snap.manifest;
    let keys: Vec<String> = (0..m.shards.len()).map(|i| snap.shard_key(i)).collect();
    let heads = client.head_many(&keys);
    let mut b = PlanBuilder::new(Direction::Load, m.checksum.chunk_bytes, request);
    for (i, (s, head)) in m.shards.iter().zip(heads).enumerate() {
        let path = PathBuf::from(client.url(&keys[i]));
        let first = m
            .allocations
            .iter()
            .flat_map(|a| &a.extents)
            .find(|e| e.shard == i)
            .map_or((0, 0), |e| (e.offset, e.length));
        match head? {
            None => {
                return Err(Error::MissingShard {
                    path,
                    offset: first.0,
                    length: first.1,
                });
            }
            Some(h) if h.size < s.size => {
                return Err(Error::Truncated {
                    path,
                    offset: first.0,
                    length: first.1,
                    file_size: h.size,
                });
            }
            Some(_) => {}
        }
        b.add_file(FileTarget {
            path,
            root: 0,
            size: s.size,
        });
    }
    let mut sums = Vec::new();
    for (region, a) in m.allocations.iter().enumerate() {
        for e in &a.extents {
            b.add_extent(e.shard, e.offset, e.length, region, e.alloc_offset);
            sums.extend_from_slice(&e.crc32c);
        }
    }
    Ok((b.build(), sums, keys))
}

fn report(
    op: &str,
    url: &S3Url,
    m: &Manifest,
    phases: Phases,
    client: &ObjectClient,
    tuning: crate::transfer::Tuning,
) -> Report {
    Report {
        op: op.into(),
        backend: "s3".into(),
        mode: String::new(),
        bytes: 0,
        seconds: 0.0,
        gib_per_s: 0.0,
        transfer_gib_per_s: 0.0,
        verified: false,
        fallbacks: Vec::new(),
        phases,
        peak_staging_bytes: 0,
        checksum_cpu_seconds: 0.0,
        snapshot: url.to_string(),
        allocations: m.allocations.len(),
        shards: m.shards.len(),
        roots: 1,
        workers: tuning.workers,
        queue_depth: client.config().concurrency,
        chunk_size: request_size(tuning.chunk_size),
        profile: None,
    }
}

/// True for the ids [`unique_id`] makes: 16 lowercase hex digits.
fn is_save_id(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The save of a key under `shards/` (`<save id>/shard-NNNNN.bin`), or
/// `None` for anything a save does not write there.
fn shard_save(rel: &str) -> Option<&str> {
    let (save, name) = rel.split_once('/')?;
    let digits = name.strip_prefix("shard-")?.strip_suffix(".bin")?;
    (is_save_id(save) && digits.len() >= 5 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then_some(save)
}

/// The save of a key under `saves/` (`<save id>.json`).
fn marker_save(rel: &str) -> Option<&str> {
    rel.strip_suffix(".json").filter(|s| is_save_id(s))
}

/// Removes what failed or killed saves left under `url`: shard objects of
/// saves that are not the committed one, markers of saves that are not in
/// progress, and the multipart uploads those markers name.
///
/// A running save refreshes its marker every [`HEARTBEAT`]; a save whose
/// marker is younger than `grace` may be running and is kept (shard objects
/// without a marker never belong to a running save: a save writes its
/// marker before anything else, and checks it is still there right before
/// it commits). The objects are listed first and the manifest read after
/// that, and again right before a save's objects are deleted (once its
/// marker is gone, so the save can no longer commit), so a save that
/// committed meanwhile is never touched.
pub fn gc(client: &ObjectClient, url: &S3Url, grace: Duration) -> Result<GcReport> {
    if grace < 2 * HEARTBEAT {
        tracing::warn!(
            "--grace {}s is shorter than twice the heartbeat of a running save ({}s): a save in progress may be judged abandoned; it then fails before committing",
            grace.as_secs_f64(),
            HEARTBEAT.as_secs()
        );
    }
    let base = format!("{}/", url.prefix);
    let shards_base = format!("{base}{SHARDS_DIR}/");
    let saves_base = format!("{base}{SAVES_DIR}/");
    // Uploads first: a save writes its marker before it creates any upload,
    // so the marker of every upload listed here is in the listing below.
    let mut listed_uploads: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let unlisted = match client.list_multipart_uploads(&shards_base) {
        Ok(Some(uploads)) => {
            for (k, id) in uploads {
                if let Some(save) = k.strip_prefix(&shards_base).and_then(shard_save) {
                    listed_uploads
                        .entry(save.to_string())
                        .or_default()
                        .push((k.clone(), id));
                }
            }
            None
        }
        Ok(None) => Some("the server does not implement ListMultipartUploads".to_string()),
        Err(e) => Some(format!("listing them failed ({e})")),
    };
    let mut by_save: BTreeMap<String, Vec<ObjectInfo>> = BTreeMap::new();
    let mut markers: BTreeMap<String, ObjectInfo> = BTreeMap::new();
    for o in client.list(&base)? {
        if let Some(save) = o.key.strip_prefix(&shards_base).and_then(shard_save) {
            by_save.entry(save.to_string()).or_default().push(o);
        } else if let Some(save) = o.key.strip_prefix(&saves_base).and_then(marker_save) {
            markers.insert(save.to_string(), o);
        }
    }
    // Read after the listing: a save that committed before it is current.
    let committed_id = |client: &ObjectClient| -> Result<Option<String>> {
        Ok(read_manifest(client, url)?.map(|c| c.manifest.identity.save_id))
    };
    let current = committed_id(client)?;
    let now = now_ms();
    let grace_ms = grace.as_millis() as u64;
    let young = |t: u64| now.saturating_sub(t) < grace_ms;
    let kept_young = |save: &str| {
        format!(
            "{url}: save {save} refreshed its marker less than the grace period ({}s) ago and may still be running; run gc again later",
            grace.as_secs()
        )
    };
    let mut report = GcReport::default();
    let saves: BTreeSet<String> = by_save
        .keys()
        .chain(markers.keys())
        .chain(listed_uploads.keys())
        .cloned()
        .collect();
    let mut collected_any = false;
    for save in saves {
        // The listing reaches `saves/` before `shards/`: a save that started
        // after it passed `saves/` can show shards (each object completes
        // as soon as its parts are in) but no listed marker. Look the
        // marker up, so such a save is judged by its marker like any other.
        let late_marker = match markers.get(&save) {
            Some(_) => None,
            None => client.head(&format!("{saves_base}{save}.json"))?,
        };
        let marker = markers.get(&save).or(late_marker.as_ref());
        if let Some(m) = marker
            && young(m.modified_unix_ms)
        {
            report.kept.push(kept_young(&save));
            continue;
        }
        if Some(&save) == current.as_ref() {
            // The committed save: only a stale marker can be left over.
            if let Some(m) = marker {
                client.delete(&m.key)?;
                report.removed.push(PathBuf::from(client.url(&m.key)));
            }
            continue;
        }
        // Read the uploads, then take the marker over (rewrite it) before
        // anything else: from then on the save cannot commit (it checks
        // that its marker is still the version it wrote), while the marker
        // itself stays until its uploads and shards are gone.
        let mut uploads = Vec::new();
        if let Some(m) = marker {
            match client.get(&m.key)? {
                Some((bytes, info)) if !young(info.modified_unix_ms) => {
                    match serde_json::from_slice::<SaveMarker>(&bytes) {
                        Ok(mut sm) => {
                            uploads = std::mem::take(&mut sm.uploads);
                            sm.collected_unix_ms = Some(now_ms());
                            sm.uploads = uploads.clone();
                            let body = serde_json::to_vec_pretty(&sm).expect("marker serialises");
                            // Only over the version read: a heartbeat that
                            // came in between means the save is alive.
                            let cond = match &info.e_tag {
                                Some(tag) if client.config().conditional_put => {
                                    PutCondition::IfMatch(tag.clone())
                                }
                                _ => PutCondition::Overwrite,
                            };
                            match client.put(&m.key, Bytes::from(body), cond) {
                                Ok(_) => {}
                                Err(Error::Conflict(_)) => {
                                    report.kept.push(kept_young(&save));
                                    continue;
                                }
                                Err(e) => return Err(e),
                            }
                        }
                        Err(e) => {
                            report.kept.push(format!(
                                "{}: unreadable save marker ({e}); its uploads were not aborted",
                                client.url(&m.key)
                            ));
                            client.delete(&m.key)?;
                            report.removed.push(PathBuf::from(client.url(&m.key)));
                        }
                    }
                }
                // Refreshed since the listing: running after all.
                Some(_) => {
                    report.kept.push(kept_young(&save));
                    continue;
                }
                None => {}
            }
        }
        if committed_id(client)?.as_ref() == Some(&save) {
            report.kept.push(format!(
                "{url}: save {save} committed while gc ran; its shards are the snapshot's"
            ));
            if let Some(m) = marker {
                client.delete(&m.key)?;
            }
            continue;
        }
        collected_any = true;
        for listed in listed_uploads.remove(&save).unwrap_or_default() {
            if !uploads.contains(&listed) {
                uploads.push(listed);
            }
        }
        for (k, id) in &uploads {
            if !k.starts_with(&shards_base) {
                continue;
            }
            // An upload the save completed before it died is gone already
            // (AWS: NoSuchUpload; some servers answer 403): note it and go
            // on, the shard object itself is deleted below.
            match client.abort_multipart(k, id) {
                Ok(()) => report
                    .removed
                    .push(PathBuf::from(format!("{} (upload {id})", client.url(k)))),
                Err(e) => report.kept.push(format!(
                    "upload {id} of {}: not aborted ({e}); harmless if the save had completed it",
                    client.url(k)
                )),
            }
        }
        let objects: Vec<String> = by_save
            .get(&save)
            .into_iter()
            .flatten()
            .map(|o| o.key.clone())
            .collect();
        client.delete_many(&objects)?;
        report
            .removed
            .extend(objects.iter().map(|k| PathBuf::from(client.url(k))));
        // Last, once what it lists is gone (a gc stopped before this finds
        // the marker again next time).
        if let Some(m) = marker
            && !report.removed.contains(&PathBuf::from(client.url(&m.key)))
        {
            client.delete(&m.key)?;
            report.removed.push(PathBuf::from(client.url(&m.key)));
        }
    }
    if collected_any && let Some(why) = unlisted {
        report.kept.push(format!(
            "{url}: multipart uploads were aborted only as save markers list them ({why}); an upload a killed save started but had not recorded yet is not found: give the bucket a lifecycle rule (AbortIncompleteMultipartUpload) as a backstop"
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_a_save_writes_counts_as_its_objects() {
        let id = "0123456789abcdef";
        assert_eq!(shard_save(&format!("{id}/shard-00000.bin")), Some(id));
        assert_eq!(shard_save(&format!("{id}/shard-123456.bin")), Some(id));
        for other in [
            "shards/0123456789abcdef/shard-00000.bin",
            "0123456789ABCDEF/shard-00000.bin",
            "0123456789abcde/shard-00000.bin",
            "0123456789abcdef/shard-0000.bin",
            "0123456789abcdef/manifest.json",
            "manifest.json",
        ] {
            assert_eq!(shard_save(other), None, "{other}");
        }
        assert_eq!(marker_save(&format!("{id}.json")), Some(id));
        assert_eq!(marker_save("manifest.json"), None);
        assert_eq!(marker_save(&format!("x/{id}.json")), None);
    }

    #[test]
    fn etags_compare_without_quotes_and_weak_prefixes() {
        assert!(same_etag(Some("\"abc\""), Some("abc")));
        assert!(same_etag(Some("W/\"abc\""), Some("\"abc\"")));
        assert!(!same_etag(Some("\"abc\""), Some("\"abd\"")));
        assert!(!same_etag(None, Some("abc")));
        assert!(!same_etag(None, None));
    }
}
