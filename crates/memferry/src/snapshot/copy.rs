//! `copy SRC DST`: moves a committed snapshot between any two locations
//! (local directory, striped local roots, S3 prefix), verified end to end.
//!
//! The copy streams: the destination is written by the ordinary save
//! ([`save`] locally, [`remote::save`] on S3, each with its own commit
//! protocol: crash-safe rename locally, manifest-last conditional PUT on
//! S3), from a [`SnapshotSource`] whose regions hold no bytes. Each region
//! reads the piece of the source the save asks for when it asks for it
//! (`pread` of the local shard files, ranged GET on S3), checks it against
//! the source manifest's CRC32Cs before handing it over, and drops it. The
//! destination is then verified byte for byte against its own checksums.
//! The destination manifest keeps the layout, metadata and source
//! description; it gets its own save identity.
//!
//! Host memory is bounded independently of the snapshot size: at most
//! [`CopyWindow::slots`] source reads are in flight, each staging at most
//! [`CopyWindow::piece`] bytes (the checksum chunk grid of the source, so a
//! piece is verified whole), i.e. `slots x piece` bytes of source staging
//! (by default `workers x max(chunk_size, 8 MiB)` = 32 MiB), plus what the
//! destination's save stages as for any save (local: `workers x
//! chunk_size`; S3: `concurrency x part size` of parts in flight). The peak
//! of the source staging is reported as the read pass's
//! `peak_staging_bytes`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;

use super::manifest::{Extent, Manifest};
use super::open::OpenedSnapshot;
use super::remote;
use super::report::{Phases, Report};
use super::restore::{LoadOptions, verify};
use super::save::{SaveOptions, save};
use super::source::SnapshotSource;
use crate::memory::{Device, Region, check_range};
use crate::storage::location::Location;
use crate::storage::s3::{ObjectClient, S3Config};
use crate::transfer::{BackendKind, Tuning};
use crate::{Error, Result};

/// Smallest piece a copy reads from its source (S3 requests are at least
/// this large).
pub const MIN_PIECE: u64 = 8 << 20;

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
    /// Source staging; `None`: [`CopyWindow::for_tuning`].
    pub window: Option<CopyWindow>,
}

/// The bound on source bytes a copy holds in host memory at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyWindow {
    /// Source reads in flight at most.
    pub slots: usize,
    /// Bytes one read stages at most (rounded up to whole checksum chunks
    /// of the source).
    pub piece: u64,
}

impl CopyWindow {
    /// `workers` reads of `max(chunk_size, 8 MiB)`.
    pub fn for_tuning(t: &Tuning) -> Self {
        Self {
            slots: t.workers.max(1),
            piece: t.chunk_size.max(MIN_PIECE),
        }
    }

    /// The most bytes of source staging, for a source checksummed in
    /// `chunk`-byte chunks.
    pub fn bound(&self, chunk: u64) -> u64 {
        self.slots as u64 * piece_for(self.piece, chunk)
    }
}

fn piece_for(piece: u64, chunk: u64) -> u64 {
    piece.max(chunk).div_ceil(chunk) * chunk
}

/// What a copy did: the three passes.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    /// Read of the source (verified; it runs in the same pass as the
    /// write, so its times are the write's transfer).
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
    opts.tuning.validate()?;
    let window = opts
        .window
        .unwrap_or_else(|| CopyWindow::for_tuning(&opts.tuning));
    if window.slots == 0 || window.piece == 0 {
        return Err(Error::InvalidInput(
            "the copy window needs at least one slot of at least one byte".into(),
        ));
    }
    let load = |roots: Option<Vec<PathBuf>>| LoadOptions {
        roots,
        tuning: opts.tuning.clone(),
        ..LoadOptions::default()
    };
    let t = Instant::now();
    let reader = Arc::new(SourceReader::open(src, opts, window)?);
    let plan_seconds = t.elapsed().as_secs_f64();
    let dst_client = client_for(dst, &opts.s3)?;
    let m = &reader.manifest;
    let source = SnapshotSource {
        description: m.source.clone(),
        layout: m.layout(),
        regions: m
            .allocations
            .iter()
            .enumerate()
            .map(|(i, a)| {
                Box::new(StreamedRegion {
                    reader: reader.clone(),
                    allocation: i,
                    len: a.allocation.size,
                }) as Box<dyn Region>
            })
            .collect(),
    };
    let save_opts = SaveOptions {
        roots: opts.to_roots.clone(),
        shard_size: opts.shard_size.unwrap_or(super::save::DEFAULT_SHARD_SIZE),
        checksum_chunk: m.checksum.chunk_bytes,
        // The source has no host pointer: buffered workers pull pieces of it
        // in parallel (the direct backend would pull them one at a time).
        backend: BackendKind::Buffered,
        tuning: opts.tuning.clone(),
        ..SaveOptions::default()
    };
    let write = match (dst, &dst_client) {
        (Location::S3(u), Some(c)) => remote::save(&source, c, u, &save_opts)?,
        (Location::Local(p), _) => save(&source, p, &save_opts)?,
        _ => unreachable!("a client exists for every S3 location"),
    };
    drop(source);
    let read = reader.report(src, plan_seconds, &write);
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

