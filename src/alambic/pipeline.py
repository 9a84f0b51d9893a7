"""Stages of a run and the manifest that makes a run resumable.

Each stage reads some config sections, writes into the run folder and is recorded in
`manifest.json` (inputs hash, outputs, status, timings). Running again skips a stage that finished
with the same inputs, resumes one that was interrupted (training continues from its last complete
checkpoint) and redoes one whose inputs changed, and every stage after it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alambic.config import RunConfig, save_config
from alambic.utils import atomic_write_json, console, sha256_of


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections this stage reads (its own inputs hash)
    outputs: tuple[str, ...]  # paths, relative to the run folder, that exist once it is done
    run: Callable[[RunConfig, "StageContext"], dict[str, Any]]
    enabled: Callable[[RunConfig], bool] = lambda cfg: True


@dataclass
class StageContext:
    run_dir: Path
    resume: bool  # False when this stage's inputs changed: start it from scratch


class Manifest:
    """`manifest.json`: stage -> {inputs_hash, status, outputs, started, finished, seconds, summary}."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict[str, Any]] = {}
        if path.is_file():
            self.stages = json.loads(path.read_text()).get("stages", {})

    def save(self) -> None:
        atomic_write_json(self.path, {"stages": self.stages})

    def update(self, name: str, **fields: Any) -> None:
        self.stages.setdefault(name, {}).update(fields)
        self.save()


def _stage_hashes(config: RunConfig, stages: list[Stage]) -> dict[str, str]:
    """A stage's hash covers its own sections and the hash of every stage before it."""
    hashes, previous = {}, ""
    for stage in stages:
        hashes[stage.name] = sha256_of([previous, config.section_hash(*stage.sections), stage.name])
        previous = hashes[stage.name]
    return hashes


def run_stages(config: RunConfig, stages: list[Stage], *, resume: bool = True) -> Manifest:
    """Run `stages` in order into `config.run_dir`, skipping finished ones whose inputs are unchanged.

    Args:
        resume: False wipes the run folder first (`--restart`).

    Raises:
        Whatever a stage raises; the manifest then records the stage as failed.
    """
    run_dir = config.run_dir
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    manifest = Manifest(run_dir / "manifest.json")
    active = [s for s in stages if s.enabled(config)]
    hashes = _stage_hashes(config, active)
    for i, stage in enumerate(active, 1):
        entry = manifest.stages.get(stage.name, {})
        same_inputs = entry.get("inputs_hash") == hashes[stage.name]
        outputs_there = all((run_dir / o).exists() for o in stage.outputs)
        header = f"[bold]stage {i}/{len(active)}: {stage.name}[/]"
        if same_inputs and entry.get("status") == "done" and outputs_there:
            console.print(f"{header} [green]done already[/] (inputs unchanged), skipped")
            continue
        resuming = same_inputs and entry.get("status") in ("running", "failed")
        console.rule(header + (" [yellow](resuming)[/]" if resuming else ""))
        started = time.time()
        manifest.update(stage.name, inputs_hash=hashes[stage.name], status="running", started=started,
                        outputs=list(stage.outputs))
        try:
            summary = stage.run(config, StageContext(run_dir=run_dir, resume=same_inputs))
        except BaseException as exc:
            manifest.update(stage.name, status="failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                            seconds=round(time.time() - started, 2))
            raise
        manifest.update(stage.name, status="done", finished=time.time(), seconds=round(time.time() - started, 2),
                        summary=summary or {}, error=None)
        console.print(f"{header} [green]done[/] in {time.time() - started:.1f} s")
    return manifest
