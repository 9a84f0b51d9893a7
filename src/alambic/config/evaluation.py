"""The evaluation section: held-out quality against the teacher, inference cost, responses to prompts, baselines."""

from __future__ import annotations

from pydantic import Field, field_validator

from alambic.config._base import _Section
from alambic.config.models import ModelConfig


class CostConfig(_Section):
    """Inference cost of each evaluated model, measured on the very weights scored for quality."""

    prompt_tokens: int = Field(default=128, gt=0, description="Prompt length (held-out tokens) of each generation.")
    new_tokens: int = Field(default=64, ge=2, description="Tokens generated per run (greedy, EOS suppressed).")
    batch_size: int = Field(default=8, gt=0, description="Batch of the throughput figure (latency is at batch 1).")
    warmup: int = Field(default=1, ge=0, description="Untimed runs before the timed ones.")
    repeats: int = Field(default=5, gt=0, description="Timed runs per figure; the report gives median and spread.")


class GenerationEvalConfig(_Section):
    """Greedy responses to held-out prompts (chat data), scored against the references and the teacher's."""

    max_prompts: int = Field(default=64, gt=0, description="Held-out prompts answered by each model.")
    max_new_tokens: int = Field(default=64, gt=0, description="Cap on each response's length.")
    batch_size: int = Field(default=8, gt=0, description="Prompts generated at once.")


class EvaluationConfig(_Section):
    """Held-out evaluation after distillation: quality against the teacher, inference cost, baselines."""

    ce_control: bool = Field(
        default=True,
        description="Also train the same student with plain cross-entropy for the same steps, as a control.",
    )
    batch_size: int = Field(default=8, gt=0, description="Sequences per evaluation batch.")
    device: str | None = Field(
        default=None, description="Where every model is evaluated and its cost measured ('cpu', 'cuda', "
        "'cuda:1', ...); default: teacher.device. Changing it redoes only the evaluation.",
    )
    baselines: dict[str, ModelConfig] = Field(
        default_factory=dict,
        description="Other models to score beside the teacher and the students, by name, e.g. "
        "{smollm2-360m: {model: HuggingFaceTB/SmolLM2-360M-Instruct}}; they must share the teacher's tokenizer.",
    )
    cost: CostConfig | None = Field(
        default_factory=CostConfig, description="Measure latency, throughput and memory of every model (null: skip)."
    )
    generation: GenerationEvalConfig | None = Field(
        default_factory=GenerationEvalConfig,
        description="Chat data: ROUGE-L and exact match of greedy responses (null: skip). Ignored for text data.",
    )

    @field_validator("baselines")
    @classmethod
    def _baseline_names(cls, v: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        taken = [n for n in v if n == "teacher" or n.startswith("student_")]
        if taken:
            raise ValueError(f"baseline names {taken} are taken by the run's own models: rename them")
        return v
