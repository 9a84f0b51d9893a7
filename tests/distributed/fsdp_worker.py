"""Three SGD steps of `DistillationTrainer.compute_loss` with FSDP2 (`fully_shard` applied directly: the Trainer's and
accelerate's FSDP do not engage on CPU), run alone or as one rank under torchrun (gloo); see test_fsdp.py.

Usage: `python fsdp_worker.py SPEC_JSON`, SPEC: out (folder), scenarios (name -> settings, below). Each scenario trains
a fresh tiny student on the same global batches (4 rows a step, each rank its contiguous share) at alpha 0.5 with a
live teacher. Settings:
- unit: how the student is sharded. 'root': each layer and the root. 'tail': accelerate's layout, the final norm and
  the head (and tied embeddings) in one unit not resharded after forward. 'resharded': that unit resharded after
  forward, so the head is a DTensor when the loss reads it.
- tie (tied embeddings), shard_teacher (training.shard_teacher), ensemble (a second teacher), features (attention
  and hidden-state terms of the same width: no projector), implementation (loss.implementation, default chunked),
  cached (the offline cache's source: the teacher's top-k rows come with the batch, no live teacher).
A single process trains unsharded. Rank 0 writes out/<scenario>.json (the loss of each step, all ranks' mean) and
out/<scenario>.pt (the final full weights).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))

from alambic.config import LossConfig  # noqa: E402
from alambic.losses.topk import topk_of_log_probs  # noqa: E402
from alambic.teachers.cached import CachedTopK  # noqa: E402
from alambic.teachers.ensemble import WeightedTeacher  # noqa: E402
from alambic.training.trainer import DistillationTrainer  # noqa: E402
from helpers import tiny_model  # noqa: E402

spec = json.loads(sys.argv[1])
out = Path(spec["out"])
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
STEPS, ROWS, LENGTH = 3, 4, 16


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """4 rows with prompts and padding of different lengths: the ranks count different numbers of tokens."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(4, 320, (ROWS, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row in range(ROWS):
        pad = (row * 3 + step) % 6
        prompt = 1 + (row * 5 + step) % 7
        if pad:
            ids[row, -pad:], mask[row, -pad:], labels[row, -pad:] = 3, 0, -100
        labels[row, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shard_student(student: torch.nn.Module, unit: str) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in student.model.layers:
        fully_shard(layer)
    if unit != "root":
        tied = student.get_input_embeddings().weight is student.get_output_embeddings().weight
        tail = [student.model.norm, *([student.model.embed_tokens] if tied else []), student.lm_head]
        fully_shard(tail, reshard_after_forward=unit == "resharded")
    fully_shard(student)


def full_state(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in student.named_parameters()
    }


def cached_rows(teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The offline cache's rows of these sequences (top-8 log-probs at T = 1 and the tail), in counted-position
    order, as `CachedTeacherCollator` brings them."""
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ids, logprobs, tail = topk_of_log_probs(torch.log_softmax(logits[batch["labels"][:, 1:] != -100], -1), 8)
    return {"teacher_ids": ids, "teacher_logprobs": logprobs, "teacher_tail": tail}


def train(settings: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    tie = settings.get("tie", True)
    student = tiny_model("llama", seed=2, num_layers=2, tie=tie).train()
    teacher = tiny_model("llama", seed=1, tie=tie)
    additional = (
        [WeightedTeacher("second", tiny_model("llama", seed=3, tie=tie), weight=0.5)]
        if settings.get("ensemble")
        else []
    )
    features = {"attention": {}, "hidden_states": {}} if settings.get("features") else None
    if world > 1:
        shard_student(student, settings["unit"])
    from transformers import TrainingArguments

    args = TrainingArguments(str(out / "args"), use_cpu=True, report_to=[], per_device_train_batch_size=ROWS // world)
    cached = settings.get("cached", False)
    trainer = DistillationTrainer(
        model=student,
        args=args,
        teacher=None if cached else teacher,
        additional_teachers=additional,
        source=CachedTopK() if cached else None,
        loss_config=LossConfig(
            alpha=0.5, implementation=settings.get("implementation", "chunked"), chunk_size=5, features=features
        ),
        shard_teacher=settings.get("shard_teacher", "auto"),
    )
    if world > 1 and not cached:
        from alambic.sharding import is_sharded

        want = settings.get("shard_teacher", "auto") in ("auto", True)
        assert is_sharded(trainer.source.teacher_core) == want, "the teacher's sharding is not as set"
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    losses = []
    for step in range(STEPS):
        batch = global_batch(step)
        count = (batch["labels"][:, 1:] != -100).sum()  # the global count, as the Trainer gathers it
        share = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
        local = {k: v[share] for k, v in batch.items()}
        if cached:
            local.update(cached_rows(teacher, local))
        loss = trainer.compute_loss(student, local, num_items_in_batch=count)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:  # each rank's loss is scaled by the world size (FSDP averages the gradients): the mean is it
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses, full_state(student)


for name, settings in spec["scenarios"].items():
    losses, state = train(settings)
    if rank == 0:
        (out / f"{name}.json").write_text(json.dumps(losses))
        torch.save(state, out / f"{name}.pt")
if world > 1:
    dist.destroy_process_group()
