//! A sink region: accepts writes and drops them. `verify` streams a snapshot
//! through the normal read path into these, so every byte is checked without
//! holding the snapshot in memory.

use super::{Device, Region, check_range};
use crate::Result;

/// A region of `len` bytes that discards everything written into it.
pub struct DiscardRegion {
    len: u64,
}

impl DiscardRegion {
    /// A sink of `len` bytes.
    pub fn new(len: u64) -> Self {
        Self { len }
    }
}

impl Region for DiscardRegion {
    fn len(&self) -> u64 {
        self.len
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    unsafe fn copy_in(&self, offset: u64, src: &[u8]) -> Result<()> {
        check_range(self.len, offset, src.len())
    }
    unsafe fn copy_out(&self, _offset: u64, _dst: &mut [u8]) -> Result<()> {
        Err(crate::Error::Unsupported(
            "a discard region holds no bytes to read".into(),
        ))
    }
}
