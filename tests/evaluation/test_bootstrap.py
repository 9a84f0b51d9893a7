"""The sequence bootstrap: the vectorised resampling against a plain loop, and that its intervals behave."""

import math

import numpy as np
import pytest

from alambic.evaluation.bootstrap import METRICS, SUMS, bootstrap_intervals, metrics_from_sums


def _fake_sums(n_seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-sequence sums of uneven lengths (some sequences empty), like a held-out chat split."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 40, size=n_seq).astype(float)
    difficulty = rng.gamma(4.0, 1.0, size=n_seq)  # per-sequence mean CE: tokens of one sequence correlate
    agree1 = rng.binomial(tokens.astype(int), 0.4).astype(float)
    return {
        "ce": tokens * difficulty,
        "agree1": agree1,
        "agree5": agree1 + rng.binomial((tokens - agree1).astype(int), 0.5),
        "kl": tokens * rng.gamma(2.0, 0.5, size=n_seq),
        "tokens": tokens,
    }


def _reference(sums, resamples, confidence, seed):
    """One resample at a time, one drawn sequence at a time, in Python floats."""
    rng = np.random.default_rng(seed)
    n_seq = len(sums["tokens"])
    values = {m: [] for m in METRICS}
    for _ in range(resamples):
        total = dict.fromkeys(SUMS, 0.0)
        for i in rng.integers(0, n_seq, size=n_seq):
            for k in SUMS:
                total[k] += float(sums[k][i])
        for m, v in metrics_from_sums(**total).items():
            values[m].append(v)
    tail = 100 * (1 - confidence) / 2
    return {m: [np.percentile(v, tail), np.percentile(v, 100 - tail)] for m, v in values.items()}


@pytest.mark.parametrize("n_seq,resamples", [(1, 7), (13, 200), (257, 50)])
def test_matches_a_plain_loop(n_seq, resamples, monkeypatch):
    # small blocks, so draws crossing block boundaries are checked too
    monkeypatch.setattr("alambic.evaluation.bootstrap._DRAWS_PER_BLOCK", 3 * n_seq + 1)
    sums = _fake_sums(n_seq)
    fast = bootstrap_intervals(sums, resamples=resamples, confidence=0.9, seed=3)
    slow = _reference(sums, resamples, 0.9, seed=3)
    for m in METRICS:
        np.testing.assert_allclose(fast[m], slow[m], rtol=1e-10, err_msg=m)


def test_contains_the_point_estimate_and_is_paired_by_seed():
    sums = _fake_sums(64)
    point = metrics_from_sums(**{k: float(v.sum()) for k, v in sums.items()})
    ci = bootstrap_intervals(sums)
    for m in METRICS:
        low, high = ci[m]
        assert low < point[m] < high, (m, low, point[m], high)
    assert bootstrap_intervals(sums) == ci  # fixed seed: reproducible
    assert bootstrap_intervals(sums, seed=1) != ci


def test_width_shrinks_like_one_over_sqrt_n():
    widths = {}
    for n_seq in (100, 1600):
        ci = bootstrap_intervals(_fake_sums(n_seq, seed=n_seq), resamples=2000)
        # perplexity on the log scale: its width in ppl units also scales with the level, exp(mean CE)
        ci["perplexity"] = np.log(ci["perplexity"])
        widths[n_seq] = {m: ci[m][1] - ci[m][0] for m in METRICS}
    for m in METRICS:
        ratio = widths[100][m] / widths[1600][m]
        assert 2.8 < ratio < 5.7, (m, ratio)  # sqrt(1600 / 100) = 4, give or take sampling noise


def test_covers_the_true_mean_about_95_percent_of_the_time():
    # Each sequence: 20 tokens agreeing with probability 0.3; the true top-1 agreement is 0.3.
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for t in range(trials):
        agree = rng.binomial(20, 0.3, size=40).astype(float)
        sums = {"ce": np.zeros(40), "agree1": agree, "agree5": agree, "kl": np.zeros(40), "tokens": np.full(40, 20.0)}
        low, high = bootstrap_intervals(sums, resamples=300, seed=t)["top1_agreement"]
        covered += low <= 0.3 <= high
    assert 0.88 <= covered / trials <= 0.99, covered / trials


def test_perplexity_is_exp_of_the_mean_cross_entropy_of_each_resample():
    sums = _fake_sums(50)
    ci = bootstrap_intervals(sums)
    draws = np.random.default_rng(0).integers(0, 50, size=(1000, 50))  # the same draws: one block, seed 0
    mean_ce = sums["ce"][draws].sum(1) / sums["tokens"][draws].sum(1)
    np.testing.assert_allclose(ci["perplexity"], np.percentile(np.exp(mean_ce), [2.5, 97.5]), rtol=1e-10)
    # not the mean of per-sequence perplexities, which long-tailed sequences would inflate
    assert ci["perplexity"][1] < np.exp(sums["ce"] / np.maximum(sums["tokens"], 1)).mean()


def test_edge_cases():
    empty = bootstrap_intervals({k: np.zeros(0) for k in SUMS})
    assert empty == {
        "perplexity": [1.0, 1.0],
        "top1_agreement": [0.0, 0.0],
        "top5_agreement": [0.0, 0.0],
        "kl_to_teacher": [0.0, 0.0],
    }
    no_tokens = bootstrap_intervals({k: np.zeros(5) for k in SUMS})  # all masked: 0, not NaN
    assert all(not math.isnan(x) for v in no_tokens.values() for x in v)
    with pytest.raises(ValueError, match=r"\['kl'\] missing"):
        bootstrap_intervals({k: np.zeros(3) for k in SUMS if k != "kl"})
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_intervals({**{k: np.zeros(3) for k in SUMS}, "tokens": np.zeros(4)})
    with pytest.raises(ValueError, match="confidence = 1.5"):
        bootstrap_intervals({k: np.zeros(3) for k in SUMS}, confidence=1.5)
