//! Durability and atomic publication on local filesystems.
//!
//! Guarantees: [`write_atomic`] leaves either the old file or the complete new
//! one at the path, also after a crash; [`publish_dir`] makes a fully synced
//! directory appear at a path in one step, swapping out what was there (the
//! caller then fsyncs the parent).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FallocateFlags, FlockOperation, RenameFlags};

use crate::error::IoContext;
use crate::{Error, Result};

/// fsyncs a directory so entries created or renamed in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).ctx(|| format!("opening directory {}", dir.display()))?;
    d.sync_all()
        .ctx(|| format!("syncing directory {}", dir.display()))
}

/// The directory containing `path` (`.` for a bare name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates `path` (must not exist), writes `bytes` and fsyncs it.
pub fn write_new_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| Error::writing("writing", path, e))?;
    f.sync_all().ctx(|| format!("syncing {}", path.display()))
}

/// Atomically replaces `path` with `bytes`: temp file, fsync, rename, fsync
/// of the directory. Readers see the old content or the new, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_of(path);
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidInput(format!("{} names no file", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        unique_id()
    ));
    let result = write_new_file(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, path).ctx(|| format!("renaming onto {}", path.display())))
        .and_then(|()| fsync_dir(&dir));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reserves `len` bytes for `file` so that a full disk fails here, before
/// any data moves; filesystems without fallocate get a plain size change.
pub fn preallocate(file: &File, path: &Path, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let allocated = rustix::fs::fallocate(file.as_fd(), FallocateFlags::empty(), 0, len);
    settle_allocation(file, path, len, allocated)
}

/// Finishes [`preallocate`] from the result of `fallocate(file, 0, 0, len)`,
/// wherever that ran (here, or as a request on an io_uring ring): a full
/// disk becomes [`Error::NoSpace`], a filesystem without fallocate gets a
/// plain size change.
pub fn settle_allocation(
    file: &File,
    path: &Path,
    len: u64,
    allocated: rustix::io::Result<()>,
) -> Result<()> {
    match allocated {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::NOSPC || e == rustix::io::Errno::DQUOT => {
            Err(Error::NoSpace {
                path: path.to_path_buf(),
                needed: len,
            })
        }
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => file
            .set_len(len)
            .ctx(|| format!("sizing {}", path.display())),
        Err(e) => Err(Error::io(
            format!("allocating {len} bytes for {}", path.display()),
            e.into(),
        )),
    }
}

/// Moves `from` to `to`, failing if `to` exists. Filesystems without
/// renameat2 flags (NFS, CIFS, some FUSE mounts: EINVAL) get the same
/// guarantee from a hard link and an unlink (see `move_noreplace_portably`).
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    match rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Err(e) if lacks_rename_flags(e) => move_noreplace_portably(from, to),
        r => r.ctx(|| format!("publishing {} as {}", from.display(), to.display())),
    }
}

/// True for the errors of a filesystem (or kernel) that has no renameat2
/// flags.
fn lacks_rename_flags(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    matches!(e, Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP)
}

/// [`rename_noreplace`] without renameat2: a file is linked at `to`
/// (link(2) never replaces, and is atomic on NFS too) and then unlinked
/// at `from`; a directory is renamed, which never replaces a non-empty
/// directory (every directory memferry publishes holds files).
fn move_noreplace_portably(from: &Path, to: &Path) -> Result<()> {
    let what = || format!("publishing {} as {}", from.display(), to.display());
    let is_dir = fs::symlink_metadata(from).ctx(what)?.is_dir();
    if is_dir {
        rustix::fs::rename(from, to).ctx(what)
    } else {
        fs::hard_link(from, to).ctx(what)?;
        fs::remove_file(from).ctx(what)
    }
}

/// Swaps `a` and `b` atomically (both must exist). A filesystem that cannot
/// (NFS, CIFS: no RENAME_EXCHANGE) gets an error saying what to do; nothing
/// is moved.
pub fn exchange(a: &Path, b: &Path) -> Result<()> {
    match rustix::fs::renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE) {
        Err(e) if lacks_rename_flags(e) => Err(Error::Unsupported(format!(
            "the filesystem holding {} cannot swap two directories atomically (renameat2 RENAME_EXCHANGE: {e}; NFS and CIFS cannot), so the snapshot there cannot be replaced without a moment with none: save to a new path, or remove the old snapshot first",
            b.display()
        ))),
        r => r.ctx(|| format!("swapping {} with {}", a.display(), b.display())),
    }
}

