//! Fallbacks of the direct backend: a filesystem that refuses O_DIRECT
//! (ramfs) and an unprivileged user whose memlock limit is too small for the
//! registered staging buffers. Both still save and restore, report
//! `buffered-fallback` and say why.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use memferry_test_support::Mount;
use serde_json::Value;

fn fallbacks(j: &Value) -> String {
    j["fallbacks"]
        .as_array()
        .unwrap_or_else(|| panic!("no fallbacks array in {j}"))
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

fn assert_fell_back(j: &Value, op: &str, needles: &[&str]) {
    assert_eq!(j["op"].as_str(), Some(op), "{j}");
    assert_eq!(j["backend"].as_str(), Some("direct"), "{j}");
    assert_eq!(j["mode"].as_str(), Some("buffered-fallback"), "{j}");
    let f = fallbacks(j).to_lowercase();
    for n in needles {
        assert!(
            f.contains(&n.to_lowercase()),
            "{op}: fallbacks do not mention {n:?}: {j}"
        );
    }
}

#[test]
fn ramfs_refuses_o_direct() {
    let tmp = tempfile::Builder::new()
        .prefix("memferry-ramfs-")
        .tempdir_in("/tmp")
        .unwrap();
    let ram = Mount::new("ramfs", None, &tmp.path().join("ram"));
    let snap = ram.dir.join("snap");
    let a = save_args(
        16,
        &snap,
        &["--backend", "direct", "--shard-size", "1MiB", "--json"],
    );
    let s = run(&a).ok().json();
    assert_fell_back(&s, "save", &["O_DIRECT"]);
    assert_eq!(s["bytes"].as_u64(), Some(16 * MIB));
    for op in ["restore", "verify"] {
        let j = run([op, &arg(&snap), "--backend", "direct", "--json"])
            .ok()
            .json();
        assert_fell_back(&j, op, &["O_DIRECT"]);
        assert_eq!(j["bytes"].as_u64(), Some(16 * MIB));
        assert_eq!(j["verified"], true);
    }
    // auto also falls back; buffered has nothing to fall back from.
    let j = run(["restore", &arg(&snap), "--json"]).ok().json();
    assert_eq!(j["mode"].as_str(), Some("buffered-fallback"), "{j}");
    let j = run(["restore", &arg(&snap), "--backend", "buffered", "--json"])
        .ok()
        .json();
    assert_eq!(j["fallbacks"].as_array().map(Vec::len), Some(0), "{j}");
}

/// Shards on an O_DIRECT-capable root and on ramfs: each root runs its own
/// mechanism and the report says so.
#[test]
fn ramfs_root_next_to_a_direct_root() {
    let tmp = tempfile::Builder::new()
        .prefix("memferry-mixed-")
        .tempdir_in("/tmp")
        .unwrap();
    let disk = tmp.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let ram = Mount::new("ramfs", None, &tmp.path().join("ram"));
    let roots = roots_arg(&[disk, ram.dir.clone()]);
    let snap = tmp.path().join("snap");
    let a = save_args(
        16,
        &snap,
        &[
            "--backend",
            "direct",
            "--shard-size",
            "1MiB",
            "--roots",
            &roots,
            "--json",
        ],
    );
    let s = run(&a).ok().json();
    for j in [
        s,
        run(["restore", &arg(&snap), "--backend", "direct", "--json"])
            .ok()
            .json(),
    ] {
        let mode = j["mode"].as_str().unwrap();
        assert!(
            mode.contains("odirect") && mode.contains("buffered-fallback"),
            "mixed roots should report both mechanisms: {j}"
        );
        assert!(fallbacks(&j).contains("O_DIRECT"), "{j}");
        assert!(fallbacks(&j).contains(&arg(&ram.dir)), "{j}");
    }
}

/// Makes `path` and each of its parents up to `/tmp` traversable by
/// everyone; `path` itself also writable.
fn open_up(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut p = path.parent();
    while let Some(d) = p {
        if d == Path::new("/") || d == Path::new("/tmp") {
            break;
        }
        let mode = std::fs::metadata(d).unwrap().permissions().mode();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o711)).unwrap();
        p = d.parent();
    }
}

