//! CUDA device memory, pinned host memory, streams and events.
//!
//! The CUDA driver (`libcuda.so`) is loaded at run time (cudarc with
//! dynamic loading), so building memferry needs no CUDA toolkit and a binary
//! runs on machines without a GPU: asking for `cuda:N` there fails with a
//! clear error instead. Builds without the cargo feature `cuda` keep the same
//! API; every entry point then reports that CUDA support was not compiled in.
//!
//! Every CUDA call lives in the private `sys` fence below. Contexts are the
//! devices' primary contexts, retained once per process; every call that
//! touches a device first makes its context current on the calling thread
//! with [`Context::enter`], and makes whatever was current before current
//! again when it returns, so any worker thread may use any region and the
//! caller's own context (e.g. PyTorch's) is left as it was.
//!
//! Ordering with the caller's GPU work: memferry's synchronous copies and
//! memsets run on each context's legacy default stream, which is ordered
//! after earlier work on every blocking stream; its own asynchronous copies
//! run on non-blocking streams that first wait for the legacy stream. Work
//! the caller queued on its own *non-blocking* streams (PyTorch's streams,
//! for one) is not ordered with memferry's: synchronise those streams
//! before a job reads or writes their memory. In the other direction, a
//! load waits until its bytes have landed on every device it wrote
//! ([`synchronize_regions`], or a wait on its own streams) before it
//! reports success, so they may then be read on any stream.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;

use super::{Device, Region, check_range};
use crate::{Error, Result};

/// The error text when CUDA support is not compiled in.
pub const NO_CUDA_BUILD: &str = "this memferry was built without CUDA support (cargo feature `cuda`): rebuild with `--features cuda`, or use --device cpu";

/// What the CUDA driver reported at initialisation.
#[derive(Debug, Clone, Serialize)]
pub struct CudaInfo {
    /// Driver API version, e.g. 12080 for CUDA 12.8.
    pub driver_version: i32,
    /// The visible devices, by ordinal.
    pub devices: Vec<CudaDeviceInfo>,
}

/// One visible CUDA device.
#[derive(Debug, Clone, Serialize)]
pub struct CudaDeviceInfo {
    /// Ordinal (`cuda:N`).
    pub ordinal: u32,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Device memory in bytes.
    pub total_bytes: u64,
}

/// Loads and initialises the CUDA driver once per process.
///
/// Fails with [`Error::Unsupported`] when the build has no CUDA support or
/// no driver can be loaded (the message ends with "use --device cpu").
pub fn driver() -> Result<&'static CudaInfo> {
    static INFO: OnceLock<std::result::Result<CudaInfo, String>> = OnceLock::new();
    INFO.get_or_init(sys::init)
        .as_ref()
        .map_err(|e| Error::Unsupported(e.clone()))
}

/// True when CUDA is usable in this process (support compiled in, driver
/// loaded, at least one device).
pub fn available() -> bool {
    driver().is_ok_and(|i| !i.devices.is_empty())
}

/// Checks that `device` exists here: `cpu` always does; `cuda:N` needs the
/// driver and at least N+1 devices.
pub fn check_device(device: Device) -> Result<()> {
    let Device::Cuda(n) = device else {
        return Ok(());
    };
    let info = driver()?;
    if (n as usize) < info.devices.len() {
        return Ok(());
    }
    Err(Error::InvalidInput(format!(
        "cuda:{n} does not exist: this machine has {} CUDA device(s){}; use --device cpu or an existing device",
        info.devices.len(),
        if info.devices.is_empty() {
            String::new()
        } else {
            format!(" (cuda:0..cuda:{})", info.devices.len() - 1)
        }
    )))
}

/// A device's primary context. Obtain with [`context`]; lives for the rest
/// of the process.
pub struct Context {
    ordinal: u32,
    raw: sys::Ctx,
}

impl Context {
    /// The device ordinal.
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// Makes this context current on the calling thread until the returned
    /// guard drops, which makes the context that was current before (or
    /// none) current again. Cheap; nothing changes when this context is
    /// already current.
    pub fn enter(&self) -> Result<Current<'_>> {
        let previous = sys::get_current()?;
        if previous != self.raw {
            sys::set_current(self.raw)?;
        }
        Ok(Current {
            previous,
            changed: previous != self.raw,
            _ctx: std::marker::PhantomData,
        })
    }

    /// Waits until all work queued on this device's legacy default stream
    /// has completed: every synchronous copy and memset memferry issued
    /// (`cuMemcpyHtoD` from pageable memory returns once the bytes are
    /// staged, before the DMA lands), and, through the legacy stream's
    /// ordering, earlier work on blocking streams. Work on non-blocking
    /// streams is not waited for.
    pub fn synchronize(&self) -> Result<()> {
        let _current = self.enter()?;
        sys::legacy_sync()
    }
}

/// A context made current by [`Context::enter`]; dropping it makes the
/// previously current context current again. Bound to the thread that
/// entered (not `Send`): the current context is per thread.
#[must_use = "the context stays current only while the guard lives"]
pub struct Current<'a> {
    previous: sys::Ctx,
    changed: bool,
    _ctx: std::marker::PhantomData<(&'a Context, *const ())>,
}

