"""Checkpoints a training can trust: which one to resume from, and whether weights may be exported.

A crash or a full disk can leave a checkpoint cut off. The Trainer writes `trainer_state.json` last, so a checkpoint
without it was cut off mid-write; but a file written before it can still be incomplete (a crash before the page cache
reached the disk, a copy cut short). Each file is checked from its own structure, cheaply, without loading a tensor:
- `*.safetensors`: an 8-byte header length, a JSON header, then exactly the bytes the header's offsets cover;
- files of `torch.save` (`optimizer.pt`, `scheduler.pt`, `rng_state*.pth`, `training_args.bin`): zip archives, whose
  directory is the file's last bytes, so a truncated one does not open;
- `trainer_state.json`: parses.

Each checkpoint also records the world size and engine that wrote it (`SCALE_FILE`): a resume on another number of
processes is checked against it (`check_resume_scale`).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

from alambic.utils import DiagnosedFailure, console

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# A damaged checkpoint is renamed so, beside the others: out of the Trainer's rotation (it globs `checkpoint-*`) and
# out of the resume, but there to look at. The next damaged checkpoint of the same step replaces it.
DAMAGED_PREFIX = "damaged-"
# The processes that wrote a checkpoint (world_size, engine, per-device batch, accumulation), beside the totals.
SCALE_FILE = "alambic_scale.json"
# Engines whose checkpoints hold each rank's shard of the weights or optimizer state (FSDP's sharded state dicts,
# DeepSpeed ZeRO's global_step* folders): resumable only by as many processes under the same engine.
SHARDED_ENGINES = ("fsdp", "deepspeed")


class NonFiniteWeightsError(DiagnosedFailure):
    """Weights about to be exported hold NaN or inf values."""


class ResumeScaleError(DiagnosedFailure):
    """A checkpoint holds per-rank shards that this launch's number of processes or engine cannot read."""


