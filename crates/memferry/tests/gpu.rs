//! CUDA device memory through every backend. Without a usable CUDA device
//! (CI) each test prints "skipped: no CUDA device (why)" and returns; with
//! `MEMFERRY_REQUIRE_GPU=1` (set on GPU machines) a missing device fails
//! the test instead, so a broken driver setup cannot pass as a skip.

use std::path::Path;

use memferry::Error;
use memferry::memory::cuda::{self, PinnedBuf};
use memferry::memory::{CudaRegion, Device, HostRegion, OwnedRegion, Region};
use memferry::snapshot::layout::{Allocation, Layout};
use memferry::snapshot::source::{SnapshotSource, fill_bytes};
use memferry::snapshot::{LoadOptions, SaveOptions, restore, save, verify};
use memferry::transfer::gds::CuFile;
use memferry::transfer::{BackendKind, Tuning};

/// True when a CUDA device is usable; otherwise says why the test skips,
/// or fails it when `MEMFERRY_REQUIRE_GPU=1`.
fn gpu() -> bool {
    if cuda::available() {
        return true;
    }
    let why = cuda::driver().err().map_or_else(
        || "the driver reports no device".to_string(),
        |e| e.to_string(),
    );
    assert!(
        std::env::var("MEMFERRY_REQUIRE_GPU").as_deref() != Ok("1"),
        "MEMFERRY_REQUIRE_GPU=1 but no CUDA device is usable: {why}"
    );
    eprintln!("skipped: no CUDA device ({why})");
    false
}

/// `None` when O_DIRECT through io_uring works under `dir`; otherwise why
/// not (the `direct` backend's fallback reasons), which is the one thing
/// that excuses `pinned` (and `gds`) for running `buffered` instead.
fn direct_io_refused(dir: &Path) -> Option<String> {
    let probe = dir.join("direct-io-probe");
    let rep = save(
        &source(&[1 << 20], Device::Cpu, 1),
        &probe,
        &SaveOptions {
            backend: BackendKind::Direct,
            ..SaveOptions::default()
        },
    )
    .unwrap();
    std::fs::remove_dir_all(&probe).unwrap();
    (rep.mode != "odirect-uring").then(|| format!("{}: {:?}", rep.mode, rep.fallbacks))
}

/// Checks that a `pinned` or `gds` job on device memory ran the mode it
/// should: the pinned pipeline with async copies, and cuFile whenever it
/// loads. A fallback passes only where `refused` (no O_DIRECT here) or a
/// missing cuFile explains it, and the test says so.
fn assert_mode(
    label: &str,
    kind: BackendKind,
    mode: &str,
    fallbacks: &[String],
    refused: &Option<String>,
) {
    let pinned = |mode: &str| match refused {
        None => assert_eq!(
            mode, "odirect-uring-pinned-async-copy",
            "{label}: {fallbacks:?}"
        ),
        Some(why) => {
            assert_eq!(mode, "buffered-fallback", "{label}: {fallbacks:?}");
            eprintln!(
                "{label}: ran buffered-fallback, accepted because O_DIRECT is refused here ({why})"
            );
        }
    };
    match kind {
        BackendKind::Pinned => pinned(mode),
        BackendKind::Gds => match (CuFile::get(), refused) {
            (Ok(_), None) => assert!(mode.starts_with("cufile-"), "{label}: {mode} {fallbacks:?}"),
            (Ok(_), Some(_)) => {
                assert!(
                    fallbacks
                        .iter()
                        .any(|f| f.contains("cuFile needs O_DIRECT; ran pinned")),
                    "{label}: {fallbacks:?}"
                );
                pinned(mode);
            }
            (Err(why), _) => {
                assert!(
                    fallbacks.iter().any(|f| f.contains("ran pinned")),
                    "{label}: {fallbacks:?}"
                );
                eprintln!(
                    "{label}: gds ran pinned, accepted because cuFile is unavailable ({why})"
                );
                pinned(mode);
            }
        },
        _ => {}
    }
}

