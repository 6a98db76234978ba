//! Bad input: every case fails with a non-zero exit code and a clear message
//! on stderr, and changes nothing on disk (a recursive listing with sizes,
//! modes and mtimes is compared before and after).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use memferry_test_support::Mount;
use tempfile::TempDir;

/// A temp dir holding a committed 8 MiB snapshot at `snap` (1 MiB shards).
struct Fixture {
    tmp: TempDir,
    snap: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("memferry-bad-")
            .tempdir_in("/tmp")
            .unwrap();
        let snap = tmp.path().join("snap");
        save(8, &snap, &["--shard-size", "1MiB"]);
        Self { tmp, snap }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn listing(&self) -> std::collections::BTreeMap<PathBuf, Entry> {
        listing(self.tmp.path())
    }
}

#[test]
fn unknown_backend() {
    let f = Fixture::new();
    let before = f.listing();
    for to in [&f.snap, &f.path("new")] {
        let mut a = save_args(8, to, &["--backend", "turbo"]);
        run(&a).code(2).fails_with(&["turbo", "backend"]);
        a.push("--json".into());
        run(&a).code(2).fails_with(&["turbo"]);
    }
    run(["restore", &arg(&f.snap), "--backend", "turbo"])
        .code(2)
        .fails_with(&["turbo", "auto, buffered, direct"]);
    run(["verify", &arg(&f.snap), "--backend", "turbo"])
        .code(2)
        .fails_with(&["turbo"]);
    assert_same_listing(&before, &f.listing(), "unknown backend");
}

#[test]
fn unknown_source() {
    let f = Fixture::new();
    let before = f.listing();
    for to in [&f.snap, &f.path("new")] {
        run(["save", "--source", "foo:1", "--to", &arg(to)])
            .code(2)
            .fails_with(&["unknown source", "foo:1", "synthetic:SIZE"]);
    }
    assert_same_listing(&before, &f.listing(), "unknown source");
}

#[test]
fn missing_root() {
    let f = Fixture::new();
    let r0 = f.path("r0");
    fs::create_dir(&r0).unwrap();
    let missing = format!(
        "/nonexistent-memferry-{}",
        f.tmp.path().file_name().unwrap().to_string_lossy()
    );
    let before = f.listing();
    for to in [&f.snap, &f.path("new")] {
        let a = save_args(8, to, &["--roots", &missing]);
        run(&a).code(2).fails_with(&[&missing, "does not exist"]);
        // One good root and one missing: the good one stays untouched.
        let both = format!("{},{missing}", arg(&r0));
        let a = save_args(8, to, &["--roots", &both, "--shard-size", "1MiB"]);
        run(&a).code(2).fails_with(&[&missing, "does not exist"]);
    }
    assert!(!Path::new(&missing).exists(), "{missing} was created");
    assert_same_listing(&before, &f.listing(), "missing root");
}

#[test]
fn unwritable_root() {
    let f = Fixture::new();
    let r0 = f.path("r0");
    fs::create_dir(&r0).unwrap();
    let ro = Mount::new("tmpfs", Some("ro,size=1m"), &f.path("ro"));
    let before = f.listing();
    for to in [&f.snap, &f.path("new")] {
        let a = save_args(8, to, &["--roots", &arg(&ro.dir)]);
        run(&a).code(2).fails_with(&[&arg(&ro.dir), "not writable"]);
        let both = format!("{},{}", arg(&r0), arg(&ro.dir));
        let a = save_args(8, to, &["--roots", &both, "--shard-size", "1MiB"]);
        run(&a).code(2).fails_with(&[&arg(&ro.dir), "not writable"]);
    }
    // The snapshot directory itself on the read-only filesystem.
    let a = save_args(8, &ro.dir.join("snap"), &[]);
    run(&a).code(2).fails_with(&[&arg(&ro.dir), "not writable"]);
    assert_same_listing(&before, &f.listing(), "unwritable root");
}

