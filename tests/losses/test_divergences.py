"""alambic.losses.divergences against naive float64 twins: values, gradients, reduction, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

import alambic.losses.divergences as divergences_module
from alambic.losses import (
    DIVERGENCES,
    distillation_loss,
    divergence,
    forward_kl,
    jsd,
    reduce_over_tokens,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    token_cross_entropy,
    tvd,
)
from helpers import F64, assert_verbose_close, random_logits

NAMES = list(DIVERGENCES)
SHAPES = [(3, 7, 11), (2, 5, 33), (13, 17)]
TEMPERATURES = [0.5, 1.0, 2.0, 4.0]
JSD_BETA = 0.3
SKEW = 0.2


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# naive float64 references: explicit softmax, explicit sums, explicit loops


def ref_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.double() / temperature
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def ref_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # xlogy: 0 · log 0 = 0 where a probability underflows to exactly 0.
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def ref_divergence(name, s, t, temperature, beta=JSD_BETA, skew=SKEW):
    p, q = ref_probs(t, temperature), ref_probs(s, temperature)
    if name == "forward_kl":
        return ref_kl(p, q)
    if name == "reverse_kl":
        return ref_kl(q, p)
    if name == "jsd":
        if beta == 0.0:
            return ref_kl(p, q)
        if beta == 1.0:
            return ref_kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if name == "skew_forward_kl":
        return ref_kl(p, skew * p + (1 - skew) * q)
    if name == "skew_reverse_kl":
        return ref_kl(q, skew * q + (1 - skew) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "logit_mse":
        return ((s.double() / temperature - t.double() / temperature) ** 2).sum(-1) / s.shape[-1]
    if name == "uld":
        return ref_uld(p, q)
    raise KeyError(name)


def ref_uld(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row by row: both probability vectors sorted in decreasing order, the shorter padded with zeros, L1 distance."""
    flat_p, flat_q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    out = []
    for row_p, row_q in zip(flat_p, flat_q):
        a = sorted(row_p.unbind(), key=lambda x: float(x.detach()), reverse=True)
        b = sorted(row_q.unbind(), key=lambda x: float(x.detach()), reverse=True)
        zero = torch.zeros((), dtype=torch.float64)
        a, b = a + [zero] * (len(b) - len(a)), b + [zero] * (len(a) - len(b))
        out.append(sum((x - y).abs() for x, y in zip(a, b)))
    return torch.stack(out).reshape(p.shape[:-1])


