//! GPU paths of the CLI: `--device cuda:N`, the `pinned` and `gds`
//! backends. Without a CUDA driver (CI) the device tests print why they
//! skip and the clear-error tests run instead; with one, snapshots go
//! through device memory and come back byte for byte.

mod common;

use common::*;
use serde_json::Value;

fn has_cuda() -> bool {
    memferry::memory::cuda::available()
}

fn fallbacks(j: &Value) -> Vec<String> {
    j["fallbacks"]
        .as_array()
        .map(|a| a.iter().map(|f| f.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn cuda_device_without_a_driver_is_bad_input() {
    if has_cuda() {
        eprintln!("skipped: a CUDA driver is present");
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
/// backend; export copies the device bytes back and must equal an export
/// through host memory.
#[test]
fn device_round_trips_with_every_backend() {
    if !has_cuda() {
        eprintln!("skipped: no CUDA driver");
        return;
    }
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let snap = tmp.path().join("s");
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
        for load in ["buffered", "direct", "pinned", "gds"] {
            let j = run(["restore", &arg(&snap), "--backend", load, "--json"])
                .ok()
                .json();
            eprintln!("restore {load}: {} {:?}", j["mode"], fallbacks(&j));
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
            assert!(
                std::fs::read(&host).unwrap() == std::fs::read(&dev).unwrap(),
                "saved with {backend}, exported through cuda:0 with {load}: bytes differ"
            );
        }
    }
}
