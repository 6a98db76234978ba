//! `gds`: GPUDirect Storage through NVIDIA cuFile.
//!
//! cuFile moves bytes between files and device memory without staging them
//! in memferry's host buffers. Two modes, as in llm-d:
//! - direct (default): each device region is registered once with
//!   `cuFileBufRegister`, so cuFile can DMA straight into it;
//! - bounce (`--gds-bounce`): regions are not registered and cuFile uses
//!   its own internal bounce buffers.
//!
//! Each of them may serve loads only, stores only, or both (`--gds
//! read|write|both`); the other direction runs `pinned`.
//! `libcufile` is loaded at run time (`dlopen`): `$MEMFERRY_CUFILE`, then
//! `libcufile.so.0` / `libcufile.so` on the library path, then the copy the
//! `nvidia-cufile` Python wheel ships in `site-packages/nvidia/cufile/lib`.
//! Whether cuFile can move bytes peer-to-peer (nvidia-fs or NVMe P2PDMA
//! reported by the driver) or runs in compatibility mode (through host
//! memory inside cuFile) is reported as the mode `cufile-p2p` or
//! `cufile-compat`.
//!
//! Integrity: bytes read by cuFile never pass through host memory, so loads
//! are **not** verified in-line: the report says `verified: false` and
//! `memferry verify` checks the snapshot. Stores still record the checksum
//! of exactly the bytes written, computed from a device-to-host copy into a
//! small pinned buffer per worker.
//!
//! Ordering: before its first I/O a job waits for the work queued on the
//! legacy default stream of every device it touches (cuFile moves bytes
//! outside any stream); writers on the caller's non-blocking streams must
//! have finished before the job starts.
//!
//! Without cuFile, without CUDA, when a region is host memory, or when the
//! filesystem refuses O_DIRECT, the job runs `pinned` and the report says
//! why. Every file handle and device buffer registered with cuFile is
//! deregistered before the job returns, on error paths too.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fs::File;
use std::path::PathBuf;
use std::time::Instant;

use super::job::TransferJob;
use super::pinned::PinnedBackend;
use super::plan::Direction;
use super::request::{ended_early, io_error};
use super::threads::run_pool;
use super::{Backend, TransferStats, Tuning};
use crate::memory::PinnedBuf;
use crate::{Error, Result};

/// Which directions use cuFile, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GdsMode {
    /// Loads (restore, verify) go through cuFile.
    pub read: bool,
    /// Stores (save) go through cuFile.
    pub write: bool,
    /// Leave device buffers unregistered: cuFile bounces through its own
    /// buffers.
    pub bounce: bool,
}

impl Default for GdsMode {
    fn default() -> Self {
        Self {
            read: true,
            write: true,
            bounce: false,
        }
    }
}

impl GdsMode {
    /// Parses `read`, `write` or `both` (the `--gds` flag).
    pub fn parse_directions(s: &str, bounce: bool) -> Result<Self> {
        let (read, write) = match s.trim().to_ascii_lowercase().as_str() {
            "read" | "read_only" | "r" => (true, false),
            "write" | "write_only" | "w" => (false, true),
            "both" | "read_write" | "rw" => (true, true),
            other => {
                return Err(Error::InvalidInput(format!(
                    "unknown --gds {other:?}: choose read, write or both"
                )));
            }
        };
        Ok(Self {
            read,
            write,
            bounce,
        })
    }
}

/// The GPUDirect Storage backend.
pub struct GdsBackend {
    tuning: Tuning,
}

impl GdsBackend {
    /// A gds backend with these settings (`tuning.gds` selects the mode).
    pub fn new(tuning: Tuning) -> Self {
        Self { tuning }
    }

    fn fallback(&self, job: &TransferJob<'_>, reason: String) -> Result<TransferStats> {
        tracing::warn!("{reason}");
        let mut stats = PinnedBackend::new(self.tuning.clone()).run(job)?;
        stats.fallbacks.insert(0, reason);
        Ok(stats)
    }
}

