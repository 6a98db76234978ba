//! Zero-copy block transfers: where each byte of a block file lives in
//! memory when it moves straight between the file and the registered KV
//! pages, with no staging copy in between. The header, the padding, and
//! (for the partial first group of a load) the blocks nobody asked for use
//! the key's staging slot instead.
//!
//! Guarantee: the ranges of a [`Placement`] cover the block file exactly
//! once, in file order, so a vectored request over them reads or writes the
//! same bytes as one request into a staging image would.

use std::ops::Range;

use crate::Result;
use crate::integrity::crc32c_digest;
use crate::kv::codec::BlockCodec;
use crate::kv::format::HEADER_BYTES;
use crate::kv::job::KeyTask;

/// Most ranges one request names (the kernel's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// The memory ranges of one block file, in file order.
pub(super) struct Placement {
    ranges: Vec<(*mut u8, usize)>,
}

impl Placement {
    /// The ranges of `task`'s block file: the header from `slot` (the key's
    /// staging, `file_len` bytes), each block of `task.file_blocks` from its
    /// id's pages, any other block from its place in `slot`, and the
    /// padding from `slot`. Fails for an id out of range or a tensor that
    /// is not host memory.
    pub fn new(codec: &BlockCodec, task: &KeyTask, slot: *mut u8) -> Result<Self> {
        if task.ids.len() != task.file_blocks.len() || task.file_blocks.end > codec.per_file {
            return Err(crate::Error::InvalidInput(format!(
                "cannot place blocks {:?} of a {}-block file into {} block ids",
                task.file_blocks,
                codec.per_file,
                task.ids.len()
            )));
        }
        let pages = codec.layout.host_pages(&task.ids)?;
        let per_block = pages.len() / task.ids.len().max(1);
        let block_bytes = codec.layout.block_bytes() as usize;
        let in_slot = |offset: usize, len: usize| {
            // SAFETY: callers pass ranges inside the `file_len`-byte slot.
            (unsafe { slot.add(offset) }, len)
        };
        let mut p = Self {
            ranges: Vec::with_capacity(pages.len() + 2),
        };
        p.push(in_slot(0, HEADER_BYTES));
        for b in 0..codec.per_file {
            if task.file_blocks.contains(&b) {
                let i = b - task.file_blocks.start;
                for &page in &pages[i * per_block..(i + 1) * per_block] {
                    p.push(page);
                }
            } else {
                p.push(in_slot(HEADER_BYTES + b * block_bytes, block_bytes));
            }
        }
        let end = HEADER_BYTES + codec.payload_len as usize;
        p.push(in_slot(end, codec.file_len as usize - end));
        debug_assert_eq!(
            p.ranges.iter().map(|r| r.1 as u64).sum::<u64>(),
            codec.file_len
        );
        Ok(p)
    }

    /// Appends a range, merged with the previous one when they touch.
    fn push(&mut self, (ptr, len): (*mut u8, usize)) {
        if len == 0 {
            return;
        }
        if let Some(last) = self.ranges.last_mut()
            && last.0.wrapping_add(last.1) == ptr
        {
            last.1 += len;
            return;
        }
        self.ranges.push((ptr, len));
    }

    /// Fills `out` with the iovecs of file bytes `from..` up to `max_bytes`
    /// (and at most [`MAX_IOVECS`] ranges); returns the bytes they hold.
    pub fn iovecs(&self, from: u64, max_bytes: u64, out: &mut Vec<libc::iovec>) -> u64 {
        out.clear();
        let mut skip = from as usize;
        let mut left = max_bytes as usize;
        for &(ptr, len) in &self.ranges {
            if left == 0 || out.len() == MAX_IOVECS {
                break;
            }
            if skip >= len {
                skip -= len;
                continue;
            }
            let take = (len - skip).min(left);
            out.push(libc::iovec {
                iov_base: ptr.wrapping_add(skip).cast(),
                iov_len: take,
            });
            left -= take;
            skip = 0;
        }
        max_bytes - left as u64
    }

