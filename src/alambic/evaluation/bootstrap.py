"""Bootstrap confidence intervals: token-weighted quality metrics (resampling whole sequences), and plain
per-item means (resampling items, e.g. prompts scored by ROUGE-L).

Tokens of one sequence are not independent (a hard document is hard all the way through), so the
resampling unit is the held-out sequence: resample sequences with replacement, recompute every metric
from the resampled per-sequence sums, take the percentiles. Pure numpy on (S,) arrays: cheap after
the model pass, which keeps only per-sequence sums.
"""

from __future__ import annotations

import numpy as np

SUMS = ("ce", "agree1", "agree5", "kl", "tokens")  # per-sequence sums of the evaluation pass; metrics_from_sums order
METRICS = ("perplexity", "top1_agreement", "top5_agreement", "kl_to_teacher")
_MAX_CE = 700.0  # exp(700) is near float64's limit: a diverged model reports a huge perplexity, not inf
_DRAWS_PER_BLOCK = 1 << 20  # resamples x sequences drawn at once: bounds memory at ~40 MiB for any S


def metrics_from_sums(ce, agree1, agree5, kl, tokens) -> dict[str, float | np.ndarray]:
    """Token-weighted metrics from summed per-token values (floats, or (B,) arrays of B resamples):
    perplexity = exp(mean cross-entropy), the rest are means per counted token."""
    n = np.maximum(tokens, 1.0)  # clamp: no counted token gives 0 (perplexity 1), not 0/0
    values = {
        "perplexity": np.exp(np.minimum(ce / n, _MAX_CE)),
        "top1_agreement": agree1 / n,
        "top5_agreement": agree5 / n,
        "kl_to_teacher": kl / n,
    }
    return {m: float(v) if np.ndim(v) == 0 else v for m, v in values.items()}


def bootstrap_intervals(
    sums: dict[str, np.ndarray], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, list[float]]:
    """Percentile bootstrap interval of each metric in `METRICS`, over sequences.

    Each resample draws S sequence indices uniformly with replacement (`default_rng(seed).integers(0, S)`,
    S per resample, resamples in order) and computes `metrics_from_sums` of the drawn sequences' sums,
    exactly as the point estimate is computed from all of them. The same seed gives every model the same resampled
    sets, so intervals of models scored on the same data are paired.

    Args:
        sums: {name: (S,) array} for every name in `SUMS`: each sequence's summed token cross-entropy,
            top-1 and top-5 agreements, KL, and its number of counted tokens.
        resamples: number of bootstrap resamples B.
        confidence: two-sided level; the interval is the (1 - c)/2 and (1 + c)/2 percentiles.
        seed: seed of numpy's default generator.

    Returns:
        {metric: [low, high]}. With no sequence, both ends are the (clamped) point estimate.

    Raises:
        ValueError: a sum is missing, the arrays differ in length, or resamples / confidence are out of range.
    """
    missing = [k for k in SUMS if k not in sums]
    if missing:
        raise ValueError(f"bootstrap_intervals: per-sequence sums {missing} missing; expected all of {list(SUMS)}")
    lengths = {k: np.asarray(sums[k]).size for k in SUMS}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"bootstrap_intervals: per-sequence sums differ in length {lengths}; one value per sequence")
    _check_settings("bootstrap_intervals", resamples, confidence)
    table = np.stack([np.asarray(sums[k], dtype=np.float64).reshape(-1) for k in SUMS], axis=1)  # (S, 5)
    n_seq = table.shape[0]
    if n_seq == 0:
        point = metrics_from_sums(*[0.0] * len(SUMS))
        return {m: [point[m], point[m]] for m in METRICS}

    totals = _resampled_totals(table, resamples, seed)  # (B, 5): summed values of each resample
    values = metrics_from_sums(*totals.T)  # (B,) per metric
    return {m: _percentiles(values[m], confidence) for m in METRICS}


def bootstrap_mean_intervals(
    values: dict[str, np.ndarray], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, list[float]]:
    """Percentile bootstrap interval of the plain mean of each per-item array (e.g. ROUGE-L per prompt).

    Items are drawn exactly as `bootstrap_intervals` draws sequences (same generator, same order), so with
    the same seed and the same number of items every model, and every metric, is scored on the same
    resampled sets: their intervals are paired.

    Args:
        values: {name: (N,) array}, one value per item, every array of the same length N >= 1.
        resamples: number of bootstrap resamples B.
        confidence: two-sided level; the interval is the (1 - c)/2 and (1 + c)/2 percentiles.
        seed: seed of numpy's default generator.

    Returns:
        {name: [low, high]} of mean(values[name][drawn items]) over the resamples.

    Raises:
        ValueError: no array, arrays of different or zero length, or resamples / confidence out of range.
    """
    _check_settings("bootstrap_mean_intervals", resamples, confidence)
    lengths = {k: np.asarray(v).size for k, v in values.items()}
    if not lengths or len(set(lengths.values())) > 1 or 0 in lengths.values():
        raise ValueError(
            f"bootstrap_mean_intervals: item counts {lengths}: need at least one array, all of the "
            "same non-zero length (one value per item)"
        )
    names = list(values)
    table = np.stack([np.asarray(values[k], dtype=np.float64).reshape(-1) for k in names], axis=1)  # (N, K)
    means = _resampled_totals(table, resamples, seed) / table.shape[0]  # (B, K)
    return {k: _percentiles(means[:, j], confidence) for j, k in enumerate(names)}


def _check_settings(caller: str, resamples: int, confidence: float) -> None:
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"{caller}: resamples = {resamples} must be >= 1 and confidence = {confidence} in (0, 1)")


def _resampled_totals(table: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(S, K) per-item values -> (B, K) column sums over each of B resamples of the S rows.

    Resample b draws S row indices uniformly with replacement: `default_rng(seed).integers(0, S)`, S per
    resample, resamples in order (drawn in blocks of rows, which leaves the stream unchanged).
    """
    n_items = table.shape[0]
    rng = np.random.default_rng(seed)
    totals = np.empty((resamples, table.shape[1]))
    block = max(1, _DRAWS_PER_BLOCK // n_items)
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        draws = rng.integers(0, n_items, size=(rows, n_items))  # (rows, S) item indices
        # how often each item was drawn, per resample (one bincount over row-offset indices), then
        # counts @ table: (rows, S) @ (S, K), no (rows, S, K) gather
        flat = (np.arange(rows)[:, None] * n_items + draws).reshape(-1)
        counts = np.bincount(flat, minlength=rows * n_items).reshape(rows, n_items).astype(np.float64)
        totals[start : start + rows] = counts @ table
    return totals


def _percentiles(values: np.ndarray, confidence: float) -> list[float]:
    tail = 100 * (1 - confidence) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
