//! Read-only regions backed by a memory-mapped file (e.g. a tensor inside a
//! safetensors file), so saving a model never copies it into RAM first.

use std::sync::Arc;

use memmap2::Mmap;

use super::{Device, Region};

/// A read-only window `offset..offset+len` of a mapped file.
pub struct MappedRegion {
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
}

impl MappedRegion {
    /// A window of `map`; panics if it is out of bounds (callers validate).
    pub fn new(map: Arc<Mmap>, offset: usize, len: usize) -> Self {
        assert!(offset + len <= map.len(), "window outside the mapping");
        Self { map, offset, len }
    }
}

impl Region for MappedRegion {
    fn len(&self) -> u64 {
        self.len as u64
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn host_ptr(&self) -> Option<*const u8> {
        Some(self.map[self.offset..].as_ptr())
    }
    fn host_ptr_mut(&self) -> Option<*mut u8> {
        None
    }
}
