"""Distillation losses: pure functions of tensors (see `divergences` for the formulas)."""

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
)

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "DivergenceName",
    "LossParts",
    "distillation_loss",
    "divergence",
    "forward_kl",
    "jsd",
    "logit_mse",
    "reduce_over_tokens",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "token_cross_entropy",
    "tvd",
]
