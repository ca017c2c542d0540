"""Python side of the checkpoint benchmark: torch.save / torch.load (with fsync, as
rsdeep's save does) of exactly the tensors of an rsdeep checkpoint (its optimizer
partitions and weights, read with safetensors). Prints `key<TAB>value` lines.

Usage: python torch_bench.py CHECKPOINT_DIR REPEATS
"""

import glob
import os
import statistics
import sys
import time

import torch
from safetensors.torch import load_file


def main():
    checkpoint, repeats = sys.argv[1], int(sys.argv[2])
    files = sorted(glob.glob(os.path.join(checkpoint, "**", "*.safetensors"), recursive=True))
    tensors = {}
    for path in files:
        for name, tensor in load_file(path).items():
            tensors[f"{os.path.basename(path)}/{name}"] = tensor
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    target = os.path.join(checkpoint, "..", "torch_bench.pt")
    saves, loads = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        with open(target, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        saves.append(time.perf_counter() - started)
        started = time.perf_counter()
        loaded = torch.load(target, weights_only=True)
        loads.append(time.perf_counter() - started)
        assert len(loaded) == len(tensors)
    os.remove(target)
    save, load = statistics.median(saves), statistics.median(loads)
    print(f"torch_bytes\t{total}")
    print(f"torch_save_gbps\t{total / save / 1e9:.3f}")
    print(f"torch_load_gbps\t{total / load / 1e9:.3f}")


if __name__ == "__main__":
    main()
