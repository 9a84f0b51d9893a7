"""The run folder's layout: the name of every entry the stages write and the report reads, in one place.

Names only (no imports), so that the stages, the pipeline, the data modules and the report can all read them
without depending on one another. Files private to one writer and reader stay with it (the generations' jsonl in
data/generate.py, the cache's shards in data/cache/).
"""

from __future__ import annotations

# Folders at the top of a run folder, one per stage that writes one (stages/__init__.py lists the stages).
DATA_DIR = "data"  # data: the tokenized splits and split.json
TEACHER_DIR = "teacher"  # teacher.fine_tune: checkpoints, metrics and the fine-tuned classifier (teacher/final)
STUDENT_DIR = "student"  # student: the built or checked student, student.json, pruning.json
GENERATIONS_DIR = "generations"  # generate: the teacher's responses (data.teacher_responses)
SELECTION_DIR = "selection"  # select: the band kept by teacher entropy (data.selection)
CACHE_DIR = "teacher_cache"  # cache: the teacher's top-k log-probs, one folder per split (data.teacher_cache)
CONTROL_DIR = "control"  # control: the CE control's training folder
LM_EVAL_TASKS_DIR = "lm_eval_tasks"  # evaluate: alambic's local lm-eval tasks, from the run's held-out documents
PLOTS_DIR = "plots"  # report: the figures
FINAL_DIR = "final"  # inside a training folder (the run folder itself for distill): the trained model
SPLITS = ("train", "validation")

# Files at the top of a run folder (or of a training folder: TRAIN_SUMMARY_FILE, METRICS_FILE).
MANIFEST_FILE = "manifest.json"  # pipeline.Manifest: each stage's inputs hash, status and timings
CONFIG_FILE = "config.yaml"  # the resolved config the run was made with
TRAIN_SUMMARY_FILE = "train_summary.json"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
REPORT_FILE, REPORT_HTML_FILE = "report.md", "report.html"

# Files inside those folders.
SPLIT_FILE = "split.json"  # in DATA_DIR
STUDENT_FILE, PRUNING_FILE = "student.json", "pruning.json"  # in STUDENT_DIR
SUMMARY_FILE = "summary.json"  # in GENERATIONS_DIR
SELECTION_FILE = "selection.json"  # in SELECTION_DIR
