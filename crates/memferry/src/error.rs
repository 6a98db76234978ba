//! Typed errors of the library. Every variant that concerns bytes at rest
//! names the file, the offset and the length involved, and every message says
//! what the user can do next.

use std::io;
use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the library can fail with. Callers match on the variants they
/// act on (`NotFound`-like cases, integrity failures, `NoSpace`, ...).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed; `context` says what was being done.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// The bytes read back do not match the checksum recorded at save time.
    #[error(
        "checksum mismatch in {path} at offset {offset}, length {length} (expected crc32c {expected:08x}, found {found:08x}): the snapshot is corrupt; save it again or restore another copy"
    )]
    ChecksumMismatch {
        path: PathBuf,
        offset: u64,
        length: u64,
        expected: u32,
        found: u32,
    },

    /// A shard ends before the bytes the manifest places in it.
    #[error(
        "{path} is truncated: the manifest needs {length} bytes at offset {offset} but the file holds {file_size} bytes; the snapshot is damaged, save it again"
    )]
    Truncated {
        path: PathBuf,
        offset: u64,
        length: u64,
        file_size: u64,
    },

    /// A shard named by the manifest does not exist.
    #[error(
        "shard missing: {path} (needed for offset {offset}, length {length}); pass the right --roots or save the snapshot again"
    )]
    MissingShard {
        path: PathBuf,
        offset: u64,
        length: u64,
    },

    /// The path holds no committed snapshot.
    #[error("no committed snapshot at {path}: {reason}")]
    NoSnapshot { path: PathBuf, reason: String },

    /// The manifest was written by a format this build does not know.
    #[error(
        "{path}: unsupported format_version {found}; this memferry reads format_version {supported}. Upgrade memferry to read it"
    )]
    UnsupportedFormat {
        path: PathBuf,
        found: u64,
        supported: u64,
    },

    /// The manifest is malformed or unsafe (absolute paths, `..`, overlaps).
    #[error("invalid manifest {path}: {reason}")]
    InvalidManifest { path: PathBuf, reason: String },

    /// A `manifest.json` is there but does not load (newer format, damaged,
    /// unreadable), so the committed save cannot be told apart from
    /// leftovers: `action` (a save or gc) touches nothing.
    #[error(
        "{action} refused: {path} does not load ({cause}). Nothing was changed: while the manifest cannot be read, memferry cannot tell the committed shards from leftovers, so it deletes and replaces nothing. Repair or restore manifest.json (a newer memferry reads a newer format_version) or move the directory aside, then run it again; a save can also go to another --to"
    )]
    UnreadableManifest {
        action: String,
        path: PathBuf,
        cause: Box<Error>,
    },

    /// The new snapshot was published (renamed into place) but syncing the
    /// parent directory failed, so the rename may not survive a power loss.
    #[error(
        "the new snapshot at {path} is published but not yet durable: syncing its parent directory failed ({cause}). A power loss now may bring back the previous snapshot, so it was kept (it is removed by the next save or `memferry gc`); check the disk, then run `memferry verify` on the snapshot"
    )]
    NotDurable { path: PathBuf, cause: Box<Error> },

    /// A caller-supplied argument is wrong; the message says how to fix it.
    #[error("{0}")]
    InvalidInput(String),

    /// The filesystem ran out of space while saving.
    #[error(
        "no space left on the device holding {path}{}; free space or choose other --roots. Nothing was committed and the previous snapshot is intact",
        needed_text(*.needed)
    )]
    NoSpace { path: PathBuf, needed: u64 },

    /// Another memferry process holds the lock of this snapshot path.
    #[error(
        "{path} is locked by another memferry process (save or gc in progress); wait for it to finish"
    )]
    Locked { path: PathBuf },

    /// The operation was cancelled through its cancellation flag.
    #[error("operation cancelled")]
    Cancelled,

    /// A device or feature this build or machine cannot provide.
    #[error("{0}")]
    Unsupported(String),

    /// An object-store request failed (after its retries); `context` names
    /// the request and the object, `hint` says what to do next. Never holds
    /// credentials.
    #[error("{context}: {message}{hint}")]
    ObjectStore {
        context: String,
        message: String,
        hint: String,
    },

    /// A conditional write lost: another writer committed first.
    #[error("{0}")]
    Conflict(String),
}

impl Error {
    /// Builds an [`Error::Io`] with a context message.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A failure to create or write `path`: [`Error::NoSpace`] for a full
    /// disk or quota, otherwise [`Error::Io`] saying `what` was being done.
    pub fn writing(what: &str, path: &std::path::Path, source: io::Error) -> Self {
        if is_no_space(&source) {
            Error::NoSpace {
                path: path.to_path_buf(),
                needed: 0,
            }
        } else {
            Error::io(format!("{what} {}", path.display()), source)
        }
    }
}

fn needed_text(needed: u64) -> String {
    if needed == 0 {
        String::new()
    } else {
        format!(" (needed {needed} more bytes)")
    }
}

/// True for "disk full" style errors (ENOSPC, EDQUOT).
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Adds a context message to `io::Result`s.
pub trait IoContext<T> {
    /// Wraps the error with a message built lazily.
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::io(f(), e))
    }
}

impl<T> IoContext<T> for std::result::Result<T, rustix::io::Errno> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::io(f(), e.into()))
    }
}
