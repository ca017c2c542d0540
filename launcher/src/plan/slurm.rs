//! `--launcher slurm`: what one launcher per node (`srun --ntasks-per-node=1 rsdeep
//! --launcher slurm train.json`) learns from SLURM's environment: the job's nodes
//! (expanded by `hostlist`), this node's index, GPUs on this node, the job id and the
//! restart count. Pure: `SlurmJob::from_lookup` takes the variables through a closure so
//! tests fake them; `plan.rs` turns a `SlurmJob` into nodes, slots and the master
//! address. A missing or inconsistent variable is an error naming it, never a silent
//! fallback to localhost (with which each node rendezvouses with itself and the job
//! hangs). Contract: `deploy/README.md` (SLURM).

use crate::plan::hostlist::{HostlistError, expand_hostlist};

/// The job's node list inside an `srun` step (the step's nodes).
pub const STEP_NODELIST: &str = "SLURM_STEP_NODELIST";
/// The job's node list (the whole allocation).
pub const JOB_NODELIST: &str = "SLURM_JOB_NODELIST";
pub const NNODES: &str = "SLURM_NNODES";
pub const NODEID: &str = "SLURM_NODEID";
pub const JOB_ID: &str = "SLURM_JOB_ID";
pub const STEP_ID: &str = "SLURM_STEP_ID";
pub const LOCALID: &str = "SLURM_LOCALID";
pub const GPUS_ON_NODE: &str = "SLURM_GPUS_ON_NODE";
pub const RESTART_COUNT: &str = "SLURM_RESTART_COUNT";

/// What SLURM says about this job and this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmJob {
    /// `SLURM_JOB_ID`.
    pub job_id: String,
    /// `SLURM_STEP_ID` inside an `srun` step.
    pub step_id: Option<String>,
    /// Every node of the step (or job), in SLURM's order; the first hosts the rendezvous.
    pub nodes: Vec<String>,
    /// `SLURM_NODEID`: this node's index in `nodes`.
    pub node_id: usize,
    /// `SLURM_GPUS_ON_NODE`, when GPUs were requested.
    pub gpus_on_node: Option<usize>,
    /// `SLURM_RESTART_COUNT` (requeues so far), 0 when unset.
    pub restart_count: u32,
}

/// Why SLURM's environment cannot describe a job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlurmError {
    #[error(
        "--launcher slurm: {var} is not set; run rsdeep inside a SLURM job step \
         (`srun --ntasks-per-node=1 rsdeep --launcher slurm ...` in an sbatch script, see deploy/slurm/)"
    )]
    Missing { var: &'static str },
    #[error("--launcher slurm: {var}={value:?} is not valid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("--launcher slurm: {var}={value:?}: {source}")]
    Hostlist {
        var: &'static str,
        value: String,
        source: HostlistError,
    },
    #[error(
        "--launcher slurm: {nodes_var} lists {listed} node(s) ({value}) but SLURM_NNODES={nnodes}"
    )]
    NodeCountMismatch {
        nodes_var: &'static str,
        value: String,
        listed: usize,
        nnodes: usize,
    },
    #[error("--launcher slurm: SLURM_NODEID={node_id} is out of range for SLURM_NNODES={nnodes}")]
    NodeIdOutOfRange { node_id: usize, nnodes: usize },
    #[error(
        "--launcher slurm: SLURM_LOCALID={0}: more than one task runs on this node; start one \
         rsdeep per node (`srun --ntasks-per-node=1`), it starts the node's ranks itself"
    )]
    SeveralTasksPerNode(usize),
    #[error(
        "--launcher slurm: this job has {0} nodes and RSDEEP_TOKEN is not set; export the same \
         secret on every node before srun, e.g. `export RSDEEP_TOKEN=$(openssl rand -hex 16)` \
         in the sbatch script (srun passes it on)"
    )]
    MissingToken(usize),
    #[error(
        "--launcher slurm with --device cuda: no GPU count for this node (SLURM_GPUS_ON_NODE \
         and CUDA_VISIBLE_DEVICES are unset); request GPUs (`#SBATCH --gpus-per-node=N`) \
         or pass --num_gpus N"
    )]
    NoGpuCount,
    #[error(
        "--launcher slurm: this node's name {name} {found}, so the other nodes cannot reach \
         its ranks; map the name to the node's network address in DNS or /etc/hosts (a \
         Debian `127.0.1.1 {name}` line causes this)"
    )]
    UnreachableNodeName { name: String, found: String },
    #[error(
        "--launcher slurm takes the nodes and this node's index from SLURM (SLURM_JOB_NODELIST, \
         SLURM_NODEID); {0} is not supported with it (choose nodes with sbatch --nodes, \
         --nodelist or --exclude)"
    )]
    UnsupportedFlag(&'static str),
}

