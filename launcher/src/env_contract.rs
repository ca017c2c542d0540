//! The environment contract between the `rsdeep` launcher and each `rsdeep-worker`: the
//! names of every variable the launcher sets for a worker. The launcher's `plan` fills
//! them; the worker's `rendezvous::WorkerEnv::from_env` reads them. torchrun/DeepSpeed
//! names come first (so user code sees what it expects), then rsdeep's own.

/// Global rank of this worker (`node offset + local index`).
pub const RANK: &str = "RANK";
/// Index of this worker among the workers of its node, in launch order.
pub const LOCAL_RANK: &str = "LOCAL_RANK";
/// Number of workers in the whole job.
pub const WORLD_SIZE: &str = "WORLD_SIZE";
/// Number of workers on this worker's node (torchrun name).
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
/// Number of workers on this worker's node (DeepSpeed name).
pub const LOCAL_SIZE: &str = "LOCAL_SIZE";
/// Node index (torchrun name).
pub const GROUP_RANK: &str = "GROUP_RANK";
/// Node index (DeepSpeed name).
pub const CROSS_RANK: &str = "CROSS_RANK";
/// Number of nodes (DeepSpeed name).
pub const CROSS_SIZE: &str = "CROSS_SIZE";
/// Address of the node-0 launcher hosting the rendezvous.
pub const MASTER_ADDR: &str = "MASTER_ADDR";
/// Port of the rendezvous service.
pub const MASTER_PORT: &str = "MASTER_PORT";
/// The one device a CUDA worker sees (empty for CPU workers).
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
/// Set to the per-rank thread count when `--bind_cores_to_rank` is given.
pub const OMP_NUM_THREADS: &str = "OMP_NUM_THREADS";

/// Job id every rendezvous call must carry.
pub const JOB_ID: &str = "RSDEEP_JOB_ID";
/// Per-job secret sent as gRPC metadata on every rendezvous call.
pub const TOKEN: &str = "RSDEEP_TOKEN";
/// Node index (rsdeep name; same value as `GROUP_RANK`).
pub const NODE_RANK: &str = "RSDEEP_NODE_RANK";
/// Number of nodes (rsdeep name; same value as `CROSS_SIZE`).
pub const NUM_NODES: &str = "RSDEEP_NUM_NODES";
/// `cpu` or `cuda`.
pub const DEVICE: &str = "RSDEEP_DEVICE";
/// The launcher's host name for this node (reported on Join).
pub const HOST: &str = "RSDEEP_HOST";
/// Address the worker binds its collective TCP listener on (port chosen by the OS).
pub const COMM_HOST: &str = "RSDEEP_COMM_HOST";
/// Path of the resolved train.json written by the launcher.
pub const CONFIG: &str = "RSDEEP_CONFIG";
/// `1` runs the diagnostic selftest instead of training.
pub const SELFTEST: &str = "RSDEEP_SELFTEST";
/// How many times the job has been restarted (0 on the first attempt).
pub const RESTART_COUNT: &str = "RSDEEP_RESTART_COUNT";
/// Milliseconds between worker heartbeats.
pub const HEARTBEAT_INTERVAL_MS: &str = "RSDEEP_HEARTBEAT_INTERVAL_MS";
