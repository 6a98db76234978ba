//! The KV block store against real files: round trips, per-key failures,
//! eviction, the job engine's queue rules, restarts and bad input.
//! Needs root for the tmpfs mounts (disk full, read-only root).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memferry::kv::{BlockKey, JobId, JobResult, KeyOutcome, KvConfig, KvLayout, KvStore, KvTensor};
use memferry::memory::{HostRegion, Region};
use memferry::transfer::{BackendKind, Tuning};
use memferry_test_support::Mount;
use memferry_test_support::files::{files_where, kv_block_files};
use memferry_test_support::kv::{self, namespace, outcomes, wait_one};

const BLOCKS: u64 = 32;
/// Two tensors per block, one of them with a page size that is not a
/// multiple of 4096, so gathers are scattered and unaligned, and O_DIRECT
/// cannot move the pages in place (staged).
const PAGES: [u64; 2] = [8192, 3000];
/// Pages O_DIRECT can move in place (zero copy).
const ALIGNED_PAGES: [u64; 2] = [8192, 4096];

/// The model of every namespace here.
const MODEL: &str = "test/model";

/// Tensors whose every page holds a pattern derived from (seed, tensor,
/// block); seed 0 gives zeroed memory.
fn tensors(seed: u64) -> (KvLayout, Vec<Arc<HostRegion>>) {
    tensors_of(seed, PAGES)
}

/// Like [`tensors`], with the given page sizes.
fn tensors_of(seed: u64, pages: [u64; 2]) -> (KvLayout, Vec<Arc<HostRegion>>) {
    kv::tensors(seed, &pages, BLOCKS)
}

/// One tensor of `BLOCKS` pages of 1 MiB: with 512 bytes per system call a
/// key takes thousands of calls, so a single worker stays provably busy.
fn big_layout() -> KvLayout {
    let big = Arc::new(HostRegion::new(BLOCKS << 20).unwrap());
    KvLayout::new(vec![KvTensor {
        region: big,
        num_blocks: BLOCKS,
        page_bytes: 1 << 20,
    }])
    .unwrap()
}

fn slow(root: &Path) -> KvConfig {
    let mut c = config(root, 1, BackendKind::Buffered);
    c.namespace.model = "test/big-pages".into();
    c.workers = 1;
    c.batch = 1;
    // Slow I/O: 512 bytes per system call.
    c.tuning = Tuning {
        max_bytes_per_call: Some(512),
        ..Tuning::default()
    };
    c
}

fn page(regions: &[Arc<HostRegion>], t: usize, block: u64) -> &[u8] {
    kv::page(regions, BLOCKS, t, block)
}

fn key(i: u64) -> BlockKey {
    BlockKey::new(format!("key-{i:04}").into_bytes()).unwrap()
}

fn config(root: &Path, per_file: u32, backend: BackendKind) -> KvConfig {
    let mut c = KvConfig::new(root, namespace(MODEL, per_file));
    c.backend = backend;
    c
}

fn store_keys(store: &KvStore, keys: &[BlockKey], ids: &[u64]) -> JobResult {
    // SAFETY: the test does not touch the source pages while the job runs.
    let job = unsafe { store.submit_store(keys, ids) }.unwrap();
    wait_one(store, job)
}

fn load_keys(store: &KvStore, keys: &[BlockKey], ids: &[u64]) -> JobResult {
    // SAFETY: the test does not touch the destination pages while the job runs.
    let job = unsafe { store.submit_load(keys, ids) }.unwrap();
    wait_one(store, job)
}

/// Temporary files (`.tmp-` in the name) below `dir`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    files_where(dir, |p| p.to_string_lossy().contains(".tmp-"))
}

