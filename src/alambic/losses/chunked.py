"""The distillation loss fused with the output head, walked over the tokens in chunks.

Logits are the memory problem of distillation: N counted tokens × a 150k vocabulary in float32 is
gigabytes per tensor, and the plain path holds several (student and teacher logits, their softmaxes,
the gradient). Here the (N, V) logits never exist. For each chunk of `chunk_size` rows, through the
heads of `losses.heads` (`OutputHead`, `head_logits`):

    student logits (c, V) = cap(scale · (h_s W_sᵀ + b_s))        with grad, from a detached chunk of h_s
    teacher logits (c, V) = cap(scale · (h_t W_tᵀ + b_t))        under no_grad
    loss of the chunk     = `distillation_loss`'s math on these rows (the functions of `divergences`)
    d loss / d (h_s chunk, W_s, b_s) by autograd, at once: rows of dL/dh_s, accumulated dL/dW_s, dL/db_s

so the extra memory is O(chunk × V) for the chunk's logits and O(V × H) for the head's gradient,
whatever N is. The gradients are computed in the forward pass and only scaled by the incoming
gradient in the backward (the pattern of Liger-Kernel's chunked losses): the backward never
recomputes the logits.

Values and gradients equal `distillation_loss(project_s(h_s), project_t(h_t), labels, ...)` on the
full logits: the chunks call the same per-token functions and `reduce_over_tokens` with the whole
call's denominator, so the chunks' contributions add up to the reference's sums.

Several teachers (`losses.mixture`): per chunk, each teacher's states are projected with its own head,
(c, V) each, and `ensemble_divergence` mixes them (mixture) or sums their weighted divergences (sum), as
`multi_teacher_distillation_loss` does on full logits; still no (N, V) tensor, K (c, V) blocks at most.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alambic.divergence import DivergenceSpec, resolve_spec
from alambic.losses.divergences import (
    IGNORE_INDEX,
    DivergenceName,
    LossParts,
    _check_divergence_name,
    _check_unit_interval,
    mix_soft_and_hard,
    reduce_over_tokens,
    token_cross_entropy,
)
from alambic.losses.heads import OutputHead, _shape, head_logits, shared_vocab_size
from alambic.losses.mixture import _check_combination, ensemble_divergence, normalize_weights

# OutputHead lives in `losses.heads`; it stays importable from here, where callers have always taken it.
__all__ = [
    "AUTO_CHUNK_ELEMENTS",
    "ChunkedDistillationLoss",
    "OutputHead",
    "chunked_distillation_loss",
    "resolve_chunk_size",
]

# chunk_size "auto": as many rows as keep one chunk's logits under this many elements (256 MiB in float32), so the
# loss's memory is the same whatever the vocabulary: 1365 rows at V = 49,152, 441 at 151,936, 256 at 262,144.
AUTO_CHUNK_ELEMENTS = 1 << 26


def resolve_chunk_size(chunk_size: int | str, vocab: int) -> int:
    """Rows per chunk: `chunk_size` itself, or for "auto" `AUTO_CHUNK_ELEMENTS // vocab` (at least 1)."""
    if chunk_size == "auto":
        return max(1, AUTO_CHUNK_ELEMENTS // vocab)
    return chunk_size


# --------------------------------------------------------------------------------------------
# one chunk


@dataclass(frozen=True, eq=False)
class _Spec:
    """Everything but the tensors, for the autograd Function."""

    student_head: OutputHead
    teacher_heads: tuple[OutputHead, ...]  # empty when alpha = 0
    teacher_weights: tuple[float, ...]  # normalised, one per teacher
    teachers: str  # 'mixture' | 'sum'
    vocab: int  # student logits compared (the shared vocabulary)
    teacher_vocab: int | None  # teacher logits compared: `vocab`, or None for the whole head (uld)
    divergence: DivergenceSpec  # the divergence with its temperature and parameters
    alpha: float
    num_items_in_batch: int | Tensor | None
    chunk_size: int
    grad_hidden: bool
    grad_weight: bool
    grad_bias: bool
    # Another per-chunk objective instead of `_chunk_parts` (the offline cache's top-k loss): (student logits (c, V'),
    # the chunk's rows) -> (total, soft, hard, per-teacher soft, d total / d logits or None), the values already over
    # the whole call's denominator; with the logits' gradient given, autograd only takes it through the head.
    chunk_loss: Callable[[Tensor, slice], tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]] | None = None


def _chunk_parts(
    student_logits: Tensor, teacher_logits: list[Tensor], labels: Tensor, denominator: Tensor, spec: _Spec
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(total, soft, hard, per-teacher soft (K,) or (0,)) contributions of one chunk: its sums over the whole
    call's denominator."""
    mask = labels != IGNORE_INDEX  # (c,)
    soft = hard = None
    per_teacher_soft = None
    if spec.alpha > 0.0:
        per_token, per_teacher = ensemble_divergence(
            spec.divergence,
            student_logits,
            teacher_logits,
            spec.teacher_weights,
            teachers=spec.teachers,
        )
        temperature = spec.divergence.temperature
        soft = temperature**2 * reduce_over_tokens(per_token, mask, denominator)
        if per_teacher is not None:
            per_teacher_soft = torch.stack(
                [temperature**2 * reduce_over_tokens(d.detach(), mask, denominator) for d in per_teacher]
            )
    if spec.alpha < 1.0:
        hard = reduce_over_tokens(token_cross_entropy(student_logits, labels), mask, denominator)
    total = mix_soft_and_hard(soft, hard, spec.alpha)
    zero = total.new_zeros(())
    if per_teacher_soft is None:
        per_teacher_soft = total.new_zeros((0,))
    return total, zero if soft is None else soft, zero if hard is None else hard, per_teacher_soft