impl SlurmJob {
    /// Reads the job from the process environment.
    pub fn from_env() -> Result<Self, SlurmError> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads the job through `get` (a variable's value, `None` when unset).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, SlurmError> {
        let job_id = required(&get, JOB_ID)?;
        let nnodes: usize = parse_var(&get, NNODES)?;
        if nnodes == 0 {
            return Err(invalid(NNODES, "0", "a job has at least one node"));
        }
        let node_id: usize = parse_var(&get, NODEID)?;
        let (nodes_var, nodelist) = match get(STEP_NODELIST).filter(|v| !v.is_empty()) {
            Some(list) => (STEP_NODELIST, list),
            None => (JOB_NODELIST, required(&get, JOB_NODELIST)?),
        };
        let nodes = expand_hostlist(&nodelist).map_err(|source| SlurmError::Hostlist {
            var: nodes_var,
            value: nodelist.clone(),
            source,
        })?;
        if nodes.len() != nnodes {
            return Err(SlurmError::NodeCountMismatch {
                nodes_var,
                value: nodelist,
                listed: nodes.len(),
                nnodes,
            });
        }
        if node_id >= nnodes {
            return Err(SlurmError::NodeIdOutOfRange { node_id, nnodes });
        }
        if let Some(local_id) = optional::<usize>(&get, LOCALID)?.filter(|&id| id > 0) {
            return Err(SlurmError::SeveralTasksPerNode(local_id));
        }
        Ok(SlurmJob {
            job_id,
            step_id: get(STEP_ID).filter(|v| !v.is_empty()),
            nodes,
            node_id,
            gpus_on_node: optional(&get, GPUS_ON_NODE)?,
            restart_count: optional(&get, RESTART_COUNT)?.unwrap_or(0),
        })
    }

    /// The rsdeep job id every node derives alike: `slurm-<job>[.<step>]`.
    pub fn rsdeep_job_id(&self) -> String {
        match &self.step_id {
            Some(step) => format!("slurm-{}.{step}", self.job_id),
            None => format!("slurm-{}", self.job_id),
        }
    }

    /// The rendezvous token: `RSDEEP_TOKEN` when given (required with several nodes,
    /// since every node must present the same one), else `fresh` for a one-node job.
    pub fn token(
        &self,
        from_env: Option<String>,
        fresh: impl FnOnce() -> String,
    ) -> Result<String, SlurmError> {
        match from_env.filter(|t| !t.is_empty()) {
            Some(token) => Ok(token),
            None if self.nodes.len() == 1 => Ok(fresh()),
            None => Err(SlurmError::MissingToken(self.nodes.len())),
        }
    }

