"""A run's data from its config: load the documents, split them by document, tokenize by format, record.

Dispatches by `data.format` and teacher: text and chat (`data.tokenize`), a teacher with another tokenizer
(`data.cross`), labelled examples (`data.classification`). The result is a `data.prepared.PreparedData`.
"""

from __future__ import annotations

import logging
from typing import Any

from alambic.config import DataConfig
from alambic.data.classification import prepare_classification
from alambic.data.cross import CROSS_COLUMNS, aligned_share, tokenize_chat_pair, tokenize_text_pair
from alambic.data.prepared import PreparedData, split_record
from alambic.data.prompts import build_prompts
from alambic.data.sources import DataSourceError, load_documents
from alambic.data.tokenize import IGNORE_INDEX, split_documents, tokenize_chat, tokenize_text

logger = logging.getLogger(__name__)


def _counted(samples: list[dict[str, list[int]]]) -> int:
    return sum(sum(1 for label in s["labels"] if label != IGNORE_INDEX) for s in samples)


def _to_dataset(samples: list[dict[str, list[int]]]):
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    features = {"input_ids": ids, "attention_mask": datasets.List(datasets.Value("int8")), "labels": ids}
    if samples and "teacher_input_ids" in samples[0]:  # a teacher with another tokenizer: see data.cross
        features.update({name: ids for name in CROSS_COLUMNS})
    columns = {k: [s[k] for s in samples] for k in features}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def prepare_datasets(cfg: DataConfig, tokenizer, teacher_tokenizer=None) -> PreparedData:
    """Load, split (by document), tokenize and record the data of a run.

    `teacher_tokenizer`: the teacher's, when it is not `tokenizer` (the student's): each sequence then also
    carries the teacher's tokens and the positions where the two line up (`data.cross`).

    Raises:
        DataSourceError: no documents, or a split with no sequence to train or evaluate on.
    """
    docs = load_documents(cfg)
    train_docs, validation_docs = split_documents(docs, cfg)
    if cfg.format == "classification":  # one labelled example per document: see data.classification
        return prepare_classification(cfg, tokenizer, docs, train_docs, validation_docs)
    if teacher_tokenizer is not None:
        pair = tokenize_text_pair if cfg.format == "text" else tokenize_chat_pair

        def tokenize(d, tok, n):
            return pair(d, tok, teacher_tokenizer, n)
    else:
        tokenize = tokenize_text if cfg.format == "text" else tokenize_chat
    train = tokenize(train_docs, tokenizer, cfg.max_seq_len)
    validation = tokenize(validation_docs, tokenizer, cfg.max_seq_len)
    for name, samples, n_docs in (("train", train, len(train_docs)), ("validation", validation, len(validation_docs))):
        if not samples:
            hint = (
                "raise data.max_seq_len or check that the conversations have assistant turns"
                if cfg.format == "chat"
                else "check that the documents are not empty"
            )
            raise DataSourceError(
                f"the {name} split ({n_docs} documents) gave no sequence with a counted token: {hint}"
            )
    validation_total = len(validation)
    if cfg.max_validation_sequences is not None:
        validation = validation[: cfg.max_validation_sequences]  # the first ones: deterministic
    prompts = build_prompts(validation_docs, limit=cfg.max_validation_sequences) if cfg.format == "chat" else []
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
        "counted_tokens": {"train": _counted(train), "validation": _counted(validation)},
        "prompts": len(prompts),
        **(_cross_record(teacher_tokenizer, train, validation) if teacher_tokenizer is not None else {}),
    }
    logger.info(
        "data: %d train / %d held-out documents -> %d / %d sequences, %d / %d counted tokens",
        len(train_docs),
        len(validation_docs),
        len(train),
        len(validation),
        split["counted_tokens"]["train"],
        split["counted_tokens"]["validation"],
    )
    return PreparedData(train=_to_dataset(train), validation=_to_dataset(validation), split=split, prompts=prompts)


def _cross_record(teacher_tokenizer, train, validation) -> dict[str, Any]:
    return {
        "teacher_tokenizer": getattr(teacher_tokenizer, "name_or_path", "") or "",
        "aligned_share": {"train": aligned_share(train), "validation": aligned_share(validation)},
    }
