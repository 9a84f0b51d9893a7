"""Documents -> training sequences: the held-out split, chunking, chat masking, and the collator.

The whole preparation of a run's data (load, split, tokenize by format, record) is `data.prepare`; the prepared
sets and their folder are `data.prepared`.

Conventions (those of Hugging Face causal LMs):
- `labels` are NOT shifted: `labels[t]` is the token at position t, and the model/trainer compares the
  logits at t - 1 with it. A label of -100 means "not counted": padding, prompts, chat scaffolding.
- The split is made on documents, before any chunking, so no held-out text is ever trained on.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

from alambic.config import DataConfig
from alambic.data.sources import DataSourceError
from alambic.tokens import end_of_turn_tokens, leading_bos

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ---------------------------------------------------------------- split


def split_documents(docs: list[dict[str, Any]], cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle with `cfg.seed`, keep `cfg.max_documents`, hold out `max(1, round(fraction * n))` documents.

    Returns:
        (train_docs, validation_docs): disjoint, deterministic for a given seed and document list.
    Raises:
        DataSourceError: fewer than two documents (nothing would be left to train on).
    """
    order = list(docs)
    random.Random(cfg.seed).shuffle(order)
    if cfg.max_documents is not None:
        order = order[: cfg.max_documents]
    n = len(order)
    if n < 2:
        raise DataSourceError(
            f"{n} document(s) after data.max_documents={cfg.max_documents}: need at least 2, one to train on "
            "and one to hold out"
        )
    held_out = min(n - 1, max(1, round(cfg.validation_fraction * n)))
    return order[held_out:], order[:held_out]


# ---------------------------------------------------------------- text format


def tokenize_text(docs: list[dict[str, Any]], tokenizer, max_seq_len: int) -> list[dict[str, list[int]]]:
    """Concatenate the documents, each followed by eos, and cut the stream into `max_seq_len` sequences.

    Where the tokenizer starts its encodings with BOS (`leading_bos`), each sequence is BOS + `max_seq_len - 1`
    tokens of the stream, the BOS not counted. The last partial chunk is dropped, unless it is the only one.
    Every other token counts (labels = input_ids).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: documents could not be separated; set tokenizer.eos_token")
    lead = leading_bos(tokenizer)
    body = max_seq_len - len(lead)
    if body < 1:
        raise ValueError(f"data.max_seq_len = {max_seq_len} leaves no room for text after the BOS token: raise it")
    texts = [d["text"] for d in docs]
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        stream.extend(ids)
        stream.append(eos)
    n_full = len(stream) // body
    bounds = [(i * body, (i + 1) * body) for i in range(n_full)]
    if not bounds and stream:
        bounds = [(0, len(stream))]  # shorter than one sequence: keep it rather than return nothing
    return [_sample(lead + stream[a:b], [IGNORE_INDEX] * len(lead) + stream[a:b]) for a, b in bounds]


def _sample(input_ids: list[int], labels: list[int]) -> dict[str, list[int]]:
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


# ---------------------------------------------------------------- chat format


def assistant_spans(messages: list[dict[str, str]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation with the chat template; find the characters the model must learn to produce.

    Each assistant turn counts from the start of its content to the end of its content, plus the
    end-of-turn token that follows it (`<|im_end|>` in ChatML). The content's start is found by
    rendering the conversation up to that turn with the generation prompt (exactly what the model sees
    at inference): role headers such as "<|im_start|>assistant\\n" are never counted.

    Returns:
        (rendered text, [(start, end) character spans], sorted, disjoint)
    Raises:
        ValueError: an assistant message's content cannot be found in the rendering.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    ends = end_of_turn_tokens(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = cursor
        if i > 0:
            try:
                prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - some templates reject partial conversations; search instead
                prompt = None
            # Templates that re-render earlier turns (e.g. stripping reasoning) break the prefix property.
            if prompt is not None and full.startswith(prompt) and len(prompt) >= cursor:
                start = len(prompt)
        content = message["content"]
        pos = full.find(content, start) if content else -1
        if pos < 0 and content.strip():
            content = content.strip()  # templates that strip content
            pos = full.find(content, start)
        if pos < 0:
            raise ValueError(f"assistant message {i} ({message['content'][:60]!r}) not found in the chat rendering")
        end = pos + len(content)
        rest = full[end:]
        stripped = rest.lstrip()
        for token in ends:
            if stripped.startswith(token):
                end += len(rest) - len(stripped) + len(token)
                break
        spans.append((pos, end))
        cursor = end
    return full, spans


def labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each token's label: its id where it overlaps a counted character span, else -100."""
    return [token if any(a < e and b > s for s, e in spans) else IGNORE_INDEX for token, (a, b) in zip(ids, offsets)]


