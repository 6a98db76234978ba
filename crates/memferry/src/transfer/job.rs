//! A transfer job (plan + memory + checksum policy) and the per-operation
//! steps every backend shares: verify-then-copy on load, copy-then-checksum
//! on store.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use super::plan::{IoOp, TransferPlan};
use crate::integrity;
use crate::memory::Region;
use crate::{Error, Result};

/// What to do with checksums.
#[derive(Clone, Copy)]
pub enum Checksums<'a> {
    /// Neither compute nor check (`--no-verify` on load).
    Skip,
    /// Check loaded bytes against this table before accepting them.
    Verify(&'a [u32]),
    /// Compute checksums of stored bytes into this table.
    Record(&'a [AtomicU32]),
}

/// Everything a backend needs to run a plan.
pub struct TransferJob<'a> {
    /// The operations.
    pub plan: &'a TransferPlan,
    /// Memory regions, indexed by [`IoOp::region`].
    pub regions: &'a [&'a dyn Region],
    /// Checksum policy.
    pub checksums: Checksums<'a>,
    /// Incremented by payload bytes as operations complete.
    pub progress: Option<&'a AtomicU64>,
    /// Set to request cancellation; backends stop issuing I/O, drain what
    /// is in flight and return [`Error::Cancelled`].
    pub cancel: Option<&'a AtomicBool>,
    /// CPU nanoseconds spent in checksums (accumulated by backends).
    pub checksum_nanos: AtomicU64,
}

