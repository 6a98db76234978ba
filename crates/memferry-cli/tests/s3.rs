//! Snapshots on real S3 servers (moto and s3s-fs, started here on
//! 127.0.0.1): round trip, copy both ways, conditional commit, a server
//! killed mid-restore, injected 503 throttling (a proxy in front of the
//! server), a corrupted object, failed and killed saves, bad credentials
//! (s3s-fs, and moto with authentication on) and bad input. Every test removes its objects and checks
//! that nothing is left.

mod common;
mod s3_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Run, run_cmd};
use s3_support::proxy::{FaultProxy, Faults};
use s3_support::{BUCKET, Kind, SECRET_KEY, Server, each_server, shared};

const MIB: u64 = 1 << 20;

fn mf(server: &Server, args: &[&str]) -> Run {
    run_cmd(server.command(), args)
}

fn save(server: &Server, url: &str, mib: u64, extra: &[&str]) -> serde_json::Value {
    let size = format!("synthetic:{mib}MiB");
    let mut args = vec!["save", "--json", "--source", &size, "--to", url];
    args.extend_from_slice(extra);
    mf(server, &args).ok().json()
}

/// Panics unless `restore URL` exits with code 2 saying there is no
/// committed snapshot there.
fn assert_no_snapshot(s: &Server, url: &str) {
    mf(s, &["restore", url])
        .code(2)
        .stderr_has(&["no committed snapshot"]);
}

/// The key of the prefix of `url` plus `rel`.
fn key(url: &str, rel: &str) -> String {
    format!(
        "{}/{rel}",
        url.strip_prefix(&format!("s3://{BUCKET}/")).unwrap()
    )
}

#[test]
fn save_restore_verify_inspect_round_trip() {
    each_server(|s| {
        let url = s.url("roundtrip");
        // 40 MiB in 16 MiB shards: three shards, multipart in 8 MiB parts.
        let r = save(s, &url, 40, &["--shard-size", "16MiB"]);
        assert_eq!(r["backend"], "s3");
        assert_eq!(r["shards"], 3);
        assert!(r["mode"].as_str().unwrap().starts_with("s3-multipart"));
        let keys = s.keys(&url);
        assert!(keys.contains(&key(&url, "manifest.json")), "{keys:?}");
        assert_eq!(keys.iter().filter(|k| k.contains("/shards/")).count(), 3);
        assert!(
            !keys.iter().any(|k| k.contains("/saves/")),
            "marker left: {keys:?}"
        );

        let r = mf(s, &["restore", "--json", &url]).ok().json();
        assert_eq!(r["verified"], true);
        assert_eq!(r["bytes"], 40 * MIB);
        assert!(r["mode"].as_str().unwrap().starts_with("s3-ranged-get"));
        let peak = r["peak_staging_bytes"].as_u64().unwrap();
        assert!(peak > 0 && peak <= 16 * 8 * MIB, "staging {peak}");

        let v = mf(s, &["verify", "--json", &url]).ok().json();
        assert_eq!(v["verified"], true);
        let i = mf(s, &["inspect", "--json", &url]).ok().json();
        assert_eq!(i["total_bytes"], 40 * MIB);
        assert_eq!(i["snapshot"], url.as_str());

        // A re-save replaces the snapshot and removes the old shards.
        let old: Vec<String> = s
            .keys(&url)
            .into_iter()
            .filter(|k| k.contains("/shards/"))
            .collect();
        save(s, &url, 8, &[]);
        let now = s.keys(&url);
        assert!(
            old.iter().all(|k| !now.contains(k)),
            "old shards left: {now:?}"
        );
        let r = mf(s, &["restore", "--json", &url]).ok().json();
        assert_eq!(r["bytes"], 8 * MIB);

        // Nothing to collect after clean saves.
        let g = mf(s, &["gc", "--json", "--grace", "0s", &url]).ok().json();
        assert_eq!(g["removed"].as_array().unwrap().len(), 0, "{g}");
        s.clean(&url);
    });
}