def ref_cross_entropy(s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat_s, flat_y = s.double().reshape(-1, s.shape[-1]), labels.reshape(-1)
    out = []
    for i in range(flat_y.numel()):
        y = int(flat_y[i])
        if y == -100:
            out.append(torch.zeros((), dtype=torch.float64))
        else:
            out.append(-torch.log(ref_probs(flat_s[i], 1.0)[y]))
    return torch.stack(out).reshape(labels.shape)


def ref_reduce(per_token: torch.Tensor, mask: torch.Tensor, denominator=None) -> torch.Tensor:
    flat, flat_mask = per_token.reshape(-1), mask.reshape(-1)
    total, count = torch.zeros((), dtype=per_token.dtype), 0
    for i in range(flat.numel()):
        if flat_mask[i]:
            total = total + flat[i]
            count += 1
    denominator = count if denominator is None else denominator
    return total / max(denominator, 1)


# --------------------------------------------------------------------------------------------
# inputs


def make_logits(shape, seed, dtype=torch.float64, scale=3.0):
    s, t = random_logits(shape, seed=seed, count=2, scale=scale, dtype=dtype, grad=True)
    return s, t


def make_labels(leading_shape, vocab, seed, keep=0.7):
    """Random labels, ~30% set to -100, and the first row (sequence) fully masked."""
    g = torch.Generator().manual_seed(seed + 1000)
    labels = torch.randint(0, vocab, leading_shape, generator=g)
    labels[torch.rand(leading_shape, generator=g) > keep] = -100
    labels[0] = -100
    return labels


def values_and_grads(fn, s, t, seed=0):
    out = fn(s, t)
    # A random cotangent checks the whole Jacobian, not only the gradient of the sum.
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    wrt = (s, t) if t.requires_grad else (s,)
    grads = torch.autograd.grad((out * w.to(out.dtype)).sum(), wrt)
    return out, grads[0], grads[1] if t.requires_grad else None


# --------------------------------------------------------------------------------------------
# per-token divergences


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_divergence_matches_reference(name, shape, temperature):
    s, t = make_logits(shape, seed=sum(shape))
    out, gs, gt = values_and_grads(
        lambda a, b: divergence(name, a, b, temperature=temperature, jsd_beta=JSD_BETA, skew=SKEW), s, t
    )
    ref, rgs, rgt = values_and_grads(lambda a, b: ref_divergence(name, a, b, temperature), s, t)
    assert out.shape == shape[:-1] and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(gs, rgs, **F64, msg=lambda m: f"student grad, {name}: {m}")
    # Teacher logits are not detached inside: a caller who wants teacher gradients gets them.
    torch.testing.assert_close(gt, rgt, **F64, msg=lambda m: f"teacher grad, {name}: {m}")


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_beta_matches_reference(beta):
    s, t = make_logits((4, 9, 19), seed=1)
    out, gs, _ = values_and_grads(lambda a, b: jsd(a, b, temperature=2.0, beta=beta), s, t)
    ref, rgs, _ = values_and_grads(lambda a, b: ref_divergence("jsd", a, b, 2.0, beta=beta), s, t)
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(gs, rgs, **F64)


@pytest.mark.parametrize("skew", [0.0, 0.05, 0.1, 0.5, 0.99])
@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
def test_skew_matches_reference(name, skew):
    s, t = make_logits((4, 9, 19), seed=2)
    out, gs, _ = values_and_grads(lambda a, b: DIVERGENCES[name](a, b, temperature=1.0, skew=skew), s, t)
    ref, rgs, _ = values_and_grads(lambda a, b: ref_divergence(name, a, b, 1.0, skew=skew), s, t)
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(gs, rgs, **F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_inputs_are_upcast(name, dtype):
    """Computed in float32 from the low-precision values (the value at float32's tolerance); only the gradient is
    rounded back (at its dtype's)."""
    s, t = make_logits((3, 7, 11), seed=3, dtype=dtype)
    out, gs, _ = values_and_grads(lambda a, b: divergence(name, a, b, temperature=2.0), s, t)
    assert out.dtype == torch.float32
    assert gs.dtype == dtype
    s64, t64 = (x.detach().double().requires_grad_() for x in (s, t))
    ref, rgs, _ = values_and_grads(lambda a, b: ref_divergence(name, a, b, 2.0, beta=0.5, skew=0.1), s64, t64)
    assert_verbose_close(out, ref, dtype=torch.float32, what=f"{name} value")
    assert_verbose_close(gs, rgs, dtype=dtype, what=f"{name} student gradient")


@pytest.mark.parametrize("name", NAMES)
def test_identical_logits_give_zero_and_zero_gradient(name):
    s, _ = make_logits((3, 7, 11), seed=4)
    t = s.detach().clone()
    out, gs, _ = values_and_grads(lambda a, b: divergence(name, a, b, temperature=2.0), s, t.requires_grad_())
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-12)
    torch.testing.assert_close(gs, torch.zeros_like(gs), rtol=0, atol=1e-12)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", NAMES)
def test_divergences_are_nonnegative(name, temperature):
    s, t = make_logits((5, 9, 23), seed=5, scale=6.0)
    out = divergence(name, s, t, temperature=temperature)
    assert (out > 0).all(), out.min()


def test_jsd_endpoints_are_the_named_kls():
    s, t = make_logits((3, 7, 11), seed=6)
    assert torch.equal(jsd(s, t, temperature=2.0, beta=0.0), forward_kl(s, t, temperature=2.0))
    assert torch.equal(jsd(s, t, temperature=2.0, beta=1.0), reverse_kl(s, t, temperature=2.0))
    # Why they are defined: the formula itself vanishes at the ends.
    assert jsd(s, t, beta=1e-9).abs().max() < 1e-7
    assert jsd(s, t, beta=1 - 1e-9).abs().max() < 1e-7


def test_skew_zero_is_the_plain_kl_of_the_same_direction():
    s, t = make_logits((3, 7, 11), seed=7)
    # skew_forward_kl(0) = KL(P ‖ Q); skew_reverse_kl(0) = KL(Q ‖ P).
    assert torch.equal(skew_forward_kl(s, t, temperature=2.0, skew=0.0), forward_kl(s, t, temperature=2.0))
    assert torch.equal(skew_reverse_kl(s, t, temperature=2.0, skew=0.0), reverse_kl(s, t, temperature=2.0))
    # Mixing the first argument into the second makes them smaller than the plain KL (convexity).
    assert (skew_forward_kl(s, t, skew=0.1) < forward_kl(s, t)).all()
    assert (skew_reverse_kl(s, t, skew=0.1) < reverse_kl(s, t)).all()


def test_direction_forward_is_reverse_with_roles_swapped():
    s, t = make_logits((3, 7, 11), seed=8)
    torch.testing.assert_close(forward_kl(s, t, temperature=2.0), reverse_kl(t, s, temperature=2.0), **F64)
    assert not torch.allclose(forward_kl(s, t), reverse_kl(s, t))


def test_forward_kl_is_cross_entropy_minus_teacher_entropy():
    s, t = make_logits((3, 7, 11), seed=9, scale=1.0)
    p, q = ref_probs(t, 1.0), ref_probs(s, 1.0)
    cross_entropy = -(p * torch.log(q)).sum(-1)
    teacher_entropy = -(p * torch.log(p)).sum(-1)
    assert (teacher_entropy > 0.1).all()
    torch.testing.assert_close(forward_kl(s, t), cross_entropy - teacher_entropy, **F64)


def test_neg_inf_teacher_logits_give_finite_values_and_gradients():
    """A top-k teacher fills the other ids with -inf: the divergences that stay finite there must
    equal the exact math (p = 0 at those ids), without 0 · (-inf) = NaN."""
    s, t = make_logits((3, 7, 11), seed=10)
    t_inf = t.detach().clone()
    t_inf[..., 5:] = float("-inf")
    # -1e4 / T underflows exp() to exactly 0 in float64: the same P, with finite logs for the reference.
    t_ref = t.detach().clone()
    t_ref[..., 5:] = -1e4
    for name in ["forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]:
        out, gs, _ = values_and_grads(lambda a, b, name=name: divergence(name, a, b, temperature=2.0), s, t_inf)
        ref, rgs, _ = values_and_grads(
            lambda a, b, name=name: ref_divergence(name, a, b, 2.0, beta=0.5, skew=0.1), s, t_ref
        )
        assert_verbose_close(out, ref, what=name)
        assert_verbose_close(gs, rgs, what=name)
    assert not reverse_kl(s, t_inf).isnan().any()


@pytest.mark.parametrize("name", [n for n in NAMES if n != "logit_mse"])
def test_ids_at_neg_inf_in_both_models_are_ignored(name):
    """-inf in both (vocab padding masked in both models) must equal dropping those ids."""
    s, t = make_logits((3, 7, 11), seed=11)
    s_inf, t_inf = (x.detach().clone() for x in (s, t))
    s_inf[..., 8:] = float("-inf")
    t_inf[..., 8:] = float("-inf")
    s_inf.requires_grad_()
    out, gs, _ = values_and_grads(lambda a, b: divergence(name, a, b, temperature=2.0), s_inf, t_inf)
    s_cut = s.detach()[..., :8].clone().requires_grad_()
    ref, rgs, _ = values_and_grads(
        lambda a, b: ref_divergence(name, a, b, 2.0, beta=0.5, skew=0.1), s_cut, t.detach()[..., :8]
    )
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(gs[..., :8], rgs, **F64)
    assert torch.equal(gs[..., 8:], torch.zeros_like(gs[..., 8:]))


# --------------------------------------------------------------------------------------------
# hard cross-entropy and reduction


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_token_cross_entropy_matches_reference(shape):
    s, _ = make_logits(shape, seed=12, scale=5.0)
    labels = make_labels(shape[:-1], shape[-1], seed=12)
    out = token_cross_entropy(s, labels)
    ref = ref_cross_entropy(s, labels)
    torch.testing.assert_close(out, ref, **F64)
    assert torch.equal(out[labels == -100], torch.zeros_like(out[labels == -100]))
    (gs,) = torch.autograd.grad(out.sum(), s)
    (rgs,) = torch.autograd.grad(ref.sum(), s)
    torch.testing.assert_close(gs, rgs, **F64)


@pytest.mark.parametrize("num_items", [None, 37, torch.tensor(37)], ids=["own_count", "int", "tensor"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reduce_over_tokens_matches_loop(shape, num_items):
    g = torch.Generator().manual_seed(13)
    per_token = torch.rand(shape[:-1], generator=g, dtype=torch.float64)
    mask = make_labels(shape[:-1], shape[-1], seed=13) != -100
    expected = ref_reduce(per_token, mask, None if num_items is None else int(num_items))
    torch.testing.assert_close(reduce_over_tokens(per_token, mask, num_items), expected, **F64)


def test_reduce_over_tokens_ignores_inf_at_masked_positions():
    per_token = torch.tensor([1.0, float("inf"), 3.0], dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    assert reduce_over_tokens(per_token, mask).item() == 2.0


def test_reduce_over_tokens_all_masked_is_zero():
    per_token = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    for num_items in (None, 0):
        out = reduce_over_tokens(per_token, mask, num_items)
        assert torch.equal(out, torch.zeros((), dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# distillation_loss


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", NAMES)
def test_distillation_loss_matches_reference(name, temperature, alpha):
    shape = (3, 7, 11)
    s, t = make_logits(shape, seed=14)
    labels = make_labels(shape[:-1], shape[-1], seed=14)
    mask = labels != -100

    parts = distillation_loss(
        s, t, labels, divergence=name, temperature=temperature, alpha=alpha, jsd_beta=JSD_BETA, skew=SKEW
    )
    soft_ref = temperature**2 * ref_reduce(ref_divergence(name, s, t, temperature), mask)
    hard_ref = ref_reduce(ref_cross_entropy(s, labels), mask)
    total_ref = alpha * soft_ref + (1 - alpha) * hard_ref

    assert parts.num_tokens.item() == int(mask.sum())
    torch.testing.assert_close(parts.total, total_ref, **F64)
    if alpha > 0:
        torch.testing.assert_close(parts.soft, soft_ref, **F64)
    else:
        assert torch.equal(parts.soft, torch.zeros(()).double())
    if alpha < 1:
        torch.testing.assert_close(parts.hard, hard_ref, **F64)
    else:
        assert torch.equal(parts.hard, torch.zeros(()).double())
    (gs,) = torch.autograd.grad(parts.total, s)
    (rgs,) = torch.autograd.grad(total_ref, s)
    torch.testing.assert_close(gs, rgs, **F64)


def test_alpha_endpoints_compute_only_the_requested_term(monkeypatch):
    s, t = make_logits((2, 5, 33), seed=15)
    labels = make_labels((2, 5), 33, seed=15)

    def boom(*args, **kwargs):
        raise AssertionError("computed a term whose weight is 0")

    monkeypatch.setattr(divergences_module, "token_cross_entropy", boom)
    parts = distillation_loss(s, t, labels, alpha=1.0)
    assert torch.equal(parts.total, parts.soft) and parts.soft > 0
    monkeypatch.undo()

    monkeypatch.setattr(divergences_module, "_divergence", boom)
    parts = distillation_loss(s, t, labels, alpha=0.0)
    assert torch.equal(parts.total, parts.hard) and parts.hard > 0


@pytest.mark.parametrize("name", NAMES)
def test_all_tokens_masked_gives_exact_zero_and_zero_gradient(name):
    s, t = make_logits((2, 5, 33), seed=16)
    labels = torch.full((2, 5), -100)
    parts = distillation_loss(s, t, labels, divergence=name, temperature=2.0, alpha=0.5)
    for value in (parts.total, parts.soft, parts.hard):
        assert torch.equal(value, torch.zeros((), dtype=torch.float64))
    assert parts.num_tokens.item() == 0
    (gs,) = torch.autograd.grad(parts.total, s)
    assert torch.equal(gs, torch.zeros_like(gs))


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_affect_neither_values_nor_gradients(name):
    shape = (3, 7, 11)
    s, t = make_logits(shape, seed=17)
    labels = make_labels(shape[:-1], shape[-1], seed=17)
    masked = labels == -100
    garbage_s, garbage_t = (x.detach().clone() for x in (s, t))
    garbage_s[masked] = torch.randn(int(masked.sum()), shape[-1], dtype=torch.float64) * 80
    garbage_t[masked] = torch.randn(int(masked.sum()), shape[-1], dtype=torch.float64) * 80
    garbage_s.requires_grad_()

    kwargs = {"divergence": name, "temperature": 2.0, "alpha": 0.4}
    clean = distillation_loss(s, t, labels, **kwargs)
    dirty = distillation_loss(garbage_s, garbage_t, labels, **kwargs)
    torch.testing.assert_close(dirty.total, clean.total, **F64)
    (g_clean,) = torch.autograd.grad(clean.total, s)
    (g_dirty,) = torch.autograd.grad(dirty.total, garbage_s)
    torch.testing.assert_close(g_dirty, g_clean, **F64)
    assert torch.equal(g_dirty[masked], torch.zeros_like(g_dirty[masked]))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_accumulation_with_num_items_in_batch_equals_whole_batch(name):
    """Batch 8 x accumulation 1 == batch 2 x accumulation 4, when each micro-batch is divided by
    the global count of counted tokens (transformers' `num_items_in_batch`)."""
    batch, seq, vocab = 8, 6, 13
    s, t = make_logits((batch, seq, vocab), seed=18)
    labels = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(18))
    # Uneven counted tokens per micro-batch, one micro-batch with none, so that a per-micro-batch
    # mean would give a different answer.
    for i, prompt_len in enumerate([0, 1, 6, 6, 2, 5, 3, 0]):
        labels[i, :prompt_len] = -100
    kwargs = {"divergence": name, "temperature": 2.0, "alpha": 0.5}
    num_items = int((labels != -100).sum())

    whole = distillation_loss(s, t, labels, **kwargs)
    (g_whole,) = torch.autograd.grad(whole.total, s)

    accumulated, naive = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for i in range(0, batch, 2):
        mb = slice(i, i + 2)
        accumulated = (
            accumulated + distillation_loss(s[mb], t[mb], labels[mb], num_items_in_batch=num_items, **kwargs).total
        )
        naive = naive + distillation_loss(s[mb], t[mb], labels[mb], **kwargs).total / 4
    (g_accumulated,) = torch.autograd.grad(accumulated, s)

    torch.testing.assert_close(accumulated, whole.total, **F64)
    torch.testing.assert_close(g_accumulated, g_whole, **F64)
    assert not math.isclose(naive.item(), whole.total.item(), rel_tol=1e-3)


# --------------------------------------------------------------------------------------------
# errors


def test_unknown_divergence_names_the_allowed_ones():
    s, t = make_logits((2, 3, 5), seed=19)
    for call in (
        lambda: divergence("kl", s, t),
        lambda: distillation_loss(s, t, torch.zeros(2, 3, dtype=torch.long), divergence="kl"),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert "'kl'" in str(info.value)
        assert all(name in str(info.value) for name in NAMES)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, t: forward_kl(s, t[..., :4]), r"\(2, 3, 5\).*\(2, 3, 4\)"),
        (lambda s, t: tvd(s, t, temperature=0.0), "temperature"),
        (lambda s, t: jsd(s, t, beta=1.5), "beta"),
        (lambda s, t: skew_forward_kl(s, t, skew=1.0), "skew"),
        (lambda s, t: skew_reverse_kl(s, t, skew=-0.1), "skew"),
        (lambda s, t: distillation_loss(s, t, torch.zeros(2, 3, dtype=torch.long), alpha=1.5), "alpha"),
        (lambda s, t: distillation_loss(s, t, torch.zeros(2, 4, dtype=torch.long)), r"\(2, 4\).*\(2, 3\)"),
    ],
)
def test_bad_arguments_raise_with_the_values(call, match):
    s, t = make_logits((2, 3, 5), seed=20)
    with pytest.raises(ValueError, match=match):
        call(s, t)


def test_plain_cross_entropy_needs_no_teacher():
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100
    parts = distillation_loss(logits, None, labels, alpha=0.0)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(parts.total, ref)
    with pytest.raises(ValueError, match="needs teacher logits"):
        distillation_loss(logits, None, labels, alpha=0.5)


# --------------------------------------------------------------------------------------------
# ULD: the one divergence across vocabularies


@pytest.mark.parametrize("v_s,v_t", [(11, 11), (7, 13), (13, 5)])
def test_uld_across_vocabularies_matches_reference(v_s, v_t):
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(4, 6, v_s, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = (torch.randn(4, 6, v_t, generator=g, dtype=torch.float64) * 3).requires_grad_()
    got = values_and_grads(lambda a, b: divergence("uld", a, b, temperature=2.0), s, t)
    want = values_and_grads(lambda a, b: ref_uld(ref_probs(b, 2.0), ref_probs(a, 2.0)), s, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F64)


def test_uld_sees_only_the_shape_of_the_distributions():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    shuffled = t[:, torch.randperm(9, generator=g)]
    torch.testing.assert_close(divergences_module.uld(s, t), divergences_module.uld(s, shuffled))
    assert divergences_module.uld(t, shuffled).abs().max() < 1e-6  # a permutation of the teacher is at distance 0
    assert (divergences_module.uld(s, t) <= 2 + 1e-6).all()
    with pytest.raises(ValueError, match="same leading shape"):
        divergences_module.uld(s, t[:4])
