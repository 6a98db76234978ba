//! Raw loops that define the limits a backend is compared with. They move
//! bytes and nothing else: no checksums, no copies, buffers reused.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::IoContext;
use crate::memory::AlignedBuf;
use crate::storage::durable::preallocate;
use crate::transfer::uring::{Io, Ring};
use crate::units::gib_per_s;
use crate::{Error, Result};

/// A file of the bench snapshot and the root it lives on.
#[derive(Debug, Clone)]
pub struct RootFile {
    /// Path.
    pub path: PathBuf,
    /// Root index.
    pub root: usize,
    /// Size in bytes (a multiple of 4096).
    pub size: u64,
}

/// Drops the page cache (needs root). `Err` says why it could not.
pub fn drop_page_cache() -> std::result::Result<(), String> {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n")
        .map_err(|e| format!("cannot drop the page cache ({e}); run as root for cold figures"))
}

/// Runs `f` once per root in parallel on that root's files; returns GiB/s
/// for all bytes over the wall time.
fn per_root<F>(files: &[RootFile], f: F) -> Result<f64>
where
    F: Fn(&[&RootFile]) -> Result<u64> + Sync,
{
    let roots = files.iter().map(|f| f.root + 1).max().unwrap_or(0);
    let groups: Vec<Vec<&RootFile>> = (0..roots)
        .map(|r| files.iter().filter(|f| f.root == r).collect())
        .collect();
    let start = Instant::now();
    let results: Vec<Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter()
            .filter(|g| !g.is_empty())
            .map(|g| s.spawn(|| f(g)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("limit loop panicked"))
            .collect()
    });
    let mut bytes = 0;
    for r in results {
        bytes += r?;
    }
    Ok(gib_per_s(bytes, start.elapsed().as_secs_f64()))
}

fn open_direct(path: &Path, write: bool) -> Result<File> {
    let mut oo = OpenOptions::new();
    if write {
        oo.write(true).create(true).truncate(true);
    } else {
        oo.read(true);
    }
    oo.custom_flags(libc::O_DIRECT).open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::EINVAL) {
            Error::Unsupported(format!(
                "the filesystem holding {} refuses O_DIRECT",
                path.display()
            ))
        } else {
            Error::io(format!("opening {}", path.display()), e)
        }
    })
}

/// Why a raw request loop stopped.
enum RawError {
    /// A request failed; nothing is in flight any more.
    Io(Error),
    /// Waiting on the ring failed: requests may still be in flight, so the
    /// buffer was leaked and the caller must leak the file too.
    Wait(Error),
}

/// A ring with `qd` slots of `bs` bytes, reused for every file of a loop.
struct RawRing {
    ring: Ring,
    /// `None` once leaked after a failed wait.
    buf: Option<AlignedBuf>,
    bs: usize,
    qd: usize,
}

impl RawRing {
    /// A ring and its buffer, filled with `fill` when given (write loops).
    fn new(bs: usize, qd: usize, fill: Option<u8>) -> Result<Self> {
        let ring = Ring::new(qd as u32).ctx(|| "io_uring setup".into())?;
        let mut buf = AlignedBuf::new(bs * qd)?;
        if let Some(byte) = fill {
            buf.as_mut_slice().fill(byte);
        }
        Ok(Self {
            ring,
            buf: Some(buf),
            bs,
            qd,
        })
    }

