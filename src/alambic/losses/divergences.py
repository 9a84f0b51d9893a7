"""Per-token divergences between a student's and a teacher's next-token distributions, and the
distillation loss built from them.

Notation: P = softmax(teacher_logits / T) is the teacher, Q = softmax(student_logits / T) the
student. Every divergence takes logits of shape (..., V) and returns one value per token, shape
(...): summed over the vocabulary, not multiplied by T², not reduced over tokens. Reduction over
tokens and the T² factor live in `reduce_over_tokens` and `distillation_loss`, once.

Everything is computed in float32 at least (bf16/fp16 inputs are upcast, float64 stays float64),
from log-probabilities: mixtures are formed in log space, so no probability that underflows to 0
is ever passed to `log`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.divergence import DIVERGENCE_NAMES, DivergenceName, DivergenceSpec, resolve_spec

IGNORE_INDEX = -100

# The names and the parameters each reads: one table, torch-free (`alambic.divergence`), which the config lists too.


# --------------------------------------------------------------------------------------------
# helpers


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_pair(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape: logit losses need the same positions and "
            "one shared vocabulary (if only the last dimension differs, compare the tokenizers and "
            "slice both logits to the shared ids)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(log q, log p), each (..., V), in the compute dtype."""
    _check_pair(student_logits, teacher_logits, temperature)
    dtype = _compute_dtype(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    # A logit of -inf (top-k teachers, masked vocab entries) gives log-prob -inf and then
    # 0 · (-inf) = NaN in the KL sums and their gradients; the most negative finite number gives
    # the same probability (0) with finite arithmetic.
    floor = torch.finfo(dtype).min
    return log_q.clamp_min(floor), log_p.clamp_min(floor)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(A‖B) = Σ_v a (log a − log b): (..., V) log-probs -> (...)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1−w)·b) from log-probs, without leaving log space (a, b may underflow to 0)."""
    # Exact at the ends: log(0) would be -inf, and the mixture is then one of the two inputs.
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _check_unit_interval(name: str, value: float, *, allow_one: bool = True) -> None:
    ok = 0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0
    if not ok:
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {bound}, got {value}")


# --------------------------------------------------------------------------------------------
# divergences: (student_logits (..., V), teacher_logits (..., V)) -> (...)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Forward KL, KL(P‖Q) = Σ_v p (log p − log q). Mode-covering: Q must put mass wherever P does.

    Not the same as the cross-entropy −Σ p log q, which is this minus the teacher's entropy (same
    gradient for the student, different value).

    Args:
        student_logits: (..., V).
        teacher_logits: (..., V).
        temperature: T > 0; both distributions are softmax(logits / T).

    Returns:
        (...) per-token values, float32 or wider.
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_p, log_q)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Reverse KL, KL(Q‖P) = Σ_v q (log q − log p). Mode-seeking: Q concentrates on P's main modes.

    Shapes as in `forward_kl`: (..., V) -> (...).
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_q, log_p)


def jsd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon divergence (GKD):

        JSD_β = β · KL(P‖M) + (1 − β) · KL(Q‖M),   M = β·P + (1 − β)·Q.

    The formula tends to 0 as β → 0 or 1, so, as in GKD, β = 0 is defined as `forward_kl` and
    β = 1 as `reverse_kl`, and those are returned exactly. β = 0.5 is the symmetric JSD.

    Shapes as in `forward_kl`: (..., V) -> (...).

    Raises:
        ValueError: β outside [0, 1].
    """
    _check_unit_interval("jsd beta", beta)
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, skew: float = 0.1
) -> Tensor:
    """Skew forward KL (DistiLLM), KL(P ‖ s·P + (1 − s)·Q) with s = `skew`.

    s = 0 is `forward_kl`; mixing a little of P into the student side keeps the divergence finite
    and its gradient bounded where Q is near 0.

    Shapes as in `forward_kl`: (..., V) -> (...).

    Raises:
        ValueError: skew outside [0, 1) (skew = 1 compares P with itself: always 0).
    """
    _check_unit_interval("skew", skew, allow_one=False)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_p, _log_mixture(log_p, log_q, skew))


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, skew: float = 0.1
) -> Tensor:
    """Skew reverse KL (DistiLLM), KL(Q ‖ s·Q + (1 − s)·P) with s = `skew`.

    s = 0 is `reverse_kl`. As in DistiLLM's paper and code, the skew weight goes on the first
    argument of the KL in both skew variants, here Q.

    Shapes as in `forward_kl`: (..., V) -> (...).

    Raises:
        ValueError: skew outside [0, 1) (skew = 1 compares Q with itself: always 0).
    """
    _check_unit_interval("skew", skew, allow_one=False)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_q, _log_mixture(log_q, log_p, skew))


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance, ½ Σ_v |p − q|, in [0, 1].

    Shapes as in `forward_kl`: (..., V) -> (...).
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Mean over the vocabulary of (z_s / T − z_t / T)².

    Scaled by 1/T² so that, after the T² factor every soft loss gets, it is the plain logit MSE.

    Shapes as in `forward_kl`: (..., V) -> (...).
    """
    _check_pair(student_logits, teacher_logits, temperature)
    dtype = _compute_dtype(student_logits, teacher_logits)
    diff = (student_logits.to(dtype) - teacher_logits.to(dtype)) / temperature
    return diff.square().mean(-1)


def uld(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Universal Logit Distillation (Boizard et al. 2024): Σ_i |p_(i) − q_(i)|, the L1 distance between the
    teacher's and the student's probabilities each sorted in decreasing order (the shorter vector padded with
    zeros). It compares the shapes of the two distributions, not which token gets which mass, so the vocabularies
    may differ: the one logit loss for a teacher with another tokenizer. In [0, 2]; 0 when one distribution is a
    permutation of the other.

    Shapes: (..., V_s) and (..., V_t) with the same leading shape -> (...).
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} must "
            "have the same leading shape (the same positions); only the vocabularies may differ"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = _compute_dtype(student_logits, teacher_logits)
    q = F.softmax(student_logits.to(dtype) / temperature, dim=-1).sort(dim=-1, descending=True).values
    p = F.softmax(teacher_logits.to(dtype) / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    q, p = F.pad(q, (0, width - q.shape[-1])), F.pad(p, (0, width - p.shape[-1]))
    return (p - q).abs().sum(-1)


def token_cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Hard-label cross-entropy per token, −log q(label) at T = 1; 0 where labels == -100.

    Args:
        student_logits: (..., V).
        labels: (...) token ids, already aligned with the logits' positions (the caller shifts
            them for causal LMs); -100 marks tokens that do not count.

    Returns:
        (...) per-token values, float32 or wider.
    """
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])} (logits are (..., V), labels (...))"
        )
    dtype = _compute_dtype(student_logits)
    vocab = student_logits.shape[-1]
    # (..., V) -> (N, V): cross_entropy wants a flat batch; log-sum-exp inside keeps it stable.
    per_token = F.cross_entropy(
        student_logits.to(dtype).reshape(-1, vocab),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return per_token.reshape(labels.shape)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "logit_mse": logit_mse,
    "uld": uld,
}
if tuple(DIVERGENCES) != DIVERGENCE_NAMES:  # a divergence added in one table and not the other
    raise ImportError(
        f"losses.divergences.DIVERGENCES {list(DIVERGENCES)} and alambic.divergence.PARAMETERS "
        f"{list(DIVERGENCE_NAMES)} must name the same divergences, in the same order"
    )


