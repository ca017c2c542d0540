//! `rsdeep`: the launcher binary. `rsdeep [launcher flags] train.json [--key value ...]`
//! plans the job (`rsdeep::plan`), hosts the rendezvous on node 0 (`rsdeep::rendezvous`),
//! spawns and supervises the local workers (`rsdeep::supervisor`). Subcommands:
//! `check-config`, `estimate-memory`, `bench-rendezvous`. Exit codes: 0 success, 2 usage,
//! plan or config error, 1 launcher failure, otherwise the first failed worker's code
//! (128 + signal for a signal) or 128 + the signal that stopped the launcher.

mod bench;
mod launch;

use std::time::Instant;

use clap::Parser;
use rsdeep::cli::LaunchArgs;

/// Exit code of a usage, plan or configuration error.
const EXIT_USAGE: i32 = 2;

fn main() {
    let started = Instant::now();
    init_tracing();
    let argv: Vec<String> = std::env::args().collect();
    let code = match argv.get(1).map(String::as_str) {
        Some("bench-rendezvous") => report(bench::run(&argv[2..])),
        Some("check-config") => report(subcommands::check_config(&argv[2..])),
        Some("estimate-memory") => report(subcommands::estimate_memory(&argv[2..])),
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
    let filter = tracing_subscriber::EnvFilter::try_from_env("RSDEEP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Wiring of the train.json subcommands written in `rsdeep::config` and `rsdeep::memory`.
mod subcommands {
    use clap::Parser;
    use rsdeep::memory::{EstimateArgs, estimate_memory_cli};

    /// `rsdeep check-config train.json [--num_gpus N | --num_procs N] [--key value ...]`
    pub fn check_config(_args: &[String]) -> anyhow::Result<i32> {
        anyhow::bail!(
            "`rsdeep check-config` is not wired yet: rsdeep::config::check_config_cli does not exist yet"
        )
    }

    #[derive(Debug, Parser)]
    #[command(name = "rsdeep estimate-memory")]
    struct EstimateCommand {
        #[command(flatten)]
        args: EstimateArgs,
    }

    /// `rsdeep estimate-memory --model config.json [--num_gpus N ...]`
    pub fn estimate_memory(args: &[String]) -> anyhow::Result<i32> {
        let argv =
            std::iter::once("rsdeep estimate-memory".to_string()).chain(args.iter().cloned());
        let command = EstimateCommand::parse_from(argv);
        println!("{}", estimate_memory_cli(command.args)?);
        Ok(0)
    }
}
