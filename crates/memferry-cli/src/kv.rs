//! `memferry kv ...`: operator commands for KV block stores.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use memferry::bench::kv::{KvBenchOptions, KvBenchReport};
use memferry::kv::admin;
use memferry::storage::location::Location;
use memferry::transfer::BackendKind;
use memferry::units::format_bytes;

fn size(s: &str) -> std::result::Result<u64, String> {
    memferry::units::parse_size(s).map_err(|e| e.to_string())
}

/// KV-cache block stores on local and shared filesystems and S3 buckets.
#[derive(Args, Debug)]
pub struct KvArgs {
    #[command(subcommand)]
    pub command: KvCommand,
}

#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Measure store, lookup and load of KV blocks against the raw disk or
    /// plain PUT/GET loops on S3.
    Bench(KvBenchArgs),
    /// Blocks, bytes and counters of a KV root or one namespace directory.
    Stats(KvDirArgs),
    /// Remove least recently used blocks until at most --to bytes remain.
    Evict(KvEvictArgs),
    /// Read every block, check header and checksum, report corrupt ones.
    Verify(KvVerifyArgs),
}

#[derive(Args, Debug)]
pub struct KvBenchArgs {
    /// KV root: a directory or s3://bucket/prefix (created namespaces go
    /// inside).
    #[arg(long, env = "MEMFERRY_KV_ROOT")]
    pub root: PathBuf,
    /// Bytes of one KV block (all tensors' pages of one block id).
    #[arg(long, env = "MEMFERRY_KV_BLOCK_SIZE", value_parser = size, default_value = "2MiB")]
    pub block_size: u64,
    /// Blocks to store and load.
    #[arg(long, env = "MEMFERRY_KV_BLOCKS", default_value_t = 256)]
    pub blocks: u64,
    /// Blocks stored together in one file.
    #[arg(long, env = "MEMFERRY_KV_BLOCKS_PER_FILE", default_value_t = 1)]
    pub blocks_per_file: u32,
    /// I/O workers while storing.
    #[arg(long, env = "MEMFERRY_KV_WRITERS", default_value_t = 4)]
    pub writers: usize,
    /// I/O workers while loading.
    #[arg(long, env = "MEMFERRY_KV_READERS", default_value_t = 4)]
    pub readers: usize,
    /// Keys each worker keeps in flight.
    #[arg(long, env = "MEMFERRY_KV_BATCH", default_value_t = 4)]
    pub batch: usize,
    /// Seed of keys and contents (same seed, same keys and bytes); random
    /// when not given.
    #[arg(long, env = "MEMFERRY_KV_SEED")]
    pub seed: Option<u64>,
    /// Leave the blocks in place afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Capacity of the store in bytes (LRU eviction beyond it).
    #[arg(long, env = "MEMFERRY_KV_CAPACITY", value_parser = size)]
    pub capacity: Option<u64>,
    /// Backend for block files: auto (direct where it works), buffered or
    /// direct (ignored on S3).
    #[arg(long, env = "MEMFERRY_BACKEND", default_value = "auto")]
    pub backend: BackendKind,
    /// Where the KV tensors live: cpu, or cuda:N (pages then move through
    /// pinned staging).
    #[arg(long, env = "MEMFERRY_KV_DEVICE", default_value = "cpu")]
    pub device: memferry::memory::Device,
    /// Tensors sharing each block (an engine has two per layer); the block
    /// is split evenly between their pages.
    #[arg(long, env = "MEMFERRY_KV_TENSORS", default_value_t = 2)]
    pub tensors: usize,
}

#[derive(Args, Debug)]
pub struct KvDirArgs {
    /// A KV root or one of its namespace directories.
    pub dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct KvEvictArgs {
    /// A KV root or one of its namespace directories.
    pub dir: PathBuf,
    /// Bytes of block files to keep at most (e.g. 100GiB).
    #[arg(long, value_parser = size)]
    pub to: u64,
}

#[derive(Args, Debug)]
pub struct KvVerifyArgs {
    /// A KV root or one of its namespace directories.
    pub dir: PathBuf,
    /// Remove the corrupt blocks (their keys become misses).
    #[arg(long)]
    pub repair: bool,
}

/// The op name used in JSON output.
pub fn op_name(a: &KvArgs) -> &'static str {
    match a.command {
        KvCommand::Bench(_) => "kv bench",
        KvCommand::Stats(_) => "kv stats",
        KvCommand::Evict(_) => "kv evict",
        KvCommand::Verify(_) => "kv verify",
    }
}

