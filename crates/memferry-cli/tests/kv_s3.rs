//! KV blocks on real S3 servers (moto and s3s-fs, started here on
//! 127.0.0.1): the job API round trip with per-key outcomes, lookups by
//! concurrent HEADs from a cold index, a corrupted object caught by the
//! checksum and deleted, capacity eviction, page-size mismatch, `kv bench`
//! on an `s3://` root, and bad credentials. Every test removes its objects
//! and checks that nothing is left.

mod common;
mod s3_support;

use std::sync::Arc;
use std::time::Duration;

use common::run_cmd;
use memferry::kv::{BlockKey, KeyOutcome, KvConfig, KvLayout, KvStore};
use memferry::memory::HostRegion;
use memferry::storage::location::{Location, S3Url};
use memferry::storage::s3::{PutCondition, S3Config, Secret};
use memferry_test_support::kv::{self, namespace, outcomes, wait_one};
use s3_support::{Kind, Server, each_server, shared};

const BLOCKS: u64 = 16;
/// Two tensors, one with a page size that is not a multiple of 4096.
const PAGES: [u64; 2] = [8192, 3000];

/// The server's client configuration with `secret` as the secret key.
fn s3_config(server: &Server, secret: &str) -> S3Config {
    let mut c = server.s3_config();
    c.secret_access_key = Some(Secret::new(secret));
    c
}

fn config(server: &Server, url: &str, per_file: u32) -> KvConfig {
    let mut c = KvConfig::new(
        Location::S3(S3Url::parse(url).unwrap()),
        namespace("test/s3-model", per_file),
    );
    c.s3 = Some(server.s3_config());
    c
}

/// `BLOCKS` blocks of tensors with `pages`, each page holding a pattern of
/// (seed, tensor, block); seed 0 gives zeroed memory.
fn tensors(seed: u64, pages: &[u64]) -> (KvLayout, Vec<Arc<HostRegion>>) {
    kv::tensors(seed, pages, BLOCKS)
}

fn page(regions: &[Arc<HostRegion>], t: usize, block: u64) -> &[u8] {
    kv::page(regions, BLOCKS, t, block)
}

fn key(i: u64) -> BlockKey {
    BlockKey::new(format!("s3-key-{i:04}").into_bytes()).unwrap()
}

fn store_keys(store: &KvStore, keys: &[BlockKey], ids: &[u64]) -> Vec<KeyOutcome> {
    // SAFETY: the test does not touch the source pages while the job runs.
    let job = unsafe { store.submit_store(keys, ids) }.unwrap();
    outcomes(&wait_one(store, job))
}

fn load_keys(store: &KvStore, keys: &[BlockKey], ids: &[u64]) -> Vec<KeyOutcome> {
    // SAFETY: the test does not touch the destination pages while the job runs.
    let job = unsafe { store.submit_load(keys, ids) }.unwrap();
    outcomes(&wait_one(store, job))
}

fn failed_with(o: &KeyOutcome, what: &str) -> bool {
    matches!(o, KeyOutcome::Failed(why) if why.contains(what))
}

/// The object key of `key`'s block under `url` for `config`'s namespace.
fn block_object(url: &str, c: &KvConfig, key: &BlockKey) -> String {
    let u = S3Url::parse(url).unwrap();
    u.key(&format!(
        "{}/{}",
        c.namespace.dir_name(),
        key.rel_path().to_string_lossy()
    ))
}

#[test]
fn blocks_round_trip_through_the_job_api_with_per_key_outcomes() {
    each_server(|server| {
        let url = server.url("kv-round-trip");
        let (src_layout, src) = tensors(7, &PAGES);
        let keys: Vec<BlockKey> = (0..4).map(key).collect();
        let ids: Vec<u64> = (0..8).collect();
        {
            let store = KvStore::open(config(server, &url, 2), src_layout).unwrap();
            assert!(store.location().starts_with(&url), "{}", store.location());
            assert_eq!(store_keys(&store, &keys, &ids), vec![KeyOutcome::Stored; 4]);
            // Idempotent: a second store of the same keys writes nothing.
            assert_eq!(
                store_keys(&store, &keys[..2], &ids[..4]),
                vec![KeyOutcome::AlreadyStored; 2]
            );
            assert_eq!(store.lookup(&keys), 4);
            assert_eq!(store.stats().blocks, 4);
        }
        // A new process: the index starts from a LIST, lookups of unknown
        // keys go out as concurrent HEADs.
        let (dst_layout, dst) = tensors(0, &PAGES);
        let mut c = config(server, &url, 2);
        c.index_ttl = Duration::ZERO;
        let store = KvStore::open(c, dst_layout).unwrap();
        let mut probe = keys.clone();
        probe.insert(3, key(99));
        assert_eq!(store.lookup(&probe), 3, "prefix stops at the missing key");
        assert_eq!(
            store.contains(&[key(1), key(99), key(3)]),
            vec![true, false, true]
        );
        // Load into other block ids, with a partial first group (the
        // second block of key 0) and a missing key with its own outcome.
        let got = load_keys(&store, &[key(0), key(2), key(99)], &[10, 11, 12, 13, 14]);
        assert_eq!(got[..2], [KeyOutcome::Loaded, KeyOutcome::Loaded]);
        assert!(failed_with(&got[2], "missing"), "{got:?}");
        for t in 0..2 {
            assert_eq!(page(&dst, t, 10), page(&src, t, 1), "tensor {t}");
            assert_eq!(page(&dst, t, 11), page(&src, t, 4));
            assert_eq!(page(&dst, t, 12), page(&src, t, 5));
        }
        assert_eq!(store.remove(&[key(2)]).unwrap(), 1);
        assert_eq!(store.lookup(&keys), 2);
        let counters = store.stats().counters;
        assert_eq!((counters.loads, counters.failed), (2, 1));
        drop(store);
        assert!(
            server
                .keys(&url)
                .iter()
                .any(|k| k.contains("/stats/") && k.ends_with(".json")),
            "counters are recorded in the bucket"
        );
        server.clean(&url);
    });
}

