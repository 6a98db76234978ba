//! One function per subcommand: validated arguments in, report out.

use std::path::Path;

use anyhow::{Context, Result};
use clap::ArgMatches;
use clap::parser::ValueSource;
use memferry::bench::{Profile, device_key, profile_path};
use memferry::snapshot::export::{ExportSummary, export_safetensors};
use memferry::snapshot::source::{SnapshotSource, open_source};
use memferry::snapshot::{self, LoadOptions, Manifest, Report, SaveOptions};
use memferry::transfer::BackendKind;
use memferry::units::format_bytes;

use memferry::storage::location::Location;

use crate::args::{Cli, Command, ExportArgs, GcArgs, InspectArgs, ReadArgs, RestoreArgs, SaveArgs};
use crate::progress::Progress;

/// The op name used in JSON errors.
pub fn op_name(c: &Command) -> &'static str {
    match c {
        Command::Save(_) => "save",
        Command::Restore(_) => "restore",
        Command::Verify(_) => "verify",
        Command::Inspect(_) => "inspect",
        Command::Export(_) => "export",
        Command::Gc(_) => "gc",
        Command::Quickstart(_) => "quickstart",
        Command::Bench(_) => "bench",
        Command::Copy(_) => "copy",
        Command::Kv(a) => crate::kv::op_name(a),
    }
}

pub fn run(cli: Cli, m: &ArgMatches) -> Result<()> {
    let json = cli.json;
    let s3 = &cli.s3;
    // S3 locations (s3://bucket/prefix) go to crate::remote.
    match &cli.command {
        Command::Save(a) => {
            if let Location::S3(u) = Location::parse(&a.to)? {
                let Command::Save(a) = cli.command else {
                    unreachable!()
                };
                return crate::remote::save(a, u, s3, json);
            }
        }
        Command::Restore(a) => {
            if let Location::S3(u) = Location::parse(&a.read.snapshot)? {
                let Command::Restore(a) = cli.command else {
                    unreachable!()
                };
                return crate::remote::restore(a, u, s3, json);
            }
        }
        Command::Verify(a) => {
            if let Location::S3(u) = Location::parse(&a.snapshot)? {
                let Command::Verify(a) = cli.command else {
                    unreachable!()
                };
                return crate::remote::verify(a, u, s3, json);
            }
        }
        Command::Export(a) => {
            if let Location::S3(u) = Location::parse(&a.read.snapshot)? {
                let Command::Export(a) = cli.command else {
                    unreachable!()
                };
                return crate::remote::export(a, u, s3, json);
            }
        }
        Command::Inspect(a) => {
            if let Location::S3(u) = Location::parse(&a.snapshot)? {
                let Command::Inspect(a) = cli.command else {
                    unreachable!()
                };
                return crate::remote::inspect(a, u, s3, json);
            }
        }
        Command::Gc(a) => {
            if let Location::S3(u) = Location::parse(&a.snapshot)? {
                let Command::Gc(a) = cli.command else {
                    unreachable!()
                };
                return crate::remote::gc(a, u, s3, json);
            }
        }
        _ => {}
    }
    match cli.command {
        Command::Copy(a) => crate::remote::copy(a, s3, json),
        Command::Save(mut a) => {
            let roots = a.transfer.roots.clone().unwrap_or_else(|| {
                vec![memferry::storage::durable::parent_of(
                    &memferry::storage::roots::absolute(&a.to).unwrap_or(a.to.clone()),
                )]
            });
            let profile = apply_profile(&mut a.transfer, m, &roots)?;
            save(a, json, profile)
        }
        Command::Restore(mut a) => {
            let profile = profile_for_snapshot(&mut a.read, m)?;
            restore(a, json, profile)
        }
        Command::Verify(mut a) => {
            let profile = profile_for_snapshot(&mut a, m)?;
            verify(a, json, profile)
        }
        Command::Bench(a) => crate::bench::run(a, s3, json),
        Command::Inspect(a) => inspect(a, json),
        Command::Export(mut a) => {
            let profile = profile_for_snapshot(&mut a.read, m)?;
            export(a, json, profile)
        }
        Command::Gc(a) => gc(a, json),
        Command::Quickstart(a) => crate::quickstart::run(a, json),
        Command::Kv(a) => crate::kv::run(a, s3, json),
    }
}

