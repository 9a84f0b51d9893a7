"""Inference cost: what is run, how the figures follow from the timings, memory, size on disk."""

from __future__ import annotations

import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import alambic.evaluation.cost as cost
from alambic.evaluation.cost import disk_size, measure_cost, summarize, weight_bytes
from alambic.models import count_parameters
from helpers import tiny_model

P, N, B, WARMUP, REPEATS = 8, 4, 4, 1, 2
TIMED = (
    "prefill_seconds",
    "latency_per_token_seconds",
    "tokens_per_second_batch1",
    "throughput_tokens_per_second",
    "generate_seconds_batch1",
    "generate_seconds_batch",
)


def record_generate(model) -> list[tuple[torch.Tensor, int, tuple[int, ...]]]:
    """Wrap model.generate; each call appends (input ids, max_new_tokens, output shape)."""
    calls, original = [], model.generate

    def generate(input_ids, **kwargs):
        out = original(input_ids, **kwargs)
        calls.append((input_ids.clone(), kwargs["max_new_tokens"], tuple(out.shape)))
        return out

    model.generate = generate
    return calls


@pytest.fixture(scope="module")
def measured(one_thread):
    model = tiny_model("llama").train()  # training mode on purpose: measure_cost must leave it so
    prompts = torch.randint(4, 300, (3, P), generator=torch.Generator().manual_seed(0))  # 3 rows < B: tiled
    calls = record_generate(model)
    result = measure_cost(model, prompts, new_tokens=N, batch_size=B, warmup=WARMUP, repeats=REPEATS)
    return model, prompts, calls, result


def test_keys_and_types(measured):
    _, _, _, r = measured
    for key in TIMED:
        stats = r[key]
        assert set(stats) == {"median", "min", "max", "spread", "values"}, key
        assert len(stats["values"]) == REPEATS and all(isinstance(v, float) for v in stats["values"]), key
        assert stats["min"] <= stats["median"] <= stats["max"], key
        assert stats["spread"] == pytest.approx((stats["max"] - stats["min"]) / stats["median"]), key
    for key in (
        "prefill_seconds",
        "generate_seconds_batch1",
        "generate_seconds_batch",
        "tokens_per_second_batch1",
        "throughput_tokens_per_second",
    ):
        assert r[key]["min"] > 0, key
    for key in (
        "weight_bytes",
        "working_memory_bytes",
        "peak_memory_bytes",
        "parameters",
        "non_embedding_parameters",
        "torch_threads",
    ):
        assert isinstance(r[key], int), key
    assert r["device"] == "cpu" and isinstance(r["device_name"], str) and r["device_name"]
    assert r["dtype"] == "float32"
    assert r["torch_threads"] == 1  # the one_thread fixture
    sizes = (r["prompt_tokens"], r["new_tokens"], r["batch_size"], r["warmup"], r["repeats"])
    assert sizes == (P, N, B, WARMUP, REPEATS)
    assert r["memory_method"] == "rss_high_water_mark"  # Linux: the exact method, not the sampling fallback


def test_every_run_generates_exactly_the_asked_tokens(measured):
    _, prompts, calls, _ = measured
    runs = WARMUP + REPEATS
    shapes = [(tuple(ids.shape), n, out) for ids, n, out in calls]
    assert shapes == (
        [((1, P), 1, (1, P + 1))] * runs  # prefill: time to first token
        + [((1, P), N, (1, P + N))] * runs  # batch 1
        + [((B, P), N, (B, P + N))] * (runs + 1)  # batch B, and the memory run
    )
    assert all(torch.equal(ids, prompts[:1]) for ids, _, _ in calls[: 2 * runs])  # batch 1 uses row 0
    assert torch.equal(calls[-1][0], prompts[[0, 1, 2, 0]])  # the first B rows, tiled


