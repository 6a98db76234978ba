//! The S3 backend: runs a [`TransferPlan`] whose files are objects in a
//! bucket (`keys[i]` is the object of `plan.files[i]`).
//!
//! Load: neighbouring operations of an object are merged into ranged GETs
//! of at most the request size, at most `concurrency` in flight; the body
//! streams into a staging buffer taken from a pool of at most `concurrency`
//! buffers (host memory is bounded by `concurrency x request size`, whatever
//! the snapshot size); each operation's bytes are checked against their
//! CRC32Cs and only then copied into the destination region (verify before
//! accept, as on local disks). A short or over-long body is
//! an error naming the object, offset and length.
//!
//! Store: each object is written with a multipart upload the caller has
//! created (so it can record the upload ids before any byte moves). Parts
//! are equal-sized (at least 8 MiB, at most 10,000 parts per object, the last
//! part shorter), assembled from the regions with zero padding exactly as
//! the local shard files hold them, checksummed while assembled (on up to
//! 8 threads of their own, so a source that blocks, such as a copy reading
//! another bucket, is read several pieces at a time), and uploaded
//! `concurrency` at a time, objects in order; at most `concurrency` parts
//! are held at once, from assembly to the end of their upload. Each object is
//! completed as soon as its last part is in, while later objects' parts
//! still move (a server's work on completion overlaps the upload instead of
//! following it). A completed object is not yet part of any snapshot: only
//! the manifest, written after this backend returns, makes it one. On error
//! the caller aborts the uploads and deletes the objects, completed or not.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore};

use super::{Backend, Direction, IoOp, TransferJob, TransferStats};
use crate::storage::s3::ObjectClient;
use crate::{Error, Result};

/// Smallest multipart part (S3 allows 5 MiB; 8 MiB keeps requests large).
pub const MIN_PART_SIZE: u64 = 8 << 20;
/// Most parts S3 accepts in one upload.
pub const MAX_PARTS: u64 = 10_000;

/// Part size for an object of `size` bytes: at least `wanted` (rounded up
/// to whole MiB, never below [`MIN_PART_SIZE`]) and large enough that the
/// object needs at most [`MAX_PARTS`] parts.
pub fn part_size(size: u64, wanted: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    let by_count = size.div_ceil(MAX_PARTS);
    wanted
        .max(MIN_PART_SIZE)
        .max(by_count)
        .div_ceil(MIB)
        .saturating_mul(MIB)
}

/// Runs plans against objects of one bucket.
pub struct ObjectBackend<'c> {
    client: &'c ObjectClient,
    keys: Vec<String>,
    uploads: Vec<String>,
    part_size: u64,
}

impl<'c> ObjectBackend<'c> {
    /// A backend reading `keys[i]` for `plan.files[i]`, merging
    /// neighbouring ops into ranged GETs of at most `request` bytes.
    pub fn for_load(client: &'c ObjectClient, keys: Vec<String>, request: u64) -> Self {
        Self {
            client,
            keys,
            uploads: Vec::new(),
            part_size: request,
        }
    }

    /// A backend writing `plan.files[i]` to `keys[i]` through the multipart
    /// upload `uploads[i]`, in parts of [`part_size`]`(size, part_size)`.
    pub fn for_store(
        client: &'c ObjectClient,
        keys: Vec<String>,
        uploads: Vec<String>,
        part_size: u64,
    ) -> Self {
        Self {
            client,
            keys,
            uploads,
            part_size,
        }
    }

