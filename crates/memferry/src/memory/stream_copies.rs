//! Copies between host buffers and regions, with device copies queued on
//! streams of memferry's own (one per device) and awaited together.
//!
//! Copying page by page with [`Region::copy_in`] costs one synchronous
//! driver call per page (staged by the driver when the host side is
//! pageable) and a wait on the device's legacy stream. Here every page of a
//! batch is queued as an asynchronous copy, and [`StreamCopies::finish`]
//! waits once, for these copies only. Host regions are copied at once.
//!
//! Ordering: the first copy of a batch on a device waits (on the device,
//! not the host) for the work queued so far on its legacy default stream,
//! so a copy never overtakes the caller's kernels there, as with the
//! synchronous copies. Work on the caller's non-blocking streams is not
//! ordered: finish it before the transfer starts.

use super::cuda::Stream;
use super::{Region, check_range};
use crate::Result;

/// A batch of copies in progress: see the module docs.
pub struct StreamCopies {
    /// One stream per device, and whether the current batch queued on it.
    streams: Vec<(Stream, bool)>,
}

impl StreamCopies {
    /// Streams for every CUDA device among `regions`; `None` when they are
    /// all host memory (plain copies need no streams).
    pub fn for_regions<'a>(
        regions: impl IntoIterator<Item = &'a dyn Region>,
    ) -> Result<Option<Self>> {
        let mut streams: Vec<(Stream, bool)> = Vec::new();
        for r in regions {
            if let Some((ctx, _)) = r.cuda()
                && !streams
                    .iter()
                    .any(|(s, _)| s.context().ordinal() == ctx.ordinal())
            {
                streams.push((Stream::new(super::cuda::context(ctx.ordinal())?)?, false));
            }
        }
        Ok((!streams.is_empty()).then_some(Self { streams }))
    }

    /// The stream of `region`'s device, made to wait for the legacy stream
    /// when it is the batch's first copy there.
    fn stream(&mut self, ordinal: u32) -> Result<&Stream> {
        let Some((stream, queued)) = self
            .streams
            .iter_mut()
            .find(|(s, _)| s.context().ordinal() == ordinal)
        else {
            return Err(crate::Error::InvalidInput(format!(
                "no copy stream for cuda:{ordinal}: the region was not among those the copies were set up for"
            )));
        };
        if !*queued {
            stream.wait_for_legacy()?;
            *queued = true;
        }
        Ok(stream)
    }

    /// Copies `src` into `region` at `offset`: now for host memory, queued
    /// for device memory.
    ///
    /// # Safety
    /// `src` must stay valid and unmodified, and nobody else may access the
    /// region's range, until [`StreamCopies::finish`] returns (also when
    /// this call fails: copies queued before it may still run).
    pub unsafe fn copy_in(&mut self, region: &dyn Region, offset: u64, src: &[u8]) -> Result<()> {
        let Some((ctx, base)) = region.cuda() else {
            // SAFETY: forwarded to the caller.
            return unsafe { region.copy_in(offset, src) };
        };
        check_range(region.len(), offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let stream = self.stream(ctx.ordinal())?;
        // SAFETY: the range lies inside the region's device allocation
        // (checked), and the caller keeps both sides untouched until
        // `finish` has waited for the stream.
        unsafe { stream.copy_htod(base + offset, src.as_ptr(), src.len()) }
    }

    /// Copies `dst.len()` bytes of `region` at `offset` into `dst`: now for
    /// host memory, queued for device memory.
    ///
    /// # Safety
    /// Nobody may read or write `dst`, or write the region's range, until
    /// [`StreamCopies::finish`] returns (also when this call fails).
    pub unsafe fn copy_out(
        &mut self,
        region: &dyn Region,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<()> {
        let Some((ctx, base)) = region.cuda() else {
            // SAFETY: forwarded to the caller.
            return unsafe { region.copy_out(offset, dst) };
        };
        check_range(region.len(), offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        let stream = self.stream(ctx.ordinal())?;
        // SAFETY: in range (checked); the caller keeps `dst` and the range
        // untouched until `finish` has waited for the stream.
        unsafe { stream.copy_dtoh(dst.as_mut_ptr(), base + offset, dst.len()) }
    }

    /// Waits until every copy queued since the last `finish` has completed,
    /// on every device (also after one of them failed).
    pub fn finish(&mut self) -> Result<()> {
        let mut first_error = Ok(());
        for (stream, queued) in &mut self.streams {
            if std::mem::take(queued)
                && let Err(e) = stream.synchronize()
                && first_error.is_ok()
            {
                first_error = Err(e);
            }
        }
        first_error
    }
}

impl Drop for StreamCopies {
    fn drop(&mut self) {
        // Streams synchronise when dropped; this only makes the order plain.
        let _ = self.finish();
    }
}
