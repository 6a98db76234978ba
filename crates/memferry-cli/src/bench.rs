//! `memferry bench`: runs the library's sweep, prints the table (or one JSON
//! object), draws the chart and saves the profile.

use anyhow::{Context, Result};
use memferry::bench::{
    self, BenchOptions, BenchReport, Limit, Profile, ProfileEntry, Temperature, device_key,
    profile_path,
};
use memferry::units::format_bytes;

use crate::args::BenchArgs;

pub fn run(a: BenchArgs, s3: &crate::args::S3Args, json: bool) -> Result<()> {
    if let Some(loc) = &a.location {
        return run_object(&a, loc, s3, json);
    }
    if let Some(snap) = &a.limits_on {
        let limits = bench::limits_of_snapshot(snap, a.runs)
            .with_context(|| format!("measuring limits on {}", snap.display()))?;
        if json {
            println!(
                "{}",
                serde_json::json!({ "op": "bench-limits", "snapshot": snap.display().to_string(), "runs": a.runs, "limits": limits })
            );
        } else {
            for l in [
                &limits.odirect_read,
                &limits.odirect_write,
                &limits.pread_direct,
                &limits.buffered_read,
                &limits.memcpy,
            ] {
                println!("{}", limit_line(l));
            }
        }
        return Ok(());
    }
    let roots = a
        .roots
        .clone()
        .unwrap_or_else(|| vec![std::env::temp_dir()]);
    let opts = BenchOptions {
        size: a.size,
        roots: roots.clone(),
        backends: a.backends.clone(),
        temperature: match (a.cold, a.warm) {
            (true, false) => Temperature::Cold,
            (false, true) => Temperature::Warm,
            _ => Temperature::Both,
        },
        runs: a.runs,
        workers: a.workers.clone(),
        queue_depths: a.queue_depth.clone(),
        chunk_sizes: a.chunk_size.clone(),
        shard_size: a.shard_size,
        device: a.device,
    };
    let mut say = |s: &str| {
        if !json {
            eprintln!("bench: {s}");
        }
    };
    let report = bench::run(&opts, &mut say).context("running the bench")?;

    let mut saved = None;
    if a.save_profile {
        saved = Some(save_profile(&report, &roots)?);
    }
    if let Some(p) = &a.plot {
        bench::plot::write_svg(&report, p)
            .with_context(|| format!("writing the chart to {}", p.display()))?;
    }
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["plot"] = a.plot.as_ref().map(|p| p.display().to_string()).into();
        v["profile"] = saved.clone().into();
        println!("{v}");
        return Ok(());
    }
    print_table(&report);
    if let Some(p) = &a.plot {
        println!("chart written to {}", p.display());
    }
    if let Some(s) = saved {
        println!("profile saved: {s}");
    }
    Ok(())
}

fn save_profile(report: &BenchReport, roots: &[std::path::PathBuf]) -> Result<String> {
    let path = profile_path()
        .context("no place for the profile: set MEMFERRY_PROFILE, XDG_CONFIG_HOME or HOME")?;
    let Some(best) = report
        .rows
        .iter()
        .filter(|r| r.op == "restore" && r.best)
        .min_by_key(|r| if r.temperature == "cold" { 0 } else { 1 })
    else {
        anyhow::bail!("no restore was measured, so there is no best setting to save");
    };
    let mut profile = Profile::load(&path)?.unwrap_or_default();
    let devices = device_key(roots);
    profile.upsert(ProfileEntry {
        devices: devices.clone(),
        roots: report.roots.clone(),
        setting: best.setting.clone(),
        restore_gib_per_s: best.result.as_ref().map_or(0.0, |m| m.median),
        percent_of_limit: best.percent_of_limit,
        measured_as: best.temperature.clone(),
        measured_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    });
    profile.save(&path)?;
    Ok(format!(
        "{} (devices {}: {})",
        path.display(),
        devices.join(","),
        best.label
    ))
}

fn limit_line(l: &Limit) -> String {
    match (&l.result, &l.unavailable) {
        (Some(m), _) => format!("  {:<48} {} GiB/s", l.name, m.display()),
        (None, Some(why)) => format!("  {:<48} unavailable: {why}", l.name),
        (None, None) => format!("  {:<48} unavailable", l.name),
    }
}

