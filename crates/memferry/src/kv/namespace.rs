//! Namespaces: blocks of different models, parallel ranks, dtypes or
//! layouts never mix. Each namespace has its own directory
//! `<root>/<safe-model>-<hash>/` with a human-readable `namespace.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::durable::write_atomic;
use crate::{Error, Result};

/// File describing a namespace inside its directory.
pub const NAMESPACE_FILE: &str = "namespace.json";

/// Everything that makes two KV blocks with the same key incompatible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// Model identifier, e.g. `meta-llama/Llama-3.1-8B`.
    pub model: String,
    /// Tokens per KV block.
    pub tokens_per_block: u32,
    /// KV blocks stored together in one file.
    pub blocks_per_file: u32,
    /// Tensor-parallel rank and size.
    pub tp_rank: u32,
    /// Tensor-parallel size.
    pub tp_size: u32,
    /// Pipeline-parallel rank.
    pub pp_rank: u32,
    /// Pipeline-parallel size.
    pub pp_size: u32,
    /// KV dtype, e.g. `bfloat16`.
    pub dtype: String,
    /// Version of the engine's KV layout.
    pub layout_version: u32,
}

impl Namespace {
    /// Checks the fields make sense; the message says which one is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidInput(format!("invalid KV namespace: {m}")));
        if self.model.trim().is_empty() {
            return bad("the model id is empty".into());
        }
        if self.tokens_per_block == 0 || self.blocks_per_file == 0 {
            return bad("tokens_per_block and blocks_per_file must be at least 1".into());
        }
        if self.tp_size == 0 || self.tp_rank >= self.tp_size {
            return bad(format!(
                "tp_rank {} is not below tp_size {}",
                self.tp_rank, self.tp_size
            ));
        }
        if self.pp_size == 0 || self.pp_rank >= self.pp_size {
            return bad(format!(
                "pp_rank {} is not below pp_size {}",
                self.pp_rank, self.pp_size
            ));
        }
        if self.dtype.trim().is_empty() {
            return bad("the dtype is empty".into());
        }
        Ok(())
    }

    /// A stable 64-bit hash of every field (CRC-64/NVME of the canonical
    /// JSON); block headers record it bound to the page layout
    /// ([`BlockLayout::header_hash`]).
    pub fn hash(&self) -> u64 {
        let canonical = serde_json::to_vec(self).expect("namespace serialises");
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, &canonical)
    }

    /// Directory name: the model id made path-safe, then a short hash.
    pub fn dir_name(&self) -> String {
        let safe: String = self
            .model
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        let safe = safe.trim_start_matches('.');
        format!("{safe}-{:012x}", self.hash() >> 16)
    }

    /// Opens the namespace under `root`, creating its directory and
    /// `namespace.json` if needed. A directory whose `namespace.json`
    /// disagrees with `self` is an error: blocks never mix.
    pub fn open(&self, root: &Path) -> Result<PathBuf> {
        self.validate()?;
        crate::storage::roots::check_dir(root)?;
        let dir = root.join(self.dir_name());
        if let Some(found) = Namespace::read(&dir)? {
            self.expect_same(&found, &dir.join(NAMESPACE_FILE).display().to_string())?;
            return Ok(dir);
        }
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Error::io(format!("creating {}", dir.display()), e));
            }
        }
        let body = serde_json::to_vec_pretty(self).expect("namespace serialises");
        // Several processes may create the same namespace at once:
        // each writes the same bytes atomically.
        write_atomic(&dir.join(NAMESPACE_FILE), &body)?;
        Ok(dir)
    }

    /// Fails unless `found` (recorded at `origin`) is this namespace.
    pub(crate) fn expect_same(&self, found: &Namespace, origin: &str) -> Result<()> {
        if found != self {
            return Err(Error::InvalidInput(format!(
                "namespace mismatch: {origin} describes {found:?}, not {self:?}; blocks of different namespaces never mix"
            )));
        }
        Ok(())
    }

    /// Parses a `namespace.json` read from `origin`.
    pub(crate) fn parse(bytes: &[u8], origin: &str) -> Result<Namespace> {
        serde_json::from_slice(bytes).map_err(|e| {
            Error::InvalidInput(format!(
                "{origin} is not a valid namespace description ({e}); move it aside"
            ))
        })
    }

    /// The namespace described by `dir`'s `namespace.json`, or `None` when
    /// the directory has none.
    pub fn read(dir: &Path) -> Result<Option<Namespace>> {
        let file = dir.join(NAMESPACE_FILE);
        match std::fs::read(&file) {
            Ok(bytes) => Self::parse(&bytes, &file.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", file.display()), e)),
        }
    }
}

/// File recording the page sizes of the tensors whose blocks a namespace
/// holds, written by the first store that opens it.
pub const LAYOUT_FILE: &str = "layout.json";