/// A host source with allocations of `sizes` bytes filled from `seed`,
/// moved to `device`.
fn source(sizes: &[u64], device: Device, seed: u64) -> SnapshotSource {
    let mut layout = Layout::default();
    let mut regions: Vec<Box<dyn Region>> = Vec::new();
    for (i, &s) in sizes.iter().enumerate() {
        layout.allocations.push(Allocation {
            id: i as u64,
            size: s,
            device: Device::Cpu,
            tag: "t".into(),
        });
        let mut r = HostRegion::new(s).unwrap();
        fill_bytes(seed, i as u64, r.as_mut_slice());
        regions.push(Box::new(r));
    }
    SnapshotSource {
        description: "gpu test".into(),
        layout,
        regions,
    }
    .to_device(device)
    .unwrap()
}

fn bytes(r: &dyn Region) -> Vec<u8> {
    let mut v = vec![0; r.len() as usize];
    // SAFETY: no writers during the test.
    unsafe { r.copy_out(0, &mut v).unwrap() };
    v
}

#[test]
fn device_regions_copy_both_ways_from_any_thread() {
    if !gpu() {
        return;
    }
    let r = CudaRegion::new(0, (8 << 20) + 3).unwrap();
    let mut want = vec![0u8; r.len() as usize];
    fill_bytes(3, 0, &mut want);
    std::thread::scope(|s| {
        for (i, piece) in want.chunks(1 << 20).enumerate() {
            let r = &r;
            s.spawn(move || {
                // SAFETY: each thread writes its own disjoint range.
                unsafe { r.copy_in((i << 20) as u64, piece).unwrap() };
            });
        }
    });
    assert!(bytes(&r) == want);
    // A caller-owned pointer wraps the same memory without owning it.
    // SAFETY: `r` outlives `view` and nobody writes it meanwhile.
    let view = unsafe { CudaRegion::from_raw(0, r.device_ptr() + 4096, 4096) }.unwrap();
    assert!(bytes(&view) == want[4096..8192]);
    drop(view);
    assert!(bytes(&r) == want, "dropping a wrapper frees nothing");
    let refused = |ptr: u64, len: u64, needle: &str| {
        // SAFETY: refused before anything could use the memory.
        let e = unsafe { CudaRegion::from_raw(0, ptr, len) }
            .err()
            .unwrap_or_else(|| panic!("{ptr:#x}+{len} must be refused"));
        assert!(matches!(e, Error::InvalidInput(_)), "{e}");
        assert!(e.to_string().contains(needle), "{e}");
    };
    // A range running past the end of the allocation.
    refused(
        r.device_ptr() + 4096,
        r.len(),
        "past the end of its allocation",
    );
    refused(r.device_ptr(), u64::MAX, "past the end of its allocation");
    // Host memory the driver does not know, and pinned host memory it does.
    let host = [0u8; 64];
    refused(
        host.as_ptr() as u64,
        64,
        "not memory known to the CUDA driver",
    );
    let p = PinnedBuf::new(0, 1 << 20).unwrap();
    assert!((p.as_mut_ptr() as usize).is_multiple_of(4096));
    refused(
        p.as_mut_ptr() as u64,
        4096,
        "host memory known to the CUDA driver",
    );
    // `fill` returns with the bytes set.
    r.fill(0xa5).unwrap();
    assert!(bytes(&r).iter().all(|&b| b == 0xa5));
}