#[test]
fn a_corrupted_block_object_is_caught_deleted_and_stored_again() {
    each_server(|server| {
        let url = server.url("kv-corrupt");
        let (src_layout, _src) = tensors(3, &PAGES);
        let c = config(server, &url, 1);
        let object = block_object(&url, &c, &key(1));
        let store = KvStore::open(c, src_layout).unwrap();
        assert_eq!(
            store_keys(&store, &[key(0), key(1)], &[0, 1]),
            vec![KeyOutcome::Stored; 2]
        );
        let client = server.client();
        let (bytes, _) = client.get(&object).unwrap().expect("stored");
        let mut bad = bytes.to_vec();
        bad[4096 + 100] ^= 0xff;
        client
            .put(&object, bad.into(), PutCondition::Overwrite)
            .unwrap();
        let got = load_keys(&store, &[key(0), key(1)], &[5, 6]);
        assert_eq!(got[0], KeyOutcome::Loaded);
        assert!(failed_with(&got[1], "checksum mismatch"), "{got:?}");
        assert!(failed_with(&got[1], "deleted"), "{got:?}");
        assert!(
            client.head(&object).unwrap().is_none(),
            "damaged object gone"
        );
        assert_eq!(store.lookup(&[key(0), key(1)]), 1);
        // The next store of the key writes it again.
        assert_eq!(
            store_keys(&store, &[key(1)], &[1]),
            vec![KeyOutcome::Stored]
        );
        drop(store);
        server.clean(&url);
    });
}

#[test]
fn capacity_evicts_least_recently_used_objects() {
    each_server(|server| {
        let url = server.url("kv-capacity");
        let (src_layout, _src) = tensors(5, &PAGES);
        let mut c = config(server, &url, 1);
        let probe = KvStore::open(c.clone(), tensors(5, &PAGES).0).unwrap();
        let file = probe.file_bytes();
        drop(probe);
        c.capacity = Some(3 * file);
        let store = KvStore::open(c, src_layout).unwrap();
        for i in 0..5 {
            assert_eq!(
                store_keys(&store, &[key(i)], &[i]),
                vec![KeyOutcome::Stored]
            );
        }
        let s = store.stats();
        assert!(
            s.bytes <= 3 * file,
            "{} bytes held, capacity {}",
            s.bytes,
            3 * file
        );
        assert!(s.counters.evictions >= 2, "{:?}", s.counters);
        assert!(store.contains(&[key(4)])[0], "the newest block stays");
        assert!(!store.contains(&[key(0)])[0], "the oldest block went");
        drop(store);
        let blocks = server
            .keys(&url)
            .iter()
            .filter(|k| k.ends_with(".kvb"))
            .count();
        assert!(blocks <= 3, "{blocks} block objects left in the bucket");
        server.clean(&url);
    });
}

#[test]
fn other_page_sizes_are_refused_when_the_store_opens() {
    each_server(|server| {
        let url = server.url("kv-layout");
        let store = KvStore::open(config(server, &url, 1), tensors(1, &PAGES).0).unwrap();
        drop(store);
        let e = KvStore::open(config(server, &url, 1), tensors(1, &[8192, 4096]).0)
            .err()
            .expect("other page sizes must be refused")
            .to_string();
        assert!(e.contains("page sizes do not match"), "{e}");
        server.clean(&url);
    });
}

#[test]
fn kv_bench_runs_on_an_s3_root_and_leaves_nothing_behind() {
    each_server(|server| {
        let url = server.url("kv-bench");
        let r = run_cmd(
            server.command(),
            [
                "kv",
                "bench",
                "--json",
                "--root",
                &url,
                "--blocks",
                "24",
                "--blocks-per-file",
                "2",
                "--block-size",
                "64KiB",
                "--seed",
                "11",
            ],
        )
        .ok()
        .json();
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["failed"], 0, "{r}");
        assert_eq!(r["store"]["keys"], 12, "{r}");
        assert_eq!(r["load"]["keys"], 12, "{r}");
        assert!(r["store"]["limit_gib_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["load"]["limit_gib_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["mode"].as_str().unwrap().starts_with("s3"), "{r}");
        assert!(
            server.keys(&url).is_empty(),
            "kv bench left {:?}",
            server.keys(&url)
        );
    });
}

#[test]
fn bad_credentials_fail_the_open_with_a_clear_error() {
    let server = shared(Kind::S3sFs);
    let url = server.url("kv-bad-creds");
    let wrong = "not-the-secret-4417";
    let mut c = config(server, &url, 1);
    c.s3 = Some(s3_config(server, wrong));
    let e = KvStore::open(c, tensors(1, &PAGES).0)
        .err()
        .expect("wrong credentials must fail")
        .to_string();
    assert!(e.contains("credentials"), "{e}");
    assert!(!e.contains(wrong), "the secret is never printed: {e}");
    let mut cmd = server.command();
    cmd.env("AWS_SECRET_ACCESS_KEY", wrong);
    let r = run_cmd(cmd, ["kv", "bench", "--root", &url, "--blocks", "2"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("credentials"), "{}", r.stderr);
    assert!(!r.stderr.contains(wrong) && !r.stdout.contains(wrong));
    assert!(server.keys(&url).is_empty());
}
