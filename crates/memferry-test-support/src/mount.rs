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

impl Mount {
    /// A FUSE view (bindfs) of `source` at `dir`, installing bindfs with
    /// apt-get when it is missing (as root, like the other mounts). Like
    /// NFS and CIFS it has no renameat2 flags (RENAME_NOREPLACE and
    /// RENAME_EXCHANGE fail with EINVAL), so tests see what memferry does on
    /// such shared filesystems. Panics when it cannot mount: never skips.
    pub fn bindfs(source: &Path, dir: &Path) -> Self {
        install_bindfs();
        std::fs::create_dir_all(dir).expect("creating mount point");
        let out = Command::new("bindfs")
            .arg(source)
            .arg(dir)
            .output()
            .expect("running bindfs");
        assert!(
            out.status.success(),
            "bindfs {} {} failed (needs root and /dev/fuse): {}",
            source.display(),
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            dir: dir.to_path_buf(),
        }
    }
}

/// Installs bindfs (Debian package) unless it is on the PATH already.
fn install_bindfs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let present = |c: &mut Command| {
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if present(Command::new("bindfs").arg("--version")) {
            return;
        }
        let apt = |args: &[&str]| {
            present(
                Command::new("apt-get")
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
        };
        let installed = apt(&["install", "-y", "-qq", "bindfs"])
            || (apt(&["update", "-qq"]) && apt(&["install", "-y", "-qq", "bindfs"]));
        assert!(
            installed,
            "bindfs is missing and `apt-get install bindfs` failed: install it (Debian/Ubuntu package bindfs) and rerun"
        );
    });
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
