//! Snapshot format v1: the manifest (`manifest.json`).
//!
//! The manifest is the commit point: a snapshot exists exactly when its
//! directory holds a manifest that parses and validates. It records the
//! layout, the metadata, every shard (root index + path relative to that
//! root) and, per allocation, the extents holding its bytes with one CRC32C
//! per checksum chunk. See docs/format.md.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::layout::{Allocation, Layout, MetadataEntry};
use crate::integrity::chunk_count;
use crate::units::align_up;
use crate::{Error, Result};

/// The format this build writes and reads.
pub const FORMAT_VERSION: u64 = 1;
/// File name of the manifest inside a snapshot directory.
pub const MANIFEST_NAME: &str = "manifest.json";
/// Value of the `kind` field.
pub const KIND: &str = "memferry-snapshot";

/// Identity of a save: which snapshot lineage it belongs to and which save
/// produced it (used to prove ownership during gc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveIdentity {
    /// Directory name of the snapshot at save time.
    pub name: String,
    /// Stable across re-saves to the same path.
    pub lineage: String,
    /// Unique per save.
    pub save_id: String,
}

/// Checksum scheme.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumSpec {
    /// Always `crc32c` in v1.
    pub algorithm: String,
    /// Bytes per checksum (multiple of 4096).
    pub chunk_bytes: u64,
}

/// A storage root, by index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootEntry {
    /// Index used by shards.
    pub index: usize,
    /// Where the root was at save time: `.` is the snapshot directory
    /// itself; anything else is only the default for restore, which takes
    /// `--roots` to override it.
    pub recorded_path: String,
}

impl RootEntry {
    /// The one root of a snapshot that holds its own shards (`.`).
    pub fn here() -> Self {
        Self {
            index: 0,
            recorded_path: ".".into(),
        }
    }
}

/// A shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Index used by extents.
    pub index: usize,
    /// Root holding the shard.
    pub root: usize,
    /// Path relative to the root (no `..`, not absolute).
    pub path: String,
    /// File size in bytes, padding included (multiple of the alignment).
    pub size: u64,
}

/// A run of an allocation's bytes stored contiguously in one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Shard index.
    pub shard: usize,
    /// Byte offset in the shard (aligned).
    pub offset: u64,
    /// Payload bytes.
    pub length: u64,
    /// Where these bytes start inside the allocation.
    pub alloc_offset: u64,
    /// One CRC32C per checksum chunk of this extent.
    pub crc32c: Vec<u32>,
}

/// An allocation and the extents holding its bytes, in allocation order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationEntry {
    /// The allocation.
    #[serde(flatten)]
    pub allocation: Allocation,
    /// Extents covering `0..size` in order.
    pub extents: Vec<Extent>,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version (1).
    pub format_version: u64,
    /// Always `memferry-snapshot`.
    pub kind: String,
    /// Save identity.
    pub identity: SaveIdentity,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// How the source was named.
    pub source: String,
    /// Alignment of every extent offset and shard size (4096).
    pub alignment: u64,
    /// Checksum scheme.
    pub checksum: ChecksumSpec,
    /// Sum of allocation sizes.
    pub total_bytes: u64,
    /// Storage roots.
    pub roots: Vec<RootEntry>,
    /// Shard files.
    pub shards: Vec<ShardEntry>,
    /// Allocations in layout order with their extents.
    pub allocations: Vec<AllocationEntry>,
    /// Metadata entries.
    pub metadata: Vec<MetadataEntry>,
}

impl Manifest {
    /// The layout this manifest describes.
    pub fn layout(&self) -> Layout {
        Layout {
            allocations: self
                .allocations
                .iter()
                .map(|a| a.allocation.clone())
                .collect(),
            metadata: self.metadata.clone(),
        }
    }

