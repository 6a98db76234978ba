//! Storage roots: the directories (usually one per disk) that shards are
//! striped across.

use std::path::{Path, PathBuf};

use rustix::fs::Access;

use crate::{Error, Result};

/// Splits `DIR,DIR,...` into paths (empty items ignored).
pub fn parse_roots(list: &str) -> Vec<PathBuf> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Checks that `root` exists, is a directory and can be written.
pub fn check_writable_root(root: &Path) -> Result<()> {
    check_dir(root)?;
    rustix::fs::access(root, Access::WRITE_OK).map_err(|e| {
        Error::InvalidInput(format!(
            "root {} is not writable ({}): choose a writable directory or fix its permissions",
            root.display(),
            std::io::Error::from(e)
        ))
    })
}

/// Checks that `root` exists and is a directory.
pub fn check_dir(root: &Path) -> Result<()> {
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::InvalidInput(format!(
            "root {} is not a directory: pass directories to --roots",
            root.display()
        ))),
        Err(e) => Err(Error::InvalidInput(format!(
            "root {} does not exist ({e}): create it or fix --roots",
            root.display()
        ))),
    }
}

/// Absolute form of `p` without resolving symlinks of the final component.
pub fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::io(format!("resolving {}", p.display()), e))
}
