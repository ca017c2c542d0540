"""Which attention kernels libtorch picks for the call rsdeep's decoder layer makes
(`scaled_dot_product_attention(q, k, v, None, 0.0, is_causal=True, scale, enable_gqa=True)`
with q (B, N, T, D) and k, v (B, KV, T, D)), forward and backward, under torch's profiler.
The same libtorch version answers the same dispatch for rsdeep's process; the launched
kernels of rsdeep's own process are listed by ncu in `scripts/gpu-check.sh`.
Last stdout line: `sdpa kernels: <names>` and `flash: yes|no`. Contract: docs/gpu.md."""
import argparse
import torch
from torch.profiler import ProfilerActivity, profile


def main():
    p = argparse.ArgumentParser()
    for name, default in [("--batch", 4), ("--heads", 14), ("--kv-heads", 2), ("--seq", 2048), ("--head-dim", 64)]:
        p.add_argument(name, type=int, default=default)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    kind = torch.bfloat16 if a.device == "cuda" else torch.float32
    shape = lambda n: (a.batch, n, a.seq, a.head_dim)
    q = torch.randn(shape(a.heads), device=a.device, dtype=kind, requires_grad=True)
    k = torch.randn(shape(a.kv_heads), device=a.device, dtype=kind, requires_grad=True)
    v = torch.randn(shape(a.kv_heads), device=a.device, dtype=kind, requires_grad=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
    with profile(activities=activities) as prof:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, None, 0.0, is_causal=True, scale=a.head_dim ** -0.5, enable_gqa=True)
        out.float().square().mean().backward()
        if a.device == "cuda":
            torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events()
                    if any(w in e.name.lower() for w in ("flash", "fmha", "efficient", "attention", "softmax", "bmm"))})
    print("sdpa kernels/ops: " + " | ".join(names))
    print("flash: " + ("yes" if any("flash" in n.lower() for n in names) else "no"))


if __name__ == "__main__":
    main()
