"""Feature distillation in training: which layers pair up, the hooks that capture them, the projection.

Only the mapped layers are captured, by forward hooks on their modules during the model's own forward
(never `output_hidden_states` / `output_attentions` of every layer):

- hidden states: the output of decoder layer i;
- relations (MiniLM-v2): the outputs of layer i's q_proj, k_proj and v_proj;
- attention maps (TinyBERT): q_proj and k_proj outputs plus the rotary cos/sin the attention module
  receives; the probabilities softmax(q kᵀ · scaling) are computed from the post-rotary q and k after
  the forward, so the model may run any attention kernel (sdpa, flash) and still be taught its maps.

The losses themselves are the pure functions of `alambic.losses.features`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from alambic.architecture import decoder_layers
from alambic.config import FeatureLossConfig
from alambic.losses.features import attention_map_loss, attention_relation_loss, hidden_state_loss, layer_map

# config field -> the name its value is logged under (beside loss_soft / loss_hard)
LOG_NAMES = {"hidden_states": "loss_hidden", "attention": "loss_attention", "attention_relations": "loss_relations"}


class FeatureSetupError(ValueError):
    """A feature loss that cannot be set up for this student/teacher pair; the message names the field."""


def self_attention(layer: nn.Module, index: int) -> nn.Module:
    """The attention module of a decoder layer, with the q/k/v projections the captures hook."""
    attn = getattr(layer, "self_attn", None)
    if attn is None or not all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj")):
        raise FeatureSetupError(
            f"decoder layer {index} ({type(layer).__name__}) has no `self_attn` with q_proj/k_proj/v_proj: the "
            "attention and attention_relations terms support Llama-style attention (Llama, Qwen2/3, Mistral...); "
            "use loss.features.hidden_states alone for this model"
        )
    return attn


# --------------------------------------------------------------------------------------------
# capture


@dataclass
class CapturedFeatures:
    """What one forward gave, by layer index: hidden (B, T, H), qkv ((B, T, Dq), (B, T, Dk), (B, T, Dv)),
    attention (B, heads, T, T) probabilities."""

    hidden: dict[int, Tensor] = field(default_factory=dict)
    qkv: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    attention: dict[int, Tensor] = field(default_factory=dict)

    def clone(self) -> CapturedFeatures:
        """Ordinary copies: tensors made under `torch.inference_mode` cannot be saved for backward."""
        return CapturedFeatures(
            hidden={i: h.clone() for i, h in self.hidden.items()},
            qkv={i: tuple(x.clone() for x in v) for i, v in self.qkv.items()},
            attention={i: a.clone() for i, a in self.attention.items()},
        )


def _rotary(attn: nn.Module):
    fn = getattr(inspect.getmodule(type(attn)), "apply_rotary_pos_emb", None)
    if fn is None:
        raise FeatureSetupError(
            f"{type(attn).__name__}'s module has no apply_rotary_pos_emb: attention maps cannot be "
            "recomputed for it; use attention_relations or hidden_states instead"
        )
    return fn


def _split_heads(x: Tensor, norm: nn.Module | None, head_dim: int) -> Tensor:
    """(B, T, n·d) -> (B, n, T, d), with the model's q/k norm (Qwen3: per head; OLMo2: over the full width)."""
    b, t, width = x.shape
    if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.shape[-1] == width:
        x = norm(x)
        norm = None
    x = x.view(b, t, width // head_dim, head_dim)
    if norm is not None:
        x = norm(x)
    return x.transpose(1, 2)


def attention_probs(
    attn: nn.Module, q_out: Tensor, k_out: Tensor, position_embeddings: tuple[Tensor, Tensor], key_mask: Tensor
) -> Tensor:
    """The attention probabilities of one layer from its q_proj/k_proj outputs, as eager attention computes them:

        P = softmax(q_rot k_rotᵀ · scaling  [soft-capped]  over keys j ≤ i, i − j < window, key_mask[j])

    Args:
        attn: the layer's attention module (scaling, head_dim, q_norm/k_norm, sliding window, config).
        q_out, k_out: (B, T, heads·d) and (B, T, kv_heads·d) projection outputs.
        position_embeddings: the (cos, sin) the module received.
        key_mask: (B, T) bool, keys that may be attended (padding excluded).

    Returns:
        (B, heads, T, T) in float32 (or wider); a query row with no valid key is uniform, not NaN.
    """
    head_dim = getattr(attn, "head_dim", None) or attn.config.hidden_size // attn.config.num_attention_heads
    q = _split_heads(q_out, getattr(attn, "q_norm", None), head_dim)  # (B, H, T, d)
    k = _split_heads(k_out, getattr(attn, "k_norm", None), head_dim)  # (B, H_kv, T, d)
    cos, sin = position_embeddings
    q, k = _rotary(attn)(q, k, cos, sin)
    # GQA: query head h reads KV head h // n_rep, as `repeat_kv` arranges them.
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scaling = getattr(attn, "scaling", head_dim**-0.5)
    with torch.autocast(q.device.type, enabled=False):  # float32 scores even under bf16 mixed precision
        scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scaling  # (B, H, T, T)
    cap = getattr(attn.config, "attn_logit_softcapping", None)  # Gemma 2
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    t = scores.shape[-1]
    pos = torch.arange(t, device=scores.device)
    allowed = pos[None, :] <= pos[:, None]  # (T_query, T_key): causal
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
    if window is not None:
        allowed = allowed & (pos[:, None] - pos[None, :] < window)
    allowed = allowed & key_mask.bool()[:, None, None, :]  # (B, 1, T, T)
    return scores.masked_fill(~allowed, torch.finfo(dtype).min).softmax(-1)


class LayerCapture:
    """Forward hooks on the chosen decoder layers of one model, for the length of a `with` block.

        with LayerCapture(model, hidden=[1, 3], relations=[3]) as cap:
            model(input_ids)
        feats = cap.features(key_mask)

    Hooks keep the autograd graph (the student's features train it); they are removed on exit, so a
    backward pass that recomputes layers (gradient checkpointing) does not capture again.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        hidden: Iterable[int] = (),
        relations: Iterable[int] = (),
        attention: Iterable[int] = (),
    ):
        self.name, self.layers = decoder_layers(model)
        self.hidden_layers, self.relation_layers = sorted(hidden), sorted(relations)
        self.attention_layers = sorted(attention)
        for i in {*self.hidden_layers, *self.relation_layers, *self.attention_layers}:
            if not 0 <= i < len(self.layers):
                raise FeatureSetupError(f"layer {i} asked for, but {self.name} has {len(self.layers)} layers")
        self._handles: list[Any] = []
        self._hidden: dict[int, Tensor] = {}
        self._proj: dict[int, dict[str, Tensor]] = {}
        self._rope: dict[int, tuple[Tensor, Tensor]] = {}

    def __enter__(self) -> LayerCapture:
        for store in (self._hidden, self._proj, self._rope):
            store.clear()
        for i in self.hidden_layers:
            self._handles.append(self.layers[i].register_forward_hook(self._keep_hidden(i)))
        for i in sorted({*self.relation_layers, *self.attention_layers}):
            attn = self_attention(self.layers[i], i)
            names = ("q_proj", "k_proj", "v_proj") if i in self.relation_layers else ("q_proj", "k_proj")
            for name in names:
                self._handles.append(getattr(attn, name).register_forward_hook(self._keep_projection(i, name)))
            if i in self.attention_layers:
                self._handles.append(attn.register_forward_pre_hook(self._keep_rope(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _keep_hidden(self, i: int):
        def hook(_module, _args, output):
            self._hidden[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def _keep_projection(self, i: int, name: str):
        def hook(_module, _args, output):
            self._proj.setdefault(i, {})[name] = output

        return hook

    def _keep_rope(self, i: int):
        def hook(_module, _args, kwargs):
            rope = kwargs.get("position_embeddings")
            if rope is None:
                raise FeatureSetupError(
                    f"layer {i}'s attention was called without `position_embeddings` (cos, sin): "
                    "attention maps need a rotary model; use attention_relations instead"
                )
            self._rope[i] = rope

        return hook

    def features(self, key_mask: Tensor) -> CapturedFeatures:
        """The captured tensors, attention probabilities computed now (under the caller's grad mode).

        Args:
            key_mask: (B, T) bool, keys that may be attended (the batch's attention mask).
        """
        missing = [i for i in self.hidden_layers if i not in self._hidden] + [
            i for i in {*self.relation_layers, *self.attention_layers} if i not in self._proj
        ]
        if missing:
            raise RuntimeError(f"layers {sorted(set(missing))} of {self.name} did not run during the captured forward")
        out = CapturedFeatures(hidden=dict(self._hidden))
        for i in self.relation_layers:
            p = self._proj[i]
            out.qkv[i] = (p["q_proj"], p["k_proj"], p["v_proj"])
        for i in self.attention_layers:
            attn, p = self_attention(self.layers[i], i), self._proj[i]
            out.attention[i] = attention_probs(attn, p["q_proj"], p["k_proj"], self._rope[i], key_mask)
        return out


# --------------------------------------------------------------------------------------------
# projection


class FeatureProjector(nn.Module):
    """One Linear(H_s -> H_t, no bias) per matched student layer where the widths differ (TinyBERT's W_h),
    identity where they are equal. Trained with the student; never part of the exported student."""

    def __init__(self, student_width: int, teacher_width: int, layers: Sequence[int]):
        super().__init__()
        self.student_width, self.teacher_width = student_width, teacher_width
        differ = student_width != teacher_width
        self.maps = nn.ModuleDict(
            {str(i): nn.Linear(student_width, teacher_width, bias=False) if differ else nn.Identity() for i in layers}
        )

    def forward(self, layer: int, hidden: Tensor) -> Tensor:
        """(..., H_s) -> (..., H_t) for student layer `layer`."""
        proj = self.maps[str(layer)]
        if isinstance(proj, nn.Linear):
            # float32 master weights; bf16 states of a bf16 student would not multiply with them (autocast
            # casts both down again where it is on)
            hidden = hidden.to(proj.weight.dtype)
        return proj(hidden)


# --------------------------------------------------------------------------------------------
# plan and losses


@dataclass(frozen=True)
class FeaturePlan:
    """(student layer, teacher layer) pairs of each term; empty / None where the term is off."""

    hidden: list[tuple[int, int]]
    attention: list[tuple[int, int]]
    relation: tuple[int, int] | None
    num_relation_heads: int | None


def _select(pairs: list[tuple[int, int]], layers: Literal["all"] | list[int], field_name: str) -> list[tuple[int, int]]:
    if layers == "all":
        return pairs
    by_student = dict(pairs)
    unknown = [i for i in layers if i not in by_student]
    if unknown:
        raise FeatureSetupError(
            f"{field_name} = {layers}: student layers {unknown} have no partner in "
            f"loss.features.layer_map (mapped student layers: {sorted(by_student)})"
        )
    return [(i, by_student[i]) for i in sorted(set(layers))]


def _index(value: int, count: int, field_name: str) -> int:
    if not -count <= value < count:
        raise FeatureSetupError(f"{field_name} = {value} is out of range for {count} layers")
    return value % count


def _qkv_widths(model: PreTrainedModel, layer: int) -> list[int]:
    attn = self_attention(decoder_layers(model)[1][layer], layer)
    return [getattr(attn, p).out_features for p in ("q_proj", "k_proj", "v_proj")]


def plan_features(
    cfg: FeatureLossConfig, student: PreTrainedModel, teacher: PreTrainedModel, kept_layers: Sequence[int] | None = None
) -> FeaturePlan:
    """Resolve the configured terms into layer pairs for this student/teacher pair, checking they can work.

    Raises:
        FeatureSetupError: naming the field, when a layer is out of range, head counts differ for
            attention maps, or the relation head count divides no width.
    """
    ls, lt = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    try:
        pairs = layer_map(ls, lt, mode=cfg.layer_map, kept_layers=kept_layers)
    except ValueError as exc:
        raise FeatureSetupError(f"loss.features.layer_map: {exc}") from None
    hidden = _select(pairs, cfg.hidden_states.layers, "loss.features.hidden_states.layers") if cfg.hidden_states else []
    attention = _select(pairs, cfg.attention.layers, "loss.features.attention.layers") if cfg.attention else []
    hs, ht = student.config.num_attention_heads, teacher.config.num_attention_heads
    if attention and hs != ht:
        raise FeatureSetupError(
            f"loss.features.attention matches maps head by head, but the student has {hs} attention heads and the "
            f"teacher {ht}: use loss.features.attention_relations, which works across head counts"
        )
    for model, layer in [(student, s) for s, _ in attention] + [(teacher, t) for _, t in attention]:
        # refuse an unsupported attention now, not in the middle of the first step
        _rotary(self_attention(decoder_layers(model)[1][layer], layer))
    relation, heads = None, None
    if (rel := cfg.attention_relations) is not None:
        s = _index(rel.layer, ls, "loss.features.attention_relations.layer")
        if rel.teacher_layer is not None:
            t = _index(rel.teacher_layer, lt, "loss.features.attention_relations.teacher_layer")
        elif s in dict(pairs):
            t = dict(pairs)[s]
        else:
            raise FeatureSetupError(
                f"loss.features.attention_relations.layer = {rel.layer} (student layer {s}) has no "
                f"partner in loss.features.layer_map {pairs}: set teacher_layer"
            )
        widths = _qkv_widths(student, s) + _qkv_widths(teacher, t)
        common = math.gcd(*widths)
        if rel.num_relation_heads is None:
            cap = student.config.num_attention_heads
            heads = max(r for r in range(1, min(cap, common) + 1) if common % r == 0)
        elif common % rel.num_relation_heads:
            choices = [r for r in range(1, common + 1) if common % r == 0]
            raise FeatureSetupError(
                f"loss.features.attention_relations.num_relation_heads = {rel.num_relation_heads} does not divide "
                f"every q/k/v width (student {widths[:3]}, teacher {widths[3:]}): choose one of {choices}"
            )
        else:
            heads = rel.num_relation_heads
        relation = (s, t)
    return FeaturePlan(hidden=hidden, attention=attention, relation=relation, num_relation_heads=heads)


class FeatureDistiller:
    """The feature terms of one training: plan, projector, captures of both sides, weighted losses.

    Each term is the mean over its layer pairs (so a weight does not grow with depth) of the loss of
    `alambic.losses.features`, reduced over the counted positions like the logit loss.
    """

    def __init__(
        self,
        cfg: FeatureLossConfig,
        student: PreTrainedModel,
        teacher: PreTrainedModel,
        kept_layers: Sequence[int] | None = None,
    ):
        self.cfg = cfg
        self.plan = plan_features(cfg, student, teacher, kept_layers)
        self.projector = FeatureProjector(
            student.config.hidden_size, teacher.config.hidden_size, [s for s, _ in self.plan.hidden]
        )

    def capture(self, model: PreTrainedModel, side: Literal["student", "teacher"]) -> LayerCapture:
        """Hooks on exactly the layers this side contributes."""
        k = 0 if side == "student" else 1
        plan = self.plan
        return LayerCapture(
            model,
            hidden=[p[k] for p in plan.hidden],
            attention=[p[k] for p in plan.attention],
            relations=[plan.relation[k]] if plan.relation else [],
        )

    def losses(
        self,
        student: CapturedFeatures,
        teacher: CapturedFeatures,
        mask: Tensor,
        key_mask: Tensor,
        num_items_in_batch: int | Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Unweighted terms by config field name (hidden_states, attention, attention_relations).

        Args:
            mask: (B, T) positions that count (the logit loss's counted positions).
            key_mask: (B, T) non-padding positions (keys of attention and relations).
        """
        plan, cfg, n = self.plan, self.cfg, num_items_in_batch
        terms: dict[str, Tensor] = {}
        if plan.hidden:
            terms["hidden_states"] = torch.stack(
                [
                    hidden_state_loss(
                        self.projector(s, student.hidden[s]),
                        teacher.hidden[t],
                        mask,
                        kind=cfg.hidden_states.kind,
                        num_items_in_batch=n,
                    )
                    for s, t in plan.hidden
                ]
            ).mean()
        if plan.attention:
            terms["attention"] = torch.stack(
                [
                    attention_map_loss(
                        student.attention[s],
                        teacher.attention[t],
                        mask,
                        kind=cfg.attention.kind,
                        key_mask=key_mask,
                        num_items_in_batch=n,
                    )
                    for s, t in plan.attention
                ]
            ).mean()
        if plan.relation:
            s, t = plan.relation
            terms["attention_relations"] = attention_relation_loss(
                student.qkv[s],
                teacher.qkv[t],
                mask,
                num_relation_heads=plan.num_relation_heads,
                key_mask=key_mask,
                num_items_in_batch=n,
            )
        return terms

    @staticmethod
    def check_graph(student: CapturedFeatures) -> None:
        """Raise if a captured student feature carries no gradient while training.

        Reentrant gradient checkpointing runs each layer under no_grad and recomputes it in backward:
        what hooks see inside the layer is cut from the graph, and the feature terms would silently
        teach nothing.
        """
        tensors = [*student.hidden.values(), *student.attention.values(), *(x for v in student.qkv.values() for x in v)]
        if any(not t.requires_grad for t in tensors):
            raise RuntimeError(
                "the student's captured features carry no gradient: reentrant gradient checkpointing hides the layers' "
                "internals from the feature losses; set training.trainer_args.activation_checkpointing_kwargs: "
                "{use_reentrant: false} (the transformers default) or turn activation checkpointing off"
            )

    def weighted_sum(self, terms: dict[str, Tensor]) -> Tensor:
        """Σ_i weight_i · term_i."""
        return sum(getattr(self.cfg, name).weight * value for name, value in terms.items())
