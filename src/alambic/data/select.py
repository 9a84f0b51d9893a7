"""Teacher-entropy data selection: score each training sequence by the teacher's mean token entropy, keep a band.

Score of a sequence s with counted tokens (labels != -100, causal shift) t = 1..n_s:
    H(s) = (1 / n_s) * sum_t H(P_t),   H(P) = -sum_v p_v log p_v   (nats, at temperature 1)
where P_t is the teacher's next-token distribution at the position before token t. The sequences are ranked
by H and the band `highest`, `lowest` or `middle` of `keep_fraction` of them is kept. The whole distribution
is recorded in `<run>/selection/selection.json` (histogram, quantiles, thresholds, kept indices, scores).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from alambic.config import SelectionConfig
from alambic.data.tokenize import DistillationCollator
from alambic.modeling import counted_positions, final_hidden_states, project

ENTROPY_CHUNK = 1024  # counted tokens whose logits are held at once: (chunk, V) float32, never (N, V)
QUANTILES = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)
Band = Literal["highest", "lowest", "middle"]


def token_entropy(logits: Tensor) -> Tensor:
    """(..., V) logits -> (...) entropy H = -sum_v p log p of softmax(logits), in float32, in nats."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    # p log p -> 0 as p -> 0; exp(-inf) * -inf would be nan for masked-out logits, so zero those terms
    terms = torch.where(torch.isfinite(log_p), log_p.exp() * log_p, torch.zeros_like(log_p))
    return -terms.sum(-1)


@torch.inference_mode()
def sequence_entropies(
    model,
    dataset,
    *,
    pad_token_id: int,
    batch_size: int = 8,
    chunk_size: int = ENTROPY_CHUNK,
    description: str = "teacher entropy",
) -> np.ndarray:
    """(S,) mean teacher entropy over each sequence's counted tokens, in dataset order (float64).

    The model runs batch by batch to its final hidden states; the output head is applied to `chunk_size`
    counted positions at a time, so the largest logits tensor is (chunk_size, V), whatever the dataset size.

    Raises:
        ValueError: a sequence has no counted token (it has no score; the data stage never keeps such).
    """
    from rich.progress import track

    from alambic.utils import console

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=DistillationCollator(pad_token_id))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[np.ndarray] = []
    try:
        for batch in track(loader, description=description, console=console):
            mask, _ = counted_positions(batch["labels"])  # (B, T-1): position t predicts token t + 1
            counts = mask.sum(-1)  # (B,)
            if bool((counts == 0).any()):
                first = len(np.concatenate(scores)) if scores else 0
                rows = (first + torch.nonzero(counts == 0).flatten()).tolist()
                raise ValueError(f"sequences {rows[:5]} have no counted token (every label -100): no entropy to score")
            seq_of_token = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]  # (N,)
            ids, att = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            hidden = final_hidden_states(model, model, ids, att)[:, :-1][mask.to(device)]  # (N, H)
            sums = torch.zeros(mask.shape[0], dtype=torch.float64)
            for start in range(0, hidden.shape[0], chunk_size):
                h = token_entropy(project(model, hidden[start : start + chunk_size]))  # (n,)
                sums.index_add_(0, seq_of_token[start : start + chunk_size], h.double().cpu())
            scores.append((sums / counts.double()).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(scores) if scores else np.zeros(0)


def select_band(scores: np.ndarray, keep_fraction: float, band: Band) -> np.ndarray:
    """Sorted indices of the kept sequences: k = max(1, round(keep_fraction * S)) of them, the k highest, the
    k lowest, or the k in the middle of the ranking. Ties are ranked by index (stable), so the choice is
    deterministic.

    Raises:
        ValueError: keep_fraction outside (0, 1], an unknown band, or no score.
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction = {keep_fraction} must be in (0, 1]")
    if band not in ("highest", "lowest", "middle"):
        raise ValueError(f"band = {band!r}: choose 'highest', 'lowest' or 'middle'")
    n = len(scores)
    if n == 0:
        raise ValueError("no sequence to select from")
    k = min(n, max(1, round(keep_fraction * n)))
    order = np.argsort(np.asarray(scores), kind="stable")  # ascending entropy
    start = {"lowest": 0, "highest": n - k, "middle": (n - k) // 2}[band]
    return np.sort(order[start : start + k])


def selection_record(scores: np.ndarray, kept: np.ndarray, cfg: SelectionConfig) -> dict[str, Any]:
    """What `selection.json` holds: the settings, the distribution of the scores, the thresholds, what was kept.

    "threshold" is the entropy the kept band starts at (highest: its lowest score, kept at or above it), ends at
    (lowest: its highest score), or both ends (middle: [low, high]). The histogram spans all scores in `cfg.bins`
    equal bins; "kept_counts" counts the kept sequences in the same bins.
    """
    scores = np.asarray(scores, dtype=np.float64)
    kept_scores = scores[kept]
    low, high = float(kept_scores.min()), float(kept_scores.max())
    edges = np.histogram_bin_edges(scores, bins=cfg.bins)
    return {
        "score": "mean teacher token entropy (nats, T = 1) over each sequence's counted tokens",
        "band": cfg.band,
        "keep_fraction": cfg.keep_fraction,
        "total": len(scores),
        "kept": len(kept),
        "threshold": {"highest": low, "lowest": high, "middle": [low, high]}[cfg.band],
        "kept_range": [low, high],
        "mean": float(scores.mean()),
        "mean_kept": float(kept_scores.mean()),
        "quantiles": {f"{q:g}": float(np.quantile(scores, q)) for q in QUANTILES},
        "histogram": {
            "edges": edges.tolist(),
            "counts": np.histogram(scores, bins=edges)[0].tolist(),
            "kept_counts": np.histogram(kept_scores, bins=edges)[0].tolist(),
        },
        "kept_indices": kept.tolist(),
        "scores": scores.tolist(),
    }


def apply_selection(dataset, record: dict[str, Any]):
    """The kept rows of `dataset` (the very set that was scored), in their original order.

    Raises:
        ValueError: the dataset is not the one scored (another number of sequences): select again.
    """
    if len(dataset) != record["total"]:
        raise ValueError(
            f"the selection was made over {record['total']} training sequences, this set has "
            f"{len(dataset)}: the data changed since; run the select stage again"
        )
    return dataset.select(record["kept_indices"])