#[test]
fn copy_both_ways_keeps_every_byte() {
    each_server(|s| {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let (a_s, b_s) = (a.display().to_string(), b.display().to_string());
        mf(
            s,
            &[
                "save",
                "--source",
                "synthetic:20MiB",
                "--to",
                &a_s,
                "--shard-size",
                "8MiB",
            ],
        )
        .ok();
        let url = s.url("copy");
        let up = mf(s, &["copy", "--json", &a_s, &url]).ok().json();
        assert_eq!(up["verify"]["verified"], true);
        assert_eq!(up["write"]["backend"], "s3");
        // The copy streamed: source staging stayed within its window
        // (4 reads of 8 MiB by default), whatever the snapshot size.
        let peak = up["read"]["peak_staging_bytes"].as_u64().unwrap();
        assert!(peak > 0 && peak <= 32 * MIB, "source staging {peak}");
        let down = mf(s, &["copy", "--json", &url, &b_s]).ok().json();
        assert_eq!(down["verify"]["verified"], true);
        // Same bytes: export both local snapshots and compare the files.
        let (ea, eb) = (
            dir.path().join("a.safetensors"),
            dir.path().join("b.safetensors"),
        );
        mf(s, &["export", &a_s, "--to", &ea.display().to_string()]).ok();
        mf(s, &["export", &b_s, "--to", &eb.display().to_string()]).ok();
        assert!(
            std::fs::read(&ea).unwrap() == std::fs::read(&eb).unwrap(),
            "copies differ"
        );
        // And S3 -> S3, with several source GETs at once (parts of the
        // destination are assembled in parallel, not one blocking read at a
        // time on the thread that drives the uploads): more than one
        // 8 MiB piece staged at once, never more than the window.
        let url2 = s.url("copy2");
        let r = mf(s, &["copy", "--json", &url, &url2]).ok().json();
        let peak = r["read"]["peak_staging_bytes"].as_u64().unwrap();
        assert!(peak > 8 * MIB && peak <= 32 * MIB, "source staging {peak}");
        mf(s, &["verify", &url2]).ok();
        s.clean(&url);
        s.clean(&url2);
    });
}

/// Starts a save that pauses right before its manifest PUT; returns the
/// child once it is there.
fn paused_save(
    s: &Server,
    url: &str,
    mib: u64,
    secs: u64,
) -> (Child, std::thread::JoinHandle<String>) {
    paused_save_at(s, url, mib, secs, "s3-before-commit")
}

/// Spawns `c` (a `what` command, e.g. "save") with stdout and stderr piped,
/// told to pause `secs` seconds at `point`; returns the child once its
/// stderr says it is there (panics if it ends first), and the rest of its
/// stderr, unread.
fn spawn_paused(
    mut c: Command,
    what: &str,
    point: &str,
    secs: u64,
) -> (Child, BufReader<ChildStderr>) {
    c.env("MEMFERRY_TEST_PAUSE_AT", point)
        .env("MEMFERRY_TEST_PAUSE_SECS", secs.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "{what} ended before its pause"
        );
        if line.contains(&format!("test pause at {point}")) {
            break;
        }
    }
    (child, err)
}

/// Starts a save that pauses at `point`; returns the child once it is there
/// and a thread collecting the rest of its stderr.
fn paused_save_at(
    s: &Server,
    url: &str,
    mib: u64,
    secs: u64,
    point: &str,
) -> (Child, std::thread::JoinHandle<String>) {
    paused_save_with(s, url, mib, secs, point, &[], &[])
}

/// [`paused_save_at`] with extra arguments and environment.
fn paused_save_with(
    s: &Server,
    url: &str,
    mib: u64,
    secs: u64,
    point: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Child, std::thread::JoinHandle<String>) {
    let size = format!("synthetic:{mib}MiB");
    let mut c = s.command();
    c.args(["save", "--source", &size, "--to", url]).args(extra);
    for (k, v) in env {
        c.env(k, v);
    }
    let (child, mut err) = spawn_paused(c, "save", point, secs);
    // Keep draining stderr so the child never blocks on it.
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        rest
    });
    (child, rest)
}

#[test]
fn a_concurrent_second_save_cannot_corrupt_the_first() {
    each_server(|s| {
        for resave in [false, true] {
            let url = s.url("conditional");
            if resave {
                save(s, &url, 4, &[]);
            }
            // A uploads, then waits before committing; B saves in full.
            let (a, a_err) = paused_save(s, &url, 12, 3);
            let b = save(s, &url, 20, &[]);
            assert_eq!(b["bytes"], 20 * MIB);
            let out = a.wait_with_output().unwrap();
            let a_err = a_err.join().unwrap();
            assert_eq!(out.status.code(), Some(1), "A must lose: {a_err}");
            assert!(
                a_err.contains("another save committed") && a_err.contains("intact"),
                "{a_err}"
            );
            // B's snapshot is intact and complete.
            let r = mf(s, &["restore", "--json", &url]).ok().json();
            assert_eq!(r["bytes"], 20 * MIB);
            mf(s, &["verify", &url]).ok();
            // A removed its own objects: only B's shards and manifest remain.
            let keys = s.keys(&url);
            let manifest =
                common::single_json_object(&mf(s, &["inspect", "--json", &url]).ok().stdout)
                    .unwrap();
            let b_save = manifest["identity"]["save_id"]
                .as_str()
                .unwrap()
                .to_string();
            for k in &keys {
                assert!(
                    k.ends_with("manifest.json") || k.contains(&b_save),
                    "{k} is not B's ({keys:?})"
                );
            }
            s.clean(&url);
        }
    });
}

