//! Elastic continuation of a multi-node job (ssh runner or SLURM), the pure part: the policy resolved from
//! `--min_nodes` / `--max_nodes` / `--node_return_timeout` (or DeepSpeed's
//! `--elastic_training --min_elastic_nodes N --max_elastic_nodes M`), which hosts the next
//! attempt runs on once the launcher knows which ones answer, and the hostfile and flags
//! of that smaller (or regrown) world. The launcher (`launch/`) probes the hosts, re-plans
//! with what this module returns and restarts the job; the workers reshard the newest
//! checkpoint to the new world size.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::plan::cli::LaunchArgs;
use crate::plan::hostfile::HostEntry;

/// How an elastic job may change its set of nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct ElasticPolicy {
    /// Fewest nodes the job continues on.
    pub min_nodes: usize,
    /// Most nodes an attempt runs on.
    pub max_nodes: usize,
    /// How long a failed node has to answer ssh again before the job goes on without it.
    pub return_timeout: Duration,
}

/// Why elastic flags were refused, or why an elastic job cannot continue.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ElasticError {
    #[error(
        "--min_nodes {0} needs --max_restarts 1 or more: an elastic job continues on fewer nodes by restarting"
    )]
    NoRestarts(usize),
    #[error("--min_nodes {min} is more than the {nodes} node(s) the job starts with")]
    MoreThanStarted { min: usize, nodes: usize },
    #[error(
        "--min_nodes and --max_nodes must be at least 1 and --max_nodes at least --min_nodes (got {min} and {max})"
    )]
    BadRange { min: usize, max: usize },
    #[error("--node_return_timeout {0} must be a number of seconds, 0 or more")]
    BadTimeout(f64),
    #[error(
        "elastic continuation (--min_nodes, --elastic_training) needs a runner that restarts every node: the ssh runner (a hostfile with several hosts, without --no_ssh) or --launcher slurm with several nodes"
    )]
    NoRunnerToRegroup,
    #[error(
        "only {alive} node(s) answer ({lost} did not within the return timeout), fewer than --min_nodes {min}: the job cannot continue; its checkpoints are kept for a resume"
    )]
    BelowMinimum {
        alive: usize,
        min: usize,
        lost: String,
    },
}

impl ElasticPolicy {
    /// The policy of a job that starts on `nodes` nodes, or `None` when no elastic flag
    /// is given. DeepSpeed's `--min_elastic_nodes` / `--max_elastic_nodes` (-1 or absent:
    /// 1 and every node) apply with `--elastic_training` or when given on their own.
    pub fn from_args(args: &LaunchArgs, nodes: usize) -> Result<Option<Self>, ElasticError> {
        let deepspeed = args.elastic_training
            || args.min_elastic_nodes.is_some()
            || args.max_elastic_nodes.is_some();
        if args.min_nodes.is_none() && args.max_nodes.is_none() && !deepspeed {
            return Ok(None);
        }
        let positive = |n: Option<i64>| n.filter(|n| *n > 0).map(|n| n as usize);
        let min = args
            .min_nodes
            .or(positive(args.min_elastic_nodes))
            .unwrap_or(1);
        let max = args
            .max_nodes
            .or(positive(args.max_elastic_nodes))
            .unwrap_or(nodes);
        if min > nodes {
            return Err(ElasticError::MoreThanStarted { min, nodes });
        }
        if min == 0 || max < min {
            return Err(ElasticError::BadRange { min, max });
        }
        if args.max_restarts == 0 {
            return Err(ElasticError::NoRestarts(min));
        }
        let timeout = args.node_return_timeout;
        if !(timeout.is_finite() && timeout >= 0.0) {
            return Err(ElasticError::BadTimeout(timeout));
        }
        Ok(Some(ElasticPolicy {
            min_nodes: min,
            max_nodes: max,
            return_timeout: Duration::from_secs_f64(timeout),
        }))
    }

    /// The hosts of the next attempt: `selected` is every host the job was started with,
    /// node 0's first (it is this machine and always stays); the others that `answer` are
    /// kept in that order, up to `max_nodes`.
    pub fn next_hosts(
        &self,
        selected: &[String],
        answer: &BTreeSet<String>,
    ) -> Result<Vec<String>, ElasticError> {
        let Some((node0, others)) = selected.split_first() else {
            return Ok(Vec::new());
        };
        let mut hosts = vec![node0.clone()];
        hosts.extend(
            others
                .iter()
                .filter(|h| answer.contains(*h))
                .take(self.max_nodes.saturating_sub(1))
                .cloned(),
        );
        if hosts.len() < self.min_nodes {
            let lost: Vec<&str> = others
                .iter()
                .filter(|h| !answer.contains(*h))
                .map(String::as_str)
                .collect();
            return Err(ElasticError::BelowMinimum {
                alive: hosts.len(),
                min: self.min_nodes,
                lost: lost.join(", "),
            });
        }
        Ok(hosts)
    }
}

