"""Where the stages load the student and the teacher from: the models this run built or fine-tuned, else the
configured ones. The run folder's layout itself is alambic/layout.py."""

from __future__ import annotations

import json
from pathlib import Path

from alambic.config import ModelConfig, RunConfig
from alambic.layout import DATA_DIR, FINAL_DIR, SPLIT_FILE, STUDENT_DIR, TEACHER_DIR


def student_source(config: RunConfig, run_dir: Path) -> ModelConfig:
    """Where the (untrained) student is loaded from: the built one in the run folder, or the user's own."""
    if config.student.from_teacher is not None:
        return ModelConfig(model=str(run_dir / STUDENT_DIR), dtype=config.student.dtype, device=config.teacher.device)
    return ModelConfig(
        model=config.student.model,
        gguf_file=config.student.gguf_file,
        dtype=config.student.dtype,
        device=config.teacher.device,
    )


def teacher_source(config: RunConfig, run_dir: Path) -> ModelConfig:
    """Where the teacher every stage after 'teacher' uses is loaded from: the fine-tuned classifier of this run
    (teacher.fine_tune), else the configured teacher."""
    if config.teacher.fine_tune is not None:
        return ModelConfig(
            model=str(run_dir / TEACHER_DIR / FINAL_DIR), dtype=config.teacher.dtype, device=config.teacher.device
        )
    return config.teacher


def run_labels(config: RunConfig, run_dir: Path) -> list[str] | None:
    """Class names in id order (split.json) for task sequence_classification; None for causal LMs."""
    if config.task != "sequence_classification":
        return None
    return json.loads((run_dir / DATA_DIR / SPLIT_FILE).read_text())["labels"]
