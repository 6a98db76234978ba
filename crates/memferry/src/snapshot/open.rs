//! Opening a committed snapshot for reading: manifest, roots, and the load
//! plan, with every shard checked for presence and size first.

use std::path::{Path, PathBuf};

use super::manifest::Manifest;
use crate::transfer::{Direction, FileTarget, PlanBuilder, TransferPlan};
use crate::{Error, Result};

/// A committed snapshot, ready to be read.
#[derive(Debug, Clone)]
pub struct OpenedSnapshot {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// The validated manifest.
    pub manifest: Manifest,
    /// Directory of each root, by index.
    pub roots: Vec<PathBuf>,
}

impl OpenedSnapshot {
    /// Reads the manifest at `dir` and resolves roots: `roots` overrides the
    /// recorded ones and must list as many.
    pub fn open(dir: &Path, roots: Option<&[PathBuf]>) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        let resolved = match roots {
            Some(r) => {
                if r.len() != manifest.roots.len() {
                    return Err(Error::InvalidInput(format!(
                        "the snapshot at {} was striped over {} root(s) but --roots lists {}: pass them all, in the order used at save time",
                        dir.display(),
                        manifest.roots.len(),
                        r.len()
                    )));
                }
                r.to_vec()
            }
            None => manifest
                .roots
                .iter()
                .map(|r| {
                    if r.recorded_path == "." {
                        dir.to_path_buf()
                    } else {
                        dir.join(&r.recorded_path)
                    }
                })
                .collect(),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            roots: resolved,
        })
    }

    /// Path of shard `i`.
    pub fn shard_path(&self, i: usize) -> PathBuf {
        self.manifest.shard_path(i, &self.roots)
    }

    /// Builds the load plan (region `i` = allocation `i`) and the expected
    /// checksum table. Missing and short shards fail here, by name.
    pub fn load_plan(&self, io_chunk: u64) -> Result<(TransferPlan, Vec<u32>)> {
        let m = &self.manifest;
        let mut first_use: Vec<Option<(u64, u64)>> = vec![None; m.shards.len()];
        for a in &m.allocations {
            for e in &a.extents {
                first_use[e.shard].get_or_insert((e.offset, e.length));
            }
        }
        let mut b = PlanBuilder::new(Direction::Load, m.checksum.chunk_bytes, io_chunk);
        for (i, s) in m.shards.iter().enumerate() {
            let path = self.shard_path(i);
            let (offset, length) = first_use[i].unwrap_or((0, 0));
            let meta = std::fs::metadata(&path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::MissingShard {
                        path: path.clone(),
                        offset,
                        length,
                    }
                } else {
                    Error::io(format!("inspecting {}", path.display()), e)
                }
            })?;
            if meta.len() < s.size {
                let (offset, length) = m
                    .allocations
                    .iter()
                    .flat_map(|a| &a.extents)
                    .filter(|e| e.shard == i && e.offset + e.length > meta.len())
                    .map(|e| (e.offset, e.length))
                    .next()
                    .unwrap_or((meta.len(), s.size - meta.len()));
                return Err(Error::Truncated {
                    path,
                    offset,
                    length,
                    file_size: meta.len(),
                });
            }
            b.add_file(FileTarget {
                path,
                root: s.root,
                size: s.size,
            });
        }
        let mut sums = Vec::new();
        for (region, a) in m.allocations.iter().enumerate() {
            for e in &a.extents {
                let first = b.add_extent(e.shard, e.offset, e.length, region, e.alloc_offset);
                debug_assert_eq!(first, sums.len());
                sums.extend_from_slice(&e.crc32c);
            }
        }
        Ok((b.build(), sums))
    }
}
