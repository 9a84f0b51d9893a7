"""Set up and run one training of a student: arguments, data, callbacks, resume, final export."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from alambic.config import ConfigError, LossConfig, TrainingConfig
from alambic.data import PreparedData
from alambic.modeling import compile_layers
from alambic.teachers import BatchSettings, TeacherSource, choose
from alambic.teachers.ensemble import WeightedTeacher
from alambic.training.base import AlambicTrainer
from alambic.training.checkpoints import (
    CHECKPOINT_NAME,
    NonFiniteWeightsError,
    check_finite_weights,
    check_resume_scale,
    last_complete_checkpoint,
)
from alambic.training.trainer import DistillationTrainer
from alambic.utils import console, native_bf16, use_bf16


class JsonlMetricsCallback(TrainerCallback):
    """Appends every log record (step, losses, lr, eval metrics) as one JSON line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "time": round(time.time(), 3), **logs}) + "\n")


def drop_records_after(path: Path, step: int) -> None:
    """Drop the records of `path` (metrics.jsonl) logged after `step`: a training resumed from the checkpoint of
    `step` trains and logs the steps after it again, which a crash had already logged once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.strip() or json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def training_arguments(cfg: TrainingConfig, output_dir: Path, *, has_eval: bool) -> TrainingArguments:
    """`TrainingArguments` from the run config; `cfg.trainer_args` override anything here."""
    # The device the Trainer will pick (trainer_args' use_cpu included), for training.bf16 'auto'.
    device = (
        "cpu"
        if cfg.trainer_args.get("use_cpu")
        else "cuda"
        if torch.cuda.is_available()
        else "mps"
        if torch.backends.mps.is_available()
        else "cpu"
    )
    bf16 = use_bf16(cfg.bf16, device)
    if cfg.bf16 is True and device != "mps" and not native_bf16(device):
        console.print(
            f"[yellow]training.bf16: true, but this {device} has no native bfloat16 (a CPU needs AMX or "
            "AVX512-BF16): autocast is emulated here, several times slower than float32. "
            "training.bf16: auto trains in bf16 only where it is native.[/]"
        )
    args: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=int(round(cfg.warmup_ratio * cfg.max_steps)),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=bf16,
        fp16=cfg.fp16,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if (cfg.eval_steps and has_eval) else "no",
        eval_steps=cfg.eval_steps,
        report_to=cfg.report_to or "none",
        seed=cfg.seed,
        dataloader_num_workers=cfg.dataloader_num_workers,
        remove_unused_columns=False,
        prediction_loss_only=True,
        disable_tqdm=False,
        logging_first_step=True,
        # Show a non-finite loss as it is: the filter logs it as the window's running mean, 0.0 at a window's start.
        # (AlambicTrainer stops at such a step, or leaves it out of the logged loss under on_nonfinite: skip.)
        logging_nan_inf_filter=False,
    )
    if cfg.packing == "group_by_length":  # batches of similar lengths (padding_free is the collator's)
        args["train_sampling_strategy"] = "group_by_length"
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        # Told it runs on CPU, the Trainer allows bf16 autocast there and sets up DDP (gloo) under torchrun.
        args["use_cpu"] = True
    args.update(cfg.trainer_args)
    try:
        return TrainingArguments(**args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"training / training.trainer_args rejected by transformers.TrainingArguments: {exc}"
        ) from None


def restore_forward(model: torch.nn.Module | None) -> None:
    """Undo accelerate's mixed-precision wrapper on a model's forward (`prepare_model` replaces it in place by an
    autocast one), and the compilation of its layers (`training.torch_compile`). The teacher object outlives the
    trainer (`load_model(cache=True)` shares it with the next stages): left wrapped, the evaluation would score the
    teacher and time its generation under bf16 autocast while the students run in their own dtype (measured: 4x
    slower decoding on CPU)."""
    if getattr(model, "_alambic_compiled_layers", False):  # training.torch_compile: eager layers again
        compile_layers(model, compiled=False)
    original = None if model is None else model.__dict__.pop("_original_forward", None)
    if original is None:
        return
    if getattr(original, "__func__", None) is type(model).forward:
        model.__dict__.pop("forward", None)  # back to the class's own forward
    else:
        model.forward = original
    model.__dict__.pop("_is_accelerate_prepared", None)


def train(
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    *,
    teacher: PreTrainedModel | None,
    loss: LossConfig,
    training: TrainingConfig,
    output_dir: Path,
    resume: bool = True,
    callbacks: list[TrainerCallback] | None = None,
    kept_layers: list[int] | None = None,
    additional_teachers: Sequence[WeightedTeacher] = (),
    teacher_weight: float = 1.0,
    source: TeacherSource | None = None,
) -> dict[str, Any]:
    """Train `student` and export it to `output_dir/final` (HF format, tokenizer included).

    `source`: where the soft loss's teacher signal comes from (`teachers.choose`: live, an offline top-k cache, a
    teacher with another tokenizer); None: chosen from `teacher`, `additional_teachers` and `teacher_weight` (a live
    teacher, or none at loss.alpha = 0). The source makes the batches it reads (`source.batches`: the sets and the
    collator; the offline cache is checked against the data there, before any step). Checkpoints go to
    `output_dir/checkpoints`; with `resume`, training continues from the newest complete one. Metrics stream to
    `output_dir/metrics.jsonl`.
    `kept_layers`: the teacher layer each student layer was copied from (`student/student.json`), which
    `loss.features.layer_map: auto` pairs up. A feature projector (`loss.features.hidden_states` across widths) is
    saved in each checkpoint and restored on resume, but is not part of `final/`, which stays an ordinary HF model.
    `additional_teachers` and `teacher_weight`: several teachers, combined as `loss.teachers` says (the
    teachers are not part of any checkpoint: a resumed training gets them again from its caller).

    Returns:
        A summary: steps, wall time, resumed-from step, final training loss, log history.
    """
    if source is None:
        source = choose(loss, teacher=teacher, additional=additional_teachers, teacher_weight=teacher_weight)
    # loss.on_policy answers each sequence's prompt: the batches carry its length
    batches = source.batches(data, BatchSettings.of(tokenizer.pad_token_id, loss, training))
    if training.torch_compile:  # the teachers' layers go back to eager after training (restore_forward)
        for model in (student, *source.models()):
            compile_layers(model)

    def make_trainer(args: TrainingArguments, all_callbacks: list[TrainerCallback]) -> DistillationTrainer:
        return DistillationTrainer(
            model=student,
            args=args,
            train_dataset=batches.train,
            eval_dataset=batches.validation if len(batches.validation) else None,
            data_collator=batches.collator,
            processing_class=tokenizer,
            source=source,
            loss_config=loss,
            kept_layers=kept_layers,
            shard_teacher=training.shard_teacher,
            callbacks=all_callbacks,
        )

    trainer, summary = fit_and_export(
        make_trainer,
        training=training,
        has_eval=len(data.validation) > 0,
        tokenizer=tokenizer,
        output_dir=output_dir,
        resume=resume,
        callbacks=callbacks,
        teachers=source.models(),
    )
    return {
        **summary,
        "tokens_per_step": training.per_device_train_batch_size
        * training.gradient_accumulation_steps
        * summary["scale"]["world_size"]  # every rank's sequences make one optimizer step
        * (len(data.train[0]["input_ids"]) if len(data.train) else 0),
        **({"on_policy": on_policy_summary(trainer)} if trainer.on_policy is not None else {}),
        "log_history": trainer.state.log_history,
    }


def fit_and_export(
    make_trainer: Callable[[TrainingArguments, list[TrainerCallback]], AlambicTrainer],
    *,
    training: TrainingConfig,
    has_eval: bool,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: Path,
    resume: bool,
    callbacks: list[TrainerCallback] | None = None,
    teachers: Sequence[torch.nn.Module | None] = (),
    settings: str = "training",
) -> tuple[AlambicTrainer, dict[str, Any]]:
    """What every alambic training shares, whatever its Trainer: checkpoints in `output_dir/checkpoints` (with
    `resume`, continue from the newest complete one; without, start clean), metrics streamed to
    `output_dir/metrics.jsonl`, non-finite steps stopped or skipped (`training.on_nonfinite`), the teachers' own
    forward given back afterwards (`restore_forward`), and the trained model exported to `output_dir/final` (HF
    format, tokenizer included, arguments as `training_args.json`; no pickle) through a temporary folder, never with
    a non-finite weight.

    Args:
        make_trainer: builds the Trainer from the TrainingArguments and the callbacks to pass it.
        settings: the config section `training` comes from, named in errors (`teacher.fine_tune` for a teacher's
            fine-tuning).

    Returns:
        The trainer, and the summary every training reports: global_step, resumed_from, train_seconds,
        train_loss (over the whole run, across resumes), nonfinite_steps_skipped, device, precision, torch_threads,
        scale (`scale_summary`: world size, engine, precision, each rank's peak memory).

    Raises:
        NonFiniteTrainingError: a step's loss or gradient norm was not finite (and `on_nonfinite` is 'stop', or too
            many were in a row).
        NonFiniteWeightsError: the trained weights hold NaN or inf; nothing is exported.
        ResumeScaleError: the checkpoint to resume holds shards (FSDP, DeepSpeed) of another world size or engine.
    """
    checkpoints = output_dir / "checkpoints"
    metrics_path = output_dir / "metrics.jsonl"
    args = training_arguments(training, checkpoints, has_eval=has_eval)
    is_main = args.process_index == 0  # under a launcher, only rank 0 touches shared files
    with args.main_process_first(desc="checkpoint clean-up"):
        if is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            if not resume and checkpoints.exists():
                shutil.rmtree(checkpoints)
        last = last_complete_checkpoint(checkpoints, remove_incomplete=is_main) if resume else None
        resumed_from = int(CHECKPOINT_NAME.match(last.name).group(1)) if last else None
        if is_main and last is None and metrics_path.exists():
            metrics_path.unlink()
        elif is_main and last is not None:
            drop_records_after(metrics_path, resumed_from)
    trainer = make_trainer(args, [JsonlMetricsCallback(metrics_path), *(callbacks or [])])
    trainer.configure_nonfinite(training.on_nonfinite, settings)
    finished = last is not None and resumed_from >= args.max_steps
    if last is not None:
        # every rank reads the same record, so every rank refuses alike (ResumeScaleError), before any collective
        note = check_resume_scale(last, trainer.scale_record())
        if is_main:
            console.print(f"{last} ends the training: exporting it" if finished else f"resuming from {last}")
            if note:
                console.print(note, style="yellow", markup=False)
    t0 = time.perf_counter()
    try:
        if finished:
            # Trained to the end, not exported (final/ deleted, or a crash between the two): the Trainer would take
            # one more step before it looks at max_steps.
            trainer.load_finished(last)
        else:
            trainer.train(resume_from_checkpoint=str(last) if last else None)
    finally:
        for model in teachers:  # a caller may use them afterwards
            restore_forward(model)
    wall = time.perf_counter() - t0

    final, tmp = output_dir / "final", output_dir / "final.tmp"
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # every rank: DeepSpeed / FSDP gather the weights here
    if is_main:
        tokenizer.save_pretrained(tmp)
        # The Trainer pickles its arguments beside the model; an export must load without unpickling anything.
        (tmp / TRAINING_ARGS_NAME).unlink(missing_ok=True)
        (tmp / "training_args.json").write_text(trainer.args.to_json_string())
    trainer.accelerator.wait_for_everyone()
    try:
        check_finite_weights(tmp)  # every rank, so that all of them raise alike
        bad = None
    except NonFiniteWeightsError as exc:
        bad = exc
    # Every rank has read the export before rank 0 removes or renames it (else a slower rank finds no file).
    trainer.accelerator.wait_for_everyone()
    if bad is not None:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise bad
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    trainer.accelerator.wait_for_everyone()
    precision = "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32"
    return trainer, {
        "global_step": trainer.state.global_step,
        "resumed_from": resumed_from,
        "train_seconds": round(wall, 2),
        "train_loss": round(trainer.run_train_loss(), 6),
        "nonfinite_steps_skipped": trainer.totals["skipped"],
        "device": str(trainer.args.device),
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
        "scale": scale_summary(trainer, precision),
    }


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """This process's peak memory in bytes and what was measured: on CUDA, the most the allocator has held for
    tensors; elsewhere, the process's peak resident set (models, data and Python included, since the process
    started). None where neither can be read."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, "process peak RSS"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "process peak RSS"  # Linux counts KiB


