"""The distillation loss against a top-k teacher: k log-probs, their ids and the tail mass per token.

A top-k teacher (an offline cache, or a live teacher truncated to its k most likely ids) keeps, per
token, log p_i for its k most likely ids and log m_P, where m_P = 1 − Σ_topk p_i is the mass of the
other V − k ids (the tail). Both distributions are then seen through the same k + 1 buckets:

    P_B = (p_1, …, p_k, m_P)        teacher, from the cache
    Q_B = (q_1, …, q_k, m_Q)        student, q = softmax(z_s / T) gathered at the teacher's ids,
                                    m_Q = 1 − Σ q_ids its remaining mass

and every divergence of `divergences` is computed between these two (k + 1)-bucket distributions,
with its own code (`divergences.divergence` on the bucket log-probs: they are normalised, so the
log_softmax inside changes nothing but rounding, and renormalises a teacher stored in float16 the
same way on both sides; temperature 1 there, since the buckets are already tempered).

Why buckets: by the chain rule, KL(P‖Q) = KL(P_B‖Q_B) + m_P · KL(P(·|tail) ‖ Q(·|tail)). The bucket
loss keeps the first term exactly and drops only the teacher's shape inside its tail, which the
cache does not know. With k = V there is no tail (m_P = m_Q = 0), the bucket divergence equals the
full-vocabulary one, and `topk_distillation_loss` equals `distillation_loss` on full logits.

`logit_mse` compares raw logits, which a top-k teacher does not keep: it is refused here.
"""

from __future__ import annotations

import math

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
    "TOPK_DIVERGENCES",
    "student_bucket_logprobs",
    "teacher_bucket_logprobs",
    "teacher_topk",
    "topk_distillation_loss",
    "topk_of_log_probs",
    "truncation_kl",
]

# The divergences defined on distributions; logit_mse needs the teacher's raw logits.
TOPK_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


def _floor(dtype: torch.dtype) -> float:
    # The same floor as `divergences._log_probs`: log 0 becomes the most negative finite number, a
    # probability of 0 with finite arithmetic (0 · (−inf) would be NaN in the sums and gradients).
    return torch.finfo(dtype).min


