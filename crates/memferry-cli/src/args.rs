//! Raw command-line arguments (clap). Every flag can also come from a
//! `MEMFERRY_*` environment variable; the flag wins.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use memferry::memory::Device;
use memferry::transfer::{BackendKind, GdsMode, Tuning};

fn size(s: &str) -> Result<u64, String> {
    memferry::units::parse_size(s).map_err(|e| e.to_string())
}

/// memferry: move model weights between memory and storage, fast and safely.
#[derive(Parser, Debug)]
#[command(name = "memferry", version, about, long_about = None)]
pub struct Cli {
    /// Print exactly one JSON object on stdout instead of text.
    #[arg(long, global = true, env = "MEMFERRY_JSON")]
    pub json: bool,

    /// More log output on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(flatten)]
    pub s3: S3Args,

    #[command(subcommand)]
    pub command: Command,
}

/// S3 settings, for `s3://bucket/prefix` locations. They override the
/// standard AWS environment (AWS_ENDPOINT_URL, AWS_REGION, AWS_CA_BUNDLE,
/// ...). Credentials come only from the environment (AWS_ACCESS_KEY_ID,
/// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) and are never printed.
#[derive(Args, Debug, Clone, Default)]
pub struct S3Args {
    /// S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS).
    #[arg(long, global = true, env = "MEMFERRY_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION, else us-east-1).
    #[arg(long, global = true, env = "MEMFERRY_S3_REGION")]
    pub s3_region: Option<String>,
    /// PEM file of extra trusted CA certificates (default: AWS_CA_BUNDLE).
    #[arg(long, global = true, env = "MEMFERRY_S3_CA_BUNDLE")]
    pub s3_ca_bundle: Option<PathBuf>,
    /// Path-style addressing (endpoint/bucket/key): true or false (default:
    /// true for custom endpoints, false for AWS).
    #[arg(long, global = true, env = "MEMFERRY_S3_PATH_STYLE", value_parser = boolean)]
    pub s3_path_style: Option<bool>,
    /// Allow plain http endpoints that are not on this machine.
    #[arg(long, global = true, env = "MEMFERRY_S3_ALLOW_HTTP", value_parser = boolean)]
    pub s3_allow_http: Option<bool>,
    /// Requests in flight at once (parts, ranged GETs).
    #[arg(long, global = true, env = "MEMFERRY_S3_CONCURRENCY")]
    pub s3_concurrency: Option<usize>,
    /// Retries per request on 5xx, throttling and timeouts.
    #[arg(long, global = true, env = "MEMFERRY_S3_MAX_RETRIES")]
    pub s3_max_retries: Option<usize>,
    /// Bound on the time one request is retried, e.g. 2m.
    #[arg(long, global = true, env = "MEMFERRY_S3_RETRY_TIMEOUT", value_parser = duration)]
    pub s3_retry_timeout: Option<std::time::Duration>,
    /// Timeout of one request, e.g. 5m.
    #[arg(long, global = true, env = "MEMFERRY_S3_REQUEST_TIMEOUT", value_parser = duration)]
    pub s3_request_timeout: Option<std::time::Duration>,
}

impl S3Args {
    /// The S3 configuration: environment first, these flags over it.
    pub fn config(&self) -> memferry::Result<memferry::storage::s3::S3Config> {
        memferry::storage::s3::S3Config::from_env(&memferry::storage::s3::S3Overrides {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            ca_bundle: self.s3_ca_bundle.clone(),
            path_style: self.s3_path_style,
            allow_http: self.s3_allow_http,
            conditional_put: None,
            concurrency: self.s3_concurrency,
            max_retries: self.s3_max_retries,
            retry_total: self.s3_retry_timeout,
            request_timeout: self.s3_request_timeout,
        })
    }
}

fn boolean(s: &str) -> Result<bool, String> {
    memferry::storage::s3::parse_bool(s).ok_or_else(|| format!("{s:?} is not true or false"))
}

fn duration(s: &str) -> Result<std::time::Duration, String> {
    memferry::storage::s3::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Save a snapshot from a source (synthetic:SIZE or safetensors:PATH,...).
    Save(SaveArgs),
    /// Restore a snapshot into host memory and report how fast it went.
    Restore(RestoreArgs),
    /// Check every byte of a snapshot against its checksums, without restoring.
    Verify(ReadArgs),
    /// Show what a snapshot holds.
    Inspect(InspectArgs),
    /// Restore a snapshot and write it as a safetensors file.
    Export(ExportArgs),
    /// Remove leftovers of interrupted or superseded saves.
    Gc(GcArgs),
    /// Copy a snapshot between locations (directory, striped roots, s3://), verified.
    Copy(CopyArgs),
    /// Save, restore with every backend, verify and clean up a built-in model.
    Quickstart(QuickstartArgs),
    /// Measure every backend against the hardware limits on these disks.
    Bench(BenchArgs),
    /// KV-cache block stores: bench, stats, evict, verify.
    Kv(crate::kv::KvArgs),
}