def chat_ids_and_labels(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """A chat rendering's ids and labels (counted on `spans`), behind one BOS where the tokenizer's convention asks
    for it and the rendering has none (`leading_bos`; Gemma's template renders `<bos>` itself: never two)."""
    labeller = _labels_from_offsets if getattr(tokenizer, "is_fast", False) else _labels_from_segments
    ids, labels = labeller(tokenizer, text, spans)
    lead = leading_bos(tokenizer, ids)
    return lead + ids, [IGNORE_INDEX] * len(lead) + labels


def _labels_from_offsets(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], labels_from_offsets(enc["input_ids"], enc["offset_mapping"], spans)


def _labels_from_segments(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    # Tokenizers without offsets: tokenize counted and uncounted pieces apart (a piece boundary sits where
    # the generation prompt ends, exactly where the prompt stops at inference).
    ids: list[int] = []
    labels: list[int] = []
    cut = 0
    for s, e in [*spans, (len(text), len(text))]:
        for piece, counted in ((text[cut:s], False), (text[s:e], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids.extend(piece_ids)
                labels.extend(piece_ids if counted else [IGNORE_INDEX] * len(piece_ids))
        cut = e
    return ids, labels


def tokenize_chat(docs: list[dict[str, Any]], tokenizer, max_seq_len: int) -> list[dict[str, list[int]]]:
    """Render each conversation with the tokenizer's chat template; count only the assistant turns.

    Labels are -100 everywhere except on assistant contents and their end-of-turn tokens. The rendering
    carries its own special tokens (role markers, bos in some templates); BOS is added in front only where the
    tokenizer's convention asks for it and the rendering has none (`chat_ids_and_labels`). Sequences are
    truncated to `max_seq_len`; a conversation with no counted token left is dropped.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: format chat needs one "
            "(use an instruct model's tokenizer, or data.format: text)"
        )
    samples, unmatched, empty = [], 0, 0
    for doc in docs:
        try:
            text, spans = assistant_spans(doc["messages"], tokenizer)
        except ValueError as exc:
            unmatched += 1
            logger.debug("skipping %s: %s", doc.get("id"), exc)
            continue
        ids, labels = chat_ids_and_labels(tokenizer, text, spans)
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            empty += 1
            continue
        samples.append(_sample(ids, labels))
    if unmatched:
        logger.warning("%d conversation(s) skipped: the chat template rewrites assistant content", unmatched)
    if empty:
        logger.info("%d conversation(s) dropped: no assistant token within %d tokens", empty, max_seq_len)
    return samples


# ---------------------------------------------------------------- collator


@dataclass
class DistillationCollator:
    """Right-pad a list of features into a batch: input_ids (pad id), attention_mask (0), labels (-100).

    Args:
        pad_token_id: the tokenizer's pad id; when the tokenizer has none, pass its eos id (padding is
            masked out by attention_mask and labels, so the id itself is never learned).
        pad_to_multiple_of: round the padded length up to a multiple (e.g. 8 for tensor cores).
        prompt_lengths: also return `prompt_length` (B,): each row's `last_turn_start`, the tokens of its prompt
            (chat data; on-policy distillation answers these prompts).
        teacher_pad_token_id: the teacher's pad id, for data made for a teacher with another tokenizer
            (`data.cross`): its columns are padded too, into teacher_input_ids / teacher_attention_mask (pad id, 0),
            teacher_labels (-100) and teacher_positions (-1). None: those columns are dropped if present.
        padding_free: no padding at all (`training.packing: padding_free`): the sequences are laid end to end in one
            row, (1, sum of lengths), with `position_ids` restarting at 0 for each and no attention_mask, from which
            transformers builds a mask that keeps each sequence to itself (sdpa / eager: a block-causal mask; flash
            attention: variable-length kernels). Each sequence's first label becomes -100 (it would be predicted from
            the previous sequence's last token).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    prompt_lengths: bool = False
    teacher_pad_token_id: int | None = None
    padding_free: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pad_token_id, int) or isinstance(self.pad_token_id, bool):
            raise ValueError(
                f"pad_token_id must be an int, got {self.pad_token_id!r}; a tokenizer without a pad token "
                "can pass tokenizer.eos_token_id"
            )
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {self.pad_to_multiple_of}")
        if self.padding_free and (self.prompt_lengths or self.teacher_pad_token_id is not None):
            raise ValueError(
                "padding_free lays a batch's sequences in one row: on-policy prompts (prompt_lengths) "
                "and a teacher with another tokenizer (teacher_pad_token_id) need one row per sequence"
            )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of features")
        ids = [_as_list(f["input_ids"]) for f in features]
        masks = [
            _as_list(f["attention_mask"]) if "attention_mask" in f else [1] * len(i) for f, i in zip(features, ids)
        ]
        labels = [_as_list(f["labels"]) if "labels" in f else list(i) for f, i in zip(features, ids)]
        if self.padding_free:
            return {
                "input_ids": torch.tensor([[t for i in ids for t in i]], dtype=torch.long),
                "labels": torch.tensor([[t for lab in labels for t in (IGNORE_INDEX, *lab[1:])]], dtype=torch.long),
                "position_ids": torch.tensor([[p for i in ids for p in range(len(i))]], dtype=torch.long),
            }
        batch = {
            "input_ids": self._pad(ids, self.pad_token_id),
            "attention_mask": self._pad(masks, 0),
            "labels": self._pad(labels, IGNORE_INDEX),
        }
        if self.teacher_pad_token_id is not None:
            # one entry per student token, padded like the labels
            batch["teacher_positions"] = self._pad([_as_list(f["teacher_positions"]) for f in features], -1)
            t_ids = [_as_list(f["teacher_input_ids"]) for f in features]
            batch["teacher_input_ids"] = self._pad(t_ids, self.teacher_pad_token_id)
            batch["teacher_attention_mask"] = self._pad([[1] * len(i) for i in t_ids], 0)
            batch["teacher_labels"] = self._pad([_as_list(f["teacher_labels"]) for f in features], IGNORE_INDEX)
        if self.prompt_lengths:
            batch["prompt_length"] = [last_turn_start(lab) for lab in labels]
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}

    def _pad(self, rows: list[list[int]], value: int) -> list[list[int]]:
        """Right-pad to the longest row, rounded up to `pad_to_multiple_of`."""
        length = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return [r + [value] * (length - len(r)) for r in rows]


def last_turn_start(labels: list[int]) -> int:
    """Where a chat sequence's last counted turn starts: the first position of its last run of counted labels.

    `tokenize_chat` counts each assistant turn's content and end-of-turn token, and never the role header before
    it, so everything before that run is the conversation up to the last assistant turn, generation prompt
    included: the prompt the model answers at inference (a turn cut by max_seq_len still starts there). Text
    data counts every token: it gives 0, no prompt.

    Raises:
        ValueError: no label is counted.
    """
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    if end == 0:
        raise ValueError(
            "a sequence with no counted label has no last turn: tokenize_chat drops such sequences; "
            "check the dataset was made by prepare_datasets"
        )
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def _as_list(x: Any) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)
