"""Prints the ZeRO benchmark table (docs/benchmarks.md) from one benches/peers/run.sh
result directory: per stage, rsdeep vs HF Trainer + DeepSpeed tokens/s, launch to first
finished step, and peak RSS per rank, each with the ratio rsdeep/peer.

tokens/s = tokens in steps WARMUP+1..last / wall time between the end of step WARMUP
and the end of the last step (both sides' step-end clocks; 1 step = 2 ranks x 4 x 2 x
256 = 4096 tokens); best-step tokens/s = 4096 / the shortest of those steps. Launch to first step = the first step's end minus the moment just
before the launcher process started (monitor.py). tokens per CPU-second = the same
tokens / the CPU seconds (user + system, every thread of every worker) spent between
the monitor's samples at step WARMUP and at the last step: what a step costs in CPU,
which other engineers' load on the host barely moves (the host's load inflates wall
time only).
"""

import argparse
import json
import os

WARMUP_STEPS = 5
# 2 ranks x micro batch x accumulation x block; --tokens_per_step sets it (run.sh does).
TOKENS_PER_STEP = 2 * 4 * 2 * 256


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rsdeep_side(run_dir, stage):
    monitor = json.load(open(os.path.join(run_dir, f"rsdeep-zero{stage}.json")))
    rows = read_jsonl(os.path.join(run_dir, f"rsdeep-zero{stage}", "metrics.jsonl"))
    step_end = {r["step"]: r["elapsed_s"] for r in rows if "loss" in r}
    first = monitor["first_step_seen_t"] - monitor["launch_t"]
    return monitor, step_end, first


def peer_side(run_dir, stage):
    monitor = json.load(open(os.path.join(run_dir, f"peer-zero{stage}.json")))
    rows = read_jsonl(os.path.join(run_dir, f"peer-zero{stage}", "bench_steps.jsonl"))
    step_end = {r["step"]: r["t"] for r in rows}
    first = step_end[min(step_end)] - monitor["launch_t"]
    return monitor, step_end, first


def tokens_per_second(step_end):
    last = max(step_end)
    if last <= WARMUP_STEPS:
        raise SystemExit(f"need more than {WARMUP_STEPS} steps, got {last}")
    seconds = step_end[last] - step_end[WARMUP_STEPS]
    return (last - WARMUP_STEPS) * TOKENS_PER_STEP / seconds


def best_step_tokens_per_second(step_end):
    """4096 tokens / the shortest step after the warm-up: less sensitive to host load."""
    steps = sorted(s for s in step_end if s >= WARMUP_STEPS)
    shortest = min(step_end[b] - step_end[a] for a, b in zip(steps, steps[1:]))
    return TOKENS_PER_STEP / shortest


def tokens_per_cpu_second(monitor):
    """Tokens of steps WARMUP+1..last per worker CPU second (None without samples)."""
    samples = {s["steps_seen"]: s["cpu_s"] for s in monitor.get("worker_cpu_by_steps_seen", [])}
    last = max(samples, default=0)
    if last <= WARMUP_STEPS or WARMUP_STEPS not in samples:
        return None
    return (last - WARMUP_STEPS) * TOKENS_PER_STEP / (samples[last] - samples[WARMUP_STEPS])


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def peak_mib(monitor):
    ranks = monitor["peak_rss_kib_by_rank"]
    if not ranks:
        raise SystemExit(f"no worker RSS recorded for {monitor['command'][0]}")
    return [ranks[r] / 1024 for r in sorted(ranks, key=int)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--stages", nargs="+", default=["1", "2", "3"])
    parser.add_argument("--tokens_per_step", type=int, default=TOKENS_PER_STEP)
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="untimed first steps")
    cli = parser.parse_args()
    globals()["TOKENS_PER_STEP"] = cli.tokens_per_step
    globals()["WARMUP_STEPS"] = cli.warmup
    print(f"run: {cli.run_dir}")
    print("| ZeRO | side | tokens/s | best-step tokens/s | tokens per CPU-second | launch to first step (s) | peak RSS per rank (MiB) |")
    print("|---|---|---:|---:|---:|---:|---|")
    ratios = []
    for stage in cli.stages:
        ours_mon, ours_steps, ours_first = rsdeep_side(cli.run_dir, stage)
        peer_mon, peer_steps, peer_first = peer_side(cli.run_dir, stage)
        for name, mon, steps, first in (
            ("rsdeep", ours_mon, ours_steps, ours_first),
            ("HF Trainer + DeepSpeed", peer_mon, peer_steps, peer_first),
        ):
            if mon["exit_code"] != 0:
                raise SystemExit(f"{name} ZeRO-{stage} exited {mon['exit_code']}")
            rss = " / ".join(f"{m:.0f}" for m in peak_mib(mon))
            tps, best = tokens_per_second(steps), best_step_tokens_per_second(steps)
            cpu = fmt(tokens_per_cpu_second(mon), ".0f")
            print(f"| {stage} | {name} | {tps:.0f} | {best:.0f} | {cpu} | {first:.1f} | {rss} |")
        ratios.append(
            (
                stage,
                tokens_per_second(ours_steps) / tokens_per_second(peer_steps),
                best_step_tokens_per_second(ours_steps) / best_step_tokens_per_second(peer_steps),
                cpu_ratio(ours_mon, peer_mon),
                peer_first / ours_first,
                max(peak_mib(ours_mon)) / max(peak_mib(peer_mon)),
            )
        )
    print()
    print("| ZeRO | tokens/s rsdeep/peer (goal >= 1.3) | best-step tokens/s rsdeep/peer | tokens per CPU-second rsdeep/peer | launch-to-first-step speed-up peer/rsdeep (goal >= 5) | max peak RSS rsdeep/peer (goal <= 1) |")
    print("|---|---:|---:|---:|---:|---:|")
    for stage, tps, best, cpu, first, rss in ratios:
        print(f"| {stage} | {tps:.2f} | {best:.2f} | {fmt(cpu, '.2f')} | {first:.1f}x | {rss:.2f} |")


def cpu_ratio(ours_mon, peer_mon):
    ours, peer = tokens_per_cpu_second(ours_mon), tokens_per_cpu_second(peer_mon)
    return None if ours is None or peer is None else ours / peer


if __name__ == "__main__":
    main()
