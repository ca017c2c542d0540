"""One rank of the torch.distributed (gloo) baseline for benches/comm/run.sh.

Same sizes, iteration rule, timing and TSV output as rsdeep-comm-bench (rank 0 prints
`impl op bytes iters usec algbw_GBps busbw_GBps`, nccl-tests definitions), so that the two
can be compared line by line. Usage: gloo_bench.py RANK WORLD PORT [min max budget]
"""
import sys
import time

import torch
import torch.distributed as dist


def bus_factor(op, world):
    return 2.0 * (world - 1) / world if op == "all_reduce" else (world - 1) / world


def buffers(op, nbytes, world):
    numel = nbytes // 4
    piece = numel // world
    if op == "all_reduce":
        return torch.zeros(numel), None
    if op == "reduce_scatter":
        return torch.zeros(piece * world), torch.zeros(piece)
    return torch.zeros(piece), torch.zeros(piece * world)


def run_op(op, inp, out):
    if op == "all_reduce":
        dist.all_reduce(inp)
    elif op == "reduce_scatter":
        dist.reduce_scatter_tensor(out, inp)
    else:
        dist.all_gather_into_tensor(out, inp)


def main():
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    lo, hi, budget = (int(x) for x in (sys.argv[4:7] or (1024, 256 << 20, 64 << 20)))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    nbytes = lo
    while nbytes <= hi:
        for op in ("all_reduce", "reduce_scatter", "all_gather"):
            inp, out = buffers(op, nbytes, world)
            iters = max(3, min(200, budget // nbytes))
            run_op(op, inp, out)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                run_op(op, inp, out)
            dist.barrier()
            seconds = (time.perf_counter() - start) / iters
            size = max(inp.numel(), out.numel() if out is not None else 0) * 4
            algbw = size / seconds / 1e9
            if rank == 0:
                busbw = algbw * bus_factor(op, world)
                print(f"gloo\t{op}\t{size}\t{iters}\t{seconds * 1e6:.1f}\t{algbw:.3f}\t{busbw:.3f}", flush=True)
        nbytes *= 2
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
