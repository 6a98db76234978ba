//! `memferry kv bench`: store, lookup and load throughput of the KV block
//! store, with the raw limit measured in the same run at the same request
//! size and requests in flight: O_DIRECT random I/O through io_uring on a
//! filesystem root, plain concurrent whole-object PUTs and GETs on an
//! `s3://` root.
//!
//! Keys and contents are derived from the seed, so several processes with
//! the same seed store overlapping keys with identical bytes; every loaded
//! block is compared with what its key must hold.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use bytes::Bytes;

use super::limits::odirect_random;
use super::object::{get_objects, put_objects};
use crate::kv::{
    BlockKey, JobId, JobResult, KeyOutcome, KvConfig, KvLayout, KvStore, KvTensor, Namespace,
};
use crate::memory::{Device, OwnedRegion, Region as _};
use crate::storage::location::Location;
use crate::storage::s3::{ObjectClient, S3Config, S3Overrides};
use crate::transfer::BackendKind;
use crate::units::gib_per_s;
use crate::{Error, Result};

/// What to run.
#[derive(Debug, Clone)]
pub struct KvBenchOptions {
    /// KV root to store into (a directory or `s3://bucket/prefix`).
    pub root: Location,
    /// S3 settings for an `s3://` root (default: the AWS environment).
    pub s3: Option<S3Config>,
    /// Bytes of one KV block (all tensors' pages of one block id).
    pub block_size: u64,
    /// Blocks stored and loaded.
    pub blocks: u64,
    /// Blocks per stored file.
    pub blocks_per_file: u32,
    /// I/O workers while storing.
    pub writers: usize,
    /// I/O workers while loading.
    pub readers: usize,
    /// Keys each worker keeps in flight.
    pub batch: usize,
    /// Seed of keys and contents.
    pub seed: u64,
    /// Leave the blocks in place afterwards.
    pub keep: bool,
    /// Capacity of the store.
    pub capacity: Option<u64>,
    /// Backend for the block bytes.
    pub backend: BackendKind,
    /// Where the KV tensors live (host memory or a CUDA device).
    pub device: Device,
    /// Tensors sharing each block (e.g. 2 x layers); a block's bytes are
    /// split evenly between their pages.
    pub tensors: usize,
}

/// One direction's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// Block-file bytes moved per second.
    pub gib_per_s: f64,
    /// Wall time of the phase.
    pub seconds: f64,
    /// Keys moved.
    pub keys: u64,
    /// The raw limit at the same size and requests in flight, same run:
    /// O_DIRECT random I/O, or plain whole-object PUTs/GETs on S3.
    pub limit_gib_per_s: Option<f64>,
    /// `gib_per_s / limit_gib_per_s`.
    pub ratio: Option<f64>,
    /// Requests in flight (workers x batch), as given to the limit.
    pub queue_depth: usize,
}

/// Single-key load latency.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Samples taken.
    pub samples: usize,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
}

/// Lookup cost with a warm index.
#[derive(Debug, Clone, Serialize)]
pub struct LookupCost {
    /// Keys in the measured prefix.
    pub blocks: usize,
    /// Microseconds per lookup call, scaled to a 1,000-block prefix.
    pub us_per_1000_blocks: f64,
}

/// Everything `kv bench` reports.
#[derive(Debug, Clone, Serialize)]
pub struct KvBenchReport {
    /// Where.
    pub root: String,
    /// Backend asked for.
    pub backend: String,
    /// What the backend ran.
    pub mode: String,
    /// Bytes of one KV block.
    pub block_size: u64,
    /// Bytes of one block file (header, payload, padding).
    pub file_bytes: u64,
    /// Blocks.
    pub blocks: u64,
    /// Blocks per file.
    pub blocks_per_file: u32,
    /// Where the KV tensors lived (`cpu` or `cuda:N`).
    pub device: String,
    /// Tensors sharing each block.
    pub tensors: usize,
    /// Keys (files) stored.
    pub keys: u64,
    /// Store phase; `keys` counts files written (not those already there).
    pub store: Phase,
    /// Keys that were already stored (another process with the same seed).
    pub already_stored: u64,
    /// Load phase, with single-key latency.
    pub load: LoadPhase,
    /// Lookup with a warm index.
    pub lookup: LookupCost,
    /// Stores the full queue refused.
    pub dropped: u64,
    /// Keys that failed, plus loaded blocks whose bytes differ.
    pub failed: u64,
    /// Keys not found at load time (evicted under `--capacity`).
    pub missing: u64,
    /// Why a limit could not be measured.
    pub notes: Vec<String>,
    /// The first failures, key and reason.
    pub failures: Vec<String>,
}

