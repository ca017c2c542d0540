"""HF Trainer reference for `scripts/gpu-check.sh`: the same model config, batch and sequence
length as configs/gpu-bench.json, random init, bf16; a TrainerCallback measures tokens/s
after warm-up and torch.cuda.max_memory_allocated. Last stdout line is the result.
Contract: docs/gpu.md."""
import argparse, time, torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments


class TokensPerSecond(TrainerCallback):
    def __init__(self, tokens_per_step, warmup):
        self.tokens_per_step, self.warmup, self.start, self.timed = tokens_per_step, warmup, None, 0

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        elif state.global_step > self.warmup:
            self.timed = state.global_step - self.warmup

    def tokens_per_second(self):
        return self.timed * self.tokens_per_step / (time.perf_counter() - self.start)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab, seq, n):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main():
    p = argparse.ArgumentParser()
    for name, kind in [("--model-config", str), ("--batch", int), ("--seq", int), ("--steps", int),
                       ("--device", str), ("--gradient-checkpointing", int)]:
        p.add_argument(name, type=kind, required=True)
    a = p.parse_args()
    config = AutoConfig.from_pretrained(a.model_config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    cuda = a.device == "cuda"
    args = TrainingArguments(output_dir="hf-out", per_device_train_batch_size=a.batch, max_steps=a.steps,
                             bf16=True, gradient_checkpointing=bool(a.gradient_checkpointing),
                             logging_steps=1000, save_strategy="no", report_to=[], use_cpu=not cuda,
                             learning_rate=1e-4, dataloader_num_workers=0)
    warmup = max(1, a.steps // 4)
    cb = TokensPerSecond(a.batch * a.seq, warmup)
    Trainer(model=model, args=args, train_dataset=RandomTokens(config.vocab_size, a.seq, a.batch * a.steps),
            callbacks=[cb]).train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    print(f"tokens/s {cb.tokens_per_second():.1f} peak_gpu_MiB(max_memory_allocated) {peak:.0f}")


if __name__ == "__main__":
    main()
