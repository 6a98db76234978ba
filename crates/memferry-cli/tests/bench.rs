//! `memferry bench` end to end on a small size: the JSON holds every field,
//! `--plot` writes an SVG, `--save-profile` round-trips and is picked up by
//! `restore --backend auto`, and a root without O_DIRECT is reported.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn memferry(args: &[&str], profile: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memferry"))
        .args(args)
        .env("MEMFERRY_PROFILE", profile)
        .env_remove("MEMFERRY_ROOTS")
        .output()
        .expect("run memferry")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "memferry failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(
        text.trim().lines().count(),
        1,
        "exactly one JSON line: {text}"
    );
    serde_json::from_str(text.trim()).expect("valid JSON")
}

const SMALL: &[&str] = &[
    "bench",
    "--size",
    "64MiB",
    "--runs",
    "2",
    "--workers",
    "2",
    "--queue-depth",
    "8",
    "--chunk-size",
    "1MiB",
    "--shard-size",
    "16MiB",
];

#[test]
fn bench_json_plot_and_profile() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let profile = dir.path().join("cfg").join("profile.toml");
    let svg = dir.path().join("chart.svg");
    let mut args = SMALL.to_vec();
    let root_s = root.to_str().unwrap();
    let svg_s = svg.to_str().unwrap();
    args.extend([
        "--roots",
        root_s,
        "--json",
        "--plot",
        svg_s,
        "--save-profile",
    ]);
    let v = json_of(&memferry(&args, &profile));

    assert_eq!(v["op"], "bench");
    assert_eq!(v["size"], 64 << 20);
    assert_eq!(v["runs"], 2);
    for k in [
        "odirect_read",
        "odirect_write",
        "pread_direct",
        "buffered_read",
        "memcpy",
    ] {
        let l = &v["limits"][k];
        assert!(l["name"].is_string(), "{k}");
        let m = l["result"]["median"].as_f64();
        assert!(m.is_some_and(|m| m > 0.0), "{k} measured: {l}");
        assert_eq!(l["result"]["runs"].as_array().unwrap().len(), 2, "{k}");
    }
    let rows = v["rows"].as_array().unwrap();
    // 2 settings (buffered w=2, direct qd=8) x (save, cold restore, warm
    // restore); cold rows say "unavailable" when the cache cannot be dropped.
    assert_eq!(rows.len(), 6, "{rows:?}");
    assert_eq!(
        v["cold_available"].as_bool().unwrap(),
        rows.iter()
            .any(|r| r["temperature"] == "cold" && !r["result"].is_null())
    );
    for r in rows {
        for k in ["op", "temperature", "label", "mode", "limit"] {
            assert!(r[k].is_string(), "{k} in {r}");
        }
        assert!(r["fallbacks"].is_array());
        assert!(r["setting"]["backend"].is_string());
        if r["result"].is_null() {
            assert!(
                r["unavailable"].is_string(),
                "unavailable rows say why: {r}"
            );
            continue;
        }
        let m = &r["result"];
        assert!(m["median"].as_f64().unwrap() > 0.0);
        assert!(m["spread"].as_f64().unwrap() >= 0.0);
        assert!(m["noisy"].is_boolean());
        assert!(r["percent_of_limit"].as_f64().unwrap() > 0.0, "{r}");
    }
    for (op, t) in [("save", "-"), ("restore", "warm")] {
        let best: Vec<_> = rows
            .iter()
            .filter(|r| r["op"] == op && r["temperature"] == t && r["best"] == true)
            .collect();
        assert_eq!(best.len(), 1, "one best row for {op}/{t}");
    }
    assert!(v["best_restore"]["backend"].is_string());
    assert!(
        !root.read_dir().unwrap().any(|_| true),
        "bench cleans up its files"
    );

    let text = std::fs::read_to_string(&svg).expect("chart written");
    let t = text.trim();
    assert!(
        t.starts_with("<svg") || t.starts_with("<?xml"),
        "SVG header"
    );
    assert!(t.ends_with("</svg>"), "SVG closed");
    assert!(t.contains("GiB/s"));

    // The profile round-trips and `restore --backend auto` uses it.
    let saved = std::fs::read_to_string(&profile).expect("profile written");
    let toml: toml::Value = toml::from_str(&saved).expect("profile is TOML");
    let entry = &toml["entry"][0];
    let best_backend = entry["setting"]["backend"].as_str().unwrap().to_string();
    let best_qd = entry["setting"]["queue_depth"].as_integer().unwrap();
    assert_eq!(best_backend, v["best_restore"]["backend"].as_str().unwrap());

    let snap = root.join("snap");
    let s = snap.to_str().unwrap();
    json_of(&memferry(
        &["save", "--source", "synthetic:8MiB", "--to", s, "--json"],
        &profile,
    ));
    let r = json_of(&memferry(
        &["restore", s, "--backend", "auto", "--json"],
        &profile,
    ));
    assert_eq!(r["backend"], best_backend.as_str(), "{r}");
    assert_eq!(r["queue_depth"].as_i64(), Some(best_qd));
    assert!(
        r["profile"]
            .as_str()
            .unwrap()
            .contains(profile.to_str().unwrap()),
        "the report says the profile was used: {r}"
    );
    // An explicit flag beats the profile; without a profile nothing is said.
    let r = json_of(&memferry(
        &["restore", s, "--queue-depth", "3", "--json"],
        &profile,
    ));
    assert_eq!(r["queue_depth"], 3);
    let none = dir.path().join("absent.toml");
    let r = json_of(&memferry(&["restore", s, "--json"], &none));
    assert!(r["profile"].is_null());
    assert_eq!(r["backend"], "auto");
}

