"""Distillation losses: pure functions of tensors (see `divergences` for the formulas)."""

from alambic.losses.chunked import ChunkedDistillationLoss, chunked_distillation_loss
from alambic.losses.divergences import (
    DIVERGENCES,
    IGNORE_INDEX,
    DivergenceName,
    LossParts,
    distillation_loss,
    divergence,
    forward_kl,
    jsd,
    logit_mse,
    reduce_over_tokens,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    token_cross_entropy,
    tvd,
    uld,
)
from alambic.losses.features import attention_map_loss, attention_relation_loss, hidden_state_loss, layer_map
from alambic.losses.heads import OutputHead
from alambic.losses.mixture import (
    ensemble_divergence,
    mixture_logits,
    multi_teacher_distillation_loss,
    normalize_weights,
)

__all__ = [
    "DIVERGENCES",
    "ChunkedDistillationLoss",
    "IGNORE_INDEX",
    "DivergenceName",
    "LossParts",
    "OutputHead",
    "attention_map_loss",
    "attention_relation_loss",
    "chunked_distillation_loss",
    "distillation_loss",
    "divergence",
    "ensemble_divergence",
    "forward_kl",
    "hidden_state_loss",
    "jsd",
    "layer_map",
    "logit_mse",
    "mixture_logits",
    "multi_teacher_distillation_loss",
    "normalize_weights",
    "reduce_over_tokens",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "token_cross_entropy",
    "tvd",
    "uld",
]