/// The load phase.
#[derive(Debug, Clone, Serialize)]
pub struct LoadPhase {
    /// Throughput.
    #[serde(flatten)]
    pub phase: Phase,
    /// Median single-key load, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile single-key load, milliseconds.
    pub p99_ms: f64,
    /// Latency samples.
    pub latency_samples: usize,
}

/// Runs the benchmark.
pub fn run(o: &KvBenchOptions) -> Result<KvBenchReport> {
    let per_file = o.blocks_per_file.max(1) as u64;
    if o.tensors == 0
        || o.block_size < o.tensors as u64
        || o.blocks == 0
        || !o.blocks.is_multiple_of(per_file)
    {
        return Err(Error::InvalidInput(format!(
            "--blocks {} must be a positive multiple of --blocks-per-file {per_file}, --tensors at least 1, and --block-size at least one byte per tensor",
            o.blocks
        )));
    }
    crate::memory::cuda::check_device(o.device)?;
    let groups = o.blocks / per_file;
    let namespace = Namespace {
        model: format!("memferry-kv-bench/{}B", o.block_size),
        tokens_per_block: 16,
        blocks_per_file: per_file as u32,
        tp_rank: 0,
        tp_size: 1,
        pp_rank: 0,
        pp_size: 1,
        dtype: "uint8".into(),
        layout_version: 1,
    };
    let keys: Vec<BlockKey> = (0..groups).map(|g| bench_key(o.seed, g)).collect();
    let (src_layout, src) = layout(o, true)?;
    let (dst_layout, dst) = layout(o, false)?;
    let mut notes = Vec::new();
    let s3 = match (&o.root, &o.s3) {
        (Location::S3(_), None) => Some(S3Config::from_env(&S3Overrides::default())?),
        (_, s3) => s3.clone(),
    };
    let config = |workers: usize| {
        let mut c = KvConfig::new(o.root.clone(), namespace.clone());
        c.s3 = s3.clone();
        c.backend = o.backend;
        c.workers = workers;
        c.batch = o.batch;
        c.capacity = o.capacity;
        c.store_queue = groups as usize;
        c
    };

    let store_store = KvStore::open(config(o.writers), src_layout)?;
    let file_bytes = store_store.file_bytes();
    // Raw limits go next to the blocks, on the same filesystem or bucket.
    let raw = RawLimit::next_to(&o.root, s3.as_ref(), file_bytes, groups)?;
    let store_qd = o.writers * o.batch;
    let limit_write = raw.measure(store_qd, true, &mut notes);

    let ids: Vec<u64> = (0..o.blocks).collect();
    let t = Instant::now();
    let mut jobs = Vec::new();
    for (chunk_keys, chunk_ids) in keys
        .chunks(o.batch)
        .zip(ids.chunks(o.batch * per_file as usize))
    {
        // SAFETY: the source pages are never written while the bench runs.
        jobs.push(unsafe { store_store.submit_store(chunk_keys, chunk_ids) }?);
    }
    let stored = wait_all(&store_store, &jobs)?;
    let store_secs = t.elapsed().as_secs_f64();
    let count = |rs: &[JobResult], f: &dyn Fn(&KeyOutcome) -> bool| -> u64 {
        rs.iter().map(|r| r.count(f) as u64).sum()
    };
    let written = count(&stored, &|o| *o == KeyOutcome::Stored);
    let already = count(&stored, &|o| *o == KeyOutcome::AlreadyStored);
    let dropped = count(&stored, &|o| *o == KeyOutcome::Dropped);
    let mut failed = count(&stored, &|o| matches!(o, KeyOutcome::Failed(_)));
    let mut failures = Vec::new();
    let note_failures = |rs: &[JobResult], failures: &mut Vec<String>| {
        for r in rs {
            for k in &r.keys {
                if let KeyOutcome::Failed(why) = &k.outcome
                    && failures.len() < 10
                {
                    failures.push(format!("{}: {why}", k.key));
                }
            }
        }
    };
    note_failures(&stored, &mut failures);
    let store_mode = store_store.mode();
    drop(store_store);

    let load_qd = o.readers * o.batch;
    let limit_read = raw.measure(load_qd, false, &mut notes);
    drop(raw);

    let loader = KvStore::open(config(o.readers), dst_layout)?;
    // Lookup with a warm index: one call to confirm, then timed calls.
    let prefix = &keys[..keys.len().min(1000)];
    loader.lookup(prefix);
    let rounds = 200;
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(loader.lookup(prefix));
    }
    let per_call_us = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    let lookup = LookupCost {
        blocks: prefix.len(),
        us_per_1000_blocks: per_call_us * 1000.0 / prefix.len() as f64,
    };

    let present: Vec<usize> = (0..keys.len())
        .filter(|&g| loader.lookup(std::slice::from_ref(&keys[g])) == 1)
        .collect();
    let missing = (keys.len() - present.len()) as u64;
    let t = Instant::now();
    let mut jobs = Vec::new();
    for chunk in present.chunks(o.batch) {
        let ks: Vec<BlockKey> = chunk.iter().map(|&g| keys[g].clone()).collect();
        let ids: Vec<u64> = chunk
            .iter()
            .flat_map(|&g| g as u64 * per_file..(g as u64 + 1) * per_file)
            .collect();
        // SAFETY: destination pages are read only after the jobs finish.
        jobs.push(unsafe { loader.submit_load(&ks, &ids) }?);
    }
    let loaded_results = wait_all(&loader, &jobs)?;
    let load_secs = t.elapsed().as_secs_f64();
    let loaded = count(&loaded_results, &|o| *o == KeyOutcome::Loaded);
    failed += count(&loaded_results, &|o| matches!(o, KeyOutcome::Failed(_)));
    note_failures(&loaded_results, &mut failures);
    // Every loaded block must hold exactly what its key was stored with.
    let page_sizes = pages(o.block_size, o.tensors);
    let (src, dst) = (contents(&src)?, contents(&dst)?);
    let same_page = |t: usize, b: u64| {
        let p = page_sizes[t] as usize;
        let range = b as usize * p..(b as usize + 1) * p;
        dst[t][range.clone()] == src[t][range]
    };
    for r in &loaded_results {
        for k in &r.keys {
            if k.outcome != KeyOutcome::Loaded {
                continue;
            }
            let g = keys.iter().position(|x| *x == k.key).expect("our key") as u64;
            let wrong = (g * per_file..(g + 1) * per_file)
                .any(|b| (0..page_sizes.len()).any(|t| !same_page(t, b)));
            if wrong {
                failed += 1;
                if failures.len() < 10 {
                    failures.push(format!(
                        "{}: loaded and verified, but the bytes differ from what the seed stores",
                        k.key
                    ));
                }
            }
        }
    }

    // Single-key load latency, one request at a time.
    let samples = present.len().clamp(0, 200);
    let mut lat = Vec::with_capacity(samples);
    for &g in present.iter().take(samples) {
        let ids: Vec<u64> = (g as u64 * per_file..(g as u64 + 1) * per_file).collect();
        let t = Instant::now();
        // SAFETY: as above.
        let job = unsafe { loader.submit_load(std::slice::from_ref(&keys[g]), &ids) }?;
        let r = wait_all(&loader, &[job])?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        if !r[0].succeeded() {
            failed += 1;
            note_failures(&r, &mut failures);
        }
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        lat[((lat.len() - 1) as f64 * p).round() as usize]
    };
    let load_mode = loader.mode();
    if !o.keep {
        // Only this run's keys; the namespace directory goes when empty.
        loader.remove(&keys)?;
        let dir = loader.dir().map(|d| d.to_path_buf());
        drop(loader);
        match (dir, &o.root) {
            (Some(dir), _) => remove_if_only_records(&dir),
            (None, Location::S3(url)) => {
                remove_namespace_if_empty(s3.as_ref(), url, &namespace.dir_name())
            }
            (None, Location::Local(_)) => {}
        }
    } else {
        drop(loader);
    }

    let phase = |keys: u64, secs: f64, limit: Option<f64>, qd: usize| {
        let g = gib_per_s(keys * file_bytes, secs);
        Phase {
            gib_per_s: g,
            seconds: secs,
            keys,
            limit_gib_per_s: limit,
            ratio: limit.filter(|l| *l > 0.0).map(|l| g / l),
            queue_depth: qd,
        }
    };
    Ok(KvBenchReport {
        root: o.root.to_string(),
        backend: if o.root.is_s3() {
            "s3".into()
        } else {
            o.backend.to_string()
        },
        mode: if load_mode.is_empty() {
            store_mode
        } else {
            load_mode
        },
        block_size: o.block_size,
        file_bytes,
        blocks: o.blocks,
        blocks_per_file: per_file as u32,
        device: o.device.to_string(),
        tensors: o.tensors,
        keys: groups,
        store: phase(written, store_secs, limit_write, store_qd),
        already_stored: already,
        load: LoadPhase {
            phase: phase(loaded, load_secs, limit_read, load_qd),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            latency_samples: lat.len(),
        },
        lookup,
        dropped,
        failed,
        missing,
        notes,
        failures,
    })
}

