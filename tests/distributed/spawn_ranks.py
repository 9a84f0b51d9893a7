"""Run `ddp_worker.py` alone or as N ranks under torchrun, as the launchers do (gloo on CPU), with a timeout that
kills the whole process group: a hung collective must fail the test, never hang CI."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
NEWS_WORDS = (
    "Markets rallied on Monday as the central bank held interest rates steady for a third month while the "
    "team won the cup final after extra time with a late goal from the young striker"
).split()


def write_chat(path: Path, rows: int = 40) -> Path:
    """Chat rows whose responses run from 3 to 24 words: micro-batches count different numbers of tokens, so a
    per-rank mean differs from the global one."""
    lines = [
        {
            "prompt": f"Question {i}: what happened?",
            "response": " ".join(NEWS_WORDS[(i * 5) % 7 : (i * 5) % 7 + 3 + (i * 7) % 22]),
        }
        for i in range(rows)
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def run_worker(spec: dict[str, Any], processes: int, timeout: float = 300) -> dict[str, Any]:
    """Train as `spec` says on `processes` ranks; return rank 0's result.json, with `counts` (each rank's counted
    tokens per micro-batch) and `student` (the final weights) added."""
    out = Path(spec["out"])
    launcher = (
        [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a single process must not think itself launched
    proc = subprocess.Popen(
        [sys.executable, *launcher, str(WORKER), json.dumps({**spec, "out": str(out)})],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
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
    result = json.loads((out / "result.json").read_text())
    result["counts"] = [json.loads((out / f"counts{r}.json").read_text()) for r in range(processes)]
    result["student"] = torch.load(out / "student.pt")
    result["output"] = output
    return result
