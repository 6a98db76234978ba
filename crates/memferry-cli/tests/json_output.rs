//! `--json`: exactly one JSON object on stdout for every command, success or
//! failure; and `export` writes a valid safetensors file.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// The fields every transfer report carries.
fn assert_report(j: &Value, op: &str, bytes: u64) {
    assert_eq!(j["op"].as_str(), Some(op), "{j}");
    for k in ["backend", "mode"] {
        assert!(
            j[k].as_str().is_some_and(|s| !s.is_empty()),
            "{op}: {k} missing: {j}"
        );
    }
    assert_eq!(j["bytes"].as_u64(), Some(bytes), "{op}: {j}");
    for k in ["seconds", "gib_per_s"] {
        assert!(
            j[k].as_f64().is_some_and(|v| v >= 0.0 && v.is_finite()),
            "{op}: {k} missing: {j}"
        );
    }
    assert!(j["verified"].is_boolean(), "{op}: verified missing: {j}");
    assert!(j["fallbacks"].is_array(), "{op}: fallbacks missing: {j}");
    for p in ["plan", "allocate", "transfer", "verify", "commit"] {
        assert!(
            j["phases"][p].as_f64().is_some_and(|v| v >= 0.0),
            "{op}: phases.{p} missing: {j}"
        );
    }
    assert!(
        j["peak_staging_bytes"].as_u64().is_some(),
        "{op}: peak_staging_bytes missing: {j}"
    );
    let sum: f64 = ["plan", "allocate", "transfer", "verify", "commit"]
        .iter()
        .map(|p| j["phases"][*p].as_f64().unwrap())
        .sum();
    let secs = j["seconds"].as_f64().unwrap();
    assert!(
        (sum - secs).abs() <= 0.01 + secs * 0.05,
        "{op}: phases add up to {sum}, seconds is {secs}: {j}"
    );
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::Builder::new()
        .prefix("memferry-json-")
        .tempdir_in("/tmp")
        .unwrap();
    let snap = tmp.path().join("snap");
    (tmp, snap)
}

#[test]
fn one_object_per_command() {
    let (tmp, snap) = setup();
    for backend in ["buffered", "direct", "auto"] {
        let s = run(save_args(
            16,
            &snap,
            &["--shard-size", "1MiB", "--backend", backend, "--json"],
        ))
        .ok()
        .json();
        assert_report(&s, "save", 16 * MIB);
        assert_eq!(s["backend"].as_str(), Some(backend), "{s}");
        for op in ["restore", "verify"] {
            let j = run([op, &arg(&snap), "--backend", backend, "--json"])
                .ok()
                .json();
            assert_report(&j, op, 16 * MIB);
            assert_eq!(j["verified"], true, "{j}");
            assert_eq!(j["backend"].as_str(), Some(backend), "{j}");
        }
    }
    let j = run(["restore", &arg(&snap), "--no-verify", "--json"])
        .ok()
        .json();
    assert_report(&j, "restore", 16 * MIB);
    assert_eq!(j["verified"], false, "{j}");

    // --json before the subcommand works the same.
    let j = run(["--json", "verify", &arg(&snap)]).ok().json();
    assert_report(&j, "verify", 16 * MIB);

    let i = inspect(&snap);
    assert_eq!(i["op"].as_str(), Some("inspect"));
    assert_eq!(i["total_bytes"].as_u64(), Some(16 * MIB));
    assert_eq!(i["format_version"].as_u64(), Some(1));
    let i2 = run(["inspect", &arg(&snap), "--allocations", "--json"])
        .ok()
        .json();
    assert_eq!(
        i2["allocation_list"].as_array().map(Vec::len) as Option<usize>,
        i["allocations"].as_u64().map(|n| n as usize)
    );

    let g = run(["gc", &arg(&snap), "--json"]).ok().json();
    assert_eq!(g["op"].as_str(), Some("gc"), "{g}");
    assert!(g["removed"].is_array() && g["kept"].is_array(), "{g}");

    let out = tmp.path().join("model.safetensors");
    let e = run(["export", &arg(&snap), "--to", &arg(&out), "--json"])
        .ok()
        .json();
    assert_report(&e, "export", 16 * MIB);
    assert_eq!(e["to"].as_str(), Some(arg(&out).as_str()), "{e}");
    assert!(e["export"]["tensors"].as_u64().is_some(), "{e}");
}

