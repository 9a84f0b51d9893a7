"""The prepared data of a run: train and held-out sets, the record of how they were made, and their folder.

Made by `data.prepare.prepare_datasets` (text, chat, cross-tokenizer pairs) or `data.classification`
(labelled examples); every later stage reads it back with `load_prepared`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alambic.data.prompts import PROMPTS_FILE, read_prompts, write_prompts
from alambic.utils import sha256_of


@dataclass
class PreparedData:
    """Tokenized train and held-out sets, and the record of how they were made."""

    train: Any  # datasets.Dataset with input_ids, attention_mask, labels
    validation: Any  # datasets.Dataset, same columns, capped to data.max_validation_sequences
    split: dict[str, Any] = field(default_factory=dict)
    # held-out chat prompts {"id", "messages", "reference"} (data.prompts); text data has none
    prompts: list[dict[str, Any]] = field(default_factory=list)


def split_record(
    cfg: Any,
    tokenizer: Any,
    docs: list,
    train_docs: list,
    validation_docs: list,
    *,
    train: int,
    validation: int,
    validation_before_cap: int,
) -> dict[str, Any]:
    """What every `split.json` records, whatever the data's format: how the documents were split (settings, counts,
    the held-out ids and both id sets' hashes), the sequences made and the tokenizer. Callers add their own keys."""
    train_ids = [d["id"] for d in train_docs]
    validation_ids = [d["id"] for d in validation_docs]
    return {
        "source": cfg.source,
        "format": cfg.format,
        "seed": cfg.seed,
        "validation_fraction": cfg.validation_fraction,
        "max_documents": cfg.max_documents,
        "documents": {"total": len(docs), "train": len(train_docs), "validation": len(validation_docs)},
        "validation_document_ids": validation_ids,
        "sequences": {"train": train, "validation": validation, "validation_before_cap": validation_before_cap},
        "tokenizer": getattr(tokenizer, "name_or_path", "") or "",
        "max_seq_len": cfg.max_seq_len,
        "train_ids_hash": sha256_of(sorted(train_ids)),
        "validation_ids_hash": sha256_of(sorted(validation_ids)),
    }


def save_prepared(prepared: PreparedData, folder: str | Path) -> None:
    """Write `folder/{train,validation}` (Arrow), `folder/split.json` and `folder/prompts.jsonl`.

    Written into a sibling temporary folder, then renamed into place: a reader sees the old data or the
    new, and a crash mid-write leaves no half-written folder that looks complete.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    prepared.train.save_to_disk(str(tmp / "train"))
    prepared.validation.save_to_disk(str(tmp / "validation"))
    (tmp / "split.json").write_text(json.dumps(prepared.split, indent=2) + "\n")
    write_prompts(prepared.prompts, tmp / PROMPTS_FILE)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def load_prepared(folder: str | Path) -> PreparedData:
    """Read what `save_prepared` wrote (a folder written before prompts existed loads with none).

    Raises:
        FileNotFoundError: the folder is not a complete prepared-data folder.
    """
    import datasets

    folder = Path(folder)
    missing = [n for n in ("train", "validation", "split.json") if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: not a prepared-data folder (missing {', '.join(missing)}); run `alambic run` or "
            "prepare_datasets + save_prepared first"
        )
    return PreparedData(
        train=datasets.load_from_disk(str(folder / "train")),
        validation=datasets.load_from_disk(str(folder / "validation")),
        split=json.loads((folder / "split.json").read_text()),
        prompts=read_prompts(folder / PROMPTS_FILE),
    )
