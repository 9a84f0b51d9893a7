"""Bootstrap confidence intervals of token-weighted quality metrics, resampling whole sequences.

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
    values = {"perplexity": np.exp(np.minimum(ce / n, _MAX_CE)), "top1_agreement": agree1 / n,
              "top5_agreement": agree5 / n, "kl_to_teacher": kl / n}
    return {m: float(v) if np.ndim(v) == 0 else v for m, v in values.items()}


def bootstrap_intervals(sums: dict[str, np.ndarray], *, resamples: int = 1000, confidence: float = 0.95,
                        seed: int = 0) -> dict[str, list[float]]:
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
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"bootstrap_intervals: resamples = {resamples} must be >= 1 and confidence = {confidence} "
                         "in (0, 1)")
    table = np.stack([np.asarray(sums[k], dtype=np.float64).reshape(-1) for k in SUMS], axis=1)  # (S, 5)
    n_seq = table.shape[0]
    if n_seq == 0:
        point = metrics_from_sums(*[0.0] * len(SUMS))
        return {m: [point[m], point[m]] for m in METRICS}

    rng = np.random.default_rng(seed)
    totals = np.empty((resamples, len(SUMS)))  # (B, 5): summed values of each resample
    block = max(1, _DRAWS_PER_BLOCK // n_seq)
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        draws = rng.integers(0, n_seq, size=(rows, n_seq))  # (rows, S) sequence indices
        # how often each sequence was drawn, per resample (one bincount over row-offset indices), then
        # counts @ table: (rows, S) @ (S, 5), no (rows, S, 5) gather
        flat = (np.arange(rows)[:, None] * n_seq + draws).reshape(-1)
        counts = np.bincount(flat, minlength=rows * n_seq).reshape(rows, n_seq).astype(np.float64)
        totals[start:start + rows] = counts @ table
    values = metrics_from_sums(*totals.T)  # (B,) per metric
    tail = 100 * (1 - confidence) / 2
    return {m: [float(np.percentile(values[m], tail)), float(np.percentile(values[m], 100 - tail))] for m in METRICS}
