//! Aligned staging buffers: the fixed budget of host memory through which
//! O_DIRECT I/O passes. Page-aligned, so any slice starting at a multiple of
//! 4096 satisfies direct-I/O alignment.

use super::HostRegion;
use crate::Result;

/// A page-aligned, zero-initialised host buffer of fixed size.
pub struct AlignedBuf {
    region: HostRegion,
}

impl AlignedBuf {
    /// Allocates `len` bytes aligned to the page size.
    pub fn new(len: usize) -> Result<Self> {
        Ok(Self {
            region: HostRegion::new(len as u64)?,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.region.as_slice().len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Start address (page-aligned).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.region.as_mut_slice().as_mut_ptr()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.region.as_slice()
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.region.as_mut_slice()
    }
}
