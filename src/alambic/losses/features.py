"""Feature distillation losses: hidden states (TinyBERT), attention maps (TinyBERT), attention relations
(MiniLM-v2), and the map that pairs student layers with teacher layers.

Like the logit losses these are pure functions of tensors: they know nothing of models or hooks (the
capture lives in `alambic.training.features`). Every loss takes a `mask` of the positions that count,
padding never among them, and reduces like `reduce_over_tokens`: the sum over counted positions divided
by their number (or by `num_items_in_batch`, the global count under gradient accumulation), so a fully
masked input gives 0, not NaN. Computation is in float32 at least (float64 stays float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from alambic.losses.divergences import _compute_dtype, reduce_over_tokens

HiddenStateKind = Literal["mse", "cosine"]
AttentionKind = Literal["mse", "kl"]
LayerMapMode = Literal["auto", "uniform", "last"]

# Cosine similarity: each norm is clamped at this, so a zero vector gives similarity 0, not 0/0.
COSINE_EPS = 1e-8


def _check_mask(mask: Tensor, leading: torch.Size, what: str) -> Tensor:
    if mask.shape != leading:
        raise ValueError(f"mask {tuple(mask.shape)} must have the {what}' leading shape {tuple(leading)}")
    return mask.bool()


# --------------------------------------------------------------------------------------------
# hidden states


def hidden_state_loss(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor,
    *,
    kind: HiddenStateKind = "cosine",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Distance between the student's and the teacher's hidden states at the counted positions.

        mse:    ℓ_n = (1/H) Σ_h (s_nh − t_nh)²
        cosine: ℓ_n = 1 − s_n·t_n / (max(‖s_n‖, ε) · max(‖t_n‖, ε))
        loss    = Σ_n mask_n ℓ_n / max(Σ_n mask_n, 1)          (or / num_items_in_batch)

    The student's states must already be in the teacher's width (the caller applies its projection,
    e.g. `FeatureProjector`). MSE grows with the states' magnitude (LLM hidden states have outlier
    channels in the hundreds); cosine is scale-free, in [0, 2].

    Args:
        student: (B, T, H) or (N, H) student states, projected to the teacher's width H.
        teacher: same shape as `student`.
        mask: (B, T) or (N,) bool, True where the position counts.
        kind: "mse" or "cosine".
        num_items_in_batch: global count of counted positions (gradient accumulation); None: mask.sum().

    Returns:
        0-dim tensor.

    Raises:
        ValueError: shapes that differ (widths included: project first), or an unknown kind.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student hidden states {tuple(student.shape)} and teacher hidden states {tuple(teacher.shape)} "
            "differ in shape: the positions must match and the student's width must be projected to the "
            "teacher's (FeatureProjector) before the loss"
        )
    mask = _check_mask(mask, student.shape[:-1], "hidden states")
    dtype = _compute_dtype(student, teacher)
    s, t = student.to(dtype), teacher.to(dtype)
    if kind == "mse":
        per_position = (s - t).square().mean(-1)
    elif kind == "cosine":
        norms = s.norm(dim=-1).clamp_min(COSINE_EPS) * t.norm(dim=-1).clamp_min(COSINE_EPS)
        per_position = 1.0 - (s * t).sum(-1) / norms
    else:
        raise ValueError(f"hidden state loss kind must be 'mse' or 'cosine', got {kind!r}")
    return reduce_over_tokens(per_position, mask, num_items_in_batch)


# --------------------------------------------------------------------------------------------
# attention maps (TinyBERT)


def attention_map_loss(
    student_probs: Tensor,
    teacher_probs: Tensor,
    mask: Tensor,
    *,
    kind: AttentionKind = "kl",
    key_mask: Tensor | None = None,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Distance between attention probabilities, per query row, averaged over heads (TinyBERT).

    With p = teacher_probs[b, h, i, :], q = student_probs[b, h, i, :] and K the valid keys of batch b:

        kl:  ℓ_bhi = Σ_{k∈K} p_k (log p_k − log q_k)        KL(teacher ‖ student), terms with p_k = 0 are 0
        mse: ℓ_bhi = Σ_{k∈K} (q_k − p_k)²
        loss = Σ_{b,i} mask_bi · (1/H) Σ_h ℓ_bhi / max(Σ mask, 1)   (or / num_items_in_batch)

    Summed over keys, like the logit divergences sum over the vocabulary. A causal model's maps are 0
    above the diagonal in both models, so those entries add nothing.

    Args:
        student_probs: (B, H, T, T) softmax-normalised over the last axis.
        teacher_probs: (B, H, T, T), the same number of heads (head counts that differ: use
            `attention_relation_loss`, which does not need them to match).
        mask: (B, T) bool, True for the query positions that count.
        kind: "kl" or "mse".
        key_mask: (B, T) bool, the key positions that may be attended (padding excluded); None: all.
        num_items_in_batch: global count of counted positions; None: mask.sum().

    Returns:
        0-dim tensor.
    """
    if student_probs.shape != teacher_probs.shape or student_probs.dim() != 4:
        raise ValueError(
            f"student attention {tuple(student_probs.shape)} and teacher attention {tuple(teacher_probs.shape)} "
            "must both be (B, heads, T, T) with the same number of heads; for models whose head counts differ "
            "use attention relations (loss.features.attention_relations) instead"
        )
    b, _, t, _ = student_probs.shape
    mask = _check_mask(mask, torch.Size((b, t)), "attention maps")
    dtype = _compute_dtype(student_probs, teacher_probs)
    q, p = student_probs.to(dtype), teacher_probs.to(dtype)
    keys = torch.ones_like(mask) if key_mask is None else _check_mask(key_mask, mask.shape, "attention maps")
    valid = keys[:, None, None, :]  # (B, 1, 1, T) over the key axis
    if kind == "kl":
        # clamp: a student probability that underflowed to 0 where the teacher's is not gives a large
        # finite term, not inf; where p = 0 the term is 0 whatever q is (where, not multiply: 0·inf).
        tiny = torch.finfo(dtype).tiny
        terms = p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())
        terms = torch.where(valid & (p > 0), terms, torch.zeros_like(terms))
    elif kind == "mse":
        terms = torch.where(valid, (q - p).square(), torch.zeros_like(q))
    else:
        raise ValueError(f"attention loss kind must be 'kl' or 'mse', got {kind!r}")
    per_row = terms.sum(-1).mean(1)  # (B, H, T, T) -> (B, H, T) -> (B, T)
    return reduce_over_tokens(per_row, mask, num_items_in_batch)


