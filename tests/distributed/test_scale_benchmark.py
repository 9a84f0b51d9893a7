"""Smoke test of `benchmarks/scale.py` at its CI size: 2 gloo processes under torch.distributed.run, DDP through
alambic's training and FSDP2 with the chunked loss, each rank's figures written and tabulated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"


def test_scale_benchmark_tiny_two_processes(tmp_path):
    out = tmp_path / "scale.json"
    cmd = [
        sys.executable,
        str(BENCH),
        "--tiny",
        "--procs",
        "2",
        "--engines",
        "ddp,fsdp",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--batch",
        "2",
        "--seq",
        "16",
        "--timeout",
        "240",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"benchmark failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    rows = {
        tuple(cell.strip() for cell in line.split("|")[1:3])
        for line in proc.stdout.splitlines()
        if line.startswith("| ddp") or line.startswith("| fsdp")
    }
    assert rows == {("ddp", "2"), ("fsdp", "2")}, proc.stdout

    results = {r["engine"]: r for r in json.loads(out.read_text())["results"]}
    for engine, r in results.items():
        assert r["status"] == "ok" and r["tokens_per_second"] > 0, f"{engine}: {r}"
        assert [rank["rank"] for rank in r["ranks"]] == [0, 1]
        assert all(b > 0 for b in r["peak_bytes_per_rank"] + r["state_bytes_per_rank"]), f"{engine}: {r}"
        assert r["tokens_per_step"] == 2 * 2 * 16  # both ranks' tokens
    # DDP replicates everything; FSDP gives each of the 2 ranks half of the student, its gradients, AdamW's
    # moments and the teacher (uneven splits of odd dimensions aside)
    ratio = max(results["fsdp"]["state_bytes_per_rank"]) / max(results["ddp"]["state_bytes_per_rank"])
    assert 0.45 < ratio < 0.6, ratio
    assert all(rank["teacher_sharded"] for rank in results["fsdp"]["ranks"])  # training.shard_teacher: true
    # the DDP run is alambic's own training: its train summary records the scale the report shows
    scale = results["ddp"]["ranks"][0]["alambic_scale"]
    assert scale["world_size"] == 2 and scale["engine"] == "ddp"
