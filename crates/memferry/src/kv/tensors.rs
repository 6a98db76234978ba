//! The engine's registered KV tensors and the block-major payload.
//!
//! Each tensor is a region shaped `(num_blocks, page_bytes)`; a block id
//! selects one page in every tensor. A stored file holds, for each block of
//! its group, that block's page of every tensor, in registration order:
//! `[b0: t0 t1 .. tn][b1: t0 t1 .. tn]...`. Memory may be host or device
//! memory: pages move through [`Region::copy_in`]/[`Region::copy_out`], or
//! for device memory as asynchronous copies on [`StreamCopies`] streams.

use std::ops::Range;
use std::sync::Arc;

use crate::memory::{Region, StreamCopies};
use crate::{Error, Result};

/// One registered KV tensor.
#[derive(Clone)]
pub struct KvTensor {
    /// The tensor's memory.
    pub region: Arc<dyn Region>,
    /// Blocks (pages) in the tensor.
    pub num_blocks: u64,
    /// Bytes per page.
    pub page_bytes: u64,
}

/// The registered tensors, validated.
#[derive(Clone)]
pub struct KvLayout {
    tensors: Vec<KvTensor>,
    num_blocks: u64,
    block_bytes: u64,
}

impl KvLayout {
    /// Registers `tensors`; they must share `num_blocks` and hold
    /// `num_blocks * page_bytes` bytes each.
    pub fn new(tensors: Vec<KvTensor>) -> Result<Self> {
        let Some(first) = tensors.first() else {
            return Err(Error::InvalidInput(
                "register at least one KV tensor".into(),
            ));
        };
        let num_blocks = first.num_blocks;
        for (i, t) in tensors.iter().enumerate() {
            if t.num_blocks != num_blocks || t.num_blocks == 0 {
                return Err(Error::InvalidInput(format!(
                    "KV tensor {i} has {} blocks, tensor 0 has {num_blocks}: all tensors need the same number of blocks (at least 1)",
                    t.num_blocks
                )));
            }
            if t.page_bytes == 0 {
                return Err(Error::InvalidInput(format!(
                    "KV tensor {i} has a page size of 0"
                )));
            }
            let need = t.num_blocks.checked_mul(t.page_bytes);
            if need != Some(t.region.len()) {
                return Err(Error::InvalidInput(format!(
                    "KV tensor {i} holds {} bytes but {} blocks of {} bytes need {}: the page size does not match the registered memory",
                    t.region.len(),
                    t.num_blocks,
                    t.page_bytes,
                    need.map_or("more than 2^64".into(), |n| n.to_string())
                )));
            }
        }
        let block_bytes = tensors.iter().map(|t| t.page_bytes).sum();
        Ok(Self {
            tensors,
            num_blocks,
            block_bytes,
        })
    }

    /// Blocks per tensor.
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// Page bytes of each tensor, in registration order.
    pub fn page_bytes(&self) -> Vec<u64> {
        self.tensors.iter().map(|t| t.page_bytes).collect()
    }

    /// Bytes of one block across all tensors.
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// Fails unless every id is a valid block id.
    pub fn check_ids(&self, ids: &[u64]) -> Result<()> {
        match ids.iter().find(|&&id| id >= self.num_blocks) {
            Some(id) => Err(Error::InvalidInput(format!(
                "block id {id} is out of range: the registered tensors hold {} blocks",
                self.num_blocks
            ))),
            None => Ok(()),
        }
    }

    /// True when the kernel can move every page straight to and from its
    /// tensor: host memory whose base address and page size are multiples
    /// of `align` (the O_DIRECT alignment, or 1 through the page cache).
    pub fn pages_addressable(&self, align: u64) -> bool {
        self.tensors.iter().all(|t| {
            t.page_bytes.is_multiple_of(align)
                && t.region
                    .host_ptr_mut()
                    .is_some_and(|p| (p as u64).is_multiple_of(align))
        })
    }

    /// The host address and length of every page of `ids`, block-major
    /// (for each id, one range per tensor in registration order); an error
    /// for an id out of range or a tensor that is not host memory.
    pub fn host_pages(&self, ids: &[u64]) -> Result<Vec<(*mut u8, usize)>> {
        self.check_ids(ids)?;
        let mut out = Vec::with_capacity(ids.len() * self.tensors.len());
        for &id in ids {
            for (i, t) in self.tensors.iter().enumerate() {
                let base = t.region.host_ptr_mut().ok_or_else(|| {
                    Error::Unsupported(format!(
                        "KV tensor {i} is not host memory: its pages move through staging"
                    ))
                })?;
                // SAFETY: `id < num_blocks` (checked), and the region holds
                // `num_blocks * page_bytes` bytes (checked at registration),
                // so the offset stays inside the allocation.
                let page = unsafe { base.add((id * t.page_bytes) as usize) };
                out.push((page, t.page_bytes as usize));
            }
        }
        Ok(out)
    }

