"""Teacher responses to the training prompts, for response (sequence-level) distillation.

The teacher answers every training conversation's prompt (the messages before its last assistant turn,
`data.prompts.build_prompts`); distill then trains on (prompt, teacher response) instead of the corpus
answer, counting the response tokens only (Kim & Rush 2016, "Sequence-Level Knowledge Distillation").

Files, in `<run>/generations/`:
  generations.jsonl  one record per (prompt, sample): prompt id and messages, response, finish_reason,
                     token counts, degenerate flags, teacher id and sampling settings
  train/             the tokenized (prompt, response) conversations distill trains on (Arrow)
  summary.json       counts (prompts, responses, flagged, kept, tokens, tokens/s), written last

Resume: responses are appended and flushed one batch at a time. A run that stops (crash, Ctrl-C) keeps
every finished batch; the next run reads them back, ignores a torn last line, and answers only what is
missing. Work is cut into batches the same way every time (longest prompts first, fixed batch size) and each
batch samples with its own seed, so a resumed run writes the same responses as one that never stopped.
Records made with other settings, another teacher or another prompt text are discarded, never mixed in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alambic import distributed
from alambic.config import DataConfig, TeacherResponsesConfig
from alambic.data.prepare import _to_dataset
from alambic.data.prompts import build_prompts
from alambic.data.sources import DataSourceError, load_documents
from alambic.data.tokenize import (
    IGNORE_INDEX,
    _sample,
    assistant_spans,
    chat_ids_and_labels,
    split_documents,
)
from alambic.layout import SUMMARY_FILE
from alambic.utils import atomic_write_json, atomic_write_text, console, sha256_of

logger = logging.getLogger(__name__)

GENERATIONS_FILE, TRAIN_DIR = "generations.jsonl", "train"
FLAGS = ("empty", "length", "repetition")
# What makes two records interchangeable: the same answer distribution for the same prompt.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")


# ---------------------------------------------------------------- prompts


def training_prompts(cfg: DataConfig, split: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The prompts of the training conversations: `build_prompts` on the training side of the data split.

    The documents are read and split again exactly as the data stage did (same config, same seed); `split`
    (the data stage's `split.json`) is checked against them, so prompts never come from held-out documents.

    Returns:
        [{"id", "messages", "reference"}], at most `cfg.teacher_responses.max_prompts` of them.
    Raises:
        DataSourceError: the documents changed since the data stage, or no training conversation gives a prompt.
    """
    train_docs, _ = split_documents(load_documents(cfg), cfg)
    if split is not None and split.get("train_ids_hash") not in (None, sha256_of(sorted(d["id"] for d in train_docs))):
        raise DataSourceError(
            "the training documents differ from those the data stage split (split.json): the "
            "source changed since; run again with --restart to prepare the data anew"
        )
    limit = cfg.teacher_responses.max_prompts if cfg.teacher_responses is not None else None
    prompts = build_prompts(train_docs, limit=limit)
    if not prompts:
        raise DataSourceError(
            f"none of the {len(train_docs)} training conversations ends with an assistant turn "
            "after another message: there is no prompt for the teacher to answer"
        )
    return prompts


# ---------------------------------------------------------------- degenerate responses


def repeated_ngram_share(tokens: Sequence[Any], n: int) -> float:
    """Share of the n-grams of `tokens` that repeat an earlier one: 1 - distinct / total, in [0, 1).

    A repetition loop ("the cat the cat the cat ...") scores near 1, ordinary text near 0; fewer than
    n + 1 tokens (at most one n-gram) score 0.
    """
    if n < 1:
        raise ValueError(f"repeated_ngram_share: n = {n} must be >= 1")
    total = len(tokens) - n + 1
    if total <= 1:
        return 0.0
    distinct = {tuple(tokens[i : i + n]) for i in range(total)}
    return 1.0 - len(distinct) / total


