"""DDP through alambic's own training (`training.run.train`, the Trainer with use_cpu under torchrun: gloo): N
processes x micro-batch B take the same steps as one process with N x B, and log the same loss parts."""

import pytest
import torch
from spawn_ranks import run_worker, write_chat

from helpers import tiny_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

PARTS = ("loss_soft", "loss_hard")


def step_logs(result: dict) -> list[dict]:
    """The training log of each step (logging_steps 1), in step order."""
    return [r for r in result["log_history"] if "learning_rate" in r]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_ranks_train_as_one_process_with_their_global_batch(tmp_path, accumulation):
    chat = write_chat(tmp_path / "chat.jsonl")
    spec = {"chat": str(chat), "accumulation": accumulation, "max_steps": 3, "save_steps": 100, "eval_steps": 3}
    single = run_worker({**spec, "out": tmp_path / "single", "per_device": 4}, processes=1)
    ddp = run_worker({**spec, "out": tmp_path / "ddp", "per_device": 2}, processes=2)

    # The test can fail: the two ranks count different numbers of tokens in their micro-batches, so a loss divided
    # by each rank's own count (or logged as rank 0's mean) would differ from the single process's.
    # (the data loader collates one micro-batch ahead: the counts beyond the trained ones are left out)
    micro = 3 * accumulation
    rank0, rank1 = (counts[:micro] for counts in ddp["counts"])
    assert rank0 != rank1
    # the same sequences per optimizer step: each single-process micro-batch is the two ranks' together
    assert [a + b for a, b in zip(rank0, rank1)] == single["counts"][0][:micro]

    # the chunked loss (the default) with a live teacher, soft and hard terms both on
    assert ddp["scale"]["engine"] == "ddp" and single["scale"]["engine"] == "single"
    one, two = step_logs(single), step_logs(ddp)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']}"
        # (Adam's step hardly changes when every gradient is scaled alike: the norm shows such a scale)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), f"step {a['step']}"
        for key in PARTS:  # (logged rounded to 6 decimals)
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), f"step {a['step']}: {key}"
        assert b["tokens_per_second"] > 0
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
    # the held-out loss parts too (8 sequences: 2 batches of 4, or of 2 per rank), over every rank's tokens
    one_eval, two_eval = ([r for r in result["log_history"] if "eval_loss" in r] for result in (single, ddp))
    assert len(one_eval) == len(two_eval) == 1
    for key in PARTS:
        assert two_eval[0][f"eval_{key}"] == pytest.approx(one_eval[0][f"eval_{key}"], rel=1e-5, abs=1e-6), key
    assert ddp["tokens_per_step"] == single["tokens_per_step"]  # every rank's (the report's tokens trained)
    for key, value in single["student"].items():
        torch.testing.assert_close(ddp["student"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    start = tiny_model("llama", seed=2, num_layers=2).state_dict()  # the worker's student before training
    assert max(float((single["student"][k] - v).abs().max()) for k, v in start.items()) > 1e-2  # it did train

    # part 6's record: the world size, engine, precision and each rank's peak memory
    scale = ddp["scale"]
    assert scale["world_size"] == 2 and scale["precision"] == "fp32"
    assert len(scale["peak_memory_bytes_per_rank"]) == 2 and all(b > 0 for b in scale["peak_memory_bytes_per_rank"])
    assert scale["memory_kind"] == "process peak RSS"
    assert single["scale"]["world_size"] == 1 and len(single["scale"]["peak_memory_bytes_per_rank"]) == 1