# --------------------------------------------------------------------------------------------
# attention relations (MiniLM-v2)


def _relation_log_probs(x: Tensor, num_heads: int, valid: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T, D) -> (B, R, T, T): log softmax over keys of x_r x_rᵀ / sqrt(D/R), invalid keys excluded."""
    b, t, d = x.shape
    head_dim = d // num_heads
    xr = x.to(dtype).reshape(b, t, num_heads, head_dim).transpose(1, 2)  # (B, R, T, d_r)
    # not autocast: under bf16 mixed precision the matmul would drop to bf16 (3 significant digits)
    with torch.autocast(x.device.type, enabled=False):
        scores = xr @ xr.transpose(-1, -2) / math.sqrt(head_dim)  # (B, R, T, T)
    # The most negative finite number, not -inf: a row with no valid key (a padding query) then gives a
    # uniform, finite row instead of NaN, whose gradient would poison the batch even though it is masked.
    scores = scores.masked_fill(~valid, torch.finfo(dtype).min)
    return scores.log_softmax(-1)


def attention_relation_loss(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    mask: Tensor,
    *,
    num_relation_heads: int,
    key_mask: Tensor | None = None,
    causal: bool = True,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Self-attention relation distillation (MiniLM-v2, Wang et al. 2021).

    Each of the query, key and value vectors x ∈ {q, k, v}, (B, T, D), is split into R relation heads
    of width d_r = D / R (each model with its own d_r). The relation of head r is

        A^x_r = softmax(x_r x_rᵀ / sqrt(d_r))   over the valid keys j (j ≤ i when causal, key_mask[j])

    and the loss is, per query row i, KL(teacher relation ‖ student relation) averaged over heads and
    over the three relations:

        ℓ_bi = (1/3) Σ_{x∈{q,k,v}} (1/R) Σ_r Σ_j A^x_T[b,r,i,j] (log A^x_T[b,r,i,j] − log A^x_S[b,r,i,j])
        loss = Σ_{b,i} mask_bi ℓ_bi / max(Σ mask, 1)          (or / num_items_in_batch)

    Relations are T×T whatever the widths, so the two models may differ in hidden size, number of
    attention heads and head width; only R must divide every width.

    Args:
        student: (q, k, v), each (B, T, D_x) (the q/k/v projections' outputs; D_x may differ per x).
        teacher: (q, k, v), each (B, T, D'_x).
        mask: (B, T) bool, True for the query positions that count.
        num_relation_heads: R.
        key_mask: (B, T) bool, keys that may be attended (padding excluded); None: all.
        causal: keys after the query are excluded (decoder LMs).
        num_items_in_batch: global count of counted positions; None: mask.sum().

    Returns:
        0-dim tensor.

    Raises:
        ValueError: not three tensors per side, shapes that do not line up, or R not dividing a width.
    """
    if len(student) != 3 or len(teacher) != 3:
        raise ValueError(
            f"relations take (q, k, v) per model, got {len(student)} student and {len(teacher)} teacher tensors"
        )
    if num_relation_heads < 1:
        raise ValueError(f"num_relation_heads must be >= 1, got {num_relation_heads}")
    b, t = student[0].shape[:2]
    for side, xs in (("student", student), ("teacher", teacher)):
        for name, x in zip("qkv", xs):
            if x.dim() != 3 or x.shape[:2] != (b, t):
                raise ValueError(f"{side} {name} {tuple(x.shape)}: expected (B, T, width) with (B, T) = {(b, t)}")
    widths = [x.shape[-1] for x in (*student, *teacher)]
    if any(w % num_relation_heads for w in widths):
        common = math.gcd(*widths)
        raise ValueError(
            f"num_relation_heads = {num_relation_heads} does not divide every q/k/v width (student q, k, v "
            f"{widths[:3]}, teacher {widths[3:]}): choose one of {[r for r in range(1, common + 1) if common % r == 0]}"
        )
    mask = _check_mask(mask, torch.Size((b, t)), "q/k/v")
    keys = torch.ones_like(mask) if key_mask is None else _check_mask(key_mask, mask.shape, "q/k/v")
    valid = keys[:, None, None, :]  # (B, 1, 1, T): keys
    if causal:
        valid = valid & torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    dtype = _compute_dtype(*student, *teacher)
    per_row = torch.zeros(b, t, dtype=dtype, device=mask.device)
    for s_x, t_x in zip(student, teacher):
        log_q = _relation_log_probs(s_x, num_relation_heads, valid, dtype)
        log_p = _relation_log_probs(t_x, num_relation_heads, valid, dtype)
        kl = torch.where(valid, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))
        per_row = per_row + kl.sum(-1).mean(1) / 3.0  # (B, R, T, T) -> (B, T)
    return reduce_over_tokens(per_row, mask, num_items_in_batch)


