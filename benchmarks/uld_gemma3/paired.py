"""Paired bootstrap of the held-out perplexity ratio, ULD + CE student over CE-only control, from a finished
`uld.yaml` run: `python benchmarks/uld_gemma3/paired.py` (per-sequence cross-entropy of both students on the same
sequences, 1,000 resamples of sequences, seed 0)."""
import torch, datasets, numpy as np
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
v = datasets.load_from_disk("runs/uld_gemma3/data/validation")
def per_seq(path):
    m = AutoModelForCausalLM.from_pretrained(path).eval(); out = []
    with torch.no_grad():
        for r in v:
            ids = torch.tensor([r["input_ids"]]); lab = torch.tensor([r["labels"]])
            logits = m(input_ids=ids).logits[0, :-1]; y = lab[0, 1:]; mask = y != -100
            out.append((torch.nn.functional.cross_entropy(logits[mask], y[mask], reduction="sum").item(), int(mask.sum())))
    return np.array(out)
a = per_seq("runs/uld_gemma3/final"); b = per_seq("runs/uld_gemma3/control/final")
rng = np.random.default_rng(0); n = len(a); diffs = []
for _ in range(1000):
    i = rng.integers(0, n, n)
    diffs.append(a[i, 0].sum() / a[i, 1].sum() - b[i, 0].sum() / b[i, 1].sum())
d = a[:, 0].sum() / a[:, 1].sum() - b[:, 0].sum() / b[:, 1].sum()
print(f"ppl ULD {np.exp(a[:,0].sum()/a[:,1].sum()):.2f} CE {np.exp(b[:,0].sum()/b[:,1].sum()):.2f}; mean CE diff (ULD - CE) {d:.4f} nats/token, 95% paired [{np.percentile(diffs,2.5):.4f}, {np.percentile(diffs,97.5):.4f}]; ratio {np.exp(d):.4f} [{np.exp(np.percentile(diffs,2.5)):.4f}, {np.exp(np.percentile(diffs,97.5)):.4f}]")