class _ChunkedDistillation(torch.autograd.Function):
    """forward: chunk loop, loss value and the gradients; backward: gradients × grad_output."""

    @staticmethod
    def forward(
        ctx,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teachers: tuple[tuple[Tensor, Tensor, Tensor | None], ...],
        labels: Tensor,
        spec: _Spec,
    ):
        # `teachers`: (hidden (N, H_i), head weight, head bias) per teacher, in a tuple, so autograd does not
        # track them: teachers get no gradient.
        n, vocab = student_hidden.shape[0], spec.vocab
        # The leaves autograd differentiates: detached, and only the first `vocab` rows of the
        # heads, so the rows past the shared vocabulary cost nothing and get a zero gradient.
        w_s = student_weight.detach()[:vocab].requires_grad_(spec.grad_weight)
        b_s = None if student_bias is None else student_bias.detach()[:vocab].requires_grad_(spec.grad_bias)
        t_vocab = spec.teacher_vocab
        t_heads = [(w.detach()[:t_vocab], None if b is None else b.detach()[:t_vocab]) for _, w, b in teachers]

        logit_dtype = torch.promote_types(
            torch.promote_types(student_hidden.dtype, student_weight.dtype), torch.float32
        )
        for t_hidden, t_weight, _ in teachers:
            logit_dtype = torch.promote_types(logit_dtype, torch.promote_types(t_hidden.dtype, t_weight.dtype))
        total = torch.zeros((), dtype=logit_dtype, device=student_hidden.device)
        soft, hard = total.clone(), total.clone()
        per_teacher = torch.zeros(
            (len(teachers) if spec.teachers == "sum" and spec.alpha > 0 else 0,),
            dtype=logit_dtype,
            device=student_hidden.device,
        )

        mask = labels != IGNORE_INDEX
        # The whole call's denominator, given to every chunk's reduction, so the chunks add up.
        denominator = mask.sum() if spec.num_items_in_batch is None else spec.num_items_in_batch

        grad_hidden = torch.empty_like(student_hidden) if spec.grad_hidden else None
        # Accumulate over chunks in float32 at least; cast to the weight's dtype at the end.
        acc_dtype = torch.promote_types(student_weight.dtype, torch.float32)
        grad_weight = (
            torch.zeros(student_weight.shape, dtype=acc_dtype, device=student_weight.device)
            if spec.grad_weight
            else None
        )
        grad_bias = (
            torch.zeros(student_bias.shape, dtype=acc_dtype, device=student_bias.device) if spec.grad_bias else None
        )
        wrt_names = [
            name for name, on in (("h", spec.grad_hidden), ("w", spec.grad_weight), ("b", spec.grad_bias)) if on
        ]

        for start in range(0, n, spec.chunk_size):
            rows = slice(start, min(start + spec.chunk_size, n))
            # Each teacher through its own head: K blocks of (c, V'), mixed (or scored) in `_chunk_parts`.
            teacher_logits = [
                head_logits(t_hidden[rows].detach(), w_t, b_t, head)
                for (t_hidden, _, _), (w_t, b_t), head in zip(teachers, t_heads, spec.teacher_heads)
            ]
            h_s = student_hidden[rows].detach().requires_grad_(spec.grad_hidden)  # (c, H_s)
            with torch.enable_grad():
                student_logits = head_logits(h_s, w_s, b_s, spec.student_head)  # (c, V')
                dlogits = None
                if spec.chunk_loss is not None:
                    chunk_total, chunk_soft, chunk_hard, chunk_per_teacher, dlogits = spec.chunk_loss(
                        student_logits, rows
                    )
                else:
                    chunk_total, chunk_soft, chunk_hard, chunk_per_teacher = _chunk_parts(
                        student_logits, teacher_logits, labels[rows], denominator, spec
                    )
            if wrt_names:
                leaves = {"h": h_s, "w": w_s, "b": b_s}
                # d total / d (h, W, b): through the loss and the head, or through the head alone from the logits'
                # gradient the chunk loss gave.
                out, grad_out = (chunk_total, None) if dlogits is None else (student_logits, dlogits)
                grads = dict(zip(wrt_names, torch.autograd.grad(out, [leaves[k] for k in wrt_names], grad_out)))
                if spec.grad_hidden:
                    grad_hidden[rows] = grads["h"]  # (c, H_s)
                if spec.grad_weight:
                    grad_weight[:vocab] += grads["w"]  # (V', H_s)
                if spec.grad_bias:
                    grad_bias[:vocab] += grads["b"]  # (V',)
            total += chunk_total.detach()
            soft += chunk_soft.detach()
            hard += chunk_hard.detach()
            per_teacher += chunk_per_teacher.detach()

        if grad_weight is not None:
            grad_weight = grad_weight.to(student_weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(student_bias.dtype)
        # Kept on ctx, not saved for backward: the backward scales them in place and gives them away, so the head's
        # (V, H) gradient exists once, not twice (a product, or a copy for the parameter's .grad).
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(soft, hard, per_teacher)
        return total, soft, hard, per_teacher

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_soft: Tensor, _grad_hard: Tensor, _grad_per_teacher: Tensor):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "backward ran twice through the chunked loss: its gradients are computed once, in the "
                "forward; recompute the loss instead of retain_graph=True"
            )

        def scaled(grad: Tensor | None) -> Tensor | None:
            # in place (0-dim grad_total: the gradient keeps its dtype)
            return None if grad is None else grad.mul_(grad_total.to(grad.device, grad.dtype))

        return (*(scaled(g) for g in grads), None, None, None)


