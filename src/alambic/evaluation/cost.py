"""Inference cost of a model as it is loaded: time to first token, latency per token, throughput, memory,
size on disk.

Every timed figure is measured `repeats` times after `warmup` untimed runs and reported with its spread, so
a reader can tell a real saving from noise:

    {"median", "min", "max", "spread" = (max - min) / median, "values": [one per repeat]}

Generation is greedy with EOS suppressed (`min_new_tokens = max_new_tokens = N`), so every run does exactly
the same work: one prefill of P prompt tokens, then N - 1 single-token decode steps on the KV cache.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from alambic.models import count_parameters

RSS_SAMPLE_SECONDS = 0.002  # sampling fallback: fine enough to catch a decode step's peak on a small model
_PROC_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def summarize(values: list[float]) -> dict[str, Any]:
    """{"median", "min", "max", "spread", "values"} of repeated measurements.

    spread = (max - min) / median, the relative width of what was seen; None when the median is not positive
    (a ratio to it would mean nothing).
    """
    if not values:
        raise ValueError("summarize: no values (repeats must be >= 1)")
    median = statistics.median(values)
    lo, hi = min(values), max(values)
    return {
        "median": median,
        "min": lo,
        "max": hi,
        "spread": (hi - lo) / median if median > 0 else None,
        "values": list(values),
    }


@torch.inference_mode()
def measure_cost(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    *,
    new_tokens: int = 64,
    batch_size: int = 8,
    warmup: int = 1,
    repeats: int = 5,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """Time and memory of greedy generation with `model` exactly as loaded (its weights, dtype and device).

    Runs (each figure: `warmup` untimed, then `repeats` timed; P = prompt length, N = `new_tokens`,
    B = `batch_size`):
      - prefill_seconds: batch 1 (row 0 of `prompt_ids`), generate 1 token: the time to the first token;
      - generate_seconds_batch1: batch 1, generate N tokens, t1;
      - latency_per_token_seconds: per repeat, the time from the first generated token to the last inside that
        same batch-1 run, / (N - 1): one decode step, timed by a clock read at every step (never a difference
        of two separately timed runs, which noise can make negative);
      - tokens_per_second_batch1: per repeat N / t1;
      - generate_seconds_batch: batch B (the first B rows, tiled when there are fewer), N tokens, tB;
      - throughput_tokens_per_second: per repeat B * N / tB.
    Memory, on one more untimed batch-B run: weight_bytes (unique parameters and buffers),
    working_memory_bytes (peak extra memory while generating: activations and KV cache) and
    peak_memory_bytes = weight_bytes + working_memory_bytes, what this model needs to generate at batch B
    whatever else lives in the process. CUDA: `max_memory_allocated` after a reset; CPU: the process's RSS
    high-water mark (reset through /proc/self/clear_refs), or an RSS-sampling thread where that is not
    possible; `memory_method` says which.

    Args:
        prompt_ids: (R, P) token ids of real held-out text, R >= 1, P >= 1.
        pad_token_id: id `generate` may pad with (never used: prompts are of equal length and no row ends
            early); default the model's generation config's, its config's, or its EOS id.

    Returns:
        The figures above (timed ones as `summarize` dicts), plus device, device_name, torch_threads, dtype,
        parameters, non_embedding_parameters, prompt_tokens, new_tokens, batch_size, warmup, repeats,
        memory_method and load_average_1min (None off Unix): the machine's load, to judge noise.

    Raises:
        ValueError: an argument out of range (named), or a model spread over several devices or on a device
            other than CPU and CUDA.
    """
    device = _model_device(model)
    _validate(model, prompt_ids, new_tokens=new_tokens, batch_size=batch_size, warmup=warmup, repeats=repeats)
    n = new_tokens
    prompt_ids = prompt_ids.to(device=device, dtype=torch.long)
    rows = prompt_ids.shape[0]
    one = prompt_ids[:1]  # (1, P)
    batch = prompt_ids[torch.arange(batch_size, device=device) % rows]  # (B, P): rows tiled when R < B
    eos = _eos_token_id(model)
    pad = pad_token_id if pad_token_id is not None else _default_pad_id(model, eos)

    def run(ids: torch.Tensor, tokens: int, clock: _StepClock | None = None) -> Callable[[], None]:
        return lambda: _generate(model, ids, tokens, pad_token_id=pad, eos_token_id=eos, clock=clock)

    decode_steps: list[float] = []  # per timed batch-1 run: seconds per decode step, from its own step clock

    def timed_decode() -> None:
        clock = _StepClock(device)
        run(one, n, clock)()
        decode_steps.append(clock.seconds_per_step())

    was_training = model.training
    model.eval()  # inference as it is served: no dropout
    try:
        prefill = _repeat(run(one, 1), device, warmup=warmup, repeats=repeats)
        gen1 = _repeat(timed_decode, device, warmup=warmup, repeats=repeats)
        del decode_steps[:warmup]  # the warm-up runs' clocks
        gen_b = _repeat(run(batch, n), device, warmup=warmup, repeats=repeats)
        working, memory_method = _working_memory(run(batch, n), device)
    finally:
        model.train(was_training)

    weights = weight_bytes(model)
    params = count_parameters(model)
    return {
        "prefill_seconds": summarize(prefill),
        "latency_per_token_seconds": summarize(decode_steps),
        "tokens_per_second_batch1": summarize([n / t for t in gen1]),
        "throughput_tokens_per_second": summarize([batch_size * n / t for t in gen_b]),
        "generate_seconds_batch1": summarize(gen1),
        "generate_seconds_batch": summarize(gen_b),
        "weight_bytes": weights,
        "working_memory_bytes": working,
        "peak_memory_bytes": None if working is None else weights + working,
        "memory_method": memory_method,
        "device": str(device),
        "device_name": _device_name(device),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "parameters": params["total"],
        "non_embedding_parameters": params["non_embedding"],
        "prompt_tokens": int(prompt_ids.shape[1]),
        "new_tokens": n,
        "batch_size": batch_size,
        "warmup": warmup,
        "repeats": repeats,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's unique parameters and buffers: sum of numel * element_size (a tied weight
    once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def disk_size(model_path: str | Path, gguf_file: str | None = None) -> dict[str, Any]:
    """Size on disk of the weights a model was loaded from.

    Args:
        model_path: a .gguf file, or a folder (of safetensors / pytorch .bin weights, or holding `gguf_file`).
        gguf_file: name of the .gguf file inside the folder `model_path`.

    Returns:
        {"bytes": total size, "format": "gguf" | "safetensors" | "pytorch", "files": [file names]}.
        A folder with both formats counts the safetensors files, which `from_pretrained` prefers.

    Raises:
        FileNotFoundError: the path, the GGUF file, or any weight file in the folder is missing.
    """
    path = Path(model_path).expanduser()
    if gguf_file is not None:
        path = path / gguf_file
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return {"bytes": path.stat().st_size, "format": "gguf", "files": [path.name]}
    if not path.is_dir():
        raise FileNotFoundError(
            f"model_path {str(path)!r}: no such folder (give a saved model folder, or a .gguf file / gguf_file)"
        )
    for fmt, pattern in (("safetensors", "*.safetensors"), ("pytorch", "*.bin")):
        files = sorted(path.glob(pattern))
        if files:
            return {"bytes": sum(f.stat().st_size for f in files), "format": fmt, "files": [f.name for f in files]}
    raise FileNotFoundError(f"no *.safetensors or *.bin weight files in {path}")


# ---------------------------------------------------------------------------------------------------- runs


class _StepClock(LogitsProcessor):
    """Reads the clock once per generated token (generate calls its logits processors once per step, right
    after that step's forward), so a run's decode steps are timed inside the run itself."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        _sync(self.device)  # CUDA: the step's kernels done before the time is read
        self.times.append(time.perf_counter())
        return scores

    def seconds_per_step(self) -> float:
        # N tokens: N clock reads, the first after the prefill; between first and last lie N - 1 decode steps.
        if len(self.times) < 2:
            raise RuntimeError(f"the step clock was read {len(self.times)} time(s); need 2 (new_tokens >= 2)")
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def _generate(
    model: PreTrainedModel,
    ids: torch.Tensor,
    tokens: int,
    *,
    pad_token_id: int,
    eos_token_id: int | list[int] | None,
    clock: _StepClock | None = None,
) -> None:
    # Everything as keywords, nothing from a GenerationConfig object: a passed config inherits the model's
    # sampling defaults (temperature, top_p) and transformers then warns on every call that they are unused.
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=tokens,
        min_new_tokens=tokens,  # EOS suppressed: every run does the same work
        use_cache=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        **({"logits_processor": LogitsProcessorList([clock])} if clock is not None else {}),
    )
    if out.shape != (ids.shape[0], ids.shape[1] + tokens):
        # A cost figure for a different amount of work would be silently wrong: refuse it.
        raise RuntimeError(
            f"generate returned shape {tuple(out.shape)} for prompts {tuple(ids.shape)} and {tokens} new tokens; "
            f"expected {(ids.shape[0], ids.shape[1] + tokens)}"
        )


