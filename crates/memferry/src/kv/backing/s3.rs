//! Blocks as objects under a prefix of an S3-compatible bucket, with the
//! same namespaces, key layout and block image as on a filesystem:
//!
//! ```text
//! <prefix>/<namespace>/namespace.json     what the namespace is
//! <prefix>/<namespace>/layout.json        page sizes (create-only PUT)
//! <prefix>/<namespace>/hh/hh/<hex>.kvb    one block image per key
//! <prefix>/<namespace>/access/<hex>       empty marker: last load/touch
//! <prefix>/<namespace>/stats/<id>.json    counters of one process
//! ```
//!
//! Guarantees:
//! - a store is one whole-object PUT: readers see no block or a whole one;
//!   concurrent stores of a key write identical bytes;
//! - a load is one whole-object GET, accepted only with the exact size, a
//!   header naming this namespace and key, and a matching payload CRC32C;
//!   a damaged object is deleted only while its ETag is still the one read;
//! - probes (lookup, contains, the store's already-stored check) run as
//!   concurrent HEADs or header GETs, bounded by the client's concurrency;
//! - every request is retried with backoff within the client's bound
//!   ([`crate::storage::s3::RetryPolicy`]) and then fails the key with the
//!   request and the object named.
//!
//! Last access is the later of the block's and its marker's modification
//! time (the server's clock): a store sets the block's, a load or touch
//! rewrites the empty marker. Objects cannot be touched in place.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};

use super::{Accessed, Backing, Evicted, Found, KeyPipeline};
use crate::kv::codec::BlockCodec;
use crate::kv::config::KvConfig;
use crate::kv::format::HEADER_BYTES;
use crate::kv::job::{JobKind, KeyOutcome, KeyTask};
use crate::kv::key::BlockKey;
use crate::kv::namespace::{BlockLayout, LAYOUT_FILE, NAMESPACE_FILE, Namespace};
use crate::kv::scan::{STALE_TEMP_AGE, ScannedBlock};
use crate::kv::stats::{Counters, STATS_FILE};
use crate::kv::tensors::KvLayout;
use crate::storage::durable::unique_id;
use crate::storage::location::S3Url;
use crate::storage::s3::{ObjectClient, PutCondition, S3Config};
use crate::{Error, Result};

/// One namespace's block objects.
pub(crate) struct BlockObjects {
    client: ObjectClient,
    /// `<prefix>/<namespace>` inside the bucket.
    ns: String,
    codec: BlockCodec,
    /// Create-only PUTs work on this server: a store is one request.
    conditional: bool,
    /// This process's counters object, and what it holds.
    stats_key: String,
    stats_total: Mutex<Counters>,
    /// When this process last wrote each key's block or marker: a use
    /// within [`ACCESS_GRANULARITY`] of it writes no new marker.
    recorded: Mutex<HashMap<BlockKey, Instant>>,
}

/// Precision of the access record on S3. Every write of a marker is a
/// request, so a block is re-marked at most this often per process; LRU
/// ordering at this grain is as good as exact for eviction, and a block
/// evicted while in use elsewhere costs that process one failed key, never
/// wrong bytes.
pub(crate) const ACCESS_GRANULARITY: Duration = Duration::from_secs(60);

