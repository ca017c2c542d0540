//! The environment contract between the `rsdeep` launcher and each `rsdeep-worker`: the
//! names of every variable the launcher sets for a worker, then every other `RSDEEP_*`
//! variable either binary reads. The launcher's `plan` fills the first group; the worker's
//! `rendezvous::WorkerEnv::from_env` reads it. torchrun/DeepSpeed names come first (so user
//! code sees what it expects), then rsdeep's own.

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
/// A file the deciding launcher (node 0) writes the job's exit code to when it ends (for
/// batch scripts that cannot read node 0's own status, e.g. `srun` of an elastic job).
pub const STATUS_FILE: &str = "RSDEEP_STATUS_FILE";
/// Milliseconds between worker heartbeats.
pub const HEARTBEAT_INTERVAL_MS: &str = "RSDEEP_HEARTBEAT_INTERVAL_MS";
/// PEM CA a worker trusts for the rendezvous (also the launcher's `--rendezvous_tls_ca`).
pub const TLS_CA_ENV: &str = "RSDEEP_TLS_CA";
/// Overrides the name checked against the rendezvous certificate (default: `MASTER_ADDR`).
pub const TLS_DOMAIN_ENV: &str = "RSDEEP_TLS_DOMAIN";
/// The launcher's `--rendezvous_tls_cert` / `--rendezvous_tls_key`.
pub const TLS_CERT_ENV: &str = "RSDEEP_TLS_CERT";
pub const TLS_KEY_ENV: &str = "RSDEEP_TLS_KEY";

// Read by the user or the environment, not set by the launcher.

/// Log filter for both binaries (tracing's `EnvFilter` syntax; default `info`).
pub const LOG: &str = "RSDEEP_LOG";
/// The worker binary the launcher starts (default: `rsdeep-worker` beside `rsdeep`).
pub const WORKER_BIN: &str = "RSDEEP_WORKER_BIN";
/// Extra ssh arguments (whitespace-separated, no quoting) put before rsdeep's own options
/// on every ssh command, e.g. `-i KEY -o UserKnownHostsFile=FILE -l USER`.
pub const SSH_ARGS: &str = "RSDEEP_SSH_ARGS";
/// rsdeep's home: fetched data, the tokenized-data cache (default `~/.cache/rsdeep`).
pub const HOME: &str = "RSDEEP_HOME";
/// The tokenized-data cache folder (default `$RSDEEP_HOME/cache`).
pub const CACHE_DIR: &str = "RSDEEP_CACHE_DIR";
/// Peak dense TFLOP/s of one device, the MFU denominator (default by device kind).
pub const PEAK_TFLOPS: &str = "RSDEEP_PEAK_TFLOPS";
/// `0` runs decoder layers through autograd instead of the manual-backward layers.
pub const MANUAL_LAYERS: &str = "RSDEEP_MANUAL_LAYERS";
/// Set (any value) to print the ZeRO engine's per-phase timings.
pub const ZERO_PROFILE: &str = "RSDEEP_ZERO_PROFILE";
/// Python interpreter of the reference venv, for tests that compare with PyTorch.
pub const PYTHON: &str = "RSDEEP_PYTHON";
/// Tests: the folder holding AdapterHub's `adapters` and its transformers 4.57, put first
/// on PYTHONPATH for the bottleneck-adapter parity checks (`scripts/setup.sh`).
pub const ADAPTERS_PYTHONPATH: &str = "RSDEEP_ADAPTERS_PYTHONPATH";
/// `1` makes GPU-marked tests fail instead of skipping when no GPU is present.
pub const REQUIRE_GPU: &str = "RSDEEP_REQUIRE_GPU";

// Test-only fault hooks (never set in production).

/// `stall_before_collective:rank=R:step=S`: the training loop's fault hook.
pub const FAULT_INJECT: &str = "RSDEEP_FAULT_INJECT";
/// `POINT:STEP`: kill -9 this process at a checkpoint-save point.
pub const CHECKPOINT_KILL_AT: &str = "RSDEEP_CHECKPOINT_KILL_AT";