def topk_of_log_probs(log_p: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k most likely ids of (N, V) log-probs, their log-probs and the log tail mass.

    The tail, log(1 − Σ_topk p), is the log-sum-exp of the other V − k log-probs: exact where
    1 − Σ would cancel. With k = V it is the floor (a finite log 0).

    Returns:
        ids (N, k) int64, logprobs (N, k) and tail (N,), in log_p's dtype.
    """
    if not 1 <= k <= log_p.shape[-1]:
        raise ValueError(f"k must be in [1, V = {log_p.shape[-1]}], got {k}")
    floor = _floor(log_p.dtype)
    top, ids = log_p.topk(k, dim=-1)  # (N, k), sorted, most likely first
    tail = log_p.scatter(-1, ids, floor).logsumexp(-1)  # (N,)
    return ids, top.clamp_min(floor), tail.clamp_min(floor)


def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """What a top-k teacher keeps of its (N, V) logits at temperature T: (ids, logprobs, tail).

    Used to write the offline cache, and for a live teacher truncated to its top k.

    Returns:
        ids (N, k) int64, logprobs (N, k) = log softmax(z / T) at the ids, tail (N,) = log(1 − Σ p_ids);
        float32 or wider.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = torch.log_softmax(teacher_logits.to(_compute_dtype(teacher_logits)) / temperature, dim=-1)
    return topk_of_log_probs(log_p, k)


def truncation_kl(log_p: Tensor, ids: Tensor, tail: Tensor) -> Tensor:
    """What a top-k teacher loses, per token: KL(P ‖ P̃) in nats, where P̃ is the distribution over the
    V ids that the cache stands for: the top-k probabilities exactly, and the tail mass m spread
    evenly over the other V − k ids (the most even, maximum-entropy, distribution with what is kept):

        KL(P‖P̃) = Σ_tail p (log p − log(m / (V − k)))
                 = m · KL(P(·|tail) ‖ uniform over the tail)  =  H(P̃) − H(P)   >= 0

    It is 0 when k = V or when the teacher's tail is flat, and never grows with k (each extra id
    kept adds a constraint to the maximum-entropy P̃). (Σ_tail p log(p / m), without the V − k,
    would be −m·H(P(·|tail)) <= 0: not a divergence.)

    Args:
        log_p: (N, V) the teacher's full log-probs at the cache's temperature.
        ids: (N, k) the kept ids.
        tail: (N,) log m.

    Returns:
        (N,) values >= 0, in log_p's dtype.
    """
    vocab, k = log_p.shape[-1], ids.shape[-1]
    if k >= vocab:
        return log_p.new_zeros(log_p.shape[:-1])
    p = log_p.exp()
    # 0 log 0 = 0 where p underflows (and where log p is -inf: masked vocabulary entries).
    plogp = torch.where(p > 0, p * log_p, torch.zeros_like(p)).scatter(-1, ids, 0.0).sum(-1)  # Σ_tail p log p
    m = tail.exp()
    kl = plogp - m * (tail - math.log(vocab - k))
    return kl.clamp_min(0.0)  # rounding can leave -1e-9 where the tail is flat


def student_bucket_logprobs(student_logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Student log-probs over the teacher's k ids plus one tail bucket.

        out[:, :k] = log q_ids,   out[:, k] = log(1 − Σ q_ids) = logsumexp of log q over the other ids

    The tail is computed as the log-sum-exp of the ids outside the k (not as log(1 − Σ)), so it is
    exact however close Σ q_ids is to 1, and its gradient is that of the tail's own probabilities.
    With k = V the tail holds no id and is the floor (log 0 made finite), with a zero gradient.

    Args:
        student_logits: (N, V) logits; q = softmax(logits / T).
        ids: (N, k) distinct ids per row, 0 <= id < V.
        temperature: T > 0.

    Returns:
        (N, k + 1) normalised log-probs, float32 or wider.
    """
    if student_logits.dim() != 2 or ids.dim() != 2 or ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} must be (N, V) and ids {tuple(ids.shape)} (N, k) "
            "with the same N"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = _compute_dtype(student_logits)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (N, V)
    ids = ids.long()
    floor = _floor(dtype)
    top = log_q.gather(-1, ids)  # (N, k)
    # scatter a finite floor (not -inf) over the k ids: logsumexp of an all-floor row stays finite
    # and its gradient is 0, where an all -inf row would give NaN.
    tail = log_q.scatter(-1, ids, floor).logsumexp(-1, keepdim=True)  # (N, 1)
    return torch.cat([top, tail], dim=-1).clamp_min(floor)


def teacher_bucket_logprobs(logprobs: Tensor, tail: Tensor) -> Tensor:
    """Teacher log-probs over its k ids plus the tail bucket: cat(logprobs, tail) -> (N, k + 1).

    Args:
        logprobs: (N, k) log p of the top-k ids (any float dtype; upcast to float32 or wider).
        tail: (N,) log of the tail mass 1 − Σ p_topk; −inf or a floor when there is no tail.

    Returns:
        (N, k + 1), −inf replaced by the floor of `divergences` (a finite log 0).
    """
    if logprobs.dim() != 2 or tail.shape != logprobs.shape[:1]:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} must be (N, k) and tail {tuple(tail.shape)} (N,)")
    dtype = _compute_dtype(logprobs, tail)
    out = torch.cat([logprobs.to(dtype), tail.to(dtype)[:, None]], dim=-1)
    return out.clamp_min(_floor(dtype))


def topk_distillation_loss(
    student_logits: Tensor,
    teacher_ids: Tensor | None,
    teacher_logprobs: Tensor | None,
    teacher_tail: Tensor | None,
    labels: Tensor,
    *,
    divergence: DivergenceName | str | DivergenceSpec = "forward_kl",
    temperature: float | None = None,
    alpha: float = 0.5,
    jsd_beta: float | None = None,
    skew: float | None = None,
    num_items_in_batch: int | Tensor | None = None,
) -> LossParts:
    """`distillation_loss` with a top-k teacher, over the k + 1 buckets (see the module docstring):

        soft  = T² · mean_tokens divergence(Q_B, P_B)      buckets of softmax(z / T)
        hard  = mean_tokens −log q(label)                   T = 1, full student logits
        total = alpha · soft + (1 − alpha) · hard

    Reduction and mixing are `distillation_loss`'s (`reduce_over_tokens`, same denominator, the edges
    alpha = 0 / 1 computing one term only). With k = V (every id kept, tail of 0 mass) it equals
    `distillation_loss(student_logits, teacher_logits, labels, ...)` in value and gradient.

    Args:
        student_logits: (N, V) student logits at the counted positions (or any positions; rows whose
            label is -100 do not count).
        teacher_ids: (N, k) the teacher's top-k ids; None only when alpha = 0.
        teacher_logprobs: (N, k) the teacher's log-probs at those ids, at temperature T.
        teacher_tail: (N,) log of the teacher's tail mass.
        labels: (N,) target ids; -100 marks rows that do not count.
        divergence, temperature, alpha, jsd_beta, skew, num_items_in_batch: as in `distillation_loss`.
            `temperature` must be the one the teacher's log-probs were computed at.

    Returns:
        LossParts of 0-dim tensors, float32 or wider.

    Raises:
        ValueError: logit_mse or an unknown divergence, alpha out of range, shapes that do not line up,
            teacher ids outside the student's vocabulary.
    """
    spec = resolve_spec(divergence, temperature, jsd_beta, skew)
    check_topk_options(spec.name, alpha, spec.temperature)
    if student_logits.dim() != 2 or tuple(labels.shape) != tuple(student_logits.shape[:1]):
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} must be (N, V) and labels {tuple(labels.shape)} (N,)"
        )
    check_teacher_rows(
        student_logits.shape[0], student_logits.shape[1], teacher_ids, teacher_logprobs, teacher_tail, alpha
    )
    return _topk_loss(
        student_logits,
        teacher_ids,
        teacher_logprobs,
        teacher_tail,
        labels,
        divergence=spec,
        alpha=alpha,
        num_items_in_batch=num_items_in_batch,
    )


def check_topk_options(divergence: str, alpha: float, temperature: float) -> None:
    """The divergence is one a top-k teacher can serve (`TOPK_DIVERGENCES`), alpha in [0, 1], temperature > 0.

    Raises:
        ValueError: naming the setting, its value and what is accepted.
    """
    _check_divergence_name(divergence)
    _check_unit_interval("alpha", alpha)
    if divergence not in TOPK_DIVERGENCES:
        raise ValueError(
            f"divergence {divergence!r} compares raw logits, which a top-k teacher does not keep; "
            f"choose one of: {', '.join(TOPK_DIVERGENCES)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_teacher_rows(
    n: int,
    vocab: int,
    teacher_ids: Tensor | None,
    teacher_logprobs: Tensor | None,
    teacher_tail: Tensor | None,
    alpha: float,
) -> None:
    """The teacher rows line up with N student rows of V logits (nothing to check when alpha = 0)."""
    if alpha == 0.0:
        return
    if teacher_ids is None or teacher_logprobs is None or teacher_tail is None:
        raise ValueError(
            f"alpha = {alpha} weighs a soft loss, which needs teacher_ids, teacher_logprobs and teacher_tail (got None)"
        )
    if (
        teacher_ids.dim() != 2
        or teacher_ids.shape != teacher_logprobs.shape
        or teacher_ids.shape[0] != n
        or tuple(teacher_tail.shape) != (n,)
    ):
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs {tuple(teacher_logprobs.shape)} must "
            f"be (N, k) and teacher_tail {tuple(teacher_tail.shape)} (N,), with the student's N = {n}"
        )
    if teacher_ids.numel() and (int(teacher_ids.max()) >= vocab or int(teacher_ids.min()) < 0):
        raise ValueError(
            f"teacher ids span [{int(teacher_ids.min())}, {int(teacher_ids.max())}], outside the student's {vocab} "
            "logits: the teacher's top-k was taken over a larger vocabulary than the student's head (compare the "
            "tokenizers; write the cache with vocab_size = the shared size)"
        )


def _topk_loss(
    student_logits: Tensor,
    teacher_ids: Tensor | None,
    teacher_logprobs: Tensor | None,
    teacher_tail: Tensor | None,
    labels: Tensor,
    *,
    divergence: str | DivergenceSpec,
    alpha: float,
    num_items_in_batch: int | Tensor | None,
    temperature: float | None = None,
    jsd_beta: float | None = None,
    skew: float | None = None,
) -> LossParts:
    """`topk_distillation_loss` without the input checks (the chunked caller checks once per call:
    the id range check synchronises with the device)."""
    spec = resolve_spec(divergence, temperature, jsd_beta, skew)
    temperature = spec.temperature
    use_teacher = alpha > 0.0
    mask = labels != IGNORE_INDEX  # (N,)
    dtype = _compute_dtype(student_logits, *([teacher_logprobs] if use_teacher else []))
    zero = torch.zeros((), dtype=dtype, device=student_logits.device)

    soft = zero
    if use_teacher:
        log_q = student_bucket_logprobs(student_logits.to(dtype), teacher_ids, temperature)  # (N, k+1)
        log_p = teacher_bucket_logprobs(teacher_logprobs.to(dtype), teacher_tail)  # (N, k+1)
        # temperature=1: the buckets are already tempered.
        per_token = divergence_fn(spec.at_temperature(1.0), log_q, log_p)
        soft = temperature**2 * reduce_over_tokens(per_token, mask, num_items_in_batch)

    hard = zero
    if alpha < 1.0:
        hard = reduce_over_tokens(token_cross_entropy(student_logits, labels), mask, num_items_in_batch)

    return LossParts(total=mix_soft_and_hard(soft, hard, alpha), soft=soft, hard=hard, num_tokens=mask.sum())


# Below this, a tail probability summed in float32 may have lost its smallest terms to underflow: such rows get the
# tail from a log-sum-exp instead (exact whatever its size).
_TINY_TAIL = 1e-30


@torch.no_grad()
def topk_loss_and_logit_grad(
    student_logits: Tensor,
    teacher_ids: Tensor | None,
    teacher_logprobs: Tensor | None,
    teacher_tail: Tensor | None,
    labels: Tensor,
    *,
    divergence: str | DivergenceSpec,
    alpha: float,
    num_items_in_batch: int | Tensor | None,
    temperature: float | None = None,
    jsd_beta: float | None = None,
    skew: float | None = None,
) -> tuple[LossParts, Tensor]:
    """`_topk_loss` and its gradient with respect to the (c, V) logits, in closed form.

    Autograd through `student_bucket_logprobs` walks the (c, V) block about a dozen times (log-softmax, the tail's
    scatter copy and log-sum-exp, and their backwards). Here the divergence's gradient g over the k + 1 buckets (a
    small (c, k + 1) autograd) is spread over the vocabulary directly. With q = softmax(z / T), G = Σ_j g_j:

        d/dz_v = (1/T) · (g_i − q_v · G)                    v the bucket of id i
        d/dz_v = (1/T) · q_v · (g_tail / q_tail − G)         v in the tail
        hard CE at T = 1:  (1 − alpha)/n · (softmax(z)_v − [v = label])

    so the block is walked about four times: the exponentials, the tail's sum, and the gradient in place.

    Returns:
        (LossParts, dlogits (c, V) in the logits' compute dtype). The same values and gradients as autograd through
        `_topk_loss` (tested to float64 precision).
    """
    spec = resolve_spec(divergence, temperature, jsd_beta, skew)
    temperature = spec.temperature
    dtype = _compute_dtype(student_logits, *([teacher_logprobs] if alpha > 0.0 else []))
    z = student_logits.to(dtype)
    mask = labels != IGNORE_INDEX  # (c,)
    denominator = mask.sum() if num_items_in_batch is None else num_items_in_batch
    zero = torch.zeros((), dtype=dtype, device=z.device)
    w_hard = torch.where(mask, (1.0 - alpha) / torch.as_tensor(denominator, dtype=dtype).clamp_min(1.0), zero)  # (c,)
    soft = hard = zero
    grad = None
    if alpha > 0.0:
        zt = z / temperature if temperature != 1.0 else z
        top = zt.amax(dim=-1, keepdim=True)
        q = torch.sub(zt, top).exp_()  # (c, V), normalised below: softmax(z / T)
        total_mass = q.sum(-1, keepdim=True)
        lse = top + total_mass.log()  # (c, 1) log-sum-exp of z / T
        q.div_(total_mass)
        ids = teacher_ids.long()
        q_ids = q.gather(-1, ids)  # (c, k)
        q.scatter_(-1, ids, 0.0)  # from here on q holds the tail's probabilities only
        q_tail = q.sum(-1)  # (c,)
        log_tail = q_tail.log()
        tiny = q_tail < _TINY_TAIL
        if tiny.any():
            log_tail[tiny] = zt[tiny].scatter(-1, ids[tiny], -math.inf).logsumexp(-1) - lse[tiny, 0]
        floor = _floor(dtype)
        buckets = torch.cat([zt.gather(-1, ids) - lse, log_tail[:, None]], dim=-1).clamp_min(floor)
        log_p = teacher_bucket_logprobs(teacher_logprobs.to(dtype), teacher_tail)
        with torch.enable_grad():
            buckets.requires_grad_(True)
            per_token = divergence_fn(spec.at_temperature(1.0), buckets, log_p)
            soft_t = temperature**2 * reduce_over_tokens(per_token, mask, denominator)
            (g,) = torch.autograd.grad(alpha * soft_t, buckets)  # (c, k + 1)
        soft = soft_t.detach()
        g_ids, g_tail = g[:, :-1], g[:, -1]
        big_g = g.sum(-1)  # (c,)
        tail_factor = torch.where(q_tail > 0, g_tail / q_tail.clamp_min(torch.finfo(dtype).tiny), zero)
        shared_hard = temperature == 1.0 and alpha < 1.0  # the hard term's softmax is this one
        row = tail_factor - big_g + (w_hard if shared_hard else 0.0)  # (c,)
        grad = q.mul_(row[:, None])  # tail entries; the ids' entries are 0 in q, filled next
        ids_grad = g_ids - q_ids * big_g[:, None] + (q_ids * w_hard[:, None] if shared_hard else 0.0)
        grad.scatter_add_(-1, ids, ids_grad)
        if temperature != 1.0:
            grad.div_(temperature)
    if alpha < 1.0:
        lse1 = lse[:, 0] if alpha > 0.0 and temperature == 1.0 else torch.logsumexp(z, dim=-1)  # (c,)
        safe = torch.where(mask, labels, torch.zeros_like(labels))
        per_token = torch.where(mask, lse1 - z.gather(-1, safe[:, None])[:, 0], zero)
        hard = reduce_over_tokens(per_token, mask, denominator)
        if grad is None or temperature != 1.0:  # the hard term's own softmax(z)
            hard_grad = torch.sub(z, lse1[:, None]).exp_().mul_(w_hard[:, None])
            grad = hard_grad if grad is None else grad.add_(hard_grad)
        grad.scatter_add_(-1, safe[:, None], -w_hard[:, None])
    parts = LossParts(total=mix_soft_and_hard(soft, hard, alpha), soft=soft, hard=hard, num_tokens=mask.sum())
    return parts, grad