    /// Every page of `ids` in block-major order: its tensor's memory, its
    /// offset there and its length (ids must be checked).
    fn pages_of<'s>(
        &'s self,
        ids: &'s [u64],
    ) -> impl Iterator<Item = (&'s dyn Region, u64, usize)> {
        ids.iter().flat_map(move |&id| {
            self.tensors
                .iter()
                .map(move |t| (&*t.region, id * t.page_bytes, t.page_bytes as usize))
        })
    }

    /// Copies the pages of `ids` into `dst` in block-major order
    /// (`dst.len() == ids.len() * block_bytes`). With `copies`, pages on a
    /// device are queued on its streams and awaited together (fastest into
    /// pinned `dst`); without, each is a synchronous copy.
    ///
    /// # Safety
    /// Nobody may write the pages of `ids` during the call.
    pub unsafe fn gather(
        &self,
        ids: &[u64],
        dst: &mut [u8],
        mut copies: Option<&mut StreamCopies>,
    ) -> Result<()> {
        self.check_ids(ids)?;
        self.check_len(ids.len(), dst.len())?;
        let mut pos = 0;
        let queued = self.pages_of(ids).try_for_each(|(region, offset, n)| {
            let page = &mut dst[pos..pos + n];
            pos += n;
            // SAFETY: in range (ids checked, region sized at
            // registration); the caller rules out writers; `dst` stays
            // borrowed until the queued copies finish below.
            unsafe {
                match copies.as_deref_mut() {
                    Some(c) => c.copy_out(region, offset, page),
                    None => region.copy_out(offset, page),
                }
            }
        });
        // Queued copies land (or fail) before `dst` is handed back.
        let finished = copies.map_or(Ok(()), |c| c.finish());
        queued.and(finished)
    }

    /// Copies blocks `file_blocks` of a block-major `payload` into the pages
    /// of `ids` (`ids.len() == file_blocks.len()`); a partial first group
    /// loads only the tail of its file. Returns once the pages hold the
    /// bytes, also on devices: with `copies`, device pages are queued on
    /// its streams and awaited together; without, each is a synchronous
    /// copy and the call waits for each device's legacy stream.
    ///
    /// # Safety
    /// Nobody may read or write the pages of `ids` during the call.
    pub unsafe fn scatter(
        &self,
        payload: &[u8],
        file_blocks: Range<usize>,
        ids: &[u64],
        mut copies: Option<&mut StreamCopies>,
    ) -> Result<()> {
        self.check_ids(ids)?;
        if file_blocks.len() != ids.len()
            || (file_blocks.end as u64) * self.block_bytes > payload.len() as u64
        {
            return Err(Error::InvalidInput(format!(
                "cannot place blocks {file_blocks:?} of a {}-byte payload into {} block ids",
                payload.len(),
                ids.len()
            )));
        }
        let mut pos = file_blocks.start * self.block_bytes as usize;
        let queued = self.pages_of(ids).try_for_each(|(region, offset, n)| {
            let page = &payload[pos..pos + n];
            pos += n;
            // SAFETY: in range; the caller guarantees exclusive access to
            // the pages, and `payload` stays borrowed until the queued
            // copies finish below.
            unsafe {
                match copies.as_deref_mut() {
                    Some(c) => c.copy_in(region, offset, page),
                    None => region.copy_in(offset, page),
                }
            }
        });
        match copies {
            Some(c) => queued.and(c.finish()),
            None => {
                queued?;
                // Synchronous copies into device memory may return before
                // their bytes land.
                crate::memory::cuda::synchronize_regions(self.tensors.iter().map(|t| &*t.region))
            }
        }
    }

    /// Streams for the devices among the tensors, to pass to
    /// [`KvLayout::gather`] and [`KvLayout::scatter`]; `None` when every
    /// tensor is host memory.
    pub fn stream_copies(&self) -> Result<Option<StreamCopies>> {
        StreamCopies::for_regions(self.tensors.iter().map(|t| &*t.region))
    }

    /// The CUDA device of the first tensor in device memory, if any.
    pub fn first_device(&self) -> Option<u32> {
        self.tensors
            .iter()
            .find_map(|t| t.region.cuda().map(|(ctx, _)| ctx.ordinal()))
    }

    fn check_len(&self, blocks: usize, len: usize) -> Result<()> {
        if blocks as u64 * self.block_bytes != len as u64 {
            return Err(Error::InvalidInput(format!(
                "{blocks} blocks need {} bytes, the buffer has {len}",
                blocks as u64 * self.block_bytes
            )));
        }
        Ok(())
    }
}

