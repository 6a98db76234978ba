//! What every snapshot operation reports: which backend and mode ran, bytes,
//! wall time, GiB/s, fallbacks, verification and per-phase wall times.

use serde::Serialize;

use crate::transfer::TransferStats;

/// Wall seconds per phase. Phases are sequential, so they add up to (about)
/// the total; CPU time summed over threads is reported separately.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    /// Read and validate the manifest, build the transfer plan.
    pub plan: f64,
    /// Allocate memory (restore) or create and reserve shard files (save).
    pub allocate: f64,
    /// Move the bytes (checksums are computed/verified inside this phase).
    pub transfer: f64,
    /// Verification after the transfer (0 when verified in-line).
    pub verify: f64,
    /// Sync, publish and clean up (save); hand over (restore).
    pub commit: f64,
}

/// The report of one operation; `--json` prints it as one object.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `save`, `restore`, `verify`, `export`.
    pub op: String,
    /// Backend requested.
    pub backend: String,
    /// Mechanism that actually ran.
    pub mode: String,
    /// Payload bytes.
    pub bytes: u64,
    /// Wall seconds of the whole operation.
    pub seconds: f64,
    /// bytes / seconds in GiB/s.
    pub gib_per_s: f64,
    /// GiB/s of the transfer phase alone.
    pub transfer_gib_per_s: f64,
    /// True when every byte was checked against its checksum (save: all
    /// checksums recorded).
    pub verified: bool,
    /// Why a faster path did not run.
    pub fallbacks: Vec<String>,
    /// Per-phase wall seconds.
    pub phases: Phases,
    /// Peak staging memory.
    pub peak_staging_bytes: u64,
    /// CPU seconds in checksums, summed over threads.
    pub checksum_cpu_seconds: f64,
    /// Snapshot path.
    pub snapshot: String,
    /// Allocations in the layout.
    pub allocations: usize,
    /// Shard files.
    pub shards: usize,
    /// Roots used.
    pub roots: usize,
    /// Settings used.
    pub workers: usize,
    /// Requests in flight per root (direct).
    pub queue_depth: usize,
    /// Largest request in bytes.
    pub chunk_size: u64,
    /// The bench profile whose settings were used, if any.
    pub profile: Option<String>,
}

impl Report {
    /// Fills bytes/mode/fallbacks from transfer stats and computes rates.
    pub fn finish(&mut self, stats: &TransferStats) {
        self.mode = stats.mode.clone();
        self.bytes = stats.bytes;
        self.fallbacks = stats.fallbacks.clone();
        self.peak_staging_bytes = stats.peak_staging_bytes;
        self.checksum_cpu_seconds = stats.checksum_cpu_seconds;
        if stats.unverified {
            self.verified = false;
        }
        let p = &self.phases;
        self.seconds = p.plan + p.allocate + p.transfer + p.verify + p.commit;
        self.gib_per_s = crate::units::gib_per_s(self.bytes, self.seconds);
        self.transfer_gib_per_s = crate::units::gib_per_s(self.bytes, p.transfer);
    }

    /// One human-readable summary line.
    pub fn summary_line(&self) -> String {
        format!(
            "{op}: backend={backend} mode={mode} bytes={bytes} ({human}) seconds={secs:.3} GiB/s={rate:.2} fallbacks={fb} verified={verified}",
            op = self.op,
            backend = self.backend,
            mode = self.mode,
            bytes = self.bytes,
            human = crate::units::format_bytes(self.bytes),
            secs = self.seconds,
            rate = self.gib_per_s,
            fb = if self.fallbacks.is_empty() {
                "none".to_string()
            } else {
                self.fallbacks.join("; ")
            },
            verified = self.verified,
        ) + &self
            .profile
            .as_ref()
            .map(|p| format!(" profile={p}"))
            .unwrap_or_default()
    }

    /// The per-phase line.
    pub fn phases_line(&self) -> String {
        let p = &self.phases;
        format!(
            "phases: plan={:.3}s allocate={:.3}s transfer={:.3}s ({:.2} GiB/s) verify={:.3}s commit={:.3}s; peak staging {}",
            p.plan,
            p.allocate,
            p.transfer,
            self.transfer_gib_per_s,
            p.verify,
            p.commit,
            crate::units::format_bytes(self.peak_staging_bytes)
        )
    }
}