    /// Runs `requests` (offset, length up to `bs`) against `file` with up to
    /// `qd` in flight; resumes short transfers. Returns the bytes moved.
    fn run(
        &mut self,
        file: &File,
        path: &Path,
        mut requests: impl Iterator<Item = (u64, u64)>,
        write: bool,
    ) -> std::result::Result<u64, RawError> {
        let (bs, qd) = (self.bs, self.qd);
        let base = self.buf.as_mut().expect("not leaked").as_mut_ptr();
        let fd = file.as_fd();
        let ring = &mut self.ring;
        let io = if write { Io::Write } else { Io::Read };
        // (offset, len, done) per slot
        let mut slots: Vec<Option<(u64, u64, u64)>> = vec![None; qd];
        let mut in_flight = 0;
        let mut total = 0u64;
        let mut error = None;
        loop {
            for (i, slot) in slots.iter_mut().enumerate() {
                if slot.is_some() || error.is_some() {
                    continue;
                }
                let Some((off, len)) = requests.next() else {
                    break;
                };
                *slot = Some((off, len, 0));
                // SAFETY: slot `i` of the buffer is idle until its completion
                // arrives; the buffer is owned by `self` and the file by the
                // caller, and both stay alive until every request has drained
                // (or are leaked when waiting fails).
                unsafe {
                    let ptr = base.add(i * bs);
                    ring.push_io(io, fd, ptr, len as u32, off, None, i as u64);
                }
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            if let Err(e) = ring.submit_and_wait(1) {
                // Requests may still be in flight: never free their buffer.
                std::mem::forget(self.buf.take());
                return Err(RawError::Wait(Error::io("io_uring wait", e)));
            }
            for (ud, res) in ring.completions() {
                in_flight -= 1;
                let i = ud as usize;
                let (off, len, done) = slots[i].expect("in flight");
                if res <= 0 {
                    error.get_or_insert_with(|| {
                        Error::io(
                            format!("raw I/O on {} at {}", path.display(), off + done),
                            if res == 0 {
                                std::io::ErrorKind::UnexpectedEof.into()
                            } else {
                                std::io::Error::from_raw_os_error(-res)
                            },
                        )
                    });
                    slots[i] = None;
                    continue;
                }
                let done = done + res as u64;
                if done < len && error.is_none() {
                    slots[i] = Some((off, len, done));
                    // SAFETY: as above; the remainder stays inside slot `i`.
                    unsafe {
                        let ptr = base.add(i * bs + done as usize);
                        let rest = (len - done) as u32;
                        ring.push_io(io, fd, ptr, rest, off + done, None, i as u64);
                    }
                    in_flight += 1;
                } else {
                    slots[i] = None;
                    total += len;
                }
            }
        }
        match error {
            Some(e) => Err(RawError::Io(e)),
            None => Ok(total),
        }
    }
}

/// Sequential O_DIRECT I/O through io_uring with `qd` requests of `bs` bytes
/// in flight per root, over `files` in order (reads), or into scratch files
/// of the same sizes followed by fsync (writes).
fn uring_loop(group: &[&RootFile], bs: usize, qd: usize, write: bool) -> Result<u64> {
    let mut raw = RawRing::new(bs, qd, write.then_some(0xa5))?;
    let mut total = 0u64;
    for f in group {
        let file = open_direct(&f.path, write)?;
        if write {
            preallocate(&file, &f.path, f.size)?;
        }
        let requests = (0..f.size)
            .step_by(bs)
            .map(|off| (off, (f.size - off).min(bs as u64)));
        match raw.run(&file, &f.path, requests, write) {
            Ok(n) => total += n,
            Err(RawError::Io(e)) => return Err(e),
            Err(RawError::Wait(e)) => {
                std::mem::forget(file);
                return Err(e);
            }
        }
        if write {
            file.sync_all()
                .ctx(|| format!("syncing {}", f.path.display()))?;
        }
    }
    Ok(total)
}

/// O_DIRECT sequential read at queue depth `qd`, `bs` per request.
pub fn odirect_read(files: &[RootFile], bs: usize, qd: usize) -> Result<f64> {
    per_root(files, |g| uring_loop(g, bs, qd, false))
}

/// O_DIRECT sequential write of files as large as `files` into scratch
/// files on the same disks (removed afterwards), fsync included.
pub fn odirect_write(files: &[RootFile], bs: usize, qd: usize) -> Result<f64> {
    let scratch: Vec<RootFile> = files
        .iter()
        .enumerate()
        .map(|(i, f)| RootFile {
            // Next to the snapshot (or the root's shard directory), never
            // inside a snapshot: same disk, no foreign files in it.
            path: f
                .path
                .parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("."))
                .join(format!(
                    ".memferry-bench-write-{}-{i}.tmp",
                    std::process::id()
                )),
            root: f.root,
            size: f.size,
        })
        .collect();
    let r = per_root(&scratch, |g| uring_loop(g, bs, qd, true));
    for f in &scratch {
        let _ = std::fs::remove_file(&f.path);
    }
    r
}