#[test]
fn round_trips_with_1_2_and_4_blocks_per_file_and_a_partial_first_group() {
    // (pages, backend, most bytes per request): zero copy and staged, whole
    // files and short transfers resumed mid-page.
    let cases = [
        (
            PAGES,
            BackendKind::Buffered,
            None,
            "buffered-uring, zero-copy",
        ),
        (PAGES, BackendKind::Direct, None, "odirect-uring, staged"),
        (
            ALIGNED_PAGES,
            BackendKind::Direct,
            None,
            "odirect-uring, zero-copy",
        ),
        (
            ALIGNED_PAGES,
            BackendKind::Direct,
            Some(5000),
            "odirect-uring, zero-copy",
        ),
        (
            PAGES,
            BackendKind::Buffered,
            Some(5000),
            "buffered-uring, zero-copy",
        ),
        (
            PAGES,
            BackendKind::Direct,
            Some(5000),
            "odirect-uring, staged",
        ),
    ];
    for (pages, backend, cap, expected) in cases {
        for per_file in [1u32, 2, 4] {
            let what = format!("{backend} pages {pages:?} cap {cap:?} per_file {per_file}");
            let root = tempfile::tempdir().unwrap();
            let mut c = config(root.path(), per_file, backend);
            c.tuning.max_bytes_per_call = cap;
            let (src, src_mem) = tensors_of(7, pages);
            let store = KvStore::open(c.clone(), src).unwrap();
            let pf = per_file as u64;
            let keys: Vec<BlockKey> = (0..3).map(key).collect();
            // Source blocks 5.. in groups of `per_file`.
            let ids: Vec<u64> = (5..5 + 3 * pf).collect();
            let r = store_keys(&store, &keys, &ids);
            assert!(r.succeeded(), "{what}: {r:?}");
            assert_eq!(r.bytes, 3 * pf * (pages[0] + pages[1]));
            assert_eq!(store.lookup(&keys), 3);
            assert_eq!(store.mode(), expected, "{what}");
            drop(store);
            // Every stored file is a valid block (header, checksum, padding).
            let report = memferry::kv::admin::verify(root.path(), false).unwrap();
            assert_eq!((report.checked, report.ok), (3, 3), "{what}: {report:?}");

            // Another process's view: fresh zeroed memory, same namespace.
            let (dst, dst_mem) = tensors_of(0, pages);
            let store = KvStore::open(c, dst).unwrap();
            assert_eq!(store.lookup(&keys), 3, "found after restart");
            // The request starts at the last block of the first group.
            let first = 1;
            let n = first + 2 * pf;
            let targets: Vec<u64> = (20..20 + n).collect();
            let r = load_keys(&store, &keys, &targets);
            assert!(r.succeeded(), "{what}: {r:?}");
            assert_eq!(r.bytes, n * (pages[0] + pages[1]));
            assert_eq!(store.mode(), expected, "{what}");
            // Source block of each target: the tail of group 0, then groups 1, 2.
            let sources: Vec<u64> = ids[(pf - first) as usize..].to_vec();
            for (&t, &s) in targets.iter().zip(&sources) {
                for tensor in 0..2 {
                    assert!(
                        page(&dst_mem, tensor, t) == page(&src_mem, tensor, s),
                        "{what}: block {t} (from {s}) tensor {tensor} differs"
                    );
                }
            }
            // Pages that were not named stay untouched (zero).
            assert!(page(&dst_mem, 0, 19).iter().all(|&b| b == 0));
            assert!(page(&dst_mem, 1, 20 + n).iter().all(|&b| b == 0));
        }
    }
}

/// ramfs refuses O_DIRECT: blocks go through the page cache on the same
/// engine, the mode says why, and the bytes round-trip.
#[test]
fn a_root_that_refuses_o_direct_falls_back_to_the_page_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let ram = Mount::new("ramfs", Some("mode=755"), &tmp.path().join("ram"));
    let (src, src_mem) = tensors(5);
    let c = config(&ram.dir, 2, BackendKind::Direct);
    let store = KvStore::open(c.clone(), src).unwrap();
    let keys: Vec<BlockKey> = (0..4).map(key).collect();
    let ids: Vec<u64> = (0..8).collect();
    let r = store_keys(&store, &keys, &ids);
    assert!(r.succeeded(), "{r:?}");
    let mode = store.mode();
    assert!(
        mode.starts_with("buffered-fallback") && mode.contains("O_DIRECT"),
        "{mode}"
    );
    drop(store);
    let (dst, dst_mem) = tensors(0);
    let store = KvStore::open(c, dst).unwrap();
    let r = load_keys(&store, &keys, &ids);
    assert!(r.succeeded(), "{r:?}");
    for b in 0..8 {
        for t in 0..2 {
            assert!(page(&dst_mem, t, b) == page(&src_mem, t, b), "block {b}");
        }
    }
    assert!(
        store.mode().starts_with("buffered-fallback"),
        "{}",
        store.mode()
    );
}

#[test]
fn corrupt_truncated_missing_and_foreign_blocks_fail_per_key() {
    // Staged (checked in the slot before any page is written) and zero
    // copy (checked on the pages after the read).
    corrupt_truncated_missing_and_foreign_with(PAGES, "odirect-uring, staged");
    corrupt_truncated_missing_and_foreign_with(ALIGNED_PAGES, "odirect-uring, zero-copy");
}

