"""The loss-curve comparison of the peer benchmark (docs/benchmarks.md): rsdeep against
Hugging Face Trainer + DeepSpeed started from one initial safetensors file with the same
data, seed and hyper-parameters. Prints both curves step by step with their relative
deviation, the largest deviation of loss and grad_norm, and writes one PNG overlaying the
two loss curves (and the deviation on a second axis).

Usage: curve.py HF_OUTPUT_DIR RSDEEP_OUTPUT_DIR OUT.png [--title TEXT]
  HF_OUTPUT_DIR/trainer_state.json   the Trainer's log_history (logging_steps 1)
  RSDEEP_OUTPUT_DIR/metrics.jsonl    rsdeep's per-step metrics
"""

import argparse
import json
import os


def hf_curve(output_dir):
    state = json.load(open(os.path.join(output_dir, "trainer_state.json")))
    return {e["step"]: e for e in state["log_history"] if "loss" in e and "grad_norm" in e}


def rsdeep_curve(output_dir):
    rows = [json.loads(l) for l in open(os.path.join(output_dir, "metrics.jsonl")) if l.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def relative(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("rsdeep_dir")
    parser.add_argument("png")
    parser.add_argument("--title", default="rsdeep vs HF Trainer + DeepSpeed")
    args = parser.parse_args()
    hf, rs = hf_curve(args.hf_dir), rsdeep_curve(args.rsdeep_dir)
    steps = sorted(set(hf) & set(rs))
    if not steps:
        raise SystemExit("no common logged step")
    print("| step | HF loss | rsdeep loss | rel. dev. | HF grad_norm | rsdeep grad_norm | rel. dev. |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    loss_dev, norm_dev = [], []
    for s in steps:
        h, r = hf[s], rs[s]
        loss_dev.append(relative(h["loss"], r["loss"]))
        norm_dev.append(relative(h["grad_norm"], r["grad_norm"]))
        print(f"| {s} | {h['loss']:.6f} | {r['loss']:.6f} | {loss_dev[-1]:.1e} "
              f"| {h['grad_norm']:.5f} | {r['grad_norm']:.5f} | {norm_dev[-1]:.1e} |")
    worst_loss = max(range(len(steps)), key=lambda i: loss_dev[i])
    worst_norm = max(range(len(steps)), key=lambda i: norm_dev[i])
    print(f"\n{len(steps)} steps; largest loss deviation {loss_dev[worst_loss]:.2e} (step {steps[worst_loss]}), "
          f"largest grad_norm deviation {norm_dev[worst_norm]:.2e} (step {steps[worst_norm]})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    ax.plot(steps, [hf[s]["loss"] for s in steps], color="tab:orange", linewidth=3.0,
            label="HF Trainer + DeepSpeed")
    ax.plot(steps, [rs[s]["loss"] for s in steps], color="tab:blue", linewidth=1.2, linestyle="--",
            label="rsdeep")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(args.title)
    dev = ax.twinx()
    dev.semilogy(steps, [max(d, 1e-12) for d in loss_dev], color="tab:grey", linewidth=0.8,
                 label="relative loss deviation")
    dev.set_ylabel("relative deviation")
    lines = ax.get_legend_handles_labels()
    more = dev.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right")
    fig.tight_layout()
    fig.savefig(args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
