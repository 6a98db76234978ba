//! One conformance suite that every backend configuration passes: each case
//! below runs through every entry of `configs()`, with a label per path.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use memferry::Error;
use memferry::memory::{Device, HostRegion, Region};
use memferry::snapshot::layout::{Allocation, Layout, MetadataEntry};
use memferry::snapshot::source::{SnapshotSource, fill_bytes};
use memferry::snapshot::{LoadOptions, RestoredSnapshot, SaveOptions, restore, save, verify};
use memferry::transfer::{BackendKind, Tuning};

/// A backend configuration under test.
struct Config {
    label: &'static str,
    backend: BackendKind,
    tuning: Tuning,
}

impl Config {
    /// Default save options but for this backend and tuning.
    fn save_options(&self) -> SaveOptions {
        SaveOptions {
            backend: self.backend,
            tuning: self.tuning.clone(),
            ..SaveOptions::default()
        }
    }

    /// Default load options but for this backend and tuning.
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            backend: self.backend,
            tuning: self.tuning.clone(),
            ..LoadOptions::default()
        }
    }
}

fn configs() -> Vec<Config> {
    use BackendKind::{Auto, Buffered, Direct, Pinned};
    // (label, backend, workers, queue depth, chunk size, max bytes per call)
    [
        ("buffered", Buffered, 4, 16, 1 << 20, None),
        ("buffered-1worker-big-chunks", Buffered, 1, 1, 8 << 20, None),
        ("direct", Direct, 4, 16, 1 << 20, None),
        ("direct-qd1", Direct, 1, 1, 2 << 20, None),
        ("direct-short-4k", Direct, 4, 8, 1 << 20, Some(4096)),
        ("auto", Auto, 2, 4, 1 << 20, None),
        // Host memory: aligned (non-pinned) staging and synchronous copies,
        // so the pipeline runs without a GPU.
        ("pinned", Pinned, 4, 4, 1 << 20, None),
        ("pinned-2slots-short-4k", Pinned, 1, 2, 1 << 20, Some(4096)),
    ]
    .into_iter()
    .map(
        |(label, backend, workers, queue_depth, chunk_size, max_bytes_per_call)| Config {
            label,
            backend,
            tuning: Tuning {
                workers,
                queue_depth,
                chunk_size,
                max_bytes_per_call,
                ..Tuning::default()
            },
        },
    )
    .collect()
}

/// A source with allocations of exactly `sizes`, bytes from `seed`.
fn source(sizes: &[u64], seed: u64) -> SnapshotSource {
    let mut layout = Layout::default();
    let mut regions: Vec<Box<dyn Region>> = Vec::new();
    for (i, &s) in sizes.iter().enumerate() {
        let id = 1000 + i as u64;
        layout.allocations.push(Allocation {
            id,
            size: s,
            device: Device::Cpu,
            tag: format!("t{i}"),
        });
        layout.metadata.push(MetadataEntry {
            key: format!("k{i}"),
            allocation_id: id,
            offset: s / 2,
            value: vec![i as u8; i % 7],
        });
        let mut r = HostRegion::new(s).unwrap();
        fill_bytes(seed, i as u64, r.as_mut_slice());
        regions.push(Box::new(r));
    }
    SnapshotSource {
        description: format!("test:{seed}"),
        layout,
        regions,
    }
}

/// Panics unless every allocation of `restored` holds the bytes of the
/// same allocation of `src` (pairs up to the shorter list; callers compare
/// layouts where counts matter). `label` names the case in the message.
fn assert_same_bytes(src: &SnapshotSource, restored: &RestoredSnapshot, label: &str) {
    for (i, (a, b)) in src.regions.iter().zip(&restored.regions).enumerate() {
        // SAFETY: nothing writes the source regions during the test.
        let want = unsafe { memferry::memory::host_bytes(a.as_ref()) }.unwrap();
        assert!(
            want == b.to_vec().unwrap(),
            "{label}: allocation {i} differs"
        );
    }
}