pub fn run(a: KvArgs, s3: &crate::args::S3Args, json: bool) -> Result<()> {
    let op = op_name(&a);
    match a.command {
        KvCommand::Bench(b) => bench(b, s3, json),
        KvCommand::Stats(d) => {
            let s = admin::stats(&d.dir)?;
            if json {
                print_json(op, serde_json::to_value(&s)?)?;
            } else {
                for ns in &s.namespaces {
                    println!(
                        "{}: {} blocks, {} ({} hits, {} misses, {} stores, {} dropped, {} evictions)",
                        ns.dir.display(),
                        ns.blocks,
                        format_bytes(ns.bytes),
                        ns.counters.hits,
                        ns.counters.misses,
                        ns.counters.stores,
                        ns.counters.dropped,
                        ns.counters.evictions
                    );
                }
                println!(
                    "total: {} blocks, {}; hits {}, misses {}, evictions {}",
                    s.blocks,
                    format_bytes(s.bytes),
                    s.counters.hits,
                    s.counters.misses,
                    s.counters.evictions
                );
            }
            Ok(())
        }
        KvCommand::Evict(e) => {
            let r = admin::evict(&e.dir, e.to)?;
            if json {
                print_json(op, serde_json::to_value(&r)?)?;
            } else {
                println!(
                    "evicted {} blocks ({}); {} remain (limit {})",
                    r.evicted,
                    format_bytes(r.freed_bytes),
                    format_bytes(r.remaining_bytes),
                    format_bytes(r.target_bytes)
                );
            }
            Ok(())
        }
        KvCommand::Verify(v) => {
            let r = admin::verify(&v.dir, v.repair)?;
            let bad = r.corrupt.len();
            let message = format!(
                "{bad} of {} blocks are corrupt{}",
                r.checked,
                if v.repair {
                    format!(" ({} removed)", r.removed)
                } else {
                    " (run with --repair to remove them)".into()
                }
            );
            if json {
                let mut value = serde_json::to_value(&r)?;
                value["op"] = op.into();
                value["ok"] = (bad == 0).into();
                if bad > 0 {
                    value["error"] = message.clone().into();
                }
                println!("{value}");
            } else {
                for c in &r.corrupt {
                    println!("corrupt {} {}: {}", c.key, c.path.display(), c.reason);
                }
                for c in &r.foreign {
                    println!("kept {} {}: {}", c.key, c.path.display(), c.reason);
                }
                println!(
                    "checked {} blocks: {} ok, {bad} corrupt, {} of another format version, namespace or page layout (kept)",
                    r.checked,
                    r.ok,
                    r.foreign.len()
                );
            }
            if bad > 0 {
                return Err(crate::AlreadyReported { code: 3, message }.into());
            }
            Ok(())
        }
    }
}

fn bench(b: KvBenchArgs, s3: &crate::args::S3Args, json: bool) -> Result<()> {
    let root = Location::parse(&b.root)?;
    let s3 = if root.is_s3() {
        Some(s3.config()?)
    } else {
        None
    };
    let seed = b.seed.unwrap_or_else(|| {
        u64::from_str_radix(&memferry::storage::durable::unique_id(), 16).unwrap_or(1)
    });
    let o = KvBenchOptions {
        root,
        s3,
        block_size: b.block_size,
        blocks: b.blocks,
        blocks_per_file: b.blocks_per_file,
        writers: b.writers,
        readers: b.readers,
        batch: b.batch,
        seed,
        keep: b.keep,
        capacity: b.capacity,
        backend: b.backend,
        device: b.device,
        tensors: b.tensors,
    };
    let r = memferry::bench::kv::run(&o)?;
    let message = format!(
        "{} keys failed or loaded wrong bytes; the first: {}",
        r.failed,
        r.failures.join("; ")
    );
    if json {
        let mut value = serde_json::to_value(&r)?;
        value["op"] = "kv bench".into();
        value["ok"] = (r.failed == 0).into();
        value["seed"] = seed.into();
        if r.failed > 0 {
            value["error"] = message.clone().into();
        }
        println!("{value}");
    } else {
        print_bench(&r, seed);
    }
    if r.failed > 0 {
        return Err(crate::AlreadyReported { code: 1, message }.into());
    }
    Ok(())
}

fn print_bench(r: &KvBenchReport, seed: u64) {
    let limit = |l: Option<f64>, ratio: Option<f64>| match (l, ratio) {
        (Some(l), Some(x)) => format!("limit {l:.2} GiB/s, {:.0}%", x * 100.0),
        _ => "limit not measured".into(),
    };
    println!(
        "kv bench: {} blocks of {} in {} tensors on {} ({} per file, files of {}) under {}, backend {} ({}), seed {seed}",
        r.blocks,
        format_bytes(r.block_size),
        r.tensors,
        r.device,
        r.blocks_per_file,
        format_bytes(r.file_bytes),
        r.root,
        r.backend,
        r.mode
    );
    println!(
        "  store  {:>7.2} GiB/s  ({}; queue depth {})  {} written, {} already stored",
        r.store.gib_per_s,
        limit(r.store.limit_gib_per_s, r.store.ratio),
        r.store.queue_depth,
        r.store.keys,
        r.already_stored
    );
    let l = &r.load.phase;
    println!(
        "  load   {:>7.2} GiB/s  ({}; queue depth {})  {} loaded; single key p50 {:.2} ms, p99 {:.2} ms",
        l.gib_per_s,
        limit(l.limit_gib_per_s, l.ratio),
        l.queue_depth,
        l.keys,
        r.load.p50_ms,
        r.load.p99_ms
    );
    println!(
        "  lookup {:>7.1} us per 1000-block prefix (warm index, measured on {} keys)",
        r.lookup.us_per_1000_blocks, r.lookup.blocks
    );
    println!(
        "  dropped {}  failed {}  missing {}",
        r.dropped, r.failed, r.missing
    );
    for n in &r.notes {
        println!("  note: {n}");
    }
}

fn print_json(op: &str, mut value: serde_json::Value) -> Result<()> {
    value["op"] = op.into();
    value["ok"] = true.into();
    println!("{value}");
    Ok(())
}