# --------------------------------------------------------------------------------------------
# public API


def check_counted_rows(
    hidden: Tensor, labels: Tensor, chunk_size: int, *, names: tuple[str, str] = ("student_hidden", "labels")
) -> int:
    """Check the inputs every chunked loss walks: (N, H) hidden rows, (N,) labels, chunk_size >= 1. Returns N."""
    hidden_name, labels_name = names
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if hidden.dim() != 2:
        raise ValueError(
            f"{hidden_name} must be (N, H) for the N counted positions, got shape {_shape(hidden)} "
            "(select the counted positions first: hidden[:, :-1][mask])"
        )
    n = hidden.shape[0]
    if _shape(labels) != (n,):
        raise ValueError(f"{labels_name} {_shape(labels)} must be (N,) = ({n},) for {hidden_name} {_shape(hidden)}")
    return n


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_head: OutputHead,
    teacher_hidden: Tensor | Sequence[Tensor] | None,
    teacher_head: OutputHead | Sequence[OutputHead] | None,
    labels: Tensor,
    *,
    divergence: DivergenceName | str | DivergenceSpec = "forward_kl",
    temperature: float | None = None,
    alpha: float = 0.5,
    jsd_beta: float | None = None,
    skew: float | None = None,
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | str = 1024,
    vocab_size: int | None = None,
    teacher_weights: Sequence[float] | None = None,
    teachers: str = "mixture",
) -> LossParts:
    """`distillation_loss` on the logits of `student_head(student_hidden)` and
    `teacher_head(teacher_hidden)`, without ever holding the (N, V) logits:

        soft  = T² · mean_tokens divergence(student, teacher; T)
        hard  = mean_tokens −log q(label)          (T = 1)
        total = alpha · soft + (1 − alpha) · hard

    Same values and gradients (w.r.t. `student_hidden`, `student_head.weight`, `student_head.bias`)
    as the reference on full logits; the teacher gets no gradient. Extra memory is O(chunk_size × V)
    plus O(V × H) for the head's gradient, flat in N.

    Args:
        student_hidden: (N, H_s) final hidden states of the counted positions only.
        student_head: the student's output head (its weight may be a trained or frozen Parameter,
            also the tied input embedding: its gradient is returned for the tensor given).
        teacher_hidden: (N, H_t) the teacher's states at the same positions; None only when alpha = 0.
            Several teachers: a sequence of K such tensors, (N, H_i) each.
        teacher_head: the teacher's output head, or a sequence of K heads, one per teacher_hidden;
            None only when alpha = 0.
        labels: (N,) target ids at those positions; -100 marks tokens that do not count.
        divergence, temperature, alpha, jsd_beta, skew, num_items_in_batch: as in `distillation_loss`.
        chunk_size: rows of logits computed at once; peak memory grows with it, speed too until the
            matmuls fill the device. "auto": `AUTO_CHUNK_ELEMENTS // V` rows, memory flat in V.
        vocab_size: compare only the first `vocab_size` logits of both heads (one family's checkpoints
            with differently padded vocabularies). None: the heads must have the same V, except for
            divergence 'uld', which compares every head whole (a teacher with another tokenizer).
        teacher_weights: one weight > 0 per teacher, normalised to sum to 1; None: equal weights.
        teachers: how several teachers make the soft loss, 'mixture' (D(Σ_i w_i P_i, Q)) or 'sum'
            (Σ_i w_i D(P_i, Q)); see `losses.mixture`. One teacher: either is plain distillation.

    Returns:
        LossParts: `total` carries the gradient; `soft` and `hard` are detached, for logging; all are
        float32 or wider whatever the inputs' dtype. Gradients come back in the inputs' dtypes. In sum
        mode, `soft_per_teacher` (K,) holds each teacher's unweighted soft loss.

    Raises:
        ValueError: shapes that do not line up (the message names them), unknown divergence, alpha,
            temperature or chunk_size out of range, a soft loss without a teacher.
    """
    spec_divergence = resolve_spec(divergence, temperature, jsd_beta, skew)
    spec_divergence.check_name()
    _check_unit_interval("alpha", alpha)
    if not spec_divergence.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {spec_divergence.temperature}")
    heads = teacher_head if teacher_head is None or isinstance(teacher_head, OutputHead) else tuple(teacher_head)
    widths = [
        student_head.vocab_size,
        *(h.vocab_size for h in ((heads,) if isinstance(heads, OutputHead) else heads or ())),
    ]
    chunk_size = resolve_chunk_size(chunk_size, max(widths))
    n = check_counted_rows(student_hidden, labels, chunk_size)
    if student_head.hidden_size != student_hidden.shape[1]:
        raise ValueError(
            f"student head weight {_shape(student_head.weight)} is (V, H) with H = {student_head.hidden_size}, "
            f"but student_hidden {_shape(student_hidden)} has H = {student_hidden.shape[1]}"
        )
    _check_combination(teachers)
    use_teacher = alpha > 0.0
    t_hiddens: tuple[Tensor, ...] = ()
    t_heads: tuple[OutputHead, ...] = ()
    weights: tuple[float, ...] = ()
    if use_teacher:
        if teacher_hidden is None or teacher_head is None:
            raise ValueError(
                f"alpha = {alpha} weighs a soft loss, which needs the teacher's hidden states and head "
                f"(got teacher_hidden={'None' if teacher_hidden is None else 'a tensor'}, "
                f"teacher_head={'None' if teacher_head is None else 'an OutputHead'})"
            )
        t_hiddens = (teacher_hidden,) if isinstance(teacher_hidden, Tensor) else tuple(teacher_hidden)
        t_heads = (teacher_head,) if isinstance(teacher_head, OutputHead) else tuple(teacher_head)
        if len(t_hiddens) != len(t_heads) or not t_hiddens:
            raise ValueError(
                f"{len(t_hiddens)} teacher_hidden tensors but {len(t_heads)} teacher heads: give one "
                "(N, H_i) tensor and one OutputHead per teacher"
            )
        several = len(t_hiddens) > 1
        for i, (t_hidden, t_head) in enumerate(zip(t_hiddens, t_heads)):
            name, head_name = (
                (f"teacher_hidden[{i}]", f"teacher {i} head") if several else ("teacher_hidden", "teacher head")
            )
            if t_hidden.dim() != 2 or t_hidden.shape[0] != n:
                raise ValueError(
                    f"{name} {_shape(t_hidden)} must be (N, H_t) with the student's N = {n} "
                    f"(student_hidden {_shape(student_hidden)})"
                )
            if t_head.hidden_size != t_hidden.shape[1]:
                raise ValueError(
                    f"{head_name} weight {_shape(t_head.weight)} is (V, H) with H = {t_head.hidden_size}, "
                    f"but {name} {_shape(t_hidden)} has H = {t_hidden.shape[1]}"
                )
        weights = normalize_weights([1.0] * len(t_hiddens) if teacher_weights is None else teacher_weights)
        if len(weights) != len(t_hiddens):
            raise ValueError(
                f"{len(weights)} teacher_weights for {len(t_hiddens)} teachers: give one weight per teacher"
            )
    if spec_divergence.name == "uld" and vocab_size is None:
        # ULD compares sorted probability vectors: the vocabularies may differ (a teacher with another tokenizer),
        # and each head is used whole.
        vocab, teacher_vocab = student_head.vocab_size, None
    else:
        vocab = teacher_vocab = shared_vocab_size(student_head, t_heads, vocab_size)

    grad_on = torch.is_grad_enabled()
    spec = _Spec(
        student_head=student_head,
        teacher_heads=t_heads,
        teacher_weights=weights,
        teachers=teachers,
        vocab=vocab,
        teacher_vocab=teacher_vocab,
        divergence=spec_divergence,
        alpha=alpha,
        num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
        grad_hidden=grad_on and student_hidden.requires_grad,
        grad_weight=grad_on and student_head.weight.requires_grad,
        grad_bias=grad_on and student_head.bias is not None and student_head.bias.requires_grad,
    )
    total, soft, hard, per_teacher = _ChunkedDistillation.apply(
        student_hidden,
        student_head.weight,
        student_head.bias,
        tuple((h, head.weight, head.bias) for h, head in zip(t_hiddens, t_heads)),
        labels,
        spec,
    )
    return LossParts(
        total=total,
        soft=soft,
        hard=hard,
        num_tokens=(labels != IGNORE_INDEX).sum(),
        soft_per_teacher=per_teacher if per_teacher.numel() else None,
    )


