//! A filesystem without renameat2 flags, as NFS and CIFS are: a FUSE view
//! (bindfs) of a local directory. KV blocks and new snapshots must work
//! there; replacing a snapshot, which needs an atomic directory swap, must
//! fail with an error that says what to do, losing nothing.

mod common;

use common::*;
use memferry_test_support::Mount;

#[test]
fn kv_blocks_and_snapshots_work_where_renameat2_flags_do_not() {
    let tmp = tempfile::tempdir().unwrap();
    let source = tmp.path().join("source");
    std::fs::create_dir(&source).unwrap();
    let fs = Mount::bindfs(&source, &tmp.path().join("shared"));

    // KV: the namespace records its layout, blocks are published, verified.
    let kv = fs.dir.join("kv");
    std::fs::create_dir(&kv).unwrap();
    let b = run([
        "kv",
        "bench",
        "--json",
        "--keep",
        "--root",
        &arg(&kv),
        "--blocks",
        "16",
        "--block-size",
        "256KiB",
    ])
    .ok()
    .json();
    assert_eq!(b["failed"], 0, "{b}");
    let v = run(["kv", "verify", "--json", &arg(&kv)]).ok().json();
    assert_eq!(
        (v["checked"].as_u64(), v["ok"].as_bool()),
        (Some(16), Some(true)),
        "{v}"
    );

    // Snapshots: a new one is published and restores.
    let snap = fs.dir.join("snap");
    save(8, &snap, &[]);
    run(["verify", &arg(&snap)]).ok();
    let before = listing(&snap);
    // Replacing it needs RENAME_EXCHANGE: a clear error, the old snapshot
    // untouched and restorable, nothing left behind.
    run(save_args(4, &snap, &[])).fails_with(&[
        "cannot swap two directories atomically",
        "save to a new path",
    ]);
    assert_same_listing(&before, &listing(&snap), "old snapshot");
    run(["restore", &arg(&snap)]).ok();
    assert!(any_stage_dirs(&fs.dir).is_empty(), "{:?}", names(&fs.dir));
}
