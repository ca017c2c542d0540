"""The compute floor for the ZeRO benchmark (docs/benchmarks.md): one process, one
thread, the same tiny Qwen2 (configs/models/qwen2-tiny.json, transformers, SDPA) on
random token blocks, micro batch 4 x 256, gradient accumulation 2, torch.optim.AdamW
(foreach). Prints the wall and process-CPU seconds per optimizer step, and per phase
(forward, backward, optimizer), medians over the timed steps.

Usage: python benches/peers/floor.py [--steps 8] [--threads 1] [--profile]
(--profile: also prints torch.profiler's per-op table, by self CPU time, of one extra
optimizer step after the timed ones)
"""

import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def clocks():
    return time.perf_counter(), time.process_time()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/models/qwen2-tiny.json")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    torch.manual_seed(0)
    config = Qwen2Config.from_json_file(cli.config)
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    shape = (cli.micro_batch, cli.block_size)
    phases = {"forward": [], "backward": [], "optimizer": [], "step": []}
    for step in range(cli.steps + 2 + (1 if cli.profile else 0)):
        profiling = cli.profile and step == cli.steps + 2
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        if profiling:
            profiler.__enter__()
        totals = {"forward": [0.0, 0.0], "backward": [0.0, 0.0], "optimizer": [0.0, 0.0]}
        step_start = clocks()
        for _ in range(cli.grad_accum):
            ids = torch.randint(0, config.vocab_size, shape)
            t0 = clocks()
            loss = model(input_ids=ids, labels=ids).loss / cli.grad_accum
            t1 = clocks()
            loss.backward()
            t2 = clocks()
            for i in range(2):
                totals["forward"][i] += t1[i] - t0[i]
                totals["backward"][i] += t2[i] - t1[i]
        t3 = clocks()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = clocks()
        totals["optimizer"] = [t4[0] - t3[0], t4[1] - t3[1]]
        if profiling:
            profiler.__exit__(None, None, None)
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            continue
        if step >= 2:  # the first two steps warm the allocator up
            for name, value in totals.items():
                phases[name].append(value)
            phases["step"].append([t4[0] - step_start[0], t4[1] - step_start[1]])
    tokens = cli.micro_batch * cli.block_size * cli.grad_accum
    for name, values in phases.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"{name:10s} wall {wall:7.3f} s  cpu {cpu:7.3f} s")
    step_cpu = statistics.median(v[1] for v in phases["step"])
    print(f"tokens/s per process by CPU time: {tokens / step_cpu:.0f}")


if __name__ == "__main__":
    main()