def degenerate_flags(
    response: str, token_ids: Sequence[int], finish_reason: str, *, ngram: int, threshold: float
) -> list[str]:
    """Why a response is not fit to train on: "empty" (blank text), "length" (cut at max_new_tokens, so it
    never ends), "repetition" (`repeated_ngram_share(token_ids, ngram) > threshold`). [] when none applies."""
    flags = []
    if not response.strip():
        flags.append("empty")
    if finish_reason == "length":
        flags.append("length")
    if repeated_ngram_share(list(token_ids), ngram) > threshold:
        flags.append("repetition")
    return flags


# ---------------------------------------------------------------- the generations file


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """The records of a generations file; a torn last line (a write cut off) is ignored, a missing file gives [].

    Raises:
        ValueError: a line other than the last is not a JSON record (the file was edited or is not ours).
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the last write was cut off
                logger.warning("%s: ignoring a torn last line (%d characters)", path, len(line))
                continue
            raise ValueError(f"{path}, line {number}: not a JSON record; delete the file to generate anew") from None
    return records


def _drop_torn_tail(path: Path) -> None:
    """Cut the file after its last newline, so the next append starts a line of its own."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)


def _batch_seed(seed: int, batch: int) -> int:
    # Each batch its own generator: a resumed run redraws exactly what an uninterrupted one would have.
    return int(sha256_of(["generate", seed, batch]), 16) % (2**63)