/// O_DIRECT pread, one request at a time per root.
pub fn pread_direct(files: &[RootFile], bs: usize) -> Result<f64> {
    per_root(files, |g| {
        let mut buf = AlignedBuf::new(bs)?;
        let mut total = 0;
        for f in g {
            let file = open_direct(&f.path, false)?;
            total += read_all(&file, &f.path, buf.as_mut_slice())?;
        }
        Ok(total)
    })
}

/// Buffered read of files already in the page cache (read once first).
pub fn buffered_read(files: &[RootFile], bs: usize, warm_first: bool) -> Result<f64> {
    let pass = |g: &[&RootFile]| -> Result<u64> {
        let mut buf = vec![0u8; bs];
        let mut total = 0;
        for f in g {
            let file = File::open(&f.path).ctx(|| format!("opening {}", f.path.display()))?;
            total += read_all(&file, &f.path, &mut buf)?;
        }
        Ok(total)
    };
    if warm_first {
        per_root(files, pass)?;
    }
    per_root(files, pass)
}

fn read_all(file: &File, path: &Path, buf: &mut [u8]) -> Result<u64> {
    let mut off = 0u64;
    loop {
        let n = rustix::io::pread(file.as_fd(), &mut *buf, off)
            .ctx(|| format!("reading {} at {off}", path.display()))?;
        if n == 0 {
            return Ok(off);
        }
        off += n as u64;
    }
}

/// Copy bandwidth between pinned host memory and device `ordinal`, one
/// asynchronous copy of `bytes` timed to completion (after one warm-up).
pub fn pinned_copy(ordinal: u32, bytes: usize, to_device: bool) -> Result<f64> {
    use crate::memory::cuda::{Stream, context};
    use crate::memory::{CudaRegion, PinnedBuf, Region};
    let host = PinnedBuf::new(ordinal, bytes)?;
    let dev = CudaRegion::new(ordinal, bytes as u64)?;
    let (_, dptr) = dev.cuda().expect("device memory");
    let stream = Stream::new(context(ordinal)?)?;
    let copy = || -> Result<()> {
        // SAFETY: both buffers are owned here and outlive the copy, which
        // is awaited by `synchronize` before they are used again.
        unsafe {
            if to_device {
                stream.copy_htod(dptr, host.as_mut_ptr(), bytes)?;
            } else {
                stream.copy_dtoh(host.as_mut_ptr(), dptr, bytes)?;
            }
        }
        stream.synchronize()
    };
    copy()?;
    let start = Instant::now();
    copy()?;
    Ok(gib_per_s(bytes as u64, start.elapsed().as_secs_f64()))
}

/// Single-threaded memcpy bandwidth between two pre-faulted buffers.
pub fn memcpy(bytes: usize) -> Result<f64> {
    let mut src = AlignedBuf::new(bytes)?;
    let mut dst = AlignedBuf::new(bytes)?;
    src.as_mut_slice().fill(1);
    dst.as_mut_slice().fill(2);
    let start = Instant::now();
    dst.as_mut_slice().copy_from_slice(src.as_slice());
    let secs = start.elapsed().as_secs_f64();
    std::hint::black_box(dst.as_slice()[bytes / 2]);
    Ok(gib_per_s(bytes as u64, secs))
}

/// O_DIRECT random I/O through io_uring: `blocks` requests of `bs` bytes at
/// every `bs`-aligned offset of `path` in a shuffled order, `qd` in flight.
/// Writes create (and preallocate) the file without fsync, as KV stores do;
/// reads need the file written first. Returns GiB/s.
pub fn odirect_random(path: &Path, bs: usize, qd: usize, blocks: u64, write: bool) -> Result<f64> {
    let mut raw = RawRing::new(bs, qd, Some(0x5a))?;
    let file = open_direct(path, write)?;
    if write {
        preallocate(&file, path, blocks * bs as u64)?;
    }
    let requests = shuffled(blocks)
        .into_iter()
        .map(|b| (b * bs as u64, bs as u64));
    let start = Instant::now();
    match raw.run(&file, path, requests, write) {
        Ok(total) => Ok(gib_per_s(total, start.elapsed().as_secs_f64())),
        Err(RawError::Io(e)) => Err(e),
        Err(RawError::Wait(e)) => {
            std::mem::forget(file);
            Err(e)
        }
    }
}

/// `0..n` in a fixed pseudo-random order (Fisher-Yates, xorshift).
fn shuffled(n: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}