def _repeat(fn: Callable[[], None], device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` timed calls of fn, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        gc.disable()  # a collection inside a timed run is noise that belongs to no model
        try:
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- memory


def _working_memory(fn: Callable[[], None], device: torch.device) -> tuple[int | None, str]:
    """Peak extra bytes while fn runs, above what was held just before, and the method used."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda_max_memory_allocated"
    _malloc_trim()
    before = _reset_rss_high_water_mark()
    if before is not None:
        fn()
        return max(0, _proc_status_bytes()["VmHWM"] - before), "rss_high_water_mark"
    return _sampled_working_memory(fn)


def _malloc_trim() -> None:
    """Hand memory freed by earlier runs back to the OS (glibc only; a no-op elsewhere).

    `alambic.utils.tune_allocator` raises glibc's trim threshold, so freed heap memory stays resident; a run
    reusing it would show no RSS growth and its working memory would read as (close to) zero.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_bytes() -> dict[str, int]:
    """VmRSS and VmHWM of this process from /proc/self/status, in bytes."""
    out = {}
    for line in _PROC_STATUS.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024  # "12345 kB"
    return out


def _reset_rss_high_water_mark() -> int | None:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return that RSS; None where it cannot be done."""
    try:
        _CLEAR_REFS.write_text("5")
        status = _proc_status_bytes()
        rss, hwm = status["VmRSS"], status["VmHWM"]
    except (OSError, KeyError, ValueError):
        return None
    # A kernel that accepts the write but does not reset the mark leaves it above the RSS; allow for the RSS
    # moving by a few pages between the reset and the read.
    return rss if hwm <= rss + (1 << 20) else None


def _rss_reader() -> Callable[[], int] | None:
    """A function returning this process's RSS in bytes, or None when there is no way to read it."""
    if Path("/proc/self/statm").is_file():
        page = os.sysconf("SC_PAGE_SIZE")
        return lambda: int(Path("/proc/self/statm").read_text().split()[1]) * page
    try:
        import psutil
    except ImportError:
        return None
    process = psutil.Process()
    return lambda: process.memory_info().rss


def _sampled_working_memory(fn: Callable[[], None]) -> tuple[int | None, str]:
    """Working memory from a thread sampling the RSS every few ms: misses peaks shorter than a sample."""
    read = _rss_reader()
    if read is None:
        return None, "unavailable"
    before = read()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, read())
            done.wait(RSS_SAMPLE_SECONDS)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(0, max(peak, read()) - before), "rss_sampling"


# ---------------------------------------------------------------------------------------------------- inputs


def _model_device(model: PreTrainedModel) -> torch.device:
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise ValueError(
            f"model: parameters on {len(devices)} devices ({', '.join(sorted(map(str, devices)))}); measure_cost "
            "times a model on one device: load it without device_map or move it with .to(device)"
        )
    device = devices.pop()
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"model on device {device}: measure_cost measures on 'cpu' or 'cuda' only")
    return device


def _validate(
    model: PreTrainedModel, prompt_ids: torch.Tensor, *, new_tokens: int, batch_size: int, warmup: int, repeats: int
) -> None:
    """Collect every problem with the arguments and raise one ValueError naming each."""
    problems = []
    if new_tokens < 2:
        problems.append(
            f"new_tokens must be >= 2 (latency per token is measured on the N - 1 decode steps "
            f"after the first token), got {new_tokens}"
        )
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if warmup < 0:
        problems.append(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        problems.append(f"repeats must be >= 1, got {repeats}")
    if not isinstance(prompt_ids, torch.Tensor):
        problems.append(
            f"prompt_ids must be a torch.Tensor of shape (rows, prompt_tokens), got {type(prompt_ids).__name__}"
        )
    elif prompt_ids.dim() != 2 or prompt_ids.numel() == 0:
        problems.append(
            f"prompt_ids must be 2-D (rows, prompt_tokens) and non-empty, got shape {tuple(prompt_ids.shape)}"
        )
    elif prompt_ids.dtype.is_floating_point or prompt_ids.dtype.is_complex or prompt_ids.dtype == torch.bool:
        problems.append(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}")
    else:
        vocab = model.get_input_embeddings().num_embeddings
        lo, hi = int(prompt_ids.min()), int(prompt_ids.max())
        if lo < 0 or hi >= vocab:
            problems.append(
                f"prompt_ids must be token ids in [0, {vocab}) (the model's vocabulary), got values in "
                f"[{lo}, {hi}]: were they made by this model's tokenizer?"
            )
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions is not None and prompt_ids.shape[1] + new_tokens > max_positions:
            problems.append(
                f"prompt_ids length {prompt_ids.shape[1]} + new_tokens {new_tokens} exceeds the model's "
                f"max_position_embeddings {max_positions}: use shorter prompts or fewer new tokens"
            )
    if problems:
        raise ValueError("measure_cost: " + "; ".join(problems))


def _eos_token_id(model: PreTrainedModel) -> int | list[int] | None:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    return eos if eos is not None else getattr(model.config, "eos_token_id", None)


def _default_pad_id(model: PreTrainedModel, eos: int | list[int] | None) -> int:
    for source in (getattr(model, "generation_config", None), model.config):
        pad = getattr(source, "pad_token_id", None)
        if pad is not None:
            return pad
    if eos is not None:
        return eos[0] if isinstance(eos, list) else eos
    # No row is ever padded (equal-length prompts, EOS suppressed): the id only keeps generate from guessing.
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