/// Saves `src` to `snap` striped over `roots` in 1 MiB shards (must
/// succeed).
fn save_striped(src: &SnapshotSource, snap: &Path, roots: &[PathBuf]) {
    save(
        src,
        snap,
        &SaveOptions {
            roots: Some(roots.to_vec()),
            shard_size: 1 << 20,
            ..SaveOptions::default()
        },
    )
    .unwrap();
}

fn roots(dir: &Path, n: usize) -> Option<Vec<PathBuf>> {
    (n > 1).then(|| {
        (0..n)
            .map(|i| {
                let p = dir.join(format!("root{i}"));
                std::fs::create_dir_all(&p).unwrap();
                p
            })
            .collect()
    })
}

/// Saves with `cfg`, restores with every config and compares every byte
/// and the layout; also verifies.
fn round_trip(case: &str, sizes: &[u64], shard_size: u64, nroots: usize) {
    for save_cfg in configs() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let snap = dir.path().join("snap");
        let src = source(sizes, 7);
        let roots = roots(dir.path(), nroots);
        let opts = SaveOptions {
            roots: roots.clone(),
            shard_size,
            ..save_cfg.save_options()
        };
        let rep = save(&src, &snap, &opts)
            .unwrap_or_else(|e| panic!("{case}: save with {}: {e}", save_cfg.label));
        assert_eq!(
            rep.bytes,
            sizes.iter().sum::<u64>(),
            "{case}/{}",
            save_cfg.label
        );
        assert!(rep.shards >= 1 || sizes.iter().all(|&s| s == 0));
        for load_cfg in configs() {
            let label = format!(
                "{case}: saved with {}, loaded with {}",
                save_cfg.label, load_cfg.label
            );
            let lo = load_cfg.load_options();
            let (restored, report) = restore(&snap, &lo).unwrap_or_else(|e| panic!("{label}: {e}"));
            assert!(report.verified, "{label}");
            assert_eq!(restored.manifest.layout(), src.layout, "{label}: layout");
            assert_same_bytes(&src, &restored, &label);
            verify(&snap, &lo).unwrap_or_else(|e| panic!("{label}: verify: {e}"));
        }
    }
}

#[test]
fn many_allocations_with_tails_and_a_zero_size_one() {
    let sizes = [
        0,
        1,
        4095,
        4096,
        4097,
        (1 << 20) + 3,
        3 << 20,
        (5 << 20) - 1,
        12345,
        0,
        65537,
    ];
    round_trip("tails", &sizes, 4 << 20, 1);
}

#[test]
fn one_huge_allocation_split_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s");
    let src = source(&[(9 << 20) + 17], 3);
    save(
        &src,
        &snap,
        &SaveOptions {
            shard_size: 1 << 20,
            ..SaveOptions::default()
        },
    )
    .unwrap();
    let m = memferry::snapshot::Manifest::load(&snap).unwrap();
    assert!(m.shards.len() >= 9, "split into {} shards", m.shards.len());
    assert!(m.allocations[0].extents.len() >= 9);
    round_trip("huge", &[(9 << 20) + 17], 1 << 20, 1);
}

#[test]
fn thousands_of_tiny_allocations() {
    let sizes: Vec<u64> = (0..3000).map(|i| (i * 37 % 300) as u64).collect();
    round_trip("tiny", &sizes, 2 << 20, 2);
}

#[test]
fn several_roots_stripe_evenly() {
    let sizes = [3 << 20, 5000, 7 << 20, 1, (2 << 20) + 9];
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s");
    let r = roots(dir.path(), 3).unwrap();
    save_striped(&source(&sizes, 1), &snap, &r);
    let m = memferry::snapshot::Manifest::load(&snap).unwrap();
    let per_root: Vec<u64> = (0..3)
        .map(|i| {
            m.shards
                .iter()
                .filter(|s| s.root == i)
                .map(|s| s.size)
                .sum()
        })
        .collect();
    let (lo, hi) = (
        per_root.iter().min().unwrap(),
        per_root.iter().max().unwrap(),
    );
    assert!(hi - lo <= 2 << 20, "uneven striping: {per_root:?}");
    for s in &m.shards {
        assert!(!Path::new(&s.path).is_absolute(), "relative shard paths");
        assert!(r[s.root].join(&s.path).is_file());
    }
    round_trip("roots", &sizes, 1 << 20, 3);
}

