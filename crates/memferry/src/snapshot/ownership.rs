//! Names of everything a save creates, and the owner markers that let `gc`
//! prove a leftover belongs to a snapshot before deleting it.
//!
//! For a snapshot at `PARENT/NAME`:
//! - `PARENT/.NAME.memferry-lock`: held while a save or gc runs;
//! - `PARENT/.NAME.memferry-stage-<save>`: a save being staged (or, after a
//!   commit, the previous snapshot waiting for removal);
//! - `ROOT/NAME.memferry-<save>/shard-NNNNN.bin`: shards on striped roots;
//! - `memferry-owner.json` in each of these directories: `{name, lineage,
//!   save_id, roots}`. Nothing without a matching marker is ever deleted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::durable::parent_of;
use crate::{Error, Result};

/// File name of the owner marker.
pub const OWNER_NAME: &str = "memferry-owner.json";
/// Directory of shards inside the snapshot directory (single-root saves).
pub const LOCAL_SHARDS: &str = "shards";

/// Content of an owner marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Always `memferry-owner`.
    pub kind: String,
    /// Snapshot directory name.
    pub name: String,
    /// Snapshot lineage.
    pub lineage: String,
    /// The save that created the directory.
    pub save_id: String,
    /// Absolute roots the save wrote to (to find leftovers of a crash).
    #[serde(default)]
    pub roots: Vec<PathBuf>,
}

impl Owner {
    /// Reads the marker in `dir`, if there is a valid one.
    pub fn read(dir: &Path) -> Option<Owner> {
        let bytes = std::fs::read(dir.join(OWNER_NAME)).ok()?;
        let o: Owner = serde_json::from_slice(&bytes).ok()?;
        (o.kind == "memferry-owner").then_some(o)
    }
}

/// The names belonging to one snapshot path.
#[derive(Debug, Clone)]
pub struct SnapshotPaths {
    /// The snapshot directory.
    pub target: PathBuf,
    /// Its parent.
    pub parent: PathBuf,
    /// Its final component.
    pub name: String,
}

impl SnapshotPaths {
    /// Splits a snapshot path into parent and name. The parent is resolved
    /// (symlinks and `..` followed) when it exists, so that `target` names
    /// the directory's real place and can be compared with other paths
    /// (roots) by prefix; the final component is kept as given.
    pub fn new(target: &Path) -> Result<Self> {
        let target = crate::storage::roots::absolute(target)?;
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.starts_with('.'))
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{} is not a usable snapshot path: name a directory (not starting with '.')",
                    target.display()
                ))
            })?
            .to_string();
        let parent = parent_of(&target);
        let parent = parent.canonicalize().unwrap_or(parent);
        Ok(Self {
            target: parent.join(&name),
            parent,
            name,
        })
    }

    /// The lock file.
    pub fn lock(&self) -> PathBuf {
        self.parent.join(format!(".{}.memferry-lock", self.name))
    }

    /// Prefix of staging directory names.
    pub fn stage_prefix(&self) -> String {
        format!(".{}.memferry-stage-", self.name)
    }

    /// The staging directory of save `save_id`.
    pub fn stage(&self, save_id: &str) -> PathBuf {
        self.parent
            .join(format!("{}{save_id}", self.stage_prefix()))
    }

    /// Prefix of shard directory names on striped roots.
    pub fn shard_dir_prefix(&self) -> String {
        format!("{}.memferry-", self.name)
    }

    /// Shard directory name of save `save_id` on a striped root.
    pub fn shard_dir_name(&self, save_id: &str) -> String {
        format!("{}{save_id}", self.shard_dir_prefix())
    }
}

/// Shard file name for index `i`.
pub fn shard_file_name(i: usize) -> String {
    format!("shard-{i:05}.bin")
}

/// True for names a save creates inside its directories.
pub fn is_owned_file_name(name: &str) -> bool {
    name == OWNER_NAME
        || name == super::manifest::MANIFEST_NAME
        || (name.starts_with("shard-") && name.ends_with(".bin"))
        || name.starts_with(".manifest.json.tmp-")
}
