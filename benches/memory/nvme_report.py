"""Prints the NVMe offload comparison (docs/benchmarks.md) from one benches/memory/nvme.sh
result directory: per run, every rank's peak RSS (VmHWM) in MiB and the mean step time
after two warm-up steps; then the medians of each kind and their ratios."""

import argparse
import glob
import json
import os
import re
import statistics


def step_ms(run_dir):
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in l]
    elapsed = [r["elapsed_s"] for r in rows]
    steps = [b - a for a, b in zip(elapsed[2:], elapsed[3:])]
    return 1e3 * sum(steps) / len(steps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    cli = parser.parse_args()
    kinds = {"memory": [], "nvme": []}
    print(f"run: {cli.run_dir}")
    print("| run | peak RSS per rank (MiB) | max (MiB) | mean step (ms) |")
    print("|---|---|---:|---:|")
    for path in sorted(glob.glob(os.path.join(cli.run_dir, "*-*.json"))):
        name = os.path.basename(path)[:-5]
        kind = re.match(r"(memory|nvme)-\d+$", name)
        if not kind:
            continue
        run = json.load(open(path))
        if run["exit_code"] != 0:
            raise SystemExit(f"{name} exited {run['exit_code']}")
        ranks = run["peak_rss_kib_by_rank"]
        mib = [ranks[r] / 1024 for r in sorted(ranks, key=int)]
        ms = step_ms(os.path.join(cli.run_dir, name))
        kinds[kind.group(1)].append((max(mib), ms))
        print(f"| {name} | {' / '.join(f'{m:.0f}' for m in mib)} | {max(mib):.0f} | {ms:.1f} |")
    (rss_mem, ms_mem), (rss_nvme, ms_nvme) = (
        tuple(statistics.median(v[i] for v in kinds[k]) for i in (0, 1)) for k in ("memory", "nvme")
    )
    print(f"median max peak RSS: {rss_mem:.0f} MiB in memory, {rss_nvme:.0f} MiB with nvme "
          f"({rss_nvme - rss_mem:+.0f} MiB, {rss_nvme / rss_mem:.3f}x)")
    print(f"median mean step: {ms_mem:.1f} ms in memory, {ms_nvme:.1f} ms with nvme ({ms_nvme / ms_mem:.3f}x)")


if __name__ == "__main__":
    main()