fn to_time(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

impl BlockObjects {
    /// Opens (creating if needed) the namespace under `root`: checks or
    /// writes `namespace.json` and `layout.json`, and proves write access
    /// with a probe object, so bad credentials or a missing bucket fail
    /// here with a clear error instead of on the first store.
    pub fn open(config: &KvConfig, root: &S3Url, s3: &S3Config, layout: KvLayout) -> Result<Self> {
        let client = ObjectClient::new(s3, &root.bucket)?;
        let ns = root.key(&config.namespace.dir_name());
        let ns_key = format!("{ns}/{NAMESPACE_FILE}");
        match client.get(&ns_key)? {
            Some((bytes, _)) => {
                let origin = client.url(&ns_key);
                let found = Namespace::parse(&bytes, &origin)?;
                config.namespace.expect_same(&found, &origin)?;
            }
            None => {
                // Every process creating it writes the same bytes.
                let body = serde_json::to_vec_pretty(&config.namespace).expect("serialises");
                client.put(&ns_key, Bytes::from(body), PutCondition::Overwrite)?;
            }
        }
        let probe = format!("{ns}/.probe-{}", unique_id());
        client
            .put(&probe, Bytes::new(), PutCondition::Overwrite)
            .map_err(|e| {
                Error::InvalidInput(format!(
                    "KV namespace {} is not writable ({e}): stores need write access to the bucket",
                    client.url(&ns)
                ))
            })?;
        client.delete(&probe)?;
        let wanted = BlockLayout {
            page_bytes: layout.page_bytes(),
        };
        check_layout(&client, &format!("{ns}/{LAYOUT_FILE}"), &wanted, s3)?;
        Ok(Self {
            stats_key: format!(
                "{ns}/stats/{}-{}.json",
                STATS_FILE.trim_end_matches(".json"),
                unique_id()
            ),
            stats_total: Mutex::new(Counters::default()),
            conditional: s3.conditional_put,
            recorded: Mutex::new(HashMap::new()),
            codec: BlockCodec::new(
                wanted.header_hash(&config.namespace),
                layout,
                config.namespace.blocks_per_file as usize,
            ),
            client,
            ns,
        })
    }

    fn block_key(&self, key: &BlockKey) -> String {
        format!("{}/{}", self.ns, key.rel_path().to_string_lossy())
    }

    fn marker_key(&self, key: &BlockKey) -> String {
        format!("{}/access/{}", self.ns, key.hex())
    }

    /// Remembers that `keys` were recorded now; forgets stale entries so
    /// the map stays as small as the recent working set.
    fn note_recorded(&self, keys: &[BlockKey]) {
        let now = Instant::now();
        let mut map = self.recorded.lock().expect("recorded lock");
        if map.len() > 65_536 {
            map.retain(|_, t| now.duration_since(*t) < ACCESS_GRANULARITY);
        }
        for k in keys {
            map.insert(k.clone(), now);
        }
    }

    fn concurrency(&self) -> usize {
        self.client.config().concurrency.max(1)
    }

    /// GETs one block and checks and scatters it.
    ///
    /// # Safety
    /// Nobody may access the pages of `task.ids` during the call.
    async unsafe fn load_one(&self, task: &KeyTask, cancel: &AtomicBool) -> KeyOutcome {
        if cancel.load(Ordering::Relaxed) {
            return KeyOutcome::Cancelled;
        }
        let key = self.block_key(&task.key);
        let url = self.client.url(&key);
        let got = match self
            .client
            .store()
            .get(&ObjectPath::from(key.as_str()))
            .await
        {
            Ok(r) => {
                let e_tag = r.meta.e_tag.clone();
                r.bytes().await.map(|b| (b, e_tag))
            }
            Err(e) => Err(e),
        };
        let (image, e_tag) = match got {
            Ok(x) => x,
            Err(object_store::Error::NotFound { .. }) => {
                return KeyOutcome::Failed(format!("missing: no block object at {url}"));
            }
            Err(e) => return KeyOutcome::Failed(self.client.error("GET", &key, e).to_string()),
        };
        if image.len() as u64 != self.codec.file_len {
            let what = if (image.len() as u64) < self.codec.file_len {
                "truncated"
            } else {
                "foreign"
            };
            let reason = format!(
                "{what}: {url} is {} bytes, a block of this namespace is {}",
                image.len(),
                self.codec.file_len
            );
            return KeyOutcome::Failed(if what == "truncated" {
                self.quarantine(&key, e_tag, reason).await
            } else {
                reason
            });
        }
        // SAFETY: forwarded from the caller.
        match unsafe { self.codec.decode_into(&image, task, &url, None) } {
            Ok(()) => KeyOutcome::Loaded,
            Err(r) if r.damaged => KeyOutcome::Failed(self.quarantine(&key, e_tag, r.reason).await),
            Err(r) => KeyOutcome::Failed(r.reason),
        }
    }

    /// Deletes `key`'s block object and its access marker.
    fn delete_block(&self, key: &BlockKey) -> Result<()> {
        self.client.delete(&self.block_key(key))?;
        self.client.delete(&self.marker_key(key))
    }

    /// Deletes a damaged block object, unless it was replaced since it was
    /// read (its ETag changed), so the key gets stored again.
    async fn quarantine(&self, key: &str, read: Option<String>, reason: String) -> String {
        let same = match self.client.head_async(key).await {
            Ok(Some(now)) => read.is_some() && now.e_tag == read,
            _ => false,
        };
        if same && self.client.delete_async(key).await.is_ok() {
            format!("{reason}; the object was deleted")
        } else {
            reason
        }
    }

    /// Gathers and PUTs one block.
    ///
    /// # Safety
    /// Nobody may write the pages of `task.ids` during the call.
    async unsafe fn store_one(&self, task: &KeyTask, cancel: &AtomicBool) -> KeyOutcome {
        if cancel.load(Ordering::Relaxed) {
            return KeyOutcome::Cancelled;
        }
        let mut image = vec![0u8; self.codec.file_len as usize];
        // SAFETY: forwarded from the caller.
        if let Err(e) = unsafe { self.codec.encode(task, &mut image, None) } {
            return KeyOutcome::Failed(e.to_string());
        }
        let key = self.block_key(&task.key);
        let path = ObjectPath::from(key.as_str());
        let body = PutPayload::from(Bytes::from(image));
        let store = self.client.store();
        let mut put = if self.conditional {
            // Create-only: a block already there answers 412 in the same
            // request, instead of a probe before every store.
            store
                .put_opts(&path, body.clone(), PutOptions::from(PutMode::Create))
                .await
        } else {
            store.put(&path, body.clone()).await
        };
        if let Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        ) = put
        {
            if self.valid_one(&task.key).await {
                self.note_recorded(std::slice::from_ref(&task.key));
                return KeyOutcome::AlreadyStored;
            }
            // A damaged or foreign-sized object under our key: replace it.
            put = store.put(&path, body).await;
        }
        match put {
            Ok(_) => {
                // The new object's own time is its access record.
                self.note_recorded(std::slice::from_ref(&task.key));
                KeyOutcome::Stored
            }
            Err(e) => KeyOutcome::Failed(self.client.error("PUT", &key, e).to_string()),
        }
    }

    /// True when the object has the right size and its first 4096 bytes
    /// are a header of this namespace, key and payload length (one ranged
    /// GET: the response also carries the object's size).
    async fn valid_one(&self, key: &BlockKey) -> bool {
        let k = self.block_key(key);
        let opts = GetOptions::new().with_range(Some(GetRange::Bounded(0..HEADER_BYTES as u64)));
        let Ok(r) = self
            .client
            .store()
            .get_opts(&ObjectPath::from(k.as_str()), opts)
            .await
        else {
            return false;
        };
        if r.meta.size != self.codec.file_len {
            return false;
        }
        match r.bytes().await {
            Ok(header) => self.codec.header_matches(&header, key),
            Err(_) => false,
        }
    }
}

