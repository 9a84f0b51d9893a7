"""`alambic sweep`: parsing the grid, naming and validating its points, running them (reuse, resume, failures)."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from alambic.config import ConfigError
from alambic.pipeline import Stage
from alambic.sweep import expand_grid, parse_sets, plan_sweep, point_name, run_sweep, swept_keys
from helpers import save_tiny_pair, write_text_corpus

NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")


# ---------------------------------------------------------------- the grid


def test_values_are_parsed_as_yaml_and_one_value_is_a_fixed_override():
    sets = parse_sets(
        [
            "loss.temperature=1,2.5",
            "loss.divergence=forward_kl,reverse_kl",
            "training.bf16=true,false",
            "training.max_steps=7",
        ]
    )
    assert sets == [
        ("loss.temperature", [1, 2.5]),
        ("loss.divergence", ["forward_kl", "reverse_kl"]),
        ("training.bf16", [True, False]),
        ("training.max_steps", [7]),
    ]
    assert type(sets[0][1][0]) is int and type(sets[0][1][1]) is float
    assert swept_keys(sets) == ["loss.temperature", "loss.divergence", "training.bf16"]


def test_commas_inside_brackets_braces_or_quotes_do_not_split():
    sets = parse_sets(
        [
            "student.from_teacher.layers=[0, 3],[1,2],every_other",
            "data.hub_name=\"a,b\",'c,d',e",
            "training.trainer_args={x: 1, y: 2},{}",
        ]
    )
    assert sets[0][1] == [[0, 3], [1, 2], "every_other"]
    assert sets[1][1] == ["a,b", "c,d", "e"]
    assert sets[2][1] == [{"x": 1, "y": 2}, {}]


@pytest.mark.parametrize(
    "item, message",
    [
        ("loss.temperature", "expected KEY=VALUE"),
        ("=1,2", "key before '=' is empty"),
        ("loss.temperature=1,,2", "empty value"),
        ("loss.temperature=1,2,", "empty value"),
        ("student.from_teacher.layers=[0,1", "unclosed"),
        ("student.from_teacher.layers=0],1", "unbalanced ']'"),
        ('data.hub_name="a,b', "unclosed"),
        ("loss.temperature=1,2,1", "listed twice"),
        ("name=a,b", "name cannot be swept"),
        ("output_dir=a,b", "output_dir cannot be swept"),
    ],
)
def test_malformed_sets_are_refused_with_the_reason(item, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_sets([item])


def test_a_key_given_twice_and_values_equal_only_in_python_are_told_apart():
    with pytest.raises(ConfigError, match="given twice"):
        parse_sets(["loss.alpha=0.5,0.9", "loss.alpha=0.1"])
    assert parse_sets(["x=1,true"]) == [("x", [1, True])]  # 1 == True in Python, not in the config


def test_the_grid_is_the_cartesian_product_in_the_order_given():
    grid = expand_grid([("a", [1, 2]), ("b", ["x"]), ("c", [3, 4])])
    assert grid == [
        {"a": 1, "b": "x", "c": 3},
        {"a": 1, "b": "x", "c": 4},
        {"a": 2, "b": "x", "c": 3},
        {"a": 2, "b": "x", "c": 4},
    ]


def test_point_names_are_readable_safe_and_unique():
    assert point_name({"loss.temperature": 2, "loss.alpha": 0.5}) == "temperature-2_alpha-0.5"
    assert point_name({"training.bf16": True}) == "bf16-true"
    # each key's values look alike once made file-name safe, or as text: `[0, 3]` and `"0-3"`, `1` and `"1"`
    sets = parse_sets(
        [
            'student.from_teacher.layers=[0, 3],"0-3",every_other',
            'data.hub_name="a/b","a b",a-b',
            'loss.temperature=1,1.0,"1"',
            'training.bf16=true,"true"',
        ]
    )
    points = expand_grid(sets)
    names = [point_name(p) for p in points]
    assert len(set(names)) == len(points) == 3 * 3 * 3 * 2
    assert all(NAME_PATTERN.match(n) for n in names), names
    long = point_name({f"section.key{i}": "v" * 30 for i in range(6)})
    assert len(long) <= 110 and NAME_PATTERN.match(long)


# ---------------------------------------------------------------- planning: every point validated first


def _config_file(tmp_path, **sections) -> str:
    data = {
        "name": "base",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": "teacher-x"},
        "student": {"from_teacher": {"layers": "every_other"}},
        **sections,
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_plan_builds_one_named_validated_config_per_point(tmp_path):
    sweep = plan_sweep(_config_file(tmp_path), ["loss.temperature=1,4", "loss.alpha=0.5,0.9", "training.max_steps=3"])
    assert sweep.folder == tmp_path / "runs" / "base-sweep"
    assert sweep.grid == {"loss.temperature": [1, 4], "loss.alpha": [0.5, 0.9]}
    assert sweep.fixed == {"training.max_steps": 3}
    assert [p.name for p in sweep.points] == [
        "temperature-1_alpha-0.5",
        "temperature-1_alpha-0.9",
        "temperature-4_alpha-0.5",
        "temperature-4_alpha-0.9",
    ]
    last = sweep.points[-1].config
    assert (last.loss.temperature, last.loss.alpha, last.training.max_steps) == (4.0, 0.9, 3)
    assert last.run_dir == sweep.folder / "temperature-4_alpha-0.9"


def test_a_bad_value_fails_before_anything_runs_naming_the_point_and_the_field(tmp_path):
    with pytest.raises(ConfigError) as err:
        plan_sweep(_config_file(tmp_path), ["loss.temperature=1,2", "loss.alpha=0.5,1.5"])
    message = str(err.value)
    assert "sweep point 2/4 temperature-1_alpha-1.5" in message and "sweep point 4/4 temperature-2_alpha-1.5" in message
    assert "loss.alpha" in message and "temperature-1_alpha-0.5" not in message
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="loss.temprature: unknown key"):
        plan_sweep(_config_file(tmp_path), ["loss.temprature=1,2"])


@pytest.mark.parametrize("items", [[], ["loss.temperature=2"], ["loss.temperature=2", "loss.alpha=0.5"]])
def test_no_swept_key_says_how_to_write_a_grid(tmp_path, items):
    with pytest.raises(ConfigError, match=re.escape("--set loss.temperature=1,2,4")):
        plan_sweep(_config_file(tmp_path), items)


# ---------------------------------------------------------------- running, on fake stages (control flow only)


def _fake_evaluate(fail_at: float | None = None, interrupt_at: float | None = None) -> list[Stage]:
    """One stage that writes an eval.json whose KL is the temperature, failing at the temperature given."""

    def run(cfg, ctx):
        if cfg.loss.temperature == fail_at:
            raise RuntimeError("out of memory at this temperature")
        if cfg.loss.temperature == interrupt_at:
            raise KeyboardInterrupt
        kl = cfg.loss.temperature
        m = {
            "perplexity": 10.0,
            "top1_agreement": 0.5,
            "top5_agreement": 0.8,
            "kl_to_teacher": kl,
            "intervals": {"kl_to_teacher": [kl - 0.1, kl + 0.1]},
            "parameters": 1000,
        }
        (ctx.run_dir / "eval.json").write_text(json.dumps({"models": {"student_distilled": m}}))
        return {}

    return [Stage("evaluate", ("loss",), ("eval.json",), run)]


def test_a_failing_point_is_recorded_and_the_others_still_run(tmp_path):
    sweep = plan_sweep(_config_file(tmp_path), ["loss.temperature=3,1,2"])
    record = run_sweep(sweep, stages=_fake_evaluate(fail_at=1))
    assert [p["status"] for p in record["points"]] == ["done", "failed", "done"]
    assert "out of memory" in record["points"][1]["error"]
    assert record["points"][2]["metrics"]["kl_to_teacher"] == 2
    assert json.loads((sweep.folder / "sweep.json").read_text())["points"] == record["points"]
    report = (sweep.folder / "sweep.md").read_text()
    assert "**temperature-2**" in report and "temperature-1: failed: `RuntimeError: out of memory" in report

    rerun = run_sweep(sweep, stages=_fake_evaluate())  # the cause fixed: only the failed point runs again
    assert [p["status"] for p in rerun["points"]] == ["done"] * 3
    assert "**temperature-1**" in (sweep.folder / "sweep.md").read_text()


def test_an_interrupt_stops_the_sweep_and_is_recorded(tmp_path):
    sweep = plan_sweep(_config_file(tmp_path), ["loss.temperature=1,2,3"])
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, stages=_fake_evaluate(interrupt_at=2))
    points = json.loads((sweep.folder / "sweep.json").read_text())["points"]
    assert [p["status"] for p in points] == ["done", "interrupted", "pending"]
    assert not (sweep.folder / "temperature-3").exists()


def test_restart_wipes_the_sweep_folder(tmp_path):
    sweep = plan_sweep(_config_file(tmp_path), ["loss.temperature=1,2"])
    run_sweep(sweep, stages=_fake_evaluate())
    (sweep.folder / "stale").mkdir()
    run_sweep(sweep, stages=_fake_evaluate(), resume=False)
    assert not (sweep.folder / "stale").exists() and (sweep.folder / "temperature-2" / "eval.json").is_file()


# ---------------------------------------------------------------- end to end on the tiny teacher


def test_a_loss_sweep_on_the_tiny_teacher_reuses_data_and_student_and_reruns_nothing(tmp_path, one_thread):
    teacher = save_tiny_pair(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "output_dir": str(tmp_path / "runs"),
                "teacher": {"model": str(teacher), "device": "cpu"},
                "student": {"from_teacher": {"layers": "every_other"}},
                "data": {
                    "source": "files",
                    "paths": [str(write_text_corpus(tmp_path / "corpus"))],
                    "max_seq_len": 16,
                    "validation_fraction": 0.2,
                },
                "loss": {"divergence": "forward_kl", "alpha": 0.8},
                "training": {"max_steps": 2, "save_steps": 2, "logging_steps": 1, "learning_rate": 1e-3},
                "evaluation": {"ce_control": False, "batch_size": 4, "cost": None, "generation": None},
            }
        )
    )
    sweep = plan_sweep(path, ["loss.temperature=1,2"])
    record = run_sweep(sweep)
    first, second = (sweep.folder / p.name for p in sweep.points)
    assert [p["status"] for p in record["points"]] == ["done", "done"]
    for run in (first, second):
        stages = json.loads((run / "manifest.json").read_text())["stages"]
        assert all(e["status"] == "done" for e in stages.values()), stages
        assert (run / "final" / "config.json").is_file() and (run / "report.md").is_file()
    stages = json.loads((second / "manifest.json").read_text())["stages"]
    assert {n for n, e in stages.items() if e.get("reused_from")} == {"data", "student"}
    assert stages["data"]["reused_from"] == str(first)
    assert record["points"][1]["reused"] == {"data": first.name, "student": first.name}
    assert os.path.samefile(first / "student" / "model.safetensors", second / "student" / "model.safetensors")
    kls = [p["metrics"]["kl_to_teacher"] for p in record["points"]]
    best = record["points"][kls.index(min(kls))]["name"]

    report = (sweep.folder / "sweep.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| temperature-")]
    assert len(rows) == 2 and all(line.rstrip(" |").endswith("done") for line in rows)
    assert f"Best point (lowest KL to teacher): **{best}**" in report
    assert (sweep.folder / "sweep.html").stat().st_size > 1000 and (sweep.folder / "plots" / "sweep.png").is_file()

    stamps = {
        p: p.stat().st_mtime_ns
        for run in (first, second)
        for p in (run / "eval.json", run / "final" / "model.safetensors")
    }
    manifest_before = (second / "manifest.json").read_text()
    rerun = run_sweep(sweep)
    assert [p["status"] for p in rerun["points"]] == ["done", "done"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing trained or evaluated again
    assert (second / "manifest.json").read_text() == manifest_before