impl Drop for Current<'_> {
    fn drop(&mut self) {
        if self.changed {
            // Restoring can only fail for a context the caller destroyed
            // meanwhile; there is nothing better to make current then.
            let _ = sys::set_current(self.previous);
        }
    }
}

/// Waits once per device for the legacy default stream of every CUDA
/// region in `regions` (see [`Context::synchronize`]); host regions are
/// skipped. Backends call this before a load reports success, so the
/// caller may read the bytes on any stream.
pub fn synchronize_regions<'a>(regions: impl IntoIterator<Item = &'a dyn Region>) -> Result<()> {
    let mut done: Vec<u32> = Vec::new();
    for r in regions {
        if let Some((ctx, _)) = r.cuda()
            && !done.contains(&ctx.ordinal)
        {
            done.push(ctx.ordinal);
            ctx.synchronize()?;
        }
    }
    Ok(())
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Context(cuda:{})", self.ordinal)
    }
}

/// The primary context of device `ordinal`, retained on first use.
pub fn context(ordinal: u32) -> Result<Arc<Context>> {
    check_device(Device::Cuda(ordinal))?;
    static CONTEXTS: OnceLock<Mutex<HashMap<u32, Arc<Context>>>> = OnceLock::new();
    let mut map = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .expect("no panics while holding the lock");
    if let Some(c) = map.get(&ordinal) {
        return Ok(c.clone());
    }
    let ctx = Arc::new(Context {
        ordinal,
        raw: sys::retain_primary(ordinal)?,
    });
    map.insert(ordinal, ctx.clone());
    Ok(ctx)
}

/// A device-memory region: allocated by memferry (freed on drop) or
/// wrapping memory the caller owns (e.g. a framework tensor).
///
/// The host cannot address it: the engine moves bytes with copies on the
/// legacy default stream ([`Region::copy_in`]/[`Region::copy_out`]) or, in
/// the `pinned` backend and the KV engine, with asynchronous copies from
/// pinned staging buffers on streams of its own that first wait for the
/// legacy stream. `copy_out` returns once the bytes are in host memory;
/// `copy_in` may return before they have landed on the device: a job waits
/// for them ([`synchronize_regions`], or its own streams) before it
/// reports success, and a direct
/// caller of `copy_in` must call [`Context::synchronize`] before the bytes
/// are read on a stream other than the legacy one.
///
/// Writers on the caller's non-blocking streams are not ordered with
/// memferry's copies: synchronise them before a save or a load starts.
pub struct CudaRegion {
    ctx: Arc<Context>,
    ptr: u64,
    len: u64,
    owned: bool,
}

impl CudaRegion {
    /// Allocates `len` bytes on device `ordinal` (contents unspecified).
    pub fn new(ordinal: u32, len: u64) -> Result<Self> {
        let ctx = context(ordinal)?;
        let current = ctx.enter()?;
        let ptr = if len == 0 {
            0
        } else {
            sys::mem_alloc(len as usize).map_err(|e| match e {
                Error::Io { context, source } => Error::Io {
                    context: format!(
                        "{context}: allocating {} on cuda:{ordinal}",
                        crate::units::format_bytes(len)
                    ),
                    source,
                },
                other => other,
            })?
        };
        drop(current);
        Ok(Self {
            ctx,
            ptr,
            len,
            owned: true,
        })
    }

    /// Wraps `len` bytes of device memory at `ptr` on device `ordinal`
    /// without taking ownership (nothing is freed on drop).
    ///
    /// Refused with [`Error::InvalidInput`]: a pointer the driver does not
    /// know, memory the driver does not report as device memory (such as
    /// pinned host memory), memory of another device, and a range running
    /// past the end of the allocation `ptr` lies in. Other driver failures
    /// are passed through as [`Error::Io`].
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay allocated while the region lives, and
    /// nobody else may access a range while memferry transfers it.
    pub unsafe fn from_raw(ordinal: u32, ptr: u64, len: u64) -> Result<Self> {
        let ctx = context(ordinal)?;
        if len > 0 {
            let _current = ctx.enter()?;
            check_device_range(ordinal, ptr, len)?;
        }
        Ok(Self {
            ctx,
            ptr,
            len,
            owned: false,
        })
    }

    /// The device address of byte 0.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// The context the memory belongs to.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Sets every byte to `value`; returns once the bytes are set on the
    /// device (`cuMemsetD8` itself may return before, so this waits for
    /// the device's legacy stream).
    pub fn fill(&self, value: u8) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let _current = self.ctx.enter()?;
        // SAFETY: the range is this region's allocation; `&self` callers
        // are bound by the Region contract not to race on it.
        unsafe { sys::memset(self.ptr, value, self.len as usize)? };
        sys::legacy_sync()
    }
}

