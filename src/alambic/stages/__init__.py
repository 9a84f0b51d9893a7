"""The stages of `alambic run`, in order: data -> teacher -> student -> generate -> select -> cache -> distill ->
control -> evaluate -> report.

Each is a thin function over library code (students, data, training, evaluation, report), so that
Python users can call the same pieces without the CLI. They live by what they make: paths.py (the run folder's
layout, where the student and teacher are loaded from), data.py (data, generate, select, cache), models.py
(teacher, student, tokenizer checks), training.py (distill, control), evaluation.py (evaluate, report).
"""

from __future__ import annotations

from alambic.pipeline import Stage
from alambic.stages.data import build_cache, cache_folder, distill_train_set, generate, prepare_data, select, teacher_id
from alambic.stages.evaluation import evaluate, report
from alambic.stages.models import (build_student, check_same_tokenizer, fine_tune, load_additional_teachers,
                                   prune_student)
from alambic.stages.paths import (CACHE_DIR, CONTROL_DIR, DATA_DIR, FINAL_DIR, GENERATIONS_DIR, SELECTION_DIR, SPLITS,
                                  STUDENT_DIR, TEACHER_DIR, run_labels, student_source, teacher_source)
from alambic.stages.training import control, distill

__all__ = [
    "CACHE_DIR", "CONTROL_DIR", "DATA_DIR", "FINAL_DIR", "GENERATIONS_DIR", "SELECTION_DIR", "SPLITS", "STAGES",
    "STUDENT_DIR", "TEACHER_DIR", "build_cache", "build_student", "cache_folder", "check_same_tokenizer", "control",
    "distill", "distill_train_set", "evaluate", "fine_tune", "generate", "load_additional_teachers", "prepare_data",
    "prune_student", "report", "run_labels", "select", "stages_until", "student_source", "teacher_id",
    "teacher_source",
]


# Here, not in a submodule: the CLI, sweep and chain read `alambic.stages.STAGES` when they run (tests swap it).
STAGES: list[Stage] = [
    # student.model: a given student with another tokenizer than the teacher's is trained on its own tokens.
    Stage("data", ("teacher", "data", "student.model", "student.gguf_file"), (DATA_DIR,), prepare_data),
    Stage("teacher", ("teacher",), (f"{TEACHER_DIR}/{FINAL_DIR}/config.json",), fine_tune,
          enabled=lambda c: c.teacher.fine_tune is not None),
    Stage("student", ("teacher", "student"), (f"{STUDENT_DIR}/student.json",), build_student),
    # generate and select read the data, not the student: `after` keeps a new student from redoing them.
    Stage("generate", ("data.teacher_responses",), (f"{GENERATIONS_DIR}/summary.json",), generate,
          enabled=lambda c: c.data.teacher_responses is not None, after=("data",)),
    Stage("select", ("data.selection",), (f"{SELECTION_DIR}/selection.json",), select,
          enabled=lambda c: c.data.selection is not None, after=("data", "generate")),
    Stage("cache", ("loss",), (f"{CACHE_DIR}/train/manifest.json",), build_cache,
          enabled=lambda c: c.data.teacher_cache is not None),
    Stage("distill", ("loss", "training", "teacher_weight", "additional_teachers"),
          (f"{FINAL_DIR}/config.json", "train_summary.json", "metrics.jsonl"), distill),
    Stage("control", ("training",), (f"{CONTROL_DIR}/{FINAL_DIR}/config.json",), control,
          enabled=lambda c: c.evaluation.ce_control, after=("data", "student")),
    Stage("evaluate", ("evaluation",), ("eval.json",), evaluate),
    Stage("report", (), ("report.md", "report.html"), report),
]


def stages_until(name: str) -> list[Stage]:
    names = [s.name for s in STAGES]
    return STAGES[: names.index(name) + 1]
