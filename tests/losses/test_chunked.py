"""alambic.losses.chunked against its slow twin: the full float64 logits fed to `distillation_loss`.

Values and gradients (student hidden states, head weight, head bias) must agree, for every divergence,
soft/hard weighting and temperature, with masks, chunk sizes that do not divide N, logit scale and
soft-capping, a global token count, a shared vocabulary smaller than the heads, low precision; and the
(N, V) logits must never be allocated.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alambic.losses import (
    DIVERGENCES,
    ChunkedDistillationLoss,
    OutputHead,
    chunked_distillation_loss,
    distillation_loss,
)
from helpers import F64

NAMES = list(DIVERGENCES)
OPTIONS = {"jsd_beta": 0.3, "skew": 0.2}
# The incoming gradient is not 1: the backward must scale the stored gradients by it.
COTANGENT = 1.7


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# inputs and the reference


def make_case(
    n=37,
    *,
    h_s=8,
    h_t=6,
    v_s=19,
    v_t=None,
    label_vocab=None,
    seed=0,
    dtype=torch.float64,
    bias=True,
    student_scale=None,
    student_cap=None,
    teacher_scale=None,
    teacher_cap=None,
    hidden_std=1.0,
    keep=0.7,
):
    """Random student/teacher hidden states and heads (leaves that require grad), labels ~30% masked."""
    g = torch.Generator().manual_seed(seed)
    v_t = v_s if v_t is None else v_t

    def rand(*shape, std=1.0, grad=True):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)
        return t.requires_grad_(grad)

    student = OutputHead(
        rand(v_s, h_s, std=h_s**-0.5 * 3),
        rand(v_s, std=0.5) if bias else None,
        logit_scale=student_scale,
        softcap=student_cap,
    )
    teacher = OutputHead(
        rand(v_t, h_t, std=h_t**-0.5 * 3, grad=False),
        rand(v_t, std=0.5, grad=False) if bias else None,
        logit_scale=teacher_scale,
        softcap=teacher_cap,
    )
    student_hidden = rand(n, h_s, std=hidden_std)
    teacher_hidden = rand(n, h_t, std=hidden_std, grad=False)
    labels = torch.randint(0, label_vocab or min(v_s, v_t), (n,), generator=g)
    labels[torch.rand(n, generator=g) > keep] = -100
    return student_hidden, student, teacher_hidden, teacher, labels


def ref_project(hidden, head: OutputHead):
    """Plain float64 logits (N, V): matmul, bias, scale, cap."""
    logits = hidden.double() @ head.weight.double().T
    if head.bias is not None:
        logits = logits + head.bias.double()
    if head.logit_scale is not None:
        logits = logits * head.logit_scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


def wrt(student_hidden, student: OutputHead):
    return [t for t in (student_hidden, student.weight, student.bias) if t is not None and t.requires_grad]


def grads_of(parts, tensors):
    if not tensors:
        return []
    return list(torch.autograd.grad(parts.total * COTANGENT, tensors))


def reference(student_hidden, student, teacher_hidden, teacher, labels, *, vocab_size=None, **kwargs):
    s = ref_project(student_hidden, student)[:, :vocab_size]
    t = None
    if kwargs.get("alpha", 0.5) > 0:
        with torch.no_grad():
            t = ref_project(teacher_hidden, teacher)[:, :vocab_size]
    parts = distillation_loss(s, t, labels, **kwargs)
    return parts, grads_of(parts, wrt(student_hidden, student))


def chunked(student_hidden, student, teacher_hidden, teacher, labels, **kwargs):
    parts = chunked_distillation_loss(student_hidden, student, teacher_hidden, teacher, labels, **kwargs)
    return parts, grads_of(parts, wrt(student_hidden, student))


def assert_same(got, want, tol=F64, what=""):
    (parts, grads), (ref_parts, ref_grads) = got, want
    for field in ("total", "soft", "hard"):
        value, ref_value = getattr(parts, field), getattr(ref_parts, field)
        torch.testing.assert_close(
            value.double(), ref_value.double().detach(), **tol, msg=lambda m, f=field: f"{what} {f}: {m}"
        )
    assert not parts.soft.requires_grad and not parts.hard.requires_grad
    assert int(parts.num_tokens) == int(ref_parts.num_tokens)
    assert len(grads) == len(ref_grads)
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(g.double(), rg.double(), **tol, msg=lambda m, n=name: f"{what} grad {n}: {m}")


# --------------------------------------------------------------------------------------------
# against the reference


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference(name, alpha, temperature):
    case = make_case(seed=100 * NAMES.index(name) + 10 * int(2 * alpha) + int(temperature))
    kwargs = dict(divergence=name, alpha=alpha, temperature=temperature, **OPTIONS)
    want = reference(*case, **kwargs)
    # 8 does not divide 37; 37 and 64 are one chunk.
    for chunk_size in (8, 37, 64):
        assert_same(chunked(*case, chunk_size=chunk_size, **kwargs), want, what=f"chunk {chunk_size}")


@pytest.mark.parametrize("name", NAMES)
def test_logit_scale_and_softcap_on_both_heads(name):
    # Hidden states large enough that the caps bend the logits.
    case = make_case(seed=1, student_scale=0.7, student_cap=5.0, teacher_scale=1.3, teacher_cap=4.0, hidden_std=3.0)
    kwargs = dict(divergence=name, alpha=0.5, temperature=2.0, **OPTIONS)
    assert_same(chunked(*case, chunk_size=8, **kwargs), reference(*case, **kwargs))


@pytest.mark.parametrize("num_items", [100, torch.tensor(100)], ids=["int", "tensor"])
def test_num_items_in_batch_is_the_denominator(num_items):
    case = make_case(seed=2)
    kwargs = dict(divergence="forward_kl", alpha=0.5, temperature=2.0, num_items_in_batch=num_items)
    assert_same(chunked(*case, chunk_size=8, **kwargs), reference(*case, **kwargs))


def test_shared_vocab_smaller_than_both_heads():
    # Teacher padded to 24 rows, student to 19; the tokenizers share the first 17 ids.
    case = make_case(seed=3, v_s=19, v_t=24, label_vocab=17)
    kwargs = dict(divergence="jsd", alpha=0.5, temperature=2.0, **OPTIONS)
    got = chunked(*case, chunk_size=8, vocab_size=17, **kwargs)
    assert_same(got, reference(*case, vocab_size=17, **kwargs))
    _, (_, grad_weight, grad_bias) = got
    # Rows past the shared vocabulary never reach a logit the loss sees.
    assert grad_weight.shape == (19, 8) and not grad_weight[17:].any() and not grad_bias[17:].any()


def test_different_vocab_without_vocab_size_is_an_error():
    case = make_case(seed=3, v_s=19, v_t=24, label_vocab=17)
    with pytest.raises(ValueError, match=r"student head vocab 19 != teacher head vocab 24.*vocab_size"):
        chunked_distillation_loss(*case)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 19\]"):
        chunked_distillation_loss(*case, vocab_size=20)


def test_batch_split_into_calls_adds_up():
    # Two calls dividing by the global count give the loss and gradients of one call over both.
    case = make_case(n=40, seed=4)
    hidden, student, t_hidden, teacher, labels = case
    kwargs = dict(divergence="reverse_kl", alpha=0.5, temperature=2.0)
    whole = chunked_distillation_loss(*case, chunk_size=16, **kwargs)
    count = int(whole.num_tokens)
    halves = [
        chunked_distillation_loss(
            hidden[rows],
            student,
            t_hidden[rows],
            teacher,
            labels[rows],
            chunk_size=16,
            num_items_in_batch=count,
            **kwargs,
        )
        for rows in (slice(0, 23), slice(23, 40))
    ]
    total = halves[0].total + halves[1].total
    torch.testing.assert_close(total, whole.total, **F64)
    got = torch.autograd.grad(total, [hidden, student.weight, student.bias])
    want = torch.autograd.grad(whole.total, [hidden, student.weight, student.bias])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)


# --------------------------------------------------------------------------------------------
# heads: without bias, frozen, tied, from a model


def test_head_without_bias_and_frozen_head():
    hidden, student, t_hidden, teacher, labels = make_case(seed=5, bias=False)
    frozen = OutputHead(student.weight.detach())
    kwargs = dict(divergence="skew_forward_kl", alpha=0.5, temperature=2.0, **OPTIONS)
    got = chunked(hidden, frozen, t_hidden, teacher, labels, chunk_size=8, **kwargs)
    assert len(got[1]) == 1  # the hidden states alone
    assert_same(got, reference(hidden, frozen, t_hidden, teacher, labels, **kwargs))


def test_tied_embedding_accumulates_both_uses():
    # The head's weight is also the input embedding: its gradient is the sum over both uses.
    g = torch.Generator().manual_seed(6)
    embedding = torch.randn(19, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 19, (37,), generator=g)
    mix = torch.randn(8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    _, _, t_hidden, teacher, labels = make_case(seed=6)

    def run(loss_fn):
        hidden = torch.tanh(embedding[ids] @ mix)  # a stand-in for the decoder
        parts = loss_fn(hidden, OutputHead(embedding))
        return torch.autograd.grad(parts.total, [embedding, mix])

    kwargs = dict(divergence="forward_kl", alpha=0.5, temperature=2.0)
    got = run(lambda h, head: chunked_distillation_loss(h, head, t_hidden, teacher, labels, chunk_size=8, **kwargs))
    want = run(
        lambda h, head: distillation_loss(ref_project(h, head), ref_project(t_hidden, teacher), labels, **kwargs)
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F64)


def test_output_head_of_a_model_matches_project():
    from alambic.modeling import project
    from helpers import tiny_model

    model = tiny_model("llama", vocab_size=64, hidden_size=16, num_layers=1)
    model.config.logit_scale = 0.5
    model.config.final_logit_softcapping = 3.0
    head = OutputHead.of(model)
    assert head.weight is model.get_output_embeddings().weight
    assert head.weight is model.get_input_embeddings().weight  # tied
    assert (head.bias, head.logit_scale, head.softcap) == (None, 0.5, 3.0)
    hidden = torch.randn(5, 16) * 4
    torch.testing.assert_close(ref_project(hidden, head).float(), project(model, hidden), rtol=1e-5, atol=1e-5)


def test_output_head_validation():
    with pytest.raises(ValueError, match=r"\(V, H\)"):
        OutputHead(torch.zeros(3))
    with pytest.raises(ValueError, match=r"bias \(4,\) must be \(V,\) = \(3,\)"):
        OutputHead(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="softcap"):
        OutputHead(torch.zeros(3, 2), softcap=0.0)
    with pytest.raises(ValueError, match="no output head"):
        OutputHead.of(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# dtypes and edge cases


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "logit_mse"])
def test_bfloat16_inputs_against_float32_reference(name):
    case = make_case(seed=7, dtype=torch.bfloat16)
    kwargs = dict(divergence=name, alpha=0.5, temperature=2.0, **OPTIONS)
    parts, grads = chunked(*case, chunk_size=8, **kwargs)
    assert parts.total.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    # The reference sees the same bf16 values, exactly, in float64.
    hidden, student, t_hidden, teacher, labels = case
    up = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    want = reference(
        up(hidden),
        OutputHead(up(student.weight), up(student.bias)),
        up(t_hidden),
        OutputHead(up(teacher.weight), up(teacher.bias)),
        labels,
        **kwargs,
    )
    # bf16 logits (8 bits of mantissa) and bf16-rounded gradients.
    assert_same((parts, grads), want, tol={"rtol": 2e-2, "atol": 2e-3}, what="bf16")


def test_bfloat16_hidden_with_float32_head():
    # Mixed precision: a bf16 decoder output meets an fp32 head; each gradient keeps its input's dtype.
    hidden, student, t_hidden, teacher, labels = make_case(seed=8)
    hidden = hidden.detach().bfloat16().requires_grad_()
    student = OutputHead(*(t.detach().float().requires_grad_() for t in (student.weight, student.bias)))
    parts, grads = chunked(hidden, student, t_hidden, teacher, labels, chunk_size=8)
    assert parts.total.dtype == torch.float64  # the float64 teacher widens the comparison
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]


@pytest.mark.parametrize("num_items", [None, 10])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_no_tokens_gives_zero_and_zero_gradients(alpha, num_items):
    for n, keep in ((0, 0.7), (13, -1.0)):  # no rows at all; rows that are all masked
        case = make_case(n=n, seed=9, keep=keep)
        parts, grads = chunked(*case, alpha=alpha, num_items_in_batch=num_items, chunk_size=4)
        for value in (parts.total, parts.soft, parts.hard):
            assert value.item() == 0.0
        assert int(parts.num_tokens) == 0
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


def test_alpha_zero_needs_no_teacher():
    hidden, student, _, _, labels = make_case(seed=10)
    got = chunked(hidden, student, None, None, labels, alpha=0.0, chunk_size=8)
    want = reference(hidden, student, None, None, labels, alpha=0.0)
    assert_same(got, want)


def test_no_grad_gives_values_only():
    case = make_case(seed=11)
    with torch.no_grad():
        parts = chunked_distillation_loss(*case, chunk_size=8)
    assert not parts.total.requires_grad
    ref_parts, _ = reference(*case)
    torch.testing.assert_close(parts.total, ref_parts.total.detach(), **F64)


def test_teacher_states_from_inference_mode():
    hidden, student, t_hidden, teacher, labels = make_case(seed=12)
    with torch.inference_mode():
        t_inference = t_hidden * 1.0
    got = chunked(hidden, student, t_inference, teacher, labels, chunk_size=8)
    assert_same(got, reference(hidden, student, t_hidden, teacher, labels))


def test_module_matches_function():
    case = make_case(seed=13)
    kwargs = dict(divergence="tvd", temperature=2.0, alpha=0.3, chunk_size=8)
    module = ChunkedDistillationLoss(**kwargs)
    assert "tvd" in repr(module)
    got = module(*case, num_items_in_batch=50)
    want = chunked_distillation_loss(*case, num_items_in_batch=50, **kwargs)
    torch.testing.assert_close(got.total, want.total, rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(student_hidden=torch.zeros(2, 3, 8)), r"student_hidden must be \(N, H\).*\(2, 3, 8\)"),
        (dict(labels=torch.zeros(36, dtype=torch.long)), r"labels \(36,\) must be \(N,\) = \(37,\)"),
        (dict(student_hidden=torch.zeros(37, 5)), r"student head weight \(19, 8\).*H = 8.*\(37, 5\)"),
        (dict(teacher_hidden=torch.zeros(36, 6)), r"teacher_hidden \(36, 6\) must be \(N, H_t\).*N = 37"),
        (dict(teacher_hidden=torch.zeros(37, 7)), r"teacher head weight \(19, 6\).*\(37, 7\)"),
        (dict(teacher_hidden=None), r"alpha = 0.5 weighs a soft loss"),
        (dict(chunk_size=0), r"chunk_size must be an int >= 1"),
        (dict(alpha=1.5), r"alpha must be in \[0, 1\]"),
        (dict(temperature=0.0), r"temperature must be > 0"),
        (dict(divergence="kl"), r"unknown divergence 'kl'"),
    ],
    ids=lambda x: str(x)[:40] if isinstance(x, str) else None,
)
def test_bad_inputs_are_named(change, match):
    hidden, student, t_hidden, teacher, labels = make_case(seed=14)
    args = dict(
        student_hidden=hidden, student_head=student, teacher_hidden=t_hidden, teacher_head=teacher, labels=labels
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        chunked_distillation_loss(**args)


# --------------------------------------------------------------------------------------------
# memory: the (N, V) logits never exist


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


def test_peak_allocation_is_flat_in_tokens():
    n, h, v, chunk = 512, 64, 1024, 32
    hidden, student, t_hidden, teacher, labels = make_case(n=n, h_s=h, h_t=h, v_s=v, seed=15, dtype=torch.float32)
    full_logits = n * v * 4
    kwargs = dict(divergence="jsd", alpha=0.5, temperature=2.0)

    with LargestAllocation() as spy:
        parts = chunked_distillation_loss(hidden, student, t_hidden, teacher, labels, chunk_size=chunk, **kwargs)
        parts.total.backward()
    # The largest tensors are the (V, H) head gradient and a few (chunk, V) chunk logits: 4x below (N, V).
    assert spy.largest <= max(v * h, chunk * v) * 4, f"{spy.largest} bytes from {spy.op}"
    assert spy.largest < full_logits / 4

    # The spy does see (N, V) tensors where they exist.
    with LargestAllocation() as spy:
        ref = distillation_loss(hidden @ student.weight.T + student.bias, t_hidden @ teacher.weight.T, labels, **kwargs)
        ref.total.backward()
    assert spy.largest >= full_logits


@pytest.mark.parametrize("v_t", [11, 29])
def test_uld_with_another_teacher_vocabulary_matches_reference(v_t):
    case = make_case(v_s=19, v_t=v_t, label_vocab=19)
    kwargs = dict(divergence="uld", alpha=0.6, temperature=2.0)
    assert_same(chunked(*case, chunk_size=8, **kwargs), reference(*case, **kwargs), what=f"uld V_t={v_t}")


def test_auto_chunks_keep_each_logits_block_under_a_fixed_size_whatever_the_vocabulary(monkeypatch):
    import alambic.losses.chunked as chunked_module

    assert chunked_module.resolve_chunk_size("auto", 49_152) == 1365
    assert chunked_module.resolve_chunk_size("auto", 151_936) == 441
    assert chunked_module.resolve_chunk_size(100, 151_936) == 100
    monkeypatch.setattr(chunked_module, "AUTO_CHUNK_ELEMENTS", 19 * 8)  # 8 rows of the 19-wide vocabulary
    case = make_case(v_s=19)
    kwargs = dict(divergence="jsd", alpha=0.5, temperature=2.0)
    with LargestAllocation() as spy:
        got = chunked(*case, chunk_size="auto", **kwargs)
    assert_same(got, chunked(*case, chunk_size=8, **kwargs), what="auto = 8 rows")
    n, h = case[0].shape
    assert spy.largest <= max(n * h, 19 * h) * 8  # the (N, H) / (V, H) gradients, never more than 8 rows of logits


def test_the_gradients_are_given_away_once():
    case = make_case()
    parts = chunked_distillation_loss(*case, divergence="forward_kl", alpha=0.5, chunk_size=8)
    parts.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice through the chunked loss"):
        parts.total.backward()