/// Where the raw limit is measured, next to the blocks; its scratch data
/// is removed when dropped, on every path.
enum RawLimit {
    /// O_DIRECT random I/O on a scratch file in the KV root.
    Disk { path: PathBuf, bs: u64, count: u64 },
    /// Plain concurrent whole-object PUTs, then GETs, of `keys`.
    Bucket {
        client: Box<ObjectClient>,
        keys: Vec<String>,
        body: Bytes,
    },
}

impl RawLimit {
    fn next_to(root: &Location, s3: Option<&S3Config>, bs: u64, count: u64) -> Result<Self> {
        let scratch = format!(".memferry-kv-bench-limit-{}", std::process::id());
        Ok(match root {
            Location::Local(dir) => RawLimit::Disk {
                path: dir.join(format!("{scratch}.tmp")),
                bs,
                count,
            },
            Location::S3(url) => {
                let cfg = s3.expect("S3 settings are resolved for s3:// roots");
                RawLimit::Bucket {
                    client: Box::new(ObjectClient::new(cfg, &url.bucket)?),
                    keys: (0..count)
                        .map(|i| url.key(&format!("{scratch}/{i:06}")))
                        .collect(),
                    body: Bytes::from(vec![0x5a; bs as usize]),
                }
            }
        })
    }

