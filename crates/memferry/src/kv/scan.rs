//! Walking a namespace directory: every block file with its size and last
//! access, and temporary files left behind by interrupted stores.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::key::BlockKey;
use crate::Result;
use crate::error::IoContext;

/// Marker between a block file's name and the unique suffix of its
/// temporary file: `<hex>.kvb.tmp-<id>`.
pub(crate) const TEMP_MARK: &str = ".tmp-";

/// Temporary files older than this belong to a store that died.
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(15 * 60);

/// One block file found on disk.
#[derive(Debug, Clone)]
pub struct ScannedBlock {
    /// The key, from the file name.
    pub key: BlockKey,
    /// Full path.
    pub path: PathBuf,
    /// Size of the file.
    pub file_bytes: u64,
    /// Last access (the file's mtime, see [`super::access`]).
    pub accessed: SystemTime,
    /// The file's inode when scanned (`None` where the backing has none):
    /// a later removal can check the file at `path` is still this one.
    pub inode: Option<u64>,
}

/// Everything a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Block files.
    pub blocks: Vec<ScannedBlock>,
    /// Temporary files of stores that died more than [`STALE_TEMP_AGE`] ago.
    pub stale_temps: Vec<PathBuf>,
}

impl Scan {
    /// Bytes of all block files.
    pub fn bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.file_bytes).sum()
    }
}

/// Walks `<dir>/xx/yy/*.kvb`. Files that vanish during the walk (evicted by
/// another process) are skipped; names that are not block files are ignored.
pub fn scan(dir: &Path) -> Result<Scan> {
    let mut out = Scan::default();
    let now = SystemTime::now();
    for level1 in subdirs(dir)? {
        for level2 in subdirs(&level1)? {
            let entries = match std::fs::read_dir(&level2) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(crate::Error::io(format!("listing {}", level2.display()), e)),
            };
            for entry in entries {
                let entry = entry.ctx(|| format!("listing {}", level2.display()))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let path = entry.path();
                let meta = match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.is_file() => m,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(crate::Error::io(format!("reading {}", path.display()), e));
                    }
                };
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                if name.contains(TEMP_MARK) {
                    if now.duration_since(mtime).unwrap_or_default() > STALE_TEMP_AGE {
                        out.stale_temps.push(path);
                    }
                    continue;
                }
                let Some(key) = BlockKey::from_file_name(name) else {
                    continue;
                };
                out.blocks.push(ScannedBlock {
                    key,
                    path,
                    file_bytes: meta.len(),
                    accessed: mtime,
                    inode: Some(meta.ino()),
                });
            }
        }
    }
    Ok(out)
}

/// Two-hex-digit subdirectories of `dir`.
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(crate::Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let fan_out = name
            .to_str()
            .is_some_and(|n| n.len() == 2 && n.bytes().all(|b| b.is_ascii_hexdigit()));
        if fan_out && entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(entry.path());
        }
    }
    Ok(out)
}