def divergence(
    name: DivergenceName | str | DivergenceSpec,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float | None = None,
    jsd_beta: float | None = None,
    skew: float | None = None,
) -> Tensor:
    """Per-token divergence `name` from `DIVERGENCES`, (..., V) -> (...).

    `name`: a name with its parameters (T = 1, jsd_beta = 0.5, skew = 0.1 when None), or a `DivergenceSpec` that
    holds them. `jsd_beta` goes to `jsd` only, `skew` to the two skew KLs only (`alambic.divergence.PARAMETERS`);
    the others ignore both.

    Raises:
        ValueError: unknown name (the message lists the allowed ones).
    """
    spec = resolve_spec(name, temperature, jsd_beta, skew)
    keywords = spec.keywords()  # checks the name
    return DIVERGENCES[spec.name](student_logits, teacher_logits, temperature=spec.temperature, **keywords)


def _check_divergence_name(name: str | DivergenceSpec) -> None:
    (name if isinstance(name, DivergenceSpec) else DivergenceSpec(str(name))).check_name()


# `distillation_loss` has a parameter named `divergence`, which hides the function inside it.
_divergence = divergence


# --------------------------------------------------------------------------------------------
# reduction and the distillation objective


@dataclass
class LossParts:
    """The parts of one distillation loss, each a 0-dim tensor.

    total = alpha · soft + (1 − alpha) · hard. `num_tokens` counts the tokens of this call that
    count (labels != -100), whatever denominator was used. `soft_per_teacher`: with several teachers
    combined as a weighted sum (`losses.mixture`), each teacher's unweighted soft loss, shape (K,),
    detached, for logging; None otherwise.
    """

    total: Tensor
    soft: Tensor
    hard: Tensor
    num_tokens: Tensor
    soft_per_teacher: Tensor | None = None