    /// GiB/s with `qd` requests in flight; a write first (the read reads
    /// what the write left).
    fn measure(&self, qd: usize, write: bool, notes: &mut Vec<String>) -> Option<f64> {
        let r = match self {
            RawLimit::Disk { path, bs, count } => {
                odirect_random(path, *bs as usize, qd, *count, write)
            }
            RawLimit::Bucket { client, keys, body } if write => put_objects(client, keys, body, qd),
            RawLimit::Bucket { client, keys, .. } => get_objects(client, keys, qd),
        };
        match r {
            Ok(g) => Some(g),
            Err(e) => {
                notes.push(format!(
                    "raw {} limit not measured: {e}",
                    if write { "write" } else { "read" }
                ));
                None
            }
        }
    }
}

impl Drop for RawLimit {
    fn drop(&mut self) {
        match self {
            RawLimit::Disk { path, .. } => {
                let _ = std::fs::remove_file(path);
            }
            RawLimit::Bucket { client, keys, .. } => {
                let _ = client.delete_many(keys);
            }
        }
    }
}

/// Deletes a bench namespace on S3 that holds no blocks any more (only its
/// records: namespace, layout, counters, access markers).
fn remove_namespace_if_empty(
    s3: Option<&S3Config>,
    url: &crate::storage::location::S3Url,
    ns: &str,
) {
    let Some(cfg) = s3 else { return };
    let Ok(client) = ObjectClient::new(cfg, &url.bucket) else {
        return;
    };
    let prefix = url.key(ns);
    let Ok(objects) = client.list(&format!("{prefix}/")) else {
        return;
    };
    let is_block = |k: &str| BlockKey::from_file_name(k.rsplit('/').next().unwrap_or(k)).is_some();
    if !objects.iter().any(|o| is_block(&o.key)) {
        let keys: Vec<String> = objects.into_iter().map(|o| o.key).collect();
        let _ = client.delete_many(&keys);
    }
}

