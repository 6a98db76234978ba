//! The block file: a 4096-byte header, then the payload, so the payload
//! stays O_DIRECT-aligned. Layout of the header (little endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `MFKVBLK\0` |
//! | 8 | 4 | format version (2) |
//! | 12 | 4 | header length (4096) |
//! | 16 | 8 | namespace hash, bound to the page sizes (`BlockLayout::header_hash`) |
//! | 24 | 8 | payload length |
//! | 32 | 4 | CRC32C of the payload |
//! | 36 | 2 | key length |
//! | 38 | 2 | reserved (0) |
//! | 40 | 64 | key bytes, zero-padded |
//! | 104 | 4 | CRC32C of bytes 0..104 |
//! | 108 | .. | zero up to 4096 |

use super::key::{BlockKey, MAX_KEY_BYTES};
use crate::integrity::crc32c;

/// Header size; the payload starts here.
pub const HEADER_BYTES: usize = 4096;
/// Magic bytes at offset 0.
pub const MAGIC: &[u8; 8] = b"MFKVBLK\0";
/// Version written by this build (2: the namespace hash covers the page
/// sizes; version 1 blocks are refused, never deleted, and rewritten by the
/// next store of their key).
pub const VERSION: u32 = 2;
const CRC_AT: usize = 104;

/// A decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHeader {
    /// Hash of the namespace the block belongs to.
    pub namespace_hash: u64,
    /// The block key.
    pub key: BlockKey,
    /// Payload bytes after the header.
    pub payload_len: u64,
    /// CRC32C of the payload.
    pub payload_crc32c: u32,
}

/// Why a header was refused. Every variant means "this file does not hold
/// the block asked for": a load reports the key as failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than 4096 bytes.
    #[error("the file is shorter than a block header")]
    Short,
    /// Not a memferry block file.
    #[error("bad magic: not a memferry KV block file")]
    Magic,
    /// Written by another format version.
    #[error("unsupported block format version {0}")]
    Version(u32),
    /// Header bytes damaged.
    #[error("header checksum mismatch")]
    HeaderChecksum,
    /// Key length field out of range.
    #[error("corrupt key length {0}")]
    KeyLength(usize),
    /// Belongs to another namespace, or was written with other page sizes.
    #[error(
        "block belongs to another namespace or page layout ({found:016x}, expected {expected:016x})"
    )]
    Namespace { found: u64, expected: u64 },
    /// Holds another key.
    #[error("block holds key {found}, expected {expected}")]
    Key { found: BlockKey, expected: BlockKey },
    /// Payload size differs from what the registered tensors need.
    #[error("payload is {found} bytes, expected {expected}")]
    PayloadLength { found: u64, expected: u64 },
}

impl BlockHeader {
    /// Encodes the header into its 4096 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_BYTES];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.namespace_hash.to_le_bytes());
        h[24..32].copy_from_slice(&self.payload_len.to_le_bytes());
        h[32..36].copy_from_slice(&self.payload_crc32c.to_le_bytes());
        let key = self.key.as_bytes();
        h[36..38].copy_from_slice(&(key.len() as u16).to_le_bytes());
        h[40..40 + key.len()].copy_from_slice(key);
        let crc = crc32c(&h[..CRC_AT]);
        h[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decodes and checks a header (magic, version, header checksum).
    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        if bytes.len() < HEADER_BYTES {
            return Err(HeaderError::Short);
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        if &bytes[0..8] != MAGIC {
            return Err(HeaderError::Magic);
        }
        if u32_at(CRC_AT) != crc32c(&bytes[..CRC_AT]) {
            return Err(HeaderError::HeaderChecksum);
        }
        let version = u32_at(8);
        if version != VERSION || u32_at(12) as usize != HEADER_BYTES {
            return Err(HeaderError::Version(version));
        }
        let key_len = u16::from_le_bytes([bytes[36], bytes[37]]) as usize;
        if key_len == 0 || key_len > MAX_KEY_BYTES {
            return Err(HeaderError::KeyLength(key_len));
        }
        Ok(Self {
            namespace_hash: u64_at(16),
            key: BlockKey::new(bytes[40..40 + key_len].to_vec())
                .map_err(|_| HeaderError::KeyLength(key_len))?,
            payload_len: u64_at(24),
            payload_crc32c: u32_at(32),
        })
    }

    /// Checks the header names the expected namespace, key and size.
    pub fn expect(
        &self,
        namespace_hash: u64,
        key: &BlockKey,
        payload_len: u64,
    ) -> Result<(), HeaderError> {
        if self.namespace_hash != namespace_hash {
            return Err(HeaderError::Namespace {
                found: self.namespace_hash,
                expected: namespace_hash,
            });
        }
        if &self.key != key {
            return Err(HeaderError::Key {
                found: self.key.clone(),
                expected: key.clone(),
            });
        }
        if self.payload_len != payload_len {
            return Err(HeaderError::PayloadLength {
                found: self.payload_len,
                expected: payload_len,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> BlockHeader {
        BlockHeader {
            namespace_hash: 0x1234_5678_9abc_def0,
            key: BlockKey::new(vec![1, 2, 3, 4]).unwrap(),
            payload_len: 2 << 20,
            payload_crc32c: 0xdead_beef,
        }
    }

    #[test]
    fn round_trips_and_rejects_damage() {
        let h = header();
        let bytes = h.encode();
        assert_eq!(bytes.len(), HEADER_BYTES);
        assert_eq!(BlockHeader::decode(&bytes).unwrap(), h);
        assert!(h.expect(h.namespace_hash, &h.key, 2 << 20).is_ok());
        assert!(matches!(
            h.expect(1, &h.key, 2 << 20),
            Err(HeaderError::Namespace { .. })
        ));
        assert!(matches!(
            h.expect(h.namespace_hash, &BlockKey::new(vec![9]).unwrap(), 2 << 20),
            Err(HeaderError::Key { .. })
        ));
        assert!(matches!(
            h.expect(h.namespace_hash, &h.key, 1),
            Err(HeaderError::PayloadLength { .. })
        ));
        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        assert_eq!(
            BlockHeader::decode(&flipped),
            Err(HeaderError::HeaderChecksum)
        );
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert_eq!(BlockHeader::decode(&magic), Err(HeaderError::Magic));
        assert_eq!(BlockHeader::decode(&bytes[..100]), Err(HeaderError::Short));
    }
}
