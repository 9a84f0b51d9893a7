"""alambic.losses.mixture and the chunked path with several teachers, against a plain float64 reference.

The reference works in probability space with the textbook formulas (P_mix = Σ w_i softmax(z_i / T), no log
tricks): values and gradients must agree for every divergence, both combinations, masks and odd shapes; a
mixture of one teacher must be single-teacher distillation bit for bit; the chunked path must equal the full
one with each teacher behind its own head, and never allocate an (N, V) tensor.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alambic.losses import (
    DIVERGENCES,
    OutputHead,
    chunked_distillation_loss,
    distillation_loss,
    mixture_logits,
    multi_teacher_distillation_loss,
    normalize_weights,
)
from helpers import F64, random_logits

NAMES = list(DIVERGENCES)
MODES = ["mixture", "sum"]
BETA, SKEW = 0.3, 0.2
WEIGHTS = (0.5, 2.0, 1.5)  # not normalised: the functions normalise

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# the plain reference


def ref_divergence(name, z_s, p, z_mix_logits, temperature):
    """Per-token D(P, Q) from probabilities p (..., V); logit_mse from the teacher logits given."""
    q = torch.softmax(z_s / temperature, -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = BETA * p + (1 - BETA) * q
        return BETA * kl(p, m) + (1 - BETA) * kl(q, m)
    if name == "skew_forward_kl":
        return kl(p, SKEW * p + (1 - SKEW) * q)
    if name == "skew_reverse_kl":
        return kl(q, SKEW * q + (1 - SKEW) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "logit_mse":
        return ((z_s - z_mix_logits) / temperature).square().mean(-1)
    if name == "uld":  # the sorted mixture against the sorted student
        return (p.sort(-1, descending=True).values - q.sort(-1, descending=True).values).abs().sum(-1)
    raise AssertionError(name)


def reference(z_s, teachers, weights, labels, *, name, mode, temperature, alpha):
    """(total, soft, hard, per-teacher soft or None) by the formulas, float64, mean over counted tokens."""
    w = [x / sum(weights) for x in weights]
    mask = labels != -100
    count = max(int(mask.sum()), 1)
    mean = lambda per_token: per_token[mask].sum() / count  # noqa: E731
    probs = [torch.softmax(z / temperature, -1) for z in teachers]
    if mode == "mixture":
        p_mix = sum(wi * p for wi, p in zip(w, probs))
        z_mix = sum(wi * z for wi, z in zip(w, teachers))  # logit_mse's "mixture": the mean logits
        soft = temperature**2 * mean(ref_divergence(name, z_s, p_mix, z_mix, temperature))
        per_teacher = None
    else:
        per_teacher = [
            temperature**2 * mean(ref_divergence(name, z_s, p, z, temperature)) for p, z in zip(probs, teachers)
        ]
        soft = sum(wi * s for wi, s in zip(w, per_teacher))
    log_q = torch.log_softmax(z_s, -1)
    hard = mean(-log_q.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1))
    return alpha * soft + (1 - alpha) * hard, soft, hard, per_teacher


def make_logits(shape=(3, 7, 13), k=3, seed=0, scale=2.0, keep=0.7):
    g = torch.Generator().manual_seed(seed)
    (student,) = random_logits(shape, generator=g, scale=scale, grad=True)
    teachers = random_logits(shape, generator=g, count=k, scale=scale)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[torch.rand(shape[:-1], generator=g) > keep] = -100
    return student, teachers, labels


def close(got, want, tol=F64, what=""):
    torch.testing.assert_close(got.double(), want.double().detach(), **tol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# full logits against the reference


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_matches_the_plain_reference(name, mode, alpha, temperature):
    z_s, teachers, labels = make_logits(seed=NAMES.index(name) + 10 * MODES.index(mode))
    options = dict(divergence=name, teachers=mode, temperature=temperature, alpha=alpha, jsd_beta=BETA, skew=SKEW)
    parts = multi_teacher_distillation_loss(z_s, teachers, labels, weights=WEIGHTS, **options)
    total, soft, hard, per_teacher = reference(
        z_s, teachers, WEIGHTS, labels, name=name, mode=mode, temperature=temperature, alpha=alpha
    )
    close(parts.total, total, what="total")
    close(parts.soft, soft, what="soft")
    if alpha < 1:
        close(parts.hard, hard, what="hard")
    if mode == "sum":
        close(parts.soft_per_teacher, torch.stack(per_teacher), what="per-teacher soft")
        assert not parts.soft_per_teacher.requires_grad
    else:
        assert parts.soft_per_teacher is None
    (got,) = torch.autograd.grad(parts.total * 1.7, z_s)
    (want,) = torch.autograd.grad(total * 1.7, z_s)
    close(got, want, what="gradient")
    assert int(parts.num_tokens) == int((labels != -100).sum())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_one_teacher_is_single_teacher_distillation_exactly(name, mode):
    z_s, (z_t,), labels = make_logits(k=1, seed=3)
    options = dict(divergence=name, temperature=2.0, alpha=0.6, jsd_beta=BETA, skew=SKEW, num_items_in_batch=40)
    single = distillation_loss(z_s, z_t, labels, **options)
    multi = multi_teacher_distillation_loss(z_s, [z_t], labels, weights=[0.3], teachers=mode, **options)
    for field in ("total", "soft", "hard"):
        assert torch.equal(getattr(multi, field), getattr(single, field)), field
    assert torch.equal(*(torch.autograd.grad(p.total, z_s)[0] for p in (multi, single)))


@pytest.mark.parametrize("name", NAMES)
def test_a_mixture_of_copies_of_one_teacher_is_that_teacher(name):
    # Goes through the log-space mixing itself (two teachers): log(0.3 P + 0.7 P) = log P, to rounding.
    z_s, (z_t,), labels = make_logits(k=1, seed=4)
    options = dict(divergence=name, temperature=2.0, alpha=1.0, jsd_beta=BETA, skew=SKEW)
    single = distillation_loss(z_s, z_t, labels, **options)
    mixed = multi_teacher_distillation_loss(z_s, [z_t, z_t.clone()], labels, weights=[0.3, 0.7], **options)
    close(mixed.total, single.total, tol={"rtol": 1e-12, "atol": 1e-12})
    close(*(torch.autograd.grad(p.total, z_s)[0] for p in (mixed, single)), tol={"rtol": 1e-10, "atol": 1e-12})


def test_weights_are_normalised():
    assert normalize_weights([1, 3]) == (0.25, 0.75)
    z_s, teachers, labels = make_logits(k=2, seed=5)
    for mode in MODES:
        runs = [
            multi_teacher_distillation_loss(
                z_s, teachers, labels, weights=w, teachers=mode, divergence="jsd", alpha=1.0
            )
            for w in ([1, 3], [0.25, 0.75], [10, 30])
        ]
        assert all(torch.equal(r.total, runs[0].total) for r in runs), mode
    # None: equal weights
    equal = multi_teacher_distillation_loss(z_s, teachers, labels, divergence="jsd", alpha=1.0)
    assert torch.equal(
        equal.total,
        multi_teacher_distillation_loss(z_s, teachers, labels, weights=[2, 2], divergence="jsd", alpha=1.0).total,
    )


def test_mixture_logits_stay_finite_where_probabilities_underflow():
    # Two confident teachers that disagree: in float32 each gives ~exp(-400) = 0 to the other's favourite
    # token. log(Σ w p) computed naively is -inf there; the log-space mixture is finite and right.
    z1 = torch.tensor([[400.0, 0.0, -400.0]])
    z2 = torch.tensor([[-400.0, 0.0, 400.0]])
    naive = torch.log(0.5 * torch.softmax(z1, -1) + 0.5 * torch.softmax(z2, -1))
    assert torch.isinf(naive).any()  # what the test guards against
    mixed = mixture_logits([z1, z2], [1, 1])
    assert torch.isfinite(mixed).all()
    want = torch.log(0.5 * torch.softmax(z1.double(), -1) + 0.5 * torch.softmax(z2.double(), -1))
    torch.testing.assert_close(mixed.double(), want, rtol=1e-6, atol=1e-4)
    student = torch.zeros(1, 3, requires_grad=True)
    for name in NAMES:
        parts = multi_teacher_distillation_loss(student, [z1, z2], torch.tensor([0]), divergence=name, alpha=1.0)
        (grad,) = torch.autograd.grad(parts.total, student)
        assert torch.isfinite(parts.total) and torch.isfinite(grad).all(), name


def test_teachers_with_minus_infinity_logits():
    # A teacher that rules tokens out (top-k, masked vocabulary): probability 0, not NaN.
    z_s, teachers, labels = make_logits(k=2, seed=6)
    teachers[0][..., :4] = float("-inf")
    # (Not reverse KL in sum mode: KL(Q || P) is infinite where P = 0 and Q > 0, as it should be.)
    for mode in MODES:
        for name in ("forward_kl", "jsd", "tvd"):
            parts = multi_teacher_distillation_loss(z_s, teachers, labels, teachers=mode, divergence=name, alpha=1.0)
            (grad,) = torch.autograd.grad(parts.total, z_s)
            assert torch.isfinite(parts.total) and torch.isfinite(grad).all(), (mode, name)


@pytest.mark.parametrize("mode", MODES)
def test_no_counted_token_gives_zero(mode):
    z_s, teachers, labels = make_logits(k=2, seed=7, keep=-1.0)
    parts = multi_teacher_distillation_loss(z_s, teachers, labels, teachers=mode)
    assert parts.total.item() == 0.0 and int(parts.num_tokens) == 0
    assert not torch.autograd.grad(parts.total, z_s)[0].any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weights=[1.0]), r"2 teacher logits but 1 weights"),
        (dict(weights=[1.0, 0.0]), r"finite and > 0.*index 1"),
        (dict(weights=[1.0, float("nan")]), r"finite and > 0"),
        (dict(teachers="product"), r"unknown teachers combination 'product'; choose one of: mixture, sum"),
        (dict(divergence="kl"), r"unknown divergence 'kl'"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    z_s, teachers, labels = make_logits(k=2, seed=8)
    with pytest.raises(ValueError, match=match):
        multi_teacher_distillation_loss(z_s, teachers, labels, **kwargs)


def test_bad_teachers_are_named():
    z_s, teachers, labels = make_logits(k=2, seed=8)
    with pytest.raises(ValueError, match=r"teacher logits differ in shape"):
        multi_teacher_distillation_loss(z_s, [teachers[0], teachers[1][..., :5]], labels)
    with pytest.raises(ValueError, match=r"alpha = 0.5 weighs a soft loss.*got none"):
        multi_teacher_distillation_loss(z_s, [], labels)
    plain_ce = multi_teacher_distillation_loss(z_s, [], labels, alpha=0.0)
    assert torch.equal(plain_ce.total, distillation_loss(z_s, None, labels, alpha=0.0).total)
    with pytest.raises(ValueError, match="at least one teacher"):
        normalize_weights([])


# --------------------------------------------------------------------------------------------
# chunked: each teacher behind its own head, against the full path


def make_heads(n=37, k=3, h_s=8, hidden_sizes=(6, 10, 4), v=19, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    student = OutputHead(rand(v, h_s, std=h_s**-0.5 * 3).requires_grad_(), rand(v, std=0.5).requires_grad_())
    hidden = rand(n, h_s).requires_grad_()
    # Teachers of different widths; the second with logit scale and soft-capping, the third without bias.
    heads = [
        OutputHead(
            rand(v, h, std=h**-0.5 * 3),
            rand(v, std=0.5) if i != 2 else None,
            logit_scale=1.3 if i == 1 else None,
            softcap=4.0 if i == 1 else None,
        )
        for i, h in enumerate(hidden_sizes[:k])
    ]
    states = [rand(n, h, std=2.0) for h in hidden_sizes[:k]]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) > 0.7] = -100
    return hidden, student, states, heads, labels


def project(hidden, head):
    logits = hidden.double() @ head.weight.double().T
    if head.bias is not None:
        logits = logits + head.bias.double()
    if head.logit_scale is not None:
        logits = logits * head.logit_scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_full(name, mode):
    hidden, student, states, heads, labels = make_heads(seed=NAMES.index(name))
    options = dict(divergence=name, temperature=2.0, alpha=0.6, jsd_beta=BETA, skew=SKEW, num_items_in_batch=30)
    full = multi_teacher_distillation_loss(
        project(hidden, student),
        [project(h, t) for h, t in zip(states, heads)],
        labels,
        weights=WEIGHTS,
        teachers=mode,
        **options,
    )
    wrt = [hidden, student.weight, student.bias]
    want = torch.autograd.grad(full.total, wrt)
    for chunk_size in (8, 37):  # 8 does not divide 37
        parts = chunked_distillation_loss(
            hidden,
            student,
            states,
            heads,
            labels,
            chunk_size=chunk_size,
            teacher_weights=WEIGHTS,
            teachers=mode,
            **options,
        )
        for field in ("total", "soft", "hard"):
            close(getattr(parts, field), getattr(full, field), what=f"chunk {chunk_size} {field}")
        if mode == "sum":
            close(parts.soft_per_teacher, full.soft_per_teacher, what="per-teacher soft")
        else:
            assert parts.soft_per_teacher is None
        for g, w, what in zip(torch.autograd.grad(parts.total, wrt), want, ("hidden", "weight", "bias")):
            close(g, w, what=f"chunk {chunk_size} grad {what}")


@pytest.mark.parametrize("mode", MODES)
def test_chunked_with_one_teacher_in_a_list_is_the_single_teacher_call(mode):
    hidden, student, states, heads, labels = make_heads(k=1, seed=11)
    options = dict(divergence="skew_reverse_kl", temperature=2.0, alpha=0.6, skew=SKEW, chunk_size=8)
    single = chunked_distillation_loss(hidden, student, states[0], heads[0], labels, **options)
    listed = chunked_distillation_loss(
        hidden, student, states, heads, labels, teacher_weights=[0.4], teachers=mode, **options
    )
    for field in ("total", "soft", "hard"):
        assert torch.equal(getattr(listed, field), getattr(single, field)), field
    wrt = [hidden, student.weight, student.bias]
    for a, b in zip(torch.autograd.grad(listed.total, wrt), torch.autograd.grad(single.total, wrt)):
        assert torch.equal(a, b)


def test_chunked_shared_vocabulary_smaller_than_the_heads():
    hidden, student, states, heads, labels = make_heads(seed=12, k=2)
    labels = labels.clamp_max(14)
    heads[1] = OutputHead(
        torch.cat([heads[1].weight, torch.randn(5, heads[1].hidden_size, dtype=torch.float64)]),
        torch.cat([heads[1].bias, torch.zeros(5, dtype=torch.float64)]),
    )  # padded to 24 rows
    with pytest.raises(ValueError, match=r"student head vocab 19 != teacher 1 head vocab 24"):
        chunked_distillation_loss(hidden, student, states, heads, labels)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 19\].*teacher head vocabs 19, 24"):
        chunked_distillation_loss(hidden, student, states, heads, labels, vocab_size=20)
    got = chunked_distillation_loss(hidden, student, states, heads, labels, vocab_size=15, chunk_size=8, alpha=1.0)
    full = multi_teacher_distillation_loss(
        project(hidden, student)[:, :15], [project(h, t)[:, :15] for h, t in zip(states, heads)], labels, alpha=1.0
    )
    close(got.total, full.total)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(teacher_hidden="drop_one"), r"2 teacher_hidden tensors but 3 teacher heads"),
        (dict(teacher_hidden="short_second"), r"teacher_hidden\[1\] \(36, 10\) must be \(N, H_t\).*N = 37"),
        (dict(teacher_head="swap_widths"), r"teacher 0 head weight \(19, 10\).*teacher_hidden\[0\] \(37, 6\)"),
        (dict(teacher_weights=[1.0, 2.0]), r"2 teacher_weights for 3 teachers"),
        (dict(teachers="vote"), r"unknown teachers combination 'vote'"),
    ],
)
def test_chunked_bad_teachers_are_named(change, match):
    hidden, student, states, heads, labels = make_heads(seed=13)
    args = dict(student_hidden=hidden, student_head=student, teacher_hidden=states, teacher_head=heads, labels=labels)
    edits = {
        "drop_one": states[:2],
        "short_second": [states[0], states[1][:36], states[2]],
        "swap_widths": [heads[1], heads[0], heads[2]],
    }
    args.update({k: edits.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        chunked_distillation_loss(**args)


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any operator returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.largest:
                self.largest, self.op = t.numel() * t.element_size(), func
        return out


@pytest.mark.parametrize("mode", MODES)
def test_chunked_peak_allocation_stays_flat_with_three_teachers(mode):
    n, h, v, chunk = 512, 64, 1024, 32
    hidden, student, states, heads, labels = make_heads(
        n=n, h_s=h, hidden_sizes=(h, h, h), v=v, seed=14, dtype=torch.float32
    )
    with LargestAllocation() as spy:
        parts = chunked_distillation_loss(
            hidden,
            student,
            states,
            heads,
            labels,
            chunk_size=chunk,
            teachers=mode,
            divergence="jsd",
            alpha=0.5,
            temperature=2.0,
        )
        parts.total.backward()
    # The (V, H) head gradient and (chunk, V) blocks, never an (N, V) tensor of any teacher or of the mixture.
    assert spy.largest <= max(v * h, chunk * v) * 4, f"{spy.largest} bytes from {spy.op}"
    assert spy.largest < n * v * 4 / 4
