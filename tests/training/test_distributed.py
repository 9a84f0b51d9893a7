"""Data parallelism through the Trainer's own launcher path: 2 CPU processes (gloo) equal one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_step.py")
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _step(out: Path, launcher: list[str], per_device: int) -> dict[str, torch.Tensor]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, *launcher, str(SCRIPT), str(out), str(per_device)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "student.pt")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_processes_take_the_same_step_as_one(tmp_path):
    # chat data: the two ranks count different numbers of tokens, so the global-count normalisation matters
    single = _step(tmp_path / "single", [], per_device=4)
    ddp = _step(tmp_path / "ddp", TORCHRUN, per_device=2)
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # the reported loss too: the mean over both ranks' tokens, not rank 0's alone
    losses = [float((tmp_path / run / "train_loss.txt").read_text()) for run in ("single", "ddp")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
