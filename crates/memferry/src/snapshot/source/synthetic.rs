//! `synthetic:SIZE`: a deterministic, model-shaped set of allocations.
//!
//! The layout mixes one large allocation (split across shards), mid-size
//! ones, thousands-of-bytes tails that are not multiples of 4096, many tiny
//! ones and one zero-size allocation. Bytes are pseudo-random from a seed, so
//! any run can regenerate and compare them.

use super::SnapshotSource;
use crate::Result;
use crate::memory::{Device, HostRegion, Region};
use crate::snapshot::layout::{Allocation, Layout, MetadataEntry};

/// A synthetic model held in host memory.
pub struct SyntheticModel {
    /// Layout of the model.
    pub layout: Layout,
    /// The bytes, one region per allocation.
    pub regions: Vec<HostRegion>,
    /// Seed the bytes were generated from.
    pub seed: u64,
    /// Requested total size.
    pub size: u64,
}

impl SyntheticModel {
    /// Hands the model over as a save source.
    pub fn into_source(self) -> SnapshotSource {
        SnapshotSource {
            description: format!("synthetic:{}:seed={}", self.size, self.seed),
            layout: self.layout,
            regions: self
                .regions
                .into_iter()
                .map(|r| Box::new(r) as Box<dyn Region>)
                .collect(),
        }
    }
}

/// SplitMix64: tiny, fast, deterministic.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the deterministic bytes of allocation `id` under `seed`.
pub fn fill_bytes(seed: u64, id: u64, buf: &mut [u8]) {
    let mut state = seed ^ id.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut words = buf.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&splitmix(&mut state).to_le_bytes());
    }
    let rest = words.into_remainder();
    let last = splitmix(&mut state).to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&last[..n]);
}

/// Allocation sizes for a model of about `total` bytes.
fn sizes(total: u64, seed: u64) -> Vec<u64> {
    let mut rng = seed ^ 0x5eed;
    let mut out = vec![0u64]; // the zero-size allocation
    let mut left = total;
    let take = |want: u64, left: &mut u64, out: &mut Vec<u64>| {
        let n = want.min(*left);
        if n > 0 {
            out.push(n);
            *left -= n;
        }
    };
    // One large allocation: about 40%, deliberately not 4096-aligned.
    take(total * 2 / 5 + 1234, &mut left, &mut out);
    // Tiny ones (embeddings, norms, biases): a few hundred to 4 KiB.
    let tiny = (total / (1 << 20)).clamp(16, 2000);
    for _ in 0..tiny {
        take(1 + splitmix(&mut rng) % 5000, &mut left, &mut out);
    }
    // Mid-size ones, with tails, until the budget is used.
    let mid = (total / 24).max(64 << 10);
    while left > 0 {
        let n = mid / 2 + splitmix(&mut rng) % mid + splitmix(&mut rng) % 4096;
        take(n, &mut left, &mut out);
    }
    out
}

/// Builds a synthetic model of `size` bytes in host memory.
pub fn synthetic(size: u64, seed: u64) -> Result<SyntheticModel> {
    let sizes = sizes(size, seed);
    let mut layout = Layout::default();
    let mut regions = Vec::with_capacity(sizes.len());
    for (i, &s) in sizes.iter().enumerate() {
        let id = i as u64;
        layout.allocations.push(Allocation {
            id,
            size: s,
            device: Device::Cpu,
            tag: if s >= (1 << 20) { "weights" } else { "small" }.into(),
        });
        layout.metadata.push(MetadataEntry {
            key: format!("synthetic/alloc/{id}"),
            allocation_id: id,
            offset: 0,
            value: format!("{{\"seed\":{seed},\"bytes\":{s}}}").into_bytes(),
        });
        regions.push(HostRegion::new(s)?);
    }
    // Generate in parallel: the bytes of allocation i depend only on (seed, i).
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let cells: Vec<std::sync::Mutex<&mut HostRegion>> =
        regions.iter_mut().map(std::sync::Mutex::new).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(cell) = cells.get(i) else { return };
                    let mut region = cell.lock().expect("not poisoned");
                    fill_bytes(seed, i as u64, region.as_mut_slice());
                }
            });
        }
    });
    Ok(SyntheticModel {
        layout,
        regions,
        seed,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_the_promised_shapes() {
        let m = synthetic(8 << 20, 7).unwrap();
        let sizes: Vec<u64> = m.layout.allocations.iter().map(|a| a.size).collect();
        assert_eq!(sizes.iter().sum::<u64>(), 8 << 20);
        assert!(sizes.contains(&0), "one zero-size allocation");
        assert!(sizes.iter().any(|s| s % 4096 != 0 && *s > 4096), "tails");
        assert!(sizes.len() > 20, "many allocations");
        assert!(m.layout.validate().is_ok());
    }

    #[test]
    fn bytes_are_deterministic() {
        let a = synthetic(1 << 20, 3).unwrap();
        let b = synthetic(1 << 20, 3).unwrap();
        let c = synthetic(1 << 20, 4).unwrap();
        assert_eq!(a.regions[1].as_slice(), b.regions[1].as_slice());
        assert_ne!(a.regions[1].as_slice(), c.regions[1].as_slice());
    }
}