def scale_summary(trainer: AlambicTrainer, precision: str) -> dict[str, Any]:
    """How the training was spread: world size, engine ('single', 'ddp', 'fsdp', 'deepspeed-zero<stage>'), precision
    and each rank's peak memory in rank order (gathered on every rank, so every rank returns the same summary)."""
    peak, kind = peak_memory(trainer.args.device)
    peaks = gather_object([peak]) if trainer.accelerator.num_processes > 1 else [peak]
    return {
        "world_size": trainer.accelerator.num_processes,
        "engine": trainer.engine,
        "precision": precision,
        "peak_memory_bytes_per_rank": peaks,
        "memory_kind": kind,
    }


def on_policy_summary(trainer: DistillationTrainer) -> dict[str, Any]:
    """What loss.on_policy cost over the whole training: steps drawn on-policy (exact: the draw is a function of the
    step), and the decoding's seconds and tokens summed over the logged records (this process; steps of a crashed
    run after its last log and before its checkpoint are not counted)."""
    history = trainer.state.log_history
    seconds = sum(r.get("on_policy_seconds", 0.0) for r in history)
    tokens = sum(r.get("on_policy_tokens", 0) for r in history)
    steps = trainer.on_policy.steps_on_policy(trainer.state.global_step)
    # responses sampled, and those cut at max_new_tokens before a stop token (they never show the student an ending)
    samples = sum(r.get("on_policy_samples", 0) for r in history)
    capped = sum(r.get("on_policy_capped", 0) for r in history)
    return {
        "steps": steps,
        "share": round(steps / max(trainer.state.global_step, 1), 4),
        "seconds": round(seconds, 3),
        "tokens": int(tokens),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "samples": int(samples),
        "capped": int(capped),
        "capped_share": round(capped / samples, 4) if samples else None,
        "sampling": trainer.on_policy.settings.to_dict(),
    }
