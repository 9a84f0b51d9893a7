"""sweep.md / sweep.html / plots/sweep.png from a fake sweep folder: one row per point, the best named, references."""

from __future__ import annotations

import json
import re

import pytest

from alambic.report.sweep import plot_sweep, write_sweep_report


def _set_kl(run_dir, kl: float, *, half_width: float = 0.05, control_kl: float | None = None) -> None:
    path = run_dir / "eval.json"
    evaluation = json.loads(path.read_text())
    student = evaluation["models"]["student_distilled"]
    student["kl_to_teacher"] = kl
    student["intervals"]["kl_to_teacher"] = [kl - half_width, kl + half_width]
    if control_kl is not None:
        evaluation["models"]["student_ce_control"]["kl_to_teacher"] = control_kl
    path.write_text(json.dumps(evaluation))


def make_sweep(
    tmp_path,
    fake_run,
    points: list[tuple[str, dict, float | None]],
    *,
    grid: dict,
    half_width: float = 0.05,
    control_kls: list[float] | None = None,
):
    """A sweep folder whose points are fake finished runs (or, with kl None, a point that failed)."""
    sweep_dir = tmp_path / "demo-sweep"
    sweep_dir.mkdir()
    records = []
    for i, (name, overrides, kl) in enumerate(points):
        record = {
            "name": name,
            "overrides": overrides,
            "run_dir": name,
            "status": "done",
            "error": None,
            "metrics": None,
            "distill_seconds": 100.0 + i,
            "reused": {},
        }
        if kl is None:
            record.update(status="failed", error="RuntimeError: CUDA out of memory\nTraceback ...")
        else:
            fake_run().rename(sweep_dir / name)
            _set_kl(sweep_dir / name, kl, half_width=half_width, control_kl=control_kls[i] if control_kls else None)
            (sweep_dir / name / "report.md").write_text("# its own report\n")
        records.append(record)
    (sweep_dir / "sweep.json").write_text(
        json.dumps({"config": "my.yaml", "grid": grid, "fixed": {"training.max_steps": 60}, "points": records})
    )
    return sweep_dir


GRID = {"loss.temperature": [1, 2], "loss.alpha": [0.5, 0.9]}
POINTS = [
    ("temperature-1_alpha-0.5", {"loss.temperature": 1, "loss.alpha": 0.5}, 1.4),
    ("temperature-1_alpha-0.9", {"loss.temperature": 1, "loss.alpha": 0.9}, 1.1),
    ("temperature-2_alpha-0.5", {"loss.temperature": 2, "loss.alpha": 0.5}, 0.8),
    ("temperature-2_alpha-0.9", {"loss.temperature": 2, "loss.alpha": 0.9}, None),
]


def test_one_row_per_point_the_best_marked_and_named(tmp_path, fake_run):
    sweep_dir = make_sweep(tmp_path, fake_run, POINTS, grid=GRID)
    path = write_sweep_report(sweep_dir)
    report = path.read_text()
    rows = [line for line in report.splitlines() if line.startswith("| temperature-")]
    assert len(rows) == 4
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[1:3] for c in cells] == [["1", "0.5"], ["1", "0.9"], ["2", "0.5"], ["2", "0.9"]]
    assert [c[6] for c in cells[:3]] == ["1.400 [1.350, 1.450]", "1.100 [1.050, 1.150]", "0.800 [0.750, 0.850]"]
    assert cells[0][3] == "71.11 [68.98, 73.24]" and cells[0][4] == "50.4% [49.4%, 51.4%]" and cells[0][7] == "100"
    assert [c[-1] for c in cells] == ["done", "done", "done", "failed"] and cells[3][3:7] == ["–"] * 4
    assert "**best**" in cells[2][0] and not any("**best**" in c[0] for i, c in enumerate(cells) if i != 2)
    assert "[md](temperature-2_alpha-0.5/report.md)" in cells[2][0]  # each point's own report, linked
    assert (
        "Best point (lowest KL to teacher): **temperature-2_alpha-0.5** (loss.temperature = 2, loss.alpha = 0.5)"
        in report
    )
    assert "Next: temperature-1_alpha-0.9" in report and "by more than their intervals" in report
    assert "(CE control) reaches 1.200" in report
    assert "every point with training.max_steps = 60; 3 done" in report
    assert "- temperature-2_alpha-0.9: failed: `RuntimeError: CUDA out of memory`" in report

    references = report.split("## For reference")[1]
    assert references.count("| teacher |") == 1 and references.count("| student CE control |") == 1
    assert "| student before |" in references

    assert (sweep_dir / "plots" / "sweep.png").stat().st_size > 5000
    page = (sweep_dir / "sweep.html").read_text()
    assert "data:image/png;base64," in page and 'src="plots/' not in page  # self-contained
    assert 'href="temperature-2_alpha-0.5/report.md"' in page
    assert not (sweep_dir / "report.html").exists()


def test_overlapping_intervals_are_not_told_apart(tmp_path, fake_run):
    sweep_dir = make_sweep(tmp_path, fake_run, POINTS[:2], grid={"loss.alpha": [0.5, 0.9]}, half_width=0.2)
    report = write_sweep_report(sweep_dir).read_text()
    assert "**temperature-1_alpha-0.9**" in report and "the two are not told apart" in report


def test_controls_that_differ_get_one_row_per_point(tmp_path, fake_run):
    sweep_dir = make_sweep(tmp_path, fake_run, POINTS[:3], grid=GRID, control_kls=[1.2, 1.25, 1.3])
    references = write_sweep_report(sweep_dir).read_text().split("## For reference")[1]
    assert references.count("| teacher |") == 1
    assert re.findall(r"\| student CE control \((\S+)\) \|", references) == [p[0] for p in POINTS[:3]]


def test_a_categorical_key_plots_and_no_evaluated_point_gives_no_plot(tmp_path, fake_run):
    grid = {"loss.divergence": ["forward_kl", "reverse_kl"]}
    points = [
        ("divergence-forward_kl", {"loss.divergence": "forward_kl"}, 0.9),
        ("divergence-reverse_kl", {"loss.divergence": "reverse_kl"}, 1.0),
    ]
    sweep_dir = make_sweep(tmp_path, fake_run, points, grid=grid)
    evals = {name: json.loads((sweep_dir / name / "eval.json").read_text())["models"] for name, _, _ in points}
    records = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    assert plot_sweep(grid, records, evals, tmp_path / "a.png", best=points[0][0]).stat().st_size > 5000
    assert plot_sweep(grid, records, {name: {} for name in evals}, tmp_path / "b.png") is None
    assert not (tmp_path / "b.png").exists()


def test_a_sweep_where_nothing_finished_still_gets_a_report(tmp_path, fake_run):
    sweep_dir = make_sweep(tmp_path, fake_run, [POINTS[3]], grid=GRID)
    report = write_sweep_report(sweep_dir).read_text()
    assert "No point has been evaluated yet" in report and "plots/sweep.png" not in report


def test_a_folder_without_sweep_json_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a sweep folder"):
        write_sweep_report(tmp_path)
