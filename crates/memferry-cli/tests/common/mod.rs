//! Helpers shared by the CLI integration tests: running the binary, reading
//! its JSON output, listing directories and editing snapshots. Helpers the
//! library's tests share too (e.g. `Mount`) are in `memferry-test-support`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

pub const MIB: u64 = 1 << 20;

/// Path of the `memferry` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_memferry"))
}

/// A command for the binary with every `MEMFERRY_*` variable of the test
/// environment removed, so that only the arguments given count.
pub fn command() -> Command {
    command_for(&bin())
}

/// Like [`command`], for another program (e.g. a copy of the binary or a
/// wrapper such as `setpriv`).
pub fn command_for(program: &Path) -> Command {
    let mut c = Command::new(program);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MEMFERRY_") {
            c.env_remove(k);
        }
    }
    c.stdin(Stdio::null());
    c
}

/// What a finished run produced.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// The command line, for messages.
    pub what: String,
}

impl Run {
    pub fn from_output(what: String, out: Output) -> Self {
        Self {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            what,
        }
    }

    /// Panics unless the exit code is 0.
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "`{}` failed with exit code {}\nstdout: {}\nstderr: {}",
            self.what, self.code, self.stdout, self.stderr
        );
        self
    }

    /// Panics unless the exit code is `code`.
    pub fn code(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "`{}`: expected exit code {code}, got {}\nstdout: {}\nstderr: {}",
            self.what, self.code, self.stdout, self.stderr
        );
        self
    }

    /// Panics unless the exit code is non-zero and stderr holds a message
    /// containing every one of `needles` (case-insensitive).
    pub fn fails_with(self, needles: &[&str]) -> Self {
        assert_ne!(
            self.code, 0,
            "`{}` unexpectedly succeeded\nstdout: {}\nstderr: {}",
            self.what, self.stdout, self.stderr
        );
        assert!(
            !self.stderr.trim().is_empty(),
            "`{}` failed (exit {}) without a message on stderr",
            self.what,
            self.code
        );
        self.stderr_has(needles)
    }

    /// Panics unless stderr contains every one of `needles` (case-insensitive).
    pub fn stderr_has(self, needles: &[&str]) -> Self {
        let low = self.stderr.to_lowercase();
        for n in needles {
            assert!(
                low.contains(&n.to_lowercase()),
                "`{}`: stderr does not mention {n:?}\nstderr: {}",
                self.what,
                self.stderr
            );
        }
        self
    }

    /// The single JSON object printed on stdout.
    pub fn json(&self) -> Value {
        single_json_object(&self.stdout)
            .unwrap_or_else(|e| panic!("`{}`: {e}\nstdout: {:?}", self.what, self.stdout))
    }
}

/// Runs the binary with `args` and waits for it.
pub fn run<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_cmd(command(), args)
}

