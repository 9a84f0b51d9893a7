"""Stages of a run and the manifest that makes a run resumable.

Each stage reads some config fields (its declared inputs), writes into the run folder and is recorded in
`manifest.json` (inputs hash, outputs, status, timings). Running again skips a stage that finished
with the same inputs, resumes one that was interrupted (training continues from its last complete
checkpoint) and redoes one whose inputs changed, and every stage after it.

Under a launcher (several ranks), global rank 0 is the one writer: it holds the folder, writes config.yaml and the
manifest, and decides each stage (skip, reuse, run, resume) for all ranks. A stage runs on rank 0 alone while the
others wait (`Stage.ranks == "main"`), or on every rank (`"all"`: trainings, whose DDP needs them all).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.markup import escape

from alambic import distributed
from alambic.config import RunConfig, save_config
from alambic.layout import CONFIG_FILE, MANIFEST_FILE
from alambic.runlock import hold_folder, wipe_held_folder
from alambic.utils import atomic_write_json, console, sha256_of


@dataclass(frozen=True)
class Stage:
    name: str
    # The config field paths this stage reads, declared beside it (`RunConfig.inputs_hash`): a whole section
    # ("teacher"), a field at any depth ("loss.temperature", "data.teacher_cache") or only whether one is set
    # ("student.from_teacher?"). tests/test_stage_inputs.py checks them against what the stage's code reads.
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # paths, relative to the run folder, that exist once it is done
    run: Callable[[RunConfig, StageContext], dict[str, Any]]
    enabled: Callable[[RunConfig], bool] = lambda cfg: True
    # The earlier stages whose results this one reads, when not all of them: the CE control needs the data
    # and the student, not the distillation, so a loss sweep trains it once and reuses it.
    after: tuple[str, ...] | None = None
    # Under a launcher: "main" runs it on rank 0 alone, the other ranks waiting (for as long as rank 0 is alive: data
    # preparation or pruning may take hours); "all" runs it on every rank (a training: the Trainer's DDP needs every
    # rank; a stage whose work splits across ranks with alambic.distributed.my_share). Rank 0 alone records it.
    ranks: Literal["main", "all"] = "main"


@dataclass
class StageContext:
    run_dir: Path
    resume: bool  # False when this stage's inputs changed: start it from scratch


class Manifest:
    """`manifest.json`: stage -> {inputs_hash, status, outputs, started, finished, seconds, summary}.

    Written twice, whole and atomically each time: `manifest.json` and its copy `manifest.json.bak`. No crash can cut
    either (a reader sees the old file or the new one), so a damaged manifest was damaged from outside: a disk error,
    a truncated copy of the folder, a hand edit. Reading one that is not valid JSON, or not a manifest, falls back to
    the copy; reading never changes the folder (a sweep reads its siblings' manifests). A run repairs its own
    manifest with `Manifest.for_run`.
    """

    def __init__(self, path: Path):
        self.path = path
        self.backup = path.with_name(path.name + ".bak")
        self.stages: dict[str, dict[str, Any]] = {}
        self.damage: str | None = None  # what is wrong with the file, when it is damaged
        self.copy_intact = False
        # A missing manifest.json is no record at all, whatever the copy says: someone removed it on purpose.
        found = _read_stages(path)
        if isinstance(found, str):
            self.damage, copy = found, _read_stages(self.backup)
            self.copy_intact = isinstance(copy, dict)
            self.stages = copy if isinstance(copy, dict) else {}
        elif found is not None:
            self.stages = found

    @classmethod
    def for_run(cls, path: Path) -> Manifest:
        """The manifest of the run about to write `path`'s folder (held by this process), repaired if damaged.

        Why this recovery: the records of a stage (its inputs hash and status) are what prove its outputs were made
        by the current config and finished; the outputs alone cannot (a folder half written, or left by an earlier
        config, looks the same). So the damaged file is set aside as `manifest.json.corrupt`, named in a warning,
        and the run goes on from the intact copy, losing nothing; without an intact copy (a folder written before
        the copy existed, or both damaged) every stage runs again from scratch rather than trusting what it cannot
        verify: the same as `--restart`, but the damaged file is kept.
        """
        manifest = cls(path)
        if manifest.damage is None:
            return manifest
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        what = f"{path} is damaged ({manifest.damage}), set aside as {aside.name}"
        if manifest.copy_intact:
            console.print(
                f"[yellow]warning:[/] {escape(what)}; its copy {escape(manifest.backup.name)} is intact and "
                f"is used: no stage is redone"
            )
        else:
            console.print(
                f"[yellow]warning:[/] {escape(what)}, and it has no intact copy: what each stage finished "
                "cannot be verified, so every stage runs again from scratch (as with `--restart`, which "
                "also empties the folder)"
            )
        manifest.save()
        return manifest

    def save(self) -> None:
        data = {"stages": self.stages}
        atomic_write_json(self.path, data)
        atomic_write_json(self.backup, data)

    def update(self, name: str, **fields: Any) -> None:
        self.stages.setdefault(name, {}).update(fields)
        self.save()


def _read_stages(path: Path) -> dict[str, dict[str, Any]] | str | None:
    """The stages a manifest file records; None when there is no file; what is wrong with it (text) when damaged."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except UnicodeDecodeError:
        return "not text"
    except json.JSONDecodeError as exc:
        return f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        return "valid JSON, but not a manifest: no mapping of stages under 'stages'"
    return stages


def _stage_hashes(config: RunConfig, stages: list[Stage]) -> dict[str, str]:
    """A stage's inputs hash covers its own declared inputs and the hash of every stage before it (a chain), or, for a
    stage that names the stages it reads (`after`), only theirs. The chain goes on through such a stage, so the
    stages after it still depend on everything before them."""
    hashes, chain, previous = {}, {}, ""
    for stage in stages:
        own = config.inputs_hash(*stage.inputs)
        chain[stage.name] = previous = sha256_of([previous, own, stage.name])
        hashes[stage.name] = (
            previous
            if stage.after is None
            else sha256_of([*(chain[name] for name in stage.after if name in chain), own, stage.name])
        )
    return hashes


def _top_level(stage: Stage) -> list[str]:
    """What a stage writes, as whole top-level entries of the run folder: its outputs name marker files
    (`student/student.json`), but the stage writes the whole folder (`student/`)."""
    return list(dict.fromkeys(Path(o).parts[0] for o in stage.outputs))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # instant and no extra disk; both runs see one file, so neither may write it in place
    except OSError:  # another file system, or links not supported
        shutil.copy2(src, dst)


def _unshare(path: Path) -> None:
    """Replace every hard-linked file under `path` by a private copy, before a stage writes there again:
    a stage that rewrites a file in place (save_pretrained does) must not change the run it was reused from."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    for f in files:
        if f.stat().st_nlink > 1:
            tmp = f.with_name(f".{f.name}.unshare")
            shutil.copy2(f, tmp)
            os.replace(tmp, f)


def _reusable(stage: Stage, inputs_hash: str, siblings: Sequence[Path], run_dir: Path) -> tuple[Path, dict] | None:
    """The first sibling run folder where `stage` is done with the same inputs hash and all its outputs."""
    for sibling in siblings:
        if Path(sibling).resolve() == run_dir.resolve():
            continue
        entry = Manifest(Path(sibling) / MANIFEST_FILE).stages.get(stage.name, {})
        if (
            entry.get("status") == "done"
            and entry.get("inputs_hash") == inputs_hash
            and all((Path(sibling) / o).exists() for o in stage.outputs)
        ):
            return Path(sibling), entry
    return None


def _copy_outputs(stage: Stage, source: Path, run_dir: Path) -> None:
    for name in _top_level(stage):
        src, dst = source / name, run_dir / name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)  # a partial attempt of this run: the sibling's finished outputs replace it
        elif dst.exists() or dst.is_symlink():
            dst.unlink()
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        elif src.exists():
            _link_or_copy(str(src), str(dst))


def run_stages(
    config: RunConfig, stages: list[Stage], *, resume: bool = True, reuse_from: Sequence[Path] = ()
) -> Manifest:
    """Run `stages` in order into `config.run_dir`, skipping finished ones whose inputs are unchanged.

    Reuse: before running a stage that is not done here, the run folders in `reuse_from` (e.g. the other
    points of a sweep) are searched, in order, for the same stage done with the same inputs hash and all
    its outputs present. The first match's outputs are copied here (hard links where the file system
    allows, else copies; whole top-level folders, e.g. `student/`), its manifest entry with
    `reused_from` added, and the stage is skipped. A stage's inputs hash covers its own config fields
    and the hashes of every stage before it, so only an identical prefix of stages is reused: two runs
    that differ in `loss` share `data`, `student` and the CE control (which reads only those), but `distill`
    and everything after it run again. Files the stage writes outside its outputs' folders
    (`metrics.jsonl`, `train_summary.json` of distill) are not copied.

    Args:
        resume: False wipes the run folder first (`--restart`).
        reuse_from: other run folders whose finished stages may be reused.

    The run folder is held (`runlock.hold_folder`) from before anything is written until the last stage ends:
    another process running the same folder is refused at once. Under a launcher, rank 0 holds it, writes every
    record and decides each stage for all ranks (`Stage.ranks` says which run it); the others never read the
    manifest while it may be written. A failure on any rank stops every rank with that rank's message.

    Raises:
        RunFolderBusy: another process holds the run folder; nothing was written.
        Whatever a stage raises; the manifest then records the stage as failed.
        distributed.RankFailure: on the ranks that did not fail, when another one did.
    """
    distributed.init()
    with ExitStack() as held:
        # rank 0 alone holds the folder (runlock skips the lock on other ranks); a refusal reaches them all
        distributed.on_main("taking the run folder", lambda: held.enter_context(hold_folder(config.run_dir)) and None)
        return _run_held(config, stages, resume=resume, reuse_from=reuse_from)


def _run_held(config: RunConfig, stages: list[Stage], *, resume: bool, reuse_from: Sequence[Path]) -> Manifest:
    run_dir = config.run_dir
    records: list[Manifest] = []  # rank 0's manifest: the other ranks never read it while it may be written

    def prepare() -> None:
        if not resume:
            wipe_held_folder(run_dir)  # everything but the lock we hold
        save_config(config, run_dir / CONFIG_FILE)
        records.append(Manifest.for_run(run_dir / MANIFEST_FILE))

    distributed.on_main("preparing the run folder", prepare)
    active = [s for s in stages if s.enabled(config)]
    hashes = _stage_hashes(config, active)
    for i, stage in enumerate(active, 1):
        header = f"[bold]stage {i}/{len(active)}: {stage.name}[/]"
        what = f"stage {stage.name}"
        if stage.ranks == "main" or distributed.world_size() == 1:

            def alone(stage: Stage = stage, header: str = header) -> None:
                resume_it = _begin(records[0], stage, hashes[stage.name], header, run_dir, reuse_from)
                if resume_it is not None:
                    _run_recorded(records[0], stage, config, StageContext(run_dir=run_dir, resume=resume_it), header)

            distributed.on_main(what, alone)
            continue
        # every rank: rank 0 decides and records, all of them run it
        resume_it = distributed.on_main(
            what,
            lambda stage=stage, header=header: _begin(
                records[0], stage, hashes[stage.name], header, run_dir, reuse_from
            ),
        )
        if resume_it is None:
            continue
        _run_recorded(
            records[0] if records else None, stage, config, StageContext(run_dir=run_dir, resume=resume_it), header
        )
    if records:
        return records[0]
    return Manifest(run_dir / MANIFEST_FILE)  # rank 0 has written its last record: the last meeting came after it


def _begin(
    manifest: Manifest, stage: Stage, inputs_hash: str, header: str, run_dir: Path, reuse_from: Sequence[Path]
) -> bool | None:
    """Rank 0's decision for `stage`: None when there is nothing to run (done already, or reused from a sibling run),
    else whether it resumes (its inputs unchanged), its record set to running."""
    entry = manifest.stages.get(stage.name, {})
    same_inputs = entry.get("inputs_hash") == inputs_hash
    outputs_there = all((run_dir / o).exists() for o in stage.outputs)
    if same_inputs and entry.get("status") == "done" and outputs_there:
        console.print(f"{header} [green]done already[/] (inputs unchanged), skipped")
        return None
    found = _reusable(stage, inputs_hash, reuse_from, run_dir) if reuse_from else None
    if found is not None:
        started = time.time()
        _copy_outputs(stage, found[0], run_dir)
        manifest.stages[stage.name] = {
            **found[1],
            "reused_from": str(found[0]),
            "started": started,
            "finished": time.time(),
            "seconds": round(time.time() - started, 2),
        }
        manifest.save()
        console.print(f"{header} [green]reused from {escape(str(found[0]))}[/] (same inputs), skipped")
        return None
    resuming = same_inputs and entry.get("status") in ("running", "failed")
    console.rule(header + (" [yellow](resuming)[/]" if resuming else ""))
    for name in _top_level(stage):
        _unshare(run_dir / name)
    manifest.stages.get(stage.name, {}).pop("reused_from", None)  # run here now, whatever it was before
    manifest.update(
        stage.name, inputs_hash=inputs_hash, status="running", started=time.time(), outputs=list(stage.outputs)
    )
    return same_inputs


def _run_recorded(manifest: Manifest | None, stage: Stage, config: RunConfig, ctx: StageContext, header: str) -> None:
    """Run `stage` on this rank, and record how it ended in `manifest` (rank 0's; None on the other ranks).

    A stage on every rank ends with a meeting of all of them, so that rank 0 records it done only once every rank
    is; a rank that fails tells the others (`distributed.publish_failure`), and rank 0 records the failing rank's
    message, not the broken collective it saw."""
    started = time.time()
    what = f"stage {stage.name}"
    try:
        summary = stage.run(config, ctx)
        if stage.ranks == "all":
            distributed.barrier(what)
    except BaseException as exc:
        distributed.publish_failure(what, exc)
        # a collective broken by another rank's failure: that failure is the cause (it publishes before it exits)
        cause = exc if isinstance(exc, distributed.RankFailure) else distributed.peer_failure(wait=5) or exc
        if manifest is not None:
            manifest.update(
                stage.name,
                status="failed",
                error=f"{type(cause).__name__}: {cause}"[:2000],
                seconds=round(time.time() - started, 2),
            )
        if cause is not exc:
            raise cause from exc
        raise
    if manifest is not None:
        manifest.update(
            stage.name,
            status="done",
            finished=time.time(),
            seconds=round(time.time() - started, 2),
            summary=summary or {},
            error=None,
        )
        console.print(f"{header} [green]done[/] in {time.time() - started:.1f} s")
