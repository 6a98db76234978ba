//! safetensors files in, safetensors file out: the source maps every tensor
//! to one allocation, and the export writes the same tensors back.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use memferry::Error;
use memferry::memory::{HostRegion, Region};
use memferry::snapshot::export::export_safetensors;
use memferry::snapshot::layout::{Allocation, Layout};
use memferry::snapshot::source::{
    SAFETENSORS_FILE_KEY, SAFETENSORS_TENSOR_KEY, SnapshotSource, TensorMeta, open_safetensors,
    synthetic,
};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// A tensor to put in a test file.
struct Spec {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn spec(name: &'static str, dtype: Dtype, shape: &[usize], seed: u8) -> Spec {
    let bytes = shape.iter().product::<usize>() * dtype.bitsize() / 8;
    Spec {
        name,
        dtype,
        shape: shape.to_vec(),
        data: (0..bytes)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect(),
    }
}

fn write_file(path: &Path, tensors: &[Spec], meta: Option<HashMap<String, String>>) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name,
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

fn file_a() -> Vec<Spec> {
    vec![
        spec("model.embed", Dtype::F32, &[3, 7], 1),
        spec("model.norm", Dtype::BF16, &[5], 2),
        spec("empty", Dtype::F32, &[0], 3),
        spec("a.empty", Dtype::F32, &[4, 0], 7),
        spec("ids", Dtype::I64, &[3], 4),
    ]
}

fn file_b() -> Vec<Spec> {
    vec![
        spec("bytes", Dtype::U8, &[13], 5),
        spec("half", Dtype::F16, &[2, 3], 6),
    ]
}

/// Writes the two test files; returns their paths.
fn two_files(dir: &Path) -> Vec<PathBuf> {
    let a = dir.join("a.safetensors");
    let b = dir.join("b.safetensors");
    write_file(&a, &file_a(), Some(pt_metadata()));
    write_file(&b, &file_b(), None);
    vec![a, b]
}

fn region_refs(src: &SnapshotSource) -> Vec<&dyn Region> {
    src.regions.iter().map(|r| r.as_ref()).collect()
}

fn region_bytes(r: &dyn Region) -> Vec<u8> {
    let mut out = vec![0; r.len() as usize];
    // SAFETY: nobody writes the region during the test.
    unsafe { r.copy_out(0, &mut out) }.unwrap();
    out
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn open_maps_each_tensor_to_an_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let paths = two_files(dir.path());
    let src = open_safetensors(&paths).unwrap();
    src.validate().unwrap();

    assert_eq!(
        src.description,
        format!("safetensors:{},{}", paths[0].display(), paths[1].display())
    );

    // File order, then data-offset order. The safetensors crate lays data
    // out by decreasing dtype alignment, then name; the zero-size tensors
    // share their offset with `model.embed` and come first, in name order.
    let expected = [
        ("ids", 24),
        ("a.empty", 0),
        ("empty", 0),
        ("model.embed", 84),
        ("model.norm", 10),
        ("half", 12),
        ("bytes", 13),
    ];
    let layout = &src.layout;
    assert_eq!(layout.allocations.len(), expected.len());
    for (i, a) in layout.allocations.iter().enumerate() {
        assert_eq!(a.id, i as u64);
        assert_eq!(a.size, expected[i].1, "size of allocation {i}");
        assert_eq!(a.tag, "tensor");
        assert_eq!(src.regions[i].len(), a.size);
    }

    let originals: HashMap<&str, Spec> = file_a()
        .into_iter()
        .chain(file_b())
        .map(|s| (s.name, s))
        .collect();
    let mut tensor_keys = 0;
    for (i, (name, _)) in expected.iter().enumerate() {
        let key = format!("{SAFETENSORS_TENSOR_KEY}{name}");
        let entry = layout
            .metadata
            .iter()
            .find(|m| m.key == key)
            .unwrap_or_else(|| panic!("no metadata {key}"));
        tensor_keys += 1;
        assert_eq!(entry.allocation_id, i as u64);
        assert_eq!(entry.offset, 0);
        let meta: TensorMeta = serde_json::from_slice(&entry.value).unwrap();
        let orig = &originals[name];
        assert_eq!(meta.name, *name);
        assert_eq!(meta.dtype, orig.dtype.to_string());
        assert_eq!(meta.shape, orig.shape);
        assert_eq!(
            region_bytes(src.regions[i].as_ref()),
            orig.data,
            "bytes of {name}"
        );
    }

    // One file entry: only file 0 has __metadata__.
    let file_entries: Vec<_> = layout
        .metadata
        .iter()
        .filter(|m| m.key.starts_with(SAFETENSORS_FILE_KEY))
        .collect();
    assert_eq!(file_entries.len(), 1);
    assert_eq!(file_entries[0].key, format!("{SAFETENSORS_FILE_KEY}0"));
    assert_eq!(file_entries[0].allocation_id, 0);
    let map: HashMap<String, String> = serde_json::from_slice(&file_entries[0].value).unwrap();
    assert_eq!(map, pt_metadata());
    assert_eq!(layout.metadata.len(), tensor_keys + 1);
}

#[test]
fn export_writes_the_same_tensors_back() {
    let dir = tempfile::tempdir().unwrap();
    let paths = two_files(dir.path());
    let src = open_safetensors(&paths).unwrap();
    let out = dir.path().join("out.safetensors");
    let summary = export_safetensors(&src.layout, &region_refs(&src), &out).unwrap();

    let originals: Vec<Spec> = file_a().into_iter().chain(file_b()).collect();
    assert_eq!(summary.tensors, originals.len());
    assert_eq!(
        summary.bytes,
        originals.iter().map(|s| s.data.len() as u64).sum::<u64>()
    );
    let written = fs::read(&out).unwrap();
    assert_eq!(summary.file_bytes, written.len() as u64);

    let st = SafeTensors::deserialize(&written).unwrap();
    assert_eq!(st.len(), originals.len());
    for orig in &originals {
        let t = st.tensor(orig.name).unwrap();
        assert_eq!(t.dtype(), orig.dtype, "dtype of {}", orig.name);
        assert_eq!(t.shape(), orig.shape.as_slice(), "shape of {}", orig.name);
        assert_eq!(t.data(), orig.data.as_slice(), "bytes of {}", orig.name);
    }
    let (_, header) = SafeTensors::read_metadata(&written).unwrap();
    assert_eq!(header.metadata(), &Some(pt_metadata()));

    // The output gets the mode any new file gets here (umask applied), not
    // the private mode of a temporary file.
    let probe = dir.path().join("probe");
    fs::write(&probe, b"").unwrap();
    assert_eq!(
        fs::metadata(&out).unwrap().permissions(),
        fs::metadata(&probe).unwrap().permissions()
    );
    fs::remove_file(&probe).unwrap();

    // Nothing left behind but the output.
    assert_eq!(
        names_in(dir.path()),
        ["a.safetensors", "b.safetensors", "out.safetensors"]
    );

    // The export is itself a valid source with the same layout.
    let again = open_safetensors(std::slice::from_ref(&out)).unwrap();
    let sizes = |l: &Layout| {
        let mut s: Vec<u64> = l.allocations.iter().map(|a| a.size).collect();
        s.sort();
        s
    };
    assert_eq!(sizes(&again.layout), sizes(&src.layout));
}

#[test]
fn export_replaces_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let paths = two_files(dir.path());
    let src = open_safetensors(&paths[1..]).unwrap();
    let out = dir.path().join("out.safetensors");
    fs::write(&out, b"old contents").unwrap();
    export_safetensors(&src.layout, &region_refs(&src), &out).unwrap();
    let written = fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&written).unwrap();
    assert_eq!(st.len(), 2);
    let (_, header) = SafeTensors::read_metadata(&written).unwrap();
    assert_eq!(header.metadata(), &None, "file b has no __metadata__");
}

