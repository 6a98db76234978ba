//! Block keys: opaque hashes (1 to 64 bytes) naming a stored block group.
//! A key's file lives two directory levels below the namespace, fanned out
//! by the key's leading bytes: `ab/cd/abcd...ef.kvb`.

use std::fmt;
use std::path::PathBuf;

use crate::{Error, Result};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 64;
/// Extension of block files.
pub const BLOCK_EXT: &str = "kvb";

/// A block key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(Vec<u8>);

impl BlockKey {
    /// A key from its bytes (1 to 64).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let bytes = bytes.into();
        if bytes.is_empty() || bytes.len() > MAX_KEY_BYTES {
            return Err(Error::InvalidInput(format!(
                "a block key has 1 to {MAX_KEY_BYTES} bytes, not {}",
                bytes.len()
            )));
        }
        Ok(Self(bytes))
    }

    /// Parses a key written in hex.
    pub fn from_hex(text: &str) -> Result<Self> {
        let t = text.trim();
        if !t.len().is_multiple_of(2) || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidInput(format!(
                "{text:?} is not a hex block key"
            )));
        }
        let bytes = (0..t.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&t[i..i + 2], 16).expect("checked hex"))
            .collect::<Vec<u8>>();
        Self::new(bytes)
    }

    /// The key of a block file or object named `<hex>.kvb`; `None` for any
    /// other name (temporary files, records, foreign files).
    pub fn from_file_name(name: &str) -> Option<Self> {
        let hex = name.strip_suffix(&format!(".{BLOCK_EXT}"))?;
        Self::from_hex(hex).ok()
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Lower-case hex.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Path of the key's file relative to the namespace directory.
    pub fn rel_path(&self) -> PathBuf {
        let hex = self.hex();
        let padded = format!("{hex:0>4}");
        PathBuf::from(&padded[0..2])
            .join(&padded[2..4])
            .join(format!("{hex}.{BLOCK_EXT}"))
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockKey({})", self.hex())
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl serde::Serialize for BlockKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_fan_out_by_prefix() {
        let k = BlockKey::new(vec![0xab, 0xcd, 0xef]).unwrap();
        assert_eq!(k.rel_path(), PathBuf::from("ab/cd/abcdef.kvb"));
        let short = BlockKey::new(vec![7]).unwrap();
        assert_eq!(short.rel_path(), PathBuf::from("00/07/07.kvb"));
        assert_eq!(BlockKey::from_hex("abcdef").unwrap(), k);
        assert!(BlockKey::new(vec![]).is_err());
        assert!(BlockKey::new(vec![0; 65]).is_err());
        assert!(BlockKey::from_hex("abc").is_err());
        assert!(BlockKey::from_hex("zz").is_err());
    }
}
