//! One op's O_DIRECT request on an io_uring ring, the bookkeeping `direct`
//! and `pinned` share: queueing what is left of it, accounting completions
//! (short transfers are resumed) and the errors a failed request reports
//! (shared with `gds`).

use std::fs::File;
use std::os::fd::AsFd;

use super::job::TransferJob;
use super::plan::{Direction, IoOp, TransferPlan};
use super::uring::Ring;
use super::{IO_ALIGN, Tuning};
use crate::units::align_up;
use crate::{Error, Result};

/// The bytes the kernel may move per request: `max_bytes_per_call` (test
/// hook) rounded up to 4096, else no limit.
pub(super) fn per_call_cap(tuning: &Tuning) -> u64 {
    tuning
        .max_bytes_per_call
        .map_or(u64::MAX, |c| align_up(c.max(1), IO_ALIGN))
}

/// How far one op's request has come.
#[derive(Clone, Copy, Default)]
pub(super) struct Request {
    /// Index of the op in the plan.
    pub op: usize,
    /// Bytes moved so far.
    pub done: u64,
    /// Bytes to move: the op's length rounded up to 4096 (the file holds
    /// zero padding up to there).
    pub want: u64,
}

/// What a completion left of its request.
#[derive(Debug)]
pub(super) enum Outcome {
    /// The op's bytes have all moved.
    Complete,
    /// Short: the rest must be queued again.
    Short,
}

impl Request {
    /// Queues the part of the request not yet moved, to or from
    /// `buf + done`, as request `user_data` on `ring`; `fixed` names the
    /// registered buffer `buf` lies in.
    ///
    /// # Safety
    /// `buf` has room for `want` bytes, lies inside registered buffer `i`
    /// when `fixed` is `Some(i)`, is aligned for O_DIRECT, and is neither
    /// touched (written, for a store) nor freed until the completion for
    /// `user_data` arrives; `files` stay open until then.
    pub unsafe fn submit_rest(
        &self,
        job: &TransferJob<'_>,
        ring: &mut Ring,
        files: &[Option<File>],
        buf: *mut u8,
        fixed: Option<u16>,
        user_data: u64,
    ) {
        let op = &job.plan.ops[self.op];
        let fd = files[op.file].as_ref().expect("opened in setup").as_fd();
        let len = (self.want - self.done) as u32;
        // SAFETY: `done < want`, and the caller gives `buf` room for `want`
        // bytes.
        let ptr = unsafe { buf.add(self.done as usize) };
        let offset = op.file_offset + self.done;
        // SAFETY: forwarded to the caller: the rest of `buf` stays valid,
        // untouched and inside buffer `fixed`, and the file open, until the
        // completion for `user_data` arrives.
        unsafe {
            let io = job.plan.direction.io();
            ring.push_io(io, fd, ptr, len, offset, fixed, user_data)
        }
    }

    /// Accounts the completion `res` (bytes moved, or `-errno`) of the
    /// request, counting at most `cap` bytes. A load may end at the end of
    /// the file once the op's payload is in (the padding may be missing);
    /// any other stop short of `want` fails with the file named.
    pub fn complete(
        &mut self,
        job: &TransferJob<'_>,
        files: &[Option<File>],
        cap: u64,
        res: i32,
    ) -> Result<Outcome> {
        let plan = job.plan;
        let op = &plan.ops[self.op];
        if res < 0 {
            // On a device with logical blocks larger than 512 bytes, the
            // read that resumes a short one at the end of the file fails
            // with EINVAL instead of returning 0: where the file does end
            // there, it is the end of the file, not an I/O error.
            if res == -libc::EINVAL
                && plan.direction == Direction::Load
                && self.done > 0
                && let Some(size) = file_size(files, op.file)
                && op.file_offset + self.done >= size
            {
                if self.done >= op.len {
                    return Ok(Outcome::Complete);
                }
                return Err(ended_early(plan, op, size, String::new()));
            }
            let e = std::io::Error::from_raw_os_error(-res);
            return Err(io_error(plan, op, "", self.done, self.want - self.done, e));
        }
        let n = (res as u64).min(cap);
        let done = self.done + n;
        self.done = done;
        if done < self.want {
            let at_eof = n == 0 || !done.is_multiple_of(512);
            if !at_eof {
                return Ok(Outcome::Short);
            }
            if plan.direction == Direction::Store || done < op.len {
                let file_size = file_size(files, op.file).unwrap_or(0);
                let path = &plan.files[op.file].path;
                return Err(ended_early(
                    plan,
                    op,
                    file_size,
                    format!(
                        "writing {} at offset {}",
                        path.display(),
                        op.file_offset + done
                    ),
                ));
            }
        }
        Ok(Outcome::Complete)
    }
}