def chunked_head_loss(
    student_hidden: Tensor,
    student_head: OutputHead,
    labels: Tensor,
    chunk_loss: Callable[[Tensor, slice], tuple[Tensor, Tensor, Tensor, Tensor | None]],
    *,
    vocab_size: int | None = None,
    chunk_size: int | str = 1024,
) -> LossParts:
    """Any per-token objective of the student's logits, fused with its head the way `chunked_distillation_loss` is:
    chunk by chunk, the gradients computed in the forward, no (N, V) tensor and no recomputation in the backward.

    Args:
        student_hidden: (N, H) the counted positions' final hidden states; labels: (N,), -100 not counted.
        chunk_loss: (logits (c, V') of the chunk, its rows) -> (total, soft, hard, dlogits): 0-dim tensors, each
            already divided by the whole call's denominator (so the chunks add up), and either None (`total` carries
            the gradient, autograd takes it back through the loss) or d total / d logits (c, V') in closed form.
        vocab_size: score only the first `vocab_size` logits; None: the head's V.
    """
    chunk_size = resolve_chunk_size(chunk_size, student_head.vocab_size)
    check_counted_rows(student_hidden, labels, chunk_size)
    vocab = student_head.vocab_size if vocab_size is None else vocab_size
    if not 1 <= vocab <= student_head.vocab_size:
        raise ValueError(f"vocab_size must be in [1, {student_head.vocab_size}] (the head's size), got {vocab_size}")

    def parts(logits: Tensor, rows: slice) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        total, soft, hard, dlogits = chunk_loss(logits, rows)
        return total, soft, hard, total.new_zeros((0,)), dlogits

    grad_on = torch.is_grad_enabled()
    spec = _Spec(
        student_head=student_head,
        teacher_heads=(),
        teacher_weights=(),
        teachers="mixture",
        vocab=vocab,
        teacher_vocab=vocab,
        divergence=DivergenceSpec(),
        alpha=0.0,
        num_items_in_batch=None,
        chunk_size=chunk_size,
        grad_hidden=grad_on and student_hidden.requires_grad,
        grad_weight=grad_on and student_head.weight.requires_grad,
        grad_bias=grad_on and student_head.bias is not None and student_head.bias.requires_grad,
        chunk_loss=parts,
    )
    total, soft, hard, _ = _ChunkedDistillation.apply(
        student_hidden, student_head.weight, student_head.bias, (), labels, spec
    )
    return LossParts(total=total, soft=soft, hard=hard, num_tokens=(labels != IGNORE_INDEX).sum())


