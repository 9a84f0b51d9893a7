"""The training section: the optimisation of the distill stage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alambic.config._base import _Section


class TrainingConfig(_Section):
    """Optimisation; fields map onto `transformers.TrainingArguments`."""

    max_steps: int = Field(default=100, gt=0, description="Optimizer steps.")
    per_device_train_batch_size: int = Field(default=4, gt=0, description="Sequences per device per micro-batch.")
    per_device_eval_batch_size: int = Field(default=8, gt=0, description="Sequences per device for evaluation.")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(default=5e-4, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler_type: str = Field(default="cosine", description="Any transformers scheduler name.")
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    bf16: bool | Literal["auto"] = Field(
        default=False,
        description="bfloat16 mixed precision (autocast). 'auto': where the device computes bf16 natively (a CUDA GPU "
        "with bf16, a CPU with AMX or AVX512-BF16), float32 elsewhere, where bf16 autocast is emulated and several "
        "times slower than float32.",
    )
    fp16: bool = Field(default=False, description="float16 mixed precision (CUDA only).")
    logging_steps: int = Field(default=5, gt=0, description="Log every N steps.")
    eval_steps: int | None = Field(default=None, gt=0, description="Evaluate on held-out data every N steps.")
    save_steps: int = Field(default=50, gt=0, description="Checkpoint every N steps (the most a crash can lose).")
    save_total_limit: int = Field(default=2, gt=0, description="Checkpoints kept.")
    report_to: list[str] = Field(default_factory=list, description="Trainer loggers: tensorboard, wandb, ...")
    seed: int = Field(default=0, description="Training seed.")
    dataloader_num_workers: int = Field(default=0, ge=0, description="Data loader workers.")
    packing: Literal["pad", "group_by_length", "padding_free"] = Field(
        default="pad",
        description="How a micro-batch's sequences of different lengths are batched. 'pad': right-padded to the "
        "longest. 'group_by_length': padded, but batches drawn among sequences of similar length (transformers' "
        "LengthGroupedSampler), so little padding is left. 'padding_free': laid end to end in one row with "
        "position_ids restarting per sequence and no padding at all; attention stays within each sequence (flash "
        "attention: variable-length kernels; sdpa / eager: a block-causal mask over the whole row, which costs "
        "attention compute that grows with the row's length). Chat data gains, text data (already packed to "
        "data.max_seq_len) does not.",
    )
    torch_compile: bool = Field(
        default=False,
        description="torch.compile every decoder layer of the student and the teachers in place (inductor; on CPU it "
        "needs a C++ compiler). The first steps pay the compilation, and one recompilation once the sequence lengths "
        "vary; the weights, checkpoints and export are unchanged. Language models, without loss.features (hooks on the "
        "layers) or loss.on_policy (the student decodes between steps).",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        default="stop",
        description="What a step whose loss or gradient norm is NaN or inf does (a learning rate too high, an overflow "
        "in half precision). 'stop': the training stops before taking it, naming the step and the likely cause, and "
        "the stage fails. 'skip': that step's gradients are dropped (the optimizer leaves the weights as they are), "
        "the skipped steps are counted and logged (`nonfinite_steps_skipped`), and the training still stops after 10 "
        "in a row. Under fp16 the loss scaler skips overflowing gradients itself: there only the loss is judged. "
        "Whichever is chosen, weights holding NaN or inf are never exported.",
    )
    shard_teacher: bool | Literal["auto"] = Field(
        default="auto",
        description="With several processes: shard the teachers' weights across them (true: a rank holds 1/N of each "
        "teacher, gathered unit by unit as it runs; FSDP2 units, or ZeRO-3 under DeepSpeed) or keep a whole copy on "
        "each (false: no gathering, N times the memory). 'auto': shard them when the student is sharded (FSDP2, "
        "ZeRO-3). A large teacher's weights dominate the memory even without optimizer state. No effect on one "
        "process; the losses and weights are the same either way.",
    )
    trainer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra `TrainingArguments` passed through as is (deepspeed, fsdp, gradient_checkpointing...).",
    )

    @field_validator("trainer_args")
    @classmethod
    def _known_trainer_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Keys that `TrainingArguments` lacks are refused here, at load, not when the distill stage builds it after the
        data and the student. Its dataclass fields are the truth (they change between transformers versions)."""
        if not v:
            return v  # transformers' import is left to the runs that need it
        import dataclasses
        import difflib

        import transformers
        from transformers import TrainingArguments

        fields = sorted(f.name for f in dataclasses.fields(TrainingArguments) if f.init)
        unknown = [k for k in v if k not in fields]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), fields, n=3, cutoff=0.6)
                hints.append(f"{key!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
            raise ValueError(
                f"not a transformers.TrainingArguments field in transformers {transformers.__version__}: "
                f"{', '.join(hints)}; see the TrainingArguments documentation for its fields"
            )
        return v

    @model_validator(mode="after")
    def _precision(self) -> TrainingConfig:
        if self.bf16 is not False and self.fp16:
            raise ValueError("training.bf16 and training.fp16 are exclusive: choose one")
        return self
