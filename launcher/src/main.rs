//! `rsdeep`: the launcher binary; it only dispatches. `rsdeep [launcher flags] train.json
//! [--key value ...]` launches (`rsdeep::launch`); subcommands are `rsdeep::commands`.
//! Exit codes: 0 success, 2 usage, plan or config error, 1 launcher failure, otherwise the
//! first failed worker's code (128 + signal for a signal) or 128 + the signal that stopped
//! the launcher.

use std::time::Instant;

use clap::Parser;
use rsdeep::plan::cli::LaunchArgs;
use rsdeep::{commands, launch};

/// Exit code of a usage, plan or configuration error.
const EXIT_USAGE: i32 = 2;

fn main() {
    let started = Instant::now();
    init_tracing();
    let argv: Vec<String> = std::env::args().collect();
    let code = match argv.get(1).map(String::as_str) {
        Some("bench-rendezvous") => report(commands::bench_rendezvous::run(&argv[2..])),
        Some("check-config") => report(commands::check_config(&argv[2..])),
        Some("estimate-memory") => report(commands::estimate_memory(&argv[2..])),
        Some(tool @ ("tokenizer" | "consolidate" | "generate" | "merge-lora" | "convert")) => {
            report(commands::worker_tool(tool, &argv[2..]))
        }
        _ => report(launch::run(LaunchArgs::parse_from(&argv), started)),
    };
    std::process::exit(code);
}

/// Prints an error chain and maps it to an exit code.
fn report(result: anyhow::Result<i32>) -> i32 {
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("rsdeep: error: {err:#}");
            if err.downcast_ref::<launch::UsageError>().is_some() {
                EXIT_USAGE
            } else {
                1
            }
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(rsdeep_contract::env::LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
