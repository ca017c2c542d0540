"""Launch overhead: from a launcher's start to each rank's first line of user code, for
`rsdeep` and DeepSpeed's `deepspeed` launcher on the same two-rank CPU job, alternating,
on this machine in the same run. Prints each run and the medians, and the difference
rsdeep minus deepspeed (the goal: rsdeep adds under 100 ms per launch over the
interpreter start both pay). Results: docs/benchmarks.md.

    source scripts/env.sh && python benches/launch/first_line.py [--runs 7]
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
USER = os.path.join(HERE, "user_first_line.py")


def first_lines(command, env, ranks=2):
    """Seconds from just before the launcher starts to the last rank's first line."""
    start = time.time()
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        sys.exit(f"{command[0]} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    # Ranks share the launcher's stdout: lines of two ranks may interleave.
    stamps = [float(t) for t in re.findall(r"FIRST_LINE (\d+\.\d+)", out.stdout + out.stderr)]
    if len(stamps) != ranks:
        sys.exit(f"expected {ranks} FIRST_LINE lines from {command[0]}, got {len(stamps)}:\n{out.stdout}\n{out.stderr}")
    return max(stamps) - start, time.time() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    python = sys.executable
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "../../target"))
    rsdeep = os.environ.get("RSDEEP_BIN", os.path.join(target, "release", "rsdeep"))
    deepspeed = shutil.which("deepspeed") or sys.exit("deepspeed is not installed (scripts/setup.sh)")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    commands = {
        "rsdeep": [rsdeep, "--device", "cpu", "--num_procs", "2", "--master_port", "0", "--python", python, USER],
        "deepspeed": [deepspeed, "--num_gpus", "2", "--master_port", "29517", USER],
    }
    first = {name: [] for name in commands}
    total = {name: [] for name in commands}
    for run in range(args.runs):
        for name, command in commands.items():
            to_first, whole = first_lines(command, env)
            first[name].append(to_first)
            total[name].append(whole)
            print(f"run {run + 1} {name}: last rank's first line after {to_first * 1000:.0f} ms, launcher done after {whole * 1000:.0f} ms", flush=True)
    med = {name: statistics.median(values) for name, values in first.items()}
    for name in commands:
        print(f"median {name}: first line {med[name] * 1000:.0f} ms, whole launch {statistics.median(total[name]) * 1000:.0f} ms")
    print(f"rsdeep - deepspeed: {(med['rsdeep'] - med['deepspeed']) * 1000:+.0f} ms to the first line "
          f"(ratio rsdeep/deepspeed {med['rsdeep'] / med['deepspeed']:.3f})")
    baseline = statistics.median(
        [first_lines([python, USER], env, ranks=1)[0] for _ in range(args.runs)])
    print(f"the interpreter alone (python user_first_line.py): {baseline * 1000:.0f} ms; "
          f"rsdeep adds {(med['rsdeep'] - baseline) * 1000:.0f} ms, deepspeed adds {(med['deepspeed'] - baseline) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
