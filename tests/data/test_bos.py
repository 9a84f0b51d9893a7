"""Every prepared sequence follows its tokenizer's BOS convention (`tokens.leading_bos`).

A tokenizer that starts its encodings with BOS (Gemma, Llama 3, Mistral) gets exactly one BOS in front of every
sequence, never counted in the labels: text chunks, chat (once, whether or not the template renders it), generation
prompts, teacher responses, both sides of cross-tokenizer pairs, classification examples, and what reads the
prepared split (calibration, the offline cache, on-policy prompts). A tokenizer that does not (SmolLM2) gets none.
"""

from __future__ import annotations

import pytest
import torch

from alambic.config import DataConfig
from alambic.data import DistillationCollator, prepare_datasets
from alambic.data.tokenize import IGNORE_INDEX, tokenize_chat, tokenize_text
from helpers import NEWS, bos_tokenizer, other_tokenizer, tiny_model, tiny_tokenizer, write_text_corpus

BOS = bos_tokenizer().bos_token_id
CHAT = [{"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": "I am fine, thank you."}]


def _docs(n: int) -> list[dict[str, str]]:
    return [{"id": f"d{i}", "text": " ".join(NEWS[(i + j) % len(NEWS)] for j in range(2))} for i in range(n)]


def _starts_with_one_bos(ids, labels=None) -> bool:
    return ids[0] == BOS and ids[1] != BOS and (labels is None or labels[0] == IGNORE_INDEX)


def test_leading_bos_follows_the_tokenizers_own_encoding():
    from alambic.tokens import leading_bos

    assert leading_bos(bos_tokenizer()) == [BOS]
    assert leading_bos(bos_tokenizer(), [BOS, 5]) == []  # already there: never two
    assert leading_bos(tiny_tokenizer()) == []  # SmolLM2's convention: no BOS
    assert leading_bos(other_tokenizer()) == []  # has a bos token, but does not add it


def test_text_chunks_start_with_one_uncounted_bos_and_keep_their_length():
    tok = bos_tokenizer()
    samples = tokenize_text(_docs(6), tok, max_seq_len=16)
    assert len(samples) > 3 and all(len(s["input_ids"]) == 16 for s in samples)
    assert all(_starts_with_one_bos(s["input_ids"], s["labels"]) for s in samples)
    assert all(s["labels"][1:] == s["input_ids"][1:] for s in samples)  # every other token counts
    # no text token lost or repeated between chunks: the chunks without their BOS are the stream
    stream = [
        t
        for ids in tok([d["text"] for d in _docs(6)], add_special_tokens=False)["input_ids"]
        for t in (*ids, tok.eos_token_id)
    ]
    body = [t for s in samples for t in s["input_ids"][1:]]
    assert body == stream[: len(body)] and len(stream) - len(body) < 15


def test_text_chunks_without_bos_are_the_stream_cut_as_before():
    tok = tiny_tokenizer()
    samples = tokenize_text(_docs(6), tok, max_seq_len=16)
    stream = [
        t
        for ids in tok([d["text"] for d in _docs(6)], add_special_tokens=False)["input_ids"]
        for t in (*ids, tok.eos_token_id)
    ]
    assert [s["input_ids"] for s in samples] == [stream[i : i + 16] for i in range(0, len(stream) - 15, 16)]
    assert all(s["labels"] == s["input_ids"] for s in samples)


@pytest.mark.parametrize("renders", [False, True], ids=["template-without-bos", "template-renders-bos"])
def test_chat_sequences_get_exactly_one_uncounted_bos(renders):
    [sample] = tokenize_chat([{"id": "c", "messages": CHAT}], bos_tokenizer(template_renders_bos=renders), 128)
    assert _starts_with_one_bos(sample["input_ids"], sample["labels"])
    assert sample["input_ids"].count(BOS) == 1
    [plain] = tokenize_chat([{"id": "c", "messages": CHAT}], tiny_tokenizer(), 128)
    assert sample["input_ids"][1:] == plain["input_ids"] and sample["labels"][1:] == plain["labels"]


@pytest.mark.parametrize("renders", [False, True], ids=["template-without-bos", "template-renders-bos"])
def test_generation_prompts_start_with_exactly_one_bos(renders):
    from alambic.decoding import encode_prompts

    [prompt] = encode_prompts(bos_tokenizer(template_renders_bos=renders), [CHAT[:1]])
    assert _starts_with_one_bos(prompt)
    assert encode_prompts(tiny_tokenizer(), [CHAT[:1]])[0] == prompt[1:]


