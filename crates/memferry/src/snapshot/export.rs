//! Export a layout and its bytes as a safetensors file.
//! (Implementation in progress.)

use std::path::Path;

use serde::Serialize;

use super::layout::Layout;
use crate::memory::Region;
use crate::{Error, Result};

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    /// Number of tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Size of the resulting file.
    pub file_bytes: u64,
}

/// Writes `regions` (one per allocation of `layout`) to `to` as safetensors.
pub fn export_safetensors(layout: &Layout, regions: &[&dyn Region], to: &Path) -> Result<ExportSummary> {
    let _ = (layout, regions);
    Err(Error::Unsupported(format!("export not implemented yet: {}", to.display())))
}
