//! Where bytes live at rest in an S3-compatible bucket (AWS S3, MinIO, Ceph
//! RGW, ...): configuration from the standard AWS environment and a blocking
//! client with bounded retries that owns its own async runtime.
//!
//! Used by the snapshot layer (`snapshot::remote`) and meant to be reused by
//! the KV store for blocks on S3 (PUT/GET/HEAD with retries, batched HEADs).

mod client;
mod config;

pub use client::{ObjectClient, ObjectInfo, PutCondition};
pub use config::{
    RetryPolicy, RoleCredentials, S3Config, S3Overrides, Secret, parse_bool, parse_duration,
    redact_endpoint,
};

/// Named fault points for the S3 tests (never set in production):
/// - `MEMFERRY_TEST_PAUSE_AT=<point>` sleeps `MEMFERRY_TEST_PAUSE_SECS`
///   (default 30) at that point, after saying so on stderr, so a test can
///   kill a process or a server exactly there (`s3-after-create` once the
///   multipart uploads exist but before the marker lists them,
///   `s3-before-commit`, `s3-save-mid` after the first part,
///   `s3-restore-mid` after the first ranged GET);
/// - `MEMFERRY_TEST_S3_FAIL_PART=<n>` makes the upload of the n-th part
///   (0-based, counted over the save) fail;
/// - `MEMFERRY_TEST_S3_HEARTBEAT_MS=<ms>` makes a running save refresh its
///   marker that often instead of every minute.
pub(crate) mod fault {
    use std::time::Duration;

    /// Pauses at `point` when the test environment asks for it.
    pub(crate) fn pause(point: &str) {
        if std::env::var("MEMFERRY_TEST_PAUSE_AT").is_ok_and(|p| p == point) {
            let secs = std::env::var("MEMFERRY_TEST_PAUSE_SECS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(30u64);
            eprintln!("memferry: test pause at {point} for {secs}s");
            std::thread::sleep(Duration::from_secs(secs));
        }
    }

    /// The heartbeat interval a test asks for.
    pub(crate) fn heartbeat() -> Option<Duration> {
        std::env::var("MEMFERRY_TEST_S3_HEARTBEAT_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_millis)
    }

    /// True when part `n` of a save must fail.
    pub(crate) fn fail_part(n: usize) -> bool {
        std::env::var("MEMFERRY_TEST_S3_FAIL_PART")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            == Some(n)
    }
}