impl<'a> TransferJob<'a> {
    /// A job with no progress counter or cancellation flag.
    pub fn new(
        plan: &'a TransferPlan,
        regions: &'a [&'a dyn Region],
        checksums: Checksums<'a>,
    ) -> Self {
        Self {
            plan,
            regions,
            checksums,
            progress: None,
            cancel: None,
            checksum_nanos: AtomicU64::new(0),
        }
    }

    /// Checks the plan against the regions and checksum table, so backends
    /// can rely on every range being in bounds and on no two operations
    /// sharing bytes of a region (each op has exclusive use of its range).
    pub fn validate(&self) -> Result<()> {
        for op in &self.plan.ops {
            let region = self.regions.get(op.region).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "plan names region {} that does not exist",
                    op.region
                ))
            })?;
            crate::memory::check_range(region.len(), op.mem_offset, op.len as usize)?;
            if op.file >= self.plan.files.len() {
                return Err(Error::InvalidInput(format!(
                    "plan names file {} that does not exist",
                    op.file
                )));
            }
            let sums = self.plan.checksums_of(op);
            let table = match self.checksums {
                Checksums::Skip => usize::MAX,
                Checksums::Verify(t) => t.len(),
                Checksums::Record(t) => t.len(),
            };
            if sums.end > table {
                return Err(Error::InvalidInput(
                    "checksum table is shorter than the plan".into(),
                ));
            }
        }
        self.check_no_overlap()
    }

    /// Fails when two operations touch the same bytes of a region. Sorted
    /// by (region, start), any overlap shows between neighbours. Ranges are
    /// in bounds (checked first), so their ends do not overflow.
    fn check_no_overlap(&self) -> Result<()> {
        let mut spans: Vec<(usize, u64, u64)> = self
            .plan
            .ops
            .iter()
            .filter(|op| op.len > 0)
            .map(|op| (op.region, op.mem_offset, op.mem_offset + op.len))
            .collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            let ((region, a_start, a_end), (next_region, b_start, b_end)) = (w[0], w[1]);
            if region == next_region && b_start < a_end {
                return Err(Error::InvalidInput(format!(
                    "plan operations overlap in region {region}: bytes {a_start}..{a_end} and {b_start}..{b_end}"
                )));
            }
        }
        Ok(())
    }

    /// For a load: waits, once per device, until every byte the job wrote
    /// into CUDA device memory has landed (synchronous host-to-device
    /// copies may return before their DMA completes), so the caller can
    /// read the bytes on any stream. Backends call it before a load reports
    /// success. Stores need nothing: their device-to-host copies have
    /// completed when they return.
    pub fn settle_devices(&self) -> Result<()> {
        if self.plan.direction != super::plan::Direction::Load {
            return Ok(());
        }
        let mut used: Vec<usize> = self.plan.ops.iter().map(|op| op.region).collect();
        used.sort_unstable();
        used.dedup();
        crate::memory::cuda::synchronize_regions(used.into_iter().map(|r| self.regions[r]))
    }

    /// True once cancellation was requested.
    pub fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// Checks loaded bytes of `op` (`data.len() == op.len`) against the
    /// recorded checksums.
    pub fn verify_loaded(&self, op: &IoOp, data: &[u8]) -> Result<()> {
        self.verify_op(op, |expected, chunk| {
            integrity::verify_chunks(data, chunk, expected)
        })
    }

    /// Runs `check(expected checksums, chunk size)` over `op`'s loaded bytes
    /// when the job verifies, timing it and naming the first bad chunk.
    fn verify_op(
        &self,
        op: &IoOp,
        check: impl FnOnce(&[u32], u64) -> std::result::Result<(), (usize, u32)>,
    ) -> Result<()> {
        let Checksums::Verify(table) = self.checksums else {
            return Ok(());
        };
        let t = Instant::now();
        let expected = &table[self.plan.checksums_of(op)];
        let outcome = check(expected, self.plan.checksum_chunk);
        self.add_checksum_time(t);
        outcome.map_err(|(i, found)| {
            let chunk = self.plan.checksum_chunk;
            let start = i as u64 * chunk;
            Error::ChecksumMismatch {
                path: self.plan.files[op.file].path.clone(),
                offset: op.file_offset + start,
                length: chunk.min(op.len - start),
                expected: expected[i],
                found,
            }
        })
    }

    /// Records the checksums of bytes about to be stored for `op`.
    pub fn record_stored(&self, op: &IoOp, data: &[u8]) {
        let Checksums::Record(table) = self.checksums else {
            return;
        };
        let t = Instant::now();
        let range = self.plan.checksums_of(op);
        for (slot, piece) in table[range]
            .iter()
            .zip(data.chunks(self.plan.checksum_chunk as usize))
        {
            slot.store(integrity::crc32c(piece), Ordering::Relaxed);
        }
        self.add_checksum_time(t);
    }

    /// Verifies `data` and copies it into the op's region.
    pub fn accept_loaded(&self, op: &IoOp, data: &[u8]) -> Result<()> {
        self.verify_loaded(op, data)?;
        // SAFETY: plans never overlap in a region (validated by the snapshot
        // layer), so this op has exclusive use of its destination range.
        unsafe { self.regions[op.region].copy_in(op.mem_offset, data)? };
        self.op_done(op);
        Ok(())
    }

    /// Like [`Self::accept_loaded`], for bytes held in several pieces (in
    /// order, `op.len` bytes in all): verified across the pieces, then
    /// copied piece by piece, with no joined copy.
    pub fn accept_loaded_pieces(&self, op: &IoOp, pieces: &[&[u8]]) -> Result<()> {
        debug_assert_eq!(pieces.iter().map(|p| p.len() as u64).sum::<u64>(), op.len);
        self.verify_op(op, |expected, chunk| {
            integrity::verify_chunks_of_pieces(pieces, chunk, expected)
        })?;
        let mut at = op.mem_offset;
        for piece in pieces {
            // SAFETY: plans never overlap in a region (validated by the
            // snapshot layer), so this op has exclusive use of its range.
            unsafe { self.regions[op.region].copy_in(at, piece)? };
            at += piece.len() as u64;
        }
        self.op_done(op);
        Ok(())
    }

    /// Copies the op's source bytes into `buf` (`buf.len() == op.len`) and
    /// records their checksums.
    pub fn fetch_for_store(&self, op: &IoOp, buf: &mut [u8]) -> Result<()> {
        // SAFETY: nobody writes source regions during a store.
        unsafe { self.regions[op.region].copy_out(op.mem_offset, buf)? };
        self.record_stored(op, buf);
        Ok(())
    }

    /// Counts a finished op towards progress.
    pub fn op_done(&self, op: &IoOp) {
        if let Some(p) = self.progress {
            p.fetch_add(op.len, Ordering::Relaxed);
        }
    }

    /// CPU seconds spent in checksums so far.
    pub fn checksum_seconds(&self) -> f64 {
        self.checksum_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    fn add_checksum_time(&self, since: Instant) {
        self.checksum_nanos
            .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::HostRegion;
    use crate::transfer::{Direction, FileTarget, PlanBuilder};

    /// A load plan of `extents` (file offset, length, region, memory offset)
    /// into one 8 KiB file, validated against two 16 KiB regions.
    fn validate(extents: &[(u64, u64, usize, u64)]) -> Result<()> {
        let mut b = PlanBuilder::new(Direction::Load, 4096, 4096);
        let f = b.add_file(FileTarget {
            path: "f".into(),
            root: 0,
            size: 1 << 20,
        });
        for &(file_offset, len, region, mem_offset) in extents {
            b.add_extent(f, file_offset, len, region, mem_offset);
        }
        let plan = b.build();
        let (r0, r1) = (HostRegion::new(16384)?, HostRegion::new(16384)?);
        let regions: [&dyn Region; 2] = [&r0, &r1];
        TransferJob::new(&plan, &regions, Checksums::Skip).validate()
    }

    #[test]
    fn overlapping_ops_in_a_region_are_rejected() {
        // Disjoint, touching, and the same range in two regions: fine.
        validate(&[(0, 4096, 0, 0), (4096, 4096, 0, 4096), (8192, 100, 1, 0)]).unwrap();
        validate(&[(0, 8192, 0, 0), (8192, 8192, 1, 0)]).unwrap();
        // One byte shared, a range inside another (listed out of order),
        // and the same range twice.
        for bad in [
            &[(0, 4097, 0, 0), (8192, 4096, 0, 4096)][..],
            &[(0, 4096, 1, 8192), (8192, 100, 0, 0), (16384, 16384, 1, 0)][..],
            &[(0, 10, 0, 100), (4096, 10, 0, 100)][..],
        ] {
            let e = validate(bad).unwrap_err().to_string();
            assert!(e.contains("overlap"), "{bad:?}: {e}");
        }
    }
}