#[test]
fn unknown_format_version() {
    let f = Fixture::new();
    let mut m = read_manifest(&f.snap);
    m["format_version"] = 99.into();
    write_manifest(&f.snap, &m);
    let before = f.listing();
    for op in ["restore", "verify", "inspect"] {
        run([op, &arg(&f.snap)])
            .code(2)
            .fails_with(&["format_version", "99"]);
    }
    for backend in ["buffered", "direct"] {
        run(["restore", &arg(&f.snap), "--backend", backend])
            .code(2)
            .fails_with(&["format_version", "99"]);
    }
    let out = f.path("out.safetensors");
    run(["export", &arg(&f.snap), "--to", &arg(&out)])
        .code(2)
        .fails_with(&["format_version"]);
    assert!(
        !out.exists(),
        "export wrote a file for an unreadable snapshot"
    );
    assert_same_listing(&before, &f.listing(), "unknown format_version");
}

/// Shard paths that leave their root are rejected before any file is
/// opened, and nothing they point to is ever deleted.
#[test]
fn shard_path_escaping_its_root() {
    let f = Fixture::new();
    // Files the bad paths point at (with the right size, so that only the
    // path check can stop them).
    let size = read_manifest(&f.snap)["shards"][1]["size"]
        .as_u64()
        .unwrap();
    let outside = f.path("outside.bin");
    fs::write(&outside, vec![7u8; size as usize]).unwrap();
    let pristine = read_manifest(&f.snap);
    let cases = [
        (arg(&outside), "absolute"),
        ("../outside.bin".to_string(), ".."),
        ("shards/../../outside.bin".to_string(), ".."),
    ];
    for (bad, why) in cases {
        let mut m = pristine.clone();
        m["shards"][1]["path"] = bad.clone().into();
        write_manifest(&f.snap, &m);
        let before = f.listing();
        for op in ["restore", "verify", "inspect"] {
            run([op, &arg(&f.snap)])
                .code(2)
                .fails_with(&["invalid manifest", &bad, why]);
        }
        run(["restore", &arg(&f.snap), "--backend", "direct"])
            .code(2)
            .fails_with(&["invalid manifest", why]);
        // gc and a new save over it refuse (such a manifest proves nothing),
        // and delete nothing, neither what the path names nor the shards.
        run(["gc", &arg(&f.snap)])
            .code(2)
            .fails_with(&["gc of", "refused", "invalid manifest"]);
        run(save_args(8, &f.snap, &["--shard-size", "1MiB"]))
            .code(2)
            .fails_with(&["save of", "refused", "invalid manifest"]);
        assert_same_listing(&before, &f.listing(), &format!("shard path {bad:?}"));
    }
    write_manifest(&f.snap, &pristine);
    save(8, &f.snap, &["--shard-size", "1MiB"]);
    run(["verify", &arg(&f.snap)]).ok();
    assert_eq!(
        fs::read(&outside).unwrap(),
        vec![7u8; size as usize],
        "a file outside the snapshot was changed"
    );
}

#[test]
fn no_committed_snapshot() {
    let f = Fixture::new();
    let empty = f.path("empty");
    fs::create_dir(&empty).unwrap();
    let missing = f.path("missing");
    let before = f.listing();
    for dir in [&empty, &missing] {
        for op in ["restore", "verify", "inspect"] {
            run([op, &arg(dir)])
                .code(2)
                .fails_with(&["no committed snapshot", &arg(dir)]);
        }
        run(["restore", &arg(dir), "--json"])
            .code(2)
            .fails_with(&["no committed snapshot"]);
        let out = f.path("out.safetensors");
        run(["export", &arg(dir), "--to", &arg(&out)])
            .code(2)
            .fails_with(&["no committed snapshot"]);
    }
    assert!(!missing.exists(), "a failing restore created its path");
    assert_same_listing(&before, &f.listing(), "no committed snapshot");
}

#[test]
fn shard_shorter_than_the_manifest_says() {
    let f = Fixture::new();
    let shard = shard_path(&f.snap, 2);
    let (mid, _, _) = payload_offset(&f.snap, 2);
    truncate(&shard, mid);
    let before = f.listing();
    for op in ["restore", "verify"] {
        for backend in ["buffered", "direct"] {
            run([op, &arg(&f.snap), "--backend", backend])
                .code(3)
                .fails_with(&[&arg(&shard), "truncated"]);
        }
    }
    assert_same_listing(&before, &f.listing(), "truncated shard");
}

