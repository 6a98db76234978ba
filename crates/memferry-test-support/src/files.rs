//! Listing the files below a directory.

use std::path::{Path, PathBuf};

/// Every regular file (not directory) below `dir`, at any depth, whose path
/// satisfies `keep`, sorted. Panics if a directory cannot be read.
pub fn files_where(dir: &Path, keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("reading {}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if keep(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Every KV block file (`*.kvb`) below `dir`, sorted.
pub fn kv_block_files(dir: &Path) -> Vec<PathBuf> {
    files_where(dir, |p| p.extension().is_some_and(|x| x == "kvb"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_files_are_found_at_any_depth_sorted_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("b/c")).unwrap();
        std::fs::create_dir_all(d.join("a.kvb")).unwrap();
        for f in [
            "b/c/2.kvb",
            "1.kvb",
            "b/3.kvb",
            "b/x.kvb.tmp-1",
            "b/c/y.json",
        ] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let want: Vec<PathBuf> = ["1.kvb", "b/3.kvb", "b/c/2.kvb"]
            .iter()
            .map(|f| d.join(f))
            .collect();
        assert_eq!(kv_block_files(d), want);
        assert_eq!(
            files_where(d, |p| p.to_string_lossy().contains(".tmp-")),
            vec![d.join("b/x.kvb.tmp-1")]
        );
    }
}