/// The size of open file `index` now, if it can be read.
fn file_size(files: &[Option<File>], index: usize) -> Option<u64> {
    files[index].as_ref()?.metadata().ok().map(|m| m.len())
}

/// The error for moving `op`'s bytes that failed with `e`, `done` bytes
/// into the op and `left` bytes short of its end: [`Error::NoSpace`] when
/// the disk is full, else an I/O error saying what was read or written
/// (`via`: the mechanism, e.g. `"cuFile "`, or `""`), where, and how much.
pub(super) fn io_error(
    plan: &TransferPlan,
    op: &IoOp,
    via: &str,
    done: u64,
    left: u64,
    e: std::io::Error,
) -> Error {
    let path = &plan.files[op.file].path;
    if crate::error::is_no_space(&e) {
        Error::NoSpace {
            path: path.clone(),
            needed: left,
        }
    } else {
        Error::io(
            format!(
                "{via}{} {} at offset {}, length {}",
                if plan.direction == Direction::Load {
                    "reading"
                } else {
                    "writing"
                },
                path.display(),
                op.file_offset + done,
                left
            ),
            e,
        )
    }
}

/// The error for moving `op`'s bytes that stopped early: a load from a file
/// of `file_size` bytes, too short for the op ([`Error::Truncated`]), or a
/// store that wrote nothing more (`write` says what was being written).
pub(super) fn ended_early(plan: &TransferPlan, op: &IoOp, file_size: u64, write: String) -> Error {
    match plan.direction {
        Direction::Load => Error::Truncated {
            path: plan.files[op.file].path.clone(),
            offset: op.file_offset,
            length: op.len,
            file_size,
        },
        Direction::Store => Error::io(write, std::io::ErrorKind::WriteZero.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{HostRegion, Region};
    use crate::transfer::{Checksums, FileTarget, PlanBuilder};

    /// Feeds `completions` to a request for an op of `len` bytes at offset
    /// 0 of a file of `file_len` bytes; the last outcome.
    fn complete_all(file_len: usize, len: u64, completions: &[i32]) -> Result<Outcome> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard");
        std::fs::write(&path, vec![7u8; file_len]).unwrap();
        let mut pb = PlanBuilder::new(Direction::Load, 4096, 1 << 20);
        let f = pb.add_file(FileTarget {
            path: path.clone(),
            root: 0,
            size: 8192,
        });
        pb.add_extent(f, 0, len, 0, 0);
        let plan = pb.build();
        let region = HostRegion::new(len).unwrap();
        let regions: [&dyn Region; 1] = [&region];
        let job = TransferJob::new(&plan, &regions, Checksums::Skip);
        let files = vec![Some(File::open(&path).unwrap())];
        let mut r = Request {
            op: 0,
            done: 0,
            want: align_up(len, IO_ALIGN),
        };
        let mut last = Ok(Outcome::Short);
        for &res in completions {
            last = r.complete(&job, &files, u64::MAX, res);
        }
        last
    }

    /// A read resumed at the end of a file on a 4096-byte-sector device
    /// fails with EINVAL: that is the end of the file, not an I/O error.
    #[test]
    fn einval_where_the_file_ends_is_its_end() {
        let short = 4608;
        // The payload (4600 bytes) is in: complete, padding missing.
        assert!(matches!(
            complete_all(4608, 4600, &[short, -libc::EINVAL]),
            Ok(Outcome::Complete)
        ));
        // The payload (8000 bytes) is not: truncated, with the file's size.
        match complete_all(4608, 8000, &[short, -libc::EINVAL]) {
            Err(Error::Truncated { file_size, .. }) => assert_eq!(file_size, 4608),
            other => panic!("expected Truncated, got {other:?}"),
        }
        // Where the file goes on, EINVAL stays an I/O error.
        match complete_all(8192, 8000, &[short, -libc::EINVAL]) {
            Err(Error::Io { .. }) => {}
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }
}