fn corrupt_truncated_missing_and_foreign_with(pages: [u64; 2], mode: &str) {
    let root = tempfile::tempdir().unwrap();
    let (src, src_mem) = tensors_of(3, pages);
    let store = KvStore::open(config(root.path(), 1, BackendKind::Direct), src).unwrap();
    let keys: Vec<BlockKey> = (0..5).map(key).collect();
    assert!(store_keys(&store, &keys, &[0, 1, 2, 3, 4]).succeeded());
    let path = |i: u64| store.dir().unwrap().join(key(i).rel_path());
    // 1: one payload bit flipped.
    let mut bytes = std::fs::read(path(1)).unwrap();
    bytes[4096 + 100] ^= 0x10;
    std::fs::write(path(1), &bytes).unwrap();
    // 2: truncated.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path(2))
        .unwrap();
    f.set_len(4096 + 10).unwrap();
    // 3: missing.
    std::fs::remove_file(path(3)).unwrap();
    // 4: a block of another namespace under this key's name.
    let (other_mem, _) = tensors_of(3, pages);
    let mut ns = namespace(MODEL, 1);
    ns.tp_size = 2;
    let other_root = tempfile::tempdir().unwrap();
    let mut c = KvConfig::new(other_root.path(), ns);
    c.backend = BackendKind::Buffered;
    let other = KvStore::open(c, other_mem).unwrap();
    assert!(store_keys(&other, &[key(4)], &[4]).succeeded());
    std::fs::copy(other.dir().unwrap().join(key(4).rel_path()), path(4)).unwrap();

    let (dst, dst_mem) = tensors_of(0, pages);
    let reader = KvStore::open(config(root.path(), 1, BackendKind::Direct), dst).unwrap();
    let r = load_keys(&reader, &keys, &[10, 11, 12, 13, 14]);
    assert_eq!(reader.mode(), mode);
    let o = outcomes(&r);
    assert_eq!(o[0], KeyOutcome::Loaded);
    for t in 0..2 {
        assert!(page(&dst_mem, t, 10) == page(&src_mem, t, 0), "tensor {t}");
    }
    let reason = |i: usize| match &o[i] {
        KeyOutcome::Failed(m) => m.clone(),
        other => panic!("key {i}: expected a failure, got {other:?}"),
    };
    assert!(reason(1).contains("checksum mismatch"), "{}", reason(1));
    assert!(reason(2).contains("truncated"), "{}", reason(2));
    assert!(reason(3).contains("missing"), "{}", reason(3));
    assert!(reason(4).contains("another namespace"), "{}", reason(4));
    for i in 1..5 {
        assert!(
            reason(i).contains(&key(i as u64).hex()),
            "names the file: {}",
            reason(i)
        );
    }
    assert!(!r.succeeded());
    assert_eq!(r.bytes, pages[0] + pages[1], "only the good key counts");
    assert_eq!(reader.stats().counters.failed, 4);
    assert_eq!(
        reader.lookup(&[key(3)]),
        0,
        "the index forgets missing keys"
    );
    // The corrupt and foreign files were removed, so lookups miss them and
    // the next store writes them again instead of skipping a bad block.
    assert!(reason(1).contains("removed"), "{}", reason(1));
    assert_eq!(reader.lookup(&[key(1)]), 0);
    // A valid block of another namespace is refused but never deleted;
    // lookups miss it, so the engine stores it again.
    assert!(!reason(4).contains("removed"), "{}", reason(4));
    assert!(path(4).exists());
    assert_eq!(reader.lookup(&[key(4)]), 0);
    assert_eq!(reader.lookup(&[key(0)]), 1);
    drop(dst_mem);
}

/// A block of the right size that loads refuse but never delete (an older
/// format version, another namespace) is a miss from then on, also after a
/// rescan finds its file again, until a store replaces it.
#[test]
fn a_block_a_load_refuses_is_a_miss_until_a_store_replaces_it() {
    let root = tempfile::tempdir().unwrap();
    let c = config(root.path(), 1, BackendKind::Buffered);
    let (src, src_mem) = tensors(3);
    let writer = KvStore::open(c.clone(), src).unwrap();
    let keys: Vec<BlockKey> = (0..2).map(key).collect();
    assert!(store_keys(&writer, &keys, &[0, 1]).succeeded());
    let path = |i: u64| writer.dir().unwrap().join(key(i).rel_path());
    // Key 0: a block of an older format version (its header rewritten as
    // version 1, the header checksum fixed).
    let mut bytes = std::fs::read(path(0)).unwrap();
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = memferry::integrity::crc32c(&bytes[..104]);
    bytes[104..108].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(path(0), bytes).unwrap();
    // Key 1: a block of another namespace, the same size.
    let mut ns = namespace(MODEL, 1);
    ns.tp_size = 2;
    let other_root = tempfile::tempdir().unwrap();
    let mut oc = KvConfig::new(other_root.path(), ns);
    oc.backend = BackendKind::Buffered;
    let other = KvStore::open(oc, tensors(3).0).unwrap();
    assert!(store_keys(&other, &keys[1..], &[1]).succeeded());
    std::fs::copy(other.dir().unwrap().join(key(1).rel_path()), path(1)).unwrap();

    let (dst, dst_mem) = tensors(0);
    let reader = KvStore::open(c, dst).unwrap();
    assert_eq!(reader.lookup(&keys), 2, "same size: indexed by the scan");
    let r = load_keys(&reader, &keys, &[10, 11]);
    let o = outcomes(&r);
    assert!(
        matches!(&o[0], KeyOutcome::Failed(m) if m.contains("version 1")),
        "{o:?}"
    );
    assert!(
        matches!(&o[1], KeyOutcome::Failed(m) if m.contains("another namespace")),
        "{o:?}"
    );
    assert!(
        path(0).exists() && path(1).exists(),
        "refused, never deleted"
    );
    assert_eq!(reader.lookup(&keys[..1]), 0);
    assert_eq!(reader.lookup(&keys[1..]), 0);
    assert_eq!(reader.contains(&keys), [false, false]);
    // A rescan finds the files again, unchanged: still misses.
    reader.rescan().unwrap();
    assert_eq!(reader.lookup(&keys[..1]), 0);
    assert_eq!(reader.contains(&keys), [false, false]);

    // The engine stores them again: the store replaces the file (key 0,
    // this process) ...
    let r = store_keys(&reader, &keys[..1], &[5]);
    assert_eq!(outcomes(&r), [KeyOutcome::Stored]);
    // ... or another process does (key 1), which this one then sees.
    let r = store_keys(&writer, &keys[1..], &[1]);
    assert_eq!(outcomes(&r), [KeyOutcome::Stored]);
    assert_eq!(reader.lookup(&keys), 2);
    let r = load_keys(&reader, &keys, &[20, 21]);
    assert!(r.succeeded(), "{r:?}");
    for t in 0..2 {
        assert!(page(&dst_mem, t, 20) == page(&dst_mem, t, 5), "tensor {t}");
        assert!(page(&dst_mem, t, 21) == page(&src_mem, t, 1), "tensor {t}");
    }
}