/// Settings shared by every command that moves bytes.
#[derive(Args, Debug, Clone)]
pub struct TransferArgs {
    /// Backend: auto (direct where it works), buffered, direct, pinned
    /// (pinned staging + async device copies) or gds (GPUDirect Storage).
    #[arg(long, env = "MEMFERRY_BACKEND", default_value = "auto")]
    pub backend: BackendKind,
    /// Worker threads of the buffered backend.
    #[arg(long, env = "MEMFERRY_WORKERS", default_value_t = 4)]
    pub workers: usize,
    /// Requests in flight per root (direct backend).
    #[arg(long, env = "MEMFERRY_QUEUE_DEPTH", default_value_t = 32)]
    pub queue_depth: usize,
    /// Largest single I/O request, e.g. 4MiB.
    #[arg(long, env = "MEMFERRY_CHUNK_SIZE", default_value = "4MiB", value_parser = size)]
    pub chunk_size: u64,
    /// Storage roots (comma-separated directories, usually one per disk).
    #[arg(long, env = "MEMFERRY_ROOTS", value_delimiter = ',')]
    pub roots: Option<Vec<PathBuf>>,
    /// With --backend gds: which directions use cuFile (read, write or
    /// both); the other direction runs pinned.
    #[arg(long, env = "MEMFERRY_GDS", default_value = "both", value_parser = gds_directions)]
    pub gds: (bool, bool),
    /// With --backend gds: leave device buffers unregistered so cuFile
    /// bounces through its own buffers.
    #[arg(long, env = "MEMFERRY_GDS_BOUNCE")]
    pub gds_bounce: bool,
}

fn gds_directions(s: &str) -> Result<(bool, bool), String> {
    GdsMode::parse_directions(s, false)
        .map(|m| (m.read, m.write))
        .map_err(|e| e.to_string())
}

impl TransferArgs {
    pub fn tuning(&self) -> Tuning {
        Tuning {
            workers: self.workers,
            queue_depth: self.queue_depth,
            chunk_size: self.chunk_size,
            max_bytes_per_call: None,
            gds: GdsMode {
                read: self.gds.0,
                write: self.gds.1,
                bounce: self.gds_bounce,
            },
        }
    }
}

#[derive(Args, Debug)]
pub struct SaveArgs {
    /// What to save: synthetic:SIZE or safetensors:PATH[,PATH...].
    #[arg(long, env = "MEMFERRY_SOURCE")]
    pub source: String,
    /// Snapshot directory or s3://bucket/prefix to create or replace atomically.
    #[arg(long)]
    pub to: PathBuf,
    /// Largest shard file, e.g. 1GiB.
    #[arg(long, env = "MEMFERRY_SHARD_SIZE", default_value = "1GiB", value_parser = size)]
    pub shard_size: u64,
    /// Write this file atomically once the save is committed.
    #[arg(long, env = "MEMFERRY_COMPLETE_FILE")]
    pub complete_file: Option<PathBuf>,
    /// Device the source lives on while it is saved: cpu, or cuda:N to
    /// load the source into that GPU first and save from device memory.
    #[arg(long, env = "MEMFERRY_DEVICE", default_value = "cpu")]
    pub device: Device,
    #[command(flatten)]
    pub transfer: TransferArgs,
}

