"""Prints the per-rank peak RSS table (docs/benchmarks.md) from one benches/memory/run.sh
result directory: one row per world size and ZeRO stage, every rank's VmHWM in MiB, the
maximum, the saving of the maximum against ZeRO-0 at the same world size, and the
maximum against `rsdeep estimate-memory`'s total for that stage (estimate-w<world>.txt)."""

import argparse
import glob
import json
import os
import re


def estimates(run_dir, world):
    """{stage: predicted GiB per rank} from estimate-memory's table, if it was saved."""
    path = os.path.join(run_dir, f"estimate-w{world}.txt")
    if not os.path.exists(path):
        return {}
    table = {}
    for line in open(path):
        match = re.match(r"ZeRO-(\d)\s+.*\s([\d.]+)\s*$", line)
        if match:
            table[int(match.group(1))] = float(match.group(2))
    return table


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    cli = parser.parse_args()
    runs = {}
    for path in glob.glob(os.path.join(cli.run_dir, "w*-zero*.json")):
        world, stage = map(int, re.search(r"w(\d+)-zero(\d)\.json$", path).groups())
        runs[(world, stage)] = json.load(open(path))
    print(f"run: {cli.run_dir}")
    print("| world | ZeRO | peak RSS per rank (MiB) | max (MiB) | vs ZeRO-0 | estimate-memory (GiB) | max / estimate (goal <= 1.25) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for world, stage in sorted(runs):
        run = runs[(world, stage)]
        if run["exit_code"] != 0:
            raise SystemExit(f"world {world} ZeRO-{stage} exited {run['exit_code']}")
        ranks = run["peak_rss_kib_by_rank"]
        if len(ranks) != world:
            raise SystemExit(f"world {world} ZeRO-{stage}: RSS for {len(ranks)} ranks")
        mib = [ranks[r] / 1024 for r in sorted(ranks, key=int)]
        base = runs.get((world, 0))
        saving = ""
        if base is not None:
            base_max = max(base["peak_rss_kib_by_rank"].values()) / 1024
            saving = f"{100 * (max(mib) - base_max) / base_max:+.0f}%"
        per_rank = " / ".join(f"{m:.0f}" for m in mib)
        predicted = estimates(cli.run_dir, world).get(stage)
        ratio = "" if predicted is None else f"{max(mib) / 1024 / predicted:.2f}"
        shown = "" if predicted is None else f"{predicted:.2f}"
        print(f"| {world} | {stage} | {per_rank} | {max(mib):.0f} | {saving} | {shown} | {ratio} |")


if __name__ == "__main__":
    main()
