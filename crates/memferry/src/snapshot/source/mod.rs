//! What a snapshot is saved from: a layout plus one memory region per
//! allocation. Sources: `synthetic:SIZE` and `safetensors:PATH[,PATH...]`.

mod safetensors;
mod synthetic;

pub use safetensors::{SAFETENSORS_FILE_KEY, SAFETENSORS_TENSOR_KEY, TensorMeta, open_safetensors};
pub use synthetic::{SyntheticModel, fill_bytes, synthetic};

use super::layout::Layout;
use crate::memory::Region;
use crate::{Error, Result};

/// Memory to save: `regions[i]` holds the bytes of `layout.allocations[i]`.
pub struct SnapshotSource {
    /// How the source was named (recorded in the manifest).
    pub description: String,
    /// Allocations and metadata.
    pub layout: Layout,
    /// One region per allocation, same order, `regions[i].len() == size`.
    pub regions: Vec<Box<dyn Region>>,
}

impl SnapshotSource {
    /// Checks that the regions match the layout.
    pub fn validate(&self) -> Result<()> {
        self.layout.validate().map_err(Error::InvalidInput)?;
        if self.regions.len() != self.layout.allocations.len() {
            return Err(Error::InvalidInput(format!(
                "source has {} regions for {} allocations",
                self.regions.len(),
                self.layout.allocations.len()
            )));
        }
        for (a, r) in self.layout.allocations.iter().zip(&self.regions) {
            if r.len() != a.size {
                return Err(Error::InvalidInput(format!(
                    "allocation {} is {} bytes but its region holds {}",
                    a.id,
                    a.size,
                    r.len()
                )));
            }
        }
        Ok(())
    }
}

impl SnapshotSource {
    /// Copies every allocation onto `device` (e.g. `cuda:0`), so the save
    /// runs from device memory; the layout then names that device. `cpu`
    /// returns the source unchanged.
    pub fn to_device(self, device: crate::memory::Device) -> Result<SnapshotSource> {
        let crate::memory::Device::Cuda(n) = device else {
            return Ok(self);
        };
        crate::memory::cuda::check_device(device)?;
        let mut layout = self.layout;
        let mut regions: Vec<Box<dyn Region>> = Vec::with_capacity(self.regions.len());
        let mut bounce = Vec::new();
        for (a, src) in layout.allocations.iter_mut().zip(&self.regions) {
            let dst = crate::memory::CudaRegion::new(n, src.len())?;
            const STEP: u64 = 64 << 20;
            let mut off = 0;
            while off < src.len() {
                let len = STEP.min(src.len() - off) as usize;
                bounce.resize(len, 0);
                // SAFETY: nothing else uses the source or the fresh device
                // region while they are copied.
                unsafe {
                    src.copy_out(off, &mut bounce)?;
                    dst.copy_in(off, &bounce)?;
                }
                off += len as u64;
            }
            a.device = device;
            regions.push(Box::new(dst));
        }
        // The copies may return before their bytes land on the device.
        crate::memory::cuda::synchronize_regions(regions.iter().map(|r| &**r))?;
        Ok(SnapshotSource {
            description: self.description,
            layout,
            regions,
        })
    }
}

/// Opens a source from its command-line spelling.
pub fn open_source(spec: &str) -> Result<SnapshotSource> {
    let (kind, arg) = spec.split_once(':').unwrap_or((spec, ""));
    match kind {
        "synthetic" => {
            let size = if arg.is_empty() {
                1 << 30
            } else {
                crate::units::parse_size(arg)?
            };
            Ok(synthetic(size, 0)?.into_source())
        }
        "safetensors" => {
            let paths: Vec<std::path::PathBuf> = arg
                .split(',')
                .filter(|p| !p.is_empty())
                .map(Into::into)
                .collect();
            if paths.is_empty() {
                return Err(Error::InvalidInput(
                    "safetensors source needs at least one file: safetensors:PATH[,PATH...]".into(),
                ));
            }
            open_safetensors(&paths)
        }
        _ => Err(Error::InvalidInput(format!(
            "unknown source {spec:?}: use synthetic:SIZE (e.g. synthetic:1GiB) or safetensors:PATH[,PATH...]"
        ))),
    }
}
