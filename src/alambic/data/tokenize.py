"""Documents -> training sequences: the held-out split, chunking, chat masking, saving, and the collator.

Conventions (those of Hugging Face causal LMs):
- `labels` are NOT shifted: `labels[t]` is the token at position t, and the model/trainer compares the
  logits at t - 1 with it. A label of -100 means "not counted": padding, prompts, chat scaffolding.
- The split is made on documents, before any chunking, so no held-out text is ever trained on.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alambic.config import DataConfig
from alambic.data.prompts import PROMPTS_FILE, build_prompts, read_prompts, write_prompts
from alambic.data.sources import DataSourceError, load_documents
from alambic.utils import sha256_of

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Special tokens that close a turn, which the model must learn to emit (ChatML <|im_end|>, Llama 3
# <|eot_id|>, Gemma <end_of_turn>, </s>...). Start-of-turn tokens do not match.
_END_OF_TURN = re.compile(r"end|eot|eos|</s>", re.IGNORECASE)


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


# ---------------------------------------------------------------- BOS convention


def leading_bos(tokenizer, ids: list[int] | tuple[int, ...] = ()) -> list[int]:
    """The tokens to put in front of `ids` so the sequence starts as the tokenizer's own encoding does.

    `[bos_token_id]` where the tokenizer starts every encoded text with BOS (Gemma, Llama 3, Mistral: their models
    are badly off without it, a Gemma 3 perplexity of 658 instead of 30 on news text) and `ids` do not start with
    it already (a chat template that renders BOS itself); `[]` otherwise (SmolLM2, GPT-2: no BOS). Every place that
    makes a sequence from pieces encoded with `add_special_tokens=False` calls this, so each model sees sequences
    that start as in its own training; the BOS is never counted in the labels.

    Decided from what the tokenizer does, not from a flag: encoding "x" with and without its special tokens.
    """
    bos = tokenizer.bos_token_id
    if bos is None or (len(ids) > 0 and ids[0] == bos):
        return []
    with_special = tokenizer("x")["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    adds = len(with_special) > len(without) and with_special[0] == bos and without[:1] != [bos]
    return [bos] if adds else []


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


def _end_of_turn_tokens(tokenizer) -> list[str]:
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    ends = {t for t in special if _END_OF_TURN.search(t)}
    if tokenizer.eos_token:
        ends.add(tokenizer.eos_token)
    return sorted(ends, key=len, reverse=True)


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
    ends = _end_of_turn_tokens(tokenizer)
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


# ---------------------------------------------------------------- whole preparation


@dataclass
class PreparedData:
    """Tokenized train and held-out sets, and the record of how they were made."""

    train: Any  # datasets.Dataset with input_ids, attention_mask, labels
    validation: Any  # datasets.Dataset, same columns, capped to data.max_validation_sequences
    split: dict[str, Any] = field(default_factory=dict)
    # held-out chat prompts {"id", "messages", "reference"} (data.prompts); text data has none
    prompts: list[dict[str, Any]] = field(default_factory=list)


def _counted(samples: list[dict[str, list[int]]]) -> int:
    return sum(sum(1 for label in s["labels"] if label != IGNORE_INDEX) for s in samples)


def _to_dataset(samples: list[dict[str, list[int]]]):
    import datasets

    from alambic.data.cross import CROSS_COLUMNS

    ids = datasets.List(datasets.Value("int32"))
    features = {"input_ids": ids, "attention_mask": datasets.List(datasets.Value("int8")), "labels": ids}
    if samples and "teacher_input_ids" in samples[0]:  # a teacher with another tokenizer: see data.cross
        features.update({name: ids for name in CROSS_COLUMNS})
    columns = {k: [s[k] for s in samples] for k in features}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def prepare_datasets(cfg: DataConfig, tokenizer, teacher_tokenizer=None) -> PreparedData:
    """Load, split (by document), tokenize and record the data of a run.

    `teacher_tokenizer`: the teacher's, when it is not `tokenizer` (the student's): each sequence then also
    carries the teacher's tokens and the positions where the two line up (`data.cross`).

    Raises:
        DataSourceError: no documents, or a split with no sequence to train or evaluate on.
    """
    docs = load_documents(cfg)
    train_docs, validation_docs = split_documents(docs, cfg)
    if cfg.format == "classification":  # one labelled example per document: see data.classification
        from alambic.data.classification import prepare_classification

        return prepare_classification(cfg, tokenizer, docs, train_docs, validation_docs)
    if teacher_tokenizer is not None:
        from alambic.data.cross import tokenize_chat_pair, tokenize_text_pair

        pair = tokenize_text_pair if cfg.format == "text" else tokenize_chat_pair

        def tokenize(d, tok, n):
            return pair(d, tok, teacher_tokenizer, n)
    else:
        tokenize = tokenize_text if cfg.format == "text" else tokenize_chat
    train = tokenize(train_docs, tokenizer, cfg.max_seq_len)
    validation = tokenize(validation_docs, tokenizer, cfg.max_seq_len)
    for name, samples, n_docs in (("train", train, len(train_docs)), ("validation", validation, len(validation_docs))):
        if not samples:
            hint = (
                "raise data.max_seq_len or check that the conversations have assistant turns"
                if cfg.format == "chat" else "check that the documents are not empty"
            )
            raise DataSourceError(
                f"the {name} split ({n_docs} documents) gave no sequence with a counted token: {hint}"
            )
    validation_total = len(validation)
    if cfg.max_validation_sequences is not None:
        validation = validation[: cfg.max_validation_sequences]  # the first ones: deterministic
    prompts = build_prompts(validation_docs, limit=cfg.max_validation_sequences) if cfg.format == "chat" else []
    train_ids = [d["id"] for d in train_docs]
    validation_ids = [d["id"] for d in validation_docs]
    split = {
        "source": cfg.source,
        "format": cfg.format,
        "seed": cfg.seed,
        "validation_fraction": cfg.validation_fraction,
        "max_documents": cfg.max_documents,
        "documents": {"total": len(docs), "train": len(train_docs), "validation": len(validation_docs)},
        "validation_document_ids": validation_ids,
        "sequences": {"train": len(train), "validation": len(validation), "validation_before_cap": validation_total},
        "counted_tokens": {"train": _counted(train), "validation": _counted(validation)},
        "prompts": len(prompts),
        "tokenizer": getattr(tokenizer, "name_or_path", "") or "",
        **(_cross_record(teacher_tokenizer, train, validation) if teacher_tokenizer is not None else {}),
        "max_seq_len": cfg.max_seq_len,
        "train_ids_hash": sha256_of(sorted(train_ids)),
        "validation_ids_hash": sha256_of(sorted(validation_ids)),
    }
    logger.info(
        "data: %d train / %d held-out documents -> %d / %d sequences, %d / %d counted tokens",
        len(train_docs), len(validation_docs), len(train), len(validation),
        split["counted_tokens"]["train"], split["counted_tokens"]["validation"],
    )
    return PreparedData(train=_to_dataset(train), validation=_to_dataset(validation), split=split, prompts=prompts)


def _cross_record(teacher_tokenizer, train, validation) -> dict[str, Any]:
    from alambic.data.cross import aligned_share

    return {"teacher_tokenizer": getattr(teacher_tokenizer, "name_or_path", "") or "",
            "aligned_share": {"train": aligned_share(train), "validation": aligned_share(validation)}}


def save_prepared(prepared: PreparedData, folder: str | Path) -> None:
    """Write `folder/{train,validation}` (Arrow), `folder/split.json` and `folder/prompts.jsonl`.

    Written into a sibling temporary folder, then renamed into place: a reader sees the old data or the
    new, and a crash mid-write leaves no half-written folder that looks complete.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    prepared.train.save_to_disk(str(tmp / "train"))
    prepared.validation.save_to_disk(str(tmp / "validation"))
    (tmp / "split.json").write_text(json.dumps(prepared.split, indent=2) + "\n")
    write_prompts(prepared.prompts, tmp / PROMPTS_FILE)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def load_prepared(folder: str | Path) -> PreparedData:
    """Read what `save_prepared` wrote (a folder written before prompts existed loads with none).

    Raises:
        FileNotFoundError: the folder is not a complete prepared-data folder.
    """
    import datasets

    folder = Path(folder)
    missing = [n for n in ("train", "validation", "split.json") if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: not a prepared-data folder (missing {', '.join(missing)}); run `alambic run` or "
            "prepare_datasets + save_prepared first"
        )
    return PreparedData(
        train=datasets.load_from_disk(str(folder / "train")),
        validation=datasets.load_from_disk(str(folder / "validation")),
        split=json.loads((folder / "split.json").read_text()),
        prompts=read_prompts(folder / PROMPTS_FILE),
    )


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
            raise ValueError("padding_free lays a batch's sequences in one row: on-policy prompts (prompt_lengths) and a "
                             "teacher with another tokenizer (teacher_pad_token_id) need one row per sequence")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of features")
        ids = [_as_list(f["input_ids"]) for f in features]
        masks = [_as_list(f["attention_mask"]) if "attention_mask" in f else [1] * len(i)
                 for f, i in zip(features, ids)]
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
        raise ValueError("a sequence with no counted label has no last turn: tokenize_chat drops such sequences; "
                         "check the dataset was made by prepare_datasets")
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def _as_list(x: Any) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)
