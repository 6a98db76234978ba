//! Transfer plans: the list of I/O operations a backend executes.

use std::ops::Range;
use std::path::PathBuf;

use super::IO_ALIGN;
use crate::integrity::chunk_count;

/// Direction of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Storage to memory (restore, verify).
    Load,
    /// Memory to storage (save).
    Store,
}

impl Direction {
    /// The file request that moves the bytes this way.
    pub(crate) fn io(self) -> super::uring::Io {
        match self {
            Direction::Load => super::uring::Io::Read,
            Direction::Store => super::uring::Io::Write,
        }
    }
}

/// A file the plan touches.
#[derive(Debug, Clone)]
pub struct FileTarget {
    /// Absolute or caller-relative path.
    pub path: PathBuf,
    /// Index of the root (disk) holding the file; backends run one
    /// submitter per root.
    pub root: usize,
    /// Size the file has (load) or must have (store), padding included.
    pub size: u64,
}

/// One I/O request: `len` bytes at `file_offset` in a file <-> `mem_offset`
/// in a region. `file_offset` is 4096-aligned; the file holds zero padding
/// up to the next multiple of 4096 after `len`.
#[derive(Debug, Clone, Copy)]
pub struct IoOp {
    /// Index into [`TransferPlan::files`].
    pub file: usize,
    /// Byte offset in the file (aligned to 4096).
    pub file_offset: u64,
    /// Payload length in bytes.
    pub len: u64,
    /// Index into the job's regions.
    pub region: usize,
    /// Byte offset in the region.
    pub mem_offset: u64,
    /// Index of this op's first checksum in the plan's checksum table.
    pub checksum_index: usize,
}

/// A complete description of a transfer.
#[derive(Debug, Clone)]
pub struct TransferPlan {
    /// Load or store.
    pub direction: Direction,
    /// Files involved.
    pub files: Vec<FileTarget>,
    /// Operations; no two overlap in a file or in a region.
    pub ops: Vec<IoOp>,
    /// Checksum granularity in bytes.
    pub checksum_chunk: u64,
    /// Total number of checksums.
    pub checksum_count: usize,
}

impl TransferPlan {
    /// Payload bytes moved by the plan.
    pub fn bytes(&self) -> u64 {
        self.ops.iter().map(|o| o.len).sum()
    }

    /// Range of the checksum table that belongs to `op`.
    pub fn checksums_of(&self, op: &IoOp) -> Range<usize> {
        op.checksum_index..op.checksum_index + chunk_count(op.len, self.checksum_chunk)
    }

    /// Number of distinct roots.
    pub fn root_count(&self) -> usize {
        self.files.iter().map(|f| f.root + 1).max().unwrap_or(0)
    }
}

/// Builds plans by splitting extents into requests of at most `io_chunk`
/// bytes, each covering whole checksum chunks.
pub struct PlanBuilder {
    plan: TransferPlan,
    io_chunk: u64,
}

impl PlanBuilder {
    /// A builder; `io_chunk` is rounded up to a multiple of `checksum_chunk`.
    pub fn new(direction: Direction, checksum_chunk: u64, io_chunk: u64) -> Self {
        assert!(checksum_chunk > 0 && checksum_chunk.is_multiple_of(IO_ALIGN));
        let io_chunk = io_chunk.div_ceil(checksum_chunk).max(1) * checksum_chunk;
        Self {
            plan: TransferPlan {
                direction,
                files: Vec::new(),
                ops: Vec::new(),
                checksum_chunk,
                checksum_count: 0,
            },
            io_chunk,
        }
    }

    /// Adds a file; returns its index.
    pub fn add_file(&mut self, file: FileTarget) -> usize {
        self.plan.files.push(file);
        self.plan.files.len() - 1
    }

    /// Adds an extent of `len` bytes; returns the index of its first checksum
    /// (the extent owns `chunk_count(len)` consecutive checksums).
    pub fn add_extent(
        &mut self,
        file: usize,
        file_offset: u64,
        len: u64,
        region: usize,
        mem_offset: u64,
    ) -> usize {
        assert_eq!(file_offset % IO_ALIGN, 0, "extent offsets are aligned");
        let first = self.plan.checksum_count;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(self.io_chunk);
            self.plan.ops.push(IoOp {
                file,
                file_offset: file_offset + done,
                len: n,
                region,
                mem_offset: mem_offset + done,
                checksum_index: first + (done / self.plan.checksum_chunk) as usize,
            });
            done += n;
        }
        self.plan.checksum_count += chunk_count(len, self.plan.checksum_chunk);
        first
    }

    /// The finished plan.
    pub fn build(self) -> TransferPlan {
        self.plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_extents_on_checksum_boundaries() {
        let mut b = PlanBuilder::new(Direction::Load, 1 << 20, 3 << 20);
        let f = b.add_file(FileTarget {
            path: "x".into(),
            root: 0,
            size: 0,
        });
        let first = b.add_extent(f, 4096, (7 << 20) + 5, 0, 0);
        let second = b.add_extent(f, 8 << 20, 10, 1, 0);
        let plan = b.build();
        assert_eq!(first, 0);
        assert_eq!(second, 8);
        assert_eq!(plan.checksum_count, 9);
        let lens: Vec<u64> = plan.ops.iter().map(|o| o.len).collect();
        assert_eq!(lens, vec![3 << 20, 3 << 20, (1 << 20) + 5, 10]);
        assert_eq!(plan.ops[2].checksum_index, 6);
        assert_eq!(plan.checksums_of(&plan.ops[2]), 6..8);
        assert_eq!(plan.ops[2].file_offset, 4096 + (6 << 20));
    }
}