    fn load(&self, job: &TransferJob<'_>) -> Result<TransferStats> {
        let t = Instant::now();
        let n = self.client.config().concurrency;
        let (ops, gets) = coalesce(&job.plan.ops, self.part_size);
        let pool: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
        let staged = AtomicU64::new(0);
        let peak = AtomicU64::new(0);
        let paused = std::sync::atomic::AtomicBool::new(false);
        let one = |g: Get| {
            let (pool, paused, ops) = (&pool, &paused, &ops);
            let (staged, peak) = (&staged, &peak);
            async move {
                if job.cancelled() {
                    return Err(Error::Cancelled);
                }
                let len = g.end - g.start;
                let g_ops = &ops[g.ops.clone()];
                let host = g_ops
                    .iter()
                    .all(|op| job.regions[op.region].host_ptr_mut().is_some());
                let r = if host {
                    // Host memory: the body's chunks are verified and
                    // copied straight into place, without a joined copy.
                    let now = staged.fetch_add(len, Ordering::Relaxed) + len;
                    peak.fetch_max(now, Ordering::Relaxed);
                    let mut chunks = Vec::new();
                    let r = self
                        .fetch(job, &g, |c| chunks.push(c))
                        .await
                        .and_then(|()| {
                            g_ops.iter().try_for_each(|op| {
                                let pieces = slices(&chunks, op.file_offset - g.start, op.len);
                                job.accept_loaded_pieces(op, &pieces)
                            })
                        });
                    drop(chunks);
                    staged.fetch_sub(len, Ordering::Relaxed);
                    r
                } else {
                    let mut buf = pool.lock().expect("pool lock").pop().unwrap_or_default();
                    buf.clear();
                    if (buf.capacity() as u64) < len {
                        let before = buf.capacity() as u64;
                        buf.reserve_exact(len as usize);
                        let grown = buf.capacity() as u64 - before;
                        let now = staged.fetch_add(grown, Ordering::Relaxed) + grown;
                        peak.fetch_max(now, Ordering::Relaxed);
                    }
                    let fetched = self.fetch(job, &g, |c| buf.extend_from_slice(&c)).await;
                    let r = fetched.and_then(|()| {
                        g_ops.iter().try_for_each(|op| {
                            let at = (op.file_offset - g.start) as usize;
                            job.accept_loaded(op, &buf[at..at + op.len as usize])
                        })
                    });
                    pool.lock().expect("pool lock").push(buf);
                    r
                };
                if r.is_ok() && !paused.swap(true, Ordering::Relaxed) {
                    crate::storage::s3::fault::pause("s3-restore-mid");
                }
                r
            }
        };
        let count = gets.len();
        let results = self.client.run(
            futures::stream::iter(gets.into_iter().map(one))
                .buffer_unordered(n)
                .try_collect::<Vec<()>>(),
        );
        results?;
        Ok(TransferStats {
            mode: format!("s3-ranged-get x{n} ({count} GETs)"),
            bytes: job.plan.bytes(),
            seconds: t.elapsed().as_secs_f64(),
            fallbacks: Vec::new(),
            peak_staging_bytes: peak.load(Ordering::Relaxed),
            checksum_cpu_seconds: job.checksum_seconds(),
            unverified: false,
        })
    }