/// A header whose checksum is valid but whose payload length is absurd
/// (near `u64::MAX`, so padding it wraps) is a corrupt block for `verify`
/// and a failed key for a load, never a panic.
#[test]
fn a_header_with_an_impossible_payload_length_is_corrupt() {
    let root = tempfile::tempdir().unwrap();
    let c = config(root.path(), 1, BackendKind::Buffered);
    let store = KvStore::open(c.clone(), tensors(2).0).unwrap();
    let keys: Vec<BlockKey> = (0..3).map(key).collect();
    assert!(store_keys(&store, &keys, &[0, 1, 2]).succeeded());
    let path = |i: u64| store.dir().unwrap().join(key(i).rel_path());
    let craft = |i: u64, payload_len: u64, file_len: usize| {
        let mut bytes = std::fs::read(path(i)).unwrap();
        bytes.truncate(file_len);
        bytes[24..32].copy_from_slice(&payload_len.to_le_bytes());
        let crc = memferry::integrity::crc32c(&bytes[..104]);
        bytes[104..108].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(path(i), bytes).unwrap();
    };
    let full = store.file_bytes() as usize;
    // Padded, the length wraps to 0: the size check sees a header-only file.
    craft(0, u64::MAX - 10, 4096);
    craft(1, u64::MAX - 10, full);
    craft(2, 1 << 63, full);
    drop(store);
    let report = memferry::kv::admin::verify(root.path(), false).unwrap();
    assert_eq!((report.checked, report.ok), (3, 0), "{report:?}");
    assert_eq!(report.corrupt.len(), 3, "{report:?}");
    for c in &report.corrupt {
        assert!(c.reason.contains("payload"), "{c:?}");
    }
    // Loads refuse them too (key by key).
    let (dst, _dst_mem) = tensors(0);
    let reader = KvStore::open(c, dst).unwrap();
    let r = load_keys(&reader, &keys, &[10, 11, 12]);
    assert!(
        outcomes(&r)
            .iter()
            .all(|o| matches!(o, KeyOutcome::Failed(_))),
        "{r:?}"
    );
}

#[test]
fn stores_are_idempotent_and_concurrent_stores_of_one_key_stay_valid() {
    let root = tempfile::tempdir().unwrap();
    let keys: Vec<BlockKey> = (0..8).map(key).collect();
    let ids: Vec<u64> = (0..8).collect();
    // Four stores (separate instances, as separate processes would be)
    // write the same keys at once.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let (src, _) = tensors(9);
                let store =
                    KvStore::open(config(root.path(), 2, BackendKind::Buffered), src).unwrap();
                let r = store_keys(&store, &keys[..4], &ids);
                assert!(r.succeeded(), "{r:?}");
            });
        }
    });
    let report = memferry::kv::admin::verify(root.path(), false).unwrap();
    assert_eq!(report.checked, 4);
    assert!(report.corrupt.is_empty(), "{:?}", report.corrupt);
    let (src, _) = tensors(9);
    let store = KvStore::open(config(root.path(), 2, BackendKind::Buffered), src).unwrap();
    let r = store_keys(&store, &keys[..4], &ids);
    assert!(
        r.keys
            .iter()
            .all(|k| k.outcome == KeyOutcome::AlreadyStored),
        "{r:?}"
    );
    assert!(temp_files(root.path()).is_empty());
}