/// The checks of [`CudaRegion::from_raw`], with `ordinal`'s context current.
fn check_device_range(ordinal: u32, ptr: u64, len: u64) -> Result<()> {
    let Some(attrs) = sys::pointer_attributes(ptr)? else {
        return Err(Error::InvalidInput(format!(
            "{ptr:#x} is not memory known to the CUDA driver: pass a device pointer of cuda:{ordinal}"
        )));
    };
    if !attrs.device_memory {
        return Err(Error::InvalidInput(format!(
            "{ptr:#x} is host memory known to the CUDA driver (e.g. pinned), not device memory of cuda:{ordinal}"
        )));
    }
    if attrs.ordinal != ordinal {
        return Err(Error::InvalidInput(format!(
            "device pointer {ptr:#x} belongs to cuda:{}, not cuda:{ordinal}",
            attrs.ordinal
        )));
    }
    let end = attrs.range_start.saturating_add(attrs.range_len);
    if ptr.checked_add(len).is_none_or(|e| e > end) {
        return Err(Error::InvalidInput(format!(
            "{} at device pointer {ptr:#x} run past the end of its allocation ({} at {:#x} on cuda:{ordinal})",
            crate::units::format_bytes(len),
            crate::units::format_bytes(attrs.range_len),
            attrs.range_start
        )));
    }
    Ok(())
}

impl Drop for CudaRegion {
    fn drop(&mut self) {
        if !self.owned || self.ptr == 0 {
            return;
        }
        if let Ok(_current) = self.ctx.enter() {
            // Synchronous copies into the region may still be landing.
            let _ = sys::legacy_sync();
            // SAFETY: the allocation was made by `new` and is freed once.
            // No memferry copy can still use it: pinned copies are awaited
            // before their job returns, and those on the legacy stream were
            // waited for just above.
            unsafe { sys::mem_free(self.ptr) };
        }
    }
}

impl Region for CudaRegion {
    fn len(&self) -> u64 {
        self.len
    }
    fn device(&self) -> Device {
        Device::Cuda(self.ctx.ordinal)
    }
    fn cuda(&self) -> Option<(&Context, u64)> {
        Some((&self.ctx, self.ptr))
    }
    /// A copy on the legacy default stream. It returns once the driver no
    /// longer needs `src` (staged for DMA when `src` is pageable), which
    /// may be before the bytes have landed on the device: see
    /// [`CudaRegion`] for who waits for them.
    unsafe fn copy_in(&self, offset: u64, src: &[u8]) -> Result<()> {
        check_range(self.len, offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let _current = self.ctx.enter()?;
        // SAFETY: bounds checked; the caller has exclusive use of the range;
        // `cuMemcpyHtoD` returns only once it has read all of `src` (into
        // its staging buffers when `src` is pageable), so `src` may be
        // reused afterwards.
        unsafe { sys::htod(self.ptr + offset, src.as_ptr(), src.len()) }
    }
    /// A copy on the legacy default stream, ordered after earlier work on
    /// blocking streams; it returns once the bytes are in `dst`.
    unsafe fn copy_out(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        check_range(self.len, offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        let _current = self.ctx.enter()?;
        // SAFETY: bounds checked; nobody writes the range (caller contract);
        // a device-to-host `cuMemcpyDtoH` returns only once the bytes are in
        // `dst`, so nothing writes `dst` after the call.
        unsafe { sys::dtoh(dst.as_mut_ptr(), self.ptr + offset, dst.len()) }
    }
}

/// Page-locked (pinned) host memory from `cuMemHostAlloc`, usable by every
/// context (portable) and page-aligned, so it serves as O_DIRECT staging
/// and as the host side of asynchronous copies.
pub struct PinnedBuf {
    ptr: NonNull<u8>,
    raw: *mut u8,
    len: usize,
    /// The context the allocation was made in (freed in it too).
    ctx: Arc<Context>,
}

// SAFETY: the buffer is owned exclusively by this value; page-locked memory
// may be used from any thread.
unsafe impl Send for PinnedBuf {}
// SAFETY: shared references only hand out raw pointers; users synchronise.
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    /// Allocates `len` pinned bytes (start aligned to 4096) in the context
    /// of device `ordinal`, the device the buffer will mostly copy to and
    /// from (the allocation is portable, so every context may use it).
    /// Needs a CUDA driver; the memory counts against no memlock limit of
    /// memferry's own.
    pub fn new(ordinal: u32, len: usize) -> Result<Self> {
        let info = driver()?;
        if info.devices.is_empty() {
            return Err(Error::Unsupported(
                "no CUDA device found: pinned memory needs one; use --device cpu".into(),
            ));
        }
        let ctx = context(ordinal)?;
        let current = ctx.enter()?;
        let total = len.max(1) + 4096;
        let raw = sys::host_alloc(total)?;
        drop(current);
        let aligned = crate::units::align_up(raw as u64, 4096) as usize - raw as usize;
        // SAFETY: `aligned < 4096`, so the aligned start lies inside the
        // allocation of `len + 4096` bytes and `len` bytes follow it.
        let ptr = unsafe { raw.add(aligned) };
        Ok(Self {
            ptr: NonNull::new(ptr).expect("host_alloc never returns null on success"),
            raw,
            len,
            ctx,
        })
    }

    /// Start address (4096-aligned).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        if let Ok(_current) = self.ctx.enter() {
            // SAFETY: allocated by `host_alloc` in `new` and freed once;
            // owners wait for every copy and I/O on it before dropping it.
            unsafe { sys::host_free(self.raw) };
        }
    }
}