#[test]
fn one_object_per_failure() {
    let (tmp, snap) = setup();
    let missing = tmp.path().join("missing");
    let out = tmp.path().join("x.safetensors");
    let cases: Vec<(&str, Vec<String>, i32)> = vec![
        ("save", save_source_args("foo:1", &snap, &[]), 2),
        ("restore", vec!["restore".into(), arg(&missing)], 2),
        ("verify", vec!["verify".into(), arg(&missing)], 2),
        ("inspect", vec!["inspect".into(), arg(&missing)], 2),
        (
            "export",
            vec!["export".into(), arg(&missing), "--to".into(), arg(&out)],
            2,
        ),
        (
            "gc",
            vec!["gc".into(), arg(&tmp.path().join("no/such/parent/snap"))],
            2,
        ),
    ];
    for (op, mut a, code) in cases {
        a.push("--json".into());
        let r = run(&a).code(code);
        assert!(!r.stderr.trim().is_empty(), "{op}: no message on stderr");
        let j = r.json();
        assert_eq!(j["op"].as_str(), Some(op), "{j}");
        assert_eq!(j["ok"], false, "{j}");
        assert!(
            j["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{op}: no error text: {j}"
        );
    }

    // Integrity failures and unsupported formats too.
    save(8, &snap, &["--shard-size", "1MiB"]);
    let mut m = read_manifest(&snap);
    m["format_version"] = 99.into();
    write_manifest(&snap, &m);
    let j = run(["restore", &arg(&snap), "--json"]).code(2).json();
    assert_eq!(j["ok"], false);
    assert!(
        j["error"].as_str().unwrap().contains("format_version"),
        "{j}"
    );
}

/// The safetensors file `export` writes: header length, JSON header, one
/// tensor per allocation, data offsets tiling the data section.
fn check_safetensors(path: &Path, snap: &Path) -> Value {
    let (header, n, file_len) = read_safetensors(path);
    let info = inspect(snap);
    let obj = header.as_object().unwrap();
    let tensors: Vec<(&String, &Value)> =
        obj.iter().filter(|(k, _)| *k != "__metadata__").collect();
    assert_eq!(
        tensors.len() as u64,
        info["allocations"].as_u64().unwrap(),
        "one tensor per allocation"
    );
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (name, t) in &tensors {
        let dtype = t["dtype"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no dtype"));
        assert!(!dtype.is_empty());
        assert!(t["shape"].is_array(), "{name}: no shape");
        let o = t["data_offsets"].as_array().unwrap();
        let (a, b) = (o[0].as_u64().unwrap(), o[1].as_u64().unwrap());
        assert!(a <= b, "{name}: bad offsets");
        ranges.push((a, b));
    }
    ranges.sort();
    let mut next = 0;
    for (a, b) in &ranges {
        assert_eq!(*a, next, "data offsets leave a gap or overlap");
        next = *b;
    }
    assert_eq!(next, info["total_bytes"].as_u64().unwrap());
    assert_eq!(file_len, 8 + n + next, "file length");
    header
}

#[test]
fn export_writes_valid_safetensors() {
    let (tmp, snap) = setup();
    save(16, &snap, &["--shard-size", "1MiB"]);
    let out = tmp.path().join("a.safetensors");
    let e = run(["export", &arg(&snap), "--to", &arg(&out), "--json"])
        .ok()
        .json();
    let header = check_safetensors(&out, &snap);
    let count =
        header.as_object().unwrap().len() - usize::from(header.get("__metadata__").is_some());
    assert_eq!(e["export"]["tensors"].as_u64(), Some(count as u64), "{e}");
    assert_eq!(
        e["export"]["file_bytes"].as_u64(),
        Some(std::fs::metadata(&out).unwrap().len()),
        "{e}"
    );

    // The same content saved differently (two roots, default shards, direct)
    // exports to the same bytes: the snapshot format does not leak into
    // the data.
    let roots: Vec<PathBuf> = ["r0", "r1"].iter().map(|r| tmp.path().join(r)).collect();
    for r in &roots {
        std::fs::create_dir(r).unwrap();
    }
    let snap2 = tmp.path().join("snap2");
    save(
        16,
        &snap2,
        &["--roots", &roots_arg(&roots), "--backend", "direct"],
    );
    let out2 = tmp.path().join("b.safetensors");
    run([
        "export",
        &arg(&snap2),
        "--to",
        &arg(&out2),
        "--backend",
        "buffered",
    ])
    .ok();
    check_safetensors(&out2, &snap2);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&out2).unwrap(),
        "exports of the same model differ"
    );

    // A round trip through the export: save the safetensors file again and
    // export that; same bytes.
    let snap3 = tmp.path().join("snap3");
    run([
        "save",
        "--source",
        &format!("safetensors:{}", arg(&out)),
        "--to",
        &arg(&snap3),
    ])
    .ok();
    let out3 = tmp.path().join("c.safetensors");
    run(["export", &arg(&snap3), "--to", &arg(&out3)]).ok();
    let h3 = check_safetensors(&out3, &snap3);
    let names = |h: &Value| {
        let mut v: Vec<String> = h
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&h3), names(&header), "tensor names changed");
}

/// Values clap rejects while parsing (an unknown `--backend`, a malformed
/// size) are errors like any other: with `--json`, stdout still carries the
/// one error object, as it does for values rejected after parsing (e.g.
/// `--chunk-size 3000`).
#[test]
fn usage_errors_with_json_print_one_object() {
    let (tmp, snap) = setup();
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "restore",
            vec![
                "restore".into(),
                arg(&snap),
                "--chunk-size".into(),
                "3000".into(),
            ],
            "chunk-size",
        ),
        (
            "save",
            save_args(8, &snap, &["--backend", "turbo"]),
            "turbo",
        ),
        (
            "restore",
            vec![
                "restore".into(),
                arg(&snap),
                "--backend".into(),
                "turbo".into(),
            ],
            "turbo",
        ),
        (
            "save",
            save_args(8, &snap, &["--shard-size", "lots"]),
            "lots",
        ),
    ];
    for (op, mut a, needle) in cases {
        a.push("--json".into());
        let r = run(&a).code(2);
        let j = r.json();
        assert_eq!(j["op"].as_str(), Some(op), "{j}");
        assert_eq!(j["ok"], false, "{j}");
        assert!(
            j["error"].as_str().is_some_and(|e| e.contains(needle)),
            "{op}: error does not mention {needle:?}: {j}"
        );
    }
    assert!(
        names(tmp.path()).is_empty(),
        "a rejected command wrote files"
    );
}
