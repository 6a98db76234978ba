//! Filesystems mounted for the duration of one test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A filesystem mounted for the duration of a test; unmounted (lazily) on
/// drop, also when the test panics.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    /// `mount -t FSTYPE -o OPTIONS FSTYPE DIR` (creates `dir`). Panics if
    /// mounting fails: these tests need root and never skip.
    pub fn new(fstype: &str, options: Option<&str>, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("creating mount point");
        let mut c = Command::new("mount");
        c.arg("-t").arg(fstype);
        if let Some(o) = options {
            c.arg("-o").arg(o);
        }
        c.arg(fstype).arg(dir);
        let out = c.output().expect("running mount");
        assert!(
            out.status.success(),
            "mount -t {fstype} {options:?} {} failed (these tests need root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