    /// Streams bytes `g.start..g.end` of the object to `sink`, chunk by
    /// chunk as they arrive: exactly that many, or an error naming the
    /// object, the offset and the length.
    async fn fetch(
        &self,
        job: &TransferJob<'_>,
        g: &Get,
        mut sink: impl FnMut(Bytes),
    ) -> Result<()> {
        let key = &self.keys[g.file];
        let len = g.end - g.start;
        let range = g.start..g.end;
        let what = || format!("GET bytes {}-{}", range.start, range.end - 1);
        let opts = GetOptions::new().with_range(Some(GetRange::Bounded(range.clone())));
        let r = self
            .client
            .store()
            .get_opts(&ObjectPath::from(key.as_str()), opts)
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => Error::MissingShard {
                    path: job.plan.files[g.file].path.clone(),
                    offset: g.start,
                    length: len,
                },
                e => self.client.error(&what(), key, e),
            })?;
        let mut body = r.into_stream();
        let mut got = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk: Bytes = chunk.map_err(|e| self.client.error(&what(), key, e))?;
            got += chunk.len() as u64;
            if got > len {
                return Err(Error::ObjectStore {
                    context: format!("S3 {} {} failed", what(), self.client.url(key)),
                    message: format!("the server sent more than the {len} bytes asked for"),
                    hint: String::new(),
                });
            }
            sink(chunk);
        }
        if got < len {
            return Err(Error::Truncated {
                path: job.plan.files[g.file].path.clone(),
                offset: g.start,
                length: len,
                file_size: g.start + got,
            });
        }
        Ok(())
    }

    fn store(&self, job: &TransferJob<'_>) -> Result<TransferStats> {
        let t = Instant::now();
        let n = self.client.config().concurrency;
        let plan = job.plan;
        // Ops of each file, by offset.
        let mut by_file: Vec<Vec<IoOp>> = vec![Vec::new(); plan.files.len()];
        for op in &plan.ops {
            by_file[op.file].push(*op);
        }
        for ops in &mut by_file {
            ops.sort_by_key(|o| o.file_offset);
        }
        let mut parts: Vec<Part> = Vec::new();
        for (f, file) in plan.files.iter().enumerate() {
            let p = part_size(file.size, self.part_size);
            let count = file.size.div_ceil(p).max(1);
            for i in 0..count {
                let start = i * p;
                parts.push(Part {
                    n: parts.len(),
                    file: f,
                    idx: i as usize,
                    start,
                    end: (start + p).min(file.size),
                });
            }
        }
        let part_ids: Vec<Mutex<Vec<Option<object_store::multipart::PartId>>>> = plan
            .files
            .iter()
            .map(|f| {
                let count = f.size.div_ceil(part_size(f.size, self.part_size)).max(1);
                Mutex::new(vec![None; count as usize])
            })
            .collect();
        // Parts still to upload per object; the part that takes it to zero
        // completes the object.
        let remaining: Vec<AtomicUsize> = part_ids
            .iter()
            .map(|ids| AtomicUsize::new(ids.lock().expect("part ids").len()))
            .collect();
        let in_flight = AtomicU64::new(0);
        let peak = AtomicU64::new(0);
        let paused = std::sync::atomic::AtomicBool::new(false);
        // A part holds a permit from the start of its assembly to the end
        // of its upload: at most `n` parts are in host memory at once.
        let permits = Permits::new(n);
        let next = AtomicUsize::new(0);
        // Parts are assembled on threads of their own, not on the thread
        // that drives the uploads: assembling may block (a copy's source
        // is read with blocking GETs), and on that thread it stalled every
        // upload and let only one source read run at a time.
        let assemble_part = |part: &Part| -> Result<Bytes> {
            if job.cancelled() {
                return Err(Error::Cancelled);
            }
            let len = part.end - part.start;
            let now = in_flight.fetch_add(len, Ordering::Relaxed) + len;
            peak.fetch_max(now, Ordering::Relaxed);
            if crate::storage::s3::fault::fail_part(part.n) {
                return Err(Error::ObjectStore {
                    context: format!(
                        "S3 UploadPart {} {} failed",
                        part.idx + 1,
                        self.client.url(&self.keys[part.file])
                    ),
                    message: "injected failure (MEMFERRY_TEST_S3_FAIL_PART)".into(),
                    hint: String::new(),
                });
            }
            assemble(job, &by_file[part.file], part.start, part.end)
        };
        let upload = |(part, body): (Part, Result<Bytes>)| {
            let (part_ids, remaining) = (&part_ids, &remaining);
            let (in_flight, paused, permits) = (&in_flight, &paused, &permits);
            async move {
                let _permit = PermitGuard(permits);
                let _counted = Counted(in_flight, part.end - part.start);
                let f = part.file;
                let id = self
                    .client
                    .put_part_async(&self.keys[f], &self.uploads[f], part.idx, body?)
                    .await?;
                part_ids[f].lock().expect("part ids")[part.idx] = Some(id);
                if remaining[f].fetch_sub(1, Ordering::AcqRel) == 1 {
                    let ids: Vec<_> = part_ids[f]
                        .lock()
                        .expect("part ids")
                        .iter()
                        .map(|p| p.clone().expect("every part uploaded"))
                        .collect();
                    self.client
                        .complete_multipart_async(&self.keys[f], &self.uploads[f], ids)
                        .await?;
                }
                if !paused.swap(true, Ordering::Relaxed) {
                    crate::storage::s3::fault::pause("s3-save-mid");
                }
                Ok(())
            }
        };
        let assemblers = n.clamp(1, MAX_ASSEMBLERS).min(parts.len().max(1));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(Part, Result<Bytes>)>();
        let result =
            std::thread::scope(|sc| {
                for _ in 0..assemblers {
                    let tx = tx.clone();
                    let (parts, permits, next) = (&parts, &permits, &next);
                    let assemble_part = &assemble_part;
                    sc.spawn(move || {
                        while permits.acquire() {
                            let Some(part) = parts.get(next.fetch_add(1, Ordering::Relaxed)) else {
                                permits.release();
                                return;
                            };
                            let body = assemble_part(part);
                            let failed = body.is_err();
                            // The receiver is gone once the uploads failed.
                            if tx.send((*part, body)).is_err() || failed {
                                return;
                            }
                        }
                    });
                }
                drop(tx);
                let parts_in = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|x| (x, rx))
                });
                let r = self.client.run(
                    parts_in
                        .map(upload)
                        .buffer_unordered(n)
                        .try_collect::<Vec<()>>(),
                );
                // Wake and stop assemblers waiting for a permit (after a failure).
                permits.close();
                r
            });
        result?;
        Ok(TransferStats {
            mode: format!("s3-multipart x{n}"),
            bytes: plan.bytes(),
            seconds: t.elapsed().as_secs_f64(),
            fallbacks: Vec::new(),
            peak_staging_bytes: peak.load(Ordering::Relaxed),
            checksum_cpu_seconds: job.checksum_seconds(),
            unverified: false,
        })
    }
}

