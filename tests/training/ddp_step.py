"""One SGD distillation step, run either alone or under torchrun (2 CPU processes, gloo): see test_distributed.py."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from alambic.config import LossConfig, TrainingConfig  # noqa: E402
from alambic.training.run import train  # noqa: E402
from helpers import tiny_model, tiny_prepared, tiny_tokenizer  # noqa: E402

out, per_device = Path(sys.argv[1]), int(sys.argv[2])
rank = int(os.environ.get("RANK", "0"))
(out / f"data{rank}").mkdir(parents=True, exist_ok=True)  # each rank writes its own copy of the corpus
data = tiny_prepared(out / f"data{rank}", chat=True)
student = tiny_model("llama", seed=2, num_layers=2)
summary = train(
    student,
    tiny_tokenizer(),
    data,
    teacher=tiny_model("llama", seed=1),
    loss=LossConfig(alpha=0.5, divergence="reverse_kl"),
    training=TrainingConfig(
        max_steps=1,
        per_device_train_batch_size=per_device,
        learning_rate=1.0,
        warmup_ratio=0,
        lr_scheduler_type="constant",
        max_grad_norm=1e9,
        save_steps=100,
        trainer_args={"optim": "sgd", "data_seed": 0},
    ),
    output_dir=out / "run",
)
if rank == 0:
    torch.save(student.state_dict(), out / "student.pt")
    (out / "train_loss.txt").write_text(repr(summary["train_loss"]))
