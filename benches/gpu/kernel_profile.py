"""Where a GPU training step goes, for `scripts/gpu-check.sh --profile`: kernels grouped by
name and by kind (matrix products, attention, the rest), summed over the profiled steps,
for rsdeep (from ncu's raw CSV of gpu__time_duration.sum) and for HF Trainer on the same
shape (torch.profiler over its last step). Contract: docs/gpu.md.

  kernel_profile.py ncu FILE.csv STEPS
  kernel_profile.py hf --model-config C --batch B --seq T --steps S --device cuda|cpu"""
import argparse, collections, csv, sys, time


def kind(name):
    low = name.lower()
    if any(w in low for w in ("flash", "fmha", "sdpa", "attention")):
        return "attention"
    if any(w in low for w in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "matmul")):
        return "matmul"
    return "other"


def report(title, durations_us, steps):
    """durations_us: list of (kernel name, microseconds)."""
    total = sum(d for _, d in durations_us) or 1e-9
    by_kind, by_name = collections.Counter(), collections.Counter()
    for name, d in durations_us:
        by_kind[kind(name)] += d
        by_name[name[:100]] += d
    print(f"{title}: {len(durations_us) / steps:.0f} kernels and {total / steps / 1e3:.1f} ms of kernel time per step")
    print("  by kind: " + ", ".join(f"{k} {v / total:.1%}" for k, v in by_kind.most_common()))
    for name, d in by_name.most_common(20):
        print(f"  {d / steps / 1e3:8.2f} ms/step {d / total:6.1%}  {name}")


def ncu(path, steps):
    rows = list(csv.reader(open(path, errors="replace")))
    start = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    header = rows[start]
    name_col, time_col = header.index("Kernel Name"), header.index("gpu__time_duration.sum")
    data = [r for r in rows[start + 1:] if len(r) > time_col]
    unit = "ns"
    if data and not data[0][time_col].replace(".", "", 1).replace(",", "").isdigit():
        unit, data = data[0][time_col], data[1:]
    scale = {"ns": 1e-3, "nsecond": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(unit, 1e-3)
    durations = [(r[name_col], float(r[time_col].replace(",", "")) * scale) for r in data]
    report("rsdeep (ncu)", durations, steps)


def hf(a):
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    class LastStep(TrainerCallback):
        def __init__(self):
            self.prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == a.steps - 1:
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
                self.prof = profile(activities=acts)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and state.global_step == a.steps:
                if a.device == "cuda":
                    torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)

    config = AutoConfig.from_pretrained(a.model_config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ids = torch.randint(0, config.vocab_size, (a.batch * a.steps, a.seq), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(output_dir="hf-prof", per_device_train_batch_size=a.batch, max_steps=a.steps, bf16=True,
                             logging_steps=1000, save_strategy="no", report_to=[], use_cpu=a.device != "cuda",
                             learning_rate=1e-4, dataloader_num_workers=0)
    cb = LastStep()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    events = cb.prof.events()
    if a.device == "cuda":
        kernels = [(e.name, e.device_time) for e in events if e.device_type.name == "CUDA"]
    else:
        kernels = [(e.name, e.cpu_time) for e in events if e.name.startswith("aten::")]
    report("hf-trainer (torch.profiler, last step)", kernels, 1)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "ncu":
        ncu(sys.argv[2], int(sys.argv[3]))
        return
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["hf"])
    for name, t in [("--model-config", str), ("--batch", int), ("--seq", int), ("--steps", int), ("--device", str)]:
        p.add_argument(name, type=t, required=True)
    hf(p.parse_args())


if __name__ == "__main__":
    main()
