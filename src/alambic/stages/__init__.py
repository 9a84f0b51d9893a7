"""The stages of `alambic run`, in order: data -> teacher -> student -> generate -> select -> cache -> distill ->
control -> evaluate -> report.

Each is a thin function over library code (students, data, training, evaluation, report), so that
Python users can call the same pieces without the CLI. They live by what they make: paths.py (where the student and
teacher are loaded from; the run folder's layout is alambic/layout.py), data.py (data, generate, select, cache),
models.py (teacher, student, tokenizer checks), training.py (distill, control), evaluation.py (evaluate, report).
"""

from __future__ import annotations

from alambic.config import DataConfig
from alambic.layout import (
    CACHE_DIR,
    CONTROL_DIR,
    DATA_DIR,
    EVAL_FILE,
    FINAL_DIR,
    GENERATIONS_DIR,
    METRICS_FILE,
    REPORT_FILE,
    REPORT_HTML_FILE,
    SELECTION_DIR,
    SELECTION_FILE,
    SPLITS,
    STUDENT_DIR,
    STUDENT_FILE,
    SUMMARY_FILE,
    TEACHER_DIR,
    TRAIN_SUMMARY_FILE,
)
from alambic.pipeline import Stage
from alambic.stages.data import build_cache, cache_folder, distill_train_set, generate, prepare_data, select, teacher_id
from alambic.stages.evaluation import evaluate, report
from alambic.stages.models import (
    build_student,
    check_same_tokenizer,
    fine_tune,
    load_additional_teachers,
    prune_student,
)
from alambic.stages.paths import run_labels, student_source, teacher_source
from alambic.stages.training import control, distill

__all__ = [
    "CACHE_DIR",
    "CONTROL_DIR",
    "DATA_DIR",
    "DATA_FIELDS",
    "FINAL_DIR",
    "GENERATIONS_DIR",
    "SELECTION_DIR",
    "SPLITS",
    "STAGES",
    "STUDENT_DIR",
    "TEACHER_DIR",
    "build_cache",
    "build_student",
    "cache_folder",
    "check_same_tokenizer",
    "control",
    "distill",
    "distill_train_set",
    "evaluate",
    "fine_tune",
    "generate",
    "load_additional_teachers",
    "prepare_data",
    "prune_student",
    "report",
    "run_labels",
    "select",
    "stages_until",
    "student_source",
    "teacher_id",
    "teacher_source",
]


# Here, not in a submodule: the CLI, sweep and chain read `alambic.stages.STAGES` when they run (tests swap it).
# Each stage's inputs: the config field paths it reads, beside it (tests/test_stage_inputs.py checks them against the
# code). A stage's hash also covers the hash of the stage before it (or of its `after` stages), so a field a stage
# reads that an earlier stage already declares need not be declared again.
# Under a launcher a stage runs on rank 0 alone, the other ranks waiting (`Stage.ranks`, "main" by default), or on
# every rank (ranks="all"): the trainings, and a stage that splits its work across ranks.
# The data: the corpus fields, not those of the stages that follow it (the cache, the responses, the selection).
DATA_FIELDS = tuple(
    f"data.{name}"
    for name in DataConfig.model_fields
    if name not in ("teacher_cache", "teacher_responses", "selection")
)

STAGES: list[Stage] = [
    # student.model: a given student with another tokenizer than the teacher's is trained on its own tokens (a
    # pruned one, student.from_teacher, keeps the teacher's).
    Stage(
        "data",
        ("teacher", *DATA_FIELDS, "student.model", "student.gguf_file", "student.from_teacher?"),
        (DATA_DIR,),
        prepare_data,
    ),
    # A training on every rank (ranks="all"), as distill and control: the Trainer's DDP needs them all.
    Stage(
        "teacher",
        ("teacher",),
        (f"{TEACHER_DIR}/{FINAL_DIR}/config.json",),
        fine_tune,
        enabled=lambda c: c.teacher.fine_tune is not None,
        ranks="all",
    ),
    # Pruning measures importance in batches of evaluation.batch_size, under bf16 autocast where training.bf16 allows.
    Stage(
        "student",
        ("teacher", "student", "task", "training.bf16", "evaluation.batch_size"),
        (f"{STUDENT_DIR}/{STUDENT_FILE}",),
        build_student,
    ),
    # generate and select read the data, not the student: `after` keeps a new student from redoing them.
    Stage(
        "generate",
        ("data.teacher_responses",),
        (f"{GENERATIONS_DIR}/{SUMMARY_FILE}",),
        generate,
        enabled=lambda c: c.data.teacher_responses is not None,
        after=("data",),
        ranks="all",
    ),
    Stage(
        "select",
        ("data.selection",),
        (f"{SELECTION_DIR}/{SELECTION_FILE}",),
        select,
        enabled=lambda c: c.data.selection is not None,
        after=("data", "generate"),
    ),
    # The teacher's top-k log-probs at the distillation temperature: alpha and the divergence only weigh them later.
    Stage(
        "cache",
        ("teacher", "loss.temperature", "data.teacher_cache"),
        (f"{CACHE_DIR}/train/manifest.json",),
        build_cache,
        enabled=lambda c: c.data.teacher_cache is not None,
        ranks="all",
    ),
    Stage(
        "distill",
        ("loss", "training", "teacher_weight", "additional_teachers"),
        (f"{FINAL_DIR}/config.json", TRAIN_SUMMARY_FILE, METRICS_FILE),
        distill,
        ranks="all",
    ),
    # Plain cross-entropy: of the loss section, only how it is computed (stages.training.control).
    Stage(
        "control",
        ("training", "loss.implementation", "loss.chunk_size"),
        (f"{CONTROL_DIR}/{FINAL_DIR}/config.json",),
        control,
        enabled=lambda c: c.evaluation.ce_control,
        after=("data", "student"),
        ranks="all",
    ),
    Stage("evaluate", ("evaluation",), (EVAL_FILE,), evaluate, ranks="all"),
    Stage("report", (), (REPORT_FILE, REPORT_HTML_FILE), report),
]


def stages_until(name: str) -> list[Stage]:
    names = [s.name for s in STAGES]
    return STAGES[: names.index(name) + 1]