/// Threads assembling parts at most (more wait on permits anyway).
const MAX_ASSEMBLERS: usize = 8;

/// One part of one object: `start..end` of file `file`, part `idx` of it,
/// `n` over the whole save.
#[derive(Debug, Clone, Copy)]
struct Part {
    n: usize,
    file: usize,
    idx: usize,
    start: u64,
    end: u64,
}

/// A counting semaphore for threads, closable: once closed, waiters and
/// later callers get `false`.
struct Permits {
    state: Mutex<(usize, bool)>,
    freed: std::sync::Condvar,
}

impl Permits {
    fn new(n: usize) -> Self {
        Self {
            state: Mutex::new((n, false)),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Takes a permit, waiting for one; `false` once closed.
    fn acquire(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if s.1 {
                return false;
            }
            if s.0 > 0 {
                s.0 -= 1;
                return true;
            }
            s = self.freed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn release(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
        self.freed.notify_one();
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.freed.notify_all();
    }
}

/// Gives its permit back when dropped (an upload done, failed or dropped).
struct PermitGuard<'a>(&'a Permits);

impl Drop for PermitGuard<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Takes `.1` bytes off the staging count when dropped.
struct Counted<'a>(&'a AtomicU64, u64);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// One ranged GET: bytes `start..end` of file `file`, serving `ops[ops]`.
#[derive(Debug, Clone)]
struct Get {
    file: usize,
    start: u64,
    end: u64,
    ops: std::ops::Range<usize>,
}

/// The pieces of `chunks` (consecutive, from offset 0) that hold bytes
/// `start..start + len`.
fn slices(chunks: &[Bytes], start: u64, len: u64) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let (mut at, end) = (0u64, start + len);
    for c in chunks {
        let (c_start, c_end) = (at, at + c.len() as u64);
        at = c_end;
        if c_end <= start {
            continue;
        }
        if c_start >= end {
            break;
        }
        let from = start.max(c_start) - c_start;
        let to = end.min(c_end) - c_start;
        out.push(&c[from as usize..to as usize]);
    }
    out
}

/// Largest hole between two ops that one GET reads through (padding).
const MAX_GAP: u64 = 64 << 10;

/// Sorts the ops by file and offset and merges neighbours into GETs of at
/// most `request` bytes (plans split extents into ops, and allocations
/// end in padding, so a shard read op by op would mean many small GETs).
fn coalesce(plan_ops: &[IoOp], request: u64) -> (Vec<IoOp>, Vec<Get>) {
    let mut ops = plan_ops.to_vec();
    ops.sort_by_key(|o| (o.file, o.file_offset));
    let mut gets: Vec<Get> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let end = op.file_offset + op.len;
        match gets.last_mut() {
            Some(g)
                if g.file == op.file
                    && op.file_offset >= g.end
                    && op.file_offset - g.end <= MAX_GAP
                    && end - g.start <= request =>
            {
                g.end = end;
                g.ops.end = i + 1;
            }
            _ => gets.push(Get {
                file: op.file,
                start: op.file_offset,
                end,
                ops: i..i + 1,
            }),
        }
    }
    (ops, gets)
}