def safetensors_problem(path: Path) -> str | None:
    """What makes a .safetensors file incomplete or unreadable, or None when its header and size agree."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is {size} bytes, shorter than a safetensors header"
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            return f"{path.name} is {size} bytes, but its header alone claims {header_len}: cut off"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{path.name}'s header is not valid JSON: the file is damaged"
    try:
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, AttributeError):
        return f"{path.name}'s header does not describe tensors: the file is damaged"
    expected = 8 + header_len + end
    if size != expected:
        return f"{path.name} is {size:,} bytes where its header says {expected:,}: " + (
            "cut off" if size < expected else "damaged"
        )
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` (a Trainer checkpoint) cannot be resumed from, or None when every file is complete."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the Trainer writes it last): cut off mid-write"
    try:
        json.loads(state.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "trainer_state.json is not valid JSON"
    tensors = sorted(folder.glob("*.safetensors"))
    # Other formats the Trainer may write (a .bin state dict, FSDP's sharded folders, DeepSpeed's global_step*).
    other = [
        p
        for p in folder.iterdir()
        if p.name == "pytorch_model.bin" or "fsdp" in p.name or p.name.startswith("global_step")
    ]
    if not tensors and not other:
        return "no model weights (no *.safetensors)"
    for path in tensors:
        if problem := safetensors_problem(path):
            return problem
    for path in sorted([*folder.glob("*.pt"), *folder.glob("*.pth"), *folder.glob("*.bin")]):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError):
            return (
                f"{path.name} ({path.stat().st_size:,} bytes) is not a complete torch.save archive: cut off or damaged"
            )
    return None


def last_complete_checkpoint(folder: Path, remove_incomplete: bool = True) -> Path | None:
    """Newest `checkpoint-N` in `folder` whose files are all complete (`checkpoint_problem`), or None.

    With `remove_incomplete` (the main process), newer ones are dealt with on the way, and said: one cut off before
    its `trainer_state.json` is removed (nothing in it is finished); one whose files are damaged is set aside as
    `damaged-checkpoint-N`, so the resume falls back to the previous complete one.
    """
    if not folder.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.match(p.name))
    )
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if not remove_incomplete:
            continue
        if not (path / "trainer_state.json").is_file():
            console.print(f"removing incomplete checkpoint {path} ({problem})", style="yellow", markup=False)
            shutil.rmtree(path)
            continue
        aside = path.with_name(DAMAGED_PREFIX + path.name)
        if aside.exists():
            shutil.rmtree(aside)
        path.rename(aside)
        console.print(
            f"checkpoint {path} is damaged: {problem}. Set aside as {aside} (delete it once looked at); "
            "resuming from the previous complete checkpoint, if any.",
            style="yellow",
            markup=False,
        )
    return None


def check_finite_weights(folder: Path) -> None:
    """Refuse the weights saved in `folder` (its *.safetensors) if any tensor holds NaN or inf, naming each.

    Read one tensor at a time, as saved (so whatever gathered them, DeepSpeed or FSDP, they are checked as exported).

    Raises:
        NonFiniteWeightsError: naming the tensors and how many of their values are not finite.
    """
    bad, total = [], 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                total += 1
                tensor = f.get_tensor(name)
                if tensor.is_floating_point():
                    count = int((~torch.isfinite(tensor)).sum())
                    if count:
                        bad.append(f"{name} ({count:,} of {tensor.numel():,} values)")
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise NonFiniteWeightsError(
            f"{len(bad)} of {total} tensors of the trained model hold NaN or inf values: {shown}. Refusing to export "
            "them. The training diverged: lower the learning rate, or train in float32 (bf16: false / fp16: false)."
        )


def read_scale_record(checkpoint: Path) -> tuple[dict, str | None]:
    """The world size and engine that wrote `checkpoint` (`SCALE_FILE`), and a note when the checkpoint predates
    the record: then it is taken as one process without sharding (world_size 1, engine 'single'), as every alambic
    training was before several processes were supported."""
    path = checkpoint / SCALE_FILE
    if path.is_file():
        return json.loads(path.read_text()), None
    return {"world_size": 1, "engine": "single"}, (
        f"{checkpoint.name} has no {SCALE_FILE} (written before alambic recorded it): taken as written by one "
        "process without sharding"
    )


def global_batch(record: dict) -> int | None:
    """Sequences per optimizer step of the training `record` describes (None if it does not say)."""
    try:
        return record["per_device_train_batch_size"] * record["gradient_accumulation_steps"] * record["world_size"]
    except (KeyError, TypeError):
        return None


def check_resume_scale(checkpoint: Path, now: dict) -> str | None:
    """May this launch (`now`: its `AlambicTrainer.scale_record()`) resume from `checkpoint`? A note to print, or
    None when nothing changed.

    - The same world size and engine: yes.
    - A checkpoint of one process or DDP: yes, on any world size and engine: it holds the full weights and optimizer
      state. Each rank's random state is restored where the checkpoint has that rank's file (`rng_state_<rank>.pth`
      under several processes, `rng_state.pth` under one), the others go on from the seed (dropout and on-policy
      sampling draw otherwise; the data order has its own seeded sampler). The data continues where it stopped
      only if the global batch is unchanged: the Trainer skips the batches of the steps taken, counted in the new
      batch.
    - A checkpoint of sharded state (FSDP, DeepSpeed ZeRO) on another world size or engine: refused, naming both.

    Raises:
        ResumeScaleError: the checkpoint is sharded for another world size or engine.
    """
    then, note = read_scale_record(checkpoint)
    then_world, then_engine = int(then.get("world_size", 1)), str(then.get("engine", "single"))
    world, engine = int(now["world_size"]), str(now["engine"])
    if then_world == world and then_engine == engine:
        return note
    if then_engine.startswith(SHARDED_ENGINES):
        raise ResumeScaleError(
            f"{checkpoint} was written by {then_world} process{'es' if then_world != 1 else ''} under {then_engine}, "
            f"whose checkpoints hold each rank's shard of the weights and optimizer state; this launch runs "
            f"{world} process{'es' if world != 1 else ''} under {engine}, which cannot read those shards. Resume "
            f"with {then_world} process{'es' if then_world != 1 else ''} in all under {then_engine} (on one machine "
            f"`torchrun --nproc_per_node {then_world}`, or `accelerate launch --num_processes {then_world}` with the "
            "same accelerate config), or start afresh with --restart"
        )
    notes = [note] if note else []
    notes.append(
        f"resuming {checkpoint.name}, written by {then_world} process(es) under {then_engine}, on {world} "
        f"under {engine}: it holds the full weights and optimizer state"
    )
    # The Trainer reads rng_state_<rank>.pth under several processes, rng_state.pth under one, and goes on without
    # when its file is missing (it ignores the others).
    missing = [
        r for r in range(world) if not (checkpoint / (f"rng_state_{r}.pth" if world > 1 else "rng_state.pth")).is_file()
    ]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        several = len(missing) > 1
        notes.append(
            f"rank{'s' if several else ''} {shown} find{'' if several else 's'} no random state of "
            f"{'their' if several else 'its'} own in it and go on from the seed (dropout and on-policy "
            "sampling draw otherwise than an uninterrupted run; the data order does not depend on it)"
        )
    before, after = global_batch(then), global_batch(now)
    if before is not None and after is not None and before != after:
        notes.append(
            f"the global batch changes from {before} to {after} sequences per step (per-device batch x "
            "accumulation x processes): the data order does not continue exactly where it stopped (keep "
            f"{before} to continue it)"
        )
    return "; ".join(notes)