/// The hostfile of a world on `hosts`: the entries of `hostfile` naming them, in order.
pub fn hostfile_of(hostfile: &[HostEntry], hosts: &[String]) -> Vec<HostEntry> {
    hostfile
        .iter()
        .filter(|e| hosts.contains(&e.host))
        .cloned()
        .collect()
}

/// The launcher flags of a world on `hosts` only: `--include` / `--exclude` entries of
/// other hosts dropped (their slot choices for the kept hosts stay), `--num_nodes` unset
/// (the hostfile now names exactly the kept hosts), and the rendezvous address and port
/// the job already uses.
pub fn args_for_hosts(
    args: &LaunchArgs,
    hosts: &[String],
    master_addr: &str,
    master_port: u16,
) -> LaunchArgs {
    let keep = |spec: &str| -> String {
        spec.split('@')
            .filter(|entry| {
                let host = entry.split(':').next().unwrap_or_default();
                hosts.iter().any(|h| h == host)
            })
            .collect::<Vec<_>>()
            .join("@")
    };
    let mut out = args.clone();
    out.include = keep(&args.include);
    out.exclude = keep(&args.exclude);
    out.num_nodes = None;
    out.master_addr = master_addr.to_string();
    out.master_port = master_port;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(argv: &[&str]) -> LaunchArgs {
        LaunchArgs::parse_from([&["rsdeep"][..], argv, &["t.json"]].concat())
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_resolve_to_a_policy_and_bad_ones_say_why() {
        assert_eq!(ElasticPolicy::from_args(&args(&[]), 2), Ok(None));
        let policy = ElasticPolicy::from_args(
            &args(&[
                "--min_nodes",
                "1",
                "--max_restarts",
                "2",
                "--node_return_timeout",
                "3",
            ]),
            2,
        );
        assert_eq!(
            policy,
            Ok(Some(ElasticPolicy {
                min_nodes: 1,
                max_nodes: 2,
                return_timeout: Duration::from_secs(3)
            }))
        );
        let deepspeed = ElasticPolicy::from_args(
            &args(&[
                "--elastic_training",
                "--max_elastic_nodes",
                "-1",
                "--max_restarts",
                "1",
            ]),
            4,
        );
        assert_eq!(
            deepspeed.map(|p| p.map(|p| (p.min_nodes, p.max_nodes))),
            Ok(Some((1, 4)))
        );
        assert_eq!(
            ElasticPolicy::from_args(&args(&["--min_nodes", "1"]), 2),
            Err(ElasticError::NoRestarts(1))
        );
        assert_eq!(
            ElasticPolicy::from_args(&args(&["--min_nodes", "3", "--max_restarts", "1"]), 2),
            Err(ElasticError::MoreThanStarted { min: 3, nodes: 2 })
        );
        let inverted = [
            "--min_nodes",
            "2",
            "--max_nodes",
            "1",
            "--max_restarts",
            "1",
        ];
        assert_eq!(
            ElasticPolicy::from_args(&args(&inverted), 2),
            Err(ElasticError::BadRange { min: 2, max: 1 })
        );
    }

    #[test]
    fn node_0_stays_answering_hosts_follow_in_order_up_to_the_maximum() {
        let policy = ElasticPolicy {
            min_nodes: 2,
            max_nodes: 3,
            return_timeout: Duration::ZERO,
        };
        let selected = names(&["n0", "n1", "n2", "n3"]);
        let answer: BTreeSet<String> = names(&["n3", "n1", "n2"]).into_iter().collect();
        assert_eq!(
            policy.next_hosts(&selected, &answer),
            Ok(names(&["n0", "n1", "n2"]))
        );
        let answer: BTreeSet<String> = names(&["n2"]).into_iter().collect();
        assert_eq!(
            policy.next_hosts(&selected, &answer),
            Ok(names(&["n0", "n2"]))
        );
        let err = policy.next_hosts(&selected, &BTreeSet::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "only 1 node(s) answer (n1, n2, n3 did not within the return timeout), fewer than --min_nodes 2: the job cannot continue; its checkpoints are kept for a resume"
        );
    }

    #[test]
    fn a_smaller_world_keeps_its_hosts_slot_choices_and_port() {
        let hostfile = vec![
            HostEntry {
                host: "a".into(),
                slots: 4,
            },
            HostEntry {
                host: "b".into(),
                slots: 4,
            },
            HostEntry {
                host: "c".into(),
                slots: 4,
            },
        ];
        let kept = names(&["a", "c"]);
        assert_eq!(
            hostfile_of(&hostfile, &kept),
            vec![hostfile[0].clone(), hostfile[2].clone()]
        );
        let original = args(&["--include", "a:0,1@b:0,1@c:2,3", "--master_port", "0"]);
        let smaller = args_for_hosts(&original, &kept, "10.0.0.1", 29511);
        assert_eq!(smaller.include, "a:0,1@c:2,3");
        assert_eq!(smaller.exclude, "");
        assert_eq!(
            (smaller.master_addr.as_str(), smaller.master_port),
            ("10.0.0.1", 29511)
        );
        let counted = args_for_hosts(&args(&["--num_nodes", "3"]), &kept, "a", 1);
        assert_eq!(counted.num_nodes, None);
    }
}
