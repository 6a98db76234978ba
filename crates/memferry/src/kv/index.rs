//! The in-memory index of stored blocks: which keys exist, how many bytes
//! their files take and when they were last used.
//!
//! The filesystem stays the source of truth (other processes and nodes add
//! and evict blocks): an entry is trusted for `ttl` after it was last
//! confirmed, then re-checked with a `stat`; a scan of the namespace
//! directory replaces the whole picture.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use super::key::BlockKey;
use super::scan::ScannedBlock;

/// What the index knows about one stored block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    /// Size of the block file on disk.
    pub file_bytes: u64,
    /// Last access (store, load or touch), as recorded in the file's mtime.
    pub accessed: SystemTime,
    /// When the file was last seen on disk.
    pub confirmed: Instant,
}

/// Keys known to be stored, with the running total of their bytes.
pub(crate) struct Index {
    map: HashMap<BlockKey, Entry>,
    total: u64,
    ttl: Duration,
    /// Keys this process removed, and when: a scan that began before the
    /// removal must not bring them back.
    removed: HashMap<BlockKey, Instant>,
    /// Keys whose block a load refused (another namespace, format version
    /// or layout, or damaged and still there), and when. Their entries stay
    /// (the files take space and may be evicted), but they are never
    /// `fresh`, also after a scan finds the files again: the store checks
    /// their header on every lookup until a valid block replaces them.
    refused: HashMap<BlockKey, Instant>,
}

impl Index {
    pub fn new(ttl: Duration) -> Self {
        Self {
            map: HashMap::new(),
            total: 0,
            ttl,
            removed: HashMap::new(),
            refused: HashMap::new(),
        }
    }

    /// True when `key` was confirmed on disk within the last `ttl` (and
    /// its block was not refused since).
    pub fn fresh(&self, key: &BlockKey, now: Instant) -> bool {
        !self.refused.contains_key(key)
            && self
                .map
                .get(key)
                .is_some_and(|e| now.saturating_duration_since(e.confirmed) < self.ttl)
    }

    /// True when a load refused `key`'s block and no valid block was found
    /// since.
    pub fn is_refused(&self, key: &BlockKey) -> bool {
        self.refused.contains_key(key)
    }

    /// Records that `key`'s file (`file_bytes`, last used at `accessed`)
    /// is there but does not hold a block this store can load: it counts
    /// as space, never as stored, until [`Index::insert`] says it is valid.
    pub fn refuse(&mut self, key: BlockKey, file_bytes: u64, accessed: SystemTime) {
        self.insert(key.clone(), file_bytes, accessed);
        self.refused.insert(key, Instant::now());
    }

    #[cfg(test)]
    pub fn get(&self, key: &BlockKey) -> Option<&Entry> {
        self.map.get(key)
    }

    /// Records that a valid block of `key` exists with `file_bytes` bytes,
    /// last used at `accessed` (a later access already known is kept: a
    /// touch may not have reached the disk yet).
    pub fn insert(&mut self, key: BlockKey, file_bytes: u64, accessed: SystemTime) {
        self.removed.remove(&key);
        self.refused.remove(&key);
        let accessed = self
            .map
            .get(&key)
            .map_or(accessed, |e| e.accessed.max(accessed));
        let entry = Entry {
            file_bytes,
            accessed,
            confirmed: Instant::now(),
        };
        if let Some(old) = self.map.insert(key, entry) {
            self.total -= old.file_bytes;
        }
        self.total += file_bytes;
    }

    /// Marks `key` as used now, if it is known.
    pub fn touch(&mut self, key: &BlockKey, when: SystemTime) {
        if let Some(e) = self.map.get_mut(key) {
            e.accessed = e.accessed.max(when);
        }
    }

    pub fn remove(&mut self, key: &BlockKey) -> Option<Entry> {
        self.refused.remove(key);
        let old = self.map.remove(key)?;
        self.removed.insert(key.clone(), Instant::now());
        self.total -= old.file_bytes;
        Some(old)
    }

    /// Bytes of every known block file.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Known blocks, least recently used first.
    pub fn least_recently_used(&self) -> Vec<(BlockKey, Entry)> {
        let mut all: Vec<(BlockKey, Entry)> =
            self.map.iter().map(|(k, e)| (k.clone(), *e)).collect();
        all.sort_by(|a, b| a.1.accessed.cmp(&b.1.accessed).then(a.0.cmp(&b.0)));
        all
    }

