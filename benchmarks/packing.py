"""What do `training.packing`, `teacher.dtype` and `training.torch_compile` buy on chat data? Distillation
throughput of one model pair on real variable-length conversations, one configuration at a time, each in its own
process.

The real SmolLM2-135M-Instruct teacher and its every-other-layer student (15 layers) distil on chatterbot-corpus
(prompts in SmolLM2's chat template, 1,800 conversations of 30 to 400 tokens, cut at 192): forward KL, alpha 1, bf16
autocast where the device has it natively (else fp32), batch 8, `--steps` optimizer steps after `--warmup`. Per
configuration: the median wall time per step, the tokens per second (every token the models read, and the counted
answer tokens), the share of padding in the batches, and the loss of the first step (pad and padding_free read the
same batches and give the same loss; group_by_length draws other batches).

    python benchmarks/packing.py       # pad, group_by_length, padding_free, bf16 teacher, compiled layers
    python benchmarks/packing.py --configs pad,padding_free --steps 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {  # name -> (training.packing, teacher dtype, training.torch_compile)
    "pad": ("pad", "float32", False),
    "group_by_length": ("group_by_length", "float32", False),
    "padding_free": ("padding_free", "float32", False),
    "pad_bf16_teacher": ("pad", "bfloat16", False),
    "pad_compiled": ("pad", "float32", True),
}


def measure(name: str, steps: int, warmup: int, batch_size: int, max_seq_len: int) -> dict:
    import tempfile

    import torch
    from transformers import TrainerCallback

    from alambic.config import DataConfig, FromTeacherConfig, LossConfig, ModelConfig, TrainingConfig
    from alambic.data import prepare_datasets
    from alambic.models import load_model, load_tokenizer
    from alambic.students.build import build_from_teacher
    from alambic.training.run import train

    packing, teacher_dtype, compiled = CONFIGS[name]
    teacher_cfg = ModelConfig(model="smollm2-135m-instruct", dtype=teacher_dtype, device="cpu")
    tokenizer = load_tokenizer(teacher_cfg)
    data = prepare_datasets(DataConfig(source="chatterbot", format="chat", max_seq_len=max_seq_len), tokenizer)
    student, _ = build_from_teacher(
        load_model(teacher_cfg.model_copy(update={"dtype": "float32"})), FromTeacherConfig(layers="every_other"), None
    )
    teacher = load_model(teacher_cfg)
    times: list[float] = []
    seen = {"tokens": 0, "slots": 0}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    from alambic.teachers import Batches, LiveTeachers

    class Counting(LiveTeachers):  # the live teacher, whose batches are counted as they are made
        def batches(self, data, settings):
            made = super().batches(data, settings)

            def collate(features):
                batch = made.collator(features)
                seen["tokens"] += sum(len(f["input_ids"]) for f in features)
                seen["slots"] += batch["input_ids"].numel()
                return batch

            return Batches(made.train, made.validation, collate)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        summary = train(
            student,
            tokenizer,
            data,
            teacher=None,
            source=Counting(teacher),
            loss=LossConfig(divergence="forward_kl", alpha=1.0),
            training=TrainingConfig(
                max_steps=warmup + steps,
                per_device_train_batch_size=batch_size,
                bf16="auto",
                logging_steps=1,
                save_steps=10_000,
                packing=packing,
                torch_compile=compiled,
            ),
            output_dir=Path(out),
            callbacks=[Clock()],
        )
    timed = times[warmup:]
    history = [h for h in summary["log_history"] if "loss" in h]
    step_s = statistics.median(timed)
    tokens_per_step = seen["tokens"] / len(times)
    return {
        "config": name,
        "packing": packing,
        "teacher_dtype": teacher_dtype,
        "compiled": compiled,
        "steps": steps,
        "first_steps_s": times[:warmup],
        "step_s": step_s,
        "step_min_max": [min(timed), max(timed)],
        "tokens_per_s": tokens_per_step / step_s,
        "padding_share": 1 - seen["tokens"] / seen["slots"],
        "first_loss": history[0]["loss"],
        "precision": summary["precision"],
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated among {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation, recompilation)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=192)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one configuration
    args = parser.parse_args()
    if args.one:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.one, args.steps, args.warmup, args.batch_size, args.max_seq_len)))
        return
    results = []
    for name in args.configs.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--batch-size",
            str(args.batch_size),
            "--max-seq-len",
            str(args.max_seq_len),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = results[0]
    print(
        f"training precision: {base['precision']} (bf16 autocast where the device has it natively), "
        f"torch threads: {base['threads']}\n"
    )
    print(
        "| config | packing | teacher dtype | compiled | step s (min–max) | tokens/s | × first | padding share | "
        "1st-step loss | warm-up steps s |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        lo, hi = r["step_min_max"]
        warm = ", ".join(f"{t:.1f}" for t in r["first_steps_s"])
        print(
            f"| {r['config']} | {r['packing']} | {r['teacher_dtype']} | {'yes' if r['compiled'] else 'no'} | "
            f"{r['step_s']:.2f} ({lo:.2f}–{hi:.2f}) | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}× | {r['padding_share']:.1%} | {r['first_loss']:.4f} | "
            f"{warm} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