/// Where the source's shards are read from.
enum Shards {
    Local {
        files: Vec<File>,
        paths: Vec<PathBuf>,
    },
    S3 {
        client: Box<ObjectClient>,
        keys: Vec<String>,
    },
}

/// The source snapshot, read piece by piece on demand and verified.
struct SourceReader {
    manifest: Manifest,
    shards: Shards,
    /// Checksum chunk of the source.
    chunk: u64,
    /// Largest read, a multiple of `chunk`.
    piece: u64,
    window: Window,
    bytes_read: AtomicU64,
}

impl SourceReader {
    /// Opens the committed snapshot at `src`; missing and short shards fail
    /// here, by name, before anything is written anywhere.
    fn open(src: &Location, opts: &CopyOptions, window: CopyWindow) -> Result<Self> {
        let (manifest, shards) = match src {
            Location::Local(p) => {
                let snap = OpenedSnapshot::open(p, opts.from_roots.as_deref())?;
                snap.load_plan(opts.tuning.chunk_size)?; // presence and sizes
                let paths: Vec<PathBuf> = (0..snap.manifest.shards.len())
                    .map(|i| snap.shard_path(i))
                    .collect();
                let files = paths
                    .iter()
                    .map(|p| {
                        File::open(p).map_err(|e| Error::io(format!("opening {}", p.display()), e))
                    })
                    .collect::<Result<Vec<_>>>()?;
                (snap.manifest, Shards::Local { files, paths })
            }
            Location::S3(u) => {
                if opts.from_roots.is_some() {
                    return Err(Error::InvalidInput(
                        "--from-roots does not apply to an S3 source; drop it".into(),
                    ));
                }
                let client = ObjectClient::new(&opts.s3, &u.bucket)?;
                let snap = remote::open(&client, u)?;
                let (_, _, keys) = remote::load_plan(&client, &snap, MIN_PIECE)?;
                (
                    snap.manifest,
                    Shards::S3 {
                        client: Box::new(client),
                        keys,
                    },
                )
            }
        };
        let chunk = manifest.checksum.chunk_bytes;
        Ok(Self {
            piece: piece_for(window.piece, chunk),
            chunk,
            window: Window::new(window.slots),
            manifest,
            shards,
            bytes_read: AtomicU64::new(0),
        })
    }

    /// Name of shard `i` for messages.
    fn shard_name(&self, i: usize) -> PathBuf {
        match &self.shards {
            Shards::Local { paths, .. } => paths[i].clone(),
            Shards::S3 { client, keys } => PathBuf::from(client.url(&keys[i])),
        }
    }

