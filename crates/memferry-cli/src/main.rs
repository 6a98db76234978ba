//! The `memferry` command: a thin layer over the library.
//!
//! Exit codes: 0 success, 1 failure, 2 bad input (usage, arguments,
//! unreadable manifest, no snapshot), 3 integrity failure (checksum
//! mismatch, truncated or missing shard).

mod args;
mod commands;
mod progress;
mod quickstart;

use std::process::ExitCode;

use clap::Parser;
use memferry::Error;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEMFERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let json = cli.json;
    let op = commands::op_name(&cli.command);
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            eprintln!("error: {e:#}");
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "op": op, "ok": false, "error": format!("{e:#}") })
                );
            }
            ExitCode::from(code)
        }
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<Error>() {
        Some(
            Error::ChecksumMismatch { .. } | Error::Truncated { .. } | Error::MissingShard { .. },
        ) => 3,
        Some(
            Error::InvalidInput(_)
            | Error::InvalidManifest { .. }
            | Error::UnsupportedFormat { .. }
            | Error::NoSnapshot { .. }
            | Error::Unsupported(_),
        ) => 2,
        _ => 1,
    }
}
