//! Crash safety: a `save` killed with SIGKILL at any moment leaves either the
//! previous committed snapshot or the new one, complete, never a mix or a
//! part; `gc` then removes every leftover and the next save succeeds.
//!
//! Old and new content are told apart by size: A = synthetic:16MiB, B =
//! synthetic:24MiB (the synthetic source always uses seed 0).
//!
//! `MEMFERRY_TEST_SEED` fixes the random kill delays (the seed is printed);
//! `MEMFERRY_CRASH_ITERATIONS` changes the number of random kills.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

const A_MIB: u64 = 16;
const B_MIB: u64 = 24;

/// Random kills per test (over a committed snapshot).
fn iterations(default: usize) -> usize {
    std::env::var("MEMFERRY_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A parent directory for snapshots and, optionally, striped roots.
struct Place {
    _tmp: TempDir,
    parent: PathBuf,
    roots: Vec<PathBuf>,
}

impl Place {
    fn new(root_count: usize) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("memferry-crash-")
            .tempdir_in("/tmp")
            .unwrap();
        let parent = tmp.path().join("parent");
        std::fs::create_dir(&parent).unwrap();
        let roots: Vec<PathBuf> = (0..root_count)
            .map(|i| {
                let r = tmp.path().join(format!("root{i}"));
                std::fs::create_dir(&r).unwrap();
                r
            })
            .collect();
        Self {
            _tmp: tmp,
            parent,
            roots,
        }
    }

    /// Extra save arguments: small shards (many files), the roots if any.
    fn save_extra(&self) -> Vec<String> {
        let mut v = vec!["--shard-size".to_string(), "1MiB".into()];
        if !self.roots.is_empty() {
            v.push("--roots".into());
            v.push(roots_arg(&self.roots));
        }
        v
    }

    fn save_args(&self, size_mib: u64, to: &Path) -> Vec<String> {
        let extra = self.save_extra();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        save_args(size_mib, to, &extra)
    }

    fn save(&self, size_mib: u64, to: &Path) {
        run(self.save_args(size_mib, to)).ok();
    }

    fn spawn_save(&self, size_mib: u64, to: &Path, pause_at: Option<&str>) -> Child {
        let mut c = command();
        c.args(self.save_args(size_mib, to))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = pause_at {
            c.env("MEMFERRY_TEST_PAUSE_AT", p);
        }
        c.spawn().expect("spawning save")
    }
}

/// Median wall time of a complete `save` of B (process start to exit).
fn typical_save_duration(root_count: usize) -> Duration {
    let place = Place::new(root_count);
    let to = place.parent.join("calibrate");
    let mut times: Vec<Duration> = (0..3)
        .map(|_| {
            let t = Instant::now();
            let status = place.spawn_save(B_MIB, &to, None).wait().unwrap();
            assert!(status.success(), "calibration save failed");
            t.elapsed()
        })
        .collect();
    times.sort();
    times[1]
}

/// How a killed save ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Killed,
    Finished,
}

fn kill_after(mut child: Child, delay: Duration) -> Ending {
    std::thread::sleep(delay);
    if let Some(status) = child.try_wait().unwrap() {
        assert!(status.success(), "an uninterrupted save failed: {status}");
        return Ending::Finished;
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    if status.signal() == Some(9) {
        Ending::Killed
    } else {
        assert!(status.success(), "an uninterrupted save failed: {status}");
        Ending::Finished
    }
}

/// Waits (polling) until `ready` holds, then SIGKILLs the paused save.
fn kill_when(mut child: Child, what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(25);
    while !ready() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("save ended ({status}) before reaching the pause point {what}");
        }
        assert!(
            Instant::now() < deadline,
            "save never reached the pause point {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "save was not paused at {what}"
    );
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "save at {what} was not killed");
}

/// The committed snapshot a reader sees at `p`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    bytes: u64,
    save_id: String,
}