#[test]
fn eviction_holds_usage_under_capacity_and_spares_protected_and_recent_blocks() {
    let root = tempfile::tempdir().unwrap();
    let (src, _) = tensors(5);
    let mut c = config(root.path(), 1, BackendKind::Buffered);
    let probe = KvStore::open(c.clone(), tensors(5).0).unwrap();
    let file = probe.file_bytes();
    drop(probe);
    c.capacity = Some(5 * file);
    let store = KvStore::open(c, src).unwrap();
    assert!(store_keys(&store, &[key(0)], &[0]).succeeded());
    store.protect(&[key(0)]);
    for i in 1..20u64 {
        let r = store_keys(&store, &[key(i)], &[i]);
        assert!(r.succeeded(), "{r:?}");
        if i == 2 {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Keep key 1 hot: it is touched after every store.
        store.touch(&[key(1)]);
        let on_disk = kv_block_files(store.dir().unwrap()).len() as u64 * file;
        assert!(on_disk <= 5 * file, "usage {on_disk} over capacity");
        assert!(store.stats().bytes <= 5 * file);
        assert!(
            store.dir().unwrap().join(key(0).rel_path()).exists(),
            "protected block evicted at step {i}"
        );
    }
    assert!(
        store.dir().unwrap().join(key(1).rel_path()).exists(),
        "hot block kept"
    );
    assert!(store.stats().counters.evictions >= 10);
    store.unprotect(&[key(0)]);
    // Unprotected and least recently used: goes first now.
    let before = store.stats();
    assert_eq!(store.evict_to(before.bytes - file), 1);
    assert!(!store.dir().unwrap().join(key(0).rel_path()).exists());
    assert_eq!(store.stats().blocks, before.blocks - 1);
    // A capacity every block is protected from reaching fails the store
    // cleanly instead of evicting a protected block.
    let all: Vec<BlockKey> = (0..20).map(key).collect();
    store.protect(&all);
    let mut refused = None;
    for i in 25..32u64 {
        let r = store_keys(&store, &[key(i)], &[i]);
        match &r.keys[0].outcome {
            KeyOutcome::Stored => store.protect(&[key(i)]),
            KeyOutcome::Failed(m) => {
                refused = Some(m.clone());
                break;
            }
            o => panic!("{o:?}"),
        }
    }
    let m = refused.expect("a store beyond a fully protected capacity fails");
    assert!(m.contains("capacity") && m.contains("protected"), "{m}");
    assert_eq!(
        kv_block_files(store.dir().unwrap()).len(),
        5,
        "full, nothing evicted"
    );
}

/// Every store in flight holds room for its block until it finishes: with
/// more of them than the capacity holds, a store waits for them to finish
/// instead of evicting what they just stored and failing for no reason.
#[test]
fn a_capacity_smaller_than_the_stores_in_flight_stores_every_key() {
    let root = tempfile::tempdir().unwrap();
    let mut c = config(root.path(), 1, BackendKind::Buffered);
    let file = KvStore::open(c.clone(), tensors(5).0).unwrap().file_bytes();
    // 4 workers x 2 x 4 keys: up to 32 stores in flight, room for 6.
    c.capacity = Some(6 * file);
    // Slow writes keep the stores in flight together.
    c.tuning.max_bytes_per_call = Some(4096);
    let store = KvStore::open(c, tensors(5).0).unwrap();
    let keys: Vec<BlockKey> = (0..BLOCKS).map(key).collect();
    let ids: Vec<u64> = (0..BLOCKS).collect();
    // Jobs of two keys, as an engine offloads them.
    let jobs: Vec<JobId> = keys
        .chunks(2)
        .zip(ids.chunks(2))
        // SAFETY: the test leaves the pages alone while the jobs run.
        .map(|(k, i)| unsafe { store.submit_store(k, i) }.unwrap())
        .collect();
    let results = store.wait(&jobs, Duration::from_secs(120));
    assert_eq!(results.len(), jobs.len());
    for r in &results {
        assert!(r.succeeded(), "{r:?}");
    }
    let on_disk = kv_block_files(store.dir().unwrap()).len() as u64 * file;
    assert!(on_disk <= 6 * file, "usage {on_disk} over capacity");
    assert!(store.stats().bytes <= 6 * file);
    let c = store.stats().counters;
    assert_eq!((c.stores, c.failed, c.dropped), (BLOCKS, 0, 0), "{c:?}");
}

#[test]
fn a_full_store_queue_reports_dropped_and_loads_go_first() {
    let root = tempfile::tempdir().unwrap();
    let mut c = slow(root.path());
    c.store_queue = 2;
    let store = KvStore::open(c, big_layout()).unwrap();
    let keys: Vec<BlockKey> = (0..6).map(key).collect();
    // SAFETY: the test leaves the pages alone while jobs run.
    let a = unsafe { store.submit_store(&keys[0..2], &[0, 1]) }.unwrap();
    // SAFETY: as above.
    let b = unsafe { store.submit_store(&keys[2..4], &[2, 3]) }.unwrap();
    // SAFETY: as above.
    let too_big = unsafe { store.submit_store(&keys[0..3], &[0, 1, 2]) }.unwrap();
    let mut results = store.wait(&[a, b, too_big], Duration::from_secs(60));
    results.sort_by_key(|r| r.job);
    assert_eq!(results.len(), 3);
    assert!(results[0].succeeded(), "{:?}", results[0]);
    assert!(
        results[1]
            .keys
            .iter()
            .all(|k| k.outcome == KeyOutcome::Dropped),
        "the second job exceeds the queue while the first waits: {:?}",
        results[1]
    );
    assert!(
        results[2]
            .keys
            .iter()
            .all(|k| k.outcome == KeyOutcome::Dropped)
    );
    assert!(!results[1].succeeded());
    assert_eq!(store.stats().counters.dropped, 5);
    assert!(!store.dir().unwrap().join(keys[2].rel_path()).exists());

    // Loads overtake queued stores.
    // SAFETY: as above.
    let s1 = unsafe { store.submit_store(&keys[4..5], &[4]) }.unwrap();
    // SAFETY: as above.
    let s2 = unsafe { store.submit_store(&keys[5..6], &[5]) }.unwrap();
    // SAFETY: as above.
    let l = unsafe { store.submit_load(&keys[0..1], &[10]) }.unwrap();
    let mut order = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while order.len() < 3 && Instant::now() < deadline {
        order.extend(store.poll().into_iter().map(|r| r.job));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(order.len(), 3);
    let pos = |j: JobId| order.iter().position(|&x| x == j).unwrap();
    assert!(
        pos(l) < pos(s2),
        "the load ran before the queued store: {order:?}"
    );
    let _ = s1;
}

#[test]
fn cancel_stops_a_job_and_publishes_nothing_partial() {
    let root = tempfile::tempdir().unwrap();
    let store = KvStore::open(slow(root.path()), big_layout()).unwrap();
    let keys: Vec<BlockKey> = (0..16).map(key).collect();
    let ids: Vec<u64> = (0..16).collect();
    // SAFETY: the test leaves the pages alone while the job runs.
    let job = unsafe { store.submit_store(&keys, &ids) }.unwrap();
    assert!(store.cancel(job));
    let r = wait_one(&store, job);
    let cancelled = r.count(|o| *o == KeyOutcome::Cancelled);
    assert!(cancelled >= 14, "{r:?}");
    for k in &r.keys {
        let exists = store.dir().unwrap().join(k.key.rel_path()).exists();
        match k.outcome {
            KeyOutcome::Stored => assert!(exists),
            KeyOutcome::Cancelled => assert!(!exists, "cancelled key {} published", k.key),
            ref o => panic!("unexpected {o:?}"),
        }
    }
    assert!(
        temp_files(store.dir().unwrap()).is_empty(),
        "temporary files left"
    );
    assert!(!store.cancel(job), "already finished");
    assert!(
        memferry::kv::admin::verify(root.path(), false)
            .unwrap()
            .corrupt
            .is_empty()
    );
    drop(store);

    // A cancelled load: once its result is out, none of its keys is still
    // protected, so removing them right away removes every block.
    let fast = KvStore::open(
        {
            let mut c = slow(root.path());
            c.tuning = Tuning::default();
            c
        },
        big_layout(),
    )
    .unwrap();
    assert!(store_keys(&fast, &keys, &ids).succeeded());
    drop(fast);
    let store = KvStore::open(slow(root.path()), big_layout()).unwrap();
    // SAFETY: the test leaves the pages alone while the job runs.
    let job = unsafe { store.submit_load(&keys, &ids) }.unwrap();
    assert!(store.cancel(job));
    let r = wait_one(&store, job);
    assert!(r.count(|o| *o == KeyOutcome::Cancelled) >= 14, "{r:?}");
    assert_eq!(store.remove(&keys).unwrap(), 16, "a key stayed protected");
}

#[test]
fn wait_returns_at_its_timeout_and_poll_never_blocks() {
    let root = tempfile::tempdir().unwrap();
    // 32 MiB moved 512 bytes per system call: far longer than the timeout.
    let store = KvStore::open(slow(root.path()), big_layout()).unwrap();
    let keys: Vec<BlockKey> = (0..BLOCKS).map(key).collect();
    let ids: Vec<u64> = (0..BLOCKS).collect();
    // SAFETY: the test leaves the pages alone while the job runs.
    let job = unsafe { store.submit_store(&keys, &ids) }.unwrap();
    let t = Instant::now();
    assert!(store.poll().is_empty());
    assert!(t.elapsed() < Duration::from_secs(1), "poll blocked");
    let t = Instant::now();
    let got = store.wait(&[job], Duration::from_millis(30));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(30),
        "returned early: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "returned late: {took:?}");
    assert!(got.is_empty(), "the job cannot have finished: {got:?}");
    assert!(store.cancel(job));
    let r = wait_one(&store, job);
    assert_eq!(r.keys.len(), BLOCKS as usize);
    assert!(
        store.wait(&[job], Duration::from_secs(5)).is_empty(),
        "reported once"
    );
    // A timeout no clock can reach waits for the job.
    drop(store);
    let mut c = slow(root.path());
    c.tuning = Tuning::default();
    let store = KvStore::open(c, big_layout()).unwrap();
    // SAFETY: as above.
    let job = unsafe { store.submit_store(&keys[..2], &ids[..2]) }.unwrap();
    let got = store.wait(&[job], Duration::MAX);
    assert_eq!(got.len(), 1);
    assert!(got[0].succeeded(), "{got:?}");
    assert!(
        store.wait(&[job], Duration::MAX).is_empty(),
        "reported once"
    );
}

#[test]
fn a_restart_keeps_the_access_record_and_the_index_consistent_with_the_files() {
    let root = tempfile::tempdir().unwrap();
    let c = config(root.path(), 1, BackendKind::Buffered);
    let (src, _) = tensors(6);
    let store = KvStore::open(c.clone(), src).unwrap();
    for i in 0..6 {
        assert!(store_keys(&store, &[key(i)], &[i]).succeeded());
        std::thread::sleep(Duration::from_millis(15));
    }
    store.touch(&[key(0)]);
    let file = store.file_bytes();
    assert_eq!(store.lookup(&(0..6).map(key).collect::<Vec<_>>()), 6);
    drop(store); // flushes the access record and counters
    // Another process evicts key 3 while we are down.
    let dir = root.path().join(c.namespace.dir_name());
    std::fs::remove_file(dir.join(key(3).rel_path())).unwrap();

    let (src, _) = tensors(6);
    let store = KvStore::open(c.clone(), src).unwrap();
    let s = store.stats();
    assert_eq!(
        (s.blocks, s.bytes),
        (5, 5 * file),
        "index rebuilt from files"
    );
    assert_eq!(store.lookup(&[key(0), key(1), key(2), key(3), key(4)]), 3);
    // LRU after restart: 1 and 2 are oldest; 0 was touched before the restart.
    store.evict_to(3 * file);
    let left: BTreeSet<PathBuf> = kv_block_files(store.dir().unwrap()).into_iter().collect();
    let want: BTreeSet<PathBuf> = [0, 4, 5]
        .iter()
        .map(|&i| store.dir().unwrap().join(key(i).rel_path()))
        .collect();
    assert_eq!(left, want);
    drop(store);
    let recorded = memferry::kv::admin::stats(root.path()).unwrap();
    assert_eq!(recorded.blocks, 3);
    assert_eq!(recorded.counters.stores, 6);
    assert_eq!(recorded.counters.evictions, 2);
    assert_eq!(recorded.counters.hits, 6 + 3);
}

#[test]
fn bad_input_is_refused_with_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let err = |c: KvConfig| KvStore::open(c, tensors(1).0).err().unwrap().to_string();
    // Missing root.
    let e = err(config(&root.path().join("nope"), 1, BackendKind::Auto));
    assert!(e.contains("does not exist"), "{e}");
    // A namespace directory that describes something else.
    let c = config(root.path(), 1, BackendKind::Auto);
    let dir = root.path().join(c.namespace.dir_name());
    std::fs::create_dir_all(&dir).unwrap();
    let mut other = namespace(MODEL, 1);
    other.dtype = "float16".into();
    std::fs::write(
        dir.join("namespace.json"),
        serde_json::to_vec(&other).unwrap(),
    )
    .unwrap();
    let e = err(c.clone());
    assert!(e.contains("namespace mismatch"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    // Page sizes that do not match the registered memory.
    let r = Arc::new(HostRegion::new(4096 * 4).unwrap());
    let e = KvLayout::new(vec![KvTensor {
        region: r as Arc<dyn Region>,
        num_blocks: 4,
        page_bytes: 4000,
    }])
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("page size does not match"), "{e}");
    // Block ids out of range and malformed groups.
    let store = KvStore::open(c.clone(), tensors(1).0).unwrap();
    // Another engine registering other page sizes in the same namespace.
    let other = KvLayout::new(vec![KvTensor {
        region: Arc::new(HostRegion::new(BLOCKS * 11192).unwrap()),
        num_blocks: BLOCKS,
        page_bytes: 11192,
    }])
    .unwrap();
    let e = KvStore::open(c.clone(), other).err().unwrap().to_string();
    assert!(e.contains("page sizes do not match"), "{e}");
    // SAFETY: refused before any I/O.
    let e = unsafe { store.submit_load(&[key(1)], &[BLOCKS]) }
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
    // SAFETY: refused before any I/O.
    let e = unsafe { store.submit_store(&[key(1)], &[1, 2]) }
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("need 1 block ids"), "{e}");
    drop(store);
    // A read-only root.
    let ro = Mount::new("tmpfs", Some("ro,size=1m"), &root.path().join("ro"));
    let e = err(config(&ro.dir, 1, BackendKind::Auto));
    assert!(e.contains("writable"), "{e}");
}

#[test]
fn a_full_disk_fails_the_store_cleanly_and_keeps_existing_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Mount::new("tmpfs", Some("size=160k"), &tmp.path().join("small"));
    let (src, src_mem) = tensors(8);
    let c = config(&disk.dir, 1, BackendKind::Auto);
    let store = KvStore::open(c.clone(), src).unwrap();
    // Each block file is 4 KiB + 12 KiB: a few fit, then the disk is full.
    let mut stored = Vec::new();
    let mut failure = None;
    for i in 0..BLOCKS {
        let r = store_keys(&store, &[key(i)], &[i]);
        match &r.keys[0].outcome {
            KeyOutcome::Stored => stored.push(i),
            KeyOutcome::Failed(m) => {
                failure = Some(m.clone());
                break;
            }
            o => panic!("{o:?}"),
        }
    }
    let m = failure.expect("the disk filled up");
    assert!(m.contains("full") || m.contains("space"), "{m}");
    assert!(!stored.is_empty());
    assert!(
        temp_files(store.dir().unwrap()).is_empty(),
        "temporary files left"
    );
    drop(store);
    let (dst, dst_mem) = tensors(0);
    let reader = KvStore::open(c, dst).unwrap();
    let keys: Vec<BlockKey> = stored.iter().map(|&i| key(i)).collect();
    let r = load_keys(&reader, &keys, &stored);
    assert!(r.succeeded(), "{r:?}");
    for &i in &stored {
        assert!(page(&dst_mem, 0, i) == page(&src_mem, 0, i));
    }
}

