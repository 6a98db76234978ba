//! Export a layout and its bytes as a safetensors file.
//!
//! Tensors recorded by the safetensors source (`safetensors/tensor/<name>`
//! metadata) are written back under their own name, dtype and shape; every
//! other allocation is written as a flat `U8` tensor named `allocation/<id>`.
//! The bytes are streamed straight from the regions, never gathered into one
//! buffer, and the file is published atomically.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensorError, View};
use serde::Serialize;

use super::layout::Layout;
use super::source::{SAFETENSORS_FILE_KEY, SAFETENSORS_TENSOR_KEY, TensorMeta};
use crate::error::IoContext;
use crate::memory::{self, Region};
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

/// One tensor to write: borrowed bytes of one region.
struct RegionView<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

impl View for RegionView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `regions` (one per allocation of `layout`) to `to` as safetensors.
///
/// Guarantees:
/// - each `safetensors/tensor/<name>` entry becomes a tensor with its
///   recorded name, dtype and shape, holding the whole allocation it points
///   to; every allocation no such entry names becomes a `U8` tensor
///   `allocation/<id>` of shape `[size]`;
/// - the maps of all `safetensors/file/<index>` entries are merged into the
///   file's `__metadata__` (on a conflicting key, the later entry wins);
/// - bytes are read in place from the regions (which must be host-readable
///   and must not be written during the call), never copied into one buffer;
/// - `to` is replaced atomically: the data goes to a temporary file in the
///   same directory, is fsynced, renamed over `to` and the directory is
///   fsynced; on an error before the rename the temporary file is removed
///   and `to` is untouched.
pub fn export_safetensors(
    layout: &Layout,
    regions: &[&dyn Region],
    to: &Path,
) -> Result<ExportSummary> {
    let target = Target::check(to)?;

    layout
        .validate()
        .map_err(|e| Error::InvalidInput(format!("cannot export an invalid layout: {e}")))?;
    if regions.len() != layout.allocations.len() {
        return Err(Error::InvalidInput(format!(
            "export got {} regions for {} allocations; pass one region per allocation",
            regions.len(),
            layout.allocations.len()
        )));
    }
    let mut bytes: Vec<&[u8]> = Vec::with_capacity(regions.len());
    for (a, &r) in layout.allocations.iter().zip(regions) {
        if r.len() != a.size {
            return Err(Error::InvalidInput(format!(
                "allocation {} is {} bytes but its region holds {}; pass the regions in layout order",
                a.id,
                a.size,
                r.len()
            )));
        }
        // SAFETY: regions are only written through `Region::copy_in` or
        // `host_ptr_mut`, whose contracts require exclusive access to the
        // bytes written; this function documents that the regions must not be
        // written while it runs, and the slices do not outlive the call.
        let Some(b) = (unsafe { memory::host_bytes(r) }) else {
            return Err(Error::Unsupported(format!(
                "allocation {} lives in {} memory, which the host cannot read; export needs host memory (restore to cpu first)",
                a.id,
                r.device()
            )));
        };
        bytes.push(b);
    }

    let index_of: HashMap<u64, usize> = layout
        .allocations
        .iter()
        .enumerate()
        .map(|(i, a)| (a.id, i))
        .collect();
    let mut named = vec![false; layout.allocations.len()];
    let mut tensors: Vec<(String, RegionView<'_>)> = Vec::with_capacity(layout.allocations.len());
    let mut file_meta: HashMap<String, String> = HashMap::new();

    for entry in &layout.metadata {
        if entry.key.starts_with(SAFETENSORS_TENSOR_KEY) {
            let meta: TensorMeta = serde_json::from_slice(&entry.value).map_err(|e| {
                Error::InvalidInput(format!(
                    "metadata {:?} does not hold a tensor description ({e}); the snapshot was not saved from safetensors by this memferry",
                    entry.key
                ))
            })?;
            if entry.offset != 0 {
                return Err(Error::InvalidInput(format!(
                    "tensor {:?} starts at offset {} of allocation {}; export only supports tensors that fill their allocation",
                    meta.name, entry.offset, entry.allocation_id
                )));
            }
            let i = index_of[&entry.allocation_id]; // `validate` checked it exists
            let dtype = parse_dtype(&meta)?;
            check_size(&meta, dtype, layout.allocations[i].size)?;
            named[i] = true;
            tensors.push((
                meta.name,
                RegionView {
                    dtype,
                    shape: meta.shape,
                    data: bytes[i],
                },
            ));
        } else if entry.key.starts_with(SAFETENSORS_FILE_KEY) {
            let map: HashMap<String, String> = serde_json::from_slice(&entry.value).map_err(|e| {
                Error::InvalidInput(format!(
                    "metadata {:?} does not hold a string map ({e}); the snapshot was not saved from safetensors by this memferry",
                    entry.key
                ))
            })?;
            file_meta.extend(map);
        }
    }

    for (i, a) in layout.allocations.iter().enumerate() {
        if !named[i] {
            tensors.push((
                format!("allocation/{}", a.id),
                RegionView {
                    dtype: Dtype::U8,
                    shape: vec![bytes[i].len()],
                    data: bytes[i],
                },
            ));
        }
    }

    let mut seen = HashSet::with_capacity(tensors.len());
    for (name, _) in &tensors {
        if !seen.insert(name.as_str()) {
            return Err(Error::InvalidInput(format!(
                "two tensors would be named {name:?} in the export; rename the tensor so it does not clash with allocation/<id>"
            )));
        }
    }

    let summary_tensors = tensors.len();
    let data_bytes: u64 = tensors.iter().map(|(_, t)| t.data.len() as u64).sum();
    let info = (!file_meta.is_empty()).then_some(file_meta);
    let file_bytes = target.write(tensors, info)?;
    Ok(ExportSummary {
        tensors: summary_tensors,
        bytes: data_bytes,
        file_bytes,
    })
}

/// Parses the dtype name of a tensor description.
fn parse_dtype(meta: &TensorMeta) -> Result<Dtype> {
    serde_json::from_value(serde_json::Value::String(meta.dtype.clone())).map_err(|_| {
        Error::InvalidInput(format!(
            "tensor {:?} has dtype {:?}, which this build's safetensors does not know; upgrade memferry",
            meta.name, meta.dtype
        ))
    })
}

/// Checks that `shape` of `dtype` occupies exactly `size` bytes.
///
/// Computed in bits, so sub-byte dtypes (e.g. `F4`) are checked too.
fn check_size(meta: &TensorMeta, dtype: Dtype, size: u64) -> Result<()> {
    let bits = meta
        .shape
        .iter()
        .try_fold(dtype.bitsize() as u64, |acc, &d| acc.checked_mul(d as u64));
    match bits {
        Some(bits) if bits.is_multiple_of(8) && bits / 8 == size => Ok(()),
        _ => Err(Error::InvalidInput(format!(
            "tensor {:?} ({} {:?}) needs {} bits but its allocation holds {size} bytes; the layout's tensor metadata is inconsistent",
            meta.name,
            meta.dtype,
            meta.shape,
            bits.map_or_else(|| "more than 2^64".to_string(), |b| b.to_string()),
        ))),
    }
}

/// A checked export destination.
struct Target<'a> {
    to: &'a Path,
    dir: PathBuf,
    tmp: PathBuf,
}

