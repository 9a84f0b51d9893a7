"""alambic.evaluation.generation: the metrics of responses (ROUGE-L, exact match, lengths, intervals).

The decoding that makes the responses is tested in tests/test_decoding.py."""

from __future__ import annotations

import numpy as np
import pytest

from alambic.evaluation.bootstrap import bootstrap_intervals, bootstrap_mean_intervals
from alambic.evaluation.generation import exact_match, generation_metrics, normalize_answer, rouge_l

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rouge_l_by_hand():
    predictions = [
        "the cat sat on the mat",
        "completely different words",
        "the cat sat on the mat",
        "the cat was found under the bed",
        "cats running",
    ]
    references = [
        "the cat sat on the mat",
        "nothing shared here",
        "the cat lay on a mat",
        "the cat was under the bed",
        "cat run",
    ]
    # LCS("the cat sat on the mat", "the cat lay on a mat") = "the cat on mat": P = R = 4/6.
    # LCS = all 6 reference tokens of the 7 predicted: P = 6/7, R = 1, F = 2PR / (P + R) = 12/13.
    # Porter stemming: cats -> cat, running -> run.
    np.testing.assert_allclose(rouge_l(predictions, references), [1.0, 0.0, 2 / 3, 12 / 13, 1.0], rtol=1e-12)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge_l(["a", "b"], ["a"])


def test_exact_match_normalisation():
    assert normalize_answer("  The Eiffel-Tower,  in   PARIS! ") == "eiffeltower in paris"
    predictions = ["The Eiffel Tower!", "an apple.", "apples", "Paris", ""]
    references = ["eiffel   tower", "Apple", "apple", "paris, france", ""]
    assert exact_match(predictions, references).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_generation_metrics():
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    references = [" ".join(rng.choice(words, 6)) for _ in range(40)]
    predictions = [r if i % 3 == 0 else " ".join(rng.choice(words, 5)) for i, r in enumerate(references)]
    num_tokens = [int(n) for n in rng.integers(1, 30, 40)]
    reasons = ["length" if i % 4 == 0 else "stop" for i in range(40)]
    m = generation_metrics(predictions, references, num_tokens=num_tokens, finish_reasons=reasons)
    assert m["rouge_l"] == pytest.approx(rouge_l(predictions, references).mean())
    assert m["exact_match"] == pytest.approx(14 / 40)  # i = 0, 3, ..., 39 copy the reference
    for name in ("rouge_l", "exact_match"):
        low, high = m["intervals"][name]
        assert low < m[name] < high, (name, low, m[name], high)
    assert m["num_prompts"] == 40 and m["truncated_share"] == 0.25
    assert m["response_tokens"] == {
        "mean": np.mean(num_tokens),
        "median": np.median(num_tokens),
        "max": max(num_tokens),
    }
    bare = generation_metrics(predictions, references)
    assert bare["response_tokens"] is None and bare["truncated_share"] is None
    assert bare["intervals"] == m["intervals"]  # same seed, same prompts: the same resampled sets
    with pytest.raises(ValueError, match="no prompt to score"):
        generation_metrics([], [])
    with pytest.raises(ValueError, match="3 num_tokens for 40 predictions"):
        generation_metrics(predictions, references, num_tokens=[1, 2, 3])


def test_bootstrap_mean_intervals():
    constant = bootstrap_mean_intervals({"a": np.full(17, 0.3), "b": np.ones(17)})
    assert constant["a"] == pytest.approx([0.3, 0.3], abs=1e-15) and constant["b"] == [1.0, 1.0]
    # a plain loop over the same draws as bootstrap_intervals: default_rng(seed).integers(0, N), N per resample
    values = np.random.default_rng(1).random(23)
    rng = np.random.default_rng(4)
    means = [values[rng.integers(0, 23, size=23)].mean() for _ in range(300)]
    ci = bootstrap_mean_intervals({"v": values}, resamples=300, confidence=0.9, seed=4)
    np.testing.assert_allclose(ci["v"], np.percentile(means, [5, 95]), rtol=1e-12)
    # and the very same resampled sets as the token-weighted bootstrap (one token per item)
    sums = {"ce": np.zeros(23), "agree1": values, "agree5": values, "kl": np.zeros(23), "tokens": np.ones(23)}
    token_weighted = bootstrap_intervals(sums, resamples=300, confidence=0.9, seed=4)
    np.testing.assert_allclose(ci["v"], token_weighted["top1_agreement"], rtol=1e-12)
    with pytest.raises(ValueError, match="same non-zero length"):
        bootstrap_mean_intervals({"a": np.ones(3), "b": np.ones(4)})
    with pytest.raises(ValueError, match="same non-zero length"):
        bootstrap_mean_intervals({"a": np.zeros(0)})
    with pytest.raises(ValueError, match="resamples = 0"):
        bootstrap_mean_intervals({"a": np.ones(3)}, resamples=0)