    /// Bytes `offset..offset + len` of shard `i`.
    fn fetch(&self, i: usize, offset: u64, len: u64) -> Result<Bytes> {
        let short = |got: u64| Error::Truncated {
            path: self.shard_name(i),
            offset,
            length: len,
            file_size: offset + got,
        };
        let bytes = match &self.shards {
            Shards::Local { files, paths } => {
                let mut buf = vec![0u8; len as usize];
                files[i].read_exact_at(&mut buf, offset).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        short(0)
                    } else {
                        Error::io(format!("reading {}", paths[i].display()), e)
                    }
                })?;
                Bytes::from(buf)
            }
            Shards::S3 { client, keys } => {
                let get = || client.get_range(&keys[i], offset..offset + len);
                // The destination's save may call in from inside the async
                // runtime of its own S3 client, where blocking on another
                // runtime is not allowed: then the GET runs on a thread.
                if tokio::runtime::Handle::try_current().is_ok() {
                    std::thread::scope(|s| {
                        s.spawn(get)
                            .join()
                            .unwrap_or_else(|p| std::panic::resume_unwind(p))
                    })?
                } else {
                    get()?
                }
            }
        };
        if (bytes.len() as u64) < len {
            return Err(short(bytes.len() as u64));
        }
        Ok(bytes)
    }

    /// Fills `dst` with bytes `offset..` of allocation `a`, reading the
    /// source in verified pieces of at most `piece` bytes, at most
    /// `window.slots` at once.
    fn read(&self, a: usize, offset: u64, dst: &mut [u8]) -> Result<()> {
        let end = offset + dst.len() as u64;
        let chunk = self.chunk;
        let mut filled = 0u64;
        for e in &self.manifest.allocations[a].extents {
            let (es, ee) = (e.alloc_offset, e.alloc_offset + e.length);
            if ee <= offset || es >= end {
                continue;
            }
            let (s, t) = (offset.max(es), end.min(ee));
            // The whole checksum chunks (of this extent) around s..t.
            let mut p = (s - es) / chunk * chunk;
            let last = ((t - es).div_ceil(chunk) * chunk).min(e.length);
            while p < last {
                let q = (p + self.piece).min(last);
                let _slot = self.window.acquire(q - p);
                let bytes = self.fetch(e.shard, e.offset + p, q - p)?;
                self.check(e, p, &bytes)?;
                let (ws, wt) = (s.max(es + p), t.min(es + q));
                dst[(ws - offset) as usize..(wt - offset) as usize]
                    .copy_from_slice(&bytes[(ws - es - p) as usize..(wt - es - p) as usize]);
                filled += wt - ws;
                self.bytes_read.fetch_add(q - p, Ordering::Relaxed);
                p = q;
            }
        }
        if filled != dst.len() as u64 {
            return Err(Error::InvalidInput(format!(
                "internal error: the source manifest's extents cover {filled} of bytes {offset}..{end} of allocation {a}"
            )));
        }
        Ok(())
    }

    /// Checks bytes `p..` of extent `e` (`p` on its chunk grid).
    fn check(&self, e: &Extent, p: u64, bytes: &[u8]) -> Result<()> {
        let first = (p / self.chunk) as usize;
        let n = crate::integrity::chunk_count(bytes.len() as u64, self.chunk);
        let expected = &e.crc32c[first..first + n];
        crate::integrity::verify_chunks(bytes, self.chunk, expected).map_err(|(i, found)| {
            let start = i as u64 * self.chunk;
            Error::ChecksumMismatch {
                path: self.shard_name(e.shard),
                offset: e.offset + p + start,
                length: self.chunk.min(bytes.len() as u64 - start),
                expected: expected[i],
                found,
            }
        })
    }

    /// The read pass's report (it ran inside the write's transfer).
    fn report(&self, src: &Location, plan_seconds: f64, write: &Report) -> Report {
        let m = &self.manifest;
        let mut r = Report {
            op: "read".into(),
            backend: match self.shards {
                Shards::Local { .. } => "file".into(),
                Shards::S3 { .. } => "s3".into(),
            },
            mode: format!(
                "streamed, verified pieces of {} x{} in flight at most",
                crate::units::format_bytes(self.piece),
                self.window.slots
            ),
            bytes: m.total_bytes,
            seconds: 0.0,
            gib_per_s: 0.0,
            transfer_gib_per_s: 0.0,
            verified: true,
            fallbacks: Vec::new(),
            phases: Phases {
                plan: plan_seconds,
                transfer: write.phases.transfer,
                ..Phases::default()
            },
            peak_staging_bytes: self.window.peak(),
            checksum_cpu_seconds: 0.0,
            snapshot: src.to_string(),
            allocations: m.allocations.len(),
            shards: m.shards.len(),
            roots: m.roots.len(),
            workers: self.window.slots,
            queue_depth: self.window.slots,
            chunk_size: self.piece,
            profile: None,
        };
        let p = &r.phases;
        r.seconds = p.plan + p.transfer;
        r.gib_per_s = crate::units::gib_per_s(r.bytes, r.seconds);
        r.transfer_gib_per_s = crate::units::gib_per_s(r.bytes, p.transfer);
        r
    }
}

/// At most `slots` reads at once, with the bytes they stage counted.
struct Window {
    slots: usize,
    busy: Mutex<usize>,
    freed: Condvar,
    held: AtomicU64,
    peak: AtomicU64,
}

impl Window {
    fn new(slots: usize) -> Self {
        Self {
            slots,
            busy: Mutex::new(0),
            freed: Condvar::new(),
            held: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    /// Waits for a free slot; the slot (and `bytes`) is released when the
    /// returned guard drops.
    fn acquire(&self, bytes: u64) -> Slot<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while *busy >= self.slots {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        *busy += 1;
        drop(busy);
        let now = self.held.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Slot {
            window: self,
            bytes,
        }
    }

    /// Most bytes staged at once so far.
    fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
}

struct Slot<'w> {
    window: &'w Window,
    bytes: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.window.held.fetch_sub(self.bytes, Ordering::SeqCst);
        *self.window.busy.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.window.freed.notify_one();
    }
}

/// Allocation `allocation` of the source, as a region that reads its bytes
/// from the source when they are copied out (it holds none itself).
struct StreamedRegion {
    reader: Arc<SourceReader>,
    allocation: usize,
    len: u64,
}