/// Host memory the CUDA driver has page-locked (`cuMemHostRegister`,
/// portable), so asynchronous copies from and to it run at full DMA speed
/// and overlap the caller's work. Unregistered on drop; the memory itself
/// stays the owner's.
pub struct HostRegistration {
    ptr: *mut u8,
    ctx: Arc<Context>,
}

// SAFETY: the registration is a driver-side handle to memory its owner
// keeps alive; unregistering may happen on any thread.
unsafe impl Send for HostRegistration {}
// SAFETY: shared references expose nothing.
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    /// Page-locks `len` bytes at `ptr` for device `ordinal`'s context (and,
    /// being portable, every other context).
    ///
    /// # Safety
    /// `ptr..ptr+len` must be mapped host memory that stays mapped until
    /// the registration drops, and be registered with CUDA only once.
    pub unsafe fn new(ordinal: u32, ptr: *mut u8, len: usize) -> Result<Self> {
        let ctx = context(ordinal)?;
        {
            let _current = ctx.enter()?;
            // SAFETY: forwarded to the caller.
            unsafe { sys::host_register(ptr, len)? };
        }
        Ok(Self { ptr, ctx })
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if let Ok(_current) = self.ctx.enter() {
            // SAFETY: registered once in `new`; owners wait for every copy
            // from or to the memory before dropping the registration.
            unsafe { sys::host_unregister(self.ptr) };
        }
    }
}

/// A non-blocking stream on one device.
pub struct Stream {
    ctx: Arc<Context>,
    raw: sys::Stream,
}

impl Stream {
    /// Creates a stream on `ctx`'s device.
    pub fn new(ctx: Arc<Context>) -> Result<Self> {
        let raw = {
            let _current = ctx.enter()?;
            sys::stream_create()?
        };
        Ok(Self { ctx, raw })
    }

    /// Makes everything queued on this stream from now on wait for the
    /// work queued so far on the device's legacy default stream (and so
    /// for earlier work on blocking streams): the caller's last kernel,
    /// memferry's own synchronous copies and memsets. The stream is
    /// non-blocking, so without this its copies could overtake them.
    pub fn wait_for_legacy(&self) -> Result<()> {
        let _current = self.ctx.enter()?;
        let event = sys::event_create()?;
        let waited = sys::event_record(event, sys::LEGACY_STREAM)
            .and_then(|()| sys::stream_wait_event(self.raw, event));
        // The wait is queued with the event's state at this point:
        // destroying the event now does not cancel it.
        sys::event_destroy(event);
        waited
    }

    /// The context the stream belongs to.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Queues a copy of `len` bytes from host `src` to device `dst`.
    ///
    /// # Safety
    /// `src..src+len` must stay valid and unmodified, and `dst..dst+len`
    /// must be device memory of this context, untouched by others, until
    /// the copy completes (an event recorded after it has fired, or the
    /// stream was synchronised).
    pub unsafe fn copy_htod(&self, dst: u64, src: *const u8, len: usize) -> Result<()> {
        let _current = self.ctx.enter()?;
        // SAFETY: forwarded to the caller.
        unsafe { sys::htod_async(dst, src, len, self.raw) }
    }

    /// Queues a copy of `len` bytes from device `src` to host `dst`.
    ///
    /// # Safety
    /// As for [`Stream::copy_htod`], with `dst` host memory that nobody
    /// reads or writes until the copy completes.
    pub unsafe fn copy_dtoh(&self, dst: *mut u8, src: u64, len: usize) -> Result<()> {
        let _current = self.ctx.enter()?;
        // SAFETY: forwarded to the caller.
        unsafe { sys::dtoh_async(dst, src, len, self.raw) }
    }

    /// Waits until everything queued on the stream has completed.
    pub fn synchronize(&self) -> Result<()> {
        let _current = self.ctx.enter()?;
        sys::stream_sync(self.raw)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(_current) = self.ctx.enter() {
            let _ = sys::stream_sync(self.raw);
            sys::stream_destroy(self.raw);
        }
    }
}

/// An event without timing, used to learn when a queued copy completed.
pub struct Event {
    ctx: Arc<Context>,
    raw: sys::Event,
}

impl Event {
    /// Creates an event on `ctx`'s device.
    pub fn new(ctx: Arc<Context>) -> Result<Self> {
        let raw = {
            let _current = ctx.enter()?;
            sys::event_create()?
        };
        Ok(Self { ctx, raw })
    }

