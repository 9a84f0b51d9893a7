"""FSDP2 with the fused chunked loss: 2 CPU processes (gloo) with `fully_shard` applied directly take the same three
steps as one process with the same global batch, whether the head is whole or sharded when the loss reads it, and
whether the teacher is sharded or replicated (training.shard_teacher)."""

import json
from pathlib import Path

import pytest
import torch
from sharded_launch import launch

from helpers import tiny_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

WORKER = Path(__file__).with_name("fsdp_worker.py")
SCENARIOS = {
    # the head in the root unit (never resharded after forward), the teacher a whole copy on each rank
    "root_replicated": {"unit": "root", "shard_teacher": False},
    # accelerate's FSDP2 layout (final norm, tied embeddings and head in one unit), the teacher sharded (auto)
    "tail_sharded": {"unit": "tail", "shard_teacher": "auto"},
    "tail_untied": {"unit": "tail", "tie": False, "shard_teacher": "auto"},
    # the head's unit resharded after forward: the loss must gather it (sharding.through_heads)
    "resharded_untied": {"unit": "resharded", "tie": False, "shard_teacher": True},
    # a second teacher and feature terms (attention maps, hidden states of the same width: no projector)
    "ensemble_features": {"unit": "resharded", "shard_teacher": True, "ensemble": True, "features": True},
    # the full loss: the sharded teacher's head gathers itself when called (its own unit, sharding.shard_frozen)
    "full_sharded": {"unit": "tail", "shard_teacher": True, "implementation": "full"},
    # the offline cache's fused loss: the student's head alone, resharded after forward
    "cached_resharded": {"unit": "resharded", "tie": False, "cached": True},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for name, processes in (("single", 1), ("fsdp", 2)):
        out = tmp_path_factory.mktemp(name)
        launch(WORKER, {"out": str(out), "scenarios": SCENARIOS}, processes, timeout=600)
        folders[name] = out
    return folders


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_sharded_ranks_train_as_one_process(runs, scenario):
    one, two = (json.loads((runs[run] / f"{scenario}.json").read_text()) for run in ("single", "fsdp"))
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-5), f"{scenario}: losses per step {two} vs one process {one}"
    single, sharded = (torch.load(runs[run] / f"{scenario}.pt") for run in ("single", "fsdp"))
    assert single.keys() == sharded.keys()
    # the steps moved the weights (head included): no trivial agreement of steps that did nothing
    start = dict(tiny_model("llama", seed=2, num_layers=2, tie=SCENARIOS[scenario].get("tie", True)).named_parameters())
    head = "lm_head.weight" if "lm_head.weight" in single else "model.embed_tokens.weight"
    assert not torch.allclose(single[head], start[head].detach(), atol=1e-4)
    for name, value in single.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=1e-5, msg=f"{scenario}: {name}")