#[test]
fn a_server_killed_mid_restore_fails_cleanly_within_the_retry_bound() {
    for kind in Kind::ALL {
        let mut s = Server::start(kind);
        let url = s.url("killed");
        save(&s, &url, 48, &[]);
        let mut c = s.command();
        c.args([
            "restore",
            "--s3-concurrency",
            "1",
            "--s3-max-retries",
            "3",
            "--s3-retry-timeout",
            "3s",
            &url,
        ]);
        let (mut child, mut err) = spawn_paused(c, "restore", "s3-restore-mid", 2);
        s.kill();
        let t = Instant::now();
        let status = child.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
        assert_eq!(status.code(), Some(1), "{}: {rest}", kind.name());
        assert!(rest.contains("S3 GET") && rest.contains(&url), "{rest}");
        assert!(!rest.contains("panicked"), "{rest}");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "took {:?}",
            t.elapsed()
        );
    }
}

/// A memferry command that talks to `s` through `proxy`.
fn through(s: &Server, proxy: &FaultProxy, args: &[&str]) -> Run {
    let mut c = s.command();
    c.env("AWS_ENDPOINT_URL", proxy.endpoint());
    run_cmd(c, args)
}

#[test]
fn injected_503_throttling_is_retried_and_every_byte_arrives() {
    each_server(|s| {
        // Every third request is answered "503 Slow Down" by the proxy and
        // never reaches the server; retries with backoff must ride it out.
        let proxy = FaultProxy::start(s.port, Faults::EveryNth(3));
        let url = s.url("throttled");
        let r = through(
            s,
            &proxy,
            &[
                "save",
                "--json",
                "--source",
                "synthetic:24MiB",
                "--to",
                &url,
                "--shard-size",
                "8MiB",
            ],
        )
        .ok()
        .json();
        assert_eq!(r["bytes"], 24 * MIB);
        let r = through(s, &proxy, &["restore", "--json", &url]).ok().json();
        assert_eq!(r["bytes"], 24 * MIB);
        assert_eq!(r["verified"], true);
        through(s, &proxy, &["verify", &url]).ok();
        // The bytes that came back through the proxy are the source's.
        let dir = tempfile::tempdir().unwrap();
        let (local, from_s3, from_local) = (
            dir.path().join("local"),
            dir.path().join("s3.safetensors"),
            dir.path().join("local.safetensors"),
        );
        let p = |x: &std::path::Path| x.display().to_string();
        through(s, &proxy, &["export", &url, "--to", &p(&from_s3)]).ok();
        mf(
            s,
            &["save", "--source", "synthetic:24MiB", "--to", &p(&local)],
        )
        .ok();
        mf(s, &["export", &p(&local), "--to", &p(&from_local)]).ok();
        assert!(
            std::fs::read(&from_s3).unwrap() == std::fs::read(&from_local).unwrap(),
            "bytes differ after the throttled round trip"
        );
        let (n, injected) = (proxy.requests(), proxy.injected());
        eprintln!("{}: {injected} of {n} requests answered 503", s.kind.name());
        assert!(injected > 0 && injected == n / 3, "{injected} of {n}");
        s.clean(&url);
    });
}

