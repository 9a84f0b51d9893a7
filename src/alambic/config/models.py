"""Where the teachers come from: the model fields every model shares, the teacher with its optional fine-tuning
(stage 'teacher'), and the additional teachers of an ensemble."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alambic.config._base import WEIGHTS_ID_HELP, DType, _Section


class ModelConfig(_Section):
    """Where a model comes from and how it is placed."""

    model: str = Field(
        description="Built-in alias (e.g. 'smollm2-135m-instruct'), Hugging Face id, local HF directory, "
        "or path to a .gguf file."
    )
    gguf_file: str | None = Field(
        default=None, description="GGUF file name inside `model` when `model` is a directory or hub id."
    )
    dtype: DType = Field(default="float32", description="Weights dtype once loaded.")
    device: str = Field(default="auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'...")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(default=False, description="Allow model code from the hub repository.")


class FineTuneConfig(_Section):
    """Fine-tune the teacher backbone with a fresh classification head on the training split (plain cross-entropy)
    before anything learns from it; the result is saved to `<run>/teacher/final` and every later stage uses it."""

    max_steps: int = Field(default=200, gt=0, description="Optimizer steps of the teacher fine-tuning.")
    learning_rate: float = Field(default=5e-5, gt=0, description="Peak learning rate (AdamW, linear decay).")
    batch_size: int = Field(default=16, gt=0, description="Labelled examples per optimizer step.")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    bf16: bool | Literal["auto"] = Field(
        default=False,
        description="bfloat16 mixed precision; 'auto' as training.bf16 (where the device has it natively).",
    )
    seed: int = Field(default=0, description="Seed of the head's initialisation and of the data order.")


class TeacherConfig(ModelConfig):
    """The teacher: a model as in `ModelConfig`, optionally fine-tuned first (classification)."""

    fine_tune: FineTuneConfig | None = Field(
        default=None,
        description="task sequence_classification: train a classification head (and the backbone) on the "
        "training split before distilling (stage 'teacher'). null: the teacher is used as it is, and must then already "
        "be a classifier with the data's labels.",
    )
    weights_id: str | None = Field(default=None, description=WEIGHTS_ID_HELP)


class AdditionalTeacherConfig(ModelConfig):
    """One more teacher of the ensemble (`additional_teachers`): a model as in `ModelConfig`, and its weight.

    It must share the teacher's tokenizer (checked before training). `device: auto` follows the student (each
    process's device under a launcher); an explicit device ('cpu', 'cuda:1') keeps it there, for a teacher that
    does not fit beside the student. Only the distill stage uses it: the student is pruned from `teacher`, and
    evaluation and the offline cache compare with `teacher`.
    """

    weight: float = Field(
        default=1.0,
        gt=0,
        description="Weight w_i of this teacher in the ensemble, before normalisation: w_i / "
        "(teacher_weight + sum of additional weights). See loss.teachers.",
    )
