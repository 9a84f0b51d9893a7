"""Three SGD steps of alambic's own training (`training.run.train`, the Trainer's DeepSpeed path through accelerate),
run alone or as one rank under torchrun with DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, gloo); see
test_deepspeed.py.

Usage: `python deepspeed_worker.py SPEC_JSON`, SPEC: out (folder), stage (ZeRO stage; null: no DeepSpeed), tie (tied
embeddings), shard_teacher (training.shard_teacher), implementation (loss.implementation), accumulation (micro-batches
per step). The global batch is 4 sequences (per device 4 // world size // accumulation) of chat data whose responses
differ in length. Rank 0 writes out/result.json (the log history and whether the student and teacher were ZeRO-3
partitioned) and out/student.pt (the final full weights, gathered).
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parents[1]))

from alambic.config import LossConfig, TrainingConfig  # noqa: E402
from alambic.training.run import train  # noqa: E402
from helpers import tiny_model, tiny_prepared, tiny_tokenizer  # noqa: E402

spec = json.loads(sys.argv[1])
out = Path(spec["out"])
rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
(out / f"data{rank}").mkdir(parents=True, exist_ok=True)  # each rank writes its own copy of the corpus
data = tiny_prepared(out / f"data{rank}", chat=True)
tie = spec.get("tie", True)
accumulation = spec.get("accumulation", 1)
student = tiny_model("llama", seed=2, num_layers=2, tie=tie)
teacher = tiny_model("llama", seed=1, tie=tie)
extra: dict = {}
if spec.get("stage") is not None:
    extra["deepspeed"] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": spec["stage"]},
    }
seen: dict[str, bool] = {}


class Probe(TrainerCallback):
    """Whether ZeRO-3 partitioned the student while it trained."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not seen:
            seen.update(student=any(hasattr(p, "ds_id") for p in model.parameters()))


summary = train(
    student,
    tiny_tokenizer(),
    data,
    teacher=teacher,
    loss=LossConfig(
        alpha=0.5, divergence="reverse_kl", implementation=spec.get("implementation", "chunked"), chunk_size=7
    ),
    training=TrainingConfig(
        max_steps=3,
        per_device_train_batch_size=4 // world // accumulation,
        gradient_accumulation_steps=accumulation,
        per_device_eval_batch_size=4 // world,
        learning_rate=0.5,
        warmup_ratio=0,
        lr_scheduler_type="constant",
        max_grad_norm=1e9,
        save_steps=100,
        logging_steps=1,
        eval_steps=3,
        shard_teacher=spec.get("shard_teacher", "auto"),
        trainer_args={"optim": "sgd", "data_seed": 0, **extra},
    ),
    output_dir=out / "run",
    callbacks=[Probe()],
)
teacher_partitioned = any(hasattr(p, "ds_id") for p in teacher.parameters())
params = list(student.parameters())
if any(hasattr(p, "ds_id") for p in params):
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # every rank: a collective
        state = {k: v.detach().clone() for k, v in student.state_dict().items()}
else:
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
if rank == 0:
    torch.save(state, out / "student.pt")
    (out / "result.json").write_text(
        json.dumps(
            {
                "log_history": summary["log_history"],
                "student_partitioned": seen.get("student", False),
                "teacher_partitioned": teacher_partitioned,
            }
        )
    )
# Leave the process group before exiting: torn down at interpreter exit instead, it aborted now and then here
# ("terminate called without an active exception", SIGABRT on rank 0 after result.json was written).
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
