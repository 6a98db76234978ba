//! The access record: when each block was last stored, loaded or touched.
//!
//! Block files are never modified after they are published, so their mtime
//! carries no other meaning: memferry sets it explicitly on every access (by
//! the filesystem's clock, [`record_access_now`]) and eviction orders blocks
//! by it. The record survives restarts, is shared by
//! every process and node that sees the filesystem, and cannot drift from the
//! files it describes. atime is never used (relatime and noatime mounts make
//! it unreliable).

use std::path::Path;
use std::time::SystemTime;

use rustix::fs::{AtFlags, CWD, Timespec, Timestamps};

/// Records an access to the block file at `path` at time `when`. Returns
/// false when the file is gone (evicted meanwhile).
pub fn record_access(path: &Path, when: SystemTime) -> bool {
    let d = when
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let ts = Timespec {
        tv_sec: d.as_secs() as _,
        tv_nsec: d.subsec_nanos() as _,
    };
    let times = Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::empty()).is_ok()
}

/// Records an access to the block file at `path` now, by the clock of the
/// filesystem that holds it (`UTIME_NOW`: on NFS the server's, one clock
/// for every client however theirs drift; it also needs only write access
/// to the file, not its ownership). Returns false when the file is gone.
pub fn record_access_now(path: &Path) -> bool {
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: rustix::fs::UTIME_NOW,
    };
    let times = Timestamps {
        last_access: now,
        last_modification: now,
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::empty()).is_ok()
}

/// The last recorded access of the file at `path`, if it exists.
pub fn last_access(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).ok()?.modified().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_record_is_the_mtime_we_set() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.kvb");
        std::fs::write(&p, b"x").unwrap();
        let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert!(record_access(&p, when));
        assert_eq!(last_access(&p), Some(when));
        assert!(!record_access(&dir.path().join("gone"), when));
        assert_eq!(last_access(&dir.path().join("gone")), None);
    }

    #[test]
    fn an_access_now_is_recorded_by_the_filesystem_clock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.kvb");
        std::fs::write(&p, b"x").unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert!(record_access(&p, old));
        let before = SystemTime::now() - Duration::from_secs(2);
        assert!(record_access_now(&p));
        let t = last_access(&p).unwrap();
        assert!(
            t >= before && t <= SystemTime::now() + Duration::from_secs(2),
            "{t:?}"
        );
        assert!(!record_access_now(&dir.path().join("gone")));
    }
}
