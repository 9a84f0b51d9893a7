"""DeepSpeed through alambic's own training (the Trainer's DeepSpeed path, DeepSpeed's CPU accelerator, gloo): with
the fused chunked loss, 2 processes under ZeRO-3 (heads gathered by `sharding.through_heads`) and ZeRO-2 take the
same three steps as one process with the same global batch, the teacher sharded or replicated."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from sharded_launch import launch

pytest.importorskip("deepspeed", reason="the `deepspeed` extra is not installed")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

WORKER = Path(__file__).with_name("deepspeed_worker.py")
EXAMPLES = Path(__file__).parents[2] / "examples" / "scale" / "accelerate"
RUNS = {
    # ZeRO-3 partitions the student; the teacher follows it (auto), tied embeddings (the head is the embedding's)
    "zero3": {"stage": 3, "processes": 2},
    # ZeRO-3 with an untied head, the teacher a whole copy per rank (training.shard_teacher: false)
    "zero3_untied": {"stage": 3, "processes": 2, "tie": False, "shard_teacher": False},
    "zero2": {"stage": 2, "processes": 2},
    # two micro-batches of one sequence per rank and step: the head's gradient accumulates across them
    "zero3_accumulation": {"stage": 3, "processes": 2, "accumulation": 2},
    # the user's command: accelerate launch with the shipped ZeRO-3 config (its DeepSpeed plugin), on CPU here
    "accelerate_zero3": {"stage": None, "processes": 2, "accelerate": "zero3.yaml"},
    "single": {"stage": None, "processes": 1},
    "single_untied": {"stage": None, "processes": 1, "tie": False},
}
ENV = {"DS_ACCELERATOR": "cpu"}  # DeepSpeed's CPU accelerator (its collectives through gloo here)


def build_shared_memory_op() -> None:
    """Compile DeepSpeed's CPU collective (its shared-memory op, built on first use into ~/.cache/torch_extensions)
    once, in one process, before any launch: two ranks compiling into a fresh cache at once can race, and one of
    them fails (seen here with the cache emptied)."""
    build = (
        "from deepspeed.accelerator import get_accelerator; "
        "get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
    )
    subprocess.run(
        [sys.executable, "-c", build], env={**os.environ, **ENV}, check=True, capture_output=True, timeout=600
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    build_shared_memory_op()
    results = {}
    for name, run in RUNS.items():
        out = tmp_path_factory.mktemp(name)
        settings = {k: v for k, v in run.items() if k not in ("processes", "accelerate")}
        config = None
        if "accelerate" in run:  # the shipped file, on CPU: use_cpu, no GPU ids
            shipped = yaml.safe_load((EXAMPLES / run["accelerate"]).read_text())
            config = out / run["accelerate"]
            config.write_text(yaml.safe_dump({**shipped, "use_cpu": True, "gpu_ids": None}))
        launch(WORKER, {"out": str(out), **settings}, run["processes"], timeout=600, env=ENV, accelerate_config=config)
        results[name] = {**json.loads((out / "result.json").read_text()), "student": torch.load(out / "student.pt")}
    return results


@pytest.mark.parametrize(
    ("run", "reference", "partitioned"),
    [
        ("zero3", "single", {"student": True, "teacher": True}),
        ("zero3_untied", "single_untied", {"student": True, "teacher": False}),
        ("zero2", "single", {"student": False, "teacher": False}),
        ("zero3_accumulation", "single", {"student": True, "teacher": True}),
        ("accelerate_zero3", "single", {"student": True, "teacher": True}),
    ],
)
def test_two_deepspeed_ranks_train_as_one_process(runs, run, reference, partitioned):
    two, one = runs[run], runs[reference]
    assert {"student": two["student_partitioned"], "teacher": two["teacher_partitioned"]} == partitioned
    steps = [[r for r in result["log_history"] if "learning_rate" in r] for result in (one, two)]
    assert [r["step"] for r in steps[0]] == [r["step"] for r in steps[1]] == [1, 2, 3]
    for a, b in zip(*steps):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"{run}, step {a['step']}"
        for key in ("loss_soft", "loss_hard"):  # (logged rounded to 6 decimals: one unit apart at most)
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1.5e-6), f"{run}, step {a['step']}: {key}"
    # held-out: the loss parts (per-token means over every rank's tokens) read the heads under no_grad
    # (the Trainer's own eval_loss averages DeepSpeed's per-batch values otherwise: not compared)
    evals = [[r for r in result["log_history"] if "eval_loss" in r] for result in (one, two)]
    for key in ("eval_loss_soft", "eval_loss_hard"):
        assert evals[1][0][key] == pytest.approx(evals[0][0][key], rel=1e-5, abs=1.5e-6), key
    for key, value in one["student"].items():
        torch.testing.assert_close(two["student"][key], value, rtol=1e-4, atol=1e-6, msg=f"{run}: {key}")
    head = (
        "lm_head.weight"
        if "lm_head.weight" in one["student"] and reference.endswith("untied")
        else "model.embed_tokens.weight"
    )
    from helpers import tiny_model

    start = tiny_model("llama", seed=2, num_layers=2, tie=not reference.endswith("untied")).state_dict()
    assert float((one["student"][head] - start[head]).abs().max()) > 1e-3  # the head did train
