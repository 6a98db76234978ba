//! Operator tasks on a KV root or one namespace directory, without opening
//! a store: counting, evicting and verifying blocks.
//!
//! These run alongside live stores: a block removed here while a process
//! reads it is still read whole from its open file, and a process that has
//! not opened it yet reports that key as missing, never wrong bytes.
//! Protections are per process and not visible here.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::access::last_access;
use super::backing::files::remove_if_read;
use super::format::{BlockHeader, HEADER_BYTES};
use super::namespace::{BlockLayout, LAYOUT_FILE, Namespace};
use super::scan::{ScannedBlock, scan};
use super::stats::{self, Counters};
use crate::integrity::crc32c;
use crate::transfer::IO_ALIGN;
use crate::units::align_up;
use crate::{Error, Result};

/// A namespace directory and what its `namespace.json` says.
#[derive(Debug, Clone)]
pub struct NamespaceDir {
    /// The directory.
    pub dir: PathBuf,
    /// Its description.
    pub namespace: Namespace,
}

/// The namespaces at `dir`: `dir` itself when it is a namespace directory,
/// otherwise every subdirectory holding a `namespace.json`.
pub fn namespaces_under(dir: &Path) -> Result<Vec<NamespaceDir>> {
    crate::storage::roots::check_dir(dir).map_err(|_| {
        Error::InvalidInput(format!(
            "{} is not a directory: pass a KV root or a namespace directory",
            dir.display()
        ))
    })?;
    let read = |d: &Path| -> Result<Option<NamespaceDir>> {
        Ok(Namespace::read(d)?.map(|namespace| NamespaceDir {
            dir: d.to_path_buf(),
            namespace,
        }))
    };
    if let Some(ns) = read(dir)? {
        return Ok(vec![ns]);
    }
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        if entry.file_type().is_ok_and(|t| t.is_dir())
            && let Some(ns) = read(&entry.path())?
        {
            out.push(ns);
        }
    }
    if out.is_empty() {
        return Err(Error::InvalidInput(format!(
            "no KV namespace under {}: pass the --root a store used, or one of its namespace directories",
            dir.display()
        )));
    }
    out.sort_by(|a, b| a.dir.cmp(&b.dir));
    Ok(out)
}

/// One namespace's contents and counters.
#[derive(Debug, Clone, Serialize)]
pub struct NamespaceStats {
    /// Directory.
    pub dir: PathBuf,
    /// Model id.
    pub model: String,
    /// Block files.
    pub blocks: u64,
    /// Bytes of block files.
    pub bytes: u64,
    /// Counters summed over every process that used the namespace.
    #[serde(flatten)]
    pub counters: Counters,
}

/// Stats of every namespace at a path, and their sum.
#[derive(Debug, Clone, Serialize)]
pub struct RootStats {
    /// Block files.
    pub blocks: u64,
    /// Bytes of block files.
    pub bytes: u64,
    /// Summed counters.
    #[serde(flatten)]
    pub counters: Counters,
    /// Per namespace.
    pub namespaces: Vec<NamespaceStats>,
}

/// Counts blocks and bytes on disk and reads the recorded counters.
pub fn stats(dir: &Path) -> Result<RootStats> {
    let mut out = RootStats {
        blocks: 0,
        bytes: 0,
        counters: Counters::default(),
        namespaces: Vec::new(),
    };
    for ns in namespaces_under(dir)? {
        let found = scan(&ns.dir)?;
        let counters = stats::read_file(&ns.dir)?;
        let s = NamespaceStats {
            blocks: found.blocks.len() as u64,
            bytes: found.bytes(),
            model: ns.namespace.model.clone(),
            dir: ns.dir,
            counters,
        };
        out.blocks += s.blocks;
        out.bytes += s.bytes;
        out.counters.add(&s.counters);
        out.namespaces.push(s);
    }
    Ok(out)
}

/// What an eviction did.
#[derive(Debug, Clone, Serialize)]
pub struct EvictReport {
    /// The limit asked for.
    pub target_bytes: u64,
    /// Blocks removed.
    pub evicted: u64,
    /// Bytes removed.
    pub freed_bytes: u64,
    /// Bytes of block files left.
    pub remaining_bytes: u64,
}