impl Region for StreamedRegion {
    fn len(&self) -> u64 {
        self.len
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    unsafe fn copy_in(&self, _offset: u64, _src: &[u8]) -> Result<()> {
        Err(Error::Unsupported(
            "a streamed copy source cannot be written".into(),
        ))
    }
    unsafe fn copy_out(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        check_range(self.len, offset, dst.len())?;
        self.reader.read(self.allocation, offset, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::restore::restore;
    use crate::snapshot::source::synthetic;

    const MIB: u64 = 1 << 20;

    /// Saves a synthetic model of `size` bytes at `dir`, 4 MiB shards.
    fn saved(dir: &std::path::Path, size: u64) -> Vec<Vec<u8>> {
        let source = synthetic(size, 7).unwrap().into_source();
        let opts = SaveOptions {
            shard_size: 4 * MIB,
            backend: BackendKind::Buffered,
            ..SaveOptions::default()
        };
        save(&source, dir, &opts).unwrap();
        bytes_of(
            &source
                .regions
                .iter()
                .map(|r| r.as_ref())
                .collect::<Vec<_>>(),
        )
    }

    fn bytes_of(regions: &[&dyn Region]) -> Vec<Vec<u8>> {
        regions
            .iter()
            .map(|r| {
                let mut v = vec![0u8; r.len() as usize];
                // SAFETY: nothing writes the region while it is read.
                unsafe { r.copy_out(0, &mut v).unwrap() };
                v
            })
            .collect()
    }

    fn restored(dir: &std::path::Path) -> Vec<Vec<u8>> {
        let (r, _) = restore(
            dir,
            &LoadOptions {
                backend: BackendKind::Buffered,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        bytes_of(&r.region_refs())
    }

    #[test]
    fn a_copy_stages_at_most_its_window_whatever_the_snapshot_size() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let size = 48 * MIB;
        let original = saved(&a, size);
        // Two reads of one checksum chunk (1 MiB) at a time: 2 MiB of a
        // 48 MiB snapshot, while the destination uses other shard sizes
        // (so pieces straddle source and destination extents differently).
        let window = CopyWindow { slots: 2, piece: 1 };
        let opts = CopyOptions {
            shard_size: Some(3 * MIB),
            tuning: Tuning {
                workers: 4,
                chunk_size: MIB,
                ..Tuning::default()
            },
            window: Some(window),
            ..CopyOptions::default()
        };
        let r = copy(
            &Location::Local(a.clone()),
            &Location::Local(b.clone()),
            &opts,
        )
        .unwrap();
        let bound = window.bound(MIB);
        assert_eq!(bound, 2 * MIB);
        let peak = r.read.peak_staging_bytes;
        assert!(
            peak > 0 && peak <= bound,
            "peak {peak} over the bound {bound}"
        );
        assert!(r.verify.verified);
        assert_eq!(r.write.bytes, size);
        assert_eq!(restored(&b), original);
        assert_eq!(restored(&a), original, "the source changed");
    }

    #[test]
    fn the_default_window_is_bounded_and_the_copy_keeps_every_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let original = saved(&a, 40 * MIB + 12345);
        let opts = CopyOptions::default();
        let r = copy(&Location::Local(a), &Location::Local(b.clone()), &opts).unwrap();
        let bound = CopyWindow::for_tuning(&opts.tuning).bound(MIB);
        assert_eq!(bound, 4 * 8 * MIB);
        assert!(r.read.peak_staging_bytes <= bound);
        assert_eq!(restored(&b), original);
    }

    #[test]
    fn the_window_never_admits_more_than_its_slots() {
        let w = Window::new(3);
        let inside = AtomicU64::new(0);
        let most = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..12 {
                s.spawn(|| {
                    for _ in 0..50 {
                        let _slot = w.acquire(10);
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert!(most.load(Ordering::SeqCst) <= 3);
        assert!(w.peak() <= 30 && w.peak() >= 10);
        assert_eq!(w.held.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_corrupt_source_fails_the_copy_by_name_and_commits_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        saved(&a, 12 * MIB);
        let m = Manifest::load(&a).unwrap();
        let shard = m.shard_path(1, std::slice::from_ref(&a));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&shard)
            .unwrap();
        f.write_all_at(b"X", 2 * MIB + 5).unwrap();
        drop(f);
        let e = copy(
            &Location::Local(a),
            &Location::Local(b.clone()),
            &CopyOptions::default(),
        )
        .unwrap_err();
        match e {
            Error::ChecksumMismatch {
                path,
                offset,
                length,
                ..
            } => {
                assert_eq!(path, shard);
                let bad = 2 * MIB + 5;
                assert!(offset <= bad && bad < offset + length, "{offset}+{length}");
            }
            other => panic!("expected a checksum mismatch, got {other}"),
        }
        assert!(!b.exists(), "a failed copy left {}", b.display());
    }
}
