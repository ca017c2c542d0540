"""Prints the full-SFT / LoRA / DoRA / QLoRA table (docs/benchmarks.md) from one
benches/lora/run.sh result directory: per ZeRO stage and method, every rank's peak RSS
(VmHWM) in MiB, the frozen base bytes per rank each worker reported ("model states on this
rank"), the median tokens/s of the logged steps after the first WARMUP (metrics.jsonl),
the workers' CPU seconds per step over the same steps (monitor.py), and the ratios to
full SFT and, for the frozen base, to LoRA. Exits non-zero when a run failed."""

import argparse
import glob
import json
import os
import re
import statistics

WARMUP = 2
METHODS = ["sft", "lora", "dora", "qlora"]
FROZEN = re.compile(r"model states on this rank: .*\(frozen ([0-9.]+) MiB\)")


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


def frozen_mib(log_path):
    values = [float(m.group(1)) for m in map(FROZEN.search, open(log_path)) if m]
    if not values:
        raise SystemExit(f"{log_path}: no 'model states on this rank' line")
    return max(values)


def measure(json_path):
    monitor = json.load(open(json_path))
    if monitor["exit_code"] != 0:
        raise SystemExit(f"{json_path}: the run exited {monitor['exit_code']}")
    run_dir = json_path[: -len(".json")]
    steps = logged_steps(run_dir)
    if not steps:
        raise SystemExit(f"{json_path}: no logged steps after step {WARMUP}")
    ranks = monitor["peak_rss_kib_by_rank"]
    return {
        "rss_mib": [ranks[r] / 1024 for r in sorted(ranks, key=int)],
        "frozen_mib": frozen_mib(run_dir + ".log"),
        "tokens_per_s": statistics.median(row["tokens_per_second"] for row in steps),
        "cpu_s_per_step": cpu_seconds_per_step(monitor),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    cli = parser.parse_args()
    runs = {}
    for path in glob.glob(os.path.join(cli.run_dir, "zero*-*.json")):
        stage, method = re.search(r"zero(\d)-(\w+)\.json$", path).groups()
        runs[(int(stage), method)] = measure(path)
    order = lambda key: (key[0], METHODS.index(key[1]))
    print(f"run: {cli.run_dir}")
    print("| ZeRO | method | peak RSS per rank (MiB) | frozen base per rank (MiB) "
          "| tokens/s (median) | worker CPU s/step |")
    print("|---:|---|---|---:|---:|---:|")
    for key in sorted(runs, key=order):
        run = runs[key]
        per_rank = " / ".join(f"{m:.0f}" for m in run["rss_mib"])
        print(f"| {key[0]} | {key[1]} | {per_rank} | {run['frozen_mib']:.1f} "
              f"| {run['tokens_per_s']:.0f} | {run['cpu_s_per_step']:.2f} |")
    print()
    print("| ZeRO | method | max peak RSS / full SFT | tokens/s / full SFT "
          "| frozen base / LoRA's |")
    print("|---:|---|---:|---:|---:|")
    for key in sorted(runs, key=order):
        stage, method = key
        full, lora = runs.get((stage, "sft")), runs.get((stage, "lora"))
        if full is None or method == "sft":
            continue
        run = runs[key]
        frozen = (f"{run['frozen_mib'] / lora['frozen_mib']:.2f}"
                  if lora and lora["frozen_mib"] > 0 else "-")
        print(f"| {stage} | {method} | {max(run['rss_mib']) / max(full['rss_mib']):.2f} "
              f"| {run['tokens_per_s'] / full['tokens_per_s']:.2f} | {frozen} |")


if __name__ == "__main__":
    main()
