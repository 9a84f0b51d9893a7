"""Chained runs: two-stage (distil, then fine-tune), progressive and born-again (self-) distillation.

A config with a `chain` is a base: each step is an ordinary, resumable run of it with the step's overrides, in
`<output_dir>/<name>-chain/<step>/`, run in order. A step may take the previous step's final student as its
teacher (`teacher: previous`) or start from it (`student: previous`), or start again from the first step's
untrained student (`student: first`). Every step's config is validated before anything runs; the folders it
reads from earlier steps are only checked when it runs, and their identity (the earlier step's manifest record
of the stage that wrote them) goes into its config (`weights_id`), so the stage hashes redo a step whose inputs
were rewritten. Afterwards every step's final student is scored against the original teacher on one held-out
split (`chain_eval.json`), and `chain.md` / `chain.html` compare the steps.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from alambic.config import (
    ChainStep,
    ConfigError,
    RunConfig,
    apply_override,
    validate_config,
)
from alambic.pipeline import Manifest, Stage, run_stages
from alambic.runlock import hold_folder, wipe_held_folder
from alambic.stages import DATA_DIR, FINAL_DIR, STUDENT_DIR, teacher_source
from alambic.utils import atomic_write_json, console, sha256_of

CHAIN_FILE, COMPARISON_FILE = "chain.json", "chain_eval.json"
# (stage, file that exists once it is done) of what a step can read from an earlier one
_WRITTEN_BY = {
    FINAL_DIR: ("distill", f"{FINAL_DIR}/config.json"),
    STUDENT_DIR: ("student", f"{STUDENT_DIR}/student.json"),
}
_KEPT = ("perplexity", "top1_agreement", "top5_agreement", "kl_to_teacher", "num_tokens", "parameters", "intervals")


@dataclass(frozen=True)
class PlannedStep:
    name: str
    config: RunConfig  # validated; `weights_id`s unset until the step runs (`step_config`)
    reads: dict[str, tuple[str, str]]  # "teacher" / "student" -> (earlier step, FINAL_DIR or STUDENT_DIR)
    teacher_label: str  # for the report: where the step's teacher and student come from
    student_label: str


@dataclass(frozen=True)
class Chain:
    folder: Path  # <output_dir>/<name>-chain
    base: RunConfig
    steps: list[PlannedStep]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in: mappings merge key by key, anything else (lists too) replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _apply_step(data: dict[str, Any], step: ChainStep) -> dict[str, Any]:
    """The base config's dict with the step's own overrides, in the order written: nested or dotted."""
    for section in ("teacher", "student"):
        if isinstance(getattr(step, section), dict):
            data = deep_merge(data, {section: getattr(step, section)})
    for key, value in step.overrides.items():
        if "." in key:
            apply_override(data, f"{key}={json.dumps(value, default=str)}")  # JSON is YAML: the value comes back
        else:
            data = deep_merge(data, {key: value})
    return data


def plan_chain(config: RunConfig) -> Chain:
    """Build and validate every step's config, before anything runs.

    `previous` and `first` are resolved to the folders the earlier steps will write (`<step>/final`,
    `<first step>/student`); those need not exist yet.

    Raises:
        ConfigError: no `chain`, or steps whose config is invalid, all of them listed, each named with its fields.
    """
    if not config.chain:
        raise ConfigError(
            "the config has no `chain`: give a list of steps, e.g. [{name: distil}, {name: finetune, "
            "student: previous, loss: {alpha: 0}}], or run it as one run"
        )
    folder = Path(config.output_dir) / f"{config.name}-chain"
    base = config.model_dump(mode="json")
    base["chain"] = None
    planned: list[PlannedStep | None] = []
    problems = []
    n = len(config.chain)
    for i, step in enumerate(config.chain):
        where = f"chain step {i + 1}/{n} {step.name}"
        prev = config.chain[i - 1].name if i else None
        try:
            data = _apply_step(copy.deepcopy(base), step)
            # With a shorthand the section is still the base's mapping: the step may only set its dtype / device.
            reads, teacher_label, student_label = {}, None, None
            if step.teacher == "previous":
                data["teacher"].update(
                    model=str(folder / prev / FINAL_DIR), gguf_file=None, revision=None, fine_tune=None
                )
                reads["teacher"], teacher_label = (prev, FINAL_DIR), f"{prev} final"
            dtype = data["student"]["dtype"] if isinstance(data["student"], dict) else None
            if step.student == "previous":
                data["student"] = {"model": str(folder / prev / FINAL_DIR), "dtype": dtype}
                reads["student"], student_label = (prev, FINAL_DIR), f"{prev} final"
            elif step.student == "first":
                first = planned[0]
                if first is None:
                    raise ConfigError(f"{where}: student: first needs the first step's config, which is invalid")
                if first.config.student.from_teacher is not None:
                    data["student"] = {"model": str(first.config.run_dir / STUDENT_DIR), "dtype": dtype}
                    reads["student"] = (first.name, STUDENT_DIR)
                else:
                    data["student"] = {**first.config.student.model_dump(mode="json"), "dtype": dtype}
                student_label = f"{first.name} student, untrained"
            data.update(name=step.name, output_dir=str(folder))
            cfg = validate_config(data, origin=where)
            if teacher_label is None:
                teacher_label = "original" if cfg.teacher.model == config.teacher.model else cfg.teacher.model
            if student_label is None:
                student_label = (
                    "pruned from its teacher" if cfg.student.from_teacher is not None else f"given {cfg.student.model}"
                )
            planned.append(PlannedStep(step.name, cfg, reads, teacher_label, student_label))
        except ConfigError as exc:
            message = str(exc)
            problems.append(message if message.startswith(where) else f"{where}: {message}")
            planned.append(None)
    if problems:
        raise ConfigError("\n".join(problems))
    return Chain(folder=folder, base=config, steps=planned)


def _identity(chain: Chain, step: str, kind: str, *, needed_by: str) -> str:
    """Which weights `<step>/<kind>` holds: the step's manifest record of the stage that wrote them.

    Raises:
        FileNotFoundError: that stage is not done there, or its output is missing.
    """
    stage, output = _WRITTEN_BY[kind]
    run_dir = chain.folder / step
    entry = Manifest(run_dir / "manifest.json").stages.get(stage, {})
    if entry.get("status") != "done" or not (run_dir / output).exists():
        raise FileNotFoundError(
            f"chain step {needed_by!r} starts from {run_dir / kind}, which step {step!r} has not finished (its "
            f"{stage} stage is {entry.get('status', 'not run')}): run the whole chain, `alambic run CONFIG`, so that "
            f"{step!r} runs first"
        )
    return sha256_of([step, stage, entry.get("inputs_hash"), entry.get("finished")])


def step_config(chain: Chain, index: int) -> RunConfig:
    """Step `index`'s config, ready to run: the identities of the folders it reads from earlier steps filled in.

    Raises:
        FileNotFoundError: an earlier step it reads from is not finished.
    """
    step = chain.steps[index]
    update = {}
    for section, (source, kind) in step.reads.items():
        weights_id = _identity(chain, source, kind, needed_by=step.name)
        update[section] = getattr(step.config, section).model_copy(update={"weights_id": weights_id})
    return step.config.model_copy(update=update)


def _step_record(chain: Chain, step: PlannedStep) -> dict[str, Any]:
    distill = Manifest(step.config.run_dir / "manifest.json").stages.get("distill", {})
    return {
        "name": step.name,
        "run_dir": step.name,
        "teacher": step.teacher_label,
        "student": step.student_label,
        "reads": {k: list(v) for k, v in step.reads.items()},
        "status": "pending",
        "error": None,
        "distill_seconds": (distill.get("summary") or {}).get("train_seconds", distill.get("seconds")),
    }


def run_chain(chain: Chain, *, resume: bool = True, stages: list[Stage] | None = None) -> dict[str, Any]:
    """Run every step in order (each with `run_stages`), compare the steps, write `chain.json` and the report.

    A finished step whose inputs are unchanged is skipped stage by stage; a step whose earlier step was redone
    is redone (its `weights_id` changed). A failing step stops the chain (the steps after it read its results):
    it is recorded, the report is written for the steps done, and the error is raised again.

    Args:
        resume: False wipes the whole chain folder first (`--restart`).
        stages: the stages of each step; all of `alambic.stages.STAGES` by default.

    Returns:
        The chain record, as written to chain.json: per step its run folder, teacher and student sources,
        status, error and distillation seconds.

    Raises:
        RunFolderBusy: another process holds the chain folder (each step's folder is held by `run_stages`).
    """
    with hold_folder(chain.folder):
        return _run_held(chain, resume=resume, stages=stages)


def _run_held(chain: Chain, *, resume: bool, stages: list[Stage] | None) -> dict[str, Any]:
    from alambic.models import forget_loaded
    from alambic.report.chain import write_chain_report
    from alambic.stages import STAGES

    stages = STAGES if stages is None else stages
    if not resume:
        wipe_held_folder(chain.folder)
    record = {"name": chain.base.name, "started": time.time(), "steps": [_step_record(chain, s) for s in chain.steps]}
    path = chain.folder / CHAIN_FILE
    n = len(chain.steps)
    for i, (step, entry) in enumerate(zip(chain.steps, record["steps"])):
        console.rule(
            f"[bold]chain step {i + 1}/{n}: {step.name}[/] (teacher: {escape(step.teacher_label)}; "
            f"student: {escape(step.student_label)})"
        )
        entry.update(status="running", error=None)
        atomic_write_json(path, record)
        try:
            config = step_config(chain, i)
            # A teacher from an earlier step's final/ may have been loaded (cached) in this process before that step
            # was redone: load it anew, and free it afterwards. The original teacher stays cached for the next steps.
            if "teacher" in step.reads:
                forget_loaded(config.teacher.model)
            run_stages(config, stages, reuse_from=[s.config.run_dir for s in chain.steps[:i]])
            if "teacher" in step.reads:
                forget_loaded(config.teacher.model)
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            entry.update(
                _step_record(chain, step),
                status="interrupted" if interrupted else "failed",
                error=None if interrupted else f"{type(exc).__name__}: {exc}"[:2000],
            )
            atomic_write_json(path, record)
            if not interrupted:
                _report_quietly(chain.folder)
            raise
        entry.update(_step_record(chain, step), status="done")
        atomic_write_json(path, record)
    compare_steps(chain)
    record["finished"] = time.time()
    atomic_write_json(path, record)
    write_chain_report(chain.folder)
    return record


def _report_quietly(folder: Path) -> None:
    """The report of the steps done so far; a failure here must not hide the step's own error."""
    from alambic.report.chain import write_chain_report

    try:
        write_chain_report(folder)
    except Exception as exc:  # noqa: BLE001 - reported, then the original error goes on
        console.print(f"[yellow]chain report not written[/]: {escape(f'{type(exc).__name__}: {exc}')}")


def compare_steps(chain: Chain) -> dict[str, Any]:
    """Score every finished step's final student against the ORIGINAL teacher (the first step's) on the first
    step's held-out split, with `evaluation.quality.evaluate_against_teacher`: perplexity, top-1/top-5 agreement,
    KL(original teacher || student), each with its interval. One step at a time beside the teacher, so memory holds
    two models. Cached in chain_eval.json: a step is scored again only when its final/ or the reference changed.

    Returns:
        {"reference": ..., "teacher": metrics, "steps": {step: {"weights_id", **metrics}}}; for classifiers
        {"skipped": reason} (their steps' own evaluations compare accuracy and F1).
    """
    first = chain.steps[0].config
    path = chain.folder / COMPARISON_FILE
    if first.task != "causal_lm":
        result = {
            "skipped": "the comparison against the original teacher measures next-token figures; a classifier "
            "chain is compared by each step's own evaluation"
        }
        atomic_write_json(path, result)
        return result
    cached = json.loads(path.read_text()) if path.is_file() else {}
    stages = Manifest(first.run_dir / "manifest.json").stages
    device = first.evaluation.device or first.teacher.device
    reference = sha256_of(
        [stages.get(s, {}).get(k) for s in ("data", "teacher") for k in ("inputs_hash", "finished")]
        + [first.evaluation.batch_size, device]
    )
    kept = cached.get("steps", {}) if cached.get("reference") == reference else {}
    ids = {}
    for step in chain.steps:
        try:
            ids[step.name] = _identity(chain, step.name, FINAL_DIR, needed_by="the comparison")
        except FileNotFoundError:
            continue  # not finished: left out
    todo = [s for s in chain.steps if s.name in ids and kept.get(s.name, {}).get("weights_id") != ids[s.name]]
    result = {
        "reference": reference,
        "teacher": cached.get("teacher") if kept else None,
        "steps": {name: kept[name] for name in ids if name in kept and name not in {s.name for s in todo}},
    }
    if todo:
        from alambic.config import ModelConfig
        from alambic.data import load_prepared
        from alambic.evaluation.quality import evaluate_against_teacher
        from alambic.models import load_model, load_tokenizer

        console.rule(f"[bold]chain: {len(todo)} step(s) against the original teacher[/]")
        teacher_cfg = teacher_source(first, first.run_dir).model_copy(update={"device": device})
        teacher, tokenizer = load_model(teacher_cfg, cache=True), load_tokenizer(first.teacher)
        validation = load_prepared(first.run_dir / DATA_DIR).validation
        for step in todo:
            student = load_model(
                ModelConfig(model=str(step.config.run_dir / FINAL_DIR), dtype=step.config.student.dtype, device=device)
            )
            scores = evaluate_against_teacher(
                teacher,
                {step.name: student},
                validation,
                pad_token_id=tokenizer.pad_token_id,
                batch_size=first.evaluation.batch_size,
            )
            result["teacher"] = {k: v for k, v in scores["teacher"].items() if k in _KEPT}
            result["steps"][step.name] = {
                "weights_id": ids[step.name],
                **{k: v for k, v in scores[step.name].items() if k in _KEPT},
            }
            del student
    result["steps"] = {s.name: result["steps"][s.name] for s in chain.steps if s.name in result["steps"]}  # chain order
    atomic_write_json(path, result)
    return result