# --------------------------------------------------------------------------------------------
# which student layer learns from which teacher layer


def layer_map(
    num_student_layers: int,
    num_teacher_layers: int,
    *,
    mode: LayerMapMode | Sequence[Sequence[int]] = "auto",
    kept_layers: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """Pairs (student layer, teacher layer), 0-based, sorted by student layer.

    - "uniform": student layer i ↔ teacher layer round((i + 1) · Lt / Ls) − 1, halves rounded up
      (Python's `round` sends halves to the even number, which spaces the pairs unevenly), and at
      least 0 (a student deeper than its teacher). The last student layer always meets the last
      teacher layer.
    - "last": [(Ls − 1, Lt − 1)] only.
    - "auto": a student pruned from this teacher (`kept_layers` given: the teacher index of each student
      layer, as `student/student.json` records it) learns from the layers it was copied from, i ↔
      kept_layers[i]; any other student: "uniform".
    - explicit pairs [[s, t], ...]: checked to be in range, one teacher layer per student layer.

    Raises:
        ValueError: layer counts < 1, a kept_layers list that does not fit, or pairs out of range.
    """
    ls, lt = num_student_layers, num_teacher_layers
    if ls < 1 or lt < 1:
        raise ValueError(f"layer counts must be >= 1, got {ls} student and {lt} teacher layers")
    if isinstance(mode, str):
        if mode == "auto":
            if kept_layers is None:
                return layer_map(ls, lt, mode="uniform")
            kept = [int(k) for k in kept_layers]
            if len(kept) != ls or any(not 0 <= k < lt for k in kept):
                raise ValueError(
                    f"kept_layers {kept} do not describe this pair: expected {ls} teacher indices in [0, {lt}) "
                    "(the student was not pruned from this teacher? set loss.features.layer_map: uniform)"
                )
            return list(enumerate(kept))
        if mode == "uniform":
            # round half up in integers: floor((i + 1)·Lt/Ls + 1/2) = (2(i + 1)·Lt + Ls) // (2·Ls)
            return [(i, max((2 * (i + 1) * lt + ls) // (2 * ls) - 1, 0)) for i in range(ls)]
        if mode == "last":
            return [(ls - 1, lt - 1)]
        raise ValueError(f"layer map mode must be 'auto', 'uniform', 'last' or a list of [s, t] pairs, got {mode!r}")
    pairs: list[tuple[int, int]] = []
    for pair in mode:
        if len(pair) != 2:
            raise ValueError(f"layer map entry {list(pair)}: expected a [student layer, teacher layer] pair")
        s, t = int(pair[0]), int(pair[1])
        if not (0 <= s < ls and 0 <= t < lt):
            raise ValueError(
                f"layer map pair [{s}, {t}] is out of range: student layers are 0..{ls - 1}, teacher layers 0..{lt - 1}"
            )
        pairs.append((s, t))
    if not pairs:
        raise ValueError("an empty layer map pairs no layer: give at least one [student layer, teacher layer]")
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise ValueError(f"layer map {[list(p) for p in pairs]} pairs a student layer twice: one teacher layer each")
    return sorted(pairs)
