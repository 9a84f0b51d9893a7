"""Extra held-out sets: read, checked against the training documents (by content), tokenized like the held-out split
and scored for every model with intervals."""

import json
import random

import numpy as np
import pytest

from alambic.config import ConfigError, DataConfig, HeldOutSetConfig
from alambic.data import load_documents
from alambic.data.tokenize import tokenize_text
from alambic.evaluation.datasets import (
    document_key,
    prepare_held_out_set,
    training_documents,
)
from alambic.evaluation.quality import evaluate_against_teacher
from alambic.evaluation.suite import held_out_set_scores
from helpers import tiny_model, tiny_tokenizer, write_text_corpus

OTHER = [
    "Hello, how are you? I am fine, thank you.",
    "What is your name? My name is Ada.",
    "Do you like music? Yes, I like jazz and old songs.",
    "Where do you live? In a small town by the sea.",
]


@pytest.fixture
def corpus(tmp_path):
    """A run's data section over 24 distinct news documents, and its training documents' keys."""
    folder = write_text_corpus(tmp_path / "news")
    for i, path in enumerate(sorted(folder.iterdir())):
        path.write_text(f"Story {i}. {path.read_text()}")
    data = DataConfig(source="files", paths=[folder], max_seq_len=16, validation_fraction=0.2)
    return data, {document_key(d) for d in training_documents(data)}


def _dialogue_set(tmp_path, extra_rows=(), **kw):
    path = tmp_path / "dialogue.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*OTHER * 3, *extra_rows]))
    return HeldOutSetConfig(source="files", paths=[path], **kw)


def test_document_key_is_the_content_whitespace_normalised():
    assert document_key({"id": "a", "text": "Markets  rallied\non Monday."}) == document_key(
        {"id": "b", "text": " Markets rallied on Monday. "}
    )
    assert document_key({"id": "a", "text": "Markets rallied."}) != document_key({"id": "a", "text": "Markets fell."})
    chat = {"id": "c", "messages": [{"role": "user", "content": "hi  there"}, {"role": "assistant", "content": "hi"}]}
    swapped = {"id": "c", "messages": [{"role": "assistant", "content": "hi there"}, {"role": "user", "content": "hi"}]}
    assert document_key(chat) != document_key(swapped)


def test_a_set_sharing_training_documents_is_refused_by_name(tmp_path, corpus):
    data, keys = corpus
    train = training_documents(data)
    # the same text as a training document, re-wrapped, under another name
    cfg = _dialogue_set(tmp_path, extra_rows=["  " + train[0]["text"].replace(" ", "\n", 2)])
    with pytest.raises(ConfigError) as err:
        prepare_held_out_set("dialogue", cfg, tiny_tokenizer(), training_keys=keys, max_seq_len=16)
    message = str(err.value)
    assert "evaluation.datasets.dialogue" in message and "1 of its 13 documents" in message
    assert "dialogue.jsonl:12" in message and "overlap: drop" in message


def test_overlap_drop_leaves_them_out_and_flag_keeps_them_marked(tmp_path, corpus):
    data, keys = corpus
    shared = training_documents(data)[0]["text"]
    dropped = prepare_held_out_set(
        "d", _dialogue_set(tmp_path, [shared], overlap="drop"), tiny_tokenizer(), training_keys=keys, max_seq_len=16
    )
    flagged = prepare_held_out_set(
        "d", _dialogue_set(tmp_path, [shared], overlap="flag"), tiny_tokenizer(), training_keys=keys, max_seq_len=16
    )
    assert dropped.record["overlap"] == {"action": "drop", "documents": 1, "ids": ["dialogue.jsonl:12"]}
    assert dropped.record["documents"] == 12 and flagged.record["documents"] == 13
    assert flagged.record["overlap"]["action"] == "flag" and flagged.record["overlap"]["documents"] == 1
    assert sum(len(s["input_ids"]) for s in flagged.samples) > sum(len(s["input_ids"]) for s in dropped.samples)