    /// Records the event after the work queued so far on `stream`.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        let _current = self.ctx.enter()?;
        sys::event_record(self.raw, stream.raw)
    }

    /// True once the recorded work has completed (never blocks).
    pub fn done(&self) -> Result<bool> {
        let _current = self.ctx.enter()?;
        sys::event_query(self.raw)
    }

    /// Blocks until the recorded work has completed.
    pub fn wait(&self) -> Result<()> {
        let _current = self.ctx.enter()?;
        sys::event_sync(self.raw)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if let Ok(_current) = self.ctx.enter() {
            sys::event_destroy(self.raw);
        }
    }
}

// SAFETY: primary contexts, streams and events are thread-safe driver
// handles; memferry makes the context current before every use.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}
// SAFETY: as above.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

/// What the driver reports about the allocation a pointer lies in.
struct PointerAttributes {
    /// `CU_MEMORYTYPE_DEVICE` (not host, array or unified memory).
    device_memory: bool,
    /// `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL` (`u32::MAX` if negative).
    ordinal: u32,
    /// `CU_POINTER_ATTRIBUTE_RANGE_START_ADDR`.
    range_start: u64,
    /// `CU_POINTER_ATTRIBUTE_RANGE_SIZE`.
    range_len: u64,
}

/// The CUDA fence: every driver call memferry makes lives here.
#[cfg(feature = "cuda")]
mod sys {
    use std::ffi::{CStr, c_char, c_void};

    use cudarc::driver::sys as cu;
    use cudarc::driver::sys::CUresult;

    use super::{CudaDeviceInfo, CudaInfo, PointerAttributes};
    use crate::{Error, Result};

    /// A `CUcontext` kept as an address so handles are plain data.
    pub type Ctx = usize;
    /// A `CUstream` as an address.
    pub type Stream = usize;
    /// A `CUevent` as an address.
    pub type Event = usize;

    fn describe(r: CUresult) -> String {
        let mut name: *const c_char = std::ptr::null();
        let mut text: *const c_char = std::ptr::null();
        // SAFETY: both calls only write a pointer to a static string (or
        // leave it null for unknown codes), which we check before reading.
        unsafe {
            cu::cuGetErrorName(r, &mut name);
            cu::cuGetErrorString(r, &mut text);
        }
        let s = |p: *const c_char| {
            if p.is_null() {
                None
            } else {
                // SAFETY: non-null pointers from the driver are static,
                // NUL-terminated strings.
                Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            }
        };
        match (s(name), s(text)) {
            (Some(n), Some(t)) => format!("{n}: {t}"),
            (Some(n), None) => n,
            _ => format!("CUDA error {}", r as i32),
        }
    }

    fn check(r: CUresult, what: &str) -> Result<()> {
        if r == CUresult::CUDA_SUCCESS {
            return Ok(());
        }
        Err(Error::Io {
            context: format!("CUDA {what}"),
            source: std::io::Error::other(describe(r)),
        })
    }

