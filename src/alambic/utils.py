"""Small shared helpers: atomic writes, hashing, devices, the console, what a full disk looks like."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

console = Console(stderr=True, highlight=False)


class DiagnosedFailure(RuntimeError):
    """A stage failure whose message already names the cause and the fix (a diverging training, weights that
    must not be exported): the CLI prints that message in one line, without a traceback."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_of(obj: Any) -> str:
    """Short stable hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    return dev


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU with bf16 support, or a CPU with AMX or AVX512-BF16.
    Elsewhere bf16 autocast is emulated and slower than float32 (measured on an AMD EPYC with AVX2 only: a
    576 x 1536 linear layer 5.4x slower under CPU bf16 autocast than in float32, one thread)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return any(
            getattr(torch.cpu, probe, lambda: False)()
            for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        )
    return False


def use_bf16(setting: bool | str, device: str | torch.device) -> bool:
    """A `bf16` setting (True, False or "auto": where `native_bf16(device)`) made a yes or no for `device`."""
    return setting is True or (setting == "auto" and native_bf16(device))


def resolve_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else getattr(torch, name)


def tune_allocator() -> None:
    """Keep freed large blocks in the process instead of handing them back to the OS (glibc only).

    glibc serves every allocation above its mmap threshold (at most 32 MB by default) with a fresh
    mmap and unmaps it on free, so each step's vocabulary-sized tensors are page-faulted in anew:
    measured here, that was a third of a CPU distillation step. Raising the mmap and trim thresholds
    lets the heap reuse them. A no-op off glibc.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


# A full disk, as each writer reports it: Python's OSError has the errno (and sometimes the file); safetensors says
# "I/O error: No space left on device (os error 28)" in its own exception type; torch.save says neither (measured
# on a full tmpfs: "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534", raised while handling
# "basic_ios::clear: iostream error"), so for it the free space left decides.
_NO_SPACE_ERRNO = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")
_OPAQUE_WRITE_TEXT = ("inline_container.cc", "PytorchStreamWriter", "iostream error")
NEARLY_FULL = 64 * 2**20  # bytes free below which an opaque write error is taken for a full disk


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):  # the folder may not exist (yet, or any more)
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _checkpoint_estimate(folder: Path) -> str | None:
    """'a checkpoint takes about X (<its path>)' from the newest complete Trainer checkpoint under `folder`: the next
    one needs about as much. None when there is none."""
    complete = [p.parent for p in folder.glob("**/checkpoint-*/trainer_state.json")]
    if not complete:
        return None
    newest = max(complete, key=lambda p: p.stat().st_mtime)
    return f"a checkpoint takes about {human_bytes(_folder_bytes(newest))} ({newest.name})"


def disk_full_message(exc: BaseException, folder: str | Path) -> str | None:
    """One line for a failure caused by a full disk (or quota) while writing into `folder`, else None.

    Looks through the exception and its causes: an OSError with ENOSPC / EDQUOT, or a message that says so
    (safetensors), or torch.save's opaque stream error while `folder`'s disk has under 64 MB left. The line names
    the file where the error does (else the folder), the space free now, and what a checkpoint takes where the
    folder holds one (what the next will need).
    """
    folder = Path(folder)
    chain, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    oserror = next((e for e in chain if isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNO), None)
    free = _free_bytes(folder)
    said = oserror is not None or any(text in str(e) for e in chain for text in _NO_SPACE_TEXT)
    opaque = any(text in str(e) for e in chain for text in _OPAQUE_WRITE_TEXT)
    if not said and not (opaque and free is not None and free < NEARLY_FULL):
        return None
    where = f"writing {oserror.filename}" if oserror is not None and oserror.filename else f"writing into {folder}"
    parts = [
        f"no space left on device {where}",
        f"{human_bytes(free)} free on that disk" if free is not None else "free space unknown",
    ]
    estimate = _checkpoint_estimate(folder) if folder.is_dir() else None
    if estimate:
        parts.append(estimate)
    return "; ".join(parts)
