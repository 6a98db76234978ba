//! Profiles: the best settings `memferry bench` found, per set of disks.
//!
//! Stored as TOML at `$MEMFERRY_PROFILE`, else
//! `$XDG_CONFIG_HOME/memferry/profile.toml`, else
//! `~/.config/memferry/profile.toml`. Entries are matched by the devices
//! (st_dev) of the roots, so a snapshot anywhere on the same disks uses the
//! entry measured there.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Setting;
use crate::storage::durable::write_atomic;
use crate::{Error, Result};

/// The best settings measured on one set of disks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileEntry {
    /// Devices of the roots (`major:minor`), sorted: the match key.
    pub devices: Vec<String>,
    /// Roots the bench ran on (for people).
    pub roots: Vec<String>,
    /// Best settings.
    pub setting: Setting,
    /// What that setting reached (GiB/s, median).
    pub restore_gib_per_s: f64,
    /// Percent of the measured limit.
    pub percent_of_limit: Option<f64>,
    /// `cold` or `warm`.
    pub measured_as: String,
    /// When, in milliseconds since the epoch.
    pub measured_unix_ms: u64,
}

/// All entries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Entries, one per device set.
    #[serde(default)]
    pub entry: Vec<ProfileEntry>,
}

/// Where the profile lives (see the module docs).
pub fn profile_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MEMFERRY_PROFILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("memferry").join("profile.toml"))
}

/// The match key of a set of roots: their devices, sorted, deduplicated.
pub fn device_key(roots: &[PathBuf]) -> Vec<String> {
    let mut keys: Vec<String> = roots
        .iter()
        .filter_map(|r| std::fs::metadata(r).ok())
        .map(|m| {
            let dev = m.dev();
            format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev))
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

impl Profile {
    /// Reads the profile at `path`; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading profile {}", path.display()), e)),
        };
        toml::from_str(&text).map(Some).map_err(|e| {
            Error::InvalidInput(format!(
                "profile {} is not valid ({e}); fix it, delete it, or run `memferry bench --save-profile` again",
                path.display()
            ))
        })
    }

    /// Writes the profile atomically, creating its directory.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let body = format!(
            "# Written by `memferry bench --save-profile`: the best settings per set of disks.\n{}",
            toml::to_string_pretty(self).expect("profile serialises")
        );
        write_atomic(path, body.as_bytes())
    }

    /// Adds `entry`, replacing an entry for the same devices.
    pub fn upsert(&mut self, entry: ProfileEntry) {
        self.entry.retain(|e| e.devices != entry.devices);
        self.entry.push(entry);
    }

    /// The entry for exactly these devices.
    pub fn lookup(&self, devices: &[String]) -> Option<&ProfileEntry> {
        if devices.is_empty() {
            return None;
        }
        self.entry.iter().find(|e| e.devices == devices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::BackendKind;

    #[test]
    fn round_trips_and_matches_by_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("profile.toml");
        let key = device_key(&[dir.path().to_path_buf()]);
        assert_eq!(key.len(), 1);
        let mut p = Profile::default();
        let e = ProfileEntry {
            devices: key.clone(),
            roots: vec![dir.path().display().to_string()],
            setting: Setting {
                backend: BackendKind::Direct,
                workers: 1,
                queue_depth: 32,
                chunk_size: 4 << 20,
            },
            restore_gib_per_s: 1.5,
            percent_of_limit: Some(97.0),
            measured_as: "cold".into(),
            measured_unix_ms: 1,
        };
        p.upsert(e.clone());
        p.upsert(e.clone());
        assert_eq!(p.entry.len(), 1);
        p.save(&path).unwrap();
        let back = Profile::load(&path).unwrap().unwrap();
        assert_eq!(back, p);
        assert_eq!(back.lookup(&key), Some(&e));
        assert_eq!(back.lookup(&["0:0".into()]), None);
        std::fs::write(&path, "entry = 3").unwrap();
        assert!(Profile::load(&path).is_err());
        assert!(
            Profile::load(&dir.path().join("none.toml"))
                .unwrap()
                .is_none()
        );
    }
}