/// True when the user set the argument (command line or environment).
fn explicit(m: &ArgMatches, id: &str) -> bool {
    matches!(
        m.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Applies the bench profile for the disks holding `roots`: the backend
/// when it is `auto`, and every setting the user did not give. Returns a
/// description of what was used, for the report.
fn apply_profile(
    t: &mut crate::args::TransferArgs,
    m: &ArgMatches,
    roots: &[std::path::PathBuf],
) -> Result<Option<String>> {
    let Some(path) = profile_path() else {
        return Ok(None);
    };
    let explicit_path = std::env::var_os("MEMFERRY_PROFILE").is_some_and(|p| !p.is_empty());
    let profile = match Profile::load(&path) {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(None),
        // A default profile we may not read (another user's HOME, say) is
        // optional: say so and go on. A named one, or a broken one, is a
        // configuration to fix.
        Err(memferry::Error::Io { context, source }) if !explicit_path => {
            tracing::warn!("ignoring the bench profile: {context}: {source}");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let devices = device_key(roots);
    let Some(entry) = profile.lookup(&devices) else {
        return Ok(None);
    };
    let s = &entry.setting;
    let mut used = Vec::new();
    if t.backend == BackendKind::Auto {
        t.backend = s.backend;
        used.push(format!("backend={}", s.backend));
    }
    if !explicit(m, "workers") {
        t.workers = s.workers;
        used.push(format!("workers={}", s.workers));
    }
    if !explicit(m, "queue_depth") {
        t.queue_depth = s.queue_depth;
        used.push(format!("queue_depth={}", s.queue_depth));
    }
    if !explicit(m, "chunk_size") {
        t.chunk_size = s.chunk_size;
        used.push(format!("chunk_size={}", s.chunk_size));
    }
    if used.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!(
        "{} [devices {}: {}]",
        path.display(),
        devices.join(","),
        used.join(" ")
    )))
}

fn profile_for_snapshot(a: &mut ReadArgs, m: &ArgMatches) -> Result<Option<String>> {
    let roots = match snapshot::OpenedSnapshot::open(&a.snapshot, a.transfer.roots.as_deref()) {
        Ok(s) => s.roots,
        // Let the operation itself report what is wrong with the snapshot.
        Err(_) => return Ok(None),
    };
    apply_profile(&mut a.transfer, m, &roots)
}

/// Prints a report as JSON or as the summary and phase lines.
pub fn print_report(r: &Report, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).expect("report serialises"));
    } else {
        println!("{}", r.summary_line());
        println!("{}", r.phases_line());
    }
}

/// Restore options from the command line (local and S3 reads share them).
pub fn load_options(a: &ReadArgs) -> LoadOptions {
    LoadOptions {
        roots: a.transfer.roots.clone(),
        backend: a.transfer.backend,
        tuning: a.transfer.tuning(),
        ..LoadOptions::default()
    }
}

/// Total payload bytes of a snapshot, for the progress bar (0 if unknown).
fn snapshot_bytes(dir: &Path) -> u64 {
    Manifest::load(dir).map_or(0, |m| m.total_bytes)
}

/// The source of a save, on `--device` when one is named.
pub fn save_source(a: &SaveArgs) -> Result<SnapshotSource> {
    let source = open_source(&a.source)?;
    if a.device == memferry::memory::Device::Cpu {
        return Ok(source);
    }
    source
        .to_device(a.device)
        .with_context(|| format!("loading {} onto {}", a.source, a.device))
}

/// What the save flags ask for, progress counted on `progress`.
pub fn save_options(a: &SaveArgs, progress: &Progress) -> SaveOptions {
    SaveOptions {
        roots: a.transfer.roots.clone(),
        shard_size: a.shard_size,
        backend: a.transfer.backend,
        tuning: a.transfer.tuning(),
        complete_file: a.complete_file.clone(),
        progress: Some(progress.counter()),
        ..SaveOptions::default()
    }
}

