"""`--resume` on another number of processes: a DDP checkpoint (full weights and optimizer state) continues on one
process as if never interrupted; a checkpoint of per-rank shards (FSDP, DeepSpeed ZeRO) is refused by name."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from spawn_ranks import run_worker, write_chat

from alambic.training.checkpoints import SCALE_FILE, ResumeScaleError, check_resume_scale

SPEC = {"accumulation": 1, "save_steps": 1}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_a_two_rank_ddp_checkpoint_resumes_on_one_process_and_a_sharded_one_is_refused(tmp_path):
    chat = str(write_chat(tmp_path / "chat.jsonl"))
    run = tmp_path / "run"
    # 2 ranks x 2 sequences, checkpoints at steps 1 and 2; then 1 process x 4 (the same global batch) to step 3
    run_worker(
        {**SPEC, "chat": chat, "out": tmp_path / "ddp", "run": str(run), "per_device": 2, "max_steps": 2}, processes=2
    )
    record = json.loads((run / "checkpoints" / "checkpoint-2" / SCALE_FILE).read_text())
    assert record == {
        "world_size": 2,
        "engine": "ddp",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
    }

    # the same checkpoints, as if FSDP had sharded them over the 2 ranks: one process cannot read them
    sharded = tmp_path / "sharded"
    shutil.copytree(run, sharded)
    for folder in (sharded / "checkpoints").glob("checkpoint-*"):
        (folder / SCALE_FILE).write_text(json.dumps({**record, "engine": "fsdp"}))
    with pytest.raises(
        AssertionError,
        match=r"ResumeScaleError: .*checkpoint-2 was written by 2 processes under "
        r"fsdp.*this launch runs 1 process under single",
    ):
        run_worker(
            {**SPEC, "chat": chat, "out": tmp_path / "refused", "run": str(sharded), "per_device": 4, "max_steps": 3},
            processes=1,
        )

    resumed = run_worker(
        {**SPEC, "chat": chat, "out": tmp_path / "resumed", "run": str(run), "per_device": 4, "max_steps": 3},
        processes=1,
    )
    assert resumed["resumed_from"] == 2 and resumed["global_step"] == 3
    note = " ".join(resumed["output"].split())
    assert "written by 2 process(es) under ddp, on 1 under single" in note
    assert "rank 0 finds no random state" in note  # (one process reads rng_state.pth, not rng_state_0.pth)
    assert resumed["scale"]["world_size"] == 1

    # as if never interrupted: one process trained for 3 steps from the start (the weights, the Adam moments and
    # the data order all continued)
    straight = run_worker(
        {**SPEC, "chat": chat, "out": tmp_path / "straight", "per_device": 4, "max_steps": 3}, processes=1
    )
    for key, value in straight["student"].items():
        torch.testing.assert_close(resumed["student"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    # the whole run's mean loss covers the two ranks' steps and the resumed one
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)


def _checkpoint(tmp_path, record: dict | None):
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    if record is not None:
        (folder / SCALE_FILE).write_text(json.dumps(record))
    return folder


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed-zero2", "deepspeed-zero3"])
def test_sharded_checkpoints_of_another_world_size_are_refused_naming_both(tmp_path, engine):
    folder = _checkpoint(tmp_path, {"world_size": 4, "engine": engine})
    with pytest.raises(ResumeScaleError) as error:
        check_resume_scale(folder, {"world_size": 2, "engine": engine})
    message = str(error.value)
    assert f"written by 4 processes under {engine}" in message and f"runs 2 processes under {engine}" in message
    assert "--nproc_per_node 4" in message and "--restart" in message
    # the same world size and engine resume as ever
    assert check_resume_scale(folder, {"world_size": 4, "engine": engine}) is None


def test_a_sharded_checkpoint_needs_its_own_engine_too(tmp_path):
    folder = _checkpoint(tmp_path, {"world_size": 2, "engine": "deepspeed-zero2"})
    with pytest.raises(ResumeScaleError, match="under deepspeed-zero2.*2 processes under deepspeed-zero3"):
        check_resume_scale(folder, {"world_size": 2, "engine": "deepspeed-zero3"})


def test_full_state_checkpoints_resume_on_any_world_size_with_a_note(tmp_path):
    ddp = {"world_size": 2, "engine": "ddp", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}
    folder = _checkpoint(tmp_path, ddp)
    for rank in (0, 1):  # what the Trainer saved under 2 processes
        (folder / f"rng_state_{rank}.pth").write_bytes(b"")
    note = check_resume_scale(folder, {**ddp, "world_size": 4})
    assert "written by 2 process(es) under ddp, on 4 under ddp" in note
    assert "ranks 2, 3 find no random state" in note
    assert "global batch changes from 4 to 8" in note
    assert "global batch" not in check_resume_scale(
        folder, {**ddp, "world_size": 1, "engine": "single", "per_device_train_batch_size": 4}
    )


def test_a_checkpoint_older_than_the_record_counts_as_one_process(tmp_path):
    folder = _checkpoint(tmp_path, None)
    note = check_resume_scale(folder, {"world_size": 1, "engine": "single"})
    assert SCALE_FILE in note and "one process without sharding" in note
    assert "on 2 under ddp" in check_resume_scale(folder, {"world_size": 2, "engine": "ddp"})


ENGINE_SCRIPT = """
import socket, sys, tempfile
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import TrainingArguments
from alambic.training.base import AlambicTrainer
from helpers import tiny_model
model = tiny_model("llama", num_layers=2)
args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none")
print("before:", AlambicTrainer(model=model, args=args).scale_record()["engine"])
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
print("after:", AlambicTrainer(model=model, args=args).scale_record()["engine"])
dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_a_student_sharded_by_fully_shard_is_recorded_as_fsdp(tmp_path):
    # (FSDP2 applied by the caller, as on CPU where the Trainer's own FSDP options fall back to DDP): its checkpoints
    # must not be taken for DDP's full state
    tests = str(Path(__file__).parents[1])  # for helpers
    path = os.pathsep.join([tests, os.environ["PYTHONPATH"]]) if os.environ.get("PYTHONPATH") else tests
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", ENGINE_SCRIPT], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "before: single" in result.stdout and "after: fsdp" in result.stdout
