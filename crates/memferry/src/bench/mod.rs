//! `memferry bench`: measures every backend over a small sweep of settings
//! against the hardware limits measured in the same run on the same files,
//! picks the best settings, and can save them as a profile.
//!
//! - [`limits`]: raw loops that define "the limit": O_DIRECT read and write
//!   at high queue depth through io_uring, plain O_DIRECT pread, buffered
//!   read of cached files, host memcpy;
//! - [`sweep`]: the backend x settings x cold/warm matrix;
//! - [`stats`]: medians and spreads;
//! - [`profile`]: best settings per set of disks, read by save/restore;
//! - [`plot`]: the SVG chart;
//! - [`object`]: save/restore on an S3 location against raw GET/PUT loops.

pub mod kv;
pub mod limits;
pub mod object;
pub mod plot;
pub mod profile;
pub mod stats;
pub mod sweep;

use serde::{Deserialize, Serialize};

pub use profile::{Profile, ProfileEntry, device_key, profile_path};
pub use stats::Measurement;
pub use sweep::{BenchOptions, Temperature, limits_of_snapshot, measure_limits, run};

use crate::transfer::{BackendKind, Tuning};

/// One point of the sweep: a backend and its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    /// Backend.
    pub backend: BackendKind,
    /// Buffered workers.
    pub workers: usize,
    /// Direct requests in flight per root.
    pub queue_depth: usize,
    /// Largest request.
    pub chunk_size: u64,
}

impl Setting {
    /// Short label, e.g. `direct qd=16 chunk=4MiB`.
    pub fn label(&self) -> String {
        let chunk = crate::units::format_bytes(self.chunk_size).replace(".00 ", "");
        match self.backend {
            BackendKind::Buffered => format!("buffered w={} chunk={chunk}", self.workers),
            _ => format!("{} qd={} chunk={chunk}", self.backend, self.queue_depth),
        }
    }

    /// The settings as backend tuning.
    pub fn tuning(&self) -> Tuning {
        Tuning {
            workers: self.workers,
            queue_depth: self.queue_depth,
            chunk_size: self.chunk_size,
            max_bytes_per_call: None,
            ..Tuning::default()
        }
    }
}

/// A limit measured by a raw loop.
#[derive(Debug, Clone, Serialize)]
pub struct Limit {
    /// What was measured, e.g. `odirect-read io_uring qd=32 bs=4MiB`.
    pub name: String,
    /// The measurement, or `None` when it could not run.
    pub result: Option<Measurement>,
    /// Why it could not run.
    pub unavailable: Option<String>,
}

impl Limit {
    /// Median GiB/s, if measured.
    pub fn gib_per_s(&self) -> Option<f64> {
        self.result.as_ref().map(|m| m.median)
    }
}

/// All limits of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// O_DIRECT sequential read at high queue depth (io_uring).
    pub odirect_read: Limit,
    /// O_DIRECT sequential write at high queue depth (io_uring), fsync included.
    pub odirect_write: Limit,
    /// O_DIRECT sequential pread, one request at a time per root.
    pub pread_direct: Limit,
    /// Buffered read of files already in the page cache.
    pub buffered_read: Limit,
    /// Host memory copy bandwidth (one thread, pre-faulted buffers).
    pub memcpy: Limit,
    /// Pinned host-to-device copy bandwidth (only with a CUDA device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned_h2d: Option<Limit>,
    /// Pinned device-to-host copy bandwidth (only with a CUDA device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned_d2h: Option<Limit>,
}

/// One row of the result table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `save` or `restore`.
    pub op: String,
    /// `cold`, `warm` (restore) or `-` (save).
    pub temperature: String,
    /// The settings.
    pub setting: Setting,
    /// Label of the setting.
    pub label: String,
    /// GiB/s (median, spread), or `None` when unavailable.
    pub result: Option<Measurement>,
    /// Why the row could not be measured.
    pub unavailable: Option<String>,
    /// Mechanism that actually ran.
    pub mode: String,
    /// Fallbacks reported by the backend.
    pub fallbacks: Vec<String>,
    /// Name of the limit this row is compared with.
    pub limit: String,
    /// That limit in GiB/s.
    pub limit_gib_per_s: Option<f64>,
    /// Median as a percentage of the limit.
    pub percent_of_limit: Option<f64>,
    /// Best row of its (op, temperature) group.
    pub best: bool,
}

/// The whole result of `memferry bench`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Always `bench`.
    pub op: String,
    /// Snapshot size in bytes.
    pub size: u64,
    /// Roots measured.
    pub roots: Vec<String>,
    /// Runs per figure.
    pub runs: usize,
    /// Whether the page cache could be dropped for cold rows.
    pub cold_available: bool,
    /// Why cold rows are unavailable, when they are.
    pub cold_note: Option<String>,
    /// Limits measured in this run.
    pub limits: Limits,
    /// Every measured row.
    pub rows: Vec<Row>,
    /// Best setting for cold restore (the profile's choice), if any.
    pub best_restore: Option<Setting>,
    /// Seconds the whole bench took.
    pub seconds: f64,
}
