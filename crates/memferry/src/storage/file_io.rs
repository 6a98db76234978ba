//! Positional file I/O that never assumes a full transfer.
//!
//! [`read_exact_at`] and [`write_all_at`] resume after short transfers and
//! EINTR; a read that reaches end of file early is reported as
//! [`Error::Truncated`] with the file, offset and length.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use crate::error::IoContext;
use crate::{Error, Result};

/// One positional read or write, possibly short. `limit` caps the bytes
/// moved per call (test hook: a storage layer returning one byte per call).
fn pread(file: &File, buf: &mut [u8], offset: u64, limit: Option<u64>) -> io::Result<usize> {
    let n = limit.map_or(buf.len(), |l| buf.len().min(l as usize));
    loop {
        match rustix::io::pread(file.as_fd(), &mut buf[..n], offset) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

fn pwrite(file: &File, buf: &[u8], offset: u64, limit: Option<u64>) -> io::Result<usize> {
    let n = limit.map_or(buf.len(), |l| buf.len().min(l as usize));
    loop {
        match rustix::io::pwrite(file.as_fd(), &buf[..n], offset) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Reads exactly `buf.len()` bytes at `offset`, resuming short reads.
pub fn read_exact_at(
    file: &File,
    path: &Path,
    mut buf: &mut [u8],
    offset: u64,
    limit: Option<u64>,
) -> Result<()> {
    let (start, total) = (offset, buf.len() as u64);
    let mut pos = offset;
    while !buf.is_empty() {
        let n = pread(file, buf, pos, limit)
            .ctx(|| format!("reading {} at offset {pos}", path.display()))?;
        if n == 0 {
            let file_size = file.metadata().map(|m| m.len()).unwrap_or(pos);
            return Err(Error::Truncated {
                path: path.to_path_buf(),
                offset: start,
                length: total,
                file_size,
            });
        }
        pos += n as u64;
        buf = &mut buf[n..];
    }
    Ok(())
}

/// Writes all of `buf` at `offset`, resuming short writes.
pub fn write_all_at(
    file: &File,
    path: &Path,
    mut buf: &[u8],
    offset: u64,
    limit: Option<u64>,
) -> Result<()> {
    let mut pos = offset;
    while !buf.is_empty() {
        let n = match pwrite(file, buf, pos, limit) {
            Ok(0) => {
                return Err(Error::io(
                    format!("writing {} at offset {pos}", path.display()),
                    io::ErrorKind::WriteZero.into(),
                ));
            }
            Ok(n) => n,
            Err(e) if crate::error::is_no_space(&e) => {
                return Err(Error::NoSpace {
                    path: path.to_path_buf(),
                    needed: buf.len() as u64,
                });
            }
            Err(e) => {
                return Err(Error::io(
                    format!("writing {} at offset {pos}", path.display()),
                    e,
                ));
            }
        };
        pos += n as u64;
        buf = &buf[n..];
    }
    Ok(())
}