#[test]
fn save_refuses_a_directory_with_unrelated_files() {
    let f = Fixture::new();
    let other = f.path("other");
    fs::create_dir_all(other.join("sub")).unwrap();
    fs::write(other.join("notes.txt"), b"keep me").unwrap();
    fs::write(other.join("sub/weights.bin"), vec![1u8; 10_000]).unwrap();
    let file = f.path("plain-file");
    fs::write(&file, b"not a directory").unwrap();
    let before = f.listing();
    for extra in [&[][..], &["--json"][..], &["--shard-size", "1MiB"][..]] {
        run(save_args(8, &other, extra))
            .code(2)
            .fails_with(&[&arg(&other), "not a memferry snapshot"]);
    }
    run(save_args(8, &file, &[]))
        .code(2)
        .fails_with(&[&arg(&file), "not a directory"]);
    assert_same_listing(&before, &f.listing(), "save over unrelated files");
    // gc of such a path removes nothing either.
    let inside = listing(&other);
    run(["gc", &arg(&other)]).ok();
    assert_same_listing(&inside, &listing(&other), "gc of unrelated files");
    assert_eq!(fs::read(other.join("notes.txt")).unwrap(), b"keep me");
}

/// Checks the state after a failed save on a full filesystem: the previous
/// 4 MiB snapshot is untouched and still verifies and restores, and no
/// staging or shard directory of the failed save remains.
fn check_after_no_space(
    snap: &Path,
    before: &std::collections::BTreeMap<PathBuf, Entry>,
    dirs: &[&Path],
    roots: &[PathBuf],
) {
    assert_same_listing(before, &listing(snap), "previous snapshot after ENOSPC");
    let v = run(["verify", &arg(snap), "--json"]).ok().json();
    assert_eq!(v["bytes"].as_u64(), Some(4 * MIB));
    let r = run(["restore", &arg(snap), "--json"]).ok().json();
    assert_eq!(r["bytes"].as_u64(), Some(4 * MIB));
    for d in dirs {
        assert_eq!(
            any_stage_dirs(d),
            Vec::<String>::new(),
            "staging directories remain in {}",
            d.display()
        );
        assert!(
            !names(d).iter().any(|n| n.ends_with(".memferry-lock")),
            "a lock file remains in {}: {:?}",
            d.display(),
            names(d)
        );
    }
    if !roots.is_empty() {
        let committed = inspect(snap)["identity"]["save_id"]
            .as_str()
            .unwrap()
            .to_string();
        for r in roots {
            assert_eq!(
                names(r),
                vec![format!("snap.memferry-{committed}")],
                "leftovers of the failed save on {}",
                r.display()
            );
        }
    }
}

#[test]
fn disk_full_during_save() {
    let tmp = tempfile::Builder::new()
        .prefix("memferry-full-")
        .tempdir_in("/tmp")
        .unwrap();
    let full = Mount::new("tmpfs", Some("size=24m"), &tmp.path().join("full"));
    let snap = full.dir.join("snap");
    save(4, &snap, &["--shard-size", "1MiB"]);
    let before = listing(&snap);
    // Many small shards (fails part-way) and one big shard (fails at once),
    // with each backend.
    for extra in [
        &["--shard-size", "1MiB"][..],
        &["--shard-size", "1MiB", "--backend", "buffered"][..],
        &["--backend", "direct"][..],
    ] {
        let done = tmp.path().join("done.json");
        let mut a = save_args(64, &snap, extra);
        a.extend(["--complete-file".into(), arg(&done)]);
        run(&a).code(1).fails_with(&["no space"]);
        assert!(!done.exists(), "a failed save wrote its complete-file");
        check_after_no_space(&snap, &before, &[&full.dir], &[]);
    }
}

