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
use crate::{Error, Result};

/// The format this build writes and reads.
pub const FORMAT_VERSION: u64 = 1;
/// File name of the manifest inside a snapshot directory.
pub const MANIFEST_NAME: &str = "manifest.json";
/// Value of the `kind` field.
pub const KIND: &str = "memferry-snapshot";
/// The `alignment` of format v1: every extent offset and shard size is a
/// multiple of it.
pub const ALIGNMENT: u64 = crate::transfer::IO_ALIGN;
/// Largest `checksum.chunk_bytes` a manifest may name (1 GiB): a chunk is
/// verified as one piece, so readers hold up to this much at once.
pub const MAX_CHECKSUM_CHUNK: u64 = 1 << 30;

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
        if self.alignment != ALIGNMENT {
            return Err(format!(
                "alignment {} is not {ALIGNMENT} (format v1 stores every extent {ALIGNMENT}-aligned)",
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
        if chunk == 0 || !chunk.is_multiple_of(self.alignment) || chunk > MAX_CHECKSUM_CHUNK {
            return Err(format!(
                "checksum chunk_bytes {chunk} is not a multiple of the alignment between {ALIGNMENT} and {MAX_CHECKSUM_CHUNK}"
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
                // Only the last extent may end between aligned offsets:
                // whole-block reads of an earlier one would reach the next.
                if e.length % self.alignment != 0
                    && e.alloc_offset.saturating_add(e.length) < a.allocation.size
                {
                    return Err(format!(
                        "allocation {id}: extent at {} of {} bytes is not the last, so its length must be a multiple of {}",
                        e.alloc_offset, e.length, self.alignment
                    ));
                }
                let overflows = || {
                    format!(
                        "allocation {id}: extent {}+{} runs past the largest file offset",
                        e.offset, e.length
                    )
                };
                let end = e
                    .length
                    .checked_next_multiple_of(self.alignment)
                    .and_then(|padded| e.offset.checked_add(padded))
                    .ok_or_else(overflows)?;
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
                next = next.checked_add(e.length).ok_or_else(overflows)?;
            }
            if next != a.allocation.size {
                return Err(format!(
                    "allocation {id}: extents hold {next} bytes, size is {}",
                    a.allocation.size
                ));
            }
            total = total
                .checked_add(a.allocation.size)
                .ok_or_else(|| "the allocation sizes add up past 2^64 bytes".to_string())?;
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

    /// A valid manifest: one 8 KiB shard holding one 5000-byte allocation.
    fn valid() -> serde_json::Value {
        serde_json::json!({
            "format_version": 1,
            "kind": "memferry-snapshot",
            "identity": { "name": "snap", "lineage": "l", "save_id": "s" },
            "created_unix_ms": 0,
            "source": "test",
            "alignment": 4096,
            "checksum": { "algorithm": "crc32c", "chunk_bytes": 1048576 },
            "total_bytes": 5000,
            "roots": [ { "index": 0, "recorded_path": "." } ],
            "shards": [ { "index": 0, "root": 0, "path": "shards/shard-00000.bin", "size": 8192 } ],
            "allocations": [
                { "id": 0, "size": 5000, "device": "cpu", "tag": "t",
                  "extents": [ { "shard": 0, "offset": 0, "length": 5000, "alloc_offset": 0,
                                 "crc32c": [ 1 ] } ] }
            ],
            "metadata": []
        })
    }

    fn parse(v: &serde_json::Value) -> Result<Manifest> {
        Manifest::parse(&serde_json::to_vec(v).unwrap(), Path::new("m.json"))
    }

    /// `edit` applied to the valid manifest makes it fail to load with a
    /// message containing `needle` (and no panic).
    fn rejected(edit: impl FnOnce(&mut serde_json::Value), needle: &str) {
        let mut v = valid();
        edit(&mut v);
        let e = parse(&v).expect_err(needle).to_string();
        assert!(e.contains(needle), "{e}");
    }

    /// Only an allocation's last extent may have an unaligned length.
    #[test]
    fn an_unaligned_extent_before_the_last_is_rejected() {
        let split = |first: u64| {
            move |v: &mut serde_json::Value| {
                v["allocations"][0]["extents"] = serde_json::json!([
                    { "shard": 0, "offset": 0, "length": first, "alloc_offset": 0, "crc32c": [1] },
                    { "shard": 0, "offset": 4096, "length": 5000 - first,
                      "alloc_offset": first, "crc32c": [1] }
                ]);
            }
        };
        rejected(split(3000), "is not the last");
        let mut v = valid();
        split(4096)(&mut v);
        parse(&v).expect("an aligned first extent and an unaligned last one");
    }

    #[test]
    fn crafted_sizes_and_alignments_are_rejected_without_overflow() {
        parse(&valid()).unwrap();
        // Alignment other than 4096, also with offsets on it.
        rejected(|v| v["alignment"] = 512.into(), "alignment 512");
        rejected(
            |v| {
                v["alignment"] = 512.into();
                v["checksum"]["chunk_bytes"] = 512.into();
                v["allocations"][0]["extents"][0]["offset"] = 512.into();
            },
            "alignment 512",
        );
        rejected(|v| v["alignment"] = (1u64 << 63).into(), "alignment");
        // Checksum chunks beyond 1 GiB.
        rejected(
            |v| v["checksum"]["chunk_bytes"] = (1u64 << 40).into(),
            "chunk_bytes",
        );
        rejected(
            |v| v["checksum"]["chunk_bytes"] = (u64::MAX - 4095).into(),
            "chunk_bytes",
        );
        // Extents whose padded end is past u64::MAX (the rounding wrapped
        // to a small value before).
        let huge = u64::MAX - 100;
        rejected(
            |v| {
                let a = &mut v["allocations"][0];
                a["size"] = huge.into();
                a["extents"][0]["length"] = huge.into();
                v["total_bytes"] = huge.into();
            },
            "runs past",
        );
        rejected(
            |v| {
                v["shards"][0]["size"] = (u64::MAX - 4095).into();
                v["allocations"][0]["extents"][0]["offset"] = (u64::MAX - 4095).into();
            },
            "runs past",
        );
    }

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
