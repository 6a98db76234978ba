//! GPU paths of the CLI: `--device cuda:N`, the `pinned` and `gds`
//! backends. Without a CUDA device (CI) the device tests print why they
//! skip and the clear-error tests run instead; with one, snapshots go
//! through device memory and come back byte for byte. `MEMFERRY_REQUIRE_GPU=1`
//! (set on GPU machines) turns a missing device into a failure.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// Whether a CUDA device is usable here, and if not, why.
fn cuda_device() -> Result<(), String> {
    use memferry::memory::cuda;
    if cuda::available() {
        return Ok(());
    }
    Err(cuda::driver().err().map_or_else(
        || "the driver reports no device".to_string(),
        |e| e.to_string(),
    ))
}

/// True when a CUDA device is usable; otherwise says why the test skips,
/// or fails it when `MEMFERRY_REQUIRE_GPU=1`.
fn gpu() -> bool {
    let Err(why) = cuda_device() else {
        return true;
    };
    assert!(
        std::env::var("MEMFERRY_REQUIRE_GPU").as_deref() != Ok("1"),
        "MEMFERRY_REQUIRE_GPU=1 but no CUDA device is usable: {why}"
    );
    eprintln!("skipped: no CUDA device ({why})");
    false
}

/// Asserts that the safetensors file at `path` (an export of a snapshot
/// saved from `synthetic:{size_mib}MiB`) holds exactly the source's bytes:
/// one `allocation/<id>` tensor per allocation of the regenerated source.
fn assert_holds_synthetic(path: &Path, size_mib: u64, label: &str) {
    let model = memferry::snapshot::source::synthetic(size_mib << 20, 0).unwrap();
    let (header, n, _) = read_safetensors(path);
    let file = std::fs::read(path).unwrap();
    let data = &file[8 + n as usize..];
    let tensors = header.as_object().unwrap();
    assert_eq!(
        tensors.keys().filter(|k| *k != "__metadata__").count(),
        model.layout.allocations.len(),
        "{label}: one tensor per allocation"
    );
    for (a, r) in model.layout.allocations.iter().zip(&model.regions) {
        let t = &header[format!("allocation/{}", a.id)];
        let at = |i: usize| t["data_offsets"][i].as_u64().unwrap() as usize;
        assert!(
            data[at(0)..at(1)] == *r.as_slice(),
            "{label}: allocation {} differs from the source",
            a.id
        );
    }
}

