"""Labelled documents -> classification examples: class ids, tokenization, the record of the split, the collator.

One example per document: its tokens, truncated to `max_seq_len` (the start is kept: a news article's title and
lead carry its topic), and its class id. No eos is appended: the tokenizer may pad with eos, and Llama-family
classifiers read the last token that is not padding. Class names are numbered in sorted order (numerically when
every name is an integer), and the list is recorded in `split.json` (`labels`), so every model of a run, and
every later run on the same data, agrees on what class id i means.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from alambic.config import DataConfig
from alambic.data.prepared import PreparedData, split_record
from alambic.data.sources import DataSourceError
from alambic.tokens import leading_bos

logger = logging.getLogger(__name__)


def label_names(docs: list[dict[str, Any]]) -> list[str]:
    """The distinct labels of `docs`, sorted: numerically when all are integers ("2" before "10"), else as text.

    Raises:
        DataSourceError: a document without a label, or fewer than two distinct labels.
    """
    unlabelled = [d.get("id") for d in docs if not d.get("label")]
    if unlabelled:
        raise DataSourceError(
            f"{len(unlabelled)} document(s) have no label (e.g. {unlabelled[:3]}): data.format "
            "classification needs a label per document (data.label_field)"
        )
    names = {d["label"] for d in docs}
    numeric = all(n.lstrip("-").isdigit() for n in names)
    ordered = sorted(names, key=int) if numeric else sorted(names)
    if len(ordered) < 2:
        raise DataSourceError(
            f"the documents have {len(ordered)} distinct label(s) {ordered}: a classifier needs at "
            "least two classes; check data.label_field"
        )
    return ordered


def tokenize_labelled(
    docs: list[dict[str, Any]], tokenizer, max_seq_len: int, label_ids: dict[str, int]
) -> list[dict[str, Any]]:
    """One example per document: {"input_ids", "attention_mask"} of its first `max_seq_len` tokens, "labels": id.

    Where the tokenizer starts its encodings with BOS (`tokens.leading_bos`), the example is BOS + the first
    `max_seq_len - 1` tokens of the text.
    """
    texts = [d["text"] for d in docs]
    lead = leading_bos(tokenizer)
    encoded = (
        tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_seq_len - len(lead))["input_ids"]
        if texts
        else []
    )
    return [
        {"input_ids": lead + ids, "attention_mask": [1] * (len(lead) + len(ids)), "labels": label_ids[d["label"]]}
        for d, ids in zip(docs, encoded)
        if ids
    ]


def _to_dataset(samples: list[dict[str, Any]]):
    import datasets

    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "attention_mask": datasets.List(datasets.Value("int8")),
            "labels": datasets.Value("int64"),
        }
    )
    columns = {k: [s[k] for s in samples] for k in ("input_ids", "attention_mask", "labels")}
    return datasets.Dataset.from_dict(columns, features=features)


def prepare_classification(
    cfg: DataConfig,
    tokenizer,
    docs: list[dict[str, Any]],
    train_docs: list[dict[str, Any]],
    validation_docs: list[dict[str, Any]],
) -> PreparedData:
    """Number the labels, tokenize both splits (already split by document) and record how (`split.json`).

    Raises:
        DataSourceError: unlabelled documents, fewer than two labels, or a split with no example.
    """
    labels = label_names(docs)
    label_ids = {name: i for i, name in enumerate(labels)}
    train = tokenize_labelled(train_docs, tokenizer, cfg.max_seq_len, label_ids)
    validation = tokenize_labelled(validation_docs, tokenizer, cfg.max_seq_len, label_ids)
    for name, samples, n_docs in (("train", train, len(train_docs)), ("validation", validation, len(validation_docs))):
        if not samples:
            raise DataSourceError(
                f"the {name} split ({n_docs} documents) gave no example: check that the texts "
                "(data.text_field) are not empty"
            )
    validation_total = len(validation)
    if cfg.max_validation_sequences is not None:
        validation = validation[: cfg.max_validation_sequences]  # the first ones: deterministic
    counts = {
        split: Counter(labels[s["labels"]] for s in samples)
        for split, samples in (("train", train), ("validation", validation))
    }
    unseen = [name for name in labels if not counts["train"][name]]
    if unseen:
        logger.warning("labels %s have no training example: the classifier cannot learn them", unseen)
    lengths = [len(s["input_ids"]) for s in train + validation]
    split = {
        **split_record(
            cfg,
            tokenizer,
            docs,
            train_docs,
            validation_docs,
            train=len(train),
            validation=len(validation),
            validation_before_cap=validation_total,
        ),
        "labels": labels,
        "label_counts": {split: {name: c[name] for name in labels} for split, c in counts.items()},
        "tokens": {
            "train": sum(len(s["input_ids"]) for s in train),
            "validation": sum(len(s["input_ids"]) for s in validation),
        },
        "truncated": sum(1 for n in lengths if n == cfg.max_seq_len),
        "prompts": 0,
    }
    logger.info(
        "data: %d train / %d held-out examples, %d classes %s", len(train), len(validation), len(labels), labels
    )
    return PreparedData(train=_to_dataset(train), validation=_to_dataset(validation), split=split)


def class_labels(prepared: PreparedData) -> list[str]:
    """Class names in id order, as the data stage recorded them.

    Raises:
        ValueError: the data was not prepared with data.format: classification.
    """
    labels = prepared.split.get("labels")
    if not labels:
        raise ValueError(
            f"the prepared data (format {prepared.split.get('format')!r}) has no labels: prepare it with "
            "data.format: classification"
        )
    return list(labels)


@dataclass
class ClassificationCollator:
    """Right-pad examples into a batch: input_ids (B, T) with the pad id, attention_mask (B, T), labels (B,).

    Args:
        pad_token_id: the id the model's config calls padding (`config.pad_token_id`): Llama-family classifiers
            find each row's last real token as the last one that is not this id.
    """

    pad_token_id: int

    def __post_init__(self) -> None:
        if not isinstance(self.pad_token_id, int) or isinstance(self.pad_token_id, bool):
            raise ValueError(
                f"pad_token_id must be an int, got {self.pad_token_id!r}; a tokenizer without a pad "
                "token can pass tokenizer.eos_token_id"
            )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of features")
        ids = [list(f["input_ids"]) for f in features]
        length = max(len(i) for i in ids)
        return {
            "input_ids": torch.tensor([i + [self.pad_token_id] * (length - len(i)) for i in ids], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids], dtype=torch.long),
            "labels": torch.tensor([int(f["labels"]) for f in features], dtype=torch.long),
        }