/// Mounts ramfs (which refuses O_DIRECT) for the lifetime of the guard.
struct Ramfs(std::path::PathBuf);

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn bench_reports_a_root_without_odirect() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("ramfs");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mounting ramfs needs root (CI runs as root)");
    let _guard = Ramfs(mnt.clone());
    let profile = dir.path().join("p.toml");
    let mut args = SMALL.to_vec();
    args[2] = "16MiB"; // --size
    args.extend(["--roots", mnt.to_str().unwrap(), "--json"]);
    let v = json_of(&memferry(&args, &profile));
    let l = &v["limits"]["odirect_read"];
    assert!(l["result"].is_null(), "{l}");
    assert!(
        l["unavailable"].as_str().unwrap().contains("O_DIRECT"),
        "the reason names O_DIRECT: {l}"
    );
    let direct: Vec<&Value> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["setting"]["backend"] == "direct" && !r["result"].is_null())
        .collect();
    assert!(!direct.is_empty());
    for r in direct {
        assert_eq!(r["mode"], "buffered-fallback", "{r}");
        assert!(
            r["fallbacks"][0].as_str().unwrap().contains("O_DIRECT"),
            "{r}"
        );
    }
}

#[test]
fn a_broken_profile_is_reported_and_an_unreadable_default_one_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let s = snap.to_str().unwrap();
    let none = dir.path().join("absent.toml");
    json_of(&memferry(
        &["save", "--source", "synthetic:4MiB", "--to", s, "--json"],
        &none,
    ));
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "entry = 3").unwrap();
    let out = memferry(&["restore", s], &broken);
    assert_eq!(out.status.code(), Some(2), "bad configuration is bad input");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("profile") && err.contains("broken.toml"),
        "{err}"
    );
    // A default profile location that is not there does not matter (an
    // unreadable one, as for `nobody` with HOME=/root, is covered in
    // tests/fallback.rs).
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_memferry"))
        .args(["restore", s, "--json"])
        .env_remove("MEMFERRY_PROFILE")
        .env("XDG_CONFIG_HOME", locked.join("missing-dir-file"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
