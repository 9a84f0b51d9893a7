"""Data for a teacher whose tokenizer is not the student's: each text in both tokenizations, and where the two
models' predictions line up.

The student trains on its own tokens (`input_ids`, `labels` as usual). The teacher reads the same text in its own
tokens (`teacher_input_ids`; `teacher_labels`, its counted tokens, for its held-out perplexity). Two positions line
up when both models have read exactly the same text: a student token and a teacher token that END at the same
character (ends, not starts: tokenizers that trim a token's leading space from its offsets still agree on where it
ends). Both models then predict what follows that character, and a tokenizer-free loss (`losses.divergences.uld`)
compares their distributions there.

`teacher_positions[t]`, for each student label position t (the token predicted from position t - 1), is the
teacher position q lined up with t - 1, or -1 where the teacher has no token ending there.

Chat data: each model sees the conversation in its own chat template, so the two renderings differ outside the
messages; characters are matched inside each assistant turn, relative to where the turn's content starts (the same
text in both). Text data: documents are not packed together (each tokenizer would cut the stream elsewhere): each
document is cut into `max_seq_len` student tokens, and the teacher reads the same characters.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

from alambic.data.tokenize import IGNORE_INDEX, assistant_spans, labels_from_offsets
from alambic.tokens import leading_bos

logger = logging.getLogger(__name__)

CROSS_COLUMNS = ("teacher_input_ids", "teacher_labels", "teacher_positions")
_EOS = "eos"  # the key of an appended end-of-sequence token: it ends no character


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is not a fast tokenizer: lining up two "
            "tokenizers needs the character offsets of each token, which only fast (Rust) tokenizers give; load "
            "the model's tokenizer.json (use_fast=True)"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def line_up(student_keys: list[Hashable | None], teacher_keys: list[Hashable | None]) -> list[int]:
    """`teacher_positions` from each token's key (where its text ends; None: nowhere comparable).

    Where several tokens of one side end at the same key (a character split over several byte tokens), the last
    one is the one that has read the whole character.
    """
    teacher_at = {key: q for q, key in enumerate(teacher_keys) if key is not None}
    positions = [-1] * len(student_keys)
    for t in range(1, len(student_keys)):
        key = student_keys[t - 1]
        if key is not None and (t == len(student_keys) or student_keys[t] != key):
            positions[t] = teacher_at.get(key, -1)
    return positions


def _cut_teacher(sample: dict[str, list[int]], max_seq_len: int) -> dict[str, list[int]]:
    """The teacher's tokens up to the last one lined up (+ the token it predicts): the text the student read."""
    aligned = [q for q in sample["teacher_positions"] if q >= 0]
    end = max(aligned) + 2 if aligned else max_seq_len
    sample["teacher_input_ids"] = sample["teacher_input_ids"][:end]
    sample["teacher_labels"] = sample["teacher_labels"][:end]
    return sample


# ---------------------------------------------------------------- chat


def _span_keys(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[tuple[int, int] | None]:
    """(turn k, characters into turn k's content) where each token ends, None outside every assistant turn."""
    keys: list[tuple[int, int] | None] = []
    for _, end in offsets:
        keys.append(next(((k, end - s) for k, (s, e) in enumerate(spans) if s <= end <= e), None))
    return keys


def _chat_side(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int], list]:
    """One side's ids, labels and keys, behind a BOS where its tokenizer's convention asks for one (`leading_bos`):
    keyed None, it lines up with nothing (the two renderings differ outside the assistant turns)."""
    ids, offsets = _encode(tokenizer, text)
    lead = leading_bos(tokenizer, ids)
    return (
        lead + ids,
        [IGNORE_INDEX] * len(lead) + labels_from_offsets(ids, offsets, spans),
        [None] * len(lead) + _span_keys(offsets, spans),
    )


