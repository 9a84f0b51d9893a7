"""Checks of a run config against its models, before any stage runs.

A config that loads (`config.load_config`) can still ask for what its models cannot give: sequences longer than the
teacher reads, teacher layers that do not exist, a student wider than its teacher, a batch whose logits do not fit in
memory. Each of these used to fail minutes into the run (after the data stage) or be killed by the kernel without a
word; the teacher's config, read in a fraction of a second (`models.read_model_shape`), says so before any work.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from alambic.config import ConfigError, FromTeacherConfig, ModelConfig, RunConfig
from alambic.utils import console, resolve_device

if TYPE_CHECKING:
    from alambic.models import ModelShape

# A sequence length refused where the model's own limit is unknown (a config without max_position_embeddings, or one
# that cannot be read without a download): 128k tokens, the longest context of common open models.
MAX_SEQ_LEN_WITHOUT_LIMIT = 131_072

# Measured peak of the importance pass (measure_importance with skip-loss on a tiny Llama, hidden 32, 4 layers; one
# batch of 2-8 x 1024-2048 tokens, V 4k-16k): RSS grew 2.08-2.22 times one (N, V) float32 logits tensor, the logits
# and the cross-entropy's log-probs.
IMPORTANCE_LOGITS_COPIES = 2


def check_inputs(config: RunConfig, *, pending: Collection[str] = (), origin: str | None = None) -> None:
    """Refuse, before any stage runs, a config its teacher or given student cannot run; warn where it may not fit.

    Args:
        pending: roles ("teacher", "student") whose model an earlier chain step writes: not there yet, not checked.
        origin: which config it is, for the message ('chain step 2/3 finetune', 'sweep point ...').

    Raises:
        ConfigError: every problem found, one per line, each naming the field, the value and the model's limit.
        ModelLoadError: a model that cannot be read at all (missing file, not GGUF, a folder without weights).
    """
    from alambic.models import read_model_shape

    teacher = None if "teacher" in pending else read_model_shape(config.teacher)
    models = [] if "teacher" in pending else [("teacher", config.teacher.model, teacher)]
    if config.student.model is not None and "student" not in pending:
        given = ModelConfig(model=config.student.model, gguf_file=config.student.gguf_file)
        models.append(("student", config.student.model, read_model_shape(given)))
    models += [
        (f"additional_teachers[{i}]", cfg.model, read_model_shape(cfg))
        for i, cfg in enumerate(config.additional_teachers)
    ]
    problems = [
        p for role, name, shape in models for p in _sequence_problems(config.data.max_seq_len, role, name, shape)
    ]
    if config.student.from_teacher is not None and teacher is not None:
        problems += _shape_problems(config.student.from_teacher, teacher)
    if problems:
        raise ConfigError(
            f"{origin or 'the config'} asks for more than its models give:\n  - " + "\n  - ".join(problems)
        )
    if teacher is not None and teacher.vocab_size:
        _check_importance_memory(config, teacher.vocab_size)


def _sequence_problems(max_seq_len: int, role: str, name: str, shape: ModelShape | None) -> list[str]:
    """data.max_seq_len against a model's positions (its config), or against the named bound where it gives none."""
    limit = shape.max_position_embeddings if shape is not None else None
    if limit is not None:
        if max_seq_len <= limit:
            return []
        return [
            (
                f"data.max_seq_len {max_seq_len} is longer than the {role} {name!r} reads: its config "
                f"({shape.source}) gives max_position_embeddings {limit}; set data.max_seq_len to at most {limit}"
            )
        ]
    if max_seq_len <= MAX_SEQ_LEN_WITHOUT_LIMIT:
        return []
    why = "gives no max_position_embeddings" if shape is not None else "cannot be read without a download"
    return [
        (
            f"data.max_seq_len {max_seq_len}: the {role} {name!r}'s config {why}, and without it sequences are held "
            f"to {MAX_SEQ_LEN_WITHOUT_LIMIT} tokens (MAX_SEQ_LEN_WITHOUT_LIMIT); lower data.max_seq_len"
        )
    ]


def _shape_problems(cut: FromTeacherConfig, teacher: ModelShape) -> list[str]:
    """student.from_teacher against the teacher's sizes: what the student stage would refuse after the data stage."""
    problems = []
    n = teacher.num_hidden_layers
    if n is not None and isinstance(cut.layers, list) and max(cut.layers) >= n:
        missing = [i for i in cut.layers if i >= n]
        problems.append(
            f"student.from_teacher.layers {cut.layers}: the teacher has num_hidden_layers {n} (indices 0 "
            f"to {n - 1}, {teacher.source}), so {missing} do not exist"
        )
    sizes = {
        "num_layers": n,
        "num_attention_heads": teacher.num_attention_heads,
        "num_key_value_heads": teacher.num_key_value_heads,
        "intermediate_size": teacher.intermediate_size,
        "hidden_size": teacher.hidden_size,
    }
    for field, limit in sizes.items():
        value = getattr(cut, field)
        if value is not None and limit is not None and value > limit:
            problems.append(
                f"student.from_teacher.{field}={value}: keep between 1 and the teacher's {limit} ({teacher.source})"
            )
    return problems


def available_memory(device: str) -> int | None:
    """Bytes free for a new allocation on `device` ('cpu' or 'cuda...'); None where it cannot be told."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _check_importance_memory(config: RunConfig, vocab_size: int) -> None:
    """The student stage's importance pass holds a calibration batch's logits and log-probs, (B x T, V) float32 each
    (its peak measured at 2.1-2.2 times one). Text data fills every sequence to data.max_seq_len; chat and
    classification sequences are padded only to the longest of their batch, so there the figure is an upper bound and
    only warns."""
    cut = config.student.from_teacher
    if cut is None or not cut.needs_importance or config.task != "causal_lm":
        return
    batch = min(config.evaluation.batch_size, cut.calibration_sequences)
    need = IMPORTANCE_LOGITS_COPIES * batch * config.data.max_seq_len * vocab_size * 4
    try:
        device = str(resolve_device(config.teacher.device))
    except ValueError:  # CUDA asked for where there is none: the stage that loads the teacher says so
        return
    free = available_memory(device)
    if free is None or need <= free:
        return
    message = (
        f"the student stage's importance pass needs at least {_size(need)} on {device} for one calibration "
        f"batch's logits and log-probs ({IMPORTANCE_LOGITS_COPIES} x evaluation.batch_size {batch} x "
        f"data.max_seq_len {config.data.max_seq_len} x vocabulary {vocab_size} x 4 bytes), and {_size(free)} "
        "is available: lower evaluation.batch_size or data.max_seq_len"
    )
    if config.data.format == "text":
        raise ConfigError(message)
    console.print(
        f"warning: {message} (chat sequences are padded only to their batch's longest, so it may fit)",
        style="yellow",
        markup=False,
    )  # the message holds user values: printed as written


def _size(num_bytes: float) -> str:
    """Decimal units, as `free -H` and the kernel's messages give them."""
    for unit in ("B", "kB", "MB"):
        if num_bytes < 1000:
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} GB"