    /// CRC32C of file bytes `range`, read from the ranges' memory.
    ///
    /// # Safety
    /// Nobody (the kernel included) may write these ranges during the call.
    pub unsafe fn crc32c(&self, range: Range<u64>) -> u32 {
        let mut digest = crc32c_digest();
        let mut at = 0u64;
        for &(ptr, len) in &self.ranges {
            let (start, end) = (at.max(range.start), (at + len as u64).min(range.end));
            if start < end {
                // SAFETY: `start - at .. end - at` lies inside this range,
                // which is valid memory (a page or the slot); the caller
                // rules out writers.
                let bytes = unsafe {
                    std::slice::from_raw_parts(
                        ptr.add((start - at) as usize),
                        (end - start) as usize,
                    )
                };
                digest.update(bytes);
            }
            at += len as u64;
        }
        digest.finalize() as u32
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::integrity::crc32c;
    use crate::kv::key::BlockKey;
    use crate::kv::tensors::testing::patterned_layout;
    use crate::memory::HostRegion;

    fn codec(per_file: usize) -> (BlockCodec, Vec<Arc<HostRegion>>) {
        let (layout, regions) = patterned_layout(&[8192, 1000], 8, 1);
        (BlockCodec::new(1, layout, per_file), regions)
    }

    /// The bytes the ranges name, in order.
    fn flatten(p: &Placement) -> Vec<u8> {
        let mut out = Vec::new();
        for &(ptr, len) in &p.ranges {
            // SAFETY: test memory, nothing else uses it.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(ptr, len) });
        }
        out
    }

    #[test]
    fn a_placement_names_the_same_bytes_as_the_staged_image() {
        let (codec, _mem) = codec(2);
        let task = KeyTask {
            key: BlockKey::new(b"k".to_vec()).unwrap(),
            ids: vec![5, 2],
            file_blocks: 0..2,
        };
        let mut image = vec![0u8; codec.file_len as usize];
        // SAFETY: no concurrent access.
        unsafe { codec.encode(&task, &mut image, None).unwrap() };
        let mut slot = vec![0u8; codec.file_len as usize];
        let end = HEADER_BYTES + codec.payload_len as usize;
        slot[..HEADER_BYTES].copy_from_slice(&image[..HEADER_BYTES]);
        let p = Placement::new(&codec, &task, slot.as_mut_ptr()).unwrap();
        assert_eq!(flatten(&p), image, "header, pages, padding in file order");
        // SAFETY: no concurrent access.
        let crc = unsafe { p.crc32c(HEADER_BYTES as u64..end as u64) };
        assert_eq!(crc, crc32c(&image[HEADER_BYTES..end]));
        // Resuming after a short transfer, and a cap, cut the same bytes.
        let mut iov = Vec::new();
        let n = p.iovecs(10_000, 5_000, &mut iov);
        assert_eq!(n, 5_000);
        let mut got = Vec::new();
        for v in &iov {
            // SAFETY: test memory.
            got.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
            });
        }
        assert_eq!(got, image[10_000..15_000]);
        assert_eq!(p.iovecs(codec.file_len, 1 << 20, &mut iov), 0);
        assert!(iov.is_empty());
    }

    #[test]
    fn blocks_nobody_asked_for_land_in_the_slot() {
        let (codec, _mem) = codec(4);
        let task = KeyTask {
            key: BlockKey::new(b"k".to_vec()).unwrap(),
            ids: vec![6],
            file_blocks: 3..4,
        };
        let mut slot = vec![0u8; codec.file_len as usize];
        let slot_range = slot.as_ptr_range();
        let p = Placement::new(&codec, &task, slot.as_mut_ptr()).unwrap();
        let block = codec.layout.block_bytes() as usize;
        // Header and blocks 0..3 are one merged slot range, then the two
        // pages of id 6, then the padding.
        assert_eq!(p.ranges[0], (slot.as_mut_ptr(), HEADER_BYTES + 3 * block));
        assert_eq!(p.ranges.len(), 4, "{:?}", p.ranges);
        assert!(!slot_range.contains(&p.ranges[1].0.cast_const()));
        let total: usize = p.ranges.iter().map(|r| r.1).sum();
        assert_eq!(total as u64, codec.file_len);
        let bad = KeyTask {
            key: BlockKey::new(b"k".to_vec()).unwrap(),
            ids: vec![8],
            file_blocks: 3..4,
        };
        assert!(Placement::new(&codec, &bad, slot.as_mut_ptr()).is_err());
    }
}
