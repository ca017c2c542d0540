//! `rsdeep`: the launcher binary. `rsdeep [launcher flags] train.json [--key value ...]`
//! plans the job (`rsdeep::plan`), hosts the rendezvous on node 0 (`rsdeep::rendezvous`),
//! spawns and supervises the local workers (`rsdeep::supervisor`). Subcommands:
//! `check-config`, `estimate-memory`, `bench-rendezvous`. Exit codes: 0 success, 2 usage,
//! plan or config error, 1 launcher failure, otherwise the first failed worker's code
//! (128 + signal for a signal) or 128 + the signal that stopped the launcher.

mod attempt;
mod bench;
mod coordinated;
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
        Some(tool @ ("tokenizer" | "consolidate" | "generate" | "merge-lora")) => {
            report(subcommands::worker_tool(tool, &argv[2..]))
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

/// Wiring of the train.json subcommands over `rsdeep_contract::config` and `rsdeep::memory`.
mod subcommands {
    use anyhow::Context;
    use clap::Parser;

    /// `rsdeep tokenizer|consolidate|generate|merge-lora ...`: tools that need libtorch or
    /// the tokenizer run in the worker binary; the launcher forwards the arguments and
    /// returns its exit code.
    pub fn worker_tool(tool: &str, args: &[String]) -> anyhow::Result<i32> {
        let program = crate::attempt::worker_program()?;
        let status = std::process::Command::new(&program)
            .arg(tool)
            .args(args)
            .status()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(status.code().unwrap_or(1))
    }
    use rsdeep::memory::{EstimateArgs, estimate_memory_cli};

    /// `rsdeep check-config train.json [--num_gpus N | --num_procs N] [--num_nodes M]
    /// [--key value ...]`: world size = nodes x ranks per node; the rest are overrides.
    pub fn check_config(args: &[String]) -> anyhow::Result<i32> {
        let Some((path, rest)) = args.split_first() else {
            anyhow::bail!(
                "usage: rsdeep check-config train.json [--num_gpus N | --num_procs N] [--num_nodes M] [--key value ...]"
            );
        };
        let (world_size, overrides) = split_world_flags(rest)?;
        let config =
            rsdeep_contract::config::load(std::path::Path::new(path), &overrides, world_size)?;
        println!("{}", config.to_pretty_json());
        for warning in &config.warnings {
            println!("warning: {warning}");
        }
        println!("{}", config.summary());
        Ok(0)
    }

    /// Takes `--num_gpus/--num_procs/--num_nodes` (also `--flag=N`) out of `args`.
    fn split_world_flags(args: &[String]) -> anyhow::Result<(usize, Vec<String>)> {
        let (mut per_node, mut nodes, mut rest) = (1usize, 1usize, Vec::new());
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (arg.as_str(), None),
            };
            if !matches!(flag, "--num_gpus" | "--num_procs" | "--num_nodes") {
                rest.push(arg.clone());
                continue;
            }
            let value = inline.or_else(|| iter.next().cloned()).unwrap_or_default();
            let n: usize = value
                .parse()
                .map_err(|_| anyhow::anyhow!("{flag} needs a positive integer, got {value:?}"))?;
            anyhow::ensure!(n > 0, "{flag} must be at least 1");
            if flag == "--num_nodes" {
                nodes = n
            } else {
                per_node = n
            }
        }
        Ok((per_node * nodes, rest))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn world_flags_are_taken_out_of_the_overrides() {
            let args: Vec<String> = [
                "--num_gpus",
                "4",
                "--learning_rate",
                "1e-4",
                "--num_nodes=2",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let (world, rest) = super::split_world_flags(&args).unwrap();
            assert_eq!(world, 8);
            assert_eq!(rest, ["--learning_rate", "1e-4"]);
            assert!(
                super::split_world_flags(&["--num_procs".to_string(), "x".to_string()]).is_err()
            );
        }
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