impl Backend for GdsBackend {
    fn name(&self) -> &'static str {
        "gds"
    }

    fn run(&self, job: &TransferJob<'_>) -> Result<TransferStats> {
        job.validate()?;
        let mode = self.tuning.gds;
        let (enabled, dir) = match job.plan.direction {
            Direction::Load => (mode.read, "loads"),
            Direction::Store => (mode.write, "stores"),
        };
        if !enabled {
            return self.fallback(
                job,
                format!("gds: cuFile is not enabled for {dir} (--gds), ran pinned"),
            );
        }
        if let Some(op) = job
            .plan
            .ops
            .iter()
            .find(|op| job.regions[op.region].cuda().is_none())
        {
            return self.fallback(
                job,
                format!(
                    "gds: cuFile needs CUDA device memory but region {} is {} memory, ran pinned",
                    op.region,
                    job.regions[op.region].device()
                ),
            );
        }
        let lib = match CuFile::get() {
            Ok(lib) => lib,
            Err(reason) => return self.fallback(job, format!("gds: {reason}; ran pinned")),
        };
        match run_cufile(lib, job, &self.tuning)? {
            Ok(stats) => Ok(stats),
            Err(reason) => self.fallback(
                job,
                format!("gds: {reason}, and cuFile needs O_DIRECT; ran pinned"),
            ),
        }
    }
}

/// Runs the whole job through cuFile. `Ok(Err(reason))`: the filesystem
/// refuses O_DIRECT, which cuFile needs; nothing was registered or moved.
fn run_cufile(
    lib: &CuFile,
    job: &TransferJob<'_>,
    tuning: &Tuning,
) -> Result<std::result::Result<TransferStats, String>> {
    let start = Instant::now();
    let plan = job.plan;
    let bounce = tuning.gds.bounce;
    // Open every file first, so a filesystem that refuses O_DIRECT sends
    // the job to `pinned` before cuFile holds anything.
    let all: Vec<usize> = (0..plan.ops.len()).collect();
    let opened = match super::direct::open_direct(job, &all)? {
        Ok(files) => files,
        Err(reason) => return Ok(Err(reason)),
    };
    let mut used: Vec<usize> = plan.ops.iter().map(|o| o.region).collect();
    used.sort_unstable();
    used.dedup();
    let device = |r: usize| job.regions[r].cuda().expect("checked by the caller");
    // cuFile reads and writes device memory outside any stream: first let
    // the work queued on the devices' legacy streams finish (the caller's
    // last kernel on a blocking stream, memferry's own copies).
    crate::memory::cuda::synchronize_regions(used.iter().map(|&r| job.regions[r]))?;
    // Declared before `files`, so dropped after them: every path out of
    // here deregisters the handles, then the buffers.
    let mut buffers: Vec<RegisteredBuf<'_>> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    if !bounce {
        // Register each device region once (direct mode).
        for &r in &used {
            let (ctx, base) = device(r);
            let _current = ctx.enter()?;
            // SAFETY: `base..base+len` is the region's device memory, which
            // outlives the job; `RegisteredBuf` deregisters it before this
            // function returns.
            match unsafe { lib.buf_register(base, job.regions[r].len() as usize) } {
                Ok(()) => buffers.push(RegisteredBuf { lib, ctx, base }),
                Err(e) => {
                    let line = format!(
                        "gds: cuFileBufRegister failed ({e}), cuFile bounces through its own buffers"
                    );
                    if !notes.contains(&line) {
                        notes.push(line);
                    }
                }
            }
        }
    }
    // Register every file; each deregisters on drop, before its fd closes.
    let mut files: Vec<Option<RegisteredFile<'_>>> = (0..plan.files.len()).map(|_| None).collect();
    if let Some(op) = plan.ops.first() {
        let _current = device(op.region).0.enter()?;
        for (f, file) in opened.into_iter().enumerate() {
            let Some(file) = file else { continue };
            let handle = lib.handle_register(&file).map_err(|e| {
                Error::io(
                    format!(
                        "gds: registering {} with cuFile",
                        plan.files[f].path.display()
                    ),
                    std::io::Error::other(e),
                )
            })?;
            files[f] = Some(RegisteredFile {
                lib,
                handle,
                _file: file,
            });
        }
    }
    run_ops(lib, job, tuning, &files)?;
    // The workers have returned: no cuFile I/O is in flight.
    drop(files);
    drop(buffers);
    job.settle_devices()?;
    let mut stats = TransferStats {
        mode: format!(
            "cufile-{}{}",
            if lib.p2p { "p2p" } else { "compat" },
            if bounce || !notes.is_empty() {
                "-bounce"
            } else {
                ""
            }
        ),
        bytes: plan.bytes(),
        seconds: start.elapsed().as_secs_f64(),
        fallbacks: notes,
        peak_staging_bytes: 0,
        checksum_cpu_seconds: job.checksum_seconds(),
        unverified: false,
    };
    if !lib.p2p {
        stats.fallbacks.push(format!(
            "gds: cuFile ran in compatibility mode ({}): bytes went through cuFile's host buffers",
            lib.why_compat
        ));
    }
    match job.checksums {
        super::Checksums::Verify(_) if plan.direction == Direction::Load => {
            stats.unverified = true;
            stats.fallbacks.push(
                "gds: loaded bytes bypass host memory and were NOT verified in-line; run `memferry verify` to check the snapshot".into(),
            );
        }
        super::Checksums::Record(_) => {
            // Each worker's scratch holds the largest op ([`run_ops`]).
            let largest = plan.ops.iter().map(|o| o.len).max().unwrap_or(0);
            stats.peak_staging_bytes = (tuning.workers.min(plan.ops.len()).max(1) as u64) * largest;
            stats
                .fallbacks
                .push("gds: checksums of stored bytes computed from a device-to-host copy".into());
        }
        _ => {}
    }
    Ok(Ok(stats))
}