/// Records `wanted` as the namespace's layout, or checks it against the
/// recorded one. The first writer wins with a create-only PUT where the
/// server supports it.
fn check_layout(
    client: &ObjectClient,
    key: &str,
    wanted: &BlockLayout,
    s3: &S3Config,
) -> Result<()> {
    let origin = client.url(key);
    if let Some((bytes, _)) = client.get(key)? {
        return wanted.expect_recorded(&bytes, &origin);
    }
    let body = Bytes::from(serde_json::to_vec_pretty(wanted).expect("serialises"));
    let cond = if s3.conditional_put {
        PutCondition::Create
    } else {
        PutCondition::Overwrite
    };
    match client.put(key, body, cond) {
        Ok(_) | Err(Error::Conflict(_)) => {}
        Err(e) => return Err(e),
    }
    // Read back: whoever won, the recorded layout must be ours.
    let (bytes, _) = client.get(key)?.ok_or_else(|| {
        Error::InvalidInput(format!("{origin} vanished right after it was written"))
    })?;
    wanted.expect_recorded(&bytes, &origin)
}

impl Backing for BlockObjects {
    fn codec(&self) -> &BlockCodec {
        &self.codec
    }

    fn location(&self) -> String {
        self.client.url(&self.ns)
    }

    fn mode(&self) -> String {
        format!("s3 ({} requests in flight)", self.concurrency())
    }