def tokenize_chat_pair(
    docs: list[dict[str, Any]], tokenizer, teacher_tokenizer, max_seq_len: int
) -> list[dict[str, list[int]]]:
    """`tokenize_chat` for the student, plus the teacher's rendering of each conversation and the lined-up
    positions. Conversations whose assistant turns either template rewrites are skipped."""
    for tok, who in ((tokenizer, "student"), (teacher_tokenizer, "teacher")):
        if not getattr(tok, "chat_template", None):
            raise ValueError(
                f"the {who}'s tokenizer {getattr(tok, 'name_or_path', '')!r} has no chat template: "
                "format chat needs one on both sides (or use data.format: text)"
            )
    samples, skipped = [], 0
    for doc in docs:
        try:
            text, spans = assistant_spans(doc["messages"], tokenizer)
            t_text, t_spans = assistant_spans(doc["messages"], teacher_tokenizer)
        except ValueError:
            skipped += 1
            continue
        ids, labels, keys = _chat_side(tokenizer, text, spans)
        t_ids, t_labels, t_keys = _chat_side(teacher_tokenizer, t_text, t_spans)
        labels = labels[:max_seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            continue
        sample = {
            "input_ids": ids[:max_seq_len],
            "attention_mask": [1] * len(labels),
            "labels": labels,
            "teacher_input_ids": t_ids,
            "teacher_labels": t_labels,
            "teacher_positions": line_up(keys[:max_seq_len], t_keys),
        }
        samples.append(_cut_teacher(sample, max_seq_len))
    if skipped:
        logger.warning("%d conversation(s) skipped: a chat template rewrites assistant content", skipped)
    return samples


# ---------------------------------------------------------------- text


def tokenize_text_pair(
    docs: list[dict[str, Any]], tokenizer, teacher_tokenizer, max_seq_len: int
) -> list[dict[str, list[int]]]:
    """Each document (+ eos) cut into `max_seq_len` student tokens; the teacher reads the same characters of each
    piece (+ its own eos where the piece ends the document). Every token counts, as in `tokenize_text`, but the BOS
    each side puts in front of every piece where its tokenizer's convention asks for one (`leading_bos`)."""
    eos, t_eos = tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    if eos is None or t_eos is None:
        raise ValueError("a tokenizer has no eos token: documents could not be separated; set tokenizer.eos_token")
    lead, t_lead = leading_bos(tokenizer), leading_bos(teacher_tokenizer)
    body = max_seq_len - len(lead)
    if body < 1:
        raise ValueError(f"data.max_seq_len = {max_seq_len} leaves no room for text after the BOS token: raise it")
    samples = []
    for doc in docs:
        text = doc["text"]
        ids, offsets = _encode(tokenizer, text)
        ids, keys = [*ids, eos], [end for _, end in offsets] + [_EOS]
        for a in range(0, len(ids), body):
            b = min(a + body, len(ids))
            first = offsets[a][0] if a < len(offsets) else len(text)
            last = offsets[b - 1][1] if b - 1 < len(offsets) else len(text)
            t_ids, t_offsets = _encode(teacher_tokenizer, text[first:last])
            t_keys: list[Hashable | None] = [first + end for _, end in t_offsets]
            if b == len(ids):  # this piece ends the document
                t_ids, t_keys = [*t_ids, t_eos], [*t_keys, _EOS]
            # A BOS has read nothing of the piece: the two BOS line up where both sides have one (a key no text token
            # has); a single one lines up with nothing.
            piece = ids[a:b]
            samples.append(
                {
                    "input_ids": lead + piece,
                    "attention_mask": [1] * (len(lead) + len(piece)),
                    "labels": [IGNORE_INDEX] * len(lead) + piece,
                    "teacher_input_ids": t_lead + t_ids,
                    "teacher_labels": [IGNORE_INDEX] * len(t_lead) + t_ids,
                    "teacher_positions": line_up(
                        [("bos", first)] * len(lead) + keys[a:b], [("bos", first)] * len(t_lead) + t_keys
                    ),
                }
            )
    return samples


def aligned_share(samples: list[dict[str, list[int]]]) -> float:
    """Share of the counted student tokens that have a teacher position lined up (the ULD loss's coverage)."""
    counted = aligned = 0
    for s in samples:
        for label, q in zip(s["labels"][1:], s["teacher_positions"][1:]):
            if label != IGNORE_INDEX:
                counted += 1
                aligned += q >= 0
    return aligned / max(counted, 1)