fn print_table(r: &BenchReport) {
    println!(
        "memferry bench: {} on {}; median of {} runs (± = (max-min)/median, noisy past 10%)",
        format_bytes(r.size),
        r.roots.join(","),
        r.runs
    );
    if let Some(note) = &r.cold_note {
        println!("cold rows: {note}");
    }
    println!("limits measured on the same files:");
    let l = &r.limits;
    for lim in [
        &l.odirect_read,
        &l.odirect_write,
        &l.pread_direct,
        &l.buffered_read,
        &l.memcpy,
    ]
    .into_iter()
    .chain(l.pinned_h2d.as_ref())
    .chain(l.pinned_d2h.as_ref())
    {
        println!("{}", limit_line(lim));
    }
    println!();
    println!(
        "  {:<8} {:<5} {:<28} {:>18} {:>9}  {:<18} fallbacks",
        "op", "temp", "setting", "GiB/s", "% limit", "mode"
    );
    for row in &r.rows {
        let value = match (&row.result, &row.unavailable) {
            (Some(m), _) => m.display(),
            (None, Some(why)) => format!("unavailable ({why})"),
            (None, None) => "unavailable".into(),
        };
        println!(
            "{} {:<8} {:<5} {:<28} {:>18} {:>9}  {:<18} {}",
            if row.best { "*" } else { " " },
            row.op,
            row.temperature,
            row.label,
            value,
            row.percent_of_limit
                .map_or("-".into(), |p| format!("{p:.0}%")),
            row.mode,
            if row.fallbacks.is_empty() {
                "none".into()
            } else {
                row.fallbacks.join("; ")
            }
        );
    }
    if let Some(best) = &r.best_restore {
        println!("\n* best per group; best restore setting: {}", best.label());
    }
    println!("took {:.1} s", r.seconds);
}

/// `bench --location s3://...`: save/restore against raw GET/PUT loops.
fn run_object(
    a: &BenchArgs,
    loc: &std::path::Path,
    s3: &crate::args::S3Args,
    json: bool,
) -> Result<()> {
    use memferry::bench::object::{ObjectBenchOptions, run};
    use memferry::storage::location::Location;
    let Location::S3(url) = Location::parse(loc)? else {
        return Err(memferry::Error::InvalidInput(format!(
            "--location {} is not an s3://bucket/prefix; for local disks use --roots",
            loc.display()
        ))
        .into());
    };
    let client = memferry::storage::s3::ObjectClient::new(&s3.config()?, &url.bucket)?;
    let opts = ObjectBenchOptions {
        size: a.size,
        runs: a.runs,
        shard_size: a.shard_size,
        chunk_size: a.chunk_size.iter().copied().max().unwrap_or(8 << 20),
    };
    let mut say = |s: &str| {
        if !json {
            eprintln!("bench: {s}");
        }
    };
    let r = run(&client, &url, &opts, &mut say).with_context(|| format!("bench on {url}"))?;
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["op"] = "bench".into();
        println!("{v}");
        return Ok(());
    }
    println!(
        "memferry bench: {} at {} ({}); median of {} runs, {} requests in flight",
        format_bytes(r.size),
        r.location,
        r.server,
        r.runs,
        r.concurrency
    );
    println!("  {:<40} {:>18} {:>9}", "what", "GiB/s", "% limit");
    println!(
        "  {:<40} {:>18}",
        "raw ranged GETs (8 MiB)",
        r.get_limit.display()
    );
    println!(
        "  {:<40} {:>18}",
        "raw PUTs (8 MiB objects)",
        r.put_limit.display()
    );
    println!(
        "  {:<40} {:>18} {:>8.0}%",
        "memferry restore (verified)",
        r.restore.display(),
        r.restore_percent_of_limit
    );
    println!(
        "  {:<40} {:>18} {:>8.0}%",
        "memferry save (committed)",
        r.save.display(),
        r.save_percent_of_limit
    );
    println!("took {:.1} s", r.seconds);
    Ok(())
}