def test_the_run_held_out_documents_are_not_overlap(tmp_path, corpus):
    """The run's own source as an extra set: only its training documents overlap, not its held-out ones."""
    data, keys = corpus
    cfg = HeldOutSetConfig(source="files", paths=data.paths, overlap="drop")
    held = prepare_held_out_set("news", cfg, tiny_tokenizer(), training_keys=keys, max_seq_len=16)
    assert held.record["documents"] == 5 and held.record["overlap"]["documents"] == 19  # 20 % of 24 held out


def test_a_set_is_tokenized_like_the_held_out_split_after_a_seeded_shuffle(tmp_path, corpus):
    _, keys = corpus
    cfg = _dialogue_set(tmp_path, max_sequences=3, seed=5)
    held = prepare_held_out_set("d", cfg, tiny_tokenizer(), training_keys=keys, max_seq_len=16)
    again = prepare_held_out_set("d", cfg, tiny_tokenizer(), training_keys=keys, max_seq_len=16)
    assert held.samples == again.samples and len(held.samples) == 3
    assert held.record["sequences_before_cap"] > 3 and held.record["max_seq_len"] == 16
    docs = load_documents(cfg.data_config())
    random.Random(5).shuffle(docs)
    assert held.samples == tokenize_text(docs, tiny_tokenizer(), 16)[:3]


def test_training_documents_must_be_those_the_data_stage_split(tmp_path, corpus):
    data, _ = corpus
    with pytest.raises(ConfigError, match="train_ids_hash"):
        training_documents(data, {"train_ids_hash": "0" * 64})


def test_an_extra_set_is_scored_for_every_model_with_intervals(tmp_path, corpus, one_thread):
    _, keys = corpus
    tok = tiny_tokenizer()
    held = prepare_held_out_set("dialogue", _dialogue_set(tmp_path), tok, training_keys=keys, max_seq_len=16)
    teacher = tiny_model()
    students = {
        "student_before": tiny_model(seed=1, num_layers=2),
        "student_distilled": tiny_model(seed=2),
        "student_ce_control": tiny_model(seed=3, num_layers=2),
    }
    out = held_out_set_scores(teacher, students, [held], pad_token_id=tok.pad_token_id, batch_size=4)["dialogue"]
    assert set(out["models"]) == {"teacher", *students}
    direct = evaluate_against_teacher(teacher, students, held.samples, pad_token_id=tok.pad_token_id, batch_size=4)
    for name, m in out["models"].items():
        assert m["perplexity"] == pytest.approx(direct[name]["perplexity"])
        for metric in ("perplexity", "top1_agreement", "top5_agreement", "kl_to_teacher"):
            low, high = m["intervals"][metric]
            assert low <= m[metric] + 1e-9 and m[metric] <= high + 1e-9
        if name != "teacher":
            assert m["intervals"]["perplexity"][0] < m["intervals"]["perplexity"][1]
            assert out["retention"][name]["perplexity"] == pytest.approx(
                out["models"]["teacher"]["perplexity"] / m["perplexity"]
            )
    assert out["retention"]["teacher"]["perplexity"] == 1.0 and out["source"] == "files" and out["seconds"] > 0
    assert np.isfinite(out["models"]["student_before"]["kl_to_teacher"])


def test_set_names_and_sources_are_checked_when_the_config_loads(tmp_path):
    from alambic.config import EvaluationConfig

    with pytest.raises(ValueError, match="validation"):
        EvaluationConfig(datasets={"validation": {"source": "chatterbot", "format": "chat"}})
    with pytest.raises(ValueError, match="data.format: chat"):
        HeldOutSetConfig(source="chatterbot")
    with pytest.raises(ValueError, match="not found"):
        HeldOutSetConfig(source="files", paths=[tmp_path / "nowhere.txt"])