#[test]
fn a_server_that_always_throttles_fails_within_the_retry_bound() {
    each_server(|s| {
        let url = s.url("throttled-out");
        save(s, &url, 12, &[]);
        let proxy = FaultProxy::start(s.port, Faults::AllFrom(0));
        let bound = ["--s3-max-retries", "3", "--s3-retry-timeout", "2s"];
        let t = Instant::now();
        let mut args = vec!["restore", &url];
        args.extend(bound);
        let r = through(s, &proxy, &args);
        let took = t.elapsed();
        assert_eq!(r.code, 1, "{}", r.stderr);
        let r = r.stderr_has(&["S3 GET", &url, "503", "retry bound", "--s3-retry-timeout"]);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        assert!(took < Duration::from_secs(30), "took {took:?}");
        // The first attempt and exactly max-retries retries, nothing passed.
        assert_eq!(proxy.injected(), 4);
        assert_eq!(proxy.forwarded(), 0);

        // A save throttled from its sixth request on (after it read the
        // prefix, wrote its marker, started its upload and recorded it in
        // the marker) fails within the bound and commits nothing.
        let url2 = s.url("throttled-save");
        proxy.set_faults(Faults::AllFrom(proxy.requests() + 5));
        let t = Instant::now();
        let mut args = vec!["save", "--source", "synthetic:24MiB", "--to", &url2];
        args.extend(bound);
        let r = through(s, &proxy, &args);
        let took = t.elapsed();
        assert_eq!(r.code, 1, "{}", r.stderr);
        let r = r.stderr_has(&["503", "retry bound", "--s3-retry-timeout"]);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        assert!(took < Duration::from_secs(60), "took {took:?}");
        assert_eq!(proxy.forwarded(), 5);
        let left = s.keys(&url2);
        assert!(
            !left.iter().any(|k| k.ends_with("manifest.json")),
            "a failed save left a manifest: {left:?}"
        );
        assert_no_snapshot(s, &url2);
        // What it could not clean up through the throttling proxy, gc
        // removes.
        mf(s, &["gc", "--grace", "0s", &url2]).ok();
        assert!(s.keys(&url2).is_empty(), "left: {:?}", s.keys(&url2));
        // The first snapshot was never touched.
        mf(s, &["verify", &url]).ok();
        s.clean(&url);
    });
}

#[test]
fn a_corrupted_object_is_caught_by_the_checksum() {
    each_server(|s| {
        let url = s.url("corrupt");
        save(s, &url, 12, &[]);
        let c = s.client();
        let shard = s
            .keys(&url)
            .into_iter()
            .find(|k| k.contains("/shards/"))
            .unwrap();
        let (body, _) = c.get(&shard).unwrap().unwrap();
        let mut bytes = body.to_vec();
        bytes[5 * MIB as usize + 17] ^= 0x40;
        c.put(
            &shard,
            bytes.into(),
            memferry::storage::s3::PutCondition::Overwrite,
        )
        .unwrap();
        for op in ["verify", "restore"] {
            mf(s, &[op, &url])
                .code(3)
                .stderr_has(&["checksum mismatch", &shard]);
        }
        // A missing shard is named too.
        c.delete(&shard).unwrap();
        mf(s, &["verify", &url])
            .code(3)
            .stderr_has(&["shard missing", &shard]);
        s.clean(&url);
    });
}

/// Runs a save of 40 MiB to `url` whose upload of part `part` fails (an
/// injected failure).
fn save_failing_part(s: &Server, url: &str, part: u32, extra: &[&str]) -> Run {
    let mut c = s.command();
    c.args(["save", "--source", "synthetic:40MiB", "--to", url])
        .args(extra)
        .env("MEMFERRY_TEST_S3_FAIL_PART", part.to_string());
    run_cmd(c, Vec::<String>::new())
}

/// Five shard objects of one 8 MiB part each, uploaded one request at a
/// time: part `n` belongs to object `n`.
const ONE_PART_SHARDS: [&str; 4] = ["--shard-size", "8MiB", "--s3-concurrency", "1"];

#[test]
fn a_failed_save_leaves_no_manifest_and_no_objects() {
    each_server(|s| {
        let url = s.url("failed");
        let r = save_failing_part(s, &url, 2, &[]).fails_with(&["injected failure"]);
        assert_eq!(r.code, 1);
        assert!(s.keys(&url).is_empty(), "left: {:?}", s.keys(&url));
        assert_no_snapshot(s, &url);
        // Objects already completed (0 to 2) go too.
        save_failing_part(s, &url, 3, &ONE_PART_SHARDS).fails_with(&["injected failure"]);
        assert!(s.keys(&url).is_empty(), "left: {:?}", s.keys(&url));
        assert_no_snapshot(s, &url);

        // A save failing over an existing snapshot leaves that one intact.
        save(s, &url, 8, &[]);
        let before = s.keys(&url);
        save_failing_part(s, &url, 0, &[]).code(1);
        assert_eq!(s.keys(&url), before);
        mf(s, &["verify", &url]).ok();
        s.clean(&url);
    });
}