def test_generated_responses_are_answers_to_a_bos_prompt():
    from alambic.decoding import generate_responses

    # the tiny model answers what it is given; its prompt tokens are recorded: BOS + the rendered prompt
    [result] = generate_responses(
        tiny_model(), bos_tokenizer(), [CHAT[:1]], max_new_tokens=2, with_tokens=True, show_progress=False
    )
    assert (
        result["prompt_tokens"]
        == len(
            bos_tokenizer().apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        + 1
    )


def test_teacher_response_sequences_start_with_one_uncounted_bos():
    from alambic.data.generate import tokenize_responses

    [sample] = tokenize_responses([{"id": "c", "messages": CHAT}], bos_tokenizer(), 128)
    assert _starts_with_one_bos(sample["input_ids"], sample["labels"])


def _read(tokenizer, ids, position) -> str:
    return "".join(tokenizer.decode(ids[: position + 1], skip_special_tokens=True).split())


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_cross_pairs_follow_each_sides_convention_and_still_line_up(side):
    from alambic.data.cross import tokenize_text_pair

    with_bos, without = bos_tokenizer(), other_tokenizer()
    student, teacher = (without, with_bos) if side == "teacher" else (with_bos, without)
    samples = tokenize_text_pair(_docs(4), student, teacher, max_seq_len=12)
    for s in samples:
        assert len(s["input_ids"]) <= 12 and len(s["teacher_positions"]) == len(s["input_ids"])
        ids, labels = (
            (s["teacher_input_ids"], s["teacher_labels"]) if side == "teacher" else (s["input_ids"], s["labels"])
        )
        other = s["input_ids"] if side == "teacher" else s["teacher_input_ids"]
        assert _starts_with_one_bos(ids, labels) and BOS not in other[:1]
    checked = 0
    for s in samples:
        for t, q in enumerate(s["teacher_positions"]):
            if q >= 0 and t > 0:
                assert _read(student, s["input_ids"], t - 1) == _read(teacher, s["teacher_input_ids"], q)
                checked += 1
    assert checked > 40


def test_cross_chat_pairs_put_bos_on_the_side_that_uses_it():
    from alambic.data.cross import tokenize_chat_pair

    [s] = tokenize_chat_pair([{"messages": CHAT}], other_tokenizer(), bos_tokenizer(), max_seq_len=64)
    assert _starts_with_one_bos(s["teacher_input_ids"], s["teacher_labels"])
    assert s["teacher_positions"][0] == -1 and BOS not in s["input_ids"]


def test_classification_examples_start_with_bos_within_max_seq_len():
    from alambic.data.classification import tokenize_labelled

    docs = [{"id": "a", "text": NEWS[0], "label": "x"}, {"id": "b", "text": NEWS[1], "label": "y"}]
    examples = tokenize_labelled(docs, bos_tokenizer(), 8, {"x": 0, "y": 1})
    assert all(_starts_with_one_bos(e["input_ids"]) and len(e["input_ids"]) == 8 for e in examples)
    plain = tokenize_labelled(docs, tiny_tokenizer(), 8, {"x": 0, "y": 1})
    assert [e["input_ids"][1:] for e in examples] == [p["input_ids"][:7] for p in plain]


@pytest.fixture(scope="module")
def prepared_text(tmp_path_factory):
    cfg = DataConfig(
        source="files",
        paths=[write_text_corpus(tmp_path_factory.mktemp("corpus"))],
        max_seq_len=16,
        validation_fraction=0.2,
    )
    return prepare_datasets(cfg, bos_tokenizer())


def test_prepared_splits_and_calibration_batches_start_with_bos(prepared_text):
    from alambic.students.importance import calibration_batches

    for split in (prepared_text.train, prepared_text.validation):
        assert all(_starts_with_one_bos(row["input_ids"], row["labels"]) for row in split)
    [batch] = calibration_batches(prepared_text.train, num_sequences=4, batch_size=4, pad_token_id=3)
    assert batch["input_ids"][:, 0].tolist() == [BOS] * 4 and batch["labels"][:, 0].tolist() == [IGNORE_INDEX] * 4


def test_offline_cache_scores_the_first_token_after_bos(prepared_text, tmp_path):
    from alambic.data.cache import TeacherCache, cache_fingerprint, write_teacher_cache

    teacher, rows = tiny_model(), [prepared_text.train[i] for i in range(3)]
    fp = cache_fingerprint(bos_tokenizer(), rows, k=4, temperature=1.0, teacher_id="tiny")
    write_teacher_cache(
        teacher,
        rows,
        tmp_path / "cache",
        k=4,
        temperature=1.0,
        fingerprint=fp,
        dtype="float32",
        batch_size=3,
        sequences_per_shard=5,
        progress=False,
    )
    with torch.no_grad():  # what the teacher predicts from BOS alone: the first text token's distribution
        after_bos = torch.log_softmax(teacher(input_ids=torch.tensor([[BOS]])).logits[0, 0].double(), -1).topk(4)
    assert torch.equal(TeacherCache(tmp_path / "cache")[0]["ids"][0], after_bos.indices)


def test_on_policy_prompts_cut_from_chat_data_start_with_bos(tmp_path):
    import json

    from alambic.training.on_policy import batch_prompts

    path = tmp_path / "chat.jsonl"
    path.write_text(
        "\n".join(json.dumps({"prompt": NEWS[i % 6][:30], "response": NEWS[(i + 1) % 6]}) for i in range(8))
    )
    cfg = DataConfig(source="files", format="chat", paths=[path], max_seq_len=64, validation_fraction=0.25)
    prepared = prepare_datasets(cfg, bos_tokenizer())
    batch = DistillationCollator(3, prompt_lengths=True)([prepared.train[i] for i in range(3)])
    assert all(_starts_with_one_bos(prompt) for prompt in batch_prompts(batch))
