//! `safetensors:PATH[,PATH...]`: Hugging Face safetensors files as a source.
//! (Implementation in progress.)

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::SnapshotSource;
use crate::{Error, Result};

/// Prefix of the metadata key recording one tensor: `safetensors/tensor/<name>`.
pub const SAFETENSORS_TENSOR_KEY: &str = "safetensors/tensor/";
/// Prefix of the metadata key recording a file's `__metadata__`:
/// `safetensors/file/<index>`.
pub const SAFETENSORS_FILE_KEY: &str = "safetensors/file/";

/// What the metadata value of a tensor holds (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorMeta {
    /// Tensor name as in the file.
    pub name: String,
    /// safetensors dtype name, e.g. `BF16`.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// Opens safetensors files; each tensor becomes an allocation.
pub fn open_safetensors(paths: &[PathBuf]) -> Result<SnapshotSource> {
    Err(Error::Unsupported(format!("safetensors source not implemented yet: {paths:?}")))
}