def test_eos_is_suppressed(one_thread):
    model = tiny_model("llama")
    prompt = torch.randint(4, 300, (1, P), generator=torch.Generator().manual_seed(1))
    first = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=1)[0, -1]
    model.generation_config.eos_token_id = model.config.eos_token_id = int(first)
    # Precondition: plain greedy generation now stops after one token.
    plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=N)
    assert plain.shape[1] == P + 1
    calls = record_generate(model)
    measure_cost(model, prompt, new_tokens=N, batch_size=2, warmup=0, repeats=1)
    assert [out[1] - P for _, _, out in calls] == [1, N, N, N]


def test_parameters_are_count_parameters(measured):
    model, _, _, r = measured
    counts = count_parameters(model)
    assert (r["parameters"], r["non_embedding_parameters"]) == (counts["total"], counts["non_embedding"])


def test_weight_bytes_is_the_unique_tensors_bytes(measured):
    model, _, _, r = measured
    by_storage = {}  # the tied embedding / lm_head is one storage, counted once
    for _, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        by_storage[t.data_ptr()] = t.numel() * t.element_size()
    assert r["weight_bytes"] == weight_bytes(model) == sum(by_storage.values())
    assert r["weight_bytes"] < sum(t.numel() * 4 for _, t in model.named_parameters(remove_duplicate=False))  # tied
    assert r["working_memory_bytes"] >= 0
    assert r["peak_memory_bytes"] == r["weight_bytes"] + r["working_memory_bytes"] >= r["weight_bytes"]


def test_rates_follow_from_the_timings(measured):
    _, _, _, r = measured
    t1, tb = r["generate_seconds_batch1"]["values"], r["generate_seconds_batch"]["values"]
    assert r["throughput_tokens_per_second"]["values"] == pytest.approx([B * N / t for t in tb])
    assert r["tokens_per_second_batch1"]["values"] == pytest.approx([N / t for t in t1])
    # One decode step, timed inside each batch-1 run: positive, and at most that run's whole time / (N - 1).
    assert all(0 < lat <= t / (N - 1) for lat, t in zip(r["latency_per_token_seconds"]["values"], t1, strict=True))
    assert r["throughput_tokens_per_second"]["median"] == pytest.approx(statistics.median([B * N / t for t in tb]))


def test_latency_per_token_is_timed_inside_the_decode_runs(one_thread):
    """A slow prefill run (noise: another process, a page fault) must not leak into the decode latency.

    Before, latency was (batch-1 run - median prefill run) / (N - 1): two runs timed apart, which went negative
    under load (seen: -2.5 ms / token in a full pipeline on a loaded machine)."""
    model = tiny_model("llama")
    prompts = torch.randint(4, 300, (2, P), generator=torch.Generator().manual_seed(0))
    original = model.generate

    def generate(input_ids, **kwargs):
        if kwargs["max_new_tokens"] == 1:
            time.sleep(0.3)  # only the prefill runs are slow
        return original(input_ids, **kwargs)

    model.generate = generate
    r = measure_cost(model, prompts, new_tokens=N, batch_size=2, warmup=0, repeats=2)
    assert r["prefill_seconds"]["min"] >= 0.3
    assert all(0 < v < 0.3 / (N - 1) for v in r["latency_per_token_seconds"]["values"]), r["latency_per_token_seconds"]


def test_mode_is_restored(measured, one_thread):
    model, prompts, _, _ = measured
    assert model.training  # it was measured from training mode
    model.eval()
    measure_cost(model, prompts, new_tokens=2, batch_size=1, warmup=0, repeats=1)
    assert not model.training


def test_working_memory_holds_the_kv_cache(one_thread, monkeypatch):
    """The memory run must see at least the final KV cache; the sampling fallback too."""
    model = tiny_model("llama", hidden_size=256, heads=4, kv_heads=4, num_layers=2, intermediate_size=256)
    prompts = torch.randint(4, 300, (8, 128), generator=torch.Generator().manual_seed(0))
    n = 32
    kv_bytes = 2 * 2 * 8 * (128 + n) * 256 * 4  # (k, v) x layers x B x T x kv_heads * head_dim x fp32
    r = measure_cost(model, prompts, new_tokens=n, batch_size=8, warmup=1, repeats=1)
    assert r["memory_method"] == "rss_high_water_mark"
    assert r["working_memory_bytes"] >= kv_bytes, (r["working_memory_bytes"], kv_bytes)

    monkeypatch.setattr(cost, "_reset_rss_high_water_mark", lambda: None)  # e.g. clear_refs refused
    r = measure_cost(model, prompts, new_tokens=n, batch_size=8, warmup=0, repeats=1)
    assert r["memory_method"] == "rss_sampling"
    assert r["working_memory_bytes"] >= kv_bytes // 2, (r["working_memory_bytes"], kv_bytes)


