"""Gemma 3 270M's held-out perplexity on BBC News as alambic prepares it, with the BOS its tokenizer adds and without:
`python benchmarks/uld_gemma3/bos_perplexity.py [N_SEQUENCES]` (default 8 sequences of 256 tokens, the quickstart's
split). Without BOS is the data as alambic made it before following each tokenizer's convention."""

from __future__ import annotations

import sys

from alambic.config import DataConfig, ModelConfig
from alambic.data import prepare_datasets
from alambic.evaluation.quality import evaluate_against_teacher
from alambic.models import load_model, load_tokenizer


def main(n: int) -> None:
    cfg = ModelConfig(model="gemma3-270m", device="cpu")
    model, tokenizer = load_model(cfg), load_tokenizer(cfg)
    data = prepare_datasets(
        DataConfig(source="bbc_news", max_seq_len=256, validation_fraction=0.05, max_validation_sequences=n), tokenizer
    ).validation
    rows = {
        "with BOS": list(data),
        "without BOS": [{k: r[k][1:] for k in ("input_ids", "attention_mask", "labels")} for r in data],
    }
    for name, dataset in rows.items():
        r = evaluate_against_teacher(model, {}, dataset, pad_token_id=tokenizer.pad_token_id, batch_size=4)["teacher"]
        low, high = r["intervals"]["perplexity"]
        print(f"| {name} | {r['perplexity']:.1f} | {low:.1f} – {high:.1f} | {r['num_sequences']} | {r['num_tokens']} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