    pub fn init() -> std::result::Result<CudaInfo, String> {
        // SAFETY: only tries to open the driver library; no symbols are used.
        if !unsafe { cu::is_culib_present() } {
            return Err("no CUDA driver found (libcuda.so could not be loaded): this machine has no NVIDIA driver, or it is not on the library path; use --device cpu".into());
        }
        // SAFETY: cuInit has no preconditions; the library is present.
        let r = unsafe { cu::cuInit(0) };
        if r != CUresult::CUDA_SUCCESS {
            return Err(format!(
                "the CUDA driver failed to initialise ({}); check `nvidia-smi`, or use --device cpu",
                describe(r)
            ));
        }
        let mut version = 0;
        let mut count = 0;
        // SAFETY: out-pointers to locals; the driver is initialised.
        unsafe {
            cu::cuDriverGetVersion(&mut version);
            if cu::cuDeviceGetCount(&mut count) != CUresult::CUDA_SUCCESS {
                count = 0;
            }
        }
        let mut devices = Vec::new();
        for i in 0..count {
            let mut dev = 0;
            let mut name = [0 as c_char; 256];
            let mut total = 0usize;
            // SAFETY: out-pointers to locals of the sizes passed.
            unsafe {
                if cu::cuDeviceGet(&mut dev, i) != CUresult::CUDA_SUCCESS {
                    continue;
                }
                cu::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev);
                cu::cuDeviceTotalMem_v2(&mut total, dev);
            }
            // SAFETY: the driver NUL-terminates the name within the buffer
            // (zero-initialised, so a terminator exists in any case).
            let name = unsafe { CStr::from_ptr(name.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            devices.push(CudaDeviceInfo {
                ordinal: i as u32,
                name,
                total_bytes: total as u64,
            });
        }
        Ok(CudaInfo {
            driver_version: version,
            devices,
        })
    }

    pub fn retain_primary(ordinal: u32) -> Result<Ctx> {
        let mut dev = 0;
        let mut ctx: cu::CUcontext = std::ptr::null_mut();
        // SAFETY: out-pointers to locals; the driver was initialised by
        // `init` (callers go through `check_device`).
        unsafe {
            check(cu::cuDeviceGet(&mut dev, ordinal as i32), "cuDeviceGet")?;
            check(
                cu::cuDevicePrimaryCtxRetain(&mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
            )?;
        }
        Ok(ctx as Ctx)
    }

    /// `CU_STREAM_LEGACY`: the legacy default stream of the current
    /// context, whatever the per-thread default stream setting.
    pub const LEGACY_STREAM: Stream = 0x1;

    pub fn get_current() -> Result<Ctx> {
        let mut ctx: cu::CUcontext = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the driver was initialised (a
        // `Context` exists only after `init`).
        check(unsafe { cu::cuCtxGetCurrent(&mut ctx) }, "cuCtxGetCurrent")?;
        Ok(ctx as Ctx)
    }

    pub fn set_current(ctx: Ctx) -> Result<()> {
        // SAFETY: `ctx` is a retained primary context, never released, or
        // one `get_current` returned (null unbinds; a context the caller
        // destroyed meanwhile makes the driver return an error).
        check(
            unsafe { cu::cuCtxSetCurrent(ctx as cu::CUcontext) },
            "cuCtxSetCurrent",
        )
    }

    /// Waits for the current context's legacy default stream.
    pub fn legacy_sync() -> Result<()> {
        // SAFETY: `CU_STREAM_LEGACY` names a stream of every context; a
        // context is current.
        check(
            unsafe { cu::cuStreamSynchronize(LEGACY_STREAM as cu::CUstream) },
            "cuStreamSynchronize (legacy stream)",
        )
    }

    pub fn mem_alloc(len: usize) -> Result<u64> {
        let mut p = 0;
        // SAFETY: out-pointer to a local; a context is current.
        check(unsafe { cu::cuMemAlloc_v2(&mut p, len) }, "cuMemAlloc")?;
        Ok(p)
    }

    /// # Safety
    /// `p` came from `mem_alloc` and is not used afterwards.
    pub unsafe fn mem_free(p: u64) {
        // SAFETY: forwarded to the caller.
        let _ = unsafe { cu::cuMemFree_v2(p) };
    }

    /// # Safety
    /// `dst..dst+len` is device memory nobody else uses during the call.
    pub unsafe fn memset(dst: u64, value: u8, len: usize) -> Result<()> {
        // SAFETY: forwarded to the caller.
        check(unsafe { cu::cuMemsetD8_v2(dst, value, len) }, "cuMemsetD8")
    }

    /// # Safety
    /// Valid ranges on both sides, exclusive use of `dst` during the call.
    pub unsafe fn htod(dst: u64, src: *const u8, len: usize) -> Result<()> {
        // SAFETY: forwarded to the caller.
        check(
            unsafe { cu::cuMemcpyHtoD_v2(dst, src.cast::<c_void>(), len) },
            "cuMemcpyHtoD",
        )
    }

    /// # Safety
    /// Valid ranges on both sides, exclusive use of `dst` during the call.
    pub unsafe fn dtoh(dst: *mut u8, src: u64, len: usize) -> Result<()> {
        // SAFETY: forwarded to the caller.
        check(
            unsafe { cu::cuMemcpyDtoH_v2(dst.cast::<c_void>(), src, len) },
            "cuMemcpyDtoH",
        )
    }

    /// # Safety
    /// As `htod`, until the copy completes on `stream`.
    pub unsafe fn htod_async(dst: u64, src: *const u8, len: usize, stream: Stream) -> Result<()> {
        // SAFETY: forwarded to the caller.
        check(
            unsafe {
                cu::cuMemcpyHtoDAsync_v2(dst, src.cast::<c_void>(), len, stream as cu::CUstream)
            },
            "cuMemcpyHtoDAsync",
        )
    }

    /// # Safety
    /// As `dtoh`, until the copy completes on `stream`.
    pub unsafe fn dtoh_async(dst: *mut u8, src: u64, len: usize, stream: Stream) -> Result<()> {
        // SAFETY: forwarded to the caller.
        check(
            unsafe {
                cu::cuMemcpyDtoHAsync_v2(dst.cast::<c_void>(), src, len, stream as cu::CUstream)
            },
            "cuMemcpyDtoHAsync",
        )
    }

    pub fn host_alloc(len: usize) -> Result<*mut u8> {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; a context is current.
        check(
            unsafe { cu::cuMemHostAlloc(&mut p, len, cu::CU_MEMHOSTALLOC_PORTABLE) },
            "cuMemHostAlloc",
        )?;
        Ok(p.cast())
    }

    /// # Safety
    /// `p` came from `host_alloc` and is not used afterwards.
    pub unsafe fn host_free(p: *mut u8) {
        // SAFETY: forwarded to the caller.
        let _ = unsafe { cu::cuMemFreeHost(p.cast()) };
    }

    /// # Safety
    /// `p..p+len` is mapped host memory, registered once, that stays
    /// mapped until `host_unregister`.
    pub unsafe fn host_register(p: *mut u8, len: usize) -> Result<()> {
        // SAFETY: forwarded to the caller.
        check(
            unsafe { cu::cuMemHostRegister_v2(p.cast(), len, cu::CU_MEMHOSTREGISTER_PORTABLE) },
            "cuMemHostRegister",
        )
    }

    /// # Safety
    /// `p` was registered by `host_register` and no copy uses it any more.
    pub unsafe fn host_unregister(p: *mut u8) {
        // SAFETY: forwarded to the caller.
        let _ = unsafe { cu::cuMemHostUnregister(p.cast()) };
    }

    /// What the driver knows about the allocation holding `p`; `None` when
    /// it does not know `p` at all (`CUDA_ERROR_INVALID_VALUE`).
    pub fn pointer_attributes(p: u64) -> Result<Option<PointerAttributes>> {
        use cu::CUpointer_attribute as A;
        let mut memory_type: u32 = 0;
        let mut ordinal: i32 = -1;
        let mut start: u64 = 0;
        let mut size: usize = 0;
        let mut attrs = [
            A::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            A::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            A::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
            A::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        ];
        // Each out-pointer has the type the driver writes for its
        // attribute: CUmemorytype (an unsigned int), int, CUdeviceptr,
        // size_t.
        let mut data: [*mut c_void; 4] = [
            (&mut memory_type as *mut u32).cast(),
            (&mut ordinal as *mut i32).cast(),
            (&mut start as *mut u64).cast(),
            (&mut size as *mut usize).cast(),
        ];
        // SAFETY: four attributes and four out-pointers to locals of the
        // types listed above, which outlive the call.
        let r = unsafe {
            cu::cuPointerGetAttributes(attrs.len() as u32, attrs.as_mut_ptr(), data.as_mut_ptr(), p)
        };
        if r == CUresult::CUDA_ERROR_INVALID_VALUE {
            return Ok(None);
        }
        check(r, "cuPointerGetAttributes")?;
        // A pointer the driver does not know reads as memory type 0 from
        // cuPointerGetAttributes (which reports success for it).
        if memory_type == 0 {
            return Ok(None);
        }
        Ok(Some(PointerAttributes {
            device_memory: memory_type == cu::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32,
            ordinal: u32::try_from(ordinal).unwrap_or(u32::MAX),
            range_start: start,
            range_len: size as u64,
        }))
    }

    pub fn stream_create() -> Result<Stream> {
        let mut s: cu::CUstream = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; a context is current.
        check(
            unsafe {
                cu::cuStreamCreate(&mut s, cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
            },
            "cuStreamCreate",
        )?;
        Ok(s as Stream)
    }

    pub fn stream_wait_event(s: Stream, e: Event) -> Result<()> {
        // SAFETY: a live stream and a recorded event of the current context.
        check(
            unsafe { cu::cuStreamWaitEvent(s as cu::CUstream, e as cu::CUevent, 0) },
            "cuStreamWaitEvent",
        )
    }

    pub fn stream_sync(s: Stream) -> Result<()> {
        // SAFETY: `s` is a live stream of the current context.
        check(
            unsafe { cu::cuStreamSynchronize(s as cu::CUstream) },
            "cuStreamSynchronize",
        )
    }

    pub fn stream_destroy(s: Stream) {
        // SAFETY: destroyed once, by the owning `Stream`'s drop.
        let _ = unsafe { cu::cuStreamDestroy_v2(s as cu::CUstream) };
    }

    pub fn event_create() -> Result<Event> {
        let mut e: cu::CUevent = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; a context is current.
        check(
            unsafe { cu::cuEventCreate(&mut e, cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) },
            "cuEventCreate",
        )?;
        Ok(e as Event)
    }

    pub fn event_record(e: Event, s: Stream) -> Result<()> {
        // SAFETY: live event and stream of the current context.
        check(
            unsafe { cu::cuEventRecord(e as cu::CUevent, s as cu::CUstream) },
            "cuEventRecord",
        )
    }

    pub fn event_query(e: Event) -> Result<bool> {
        // SAFETY: a live event.
        let r = unsafe { cu::cuEventQuery(e as cu::CUevent) };
        if r == CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check(r, "cuEventQuery").map(|()| true)
    }

    pub fn event_sync(e: Event) -> Result<()> {
        // SAFETY: a live event.
        check(
            unsafe { cu::cuEventSynchronize(e as cu::CUevent) },
            "cuEventSynchronize",
        )
    }

    pub fn event_destroy(e: Event) {
        // SAFETY: destroyed once, by the owning `Event`'s drop.
        let _ = unsafe { cu::cuEventDestroy_v2(e as cu::CUevent) };
    }
}

/// Without the `cuda` feature: the same entry points, each reporting that
/// CUDA support is not compiled in. Nothing can be allocated, so the
/// functions that act on handles are never reached.
#[cfg(not(feature = "cuda"))]
#[allow(clippy::missing_safety_doc)]
mod sys {
    use super::{CudaInfo, NO_CUDA_BUILD, PointerAttributes};
    use crate::{Error, Result};

    pub type Ctx = usize;
    pub type Stream = usize;
    pub type Event = usize;

    fn none<T>() -> Result<T> {
        Err(Error::Unsupported(NO_CUDA_BUILD.into()))
    }

    pub fn init() -> std::result::Result<CudaInfo, String> {
        Err(NO_CUDA_BUILD.into())
    }
    pub fn retain_primary(_ordinal: u32) -> Result<Ctx> {
        none()
    }
    pub const LEGACY_STREAM: Stream = 0x1;
    pub fn get_current() -> Result<Ctx> {
        none()
    }
    pub fn set_current(_ctx: Ctx) -> Result<()> {
        none()
    }
    pub fn legacy_sync() -> Result<()> {
        none()
    }
    pub fn mem_alloc(_len: usize) -> Result<u64> {
        none()
    }
    pub unsafe fn mem_free(_p: u64) {}
    pub unsafe fn memset(_dst: u64, _value: u8, _len: usize) -> Result<()> {
        none()
    }
    pub unsafe fn htod(_dst: u64, _src: *const u8, _len: usize) -> Result<()> {
        none()
    }
    pub unsafe fn dtoh(_dst: *mut u8, _src: u64, _len: usize) -> Result<()> {
        none()
    }
    pub unsafe fn htod_async(_dst: u64, _src: *const u8, _len: usize, _s: Stream) -> Result<()> {
        none()
    }
    pub unsafe fn dtoh_async(_dst: *mut u8, _src: u64, _len: usize, _s: Stream) -> Result<()> {
        none()
    }
    pub fn host_alloc(_len: usize) -> Result<*mut u8> {
        none()
    }
    pub unsafe fn host_free(_p: *mut u8) {}
    pub unsafe fn host_register(_p: *mut u8, _len: usize) -> Result<()> {
        none()
    }
    pub unsafe fn host_unregister(_p: *mut u8) {}
    pub fn pointer_attributes(_p: u64) -> Result<Option<PointerAttributes>> {
        none()
    }
    pub fn stream_create() -> Result<Stream> {
        none()
    }
    pub fn stream_wait_event(_s: Stream, _e: Event) -> Result<()> {
        none()
    }
    pub fn stream_sync(_s: Stream) -> Result<()> {
        none()
    }
    pub fn stream_destroy(_s: Stream) {}
    pub fn event_create() -> Result<Event> {
        none()
    }
    pub fn event_record(_e: Event, _s: Stream) -> Result<()> {
        none()
    }
    pub fn event_query(_e: Event) -> Result<bool> {
        none()
    }
    pub fn event_sync(_e: Event) -> Result<()> {
        none()
    }
    pub fn event_destroy(_e: Event) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_always_exists() {
        assert!(check_device(Device::Cpu).is_ok());
    }

    #[test]
    fn missing_cuda_is_a_clear_error() {
        if available() {
            // A real device: a far-away ordinal must be refused instead.
            let e = check_device(Device::Cuda(4096)).unwrap_err().to_string();
            assert!(e.contains("does not exist"), "{e}");
            return;
        }
        let e = CudaRegion::new(0, 4096).err().expect("no CUDA here");
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("use --device cpu"), "{e}");
        assert!(PinnedBuf::new(0, 4096).is_err());
    }

    /// Every entry point that makes a context current on the caller's
    /// thread leaves the caller's current context as it found it.
    #[test]
    fn entry_points_restore_the_callers_context() {
        if !available() {
            eprintln!(
                "skipped: no CUDA device ({})",
                driver().err().map_or(String::new(), |e| e.to_string())
            );
            return;
        }
        // A thread of its own: no other test has made a context current.
        std::thread::spawn(restores_the_callers_context)
            .join()
            .unwrap();
    }

    fn restores_the_callers_context() {
        let current = || sys::get_current().unwrap();
        assert_eq!(current(), 0, "a fresh thread has no current context");
        let r = CudaRegion::new(0, 8192).unwrap();
        assert_eq!(current(), 0, "CudaRegion::new");
        r.fill(7).unwrap();
        // SAFETY: the region is this test's own.
        unsafe { r.copy_in(4096, &[1; 4096]).unwrap() };
        let mut back = vec![0u8; 8192];
        // SAFETY: as above.
        unsafe { r.copy_out(0, &mut back).unwrap() };
        assert!(back[..4096].iter().all(|&b| b == 7) && back[4096..].iter().all(|&b| b == 1));
        // SAFETY: `r` outlives the view.
        let view = unsafe { CudaRegion::from_raw(0, r.device_ptr(), 4096) }.unwrap();
        drop(view);
        drop(PinnedBuf::new(0, 4096).unwrap());
        drop(r);
        assert_eq!(current(), 0, "every call above restored no context");
        // A context the caller made current stays current, even when a
        // call binds another device's context.
        let last = driver().unwrap().devices.len() as u32 - 1;
        let mine = context(last).unwrap();
        let guard = mine.enter().unwrap();
        let r = CudaRegion::new(0, 4096).unwrap();
        r.fill(0).unwrap();
        drop(r);
        assert_eq!(current(), mine.raw, "the caller's context is current again");
        drop(guard);
        assert_eq!(current(), 0);
    }
}
