"""Sequence classifiers: distillation on class logits, the teacher fine-tuning before it, and the run both share.

A classifier's logits are (B, C), one row per example, so the objective of `alambic.losses` applies unchanged
with one counted "token" per example (no new math, `distillation_loss` computes it):

    total = alpha * T^2 * mean_examples divergence(teacher, student; T) + (1 - alpha) * mean_examples CE(label)

The teacher's fine-tuning is the same run at alpha = 0 (plain cross-entropy, no teacher). Checkpoints, resume,
metrics and the final export follow `alambic.training.run.train`, whose helpers are reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainingArguments

from alambic.config import FineTuneConfig, LossConfig, TrainingConfig
from alambic.data import PreparedData
from alambic.teachers import BatchSettings, ClassifierTeacher, StudentStep
from alambic.training.base import AlambicTrainer
from alambic.training.run import fit_and_export


class ClassifierDistillationTrainer(AlambicTrainer):
    """Trainer for `total = alpha * T^2 * soft + (1 - alpha) * hard` on the class logits of two classifiers.

    Args:
        teacher: a classifier with the student's labels; may be None only when `loss.alpha == 0` (plain CE).
        loss_config: divergence, temperature, alpha and their parameters (`features` and `implementation`,
            which concern token logits, are not used).
        Remaining arguments go to `transformers.Trainer`.
    """

    # one labelled example is one counted "token": the logged means are per example
    count_keys = ("examples", "tokens")

    def __init__(self, *args: Any, teacher: PreTrainedModel | None, loss_config: LossConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if teacher is None and loss_config.alpha > 0:
            raise ValueError(
                f"loss.alpha = {loss_config.alpha} needs a teacher; only alpha = 0 (plain CE) runs without one"
            )
        self.loss_config = loss_config
        # One label per example, none shifted (the causal-LM count would drop each batch's first example).
        self._loss_shifts_labels = False
        self.source = ClassifierTeacher(teacher if loss_config.alpha > 0 else None)
        self.source.setup(self)

    def prepare_teacher(self, teacher: PreTrainedModel) -> nn.Module:
        if self.is_deepspeed_enabled:
            raise ValueError(
                "classifier distillation does not place a teacher under DeepSpeed: train on one device "
                "or under DDP (torchrun), where each rank keeps a copy of the teacher"
            )
        teacher.eval()
        teacher.requires_grad_(False)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        labels = inputs["labels"]  # (B,) class ids; -100 would mark an example that does not count
        mask = inputs.get("attention_mask")
        logits = model(input_ids=inputs["input_ids"], attention_mask=mask).logits  # (B, C)
        step = StudentStep(
            core=model, inputs=inputs, targets=labels, num_items_in_batch=num_items_in_batch, logits=logits
        )
        parts = self.source.soft_loss(step, self.loss_config).parts
        tokens = float(mask.sum() if mask is not None else inputs["input_ids"].numel())
        self.record_parts(
            model.training,
            parts,
            num_items_in_batch,
            self.loss_config.alpha,
            counts={"examples": float(parts.num_tokens), "tokens": tokens},
        )
        loss = self.per_device_loss(parts.total, num_items_in_batch)
        return (loss, {"logits": logits}) if return_outputs else loss

    def throughput(self, counts: dict[str, list[float]], elapsed: float) -> dict[str, float]:
        return {
            "examples_per_second": round(sum(counts["examples"]) / elapsed, 2),
            "tokens_per_second": round(sum(counts["tokens"]) / elapsed, 1),
        }


def train_classifier(
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
    settings: str = "training",
) -> dict[str, Any]:
    """Train the classifier `student` and export it to `output_dir/final` (HF format, tokenizer included).

    The same layout as `alambic.training.run.train`: checkpoints in `output_dir/checkpoints` (with `resume`,
    training continues from the newest complete one), metrics streamed to `output_dir/metrics.jsonl`. `settings`: the
    config section `training` comes from, named in errors.

    Returns:
        A summary: steps, wall time, resumed-from step, final training loss, examples and tokens per step, log history.
    """
    # The classifier source's batches: one label per example, padded with the pad id the student's head reads.
    batches = ClassifierTeacher(teacher).batches(data, BatchSettings(pad_token_id=student.config.pad_token_id))

    def make_trainer(args: TrainingArguments, all_callbacks: list[TrainerCallback]) -> ClassifierDistillationTrainer:
        return ClassifierDistillationTrainer(
            model=student,
            args=args,
            train_dataset=batches.train,
            eval_dataset=batches.validation if len(batches.validation) else None,
            data_collator=batches.collator,
            processing_class=tokenizer,
            teacher=teacher,
            loss_config=loss,
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
        teachers=(teacher,),
        settings=settings,
    )
    # every rank's examples make one optimizer step
    examples = (
        training.per_device_train_batch_size * training.gradient_accumulation_steps * summary["scale"]["world_size"]
    )
    mean_length = sum(len(ids) for ids in data.train["input_ids"]) / max(len(data.train), 1)
    return {
        **summary,
        "examples_per_step": examples,
        "tokens_per_step": round(examples * mean_length),  # on average: examples are not padded to one length
        "log_history": trainer.state.log_history,
    }


def fine_tune_arguments(cfg: FineTuneConfig) -> TrainingConfig:
    """The training settings of a teacher fine-tuning (linear decay, as is usual for fine-tuning classifiers)."""
    return TrainingConfig(
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        bf16=cfg.bf16,
        seed=cfg.seed,
        save_steps=max(50, cfg.max_steps // 4),
    )


def fine_tune_teacher(
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    cfg: FineTuneConfig,
    output_dir: Path,
    *,
    resume: bool = True,
) -> dict[str, Any]:
    """Fine-tune a classifier (a backbone with a fresh head, from `load_model(..., labels=...)`) with plain
    cross-entropy on the training split; the result lands in `output_dir/final`. Returns `train_classifier`'s
    summary."""
    plain_ce = LossConfig(alpha=0.0)
    return train_classifier(
        backbone,
        tokenizer,
        data,
        teacher=None,
        loss=plain_ce,
        training=fine_tune_arguments(cfg),
        output_dir=output_dir,
        resume=resume,
        settings="teacher.fine_tune",
    )