/// The binary, runnable by `nobody`: the build output if nobody can run it,
/// otherwise a copy in `dir`.
fn binary_for_nobody(dir: &Path) -> PathBuf {
    let ok = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin())
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return bin();
    }
    let copy = dir.join("memferry");
    std::fs::copy(bin(), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// A command running `program` with an 8 MiB memlock limit, as `nobody`
/// when the test runs as root (an unprivileged process is limited as is).
fn limited(program: &Path) -> Command {
    let mut c = if is_root() {
        let mut c = command_for(Path::new("setpriv"));
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
        c.arg("sh");
        c
    } else {
        command_for(Path::new("sh"))
    };
    c.args(["-c", "ulimit -l 8192 && exec \"$0\" \"$@\""]);
    c.arg(program);
    c
}

#[test]
fn small_memlock_limit_for_an_unprivileged_user() {
    let tmp = tempfile::Builder::new()
        .prefix("memferry-memlock-")
        .tempdir_in("/tmp")
        .unwrap();
    open_up(tmp.path());
    let program = binary_for_nobody(tmp.path());
    // One 64 MiB shard: 16 requests of 4 MiB in flight = 64 MiB of
    // registered staging, far above the 8 MiB limit.
    let snap = tmp.path().join("snap");
    let tuning = [
        "--backend",
        "direct",
        "--queue-depth",
        "16",
        "--chunk-size",
        "4MiB",
    ];
    let mut a = save_args(64, &snap, &tuning);
    a.push("--json".into());
    // The save must succeed; it may not need registered staging at all
    // (requests straight from aligned source memory), but if it falls
    // back, it must say why.
    let s = run_cmd(limited(&program), &a).ok().json();
    assert_eq!(s["bytes"].as_u64(), Some(64 * MIB), "{s}");
    if s["mode"].as_str() != Some("odirect-uring") {
        assert_fell_back(&s, "save", &["registration", "memlock"]);
    }
    run_cmd(limited(&program), ["verify".to_string(), arg(&snap)]).ok();

    // verify streams into sinks that are not host memory, so every request
    // goes through registered staging: 16 x 4 MiB cannot be locked.
    let mut a = vec!["verify".to_string(), arg(&snap), "--json".into()];
    a.extend(tuning.iter().map(|s| s.to_string()));
    let v = run_cmd(limited(&program), &a).ok().json();
    assert_fell_back(&v, "verify", &["registration", "memlock"]);
    assert_eq!(v["bytes"].as_u64(), Some(64 * MIB));

    // restore succeeds under the limit: either it falls back and says why,
    // or it needs no registered staging beyond the limit (requests land in
    // place in the page-aligned destination memory).
    let mut a = vec!["restore".to_string(), arg(&snap), "--json".into()];
    a.extend(tuning.iter().map(|s| s.to_string()));
    let r = run_cmd(limited(&program), &a).ok().json();
    assert_eq!(r["bytes"].as_u64(), Some(64 * MIB), "{r}");
    assert_eq!(r["verified"], true, "{r}");
    if r["mode"].as_str() == Some("odirect-uring") {
        let staging = r["peak_staging_bytes"].as_u64().unwrap();
        assert!(
            staging <= 8 * MIB,
            "restore ran direct with {staging} bytes of staging under an 8 MiB memlock limit: {r}"
        );
        eprintln!("note: restore needed no registered staging: {r}");
    } else {
        assert_fell_back(&r, "restore", &["registration", "memlock"]);
    }

    // Small enough to fit the limit: 4 x 1 MiB of staging runs direct.
    let mut a = vec!["verify".to_string(), arg(&snap), "--json".into()];
    a.extend(
        [
            "--backend",
            "direct",
            "--queue-depth",
            "4",
            "--chunk-size",
            "1MiB",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let v = run_cmd(limited(&program), &a).ok().json();
    assert_eq!(v["mode"].as_str(), Some("odirect-uring"), "{v}");

    if is_root() {
        // The same verify without the limit (root may lock memory) runs
        // direct: the fallback above was the limit's doing.
        let mut a = vec!["verify".to_string(), arg(&snap), "--json".into()];
        a.extend(tuning.iter().map(|s| s.to_string()));
        let r = run(&a).ok().json();
        assert_eq!(r["mode"].as_str(), Some("odirect-uring"), "{r}");
    }
}

/// Staging the address-space limit cannot hold (16 requests of 16 MiB
/// under `ulimit -v` of about 585 MiB): verify runs buffered and says why,
/// instead of failing.
#[test]
fn staging_too_large_to_allocate_falls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("snap");
    run(save_args(64, &snap, &[])).ok();
    let mut c = command_for(Path::new("sh"));
    c.args(["-c", "ulimit -v 600000 && exec \"$0\" \"$@\""]);
    c.arg(bin());
    let a = [
        "verify",
        &arg(&snap),
        "--json",
        "--backend",
        "direct",
        "--queue-depth",
        "64",
        "--chunk-size",
        "16MiB",
    ];
    let v = run_cmd(c, a).ok().json();
    assert_fell_back(
        &v,
        "verify",
        &["staging could not be allocated", "--queue-depth"],
    );
    assert_eq!(v["bytes"].as_u64(), Some(64 * MIB), "{v}");
    assert_eq!(v["verified"], true, "{v}");
}