    /// Reads and validates `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_NAME);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoSnapshot {
                    path: dir.to_path_buf(),
                    reason: if dir.is_dir() {
                        "the directory holds no manifest.json (nothing was committed; an interrupted save leaves nothing visible, `memferry gc` removes its leftovers)".into()
                    } else {
                        "the path does not exist or is not a directory".into()
                    },
                });
            }
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        Self::parse(&text, &path)
    }

    /// Parses and validates manifest bytes; `path` is used in messages.
    pub fn parse(text: &[u8], path: &Path) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidManifest {
            path: path.to_path_buf(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let version = value
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| invalid("no numeric format_version field".into()))?;
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedFormat {
                path: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| invalid(format!("malformed: {e}")))?;
        manifest.validate().map_err(invalid)?;
        Ok(manifest)
    }

    /// Serialises the manifest (pretty JSON).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("manifest serialises")
    }

    /// Checks every structural promise of the format; the message says what
    /// is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.kind != KIND {
            return Err(format!("kind is {:?}, expected {KIND:?}", self.kind));
        }
        if self.alignment < 512 || !self.alignment.is_power_of_two() {
            return Err(format!(
                "alignment {} is not a power of two >= 512",
                self.alignment
            ));
        }
        if self.checksum.algorithm != "crc32c" {
            return Err(format!(
                "unknown checksum algorithm {:?}",
                self.checksum.algorithm
            ));
        }
        let chunk = self.checksum.chunk_bytes;
        if chunk == 0 || !chunk.is_multiple_of(self.alignment) {
            return Err(format!(
                "checksum chunk_bytes {chunk} is not a multiple of the alignment"
            ));
        }
        for (i, r) in self.roots.iter().enumerate() {
            if r.index != i {
                return Err(format!("root {i} has index {}", r.index));
            }
        }
        let mut seen = HashSet::new();
        for (i, s) in self.shards.iter().enumerate() {
            if s.index != i {
                return Err(format!("shard {i} has index {}", s.index));
            }
            if s.root >= self.roots.len() {
                return Err(format!(
                    "shard {i} names root {} which does not exist",
                    s.root
                ));
            }
            check_relative(&s.path).map_err(|e| format!("shard {i} path {:?}: {e}", s.path))?;
            if s.size % self.alignment != 0 {
                return Err(format!("shard {i} size {} is not aligned", s.size));
            }
            if !seen.insert((s.root, normalise(&s.path))) {
                return Err(format!(
                    "shard path {:?} appears twice on root {}",
                    s.path, s.root
                ));
            }
        }
        let mut used: Vec<(usize, u64, u64)> = Vec::new();
        let mut total = 0u64;
        for a in &self.allocations {
            let id = a.allocation.id;
            let mut next = 0u64;
            for e in &a.extents {
                let shard = self.shards.get(e.shard).ok_or_else(|| {
                    format!(
                        "allocation {id} names shard {} which does not exist",
                        e.shard
                    )
                })?;
                if e.alloc_offset != next || e.length == 0 {
                    return Err(format!(
                        "allocation {id}: extents do not tile the allocation"
                    ));
                }
                if e.offset % self.alignment != 0 {
                    return Err(format!(
                        "allocation {id}: extent offset {} is not aligned",
                        e.offset
                    ));
                }
                let end = e
                    .offset
                    .checked_add(align_up(e.length, self.alignment))
                    .ok_or_else(|| format!("allocation {id}: extent overflows"))?;
                if end > shard.size {
                    return Err(format!(
                        "allocation {id}: extent {}+{} lies outside shard {} ({} bytes)",
                        e.offset, e.length, e.shard, shard.size
                    ));
                }
                if e.crc32c.len() != chunk_count(e.length, chunk) {
                    return Err(format!(
                        "allocation {id}: wrong number of checksums in an extent"
                    ));
                }
                used.push((e.shard, e.offset, end));
                next += e.length;
            }
            if next != a.allocation.size {
                return Err(format!(
                    "allocation {id}: extents hold {next} bytes, size is {}",
                    a.allocation.size
                ));
            }
            total += a.allocation.size;
        }
        if total != self.total_bytes {
            return Err(format!(
                "total_bytes {} disagrees with the allocations ({total})",
                self.total_bytes
            ));
        }
        used.sort_unstable();
        for w in used.windows(2) {
            if w[0].0 == w[1].0 && w[1].1 < w[0].2 {
                return Err(format!("two extents overlap in shard {}", w[0].0));
            }
        }
        self.layout().validate()
    }

    /// Where shard `i` lives, given the directories of the roots.
    pub fn shard_path(&self, i: usize, roots: &[PathBuf]) -> PathBuf {
        let s = &self.shards[i];
        roots[s.root].join(&s.path)
    }
}

/// Accepts only plain relative paths: no root, no `..`, no `.`-only.
fn check_relative(p: &str) -> std::result::Result<(), &'static str> {
    let path = Path::new(p);
    if p.is_empty() {
        return Err("empty");
    }
    let mut normal = 0;
    for c in path.components() {
        match c {
            Component::Normal(_) => normal += 1,
            Component::CurDir => {}
            Component::ParentDir => return Err("escapes its root with `..`"),
            Component::RootDir | Component::Prefix(_) => return Err("is absolute"),
        }
    }
    if normal == 0 {
        return Err("names no file");
    }
    Ok(())
}

fn normalise(p: &str) -> PathBuf {
    Path::new(p)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_only() {
        assert!(check_relative("shards/shard-00000.bin").is_ok());
        assert!(check_relative("./a").is_ok());
        assert!(check_relative("/etc/passwd").is_err());
        assert!(check_relative("../x").is_err());
        assert!(check_relative("a/../../x").is_err());
        assert!(check_relative(".").is_err());
        assert!(check_relative("").is_err());
    }
}
