"""Data for a teacher with another tokenizer: both tokenizations of each text and the positions that line up."""

import pytest

from alambic.data import DistillationCollator
from alambic.data.cross import aligned_share, line_up, tokenize_chat_pair, tokenize_text_pair
from helpers import NEWS, other_tokenizer, tiny_tokenizer


def _read_up_to(tokenizer, ids, position) -> str:
    """The text a model has read after `position` (inclusive), spaces dropped (Metaspace and byte-level differ)."""
    return "".join(tokenizer.decode(ids[: position + 1], skip_special_tokens=True).split())


def test_line_up_pairs_positions_whose_tokens_end_at_the_same_character():
    # student tokens end at 2, 5, 5 (a character split in two), 9; the teacher's at 5 and 9
    positions = line_up([2, 5, 5, 9], [5, 9])
    # label 1 is predicted after "..2": no teacher token ends there; label 2 after the first half of a character: no;
    # label 3 after "..5" (the whole character): teacher position 0
    assert positions == [-1, -1, -1, 0]
    assert line_up([None, 3], [3]) == [-1, -1]


def test_text_pairs_line_up_where_both_models_have_read_the_same_text():
    student, teacher = tiny_tokenizer(), other_tokenizer()
    docs = [{"id": str(i), "text": " ".join(NEWS[i : i + 2])} for i in range(4)]
    samples = tokenize_text_pair(docs, student, teacher, max_seq_len=12)
    assert all(len(s["input_ids"]) <= 12 and s["labels"] == s["input_ids"] for s in samples)
    checked = 0
    for s in samples:
        assert len(s["teacher_positions"]) == len(s["input_ids"]) and s["teacher_positions"][0] == -1
        for t, q in enumerate(s["teacher_positions"]):
            if q >= 0:
                # both pieces start at the same character
                assert _read_up_to(student, s["input_ids"], t - 1) == _read_up_to(teacher, s["teacher_input_ids"], q)
                checked += 1
    assert checked > 50
    assert 0.4 < aligned_share(samples) < 1
    # a document's last piece ends with each model's own end of sequence, and the two line up there
    last = samples[-1]
    assert last["input_ids"][-1] == student.eos_token_id and last["teacher_input_ids"][-1] == teacher.eos_token_id


def test_chat_pairs_render_each_template_and_line_up_inside_the_assistant_turns():
    student, teacher = tiny_tokenizer(), other_tokenizer()
    messages = [
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I am fine, thank you."},
    ]
    [s] = tokenize_chat_pair([{"messages": messages}], student, teacher, max_seq_len=64)
    assert teacher.decode(s["teacher_input_ids"]).startswith("<|user|>")
    counted = [t for t, label in enumerate(s["labels"]) if label != -100]
    assert student.decode([s["labels"][t] for t in counted]) == "I am fine, thank you.<|im_end|>"
    assert teacher.decode([x for x in s["teacher_labels"] if x != -100]).replace("▁", " ").strip() == (
        "I am fine, thank you.</s>"
    )
    aligned = {t: s["teacher_positions"][t] for t in counted if s["teacher_positions"][t] >= 0}
    # the first answer token is predicted from the end of each role header: both have read exactly the prompt
    first = counted[0]
    assert aligned[first] == s["teacher_labels"].index(next(x for x in s["teacher_labels"] if x != -100)) - 1
    # the end of turn (<|im_end|> and </s>) is predicted after the same full stop
    assert teacher.convert_ids_to_tokens(s["teacher_input_ids"][aligned[counted[-1]]]) == "."
    assert all(s["teacher_positions"][t] == -1 for t in range(len(s["labels"])) if s["labels"][t] == -100)


def test_chat_needs_a_template_on_both_sides_and_offsets():
    student, teacher = tiny_tokenizer(), other_tokenizer()
    teacher.chat_template = None
    with pytest.raises(ValueError, match="teacher's tokenizer .* no chat template"):
        tokenize_chat_pair([{"messages": [{"role": "user", "content": "x"}]}], student, teacher, 16)


def test_the_collator_pads_the_teachers_columns_with_its_own_values():
    student, teacher = tiny_tokenizer(), other_tokenizer()
    docs = [{"id": "a", "text": NEWS[0]}, {"id": "b", "text": NEWS[1][:20]}]
    samples = tokenize_text_pair(docs, student, teacher, max_seq_len=64)
    batch = DistillationCollator(student.pad_token_id, teacher_pad_token_id=teacher.pad_token_id)(samples)
    assert batch["teacher_positions"].shape == batch["input_ids"].shape
    assert batch["teacher_input_ids"].shape == batch["teacher_labels"].shape == batch["teacher_attention_mask"].shape
    short = len(samples[1]["teacher_input_ids"])
    assert (batch["teacher_input_ids"][1, short:] == teacher.pad_token_id).all()
    assert (batch["teacher_labels"][1, short:] == -100).all() and batch["teacher_attention_mask"][1, short:].sum() == 0
    assert (batch["teacher_positions"][1, len(samples[1]["input_ids"]) :] == -1).all()
    # without the teacher's pad id (the CE control), the columns are not batched
    assert set(DistillationCollator(student.pad_token_id)(samples)) == {"input_ids", "attention_mask", "labels"}