/// Builds the bytes `start..end` of a file from its ops (sorted by offset):
/// payload where ops lie, zeros elsewhere. An op cut by a part boundary is
/// fetched whole into a side buffer (so its checksums cover all of it) and
/// the overlapping piece copied.
fn assemble(job: &TransferJob<'_>, ops: &[IoOp], start: u64, end: u64) -> Result<Bytes> {
    let mut buf = vec![0u8; (end - start) as usize];
    let first = ops.partition_point(|o| o.file_offset + o.len <= start);
    for op in ops[first..].iter().take_while(|o| o.file_offset < end) {
        let (os, oe) = (op.file_offset, op.file_offset + op.len);
        if os >= start && oe <= end {
            job.fetch_for_store(op, &mut buf[(os - start) as usize..(oe - start) as usize])?;
            job.op_done(op);
        } else {
            let mut side = vec![0u8; op.len as usize];
            job.fetch_for_store(op, &mut side)?;
            let (s, e) = (os.max(start), oe.min(end));
            buf[(s - start) as usize..(e - start) as usize]
                .copy_from_slice(&side[(s - os) as usize..(e - os) as usize]);
            if os >= start {
                job.op_done(op);
            }
        }
    }
    Ok(Bytes::from(buf))
}

impl Backend for ObjectBackend<'_> {
    fn name(&self) -> &'static str {
        "s3"
    }

    fn run(&self, job: &TransferJob<'_>) -> Result<TransferStats> {
        job.validate()?;
        if self.keys.len() != job.plan.files.len() {
            return Err(Error::InvalidInput(
                "the S3 backend needs one object key per plan file".into(),
            ));
        }
        match job.plan.direction {
            Direction::Load => self.load(job),
            Direction::Store => {
                if self.uploads.len() != job.plan.files.len() {
                    return Err(Error::InvalidInput(
                        "the S3 backend needs one multipart upload per plan file".into(),
                    ));
                }
                self.store(job)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_ops_share_a_get() {
        let op = |file, file_offset, len| IoOp {
            file,
            file_offset,
            len,
            region: 0,
            mem_offset: 0,
            checksum_index: 0,
        };
        let ops = [
            op(0, 8192, 100),
            op(0, 0, 5000),
            op(1, 0, 4096),
            op(0, 9 << 20, 4096),
            op(0, 12288, 7 << 20),
        ];
        let (sorted, gets) = coalesce(&ops, 8 << 20);
        assert_eq!(sorted[0].file_offset, 0);
        let spans: Vec<(usize, u64, u64, usize)> = gets
            .iter()
            .map(|g| (g.file, g.start, g.end, g.ops.len()))
            .collect();
        // 0..5000, 8192..8292 and 12288.. merge (gaps < 64 KiB, within
        // 8 MiB); 9 MiB starts a new GET (gap too big); file 1 its own.
        assert_eq!(
            spans,
            vec![
                (0, 0, 12288 + (7 << 20), 3),
                (0, 9 << 20, (9 << 20) + 4096, 1),
                (1, 0, 4096, 1)
            ]
        );
    }

    #[test]
    fn slices_cut_chunks_at_any_offset() {
        let data: Vec<u8> = (0..100u8).collect();
        let chunks: Vec<Bytes> = [0..7, 7..40, 40..41, 41..100]
            .into_iter()
            .map(|r| Bytes::copy_from_slice(&data[r]))
            .collect();
        for (start, len) in [
            (0, 100),
            (5, 3),
            (7, 33),
            (39, 3),
            (40, 1),
            (99, 1),
            (10, 0),
        ] {
            let joined: Vec<u8> = slices(&chunks, start, len).concat();
            assert_eq!(joined, &data[start as usize..(start + len) as usize]);
        }
    }

    #[test]
    fn part_sizes_respect_s3_limits() {
        assert_eq!(part_size(1 << 20, 0), MIN_PART_SIZE);
        assert_eq!(part_size(100 << 30, 16 << 20), 16 << 20);
        let huge = 1u64 << 40; // 1 TiB
        let p = part_size(huge, 8 << 20);
        assert!(huge.div_ceil(p) <= MAX_PARTS);
        assert!(p.is_multiple_of(1 << 20));
    }
}