fn fallbacks(j: &Value) -> Vec<String> {
    j["fallbacks"]
        .as_array()
        .map(|a| a.iter().map(|f| f.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn cuda_device_without_a_driver_is_bad_input() {
    if cuda_device().is_ok() {
        eprintln!("skipped: a CUDA device is present");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("s");
    save(4, &snap, &[]);
    for cmd in [
        vec![
            "restore".to_string(),
            arg(&snap),
            "--device".into(),
            "cuda:0".into(),
        ],
        vec![
            "export".to_string(),
            arg(&snap),
            "--device".into(),
            "cuda:0".into(),
            "--to".into(),
            arg(&tmp.path().join("x.safetensors")),
        ],
        save_args(4, &tmp.path().join("t"), &["--device", "cuda:0"]),
    ] {
        run(&cmd).code(2).stderr_has(&["cuda", "use --device cpu"]);
    }
    assert!(
        !tmp.path().join("t").exists(),
        "a failed save commits nothing"
    );
    assert!(!tmp.path().join("x.safetensors").exists());
    // A save to S3 honours --device too: it fails on the device before it
    // reaches the (here unreachable) server.
    let mut cmd = command();
    cmd.env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_ALLOW_HTTP", "true");
    run_cmd(
        cmd,
        [
            "save",
            "--source",
            "synthetic:4MiB",
            "--to",
            "s3://bucket/snap",
            "--device",
            "cuda:0",
        ],
    )
    .code(2)
    .stderr_has(&["cuda", "use --device cpu"]);
}

#[test]
fn pinned_backend_round_trips_host_memory() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let snap = tmp.path().join("s");
    let j = save(9, &snap, &["--backend", "pinned", "--chunk-size", "1MiB"]);
    assert_eq!(j["backend"], "pinned", "{j}");
    let j = run([
        "restore",
        &arg(&snap),
        "--backend",
        "pinned",
        "--device",
        "cpu",
        "--json",
    ])
    .ok()
    .json();
    assert_eq!(j["verified"], true, "{j}");
    let mode = j["mode"].as_str().unwrap();
    assert!(
        mode.starts_with("odirect-uring-staged-host") || mode == "buffered-fallback",
        "{j}"
    );
    run(["verify", &arg(&snap), "--backend", "pinned"]).ok();
    let out = tmp.path().join("x.safetensors");
    run([
        "export",
        &arg(&snap),
        "--backend",
        "pinned",
        "--device",
        "cpu",
        "--to",
        &arg(&out),
    ])
    .ok();
    assert_holds_synthetic(&out, 9, "pinned through host memory");
}

#[test]
fn gds_without_device_memory_runs_pinned_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("s");
    let j = save(3, &snap, &["--backend", "gds", "--gds", "write"]);
    assert!(
        fallbacks(&j).iter().any(|f| f.contains("ran pinned")),
        "{j}"
    );
    let j = run([
        "restore",
        &arg(&snap),
        "--backend",
        "gds",
        "--gds-bounce",
        "--json",
    ])
    .ok()
    .json();
    assert!(
        fallbacks(&j).iter().any(|f| f.contains("ran pinned")),
        "{j}"
    );
    run([
        "restore",
        &arg(&snap),
        "--backend",
        "gds",
        "--gds",
        "sideways",
    ])
    .code(2)
    .stderr_has(&["read, write or both"]);
}

/// With a GPU: save from device memory and restore into it with every
/// backend; exports through host memory and through the device must both
/// hold exactly the source's bytes, and `pinned`/`gds` must run their own
/// path unless this machine explains why not.
#[test]
fn device_round_trips_with_every_backend() {
    if !gpu() {
        return;
    }
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let snap = tmp.path().join("s");
    let cufile = memferry::transfer::gds::CuFile::get().map(|_| ());
    for backend in ["buffered", "direct", "pinned", "gds"] {
        let j = save(
            33,
            &snap,
            &[
                "--device",
                "cuda:0",
                "--backend",
                backend,
                "--chunk-size",
                "4MiB",
            ],
        );
        eprintln!("save {backend}: {} {:?}", j["mode"], fallbacks(&j));
        let m = read_manifest(&snap);
        assert!(m.to_string().contains("cuda:0"), "layout names the device");
        // O_DIRECT refused here is the one reason `pinned` may run
        // `buffered`; `direct` tells whether it is.
        let direct = run(["restore", &arg(&snap), "--backend", "direct", "--json"])
            .ok()
            .json();
        let refused = direct["mode"] != "odirect-uring";
        for load in ["buffered", "direct", "pinned", "gds"] {
            let j = run(["restore", &arg(&snap), "--backend", load, "--json"])
                .ok()
                .json();
            let label = format!("saved with {backend}, restored with {load}");
            eprintln!("{label}: {} {:?}", j["mode"], fallbacks(&j));
            let pinned_mode = if refused {
                eprintln!(
                    "{label}: buffered-fallback accepted for pinned, O_DIRECT is refused here: {:?}",
                    fallbacks(&direct)
                );
                "buffered-fallback"
            } else {
                "odirect-uring-pinned-async-copy"
            };
            match (load, &cufile) {
                ("pinned", _) => assert_eq!(j["mode"], pinned_mode, "{label}: {j}"),
                ("gds", Ok(())) if !refused => {
                    assert!(
                        j["mode"].as_str().unwrap().starts_with("cufile-"),
                        "{label}: {j}"
                    );
                    assert_eq!(j["verified"], false, "{label}: gds never claims it");
                }
                ("gds", cufile) => {
                    eprintln!(
                        "{label}: gds ran pinned, accepted: {cufile:?}, O_DIRECT refused: {refused}"
                    );
                    assert!(
                        fallbacks(&j).iter().any(|f| f.contains("ran pinned")),
                        "{label}: {j}"
                    );
                    assert_eq!(j["mode"], pinned_mode, "{label}: {j}");
                }
                _ => assert_eq!(j["verified"], true, "{label}: {j}"),
            }
            let host = tmp.path().join("host.safetensors");
            let dev = tmp.path().join("dev.safetensors");
            let _ = std::fs::remove_file(&host);
            let _ = std::fs::remove_file(&dev);
            run([
                "export",
                &arg(&snap),
                "--device",
                "cpu",
                "--to",
                &arg(&host),
            ])
            .ok();
            run([
                "export",
                &arg(&snap),
                "--device",
                "cuda:0",
                "--backend",
                load,
                "--to",
                &arg(&dev),
            ])
            .ok();
            assert_holds_synthetic(&host, 33, &format!("{label}, exported through cpu"));
            assert_holds_synthetic(&dev, 33, &format!("{label}, exported through cuda:0"));
        }
    }
}
