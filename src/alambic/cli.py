"""`alambic` command line: a thin dispatcher over the stages in `alambic.stages`.

Exit codes: 0 success, 1 a stage failed, 2 bad input (config, files, options), 3 the run folder is in use by
another process (nothing was done: try again once it ends), 130 interrupted.

Under a launcher (`torchrun -m alambic run CONFIG`, `accelerate launch -m alambic run CONFIG`) every rank runs this
command; rank 0 alone prints (stage headers, progress, the summary), and a failure is printed once, by rank 0 when it
hears of it, else by the rank that failed.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.markup import escape

from alambic import distributed
from alambic.config import ConfigError, RunConfig, apply_override, load_config, validate_config
from alambic.runlock import RunFolderBusy, check_not_held, hold_folder
from alambic.utils import DiagnosedFailure, console, disk_full_message

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="alambic: distil a large language model into a smaller, faster one.",
)

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
EXIT_BUSY = 3  # its own code: a script may wait and try again, where bad input needs a fix

ConfigArg = Annotated[Path, typer.Argument(help="Run config (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value, e.g. --set loss.temperature=2 (repeatable)."),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume/--restart",
        help="--resume (default): skip finished stages, continue an interrupted one from its last checkpoint. "
        "--restart: wipe the run folder first.",
    ),
]


def quickstart_config_text() -> str:
    return resources.files("alambic").joinpath("configs/quickstart.yaml").read_text()


def _input_errors() -> tuple[type[Exception], ...]:
    from alambic.data import DataSourceError
    from alambic.data.cache import CacheMismatchError
    from alambic.models import ModelLoadError
    from alambic.students.prune import PruningError

    return (ConfigError, ModelLoadError, DataSourceError, PruningError, CacheMismatchError, FileNotFoundError)


def _busy(exc: RunFolderBusy) -> typer.Exit:
    if _reports(exc):
        console.print(f"[red]error:[/] {escape(str(exc))}")
    return typer.Exit(EXIT_BUSY)


def _reports(exc: BaseException) -> bool:
    """Whether this process prints the failure `exc`: always alone; under a launcher, one rank prints it
    (`distributed.claim_failure_report`), its console turned back on if it was quiet (ranks other than 0)."""
    if distributed.world_size() == 1:
        return True
    if isinstance(exc, KeyboardInterrupt):  # every rank got it (the launcher passes it on): rank 0 says so
        return distributed.is_main()
    if distributed.claim_failure_report(exc):
        console.quiet = False
        return True
    return False


def _relayed(exc: distributed.RankFailure) -> typer.Exit:
    """Another rank's failure, seen on this one: printed once (rank 0, unless the failing rank printed it)."""
    if _reports(exc):
        console.print(f"[red]failed[/]: {escape(str(exc))}")
    elif distributed.is_main():
        console.print(f"[red]failed[/]: rank {exc.rank} failed during {escape(exc.what)}: its error is printed above")
    return typer.Exit(EXIT_FAILED)


@contextmanager
def _holding(folder: Path) -> Iterator[None]:
    """Hold `folder` for a command that writes it outside `run_stages` (which holds it too: re-entrant); under a
    launcher rank 0 holds it, and its refusal reaches every rank."""
    from contextlib import ExitStack

    with ExitStack() as held:
        try:
            distributed.on_main("taking the folder", lambda: held.enter_context(hold_folder(folder)) and None)
        except RunFolderBusy as exc:
            raise _busy(exc) from None
        except distributed.RankFailure as exc:
            raise _relayed(exc) from None
        yield


def _failing_stage(run_dir: Path) -> str | None:
    from alambic.pipeline import Manifest

    stages = Manifest(run_dir / "manifest.json").stages
    failing = [
        (entry.get("started") or 0, name)
        for name, entry in stages.items()
        if entry.get("status") in ("failed", "running")
    ]
    return max(failing)[1] if failing else None


