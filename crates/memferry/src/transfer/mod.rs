//! How bytes move between memory regions and files.
//!
//! A [`TransferPlan`] lists I/O operations (file range <-> region range);
//! a [`Backend`] executes the plan and reports what actually ran. Every
//! backend, whatever its mechanism, keeps the same guarantees:
//! - loads verify each operation's checksums before its bytes are copied
//!   into the destination region, and fail naming file, offset and length;
//! - stores record the checksums of exactly the bytes written;
//! - short reads and writes are resumed, never assumed away;
//! - every staging buffer stays owned by the backend until the kernel has
//!   completed the I/O that uses it.

mod buffered;
mod direct;
pub mod gds;
mod job;
mod pinned;
mod plan;
mod request;
mod s3;
mod threads;
pub(crate) mod uring;

pub use buffered::BufferedBackend;
pub use direct::DirectBackend;
pub use gds::{GdsBackend, GdsMode};
pub use job::{Checksums, TransferJob};
pub use pinned::PinnedBackend;
pub use plan::{Direction, FileTarget, IoOp, PlanBuilder, TransferPlan};
pub use s3::{MAX_PARTS, MIN_PART_SIZE, ObjectBackend, part_size};

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Alignment of every file offset and direct-I/O length (safe for NVMe).
pub const IO_ALIGN: u64 = 4096;

/// Which backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `direct` where it works, otherwise `buffered`.
    Auto,
    /// pread/pwrite through the page cache with several workers.
    Buffered,
    /// O_DIRECT through io_uring with registered staging buffers.
    Direct,
    /// O_DIRECT into a ring of pinned staging buffers overlapped with
    /// asynchronous host<->device copies (plain aligned staging for host
    /// memory).
    Pinned,
    /// GPUDirect Storage through cuFile (falls back to `pinned` when cuFile
    /// or device memory is absent).
    Gds,
}

impl BackendKind {
    /// All concrete backends, in the order reports list them.
    pub const CONCRETE: [BackendKind; 2] = [BackendKind::Buffered, BackendKind::Direct];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Buffered => "buffered",
            BackendKind::Direct => "direct",
            BackendKind::Pinned => "pinned",
            BackendKind::Gds => "gds",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendKind::Auto),
            "buffered" => Ok(BackendKind::Buffered),
            "direct" => Ok(BackendKind::Direct),
            "pinned" => Ok(BackendKind::Pinned),
            "gds" => Ok(BackendKind::Gds),
            other => Err(Error::InvalidInput(format!(
                "unknown backend {other:?}: choose auto, buffered, direct, pinned or gds"
            ))),
        }
    }
}

/// Knobs shared by all backends.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Worker threads of the buffered backend (spread over the roots).
    pub workers: usize,
    /// Requests in flight per root for the direct backend.
    pub queue_depth: usize,
    /// Largest single I/O request in bytes (a multiple of 4096).
    pub chunk_size: u64,
    /// Test hook: the storage layer moves at most this many bytes per call,
    /// so every request completes short and must be resumed.
    pub max_bytes_per_call: Option<u64>,
    /// GPUDirect Storage settings (the `gds` backend only).
    pub gds: GdsMode,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            workers: 4,
            queue_depth: 32,
            chunk_size: 4 << 20,
            max_bytes_per_call: None,
            gds: GdsMode::default(),
        }
    }
}

impl Tuning {
    /// Rejects settings that cannot work, saying which value to change.
    pub fn validate(&self) -> Result<()> {
        if self.workers == 0 || self.workers > 1024 {
            return Err(Error::InvalidInput(format!(
                "--workers {} is out of range: use 1..=1024",
                self.workers
            )));
        }
        if self.queue_depth == 0 || self.queue_depth > 4096 {
            return Err(Error::InvalidInput(format!(
                "--queue-depth {} is out of range: use 1..=4096",
                self.queue_depth
            )));
        }
        if self.chunk_size < IO_ALIGN
            || !self.chunk_size.is_multiple_of(IO_ALIGN)
            || self.chunk_size > (1 << 30)
        {
            return Err(Error::InvalidInput(format!(
                "--chunk-size {} must be a multiple of 4096 between 4KiB and 1GiB",
                self.chunk_size
            )));
        }
        Ok(())
    }
}

/// What a backend reports after running a plan: what really happened.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TransferStats {
    /// The mechanism that actually ran, e.g. `odirect-uring`,
    /// `buffered-pread`, `buffered-fallback`.
    pub mode: String,
    /// Payload bytes moved (excluding alignment padding).
    pub bytes: u64,
    /// Wall-clock seconds of the transfer.
    pub seconds: f64,
    /// Why a faster path was not taken, one line per fallback.
    pub fallbacks: Vec<String>,
    /// Largest amount of staging memory held at once.
    pub peak_staging_bytes: u64,
    /// CPU seconds spent on checksums, summed over threads (overlaps I/O).
    pub checksum_cpu_seconds: f64,
    /// True when loaded bytes bypassed host memory and were *not* checked
    /// against their checksums in-line (GPUDirect Storage reads).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unverified: bool,
}

/// Builds the backend for `kind`. `Auto` is the direct backend, which falls
/// back to buffered I/O on its own when direct I/O cannot run.
pub fn backend(kind: BackendKind, tuning: Tuning) -> Box<dyn Backend> {
    match kind {
        BackendKind::Buffered => Box::new(BufferedBackend::new(tuning)),
        BackendKind::Direct | BackendKind::Auto => Box::new(DirectBackend::new(tuning)),
        BackendKind::Pinned => Box::new(PinnedBackend::new(tuning)),
        BackendKind::Gds => Box::new(GdsBackend::new(tuning)),
    }
}

/// The one small trait every backend implements.
pub trait Backend: Send + Sync {
    /// The backend's name, as chosen by the user.
    fn name(&self) -> &'static str;

    /// Executes every operation of `job.plan`; returns only when no I/O the
    /// backend issued is still in flight, whether it succeeded or not. A
    /// load that succeeds has waited until its bytes landed in device
    /// memory ([`TransferJob::settle_devices`]), so they may be read on any
    /// stream; the caller's writers on non-blocking streams must have
    /// finished before a job starts (see [`crate::memory::CudaRegion`]).
    fn run(&self, job: &TransferJob<'_>) -> Result<TransferStats>;
}
