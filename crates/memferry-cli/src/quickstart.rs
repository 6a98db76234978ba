//! `memferry quickstart`: the first thing to run. Builds a synthetic model
//! in memory, saves it, restores it with every backend (comparing every
//! byte with the original), verifies it, prints a table and cleans up.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use memferry::memory::host_bytes;
use memferry::snapshot::source::synthetic;
use memferry::snapshot::{self, LoadOptions, Report, SaveOptions};
use memferry::transfer::BackendKind;
use memferry::units::format_bytes;

use crate::args::QuickstartArgs;

struct Row {
    step: &'static str,
    report: Report,
    matches: Option<bool>,
}

/// Removes the working directory on every exit path unless kept.
struct Workdir {
    path: PathBuf,
    keep: bool,
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub fn run(a: QuickstartArgs, json: bool) -> Result<()> {
    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let work = Workdir {
        path: base.join(format!(
            "memferry-quickstart-{}",
            memferry::storage::durable::unique_id()
        )),
        keep: a.keep,
    };
    std::fs::create_dir(&work.path).with_context(|| format!("creating {}", work.path.display()))?;
    let snap = work.path.join("model.snapshot");
    let say = |s: String| {
        if !json {
            eprintln!("{s}");
        }
    };

    say(format!(
        "building a {} synthetic model in memory...",
        format_bytes(a.size)
    ));
    let model = synthetic(a.size, 42)?;
    let source = model.into_source();
    let mut rows = Vec::new();

    say(format!("saving to {}...", snap.display()));
    let save = snapshot::save(
        &source,
        &snap,
        &SaveOptions {
            shard_size: a.shard_size,
            backend: a.transfer.backend,
            tuning: a.transfer.tuning(),
            roots: a.transfer.roots.clone(),
            ..SaveOptions::default()
        },
    )?;
    rows.push(Row {
        step: "save",
        report: save,
        matches: None,
    });

    for kind in BackendKind::CONCRETE {
        say(format!("restoring with {kind}..."));
        let opts = LoadOptions {
            backend: kind,
            tuning: a.transfer.tuning(),
            roots: None,
            ..LoadOptions::default()
        };
        let (restored, report) = snapshot::restore(&snap, &opts)?;
        let same = source
            .regions
            .iter()
            .zip(&restored.regions)
            // SAFETY: nothing writes the source or restored regions now.
            .all(|(src, got)| unsafe { host_bytes(src.as_ref()) } == got.host().map(|h| h.as_slice()));
        if !same {
            bail!("restored bytes differ from the original with backend {kind}");
        }
        rows.push(Row {
            step: "restore",
            report,
            matches: Some(same),
        });
    }

    say("verifying every checksum...".into());
    let verify = snapshot::verify(
        &snap,
        &LoadOptions {
            backend: a.transfer.backend,
            tuning: a.transfer.tuning(),
            ..LoadOptions::default()
        },
    )?;
    rows.push(Row {
        step: "verify",
        report: verify,
        matches: None,
    });

    if json {
        let v = serde_json::json!({
            "op": "quickstart",
            "ok": true,
            "bytes": a.size,
            "snapshot": snap.display().to_string(),
            "kept": a.keep,
            "rows": rows.iter().map(|r| serde_json::json!({
                "step": r.step, "bytes_match": r.matches, "report": r.report,
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        println!(
            "{:<8} {:<9} {:<18} {:>9} {:>9} {:>9} {:<9} fallbacks",
            "step", "backend", "mode", "GiB/s", "xfer GiB/s", "seconds", "verified"
        );
        for r in &rows {
            let rep = &r.report;
            let verified = match r.matches {
                Some(true) => "yes+bytes",
                _ if rep.verified => "yes",
                _ => "no",
            };
            println!(
                "{:<8} {:<9} {:<18} {:>9.2} {:>10.2} {:>9.3} {:<9} {}",
                r.step,
                rep.backend,
                rep.mode,
                rep.gib_per_s,
                rep.transfer_gib_per_s,
                rep.seconds,
                verified,
                if rep.fallbacks.is_empty() {
                    "none".to_string()
                } else {
                    rep.fallbacks.join("; ")
                }
            );
        }
        if a.keep {
            println!("snapshot kept at {}", snap.display());
        } else {
            println!(
                "all {} restored byte-for-byte with every backend; cleaned up {}",
                format_bytes(a.size),
                work.path.display()
            );
        }
    }
    Ok(())
}
