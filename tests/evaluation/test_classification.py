"""Classifier metrics against hand computations, the macro-F1 bootstrap against a plain loop, and the model passes."""

import numpy as np
import pytest
import torch

from alambic.config import CostConfig
from alambic.data.classification import ClassificationCollator
from alambic.evaluation.bootstrap import bootstrap_mean_intervals
from alambic.evaluation.classification import (
    class_logits,
    confusion_matrix,
    f1_from_counts,
    forward_cost,
    macro_f1,
    macro_f1_interval,
    score_classifiers,
)
from helpers import tiny_classifier

LABELS = ["business", "sport", "tech"]
Y = [0, 0, 1, 1, 2, 2]
STUDENT = [0, 0, 1, 0, 1, 1]  # class 2 is never predicted
TEACHER = [0, 1, 1, 0, 1, 2]


def _logits_predicting(classes, seed=0):
    """(N, 3) random logits whose argmax is `classes`."""
    z = torch.randn(len(classes), 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z[torch.arange(len(classes)), classes] = z.abs().max() + 1.0
    return z


def test_accuracy_macro_f1_and_confusion_by_hand_with_a_class_never_predicted():
    # class 0: TP 2, predicted 3, actual 2 -> F1 = 2*2/(3+2) = 0.8
    # class 1: TP 1, predicted 3, actual 2 -> F1 = 2*1/(3+2) = 0.4
    # class 2: TP 0, predicted 0, actual 2 -> F1 = 0 (present in the labels: counts in the mean)
    assert confusion_matrix(np.array(Y), np.array(STUDENT), 3).tolist() == [[2, 0, 0], [1, 1, 0], [0, 2, 0]]
    assert macro_f1(np.array(Y), np.array(STUDENT), 3) == pytest.approx((0.8 + 0.4 + 0.0) / 3)
    scores = score_classifiers(
        {"teacher": _logits_predicting(TEACHER, 1), "student": _logits_predicting(STUDENT, 2)}, torch.tensor(Y), LABELS
    )
    s = scores["student"]
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["macro_f1"] == pytest.approx(0.4)
    assert s["per_class_f1"] == pytest.approx({"business": 0.8, "sport": 0.4, "tech": 0.0})
    assert s["teacher_agreement"] == pytest.approx(4 / 6)  # positions 0, 2, 3, 4
    assert s["num_examples"] == 6 and s["confusion_matrix"][2] == [0, 2, 0]
    t = scores["teacher"]
    assert t["teacher_agreement"] == 1.0 and t["kl_to_teacher"] == pytest.approx(0.0, abs=1e-12)
    assert t["accuracy"] == pytest.approx(3 / 6)  # positions 0, 2, 5: the teacher is scored like anyone


def test_macro_f1_agrees_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")  # not a dependency: an independent check where installed
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 200), rng.integers(0, 4, 200)  # class 4 never predicted
    assert macro_f1(y, p, 5) == pytest.approx(metrics.f1_score(y, p, average="macro"))


def test_a_class_absent_from_labels_and_predictions_is_left_out_of_the_mean():
    assert macro_f1(np.array([0, 0, 1]), np.array([0, 0, 1]), 3) == 1.0
    f1, macro = f1_from_counts(np.zeros(3), np.zeros(3), np.zeros(3))
    assert macro == 0.0 and not np.isnan(f1).any()  # no class at all: 0, not 0/0


def test_kl_to_teacher_is_the_mean_class_kl_by_hand():
    t, s = _logits_predicting(TEACHER, 1), _logits_predicting(STUDENT, 2)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean()
    scores = score_classifiers({"teacher": t, "student": s}, torch.tensor(Y), LABELS)
    assert scores["student"]["kl_to_teacher"] == pytest.approx(float(by_hand), rel=1e-12)


def test_intervals_contain_the_point_and_pair_with_the_mean_bootstrap():
    rng = np.random.default_rng(3)
    y = torch.tensor(rng.integers(0, 3, 60))
    noisy = torch.where(torch.rand(60, generator=torch.Generator().manual_seed(0)) < 0.7, y, (y + 1) % 3)
    logits = {"teacher": _logits_predicting(y.tolist(), 1), "student": _logits_predicting(noisy.tolist(), 2)}
    s = score_classifiers(logits, y, LABELS, resamples=300, seed=5)["student"]
    for metric in ("accuracy", "macro_f1", "teacher_agreement", "kl_to_teacher"):
        low, high = s["intervals"][metric]
        assert low <= s[metric] <= high and low < high, metric
    correct = (noisy == y).double().numpy()
    assert (
        s["intervals"]["accuracy"] == bootstrap_mean_intervals({"accuracy": correct}, resamples=300, seed=5)["accuracy"]
    )


def test_macro_f1_interval_equals_a_plain_loop_over_the_same_draws():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 4, 37), rng.integers(0, 4, 37)
    draws = np.random.default_rng(9)  # the convention: S indices per resample, resamples in order
    values = [macro_f1(y[i], p[i], 4) for i in (draws.integers(0, 37, size=37) for _ in range(200))]
    expected = [np.percentile(values, 2.5), np.percentile(values, 97.5)]
    assert macro_f1_interval(y, p, 4, resamples=200, seed=9) == pytest.approx(expected, rel=1e-12)


def test_bad_inputs_are_refused_with_the_values():
    with pytest.raises(ValueError, match=r"class ids \[3\] outside \[0, 3\)"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="no 'teacher'"):
        score_classifiers({"student": torch.zeros(2, 3)}, torch.tensor([0, 1]), LABELS)
    with pytest.raises(ValueError, match="differ from the teacher's"):
        score_classifiers({"teacher": torch.zeros(2, 3), "student": torch.zeros(2, 4)}, torch.tensor([0, 1]), LABELS)


def test_padded_batches_give_each_example_its_own_logits(one_thread):
    """Right padding with the config's pad id: the classifier pools each row's last real token."""
    model = tiny_classifier(num_layers=2)
    rows = [{"input_ids": list(range(10, 10 + n)), "attention_mask": [1] * n, "labels": 0} for n in (3, 7, 5)]
    batched = class_logits(model, rows, pad_token_id=3, batch_size=3)
    alone = torch.cat([class_logits(model, [r], pad_token_id=3) for r in rows])
    assert batched.shape == (3, 3)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    batch = ClassificationCollator(3)(rows)
    assert batch["labels"].shape == (3,) and batch["input_ids"][0, 3:].eq(3).all()


def test_forward_cost_times_a_batch(one_thread):
    model = tiny_classifier(num_layers=2)
    rows = [{"input_ids": [10, 11, 12], "attention_mask": [1, 1, 1], "labels": 1}]
    cost = forward_cost(model, rows, CostConfig(batch_size=2, warmup=0, repeats=2), pad_token_id=3)
    assert len(cost["forward_seconds_per_batch"]["values"]) == 2 and cost["forward_seconds_per_batch"]["min"] > 0
    assert cost["batch_size"] == 2 and cost["sequence_tokens"] == 3
    assert cost["peak_memory_bytes"] is None or cost["peak_memory_bytes"] >= cost["weight_bytes"] > 0