def test_memory_after_tune_allocator_is_trimmed(tmp_path):
    """With glibc's trim threshold raised (as the CLI does), memory freed by the timed runs stays resident;
    without malloc_trim the memory run would reuse it and read ~0. Own process: mallopt is process-wide."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from helpers import tiny_model
        from alambic.evaluation.cost import measure_cost
        from alambic.utils import tune_allocator
        tune_allocator()
        torch.set_num_threads(1)
        model = tiny_model("llama", hidden_size=256, heads=4, kv_heads=4, num_layers=2, intermediate_size=256)
        r = measure_cost(model, torch.randint(4, 300, (8, 128)), new_tokens=32, batch_size=8, warmup=1, repeats=1)
        print(r["working_memory_bytes"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) >= 2 * 2 * 8 * (128 + 32) * 256 * 4


@pytest.mark.parametrize(
    ("kwargs", "prompts", "named"),
    [
        (dict(new_tokens=1), None, "new_tokens"),
        (dict(repeats=0), None, "repeats"),
        (dict(warmup=-1), None, "warmup"),
        (dict(batch_size=0), None, "batch_size"),
        ({}, torch.zeros(5, dtype=torch.long), "prompt_ids"),
        ({}, torch.zeros(0, 4, dtype=torch.long), "prompt_ids"),
        ({}, torch.zeros(1, 4), "prompt_ids"),
        ({}, torch.full((1, 4), 10_000), "prompt_ids"),
        ({}, torch.zeros(1, 510, dtype=torch.long), "max_position_embeddings"),
    ],
)
def test_bad_arguments_are_named(kwargs, prompts, named):
    model = tiny_model("llama")
    prompts = torch.zeros(1, 4, dtype=torch.long) if prompts is None else prompts
    with pytest.raises(ValueError, match=named):
        measure_cost(model, prompts, **{"new_tokens": 4, **kwargs})


def test_summarize():
    s = summarize([2.0, 1.0, 4.0])
    assert s == {"median": 2.0, "min": 1.0, "max": 4.0, "spread": 1.5, "values": [2.0, 1.0, 4.0]}
    assert summarize([0.0])["spread"] is None
    with pytest.raises(ValueError, match="repeats"):
        summarize([])


def test_disk_size_of_a_saved_model(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    files = sorted((tmp_path / "m").glob("*.safetensors"))
    assert files
    size = disk_size(tmp_path / "m")
    assert size == {
        "bytes": sum(f.stat().st_size for f in files),
        "format": "safetensors",
        "files": [f.name for f in files],
    }
    # fp32 weights, tied embedding stored once: about weight_bytes minus the non-persistent buffers
    assert size["bytes"] >= sum(p.numel() * 4 for p in tiny_model("llama").parameters())


def test_disk_size_of_pytorch_bin(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 123)
    assert disk_size(str(tmp_path)) == {"bytes": 123, "format": "pytorch", "files": ["pytorch_model.bin"]}


def test_disk_size_of_a_gguf_file(tmp_path):
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"GGUF" + bytes(996))
    expected = {"bytes": 1000, "format": "gguf", "files": ["model.Q4_1.gguf"]}
    assert disk_size(tmp_path / "model.Q4_1.gguf") == expected
    assert disk_size(tmp_path, gguf_file="model.Q4_1.gguf") == expected


def test_disk_size_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        disk_size(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        disk_size(tmp_path, gguf_file="absent.gguf")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        disk_size(tmp_path)