/// A file opened with O_DIRECT and registered with cuFile; dropping it
/// deregisters the handle, then closes the file.
struct RegisteredFile<'a> {
    lib: &'a CuFile,
    handle: Handle,
    /// Never read: held so the fd stays open while the handle is
    /// registered (fields drop after `drop` has deregistered it).
    _file: File,
}

impl Drop for RegisteredFile<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle was registered for `self._file`, which is
        // still open (fields drop after this), and is deregistered once;
        // owners drop it only when no cuFile I/O on it is in flight.
        unsafe { self.lib.handle_deregister(self.handle) };
    }
}

/// Device memory registered with `cuFileBufRegister`; dropping it
/// deregisters the buffer with its context current.
struct RegisteredBuf<'a> {
    lib: &'a CuFile,
    ctx: &'a crate::memory::cuda::Context,
    base: u64,
}

impl Drop for RegisteredBuf<'_> {
    fn drop(&mut self) {
        // Deregister even if the context cannot be entered: cuFile then
        // reports an error, which changes nothing for us.
        let _current = self.ctx.enter();
        // SAFETY: `base` was registered and is deregistered once; owners
        // drop it only when no cuFile I/O on it is in flight.
        unsafe { self.lib.buf_deregister(self.base) };
    }
}

/// Moves every op with `tuning.workers` threads, each making its device's
/// context current before every call.
fn run_ops(
    lib: &CuFile,
    job: &TransferJob<'_>,
    tuning: &Tuning,
    files: &[Option<RegisteredFile<'_>>],
) -> Result<()> {
    let plan = job.plan;
    let largest = plan.ops.iter().map(|o| o.len).max().unwrap_or(0) as usize;
    run_pool(
        job,
        tuning.workers,
        plan.ops.len(),
        |scratch: &mut Option<PinnedBuf>, i| {
            let op = &plan.ops[i];
            let handle = files[op.file].as_ref().expect("registered above").handle;
            let region = job.regions[op.region];
            let (ctx, base) = region.cuda().expect("checked by the caller");
            let path = &plan.files[op.file].path;
            let _current = ctx.enter()?;
            if plan.direction == Direction::Store
                && matches!(job.checksums, super::Checksums::Record(_))
            {
                if scratch.is_none() {
                    *scratch = Some(PinnedBuf::new(ctx.ordinal(), largest)?);
                }
                let buf = scratch.as_ref().expect("allocated above");
                // SAFETY: the scratch buffer is this worker's and
                // holds `largest >= op.len` bytes.
                let bytes =
                    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), op.len as usize) };
                // SAFETY: nobody writes sources during a store.
                unsafe { region.copy_out(op.mem_offset, bytes)? };
                job.record_stored(op, bytes);
            }
            let mut done = 0u64;
            while done < op.len {
                // SAFETY: the file handle and the device range
                // (validated against the region) stay valid for
                // the synchronous call; plans never overlap.
                let n = unsafe {
                    lib.io(
                        plan.direction,
                        handle,
                        base,
                        (op.len - done) as usize,
                        op.file_offset + done,
                        op.mem_offset + done,
                    )
                };
                match n {
                    Ok(0) => {
                        let file_size = std::fs::metadata(path).map_or(0, |m| m.len());
                        let write = format!("writing {} with cuFile", path.display());
                        return Err(ended_early(plan, op, file_size, write));
                    }
                    Ok(n) => done += n as u64,
                    Err(e) => return Err(io_error(plan, op, "cuFile ", done, op.len - done, e)),
                }
            }
            job.op_done(op);
            Ok(())
        },
    )
}

