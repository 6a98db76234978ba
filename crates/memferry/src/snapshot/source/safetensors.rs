//! `safetensors:PATH[,PATH...]`: Hugging Face safetensors files as a source.
//!
//! Every file is memory-mapped read-only and every tensor becomes one
//! allocation whose region is a window of that mapping, so saving a model
//! never copies it into RAM first. Tensor names, dtypes and shapes, and each
//! file's `__metadata__`, are kept as layout metadata so that
//! [`export_safetensors`](crate::snapshot::export::export_safetensors) can
//! write the same tensors back.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::SnapshotSource;
use crate::memory::{Device, MappedRegion, Region};
use crate::snapshot::layout::{Allocation, Layout, MetadataEntry};
use crate::{Error, Result};

/// Prefix of the metadata key recording one tensor: `safetensors/tensor/<name>`.
pub const SAFETENSORS_TENSOR_KEY: &str = "safetensors/tensor/";
/// Prefix of the metadata key recording a file's `__metadata__`:
/// `safetensors/file/<index>`.
pub const SAFETENSORS_FILE_KEY: &str = "safetensors/file/";

/// Size of the little-endian header-length prefix of a safetensors file.
const HEADER_LEN_PREFIX: usize = 8;

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
///
/// Guarantees:
/// - allocations follow the files in the order given and, inside a file, the
///   tensors in the order of their data offsets (ties, i.e. zero-size
///   tensors, broken by name), with ids `0, 1, 2, ...`, tag `tensor`, device
///   [`Device::Cpu`];
/// - each region is a read-only window of the file's mapping: no tensor byte
///   is copied;
/// - every tensor has a `safetensors/tensor/<name>` metadata entry holding a
///   JSON [`TensorMeta`]; every file with a `__metadata__` map and at least
///   one tensor has a `safetensors/file/<index>` entry holding that map as a
///   JSON object, pointing at the file's first allocation;
/// - headers are fully validated (offsets contiguous and inside the file,
///   sizes matching dtype and shape), and a tensor name present in two files
///   is rejected.
///
/// The files must not be modified or truncated while the source is alive.
pub fn open_safetensors(paths: &[PathBuf]) -> Result<SnapshotSource> {
    let mut layout = Layout::default();
    let mut regions: Vec<Box<dyn Region>> = Vec::new();
    // Tensor name -> index in `paths` of the file that defines it.
    let mut owners: HashMap<String, usize> = HashMap::new();

    for (file_index, path) in paths.iter().enumerate() {
        let map = map_file(path)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            Error::InvalidInput(format!(
                "{} is not a valid safetensors file ({e}); pass files written in the safetensors format",
                path.display()
            ))
        })?;
        let data_start = HEADER_LEN_PREFIX + header_len;

        let mut tensors: Vec<_> = metadata.tensors().into_iter().collect();
        tensors.sort_by(|(a_name, a), (b_name, b)| {
            a.data_offsets
                .cmp(&b.data_offsets)
                .then_with(|| a_name.cmp(b_name))
        });

        let first_id = layout.allocations.len() as u64;
        for (name, info) in tensors {
            if let Some(&other) = owners.get(&name) {
                return Err(Error::InvalidInput(format!(
                    "tensor {name:?} appears in both {} and {}; pass files with distinct tensor names",
                    paths[other].display(),
                    path.display()
                )));
            }
            let (start, end) = info.data_offsets;
            let id = layout.allocations.len() as u64;
            let meta = TensorMeta {
                name: name.clone(),
                dtype: dtype_name(info.dtype)?,
                shape: info.shape.clone(),
            };
            layout.metadata.push(MetadataEntry {
                key: format!("{SAFETENSORS_TENSOR_KEY}{name}"),
                allocation_id: id,
                offset: 0,
                value: serde_json::to_vec(&meta).map_err(|e| {
                    Error::InvalidInput(format!("cannot encode metadata of tensor {name:?}: {e}"))
                })?,
            });
            layout.allocations.push(Allocation {
                id,
                size: (end - start) as u64,
                device: Device::Cpu,
                tag: "tensor".into(),
            });
            // `read_metadata` checked that the offsets are contiguous and end
            // exactly at the end of the file, so the window is in bounds.
            regions.push(Box::new(MappedRegion::new(
                Arc::clone(&map),
                data_start + start,
                end - start,
            )));
            owners.insert(name, file_index);
        }

        let has_tensors = layout.allocations.len() as u64 > first_id;
        if let Some(file_meta) = metadata.metadata()
            && has_tensors
        {
            // Sorted, so the recorded bytes do not depend on hash order.
            let sorted: BTreeMap<&String, &String> = file_meta.iter().collect();
            layout.metadata.push(MetadataEntry {
                key: format!("{SAFETENSORS_FILE_KEY}{file_index}"),
                allocation_id: first_id,
                offset: 0,
                value: serde_json::to_vec(&sorted).map_err(|e| {
                    Error::InvalidInput(format!(
                        "cannot encode the __metadata__ of {}: {e}",
                        path.display()
                    ))
                })?,
            });
        }
    }

    let description = format!(
        "safetensors:{}",
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(SnapshotSource {
        description,
        layout,
        regions,
    })
}

/// Opens `path` read-only and maps it whole.
fn map_file(path: &Path) -> Result<Arc<Mmap>> {
    let file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::InvalidInput(format!(
            "safetensors file {} does not exist; check the path",
            path.display()
        )),
        _ => Error::io(format!("opening safetensors file {}", path.display()), e),
    })?;
    let stat = file
        .metadata()
        .map_err(|e| Error::io(format!("reading the size of {}", path.display()), e))?;
    if !stat.is_file() {
        return Err(Error::InvalidInput(format!(
            "{} is not a regular file; pass safetensors files",
            path.display()
        )));
    }
    // SAFETY: the mapping is read-only and private to this process. Its
    // contents can only change if someone modifies the file on disk, which
    // the contract of `open_safetensors` rules out for the source's lifetime.
    let map = unsafe { Mmap::map(&file) }
        .map_err(|e| Error::io(format!("memory-mapping {}", path.display()), e))?;
    Ok(Arc::new(map))
}

/// The safetensors spelling of `dtype` (e.g. `BF16`), as in file headers.
fn dtype_name(dtype: safetensors::Dtype) -> Result<String> {
    match serde_json::to_value(dtype) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        _ => Err(Error::Unsupported(format!(
            "safetensors dtype {dtype:?} has no name this build understands"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;

    #[test]
    fn dtype_names_match_the_file_format() {
        assert_eq!(dtype_name(Dtype::BF16).unwrap(), "BF16");
        assert_eq!(dtype_name(Dtype::F8_E4M3).unwrap(), "F8_E4M3");
        assert_eq!(dtype_name(Dtype::U8).unwrap(), "U8");
    }

    #[test]
    fn directory_is_rejected_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_safetensors(&[dir.path().to_path_buf()])
            .err()
            .expect("a directory is not a safetensors file");
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }
}