/// Removes the least recently used blocks across every namespace at `dir`
/// until at most `to_bytes` of block files remain. A block used since the
/// scan (its access record moved) is kept, and so is one republished since
/// the scan (another file at its path): only the file scanned is removed,
/// and only removed files count as evicted and freed.
pub fn evict(dir: &Path, to_bytes: u64) -> Result<EvictReport> {
    evict_with(dir, to_bytes, &mut |_| {})
}

/// [`evict`], calling `before_remove` with each victim's path between
/// checking its access record and removing it (tests republish it there).
fn evict_with(
    dir: &Path,
    to_bytes: u64,
    before_remove: &mut dyn FnMut(&Path),
) -> Result<EvictReport> {
    let namespaces = namespaces_under(dir)?;
    let mut all: Vec<(usize, ScannedBlock)> = Vec::new();
    for (i, ns) in namespaces.iter().enumerate() {
        all.extend(scan(&ns.dir)?.blocks.into_iter().map(|b| (i, b)));
    }
    all.sort_by_key(|(_, b)| b.accessed);
    let mut held: u64 = all.iter().map(|(_, b)| b.file_bytes).sum();
    let mut report = EvictReport {
        target_bytes: to_bytes,
        evicted: 0,
        freed_bytes: 0,
        remaining_bytes: held,
    };
    let mut per_ns = vec![0u64; namespaces.len()];
    for (ns, block) in all {
        if held <= to_bytes {
            break;
        }
        // A directory scan records every inode; without one the file
        // scanned could not be told from a newer one, so it is kept.
        let Some(inode) = block.inode else { continue };
        match last_access(&block.path) {
            None => held -= block.file_bytes,
            Some(t) if t > block.accessed => {}
            Some(_) => {
                before_remove(&block.path);
                match remove_if_read(&block.path, inode) {
                    Ok(true) => {
                        held -= block.file_bytes;
                        report.evicted += 1;
                        report.freed_bytes += block.file_bytes;
                        per_ns[ns] += 1;
                    }
                    // Republished since the scan: the new file stays, held.
                    Ok(false) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => held -= block.file_bytes,
                    Err(e) => {
                        return Err(Error::io(format!("removing {}", block.path.display()), e));
                    }
                }
            }
        }
    }
    for (ns, n) in namespaces.iter().zip(per_ns) {
        stats::add_to_file(
            &ns.dir,
            &Counters {
                evictions: n,
                ..Counters::default()
            },
        )?;
    }
    report.remaining_bytes = held;
    Ok(report)
}

/// A block that failed verification.
#[derive(Debug, Clone, Serialize)]
pub struct CorruptBlock {
    /// The key (from the file name).
    pub key: String,
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// What a verification found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Block files read.
    pub checked: u64,
    /// Files that passed every check.
    pub ok: u64,
    /// Files that did not.
    pub corrupt: Vec<CorruptBlock>,
    /// Intact blocks this build does not read: another format version, or
    /// another namespace or page layout. Never removed (a process of
    /// another version or layout may use them); not counted as corrupt.
    pub foreign: Vec<CorruptBlock>,
    /// Corrupt files removed (`--repair`).
    pub removed: u64,
}

/// Reads every block file at `dir` and checks its header (magic, version,
/// header checksum, namespace, key matching the file name, size) and payload
/// checksum. With `repair`, corrupt files are removed, each only while it
/// is still the file that was read (a live store may republish the key
/// meanwhile; its good block stays).
pub fn verify(dir: &Path, repair: bool) -> Result<VerifyReport> {
    verify_with(dir, repair, &mut |_| {})
}

