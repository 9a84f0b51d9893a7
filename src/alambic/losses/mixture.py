"""Several teachers, one soft loss: a weighted mixture of the teachers, or a weighted sum of losses.

Teachers i = 1..K with logits z_i and weights w_i, normalised to Σ_i w_i = 1 (both modes: the soft loss
keeps the scale of one teacher's, whatever K, and `alpha` keeps its meaning). P_i = softmax(z_i / T).

    mixture:  soft = D(P_mix, Q),          P_mix = Σ_i w_i P_i
    sum:      soft = Σ_i w_i D(P_i, Q)

with D the configured divergence. The mixture is formed in log space,

    log P_mix = logsumexp_i (log w_i + log P_i),

so no probability that underflows to 0 is passed to `log`. It is handed to the divergences of
`divergences` as the logits T · log P_mix: softmax(T · log P_mix / T) = P_mix, the log_softmax inside
them changing nothing but rounding (the pattern of `topk`), so every divergence keeps its one
implementation. A mixture of one teacher is that teacher's logits, untouched: exactly single-teacher
distillation. In sum mode, one teacher has w = 1 and the sum is its divergence, exactly too.

`logit_mse` compares raw logits, and a mixture of logits is not a distribution: its "mixture" teacher
is the weighted mean of the logits, z_mix = Σ_i w_i z_i (the student matches the ensemble's mean
logits, whose softmax is the normalised weighted geometric mean of the P_i at T = 1). In sum mode it
is Σ_i w_i MSE(z_s, z_i), as for every other divergence.

Everything here is a pure function of tensors; the full-logits path (`multi_teacher_distillation_loss`)
and the chunked path (`chunked.py`, per chunk) call the same `ensemble_divergence`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from alambic.divergence import DivergenceSpec, resolve_spec
from alambic.losses.divergences import (
    IGNORE_INDEX,
    DivergenceName,
    LossParts,
    _check_divergence_name,
    _check_unit_interval,
    _compute_dtype,
    mix_soft_and_hard,
    reduce_over_tokens,
    token_cross_entropy,
)
from alambic.losses.divergences import divergence as divergence_fn

__all__ = [
    "TEACHER_COMBINATIONS",
    "TeacherCombination",
    "ensemble_divergence",
    "mixture_logits",
    "multi_teacher_distillation_loss",
    "normalize_weights",
]

TeacherCombination = Literal["mixture", "sum"]
TEACHER_COMBINATIONS = ("mixture", "sum")


def normalize_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """w_i / Σ_j w_j: the teachers' weights as they enter the loss.

    Raises:
        ValueError: no weight, or a weight that is not a finite number > 0 (a teacher with weight 0
            would be run and ignored: remove it instead).
    """
    weights = [float(w) for w in weights]
    if not weights:
        raise ValueError("no teacher weight given: at least one teacher is needed")
    bad = [(i, w) for i, w in enumerate(weights) if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(
            f"teacher weights must be finite and > 0, got {weights} (bad at index "
            f"{', '.join(str(i) for i, _ in bad)}); remove a teacher rather than giving it weight 0"
        )
    total = math.fsum(weights)
    return tuple(w / total for w in weights)


def _check_teachers(teacher_logits: Sequence[Tensor], weights: Sequence[float]) -> tuple[float, ...]:
    if len(teacher_logits) == 0:
        raise ValueError("no teacher logits given: at least one teacher is needed")
    if len(weights) != len(teacher_logits):
        raise ValueError(
            f"{len(teacher_logits)} teacher logits but {len(weights)} weights: give one weight per teacher"
        )
    shapes = {tuple(t.shape) for t in teacher_logits}
    if len(shapes) > 1:
        raise ValueError(
            f"teacher logits differ in shape: {[tuple(t.shape) for t in teacher_logits]}; every teacher "
            "must score the same positions over one shared vocabulary (slice each to the shared ids)"
        )
    return normalize_weights(weights)


def _check_combination(teachers: str) -> None:
    if teachers not in TEACHER_COMBINATIONS:
        raise ValueError(f"unknown teachers combination {teachers!r}; choose one of: {', '.join(TEACHER_COMBINATIONS)}")


def mixture_logits(
    teacher_logits: Sequence[Tensor],
    weights: Sequence[float],
    *,
    temperature: float = 1.0,
    divergence: DivergenceName | str = "forward_kl",
) -> Tensor:
    """Logits of the mixed teacher, for any divergence of `divergences` at temperature T:

        T · log Σ_i w_i softmax(z_i / T)     (so that softmax(result / T) = P_mix)
        Σ_i w_i z_i                          for logit_mse (mean logits)

    with w normalised to sum to 1. One teacher: its logits, untouched.

    Args:
        teacher_logits: K tensors (..., V) of one shape.
        weights: K weights > 0 (normalised here).
        temperature: T > 0, the temperature the divergence will apply.
        divergence: a name from `DIVERGENCES`; only logit_mse changes what is mixed.

    Returns:
        (..., V) in float32 or wider; −inf where every teacher gives probability 0.

    Raises:
        ValueError: no teacher, weights that do not match or are not > 0, shapes that differ, T <= 0.
    """
    _check_divergence_name(divergence)
    weights = _check_teachers(teacher_logits, weights)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(teacher_logits) == 1:
        return teacher_logits[0]
    dtype = _compute_dtype(*teacher_logits)
    if divergence == "logit_mse":
        return sum(w * z.to(dtype) for w, z in zip(weights, teacher_logits))
    # Pairwise logaddexp instead of stacking (K, ..., V): two (..., V) blocks alive, whatever K.
    log_mix = None
    for w, z in zip(weights, teacher_logits):
        term = torch.log_softmax(z.to(dtype) / temperature, dim=-1) + math.log(w)  # log w_i + log P_i
        log_mix = term if log_mix is None else torch.logaddexp(log_mix, term)
    return temperature * log_mix


def ensemble_divergence(
    spec: DivergenceSpec,
    student_logits: Tensor,
    teacher_logits: Sequence[Tensor],
    weights: Sequence[float],
    *,
    teachers: TeacherCombination | str = "mixture",
) -> tuple[Tensor, list[Tensor] | None]:
    """Per-token soft divergence between the student and K teachers, (..., V) -> (...):

        mixture:  D(P_mix, Q)            (`mixture_logits`)
        sum:      Σ_i w_i D(P_i, Q)

    with weights normalised to sum to 1; not multiplied by T², not reduced over tokens (as `divergence`). `spec`:
    the divergence D with its temperature and parameters.

    Returns:
        (per_token, per_teacher): per_token (...); per_teacher the K unweighted D(P_i, Q), each (...), in
        sum mode (they are computed anyway, for logging), None in mixture mode.

    Raises:
        ValueError: unknown divergence or combination, and the errors of `mixture_logits`.
    """
    _check_combination(teachers)
    if teachers == "mixture":
        mixed = mixture_logits(teacher_logits, weights, temperature=spec.temperature, divergence=spec.name)
        return divergence_fn(spec, student_logits, mixed), None
    weights = _check_teachers(teacher_logits, weights)
    per_teacher = [divergence_fn(spec, student_logits, z) for z in teacher_logits]
    per_token = per_teacher[0] if len(per_teacher) == 1 else sum(w * d for w, d in zip(weights, per_teacher))
    return per_token, per_teacher


def multi_teacher_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Sequence[Tensor],
    labels: Tensor,
    *,
    weights: Sequence[float] | None = None,
    teachers: TeacherCombination | str = "mixture",
    divergence: DivergenceName | str | DivergenceSpec = "forward_kl",
    temperature: float | None = None,
    alpha: float = 0.5,
    jsd_beta: float | None = None,
    skew: float | None = None,
    num_items_in_batch: int | Tensor | None = None,
) -> LossParts:
    """`distillation_loss` with K teachers, on full logits (the reference of the chunked path):

        soft  = T² · mean_tokens ensemble_divergence(student, teachers; T)
        hard  = mean_tokens −log q(label)          (T = 1)
        total = alpha · soft + (1 − alpha) · hard

    Args:
        student_logits: (..., V).
        teacher_logits: K tensors (..., V), each the student's shape; may be empty only when alpha = 0.
        labels: (...) aligned with the logits' positions; -100 marks tokens that do not count.
        weights: K weights > 0, normalised here; None: equal weights.
        teachers: 'mixture' or 'sum' (module docstring).
        divergence, temperature, alpha, jsd_beta, skew, num_items_in_batch: as in `distillation_loss`.

    Returns:
        LossParts of 0-dim tensors; in sum mode `soft_per_teacher` holds the K unweighted soft losses
        T² · mean_tokens D(P_i, Q), shape (K,), detached (soft = Σ_i w_i soft_per_teacher_i).

    Raises:
        ValueError: shapes that do not line up, no teacher with alpha > 0, options out of range.
    """
    spec = resolve_spec(divergence, temperature, jsd_beta, skew)
    spec.check_name()
    _check_combination(teachers)
    _check_unit_interval("alpha", alpha)
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])} (logits are (..., V), labels (...))"
        )
    use_teachers = alpha > 0.0
    if use_teachers and len(teacher_logits) == 0:
        raise ValueError(f"alpha = {alpha} weighs a soft loss, which needs at least one teacher's logits (got none)")
    weights = [1.0] * len(teacher_logits) if weights is None else list(weights)
    mask = labels != IGNORE_INDEX  # (...)
    dtype = _compute_dtype(student_logits, *teacher_logits)
    zero = torch.zeros((), dtype=dtype, device=student_logits.device)

    soft, per_teacher_soft = zero, None
    if use_teachers:
        per_token, per_teacher = ensemble_divergence(spec, student_logits, teacher_logits, weights, teachers=teachers)
        soft = spec.temperature**2 * reduce_over_tokens(per_token, mask, num_items_in_batch)
        if per_teacher is not None:
            per_teacher_soft = torch.stack(
                [spec.temperature**2 * reduce_over_tokens(d, mask, num_items_in_batch).detach() for d in per_teacher]
            )
    hard = zero
    if alpha < 1.0:
        hard = reduce_over_tokens(token_cross_entropy(student_logits, labels), mask, num_items_in_batch)
    return LossParts(
        total=mix_soft_and_hard(soft, hard, alpha),
        soft=soft,
        hard=hard,
        num_tokens=mask.sum(),
        soft_per_teacher=per_teacher_soft,
    )
