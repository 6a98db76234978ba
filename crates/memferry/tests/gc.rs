//! gc deletes only what it can prove belongs to the snapshot.

use std::fs;
use std::path::Path;

use memferry::snapshot::source::synthetic;
use memferry::snapshot::{LoadOptions, Manifest, SaveOptions, gc, restore, save};

fn save_small(snap: &Path, roots: Option<Vec<std::path::PathBuf>>, size: u64) {
    let src = synthetic(size, 1).unwrap().into_source();
    save(
        &src,
        snap,
        &SaveOptions {
            roots,
            shard_size: 1 << 20,
            ..SaveOptions::default()
        },
    )
    .unwrap();
}

#[test]
fn gc_ignores_what_a_manifest_claims() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    save_small(&snap, None, 2 << 20);
    // A hostile or damaged manifest cannot make gc delete a foreign file:
    // manifests with absolute or escaping shard paths do not even load.
    let victim = dir.path().join("precious.bin");
    fs::write(&victim, b"keep me").unwrap();
    let path = snap.join("manifest.json");
    let text = fs::read_to_string(&path).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["shards"][0]["path"] = "../precious.bin".into();
    fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    // Such a manifest proves nothing about the snapshot's own files either,
    // so gc refuses outright.
    let e = gc(&snap, &[]).unwrap_err();
    assert!(
        matches!(e, memferry::Error::UnreadableManifest { .. }),
        "{e}"
    );
    assert_eq!(fs::read(&victim).unwrap(), b"keep me");
    assert!(snap.join("shards").is_dir(), "committed shards untouched");
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A re-save with other roots makes the previous snapshot's shard
/// directories on the old roots leftovers: the save removes them.
#[test]
fn resave_with_other_roots_removes_the_old_shards() {
    let dir = tempfile::tempdir().unwrap();
    let (ra, rb) = (dir.path().join("ra"), dir.path().join("rb"));
    fs::create_dir(&ra).unwrap();
    fs::create_dir(&rb).unwrap();
    let snap = dir.path().join("snap");
    save_small(&snap, Some(vec![ra.clone()]), 2 << 20);
    save_small(&snap, Some(vec![rb.clone()]), 3 << 20);
    let m = Manifest::load(&snap).unwrap();
    assert_eq!(m.total_bytes, 3 << 20);
    assert_eq!(names(&ra), Vec::<String>::new(), "old shards left on ra");
    assert_eq!(
        names(&rb),
        vec![format!("snap.memferry-{}", m.identity.save_id)]
    );
    // Back to the snapshot directory itself: rb is cleaned up too.
    save_small(&snap, None, 1 << 20);
    assert_eq!(names(&rb), Vec::<String>::new(), "old shards left on rb");
    restore(&snap, &LoadOptions::default()).unwrap();
}

/// Without its manifest, the snapshot directory's own owner marker still
/// names the committed save: gc keeps that save's shard directories.
#[test]
fn gc_keeps_the_save_the_snapshot_marker_names() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let snap = dir.path().join("snap");
    save_small(&snap, Some(vec![root.clone()]), 2 << 20);
    let m = Manifest::load(&snap).unwrap();
    let aside = dir.path().join("manifest.json.aside");
    fs::rename(snap.join("manifest.json"), &aside).unwrap();
    let report = gc(&snap, std::slice::from_ref(&root)).unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    fs::rename(&aside, snap.join("manifest.json")).unwrap();
    assert_eq!(
        names(&root),
        vec![format!("snap.memferry-{}", m.identity.save_id)]
    );
    restore(&snap, &LoadOptions::default()).unwrap();
}

#[test]
fn gc_keeps_lookalikes_without_a_matching_owner_marker() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let snap = dir.path().join("snap");
    save_small(&snap, Some(vec![root.clone()]), 2 << 20);
    // Directories that match the naming pattern but prove nothing.
    let stranger = root.join("snap.memferry-0000000000000000");
    fs::create_dir(&stranger).unwrap();
    fs::write(stranger.join("shard-00000.bin"), b"not ours").unwrap();
    let stage = dir.path().join(".snap.memferry-stage-feedfacefeedface");
    fs::create_dir(&stage).unwrap();
    fs::write(stage.join("notes.txt"), b"a user's file").unwrap();
    // A marker of another snapshot name.
    let other = root.join("snap.memferry-1111111111111111");
    fs::create_dir(&other).unwrap();
    fs::write(
        other.join("memferry-owner.json"),
        r#"{"kind":"memferry-owner","name":"other","lineage":"x","save_id":"1111111111111111"}"#,
    )
    .unwrap();
    let report = gc(&snap, std::slice::from_ref(&root)).unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    assert_eq!(report.kept.len(), 3, "{report:?}");
    assert!(stranger.join("shard-00000.bin").exists());
    assert!(stage.join("notes.txt").exists());
    assert!(other.exists());
    restore(&snap, &LoadOptions::default()).expect("committed snapshot intact");
}

#[test]
fn resave_replaces_atomically_and_removes_the_old_shards() {
    let dir = tempfile::tempdir().unwrap();
    let roots: Vec<_> = (0..2)
        .map(|i| {
            let r = dir.path().join(format!("r{i}"));
            fs::create_dir(&r).unwrap();
            r
        })
        .collect();
    let snap = dir.path().join("snap");
    save_small(&snap, Some(roots.clone()), 3 << 20);
    let first = Manifest::load(&snap).unwrap();
    save_small(&snap, Some(roots.clone()), 5 << 20);
    let second = Manifest::load(&snap).unwrap();
    assert_eq!(first.identity.lineage, second.identity.lineage);
    assert_ne!(first.identity.save_id, second.identity.save_id);
    assert_eq!(second.total_bytes, 5 << 20);
    for r in &roots {
        let names: Vec<String> = fs::read_dir(r)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec![format!("snap.memferry-{}", second.identity.save_id)],
            "only the committed save's shards remain on {}",
            r.display()
        );
    }
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no staging or lock left: {leftovers:?}"
    );
}
