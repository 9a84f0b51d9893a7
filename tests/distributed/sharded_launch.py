"""Run a worker script (ddp_worker.py, fsdp_worker.py, deepspeed_worker.py, split_worker.py) alone or as N ranks under
torchrun or accelerate launch, as the launchers do (gloo on CPU), with a timeout that kills the whole process group: a
hung collective fails the test, never hangs CI."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any


def launch(
    worker: Path,
    spec: dict[str, Any] | list[str],
    processes: int,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    accelerate_config: Path | None = None,
) -> str:
    """Run `worker SPEC_JSON` (or `worker *spec` when `spec` is a list of arguments) on `processes` ranks, under
    torchrun, or under `accelerate launch` with `accelerate_config`; return its output. Raises AssertionError on
    failure or timeout."""
    launcher = (
        [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    )
    if accelerate_config is not None:
        launcher = [
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(accelerate_config),
            "--num_processes",
            str(processes),
        ]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environ.pop(name, None)  # a single process must not think itself launched
    proc = subprocess.Popen(
        [sys.executable, *launcher, str(worker), *(spec if isinstance(spec, list) else [json.dumps(spec)])],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environ,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers alike
        output, _ = proc.communicate()
        raise AssertionError(f"{processes} process(es) still running after {timeout} s:\n{output[-3000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{processes} process(es) failed (exit {proc.returncode}):\n{output[-4000:]}")
    return output
