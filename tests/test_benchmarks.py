"""Smoke test of `benchmarks/step.py`: the CI-sized run prints and writes every method's figures."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "step.py"
METHODS = ("naive", "alambic", "sft_floor", "alambic_cache", "sft")


def test_step_benchmark_tiny(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(BENCH),
        "--scale",
        "tiny",
        "--pair",
        "smollm2",
        "--methods",
        ",".join(METHODS),
        "--warmup",
        "1",
        "--steps",
        "1",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"benchmark failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"

    table_rows = {line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert set(METHODS) <= table_rows, f"printed table lacks {set(METHODS) - table_rows}:\n{proc.stdout}"

    data = json.loads(out.read_text())
    results = {r["method"]: r for r in data["pairs"]["smollm2"]["results"]}
    assert set(results) == set(METHODS)
    for name, r in results.items():
        assert r["status"] == "ok", f"{name}: {r['status']}: {r['reason']}"
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0, f"{name}: {r}"
    # Same models, same batch: the chunked path's loss is the naive reference's.
    assert abs(results["alambic"]["loss"] - results["naive"]["loss"]) <= 1e-4 * max(1.0, abs(results["naive"]["loss"]))


def test_cost_stability_benchmark_tiny(tmp_path):
    """Two fresh processes measure a tiny saved model; the comparison table and both runs are written. Tiny-model
    millisecond timings are too noisy to require a PASS (exit 1 is a FAIL verdict, not a crash)."""
    from helpers import save_tiny_pair

    folder = save_tiny_pair(tmp_path)
    out = tmp_path / "cost.json"
    cmd = [
        sys.executable,
        str(BENCH.parent / "cost_stability.py"),
        "--model",
        str(folder),
        "--new-tokens",
        "4",
        "--prompt-tokens",
        "8",
        "--batch-size",
        "2",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode in (0, 1), f"benchmark crashed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "| peak memory |" in proc.stdout and "# result:" in proc.stdout
    runs = json.loads(out.read_text())["models"][str(folder)]["runs"]
    assert len(runs) == 2 and all(r["peak_memory_bytes"] > 0 for r in runs)