/// Restores, verifies and inspects `p`: either a complete A or B, or (only
/// when `may_be_empty`) no committed snapshot at all.
fn observe(p: &Path, may_be_empty: bool, when: &str) -> Option<Seen> {
    let r = run(["restore", &arg(p), "--json"]);
    if r.code != 0 {
        assert!(
            may_be_empty,
            "{when}: restore failed although a snapshot was committed before:\n{}",
            r.stderr
        );
        r.code(2).stderr_has(&["no committed snapshot"]);
        run(["verify", &arg(p)])
            .code(2)
            .stderr_has(&["no committed snapshot"]);
        return None;
    }
    let restored = r.json()["bytes"].as_u64().unwrap();
    assert!(
        restored == A_MIB * MIB || restored == B_MIB * MIB,
        "{when}: restore returned {restored} bytes: neither A nor B"
    );
    let verified = run(["verify", &arg(p), "--json"]).ok().json()["bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(verified, restored, "{when}: verify and restore disagree");
    let info = inspect(p);
    assert_eq!(info["total_bytes"].as_u64(), Some(restored), "{when}");
    assert_eq!(
        info["source"].as_str(),
        Some(format!("synthetic:{restored}:seed=0").as_str()),
        "{when}: the manifest describes another source"
    );
    Some(Seen {
        bytes: restored,
        save_id: info["identity"]["save_id"].as_str().unwrap().to_string(),
    })
}

/// Checks that nothing of uncommitted saves of `name` is left: no staging
/// directory, no lock file, and on the roots only the committed save's
/// shard directory.
fn assert_no_leftovers(place: &Place, name: &str, seen: &Option<Seen>, when: &str) {
    let stages = stage_dirs(&place.parent, name);
    assert!(
        stages.is_empty(),
        "{when}: staging directories remain: {:#?}",
        stages
            .iter()
            .map(|d| listing(&place.parent.join(d)))
            .collect::<Vec<_>>()
    );
    let lock = format!(".{name}.memferry-lock");
    assert!(
        !names(&place.parent).contains(&lock),
        "{when}: lock file {lock} remains"
    );
    let p = place.parent.join(name);
    match seen {
        None => assert!(
            !p.exists(),
            "{when}: nothing was committed but {} exists: {:?}",
            p.display(),
            names(&p)
        ),
        Some(_) => {
            let mut want = vec!["manifest.json".to_string(), "memferry-owner.json".into()];
            if place.roots.is_empty() {
                want.push("shards".into());
            }
            assert_eq!(names(&p), want, "{when}: unexpected files in the snapshot");
        }
    }
    let prefix = format!("{name}.memferry-");
    for root in &place.roots {
        let dirs: Vec<String> = names(root)
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect();
        let want: Vec<String> = seen
            .iter()
            .map(|s| format!("{name}.memferry-{}", s.save_id))
            .collect();
        assert_eq!(
            dirs,
            want,
            "{when}: shard directories of uncommitted saves remain on {}",
            root.display()
        );
    }
}

/// After a kill: the state is A or B (or nothing, if allowed), `gc`
/// succeeds and removes every leftover without changing what is committed.
fn check_after_kill(place: &Place, name: &str, may_be_empty: bool, when: &str) -> Option<Seen> {
    let p = place.parent.join(name);
    let seen = observe(&p, may_be_empty, when);
    let gc = run(["gc", &arg(&p), "--json"]).ok().json();
    assert_no_leftovers(
        place,
        name,
        &seen,
        &format!("{when}, after gc (gc report: {gc})"),
    );
    // gc must not have changed what a reader sees.
    let again = if seen.is_some() {
        let v = run(["verify", &arg(&p), "--json"]).ok().json();
        let info = inspect(&p);
        Some(Seen {
            bytes: v["bytes"].as_u64().unwrap(),
            save_id: info["identity"]["save_id"].as_str().unwrap().to_string(),
        })
    } else {
        run(["verify", &arg(&p)]).code(2);
        None
    };
    assert_eq!(again, seen, "{when}: gc changed the committed snapshot");
    seen
}

fn stage_has_manifest(parent: &Path, name: &str) -> bool {
    stage_dirs(parent, name)
        .iter()
        .any(|d| parent.join(d).join("manifest.json").is_file())
}

fn committed_bytes(p: &Path) -> Option<u64> {
    let text = std::fs::read(p.join("manifest.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v["total_bytes"].as_u64()
}

/// Kills saves of B over a committed A at both pause points and at random
/// moments; after each, checks, collects, and saves A again.
fn crash_over_committed(root_count: usize) {
    let seed = seed();
    eprintln!("crash_over_committed({root_count} roots): MEMFERRY_TEST_SEED={seed}");
    let mut rng = Rng::new(seed);
    let typical = typical_save_duration(root_count);
    let place = Place::new(root_count);
    let name = "model";
    let p = place.parent.join(name);
    place.save(A_MIB, &p);
    assert_eq!(
        observe(&p, false, "initial save").map(|s| s.bytes),
        Some(A_MIB * MIB)
    );

    // Deterministic: just before and just after the publishing rename.
    let child = place.spawn_save(B_MIB, &p, Some("before-publish"));
    kill_when(child, "before-publish", || {
        stage_has_manifest(&place.parent, name)
    });
    let seen = check_after_kill(&place, name, false, "killed before publish");
    assert_eq!(
        seen.map(|s| s.bytes),
        Some(A_MIB * MIB),
        "killed before publish: the new snapshot must not be visible"
    );

    let child = place.spawn_save(B_MIB, &p, Some("after-publish"));
    kill_when(child, "after-publish", || {
        committed_bytes(&p) == Some(B_MIB * MIB)
    });
    let seen = check_after_kill(&place, name, false, "killed after publish");
    assert_eq!(
        seen.map(|s| s.bytes),
        Some(B_MIB * MIB),
        "killed after publish: the new snapshot must be committed"
    );
    place.save(A_MIB, &p);
    assert_no_leftovers(&place, name, &observe(&p, false, "re-save"), "re-save");

    // Random moments.
    let n = iterations(25);
    let (mut killed, mut saw_a, mut saw_b) = (0, 0, 0);
    for i in 0..n {
        let delay = Duration::from_nanos(rng.below(typical.as_nanos() as u64));
        let when = format!("iteration {i} (kill after {delay:?}, seed {seed})");
        let child = place.spawn_save(B_MIB, &p, None);
        if kill_after(child, delay) == Ending::Killed {
            killed += 1;
        }
        // Every fifth time without gc: the next save must then clean up
        // after the crash by itself.
        let seen = if i % 5 == 4 {
            observe(&p, false, &when)
        } else {
            check_after_kill(&place, name, false, &when)
        }
        .expect("a snapshot");
        if seen.bytes == A_MIB * MIB {
            saw_a += 1;
        } else {
            saw_b += 1;
        }
        // The next save succeeds and brings A back for the next round.
        place.save(A_MIB, &p);
        let now = observe(&p, false, &format!("{when}, next save"));
        assert_eq!(now.as_ref().map(|s| s.bytes), Some(A_MIB * MIB));
        assert_no_leftovers(&place, name, &now, &format!("{when}, next save"));
    }
    eprintln!(
        "{root_count} root(s): {n} random kills over {typical:?} saves: {killed} interrupted, {saw_a} left A, {saw_b} left B"
    );
    assert!(
        killed * 4 >= n,
        "only {killed} of {n} saves were interrupted: the kills do not exercise the save"
    );
}

/// Kills first saves (nothing committed before) at both pause points and at
/// random moments: restore then sees B or reports that nothing is committed.
fn crash_over_nothing(root_count: usize) {
    let seed = seed();
    eprintln!("crash_over_nothing({root_count} roots): MEMFERRY_TEST_SEED={seed}");
    let mut rng = Rng::new(seed ^ 0xabcdef);
    let typical = typical_save_duration(root_count);
    let place = Place::new(root_count);

    let child = place.spawn_save(B_MIB, &place.parent.join("before"), Some("before-publish"));
    kill_when(child, "before-publish", || {
        stage_has_manifest(&place.parent, "before")
    });
    let seen = check_after_kill(&place, "before", true, "first save killed before publish");
    assert_eq!(
        seen, None,
        "killed before publish: nothing may be committed"
    );
    place.save(B_MIB, &place.parent.join("before"));
    observe(&place.parent.join("before"), false, "save after the kill");

    let after = place.parent.join("after");
    let child = place.spawn_save(B_MIB, &after, Some("after-publish"));
    kill_when(child, "after-publish", || {
        committed_bytes(&after) == Some(B_MIB * MIB)
    });
    let seen = check_after_kill(&place, "after", true, "first save killed after publish");
    assert_eq!(seen.map(|s| s.bytes), Some(B_MIB * MIB));

    let n = iterations(25).div_ceil(2);
    let (mut killed, mut empty) = (0, 0);
    for i in 0..n {
        let name = format!("m{i}");
        let p = place.parent.join(&name);
        let delay = Duration::from_nanos(rng.below(typical.as_nanos() as u64));
        let when = format!("first save {i} (kill after {delay:?}, seed {seed})");
        let child = place.spawn_save(B_MIB, &p, None);
        if kill_after(child, delay) == Ending::Killed {
            killed += 1;
        }
        match check_after_kill(&place, &name, true, &when) {
            None => empty += 1,
            Some(s) => assert_eq!(s.bytes, B_MIB * MIB, "{when}: A was never saved here"),
        }
        place.save(B_MIB, &p);
        let now = observe(&p, false, &format!("{when}, next save"));
        assert_eq!(now.as_ref().map(|s| s.bytes), Some(B_MIB * MIB));
        assert_no_leftovers(&place, &name, &now, &format!("{when}, next save"));
    }
    // Other snapshots in the same parent were never touched by gc.
    for i in 0..n {
        observe(&place.parent.join(format!("m{i}")), false, "final check");
    }
    eprintln!(
        "{root_count} root(s): {n} random kills of first saves: {killed} interrupted, {empty} left nothing"
    );
    assert!(
        killed * 4 >= n,
        "only {killed} of {n} saves were interrupted: the kills do not exercise the save"
    );
}

#[test]
fn kill_save_over_committed_single_root() {
    crash_over_committed(0);
}

#[test]
fn kill_save_over_committed_two_roots() {
    crash_over_committed(2);
}

#[test]
fn kill_first_save_single_root() {
    crash_over_nothing(0);
}

#[test]
fn kill_first_save_two_roots() {
    crash_over_nothing(2);
}

/// A save killed between creating its staging directory's owner marker and
/// writing it leaves `.NAME.memferry-stage-ID/memferry-owner.json` empty
/// (`write_new_file` creates the file, then writes it). This reproduces that
/// on-disk state by hand (the window is microseconds wide, too narrow for
/// random kills) and checks that `gc` and the next save still clean it up.
#[test]
fn gc_removes_stage_with_empty_owner_marker() {
    let place = Place::new(0);
    let p = place.parent.join("model");
    place.save(A_MIB, &p);
    let stage = place.parent.join(".model.memferry-stage-00000000deadbeef");
    std::fs::create_dir(&stage).unwrap();
    std::fs::write(stage.join("memferry-owner.json"), b"").unwrap();

    let gc = run(["gc", &arg(&p), "--json"]).ok().json();
    let seen = observe(&p, false, "after gc");
    assert_eq!(seen.as_ref().map(|s| s.bytes), Some(A_MIB * MIB));
    assert_eq!(
        stage_dirs(&place.parent, "model"),
        Vec::<String>::new(),
        "gc kept the staging directory of a save killed while writing its owner marker (gc report: {gc})"
    );
}

/// The same window for a shard directory on a root: the staging directory
/// has a complete marker (it is written first), the root's shard directory
/// only the empty file a kill between `open` and `write` leaves.
#[test]
fn gc_removes_root_shard_dir_with_empty_owner_marker() {
    let place = Place::new(2);
    let p = place.parent.join("model");
    place.save(A_MIB, &p);
    let committed = observe(&p, false, "initial save").unwrap();

    // The crashed save's staging directory, with a complete owner marker.
    let id = "00000000deadbeef";
    let mut owner: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.join("memferry-owner.json")).unwrap()).unwrap();
    owner["save_id"] = id.into();
    let stage = place.parent.join(format!(".model.memferry-stage-{id}"));
    std::fs::create_dir(&stage).unwrap();
    std::fs::write(
        stage.join("memferry-owner.json"),
        serde_json::to_vec_pretty(&owner).unwrap(),
    )
    .unwrap();
    // Its shard directory on root 0, killed while creating the marker.
    let shard_dir = place.roots[0].join(format!("model.memferry-{id}"));
    std::fs::create_dir(&shard_dir).unwrap();
    std::fs::write(shard_dir.join("memferry-owner.json"), b"").unwrap();

    let gc = run(["gc", &arg(&p), "--json"]).ok().json();
    assert_eq!(observe(&p, false, "after gc"), Some(committed.clone()));
    assert_no_leftovers(
        &place,
        "model",
        &Some(committed),
        &format!("gc after a kill while writing a root's owner marker (gc report: {gc})"),
    );
}

/// An `LD_PRELOAD` library whose `fsync` fails with EIO on the directory
/// named by `FAIL_FSYNC_DIR` (and passes everything else on), built with
/// the C compiler that links Rust programs.
fn fsync_failing_library(dir: &Path) -> PathBuf {
    let src = dir.join("fail_fsync.c");
    let lib = dir.join("fail_fsync.so");
    std::fs::write(
        &src,
        r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    const char *dir = getenv("FAIL_FSYNC_DIR");
    struct stat st;
    if (dir && fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        char link[64], path[PATH_MAX];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, path, sizeof path - 1);
        if (n > 0) {
            path[n] = 0;
            if (strcmp(path, dir) == 0) { errno = EIO; return -1; }
        }
    }
    return real(fd);
}
"#,
    )
    .unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = std::process::Command::new(&cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc}: {e}"));
    assert!(status.success(), "building {} failed", lib.display());
    lib
}

/// Syncing the parent directory fails after the new snapshot was swapped
/// into place: the save fails saying so, and deletes neither the new
/// snapshot (its shard directories included) nor the previous one (now at
/// the staging path, where gc finds it).
#[test]
fn parent_sync_failing_after_publish() {
    let place = Place::new(2);
    let name = "model";
    let snap = place.parent.join(name);
    place.save(A_MIB, &snap);
    let lib = fsync_failing_library(place._tmp.path());
    let mut c = command();
    c.env("LD_PRELOAD", &lib)
        .env("FAIL_FSYNC_DIR", place.parent.canonicalize().unwrap());
    run_cmd(c, place.save_args(B_MIB, &snap))
        .code(1)
        .fails_with(&["published but not yet durable", "syncing"]);
    let seen = observe(&snap, false, "after the failed parent sync");
    assert_eq!(seen.map(|s| s.bytes), Some(B_MIB * MIB));
    assert_eq!(
        stage_dirs(&place.parent, name).len(),
        1,
        "the previous snapshot was not kept at the staging path"
    );
    check_after_kill(&place, name, false, "gc after the failed parent sync");
}