#[test]
fn background_eviction_brings_the_filesystem_down_to_the_low_watermark() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Mount::new("tmpfs", Some("size=1m"), &tmp.path().join("wm"));
    let used = |p: &Path| {
        let s = rustix::fs::statvfs(p).unwrap();
        (s.f_blocks - s.f_bfree) as f64 / s.f_blocks as f64
    };
    // Fill the disk to about half with 16 KiB block files, no watermarks.
    let c = config(&disk.dir, 1, BackendKind::Buffered);
    let store = KvStore::open(c.clone(), tensors(3).0).unwrap();
    let keys: Vec<BlockKey> = (0..BLOCKS).map(key).collect();
    let ids: Vec<u64> = (0..BLOCKS).collect();
    assert!(store_keys(&store, &keys, &ids).succeeded());
    drop(store);
    assert!(
        used(&disk.dir) > 0.4,
        "the test must start above the high watermark"
    );
    // Reopen with watermarks: the housekeeper frees space in the background.
    let mut c = c;
    c.high_watermark = Some(0.3);
    c.low_watermark = Some(0.15);
    let store = KvStore::open(c, tensors(3).0).unwrap();
    store.protect(&[key(0)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while used(&disk.dir) > 0.15 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(used(&disk.dir) <= 0.15, "still {:.2} used", used(&disk.dir));
    assert!(store.stats().counters.evictions > 0);
    assert!(
        store.dir().unwrap().join(key(0).rel_path()).exists(),
        "protected"
    );
}

#[test]
fn a_namespace_removed_under_an_open_store_is_recreated_by_the_next_store() {
    let root = tempfile::tempdir().unwrap();
    let (src, _) = tensors(4);
    let store = KvStore::open(config(root.path(), 1, BackendKind::Direct), src).unwrap();
    let keys: Vec<BlockKey> = (0..3).map(key).collect();
    assert!(store_keys(&store, &keys[..1], &[0]).succeeded());
    // An operator empties the cache while the store is open.
    let dir = store.dir().unwrap().to_path_buf();
    std::fs::remove_dir_all(&dir).unwrap();
    let r = store_keys(&store, &keys[1..], &[1, 2]);
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(store.lookup(&keys[1..]), 2);
    // The removed block fails its load (the warm index may still list it).
    let gone = load_keys(&store, &keys[..1], &[0]);
    assert!(
        matches!(outcomes(&gone)[..], [KeyOutcome::Failed(_)]),
        "{gone:?}"
    );
    // The directory is a namespace again: another process opens it with
    // the same layout and loads what was stored after the removal.
    let found = memferry::kv::namespace::Namespace::read(&dir).unwrap();
    assert_eq!(found.as_ref(), Some(&namespace(MODEL, 1)));
    let (dst, dst_mem) = tensors(0);
    let other = KvStore::open(config(root.path(), 1, BackendKind::Direct), dst).unwrap();
    assert!(load_keys(&other, &keys[1..], &[1, 2]).succeeded());
    let (_, src_mem) = tensors(4);
    assert_eq!(page(&dst_mem, 0, 2), page(&src_mem, 0, 2));
    // The layout record came back too: other page sizes are refused.
    let (wrong, _) = tensors_of(4, [PAGES[0] * 2, PAGES[1]]);
    let refused = KvStore::open(config(root.path(), 1, BackendKind::Direct), wrong);
    assert!(refused.is_err(), "a different layout was accepted");
}