#[test]
fn allocations_without_tensor_metadata_become_u8_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let paths = two_files(dir.path());
    let mut src = open_safetensors(&paths[..1]).unwrap();
    // Add an allocation the safetensors metadata does not describe.
    let mut extra = HostRegion::new(5).unwrap();
    extra.as_mut_slice().copy_from_slice(b"extra");
    src.layout.allocations.push(Allocation {
        id: 100,
        size: 5,
        device: memferry::memory::Device::Cpu,
        tag: "other".into(),
    });
    src.regions.push(Box::new(extra));

    let out = dir.path().join("mixed.safetensors");
    let summary = export_safetensors(&src.layout, &region_refs(&src), &out).unwrap();
    assert_eq!(summary.tensors, 6);
    let written = fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&written).unwrap();
    let t = st.tensor("allocation/100").unwrap();
    assert_eq!(t.dtype(), Dtype::U8);
    assert_eq!(t.shape(), [5]);
    assert_eq!(t.data(), b"extra");
    assert_eq!(st.tensor("model.embed").unwrap().shape(), [3, 7]);
}

#[test]
fn synthetic_layout_exports_one_u8_tensor_per_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let m = synthetic(1 << 20, 1).unwrap();
    let regions: Vec<&dyn Region> = m.regions.iter().map(|r| r as &dyn Region).collect();
    let out = dir.path().join("synthetic.safetensors");
    let summary = export_safetensors(&m.layout, &regions, &out).unwrap();
    assert_eq!(summary.tensors, m.layout.allocations.len());
    assert_eq!(summary.bytes, m.layout.total_bytes());

    let written = fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&written).unwrap();
    assert_eq!(st.len(), m.layout.allocations.len());
    for (a, r) in m.layout.allocations.iter().zip(&m.regions) {
        let t = st.tensor(&format!("allocation/{}", a.id)).unwrap();
        assert_eq!(t.dtype(), Dtype::U8);
        assert_eq!(t.shape(), [a.size as usize]);
        assert_eq!(t.data(), r.as_slice(), "bytes of allocation {}", a.id);
    }
    let (_, header) = SafeTensors::read_metadata(&written).unwrap();
    assert_eq!(header.metadata(), &None);
}

