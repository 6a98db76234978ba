//! Jobs: what a caller submitted and what became of every key.

use std::fmt;
use std::ops::Range;

use serde::Serialize;

use super::key::BlockKey;

/// Identifies a submitted job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job {}", self.0)
    }
}

/// Load (storage to memory) or store (memory to storage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Storage to memory.
    Load,
    /// Memory to storage.
    Store,
}

impl JobKind {
    /// The file request that moves a block this way.
    pub(crate) fn io(self) -> crate::transfer::uring::Io {
        match self {
            JobKind::Load => crate::transfer::uring::Io::Read,
            JobKind::Store => crate::transfer::uring::Io::Write,
        }
    }
}

/// What happened to one key of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "reason")]
pub enum KeyOutcome {
    /// The block was written and published.
    Stored,
    /// A valid block with this key was already stored; it was touched.
    AlreadyStored,
    /// The block was read, its header and checksum verified, and its pages
    /// copied into the requested block ids.
    Loaded,
    /// The store queue was full, or the capacity stayed taken by other
    /// stores in flight for seconds; nothing was written. Not a failure:
    /// the cache simply did not take the block.
    Dropped,
    /// The job was cancelled before this key ran; nothing was published
    /// (store) or the destination pages are unspecified (load).
    Cancelled,
    /// The key failed; the reason names the file and what was wrong. A
    /// failed load never leaves wrong bytes reported as loaded; its
    /// destination pages are unspecified (a zero-copy load writes them
    /// while it reads, before the checksum can be checked).
    Failed(String),
}

impl KeyOutcome {
    /// True for `Stored`, `AlreadyStored` and `Loaded`.
    pub fn is_success(&self) -> bool {
        matches!(
            self,
            KeyOutcome::Stored | KeyOutcome::AlreadyStored | KeyOutcome::Loaded
        )
    }
}

/// One key's result.
#[derive(Debug, Clone, Serialize)]
pub struct KeyResult {
    /// The key.
    pub key: BlockKey,
    /// What happened.
    #[serde(flatten)]
    pub outcome: KeyOutcome,
}

/// A finished job, as returned by [`super::KvStore::poll`] and
/// [`super::KvStore::wait`]. Every job yields exactly one result.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    /// Which job.
    pub job: JobId,
    /// Load or store.
    pub kind: JobKind,
    /// Every key of the job, in submission order.
    pub keys: Vec<KeyResult>,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Seconds from submission to completion.
    pub seconds: f64,
}

impl JobResult {
    /// True when every key succeeded.
    pub fn succeeded(&self) -> bool {
        self.keys.iter().all(|k| k.outcome.is_success())
    }

    /// Number of keys whose outcome matches `pred`.
    pub fn count(&self, pred: impl Fn(&KeyOutcome) -> bool) -> usize {
        self.keys.iter().filter(|k| pred(&k.outcome)).count()
    }
}

/// One key of a job with the block ids it moves.
#[derive(Debug, Clone)]
pub(crate) struct KeyTask {
    pub key: BlockKey,
    /// Block ids in memory (one per stored block moved).
    pub ids: Vec<u64>,
    /// Which blocks of the file they are: all of them for stores, the tail
    /// for the first group of a load that starts mid-group.
    pub file_blocks: Range<usize>,
}

/// Splits `ids` over `keys`: every key covers `per_file` ids, except that
/// the first group of a load may be partial (its file's last blocks).
pub(crate) fn split_groups(
    kind: JobKind,
    keys: &[BlockKey],
    ids: &[u64],
    per_file: usize,
) -> std::result::Result<Vec<KeyTask>, String> {
    if keys.is_empty() {
        return Err("a job needs at least one key".into());
    }
    let full = (keys.len() - 1) * per_file;
    let first = ids.len().saturating_sub(full);
    let ok = match kind {
        JobKind::Store => ids.len() == keys.len() * per_file,
        JobKind::Load => (1..=per_file).contains(&first),
    };
    if !ok {
        return Err(match kind {
            JobKind::Store => format!(
                "{} keys with {per_file} blocks per file need {} block ids, got {}",
                keys.len(),
                keys.len() * per_file,
                ids.len()
            ),
            JobKind::Load => format!(
                "{} keys with {per_file} blocks per file need between {} and {} block ids (only the first group may be partial), got {}",
                keys.len(),
                full + 1,
                full + per_file,
                ids.len()
            ),
        });
    }
    let mut out = Vec::with_capacity(keys.len());
    let mut pos = 0;
    for (i, key) in keys.iter().enumerate() {
        let n = if i == 0 { first } else { per_file };
        out.push(KeyTask {
            key: key.clone(),
            ids: ids[pos..pos + n].to_vec(),
            file_blocks: per_file - n..per_file,
        });
        pos += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: u8) -> Vec<BlockKey> {
        (1..=n).map(|b| BlockKey::new(vec![b]).unwrap()).collect()
    }

    #[test]
    fn groups_cover_ids_and_only_the_first_load_group_may_be_partial() {
        let t = split_groups(JobKind::Load, &keys(3), &[9, 8, 7, 6, 5], 2).unwrap();
        assert_eq!(t[0].ids, vec![9]);
        assert_eq!(t[0].file_blocks, 1..2);
        assert_eq!(t[1].ids, vec![8, 7]);
        assert_eq!(t[2].file_blocks, 0..2);
        assert!(split_groups(JobKind::Load, &keys(3), &[1, 2, 3, 4], 2).is_err());
        assert!(split_groups(JobKind::Load, &keys(3), &[1; 7], 2).is_err());
        assert!(split_groups(JobKind::Store, &keys(2), &[1, 2, 3], 2).is_err());
        let s = split_groups(JobKind::Store, &keys(2), &[1, 2, 3, 4], 2).unwrap();
        assert_eq!(s[1].ids, vec![3, 4]);
        assert!(split_groups(JobKind::Store, &[], &[], 2).is_err());
    }
}