/// A registered cuFile file handle.
#[derive(Clone, Copy)]
struct Handle(usize);

/// `CUfileError_t`: the cuFile status and, for CUDA failures, the driver's.
#[repr(C)]
#[derive(Clone, Copy)]
struct CuFileError {
    err: c_int,
    cu_err: c_int,
}

/// `CUfileDescr_t` for an opaque file descriptor.
#[repr(C)]
struct CuFileDescr {
    kind: c_int,
    handle: usize,
    fs_ops: *const c_void,
}

/// `CU_FILE_HANDLE_TYPE_OPAQUE_FD`.
const HANDLE_TYPE_OPAQUE_FD: c_int = 1;
/// `CU_FILE_DRIVER_ALREADY_OPEN`.
const DRIVER_ALREADY_OPEN: c_int = 5026;
/// Bit of `dstatusflags` for NVMe P2PDMA support (CUDA 12.8+).
const NVME_P2P_SUPPORTED: u32 = 1 << 11;

type FnDriverOpen = unsafe extern "C" fn() -> CuFileError;
type FnHandleRegister = unsafe extern "C" fn(*mut usize, *mut CuFileDescr) -> CuFileError;
type FnHandleDeregister = unsafe extern "C" fn(usize);
type FnBufRegister = unsafe extern "C" fn(*const c_void, usize, c_int) -> CuFileError;
type FnBufDeregister = unsafe extern "C" fn(*const c_void) -> CuFileError;
type FnRead = unsafe extern "C" fn(usize, *mut c_void, usize, i64, i64) -> isize;
type FnWrite = unsafe extern "C" fn(usize, *const c_void, usize, i64, i64) -> isize;
type FnGetProperties = unsafe extern "C" fn(*mut c_void) -> CuFileError;

/// The few cuFile entry points memferry uses, resolved with `dlsym`.
pub struct CuFile {
    /// Where the library was loaded from.
    pub path: String,
    /// True when the driver reports peer-to-peer support (nvidia-fs or
    /// NVMe P2PDMA) and compatibility mode is not forced.
    pub p2p: bool,
    why_compat: String,
    handle_register: FnHandleRegister,
    handle_deregister: FnHandleDeregister,
    buf_register: FnBufRegister,
    buf_deregister: FnBufDeregister,
    read: FnRead,
    write: FnWrite,
}

