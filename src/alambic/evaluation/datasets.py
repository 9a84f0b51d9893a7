"""Extra held-out sets (`evaluation.datasets`): documents of any data source, prepared like the run's held-out split
and checked against its training documents, so that a student is also judged outside the domain it was distilled on.

Overlap is found by content, not by id: two sources (or two copies of one corpus) name the same document differently,
and BBC News itself holds duplicate articles under different file names. A document's key is the hash of its text
(a conversation's: its turns), whitespace-normalised.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

from alambic.config import ConfigError, DataConfig, HeldOutSetConfig
from alambic.data import load_documents, split_documents
from alambic.utils import sha256_of

MAX_LISTED = 5  # overlapping document ids named in a message or the report


def document_key(doc: dict[str, Any]) -> str:
    """Hash of a document's content: its text, or its conversation's (role, content) turns; runs of whitespace count
    as one space, so a copy re-wrapped or re-indented is still the same document."""
    if "messages" in doc:
        content = json.dumps([[m["role"], " ".join(m["content"].split())] for m in doc["messages"]])
    else:
        content = " ".join(doc["text"].split())
    return hashlib.sha256(content.encode()).hexdigest()


def training_documents(data: DataConfig, split: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The documents the data stage trained on: the same source, shuffle and split, made again.

    Args:
        split: the data stage's record (`split.json`); when given, the documents must be the ones it split.

    Raises:
        ConfigError: the source now gives other training documents than the data stage had (files changed since).
    """
    train, _ = split_documents(load_documents(data), data)
    recorded = (split or {}).get("train_ids_hash")
    if recorded is not None and sha256_of(sorted(d["id"] for d in train)) != recorded:
        raise ConfigError(
            f"data.source {data.source!r} now gives other training documents than the data stage split "
            "(split.json's train_ids_hash differs): the data changed since; run the data stage again "
            "(`alambic run`) before checking evaluation.datasets against it"
        )
    return train


@dataclass
class HeldOutSet:
    """One extra set, tokenized: `samples` for `evaluate_against_teacher`, and what was read and left out."""

    name: str
    samples: list[dict[str, list[int]]]
    record: dict[str, Any] = field(default_factory=dict)


def find_overlap(docs: list[dict[str, Any]], training_keys: set[str]) -> list[str]:
    """Ids of the documents of `docs` whose content is among `training_keys` (`document_key`s)."""
    return [d["id"] for d in docs if document_key(d) in training_keys]


def prepare_held_out_set(
    name: str, cfg: HeldOutSetConfig, tokenizer, *, training_keys: set[str], max_seq_len: int, teacher_tokenizer=None
) -> HeldOutSet:
    """Read, check and tokenize one extra set, exactly as the data stage tokenizes its held-out split.

    Documents are shuffled with `cfg.seed` before `cfg.max_sequences` caps the sequences, so a capped set is a sample
    of the whole source, not its first folder.

    Args:
        training_keys: `document_key` of every training document of the run.
        max_seq_len: data.max_seq_len, used where `cfg.max_seq_len` is not set.
        teacher_tokenizer: the teacher's, when `tokenizer` is the student's own (`data.cross`).

    Raises:
        ConfigError: documents shared with the training data and `cfg.overlap` is 'refuse', or nothing left to score.
    """
    from alambic.data.tokenize import tokenize_chat, tokenize_text

    data_cfg = cfg.data_config()
    docs = load_documents(data_cfg)
    random.Random(cfg.seed).shuffle(docs)
    shared = find_overlap(docs, training_keys)
    listed = ", ".join(shared[:MAX_LISTED]) + (
        f" and {len(shared) - MAX_LISTED} more" if len(shared) > MAX_LISTED else ""
    )
    if shared and cfg.overlap == "refuse":
        raise ConfigError(
            f"evaluation.datasets.{name}: {len(shared)} of its {len(docs)} documents are also training "
            f"documents of this run (same text): {listed}. A set the students trained on measures "
            f"nothing held out: set evaluation.datasets.{name}.overlap: drop (score it without them) or "
            "flag (score them, marked), or choose other documents"
        )
    if shared and cfg.overlap == "drop":
        dropped = set(shared)
        docs = [d for d in docs if d["id"] not in dropped]
    if not docs:
        raise ConfigError(
            f"evaluation.datasets.{name}: no document left once the {len(shared)} training documents "
            "were dropped; choose documents the run did not train on"
        )
    seq_len = cfg.max_seq_len or max_seq_len
    if teacher_tokenizer is not None:  # the students read their tokens, the teacher its own (data.cross)
        from alambic.data.cross import tokenize_chat_pair, tokenize_text_pair

        pair = tokenize_text_pair if cfg.format == "text" else tokenize_chat_pair
        samples = pair(docs, tokenizer, teacher_tokenizer, seq_len)
    else:
        samples = (tokenize_text if cfg.format == "text" else tokenize_chat)(docs, tokenizer, seq_len)
    before_cap = len(samples)
    if cfg.max_sequences is not None:
        samples = samples[: cfg.max_sequences]
    if not samples:
        raise ConfigError(
            f"evaluation.datasets.{name}: its {len(docs)} documents gave no sequence with a counted "
            "token" + (" (conversations need assistant turns within max_seq_len)" if cfg.format == "chat" else "")
        )
    record = {
        "source": cfg.source,
        "format": cfg.format,
        "documents": len(docs),
        "sequences": len(samples),
        "sequences_before_cap": before_cap,
        "max_seq_len": seq_len,
        "overlap": {"action": cfg.overlap, "documents": len(shared), "ids": shared[:MAX_LISTED]},
    }
    return HeldOutSet(name=name, samples=samples, record=record)
