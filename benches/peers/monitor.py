"""Runs one training command and measures it for the ZeRO benchmark (docs/benchmarks.md):
the launch time (just before the launcher process starts), the wall time at which a
steps file first holds a finished step, the peak RSS (VmHWM) of every worker process,
keyed by the RANK in its environment, and, each time the steps file gains a step, the
CPU seconds (user + system, all threads) the workers have used so far: the difference
between two such samples is the CPU a span of steps cost, which the host's other load
does not inflate the way it inflates wall time. Writes one JSON object to --out.

Usage: monitor.py --out R.json --steps_file F --worker_pattern S -- command args...
"""

import argparse
import json
import os
import subprocess
import sys
import time

POLL_S = 0.02
# Walk the process tree every this many polls (cheap VmHWM reads in between).
TREE_EVERY = 25


def children_by_parent():
    """Maps parent pid to child pids for every live process."""
    tree = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(name))
    return tree


def descendants(root):
    tree, found, todo = children_by_parent(), [], [root]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def worker_rank(pid, pattern):
    """The RANK of a worker process matching pattern, else None."""
    if pattern not in read_text(f"/proc/{pid}/cmdline"):
        return None
    for entry in read_text(f"/proc/{pid}/environ").split("\0"):
        if entry.startswith("RANK="):
            return int(entry[5:])
    return None


def vm_hwm_kib(pid):
    for line in read_text(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def steps_seen(path):
    """Lines of the steps file that record a finished step."""
    return sum('"step"' in line for line in read_text(path).splitlines())


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), 0 once it is gone."""
    stat = read_text(f"/proc/{pid}/stat")
    if not stat:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps_file", required=True)
    parser.add_argument("--worker_pattern", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    cli = parser.parse_args()
    command = cli.command[1:] if cli.command[:1] == ["--"] else cli.command

    launch_t = time.time()
    proc = subprocess.Popen(command)
    peak_kib, workers, first_step_t, polls = {}, {}, None, 0
    cpu_samples, seen = [], 0
    while proc.poll() is None:
        if polls % TREE_EVERY == 0:
            for pid in descendants(proc.pid):
                rank = worker_rank(pid, cli.worker_pattern)
                if rank is not None:
                    workers[pid] = rank
        for pid, rank in workers.items():
            peak_kib[rank] = max(peak_kib.get(rank, 0), vm_hwm_kib(pid))
        polls += 1
        now_seen = steps_seen(cli.steps_file)
        if now_seen > seen:
            seen = now_seen
            if first_step_t is None:
                first_step_t = time.time()
            cpu = sum(cpu_seconds(pid) for pid in workers)
            cpu_samples.append({"steps_seen": seen, "t": time.time(), "cpu_s": cpu})
        time.sleep(POLL_S)
    result = {
        "command": command,
        "exit_code": proc.returncode,
        "launch_t": launch_t,
        "end_t": time.time(),
        "first_step_seen_t": first_step_t,
        "peak_rss_kib_by_rank": {str(r): v for r, v in sorted(peak_kib.items())},
        "worker_cpu_by_steps_seen": cpu_samples,
    }
    with open(cli.out, "w") as f:
        json.dump(result, f, indent=2)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
