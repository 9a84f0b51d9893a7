"""Stages 'data', 'generate', 'select' and 'cache': the tokenized corpus, the teacher's responses to its prompts,
the band of them kept by teacher entropy, the teacher's top-k cache; and what distillation trains on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alambic import distributed
from alambic.config import RunConfig
from alambic.layout import CACHE_DIR, DATA_DIR, GENERATIONS_DIR, SELECTION_DIR, SELECTION_FILE, SPLITS
from alambic.pipeline import StageContext
from alambic.stages.paths import student_source
from alambic.utils import atomic_write_json, console


def prepare_data(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    from alambic.data import prepare_datasets, save_prepared
    from alambic.stages.models import data_tokenizers

    # The student's tokenizer when it is not the teacher's (then the teacher's too): checked first of all.
    tokenizer, teacher_tokenizer = data_tokenizers(config, ctx.run_dir)
    prepared = prepare_datasets(config.data, tokenizer, teacher_tokenizer)
    save_prepared(prepared, ctx.run_dir / DATA_DIR)
    console.print(
        f"data: {len(prepared.train)} training sequences, {len(prepared.validation)} held-out sequences "
        f"({len(prepared.split['validation_document_ids'])} held-out documents)"
    )
    return {k: v for k, v in prepared.split.items() if not isinstance(v, list)}


def cache_folder(config: RunConfig, run_dir: Path) -> Path:
    return Path(config.data.teacher_cache.folder) if config.data.teacher_cache.folder else run_dir / CACHE_DIR


def _cache_fingerprint(config: RunConfig, tokenizer, dataset) -> dict[str, Any]:
    from alambic.data.cache import cache_fingerprint

    t = config.teacher
    return cache_fingerprint(
        tokenizer,
        dataset,
        k=config.data.teacher_cache.k,
        temperature=config.loss.temperature,
        teacher_id=f"{t.model}@{t.revision}:{t.gguf_file}",
    )


def build_cache(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Run the teacher once over both splits and keep its top-k log-probs per counted token; on every rank of a
    launch, each running its share of the sequences, rank 0 writing (write_teacher_cache)."""
    from alambic.data import load_prepared
    from alambic.data.cache import write_teacher_cache
    from alambic.models import load_model, load_tokenizer

    c = config.data.teacher_cache
    data = load_prepared(ctx.run_dir / DATA_DIR)
    teacher, tokenizer = load_model(config.teacher, cache=True), load_tokenizer(config.teacher)
    student_vocab = load_model(student_source(config, ctx.run_dir)).get_output_embeddings().weight.shape[0]
    vocab = min(student_vocab, teacher.get_output_embeddings().weight.shape[0])
    summary = {}
    for split in SPLITS:
        dataset = getattr(data, split)
        manifest = write_teacher_cache(
            teacher,
            dataset,
            cache_folder(config, ctx.run_dir) / split,
            k=c.k,
            temperature=config.loss.temperature,
            dtype=c.dtype,
            batch_size=c.batch_size,
            sequences_per_shard=c.sequences_per_shard,
            fingerprint=_cache_fingerprint(config, tokenizer, dataset),
            vocab_size=vocab,
            pad_token_id=tokenizer.pad_token_id,
        )
        summary[split] = {k: manifest[k] for k in ("totals", "quality", "bytes_per_token") if k in manifest}
    return summary


def teacher_id(config: RunConfig) -> str:
    t = config.teacher
    return f"{t.model}@{t.revision}:{t.gguf_file}"


def generate(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """The teacher's responses to the training prompts (data.teacher_responses), resumable batch by batch; on every
    rank of a launch, each answering its share, rank 0 writing."""
    from alambic.data import load_prepared
    from alambic.data.generate import training_prompts, write_response_set
    from alambic.models import load_model, load_tokenizer

    split = load_prepared(ctx.run_dir / DATA_DIR).split
    # The documents are read once, on rank 0; every rank answers its share of the prompts (write_response_set).
    prompts = distributed.on_main("generate: the training prompts", lambda: training_prompts(config.data, split))
    teacher, tokenizer = load_model(config.teacher, cache=True), load_tokenizer(config.teacher)
    # Finished batches are kept even when this stage's inputs changed: each record carries the teacher and the
    # sampling settings it was made with, and those that no longer match are discarded. The responses are
    # trained on in the data's tokens: the student's own, when it has another tokenizer (response distillation).
    return write_response_set(
        teacher,
        tokenizer,
        prompts,
        ctx.run_dir / GENERATIONS_DIR,
        settings=config.data.teacher_responses,
        teacher_id=teacher_id(config),
        max_seq_len=config.data.max_seq_len,
        train_tokenizer=load_tokenizer(student_source(config, ctx.run_dir)) if split.get("teacher_tokenizer") else None,
    )


def distill_train_set(config: RunConfig, run_dir: Path, corpus_train, *, selected: bool = True):
    """What distill trains on: the teacher's responses (data.teacher_responses) or the corpus sequences, then,
    with `selected`, the band the select stage kept (data.selection)."""
    train = corpus_train
    if config.data.teacher_responses is not None:
        from alambic.data.generate import load_response_set

        train = load_response_set(run_dir / GENERATIONS_DIR)
    if selected and config.data.selection is not None:
        from alambic.data.select import apply_selection

        train = apply_selection(train, json.loads((run_dir / SELECTION_DIR / SELECTION_FILE).read_text()))
    return train


def select(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Score the training set by mean teacher token entropy and keep the configured band (data.selection)."""
    from alambic.data import load_prepared
    from alambic.data.select import select_band, selection_record, sequence_entropies
    from alambic.models import load_model, load_tokenizer

    cfg = config.data.selection
    train = distill_train_set(config, ctx.run_dir, load_prepared(ctx.run_dir / DATA_DIR).train, selected=False)
    teacher, tokenizer = load_model(config.teacher, cache=True), load_tokenizer(config.teacher)
    scores = sequence_entropies(teacher, train, pad_token_id=tokenizer.pad_token_id, batch_size=cfg.batch_size)
    record = selection_record(scores, select_band(scores, cfg.keep_fraction, cfg.band), cfg)
    atomic_write_json(ctx.run_dir / SELECTION_DIR / SELECTION_FILE, record)
    console.print(
        f"selection: kept {record['kept']} of {record['total']} training sequences ({cfg.band} teacher "
        f"entropy, {record['kept_range'][0]:.3f}-{record['kept_range'][1]:.3f} nats; median of all "
        f"{record['quantiles']['0.5']:.3f})"
    )
    return {k: v for k, v in record.items() if k not in ("scores", "kept_indices", "histogram")}
