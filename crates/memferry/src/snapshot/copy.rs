//! `copy SRC DST`: moves a committed snapshot between any two locations
//! (local directory, striped local roots, S3 prefix), verified end to end.
//!
//! The source is restored with its checksums verified, saved at the
//! destination with that destination's commit protocol (crash-safe rename
//! locally, manifest-last conditional PUT on S3), and the destination is
//! then verified byte for byte. The destination manifest keeps the layout,
//! metadata and source description; it gets its own save identity.
//! Host memory: the whole snapshot is held once in host memory between the
//! restore and the save.

use std::path::PathBuf;

use serde::Serialize;

use super::remote;
use super::report::Report;
use super::restore::{LoadOptions, restore, verify};
use super::save::{SaveOptions, save};
use super::source::SnapshotSource;
use crate::memory::Region;
use crate::storage::location::Location;
use crate::storage::s3::{ObjectClient, S3Config};
use crate::transfer::Tuning;
use crate::{Error, Result};

/// How to copy.
#[derive(Clone, Default)]
pub struct CopyOptions {
    /// Roots of a striped local source (default: recorded ones).
    pub from_roots: Option<Vec<PathBuf>>,
    /// Stripe a local destination over these roots.
    pub to_roots: Option<Vec<PathBuf>>,
    /// Largest shard at the destination (default: 1 GiB).
    pub shard_size: Option<u64>,
    /// Settings for local reads and writes.
    pub tuning: Tuning,
    /// S3 configuration for S3 locations.
    pub s3: S3Config,
}

/// What a copy did: the three passes.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    /// Read of the source (verified).
    pub read: Report,
    /// Write of the destination.
    pub write: Report,
    /// Verification of the destination.
    pub verify: Report,
}

/// Connects to the bucket of an S3 location.
pub fn client_for(loc: &Location, cfg: &S3Config) -> Result<Option<ObjectClient>> {
    match loc {
        Location::S3(u) => ObjectClient::new(cfg, &u.bucket).map(Some),
        Location::Local(_) => Ok(None),
    }
}

/// Copies the snapshot at `src` to `dst` (replacing a snapshot there
/// atomically); see the module docs.
pub fn copy(src: &Location, dst: &Location, opts: &CopyOptions) -> Result<CopyReport> {
    if src == dst {
        return Err(Error::InvalidInput(format!(
            "source and destination are the same location ({src}): choose another destination"
        )));
    }
    let load = |roots: Option<Vec<PathBuf>>| LoadOptions {
        roots,
        tuning: opts.tuning.clone(),
        ..LoadOptions::default()
    };
    let src_client = client_for(src, &opts.s3)?;
    let dst_client = client_for(dst, &opts.s3)?;
    let (restored, read) = match (src, &src_client) {
        (Location::S3(u), Some(c)) => remote::restore(c, u, &load(None))?,
        (Location::Local(p), _) => restore(p, &load(opts.from_roots.clone()))?,
        _ => unreachable!("a client exists for every S3 location"),
    };
    let source = SnapshotSource {
        description: restored.manifest.source.clone(),
        layout: restored.manifest.layout(),
        regions: restored
            .regions
            .into_iter()
            .map(|r| Box::new(r) as Box<dyn Region>)
            .collect(),
    };
    let save_opts = SaveOptions {
        roots: opts.to_roots.clone(),
        shard_size: opts.shard_size.unwrap_or(super::save::DEFAULT_SHARD_SIZE),
        checksum_chunk: restored.manifest.checksum.chunk_bytes,
        tuning: opts.tuning.clone(),
        ..SaveOptions::default()
    };
    let write = match (dst, &dst_client) {
        (Location::S3(u), Some(c)) => remote::save(&source, c, u, &save_opts)?,
        (Location::Local(p), _) => save(&source, p, &save_opts)?,
        _ => unreachable!("a client exists for every S3 location"),
    };
    drop(source);
    let verify = match (dst, &dst_client) {
        (Location::S3(u), Some(c)) => remote::verify(c, u, &load(None))?,
        (Location::Local(p), _) => verify(p, &load(None))?,
        _ => unreachable!("a client exists for every S3 location"),
    };
    Ok(CopyReport {
        read,
        write,
        verify,
    })
}