def _failed(folder: Path, advice: str, *, run_dir: Path | None = None) -> typer.Exit:
    """A failure in `folder`: one line when a full disk caused it or its message says cause and fix
    (`DiagnosedFailure`), else the traceback; then `advice`."""
    exc = sys.exc_info()[1]
    if exc is not None and not _reports(exc):  # another rank prints it
        return typer.Exit(EXIT_FAILED)
    line = disk_full_message(exc, folder) if exc is not None else None
    if isinstance(exc, DiagnosedFailure):
        stage = _failing_stage(run_dir) if run_dir is not None else None
        console.print(f"[red]failed[/]: {escape(f'stage {stage}: ' if stage else '')}{escape(str(exc))}")
    elif line is None:
        console.print_exception(max_frames=8)
        console.print(f"[red]failed[/]; {escape(advice)}")
    else:
        stage = _failing_stage(run_dir) if run_dir is not None else None
        console.print(
            f"[red]failed[/]: {escape(f'stage {stage}: ' if stage else '')}{escape(line)}. Free some space "
            "(or give output_dir another disk) and run the same command again: it resumes where it stopped"
        )
    return typer.Exit(EXIT_FAILED)


def _run(config: RunConfig, until: str | None, resume: bool, only: tuple[str, ...] = ()) -> None:
    try:
        check_not_held(config.run_dir)  # before the stages' imports: a refusal skips their seconds
    except RunFolderBusy as exc:
        raise _busy(exc) from None
    from alambic.pipeline import run_stages
    from alambic.stages import STAGES, stages_until
    from alambic.stages.preflight import check_inputs

    if config.chain is not None:  # its top-level sections are a base for the steps, not a run of their own
        console.print(
            "[red]error:[/] this config is a chain (`chain` is set): `alambic run` runs its steps in order. "
            "The other commands work on one run: give them a step's config, "
            f"{escape(str(config.output_dir))}/{config.name}-chain/<step>/config.yaml, or remove `chain`"
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    stages = stages_until(until) if until else STAGES
    if only:  # a command that needs some stages, not all those before it (generate needs no student)
        stages = [s for s in stages if s.name in only]
    INPUT_ERRORS = _input_errors()
    try:
        check_inputs(config)  # what the models' own configs refuse, before any stage works
        run_stages(config, stages, resume=resume)
    except KeyboardInterrupt as exc:
        if _reports(exc):
            console.print(
                f"[yellow]interrupted[/]: run the same command again to resume ({escape(str(config.run_dir))})"
            )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except RunFolderBusy as exc:
        raise _busy(exc) from None
    except distributed.RankFailure as exc:
        raise _relayed(exc) from None
    except INPUT_ERRORS as exc:
        if _reports(exc):
            console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except Exception:
        raise _failed(
            config.run_dir,
            f"the manifest records where: {config.run_dir / 'manifest.json'}. "
            "Fix the cause and run the same command again to resume.",
            run_dir=config.run_dir,
        ) from None
    console.print(f"[green]finished[/]: {escape(str(config.run_dir))}")


def _one_process(command: str, what: str) -> None:
    """Refuse a command that runs several run folders in one process (a sweep's points, a chain's steps) under a
    launcher: its records (sweep.json, chain.json), its --restart and its comparisons are written by every process
    that runs it, so N ranks would write them N times at once."""
    if distributed.world_size() == 1:
        return
    if distributed.is_main():
        console.print(
            f"[red]error:[/] a {command} runs its {what} one after another in one process, and is not run "
            f"across ranks yet (WORLD_SIZE={distributed.world_size()}): run it without a launcher, or "
            f"launch `alambic run` on one {what[:-1]}'s config at a time"
        )
    raise typer.Exit(EXIT_BAD_INPUT)


def _load(path: Path, overrides: list[str] | None) -> RunConfig:
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None


@app.command()
def run(config: ConfigArg, set_: SetOpt = None, resume: ResumeOpt = True) -> None:
    """Run every stage the config names, in order, into one run folder (resumable).

    A config with a `chain` runs its steps one after another, each a run folder in <output_dir>/<name>-chain/
    (--set applies to every step), then compares them in chain.md / chain.html.
    """
    cfg = _load(config, set_)
    if cfg.chain is not None:
        _one_process("chain", "steps")
        _run_chain(cfg, resume)
    else:
        _run(cfg, None, resume)


def _run_chain(config: RunConfig, resume: bool) -> None:
    """Every step's config checked first, then the steps run in order (`alambic.chain`)."""
    from alambic.chain import plan_chain, run_chain

    try:
        planned = plan_chain(config)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    try:
        from alambic.stages.preflight import check_inputs

        for i, step in enumerate(planned.steps, 1):  # a model an earlier step writes is not there yet
            check_inputs(step.config, pending=step.reads, origin=f"chain step {i}/{len(planned.steps)} {step.name}")
        run_chain(planned, resume=resume)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: run the same command again to resume ({escape(str(planned.folder))})")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except RunFolderBusy as exc:
        raise _busy(exc) from None
    except _input_errors() as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except Exception:
        raise _failed(
            planned.folder,
            f"{planned.folder / 'chain.json'} records which step, its manifest where. "
            "Fix the cause and run the same command again: finished steps are skipped.",
        ) from None
    console.print(f"[green]finished[/]: {escape(str(planned.folder))}")


@app.command()
def prune(config: ConfigArg, set_: SetOpt = None, resume: ResumeOpt = True) -> None:
    """Prepare the data and build the student (student.from_teacher): importance, pruning, pruning.json."""
    cfg = _load(config, set_)
    if cfg.student.from_teacher is None:
        console.print(
            "[red]error:[/] student.from_teacher is not set: the config brings its own student "
            f"({escape(repr(cfg.student.model))}); add a student.from_teacher section to prune the teacher"
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    _run(cfg, "student", resume)


@app.command()
def distill(config: ConfigArg, set_: SetOpt = None, resume: ResumeOpt = True) -> None:
    """Build the student and the data if needed, then distil (no evaluation or report)."""
    _run(_load(config, set_), "distill", resume)


@app.command()
def cache(config: ConfigArg, set_: SetOpt = None, resume: ResumeOpt = True) -> None:
    """Build the student and the data if needed, then write the offline teacher cache (data.teacher_cache)."""
    cfg = _load(config, set_)
    if cfg.data.teacher_cache is None:
        console.print("[red]error:[/] the config has no data.teacher_cache section: add one (k, dtype, ...) to cache")
        raise typer.Exit(EXIT_BAD_INPUT)
    _run(cfg, "cache", resume)


@app.command()
def generate(config: ConfigArg, set_: SetOpt = None, resume: ResumeOpt = True) -> None:
    """Prepare the data if needed, then have the teacher answer the training prompts (data.teacher_responses).

    Writes <run>/generations/: generations.jsonl (one record per response, degenerate ones flagged), the
    tokenized training set and summary.json. Interrupted, it resumes from the last finished batch.
    """
    cfg = _load(config, set_)
    if cfg.data.teacher_responses is None:
        console.print(
            "[red]error:[/] the config has no data.teacher_responses section: add one (max_new_tokens, "
            "temperature, ...) to generate"
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    _run(cfg, "generate", resume, only=("data", "generate"))


@app.command()
def quickstart(
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the built-in config and exit.")] = False,
    control: Annotated[bool, typer.Option("--control/--no-control", help="Train the cross-entropy control.")] = True,
    output_dir: Annotated[Path, typer.Option(help="Parent folder of the run folder.")] = Path("runs"),
    set_: SetOpt = None,
    resume: ResumeOpt = True,
) -> None:
    """Prune SmolLM2-135M-Instruct to half depth by layer importance, distil it on BBC News, evaluate, report."""
    text = quickstart_config_text()
    if print_config:
        sys.stdout.write(text)
        return
    data = yaml.safe_load(text)
    data["output_dir"] = str(output_dir)
    data["evaluation"]["ce_control"] = control
    try:
        for item in set_ or []:
            apply_override(data, item)
        config = validate_config(data, origin="quickstart config")
    except ConfigError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    _run(config, None, resume)


@app.command()
def evaluate(
    target: Annotated[Path, typer.Argument(help="A run config (YAML) or a run folder.", show_default=False)],
    set_: SetOpt = None,
) -> None:
    """Evaluate (again) the teacher, the students and the config's baselines: quality, responses, cost; report.

    Stages before evaluation run only where not done yet (a config that was never run is trained first); the
    evaluation and the report are always redone, e.g. to measure cost on another machine or device.
    """
    from alambic.pipeline import Manifest
    from alambic.stages import STAGES

    if target.is_dir():
        if not (target / "config.yaml").is_file():
            console.print(
                f"[red]error:[/] {escape(str(target))} is not a run folder (no config.yaml): give a run "
                "folder or a config"
            )
            raise typer.Exit(EXIT_BAD_INPUT)
        # the folder may have moved since it was run: it is where it is now
        cfg = _load(
            target / "config.yaml",
            [*(set_ or []), f"output_dir={json.dumps(str(target.parent))}", f"name={json.dumps(target.name)}"],
        )
    else:
        cfg = _load(target, set_)
    names = [s.name for s in STAGES]

    def outdate() -> None:
        manifest = Manifest.for_run(cfg.run_dir / "manifest.json")
        for name in names[names.index("evaluate") :]:
            if name in manifest.stages:
                manifest.update(name, status="outdated")

    with _holding(cfg.run_dir):  # from before the manifest is touched
        try:
            distributed.on_main("marking the evaluation outdated", outdate)
        except distributed.RankFailure as exc:
            raise _relayed(exc) from None
        _run(cfg, None, resume=True)


@app.command()
def sweep(
    config: ConfigArg,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="KEY=V1,V2,...: values to sweep (each parsed as YAML; commas inside [], {} or "
            "quotes do not split). One value: applied to every point. Repeatable.",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--restart",
            help="--resume (default): skip finished points and stages, continue an "
            "interrupted one. --restart: wipe the sweep folder first.",
        ),
    ] = True,
) -> None:
    """Run every point of a grid of config values, each an ordinary resumable run, and compare them.

    Example (6 points):  alambic sweep my.yaml --set loss.temperature=1,2,4 --set loss.alpha=0.5,0.9

    Points run one after another into <output_dir>/<name>-sweep/<point>/, e.g. temperature-2_alpha-0.5.
    Finished stages with the same inputs are shared: a loss sweep prepares the data and the student once.
    sweep.md and sweep.html compare the distilled students on held-out data and name the best (lowest KL).
    A failed point is recorded and the others still run; the exit code is then 1.
    """
    from alambic.sweep import plan_sweep, run_sweep

    _one_process("sweep", "points")
    try:
        planned = plan_sweep(config, set_ or [])
        from alambic.stages.preflight import check_inputs

        for i, point in enumerate(planned.points, 1):
            check_inputs(point.config, origin=f"sweep point {i}/{len(planned.points)} {point.name}")
    except _input_errors() as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    try:
        record = run_sweep(planned, resume=resume)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: run the same command again to resume ({escape(str(planned.folder))})")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except RunFolderBusy as exc:
        raise _busy(exc) from None
    if any(p["status"] != "done" for p in record["points"]):
        raise typer.Exit(EXIT_FAILED)
    console.print(f"[green]finished[/]: {escape(str(planned.folder))}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder or a chain folder.", show_default=False)],
) -> None:
    """(Re)write the report of a finished run folder (or chain.md / chain.html of a chain folder)."""
    from alambic.report.render import write_report

    if (run_dir / "chain.json").is_file():
        from alambic.report.chain import write_chain_report

        with _holding(run_dir):
            distributed.on_main("writing the chain report", lambda: write_chain_report(run_dir) and None)
        return
    if not (run_dir / "eval.json").is_file():
        console.print(
            f"[red]error:[/] {escape(str(run_dir / 'eval.json'))} not found: evaluate the run first "
            "(`alambic run CONFIG`)"
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    with _holding(run_dir):
        distributed.on_main("writing the report", lambda: write_report(run_dir) and None)


def main() -> None:
    from alambic.utils import tune_allocator

    tune_allocator()
    if distributed.rank() > 0:  # one console, rank 0's: the others print only a failure they report
        console.quiet = True
        # Set before the libraries are imported, which read them then: their progress bars and warnings would repeat
        # rank 0's once per rank.
        for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(name, "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.simplefilter("ignore")
    if distributed.world_size() > 1:
        try:
            distributed.init()  # before any stage: a launch that cannot run as one job is refused here
        except distributed.DistributedSetupError as exc:
            console.quiet = False
            console.print(f"[red]error:[/] {escape(str(exc))}")
            raise SystemExit(EXIT_BAD_INPUT) from None
    app()


if __name__ == "__main__":
    main()
