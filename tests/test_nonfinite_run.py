"""A whole run whose training blows up: `alambic run` exits 1, names the step and the cause, and exports nothing."""

import json

import yaml
from typer.testing import CliRunner

from alambic.cli import app
from helpers import save_tiny_pair, write_text_corpus


def test_a_diverging_run_exits_1_and_exports_nothing(tmp_path):
    teacher = save_tiny_pair(tmp_path)
    config = {
        "name": "nan",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": str(teacher), "device": "cpu"},
        "student": {"from_teacher": {"layers": "every_other"}},
        "data": {
            "source": "files",
            "paths": [str(write_text_corpus(tmp_path / "corpus"))],
            "max_seq_len": 16,
            "validation_fraction": 0.2,
        },
        "loss": {"alpha": 0.8},
        "training": {"max_steps": 12, "save_steps": 100, "logging_steps": 1, "learning_rate": 1e30},
        "evaluation": {"ce_control": False},
    }
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert "training.learning_rate = 1e+30" in said and "is not finite" in said
    assert "Traceback" not in result.output and "stage distill" in said  # one named line, no frames
    run = tmp_path / "runs" / "nan"
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert manifest["distill"]["status"] == "failed" and "NonFiniteTrainingError" in manifest["distill"]["error"]
    assert not (run / "final").exists() and "evaluate" not in manifest
