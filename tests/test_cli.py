import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from alambic.cli import app
from alambic.config import validate_config

runner = CliRunner()
# From the app itself (typer's click group), so a new command gets its --help test without a list to update.
COMMANDS = sorted(typer.main.get_command(app).commands)


def test_the_commands_are_read_from_the_app():
    assert {"run", "sweep", "generate", "quickstart"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_quickstart_prints_a_valid_editable_config():
    result = runner.invoke(app, ["quickstart", "--print-config"])
    assert result.exit_code == 0
    assert validate_config(yaml.safe_load(result.stdout)).name == "quickstart"


def test_a_bad_config_exits_2_naming_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"model": "x"}, "student": {"model": "y"}, "loss": {"alpha": 2}}))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "loss.alpha" in " ".join(result.output.split())


def test_a_missing_model_exits_2_and_says_what_to_do(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path),
                "teacher": {"model": str(tmp_path / "nowhere")},
                "student": {"from_teacher": {}},
            }
        )
    )
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "no such folder" in " ".join(result.output.split())


def test_report_of_an_unevaluated_folder_exits_2(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "eval.json" in result.output


def test_prune_without_from_teacher_exits_2_and_says_what_to_do(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"model": "x"}, "student": {"model": "my-student"}}))
    result = runner.invoke(app, ["prune", str(path)])
    assert result.exit_code == 2
    assert "add a student.from_teacher section" in " ".join(result.output.split())


def test_prune_to_an_impossible_shape_exits_2_naming_the_size(tmp_path):
    from helpers import save_tiny_pair, write_text_corpus

    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "runs"),
                "teacher": {"model": str(save_tiny_pair(tmp_path)), "device": "cpu"},
                "student": {"from_teacher": {"hidden_size": 1000, "calibration_sequences": 2}},
                "data": {"source": "files", "paths": [str(write_text_corpus(tmp_path / "corpus"))], "max_seq_len": 16},
            }
        )
    )
    result = runner.invoke(app, ["prune", str(path)])
    assert result.exit_code == 2, result.output
    assert "hidden_size=1000: keep between 1 and the teacher's 32" in " ".join(result.output.split())


def _sweep_config(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "base",
                "output_dir": str(tmp_path / "runs"),
                "teacher": {"model": "x"},
                "student": {"from_teacher": {}},
            }
        )
    )
    return str(path)


def test_sweep_help_shows_the_grid_syntax():
    result = runner.invoke(app, ["sweep", "--help"])
    assert result.exit_code == 0 and "loss.temperature=1,2,4" in result.output


@pytest.mark.parametrize(
    "sets, message",
    [
        (["loss.temperature=1,2", "loss.alpha=0.5,3"], "sweep point 2/4 temperature-1_alpha-3"),
        (["loss.temperature=2"], "nothing to sweep"),
        (["loss.temperature=1,,2"], "empty value"),
    ],
)
def test_a_bad_sweep_exits_2_before_running_anything(tmp_path, sets, message):
    result = runner.invoke(app, ["sweep", _sweep_config(tmp_path), *(f"--set={s}" for s in sets)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("raise_at, exit_code", [(None, 0), (2.0, 1), ("interrupt", 130)])
def test_sweep_exit_codes(tmp_path, monkeypatch, raise_at, exit_code):
    """0 when every point is done, 1 when one failed (the report is still written), 130 on Ctrl-C."""
    import json

    import alambic.stages
    from alambic.pipeline import Stage

    def evaluate(cfg, ctx):
        if raise_at == "interrupt":
            raise KeyboardInterrupt
        if cfg.loss.temperature == raise_at:
            raise RuntimeError("this point breaks")
        (ctx.run_dir / "eval.json").write_text(json.dumps({"models": {"student_distilled": {"kl_to_teacher": 1.0}}}))
        return {}

    monkeypatch.setattr(alambic.stages, "STAGES", [Stage("evaluate", ("loss",), ("eval.json",), evaluate)])
    result = runner.invoke(app, ["sweep", _sweep_config(tmp_path), "--set", "loss.temperature=1,2"])
    assert result.exit_code == exit_code, result.output
    assert (tmp_path / "runs" / "base-sweep" / "sweep.md").is_file() == (exit_code != 130)
