"""The loss section: the logit objective, the feature-distillation terms added to it, and on-policy training."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from alambic.combinations import PLAIN, config_refusals
from alambic.config._base import Divergence, _Section
from alambic.divergence import DivergenceSpec


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
        default="all",
        description="Student layers matched, each with its layer_map partner; 'all': every pair.",
    )


class AttentionMapLossConfig(_Section):
    """Match the attention probabilities of mapped layers, head by head (TinyBERT); head counts must be equal."""

    weight: float = Field(default=0.1, gt=0, description="Weight w of this term: total = logit objective + w * term.")
    kind: Literal["kl", "mse"] = Field(
        default="kl",
        description="'kl': KL(teacher row || student row) per query, summed over keys; 'mse': squared "
        "difference summed over keys. Both averaged over heads and counted positions.",
    )
    layers: Literal["all"] | list[int] = Field(
        default="all",
        description="Student layers matched, each with its layer_map partner; 'all': every pair.",
    )


class AttentionRelationLossConfig(_Section):
    """Match q-q, k-k and v-v self-attention relations of one layer (MiniLM-v2); widths and head counts may differ."""

    weight: float = Field(default=0.5, gt=0, description="Weight w of this term: total = logit objective + w * term.")
    num_relation_heads: int | None = Field(
        default=None,
        gt=0,
        description="Relation heads R the q, k and v vectors are split into; R must divide every "
        "q/k/v width of both models. None: the largest such R up to the student's number of attention heads.",
    )
    layer: int = Field(
        default=-1, description="Student layer whose relations are matched; negative counts from the end."
    )
    teacher_layer: int | None = Field(
        default=None,
        description="Teacher layer it learns from; negative counts from the end. None: layer_map's "
        "partner "
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
            raise ValueError(
                "loss.features asks for no term: set at least one of hidden_states, attention, "
                "attention_relations (or remove loss.features)"
            )
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
        default=0.5,
        ge=0,
        le=1,
        description="Share lambda of the optimizer steps trained on student responses, "
        "drawn per step from (seed, step): reproducible, and the same after a resume. 0: never (plain off-policy "
        "training); 1: every step.",
    )
    max_new_tokens: int = Field(
        default=64,
        gt=0,
        description="Cap on each student response, end-of-turn included. An on-policy sequence is "
        "its "
        "prompt plus the response: up to data.max_seq_len + max_new_tokens tokens (size the memory for that).",
    )
    sampling_temperature: float | None = Field(
        default=None,
        ge=0,
        description="Temperature of the student's sampling (not the KD temperature "
        "loss.temperature); 0: greedy. null: the models' own generation settings (the teacher's generation_config, "
        "else the student's, when it samples), else 0.7. GKD samples at 1, where a small student's answers rarely end "
        "(they run to max_new_tokens and never show it an ending).",
    )
    top_p: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Nucleus sampling mass; 1 keeps every token. null: as "
        "sampling_temperature (the models' generation_config, else 0.95).",
    )
    top_k: int | None = Field(
        default=None,
        ge=0,
        description="Sample among the k most likely tokens; 0 keeps every token. null: as "
        "sampling_temperature (the models' generation_config, else 0).",
    )
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
    chunk_size: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        default="auto",
        description="Tokens per chunk of the chunked loss (the (chunk, V) logits block of each model "
        "is "
        "what the loss holds at once). 'auto': as many as keep a block under 2^26 logits (1365 tokens at V = 49,152, "
        "441 at 151,936), so the loss's memory does not grow with the vocabulary.",
    )
    features: FeatureLossConfig | None = Field(
        default=None,
        description="Feature distillation terms (hidden states, attention maps, MiniLM relations) "
        "added to the logit objective; null: logits only.",
    )
    on_policy: OnPolicyConfig | None = Field(
        default=None,
        description="Train a share of the steps on the student's own responses to the batch's prompts, "
        "scored by the teacher (GKD / MiniLLM; chat data, live teacher). null: off-policy, the data's answers only.",
    )

    @property
    def divergence_spec(self) -> DivergenceSpec:
        """The divergence with the temperature and the parameters it reads, as one value for the losses."""
        return DivergenceSpec(self.divergence, self.temperature, self.jsd_beta, self.skew)

    @model_validator(mode="after")
    def _features_need_the_teacher(self) -> LossConfig:
        """The loss's own features that alpha = 0 (no teacher) cannot serve, from the one table
        (`alambic.combinations`); the others need the whole run: `RunConfig._sources_fit`."""
        problems = config_refusals(SimpleNamespace(loss=self), [PLAIN] if self.alpha == 0 else [], {"loss"})
        if problems:
            raise ValueError("; ".join(problems))
        return self