    fn probe_batch(&self) -> usize {
        self.concurrency()
    }

    fn store_checks_existing(&self) -> bool {
        self.conditional
    }

    fn stat_many(&self, keys: &[BlockKey]) -> Vec<Option<Found>> {
        let names: Vec<String> = keys.iter().map(|k| self.block_key(k)).collect();
        let mut failed: Option<(usize, Error)> = None;
        let found = self
            .client
            .head_many(&names)
            .into_iter()
            .map(|r| match r {
                Ok(found) => found.map(|info| Found {
                    file_bytes: info.size,
                    accessed: to_time(info.modified_unix_ms),
                }),
                Err(e) => {
                    let n = failed.as_ref().map_or(0, |(n, _)| *n);
                    failed = Some((n + 1, failed.take().map_or(e, |(_, first)| first)));
                    None
                }
            })
            .collect();
        // A failed HEAD answers "absent" (a miss costs a store, never wrong
        // bytes), but not silently.
        if let Some((n, first)) = failed {
            tracing::warn!(
                "KV lookup: {n} of {} HEAD request(s) failed and those keys count as absent; the first: {first}",
                names.len()
            );
        }
        found
    }

    fn valid_many(&self, keys: &[BlockKey]) -> Vec<bool> {
        self.client.run(
            futures::stream::iter(keys.iter().map(|k| self.valid_one(k)))
                .buffered(self.concurrency())
                .collect(),
        )
    }