fn save(a: SaveArgs, json: bool, profile: Option<String>) -> Result<()> {
    let source = save_source(&a)?;
    let progress = Progress::start("save", source.layout.total_bytes(), json);
    let opts = save_options(&a, &progress);
    let mut report = snapshot::save(&source, &a.to, &opts)
        .with_context(|| format!("saving {} to {}", a.source, a.to.display()))?;
    report.profile = profile;
    drop(progress);
    print_report(&report, json);
    Ok(())
}

fn restore(a: RestoreArgs, json: bool, profile: Option<String>) -> Result<()> {
    let progress = Progress::start("restore", snapshot_bytes(&a.read.snapshot), json);
    let opts = LoadOptions {
        verify: !a.no_verify,
        device: a.device,
        complete_file: a.complete_file,
        progress: Some(progress.counter()),
        ..load_options(&a.read)
    };
    let (_restored, mut report) = snapshot::restore(&a.read.snapshot, &opts)
        .with_context(|| format!("restoring {}", a.read.snapshot.display()))?;
    report.profile = profile;
    drop(progress);
    print_report(&report, json);
    Ok(())
}

fn verify(a: ReadArgs, json: bool, profile: Option<String>) -> Result<()> {
    let progress = Progress::start("verify", snapshot_bytes(&a.snapshot), json);
    let opts = LoadOptions {
        progress: Some(progress.counter()),
        ..load_options(&a)
    };
    let mut report = snapshot::verify(&a.snapshot, &opts)
        .with_context(|| format!("verifying {}", a.snapshot.display()))?;
    report.profile = profile;
    drop(progress);
    print_report(&report, json);
    Ok(())
}

fn export(a: ExportArgs, json: bool, profile: Option<String>) -> Result<()> {
    let progress = Progress::start("export", snapshot_bytes(&a.read.snapshot), json);
    let opts = LoadOptions {
        // Export writes host bytes: restore to host memory unless asked.
        device: a.device.or(Some(memferry::memory::Device::Cpu)),
        progress: Some(progress.counter()),
        ..load_options(&a.read)
    };
    let (restored, mut report) = snapshot::restore(&a.read.snapshot, &opts)
        .with_context(|| format!("restoring {}", a.read.snapshot.display()))?;
    drop(progress);
    let t = std::time::Instant::now();
    let layout = restored.manifest.layout();
    // Device memory is copied back to host memory to be written.
    let host = restored
        .regions
        .iter()
        .map(|r| match r {
            memferry::memory::OwnedRegion::Host(_) => Ok(None),
            device => Ok(Some(memferry::memory::HostRegion::from_bytes(
                &device.to_vec()?,
            )?)),
        })
        .collect::<memferry::Result<Vec<_>>>()?;
    let refs: Vec<&dyn memferry::memory::Region> = restored
        .regions
        .iter()
        .zip(&host)
        .map(|(r, h)| match h {
            Some(h) => h as &dyn memferry::memory::Region,
            None => r as &dyn memferry::memory::Region,
        })
        .collect();
    let summary = export_safetensors(&layout, &refs, &a.to)
        .with_context(|| format!("exporting to {}", a.to.display()))?;
    report.profile = profile;
    report.phases.commit += t.elapsed().as_secs_f64();
    print_export(report, &summary, &a.to, json)
}

/// Prints the report of an export (a restore whose commit phase wrote the
/// safetensors file), its totals counting that phase.
pub fn print_export(
    mut report: Report,
    summary: &ExportSummary,
    to: &Path,
    json: bool,
) -> Result<()> {
    report.op = "export".into();
    let p = &report.phases;
    report.seconds = p.plan + p.allocate + p.transfer + p.verify + p.commit;
    report.gib_per_s = memferry::units::gib_per_s(report.bytes, report.seconds);
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["export"] = serde_json::to_value(summary)?;
        v["to"] = to.display().to_string().into();
        println!("{v}");
    } else {
        print_report(&report, false);
        println!(
            "wrote {} tensors ({}) to {}",
            summary.tensors,
            format_bytes(summary.file_bytes),
            to.display()
        );
    }
    Ok(())
}

