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
        if mapped < HUGE_PAGE {
            // SAFETY: an anonymous private mapping with no address hint has
            // no preconditions; the result is checked before use.
            let ptr = unsafe { map_anonymous(mapped) }
                .ctx(|| format!("allocating {len} bytes of host memory"))?;
            return Ok(Self::owning(ptr, len, mapped));
        }
        // Start on a 2 MiB boundary so every whole 2 MiB of the region can
        // be one transparent huge page: an O_DIRECT request built from huge
        // pages reaches the device in one piece, while one built from 4 KiB
        // pages is split at the device's segment limit. Map a huge page
        // more than needed, then give back the unaligned head and the tail.
        // SAFETY: as above.
        let raw = unsafe { map_anonymous(mapped + HUGE_PAGE) }
            .ctx(|| format!("allocating {len} bytes of host memory"))?;
        let head = (raw as usize).next_multiple_of(HUGE_PAGE) - raw as usize;
        let tail = HUGE_PAGE - head;
        // SAFETY: both ranges lie inside the mapping just created and are
        // never used again; `ptr..ptr+mapped` stays mapped.
        let ptr = unsafe {
            let ptr = raw.cast::<u8>().add(head);
            if head > 0 {
                let _ = rustix::mm::munmap(raw, head);
            }
            if tail > 0 {
                let _ = rustix::mm::munmap(ptr.add(mapped).cast(), tail);
            }
            // Failure only loses the hint.
            let _ = rustix::mm::madvise(ptr.cast(), mapped, rustix::mm::Advice::LinuxHugepage);
            ptr.cast()
        };
        Ok(Self::owning(ptr, len, mapped))
    }

    fn owning(ptr: *mut std::ffi::c_void, len: u64, mapped: usize) -> Self {
        Self {
            ptr: NonNull::new(ptr.cast()).expect("mmap never returns null on success"),
            len,
            mapped,
        }
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

/// Size of a transparent huge page on x86-64 and most arm64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// A fresh anonymous private read-write mapping of `len` bytes.
///
/// # Safety
/// None beyond those of `mmap` with no address hint; the caller owns the
/// mapping and must unmap it.
unsafe fn map_anonymous(len: usize) -> std::io::Result<*mut std::ffi::c_void> {
    // SAFETY: forwarded to the caller; no address hint, no file.
    unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
        )
    }
    .map_err(Into::into)
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
