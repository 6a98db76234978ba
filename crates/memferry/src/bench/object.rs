//! `memferry bench --location s3://bucket/prefix`: save and restore of a
//! synthetic snapshot in a bucket, measured against raw loops on the same
//! server in the same run:
//! - GET limit: 16 (the configured concurrency) concurrent 8 MiB ranged GETs
//!   over the snapshot's shard objects, bytes counted and dropped;
//! - PUT limit: 16 concurrent PUTs of 8 MiB objects, as many bytes as the
//!   snapshot.
//!
//! Runs are paired and their order rotates, so drift hits every figure
//! alike. The prefix must be empty at the start; everything the bench wrote
//! is deleted at the end, also after an error.

use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;

use super::stats::Measurement;
use crate::snapshot::remote;
use crate::snapshot::save::SaveOptions;
use crate::snapshot::source::synthetic;
use crate::storage::location::S3Url;
use crate::storage::s3::ObjectClient;
use crate::transfer::Tuning;
use crate::units::gib_per_s;
use crate::{Error, Result};

/// Size of one raw-loop request.
pub const RAW_REQUEST: u64 = 8 << 20;

/// What to measure.
#[derive(Debug, Clone)]
pub struct ObjectBenchOptions {
    /// Snapshot size.
    pub size: u64,
    /// Runs per figure.
    pub runs: usize,
    /// Shard size of the snapshot.
    pub shard_size: u64,
    /// Request size of save/restore (at least 8 MiB).
    pub chunk_size: u64,
}

/// The figures, GiB/s medians with spreads.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectBenchReport {
    /// Where.
    pub location: String,
    /// Endpoint and addressing (no secrets).
    pub server: String,
    /// Snapshot bytes.
    pub size: u64,
    /// Runs per figure.
    pub runs: usize,
    /// Requests in flight (memferry and the raw loops alike).
    pub concurrency: usize,
    /// `memferry save` (whole operation, commit included).
    pub save: Measurement,
    /// `memferry restore` (whole operation, checksums verified).
    pub restore: Measurement,
    /// Raw parallel PUTs of 8 MiB objects.
    pub put_limit: Measurement,
    /// Raw parallel 8 MiB ranged GETs.
    pub get_limit: Measurement,
    /// restore / GET limit, percent.
    pub restore_percent_of_limit: f64,
    /// save / PUT limit, percent.
    pub save_percent_of_limit: f64,
    /// Wall seconds of the whole bench.
    pub seconds: f64,
}

/// Runs the bench at `url` (see the module docs).
pub fn run(
    client: &ObjectClient,
    url: &S3Url,
    opts: &ObjectBenchOptions,
    say: &mut dyn FnMut(&str),
) -> Result<ObjectBenchReport> {
    let t = Instant::now();
    if opts.runs == 0 {
        return Err(Error::InvalidInput("--runs must be at least 1".into()));
    }
    let base = format!("{}/", url.prefix);
    if !client.list(&base)?.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{url} is not empty: the bench writes and deletes its own objects there, so give it an empty prefix"
        )));
    }
    let result = measure(client, url, opts, say);
    let leftovers: Vec<String> = client
        .list(&base)
        .unwrap_or_default()
        .into_iter()
        .map(|o| o.key)
        .collect();
    let cleanup = client.delete_many(&leftovers);
    let (save, restore, put, get) = result?;
    cleanup?;
    let m = |runs: Vec<f64>| Measurement::from_runs(runs).expect("at least one run");
    let (save, restore, put_limit, get_limit) = (m(save), m(restore), m(put), m(get));
    Ok(ObjectBenchReport {
        location: url.to_string(),
        server: client.config().describe(),
        size: opts.size,
        runs: opts.runs,
        concurrency: client.config().concurrency,
        restore_percent_of_limit: 100.0 * restore.median / get_limit.median.max(f64::MIN_POSITIVE),
        save_percent_of_limit: 100.0 * save.median / put_limit.median.max(f64::MIN_POSITIVE),
        save,
        restore,
        put_limit,
        get_limit,
        seconds: t.elapsed().as_secs_f64(),
    })
}

type Runs = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