/// Publishes the synced directory `staged` at `target`: a plain rename when
/// `target` does not exist, an atomic exchange when it does (the previous
/// content then sits at `staged`). Returns true when something was swapped
/// out. An error means nothing moved.
///
/// The caller fsyncs the parent directory afterwards to make the rename
/// durable, and must treat a failure there differently: the new content is
/// already visible at `target` (and the old one at `staged`).
pub fn publish_dir(staged: &Path, target: &Path) -> Result<bool> {
    if target.symlink_metadata().is_ok() {
        exchange(staged, target)?;
        Ok(true)
    } else {
        rename_noreplace(staged, target)?;
        Ok(false)
    }
}

/// Does a path exist (without following a final symlink)?
pub fn exists(path: &Path) -> bool {
    rustix::fs::statat(CWD, path, AtFlags::SYMLINK_NOFOLLOW).is_ok()
}

/// An exclusive advisory lock on a lock file; the file is removed when the
/// lock is released, and a lock on a file that was unlinked meanwhile is
/// never taken.
pub struct LockFile {
    path: PathBuf,
    file: Option<File>,
}

impl LockFile {
    /// Takes the lock without waiting; [`Error::Locked`] names `what` when
    /// another process holds it.
    pub fn acquire(path: &Path, what: &Path) -> Result<Self> {
        for _ in 0..100 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .ctx(|| format!("creating lock file {}", path.display()))?;
            match rustix::fs::flock(file.as_fd(), FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(Error::Locked {
                        path: what.to_path_buf(),
                    });
                }
                Err(e) => return Err(Error::io(format!("locking {}", path.display()), e.into())),
            }
            // The holder before us may have unlinked the file after we opened
            // it: only a lock on the inode still at `path` counts.
            let ours = rustix::fs::fstat(file.as_fd()).ctx(|| "fstat of lock file".into())?;
            match rustix::fs::stat(path) {
                Ok(now) if now.st_ino == ours.st_ino && now.st_dev == ours.st_dev => {
                    return Ok(Self {
                        path: path.to_path_buf(),
                        file: Some(file),
                    });
                }
                _ => continue,
            }
        }
        Err(Error::Locked {
            path: what.to_path_buf(),
        })
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Unlink while still holding the lock, then release it by closing.
        let _ = fs::remove_file(&self.path);
        drop(self.file.take());
    }
}

/// A 64-bit random identifier in hex, for staging names and save ids.
pub fn unique_id() -> String {
    let mut b = [0u8; 8];
    if rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        b = (t ^ ((std::process::id() as u64) << 32)).to_le_bytes();
    }
    format!("{:016x}", u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishing_without_rename_flags_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, to) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("to"),
        );
        fs::write(&a, b"first").unwrap();
        fs::write(&b, b"second").unwrap();
        // A file: published once, then refused without touching either.
        move_noreplace_portably(&a, &to).unwrap();
        assert!(!a.exists());
        assert!(move_noreplace_portably(&b, &to).is_err());
        assert_eq!(fs::read(&to).unwrap(), b"first");
        assert_eq!(fs::read(&b).unwrap(), b"second");

        // A directory holding files: the same.
        let (d1, d2, target) = (
            dir.path().join("d1"),
            dir.path().join("d2"),
            dir.path().join("target"),
        );
        for (d, body) in [(&d1, "one"), (&d2, "two")] {
            fs::create_dir(d).unwrap();
            fs::write(d.join("manifest.json"), body).unwrap();
        }
        move_noreplace_portably(&d1, &target).unwrap();
        assert!(move_noreplace_portably(&d2, &target).is_err());
        assert_eq!(fs::read(target.join("manifest.json")).unwrap(), b"one");
        assert_eq!(fs::read(d2.join("manifest.json")).unwrap(), b"two");
    }
}
