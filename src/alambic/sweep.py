"""Hyper-parameter sweeps: one ordinary, resumable run per point of a grid of config overrides.

`alambic sweep my.yaml --set loss.temperature=1,2,4 --set loss.alpha=0.5,0.9` runs the 6 points of the
cartesian product, one after the other, each into its own run folder inside `<output_dir>/<name>-sweep/`,
and compares them in `sweep.md` / `sweep.html`. Every point's config is validated before anything runs.
Points reuse the finished stages of the points before them where their inputs are identical (the data and
the pruned student of a loss sweep are made once; see `pipeline.run_stages`), and running the sweep again
skips finished points and resumes an interrupted one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.markup import escape

from alambic.config import ConfigError, RunConfig, load_config, validate_config
from alambic.pipeline import Manifest, Stage, run_stages
from alambic.runlock import RunFolderBusy, hold_folder, wipe_held_folder
from alambic.utils import atomic_write_json, console, disk_full_message

SWEEP_FILE = "sweep.json"
_NAME_MAX = 100  # characters of a point name before it is shortened (file names stop at 255 bytes)
_NOT_SWEPT = ("name", "output_dir")  # they place the points: the sweep sets them itself


def _split_values(raw: str, item: str) -> list[str]:
    """Split `raw` on the commas that are not inside [], {} or quotes."""
    pieces, current, depth, quote = [], [], 0, None
    closing = {"]": "[", "}": "{"}
    for char in raw:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"--set {item!r}: unbalanced {char!r} (no matching {closing[char]!r})")
        elif char == "," and depth == 0:
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    if quote or depth:
        raise ConfigError(
            f"--set {item!r}: unclosed {quote or '[ or {'}; quote a value that holds a comma, e.g. data.hub_name='a,b'"
        )
    return [*pieces, "".join(current)]


def parse_sets(items: list[str]) -> list[tuple[str, list[Any]]]:
    """Parse `--set KEY=V1,V2,...` options into (key, values), in the order given.

    Each value is parsed as YAML (`2` an int, `0.5` a float, `true` a bool, `forward_kl` a string,
    `[0, 3]` a list). Commas inside [], {} or quotes do not split; a key with one value is a fixed
    override applied to every point.

    Raises:
        ConfigError: no `=`, an empty value (`1,,2`), unbalanced brackets or quotes, a key given twice,
            a value repeated within a key, or a swept `name` / `output_dir`.
    """
    sets: list[tuple[str, list[Any]]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE or KEY=V1,V2,..., e.g. loss.temperature=1,2,4")
        key, raw = (part.strip() for part in item.split("=", 1))
        if not key:
            raise ConfigError(f"--set {item!r}: the key before '=' is empty, e.g. loss.temperature=1,2,4")
        pieces = _split_values(raw, item)
        if len(pieces) > 1 and any(not p.strip() for p in pieces):
            raise ConfigError(f"--set {item!r}: an empty value between commas; write KEY=V1,V2,... with no empty item")
        try:
            values = [yaml.safe_load(p) for p in pieces]
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: a value is not valid YAML: {exc}") from None
        if key in (k for k, _ in sets):
            raise ConfigError(f"--set {item!r}: {key} is given twice; list all its values in one --set {key}=V1,V2")
        # type and value: 1 and true are different values here, though 1 == True in Python
        repeated = [v for i, v in enumerate(values) if any(type(v) is type(w) and v == w for w in values[:i])]
        if repeated:
            raise ConfigError(f"--set {item!r}: value {repeated[0]!r} is listed twice for {key}")
        if len(values) > 1 and key in _NOT_SWEPT:
            raise ConfigError(
                f"--set {item!r}: {key} cannot be swept: each point's run folder is named after its "
                "values inside <output_dir>/<name>-sweep; give one value"
            )
        sets.append((key, values))
    return sets


def swept_keys(sets: list[tuple[str, list[Any]]]) -> list[str]:
    """The keys with more than one value: the axes of the grid."""
    return [key for key, values in sets if len(values) > 1]


def expand_grid(sets: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """Every combination of the values (cartesian product), the first key varying slowest.

    `[("a", [1, 2]), ("b", ["x"]), ("c", [3, 4])]` gives `{a: 1, b: x, c: 3}, {a: 1, b: x, c: 4},
    {a: 2, b: x, c: 3}, {a: 2, b: x, c: 4}`: a fixed key (one value) is in every point.
    """
    keys = [key for key, _ in sets]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in sets))]


def _value_text(value: Any) -> str:
    """The value as YAML would read it back: a string that reads back as itself stays bare, `1` and `"1"`
    (or `true` and `"true"`) do not look alike."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value, default=str)  # true / false / null / "1" / [0, 3] / {"a": 1}


