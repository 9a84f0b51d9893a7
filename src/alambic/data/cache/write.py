"""Writing a teacher cache: the teacher over the training sequences in order, its top-k log-probs per
counted position into shards written whole or not at all, kept when complete (resume), the manifest last."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("sequences"),
        TextColumn("{task.fields[rate]} tok/s"), TimeRemainingColumn(),
        console=console, disable=not enabled, transient=False,
    )


@dataclass
class _ShardResult:
    tensors: dict[str, torch.Tensor]
    tokens: int
    kl_sum: float
    tail_mass_sum: float


@torch.inference_mode()
def _run_shard(teacher: nn.Module, dataset, first: int, num: int, *, k: int, temperature: float, vocab: int,
               store_dtype: torch.dtype, batch_size: int, collator: DistillationCollator,
               device: torch.device, on_batch) -> _ShardResult:
    counts: list[torch.Tensor] = []
    ids_out, logprobs_out, tail_out = [], [], []
    kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    tail_mass_sum = torch.zeros((), dtype=torch.float64, device=device)
    store_floor = torch.finfo(store_dtype).min
    for start in range(first, first + num, batch_size):
        stop = min(start + batch_size, first + num)
        batch = collator([dataset[i] for i in range(start, stop)])
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        mask, _ = counted_positions(batch["labels"].to(device))  # (B, T-1)
        hidden = final_hidden_states(teacher, teacher, input_ids, attention_mask)[:, :-1][mask]  # (n_b, H)
        counts.append(mask.sum(1).cpu())
        for rows in range(0, hidden.shape[0], _ROWS_PER_PROJECTION):
            logits = project(teacher, hidden[rows: rows + _ROWS_PER_PROJECTION])[:, :vocab]  # (r, V)
            log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
            ids, logprobs, tail = topk_of_log_probs(log_p, k)
            kl_sum += truncation_kl(log_p, ids, tail).sum(dtype=torch.float64)
            tail_mass_sum += tail.exp().sum(dtype=torch.float64)
            ids_out.append(ids.to(torch.int32).cpu())
            # clamp first: float16 cannot hold a log-prob below -65504, it would become -inf
            logprobs_out.append(logprobs.clamp_min(store_floor).to(store_dtype).cpu())
            tail_out.append(tail.float().cpu())
        on_batch(stop - start, int(mask.sum()))
    per_sequence = torch.cat(counts).to(torch.int64)
    offsets = torch.zeros(num + 1, dtype=torch.int64)
    offsets[1:] = per_sequence.cumsum(0)
    tensors = {
        "offsets": offsets,
        "ids": torch.cat(ids_out) if ids_out else torch.zeros(0, k, dtype=torch.int32),
        "logprobs": torch.cat(logprobs_out) if logprobs_out else torch.zeros(0, k, dtype=store_dtype),
        "tail": torch.cat(tail_out) if tail_out else torch.zeros(0, dtype=torch.float32),
    }
    return _ShardResult(tensors, int(offsets[-1]), float(kl_sum), float(tail_mass_sum))


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
        progress: show a progress bar with tokens/s.

    Returns:
        The manifest (also written to `folder/manifest.json`).

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
            raise ValueError(f"fingerprint was made for {name} = {fingerprint[name]!r} but the cache is written with "
                             f"{name} = {value!r}: build the fingerprint with the same settings")
    if "dataset" in fingerprint and fingerprint["dataset"].get("sequences") != n:
        raise ValueError(f"fingerprint describes {fingerprint['dataset'].get('sequences')} sequences, the dataset "
                         f"has {n}: build the fingerprint from this dataset")
    head_vocab = teacher.get_output_embeddings().weight.shape[0]
    vocab = head_vocab if vocab_size is None else int(vocab_size)
    if not 1 <= vocab <= head_vocab:
        raise ValueError(f"vocab_size must be in [1, {head_vocab}] (the teacher head's size), got {vocab_size}")
    if k > vocab:
        raise ValueError(f"k = {k} is more than the vocabulary ({vocab} ids)")

    settings = {"fingerprint": fingerprint, "dtype": dtype, "vocab_size": vocab,
                "sequences_per_shard": sequences_per_shard}
    key = sha256_of(settings)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / MANIFEST
    shard_ranges = [(first, min(sequences_per_shard, n - first)) for first in range(0, n, sequences_per_shard)]
    names = [_shard_name(i) for i in range(len(shard_ranges))]

    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("key") == key and all((folder / name).is_file() for name in names):
            logger.info("teacher cache %s is complete already", folder)
            return previous
        # Being rebuilt or extended: no manifest may describe the folder until every shard is there.
        manifest_path.unlink()
    for stray in folder.glob("shard-*.safetensors"):
        if stray.name not in names:
            stray.unlink()  # from a run with other shard counts
    for tmp in folder.glob(".shard-*.tmp"):
        tmp.unlink()  # cut off mid-write

    try:
        device = next(teacher.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = teacher.training
    teacher.eval()
    collator = DistillationCollator(pad_token_id=_pad_id(teacher, pad_token_id))
    store_dtype = STORE_DTYPES[dtype]
    entries, kl_total, tail_total, written_tokens = [], 0.0, 0.0, 0
    started = time.perf_counter()
    try:
        with _progress(progress) as bar:
            task = bar.add_task("teacher cache", total=n, rate="-")

            def on_batch(sequences: int, tokens: int) -> None:
                nonlocal written_tokens
                written_tokens += tokens
                rate = written_tokens / max(time.perf_counter() - started, 1e-9)
                bar.update(task, advance=sequences, rate=f"{rate:,.0f}")

            for name, (first, num) in zip(names, shard_ranges):
                path = folder / name
                meta = _complete_shard(path, key, first, num)
                if meta is None:
                    result = _run_shard(teacher, dataset, first, num, k=k, temperature=temperature, vocab=vocab,
                                        store_dtype=store_dtype, batch_size=batch_size, collator=collator,
                                        device=device, on_batch=on_batch)
                    meta = {"key": key, "first_sequence": str(first), "num_sequences": str(num),
                            "num_tokens": str(result.tokens), "kl_sum": repr(result.kl_sum),
                            "tail_mass_sum": repr(result.tail_mass_sum)}
                    _save_shard(path, result.tensors, meta)
                else:
                    bar.update(task, advance=num)  # complete already: kept
                entries.append({"file": name, "first_sequence": first, "num_sequences": num,
                                "num_tokens": int(meta["num_tokens"])})
                kl_total += float(meta["kl_sum"])
                tail_total += float(meta["tail_mass_sum"])
    finally:
        teacher.train(was_training)

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
            "kl_full_to_cached": kl_total / max(tokens, 1),
            "mean_tail_mass": tail_total / max(tokens, 1),
            "definition": "mean over counted tokens of KL(P || P~) in nats, P the teacher's full distribution at "
                          "the cache's temperature, P~ its top-k probabilities with the tail mass spread evenly "
                          "over the other V - k ids (= tail mass x KL(P(.|tail) || uniform)); 0 means nothing lost",
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(manifest_path, manifest)
    return manifest
