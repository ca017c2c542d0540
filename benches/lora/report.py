"""Prints the LoRA-against-full-SFT table (docs/benchmarks.md) from one benches/lora/run.sh
result directory: per ZeRO stage and task, every rank's peak RSS (VmHWM) in MiB, the
median tokens/s of the logged steps after the first WARMUP (metrics.jsonl), the workers'
CPU seconds per step over the same steps (monitor.py; the host's other load inflates it
less than wall time), and the ratios LoRA/full. Exits non-zero when a run failed."""

import argparse
import glob
import json
import os
import re
import statistics

WARMUP = 2


def logged_steps(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path) if '"tokens_per_second"' in line]
    return [row for row in rows if row["step"] > WARMUP]


def cpu_seconds_per_step(monitor):
    samples = [s for s in monitor["worker_cpu_by_steps_seen"] if s["steps_seen"] >= WARMUP]
    if len(samples) < 2:
        return float("nan")
    first, last = samples[0], samples[-1]
    return (last["cpu_s"] - first["cpu_s"]) / (last["steps_seen"] - first["steps_seen"])


def measure(json_path):
    monitor = json.load(open(json_path))
    if monitor["exit_code"] != 0:
        raise SystemExit(f"{json_path}: the run exited {monitor['exit_code']}")
    steps = logged_steps(json_path[: -len(".json")])
    if not steps:
        raise SystemExit(f"{json_path}: no logged steps after step {WARMUP}")
    ranks = monitor["peak_rss_kib_by_rank"]
    return {
        "rss_mib": [ranks[r] / 1024 for r in sorted(ranks, key=int)],
        "tokens_per_s": statistics.median(row["tokens_per_second"] for row in steps),
        "cpu_s_per_step": cpu_seconds_per_step(monitor),
        "steps": len(steps),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    cli = parser.parse_args()
    runs = {}
    for path in glob.glob(os.path.join(cli.run_dir, "zero*-*.json")):
        stage, task = re.search(r"zero(\d)-(sft|lora)\.json$", path).groups()
        runs[(int(stage), task)] = measure(path)
    print(f"run: {cli.run_dir}")
    print("| ZeRO | task | peak RSS per rank (MiB) | max (MiB) | tokens/s (median) | worker CPU s/step |")
    print("|---:|---|---|---:|---:|---:|")
    for stage, task in sorted(runs, key=lambda k: (k[0], k[1] != "sft")):
        run = runs[(stage, task)]
        per_rank = " / ".join(f"{m:.0f}" for m in run["rss_mib"])
        print(f"| {stage} | {task} | {per_rank} | {max(run['rss_mib']):.0f} "
              f"| {run['tokens_per_s']:.0f} | {run['cpu_s_per_step']:.2f} |")
    print()
    print("| ZeRO | max peak RSS LoRA/full | tokens/s LoRA/full | CPU s/step LoRA/full |")
    print("|---:|---:|---:|---:|")
    for stage in sorted({s for s, _ in runs}):
        full, lora = runs.get((stage, "sft")), runs.get((stage, "lora"))
        if full is None or lora is None:
            continue
        print(f"| {stage} | {max(lora['rss_mib']) / max(full['rss_mib']):.2f} "
              f"| {lora['tokens_per_s'] / full['tokens_per_s']:.2f} "
              f"| {lora['cpu_s_per_step'] / full['cpu_s_per_step']:.2f} |")


if __name__ == "__main__":
    main()
