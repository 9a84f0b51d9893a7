"""alambic.data.prompts: held-out prompts built from chat documents, saved with the prepared data, reloaded."""

from __future__ import annotations

import json

import pytest

from alambic.config import DataConfig
from alambic.data import load_prepared, prepare_datasets, save_prepared
from alambic.data.prompts import PROMPTS_FILE, build_prompts, read_prompts, write_prompts
from helpers import tiny_prepared, tiny_tokenizer


def _chat(doc_id, *turns):
    roles = ["user", "assistant"]
    return {"id": doc_id, "messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def test_one_prompt_per_conversation_ending_with_an_assistant_turn():
    system = {
        "id": "s",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ],
    }
    docs = [
        _chat("a", "Hi", "Hello!"),
        _chat("b", "Hi", "Hello!", "Who are you?"),  # ends with the user: nothing to score against
        _chat("c", "Q1", "A1", "Q2", "A2"),
        _chat("d", "Hi", "   "),  # blank reference
        {"id": "e", "messages": [{"role": "assistant", "content": "Unprompted."}]},  # nothing before it
        system,
    ]
    prompts = build_prompts(docs)
    assert prompts == [
        {"id": "a", "messages": [{"role": "user", "content": "Hi"}], "reference": "Hello!"},
        {"id": "c", "messages": docs[2]["messages"][:3], "reference": "A2"},
        {"id": "s", "messages": system["messages"][:2], "reference": "Hello."},
    ]
    prompts[0]["messages"][0]["content"] = "edited"
    assert docs[0]["messages"][0]["content"] == "Hi"  # the documents are not aliased
    assert [p["id"] for p in build_prompts(docs, limit=2)] == ["a", "c"]  # the first ones, in order
    assert build_prompts(docs, limit=10) == build_prompts(docs)


def test_build_prompts_errors():
    with pytest.raises(ValueError, match="limit = 0"):
        build_prompts([_chat("a", "Hi", "Hello")], limit=0)
    with pytest.raises(ValueError, match="document 'x' has no 'messages' list"):
        build_prompts([{"id": "x", "text": "plain text"}])


def test_write_and_read(tmp_path):
    prompts = build_prompts([_chat("a", "Ça va ?", "Très bien, merci.\nEt toi ?"), _chat("b", "1", "2")])
    write_prompts(prompts, tmp_path / "p.jsonl")
    assert "Très bien" in (tmp_path / "p.jsonl").read_text(encoding="utf-8")  # kept readable
    assert read_prompts(tmp_path / "p.jsonl") == prompts
    assert read_prompts(tmp_path / "missing.jsonl") == []
    (tmp_path / "bad.jsonl").write_text(json.dumps(prompts[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl, line 2: not JSON"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "short.jsonl").write_text(json.dumps({"id": "a", "messages": []}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: prompt without \['reference'\]"):
        read_prompts(tmp_path / "short.jsonl")


def test_chat_preparation_builds_prompts_from_held_out_documents_only(tmp_path):
    prepared = tiny_prepared(tmp_path, chat=True)  # 16 prompt/response rows, a quarter held out
    held_out = prepared.split["validation_document_ids"]
    assert len(held_out) == 4
    assert [p["id"] for p in prepared.prompts] == held_out  # held-out order, every one an answered prompt
    assert prepared.split["prompts"] == 4
    rows = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    for prompt in prepared.prompts:
        row = rows[int(prompt["id"].removeprefix("chat.jsonl:"))]  # source 'files' names rows "<file>:<index>"
        assert prompt["messages"] == [{"role": "user", "content": row["prompt"]}]
        assert prompt["reference"] == row["response"]

    folder = tmp_path / "run" / "data"
    save_prepared(prepared, folder)
    assert (folder / PROMPTS_FILE).exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["data"]  # written inside the atomic rename
    loaded = load_prepared(folder)
    assert loaded.prompts == prepared.prompts and loaded.split["prompts"] == 4


def test_prompts_are_capped_like_the_validation_sequences(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."}) + "\n" for i in range(40))
    )
    cfg = DataConfig(
        source="files",
        paths=[path],
        format="chat",
        max_seq_len=64,
        validation_fraction=0.25,
        max_validation_sequences=3,
    )
    prepared = prepare_datasets(cfg, tiny_tokenizer())
    assert [p["id"] for p in prepared.prompts] == prepared.split["validation_document_ids"][:3]
    assert prepared.split["prompts"] == 3 and len(prepared.split["validation_document_ids"]) == 10
    assert prepare_datasets(cfg, tiny_tokenizer()).prompts == prepared.prompts  # deterministic


def test_text_data_has_no_prompts_and_old_folders_load_with_none(tmp_path):
    prepared = tiny_prepared(tmp_path)
    assert prepared.prompts == [] and prepared.split["prompts"] == 0
    folder = tmp_path / "data"
    save_prepared(prepared, folder)
    assert load_prepared(folder).prompts == []
    (folder / PROMPTS_FILE).unlink()  # a folder prepared before prompts existed
    assert load_prepared(folder).prompts == []