fn measure(
    client: &ObjectClient,
    url: &S3Url,
    opts: &ObjectBenchOptions,
    say: &mut dyn FnMut(&str),
) -> Result<Runs> {
    let source = synthetic(opts.size, 7)?.into_source();
    let save_opts = SaveOptions {
        shard_size: opts.shard_size,
        tuning: Tuning {
            chunk_size: opts.chunk_size,
            ..Tuning::default()
        },
        ..SaveOptions::default()
    };
    let load_opts = crate::snapshot::LoadOptions {
        tuning: save_opts.tuning.clone(),
        ..Default::default()
    };
    let block = Bytes::from(vec![0x5au8; RAW_REQUEST as usize]);
    let (mut save, mut restore, mut put, mut get) = (vec![], vec![], vec![], vec![]);
    for run in 0..opts.runs {
        for step in 0..4 {
            match (step + run) % 4 {
                0 => {
                    let r = remote::save(&source, client, url, &save_opts)?;
                    say(&format!("run {run}: save {:.3} GiB/s", r.gib_per_s));
                    save.push(r.gib_per_s);
                }
                1 => {
                    if remote::read_manifest(client, url)?.is_none() {
                        remote::save(&source, client, url, &save_opts)?;
                    }
                    let (_, r) = remote::restore(client, url, &load_opts)?;
                    say(&format!("run {run}: restore {:.3} GiB/s", r.gib_per_s));
                    restore.push(r.gib_per_s);
                }
                2 => {
                    let g = raw_puts(client, url, opts.size, &block)?;
                    say(&format!("run {run}: raw PUT loop {g:.3} GiB/s"));
                    put.push(g);
                }
                _ => {
                    if remote::read_manifest(client, url)?.is_none() {
                        remote::save(&source, client, url, &save_opts)?;
                    }
                    let g = raw_gets(client, url)?;
                    say(&format!("run {run}: raw GET loop {g:.3} GiB/s"));
                    get.push(g);
                }
            }
        }
    }
    Ok((save, restore, put, get))
}

/// 16 concurrent 8 MiB ranged GETs over every shard of the snapshot.
fn raw_gets(client: &ObjectClient, url: &S3Url) -> Result<f64> {
    let snap = remote::open(client, url)?;
    let mut ranges = Vec::new();
    for (i, s) in snap.manifest.shards.iter().enumerate() {
        let key = snap.shard_key(i);
        let mut off = 0;
        while off < s.size {
            let end = (off + RAW_REQUEST).min(s.size);
            ranges.push((key.clone(), off..end));
            off = end;
        }
    }
    let t = Instant::now();
    let store = client.store();
    let bytes: Vec<u64> = client.run(
        futures::stream::iter(ranges.into_iter().map(|(k, r)| async move {
            let opts = GetOptions::new().with_range(Some(GetRange::Bounded(r)));
            let res = store
                .get_opts(&ObjectPath::from(k.as_str()), opts)
                .await
                .map_err(|e| client.error("GET", &k, e))?;
            let mut n = 0u64;
            let mut body = res.into_stream();
            while let Some(c) = body.next().await {
                n += c.map_err(|e| client.error("GET", &k, e))?.len() as u64;
            }
            Ok::<u64, Error>(n)
        }))
        .buffer_unordered(client.config().concurrency)
        .try_collect(),
    )?;
    Ok(gib_per_s(bytes.iter().sum(), t.elapsed().as_secs_f64()))
}

/// 16 concurrent PUTs of 8 MiB objects, `total` bytes in all (then deleted).
fn raw_puts(client: &ObjectClient, url: &S3Url, total: u64, block: &Bytes) -> Result<f64> {
    let count = total.div_ceil(RAW_REQUEST).max(1);
    let keys: Vec<String> = (0..count)
        .map(|i| url.key(&format!("raw-put/{i:06}")))
        .collect();
    let g = put_objects(client, &keys, block, client.config().concurrency)?;
    client.delete_many(&keys)?;
    Ok(g)
}

/// The raw PUT loop: `body` to every key, `in_flight` requests at once;
/// GiB/s.
pub(crate) fn put_objects(
    client: &ObjectClient,
    keys: &[String],
    body: &Bytes,
    in_flight: usize,
) -> Result<f64> {
    let t = Instant::now();
    let store = client.store();
    client.run(
        futures::stream::iter(keys.iter().map(|k| async move {
            store
                .put(
                    &ObjectPath::from(k.as_str()),
                    PutPayload::from(body.clone()),
                )
                .await
                .map(|_| ())
                .map_err(|e| client.error("PUT", k, e))
        }))
        .buffer_unordered(in_flight.max(1))
        .try_collect::<Vec<()>>(),
    )?;
    Ok(gib_per_s(
        keys.len() as u64 * body.len() as u64,
        t.elapsed().as_secs_f64(),
    ))
}

/// The raw GET loop: every key whole, `in_flight` requests at once; GiB/s.
pub(crate) fn get_objects(client: &ObjectClient, keys: &[String], in_flight: usize) -> Result<f64> {
    let t = Instant::now();
    let store = client.store();
    let bytes: Vec<u64> = client.run(
        futures::stream::iter(keys.iter().map(|k| async move {
            let res = store
                .get(&ObjectPath::from(k.as_str()))
                .await
                .map_err(|e| client.error("GET", k, e))?;
            let mut n = 0u64;
            let mut body = res.into_stream();
            while let Some(c) = body.next().await {
                n += c.map_err(|e| client.error("GET", k, e))?.len() as u64;
            }
            Ok::<u64, Error>(n)
        }))
        .buffer_unordered(in_flight.max(1))
        .try_collect(),
    )?;
    Ok(gib_per_s(bytes.iter().sum(), t.elapsed().as_secs_f64()))
}
