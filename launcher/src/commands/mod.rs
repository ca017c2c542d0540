//! The launcher's subcommands besides launching: `check-config` (resolve a train.json
//! without launching), `estimate-memory`, `bench-rendezvous`, and the worker's tools
//! (`tokenizer`, `consolidate`, `generate`, `merge-lora`, `convert`) forwarded to the worker binary.
//! Each returns the process exit code; `main.rs` only dispatches.

pub mod bench_rendezvous;
pub mod estimate_memory;

use anyhow::Context;
use clap::Parser;

use estimate_memory::{EstimateArgs, estimate_memory_cli};

/// `rsdeep tokenizer|consolidate|generate|merge-lora|convert ...`: tools that need libtorch or
/// the tokenizer run in the worker binary; the launcher forwards the arguments and
/// returns its exit code.
pub fn worker_tool(tool: &str, args: &[String]) -> anyhow::Result<i32> {
    let program = crate::supervise::attempt::worker_program()?;
    let status = std::process::Command::new(&program)
        .arg(tool)
        .args(args)
        .status()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(status.code().unwrap_or(1))
}
const CHECK_CONFIG_USAGE: &str = "usage: rsdeep check-config [--num_gpus N | --device cpu --num_procs N] [--num_nodes M] [--strict] train.json [--key value ...]
Resolves train.json (and its DeepSpeed config) for the world size as a launch would, prints the
resolved JSON, every warning and the batch summary; a config error names the file and key.
--strict makes unknown DeepSpeed keys errors (as strict_config true in train.json does).";

/// `rsdeep check-config [world flags] [--strict] train.json [--key value ...]`: world size
/// = nodes x ranks per node (the launcher's flags, before or after the file); the rest are
/// overrides.
pub fn check_config(args: &[String]) -> anyhow::Result<i32> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{CHECK_CONFIG_USAGE}");
        return Ok(0);
    }
    let (world_size, rest) = split_world_flags(args)?;
    let mut rest = rest.into_iter().peekable();
    let mut overrides = Vec::new();
    let mut path = None;
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--strict" => overrides.extend(["--strict_config".to_string(), "true".to_string()]),
            // The device does not change how train.json resolves.
            "--device" if path.is_none() => {
                rest.next();
            }
            flag if path.is_none() && flag.starts_with("--device=") => {}
            _ if path.is_none() => path = Some(arg),
            _ => overrides.push(arg),
        }
    }
    let Some(path) = path else {
        anyhow::bail!("{CHECK_CONFIG_USAGE}");
    };
    let config =
        rsdeep_contract::config::load(std::path::Path::new(&path), &overrides, world_size)?;
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
        assert!(super::split_world_flags(&["--num_procs".to_string(), "x".to_string()]).is_err());
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
    let argv = std::iter::once("rsdeep estimate-memory".to_string()).chain(args.iter().cloned());
    let command = EstimateCommand::parse_from(argv);
    println!("{}", estimate_memory_cli(command.args)?);
    Ok(0)
}
