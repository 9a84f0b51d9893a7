"""Writing a teacher cache: the teacher over the training sequences in order, its top-k log-probs per
counted position into shards written whole or not at all, kept when complete (resume), the manifest last.

Under a launcher every rank runs its share of each shard's batches and rank 0, the one writer, puts them together:
the same batches as one process runs, so the same shards, byte for byte, and the same manifest."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alambic import distributed
from alambic.data.cache.fingerprint import FORMAT, FORMAT_VERSION, MANIFEST
from alambic.data.tokenize import DistillationCollator
from alambic.losses.topk import topk_of_log_probs, truncation_kl
from alambic.modeling import counted_positions, final_hidden_states, project
from alambic.utils import atomic_write_json, console, sha256_of

__all__ = ["write_teacher_cache"]

logger = logging.getLogger(__name__)

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Counted positions projected through the teacher's head at once while writing: bounds the (rows, V)
# float32 logits block (4096 × 152k × 4 B = 2.5 GB).
_ROWS_PER_PROJECTION = 4096


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _complete_shard(path: Path, key: str, first: int, num: int) -> dict[str, str] | None:
    """The metadata of `path` if it is a whole shard made with the settings `key` for these sequences."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable: rewrite it
        return None
    if meta.get("key") != key or meta.get("first_sequence") != str(first) or meta.get("num_sequences") != str(num):
        return None
    return meta


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temporary name, flush to disk, rename: the shard appears whole or not at all."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _pad_id(teacher: nn.Module, pad_token_id: int | None) -> int:
    # Padding is masked by attention_mask and labels: any valid id will do.
    if pad_token_id is not None:
        return int(pad_token_id)
    config = getattr(teacher, "config", None)
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sequences"),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


@dataclass
class _BatchResult:
    """One batch's rows of a shard: what a rank sends to rank 0, which puts a shard's batches together in order."""

    counts: torch.Tensor  # (B,) counted positions per sequence
    ids: torch.Tensor  # (n_b, k) int32
    logprobs: torch.Tensor  # (n_b, k) store dtype
    tail: torch.Tensor  # (n_b,) float32
    kl_sum: float
    tail_mass_sum: float


@torch.inference_mode()
def _run_batch(
    teacher: nn.Module,
    dataset,
    start: int,
    stop: int,
    *,
    k: int,
    temperature: float,
    vocab: int,
    store_dtype: torch.dtype,
    collator: DistillationCollator,
    device: torch.device,
) -> _BatchResult:
    batch = collator([dataset[i] for i in range(start, stop)])
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    mask, _ = counted_positions(batch["labels"].to(device))  # (B, T-1)
    hidden = final_hidden_states(teacher, teacher, input_ids, attention_mask)[:, :-1][mask]  # (n_b, H)
    ids_out, logprobs_out, tail_out = [], [], []
    kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    tail_mass_sum = torch.zeros((), dtype=torch.float64, device=device)
    store_floor = torch.finfo(store_dtype).min
    for rows in range(0, hidden.shape[0], _ROWS_PER_PROJECTION):
        logits = project(teacher, hidden[rows : rows + _ROWS_PER_PROJECTION])[:, :vocab]  # (r, V)
        log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
        ids, logprobs, tail = topk_of_log_probs(log_p, k)
        kl_sum += truncation_kl(log_p, ids, tail).sum(dtype=torch.float64)
        tail_mass_sum += tail.exp().sum(dtype=torch.float64)
        ids_out.append(ids.to(torch.int32).cpu())
        # clamp first: float16 cannot hold a log-prob below -65504, it would become -inf
        logprobs_out.append(logprobs.clamp_min(store_floor).to(store_dtype).cpu())
        tail_out.append(tail.float().cpu())
    return _BatchResult(
        counts=mask.sum(1).cpu().to(torch.int64),
        ids=torch.cat(ids_out) if ids_out else torch.zeros(0, k, dtype=torch.int32),
        logprobs=torch.cat(logprobs_out) if logprobs_out else torch.zeros(0, k, dtype=store_dtype),
        tail=torch.cat(tail_out) if tail_out else torch.zeros(0, dtype=torch.float32),
        kl_sum=float(kl_sum),
        tail_mass_sum=float(tail_mass_sum),
    )


def _shard_tensors(parts: list[_BatchResult]) -> dict[str, torch.Tensor]:
    """A shard's tensors from its batches, in order: offsets (S+1,) into the (n, k) ids and log-probs, tail (n,)."""
    per_sequence = torch.cat([p.counts for p in parts])
    offsets = torch.zeros(len(per_sequence) + 1, dtype=torch.int64)
    offsets[1:] = per_sequence.cumsum(0)
    return {
        "offsets": offsets,
        "ids": torch.cat([p.ids for p in parts]),
        "logprobs": torch.cat([p.logprobs for p in parts]),
        "tail": torch.cat([p.tail for p in parts]),
    }


