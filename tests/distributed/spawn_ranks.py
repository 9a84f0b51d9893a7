"""Run `ddp_worker.py` alone or as N ranks under torchrun (`sharded_launch.launch`), and the chat data it trains on."""

import json
from pathlib import Path
from typing import Any

import torch
from sharded_launch import launch

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
    output = launch(WORKER, {**spec, "out": str(out)}, processes, timeout)
    result = json.loads((out / "result.json").read_text())
    result["counts"] = [json.loads((out / f"counts{r}.json").read_text()) for r in range(processes)]
    result["student"] = torch.load(out / "student.pt")
    result["output"] = output
    return result
