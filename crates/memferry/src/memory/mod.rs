//! Where bytes live in memory.
//!
//! A [`Region`] is one contiguous allocation on a [`Device`]. The transfer
//! engine only moves bytes through this trait, so host memory and CUDA
//! device memory ([`CudaRegion`]) plug in without changing the engine: a
//! region either exposes host-addressable pointers (fast path: storage I/O
//! lands in it directly), or a device address for asynchronous copies from
//! pinned staging ([`Region::cuda`]), or copies to and from host staging
//! buffers.

pub mod cuda;
mod device;
mod discard;
mod host;
mod mapped;
mod staging;
mod stream_copies;

pub use cuda::{CudaRegion, HostRegistration, PinnedBuf};
pub use device::Device;
pub use discard::DiscardRegion;
pub use host::HostRegion;
pub use mapped::MappedRegion;
pub use staging::AlignedBuf;
pub use stream_copies::StreamCopies;

use crate::Result;

/// One contiguous allocation that the engine reads from or writes into.
///
/// Guarantee required of implementors: `copy_in` and `copy_out` are safe to
/// call concurrently from several threads on *disjoint* byte ranges.
pub trait Region: Send + Sync {
    /// Length in bytes.
    fn len(&self) -> u64;

    /// True when the region holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device the bytes live on.
    fn device(&self) -> Device;

    /// Host address of byte 0 when the bytes can be read directly by the CPU.
    /// `None` (the default): the bytes are reached only through `copy_out`.
    fn host_ptr(&self) -> Option<*const u8> {
        None
    }

    /// Host address of byte 0 when the bytes can be written directly by the CPU.
    /// `None` (the default): the bytes are reached only through `copy_in`.
    fn host_ptr_mut(&self) -> Option<*mut u8> {
        None
    }

    /// Bytes addressable at `host_ptr`/`host_ptr_mut` (at least `len`): the
    /// slack lets direct I/O move whole aligned blocks at the region's tail.
    /// Slack bytes carry no meaning (checksums cover `len` bytes only).
    fn host_capacity(&self) -> u64 {
        self.len()
    }

    /// For CUDA device memory: the owning context and the device address of
    /// byte 0, so backends can queue asynchronous copies on a stream.
    fn cuda(&self) -> Option<(&cuda::Context, u64)> {
        None
    }

    /// Copies `src` into the region at `offset`.
    ///
    /// # Safety
    /// No other thread may access `offset..offset + src.len()` during the call.
    unsafe fn copy_in(&self, offset: u64, src: &[u8]) -> Result<()> {
        check_range(self.len(), offset, src.len())?;
        let Some(base) = self.host_ptr_mut() else {
            return Err(crate::Error::Unsupported(format!(
                "{} memory is not writable from the host",
                self.device()
            )));
        };
        // SAFETY: the range was bounds-checked above, the caller guarantees
        // exclusive access to it, and `src` cannot alias region memory that
        // the caller holds exclusively.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), base.add(offset as usize), src.len());
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes from the region at `offset` into `dst`.
    ///
    /// # Safety
    /// No other thread may write `offset..offset + dst.len()` during the call.
    unsafe fn copy_out(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        check_range(self.len(), offset, dst.len())?;
        let Some(base) = self.host_ptr() else {
            return Err(crate::Error::Unsupported(format!(
                "{} memory is not readable from the host",
                self.device()
            )));
        };
        // SAFETY: bounds checked above; the caller guarantees nobody writes
        // the range concurrently; `dst` is a distinct, exclusive buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(base.add(offset as usize), dst.as_mut_ptr(), dst.len());
        }
        Ok(())
    }
}

/// Fails unless `offset..offset+len` lies inside a region of `region_len` bytes.
pub(crate) fn check_range(region_len: u64, offset: u64, len: usize) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= region_len => Ok(()),
        _ => Err(crate::Error::InvalidInput(format!(
            "range {offset}+{len} is outside a region of {region_len} bytes"
        ))),
    }
}

/// Views a whole host-readable region as a byte slice.
///
/// # Safety
/// Nobody may write the region while the slice lives.
pub unsafe fn host_bytes(region: &dyn Region) -> Option<&[u8]> {
    let ptr = region.host_ptr()?;
    if region.is_empty() {
        return Some(&[]);
    }
    // SAFETY: the region guarantees `len` readable bytes at `ptr` for its
    // lifetime, which bounds the returned slice; the caller rules out writers.
    Some(unsafe { std::slice::from_raw_parts(ptr, region.len() as usize) })
}

/// Memory memferry allocated for a restore: host or CUDA device memory.
pub enum OwnedRegion {
    /// Page-aligned host memory.
    Host(HostRegion),
    /// CUDA device memory.
    Cuda(CudaRegion),
}

impl OwnedRegion {
    /// Allocates `len` bytes on `device` (host memory is zeroed; device
    /// memory is unspecified until written).
    pub fn allocate(device: Device, len: u64) -> Result<Self> {
        Ok(match device {
            Device::Cpu => OwnedRegion::Host(HostRegion::new(len)?),
            Device::Cuda(n) => OwnedRegion::Cuda(CudaRegion::new(n, len)?),
        })
    }

    /// The host region, when the memory is on the host.
    pub fn host(&self) -> Option<&HostRegion> {
        match self {
            OwnedRegion::Host(h) => Some(h),
            OwnedRegion::Cuda(_) => None,
        }
    }

    /// A copy of the bytes in host memory (copied back from the device for
    /// device memory).
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        match self {
            OwnedRegion::Host(h) => Ok(h.as_slice().to_vec()),
            OwnedRegion::Cuda(c) => {
                let mut v = vec![0u8; c.len() as usize];
                // SAFETY: `&self` rules out writers going through this
                // owner; `v` is a distinct buffer.
                unsafe { c.copy_out(0, &mut v)? };
                Ok(v)
            }
        }
    }

    fn inner(&self) -> &dyn Region {
        match self {
            OwnedRegion::Host(h) => h,
            OwnedRegion::Cuda(c) => c,
        }
    }
}

impl Region for OwnedRegion {
    fn len(&self) -> u64 {
        self.inner().len()
    }
    fn device(&self) -> Device {
        self.inner().device()
    }
    fn host_ptr(&self) -> Option<*const u8> {
        self.inner().host_ptr()
    }
    fn host_ptr_mut(&self) -> Option<*mut u8> {
        self.inner().host_ptr_mut()
    }
    fn host_capacity(&self) -> u64 {
        self.inner().host_capacity()
    }
    fn cuda(&self) -> Option<(&cuda::Context, u64)> {
        self.inner().cuda()
    }
    unsafe fn copy_in(&self, offset: u64, src: &[u8]) -> Result<()> {
        // SAFETY: forwarded: the caller's guarantees hold for the inner region.
        unsafe { self.inner().copy_in(offset, src) }
    }
    unsafe fn copy_out(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        // SAFETY: as above.
        unsafe { self.inner().copy_out(offset, dst) }
    }
}