#[derive(Args, Debug)]
pub struct ReadArgs {
    /// Snapshot directory or s3://bucket/prefix.
    pub snapshot: PathBuf,
    #[command(flatten)]
    pub transfer: TransferArgs,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    /// Skip checksum verification (not recommended).
    #[arg(long, env = "MEMFERRY_NO_VERIFY")]
    pub no_verify: bool,
    /// Device to restore to: cpu or cuda:N (default: the device each
    /// allocation names in the snapshot).
    #[arg(long, env = "MEMFERRY_DEVICE")]
    pub device: Option<Device>,
    /// Write this file atomically once the restore is complete.
    #[arg(long, env = "MEMFERRY_COMPLETE_FILE")]
    pub complete_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Snapshot directory or s3://bucket/prefix.
    pub snapshot: PathBuf,
    /// Also list every allocation.
    #[arg(long)]
    pub allocations: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    /// safetensors file to write (replaced atomically).
    #[arg(long)]
    pub to: PathBuf,
    /// Device to restore through before writing: cpu (default) or cuda:N
    /// (the bytes are then copied back from the GPU to be written).
    #[arg(long, env = "MEMFERRY_DEVICE")]
    pub device: Option<Device>,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Snapshot directory or s3://bucket/prefix.
    pub snapshot: PathBuf,
    /// Extra roots to search for leftover shard directories.
    #[arg(long, env = "MEMFERRY_ROOTS", value_delimiter = ',')]
    pub roots: Option<Vec<PathBuf>>,
    /// S3 only: keep leftovers of saves younger than this (they may still be
    /// running), e.g. 0s, 30m.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub grace: std::time::Duration,
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// Snapshot to copy: a directory or s3://bucket/prefix.
    pub src: PathBuf,
    /// Where to put the copy: a directory or s3://bucket/prefix (replaced atomically).
    pub dst: PathBuf,
    /// Roots of a striped local source (default: those recorded at save time).
    #[arg(long, value_delimiter = ',')]
    pub from_roots: Option<Vec<PathBuf>>,
    /// Stripe a local destination over these directories.
    #[arg(long, value_delimiter = ',')]
    pub to_roots: Option<Vec<PathBuf>>,
    /// Largest shard at the destination.
    #[arg(long, env = "MEMFERRY_SHARD_SIZE", default_value = "1GiB", value_parser = size)]
    pub shard_size: u64,
    /// Largest single request, e.g. 4MiB (S3 requests are at least 8MiB).
    #[arg(long, env = "MEMFERRY_CHUNK_SIZE", default_value = "4MiB", value_parser = size)]
    pub chunk_size: u64,
}

#[derive(Args, Debug)]
pub struct QuickstartArgs {
    /// Size of the built-in synthetic model.
    #[arg(long, default_value = "1GiB", value_parser = size)]
    pub size: u64,
    /// Working directory (default: a new directory under the system temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the snapshot instead of cleaning up.
    #[arg(long)]
    pub keep: bool,
    /// Largest shard file.
    #[arg(long, env = "MEMFERRY_SHARD_SIZE", default_value = "256MiB", value_parser = size)]
    pub shard_size: u64,
    #[command(flatten)]
    pub transfer: TransferArgs,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("temperature").args(["cold", "warm", "both"])))]
pub struct BenchArgs {
    /// Size of the synthetic snapshot measured.
    #[arg(long, default_value = "4GiB", value_parser = size)]
    pub size: u64,
    /// Directories to measure, one per disk (default: the system temp dir).
    #[arg(long, env = "MEMFERRY_ROOTS", value_delimiter = ',')]
    pub roots: Option<Vec<PathBuf>>,
    /// Measure save and restore of the bench snapshot at this
    /// s3://bucket/prefix instead of on local disks (removed afterwards).
    #[arg(long, conflicts_with_all = ["roots", "limits_on", "save_profile"])]
    pub location: Option<PathBuf>,
    /// Backends to measure.
    #[arg(long, value_delimiter = ',', default_value = "buffered,direct")]
    pub backends: Vec<BackendKind>,
    /// Measure restores with the page cache dropped only (needs root).
    #[arg(long)]
    pub cold: bool,
    /// Measure restores with the files cached only.
    #[arg(long)]
    pub warm: bool,
    /// Measure both (default).
    #[arg(long)]
    pub both: bool,
    /// Runs per figure; the median is reported with the spread.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Buffered worker counts to sweep.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    pub workers: Vec<usize>,
    /// Direct queue depths to sweep.
    #[arg(long, value_delimiter = ',', default_value = "8,16,32")]
    pub queue_depth: Vec<usize>,
    /// Chunk sizes to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1MiB,4MiB", value_parser = size)]
    pub chunk_size: Vec<u64>,
    /// Shard size of the bench snapshot.
    #[arg(long, default_value = "1GiB", value_parser = size)]
    pub shard_size: u64,
    /// Write a chart (SVG) of the results with the limits drawn as lines.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Only measure the limits, on the shard files of this existing snapshot
    /// (used by bench/ scripts to compare with fio on the same files).
    #[arg(long, value_name = "SNAPSHOT")]
    pub limits_on: Option<PathBuf>,
    /// Device the model lives on: cpu, or cuda:N to measure saves from and
    /// restores into that GPU (adds the pinned H2D/D2H copy limits).
    #[arg(long, env = "MEMFERRY_DEVICE", default_value = "cpu")]
    pub device: Device,
    /// Save the best settings as the profile for these disks
    /// ($MEMFERRY_PROFILE or $XDG_CONFIG_HOME/memferry/profile.toml).
    #[arg(long)]
    pub save_profile: bool,
}
