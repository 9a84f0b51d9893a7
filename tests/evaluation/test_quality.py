"""evaluate_against_teacher against a slow twin: full (T, V) logits, one sequence at a time."""

import math

import numpy as np
import pytest
import torch

from alambic.evaluation.bootstrap import SUMS, bootstrap_intervals, metrics_from_sums
from alambic.evaluation.quality import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, evaluate_against_teacher
from helpers import tiny_model, tiny_prepared

METRICS = ("perplexity", "top1_agreement", "top5_agreement", "kl_to_teacher")


def _reference_sums(teacher, student, dataset) -> dict[str, np.ndarray]:
    """Per-sequence sums from the models' own full logits, written out plainly in float64."""
    sums = {k: [] for k in SUMS}
    with torch.no_grad():
        for row in dataset:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor(row["labels"][1:])
            keep = labels != -100
            t = teacher(ids).logits[0, :-1][keep].double()  # (N, V)
            s = student(ids).logits[0, :-1][keep].double()
            logq, logp = s.log_softmax(-1), t.log_softmax(-1)
            t_top = t.argmax(-1)
            # the teacher's token ranks among the student's first five: fewer than 5 tokens score higher
            top5 = (s > s.gather(1, t_top[:, None])).sum(-1) < 5
            sums["ce"].append(-logq[torch.arange(len(t_top)), labels[keep]].sum().item())
            sums["agree1"].append((s.argmax(-1) == t_top).sum().item())
            sums["agree5"].append(top5.sum().item())
            sums["kl"].append((logp.exp() * (logp - logq)).sum().item())
            sums["tokens"].append(float(keep.sum()))
    return {k: np.asarray(v) for k, v in sums.items()}


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    # uneven lengths and masked prompts: sequences differ in counted tokens, and batches pad
    return tiny_prepared(tmp_path_factory.mktemp("chat"), chat=True).train  # 12 sequences, 11 to 19 counted


def test_matches_full_logits_sequence_by_sequence(chat_data, one_thread):
    teacher, student = tiny_model(seed=1), tiny_model(seed=2, num_layers=2)
    res = evaluate_against_teacher(teacher, {"s": student}, chat_data, pad_token_id=3, batch_size=3)
    ref = _reference_sums(teacher, student, chat_data)
    point = metrics_from_sums(**{k: float(v.sum()) for k, v in ref.items()})
    got = res["s"]
    for m in METRICS:
        assert got[m] == pytest.approx(point[m], rel=1e-4), m
    assert got["cross_entropy"] == pytest.approx(math.log(point["perplexity"]), rel=1e-4)
    assert got["num_tokens"] == int(ref["tokens"].sum()) and got["num_sequences"] == len(chat_data)
    # the same per-sequence sums give the same intervals: tokens were credited to the right sequences
    expected = bootstrap_intervals(ref, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
    for m in METRICS:
        np.testing.assert_allclose(got["intervals"][m], expected[m], rtol=1e-4, err_msg=m)


def test_teacher_agrees_with_itself_and_intervals_bracket_the_estimates(tmp_path, one_thread):
    data = tiny_prepared(tmp_path).validation
    teacher, student = tiny_model(seed=1), tiny_model(seed=2, num_layers=2)
    res = evaluate_against_teacher(teacher, {"s": student}, data, pad_token_id=3, batch_size=8)
    t, s = res["teacher"], res["s"]
    assert t["top1_agreement"] == t["top5_agreement"] == 1.0 and t["intervals"]["top5_agreement"] == [1.0, 1.0]
    assert t["kl_to_teacher"] == pytest.approx(0.0, abs=1e-5)
    assert s["top1_agreement"] <= s["top5_agreement"] < 1.0
    for m in METRICS:
        low, high = s["intervals"][m]
        assert low <= s[m] <= high and low < high, (m, low, s[m], high)
    assert s["num_sequences"] == len(data) and s["num_tokens"] == t["num_tokens"]
    # keys earlier readers (report, stages, pruning record) depend on are all still there
    assert {
        "perplexity",
        "cross_entropy",
        "top1_agreement",
        "kl_to_teacher",
        "num_tokens",
        "parameters",
        "non_embedding_parameters",
        "num_layers",
    } <= set(s)