/// The block layout a namespace's files were written with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockLayout {
    /// Page bytes of each registered tensor, in registration order.
    pub page_bytes: Vec<u64>,
}

impl BlockLayout {
    /// The hash every block header of `namespace` written with this layout
    /// carries: CRC-64/NVME of the namespace's [`Namespace::hash`] followed
    /// by each page size (all u64, little endian). Readers whose page sizes
    /// differ never accept each other's blocks, even where `layout.json`
    /// could not keep them apart (a namespace directory removed and
    /// recreated by a process with another layout while this one ran).
    pub fn header_hash(&self, namespace: &Namespace) -> u64 {
        let mut bytes = namespace.hash().to_le_bytes().to_vec();
        for p in &self.page_bytes {
            bytes.extend_from_slice(&p.to_le_bytes());
        }
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, &bytes)
    }

    /// Fails unless `recorded` (a `layout.json` read from `origin`) holds
    /// this layout.
    pub(crate) fn expect_recorded(&self, recorded: &[u8], origin: &str) -> Result<()> {
        let found: BlockLayout = serde_json::from_slice(recorded).map_err(|e| {
            Error::InvalidInput(format!(
                "{origin} is damaged ({e}); remove it only if the namespace's blocks are gone too"
            ))
        })?;
        if &found != self {
            return Err(Error::InvalidInput(format!(
                "page sizes do not match: the blocks described by {origin} were written from tensors with pages of {:?} bytes, the registered tensors have {:?}; register the same KV tensors, or use another namespace (e.g. a new layout_version)",
                found.page_bytes, self.page_bytes
            )));
        }
        Ok(())
    }
}

/// Records `layout` in the namespace directory `dir`, or checks it against
/// the layout recorded there: blocks written with other page sizes would be
/// scattered into the wrong places, so opening with a different layout is an
/// error.
pub fn check_layout(dir: &Path, layout: &BlockLayout) -> Result<()> {
    let file = dir.join(LAYOUT_FILE);
    let compare = |bytes: &[u8]| layout.expect_recorded(bytes, &file.display().to_string());
    match std::fs::read(&file) {
        Ok(bytes) => return compare(&bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("reading {}", file.display()), e)),
    }
    // First store here: publish without replacing, so two processes racing
    // with different layouts cannot both win.
    let temp = dir.join(format!(
        ".{LAYOUT_FILE}.{}",
        crate::storage::durable::unique_id()
    ));
    let body = serde_json::to_vec_pretty(layout).expect("layout serialises");
    crate::storage::durable::write_new_file(&temp, &body)?;
    let published = crate::storage::durable::rename_noreplace(&temp, &file);
    let _ = std::fs::remove_file(&temp);
    match published {
        Ok(()) => Ok(()),
        Err(_) => {
            let bytes = std::fs::read(&file)
                .map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
            compare(&bytes)
        }
    }
}

/// Namespaces for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::Namespace;

    /// A bfloat16 namespace of `model`, tensor-parallel rank 0 of `tp_size`.
    pub(crate) fn namespace(model: &str, blocks_per_file: u32, tp_size: u32) -> Namespace {
        Namespace {
            model: model.into(),
            tokens_per_block: 16,
            blocks_per_file,
            tp_rank: 0,
            tp_size,
            pp_rank: 0,
            pp_size: 1,
            dtype: "bfloat16".into(),
            layout_version: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn ns() -> Namespace {
        testing::namespace("meta-llama/Llama-3.1-8B", 2, 2)
    }

    #[test]
    fn directory_names_are_safe_and_distinct() {
        let a = ns();
        let mut b = ns();
        b.tp_rank = 1;
        assert!(a.dir_name().starts_with("meta-llama_Llama-3.1-8B-"));
        assert_ne!(a.dir_name(), b.dir_name());
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash(), ns().hash(), "stable");
        let mut evil = ns();
        evil.model = "../../etc".into();
        assert!(!evil.dir_name().contains('/'));
        assert!(!evil.dir_name().starts_with('.'));
    }

    #[test]
    fn opening_checks_the_recorded_namespace() {
        let root = tempfile::tempdir().unwrap();
        let dir = ns().open(root.path()).unwrap();
        assert!(dir.join(NAMESPACE_FILE).is_file());
        assert_eq!(ns().open(root.path()).unwrap(), dir, "reopen");
        // Same directory name, different content: refused.
        let mut other = ns();
        other.dtype = "float16".into();
        std::fs::write(
            dir.join(NAMESPACE_FILE),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        let err = ns().open(root.path()).unwrap_err().to_string();
        assert!(err.contains("namespace mismatch"), "{err}");
        let mut bad = ns();
        bad.tp_rank = 2;
        assert!(bad.open(root.path()).is_err());
        assert!(ns().open(&root.path().join("missing")).is_err());
    }
}
