//! Corruption at rest: a flipped payload bit, a truncated shard and a
//! deleted shard are each detected by `verify` and by `restore` (exit 3,
//! the shard file named, the bit flip as a checksum mismatch at an offset
//! that covers the flipped byte), with both backends.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use tempfile::TempDir;

const BACKENDS: [&str; 2] = ["buffered", "direct"];

/// A fresh 8 MiB snapshot (1 MiB shards) saved with `backend`, optionally
/// striped over two roots.
fn snapshot(backend: &str, two_roots: bool) -> (TempDir, PathBuf) {
    let tmp = tempfile::Builder::new()
        .prefix("memferry-corrupt-")
        .tempdir_in("/tmp")
        .unwrap();
    let snap = tmp.path().join("snap");
    let mut extra = vec!["--shard-size", "1MiB", "--backend", backend];
    let roots_list;
    if two_roots {
        let roots: Vec<PathBuf> = ["r0", "r1"].iter().map(|r| tmp.path().join(r)).collect();
        for r in &roots {
            std::fs::create_dir(r).unwrap();
        }
        roots_list = roots_arg(&roots);
        extra.extend(["--roots", &roots_list]);
    }
    save(8, &snap, &extra);
    run(["verify", &arg(&snap), "--backend", backend]).ok();
    (tmp, snap)
}

/// Runs `verify` and `restore` with every backend: each must fail with exit
/// code 3 and name `shard` and every one of `needles`. Returns the stderr
/// of each run.
fn detected_everywhere(snap: &Path, shard: &Path, needles: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for op in ["verify", "restore"] {
        for backend in BACKENDS {
            let mut all = vec![arg(shard)];
            all.extend(needles.iter().map(|s| s.to_string()));
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            let r = run([op, &arg(snap), "--backend", backend])
                .code(3)
                .fails_with(&all);
            out.push(r.stderr);
            // The JSON error object says the same.
            let r = run([op, &arg(snap), "--backend", backend, "--json"]).code(3);
            let j = r.json();
            assert_eq!(j["ok"], false, "{j}");
            assert_eq!(j["op"].as_str(), Some(op), "{j}");
            assert!(j["error"].as_str().unwrap().contains(&arg(shard)), "{j}");
        }
    }
    out
}

/// Parses "at offset N, length M" from a checksum mismatch message.
fn mismatch_range(stderr: &str) -> (u64, u64) {
    let (offset, rest) = number_after(stderr, "at offset ", stderr);
    let (length, _) = number_after(rest, "length ", stderr);
    (offset, length)
}

/// The number right after the first `label` in `text`, and the text from
/// there up to the next `label`; panics naming `label` and `message` if
/// there is none.
fn number_after<'a>(text: &'a str, label: &str, message: &str) -> (u64, &'a str) {
    let rest = text
        .split(label)
        .nth(1)
        .unwrap_or_else(|| panic!("no {label:?} in: {message}"));
    let n = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {label:?} in: {message}"));
    (n, rest)
}

fn bit_flip(backend: &str, two_roots: bool) {
    let mut fresh = Some(snapshot(backend, two_roots));
    let shards = inspect(&fresh.as_ref().unwrap().1)["shards"]
        .as_u64()
        .unwrap() as usize;
    assert!(shards > 4, "want many shards, got {shards}");
    for shard_index in [1, shards / 2] {
        let (_tmp, snap) = fresh.take().unwrap_or_else(|| snapshot(backend, two_roots));
        let shard = shard_path(&snap, shard_index);
        let (at, ext_off, ext_len) = payload_offset(&snap, shard_index);
        assert!(at >= ext_off && at < ext_off + ext_len);
        flip_bit(&shard, at);
        for stderr in detected_everywhere(&snap, &shard, &["checksum mismatch", "offset"]) {
            let (offset, length) = mismatch_range(&stderr);
            assert!(
                offset <= at && at < offset + length,
                "flipped byte {at} of {} but the error names offset {offset}, length {length}:\n{stderr}",
                shard.display()
            );
        }
        // Without verification the bytes come back (wrong): still exit 0.
        run(["restore", &arg(&snap), "--no-verify", "--backend", backend]).ok();
    }
}

fn truncated(backend: &str, two_roots: bool) {
    let (_tmp, snap) = snapshot(backend, two_roots);
    let shard = shard_path(&snap, 3);
    let size = std::fs::metadata(&shard).unwrap().len();
    let (_, ext_off, _) = payload_offset(&snap, 3);
    // Cut inside the payload; then to zero bytes.
    for len in [ext_off + 100, 0] {
        assert!(len < size);
        truncate(&shard, len);
        detected_everywhere(&snap, &shard, &["truncated"]);
        run(["restore", &arg(&snap), "--no-verify", "--backend", backend])
            .code(3)
            .fails_with(&[&arg(&shard), "truncated"]);
    }
}

fn deleted(backend: &str, two_roots: bool) {
    let (_tmp, snap) = snapshot(backend, two_roots);
    let last = inspect(&snap)["shards"].as_u64().unwrap() as usize - 1;
    for i in [last, 0] {
        let shard = shard_path(&snap, i);
        std::fs::remove_file(&shard).unwrap();
        detected_everywhere(&snap, &shard, &["missing"]);
        run(["restore", &arg(&snap), "--no-verify", "--backend", backend])
            .code(3)
            .fails_with(&[&arg(&shard), "missing"]);
    }
}

#[test]
fn bit_flip_buffered() {
    bit_flip("buffered", false);
}

#[test]
fn bit_flip_direct() {
    bit_flip("direct", false);
}

#[test]
fn bit_flip_direct_two_roots() {
    bit_flip("direct", true);
}

#[test]
fn truncated_shard_buffered() {
    truncated("buffered", false);
}

#[test]
fn truncated_shard_direct() {
    truncated("direct", false);
}

#[test]
fn truncated_shard_buffered_two_roots() {
    truncated("buffered", true);
}

#[test]
fn deleted_shard_buffered() {
    deleted("buffered", false);
}

#[test]
fn deleted_shard_direct() {
    deleted("direct", false);
}

#[test]
fn deleted_shard_direct_two_roots() {
    deleted("direct", true);
}