#[test]
fn snapshots_round_trip_through_device_memory_with_every_backend() {
    if !gpu() {
        return;
    }
    let sizes = [(5 << 20) + 7, 4096, 1, 0, 3 << 20];
    let src = source(&sizes, Device::Cuda(0), 11);
    let scratch = tempfile::tempdir_in("/var/tmp").unwrap();
    let refused = direct_io_refused(scratch.path());
    let tuning = Tuning {
        chunk_size: 1 << 20,
        queue_depth: 4,
        ..Tuning::default()
    };
    for save_backend in [
        BackendKind::Buffered,
        BackendKind::Direct,
        BackendKind::Pinned,
        BackendKind::Gds,
    ] {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let snap = dir.path().join("s");
        let roots = vec![dir.path().join("r0"), dir.path().join("r1")];
        for r in &roots {
            std::fs::create_dir(r).unwrap();
        }
        let rep = save(
            &src,
            &snap,
            &SaveOptions {
                roots: Some(roots),
                shard_size: 2 << 20,
                backend: save_backend,
                tuning: tuning.clone(),
                ..SaveOptions::default()
            },
        )
        .unwrap();
        eprintln!("save {save_backend}: {} {:?}", rep.mode, rep.fallbacks);
        let label = format!("saved with {save_backend}");
        assert_mode(&label, save_backend, &rep.mode, &rep.fallbacks, &refused);
        for load in [
            BackendKind::Buffered,
            BackendKind::Direct,
            BackendKind::Pinned,
            BackendKind::Gds,
        ] {
            let label = format!("saved with {save_backend}, loaded with {load}");
            let lo = LoadOptions {
                backend: load,
                tuning: tuning.clone(),
                ..LoadOptions::default()
            };
            let (restored, rep) = restore(&snap, &lo).unwrap_or_else(|e| panic!("{label}: {e}"));
            eprintln!(
                "{label}: {} verified={} {:?}",
                rep.mode, rep.verified, rep.fallbacks
            );
            assert_mode(&label, load, &rep.mode, &rep.fallbacks, &refused);
            if rep.mode.starts_with("cufile") {
                assert!(
                    !rep.verified,
                    "{label}: gds never claims in-line verification"
                );
            } else {
                assert!(rep.verified, "{label}");
            }
            for (i, (a, b)) in src.regions.iter().zip(&restored.regions).enumerate() {
                assert!(matches!(b, OwnedRegion::Cuda(_)), "{label}: on the device");
                assert_eq!(b.device(), Device::Cuda(0));
                assert!(
                    bytes(a.as_ref()) == bytes(b),
                    "{label}: allocation {i} differs"
                );
            }
        }
        verify(&snap, &LoadOptions::default()).unwrap();
    }
}