#[test]
fn restore_with_moved_roots_is_portable() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s");
    let r = roots(dir.path(), 2).unwrap();
    let src = source(&[3 << 20, 777], 5);
    save_striped(&src, &snap, &r);
    let moved: Vec<PathBuf> = r
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let to = dir.path().join(format!("moved{i}"));
            std::fs::rename(p, &to).unwrap();
            to
        })
        .collect();
    assert!(
        restore(&snap, &LoadOptions::default()).is_err(),
        "recorded roots are gone"
    );
    let (restored, _) = restore(
        &snap,
        &LoadOptions {
            roots: Some(moved),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(restored.regions[1].len(), 777);
}

/// A storage layer that moves one byte per call: every read and write comes
/// back short and must be resumed (buffered path, both directions).
#[test]
fn one_byte_per_call_storage() {
    let sizes = [0, 1, 4097, 70_000, 5];
    let one_byte = Tuning {
        workers: 3,
        queue_depth: 4,
        chunk_size: 1 << 20,
        max_bytes_per_call: Some(1),
        ..Tuning::default()
    };
    for (label, backend) in [
        ("buffered", BackendKind::Buffered),
        ("direct", BackendKind::Direct),
        ("pinned", BackendKind::Pinned),
    ] {
        let cfg = Config {
            label,
            backend,
            tuning: one_byte.clone(),
        };
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("s");
        let src = source(&sizes, 9);
        save(&src, &snap, &cfg.save_options()).unwrap_or_else(|e| panic!("{label}: {e}"));
        let (restored, _) =
            restore(&snap, &cfg.load_options()).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_same_bytes(&src, &restored, label);
    }
}

#[test]
fn cancellation_commits_nothing() {
    for cfg in configs() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("s");
        let cancel = Arc::new(AtomicBool::new(true));
        let err = save(
            &source(&[2 << 20, 3], 1),
            &snap,
            &SaveOptions {
                cancel: Some(cancel.clone()),
                ..cfg.save_options()
            },
        )
        .unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{}: {err}", cfg.label);
        assert!(!snap.exists(), "{}: nothing committed", cfg.label);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert!(
            leftovers.is_empty(),
            "{}: staging removed: {leftovers:?}",
            cfg.label
        );
    }
}

#[test]
fn every_backend_detects_a_flipped_bit_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s");
    save(&source(&[3 << 20, 10], 2), &snap, &SaveOptions::default()).unwrap();
    let m = memferry::snapshot::Manifest::load(&snap).unwrap();
    let e = &m.allocations[0].extents[0];
    let shard = snap.join(&m.shards[e.shard].path);
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = e.offset + (1 << 20) + 100; // inside the second checksum chunk
    bytes[at as usize] ^= 0x10;
    std::fs::write(&shard, bytes).unwrap();
    for cfg in configs() {
        let lo = cfg.load_options();
        for (op, err) in [
            ("restore", restore(&snap, &lo).err()),
            ("verify", verify(&snap, &lo).err()),
        ] {
            match err {
                Some(Error::ChecksumMismatch {
                    path,
                    offset,
                    length,
                    ..
                }) => {
                    assert_eq!(path, shard, "{}/{op}", cfg.label);
                    assert_eq!(offset, e.offset + (1 << 20), "{}/{op}", cfg.label);
                    assert_eq!(length, 1 << 20, "{}/{op}", cfg.label);
                }
                other => panic!(
                    "{}/{op}: expected a checksum mismatch, got {other:?}",
                    cfg.label
                ),
            }
        }
    }
    let skip = LoadOptions {
        verify: false,
        ..LoadOptions::default()
    };
    let (_, rep) = restore(&snap, &skip).expect("--no-verify skips checksums");
    assert!(!rep.verified);
}