def _denominator(mask: Tensor, num_items_in_batch: int | Tensor | None, dtype: torch.dtype) -> Tensor:
    if num_items_in_batch is None:
        count = mask.sum()
    else:
        count = torch.as_tensor(num_items_in_batch, device=mask.device)
    # clamp: a fully masked batch must give 0, not 0/0
    return count.to(dtype).clamp_min(1.0)


def reduce_over_tokens(per_token: Tensor, mask: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """Σ per_token · mask / denominator: the mean over counted tokens.

    Args:
        per_token: (...) per-token values.
        mask: (...) bool (or 0/1), True where the token counts.
        num_items_in_batch: the global number of counted tokens across gradient-accumulation
            micro-batches and data-parallel ranks, as transformers' Trainer passes it to
            `compute_loss`. Dividing every micro-batch by this one number makes the summed
            micro-batch losses (and gradients) equal those of the whole batch at once. None: divide
            by this call's own count, mask.sum().

    Returns:
        0-dim tensor; 0 (not NaN) when no token counts (denominator clamped to >= 1).
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.bool()
    # where, not multiply: 0 · inf = NaN, and a masked position's value must not reach the sum.
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    return total / _denominator(mask, num_items_in_batch, total.dtype)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    divergence: DivergenceName | str | DivergenceSpec = "forward_kl",
    temperature: float | None = None,
    alpha: float = 0.5,
    jsd_beta: float | None = None,
    skew: float | None = None,
    num_items_in_batch: int | Tensor | None = None,
) -> LossParts:
    """The logit distillation objective over the counted tokens:

        soft  = T² · mean_tokens divergence(student, teacher; T)
        hard  = mean_tokens −log q(label)          (T = 1)
        total = alpha · soft + (1 − alpha) · hard

    The T² factor keeps the soft gradients' scale as T changes (Hinton et al. 2015). The mean is
    over tokens with labels != -100, or divided by `num_items_in_batch` when given (see
    `reduce_over_tokens`). alpha = 1 does not compute the hard term, alpha = 0 not the soft one
    (each is then a 0 tensor).

    Args:
        student_logits: (..., V).
        teacher_logits: (..., V), same shape; may be None only when alpha = 0 (plain cross-entropy).
        labels: (...) aligned with the logits' positions (the caller shifts them for causal LMs);
            -100 marks tokens that do not count.
        divergence: a name from `DIVERGENCES`, or a `DivergenceSpec` (then temperature, jsd_beta and skew are
            its own: leave them None).
        temperature: T > 0 for the soft term (None: 1).
        alpha: weight of the soft term, in [0, 1].
        jsd_beta: β of `jsd` (None: 0.5).
        skew: skew of `skew_forward_kl` / `skew_reverse_kl` (None: 0.1).
        num_items_in_batch: global count of counted tokens (gradient accumulation, data parallel).

    Returns:
        LossParts of 0-dim tensors.

    Raises:
        ValueError: unknown divergence, alpha outside [0, 1], or shapes that do not line up.
    """
    spec = resolve_spec(divergence, temperature, jsd_beta, skew)
    spec.check_name()
    _check_unit_interval("alpha", alpha)
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])} (logits are (..., V), labels (...))"
        )
    if teacher_logits is None and alpha > 0.0:
        raise ValueError(f"alpha = {alpha} weighs a soft loss, which needs teacher logits (got None)")
    mask = labels != IGNORE_INDEX  # (...)
    dtype = _compute_dtype(student_logits, *([] if teacher_logits is None else [teacher_logits]))
    zero = torch.zeros((), dtype=dtype, device=student_logits.device)

    soft = zero
    if alpha > 0.0:
        per_token = _divergence(spec, student_logits, teacher_logits)
        soft = spec.temperature**2 * reduce_over_tokens(per_token, mask, num_items_in_batch)

    hard = zero
    if alpha < 1.0:
        hard = reduce_over_tokens(token_cross_entropy(student_logits, labels), mask, num_items_in_batch)

    return LossParts(total=mix_soft_and_hard(soft, hard, alpha), soft=soft, hard=hard, num_tokens=mask.sum())


def mix_soft_and_hard(soft: Tensor | None, hard: Tensor | None, alpha: float) -> Tensor:
    """total = alpha · soft + (1 − alpha) · hard; at alpha 1 (or 0) the one computed term as it is.

    Every path (full logits, chunked, top-k cache) combines its parts here.
    """
    if alpha == 1.0:
        return soft
    if alpha == 0.0:
        return hard
    return alpha * soft + (1.0 - alpha) * hard
