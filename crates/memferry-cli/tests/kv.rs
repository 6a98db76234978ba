//! `memferry kv`: several processes sharing a KV root, verification with
//! repair, eviction from the command line, bad input.

mod common;

use std::path::Path;
use std::process::Stdio;

use common::{Run, arg, command, run};
use memferry_test_support::files::kv_block_files;
use serde_json::Value;

fn bench(root: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "kv".to_string(),
        "bench".into(),
        "--root".into(),
        arg(root),
        "--blocks".into(),
        "32".into(),
        "--block-size".into(),
        "64KiB".into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run(args).ok().json()
}

fn kv(args: &[&str], dir: &Path) -> Run {
    let mut a: Vec<String> = vec!["kv".into()];
    a.extend(args.iter().map(|s| s.to_string()));
    a.push(arg(dir));
    run(a)
}

#[test]
fn bench_reports_every_figure_and_cleans_up_without_keep() {
    let root = tempfile::tempdir().unwrap();
    let v = bench(root.path(), &["--seed", "3", "--blocks-per-file", "2"]);
    for path in [
        "/store/gib_per_s",
        "/load/gib_per_s",
        "/load/p50_ms",
        "/load/p99_ms",
        "/lookup/us_per_1000_blocks",
    ] {
        let x = v.pointer(path).and_then(Value::as_f64);
        assert!(x.is_some_and(|x| x > 0.0), "{path} missing or zero in {v}");
    }
    assert_eq!(v["dropped"], 0, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["store"]["keys"], 16, "{v}");
    assert_eq!(v["load"]["keys"], 16, "{v}");
    assert_eq!(v["ok"], true);
    let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
    assert!(left.is_empty(), "without --keep nothing stays: {left:?}");
}