    /// Replaces the index with a scan that started at `scan_started`.
    /// Entries this process confirmed after the scan started (a store that
    /// finished while the scan was walking) are kept. Refused keys stay
    /// refused while the scan still finds their file.
    pub fn replace_with_scan(&mut self, blocks: Vec<ScannedBlock>, scan_started: Instant) {
        let recent: Vec<(BlockKey, Entry)> = self
            .map
            .iter()
            .filter(|(_, e)| e.confirmed > scan_started)
            .map(|(k, e)| (k.clone(), *e))
            .collect();
        self.map.clear();
        self.total = 0;
        for b in blocks {
            if self.removed.get(&b.key).is_some_and(|t| *t > scan_started) {
                continue;
            }
            self.total += b.file_bytes;
            self.map.insert(
                b.key,
                Entry {
                    file_bytes: b.file_bytes,
                    accessed: b.accessed,
                    confirmed: scan_started,
                },
            );
        }
        for (k, e) in recent {
            if let Some(old) = self.map.insert(k, e) {
                self.total -= old.file_bytes;
            }
            self.total += e.file_bytes;
        }
        self.removed.retain(|_, t| *t > scan_started);
        let map = &self.map;
        self.refused
            .retain(|k, t| *t > scan_started || map.contains_key(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> BlockKey {
        BlockKey::new(vec![b]).unwrap()
    }

    #[test]
    fn totals_follow_inserts_and_removals_and_lru_orders_by_access() {
        let mut idx = Index::new(Duration::from_secs(60));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        idx.insert(key(1), 100, t0 + Duration::from_secs(5));
        idx.insert(key(2), 200, t0);
        idx.insert(key(3), 300, t0 + Duration::from_secs(9));
        idx.insert(key(1), 150, t0 + Duration::from_secs(5));
        assert_eq!(idx.total_bytes(), 650);
        idx.touch(&key(2), t0 + Duration::from_secs(20));
        let order: Vec<BlockKey> = idx
            .least_recently_used()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(order, vec![key(1), key(3), key(2)]);
        assert!(idx.fresh(&key(1), Instant::now()));
        assert!(!idx.fresh(&key(9), Instant::now()));
        idx.remove(&key(3));
        assert_eq!(idx.total_bytes(), 350);
        assert_eq!(idx.len(), 2);
    }

    #[test]
    fn refused_keys_count_as_space_never_as_stored_until_a_valid_insert() {
        let mut idx = Index::new(Duration::from_secs(60));
        let now = SystemTime::now();
        idx.insert(key(1), 10, now);
        idx.refuse(key(1), 10, now);
        assert!(!idx.fresh(&key(1), Instant::now()));
        assert_eq!(idx.total_bytes(), 10, "its file still takes space");
        // A scan that finds the file again does not make it stored.
        let scanned = |k: u8| ScannedBlock {
            key: key(k),
            path: "x".into(),
            file_bytes: 10,
            accessed: now,
            inode: None,
        };
        idx.replace_with_scan(vec![scanned(1)], Instant::now());
        assert!(idx.is_refused(&key(1)) && !idx.fresh(&key(1), Instant::now()));
        // A valid block (a store replaced it) is stored again.
        idx.insert(key(1), 10, now);
        assert!(idx.fresh(&key(1), Instant::now()));
        // A refused file a later scan no longer finds is forgotten.
        idx.refuse(key(2), 10, now);
        idx.replace_with_scan(vec![scanned(1)], Instant::now());
        assert!(!idx.is_refused(&key(2)));
    }

    #[test]
    fn stale_entries_are_not_fresh_and_scans_keep_newer_entries() {
        let mut idx = Index::new(Duration::from_millis(0));
        idx.insert(key(1), 10, SystemTime::now());
        assert!(
            !idx.fresh(&key(1), Instant::now()),
            "ttl 0: always re-check"
        );
        let started = Instant::now() - Duration::from_secs(1);
        idx.replace_with_scan(
            vec![ScannedBlock {
                key: key(2),
                path: "x".into(),
                file_bytes: 7,
                accessed: SystemTime::now(),
                inode: None,
            }],
            started,
        );
        assert!(idx.get(&key(1)).is_some(), "confirmed after the scan began");
        assert!(idx.get(&key(2)).is_some());
        assert_eq!(idx.total_bytes(), 17);
    }
}
