"""alambic.losses.topk and alambic.teachers.cached against their slow twins.

- With k = V (every id kept, a tail of 0 mass) the top-k loss must equal `distillation_loss` on the full
  logits, values and gradients, in float64, for every divergence, with masks and a global token count.
- The chunked, checkpointed `cached_teacher_loss` must equal the unchunked top-k loss (values and the
  gradients of the hidden states and the head).
- The buckets are normalised and exact (the tail as 1 − Σ computed in float64), and nothing turns NaN
  when the tail has no mass.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alambic.config import LossConfig
from alambic.losses.divergences import distillation_loss
from alambic.losses.topk import (
    TOPK_DIVERGENCES,
    student_bucket_logprobs,
    teacher_bucket_logprobs,
    teacher_topk,
    topk_distillation_loss,
    truncation_kl,
)
from alambic.modeling import project
from alambic.teachers.cached import cached_teacher_loss
from helpers import F64, random_logits, tiny_model

OPTIONS = {"jsd_beta": 0.3, "skew": 0.2}
NAMES = list(TOPK_DIVERGENCES)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_case(n=29, v=13, *, seed=0, keep=0.7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    (student,) = random_logits((n, v), generator=g, scale=2, dtype=dtype, grad=True)
    (teacher,) = random_logits((n, v), generator=g, scale=2, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) > keep] = -100
    return student, teacher, labels


def shuffled_full_topk(teacher, temperature, seed=0):
    """k = V: every id, in a random order per row (the loss must not depend on the order)."""
    n, v = teacher.shape
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(v, generator=g) for _ in range(n)])
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    return ids, log_p.gather(-1, ids), torch.full((n,), float("-inf"), dtype=teacher.dtype)


def value_and_grad(parts, x):
    (grad,) = torch.autograd.grad(parts.total * 1.7, x)
    return parts, grad


def assert_parts_close(got, want, tol=F64, what=""):
    (parts, grad), (ref, ref_grad) = got, want
    for field in ("total", "soft", "hard"):
        torch.testing.assert_close(
            getattr(parts, field).double(),
            getattr(ref, field).double().detach(),
            **tol,
            msg=lambda m, f=field: f"{what} {f}: {m}",
        )
    assert int(parts.num_tokens) == int(ref.num_tokens)
    torch.testing.assert_close(grad.double(), ref_grad.double(), **tol, msg=lambda m: f"{what} grad: {m}")


# --------------------------------------------------------------------------------------------
# the buckets


def test_buckets_are_normalised_and_exact():
    student, teacher, _ = make_case()
    ids, logprobs, tail = teacher_topk(teacher, 4, temperature=1.5)
    log_p = torch.log_softmax(teacher / 1.5, dim=-1)
    torch.testing.assert_close(logprobs, log_p.topk(4, dim=-1).values, **F64)
    torch.testing.assert_close(tail, torch.log1p(-log_p.gather(-1, ids).exp().sum(-1)), **F64)
    log_q = student_bucket_logprobs(student, ids, temperature=1.5)
    q = torch.softmax(student / 1.5, dim=-1)
    torch.testing.assert_close(log_q[:, :4], q.gather(-1, ids).log(), **F64)
    torch.testing.assert_close(log_q[:, 4], torch.log1p(-q.gather(-1, ids).sum(-1)), **F64)
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(len(ids), dtype=torch.float64), **F64)
    assert teacher_bucket_logprobs(logprobs, tail).shape == (len(ids), 5)


def test_low_precision_inputs_are_upcast():
    student, teacher, labels = make_case(dtype=torch.bfloat16)
    ids, logprobs, tail = teacher_topk(teacher, 5)
    assert logprobs.dtype == torch.float32
    parts = topk_distillation_loss(student, ids, logprobs.half(), tail, labels, alpha=0.5)
    assert parts.total.dtype == torch.float32 and torch.isfinite(parts.total)


def test_zero_mass_tail_is_finite_with_finite_gradients():
    student, teacher, labels = make_case()
    ids, logprobs, tail = shuffled_full_topk(teacher, 1.0)
    log_q = student_bucket_logprobs(student, ids)
    assert torch.isfinite(log_q).all() and log_q[:, -1].exp().eq(0).all()
    assert torch.isfinite(teacher_bucket_logprobs(logprobs, tail)).all()
    for name in NAMES:
        parts = topk_distillation_loss(student, ids, logprobs, tail, labels, divergence=name, alpha=1.0, **OPTIONS)
        (grad,) = torch.autograd.grad(parts.total, student)
        assert torch.isfinite(parts.total) and torch.isfinite(grad).all(), name


# --------------------------------------------------------------------------------------------
# k = V equals the full-vocabulary loss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("name", NAMES)
def test_full_k_equals_distillation_loss(name, alpha, temperature):
    student, teacher, labels = make_case(seed=NAMES.index(name))
    ids, logprobs, tail = shuffled_full_topk(teacher, temperature)
    kwargs = dict(divergence=name, temperature=temperature, alpha=alpha, **OPTIONS)
    for num_items in (None, 40):
        want = value_and_grad(
            distillation_loss(student, teacher, labels, num_items_in_batch=num_items, **kwargs), student
        )
        got = value_and_grad(
            topk_distillation_loss(student, ids, logprobs, tail, labels, num_items_in_batch=num_items, **kwargs),
            student,
        )
        assert_parts_close(got, want, what=f"{name} num_items={num_items}")


def test_truncation_loses_what_the_chain_rule_says():
    # forward KL(P‖Q) = KL(P_B‖Q_B) + m_P · KL(P(·|tail)‖Q(·|tail)): the bucket loss is the first term.
    student, teacher, labels = make_case(keep=1.0)
    ids, logprobs, tail = teacher_topk(teacher, 5)
    log_p, log_q = torch.log_softmax(teacher, -1), torch.log_softmax(student.detach(), -1)
    in_tail = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, ids, False)
    cond_p = torch.where(in_tail, log_p - tail[:, None], -torch.inf)
    cond_q = torch.where(
        in_tail, log_q - log_q.masked_fill(~in_tail, -torch.inf).logsumexp(-1, keepdim=True), -torch.inf
    )
    inner = torch.where(in_tail, cond_p.exp() * (cond_p - cond_q), 0).sum(-1)
    full = (log_p.exp() * (log_p - log_q)).sum(-1)
    bucket = topk_distillation_loss(student.detach(), ids, logprobs, tail, labels, alpha=1.0).soft * len(labels)
    torch.testing.assert_close(bucket, (full - tail.exp() * inner).sum(), **F64)


def test_truncation_kl_falls_with_k_to_zero():
    _, teacher, _ = make_case(v=40)
    log_p = torch.log_softmax(teacher, -1)
    values = []
    for k in (1, 5, 20, 30, 39, 40):
        ids, _, tail = teacher_topk(teacher, k)
        values.append(truncation_kl(log_p, ids, tail).mean().item())
    assert all(a > b for a, b in zip(values[:4], values[1:4])), values
    # a one-id tail is its own even spread: nothing lost at k = V - 1, nor at k = V
    assert values[-2] < 1e-12 and values[-1] == 0.0
    # = H(P~) − H(P), P~ = top-k exact, tail spread evenly
    ids, _, tail = teacher_topk(teacher, 5)
    spread = torch.where(
        torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, ids, True),
        log_p,
        tail[:, None] - torch.log(torch.tensor(35.0, dtype=torch.float64)),
    )
    expected = (log_p.exp() * (log_p - spread)).sum(-1)
    torch.testing.assert_close(truncation_kl(log_p, ids, tail), expected, **F64)


def test_edges_and_refusals():
    student, teacher, labels = make_case()
    ids, logprobs, tail = teacher_topk(teacher, 3)
    # all tokens masked -> 0, not NaN; alpha = 0 needs no teacher
    masked = torch.full_like(labels, -100)
    assert topk_distillation_loss(student, ids, logprobs, tail, masked).total.item() == 0.0
    ce = topk_distillation_loss(student, None, None, None, labels, alpha=0.0)
    torch.testing.assert_close(ce.total, distillation_loss(student, None, labels, alpha=0.0).total)
    with pytest.raises(ValueError, match="raw logits"):
        topk_distillation_loss(student, ids, logprobs, tail, labels, divergence="logit_mse")
    with pytest.raises(ValueError, match="needs teacher_ids"):
        topk_distillation_loss(student, None, None, None, labels, alpha=0.5)
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        topk_distillation_loss(student, ids[1:], logprobs[1:], tail[1:], labels)
    with pytest.raises(ValueError, match="outside the student's 13 logits"):
        topk_distillation_loss(student, ids + 13, logprobs, tail, labels)


# --------------------------------------------------------------------------------------------
# cached_teacher_loss: chunks and checkpointing change nothing


@pytest.fixture(scope="module")
def student_model():
    return tiny_model(
        "qwen2",
        seed=3,
        vocab_size=50,
        hidden_size=16,
        num_layers=1,
        heads=2,
        kv_heads=1,
        intermediate_size=16,
        tie=False,
    ).double()


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_reverse_kl"])
@pytest.mark.parametrize("num_items", [None, 60])
def test_cached_teacher_loss_chunks_equal_unchunked(student_model, name, num_items):
    n, k = 23, 6
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    ids, logprobs, tail = teacher_topk(torch.randn(n, 50, generator=g, dtype=torch.float64) * 3, k, 2.0)
    targets = torch.randint(0, 50, (n,), generator=g)
    targets[::4] = -100
    batch = {"teacher_ids": ids, "teacher_logprobs": logprobs.float(), "teacher_tail": tail.float()}
    cfg = LossConfig(divergence=name, temperature=2.0, alpha=0.6, **OPTIONS)
    head = student_model.get_output_embeddings().weight
    wrt = [hidden, head, student_model.get_output_embeddings().bias]
    wrt = [t for t in wrt if t is not None]

    ref = topk_distillation_loss(
        project(student_model, hidden),
        ids,
        batch["teacher_logprobs"],
        batch["teacher_tail"],
        targets,
        divergence=name,
        temperature=2.0,
        alpha=0.6,
        num_items_in_batch=num_items,
        **OPTIONS,
    )
    ref_grads = torch.autograd.grad(ref.total, wrt)
    for chunk_size in (5, 23, 64):  # 5 does not divide 23
        parts = cached_teacher_loss(student_model, hidden, batch, targets, cfg, num_items, chunk_size=chunk_size)
        assert not parts.soft.requires_grad and not parts.hard.requires_grad
        grads = torch.autograd.grad(parts.total, wrt)
        for field in ("total", "soft", "hard"):
            torch.testing.assert_close(getattr(parts, field), getattr(ref, field).detach(), **F64)
        for g_, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g_, rg, **F64)


def test_cached_teacher_loss_empty_and_no_grad(student_model):
    cfg = LossConfig(divergence="forward_kl", alpha=0.5)
    hidden = torch.zeros(0, 16, dtype=torch.float64, requires_grad=True)
    empty = {
        "teacher_ids": torch.zeros(0, 4, dtype=torch.long),
        "teacher_logprobs": torch.zeros(0, 4),
        "teacher_tail": torch.zeros(0),
    }
    parts = cached_teacher_loss(student_model, hidden, empty, torch.zeros(0, dtype=torch.long), cfg)
    assert parts.total.item() == 0.0 and parts.total.requires_grad
    parts.total.backward()  # an empty micro-batch must not break the step
    with torch.no_grad():
        rows = {
            "teacher_ids": torch.arange(4).repeat(3, 1),
            "teacher_logprobs": torch.full((3, 4), -2.0),
            "teacher_tail": torch.full((3,), -0.5),
        }
        parts = cached_teacher_loss(
            student_model, torch.randn(3, 16, dtype=torch.float64), rows, torch.tensor([1, 2, 3]), cfg, chunk_size=2
        )
    assert torch.isfinite(parts.total) and not parts.total.requires_grad
    with pytest.raises(ValueError, match="no teacher_ids"):
        cached_teacher_loss(student_model, hidden, {}, torch.zeros(0, dtype=torch.long), cfg)


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any operator returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_cached_teacher_loss_never_builds_the_full_logits(student_model):
    n, v, chunk = 400, 50, 16
    hidden = torch.randn(n, 16, dtype=torch.float64, requires_grad=True)
    ids, logprobs, tail = teacher_topk(torch.randn(n, v, dtype=torch.float64), 4)
    batch = {"teacher_ids": ids, "teacher_logprobs": logprobs, "teacher_tail": tail}
    targets = torch.randint(0, v, (n,))

    with LargestAllocation() as forward:
        parts = cached_teacher_loss(student_model, hidden, batch, targets, LossConfig(), chunk_size=chunk)
    with LargestAllocation() as backward:
        parts.total.backward()
    # The largest tensor is (N, H) (the hidden states' gradient), never the (N, V) logits.
    assert forward.largest == n * 16 * 8 < n * v * 8, forward.largest
    # Fused: the gradients were taken chunk by chunk in the forward; the backward only scales them: no matmul (the
    # head's logits are never made again), nothing larger than the hidden states' gradient.
    assert not [op for op in backward.ops if "mm" in op], backward.ops
    assert backward.largest <= n * 16 * 8, backward.largest


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_the_closed_form_logit_gradient_is_autograds(name, alpha, temperature):
    from alambic.losses.topk import _topk_loss, topk_loss_and_logit_grad

    g = torch.Generator().manual_seed(7)
    n, v = 23, 40
    logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * 4).requires_grad_()
    logits_peaked = logits.detach().clone()
    logits_peaked[0, 3] = 200.0  # a row whose tail underflows in float: the exact log-sum-exp fallback
    for k, z in ((5, logits), (v, logits), (5, logits_peaked.requires_grad_())):  # k = V: an empty tail
        ids, logprobs, tail = teacher_topk(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, k, temperature)
        labels = torch.randint(0, v, (n,), generator=g)
        labels[::5] = -100
        options = dict(
            divergence=name, temperature=temperature, alpha=alpha, jsd_beta=0.3, skew=0.2, num_items_in_batch=31
        )
        ref = _topk_loss(z, ids, logprobs, tail, labels, **options)
        (ref_grad,) = torch.autograd.grad(ref.total, z)
        parts, grad = topk_loss_and_logit_grad(z.detach(), ids, logprobs, tail, labels, **options)
        for field in ("total", "soft", "hard"):
            torch.testing.assert_close(getattr(parts, field), getattr(ref, field).detach(), **F64)
        torch.testing.assert_close(grad, ref_grad, **F64)
