"""alambic.data.tokenize: document-level split, chunking, chat masking, preparation, saving, collation."""

from __future__ import annotations

import json

import pytest
import torch

from alambic.config import DataConfig
from alambic.data import (
    DataSourceError,
    DistillationCollator,
    load_prepared,
    prepare_datasets,
    save_prepared,
    split_documents,
)
from alambic.data.tokenize import (
    IGNORE_INDEX,
    _labels_from_offsets,
    _labels_from_segments,
    assistant_spans,
    tokenize_chat,
    tokenize_text,
)
from helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _docs(n):
    return [
        {"id": f"d{i}", "text": f"Document {i}: the quick brown fox jumps over the lazy dog {i} times."}
        for i in range(n)
    ]


def _counted_runs(ids, labels):
    """Contiguous runs of counted tokens, as lists of ids."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "a counted label must be the token itself (labels are not shifted)"
            current.append(token)
    return runs + ([current] if current else [])


# ---------------------------------------------------------------- split


def test_split_is_by_document_disjoint_and_seeded():
    docs = _docs(50)
    cfg = DataConfig(validation_fraction=0.1, seed=3)
    train, val = split_documents(docs, cfg)
    assert len(val) == 5 and len(train) == 45
    assert {d["id"] for d in train}.isdisjoint(d["id"] for d in val)
    assert {d["id"] for d in train} | {d["id"] for d in val} == {d["id"] for d in docs}
    assert split_documents(docs, cfg) == (train, val)
    assert split_documents(docs, DataConfig(validation_fraction=0.1, seed=4))[1] != val


def test_split_max_documents_and_minimum_hold_out():
    train, val = split_documents(_docs(50), DataConfig(max_documents=10, validation_fraction=0.01))
    assert len(train) + len(val) == 10 and len(val) == 1
    with pytest.raises(DataSourceError, match="at least 2"):
        split_documents(_docs(1), DataConfig())


# ---------------------------------------------------------------- text


def test_text_chunks_are_exactly_max_seq_len_and_fully_counted(tok):
    docs = _docs(20)
    samples = tokenize_text(docs, tok, max_seq_len=16)
    assert len(samples) > 5
    assert all(len(s["input_ids"]) == 16 for s in samples)
    assert all(s["labels"] == s["input_ids"] and s["attention_mask"] == [1] * 16 for s in samples)
    # the chunks are the document stream, each document followed by eos, partial tail dropped
    stream = []
    for d in docs:
        stream += tok(d["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert sum((s["input_ids"] for s in samples), []) == stream[: len(samples) * 16]
    assert len(stream) - len(samples) * 16 < 16


def test_text_shorter_than_one_sequence_is_kept(tok):
    samples = tokenize_text([{"id": "a", "text": "Hello"}], tok, max_seq_len=64)
    assert len(samples) == 1 and samples[0]["input_ids"][-1] == tok.eos_token_id
    assert len(samples[0]["input_ids"]) < 64


# ---------------------------------------------------------------- chat masking

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": "I am fine, thank you."}],
    [
        {"role": "system", "content": "You are a news bot."},
        {"role": "user", "content": "What happened?"},
        {"role": "assistant", "content": "Markets rallied."},
        {"role": "user", "content": "And sport?"},
        {"role": "assistant", "content": "The team won the cup final."},
    ],
    # contents that also occur inside the role headers must not be found there
    [
        {"role": "user", "content": "Say a word."},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "assistant"},
        {"role": "assistant", "content": "assistant"},
    ],
]


# SmolLM2's template: a default system prompt that itself contains the word "assistant".
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3-like: headers closed by a special token, content trimmed, no newline after the end token.
TRIMMING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}<|endoftext|>\n\n{{ m['content'] | trim }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant<|endoftext|>\n\n{% endif %}"
)


@pytest.mark.parametrize("template", ["chatml", "smollm2", "trimming"])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_counts_exactly_assistant_content_and_end_token(messages, template):
    tok = tiny_tokenizer()
    if template != "chatml":
        tok.chat_template = SMOLLM2_TEMPLATE if template == "smollm2" else TRIMMING_TEMPLATE
        messages = [{**m, "content": f" {m['content']}  "} if template == "trimming" else m for m in messages]
    (sample,) = tokenize_chat([{"id": "c", "messages": messages}], tok, max_seq_len=512)
    runs = [tok.decode(r, skip_special_tokens=False) for r in _counted_runs(sample["input_ids"], sample["labels"])]
    assert runs == [m["content"].strip() + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    uncounted = tok.decode(
        [t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab == IGNORE_INDEX], skip_special_tokens=False
    )
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"].strip() in uncounted
    assert "<|im_start|>assistant" in uncounted  # the header is prompt, not target
    # the sequence is the template's rendering, token for token
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(sample["input_ids"], skip_special_tokens=False) == rendered


def test_segment_fallback_agrees_with_offsets(tok):
    for messages in CONVERSATIONS:
        text, spans = assistant_spans(messages, tok)
        ids_o, labels_o = _labels_from_offsets(tok, text, spans)
        ids_s, labels_s = _labels_from_segments(tok, text, spans)
        assert ids_o == ids_s and labels_o == labels_s


def test_chat_truncation_and_dropping(tok):
    long_prompt = [{"role": "user", "content": "The quick brown fox. " * 40}, {"role": "assistant", "content": "Yes."}]
    no_answer = [{"role": "user", "content": "Hi"}]
    short = CONVERSATIONS[1]
    samples = tokenize_chat([{"id": i, "messages": m} for i, m in enumerate([long_prompt, no_answer, short])], tok, 52)
    # 52 tokens cut the first answer of `short` in half; the long prompt leaves no assistant token
    # within them, and the second conversation has none at all
    assert len(samples) == 1
    (s,) = samples
    assert len(s["input_ids"]) == len(s["labels"]) == len(s["attention_mask"]) == 52
    full = tokenize_chat([{"id": 0, "messages": short}], tok, 512)[0]
    assert s["input_ids"] == full["input_ids"][:52] and s["labels"] == full["labels"][:52]
    counted = sum(label != IGNORE_INDEX for label in s["labels"])
    assert 0 < counted < sum(label != IGNORE_INDEX for label in full["labels"])


def test_chat_needs_a_template(tok):
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_chat([{"id": 0, "messages": CONVERSATIONS[0]}], bare, 32)


# ---------------------------------------------------------------- prepare, save, load


def _write_text_corpus(tmp_path, n=40):
    folder = tmp_path / "texts"
    folder.mkdir()
    for d in _docs(n):
        (folder / f"{d['id']}.txt").write_text(d["text"])
    return folder


def test_prepare_text_keeps_held_out_documents_out_of_training(tmp_path, tok):
    folder = _write_text_corpus(tmp_path)
    cfg = DataConfig(
        source="files", paths=[folder], max_seq_len=16, validation_fraction=0.2, max_validation_sequences=3, seed=1
    )
    prepared = prepare_datasets(cfg, tok)
    split = prepared.split
    assert split["documents"] == {"total": 40, "train": 32, "validation": 8}
    assert len(split["validation_document_ids"]) == 8
    assert len(prepared.validation) == 3 == split["sequences"]["validation"]
    assert split["sequences"]["validation_before_cap"] > 3
    assert split["sequences"]["train"] == len(prepared.train)
    assert split["counted_tokens"]["train"] == 16 * len(prepared.train)
    assert split["max_seq_len"] == 16 and split["source"] == "files" and split["format"] == "text"
    assert all(len(row) == 16 for row in prepared.train["input_ids"])
    train_text = tok.decode(sum(prepared.train["input_ids"], []), skip_special_tokens=False)
    for doc_id in split["validation_document_ids"]:
        number = doc_id.removeprefix("texts/d").removesuffix(".txt")
        assert f"Document {number}:" not in train_text
    again = prepare_datasets(cfg, tok)
    assert again.split == split and again.train["input_ids"] == prepared.train["input_ids"]


def test_prepare_chat_and_round_trip(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": CONVERSATIONS[i % 2]} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source="files", paths=[path], format="chat", max_seq_len=64, validation_fraction=0.2)
    prepared = prepare_datasets(cfg, tok)
    assert prepared.split["documents"]["validation"] == 2 and len(prepared.train) == 8
    assert prepared.split["validation_document_ids"][0].startswith("chat.jsonl:")
    counted = sum(sum(1 for x in row if x != IGNORE_INDEX) for row in prepared.train["labels"])
    assert counted == prepared.split["counted_tokens"]["train"] > 0

    folder = tmp_path / "run" / "data"
    save_prepared(prepared, folder)
    save_prepared(prepared, folder)  # overwriting an existing folder works too
    assert sorted(p.name for p in folder.parent.iterdir()) == ["data"]  # no temporary folder left
    loaded = load_prepared(folder)
    assert loaded.split == prepared.split
    assert loaded.train.to_dict() == prepared.train.to_dict()
    assert loaded.validation.to_dict() == prepared.validation.to_dict()
    with pytest.raises(FileNotFoundError, match="split.json"):
        load_prepared(tmp_path)


def test_prepare_fails_clearly_when_nothing_counts(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": "The quick brown fox. " * 30, "response": "ok"}) + "\n" for _ in range(4))
    )
    with pytest.raises(DataSourceError, match="no sequence with a counted token"):
        prepare_datasets(DataConfig(source="files", paths=[path], format="chat", max_seq_len=8), tok)


# ---------------------------------------------------------------- collator


def test_collator_right_pads():
    collate = DistillationCollator(pad_token_id=3)
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": torch.tensor([8]), "attention_mask": torch.tensor([1]), "labels": torch.tensor([8])},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_pad_to_multiple_and_defaults():
    batch = DistillationCollator(pad_token_id=0, pad_to_multiple_of=8)([{"input_ids": [4, 5, 6]}])
    assert batch["input_ids"].shape == (1, 8)
    assert batch["attention_mask"].tolist() == [[1, 1, 1] + [0] * 5]
    assert batch["labels"].tolist() == [[4, 5, 6] + [-100] * 5]


def test_collator_rejects_missing_pad_id():
    with pytest.raises(ValueError, match="eos_token_id"):
        DistillationCollator(pad_token_id=None)


def test_collator_padding_free_lays_the_sequences_end_to_end():
    features = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = DistillationCollator(pad_token_id=0, padding_free=True)(features)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: transformers reads positions
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # each sequence's first token is never predicted (from the previous sequence's last token)
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    with pytest.raises(ValueError, match="one row per sequence"):
        DistillationCollator(pad_token_id=0, padding_free=True, prompt_lengths=True)