def generate_teacher_responses(
    model,
    tokenizer,
    prompts: list[dict[str, Any]],
    path: str | Path,
    *,
    settings: TeacherResponsesConfig,
    teacher_id: str,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Answer every prompt `settings.num_samples` times, appending to `path` batch by batch; resumable.

    Work items (prompt, sample) are ordered longest prompt first and cut into batches of `settings.batch_size`
    (similar lengths share a batch: little padding); batch b samples with a seed derived from
    (`settings.seed`, b). Records already in `path` with the same teacher, sampling settings and prompt
    messages are kept and not generated again; others are discarded. When all are there, the file is
    rewritten atomically in prompt order.

    Under a launcher every rank calls it with the same arguments (its own copy of the teacher): each answers its
    share of the batches, rank 0 alone writes `path`, and every rank returns the same records and counts. The
    responses are those of one process: each batch is the same and samples with its own seed, whoever answers it.

    Args:
        model, tokenizer: the teacher and its tokenizer (with a chat template).
        prompts: [{"id", "messages", "reference"?}] (`training_prompts`); ids must be distinct.
        path: the generations file (created with its folder).
        settings: sampling, batching and degenerate-detection settings.
        teacher_id: recorded in every record and compared on resume (e.g. "model@revision:gguf_file").
        on_batch: called with the number of batches written so far in this call, after each is flushed.

    Returns:
        (records in prompt order, then sample; counts: "prompts", "responses", "generated" now, "resumed",
        "discarded", "flagged" per flag, "degenerate", tokens, "seconds", "tokens_per_second").
    """
    from alambic.decoding import encode_prompts, generate_responses, progress_bar

    path = Path(path)
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        duplicated = sorted(k for k, c in Counter(ids).items() if c > 1)[:3]
        raise ValueError(f"prompt ids must be distinct (they key the records on resume); repeated: {duplicated}")
    sampling = {k: getattr(settings, k) for k in SAMPLING_FIELDS}
    lengths = [len(encoded) for encoded in encode_prompts(tokenizer, [p["messages"] for p in prompts])]
    items = sorted(
        ((i, s) for i in range(len(prompts)) for s in range(settings.num_samples)),
        key=lambda item: (-lengths[item[0]], item),
    )
    batches = [items[b : b + settings.batch_size] for b in range(0, len(items), settings.batch_size)]

    wanted = {(p["id"], s): i for i, p in enumerate(prompts) for s in range(settings.num_samples)}
    # Rank 0 alone reads the file back and tidies it; every rank learns which items are answered already.
    done, discarded = distributed.on_main(
        f"teacher responses: read {path}", lambda: _finished_records(path, prompts, wanted, teacher_id, sampling)
    )
    resumed = len(done)
    todo = [b for b, batch in enumerate(batches) if any((ids[i], s) not in done for i, s in batch)]
    # Every rank answers its share of the batches still to do, one batch a round; after each round rank 0 appends
    # them all (the one writer), so a crash loses at most a round. Each batch samples with its own seed, so the
    # responses do not depend on which rank, or how many, answered it.
    mine = [todo[j] for j in distributed.my_share(len(todo))]
    rounds = -(-len(todo) // distributed.world_size())  # my_share: no rank has more than this
    started, new_tokens, written = time.perf_counter(), 0, 0
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(progress_bar(disable=not todo or not distributed.is_main()))
        out = stack.enter_context(path.open("a", encoding="utf-8")) if distributed.is_main() else None
        task = bar.add_task(
            "teacher answering", total=len(items), completed=len(items) - sum(len(batches[b]) for b in todo), rate="-"
        )
        for round_ in range(rounds):
            answered = None
            if round_ < len(mine):
                b = mine[round_]
                answered = (
                    b,
                    generate_responses(
                        model,
                        tokenizer,
                        [prompts[i]["messages"] for i, _ in batches[b]],
                        max_new_tokens=settings.max_new_tokens,
                        batch_size=len(batches[b]),
                        temperature=settings.temperature,
                        top_p=settings.top_p,
                        top_k=settings.top_k,
                        seed=_batch_seed(settings.seed, b),
                        with_tokens=True,
                        show_progress=False,
                    ),
                )
            gathered = distributed.gather_to_main(answered)
            if out is None:  # not rank 0: its answers are rank 0's to write
                continue
            for b, results in (a for a in gathered if a is not None):  # rank order: batch order
                lines = []
                for (i, s), result in zip(batches[b], results):
                    if (ids[i], s) in done:  # answered before a crash that tore the rest of this batch
                        continue
                    record = _record(prompts[i], s, result, settings, sampling, teacher_id)
                    done[(ids[i], s)] = record
                    lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                out.write("".join(lines))
                out.flush()
                os.fsync(out.fileno())  # a finished batch survives a crash of the process or the machine
                written += 1
                new_tokens += sum(r["num_tokens"] for r in results)
                rate = new_tokens / max(time.perf_counter() - started, 1e-9)
                bar.update(task, advance=len(batches[b]), rate=f"{rate:,.0f}")
                if on_batch is not None:
                    on_batch(written)
    seconds = time.perf_counter() - started

    def finish() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        records = [done[(ids[i], s)] for i in range(len(prompts)) for s in range(settings.num_samples)]
        # The whole file in prompt order, replacing the append log at once: readers never see half of it.
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        flagged = {flag: sum(flag in r["flags"] for r in records) for flag in FLAGS}
        counts = {
            "prompts": len(prompts),
            "responses": len(records),
            "generated": len(records) - resumed,
            "resumed": resumed,
            "discarded": discarded,
            "flagged": flagged,
            "degenerate": sum(bool(r["flags"]) for r in records),
            "prompt_tokens": sum(r["prompt_tokens"] for r in records),
            "response_tokens": sum(r["response_tokens"] for r in records),
            "seconds": round(seconds, 2),
            "tokens_per_second": round(new_tokens / seconds, 1) if new_tokens and seconds > 0 else None,
        }
        return records, counts

    return distributed.on_main(f"teacher responses: write {path}", finish)


def _finished_records(
    path: Path,
    prompts: list[dict[str, Any]],
    wanted: dict[tuple[str, int], int],
    teacher_id: str,
    sampling: dict[str, Any],
) -> tuple[dict[tuple[str, int], dict[str, Any]], int]:
    """({(prompt id, sample): record} of the records in `path` made for these prompts with these settings, how many
    others were discarded); the file is made ready to append to (its folder created, a torn last line cut)."""
    done: dict[tuple[str, int], dict[str, Any]] = {}
    discarded = 0
    for record in read_generations(path):
        key = (record.get("prompt_id"), record.get("sample"))
        fits = (
            key in wanted
            and record.get("teacher") == teacher_id
            and record.get("sampling") == sampling
            and record.get("messages") == prompts[wanted[key]]["messages"]
        )
        if fits:
            done[key] = record
        else:
            discarded += 1
    if discarded:
        console.print(
            f"{discarded} response(s) in {path} were made with other settings, another teacher or "
            "other prompts: discarded",
            style="yellow",
            markup=False,
        )
    _drop_torn_tail(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return done, discarded


def _record(
    prompt: dict[str, Any],
    sample: int,
    result: dict[str, Any],
    settings: TeacherResponsesConfig,
    sampling: dict[str, Any],
    teacher_id: str,
) -> dict[str, Any]:
    tokens = result["token_ids"]
    content = tokens[:-1] if result["finish_reason"] == "stop" else tokens  # the stop token is no repetition
    share = repeated_ngram_share(content, settings.repetition_ngram)
    return {
        "prompt_id": prompt["id"],
        "sample": sample,
        "messages": prompt["messages"],
        "response": result["response"],
        "finish_reason": result["finish_reason"],
        "prompt_tokens": result["prompt_tokens"],
        "response_tokens": result["num_tokens"],
        "repeated_ngram_share": round(share, 4),
        "flags": degenerate_flags(
            result["response"],
            content,
            result["finish_reason"],
            ngram=settings.repetition_ngram,
            threshold=settings.repetition_threshold,
        ),
        "reference": prompt.get("reference"),
        "teacher": teacher_id,
        "sampling": sampling,
    }


# ---------------------------------------------------------------- training sequences


def response_conversations(records: list[dict[str, Any]], *, filter_degenerate: bool) -> list[dict[str, Any]]:
    """Chat documents [prompt messages..., {"assistant": response}], one per record kept.

    With `filter_degenerate`, records with any flag are left out; without, only empty responses are (an
    empty assistant turn cannot be located in the rendering, so it has no tokens to learn).
    """
    return [
        {
            "id": f"{r['prompt_id']}#{r['sample']}",
            "messages": [*r["messages"], {"role": "assistant", "content": r["response"]}],
        }
        for r in records
        if r["response"].strip() and not (filter_degenerate and r["flags"])
    ]


def tokenize_responses(docs: list[dict[str, Any]], tokenizer, max_seq_len: int) -> list[dict[str, list[int]]]:
    """Like `data.tokenize.tokenize_chat`, but only the LAST assistant turn counts: the teacher's response.

    Earlier assistant turns of a multi-turn prompt are the corpus's, not the teacher's: they are context, with
    label -100. Counted: the response's content and its end-of-turn token. Truncated to `max_seq_len`; a
    conversation whose response starts past it is dropped.
    """
    samples, dropped = [], 0
    for doc in docs:
        try:
            text, spans = assistant_spans(doc["messages"], tokenizer)
        except ValueError as exc:
            dropped += 1
            logger.debug("skipping %s: %s", doc.get("id"), exc)
            continue
        ids, labels = chat_ids_and_labels(tokenizer, text, spans[-1:])  # BOS as tokenize_chat puts it
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        samples.append(_sample(ids, labels))
    if dropped:
        logger.info("%d response conversation(s) dropped: no response token within %d tokens", dropped, max_seq_len)
    return samples


def write_response_set(
    model,
    tokenizer,
    prompts: list[dict[str, Any]],
    folder: str | Path,
    *,
    settings: TeacherResponsesConfig,
    teacher_id: str,
    max_seq_len: int,
    on_batch: Callable[[int], None] | None = None,
    train_tokenizer=None,
) -> dict[str, Any]:
    """Generate (or resume) the responses, tokenize the kept ones (with `train_tokenizer`, the student's, when it is
    not the teacher's `tokenizer`), write `folder`'s files; `summary.json` last.

    Under a launcher every rank calls it: the ranks share the answering (`generate_teacher_responses`), rank 0 alone
    tokenizes and writes, every rank returns the summary.

    Returns:
        The summary: the counts of `generate_teacher_responses`, "kept" responses, "training_sequences",
        "counted_tokens", the teacher id and the settings.
    Raises:
        DataSourceError: no response is left to train on (all flagged or too long for max_seq_len).
    """
    folder = Path(folder)
    records, counts = generate_teacher_responses(
        model,
        tokenizer,
        prompts,
        folder / GENERATIONS_FILE,
        settings=settings,
        teacher_id=teacher_id,
        on_batch=on_batch,
    )
    # Tokenizing and saving is rank 0's alone (the one writer); every rank gets the summary.
    return distributed.on_main(
        f"teacher responses: write the training set in {folder}",
        lambda: _write_training_set(
            records,
            counts,
            folder,
            tokenizer=train_tokenizer or tokenizer,
            settings=settings,
            teacher_id=teacher_id,
            max_seq_len=max_seq_len,
        ),
    )


def _write_training_set(
    records: list[dict[str, Any]],
    counts: dict[str, Any],
    folder: Path,
    *,
    tokenizer,
    settings: TeacherResponsesConfig,
    teacher_id: str,
    max_seq_len: int,
) -> dict[str, Any]:
    docs = response_conversations(records, filter_degenerate=settings.filter_degenerate)
    samples = tokenize_responses(docs, tokenizer, max_seq_len)
    if not samples:
        raise DataSourceError(
            f"no teacher response is left to train on: {counts['degenerate']} of {counts['responses']} flagged "
            f"degenerate {counts['flagged']} (filter_degenerate: {settings.filter_degenerate}), and "
            f"{len(docs) - len(samples)} with no response token within data.max_seq_len = {max_seq_len}. Raise "
            "data.teacher_responses.max_new_tokens or data.max_seq_len, or set filter_degenerate: false"
        )
    tmp = folder / f".{TRAIN_DIR}.tmp"
    if tmp.exists():  # left by a run that stopped while saving
        shutil.rmtree(tmp)
    _to_dataset(samples).save_to_disk(str(tmp))
    if (folder / TRAIN_DIR).exists():
        shutil.rmtree(folder / TRAIN_DIR)
    tmp.rename(folder / TRAIN_DIR)
    summary = {
        **counts,
        "kept": len(docs),
        "training_sequences": len(samples),
        "counted_tokens": sum(sum(1 for t in s["labels"] if t != IGNORE_INDEX) for s in samples),
        "teacher": teacher_id,
        "settings": settings.model_dump(mode="json"),
    }
    atomic_write_json(folder / SUMMARY_FILE, summary)
    console.print(
        f"teacher responses: {counts['responses']} to {counts['prompts']} prompts ({counts['generated']} generated now"
        + (f", {counts['tokens_per_second']:,.0f} tok/s" if counts["tokens_per_second"] else "")
        + f"), {counts['degenerate']} flagged degenerate {counts['flagged']}, {len(samples)} training sequences"
    )
    return summary


def load_response_set(folder: str | Path):
    """The tokenized (prompt, teacher response) training set `write_response_set` saved (datasets.Dataset).

    Raises:
        FileNotFoundError: the folder holds no finished response set.
    """
    import datasets

    folder = Path(folder)
    if not (folder / SUMMARY_FILE).is_file() or not (folder / TRAIN_DIR).is_dir():
        raise FileNotFoundError(f"{folder}: no finished teacher response set; run `alambic generate CONFIG` first")
    return datasets.load_from_disk(str(folder / TRAIN_DIR))