def _folder_state(
    folder: Path, key: str, names: list[str], shard_ranges: list[tuple[int, int]]
) -> tuple[dict[str, Any] | None, dict[str, dict[str, str]]]:
    """(the manifest, when the cache is complete already; else None, the metadata of the shards kept), the folder
    made ready for the shards still to write: no manifest, no stray or half-written shard."""
    manifest_path = folder / MANIFEST
    folder.mkdir(parents=True, exist_ok=True)
    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("key") == key and all((folder / name).is_file() for name in names):
            logger.info("teacher cache %s is complete already", folder)
            return previous, {}
        # Being rebuilt or extended: no manifest may describe the folder until every shard is there.
        manifest_path.unlink()
    for stray in folder.glob("shard-*.safetensors"):
        if stray.name not in names:
            stray.unlink()  # from a run with other shard counts
    for tmp in folder.glob(".shard-*.tmp"):
        tmp.unlink()  # cut off mid-write
    kept = {name: _complete_shard(folder / name, key, first, num) for name, (first, num) in zip(names, shard_ranges)}
    return None, {name: meta for name, meta in kept.items() if meta is not None}


def write_teacher_cache(
    teacher: nn.Module,
    dataset,
    folder: str | Path,
    *,
    k: int = 64,
    temperature: float = 1.0,
    dtype: str = "float16",
    batch_size: int = 8,
    sequences_per_shard: int = 256,
    fingerprint: dict[str, Any],
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run `teacher` over `dataset` in order and store its top-k log-probs per counted position.

    Resumable: shards already complete for the same settings are kept, the others (re)written;
    `manifest.json` is written last, atomically, and only then is the cache complete. A folder holding
    a cache made with other settings is rebuilt (its manifest is removed first).

    Args:
        teacher: an unwrapped causal LM on its device (run under `torch.inference_mode`).
        dataset: sequences with input_ids, attention_mask, labels (a `datasets.Dataset` or a list of dicts).
        folder: the cache folder.
        k: ids kept per token (64 keeps all but a small tail for most LMs; see the manifest's quality).
        temperature: the KD temperature T of the loss that will read the cache.
        dtype: storage dtype of the log-probs ('float16' halves the size; the tail is always float32).
        batch_size: sequences per teacher forward.
        sequences_per_shard: sequences per shard file (the most a crash can lose).
        fingerprint: `cache_fingerprint(...)` of this teacher, tokenizer, dataset, k and temperature.
        vocab_size: keep only the first `vocab_size` logits before the softmax (the vocabulary shared
            with the student, when the heads are padded differently); None: the teacher head's size.
        pad_token_id: id used for padding (masked, never scored); None: from the teacher's config.
        progress: show a progress bar with tokens/s (on rank 0).

    Under a launcher, every rank calls it with the same arguments (its own teacher on its own device): each runs its
    share of every shard's batches, rank 0 alone writes the folder.

    Returns:
        The manifest (also written to `folder/manifest.json`), on every rank.

    Raises:
        ValueError: settings out of range, an empty dataset, or a fingerprint of other settings.
    """
    folder = Path(folder)
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    for name, value in (("batch_size", batch_size), ("sequences_per_shard", sequences_per_shard), ("k", k)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty: nothing to cache")
    for name, value in (("k", int(k)), ("temperature", float(temperature))):
        if name in fingerprint and fingerprint[name] != value:
            raise ValueError(
                f"fingerprint was made for {name} = {fingerprint[name]!r} but the cache is written with "
                f"{name} = {value!r}: build the fingerprint with the same settings"
            )
    if "dataset" in fingerprint and fingerprint["dataset"].get("sequences") != n:
        raise ValueError(
            f"fingerprint describes {fingerprint['dataset'].get('sequences')} sequences, the dataset "
            f"has {n}: build the fingerprint from this dataset"
        )
    head_vocab = teacher.get_output_embeddings().weight.shape[0]
    vocab = head_vocab if vocab_size is None else int(vocab_size)
    if not 1 <= vocab <= head_vocab:
        raise ValueError(f"vocab_size must be in [1, {head_vocab}] (the teacher head's size), got {vocab_size}")
    if k > vocab:
        raise ValueError(f"k = {k} is more than the vocabulary ({vocab} ids)")

    settings = {
        "fingerprint": fingerprint,
        "dtype": dtype,
        "vocab_size": vocab,
        "sequences_per_shard": sequences_per_shard,
    }
    key = sha256_of(settings)
    shard_ranges = [(first, min(sequences_per_shard, n - first)) for first in range(0, n, sequences_per_shard)]
    names = [_shard_name(i) for i in range(len(shard_ranges))]
    # Rank 0 alone looks at the folder and tidies it; every rank learns which shards are still to write.
    complete, kept = distributed.on_main(
        f"teacher cache {folder}: check the folder", lambda: _folder_state(folder, key, names, shard_ranges)
    )
    if complete is not None:
        return complete

    try:
        device = next(teacher.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = teacher.training
    teacher.eval()
    collator = DistillationCollator(pad_token_id=_pad_id(teacher, pad_token_id))
    store_dtype = STORE_DTYPES[dtype]

    def run(start: int, stop: int) -> _BatchResult:
        return _run_batch(
            teacher,
            dataset,
            start,
            stop,
            k=k,
            temperature=temperature,
            vocab=vocab,
            store_dtype=store_dtype,
            collator=collator,
            device=device,
        )

    metas: dict[str, dict[str, str] | None] = {}
    written_tokens, started = 0, time.perf_counter()
    try:
        with _progress(progress and distributed.is_main()) as bar:
            task = bar.add_task("teacher cache", total=n, rate="-")

            def on_batch(sequences: int, tokens: int) -> None:
                nonlocal written_tokens
                written_tokens += tokens
                rate = written_tokens / max(time.perf_counter() - started, 1e-9)
                bar.update(task, advance=sequences, rate=f"{rate:,.0f}")

            for name, (first, num) in zip(names, shard_ranges):
                if name in kept:
                    metas[name] = kept[name]
                    bar.update(task, advance=num)  # complete already: kept
                else:
                    metas[name] = _write_shard(
                        folder / name, first, num, key=key, batch_size=batch_size, run=run, on_batch=on_batch
                    )
    finally:
        teacher.train(was_training)

    def write_manifest() -> dict[str, Any]:
        entries = [
            {"file": name, "first_sequence": first, "num_sequences": num, "num_tokens": int(metas[name]["num_tokens"])}
            for name, (first, num) in zip(names, shard_ranges)
        ]
        tokens = sum(e["num_tokens"] for e in entries)
        size = sum((folder / e["file"]).stat().st_size for e in entries)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "key": key,
            "fingerprint": fingerprint,  # teacher, tokenizer, dataset, k, temperature: what `check_compatible` compares
            "k": k,
            "temperature": float(temperature),
            "dtype": dtype,
            "vocab_size": vocab,
            "sequences_per_shard": sequences_per_shard,
            "shards": entries,
            "totals": {"sequences": n, "counted_tokens": tokens, "bytes": size},
            "bytes_per_counted_token": round(size / max(tokens, 1), 2),
            # without the files' headers and offsets: what a larger dataset will take per counted token
            "payload_bytes_per_counted_token": k * (4 + store_dtype.itemsize) + 4,
            "quality": {
                "kl_full_to_cached": sum(float(metas[name]["kl_sum"]) for name in names) / max(tokens, 1),
                "mean_tail_mass": sum(float(metas[name]["tail_mass_sum"]) for name in names) / max(tokens, 1),
                "definition": "mean over counted tokens of KL(P || P~) in nats, P the teacher's full distribution at "
                "the cache's temperature, P~ its top-k probabilities with the tail mass spread evenly "
                "over the other V - k ids (= tail mass x KL(P(.|tail) || uniform)); 0 means nothing "
                "lost",
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(folder / MANIFEST, manifest)
        return manifest

    return distributed.on_main(f"teacher cache {folder}: write the manifest", write_manifest)


def _write_shard(
    path: Path,
    first: int,
    num: int,
    *,
    key: str,
    batch_size: int,
    run: Callable[[int, int], _BatchResult],
    on_batch: Callable[[int, int], None],
) -> dict[str, str] | None:
    """Sequences [first, first + num) into the shard `path`: every rank runs its share of the shard's batches (the
    batches one process would run, so every sequence is padded and computed as it would be alone), rank 0 puts them
    together in order and writes the shard.

    Returns:
        The shard's metadata on rank 0; None on the other ranks.
    """
    batches = [(start, min(start + batch_size, first + num)) for start in range(first, first + num, batch_size)]
    parts = []
    for index in distributed.my_share(len(batches)):
        parts.append(run(*batches[index]))
        on_batch(len(parts[-1].counts), int(parts[-1].counts.sum()))
    gathered = distributed.gather_to_main(parts)
    if gathered is None:
        return None
    for theirs in gathered[1:]:  # the other ranks' batches, on rank 0's progress bar
        for part in theirs:
            on_batch(len(part.counts), int(part.counts.sum()))
    parts = [part for theirs in gathered for part in theirs]  # rank order = batch order
    tensors = _shard_tensors(parts)
    # summed in batch order, the same on any number of ranks
    meta = {
        "key": key,
        "first_sequence": str(first),
        "num_sequences": str(num),
        "num_tokens": str(int(tensors["offsets"][-1])),
        "kl_sum": repr(sum(p.kl_sum for p in parts)),
        "tail_mass_sum": repr(sum(p.tail_mass_sum for p in parts)),
    }
    _save_shard(path, tensors, meta)
    return meta