#[test]
fn a_flipped_bit_is_caught_before_reaching_the_device() {
    if !gpu() {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let snap = dir.path().join("s");
    save(
        &source(&[3 << 20], Device::Cuda(0), 11),
        &snap,
        &SaveOptions::default(),
    )
    .unwrap();
    let m = memferry::snapshot::Manifest::load(&snap).unwrap();
    let e = &m.allocations[0].extents[0];
    let shard = snap.join(&m.shards[e.shard].path);
    let mut b = std::fs::read(&shard).unwrap();
    b[(e.offset + (1 << 20) + 5) as usize] ^= 1;
    std::fs::write(&shard, b).unwrap();
    let err = restore(
        &snap,
        &LoadOptions {
            backend: BackendKind::Pinned,
            ..LoadOptions::default()
        },
    )
    .err()
    .expect("corruption is detected");
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
}

#[test]
fn every_visible_device_gets_its_own_allocations() {
    if !gpu() {
        return;
    }
    let n = cuda::driver().unwrap().devices.len() as u32;
    if n < 2 {
        eprintln!("skipped: one CUDA device, multi-device layouts need two");
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let snap = dir.path().join("s");
    // Distinct seeds: restoring one device's bytes onto the other fails.
    let a = source(&[1 << 20], Device::Cuda(0), 21);
    let b = source(&[2 << 20], Device::Cuda(1), 22);
    assert!(bytes(a.regions[0].as_ref())[..] != bytes(b.regions[0].as_ref())[..1 << 20]);
    let mut src = a;
    src.layout.allocations.push(Allocation {
        id: 1,
        ..b.layout.allocations[0].clone()
    });
    src.regions.extend(b.regions);
    save(&src, &snap, &SaveOptions::default()).unwrap();
    let (restored, rep) = restore(
        &snap,
        &LoadOptions {
            backend: BackendKind::Pinned,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let refused = direct_io_refused(dir.path());
    assert_mode(
        "two devices, pinned",
        BackendKind::Pinned,
        &rep.mode,
        &rep.fallbacks,
        &refused,
    );
    assert_eq!(restored.regions[0].device(), Device::Cuda(0));
    assert_eq!(restored.regions[1].device(), Device::Cuda(1));
    for (i, (x, y)) in src.regions.iter().zip(&restored.regions).enumerate() {
        assert!(bytes(x.as_ref()) == bytes(y), "allocation {i} differs");
    }
}

/// KV blocks from and into device tensors: the same job API, pages copied
/// between device memory and the store's host staging.
#[test]
fn kv_blocks_round_trip_through_device_tensors() {
    use memferry::kv::{BlockKey, KvConfig, KvLayout, KvStore, KvTensor};
    use std::sync::Arc;
    use std::time::Duration;
    if !gpu() {
        return;
    }
    let ns = memferry_test_support::kv::namespace("gpu/kv", 2);
    let (blocks, page) = (16u64, 64u64 << 10);
    let tensor = |fill: Option<u64>| {
        let r = CudaRegion::new(0, blocks * page).unwrap();
        if let Some(seed) = fill {
            let mut host = vec![0u8; (blocks * page) as usize];
            fill_bytes(seed, 0, &mut host);
            // SAFETY: the region is not shared yet.
            unsafe { r.copy_in(0, &host).unwrap() };
        }
        Arc::new(r)
    };
    let (src_k, src_v) = (tensor(Some(1)), tensor(Some(2)));
    let (dst_k, dst_v) = (tensor(None), tensor(None));
    let layout = |k: &Arc<CudaRegion>, v: &Arc<CudaRegion>| {
        KvLayout::new(vec![
            KvTensor {
                region: k.clone(),
                num_blocks: blocks,
                page_bytes: page,
            },
            KvTensor {
                region: v.clone(),
                num_blocks: blocks,
                page_bytes: page,
            },
        ])
        .unwrap()
    };
    let root = tempfile::tempdir().unwrap();
    let keys: Vec<BlockKey> = (0..4u8)
        .map(|i| BlockKey::new(vec![i + 1]).unwrap())
        .collect();
    let store = KvStore::open(
        KvConfig::new(root.path(), ns.clone()),
        layout(&src_k, &src_v),
    )
    .unwrap();
    // SAFETY: the source tensors are not written while the job runs.
    let job = unsafe { store.submit_store(&keys, &(0..8).collect::<Vec<_>>()) }.unwrap();
    let r = store.wait(&[job], Duration::from_secs(60));
    assert!(r[0].succeeded(), "{r:?}");
    // Device pages move through page-locked staging on memferry's streams.
    let mode = store.mode();
    assert!(
        mode.contains("staged through pinned memory"),
        "device tensors are staged through pinned memory: {mode}"
    );
    drop(store);
    let store = KvStore::open(KvConfig::new(root.path(), ns), layout(&dst_k, &dst_v)).unwrap();
    // SAFETY: the destination tensors are read only after the job.
    let job = unsafe { store.submit_load(&keys, &(8..16).collect::<Vec<_>>()) }.unwrap();
    let r = store.wait(&[job], Duration::from_secs(60));
    assert!(r[0].succeeded(), "{r:?}");
    let half = (8 * page) as usize;
    assert_eq!(bytes(&*dst_k)[half..], bytes(&*src_k)[..half]);
    assert_eq!(bytes(&*dst_v)[half..], bytes(&*src_v)[..half]);
}
