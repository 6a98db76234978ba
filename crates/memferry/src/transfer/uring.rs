//! The io_uring fence: every unsafe io_uring call lives here.
//!
//! Contract for callers: a buffer handed to a `push_*` call (`push_io`,
//! `push_iov`, `push_meta`), and the iovec array, paths and fds a request names,
//! belong to the kernel until its completion has been returned by
//! [`Ring::completions`]; the caller must neither touch nor free them
//! before then, and must not drop the ring while requests are in flight.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{IoUring, opcode, types};

/// A file-system request that runs on the ring beside the data (the
/// kernel runs it asynchronously, so one thread keeps many going).
pub(crate) enum Meta<'a> {
    /// `mkdir(path, 0o777)` (less the umask).
    MakeDir(&'a CStr),
    /// `open(path, O_CREAT | O_EXCL | flags, 0o666)`: the result is the fd.
    Create(&'a CStr, i32),
    /// `fallocate(fd, 0, 0, len)`.
    Allocate(BorrowedFd<'a>, u64),
    /// `fsync(fd)`.
    Flush(BorrowedFd<'a>),
    /// `rename(from, to)`.
    Rename(&'a CStr, &'a CStr),
}

impl Meta<'_> {
    /// The opcodes of every kind of [`Meta`] request.
    const OPCODES: [u8; 5] = [
        opcode::MkDirAt::CODE,
        opcode::OpenAt::CODE,
        opcode::Fallocate::CODE,
        opcode::Fsync::CODE,
        opcode::RenameAt::CODE,
    ];
    /// Mode of created directories and files (less the umask).
    const DIR_MODE: u32 = 0o777;
    const FILE_MODE: u32 = 0o666;
    /// Flags every [`Meta::Create`] adds to the caller's.
    const CREATE_FLAGS: i32 = libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;

    /// Runs the request on this thread (no ring, or a kernel without these
    /// opcodes); the result as a completion would carry it: the fd or 0 on
    /// success, `-errno` on failure.
    pub fn run_now(self) -> i32 {
        use rustix::fs::{self, FallocateFlags, Mode, OFlags};
        let done = match self {
            Meta::MakeDir(path) => fs::mkdir(path, Mode::from_raw_mode(Self::DIR_MODE)).map(|()| 0),
            Meta::Create(path, flags) => fs::open(
                path,
                OFlags::from_bits_retain((flags | Self::CREATE_FLAGS) as u32),
                Mode::from_raw_mode(Self::FILE_MODE),
            )
            .map(std::os::fd::IntoRawFd::into_raw_fd),
            Meta::Allocate(fd, len) => {
                fs::fallocate(fd, FallocateFlags::empty(), 0, len).map(|()| 0)
            }
            Meta::Flush(fd) => fs::fsync(fd).map(|()| 0),
            Meta::Rename(from, to) => fs::rename(from, to).map(|()| 0),
        };
        done.unwrap_or_else(|e| -e.raw_os_error())
    }
}

/// Which way a request moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Io {
    /// From the file into memory.
    Read,
    /// From memory into the file.
    Write,
}

/// An io_uring_enter(2) failure that goes away when tried again.
enum Passing {
    /// Interrupted (EINTR), or completions to reap first (EBUSY): retry now.
    Interrupted,
    /// The kernel could not allocate for the requests and took none of
    /// them (EAGAIN, ENOMEM): retry shortly.
    Shortage,
}

impl Passing {
    /// `None` for an error that stays.
    fn of(e: &io::Error) -> Option<Self> {
        match e.raw_os_error()? {
            libc::EINTR | libc::EBUSY => Some(Self::Interrupted),
            libc::EAGAIN | libc::ENOMEM => Some(Self::Shortage),
            _ => None,
        }
    }
}

/// A ring with registered staging buffers.
pub(crate) struct Ring {
    ring: IoUring,
}

impl Ring {
    /// Creates a ring with room for `entries` requests in flight.
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(entries.next_power_of_two())
            .or_else(|_| IoUring::new(entries.next_power_of_two()))?;
        Ok(Self { ring })
    }

    /// Registers `bufs` as fixed buffers `0..bufs.len()`.
    ///
    /// # Safety
    /// Every buffer must stay allocated and unmoved until the ring is dropped.
    pub unsafe fn register(&self, bufs: &[(*mut u8, usize)]) -> io::Result<()> {
        let iovecs: Vec<libc::iovec> = bufs
            .iter()
            .map(|&(ptr, len)| libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            })
            .collect();
        // SAFETY: forwarded to the caller: the buffers outlive the ring.
        unsafe { self.ring.submitter().register_buffers(&iovecs) }
    }

    /// Registers `count` consecutive slots of `size` bytes from `base` as
    /// fixed buffers `0..count` (slot `i` is buffer `i`).
    ///
    /// # Safety
    /// `base..base + size * count` must be one allocation that stays
    /// allocated and unmoved until the ring is dropped.
    pub unsafe fn register_slots(
        &self,
        base: *mut u8,
        size: usize,
        count: usize,
    ) -> io::Result<()> {
        let bufs: Vec<(*mut u8, usize)> = (0..count)
            // SAFETY: slot `i` lies inside the allocation (see above).
            .map(|i| (unsafe { base.add(i * size) }, size))
            .collect();
        // SAFETY: forwarded to the caller: the slots outlive the ring.
        unsafe { self.register(&bufs) }
    }

    /// Queues a read (`Io::Read`: file to memory) or a write of `len`
    /// bytes at file `offset`, to or from `ptr`. With `fixed: Some(i)`,
    /// `ptr..ptr+len` lies in registered buffer `i` (no pinning per
    /// request); with `None` it is plain memory the kernel pins for the
    /// request.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid (writable for a read), inside buffer `i`
    /// when `fixed` is `Some(i)`, aligned as the file's O_DIRECT mode needs,
    /// and untouched by the caller (unmodified, for a write) until the
    /// completion for `user_data` arrives; `fd` stays open until then.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn push_io(
        &mut self,
        io: Io,
        fd: BorrowedFd<'_>,
        ptr: *mut u8,
        len: u32,
        offset: u64,
        fixed: Option<u16>,
        user_data: u64,
    ) {
        let fd = types::Fd(fd.as_raw_fd());
        let entry = match (io, fixed) {
            (Io::Read, Some(i)) => opcode::ReadFixed::new(fd, ptr, len, i)
                .offset(offset)
                .build(),
            (Io::Read, None) => opcode::Read::new(fd, ptr, len).offset(offset).build(),
            (Io::Write, Some(i)) => opcode::WriteFixed::new(fd, ptr, len, i)
                .offset(offset)
                .build(),
            (Io::Write, None) => opcode::Write::new(fd, ptr, len).offset(offset).build(),
        };
        // SAFETY: forwarded to the caller.
        unsafe { self.push(entry.user_data(user_data)) }
    }

    /// Queues a vectored read (into the `iovecs` ranges, filled in order)
    /// or write (from them, taken in order) at file `offset`; the kernel
    /// pins the pages for the request.
    ///
    /// # Safety
    /// The `iovecs` array and every range it names must stay valid, and the
    /// ranges untouched by the caller (unmodified, for a write), until the
    /// completion for `user_data` arrives; for O_DIRECT files every base and
    /// length must be aligned to the file's logical block size.
    pub unsafe fn push_iov(
        &mut self,
        io: Io,
        fd: BorrowedFd<'_>,
        iovecs: &[libc::iovec],
        offset: u64,
        user_data: u64,
    ) {
        let (fd, ptr, n) = (
            types::Fd(fd.as_raw_fd()),
            iovecs.as_ptr(),
            iovecs.len() as u32,
        );
        let entry = match io {
            Io::Read => opcode::Readv::new(fd, ptr, n).offset(offset).build(),
            Io::Write => opcode::Writev::new(fd, ptr, n).offset(offset).build(),
        };
        // SAFETY: forwarded to the caller.
        unsafe { self.push(entry.user_data(user_data)) }
    }

    /// Queues `entry`.
    ///
    /// # Safety
    /// Whatever `entry` names (memory, iovec array, paths, fds) stays valid
    /// and untouched until its completion arrives.
    unsafe fn push(&mut self, entry: io_uring::squeue::Entry) {
        // SAFETY: forwarded to the caller; the queue has room because
        // callers never have more requests outstanding than the ring has
        // entries.
        unsafe { self.ring.submission().push(&entry) }.expect("submission queue has room");
    }

    /// True when the kernel runs every kind of [`Meta`] request on a ring
    /// (Linux 5.15 and later).
    pub fn supports_meta(&self) -> bool {
        let mut probe = io_uring::Probe::new();
        self.ring.submitter().register_probe(&mut probe).is_ok()
            && Meta::OPCODES.iter().all(|&c| probe.is_supported(c))
    }

    /// Queues the file-system request `meta`.
    ///
    /// # Safety
    /// Every path and file named by `meta` must stay valid (paths unmoved,
    /// fds open) until the completion for `user_data` arrives.
    pub unsafe fn push_meta(&mut self, meta: Meta<'_>, user_data: u64) {
        let cwd = types::Fd(libc::AT_FDCWD);
        let entry = match meta {
            Meta::MakeDir(path) => opcode::MkDirAt::new(cwd, path.as_ptr())
                .mode(Meta::DIR_MODE)
                .build(),
            Meta::Create(path, flags) => opcode::OpenAt::new(cwd, path.as_ptr())
                .flags(flags | Meta::CREATE_FLAGS)
                .mode(Meta::FILE_MODE)
                .build(),
            Meta::Allocate(fd, len) => {
                opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), len).build()
            }
            Meta::Flush(fd) => opcode::Fsync::new(types::Fd(fd.as_raw_fd())).build(),
            Meta::Rename(from, to) => {
                opcode::RenameAt::new(cwd, from.as_ptr(), cwd, to.as_ptr()).build()
            }
        }
        .user_data(user_data);
        // SAFETY: the caller keeps the paths and fds valid until the
        // completion arrives.
        unsafe { self.push(entry) }
    }

    /// Submits queued requests and waits for at least `want` completions.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) => match Passing::of(&e) {
                    Some(Passing::Interrupted) => continue,
                    Some(Passing::Shortage) => {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    None => return Err(e),
                },
            }
        }
    }

    /// After [`Self::submit_and_wait`] failed with `in_flight` requests
    /// queued or in the kernel: keeps handing the kernel what is queued and
    /// reaping until every one has completed, so no buffer or destination is
    /// written after the caller returns (its completions are dropped).
    /// Requests the kernel refuses for good (a submit failing with anything
    /// but a passing shortage) never reach it, so they are not waited for:
    /// they never run once the ring is dropped. Requests the kernel took
    /// are always waited for, saying so after 10 s.
    pub fn drain(&mut self, mut in_flight: usize) {
        let start = std::time::Instant::now();
        let mut warned = false;
        let mut submitting = true;
        while in_flight > 0 {
            if submitting
                && let Err(e) = self.ring.submit()
                && Passing::of(&e).is_none()
            {
                in_flight = in_flight.saturating_sub(self.ring.submission().len());
                submitting = false;
            }
            in_flight = in_flight.saturating_sub(self.ring.completion().count());
            if in_flight > 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
                if !warned && start.elapsed() > std::time::Duration::from_secs(10) {
                    tracing::error!(
                        "io_uring failed with {in_flight} requests outstanding; waiting for them before the buffers they use are released"
                    );
                    warned = true;
                }
            }
        }
    }

    /// Takes the available completions as `(user_data, result)` pairs.
    pub fn completions(&mut self) -> Vec<(u64, i32)> {
        self.ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn drain_hands_queued_requests_to_the_kernel_and_waits_for_them() {
        let Ok(mut ring) = Ring::new(4) else {
            eprintln!("skipped: io_uring is not available here");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [7u8; 8192]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut bufs = [[0u8; 4096]; 2];
        for (i, buf) in bufs.iter_mut().enumerate() {
            // SAFETY: the buffer and the file outlive the drain below,
            // which returns only once both reads have completed.
            unsafe {
                ring.push_io(
                    Io::Read,
                    file.as_fd(),
                    buf.as_mut_ptr(),
                    4096,
                    i as u64 * 4096,
                    None,
                    i as u64,
                )
            };
        }
        // Nothing was submitted: the drain must submit, then wait for both.
        ring.drain(2);
        assert!(bufs.iter().all(|b| b.iter().all(|&x| x == 7)));
        assert!(
            ring.completions().is_empty(),
            "the drain took the completions"
        );
    }
}
