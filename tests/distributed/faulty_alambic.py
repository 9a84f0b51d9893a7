"""`python -m alambic` with faults a test asks for, by environment (tests/distributed/test_launch.py):

- FAIL_RANK, FAIL_STAGE: that rank raises `ValueError("injected failure on rank R")` when the stage starts;
- STEP_SLEEP: seconds each training step sleeps first, so that a test can kill a rank mid-training;
- SLEEP_STAGE, STAGE_SLEEP: that stage sleeps that many seconds first (on the ranks that run it), having made the
  empty file SLEEP_MARK.<rank>, so that a test can kill a rank while the others wait.
"""

import dataclasses
import os
import sys
import time

import alambic.stages

rank = int(os.environ.get("RANK", "0"))

if os.environ.get("FAIL_STAGE") and rank == int(os.environ.get("FAIL_RANK", "-1")):

    def fail(config, ctx):
        raise ValueError(f"injected failure on rank {rank}")

    alambic.stages.STAGES[:] = [
        dataclasses.replace(s, run=fail) if s.name == os.environ["FAIL_STAGE"] else s for s in alambic.stages.STAGES
    ]

if os.environ.get("SLEEP_STAGE"):

    def sleeping(run):
        def sleep_first(config, ctx):
            if os.environ.get("SLEEP_MARK"):
                open(f"{os.environ['SLEEP_MARK']}.{rank}", "w").close()
            time.sleep(float(os.environ["STAGE_SLEEP"]))
            return run(config, ctx)

        return sleep_first

    alambic.stages.STAGES[:] = [
        dataclasses.replace(s, run=sleeping(s.run)) if s.name == os.environ["SLEEP_STAGE"] else s
        for s in alambic.stages.STAGES
    ]

if os.environ.get("STEP_SLEEP"):
    from alambic.training.trainer import DistillationTrainer

    step = DistillationTrainer.training_step

    def slow_step(self, *args, **kwargs):
        time.sleep(float(os.environ["STEP_SLEEP"]))
        return step(self, *args, **kwargs)

    DistillationTrainer.training_step = slow_step

from alambic.cli import main  # noqa: E402

sys.argv[0] = "alambic"
main()