/// Host tensors for the crate's unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::memory::HostRegion;

    /// One host tensor of `blocks` pages per entry of `pages`, every byte
    /// a pattern of (`seed`, tensor, offset); seed 0 leaves them zero.
    pub fn patterned_layout(
        pages: &[u64],
        blocks: u64,
        seed: u8,
    ) -> (KvLayout, Vec<Arc<HostRegion>>) {
        let mut regions = Vec::new();
        let mut tensors = Vec::new();
        for (t, &page) in pages.iter().enumerate() {
            let mut r = HostRegion::new(blocks * page).unwrap();
            if seed != 0 {
                for (i, b) in r.as_mut_slice().iter_mut().enumerate() {
                    *b = (i as u64 * 31 / 7 + t as u64) as u8 ^ seed;
                }
            }
            let r = Arc::new(r);
            regions.push(r.clone());
            tensors.push(KvTensor {
                region: r,
                num_blocks: blocks,
                page_bytes: page,
            });
        }
        (KvLayout::new(tensors).unwrap(), regions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::HostRegion;

    fn tensor(num_blocks: u64, page: u64, fill: u8) -> KvTensor {
        let mut r = HostRegion::new(num_blocks * page).unwrap();
        for (i, b) in r.as_mut_slice().iter_mut().enumerate() {
            *b = fill.wrapping_add((i as u64 / page) as u8);
        }
        KvTensor {
            region: Arc::new(r),
            num_blocks,
            page_bytes: page,
        }
    }

    #[test]
    fn gather_is_block_major_and_scatter_inverts_it() {
        let layout = KvLayout::new(vec![tensor(8, 100, 0), tensor(8, 30, 100)]).unwrap();
        assert_eq!(layout.block_bytes(), 130);
        let mut payload = vec![0u8; 2 * 130];
        // SAFETY: no concurrent access in this test.
        unsafe { layout.gather(&[5, 2], &mut payload, None).unwrap() };
        assert!(payload[..100].iter().all(|&b| b == 5), "block 5, tensor 0");
        assert!(
            payload[100..130].iter().all(|&b| b == 105),
            "block 5, tensor 1"
        );
        assert!(
            payload[130..230].iter().all(|&b| b == 2),
            "block 2, tensor 0"
        );
        // Load only the second block of the file into block 7 (partial group).
        let target = KvLayout::new(vec![tensor(8, 100, 50), tensor(8, 30, 200)]).unwrap();
        // SAFETY: no concurrent access.
        unsafe { target.scatter(&payload, 1..2, &[7], None).unwrap() };
        let mut back = vec![0u8; 130];
        // SAFETY: no concurrent access.
        unsafe { target.gather(&[7], &mut back, None).unwrap() };
        assert_eq!(&back[..], &payload[130..260]);
    }

    #[test]
    fn host_pages_are_block_major_and_alignment_is_checked() {
        let layout = KvLayout::new(vec![tensor(8, 8192, 0), tensor(8, 4096, 1)]).unwrap();
        assert!(layout.pages_addressable(4096));
        let pages = layout.host_pages(&[3, 1]).unwrap();
        let base = |t: usize| layout.tensors[t].region.host_ptr_mut().unwrap();
        // SAFETY: pointer arithmetic inside the regions, compared only.
        let want = unsafe {
            vec![
                (base(0).add(3 * 8192), 8192),
                (base(1).add(3 * 4096), 4096),
                (base(0).add(8192), 8192),
                (base(1).add(4096), 4096),
            ]
        };
        assert_eq!(pages, want);
        assert!(layout.host_pages(&[8]).is_err(), "out of range");
        let odd = KvLayout::new(vec![tensor(8, 8192, 0), tensor(8, 3000, 1)]).unwrap();
        assert!(!odd.pages_addressable(4096), "3000-byte pages");
        assert!(odd.pages_addressable(1));
    }

    #[test]
    fn bad_registrations_and_ids_are_refused() {
        assert!(KvLayout::new(vec![]).is_err());
        assert!(KvLayout::new(vec![tensor(8, 100, 0), tensor(4, 100, 0)]).is_err());
        let mut t = tensor(8, 100, 0);
        t.page_bytes = 99;
        let err = KvLayout::new(vec![t]).err().unwrap().to_string();
        assert!(err.contains("page size does not match"), "{err}");
        let layout = KvLayout::new(vec![tensor(8, 100, 0)]).unwrap();
        assert!(layout.check_ids(&[7]).is_ok());
        assert!(layout.check_ids(&[8]).is_err());
        let mut small = vec![0u8; 99];
        // SAFETY: no concurrent access.
        assert!(unsafe { layout.gather(&[1], &mut small, None) }.is_err());
        // SAFETY: no concurrent access.
        assert!(unsafe { layout.scatter(&[0u8; 100], 0..2, &[0, 1], None) }.is_err());
    }
}