/// Runs `cmd` with `args` appended and waits for it.
pub fn run_cmd<I, S>(mut cmd: Command, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    cmd.args(&args);
    let what = format!(
        "{} {}",
        Path::new(cmd.get_program())
            .file_name()
            .unwrap_or_default()
            .to_string_lossy(),
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{what}`: {e}"));
    Run::from_output(what, out)
}

/// Parses `s` as exactly one JSON object (surrounding whitespace allowed).
pub fn single_json_object(s: &str) -> Result<Value, String> {
    let mut it = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    let first = match it.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) => return Err(format!("stdout is not JSON: {e}")),
        None => return Err("stdout holds no JSON value".into()),
    };
    match it.next() {
        None => {}
        Some(Ok(_)) => return Err("stdout holds more than one JSON value".into()),
        Some(Err(e)) => return Err(format!("stdout holds trailing garbage: {e}")),
    }
    if !first.is_object() {
        return Err(format!("stdout is JSON but not an object: {first}"));
    }
    Ok(first)
}

/// `p` as a command-line argument.
pub fn arg(p: &Path) -> String {
    p.to_str().expect("test paths are UTF-8").to_string()
}

/// Arguments of a save of `synthetic:SIZE` to `to`.
pub fn save_args(size_mib: u64, to: &Path, extra: &[&str]) -> Vec<String> {
    save_source_args(&format!("synthetic:{size_mib}MiB"), to, extra)
}

/// Arguments `save --source SOURCE --to TO EXTRA...`.
pub fn save_source_args(source: &str, to: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "save".to_string(),
        "--source".into(),
        source.into(),
        "--to".into(),
        arg(to),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Saves `synthetic:SIZE` to `to` (must succeed) and returns its JSON report.
pub fn save(size_mib: u64, to: &Path, extra: &[&str]) -> Value {
    let mut a = save_args(size_mib, to, extra);
    a.push("--json".into());
    run(&a).ok().json()
}

/// `--roots A,B` arguments.
pub fn roots_arg(roots: &[PathBuf]) -> String {
    roots.iter().map(|r| arg(r)).collect::<Vec<_>>().join(",")
}

/// `inspect --json` of a snapshot (must succeed).
pub fn inspect(dir: &Path) -> Value {
    run(["inspect", &arg(dir), "--json"]).ok().json()
}

/// One entry of a [`listing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: char,
    pub size: u64,
    pub mtime_ns: i128,
    pub mode: u32,
}

/// Recursive listing of `dir` (not following symlinks): every path below it
/// with its kind, size, mtime and mode; `dir` itself is included under "".
pub fn listing(dir: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    if let Ok(m) = fs::symlink_metadata(dir) {
        out.insert(PathBuf::new(), entry(&m));
        if m.is_dir() {
            walk(dir, Path::new(""), &mut out);
        }
    }
    out
}

fn entry(m: &fs::Metadata) -> Entry {
    let ft = m.file_type();
    Entry {
        kind: if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else {
            'f'
        },
        size: if ft.is_dir() { 0 } else { m.len() },
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        mode: m.mode(),
    }
}

fn walk(base: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
    let Ok(rd) = fs::read_dir(base.join(rel)) else {
        return;
    };
    for e in rd.flatten() {
        let r = rel.join(e.file_name());
        let Ok(m) = fs::symlink_metadata(base.join(&r)) else {
            continue;
        };
        out.insert(r.clone(), entry(&m));
        if m.is_dir() {
            walk(base, &r, out);
        }
    }
}

/// Panics with the differences when two listings differ.
pub fn assert_same_listing(
    before: &BTreeMap<PathBuf, Entry>,
    after: &BTreeMap<PathBuf, Entry>,
    what: &str,
) {
    if before == after {
        return;
    }
    let mut diff = Vec::new();
    for (p, e) in before {
        match after.get(p) {
            None => diff.push(format!("removed: {} {e:?}", p.display())),
            Some(a) if a != e => diff.push(format!("changed: {} {e:?} -> {a:?}", p.display())),
            _ => {}
        }
    }
    for (p, e) in after {
        if !before.contains_key(p) {
            diff.push(format!("created: {} {e:?}", p.display()));
        }
    }
    panic!("{what}: the disk changed:\n{}", diff.join("\n"));
}

/// Names of the entries directly in `dir` (empty if it does not exist).
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Staging directories of snapshot `name` left in `parent`.
pub fn stage_dirs(parent: &Path, name: &str) -> Vec<String> {
    let prefix = format!(".{name}.memferry-stage-");
    names(parent)
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Every staging directory (of any snapshot) in `parent`.
pub fn any_stage_dirs(parent: &Path) -> Vec<String> {
    names(parent)
        .into_iter()
        .filter(|n| n.contains(".memferry-stage-"))
        .collect()
}

/// The parsed `manifest.json` of a snapshot.
pub fn read_manifest(dir: &Path) -> Value {
    let text = fs::read(dir.join("manifest.json")).expect("reading manifest.json");
    serde_json::from_slice(&text).expect("manifest.json is JSON")
}

/// Rewrites `manifest.json` of a snapshot.
pub fn write_manifest(dir: &Path, v: &Value) {
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(v).unwrap(),
    )
    .expect("writing manifest.json");
}

/// Absolute path of shard `i` of the snapshot at `dir` (per its manifest).
pub fn shard_path(dir: &Path, i: usize) -> PathBuf {
    let m = read_manifest(dir);
    let s = &m["shards"][i];
    let root = s["root"].as_u64().unwrap() as usize;
    let rec = m["roots"][root]["recorded_path"].as_str().unwrap();
    let base = if rec == "." {
        dir.to_path_buf()
    } else {
        dir.join(rec)
    };
    base.join(s["path"].as_str().unwrap())
}

/// A payload byte of shard `shard`: the middle of the first extent stored in
/// it, as (file offset, extent offset, extent length).
pub fn payload_offset(dir: &Path, shard: usize) -> (u64, u64, u64) {
    let m = read_manifest(dir);
    for a in m["allocations"].as_array().unwrap() {
        for e in a["extents"].as_array().unwrap() {
            if e["shard"].as_u64() == Some(shard as u64) {
                let off = e["offset"].as_u64().unwrap();
                let len = e["length"].as_u64().unwrap();
                return (off + len / 2, off, len);
            }
        }
    }
    panic!("shard {shard} holds no extent");
}

/// Flips one bit of the byte at `offset` of `path`.
pub fn flip_bit(path: &Path, offset: u64) {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("opening shard");
    let mut b = [0u8];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x10;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

/// Truncates `path` to `len` bytes.
pub fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opening shard")
        .set_len(len)
        .expect("truncating shard");
}

/// True when the test runs as root.
pub fn is_root() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0")
}

/// A small deterministic PRNG (xorshift64*), seeded per test run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Seed from `MEMFERRY_TEST_SEED`, else from the clock (printed by callers).
pub fn seed() -> u64 {
    std::env::var("MEMFERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Parses a safetensors file: (header JSON, header length, file length).
pub fn read_safetensors(path: &Path) -> (Value, u64, u64) {
    let bytes = fs::read(path).expect("reading the exported file");
    assert!(
        bytes.len() >= 8,
        "{} is shorter than 8 bytes",
        path.display()
    );
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert!(
        8 + n <= bytes.len() as u64,
        "header length {n} runs past the end of {} ({} bytes)",
        path.display(),
        bytes.len()
    );
    let header: Value = serde_json::from_slice(&bytes[8..8 + n as usize])
        .unwrap_or_else(|e| panic!("safetensors header is not JSON: {e}"));
    assert!(header.is_object(), "safetensors header is not an object");
    (header, n, bytes.len() as u64)
}