/// Out of inodes: creating a shard file (not reserving its space) fails.
#[test]
fn out_of_inodes_during_save() {
    let tmp = tempfile::Builder::new()
        .prefix("memferry-inodes-")
        .tempdir_in("/tmp")
        .unwrap();
    let fs_dir = Mount::new(
        "tmpfs",
        Some("size=256m,nr_inodes=24"),
        &tmp.path().join("fs"),
    );
    let snap = fs_dir.dir.join("snap");
    save(4, &snap, &["--shard-size", "1MiB"]);
    let before = listing(&snap);
    for backend in ["buffered", "direct"] {
        let a = save_args(64, &snap, &["--shard-size", "1MiB", "--backend", backend]);
        run(&a).code(1).fails_with(&["no space"]);
        check_after_no_space(&snap, &before, &[&fs_dir.dir], &[]);
    }
}

#[test]
fn disk_full_on_a_root() {
    let tmp = tempfile::Builder::new()
        .prefix("memferry-fullroot-")
        .tempdir_in("/tmp")
        .unwrap();
    let big = tmp.path().join("big");
    fs::create_dir(&big).unwrap();
    let small = Mount::new("tmpfs", Some("size=24m"), &tmp.path().join("small"));
    let roots = vec![big.clone(), small.dir.clone()];
    let snap = tmp.path().join("snap");
    let r = roots_arg(&roots);
    save(4, &snap, &["--shard-size", "1MiB", "--roots", &r]);
    let before = listing(&snap);
    for backend in ["buffered", "direct"] {
        let a = save_args(
            96,
            &snap,
            &["--shard-size", "1MiB", "--roots", &r, "--backend", backend],
        );
        run(&a).code(1).fails_with(&["no space", &arg(&small.dir)]);
        check_after_no_space(&snap, &before, &[tmp.path()], &roots);
    }
}

/// A directory that merely holds a file named `manifest.json` (or an owner
/// marker, or that is a root's shard directory) is no snapshot: save
/// refuses it and deletes nothing.
#[test]
fn save_refuses_a_directory_that_only_looks_like_a_snapshot() {
    let f = Fixture::new();
    // A web app with a manifest.json and a file named like a shard.
    let app = f.path("app");
    fs::create_dir(&app).unwrap();
    fs::write(app.join("manifest.json"), b"{}").unwrap();
    fs::write(app.join("index.html"), b"x").unwrap();
    fs::write(app.join("shard-1.bin"), b"d").unwrap();
    // A directory holding only an owner marker and a file.
    let marked = f.path("marked");
    fs::create_dir(&marked).unwrap();
    fs::copy(
        f.snap.join("memferry-owner.json"),
        marked.join("memferry-owner.json"),
    )
    .unwrap();
    fs::write(marked.join("shard-00000.bin"), b"mine").unwrap();
    // A snapshot striped over two roots, and its shard directory on r1.
    let (r1, r2) = (f.path("r1"), f.path("r2"));
    fs::create_dir(&r1).unwrap();
    fs::create_dir(&r2).unwrap();
    let striped = f.path("striped");
    save(
        4,
        &striped,
        &[
            "--roots",
            &roots_arg(&[r1.clone(), r2.clone()]),
            "--shard-size",
            "1MiB",
        ],
    );
    let shard_dir = r1.join(&names(&r1)[0]);
    // The snapshot `snap`, copied under another name.
    let moved = f.path("moved");
    fs::create_dir_all(moved.join("shards")).unwrap();
    for n in names(&f.snap.join("shards")) {
        fs::copy(
            f.snap.join("shards").join(&n),
            moved.join("shards").join(&n),
        )
        .unwrap();
    }
    for n in ["manifest.json", "memferry-owner.json"] {
        fs::copy(f.snap.join(n), moved.join(n)).unwrap();
    }
    let before = f.listing();
    for (to, needle) in [
        (&app, "invalid manifest"),
        (&marked, "not a memferry snapshot"),
        (&shard_dir, "not a memferry snapshot"),
        (&moved, "saved as \"snap\""),
    ] {
        run(save_args(1, to, &[]))
            .code(2)
            .fails_with(&[&arg(to), needle]);
    }
    assert_same_listing(&before, &f.listing(), "save over a look-alike");
    run(["verify", &arg(&striped)]).ok();
    assert_eq!(fs::read(app.join("manifest.json")).unwrap(), b"{}");
}

