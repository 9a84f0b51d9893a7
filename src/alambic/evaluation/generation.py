"""The quality of a model's responses against references: ROUGE-L, exact match, response lengths, with intervals.

The responses themselves come from the decoding engine, `alambic.decoding.generate_responses`.
"""

from __future__ import annotations

import re
import string
from typing import Any

import numpy as np

from alambic.evaluation.bootstrap import bootstrap_mean_intervals


def rouge_l(predictions: list[str], references: list[str]) -> np.ndarray:
    """(n,) ROUGE-L F-measure of each prediction against its reference (`rouge-score`, Porter stemmer).

    F = (1 + 1) P R / (P + R) with P = LCS / |prediction|, R = LCS / |reference| in tokens, LCS the
    longest common subsequence. rouge-score's tokenizer lowercases and keeps only [a-z0-9] runs: text
    in other scripts scores 0, and so does an empty prediction or reference.
    """
    _check_pairs("rouge_l", predictions, references)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array(
        [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)], dtype=np.float64
    )


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: list[str], references: list[str]) -> np.ndarray:
    """(n,) 1.0 where the prediction equals its reference after `normalize_answer`, else 0.0."""
    _check_pairs("exact_match", predictions, references)
    return np.array(
        [float(normalize_answer(p) == normalize_answer(r)) for p, r in zip(predictions, references)], dtype=np.float64
    )


def generation_metrics(
    predictions: list[str],
    references: list[str],
    *,
    num_tokens: list[int] | None = None,
    finish_reasons: list[str] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Mean ROUGE-L and exact match over prompts, with percentile-bootstrap intervals, and response lengths.

    The bootstrap resamples prompts (`bootstrap_mean_intervals`): with the same seed every model's
    responses to the same prompts are scored on the same resampled sets.

    Args:
        predictions, references: one string each per prompt (references: held-out answers, or the
            teacher's own responses).
        num_tokens, finish_reasons: `decoding.generate_responses`' fields, one per prompt, for the length figures.
        resamples, seed, confidence: of the bootstrap.

    Returns:
        {"rouge_l", "exact_match": means; "intervals": {"rouge_l": [lo, hi], "exact_match": [lo, hi]};
        "num_prompts"; "response_tokens": {"mean", "median", "max"} (None without num_tokens);
        "truncated_share": share of finish_reason "length" (None without finish_reasons)}.

    Raises:
        ValueError: no prompt, or lists of different lengths.
    """
    _check_pairs("generation_metrics", predictions, references)
    if not predictions:
        raise ValueError(
            "generation_metrics: no prompt to score; text data has no held-out prompts (data.format: chat)"
        )
    for name, values in (("num_tokens", num_tokens), ("finish_reasons", finish_reasons)):
        if values is not None and len(values) != len(predictions):
            raise ValueError(
                f"generation_metrics: {len(values)} {name} for {len(predictions)} predictions; one per prompt"
            )
    scores = {"rouge_l": rouge_l(predictions, references), "exact_match": exact_match(predictions, references)}
    lengths = None
    if num_tokens is not None:
        counts = np.asarray(num_tokens, dtype=np.float64)
        lengths = {"mean": float(counts.mean()), "median": float(np.median(counts)), "max": int(counts.max())}
    return {
        **{name: float(values.mean()) for name, values in scores.items()},
        "intervals": bootstrap_mean_intervals(scores, resamples=resamples, confidence=confidence, seed=seed),
        "num_prompts": len(predictions),
        "response_tokens": lengths,
        "truncated_share": (
            None if finish_reasons is None else sum(r == "length" for r in finish_reasons) / len(finish_reasons)
        ),
    }


def _check_pairs(caller: str, predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{caller}: {len(predictions)} predictions for {len(references)} references; one each per prompt"
        )