#[test]
fn inconsistent_tensor_metadata_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let paths = two_files(dir.path());
    let mut src = open_safetensors(&paths[..1]).unwrap();
    let key = format!("{SAFETENSORS_TENSOR_KEY}model.embed");
    let entry = src
        .layout
        .metadata
        .iter_mut()
        .find(|m| m.key == key)
        .unwrap();
    let mut meta: TensorMeta = serde_json::from_slice(&entry.value).unwrap();
    meta.shape = vec![3, 8];
    entry.value = serde_json::to_vec(&meta).unwrap();

    let out = dir.path().join("bad.safetensors");
    let err = export_safetensors(&src.layout, &region_refs(&src), &out).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("model.embed"), "{err}");
    assert!(!out.exists());
}

#[test]
fn mismatched_regions_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let paths = two_files(dir.path());
    let src = open_safetensors(&paths).unwrap();
    let out = dir.path().join("out.safetensors");
    let mut regions = region_refs(&src);
    regions.swap(0, 2);
    let err = export_safetensors(&src.layout, &regions, &out).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    regions.pop();
    let err = export_safetensors(&src.layout, &regions, &out).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(!out.exists());
}

#[test]
fn duplicate_tensor_names_name_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("first.safetensors");
    let b = dir.path().join("second.safetensors");
    write_file(&a, &[spec("w", Dtype::F32, &[2], 0)], None);
    write_file(&b, &[spec("w", Dtype::F32, &[2], 1)], None);
    let err = open_safetensors(&[a.clone(), b.clone()])
        .err()
        .expect("duplicate");
    let msg = err.to_string();
    assert!(msg.contains(&a.display().to_string()), "{msg}");
    assert!(msg.contains(&b.display().to_string()), "{msg}");
    assert!(msg.contains("\"w\""), "{msg}");
}

#[test]
fn garbage_and_missing_files_are_rejected_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    fs::write(&garbage, b"this is not a safetensors file at all").unwrap();
    let err = open_safetensors(std::slice::from_ref(&garbage))
        .err()
        .expect("garbage");
    let msg = err.to_string();
    assert!(msg.contains(&garbage.display().to_string()), "{msg}");
    assert!(msg.contains("not a valid safetensors file"), "{msg}");

    let empty = dir.path().join("empty.safetensors");
    fs::write(&empty, b"").unwrap();
    let err = open_safetensors(std::slice::from_ref(&empty))
        .err()
        .expect("empty");
    assert!(
        err.to_string().contains("not a valid safetensors file"),
        "{err}"
    );

    // A valid header whose data is cut short.
    let good = two_files(dir.path()).remove(0);
    let mut bytes = fs::read(&good).unwrap();
    bytes.truncate(bytes.len() - 1);
    let truncated = dir.path().join("truncated.safetensors");
    fs::write(&truncated, &bytes).unwrap();
    let err = open_safetensors(std::slice::from_ref(&truncated))
        .err()
        .expect("truncated");
    assert!(err.to_string().contains("truncated.safetensors"), "{err}");

    let missing = dir.path().join("missing.safetensors");
    let err = open_safetensors(&[good, missing.clone()])
        .err()
        .expect("missing");
    let msg = err.to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
}

#[test]
fn export_onto_a_directory_or_into_a_missing_one_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let m = synthetic(64 << 10, 2).unwrap();
    let regions: Vec<&dyn Region> = m.regions.iter().map(|r| r as &dyn Region).collect();

    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    let err = export_safetensors(&m.layout, &regions, &sub).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("is a directory"), "{err}");
    assert_eq!(names_in(dir.path()), ["sub"]);
    assert!(names_in(&sub).is_empty());

    let nowhere = dir.path().join("no/such/dir/out.safetensors");
    let err = export_safetensors(&m.layout, &regions, &nowhere).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_eq!(names_in(dir.path()), ["sub"]);
}