def _digest(overrides: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(overrides, sort_keys=True, default=repr).encode()).hexdigest()[:8]


def point_name(overrides: dict[str, Any]) -> str:
    """A run name for one grid point from its swept keys' last components and values.

    `{"loss.temperature": 2, "loss.alpha": 0.5}` -> `temperature-2_alpha-0.5`. Characters a file name
    should not hold become `-`; when that changes the text, or the name is longer than 100 characters, a
    short hash of the exact overrides is appended, so distinct points do not share a name (`plan_sweep`
    also checks the whole grid). The result matches RunConfig.name's pattern `^[A-Za-z0-9._-]+$`.
    """
    if not overrides:
        raise ValueError("point_name needs at least one swept key")
    raw = "_".join(f"{key.rsplit('.', 1)[-1]}-{_value_text(value)}" for key, value in overrides.items())
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.") or "point"
    if name != raw or len(name) > _NAME_MAX:
        name = f"{name[:_NAME_MAX]}-{_digest(overrides)}"
    return name


@dataclass(frozen=True)
class SweepPoint:
    name: str
    overrides: dict[str, Any]  # the swept keys' values at this point
    config: RunConfig  # validated; name = point name, output_dir = the sweep folder


@dataclass(frozen=True)
class Sweep:
    config_path: Path
    folder: Path  # <output_dir>/<name>-sweep
    grid: dict[str, list[Any]]  # swept key -> values
    fixed: dict[str, Any]  # overrides applied to every point
    points: list[SweepPoint]


def _override(key: str, value: Any) -> str:
    # JSON is YAML: apply_override's yaml.safe_load gives `value` back, whatever its type
    return f"{key}={json.dumps(value, default=str)}"


def plan_sweep(config_path: str | Path, items: list[str]) -> Sweep:
    """Parse the `--set` options and build and validate every point's config, before anything runs.

    Raises:
        ConfigError: a malformed `--set`, no swept key, or points whose config is invalid (all of them
            listed, each with its name, overrides and the offending fields).
    """
    config_path = Path(config_path)
    sets = parse_sets(items)
    keys = swept_keys(sets)
    if not keys:
        raise ConfigError(
            "nothing to sweep: give at least one key several values, comma-separated, e.g. "
            "`alambic sweep my.yaml --set loss.temperature=1,2,4 --set loss.alpha=0.5,0.9` "
            "(a key with one value is applied to every point; for a single run use `alambic run`)"
        )
    combos = expand_grid(sets)
    names = [point_name({k: combo[k] for k in keys}) for combo in combos]
    for i, name in enumerate(names):  # values that contain the separators themselves ("x_alpha-1") could collide
        if names.count(name) > 1:
            names[i] = f"{name}-{_digest({k: combos[i][k] for k in keys})}"
    configs, problems = [], []
    for i, (combo, name) in enumerate(zip(combos, names), 1):
        try:
            configs.append(load_config(config_path, [_override(k, v) for k, v in combo.items()]))
        except ConfigError as exc:
            swept = ", ".join(f"{k}={combo[k]!r}" for k in keys)
            problems.append(f"sweep point {i}/{len(combos)} {name} ({swept}): {exc}")
    if problems:
        raise ConfigError("\n".join(problems))
    first = configs[0]  # name and output_dir cannot be swept: the same in every point
    folder = Path(first.output_dir) / f"{first.name}-sweep"
    points = [
        SweepPoint(
            name,
            {k: combo[k] for k in keys},
            validate_config(
                {**cfg.model_dump(mode="json"), "name": name, "output_dir": str(folder)}, origin=f"sweep point {name}"
            ),
        )
        for combo, name, cfg in zip(combos, names, configs)
    ]
    grid = {key: values for key, values in sets if key in keys}
    fixed = {key: values[0] for key, values in sets if key not in keys}
    return Sweep(config_path=config_path, folder=folder, grid=grid, fixed=fixed, points=points)


