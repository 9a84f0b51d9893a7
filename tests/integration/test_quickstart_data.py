"""The quickstart's data as SmolLM2 prepares it, pinned: SmolLM2's tokenizer adds no BOS, so following each
tokenizer's BOS convention (`tokens.leading_bos`) must leave its sequences byte-identical."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from alambic.config import DataConfig
from alambic.data import prepare_datasets
from alambic.tokens import leading_bos

pytestmark = pytest.mark.integration

QUICKSTART = Path(__file__).parents[2] / "src" / "alambic" / "configs" / "quickstart.yaml"
# sha256 of the train / validation columns, computed with the code before BOS was followed (commit e4f260f)
PINNED = {
    "train": "9772a6b7cbf7000b6c9b6d37b8cc726f8a3ba93415bd7d0e63bd92cdeeb7798a",
    "validation": "ed9059f1850f5410f050250ff0dc85832a142c89a1753d7584fac7f9da538b3c",
}


def _digest(dataset) -> str:
    h = hashlib.sha256()
    for column in ("input_ids", "attention_mask", "labels"):
        h.update(json.dumps([list(row) for row in dataset[column]]).encode())
    return h.hexdigest()


def test_smollm2_quickstart_sequences_are_unchanged(tokenizer):
    assert leading_bos(tokenizer) == []
    cfg = DataConfig(**yaml.safe_load(QUICKSTART.read_text())["data"])
    prepared = prepare_datasets(cfg, tokenizer)
    assert (len(prepared.train), len(prepared.validation)) == (4243, 64)
    assert {"train": _digest(prepared.train), "validation": _digest(prepared.validation)} == PINNED
