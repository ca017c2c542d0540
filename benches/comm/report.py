"""Merges the TSV outputs of rsdeep-comm-bench and gloo_bench.py into one markdown table
(busbw ratio = ours / gloo per op and size), preceded by this machine's single-thread
memory-copy bandwidth for scale. Usage: report.py OURS.tsv GLOO.tsv"""
import sys
import time

import numpy as np


def load(path):
    rows = {}
    for line in open(path):
        parts = line.strip().split("\t")
        if len(parts) == 7:
            _, op, size, _iters, usec, algbw, busbw = parts
            rows[(op, int(size))] = (float(usec), float(algbw), float(busbw))
    return rows


def memcpy_gbps(nbytes=256 << 20, repeats=5):
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n} {unit}"
        n //= 1024
    return f"{n} TiB"


def main():
    ours, gloo = load(sys.argv[1]), load(sys.argv[2])
    print(f"memcpy (numpy copyto, 256 MiB, 1 thread): {memcpy_gbps():.2f} GB/s\n")
    print("| op | size | rsdeep time (us) | rsdeep algbw | rsdeep busbw | gloo time (us) | gloo algbw | gloo busbw | busbw ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for op in ("all_reduce", "reduce_scatter", "all_gather"):
        for (o, size) in sorted(k for k in ours if k[0] == op):
            mine, base = ours[(o, size)], gloo.get((o, size))
            if base is None:
                print(f"| {op} | {human(size)} | {mine[0]:.1f} | {mine[1]:.3f} | {mine[2]:.3f} | - | - | - | - |")
                continue
            ratio = mine[2] / base[2] if base[2] > 0 else float("inf")
            print(f"| {op} | {human(size)} | {mine[0]:.1f} | {mine[1]:.3f} | {mine[2]:.3f} | "
                  f"{base[0]:.1f} | {base[1]:.3f} | {base[2]:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
