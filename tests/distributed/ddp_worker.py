"""One distillation training through `alambic.training.run.train`, run alone or as one rank under torchrun (gloo).

Usage: `python ddp_worker.py SPEC_JSON`, SPEC a JSON object: out (folder), chat (the chat jsonl every rank reads),
per_device (training and evaluation), accumulation, max_steps, save_steps; optional: eval_steps, run (the run
folder, default out/run), restart (start afresh). Rank 0 writes out/result.json (the summary, log history included)
and out/student.pt (the final weights); every rank writes out/counts{rank}.json, the counted tokens of each
micro-batch it collated.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from alambic.config import DataConfig, LossConfig, TrainingConfig  # noqa: E402
from alambic.data import prepare_datasets  # noqa: E402
from alambic.data.tokenize import DistillationCollator  # noqa: E402
from alambic.training.run import train  # noqa: E402
from helpers import tiny_model, tiny_tokenizer  # noqa: E402

spec = json.loads(sys.argv[1])
out = Path(spec["out"])
rank = int(os.environ.get("RANK", "0"))
tokenizer = tiny_tokenizer()
data = prepare_datasets(
    DataConfig(source="files", format="chat", paths=[Path(spec["chat"])], max_seq_len=48, validation_fraction=0.2),
    tokenizer,
)
counts: list[int] = []
collate = DistillationCollator.__call__


def counting_collate(self, features):
    batch = collate(self, features)
    counts.append(int((batch["labels"][:, 1:] != -100).sum()))  # what the loss counts (the shifted labels)
    return batch


# Whichever object of the code path builds the collator, every batch it makes is counted.
DistillationCollator.__call__ = counting_collate


student = tiny_model("llama", seed=2, num_layers=2)
summary = train(
    student,
    tokenizer,
    data,
    teacher=tiny_model("llama", seed=1),
    loss=LossConfig(alpha=0.5, divergence="forward_kl", temperature=2.0),
    training=TrainingConfig(
        max_steps=spec["max_steps"],
        per_device_train_batch_size=spec["per_device"],
        per_device_eval_batch_size=spec["per_device"],
        eval_steps=spec.get("eval_steps"),
        gradient_accumulation_steps=spec["accumulation"],
        learning_rate=1e-2,
        warmup_ratio=0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=spec["save_steps"],
        save_total_limit=5,
        bf16=False,
        trainer_args={"data_seed": 0},
    ),
    output_dir=Path(spec.get("run", out / "run")),
    resume=not spec.get("restart", False),
)
out.mkdir(parents=True, exist_ok=True)
(out / f"counts{rank}.json").write_text(json.dumps(counts))
if rank == 0:
    torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, out / "student.pt")
    (out / "result.json").write_text(json.dumps(summary, default=str))
