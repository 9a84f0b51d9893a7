"""Reading a teacher cache: `TeacherCache` (lazy, memory-mapped shards, checked against a fingerprint), and
the dataset and collator that hand its rows to training (`with_cached_rows`: a dataset with its checked cache)."""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alambic.data.cache.fingerprint import _COMPATIBILITY, FORMAT, MANIFEST, CacheMismatchError
from alambic.data.tokenize import IGNORE_INDEX, DistillationCollator

__all__ = ["TEACHER_KEYS", "CachedTeacherCollator", "CachedTeacherDataset", "TeacherCache", "with_cached_rows"]

# The keys of a sample's (and a batch's) cached teacher rows: ids (n, k), log-probs (n, k), tail (n,).
TEACHER_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_tail")


class TeacherCache:
    """Read a complete teacher cache; shards are opened lazily and memory-mapped.

    `cache[i]` is sequence i's rows: ids (n_i, k) int64, logprobs (n_i, k) float32, tail (n_i,) float32.

    Raises:
        FileNotFoundError: no manifest (never written, or the writer has not finished).
        ValueError: a manifest of another format.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.folder}: no complete teacher cache ({MANIFEST} missing: never written, or the writer was "
                "interrupted); build it with `alambic cache CONFIG` (it resumes where it stopped)"
            )
        self.manifest: dict[str, Any] = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not an alambic teacher cache manifest (format {self.manifest.get('format')!r})"
            )
        self._shards = self.manifest["shards"]
        self._starts = [s["first_sequence"] for s in self._shards]
        self._open: dict[int, tuple[Any, torch.Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Open file handles do not pickle (data loader workers): each process opens its own.
        return {**self.__dict__, "_open": {}}

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["fingerprint"]

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    def __len__(self) -> int:
        return int(self.manifest["totals"]["sequences"])

    def _shard(self, index: int) -> tuple[Any, torch.Tensor]:
        if index not in self._open:
            from safetensors import safe_open

            path = self.folder / self._shards[index]["file"]
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: shard missing from a complete cache; rebuild it with `alambic cache CONFIG`"
                )
            handle = safe_open(str(path), framework="pt")
            self._open[index] = (handle, handle.get_tensor("offsets"))
        return self._open[index]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sequence {index} out of range: the cache holds {n} sequences")
        index %= n
        shard = bisect.bisect_right(self._starts, index) - 1
        handle, offsets = self._shard(shard)
        j = index - self._starts[shard]
        a, b = int(offsets[j]), int(offsets[j + 1])
        return {
            "ids": handle.get_slice("ids")[a:b].long(),
            "logprobs": handle.get_slice("logprobs")[a:b].float(),
            "tail": handle.get_slice("tail")[a:b].float(),
        }

    def check_compatible(self, fingerprint: dict[str, Any]) -> None:
        """Raise unless this cache was made from what `fingerprint` describes.

        Raises:
            CacheMismatchError: naming each thing that differs, the cached and the expected value.
        """
        cached = self.fingerprint
        differ = [(key, words) for key, words in _COMPATIBILITY if cached.get(key) != fingerprint.get(key)]
        if differ:
            details = "; ".join(
                f"{words}: cached {_short(cached.get(key))}, now {_short(fingerprint.get(key))}"
                for key, words in differ
            )
            raise CacheMismatchError(
                f"teacher cache {self.folder} was made for another {', '.join(w for _, w in differ)} ({details}): "
                "rebuild it with `alambic cache CONFIG` or point data.teacher_cache elsewhere"
            )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------------------------
# training data


def _counted_in(labels: Any) -> int:
    labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


class CachedTeacherDataset(torch.utils.data.Dataset):
    """`dataset`'s samples with their cached teacher rows: teacher_ids (n_i, k), teacher_logprobs (n_i, k),
    teacher_tail (n_i,), n_i = the sample's counted positions (labels[1:] != -100).

    Raises:
        ValueError: the dataset and the cache hold different numbers of sequences.
    """

    def __init__(self, dataset, cache: TeacherCache):
        if len(dataset) != len(cache):
            raise CacheMismatchError(
                f"the dataset has {len(dataset)} sequences but teacher cache {cache.folder} holds {len(cache)}: "
                "it was made for other data; rebuild it with `alambic cache CONFIG`"
            )
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        rows = self.cache[index]
        labels = sample.get("labels", sample["input_ids"])
        if rows["ids"].shape[0] != _counted_in(labels):
            raise CacheMismatchError(
                f"sequence {index}: teacher cache {self.cache.folder} holds {rows['ids'].shape[0]} rows, the sample "
                f"has {_counted_in(labels)} counted positions: the cache was made for other data or masking; "
                "rebuild it with `alambic cache CONFIG`"
            )
        for key, part in zip(TEACHER_KEYS, ("ids", "logprobs", "tail")):
            sample[key] = rows[part]
        return sample


def with_cached_rows(dataset, folder: str | Path, fingerprint: dict[str, Any]) -> CachedTeacherDataset:
    """`dataset` with the rows of the cache in `folder`, once that cache is found complete and made from what
    `fingerprint` describes (the run's teacher, tokenizer, data, k and temperature).

    Raises:
        FileNotFoundError: no complete cache in `folder`.
        CacheMismatchError: the cache was made for something else, or holds another number of sequences.
    """
    cache = TeacherCache(folder)
    cache.check_compatible(fingerprint)
    return CachedTeacherDataset(dataset, cache)


@dataclass
class CachedTeacherCollator:
    """`DistillationCollator` for samples of `CachedTeacherDataset`, plus the teacher rows of the batch,
    concatenated sample after sample: teacher_ids (N, k), teacher_logprobs (N, k), teacher_tail (N,).

    Each sample's rows are in position order, so the concatenation lines up with the student's
    `hidden[:, :-1][mask]` (row-major over the (B, T-1) mask), N = mask.sum().

    Raises:
        ValueError: a sample without teacher rows, or N different from the batch's counted positions.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        self._pad = DistillationCollator(self.pad_token_id, self.pad_to_multiple_of)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        missing = [i for i, f in enumerate(features) if "teacher_ids" not in f]
        if missing:
            raise ValueError(f"samples {missing[:5]} have no teacher rows: wrap the dataset in CachedTeacherDataset")
        batch = self._pad([{k: v for k, v in f.items() if not k.startswith("teacher_")} for f in features])
        for key in TEACHER_KEYS:
            batch[key] = torch.cat([torch.as_tensor(f[key]) for f in features])
        counted = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1), the trainer's mask
        rows = [len(f["teacher_ids"]) for f in features]
        if sum(rows) != int(counted.sum()):
            per_sample = counted.sum(1).tolist()
            bad = [(i, r, c) for i, (r, c) in enumerate(zip(rows, per_sample)) if r != c]
            raise ValueError(
                f"the batch has {int(counted.sum())} counted positions but {sum(rows)} teacher rows; "
                f"(sample, rows, counted) that differ: {bad[:5]}"
            )
        return batch
