//! The `memferry` command: a thin layer over the library.
//!
//! Exit codes: 0 success, 1 failure, 2 bad input (usage, arguments,
//! unreadable manifest, no snapshot), 3 integrity failure (checksum
//! mismatch, truncated or missing shard).

mod args;
mod bench;
mod commands;
mod kv;
mod progress;
mod quickstart;
mod remote;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use memferry::Error;

fn main() -> ExitCode {
    let parsed = args::Cli::command()
        .try_get_matches()
        .and_then(|m| args::Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(p) => p,
        Err(e) => return usage_error(e),
    };
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
    let sub = matches
        .subcommand()
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    match commands::run(cli, &sub) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(r) = e.downcast_ref::<AlreadyReported>() {
                eprintln!("error: {r}");
                return ExitCode::from(r.code);
            }
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

/// Reports an argument error; with `--json` (or MEMFERRY_JSON) also as one
/// JSON object on stdout, so scripts always get an object.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
        || matches!(
            e.kind(),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        )
    {
        e.exit();
    }
    let json_env = std::env::var("MEMFERRY_JSON")
        .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"));
    if json_env || std::env::args().any(|a| a == "--json") {
        let text = e.to_string();
        let message = text.trim().trim_start_matches("error: ");
        let message = message.split("\n\n").next().unwrap_or(message);
        let op = std::env::args()
            .skip(1)
            .find(|a| {
                [
                    "save",
                    "restore",
                    "verify",
                    "inspect",
                    "export",
                    "gc",
                    "quickstart",
                    "copy",
                    "bench",
                    "kv",
                ]
                .contains(&a.as_str())
            })
            .unwrap_or_else(|| "usage".into());
        println!(
            "{}",
            serde_json::json!({ "op": op, "ok": false, "error": message })
        );
        eprint!("{}", e.render());
        return ExitCode::from(2);
    }
    e.exit();
}

/// A failure whose report (text or the one JSON object) the command has
/// already printed; `main` only sets the exit code.
#[derive(Debug)]
pub struct AlreadyReported {
    /// Exit code.
    pub code: u8,
    /// One line for stderr.
    pub message: String,
}

impl std::fmt::Display for AlreadyReported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AlreadyReported {}

fn exit_code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<Error>().map_or(1, library_exit_code)
}

fn library_exit_code(e: &Error) -> u8 {
    match e {
        Error::ChecksumMismatch { .. } | Error::Truncated { .. } | Error::MissingShard { .. } => 3,
        Error::InvalidInput(_)
        | Error::InvalidManifest { .. }
        | Error::UnsupportedFormat { .. }
        | Error::NoSnapshot { .. }
        | Error::Unsupported(_) => 2,
        // A save or gc refused over a manifest that does not load: as bad
        // as the manifest's own problem.
        Error::UnreadableManifest { cause, .. } => library_exit_code(cause),
        // Object-store failures (after retries), lost conditional commits
        // and a publish that is not durable are failures (1): the input
        // was fine, try again.
        _ => 1,
    }
}