/// Blocks split over several tensors whose pages O_DIRECT cannot address
/// go through staging and still load the bytes the seed stored (the bench
/// compares every page).
#[test]
fn bench_splits_blocks_over_any_number_of_tensors() {
    let root = tempfile::tempdir().unwrap();
    let v = bench(root.path(), &["--seed", "4", "--tensors", "3"]);
    assert_eq!(v["tensors"], 3, "{v}");
    assert_eq!(v["device"], "cpu", "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["load"]["keys"], 32, "{v}");
    let mode = v["mode"].as_str().unwrap();
    assert!(
        mode.contains("staged"),
        "64 KiB over 3 tensors is not 4096-aligned: {mode}"
    );
}

#[test]
fn bench_on_a_missing_gpu_says_so() {
    if memferry::memory::cuda::available() {
        eprintln!("skipped: a CUDA device is present (tests/gpu.rs covers it)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let r = run([
        "kv",
        "bench",
        "--root",
        &arg(root.path()),
        "--blocks",
        "4",
        "--device",
        "cuda:0",
    ]);
    let r = r.fails_with(&["no CUDA", "use --device cpu"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing is created: {left:?}");
}

#[test]
fn four_processes_store_overlapping_keys_and_every_block_verifies() {
    let root = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..4)
        .map(|_| {
            command()
                .args(["kv", "bench", "--root"])
                .arg(root.path())
                .args([
                    "--blocks",
                    "48",
                    "--block-size",
                    "64KiB",
                    "--seed",
                    "11",
                    "--keep",
                    "--json",
                    "--writers",
                    "2",
                    "--readers",
                    "2",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut written = 0;
    for c in children {
        let out = c.wait_with_output().unwrap();
        let r = Run::from_output("kv bench".into(), out).ok();
        let v = r.json();
        assert_eq!(v["failed"], 0, "{v}");
        assert_eq!(v["dropped"], 0, "{v}");
        assert_eq!(v["load"]["keys"], 48, "every process loads every key: {v}");
        written += v["store"]["keys"].as_u64().unwrap();
        assert_eq!(
            v["store"]["keys"].as_u64().unwrap() + v["already_stored"].as_u64().unwrap(),
            48
        );
    }
    assert!(written >= 48, "someone wrote each key");
    let v = kv(&["verify", "--json"], root.path()).ok().json();
    assert_eq!(v["checked"], 48, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    let s = kv(&["stats", "--json"], root.path()).ok().json();
    assert_eq!(s["blocks"], 48, "{s}");
    assert_eq!(s["stores"].as_u64(), Some(written), "{s}");
    assert_eq!(
        s["loads"].as_u64(),
        Some(4 * (48 + 48)),
        "bulk + latency loads: {s}"
    );
    assert_eq!(s["failed"], 0, "{s}");
}

/// A capacity smaller than what the stores in flight reserve (4 writers x
/// 2 x 4 keys of 68 KiB against 2 MiB): every block is stored, none fails
/// with a made-up reason and none is dropped.
#[test]
fn bench_with_a_small_capacity_stores_every_block() {
    let root = tempfile::tempdir().unwrap();
    let v = run([
        "kv".to_string(),
        "bench".into(),
        "--root".into(),
        arg(root.path()),
        "--blocks".into(),
        "256".into(),
        "--block-size".into(),
        "64KiB".into(),
        "--seed".into(),
        "3".into(),
        "--capacity".into(),
        "2MiB".into(),
        "--json".into(),
    ])
    .ok()
    .json();
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["dropped"], 0, "{v}");
    assert_eq!(v["store"]["keys"], 256, "{v}");
}

#[test]
fn verify_names_corrupt_blocks_and_repair_removes_them() {
    let root = tempfile::tempdir().unwrap();
    bench(root.path(), &["--seed", "5", "--keep"]);
    let files = kv_block_files(root.path());
    assert_eq!(files.len(), 32);
    let victim = &files[7];
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[4096 + 1234] ^= 1;
    std::fs::write(victim, bytes).unwrap();
    let truncated = &files[9];
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(truncated)
        .unwrap();
    f.set_len(5000).unwrap();
    // An intact block of another format version (header rewritten as
    // version 1, its checksum fixed): kept, not counted as corrupt.
    let older = &files[11];
    let mut bytes = std::fs::read(older).unwrap();
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = memferry::integrity::crc32c(&bytes[..104]);
    bytes[104..108].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(older, bytes).unwrap();

    let r = kv(&["verify", "--json"], root.path()).code(3);
    let v = r.json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["checked"], 32);
    let foreign = v["foreign"].as_array().unwrap();
    assert_eq!(foreign.len(), 1, "{v}");
    assert_eq!(foreign[0]["path"], older.to_str().unwrap(), "{v}");
    assert!(
        foreign[0]["reason"].as_str().unwrap().contains("version 1"),
        "{v}"
    );
    let corrupt = v["corrupt"].as_array().unwrap();
    assert_eq!(corrupt.len(), 2, "{v}");
    let paths: Vec<&str> = corrupt
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&victim.to_str().unwrap()), "{v}");
    assert!(paths.contains(&truncated.to_str().unwrap()), "{v}");
    let stem = victim.file_stem().unwrap().to_str().unwrap();
    assert!(
        corrupt.iter().any(
            |c| c["key"] == stem && c["reason"].as_str().unwrap().contains("checksum mismatch")
        )
    );
    assert!(
        std::fs::metadata(victim).is_ok(),
        "nothing removed without --repair"
    );

    kv(&["verify", "--repair"], root.path())
        .code(3)
        .stderr_has(&["2 of 32 blocks are corrupt", "2 removed"]);
    assert!(!victim.exists() && !truncated.exists());
    assert!(
        older.exists(),
        "a block of another version is never removed"
    );
    let v = kv(&["verify", "--json"], root.path()).ok().json();
    assert_eq!(v["checked"], 30);
    assert_eq!(v["foreign"].as_array().unwrap().len(), 1, "{v}");
}

#[test]
fn evict_keeps_the_most_recently_used_blocks_under_the_limit() {
    let root = tempfile::tempdir().unwrap();
    bench(root.path(), &["--seed", "8", "--keep"]);
    let files = kv_block_files(root.path());
    let file_len = std::fs::metadata(&files[0]).unwrap().len();
    // Give every file a distinct access time; the first five are the newest.
    for (i, f) in files.iter().enumerate() {
        let age = if i < 5 { 0 } else { 1000 + i as u64 };
        let when = std::time::SystemTime::now() - std::time::Duration::from_secs(age);
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }
    let limit = 5 * file_len;
    let v = run([
        "kv".to_string(),
        "evict".into(),
        arg(root.path()),
        "--to".into(),
        limit.to_string(),
        "--json".into(),
    ])
    .ok()
    .json();
    assert_eq!(v["evicted"], 27, "{v}");
    assert!(v["remaining_bytes"].as_u64().unwrap() <= limit);
    assert_eq!(kv_block_files(root.path()), files[..5].to_vec());
    let s = kv(&["stats", "--json"], root.path()).ok().json();
    assert_eq!(s["evictions"], 27, "{s}");
    assert_eq!(s["blocks"], 5);
}

#[test]
fn bad_input_gets_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    kv(&["stats"], &root.path().join("missing")).fails_with(&["not a directory"]);
    kv(&["stats"], root.path()).fails_with(&["no KV namespace under"]);
    run([
        "kv".to_string(),
        "bench".into(),
        "--root".into(),
        arg(&root.path().join("missing")),
    ])
    .fails_with(&["does not exist"]);
    run([
        "kv".to_string(),
        "bench".into(),
        "--root".into(),
        arg(root.path()),
        "--blocks".into(),
        "3".into(),
        "--blocks-per-file".into(),
        "2".into(),
    ])
    .fails_with(&["multiple of --blocks-per-file"]);
    let v = run([
        "kv".to_string(),
        "evict".into(),
        arg(root.path()),
        "--to".into(),
        "lots".into(),
        "--json".into(),
    ])
    .code(2)
    .json();
    assert_eq!(v["ok"], false);
}
