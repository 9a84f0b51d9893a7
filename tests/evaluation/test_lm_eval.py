"""Benchmarks through lm-evaluation-harness: the missing extra, lm-eval's metrics as recorded, alambic's local tasks
(from documents the run never trained on), and a local task run on tiny models through `simple_evaluate`."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from alambic.config import DataConfig, LmEvalConfig
from alambic.evaluation.datasets import document_key
from alambic.evaluation.lm_eval import require_lm_eval, run_lm_eval, task_metrics
from alambic.evaluation.local_tasks import (
    BBC_TOPICS,
    REPLY_CHOICES,
    held_out_documents,
    write_local_tasks,
)
from helpers import tiny_model, tiny_tokenizer

BBC = DataConfig(source="bbc_news")


def test_a_missing_extra_is_named_when_the_config_loads(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'alambic\[eval\]'"):
        LmEvalConfig(tasks=["alambic_bbc_topic"])


def test_a_missing_extra_is_named_when_the_stage_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(ImportError, match=r"alambic\[eval\]"):
        require_lm_eval()


def test_task_metrics_keeps_values_and_standard_errors_by_metric():
    raw = {
        "alias": "x",
        "acc,none": 0.5,
        "acc_stderr,none": 0.1,
        "acc_norm,none": 0.25,
        "acc_norm_stderr,none": "N/A",
        "exact_match,strict-match": 0.3,
        "exact_match_stderr,strict-match": 0.02,
        "sample_len": 8,
    }
    assert task_metrics(raw) == {
        "acc": {"value": 0.5, "stderr": 0.1},
        "acc_norm": {"value": 0.25, "stderr": None},
        "exact_match (strict-match)": {"value": 0.3, "stderr": 0.02},
    }


def test_the_bbc_task_of_a_bbc_run_holds_only_its_held_out_articles_and_no_training_text():
    from alambic.data import load_documents, split_documents

    docs = load_documents(BBC)
    train, held_out = split_documents(docs, BBC)
    keys = {document_key(d) for d in train}
    split = {"validation_document_ids": [d["id"] for d in held_out]}
    kept, record = held_out_documents("bbc_news", BBC, split, keys)
    assert {d["id"] for d in kept} <= set(split["validation_document_ids"])
    assert not any(document_key(d) in keys for d in kept)
    # BBC News holds duplicate articles: some held-out ones have a training twin under another name
    assert record["same_text_as_training"] > 0
    assert record["documents"] == len(held_out) - record["same_text_as_training"]
    other, whole = held_out_documents("bbc_news", DataConfig(source="hub", hub_name="x"), split, set())
    assert len(other) == len(docs) and whole["from"].startswith("the whole corpus")


def test_local_tasks_are_lm_eval_yaml_over_local_json(tmp_path):
    records = write_local_tasks(
        ["alambic_bbc_topic", "alambic_chatterbot_reply", "hellaswag"],
        tmp_path,
        data=DataConfig(source="hub", hub_name="x"),
        split={},
        training_keys=set(),
    )
    assert set(records) == {"alambic_bbc_topic", "alambic_chatterbot_reply"}  # a standard task is lm-eval's own
    spec = yaml.safe_load((tmp_path / "alambic_bbc_topic" / "alambic_bbc_topic.yaml").read_text())
    assert spec["output_type"] == "multiple_choice" and spec["doc_to_choice"] == list(BBC_TOPICS)
    rows = [json.loads(line) for line in Path(spec["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    assert len(rows) == records["alambic_bbc_topic"]["examples"] > 2000
    assert {r["label"] for r in rows[:20]} != {rows[0]["label"]}  # shuffled: `limit` takes a mix of topics
    assert all(len(r["text"].split()) <= 120 for r in rows)
    chat = [
        json.loads(line)
        for line in (tmp_path / "alambic_chatterbot_reply" / "alambic_chatterbot_reply.jsonl").read_text().splitlines()
    ]
    assert all(len(set(r["choices"])) == REPLY_CHOICES for r in chat)
    from alambic.data import load_documents

    replies = {}
    for d in load_documents(DataConfig(source="chatterbot", format="chat")):
        replies.setdefault(d["messages"][0]["content"], set()).add(d["messages"][1]["content"])
    assert len({r["question"] for r in chat}) == len(chat) == records["alambic_chatterbot_reply"]["examples"]
    for r in chat:  # the right reply, and no wrong choice that is another reply to the same question
        assert r["choices"][r["label"]] in replies[r["question"]]
        assert sum(c in replies[r["question"]] for c in r["choices"]) == 1


def test_a_local_task_runs_on_tiny_models_with_lm_eval_metrics(tmp_path, one_thread):
    write_local_tasks(
        ["alambic_bbc_topic"], tmp_path, data=DataConfig(source="hub", hub_name="x"), split={}, training_keys=set()
    )
    models = {"teacher": tiny_model(), "student_distilled": tiny_model(seed=1, num_layers=2)}
    out = run_lm_eval(
        models,
        {n: tiny_tokenizer() for n in models},
        LmEvalConfig(tasks=["alambic_bbc_topic"], limit=3, batch_size=4),
        include_path=[tmp_path],
    )
    assert out["tasks"]["alambic_bbc_topic"]["version"] == 1.0
    assert out["tasks"]["alambic_bbc_topic"]["samples"]["effective"] == 3
    assert out["lm_eval_version"] == __import__("lm_eval").__version__
    for name in models:
        acc = out["models"][name]["results"]["alambic_bbc_topic"]["acc"]
        assert acc["value"] in (0.0, 1 / 3, 2 / 3, 1.0) and acc["stderr"] is not None
        assert out["models"][name]["seconds"] > 0
