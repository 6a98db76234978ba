//! Subcommands on `s3://bucket/prefix` locations, and `copy` between any
//! two locations. The local-path commands live in `commands.rs`; `run`
//! there sends S3 locations here.

use anyhow::{Context, Result};
use memferry::snapshot::LoadOptions;
use memferry::snapshot::copy::{CopyOptions, copy as copy_snapshot};
use memferry::snapshot::export::export_safetensors;
use memferry::snapshot::remote;
use memferry::storage::location::{Location, S3Url};
use memferry::storage::s3::ObjectClient;
use memferry::transfer::Tuning;
use memferry::units::format_bytes;

use crate::args::{
    CopyArgs, ExportArgs, GcArgs, InspectArgs, ReadArgs, RestoreArgs, S3Args, SaveArgs,
};
use crate::commands::{
    load_options, print_export, print_inspect, print_report, save_options, save_source,
};
use crate::progress::Progress;

fn client(s3: &S3Args, url: &S3Url) -> Result<ObjectClient> {
    let cfg = s3.config()?;
    tracing::info!("S3 {}", cfg.describe());
    Ok(ObjectClient::new(&cfg, &url.bucket)?)
}

/// Size of the snapshot for the progress line (0 when there is none: the
/// command then fails by itself). A failed request fails the command here,
/// so a server that keeps failing costs one retry bound, not one per read.
fn total_bytes(c: &ObjectClient, url: &S3Url, op: &str) -> Result<u64> {
    Ok(remote::read_manifest(c, url)
        .with_context(|| format!("{op} {url}"))?
        .map_or(0, |s| s.manifest.total_bytes))
}

pub fn save(a: SaveArgs, url: S3Url, s3: &S3Args, json: bool) -> Result<()> {
    let c = client(s3, &url)?;
    let source = save_source(&a)?;
    let progress = Progress::start("save", source.layout.total_bytes(), json);
    let opts = save_options(&a, &progress);
    let report = remote::save(&source, &c, &url, &opts)
        .with_context(|| format!("saving {} to {url}", a.source))?;
    drop(progress);
    print_report(&report, json);
    Ok(())
}

pub fn restore(a: RestoreArgs, url: S3Url, s3: &S3Args, json: bool) -> Result<()> {
    let c = client(s3, &url)?;
    let progress = Progress::start("restore", total_bytes(&c, &url, "restoring")?, json);
    let opts = LoadOptions {
        verify: !a.no_verify,
        device: a.device,
        complete_file: a.complete_file,
        progress: Some(progress.counter()),
        ..load_options(&a.read)
    };
    let (_restored, report) =
        remote::restore(&c, &url, &opts).with_context(|| format!("restoring {url}"))?;
    drop(progress);
    print_report(&report, json);
    Ok(())
}

pub fn verify(a: ReadArgs, url: S3Url, s3: &S3Args, json: bool) -> Result<()> {
    let c = client(s3, &url)?;
    let progress = Progress::start("verify", total_bytes(&c, &url, "verifying")?, json);
    let opts = LoadOptions {
        progress: Some(progress.counter()),
        ..load_options(&a)
    };
    let report = remote::verify(&c, &url, &opts).with_context(|| format!("verifying {url}"))?;
    drop(progress);
    print_report(&report, json);
    Ok(())
}

pub fn export(a: ExportArgs, url: S3Url, s3: &S3Args, json: bool) -> Result<()> {
    let c = client(s3, &url)?;
    let (restored, mut report) = remote::restore(&c, &url, &load_options(&a.read))
        .with_context(|| format!("restoring {url}"))?;
    let t = std::time::Instant::now();
    let layout = restored.manifest.layout();
    let summary = export_safetensors(&layout, &restored.region_refs(), &a.to)
        .with_context(|| format!("exporting to {}", a.to.display()))?;
    report.phases.commit += t.elapsed().as_secs_f64();
    print_export(report, &summary, &a.to, json)
}

pub fn inspect(a: InspectArgs, url: S3Url, s3: &S3Args, json: bool) -> Result<()> {
    let c = client(s3, &url)?;
    let snap = remote::open(&c, &url).with_context(|| format!("inspecting {url}"))?;
    print_inspect(
        &url.to_string(),
        &snap.manifest,
        &[url.to_string()],
        a.allocations,
        json,
    )
}

pub fn gc(a: GcArgs, url: S3Url, s3: &S3Args, json: bool) -> Result<()> {
    if a.roots.is_some() {
        return Err(memferry::Error::InvalidInput(
            "--roots does not apply to an S3 location; drop --roots".into(),
        )
        .into());
    }
    let c = client(s3, &url)?;
    let report =
        remote::gc(&c, &url, a.grace).with_context(|| format!("collecting leftovers of {url}"))?;
    crate::commands::print_gc(&report, json)
}

pub fn copy(a: CopyArgs, s3: &S3Args, json: bool) -> Result<()> {
    let src = Location::parse(&a.src)?;
    let dst = Location::parse(&a.dst)?;
    let needs_s3 = src.is_s3() || dst.is_s3();
    let opts = CopyOptions {
        from_roots: a.from_roots,
        to_roots: a.to_roots,
        shard_size: Some(a.shard_size),
        tuning: Tuning {
            chunk_size: a.chunk_size,
            ..Tuning::default()
        },
        s3: if needs_s3 {
            s3.config()?
        } else {
            Default::default()
        },
        window: None,
    };
    let r = copy_snapshot(&src, &dst, &opts).with_context(|| format!("copying {src} to {dst}"))?;
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["op"] = "copy".into();
        v["from"] = src.to_string().into();
        v["to"] = dst.to_string().into();
        v["verified"] = true.into();
        println!("{v}");
    } else {
        for rep in [&r.read, &r.write, &r.verify] {
            println!("{}", rep.summary_line());
        }
        println!(
            "copy: {} from {src} to {dst}, verified",
            format_bytes(r.write.bytes)
        );
    }
    Ok(())
}
