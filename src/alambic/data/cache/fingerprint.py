"""What a teacher cache is made from: its fingerprint (teacher, tokenizer, dataset, k, temperature), the
manifest's format, and the error a run gets when a cache does not match it."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from alambic.data.tokenize import IGNORE_INDEX
from alambic.utils import sha256_of

__all__ = ["CacheMismatchError", "cache_fingerprint", "dataset_fingerprint", "tokenizer_fingerprint"]

FORMAT = "alambic-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# What must match between a cache and the run that reads it, with the words the error uses.
_COMPATIBILITY = (
    ("format_version", "cache format version"),
    ("teacher", "teacher"),
    ("tokenizer", "tokenizer"),
    ("dataset", "dataset"),
    ("k", "k (ids kept per token)"),
    ("temperature", "temperature"),
)


class CacheMismatchError(ValueError):
    """A teacher cache made for other data, another tokenizer, teacher, k or temperature."""


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Size and hash of the (token, id) pairs: two tokenizers with the same ids for the same tokens agree."""
    vocab = tokenizer.get_vocab()
    return {"size": len(tokenizer), "vocab_sha256": sha256_of(sorted(vocab.items()))}


def _int_rows(dataset, column: str):
    """Rows of `column` as int64 numpy arrays, in order (batched for a `datasets.Dataset`)."""
    if hasattr(dataset, "iter") and hasattr(dataset, "column_names"):  # datasets.Dataset
        for batch in dataset.select_columns([column]).iter(batch_size=1024):
            for row in batch[column]:
                yield np.asarray(row, dtype=np.int64)
    else:
        for i in range(len(dataset)):
            yield np.asarray(dataset[i][column], dtype=np.int64)


def dataset_fingerprint(dataset) -> dict[str, Any]:
    """Number of sequences, of counted positions, and a hash of every sequence's input_ids and labels.

    Labels are hashed with the ids: they decide which positions count, hence the cache's rows.
    """
    digest = hashlib.sha256()
    sequences = counted = 0
    has_labels = "labels" in (getattr(dataset, "column_names", None) or dataset[0])
    labels_rows = _int_rows(dataset, "labels") if has_labels else None
    for ids in _int_rows(dataset, "input_ids"):
        labels = next(labels_rows) if labels_rows is not None else ids
        digest.update(np.int64(len(ids)).tobytes())
        digest.update(ids.tobytes())
        digest.update(labels.tobytes())
        sequences += 1
        counted += int((labels[1:] != IGNORE_INDEX).sum())
    return {"sequences": sequences, "counted_positions": counted, "sha256": digest.hexdigest()[:16]}


def cache_fingerprint(tokenizer, dataset, *, k: int, temperature: float, teacher_id: str) -> dict[str, Any]:
    """What a cache must have been made from to serve a run: compare with `TeacherCache.check_compatible`.

    Args:
        tokenizer: the teacher's tokenizer (the student's must equal it for logit distillation).
        dataset: the training sequences (input_ids, labels), in the order training indexes them.
        k: ids kept per token.
        temperature: the KD temperature the log-probs are taken at (the loss's `temperature`).
        teacher_id: names the teacher, e.g. its hub id or path and revision.
    """
    return {
        "format_version": FORMAT_VERSION,
        "teacher": str(teacher_id),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dataset": dataset_fingerprint(dataset),
        "k": int(k),
        "temperature": float(temperature),
    }