/// gds on host memory (or without cuFile/CUDA) runs pinned and says why.
#[test]
fn gds_falls_back_to_pinned_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s");
    let src = source(&[3 << 20, 4097], 5);
    let rep = save(
        &src,
        &snap,
        &SaveOptions {
            backend: BackendKind::Gds,
            ..SaveOptions::default()
        },
    )
    .unwrap();
    assert!(
        rep.fallbacks
            .iter()
            .any(|f| f.starts_with("gds: ") && f.contains("ran pinned")),
        "{:?}",
        rep.fallbacks
    );
    let (restored, rep) = restore(
        &snap,
        &LoadOptions {
            backend: BackendKind::Gds,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert!(rep.verified, "the pinned fallback verifies in-line");
    assert!(rep.fallbacks.iter().any(|f| f.contains("ran pinned")));
    assert_same_bytes(&src, &restored, "gds");
}

/// Restoring onto a CUDA device without a driver fails before touching
/// anything, and says to use --device cpu.
#[test]
fn cuda_device_without_a_driver_is_a_clear_error() {
    if memferry::memory::cuda::available() {
        eprintln!("skipped: a CUDA driver is present (tests/gpu.rs covers devices)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s");
    save(&source(&[8192], 1), &snap, &SaveOptions::default()).unwrap();
    let err = restore(
        &snap,
        &LoadOptions {
            device: Some(Device::Cuda(0)),
            ..LoadOptions::default()
        },
    )
    .err()
    .expect("no CUDA here");
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("use --device cpu"), "{err}");
}

/// Two extents of one allocation where the first ends off a 4096-byte
/// boundary (library plans may do this; saves never do): the direct
/// backend must not land the first one's file padding, unverified, on the
/// bytes of the second, whichever completes first.
#[test]
fn direct_loads_never_spill_padding_onto_a_neighbouring_op() {
    use memferry::integrity::crc32c;
    use memferry::transfer::{
        Backend, Checksums, DirectBackend, Direction, FileTarget, PlanBuilder, TransferJob,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shard");
    let a: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
    let b: Vec<u8> = (0..4000u32).map(|i| (i % 241) as u8 + 3).collect();
    let mut file = vec![0u8; 16384];
    file[..5000].copy_from_slice(&a);
    file[5000..8192].fill(0xEE); // the first extent's padding: never loaded
    file[8192..12192].copy_from_slice(&b);
    std::fs::write(&path, &file).unwrap();
    let sums = vec![crc32c(&a[..4096]), crc32c(&a[4096..]), crc32c(&b)];
    // One request of 4096 bytes at a time and two in flight: the first
    // op's tail arrives after the second op landed (almost every run
    // before the fix).
    for round in 0..50 {
        let mut pb = PlanBuilder::new(Direction::Load, 4096, 1 << 20);
        let f = pb.add_file(FileTarget {
            path: path.clone(),
            root: 0,
            size: 16384,
        });
        pb.add_extent(f, 0, 5000, 0, 0);
        pb.add_extent(f, 8192, 4000, 0, 5000);
        let plan = pb.build();
        let region = HostRegion::new(9000).unwrap();
        let regions: [&dyn Region; 1] = [&region];
        let job = TransferJob::new(&plan, &regions, Checksums::Verify(&sums));
        let tuning = Tuning {
            queue_depth: 2,
            max_bytes_per_call: Some(4096),
            ..Tuning::default()
        };
        DirectBackend::new(tuning)
            .run(&job)
            .expect("the load succeeds");
        assert!(
            region.as_slice()[..5000] == a[..] && region.as_slice()[5000..] == b[..],
            "round {round}: the restored bytes differ from the file's extents"
        );
    }
}