#[test]
fn shard_objects_are_completed_while_later_shards_upload() {
    each_server(|s| {
        let url = s.url("early-complete");
        let mut c = s.command();
        c.args(["save", "--source", "synthetic:40MiB", "--to", &url])
            .args(ONE_PART_SHARDS);
        // Paused once the first part is in: its object is complete (listed),
        // the later ones are not, and nothing is committed.
        let (mut child, _err) = spawn_paused(c, "save", "s3-save-mid", 60);
        let keys = s.keys(&url);
        let shards = keys.iter().filter(|k| k.contains("/shards/")).count();
        assert_eq!(shards, 1, "{keys:?}");
        assert!(
            !keys.iter().any(|k| k.ends_with("/manifest.json")),
            "{keys:?}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert_no_snapshot(s, &url);
        // gc removes the completed object of the killed save as well.
        mf(s, &["gc", "--grace", "0s", &url]).ok();
        assert!(s.keys(&url).is_empty(), "left: {:?}", s.keys(&url));
    });
}

#[test]
fn gc_removes_what_a_killed_save_left() {
    each_server(|s| {
        let url = s.url("killed-save");
        save(s, &url, 4, &[]);
        let committed = s.keys(&url);
        // Killed in the middle of its multipart uploads...
        let (mut a, a_err) = paused_save_at(s, &url, 40, 60, "s3-save-mid");
        a.kill().unwrap();
        a.wait().unwrap();
        a_err.join().unwrap();
        // ... and one killed with every shard uploaded, right before commit.
        let (mut b, b_err) = paused_save(s, &url, 20, 60);
        b.kill().unwrap();
        b.wait().unwrap();
        b_err.join().unwrap();
        let left = s.keys(&url);
        assert!(left.iter().any(|k| k.contains("/saves/")), "{left:?}");
        // Young leftovers are kept by default (the save might be running).
        let g = mf(s, &["gc", "--json", &url]).ok().json();
        assert!(!g["kept"].as_array().unwrap().is_empty(), "{g}");
        let g = mf(s, &["gc", "--json", "--grace", "0s", &url]).ok().json();
        let removed = g["removed"].as_array().unwrap();
        assert!(
            removed
                .iter()
                .any(|r| r.as_str().unwrap().contains("(upload ")),
            "uploads not aborted: {g}"
        );
        assert_eq!(s.keys(&url), committed);
        mf(s, &["verify", &url]).ok();
        s.clean(&url);
    });
}

#[test]
fn bad_credentials_give_a_clear_error_and_never_print_the_secret() {
    // s3s-fs checks signatures out of the box; moto only once its
    // authentication is switched on (a dedicated instance with an IAM user).
    let moto = Server::start_moto_with_auth();
    for s in [shared(Kind::S3sFs), &moto] {
        eprintln!("== {}", s.kind.name());
        assert!(s.checks_signatures());
        let url = s.url("creds");
        // The right credentials work (so a refusal below is about them).
        let ok = s.url("creds-ok");
        save(s, &ok, 1, &[]);
        mf(s, &["verify", &ok]).ok();
        s.clean(&ok);
        let wrong = "WRONG-secret-value-9f7e";
        let secret = s.secret_key();
        for args in [
            vec!["save", "--source", "synthetic:1MiB", "--to", &url],
            vec!["restore", &url],
            vec!["-vv", "verify", "--json", &url],
        ] {
            // A wrong secret, with and without a (bogus) session token.
            for token in [Some("TOKEN-secret-1234"), None] {
                let mut c = s.command();
                c.env("AWS_SECRET_ACCESS_KEY", wrong)
                    .env("MEMFERRY_S3_MAX_RETRIES", "1")
                    .env("MEMFERRY_LOG", "debug");
                if let Some(t) = token {
                    c.env("AWS_SESSION_TOKEN", t);
                }
                let r = run_cmd(c, args.clone());
                assert_ne!(r.code, 0, "{args:?} succeeded on {}", s.kind.name());
                let all = format!("{}{}", r.stdout, r.stderr);
                for secret in [wrong, "TOKEN-secret-1234", SECRET_KEY, secret.as_str()] {
                    assert!(!all.contains(secret), "secret printed by {args:?}: {all}");
                }
                let r = r.stderr_has(&["AWS_SECRET_ACCESS_KEY"]);
                assert!(
                    r.stderr.contains("rejected the credentials"),
                    "{}",
                    r.stderr
                );
            }
        }
        assert!(s.keys(&url).is_empty());
    }
}

#[test]
fn bad_s3_input_is_rejected_before_any_request() {
    let s = shared(Kind::Moto);
    for (args, needle) in [
        (vec!["restore", "s3://Bad_Bucket/x"], "bucket name"),
        (vec!["restore", "s3://bucket"], "own prefix"),
        (vec!["verify", "s3://bucket/a/../b"], "segment"),
        (vec!["inspect", "gs://bucket/x"], "unsupported location"),
        (
            vec![
                "save",
                "--source",
                "synthetic:1MiB",
                "--to",
                "s3://memferry-test/x",
                "--roots",
                "/tmp",
            ],
            "--roots does not apply",
        ),
        (
            vec![
                "restore",
                "--s3-endpoint",
                "http://10.1.2.3:9000",
                "s3://memferry-test/x",
            ],
            "--s3-allow-http",
        ),
        (
            vec![
                "restore",
                "--s3-endpoint",
                "ftp://x",
                "s3://memferry-test/x",
            ],
            "http://",
        ),
        // Virtual-hosted addressing puts the bucket into the host name.
        (
            vec![
                "restore",
                "--s3-path-style",
                "false",
                "s3://memferry-test/x",
            ],
            "path-style addressing",
        ),
    ] {
        mf(s, &args).code(2).stderr_has(&[needle]);
    }
    let url = s.url("empty");
    assert_no_snapshot(s, &url);
    mf(s, &["inspect", &url]).code(2);
    // Refuses a prefix holding foreign objects, and changes nothing.
    let k = key(&url, "notes.txt");
    s.client()
        .put(
            &k,
            "hello".into(),
            memferry::storage::s3::PutCondition::Overwrite,
        )
        .unwrap();
    mf(s, &["save", "--source", "synthetic:1MiB", "--to", &url])
        .code(2)
        .stderr_has(&["not part of a memferry snapshot"]);
    assert_eq!(s.keys(&url), vec![k]);
    s.clean(&url);
}

/// The save id of the snapshot committed at `url`.
fn committed_save_id(s: &Server, url: &str) -> String {
    let m = common::single_json_object(&mf(s, &["inspect", "--json", url]).ok().stdout).unwrap();
    m["identity"]["save_id"].as_str().unwrap().to_string()
}

#[test]
fn a_manifest_put_whose_reply_is_lost_still_commits_and_keeps_its_shards() {
    each_server(|s| {
        let url = s.url("lost-reply");
        let proxy = FaultProxy::start(s.port, Faults::None);
        // The server writes the manifest, but the client sees 503 (then a
        // timeout): object_store retries, the retry's condition fails
        // (412), and only reading the manifest back tells that it was ours.
        for (i, fault) in [
            Faults::LoseReply {
                method: "PUT",
                path_suffix: "/manifest.json",
                nth: 1,
            },
            // A re-save (If-Match) whose reply never comes.
            Faults::HangReply {
                method: "PUT",
                path_suffix: "/manifest.json",
                nth: 1,
            },
            Faults::LoseReply {
                method: "PUT",
                path_suffix: "/manifest.json",
                nth: 1,
            },
        ]
        .into_iter()
        .enumerate()
        {
            proxy.set_faults(fault);
            let old = s.keys(&url);
            let r = through(
                s,
                &proxy,
                &[
                    "save",
                    "--json",
                    "--source",
                    "synthetic:20MiB",
                    "--to",
                    &url,
                    "--shard-size",
                    "8MiB",
                    "--s3-request-timeout",
                    "3s",
                ],
            );
            let r = r.ok();
            assert!(r.stderr.contains("the save committed"), "{i}: {}", r.stderr);
            assert_eq!(proxy.injected(), i as u64 + 1, "{i}: no reply was lost");
            // Every shard of the committed manifest is there, and only its
            // objects are left (the previous save's shards are gone).
            mf(s, &["verify", &url]).ok();
            let id = committed_save_id(s, &url);
            let keys = s.keys(&url);
            assert_eq!(
                keys.iter().filter(|k| k.contains("/shards/")).count(),
                3,
                "{keys:?}"
            );
            for k in &keys {
                assert!(
                    k.ends_with("/manifest.json") || k.contains(&id),
                    "{i}: {k} left over ({keys:?})"
                );
            }
            assert!(
                old.iter()
                    .all(|k| k.ends_with("/manifest.json") || !keys.contains(k))
            );
        }
        s.clean(&url);
    });
}

#[test]
fn gc_while_a_save_is_stalled_makes_the_save_fail_instead_of_committing_without_shards() {
    each_server(|s| {
        let url = s.url("gc-race");
        // The save stalls right before its commit for longer than gc's
        // grace, with no heartbeat in that time (it beats once a minute).
        let (a, a_err) = paused_save(s, &url, 12, 8);
        std::thread::sleep(Duration::from_secs(3));
        let g = mf(s, &["gc", "--json", "--grace", "2s", &url]).ok().json();
        assert!(
            !g["removed"].as_array().unwrap().is_empty(),
            "gc judged nothing abandoned: {g}"
        );
        let out = a.wait_with_output().unwrap();
        let a_err = a_err.join().unwrap();
        assert_eq!(out.status.code(), Some(1), "the save must fail: {a_err}");
        assert!(
            a_err.contains("memferry gc") && a_err.contains("committed nothing"),
            "{a_err}"
        );
        assert!(!a_err.contains("panicked"), "{a_err}");
        assert_no_snapshot(s, &url);
        assert!(s.keys(&url).is_empty(), "left: {:?}", s.keys(&url));
    });
}

#[test]
fn a_running_save_keeps_its_marker_fresh_so_gc_leaves_it_alone() {
    each_server(|s| {
        let url = s.url("heartbeat");
        let (a, a_err) = paused_save_with(
            s,
            &url,
            12,
            6,
            "s3-before-commit",
            &[],
            &[("MEMFERRY_TEST_S3_HEARTBEAT_MS", "300")],
        );
        // Older than gc's grace by its start, but its marker is fresh.
        std::thread::sleep(Duration::from_secs(3));
        let g = mf(s, &["gc", "--json", "--grace", "2s", &url]).ok().json();
        assert!(g["removed"].as_array().unwrap().is_empty(), "{g}");
        assert!(!g["kept"].as_array().unwrap().is_empty(), "{g}");
        let out = a.wait_with_output().unwrap();
        let a_err = a_err.join().unwrap();
        assert_eq!(out.status.code(), Some(0), "{a_err}");
        mf(s, &["verify", &url]).ok();
        let g = mf(s, &["gc", "--json", "--grace", "0s", &url]).ok().json();
        assert!(g["removed"].as_array().unwrap().is_empty(), "{g}");
        s.clean(&url);
    });
}

#[test]
fn gc_aborts_the_uploads_of_a_save_killed_before_it_recorded_them() {
    each_server(|s| {
        let url = s.url("killed-create");
        let (mut a, a_err) = paused_save_with(
            s,
            &url,
            40,
            60,
            "s3-after-create",
            &["--shard-size", "8MiB"],
            &[],
        );
        a.kill().unwrap();
        a.wait().unwrap();
        a_err.join().unwrap();
        // The marker written before the uploads names the save.
        let left = s.keys(&url);
        assert!(left.iter().any(|k| k.contains("/saves/")), "{left:?}");
        let c = s.client();
        let shards = format!("{}/", key(&url, "shards"));
        let before = c.list_multipart_uploads(&shards).unwrap();
        let g = mf(s, &["gc", "--json", "--grace", "0s", &url]).ok().json();
        let removed: Vec<&str> = g["removed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        match c.list_multipart_uploads(&shards).unwrap() {
            // moto lists uploads: gc found and aborted every one.
            Some(uploads) => {
                assert!(uploads.is_empty(), "uploads left: {uploads:?}");
                let before = before.unwrap();
                assert!(before.len() > 1, "{before:?}");
                for (k, id) in &before {
                    assert!(
                        removed.contains(&format!("s3://{BUCKET}/{k} (upload {id})").as_str()),
                        "upload {id} of {k} not aborted: {g}"
                    );
                }
            }
            // s3s-fs cannot list them: gc says so and what to do.
            None => {
                let kept = g["kept"].to_string();
                assert!(kept.contains("lifecycle rule"), "{g}");
            }
        }
        assert!(s.keys(&url).is_empty(), "left: {:?}", s.keys(&url));
    });
}

#[test]
fn saves_work_with_conditional_puts_turned_off() {
    each_server(|s| {
        let url = s.url("unconditional");
        for mib in [12, 20] {
            let mut c = s.command();
            c.env("MEMFERRY_S3_CONDITIONAL_PUT", "false")
                .env("MEMFERRY_TEST_S3_HEARTBEAT_MS", "50");
            let r = run_cmd(
                c,
                [
                    "save",
                    "--json",
                    "--source",
                    &format!("synthetic:{mib}MiB"),
                    "--to",
                    &url,
                ],
            )
            .ok()
            .stderr_has(&["lost-update detection is off"]);
            assert_eq!(r.json()["bytes"], mib * MIB);
            let r = mf(s, &["restore", "--json", &url]).ok().json();
            assert_eq!(r["bytes"], mib * MIB);
        }
        let keys = s.keys(&url);
        assert_eq!(keys.len(), 2, "one shard and the manifest: {keys:?}");
        s.clean(&url);
    });
}

#[test]
fn cleanup_after_a_failed_save_is_bounded_by_one_deadline() {
    let s = shared(Kind::Moto);
    let url = s.url("cleanup-deadline");
    let proxy = FaultProxy::start(s.port, Faults::None);
    // 20 shards: manifest read, LIST, marker, 20 uploads created, marker
    // updated; then every request is throttled, cleanup included. Each
    // request alone may take its whole retry bound (3 s): one after the
    // other that was a minute of cleanup.
    proxy.set_faults(Faults::AllFrom(proxy.requests() + 24));
    let t = Instant::now();
    let r = through(
        s,
        &proxy,
        &[
            "save",
            "--source",
            "synthetic:160MiB",
            "--to",
            &url,
            "--shard-size",
            "8MiB",
            "--s3-max-retries",
            "20",
            "--s3-retry-timeout",
            "3s",
        ],
    );
    let took = t.elapsed();
    assert_eq!(r.code, 1, "{}", r.stderr);
    let r = r.stderr_has(&["memferry gc", "removes the rest"]);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(
        took < Duration::from_secs(20),
        "took {took:?}: {}",
        r.stderr
    );
    assert_no_snapshot(s, &url);
    mf(s, &["gc", "--grace", "0s", &url]).ok();
    assert!(s.keys(&url).is_empty(), "left: {:?}", s.keys(&url));
}

/// A stand-in for the EKS Pod Identity agent: answers every request that
/// carries `token` with temporary credentials (the server's keys and a
/// session token); counts the requests it answered.
fn credentials_agent(
    access: String,
    secret: String,
    token: &'static str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/credentials", listener.local_addr().unwrap());
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap_or(0) == 1 {
                head.push(b[0]);
            }
            let head = String::from_utf8_lossy(&head).to_lowercase();
            let (status, body) = if head.contains(&format!("authorization: {token}")) {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (
                    "200 OK",
                    format!(
                        r#"{{"AccessKeyId":"{access}","SecretAccessKey":"{secret}","Token":"AGENT-SESSION-TOKEN","Expiration":"2099-01-01T00:00:00Z"}}"#
                    ),
                )
            } else {
                ("403 Forbidden", "{}".to_string())
            };
            let _ = write!(
                c,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, served)
}

#[test]
fn container_role_credentials_from_the_environment_are_used() {
    // s3s-fs checks signatures: requests signed with what the (stand-in)
    // EKS Pod Identity agent hands out must pass, unsigned ones would not.
    let s = shared(Kind::S3sFs);
    let token = "memferry-test-pod-token";
    let (agent, served) = credentials_agent(s.access_key(), s.secret_key(), token);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let url = s.url("pod-identity");
    let with_role = || {
        let mut c = s.command();
        c.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", &agent)
            .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_file);
        c
    };
    let r = run_cmd(
        with_role(),
        ["-v", "save", "--source", "synthetic:4MiB", "--to", &url],
    )
    .ok();
    assert!(r.stderr.contains("EKS pod identity"), "{}", r.stderr);
    run_cmd(with_role(), ["verify", &url]).ok();
    assert!(served.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(!all.contains(&s.secret_key()) && !all.contains("AGENT-SESSION-TOKEN"));
    s.clean(&url);
}

#[test]
fn gc_never_takes_a_snapshot_nested_under_shards_for_leftovers() {
    each_server(|s| {
        let url = s.url("nested");
        let nested = format!("{url}/shards");
        save(s, &nested, 4, &[]);
        let before = s.keys(&url);
        let g = mf(s, &["gc", "--json", "--grace", "0s", &url]).ok().json();
        assert!(g["removed"].as_array().unwrap().is_empty(), "{g}");
        assert_eq!(s.keys(&url), before);
        mf(s, &["verify", &nested]).ok();
        // Nor is the prefix above it taken for an empty snapshot's.
        mf(s, &["save", "--source", "synthetic:1MiB", "--to", &url])
            .code(2)
            .stderr_has(&["not part of a memferry snapshot"]);
        s.clean(&url);
    });
}