/// [`verify`], calling `before_repair` with each corrupt file's path
/// between reading and removing it (tests publish a block there).
fn verify_with(
    dir: &Path,
    repair: bool,
    before_repair: &mut dyn FnMut(&Path),
) -> Result<VerifyReport> {
    let mut report = VerifyReport {
        checked: 0,
        ok: 0,
        corrupt: Vec::new(),
        foreign: Vec::new(),
        removed: 0,
    };
    let mut buf = Vec::new();
    for ns in namespaces_under(dir)? {
        let hash = recorded_layout(&ns.dir)?.map(|l| l.header_hash(&ns.namespace));
        for block in scan(&ns.dir)?.blocks {
            report.checked += 1;
            let mut inode = None;
            match check_block(&block, hash, &mut buf, &mut inode) {
                Ok(()) => report.ok += 1,
                Err(Problem::Foreign(reason)) => report.foreign.push(CorruptBlock {
                    key: block.key.hex(),
                    path: block.path,
                    reason,
                }),
                Err(Problem::Corrupt(reason)) => {
                    if repair && let Some(inode) = inode {
                        before_repair(&block.path);
                        if matches!(remove_if_read(&block.path, inode), Ok(true)) {
                            report.removed += 1;
                        }
                    }
                    report.corrupt.push(CorruptBlock {
                        key: block.key.hex(),
                        path: block.path,
                        reason,
                    });
                }
            }
        }
    }
    Ok(report)
}

/// The page layout recorded in the namespace directory `dir`, if any (a
/// damaged record counts as none, with a warning).
fn recorded_layout(dir: &Path) -> Result<Option<BlockLayout>> {
    let file = dir.join(LAYOUT_FILE);
    match std::fs::read(&file) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes)
            .inspect_err(|e| {
                tracing::warn!(
                    "{} is damaged ({e}): its blocks are checked without their page layout",
                    file.display()
                )
            })
            .ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                "{} has no {LAYOUT_FILE}: its blocks are checked without their page layout",
                dir.display()
            );
            Ok(None)
        }
        Err(e) => Err(Error::io(format!("reading {}", file.display()), e)),
    }
}

/// Why a block file failed [`check_block`].
enum Problem {
    /// Damaged: safe to remove.
    Corrupt(String),
    /// Intact, but for another version, namespace or layout: kept.
    Foreign(String),
}

