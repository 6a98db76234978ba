//! Turning registered pages into a block file image and back, the same for
//! every place blocks live (filesystem or bucket): header, block-major
//! payload, zero padding to 4096 bytes.
//!
//! Guarantees: an image is accepted only when its header names this
//! namespace, the key and the expected payload length and the payload's
//! CRC32C matches; a refusal says whether the bytes are damaged (safe to
//! delete) or a valid block of another namespace, version or layout (never
//! deleted).

use super::format::{BlockHeader, HEADER_BYTES, HeaderError};
use super::job::KeyTask;
use super::key::BlockKey;
use super::tensors::KvLayout;
use crate::Result;
use crate::integrity::crc32c;
use crate::memory::StreamCopies;
use crate::transfer::IO_ALIGN;
use crate::units::align_up;

/// Sizes and identity of one namespace's block files.
pub(crate) struct BlockCodec {
    /// What headers must carry: the namespace bound to its page layout
    /// ([`super::namespace::BlockLayout::header_hash`]).
    pub namespace_hash: u64,
    pub layout: KvLayout,
    /// Blocks per file.
    pub per_file: usize,
    pub payload_len: u64,
    /// Header + payload + padding.
    pub file_len: u64,
}

/// Why an image was refused: a message naming where it came from, and
/// whether the bytes are damaged.
pub(crate) struct Refused {
    pub reason: String,
    pub damaged: bool,
}

impl BlockCodec {
    pub fn new(namespace_hash: u64, layout: KvLayout, per_file: usize) -> Self {
        let payload_len = layout.block_bytes() * per_file as u64;
        Self {
            namespace_hash,
            layout,
            per_file,
            payload_len,
            file_len: HEADER_BYTES as u64 + align_up(payload_len, IO_ALIGN),
        }
    }

    /// True when `header` (at least the first 4096 bytes of an image) names
    /// this namespace, `key` and the right payload length.
    pub fn header_matches(&self, header: &[u8], key: &BlockKey) -> bool {
        BlockHeader::decode(header)
            .and_then(|h| h.expect(self.namespace_hash, key, self.payload_len))
            .is_ok()
    }

    /// Fills `image` (exactly `file_len` bytes) with the block file of
    /// `task`: gathered pages, header, zero padding. `copies`: see
    /// [`KvLayout::gather`].
    ///
    /// # Safety
    /// Nobody may write the pages of `task.ids` during the call.
    pub unsafe fn encode(
        &self,
        task: &KeyTask,
        image: &mut [u8],
        copies: Option<&mut StreamCopies>,
    ) -> Result<()> {
        debug_assert_eq!(image.len() as u64, self.file_len);
        let (head, body) = image.split_at_mut(HEADER_BYTES);
        let (payload, padding) = body.split_at_mut(self.payload_len as usize);
        // SAFETY: the caller rules out writers of these pages.
        unsafe { self.layout.gather(&task.ids, payload, copies) }?;
        padding.fill(0);
        head.copy_from_slice(&self.header(&task.key, crc32c(payload)));
        Ok(())
    }

    /// The encoded header of `key`'s block whose payload has CRC32C `crc`.
    pub fn header(&self, key: &BlockKey, crc: u32) -> Vec<u8> {
        BlockHeader {
            namespace_hash: self.namespace_hash,
            key: key.clone(),
            payload_len: self.payload_len,
            payload_crc32c: crc,
        }
        .encode()
    }

    /// Checks the header (the first 4096 bytes of an image read from
    /// `origin`) and returns the payload CRC32C it records.
    pub fn check_header(
        &self,
        head: &[u8],
        key: &BlockKey,
        origin: &str,
    ) -> std::result::Result<u32, Refused> {
        BlockHeader::decode(head)
            .and_then(|h| {
                h.expect(self.namespace_hash, key, self.payload_len)
                    .map(|()| h.payload_crc32c)
            })
            .map_err(|e| {
                let damaged = !matches!(
                    e,
                    HeaderError::Namespace { .. }
                        | HeaderError::Version(_)
                        | HeaderError::PayloadLength { .. }
                );
                let what = if damaged { "corrupt" } else { "foreign" };
                Refused {
                    reason: format!("{what}: {origin}: {e}"),
                    damaged,
                }
            })
    }

    /// Compares the payload CRC32C `found` with the `recorded` one.
    pub fn check_crc(
        &self,
        recorded: u32,
        found: u32,
        origin: &str,
    ) -> std::result::Result<(), Refused> {
        if found == recorded {
            return Ok(());
        }
        Err(Refused {
            reason: format!(
                "corrupt: {origin}: payload checksum mismatch (recorded {recorded:08x}, found {found:08x})"
            ),
            damaged: true,
        })
    }

    /// Checks a whole image read from `origin` (a path or URL, for
    /// messages) and returns its payload.
    pub fn check<'a>(
        &self,
        image: &'a [u8],
        key: &BlockKey,
        origin: &str,
    ) -> std::result::Result<&'a [u8], Refused> {
        let recorded = self.check_header(image, key, origin)?;
        let end = HEADER_BYTES + self.payload_len as usize;
        let Some(payload) = image.get(HEADER_BYTES..end) else {
            return Err(Refused {
                reason: format!(
                    "truncated: {origin} is {} bytes, a block of this namespace needs {}",
                    image.len(),
                    self.file_len
                ),
                damaged: true,
            });
        };
        self.check_crc(recorded, crc32c(payload), origin)?;
        Ok(payload)
    }

    /// Checks `image` and scatters its payload into `task`'s block ids.
    /// `copies`: see [`KvLayout::scatter`].
    ///
    /// # Safety
    /// Nobody may access the pages of `task.ids` during the call.
    pub unsafe fn decode_into(
        &self,
        image: &[u8],
        task: &KeyTask,
        origin: &str,
        copies: Option<&mut StreamCopies>,
    ) -> std::result::Result<(), Refused> {
        let payload = self.check(image, &task.key, origin)?;
        // SAFETY: the caller guarantees exclusive access to the pages.
        unsafe {
            self.layout
                .scatter(payload, task.file_blocks.clone(), &task.ids, copies)
        }
        .map_err(|e| Refused {
            reason: e.to_string(),
            damaged: false,
        })
    }
}
