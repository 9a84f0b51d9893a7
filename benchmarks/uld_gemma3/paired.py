"""Paired bootstrap of the held-out perplexity ratio, ULD + CE student over CE-only control, from a finished
`uld.yaml` run: `python benchmarks/uld_gemma3/paired.py` (per-sequence cross-entropy of both students on the same
sequences, 1,000 resamples of sequences, seed 0)."""

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(2)
validation = datasets.load_from_disk("runs/uld_gemma3/data/validation")


def per_sequence(path: str) -> np.ndarray:
    """(n, 2): each held-out sequence's summed cross-entropy over its counted tokens, and their count."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for row in validation:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            logits, targets = model(input_ids=ids).logits[0, :-1], labels[0, 1:]
            counted = targets != -100
            ce = torch.nn.functional.cross_entropy(logits[counted], targets[counted], reduction="sum")
            out.append((ce.item(), int(counted.sum())))
    return np.array(out)


def mean_ce(rows: np.ndarray) -> float:
    return rows[:, 0].sum() / rows[:, 1].sum()


uld, ce = per_sequence("runs/uld_gemma3/final"), per_sequence("runs/uld_gemma3/control/final")
rng = np.random.default_rng(0)
diffs = []
for _ in range(1000):
    pick = rng.integers(0, len(uld), len(uld))  # the same resampled sequences for both students
    diffs.append(mean_ce(uld[pick]) - mean_ce(ce[pick]))
d, low, high = mean_ce(uld) - mean_ce(ce), np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)
print(
    f"ppl ULD {np.exp(mean_ce(uld)):.2f} CE {np.exp(mean_ce(ce)):.2f}; mean CE diff (ULD - CE) {d:.4f} nats/token, "
    f"95% paired [{low:.4f}, {high:.4f}]; ratio {np.exp(d):.4f} [{np.exp(low):.4f}, {np.exp(high):.4f}]"
)