/// A manifest that does not load (a newer format_version, damaged JSON)
/// hides which save is committed: gc and save refuse, and delete nothing.
#[test]
fn gc_and_save_refuse_a_manifest_that_does_not_load() {
    let f = Fixture::new();
    let (r3, r4) = (f.path("r3"), f.path("r4"));
    fs::create_dir(&r3).unwrap();
    fs::create_dir(&r4).unwrap();
    let roots = roots_arg(&[r3.clone(), r4.clone()]);
    let s2 = f.path("s2");
    save(4, &s2, &["--roots", &roots, "--shard-size", "1MiB"]);
    let pristine = read_manifest(&s2);
    let mut newer = pristine.clone();
    newer["format_version"] = 2.into();
    let newer = serde_json::to_vec_pretty(&newer).unwrap();
    let cases: [(&[u8], &str); 2] = [
        (&newer, "upgrade memferry"),
        (b"{\"format_version\": 1, \"kind\"", "not valid JSON"),
    ];
    for (text, why) in cases {
        fs::write(s2.join("manifest.json"), text).unwrap();
        let before = f.listing();
        run(["gc", &arg(&s2), "--roots", &roots])
            .code(2)
            .fails_with(&["gc of", "refused", why, "nothing was changed"]);
        run(save_args(1, &s2, &["--roots", &roots]))
            .code(2)
            .fails_with(&["save of", "refused", why]);
        assert_same_listing(&before, &f.listing(), why);
    }
    write_manifest(&s2, &pristine);
    run(["verify", &arg(&s2)]).ok();
}

/// Roots inside the snapshot are found however `--to` names it: through
/// `..` or through a symlinked parent.
#[test]
fn root_inside_the_snapshot_named_another_way() {
    let f = Fixture::new();
    fs::create_dir(f.path("x")).unwrap();
    std::os::unix::fs::symlink(f.tmp.path(), f.path("link")).unwrap();
    let shards = f.snap.join("shards");
    let before = f.listing();
    for to in [f.path("x/../snap"), f.path("link/snap")] {
        for root in [shards.clone(), f.path("link/snap/shards")] {
            run(save_args(1, &to, &["--roots", &arg(&root)]))
                .code(2)
                .fails_with(&["lies inside the snapshot path"]);
        }
    }
    assert_same_listing(&before, &f.listing(), "root inside the snapshot");
    run(["verify", &arg(&f.snap)]).ok();
}

/// A `--complete-file` that cannot be written is found before the save
/// commits anything.
#[test]
fn unwritable_complete_file() {
    let f = Fixture::new();
    let missing_dir = f.path("no-such-dir/done");
    let is_dir = f.path("done-dir");
    fs::create_dir(&is_dir).unwrap();
    let before = f.listing();
    for done in [&missing_dir, &is_dir] {
        for to in [&f.snap, &f.path("new")] {
            let mut a = save_args(2, to, &[]);
            a.extend(["--complete-file".into(), arg(done)]);
            run(&a).code(2).fails_with(&["--complete-file", &arg(done)]);
        }
    }
    assert_same_listing(&before, &f.listing(), "unwritable complete-file");
    assert_eq!(inspect(&f.snap)["total_bytes"].as_u64(), Some(8 * MIB));
}

/// A crafted manifest (alignment 512, an extent moved by 512 bytes into
/// its padding) is rejected as invalid; it made the plan builder panic.
#[test]
fn manifest_with_another_alignment() {
    let f = Fixture::new();
    let mut m = read_manifest(&f.snap);
    m["alignment"] = 512.into();
    // An extent followed by at least 512 bytes of padding: moved by 512 it
    // still overlaps nothing.
    let e = m["allocations"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .flat_map(|a| a["extents"].as_array_mut().unwrap())
        .find(|e| {
            let tail = e["length"].as_u64().unwrap() % 4096;
            tail != 0 && 4096 - tail >= 512
        })
        .expect("an extent with 512 bytes of padding");
    e["offset"] = (e["offset"].as_u64().unwrap() + 512).into();
    write_manifest(&f.snap, &m);
    let before = f.listing();
    for op in ["restore", "verify", "inspect"] {
        run([op, &arg(&f.snap)])
            .code(2)
            .fails_with(&["invalid manifest", "alignment 512"]);
    }
    assert_same_listing(&before, &f.listing(), "alignment 512");
}
