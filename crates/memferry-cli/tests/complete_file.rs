//! `--complete-file F`: written (atomically, as JSON) only once a save is
//! committed or a restore is complete; never after a failure.

mod common;

use std::path::Path;

use common::*;

fn assert_complete(f: &Path, op: &str, snap: &Path) {
    let text = std::fs::read(f)
        .unwrap_or_else(|e| panic!("{op}: complete-file {} missing: {e}", f.display()));
    let v: serde_json::Value = serde_json::from_slice(&text)
        .unwrap_or_else(|e| panic!("{op}: complete-file is not JSON: {e}"));
    assert_eq!(v["op"].as_str(), Some(op), "{v}");
    assert_eq!(v["snapshot"].as_str(), Some(arg(snap).as_str()), "{v}");
    // No temporary file is left next to it.
    let dir = f.parent().unwrap();
    let name = f.file_name().unwrap().to_string_lossy().into_owned();
    let temps: Vec<String> = names(dir)
        .into_iter()
        .filter(|n| n != &name && n.contains(&name))
        .collect();
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
}

/// Runs `restore SNAP --backend BACKEND --complete-file F` and waits for it.
fn restore_completing(snap: &Path, backend: &str, f: &Path) -> Run {
    run([
        "restore",
        &arg(snap),
        "--backend",
        backend,
        "--complete-file",
        &arg(f),
    ])
}

#[test]
fn written_after_success() {
    let tmp = tempfile::tempdir_in("/tmp").unwrap();
    let snap = tmp.path().join("snap");
    let done = tmp.path().join("saved.json");
    assert!(!done.exists());
    let mut a = save_args(8, &snap, &["--shard-size", "1MiB", "--complete-file"]);
    a.push(arg(&done));
    run(&a).ok();
    assert_complete(&done, "save", &snap);

    for backend in ["buffered", "direct"] {
        let restored = tmp.path().join(format!("restored-{backend}.json"));
        restore_completing(&snap, backend, &restored).ok();
        assert_complete(&restored, "restore", &snap);
    }

    // A second save replaces the complete-file of the first.
    let before = std::fs::read(&done).unwrap();
    let mut a = save_args(4, &snap, &["--complete-file"]);
    a.push(arg(&done));
    run(&a).ok();
    assert_complete(&done, "save", &snap);
    assert_ne!(std::fs::read(&done).unwrap(), before);
}

#[test]
fn absent_after_a_failing_restore() {
    let tmp = tempfile::tempdir_in("/tmp").unwrap();
    let snap = tmp.path().join("snap");
    save(8, &snap, &["--shard-size", "1MiB"]);
    let f = tmp.path().join("restored.json");

    // Nothing committed.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for dir in [empty.clone(), tmp.path().join("missing")] {
        run(["restore", &arg(&dir), "--complete-file", &arg(&f)]).code(2);
        assert!(!f.exists(), "complete-file written by a failed restore");
    }

    // A corrupt payload found part-way through the transfer.
    let shard = shard_path(&snap, 5);
    let (at, _, _) = payload_offset(&snap, 5);
    flip_bit(&shard, at);
    for backend in ["buffered", "direct"] {
        restore_completing(&snap, backend, &f).code(3);
        assert!(
            !f.exists(),
            "complete-file written by a failed restore ({backend})"
        );
    }
    flip_bit(&shard, at);

    // A missing shard.
    let last = shard_path(&snap, 7);
    let kept = tmp.path().join("kept.bin");
    std::fs::rename(&last, &kept).unwrap();
    run(["restore", &arg(&snap), "--complete-file", &arg(&f)]).code(3);
    assert!(!f.exists(), "complete-file written by a failed restore");
    std::fs::rename(&kept, &last).unwrap();

    // Bad arguments (cuda:0 is only bad without a CUDA driver).
    if !memferry::memory::cuda::available() {
        run([
            "restore",
            &arg(&snap),
            "--device",
            "cuda:0",
            "--complete-file",
            &arg(&f),
        ])
        .fails_with(&["cuda"]);
        assert!(!f.exists(), "complete-file written by a failed restore");
    }

    // Repaired: now it is written.
    run(["restore", &arg(&snap), "--complete-file", &arg(&f)]).ok();
    assert_complete(&f, "restore", &snap);
}

#[test]
fn absent_after_a_failing_save() {
    let tmp = tempfile::tempdir_in("/tmp").unwrap();
    let f = tmp.path().join("saved.json");
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("x"), b"x").unwrap();
    let snap = tmp.path().join("snap");
    let cases: Vec<Vec<String>> = vec![
        save_source_args("foo:1", &snap, &[]),
        save_args(8, &snap, &["--backend", "turbo"]),
        save_args(8, &snap, &["--roots", "/nonexistent-memferry-root"]),
        save_args(8, &other, &[]),
    ];
    for mut a in cases {
        a.extend(["--complete-file".into(), arg(&f)]);
        let r = run(&a);
        assert_ne!(r.code, 0, "{a:?} succeeded");
        assert!(!f.exists(), "complete-file written by a failed save: {a:?}");
    }
    // (Disk full is covered in bad_input.rs.)
}