fn gc(a: GcArgs, json: bool) -> Result<()> {
    let report = snapshot::gc(&a.snapshot, a.roots.as_deref().unwrap_or(&[]))
        .with_context(|| format!("collecting leftovers of {}", a.snapshot.display()))?;
    print_gc(&report, json)
}

/// Prints a gc report as JSON or as one line per item and a total.
pub fn print_gc(report: &snapshot::GcReport, json: bool) -> Result<()> {
    if json {
        let mut v = serde_json::to_value(report)?;
        v["op"] = "gc".into();
        println!("{v}");
    } else {
        for r in &report.removed {
            println!("removed {}", r.display());
        }
        for k in &report.kept {
            println!("kept {k}");
        }
        println!(
            "gc: removed {} leftover(s), kept {}",
            report.removed.len(),
            report.kept.len()
        );
    }
    Ok(())
}

fn inspect(a: InspectArgs, json: bool) -> Result<()> {
    let snap = snapshot::OpenedSnapshot::open(&a.snapshot, None)
        .with_context(|| format!("inspecting {}", a.snapshot.display()))?;
    let roots: Vec<String> = snap.roots.iter().map(|r| r.display().to_string()).collect();
    print_inspect(
        &snap.dir.display().to_string(),
        &snap.manifest,
        &roots,
        a.allocations,
        json,
    )
}

/// Prints what a snapshot holds; `roots[i]` is where root `i` resolves.
pub fn print_inspect(
    location: &str,
    m: &Manifest,
    roots: &[String],
    allocations: bool,
    json: bool,
) -> Result<()> {
    let per_root: Vec<(usize, u64)> = (0..m.roots.len())
        .map(|r| {
            let shards = m.shards.iter().filter(|s| s.root == r);
            (shards.clone().count(), shards.map(|s| s.size).sum())
        })
        .collect();
    if json {
        let mut v = serde_json::json!({
            "op": "inspect",
            "snapshot": location,
            "format_version": m.format_version,
            "identity": m.identity,
            "created_unix_ms": m.created_unix_ms,
            "source": m.source,
            "total_bytes": m.total_bytes,
            "allocations": m.allocations.len(),
            "metadata_entries": m.metadata.len(),
            "shards": m.shards.len(),
            "checksum": m.checksum,
            "roots": m.roots.iter().zip(&per_root).map(|(r, (n, b))| serde_json::json!({
                "index": r.index, "recorded_path": r.recorded_path,
                "resolved_path": roots[r.index],
                "shards": n, "bytes": b,
            })).collect::<Vec<_>>(),
        });
        if allocations {
            v["allocation_list"] = serde_json::to_value(
                m.allocations
                    .iter()
                    .map(|x| &x.allocation)
                    .collect::<Vec<_>>(),
            )?;
        }
        println!("{v}");
        return Ok(());
    }
    println!("snapshot   {location}");
    println!("format     v{} ({})", m.format_version, m.kind);
    println!(
        "save       {} (lineage {})",
        m.identity.save_id, m.identity.lineage
    );
    println!("source     {}", m.source);
    println!(
        "bytes      {} ({})",
        m.total_bytes,
        format_bytes(m.total_bytes)
    );
    println!(
        "layout     {} allocations, {} metadata entries",
        m.allocations.len(),
        m.metadata.len()
    );
    println!(
        "checksums  {} per {}",
        m.checksum.algorithm,
        format_bytes(m.checksum.chunk_bytes)
    );
    for (r, (n, b)) in m.roots.iter().zip(&per_root) {
        println!(
            "root {}     {} shard(s), {} at {}",
            r.index,
            n,
            format_bytes(*b),
            roots[r.index]
        );
    }
    if allocations {
        println!("{:>8} {:>14} {:>8} tag", "id", "bytes", "device");
        for x in &m.allocations {
            let al = &x.allocation;
            println!(
                "{:>8} {:>14} {:>8} {}",
                al.id,
                al.size,
                al.device.to_string(),
                al.tag
            );
        }
    }
    Ok(())
}
