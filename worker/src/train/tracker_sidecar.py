# The experiment-tracker sidecar rsdeep's rank 0 starts for `report_to` swanlab, wandb and
# mlflow (worker/src/train/trackers.rs embeds this file and runs it with `python3 -u -c`).
# It uses each tracker's own maintained Python client, so runs appear exactly as under
# HF Trainer. Protocol on stdin, one JSON object per line:
#   {"event": "init", "backends": [...], "all": bool, "run_name": str, "run_id": str,
#    "resume": bool, "output_dir": str, "config": {...}}
#   {"event": "log", "step": N, "metrics": {"train/loss": x, ...}}
#   {"event": "finish"}   (or end of input)
# A missing package for an explicitly named tracker, or a tracker failing, is one line on
# stderr and that tracker is dropped; the sidecar never stops reading, so rsdeep never
# blocks on it. Environment variables are each tracker's own (SWANLAB_MODE, WANDB_MODE,
# MLFLOW_TRACKING_URI, ...).
# Stopping: this sidecar runs in a process group of its own, so the launcher's SIGTERM and
# SIGKILL to rank 0's group leave it running; it ignores SIGTERM (SLURM's scancel signals
# every process of the step) and, once its input ends, flushes every tracker, giving up
# after FLUSH_LIMIT seconds: every step rank 0 had sent before dying reaches the
# trackers. Its output reaches rank 0 through a relay that survives rank 0's death.
# A resumed run continues the same run where the tracker can: wandb and SwanLab by an id
# derived from rsdeep's run id, MLflow by the run tagged with it (unless MLFLOW_RUN_ID
# names one).
import hashlib
import json
import os
import signal
import sys
import threading

# How long the trackers may take to flush after rank 0 is gone.
FLUSH_LIMIT = 60


def say(message):
    print(f"rsdeep tracker: {message}", file=sys.stderr, flush=True)


def relay_output():
    """Routes this process's stdout and stderr (the trackers print banners from any thread)
    through a pipe of its own, drained by a thread into rank 0's stderr that ignores a
    closed one: no tracker call ever fails on a broken pipe after rank 0 is gone."""
    rank0 = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)

    def drain():
        while chunk := os.read(read_end, 65536):
            try:
                os.write(rank0, chunk)
            except OSError:
                pass  # rank 0 is gone: nobody reads this any more

    threading.Thread(target=drain, daemon=True).start()


class SwanLab:
    package = "swanlab"

    def __init__(self, init):
        import swanlab

        self.swanlab = swanlab
        kwargs = dict(
            project=os.environ.get("SWANLAB_PROJECT", "rsdeep"),
            experiment_name=init["run_name"],
            config=init["config"],
        )
        if os.environ.get("SWANLAB_WORKSPACE"):
            kwargs["workspace"] = os.environ["SWANLAB_WORKSPACE"]
        if os.environ.get("SWANLAB_LOG_DIR"):
            kwargs["logdir"] = os.environ["SWANLAB_LOG_DIR"]
        # SwanLab's ids are 21 lowercase letters and digits; resuming reuses the id.
        kwargs["id"] = hashlib.sha256(init["run_id"].encode()).hexdigest()[:21]
        kwargs["resume"] = "allow"
        self.run = swanlab.init(**kwargs)

    def log(self, step, metrics):
        self.swanlab.log(metrics, step=step)

    def finish(self):
        self.swanlab.finish()


class Wandb:
    package = "wandb"

    def __init__(self, init):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "rsdeep"),
            entity=os.environ.get("WANDB_ENTITY"),
            name=init["run_name"],
            id=init["run_id"],
            resume="allow",
            config=init["config"],
            dir=os.environ.get("WANDB_DIR"),
        )

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def finish(self):
        self.run.finish()


class MLflow:
    package = "mlflow"

    def __init__(self, init):
        import mlflow

        self.mlflow = mlflow
        experiment = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "rsdeep"))
        run_id = os.environ.get("MLFLOW_RUN_ID") or None
        if run_id is None and init.get("resume"):
            earlier = mlflow.search_runs(
                experiment_ids=[experiment.experiment_id],
                filter_string=f"tags.rsdeep_run_id = '{init['run_id']}'",
                output_format="list",
            )
            run_id = earlier[0].info.run_id if earlier else None
        self.run = mlflow.start_run(run_id=run_id, run_name=init["run_name"])
        mlflow.set_tag("rsdeep_run_id", init["run_id"])
        flat = {}
        flatten("", init["config"], flat)
        # MLflow limits a value to 6000 characters and a batch to 100 parameters.
        items = [(k, str(v)[:6000]) for k, v in flat.items()]
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start:start + 100]))

    def log(self, step, metrics):
        self.mlflow.log_metrics(metrics, step=step)

    def finish(self):
        self.mlflow.end_run()


def flatten(prefix, value, out):
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value


TRACKERS = {"swanlab": SwanLab, "wandb": Wandb, "mlflow": MLflow}


def start(init):
    names = list(TRACKERS) if init.get("all") else [b for b in init["backends"] if b in TRACKERS]
    started = []
    for name in names:
        cls = TRACKERS[name]
        try:
            __import__(cls.package)
        except ImportError:
            if not init.get("all") or name in init["backends"]:
                say(f"report_to {name}: the {cls.package} package is not installed for {sys.executable}; "
                    f"install it with `{sys.executable} -m pip install {cls.package}` (training goes on without it)")
            continue
        try:
            started.append((name, cls(init)))
            say(f"{name}: logging this run")
        except Exception as exc:  # a tracker must never stop training
            say(f"{name}: could not start ({type(exc).__name__}: {exc}); training goes on without it")
    return started


def main():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    relay_output()
    first = sys.stdin.readline()
    if not first:
        return
    trackers = start(json.loads(first))
    finished = False
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("event") == "finish":
            finished = True
            break
        for entry in list(trackers):
            name, tracker = entry
            try:
                tracker.log(message["step"], message["metrics"])
            except Exception as exc:
                say(f"{name}: logging failed ({type(exc).__name__}: {exc}); dropped for the rest of the run")
                trackers.remove(entry)
    if not finished:
        signal.alarm(FLUSH_LIMIT)  # SIGALRM's default action ends a hung flush
    for name, tracker in trackers:
        try:
            tracker.finish()
        except Exception as exc:
            say(f"{name}: finishing failed ({type(exc).__name__}: {exc})")


main()