/// Removes a namespace directory that holds no blocks any more: only its
/// records and empty fan-out directories.
fn remove_if_only_records(dir: &std::path::Path) {
    let Ok(found) = crate::kv::scan::scan(dir) else {
        return;
    };
    if found.blocks.is_empty() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The key of group `g` under `seed`: 16 bytes, stable across processes.
pub fn bench_key(seed: u64, g: u64) -> BlockKey {
    let a = splitmix(seed ^ splitmix(g));
    let b = splitmix(a ^ 0x6d65_6d66_6572_7279);
    let mut bytes = a.to_be_bytes().to_vec();
    bytes.extend_from_slice(&b.to_be_bytes());
    BlockKey::new(bytes).expect("16 bytes")
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Page sizes of the `n` tensors of one block (the last takes the rest).
fn pages(block_size: u64, n: usize) -> Vec<u64> {
    let each = block_size / n as u64;
    let mut v = vec![each; n];
    v[n - 1] = block_size - each * (n as u64 - 1);
    v
}

/// The bench's tensors on `o.device`, `blocks` pages each; `fill` writes
/// the seed's contents.
fn layout(o: &KvBenchOptions, fill: bool) -> Result<(KvLayout, Vec<Arc<OwnedRegion>>)> {
    let mut regions = Vec::new();
    let mut tensors = Vec::new();
    for (t, page) in pages(o.block_size, o.tensors).into_iter().enumerate() {
        let mut r = OwnedRegion::allocate(o.device, o.blocks * page)?;
        let seeded = |s: &mut [u8]| {
            for b in 0..o.blocks {
                let page_bytes = &mut s[(b * page) as usize..((b + 1) * page) as usize];
                let mut x = splitmix(o.seed ^ splitmix(b * o.tensors as u64 + t as u64 + 1));
                for chunk in page_bytes.chunks_mut(8) {
                    x = splitmix(x);
                    chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
                }
            }
        };
        match (&mut r, fill) {
            (OwnedRegion::Host(h), true) => seeded(h.as_mut_slice()),
            (OwnedRegion::Host(h), false) => {
                h.populate(0, h.len());
            }
            (OwnedRegion::Cuda(c), true) => {
                let mut bytes = vec![0u8; c.len() as usize];
                seeded(&mut bytes);
                // SAFETY: the region was just allocated and is not shared.
                unsafe { c.copy_in(0, &bytes) }?;
                c.context().synchronize()?;
            }
            // Device memory is the device's: nothing to fault in.
            (OwnedRegion::Cuda(_), false) => {}
        }
        let r = Arc::new(r);
        regions.push(r.clone());
        tensors.push(KvTensor {
            region: r,
            num_blocks: o.blocks,
            page_bytes: page,
        });
    }
    Ok((KvLayout::new(tensors)?, regions))
}

/// The bytes of each region, copied back to the host for device memory.
fn contents(regions: &[Arc<OwnedRegion>]) -> Result<Vec<std::borrow::Cow<'_, [u8]>>> {
    regions
        .iter()
        .map(|r| match r.host() {
            Some(h) => Ok(std::borrow::Cow::Borrowed(h.as_slice())),
            None => r.to_vec().map(std::borrow::Cow::Owned),
        })
        .collect()
}

fn wait_all(store: &KvStore, jobs: &[JobId]) -> Result<Vec<JobResult>> {
    let mut out = Vec::with_capacity(jobs.len());
    let deadline = Instant::now() + Duration::from_secs(3600);
    while out.len() < jobs.len() {
        if Instant::now() > deadline {
            return Err(Error::io(
                "waiting for KV bench jobs",
                std::io::ErrorKind::TimedOut.into(),
            ));
        }
        out.extend(store.wait(jobs, Duration::from_secs(1)));
    }
    Ok(out)
}