    fn pipeline(&self, _depth: usize) -> Result<Box<dyn KeyPipeline + '_>> {
        Ok(Box::new(OneRequest {
            objects: self,
            finished: None,
        }))
    }

    fn remove(&self, key: &BlockKey) -> Result<bool> {
        let existed = self.client.head(&self.block_key(key))?.is_some();
        self.delete_block(key)?;
        Ok(existed)
    }

    /// Deletes whatever block object is under `key` now: there is no cheap
    /// conditional DELETE here, so a block stored again since `seen` was
    /// read goes too (its next load reports it missing, never wrong bytes).
    fn evict(&self, key: &BlockKey, _seen: &Accessed) -> Result<Evicted> {
        // A DELETE succeeds whether or not the object is there: the HEAD of
        // `last_access` is the evidence that it was.
        self.delete_block(key)?;
        Ok(Evicted::Removed)
    }

    fn record_access(&self, keys: &[BlockKey], _when: SystemTime) {
        let now = Instant::now();
        let due: Vec<BlockKey> = {
            let map = self.recorded.lock().expect("recorded lock");
            keys.iter()
                .filter(|k| {
                    map.get(*k)
                        .is_none_or(|t| now.duration_since(*t) >= ACCESS_GRANULARITY)
                })
                .cloned()
                .collect()
        };
        if due.is_empty() {
            return;
        }
        self.note_recorded(&due);
        let markers: Vec<String> = due.iter().map(|k| self.marker_key(k)).collect();
        let results: Vec<Result<()>> = self.client.run(
            futures::stream::iter(markers.iter().map(|m| async move {
                self.client
                    .store()
                    .put(&ObjectPath::from(m.as_str()), PutPayload::default())
                    .await
                    .map(|_| ())
                    .map_err(|e| self.client.error("PUT", m, e))
            }))
            .buffer_unordered(self.concurrency())
            .collect(),
        );
        if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
            tracing::warn!("could not record KV block accesses: {e}");
        }
    }

    fn last_access(&self, key: &BlockKey) -> Option<Accessed> {
        let names = [self.block_key(key), self.marker_key(key)];
        let mut heads = self.client.head_many(&names).into_iter();
        let block = heads.next()?.ok()??;
        let marker = heads.next().and_then(|r| r.ok().flatten());
        let ms = marker.map_or(block.modified_unix_ms, |m| {
            m.modified_unix_ms.max(block.modified_unix_ms)
        });
        // `evict` cannot make use of an identity (see there).
        Some(Accessed {
            at: to_time(ms),
            identity: None,
        })
    }

    fn scan(&self) -> Result<Vec<ScannedBlock>> {
        let objects = self.client.list(&format!("{}/", self.ns))?;
        let access_prefix = format!("{}/access/", self.ns);
        let mut markers = HashMap::new();
        let mut blocks = Vec::new();
        for o in &objects {
            if let Some(hex) = o.key.strip_prefix(&access_prefix) {
                markers.insert(hex.to_string(), o.modified_unix_ms);
                continue;
            }
            let Some(rel) = o.key.strip_prefix(&format!("{}/", self.ns)) else {
                continue;
            };
            let parts: Vec<&str> = rel.split('/').collect();
            let [a, b, name] = parts[..] else { continue };
            let Some(key) = BlockKey::from_file_name(name) else {
                continue;
            };
            if a.len() != 2 || b.len() != 2 {
                continue;
            }
            blocks.push((key, o.size, o.modified_unix_ms));
        }
        // Markers whose block is gone (a touch raced an eviction) are
        // removed once they are old.
        let now = crate::units::now_ms();
        let live: std::collections::HashSet<String> = blocks.iter().map(|b| b.0.hex()).collect();
        let orphans: Vec<String> = markers
            .iter()
            .filter(|(hex, ms)| {
                !live.contains(*hex) && now.saturating_sub(**ms) > STALE_TEMP_AGE.as_millis() as u64
            })
            .map(|(hex, _)| format!("{access_prefix}{hex}"))
            .collect();
        if !orphans.is_empty() {
            let _ = self.client.delete_many(&orphans);
        }
        // Blocks used within the granularity need no new marker yet.
        {
            let instant = Instant::now();
            let mut map = self.recorded.lock().expect("recorded lock");
            for (key, _, ms) in &blocks {
                let last = markers.get(&key.hex()).map_or(*ms, |m| (*m).max(*ms));
                let age = Duration::from_millis(now.saturating_sub(last));
                if age < ACCESS_GRANULARITY
                    && let Some(at) = instant.checked_sub(age)
                {
                    map.entry(key.clone()).or_insert(at);
                }
            }
        }
        Ok(blocks
            .into_iter()
            .map(|(key, size, ms)| {
                let accessed = markers.get(&key.hex()).map_or(ms, |m| (*m).max(ms));
                ScannedBlock {
                    path: PathBuf::from(self.client.url(&self.block_key(&key))),
                    key,
                    file_bytes: size,
                    accessed: to_time(accessed),
                    inode: None,
                }
            })
            .collect())
    }

    fn add_counters(&self, delta: &Counters) -> Result<()> {
        // One object per process holding its running total: no two
        // processes ever write the same object, so no update is lost.
        let mut total = self.stats_total.lock().expect("stats lock");
        let mut next = *total;
        next.add(delta);
        let body = serde_json::to_vec_pretty(&next).expect("counters serialise");
        self.client
            .put(&self.stats_key, Bytes::from(body), PutCondition::Overwrite)?;
        *total = next;
        Ok(())
    }

    fn usage(&self) -> Option<(f64, f64)> {
        None
    }
}

/// A worker's engine on a bucket: one key at a time, its request made
/// synchronously on the client's runtime (the store runs many such
/// workers, so many requests are in flight without a barrier per batch).
struct OneRequest<'a> {
    objects: &'a BlockObjects,
    finished: Option<(u64, KeyOutcome)>,
}

impl KeyPipeline for OneRequest<'_> {
    fn room(&self) -> usize {
        usize::from(self.finished.is_none())
    }

    fn in_flight(&self) -> usize {
        0
    }

    unsafe fn start(&mut self, tag: u64, kind: JobKind, task: KeyTask, cancel: Arc<AtomicBool>) {
        let o = self.objects;
        let outcome = match kind {
            // SAFETY: forwarded from the caller.
            JobKind::Load => o.client.run(unsafe { o.load_one(&task, &cancel) }),
            // SAFETY: forwarded from the caller (gathers only read).
            JobKind::Store => o.client.run(unsafe { o.store_one(&task, &cancel) }),
        };
        self.finished = Some((tag, outcome));
    }

    fn reap(&mut self) -> Vec<(u64, KeyOutcome)> {
        self.finished.take().into_iter().collect()
    }
}