class ChunkedDistillationLoss(nn.Module):
    """`chunked_distillation_loss` with its settings fixed at construction (see there for each)."""

    def __init__(
        self,
        *,
        divergence: DivergenceName | str = "forward_kl",
        temperature: float = 1.0,
        alpha: float = 0.5,
        jsd_beta: float = 0.5,
        skew: float = 0.1,
        chunk_size: int = 1024,
        vocab_size: int | None = None,
        teacher_weights: Sequence[float] | None = None,
        teachers: str = "mixture",
    ) -> None:
        super().__init__()
        _check_divergence_name(divergence)
        _check_combination(teachers)
        self.teacher_weights = None if teacher_weights is None else tuple(teacher_weights)
        self.teachers = teachers
        self.divergence = divergence
        self.temperature = temperature
        self.alpha = alpha
        self.jsd_beta = jsd_beta
        self.skew = skew
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size

    def forward(
        self,
        student_hidden: Tensor,
        student_head: OutputHead,
        teacher_hidden: Tensor | Sequence[Tensor] | None,
        teacher_head: OutputHead | Sequence[OutputHead] | None,
        labels: Tensor,
        num_items_in_batch: int | Tensor | None = None,
    ) -> LossParts:
        return chunked_distillation_loss(
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            labels,
            divergence=self.divergence,
            temperature=self.temperature,
            alpha=self.alpha,
            jsd_beta=self.jsd_beta,
            skew=self.skew,
            num_items_in_batch=num_items_in_batch,
            chunk_size=self.chunk_size,
            vocab_size=self.vocab_size,
            teacher_weights=self.teacher_weights,
            teachers=self.teachers,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, alpha={self.alpha}, "
            f"chunk_size={self.chunk_size}, vocab_size={self.vocab_size}, teachers={self.teachers!r}"
        )
