"""The peer side of the ZeRO benchmark (docs/benchmarks.md): Hugging Face Trainer +
DeepSpeed training the same tiny Qwen2 on the same data, batch and steps as rsdeep's
`configs/pretrain.json`, one process per rank, started by the `deepspeed` launcher.

The model comes from the model config (`configs/models/qwen2-tiny.json` by default, any
Qwen2/Llama config.json) through `AutoConfig.for_model` (random init), the data is the same jsonl tokenized with the same 8k tokenizer, concatenated and
cut into block_size-token blocks (as HF's run_clm.py groups texts). A TrainerCallback
appends `{"step": n, "t": <unix time>}` to OUTPUT_DIR/bench_steps.jsonl at every
on_step_end on rank 0, flushed at once so the harness reads the first finished step.
"""

import argparse
import json
import os
import time

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks; labels equal input_ids (the model shifts them)."""

    def __init__(self, blocks):
        self.blocks = blocks  # (N, T)

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, index):
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids}


class StepClock(TrainerCallback):
    """Writes the wall-clock time of every finished optimizer step (rank 0 only)."""

    def __init__(self, path):
        self.path = path

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            with open(self.path, "a") as out:
                out.write(json.dumps({"step": state.global_step, "t": time.time()}) + "\n")


def token_blocks(tokenizer, train_file, text_field, block_size):
    """Tokenizes every line's text, concatenates and drops the ragged tail: (N, T)."""
    with open(train_file, encoding="utf-8") as lines:
        texts = [json.loads(line)[text_field] for line in lines if line.strip()]
    ids = []
    for start in range(0, len(texts), 1000):
        for row in tokenizer(texts[start : start + 1000])["input_ids"]:
            ids.extend(row)
    usable = len(ids) // block_size * block_size
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, block_size)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_config", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=-1)
    cli = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(cli.tokenizer)
    blocks = token_blocks(tokenizer, cli.train_file, "text", cli.block_size)
    with open(cli.model_config) as f:
        fields = json.load(f)
    model_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(12)
    model = AutoModelForCausalLM.from_config(model_config)

    args = TrainingArguments(
        output_dir=cli.output_dir,
        per_device_train_batch_size=cli.micro_batch,
        gradient_accumulation_steps=cli.grad_accum,
        learning_rate=1e-3,
        weight_decay=0.01,
        warmup_steps=20,
        max_steps=cli.max_steps,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        seed=12,
        bf16=False,
        fp16=False,
        use_cpu=True,
        ddp_backend="gloo",
        dataloader_num_workers=0,
        disable_tqdm=True,
        deepspeed=cli.deepspeed,
    )
    os.makedirs(cli.output_dir, exist_ok=True)
    clock = StepClock(os.path.join(cli.output_dir, "bench_steps.jsonl"))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=BlockDataset(blocks),
        callbacks=[clock],
    )
    trainer.train()


if __name__ == "__main__":
    main()