impl CuFile {
    /// The process-wide cuFile, loaded and opened on first use (needs a
    /// CUDA driver). The error says what was searched.
    pub fn get() -> std::result::Result<&'static CuFile, String> {
        static LIB: std::sync::OnceLock<std::result::Result<CuFile, String>> =
            std::sync::OnceLock::new();
        LIB.get_or_init(|| {
            if let Err(e) = crate::memory::cuda::driver() {
                return Err(format!("cuFile needs CUDA: {e}"));
            }
            let ctx = crate::memory::cuda::context(0).map_err(|e| e.to_string())?;
            let _current = ctx.enter().map_err(|e| e.to_string())?;
            CuFile::load(&library_candidates())
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    /// Loads the first of `candidates` that `dlopen` accepts, that has
    /// every cuFile symbol memferry uses and whose `cuFileDriverOpen`
    /// succeeds; a candidate failing any of these is skipped and named in
    /// the error if none succeeds.
    pub fn load(candidates: &[PathBuf]) -> std::result::Result<CuFile, String> {
        let mut tried = Vec::new();
        for c in candidates {
            let Ok(name) = CString::new(c.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: a NUL-terminated name; loading runs the library's
            // initialisers, which is what loading cuFile requires.
            let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if h.is_null() {
                tried.push(format!("{} ({})", c.display(), dl_error()));
                continue;
            }
            // Handles are never closed: the one used keeps cuFile loaded
            // for the process, like the CUDA driver, and a refused one may
            // have run initialisers (cuFile's start threads) that closing
            // would pull the code out from under.
            match Self::resolve(h, c.display().to_string()) {
                Ok(lib) => return Ok(lib),
                Err(why) => tried.push(format!("{} ({why})", c.display())),
            }
        }
        Err(format!(
            "cuFile is not available: no usable libcufile could be loaded (tried {}); install the nvidia-cufile wheel or the CUDA toolkit, or set MEMFERRY_CUFILE",
            if tried.is_empty() {
                "nothing".into()
            } else {
                tried.join(", ")
            }
        ))
    }

    fn resolve(h: *mut c_void, path: String) -> std::result::Result<CuFile, String> {
        let sym = |name: &str| -> std::result::Result<*mut c_void, String> {
            let c = CString::new(name).expect("symbol names have no NUL");
            // SAFETY: `h` is a live handle from dlopen; the name is valid.
            let p = unsafe { libc::dlsym(h, c.as_ptr()) };
            if p.is_null() {
                Err(format!("lacks {name}: not a usable libcufile"))
            } else {
                Ok(p)
            }
        };
        // SAFETY (all transmutes below): each symbol is the cuFile function
        // of that name, whose C signature the function-pointer type mirrors
        // (cufile.h: handles are pointers, offsets are off_t = i64).
        let driver_open: FnDriverOpen =
            unsafe { std::mem::transmute::<*mut c_void, FnDriverOpen>(sym("cuFileDriverOpen")?) };
        let lib = CuFile {
            path: path.clone(),
            p2p: false,
            why_compat: String::new(),
            // SAFETY: as above.
            handle_register: unsafe {
                std::mem::transmute::<*mut c_void, FnHandleRegister>(sym("cuFileHandleRegister")?)
            },
            // SAFETY: as above.
            handle_deregister: unsafe {
                std::mem::transmute::<*mut c_void, FnHandleDeregister>(sym(
                    "cuFileHandleDeregister",
                )?)
            },
            // SAFETY: as above.
            buf_register: unsafe {
                std::mem::transmute::<*mut c_void, FnBufRegister>(sym("cuFileBufRegister")?)
            },
            // SAFETY: as above.
            buf_deregister: unsafe {
                std::mem::transmute::<*mut c_void, FnBufDeregister>(sym("cuFileBufDeregister")?)
            },
            // SAFETY: as above.
            read: unsafe { std::mem::transmute::<*mut c_void, FnRead>(sym("cuFileRead")?) },
            // SAFETY: as above.
            write: unsafe { std::mem::transmute::<*mut c_void, FnWrite>(sym("cuFileWrite")?) },
        };
        // SAFETY: no arguments; the caller made a CUDA context current.
        let e = unsafe { driver_open() };
        if e.err != 0 && e.err != DRIVER_ALREADY_OPEN {
            return Err(format!("cuFileDriverOpen failed: {}", describe(e)));
        }
        let (p2p, why_compat) = match sym("cuFileDriverGetProperties") {
            Ok(p) => {
                // SAFETY: as above.
                let get = unsafe { std::mem::transmute::<*mut c_void, FnGetProperties>(p) };
                // Room for any version of CUfileDrvProps_t; only the leading
                // `nvfs` block (stable since CUDA 11.4) is read.
                let mut props = [0u64; 64];
                // SAFETY: the buffer is larger than the structure.
                let e = unsafe { get(props.as_mut_ptr().cast()) };
                // nvfs: u32 major, u32 minor, usize poll_thresh_size,
                // usize max_direct_io_size, u32 dstatusflags, ...
                let major = (props[0] & 0xffff_ffff) as u32;
                let dstatus = (props[3] & 0xffff_ffff) as u32;
                let forced = std::env::var("CUFILE_FORCE_COMPAT_MODE")
                    .is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
                if e.err != 0 {
                    (
                        false,
                        format!("cuFileDriverGetProperties failed: {}", describe(e)),
                    )
                } else if forced {
                    (false, "CUFILE_FORCE_COMPAT_MODE is set".into())
                } else if major > 0 || dstatus & NVME_P2P_SUPPORTED != 0 {
                    (true, String::new())
                } else {
                    (
                        false,
                        "the nvidia-fs kernel driver is not loaded and no NVMe P2PDMA support is reported".into(),
                    )
                }
            }
            Err(e) => (false, e),
        };
        Ok(CuFile {
            p2p,
            why_compat,
            ..lib
        })
    }

    fn handle_register(&self, file: &File) -> std::result::Result<Handle, String> {
        use std::os::fd::AsRawFd;
        let mut descr = CuFileDescr {
            kind: HANDLE_TYPE_OPAQUE_FD,
            handle: file.as_raw_fd() as u32 as usize,
            fs_ops: std::ptr::null(),
        };
        let mut h = 0usize;
        // SAFETY: out-pointer to a local and a descriptor whose fd stays
        // open until the handle is deregistered.
        let e = unsafe { (self.handle_register)(&mut h, &mut descr) };
        if e.err != 0 {
            return Err(describe(e));
        }
        Ok(Handle(h))
    }

    /// # Safety
    /// `h` is registered and has no I/O in flight.
    unsafe fn handle_deregister(&self, h: Handle) {
        // SAFETY: forwarded to the caller.
        unsafe { (self.handle_deregister)(h.0) }
    }

    /// # Safety
    /// `base..base+len` is device memory that stays allocated until
    /// `buf_deregister`.
    unsafe fn buf_register(&self, base: u64, len: usize) -> std::result::Result<(), String> {
        // SAFETY: forwarded to the caller.
        let e = unsafe { (self.buf_register)(base as *const c_void, len, 0) };
        if e.err != 0 {
            return Err(describe(e));
        }
        Ok(())
    }

    /// # Safety
    /// `base` was registered and has no I/O in flight.
    unsafe fn buf_deregister(&self, base: u64) {
        // SAFETY: forwarded to the caller.
        let _ = unsafe { (self.buf_deregister)(base as *const c_void) };
    }

    /// One synchronous cuFile read or write of `len` bytes between the file
    /// at `file_offset` and device memory at `base + mem_offset`.
    ///
    /// # Safety
    /// The handle is registered, the device range is valid, and nobody else
    /// touches it during the call.
    unsafe fn io(
        &self,
        dir: Direction,
        h: Handle,
        base: u64,
        len: usize,
        file_offset: u64,
        mem_offset: u64,
    ) -> std::io::Result<usize> {
        // SAFETY: forwarded to the caller.
        let n = unsafe {
            match dir {
                Direction::Load => (self.read)(
                    h.0,
                    base as *mut c_void,
                    len,
                    file_offset as i64,
                    mem_offset as i64,
                ),
                Direction::Store => (self.write)(
                    h.0,
                    base as *const c_void,
                    len,
                    file_offset as i64,
                    mem_offset as i64,
                ),
            }
        };
        match n {
            n if n >= 0 => Ok(n as usize),
            -1 => Err(std::io::Error::last_os_error()),
            n => Err(std::io::Error::other(format!("cuFile error {}", -n))),
        }
    }
}

fn describe(e: CuFileError) -> String {
    if e.cu_err != 0 {
        format!("cuFile error {} (CUDA error {})", e.err, e.cu_err)
    } else {
        format!("cuFile error {}", e.err)
    }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated thread-local string,
    // copied before any other dl call.
    let p: *const c_char = unsafe { libc::dlerror() };
    if p.is_null() {
        return "not found".into();
    }
    // SAFETY: non-null, NUL-terminated (see above).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Where libcufile is looked for, in order.
pub fn library_candidates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("MEMFERRY_CUFILE").filter(|p| !p.is_empty()) {
        out.push(p.into());
    }
    out.push("libcufile.so.0".into());
    out.push("libcufile.so".into());
    for dir in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
    ] {
        out.push(PathBuf::from(dir).join("libcufile.so.0"));
    }
    // The nvidia-cufile wheel: <prefix>/lib/python3.*/{site,dist}-packages/nvidia/cufile/lib.
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(home).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    for prefix in prefixes {
        let lib = prefix.join("lib");
        let Ok(entries) = std::fs::read_dir(&lib) else {
            continue;
        };
        let mut pys: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pys.sort();
        for py in pys {
            for pkgs in ["site-packages", "dist-packages"] {
                let p = py.join(pkgs).join("nvidia/cufile/lib/libcufile.so.0");
                if p.exists() {
                    out.push(p);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_is_reported_with_what_was_tried() {
        let e = CuFile::load(&[PathBuf::from("/nonexistent/libcufile.so.0")])
            .err()
            .expect("cannot load a missing file");
        assert!(e.contains("cuFile is not available"), "{e}");
        assert!(e.contains("/nonexistent/libcufile.so.0"), "{e}");
    }

    #[test]
    fn a_library_without_cufile_symbols_is_refused_and_the_next_tried() {
        let e = CuFile::load(&[
            PathBuf::from("libc.so.6"),
            PathBuf::from("/nonexistent/libcufile.so.0"),
        ])
        .err()
        .expect("libc is not cuFile");
        assert!(e.contains("cuFile is not available"), "{e}");
        assert!(e.contains("libc.so.6 (lacks cuFileDriverOpen"), "{e}");
        assert!(e.contains("/nonexistent/libcufile.so.0"), "{e}");
    }

    #[test]
    fn parses_directions() {
        let m = GdsMode::parse_directions("read", true).unwrap();
        assert!(m.read && !m.write && m.bounce);
        let m = GdsMode::parse_directions("both", false).unwrap();
        assert!(m.read && m.write && !m.bounce);
        assert!(GdsMode::parse_directions("sideways", false).is_err());
    }

    #[test]
    fn candidates_include_the_soname() {
        let c = library_candidates();
        assert!(c.iter().any(|p| p == &PathBuf::from("libcufile.so.0")));
    }
}