/// Checks one block file; `namespace_hash` is `None` when the namespace
/// records no page layout (then every check but that one runs). A damaged
/// file is `Corrupt`; an intact one of another version, namespace or
/// layout is `Foreign`. `inode` is set to the file's once it is open.
fn check_block(
    block: &ScannedBlock,
    namespace_hash: Option<u64>,
    buf: &mut Vec<u8>,
    inode: &mut Option<u64>,
) -> std::result::Result<(), Problem> {
    use super::format::HeaderError;
    let corrupt = |m: String| Problem::Corrupt(m);
    buf.clear();
    File::open(&block.path)
        .and_then(|mut f| {
            *inode = Some(f.metadata()?.ino());
            f.read_to_end(buf)
        })
        .map_err(|e| corrupt(format!("unreadable: {e}")))?;
    let header = BlockHeader::decode(buf).map_err(|e| match e {
        HeaderError::Version(_) => Problem::Foreign(e.to_string()),
        e => corrupt(e.to_string()),
    })?;
    header
        .expect(header.namespace_hash, &block.key, header.payload_len)
        .map_err(|e| corrupt(e.to_string()))?;
    // The length comes from the file: bound it by the file before any
    // arithmetic (padding a length near u64::MAX would wrap).
    let len = buf.len() as u64;
    if header.payload_len > len - HEADER_BYTES as u64 {
        return Err(corrupt(format!(
            "file is {len} bytes, too short for the {}-byte payload its header describes",
            header.payload_len
        )));
    }
    let want = HEADER_BYTES as u64 + align_up(header.payload_len, IO_ALIGN);
    if len != want {
        return Err(corrupt(format!(
            "file is {len} bytes, its header describes a {}-byte payload, {want} bytes padded",
            header.payload_len
        )));
    }
    let payload = &buf[HEADER_BYTES..HEADER_BYTES + header.payload_len as usize];
    let found = crc32c(payload);
    if found != header.payload_crc32c {
        return Err(corrupt(format!(
            "payload checksum mismatch (recorded {:08x}, found {found:08x})",
            header.payload_crc32c
        )));
    }
    if let Some(expected) = namespace_hash {
        header
            .expect(expected, &block.key, header.payload_len)
            .map_err(|e| Problem::Foreign(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::format::BlockHeader;
    use crate::kv::key::BlockKey;
    use crate::kv::namespace::testing::namespace;

    /// A block file of `key` with a payload of `payload`, its checksum
    /// recorded as `crc`.
    fn block_bytes(key: &BlockKey, payload: &[u8], crc: u32) -> Vec<u8> {
        let header = BlockHeader {
            namespace_hash: 7,
            key: key.clone(),
            payload_len: payload.len() as u64,
            payload_crc32c: crc,
        };
        let mut bytes = header.encode();
        bytes.extend_from_slice(payload);
        bytes.resize(
            HEADER_BYTES + align_up(payload.len() as u64, IO_ALIGN) as usize,
            0,
        );
        bytes
    }

    /// Writes `bytes` as `key`'s block file in a namespace under `root`;
    /// its path.
    fn block_file(root: &Path, key: &BlockKey, bytes: &[u8]) -> PathBuf {
        let dir = namespace("test/verify", 1, 1).open(root).unwrap();
        let path = dir.join(key.rel_path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn repair_leaves_a_good_block_republished_after_the_read() {
        let root = tempfile::tempdir().unwrap();
        let key = BlockKey::new(b"k".to_vec()).unwrap();
        let payload = vec![0x5a; 5000];
        let good = block_bytes(&key, &payload, crc32c(&payload));
        // Damaged: the payload does not match its recorded checksum.
        let damaged = block_bytes(&key, &payload, crc32c(&payload) ^ 1);
        let path = block_file(root.path(), &key, &damaged);
        let republish = &mut |p: &Path| {
            // A live store publishes a good copy of the key by rename.
            let tmp = root.path().join("new.kvb");
            std::fs::write(&tmp, &good).unwrap();
            std::fs::rename(&tmp, p).unwrap();
        };
        let report = verify_with(root.path(), true, republish).unwrap();
        assert_eq!(report.corrupt.len(), 1, "{report:?}");
        assert_eq!(report.removed, 0, "{report:?}");
        assert!(path.exists(), "the republished block was removed");
        let after = verify(root.path(), false).unwrap();
        assert_eq!((after.checked, after.ok), (1, 1), "{after:?}");
        // Without a race, repair removes the damaged file.
        block_file(root.path(), &key, &damaged);
        let report = verify(root.path(), true).unwrap();
        assert_eq!(report.removed, 1, "{report:?}");
        assert!(!path.exists());
    }

    #[test]
    fn evict_leaves_a_block_republished_after_the_scan_and_frees_another() {
        use crate::kv::access::record_access;
        use std::time::{Duration, SystemTime};
        let root = tempfile::tempdir().unwrap();
        let payload = vec![0x5a; 5000];
        let bytes = |k: &BlockKey| block_bytes(k, &payload, crc32c(&payload));
        let (old, new) = (
            BlockKey::new(b"old".to_vec()).unwrap(),
            BlockKey::new(b"new".to_vec()).unwrap(),
        );
        let old_path = block_file(root.path(), &old, &bytes(&old));
        let new_path = block_file(root.path(), &new, &bytes(&new));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert!(record_access(&old_path, t0));
        assert!(record_access(&new_path, t0 + Duration::from_secs(10)));
        let file = bytes(&old).len() as u64;
        let mut victims = Vec::new();
        let republish = &mut |p: &Path| {
            victims.push(p.to_path_buf());
            if p == old_path {
                // A live store publishes the key again by rename.
                let tmp = root.path().join("fresh.kvb");
                std::fs::write(&tmp, bytes(&old)).unwrap();
                std::fs::rename(&tmp, p).unwrap();
            }
        };
        let report = evict_with(root.path(), file, republish).unwrap();
        assert!(old_path.exists(), "the republished block was removed");
        assert_eq!(victims, [old_path.clone(), new_path.clone()]);
        assert!(!new_path.exists(), "the next victim was kept");
        assert_eq!(
            (report.evicted, report.freed_bytes, report.remaining_bytes),
            (1, file, file),
            "{report:?}"
        );
        let after = stats(root.path()).unwrap();
        assert_eq!((after.blocks, after.bytes), (1, file), "{after:?}");
        assert_eq!(after.counters.evictions, 1);
    }
}
