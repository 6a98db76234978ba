//! Where a snapshot lives: a local directory (shards possibly striped over
//! several roots) or a prefix in an S3-compatible bucket (`s3://bucket/prefix`).
//!
//! Parsing is strict: a malformed `s3://` location is bad input
//! ([`Error::InvalidInput`]), never silently taken as a local path.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A snapshot location as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on a local (or shared) filesystem.
    Local(PathBuf),
    /// A prefix in an S3-compatible bucket.
    S3(S3Url),
}

/// `s3://bucket/prefix`: the prefix has no leading or trailing `/`, no empty,
/// `.` or `..` segments, and is never empty (a snapshot owns its prefix).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Url {
    /// Bucket name (3..=63 characters of `a-z0-9.-`).
    pub bucket: String,
    /// Key prefix of the snapshot, e.g. `models/llama`.
    pub prefix: String,
}

impl S3Url {
    /// Parses `s3://bucket/prefix`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidInput(format!(
                "invalid S3 location {s:?}: {why}; write it as s3://bucket/prefix"
            ))
        };
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| bad("it does not start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.len() < 3
            || bucket.len() > 63
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            || bucket.starts_with(['.', '-'])
            || bucket.ends_with(['.', '-'])
        {
            return Err(bad(
                "the bucket name must be 3-63 characters of lowercase letters, digits, '.' and '-'",
            ));
        }
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(bad(
                "a snapshot needs its own prefix inside the bucket (s3://bucket/name)",
            ));
        }
        for seg in prefix.split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(bad("the prefix has an empty, '.' or '..' segment"));
            }
            if seg.chars().any(|c| c.is_control()) {
                return Err(bad("the prefix holds control characters"));
            }
        }
        Ok(Self {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The key of `rel` (a `/`-separated relative path) under this prefix.
    pub fn key(&self, rel: &str) -> String {
        format!("{}/{}", self.prefix, rel.trim_start_matches("./"))
    }

    /// The full URL of `rel` under this prefix (for messages).
    pub fn url_of(&self, rel: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.key(rel))
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

impl Location {
    /// Classifies a command-line path: `s3://...` is an S3 location (and must
    /// be well formed), anything else a local directory. Other URL schemes
    /// are rejected rather than taken as relative directory names.
    pub fn parse(p: &Path) -> Result<Self> {
        let s = p.to_string_lossy();
        if s.starts_with("s3://") {
            return S3Url::parse(&s).map(Location::S3);
        }
        if let Some((scheme, _)) = s.split_once("://")
            && !scheme.is_empty()
            && scheme.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(Error::InvalidInput(format!(
                "unsupported location {s:?}: use a local directory or s3://bucket/prefix"
            )));
        }
        Ok(Location::Local(p.to_path_buf()))
    }

    /// True for an S3 location.
    pub fn is_s3(&self) -> bool {
        matches!(self, Location::S3(_))
    }
}

impl From<PathBuf> for Location {
    /// A local directory (no parsing: use [`Location::parse`] for user input).
    fn from(p: PathBuf) -> Self {
        Location::Local(p)
    }
}

impl From<&Path> for Location {
    fn from(p: &Path) -> Self {
        Location::Local(p.to_path_buf())
    }
}

impl From<&PathBuf> for Location {
    fn from(p: &PathBuf) -> Self {
        Location::Local(p.clone())
    }
}

impl From<S3Url> for Location {
    fn from(u: S3Url) -> Self {
        Location::S3(u)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3(u) => u.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_urls() {
        let u = S3Url::parse("s3://my-bucket/models/llama/").unwrap();
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.prefix, "models/llama");
        assert_eq!(u.key("manifest.json"), "models/llama/manifest.json");
        assert_eq!(u.to_string(), "s3://my-bucket/models/llama");
        for bad in [
            "s3://",
            "s3://ab/x",
            "s3://Bucket/x",
            "s3://bucket",
            "s3://bucket/",
            "s3://bucket/a//b",
            "s3://bucket/a/../b",
            "s3://-bucket/x",
        ] {
            assert!(S3Url::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn classifies_locations() {
        assert!(Location::parse(Path::new("s3://bkt/x")).unwrap().is_s3());
        assert!(!Location::parse(Path::new("/data/snap")).unwrap().is_s3());
        assert!(!Location::parse(Path::new("rel/dir")).unwrap().is_s3());
        assert!(Location::parse(Path::new("gs://bkt/x")).is_err());
        assert!(Location::parse(Path::new("s3://B/x")).is_err());
    }
}