impl<'a> Target<'a> {
    /// Rejects destinations that cannot become a file: a directory, a path
    /// without a file name, or one whose parent directory does not exist.
    fn check(to: &'a Path) -> Result<Self> {
        let Some(name) = to.file_name() else {
            return Err(Error::InvalidInput(format!(
                "{} does not name a file; pass a path such as model.safetensors",
                to.display()
            )));
        };
        if to.is_dir() {
            return Err(Error::InvalidInput(format!(
                "{} is a directory; pass a file path such as {}",
                to.display(),
                to.join("model.safetensors").display()
            )));
        }
        let dir = match to.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(Error::InvalidInput(format!(
                "cannot export to {}: directory {} does not exist; create it first",
                to.display(),
                dir.display()
            )));
        }
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        Ok(Self { to, dir, tmp })
    }

    /// Writes the file durably and atomically; returns its size.
    fn write(
        &self,
        tensors: Vec<(String, RegionView<'_>)>,
        info: Option<HashMap<String, String>>,
    ) -> Result<u64> {
        // Claim the temporary name (failing if another export holds it) and
        // learn the mode a new file gets here (umask applied).
        let placeholder = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.tmp)
            .ctx(|| format!("creating temporary file {}", self.tmp.display()))?;
        let result = (|| {
            let mode = placeholder
                .metadata()
                .ctx(|| format!("reading {}", self.tmp.display()))?
                .permissions();
            drop(placeholder);
            // safetensors writes its own sibling temporary file and renames
            // it over ours; ours then gets the usual mode, is synced, and
            // only then published.
            safetensors::serialize_to_file(tensors, info, &self.tmp).map_err(|e| match e {
                SafeTensorError::IoError(e) => {
                    Error::io(format!("writing {}", self.tmp.display()), e)
                }
                e => Error::InvalidInput(format!("cannot export to {}: {e}", self.to.display())),
            })?;
            let file = File::open(&self.tmp).ctx(|| format!("opening {}", self.tmp.display()))?;
            file.set_permissions(mode)
                .ctx(|| format!("setting the mode of {}", self.tmp.display()))?;
            file.sync_all()
                .ctx(|| format!("syncing {}", self.tmp.display()))?;
            let len = file
                .metadata()
                .ctx(|| format!("reading the size of {}", self.tmp.display()))?
                .len();
            fs::rename(&self.tmp, self.to)
                .ctx(|| format!("renaming {} to {}", self.tmp.display(), self.to.display()))?;
            Ok(len)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        let len = result?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("syncing directory {}", self.dir.display()))?;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(dtype: &str, shape: &[usize]) -> TensorMeta {
        TensorMeta {
            name: "t".into(),
            dtype: dtype.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn sizes_are_checked_in_bits() {
        let m = meta("F32", &[3, 7]);
        assert!(check_size(&m, Dtype::F32, 84).is_ok());
        assert!(check_size(&m, Dtype::F32, 83).is_err());
        let m = meta("F4", &[6]);
        assert!(check_size(&m, Dtype::F4, 3).is_ok());
        assert!(check_size(&m, Dtype::F4, 4).is_err());
        let m = meta("F4", &[3]);
        assert!(check_size(&m, Dtype::F4, 1).is_err(), "half a byte");
        let m = meta("U8", &[usize::MAX, usize::MAX]);
        assert!(check_size(&m, Dtype::U8, 0).is_err(), "overflow");
        let m = meta("U8", &[0]);
        assert!(check_size(&m, Dtype::U8, 0).is_ok());
    }

    #[test]
    fn unknown_dtype_is_rejected() {
        assert!(parse_dtype(&meta("F33", &[1])).is_err());
        assert_eq!(parse_dtype(&meta("BF16", &[1])).unwrap(), Dtype::BF16);
    }
}
