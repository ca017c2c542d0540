"""Peak memory of `rsdeep consolidate` (docs/checkpoints.md): runs the command
on a checkpoint and reports the peak RSS of the process doing the work (VmHWM of every
process in the tree, polled every 20 ms, plus getrusage's ru_maxrss of the waited
children, which catches a peak between polls) next to the largest tensor and the model
size read from the checkpoint's manifest. Prints `key<TAB>value` lines.

Usage: consolidate_memory.py CHECKPOINT_DIR OUT_DIR -- command args...
(the command is e.g. `rsdeep consolidate CHECKPOINT_DIR OUT_DIR --dtype fp32`)
"""

import json
import os
import resource
import subprocess
import sys
import time

POLL_S = 0.02


def tree(root):
    """`root` and its live descendants."""
    parents = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(name))
        except OSError:
            continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def vm_hwm_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def model_sizes(checkpoint):
    """(largest tensor, all tensors) in fp32 bytes, from the manifest's layouts."""
    with open(os.path.join(checkpoint, "manifest.json")) as f:
        engine = json.load(f)["engine"]
    numels = [s["numel"] for b in engine["blocks"] for s in b["slots"]]
    return max(numels) * 4, sum(numels) * 4


def main():
    split = sys.argv.index("--")
    checkpoint, _out = sys.argv[1:split]
    command = sys.argv[split + 1 :]
    largest, model = model_sizes(checkpoint)
    started = time.perf_counter()
    proc = subprocess.Popen(command)
    peak = 0
    while proc.poll() is None:
        for pid in tree(proc.pid):
            peak = max(peak, vm_hwm_bytes(pid))
        time.sleep(POLL_S)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{command} failed with {proc.returncode}")
    # ru_maxrss of waited descendants (KiB on Linux): the largest process's peak.
    peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    print(f"largest_tensor_fp32_bytes\t{largest}")
    print(f"model_fp32_bytes\t{model}")
    print(f"peak_rss_bytes\t{peak}")
    print(f"seconds\t{seconds:.2f}")


if __name__ == "__main__":
    main()
