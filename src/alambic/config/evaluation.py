"""The evaluation section: held-out quality against the teacher, inference cost, responses to prompts, baselines,
extra held-out sets from other domains, and benchmarks through lm-evaluation-harness."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from alambic.config._base import _Section
from alambic.config.data import DataConfig
from alambic.config.models import ModelConfig

LM_EVAL_MISSING = (
    "evaluation.lm_eval needs lm-evaluation-harness, which is not installed: run "
    "`pip install 'alambic[eval]'` (or `pip install 'lm-eval>=0.4.9'`), or remove evaluation.lm_eval"
)
HELD_OUT_SPLIT = "validation"  # the name of the run's own held-out split beside the extra sets
# Tasks alambic writes itself (custom-task YAML + local JSON) from data it has, so they run offline.
LOCAL_LM_EVAL_TASKS = ("alambic_bbc_topic", "alambic_chatterbot_reply")


class HeldOutSetConfig(_Section):
    """An extra held-out set, e.g. another domain than the training data's: read like `data` (same sources and
    fields), tokenized with the teacher's tokenizer like the held-out split, scored for every model."""

    source: Literal["bbc_news", "chatterbot", "files", "hub"] = Field(
        description="Where the documents come from, as data.source: 'bbc_news', 'chatterbot', 'files' (`paths`), "
        "'hub' (`hub_name`)."
    )
    format: Literal["text", "chat"] = Field(
        default="text",
        description="'text': documents concatenated and cut into max_seq_len sequences, every token "
        "counted; 'chat': conversations in the chat template, assistant tokens counted (as data.format).",
    )
    paths: list[Path] = Field(default_factory=list, description="Files or folders for source 'files'.")
    hub_name: str | None = Field(default=None, description="Dataset name for source 'hub'.")
    hub_config: str | None = Field(default=None, description="Dataset configuration for source 'hub'.")
    hub_split: str = Field(default="test", description="Split to read for source 'hub'.")
    text_field: str = Field(default="text", description="Column holding the text (format text).")
    messages_field: str = Field(default="messages", description="Column holding {role, content} lists (format chat).")
    prompt_field: str = Field(default="prompt", description="Prompt column (format chat, no messages column).")
    response_field: str = Field(default="response", description="Response column (format chat, no messages column).")
    max_seq_len: int | None = Field(default=None, gt=1, description="Tokens per sequence; default: data.max_seq_len.")
    max_sequences: int | None = Field(
        default=64,
        gt=0,
        description="Cap on the sequences scored (the first after shuffling the documents; None: "
        "all). Each costs one forward of every model.",
    )
    seed: int = Field(default=0, description="Seed of the document shuffle before the cap.")
    overlap: Literal["refuse", "drop", "flag"] = Field(
        default="refuse",
        description="A document also among the run's training documents (same text): 'refuse' "
        "stops the evaluation naming them, 'drop' scores the set without them, 'flag' scores them and marks the set "
        "in eval.json and the report.",
    )

    def data_config(self) -> DataConfig:
        """The `data` section that reads these documents (`alambic.data.load_documents` takes it)."""
        return DataConfig(
            **self.model_dump(exclude={"max_seq_len", "max_sequences", "seed", "overlap"}),
            **({"max_seq_len": self.max_seq_len} if self.max_seq_len else {}),
        )

    @model_validator(mode="after")
    def _source_inputs(self) -> HeldOutSetConfig:
        self.data_config()  # the data section's own checks: paths exist, hub_name given, chatterbot is chat
        return self


class LmEvalConfig(_Section):
    """Benchmarks through EleutherAI's lm-evaluation-harness (`pip install 'alambic[eval]'`), run on the very models
    the evaluation loaded (its HF wrapper around them), for every model."""

    tasks: list[str] = Field(
        min_length=1,
        description="lm-eval task or group names, e.g. [hellaswag, arc_easy] (their data comes from "
        f"the Hub), or alambic's local tasks {list(LOCAL_LM_EVAL_TASKS)} (written into the run folder from the "
        "held-out BBC News articles and chatterbot conversations; offline), or tasks of include_path.",
    )
    num_fewshot: int | None = Field(default=None, ge=0, description="Few-shot examples; None: each task's default.")
    limit: int | None = Field(
        default=None,
        gt=0,
        description="Cap on the examples per task (None: all). Benchmarks can dominate a run's time on CPU.",
    )
    batch_size: int = Field(default=8, gt=0, description="Requests per forward.")
    include_path: list[Path] = Field(
        default_factory=list, description="Folders of your own lm-eval task YAML files (custom tasks, local data)."
    )

    @model_validator(mode="after")
    def _installed(self) -> LmEvalConfig:
        # checked when the config loads, not after hours of training
        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError(LM_EVAL_MISSING)
        missing = [str(p) for p in self.include_path if not Path(p).is_dir()]
        if missing:
            raise ValueError(f"evaluation.lm_eval.include_path: not a folder: {', '.join(missing)}")
        return self


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
        default=None,
        description="Where every model is evaluated and its cost measured ('cpu', 'cuda', "
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
    datasets: dict[str, HeldOutSetConfig] = Field(
        default_factory=dict,
        description="Extra held-out sets by name, e.g. another domain than the training data's: {chat: {source: "
        "chatterbot, format: chat}}. Each is scored like the held-out split (perplexity, agreement, KL to the "
        "teacher, intervals) for every model; the report shows how much of the teacher each model keeps per set.",
    )
    lm_eval: LmEvalConfig | None = Field(
        default=None,
        description="Benchmarks through lm-evaluation-harness for every model (null: none); needs "
        "`pip install 'alambic[eval]'`.",
    )

    @field_validator("baselines")
    @classmethod
    def _baseline_names(cls, v: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        taken = [n for n in v if n == "teacher" or n.startswith("student_")]
        if taken:
            raise ValueError(f"baseline names {taken} are taken by the run's own models: rename them")
        return v

    @field_validator("datasets")
    @classmethod
    def _set_names(cls, v: dict[str, HeldOutSetConfig]) -> dict[str, HeldOutSetConfig]:
        # names become eval.json keys, report headings and plot labels
        bad = [n for n in v if not n or n == HELD_OUT_SPLIT or not all(c.isalnum() or c in "._-" for c in n)]
        if bad:
            raise ValueError(
                f"evaluation.datasets names {bad}: use letters, digits, '.', '_' or '-' (and not "
                f"{HELD_OUT_SPLIT!r}, the run's own held-out split)"
            )
        return v
