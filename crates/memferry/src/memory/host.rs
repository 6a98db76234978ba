//! Host memory regions: anonymous, page-aligned mappings.

use std::ptr::NonNull;

use super::{Device, Region};
use crate::Result;
use crate::error::IoContext;

/// A page-aligned block of host memory owned by memferry.
///
/// Backed by an anonymous private mapping, so its start is aligned for
/// O_DIRECT and it is zero-filled; transparent huge pages are requested for
/// regions of 2 MiB and more to make first-touch cheap.
pub struct HostRegion {
    ptr: NonNull<u8>,
    len: u64,
    mapped: usize,
}

// SAFETY: the mapping is owned exclusively by this value; concurrent access
// goes through `Region`, whose contract limits it to disjoint ranges.
unsafe impl Send for HostRegion {}
// SAFETY: see above; shared references only hand out raw pointers whose use
// is governed by the `Region` contract.
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// Maps `len` zeroed bytes (the mapping is rounded up to whole pages).
    pub fn new(len: u64) -> Result<Self> {
        let mapped = crate::units::align_up(len.max(1), 4096) as usize;
        // SAFETY: an anonymous private mapping with no address hint has no
        // preconditions; the result is checked before use.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                mapped,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .ctx(|| format!("allocating {len} bytes of host memory"))?;
        if mapped >= 2 << 20 {
            // SAFETY: advising a mapping we own; failure only loses the hint.
            let _ = unsafe { rustix::mm::madvise(ptr, mapped, rustix::mm::Advice::LinuxHugepage) };
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).expect("mmap never returns null on success"),
            len,
            mapped,
        })
    }

    /// A region holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Self::new(bytes.len() as u64)?;
        r.as_mut_slice().copy_from_slice(bytes);
        Ok(r)
    }

    /// Asks the kernel to back `offset..offset+len` with memory now
    /// (MADV_POPULATE_WRITE), so later I/O does not stop to fault pages in.
    /// Never changes the contents, so it may run while I/O fills the same
    /// range. Returns false when the kernel does not support it.
    pub fn populate(&self, offset: u64, len: u64) -> bool {
        let start = (offset / 4096 * 4096).min(self.mapped as u64);
        let end = crate::units::align_up(offset + len, 4096).min(self.mapped as u64);
        if end <= start {
            return true;
        }
        // SAFETY: the range lies inside our mapping; MADV_POPULATE_WRITE
        // only faults pages in and never alters their contents.
        unsafe {
            rustix::mm::madvise(
                self.ptr.as_ptr().add(start as usize).cast(),
                (end - start) as usize,
                rustix::mm::Advice::LinuxPopulateWrite,
            )
        }
        .is_ok()
    }

    /// The bytes, for callers that own the region exclusively.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes are mapped and readable; `&self` excludes
        // `as_mut_slice` borrows.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len as usize) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len as usize) }
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`; no borrow
        // of it can outlive `self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.mapped) };
    }
}

impl Region for HostRegion {
    fn len(&self) -> u64 {
        self.len
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn host_ptr(&self) -> Option<*const u8> {
        Some(self.ptr.as_ptr())
    }
    fn host_ptr_mut(&self) -> Option<*mut u8> {
        Some(self.ptr.as_ptr())
    }
    fn host_capacity(&self) -> u64 {
        self.mapped as u64
    }
}
