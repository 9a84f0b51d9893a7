"""Checkpoints a training can trust: which one to resume from, and whether weights may be exported.

A crash or a full disk can leave a checkpoint cut off. The Trainer writes `trainer_state.json` last, so a checkpoint
without it was cut off mid-write; but a file written before it can still be incomplete (a crash before the page cache
reached the disk, a copy cut short). Each file is checked from its own structure, cheaply, without loading a tensor:
- `*.safetensors`: an 8-byte header length, a JSON header, then exactly the bytes the header's offsets cover;
- files of `torch.save` (`optimizer.pt`, `scheduler.pt`, `rng_state*.pth`, `training_args.bin`): zip archives, whose
  directory is the file's last bytes, so a truncated one does not open;
- `trainer_state.json`: parses.
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


class NonFiniteWeightsError(DiagnosedFailure):
    """Weights about to be exported hold NaN or inf values."""


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
            "cut off" if size < expected else "damaged")
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
    other = [p for p in folder.iterdir() if p.name == "pytorch_model.bin" or "fsdp" in p.name
             or p.name.startswith("global_step")]
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
            return (f"{path.name} ({path.stat().st_size:,} bytes) is not a complete torch.save archive: "
                    "cut off or damaged")
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
        console.print(f"checkpoint {path} is damaged: {problem}. Set aside as {aside} (delete it once looked at); "
                      "resuming from the previous complete checkpoint, if any.", style="yellow", markup=False)
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
            "them. The training diverged: lower the learning rate, or train in float32 (bf16: false / fp16: false).")