    /// Local rank slots on each node for CUDA workers: `--num_gpus`, else
    /// `SLURM_GPUS_ON_NODE`, else the `CUDA_VISIBLE_DEVICES` count. Device indices are
    /// the visible list when SLURM set one, else `0..n`. Nodes are assumed alike.
    pub fn cuda_slots(
        &self,
        num_gpus: Option<usize>,
        cuda_visible_devices: Option<&str>,
    ) -> Result<Vec<usize>, SlurmError> {
        let visible = match cuda_visible_devices
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            Some(list) => Some(parse_device_list(list)?),
            None => None,
        };
        let count = num_gpus
            .or(self.gpus_on_node)
            .or(visible.as_ref().map(Vec::len))
            .ok_or(SlurmError::NoGpuCount)?;
        match visible {
            Some(devices) if devices.len() >= count => Ok(devices[..count].to_vec()),
            Some(devices) => Err(invalid(
                "CUDA_VISIBLE_DEVICES",
                &join(&devices),
                format!(
                    "{count} GPU(s) wanted per node but only {} visible",
                    devices.len()
                ),
            )),
            None => Ok((0..count).collect()),
        }
    }

    /// With several nodes, the other nodes reach this node's ranks by its name from the
    /// node list: `resolved` (that name's addresses here) must hold a non-loopback one.
    pub fn check_own_address(&self, resolved: &[std::net::IpAddr]) -> Result<(), SlurmError> {
        if self.nodes.len() < 2 || resolved.iter().any(|a| !a.is_loopback()) {
            return Ok(());
        }
        let found = match resolved {
            [] => "does not resolve on this node".to_string(),
            addrs => format!(
                "resolves here only to loopback ({})",
                addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        Err(SlurmError::UnreachableNodeName {
            name: self.nodes[self.node_id].clone(),
            found,
        })
    }

    /// One line for the launcher's log.
    pub fn describe(&self) -> String {
        format!(
            "SLURM job {} node {} of {} ({}), restart count {}, rendezvous host {}",
            self.job_id,
            self.node_id,
            self.nodes.len(),
            self.nodes[self.node_id],
            self.restart_count,
            self.nodes[0]
        )
    }
}

fn required(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<String, SlurmError> {
    get(var)
        .filter(|v| !v.trim().is_empty())
        .ok_or(SlurmError::Missing { var })
}

fn parse_var<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<T, SlurmError> {
    let value = required(get, var)?;
    value
        .trim()
        .parse()
        .map_err(|_| invalid(var, &value, "expected a non-negative integer"))
}

fn optional<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<T>, SlurmError> {
    match get(var).filter(|v| !v.trim().is_empty()) {
        Some(_) => parse_var(get, var).map(Some),
        None => Ok(None),
    }
}

fn invalid(var: &'static str, value: &str, reason: impl Into<String>) -> SlurmError {
    SlurmError::Invalid {
        var,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn parse_device_list(list: &str) -> Result<Vec<usize>, SlurmError> {
    list.split(',')
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            invalid(
                "CUDA_VISIBLE_DEVICES",
                list,
                "expected comma-separated device indices",
            )
        })
}

fn join(devices: &[usize]) -> String {
    devices
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn job(vars: &[(&str, &str)]) -> Result<SlurmJob, SlurmError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SlurmJob::from_lookup(|k| map.get(k).cloned())
    }

    const TWO_NODES: [(&str, &str); 4] = [
        ("SLURM_JOB_ID", "77"),
        ("SLURM_NNODES", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_JOB_NODELIST", "gpu[07-08]"),
    ];

    #[test]
    fn reads_nodes_node_id_and_job() {
        let mut vars = TWO_NODES.to_vec();
        vars.extend([
            ("SLURM_STEP_ID", "0"),
            ("SLURM_GPUS_ON_NODE", "4"),
            ("SLURM_RESTART_COUNT", "2"),
            ("SLURM_LOCALID", "0"),
        ]);
        let job = job(&vars).unwrap();
        assert_eq!(job.nodes, ["gpu07", "gpu08"]);
        assert_eq!(job.node_id, 1);
        assert_eq!(job.gpus_on_node, Some(4));
        assert_eq!(job.restart_count, 2);
        assert_eq!(job.rsdeep_job_id(), "slurm-77.0");
        assert!(job.describe().contains("node 1 of 2 (gpu08)"));
    }

    #[test]
    fn the_step_nodelist_wins_over_the_allocation() {
        let mut vars = TWO_NODES.to_vec();
        vars[3] = ("SLURM_JOB_NODELIST", "gpu[01-08]");
        vars.push(("SLURM_STEP_NODELIST", "gpu[03,05]"));
        assert_eq!(job(&vars).unwrap().nodes, ["gpu03", "gpu05"]);
    }

    #[test]
    fn every_missing_variable_is_named() {
        for missing in [
            "SLURM_JOB_ID",
            "SLURM_NNODES",
            "SLURM_NODEID",
            "SLURM_JOB_NODELIST",
        ] {
            let vars: Vec<_> = TWO_NODES
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let err = job(&vars).unwrap_err();
            assert_eq!(err, SlurmError::Missing { var: missing });
            assert!(err.to_string().contains(missing), "{err}");
        }
    }

    #[test]
    fn inconsistent_variables_are_errors_naming_them() {
        let mut vars = TWO_NODES.to_vec();
        vars[1] = ("SLURM_NNODES", "3");
        let text = job(&vars).unwrap_err().to_string();
        assert!(
            text.contains("SLURM_JOB_NODELIST lists 2 node(s)") && text.contains("SLURM_NNODES=3"),
            "{text}"
        );
        let mut vars = TWO_NODES.to_vec();
        vars[2] = ("SLURM_NODEID", "2");
        assert_eq!(
            job(&vars).unwrap_err(),
            SlurmError::NodeIdOutOfRange {
                node_id: 2,
                nnodes: 2
            }
        );
        vars[2] = ("SLURM_NODEID", "one");
        assert!(
            job(&vars)
                .unwrap_err()
                .to_string()
                .contains("SLURM_NODEID=\"one\"")
        );
        let mut vars = TWO_NODES.to_vec();
        vars[3] = ("SLURM_JOB_NODELIST", "gpu[08-07]");
        let text = job(&vars).unwrap_err().to_string();
        assert!(
            text.contains("SLURM_JOB_NODELIST") && text.contains("08-07"),
            "{text}"
        );
        let mut vars = TWO_NODES.to_vec();
        vars.push(("SLURM_LOCALID", "1"));
        assert_eq!(job(&vars).unwrap_err(), SlurmError::SeveralTasksPerNode(1));
    }

    #[test]
    fn several_nodes_need_the_token_from_the_environment() {
        let two = job(&TWO_NODES).unwrap();
        let err = two.token(None, || "fresh".into()).unwrap_err();
        assert!(err.to_string().contains("RSDEEP_TOKEN"), "{err}");
        assert_eq!(two.token(Some("s".into()), || "fresh".into()).unwrap(), "s");
        let one = job(&[
            ("SLURM_JOB_ID", "5"),
            ("SLURM_NNODES", "1"),
            ("SLURM_NODEID", "0"),
            ("SLURM_JOB_NODELIST", "n1"),
        ])
        .unwrap();
        assert_eq!(one.token(None, || "fresh".into()).unwrap(), "fresh");
        assert_eq!(one.rsdeep_job_id(), "slurm-5");
    }

    #[test]
    fn several_nodes_need_a_reachable_own_name() {
        let two = job(&TWO_NODES).unwrap();
        let lan: std::net::IpAddr = "10.0.0.8".parse().unwrap();
        let debian: std::net::IpAddr = "127.0.1.1".parse().unwrap();
        assert_eq!(two.check_own_address(&[debian, lan]), Ok(()));
        let err = two.check_own_address(&[debian]).unwrap_err().to_string();
        assert!(err.contains("gpu08") && err.contains("127.0.1.1"), "{err}");
        let err = two.check_own_address(&[]).unwrap_err().to_string();
        assert!(err.contains("does not resolve"), "{err}");
        let mut one = two.clone();
        one.nodes.truncate(1);
        one.node_id = 0;
        assert_eq!(one.check_own_address(&[debian]), Ok(()));
    }

    #[test]
    fn gpu_slots_come_from_the_flag_then_slurm_then_visible_devices() {
        let mut job = job(&TWO_NODES).unwrap();
        assert_eq!(job.cuda_slots(None, None), Err(SlurmError::NoGpuCount));
        assert_eq!(job.cuda_slots(None, Some("2,3")).unwrap(), [2, 3]);
        job.gpus_on_node = Some(4);
        assert_eq!(job.cuda_slots(None, None).unwrap(), [0, 1, 2, 3]);
        assert_eq!(job.cuda_slots(Some(2), None).unwrap(), [0, 1]);
        assert_eq!(job.cuda_slots(Some(1), Some("5,6")).unwrap(), [5]);
        let err = job.cuda_slots(None, Some("5,6")).unwrap_err().to_string();
        assert!(
            err.contains("4 GPU(s) wanted") && err.contains("CUDA_VISIBLE_DEVICES"),
            "{err}"
        );
        assert!(job.cuda_slots(None, Some("a")).is_err());
    }
}
