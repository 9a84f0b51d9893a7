"""Feature losses against plain float64 references written with loops: values and gradients, odd shapes,
masks, edge cases; and the layer maps."""

import math

import pytest
import torch

from alambic.losses.features import (
    COSINE_EPS,
    attention_map_loss,
    attention_relation_loss,
    hidden_state_loss,
    layer_map,
)
from helpers import F64, assert_verbose_close

pytestmark = pytest.mark.usefixtures("one_thread")

B, T = 2, 7


def _masks(seed: int = 0):
    """(query mask, key mask): row 1 is right-padded after 4 tokens; a few real positions do not count."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.ones(B, T, dtype=torch.bool)
    keys[1, 4:] = False
    queries = keys & (torch.rand(B, T, generator=g) > 0.25)
    queries[0, 0] = True  # at least one counted position
    return queries, keys


def _assert_close(actual, expected, what):
    assert_verbose_close(actual, expected, what=what, **F64)  # float64, against its reference


def _check_value_and_grads(fast_fn, ref_fn, inputs, what):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    twins = [x.detach().clone().requires_grad_(True) for x in inputs]
    fast, ref = fast_fn(*leaves), ref_fn(*twins)
    _assert_close(fast.detach(), ref.detach(), f"{what} value")
    fast.backward()
    ref.backward()
    for i, (a, b) in enumerate(zip(leaves, twins)):
        _assert_close(a.grad, b.grad, f"{what} gradient of input {i}")


# --------------------------------------------------------------------------------------------
# references (float64, one position / row / key at a time)


def ref_hidden(s, t, mask, kind):
    total, count = s.new_zeros(()), 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            count += 1
            if kind == "mse":
                total = total + sum((s[b, i, h] - t[b, i, h]) ** 2 for h in range(s.shape[2])) / s.shape[2]
            else:
                dot = sum(s[b, i, h] * t[b, i, h] for h in range(s.shape[2]))
                ns = torch.sqrt(sum(s[b, i, h] ** 2 for h in range(s.shape[2])))
                nt = torch.sqrt(sum(t[b, i, h] ** 2 for h in range(t.shape[2])))
                total = total + 1 - dot / (torch.clamp(ns, min=COSINE_EPS) * torch.clamp(nt, min=COSINE_EPS))
    return total / max(count, 1)


def ref_attention(q_logits, p, mask, keys, kind):
    """Student probabilities from logits (what gets the gradient), row by row; teacher probabilities p."""
    total, count = q_logits.new_zeros(()), 0
    heads = q_logits.shape[1]
    for b in range(q_logits.shape[0]):
        for i in range(T):
            if not mask[b, i]:
                continue
            count += 1
            row_total = q_logits.new_zeros(())
            for h in range(heads):
                allowed = [j for j in range(i + 1) if keys[b, j]]
                q = torch.softmax(torch.stack([q_logits[b, h, i, j] for j in allowed]), 0)
                for n, j in enumerate(allowed):
                    pj = p[b, h, i, j]
                    if kind == "kl":
                        row_total = row_total + (pj * (torch.log(pj) - torch.log(q[n])) if pj > 0 else 0.0)
                    else:
                        row_total = row_total + (q[n] - pj) ** 2
            total = total + row_total / heads
    return total / max(count, 1)


def ref_relations(student, teacher, mask, keys, heads):
    total, count = student[0].new_zeros(()), 0
    for b in range(B):
        for i in range(T):
            if not mask[b, i]:
                continue
            count += 1
            allowed = [j for j in range(i + 1) if keys[b, j]]
            for xs, xt in zip(student, teacher):
                for r in range(heads):
                    rows = []
                    for x in (xs, xt):
                        d = x.shape[-1] // heads
                        part = x[b, :, r * d : (r + 1) * d]
                        rows.append(torch.softmax(torch.stack([part[i] @ part[j] / math.sqrt(d) for j in allowed]), 0))
                    q, p = rows
                    kl = sum(p[n] * (torch.log(p[n]) - torch.log(q[n])) for n in range(len(allowed)))
                    total = total + kl / (3 * heads)
    return total / max(count, 1)


def _probs(logits, keys):
    """Causal attention probabilities with padded keys excluded: exact zeros where not allowed."""
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & keys[:, None, None, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)


# --------------------------------------------------------------------------------------------
# hidden states


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_matches_the_reference(kind):
    torch.manual_seed(0)
    mask, _ = _masks()
    s, t = torch.randn(B, T, 5, dtype=torch.float64), torch.randn(B, T, 5, dtype=torch.float64)
    _check_value_and_grads(
        lambda a, b: hidden_state_loss(a, b, mask, kind=kind), lambda a, b: ref_hidden(a, b, mask, kind), [s, t], kind
    )
    # flat (N, H) rows give the same value as (B, T, H) with their mask
    flat = hidden_state_loss(s[mask], t[mask], torch.ones(int(mask.sum()), dtype=torch.bool), kind=kind)
    torch.testing.assert_close(flat, hidden_state_loss(s, t, mask, kind=kind))


def test_hidden_state_loss_edge_cases():
    torch.manual_seed(1)
    s, t = torch.randn(B, T, 6, requires_grad=True), torch.randn(B, T, 6)
    none = torch.zeros(B, T, dtype=torch.bool)
    for kind in ("mse", "cosine"):
        loss = hidden_state_loss(s, t, none, kind=kind)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(s.grad).all() and s.grad.abs().sum() == 0
        assert hidden_state_loss(t, t, torch.ones(B, T, dtype=torch.bool), kind=kind).abs().item() < 1e-6
    assert hidden_state_loss(s.double(), t.double(), torch.ones(B, T, dtype=torch.bool)).dtype == torch.float64
    assert hidden_state_loss(s.bfloat16(), t.bfloat16(), torch.ones(B, T, dtype=torch.bool)).dtype == torch.float32
    # the global count divides, as the logit loss does under gradient accumulation
    mask, _ = _masks()
    own = hidden_state_loss(s, t, mask, kind="mse")
    torch.testing.assert_close(hidden_state_loss(s, t, mask, kind="mse", num_items_in_batch=4 * mask.sum()), own / 4)


def test_hidden_state_loss_refuses_unprojected_widths():
    with pytest.raises(ValueError, match="projected to the teacher's"):
        hidden_state_loss(torch.randn(B, T, 4), torch.randn(B, T, 6), torch.ones(B, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="'mse' or 'cosine'"):
        hidden_state_loss(torch.randn(B, T, 4), torch.randn(B, T, 4), torch.ones(B, T, dtype=torch.bool), kind="l1")


# --------------------------------------------------------------------------------------------
# attention maps


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_attention_map_loss_matches_the_reference(kind):
    torch.manual_seed(2)
    mask, keys = _masks(1)
    heads = 3
    student_logits = torch.randn(B, heads, T, T, dtype=torch.float64)
    teacher = _probs(torch.randn(B, heads, T, T, dtype=torch.float64), keys)
    _check_value_and_grads(
        lambda z: attention_map_loss(_probs(z, keys), teacher, mask, kind=kind, key_mask=keys),
        lambda z: ref_attention(z, teacher, mask, keys, kind),
        [student_logits],
        kind,
    )


def test_attention_map_loss_edge_cases():
    torch.manual_seed(3)
    mask, keys = _masks()
    logits = torch.randn(B, 2, T, T, requires_grad=True)
    teacher = _probs(torch.randn(B, 2, T, T), keys)
    for kind in ("kl", "mse"):
        loss = attention_map_loss(_probs(logits, keys), teacher, torch.zeros_like(mask), kind=kind, key_mask=keys)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
        same = attention_map_loss(teacher, teacher, mask, kind=kind, key_mask=keys)
        assert same.abs().item() < 1e-6
    # a student probability that underflowed to 0 where the teacher's is not: large but finite
    q = teacher.clone()
    q[0, 0, 3] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0])
    assert torch.isfinite(attention_map_loss(q, teacher, mask, key_mask=keys))
    with pytest.raises(ValueError, match="attention_relations"):
        attention_map_loss(torch.rand(B, 2, T, T), torch.rand(B, 3, T, T), mask)


# --------------------------------------------------------------------------------------------
# attention relations


def _qkv(widths, dtype=torch.float64):
    return [torch.randn(B, T, w, dtype=dtype) for w in widths]


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_relation_loss_matches_the_reference(heads):
    torch.manual_seed(4)
    mask, keys = _masks(2)
    # different widths per model and per q/k/v (GQA: k and v narrower than q), all divisible by 2
    student, teacher = _qkv([6, 4, 4]), _qkv([10, 6, 8])
    _check_value_and_grads(
        lambda *x: attention_relation_loss(x[:3], x[3:], mask, num_relation_heads=heads, key_mask=keys),
        lambda *x: ref_relations(x[:3], x[3:], mask, keys, heads),
        student + teacher,
        f"relations R={heads}",
    )


def test_attention_relation_loss_edge_cases():
    torch.manual_seed(5)
    mask, keys = _masks()
    student = [x.float().requires_grad_(True) for x in _qkv([8, 4, 4])]
    teacher = [x.float() for x in _qkv([12, 8, 8])]
    loss = attention_relation_loss(student, teacher, torch.zeros_like(mask), num_relation_heads=2, key_mask=keys)
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(x.grad).all() for x in student)
    assert attention_relation_loss(teacher, teacher, mask, num_relation_heads=4, key_mask=keys).abs().item() < 1e-6
    # left padding: query 0 of row 1 has no valid key at all; its row must not turn the gradients to NaN
    left = torch.ones(B, T, dtype=torch.bool)
    left[1, :2] = False
    for x in student:
        x.grad = None
    attention_relation_loss(student, teacher, left, num_relation_heads=2, key_mask=left).backward()
    assert all(torch.isfinite(x.grad).all() for x in student)
    with pytest.raises(ValueError, match=r"does not divide every q/k/v width .* choose one of \[1, 2, 4\]"):
        attention_relation_loss(student, teacher, mask, num_relation_heads=8)


def test_attention_relation_loss_without_causality_attends_every_key():
    torch.manual_seed(6)
    mask = torch.ones(B, T, dtype=torch.bool)
    student, teacher = _qkv([4, 4, 4]), _qkv([6, 6, 6])
    causal = attention_relation_loss(student, teacher, mask, num_relation_heads=2)
    full = attention_relation_loss(student, teacher, mask, num_relation_heads=2, causal=False)
    # causal: the first query has one key, so its relation is exactly 1 in both models (KL 0)
    first = attention_relation_loss(
        student, teacher, torch.zeros_like(mask).index_fill_(1, torch.tensor([0]), True), num_relation_heads=2
    )
    assert first.abs().item() < 1e-12 and full.item() > 0 and not torch.isclose(causal, full)


# --------------------------------------------------------------------------------------------
# layer maps


@pytest.mark.parametrize(
    "ls, lt, expected",
    [
        (4, 6, [(0, 1), (1, 2), (2, 4), (3, 5)]),  # halves (1.5, 4.5) round up
        (3, 12, [(0, 3), (1, 7), (2, 11)]),
        (4, 4, [(0, 0), (1, 1), (2, 2), (3, 3)]),
        (1, 5, [(0, 4)]),
    ],
)
def test_uniform_layer_map(ls, lt, expected):
    assert layer_map(ls, lt, mode="uniform") == expected


def test_uniform_layer_map_follows_its_formula_for_every_depth():
    for ls in range(1, 13):
        for lt in range(1, 31):
            pairs = layer_map(ls, lt, mode="uniform")
            assert [s for s, _ in pairs] == list(range(ls))
            assert [t for _, t in pairs] == [max(math.floor((i + 1) * lt / ls + 0.5) - 1, 0) for i in range(ls)]
            assert pairs[-1] == (ls - 1, lt - 1) and all(0 <= t < lt for _, t in pairs)


def test_other_layer_maps():
    assert layer_map(3, 8, mode="last") == [(2, 7)]
    # a student pruned from the teacher learns from the layers it kept
    assert layer_map(3, 8, kept_layers=[0, 4, 6]) == [(0, 0), (1, 4), (2, 6)]
    assert layer_map(3, 9) == layer_map(3, 9, mode="uniform")
    assert layer_map(3, 8, mode=[[2, 7], [0, 1]]) == [(0, 1), (2, 7)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode=[[3, 1]]), r"out of range: student layers are 0\.\.2"),
        (dict(mode=[[0, 8]]), r"teacher layers 0\.\.7"),
        (dict(mode=[[0, 1], [0, 2]]), "pairs a student layer twice"),
        (dict(mode=[]), "empty layer map"),
        (dict(kept_layers=[0, 4]), "expected 3 teacher indices"),
        (dict(kept_layers=[0, 4, 9]), r"in \[0, 8\)"),
        (dict(mode="middle"), "'auto', 'uniform', 'last'"),
    ],
)
def test_layer_map_refuses_what_cannot_be(kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer_map(3, 8, **kwargs)