def _point_record(point: SweepPoint, folder: Path) -> dict[str, Any]:
    """The point's entry in sweep.json, from what its run folder holds now."""
    run_dir = point.config.run_dir
    manifest = Manifest(run_dir / "manifest.json").stages
    student = _read_json(run_dir / "eval.json").get("models", {}).get("student_distilled")
    # the figures and their intervals; eval.json keeps the rest (architecture, cost, responses)
    metrics = (
        None
        if student is None
        else {k: v for k, v in student.items() if k == "intervals" or isinstance(v, (int, float))}
    )
    distill = manifest.get("distill", {})
    return {
        "name": point.name,
        "overrides": point.overrides,
        "run_dir": str(run_dir.relative_to(folder)),
        "status": "pending",
        "error": None,
        "metrics": metrics,
        # training wall time; a reused stage keeps its sibling's summary, not the seconds of the copy
        "distill_seconds": (distill.get("summary") or {}).get("train_seconds", distill.get("seconds")),
        "reused": {stage: Path(e["reused_from"]).name for stage, e in manifest.items() if e.get("reused_from")},
    }


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_sweep(sweep: Sweep, *, resume: bool = True, stages: list[Stage] | None = None) -> dict[str, Any]:
    """Run every point of `sweep` in order, then write `sweep.json` and the sweep report.

    A point that fails is recorded (status "failed", its error) and the sweep goes on with the next;
    KeyboardInterrupt records the point as "interrupted" and stops the sweep (run it again to resume).
    Each point may reuse the finished stages of the points before it (`run_stages(reuse_from=...)`).

    Args:
        resume: False wipes the whole sweep folder first (`--restart`).
        stages: the stages of each point; all of `alambic.stages.STAGES` by default.

    Returns:
        The sweep record, as written to `sweep.json`: grid, fixed overrides, and per point its overrides,
        run folder (relative to the sweep folder), status, error, student_distilled metrics, distillation
        seconds and the stages it reused.

    Raises:
        RunFolderBusy: another process holds the sweep folder (each point's folder is held by `run_stages`).
    """
    with hold_folder(sweep.folder):
        return _run_held(sweep, resume=resume, stages=stages)


def _run_held(sweep: Sweep, *, resume: bool, stages: list[Stage] | None) -> dict[str, Any]:
    from alambic.report.sweep import write_sweep_report
    from alambic.stages import STAGES

    stages = STAGES if stages is None else stages
    if not resume:
        wipe_held_folder(sweep.folder)
    record = {
        "config": str(sweep.config_path),
        "grid": sweep.grid,
        "fixed": sweep.fixed,
        "started": time.time(),
        "points": [_point_record(p, sweep.folder) for p in sweep.points],
    }
    path = sweep.folder / SWEEP_FILE
    atomic_write_json(path, record)
    n = len(sweep.points)
    for i, (point, entry) in enumerate(zip(sweep.points, record["points"]), 1):
        console.rule(f"[bold]point {i}/{n}: {point.name}[/]")
        entry.update(status="running", error=None)
        atomic_write_json(path, record)
        try:
            run_stages(point.config, stages, reuse_from=[p.config.run_dir for p in sweep.points[: i - 1]])
        except KeyboardInterrupt:
            entry.update(_point_record(point, sweep.folder), status="interrupted")
            atomic_write_json(path, record)
            console.print(f"[yellow]sweep interrupted[/] at point {i}/{n}: run the same command again to resume")
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:2000]
            entry.update(_point_record(point, sweep.folder), status="failed", error=error)
            # A full disk or a folder in use is said in one line; anything else with its traceback.
            said = disk_full_message(exc, point.config.run_dir) or (
                str(exc) if isinstance(exc, RunFolderBusy) else None
            )
            if said is None:
                console.print_exception(max_frames=8)
            else:
                error = said
            console.print(
                f"[red]point {i}/{n} {point.name} failed[/]: {escape(error.splitlines()[0])}; its "
                f"manifest says where ({escape(str(point.config.run_dir / 'manifest.json'))}); "
                "going on with the next"
            )
        else:
            entry.update(_point_record(point, sweep.folder), status="done")
        atomic_write_json(path, record)
    record["finished"] = time.time()
    atomic_write_json(path, record)
    write_sweep_report(sweep.folder)
    failed = [e["name"] for e in record["points"] if e["status"] != "done"]
    if failed:
        console.print(
            f"[red]{len(failed)} of {n} points failed[/]: {', '.join(failed)}; fix the cause and run the "
            "same command again: finished points are skipped"
        )
    return record
