"""Checkpoints and resume under faults: a damaged checkpoint is set aside for the previous complete one, a resumed
training logs each step once and reports the whole run's loss, a finished one exports without another step, and the
export holds no pickle."""

import json

import pytest
import torch

from alambic.config import LossConfig, TrainingConfig
from alambic.training.checkpoints import checkpoint_problem, last_complete_checkpoint
from alambic.training.run import train
from helpers import CrashAt, tiny_model, tiny_prepared, tiny_tokenizer

KWARGS = dict(
    loss=LossConfig(alpha=0.5), training=TrainingConfig(max_steps=6, save_steps=2, logging_steps=1, learning_rate=1e-3)
)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted training: its folder, final weights and summary."""
    root = tmp_path_factory.mktemp("straight")
    data = tiny_prepared(root)
    student = tiny_model("llama", seed=2, num_layers=2)
    summary = train(
        student, tiny_tokenizer(), data, teacher=tiny_model("llama", seed=1), output_dir=root / "run", **KWARGS
    )
    return root / "run", student.state_dict(), summary


def _crashed(tmp_path, at_step=6):
    data = tiny_prepared(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(
            tiny_model("llama", seed=2, num_layers=2),
            tiny_tokenizer(),
            data,
            teacher=tiny_model("llama", seed=1),
            output_dir=tmp_path / "run",
            callbacks=[CrashAt(at_step)],
            **KWARGS,
        )
    return data


def _resume(tmp_path, data):
    student = tiny_model("llama", seed=3, num_layers=2)  # weights come from the checkpoint, not from here
    summary = train(
        student, tiny_tokenizer(), data, teacher=tiny_model("llama", seed=1), output_dir=tmp_path / "run", **KWARGS
    )
    return student, summary


def _assert_same_weights(a, b):
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_truncated_checkpoint_is_set_aside_for_the_previous_complete_one(tmp_path, straight, capsys):
    data = _crashed(tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"
    weights = checkpoints / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut in half, as a crash may leave it
    student, summary = _resume(tmp_path, data)
    assert summary["resumed_from"] == 2 and summary["global_step"] == 6
    out = "".join(capsys.readouterr().err.split())  # rich wraps its lines, long paths anywhere
    assert "checkpoints/checkpoint-4isdamaged:model.safetensors" in out and "resumingfrom" in out
    assert out.index("resumingfrom") < out.index("checkpoints/checkpoint-2")
    assert (checkpoints / "damaged-checkpoint-4" / "model.safetensors").is_file()  # set aside, not deleted
    assert last_complete_checkpoint(checkpoints).name == "checkpoint-6"
    _assert_same_weights(student.state_dict(), straight[1])


@pytest.mark.parametrize("damage", ["optimizer", "trainer_state", "safetensors_header", "missing_weights"])
def test_checkpoint_problem_names_the_damaged_file(tmp_path, straight, damage):
    import shutil

    folder = tmp_path / "checkpoint-6"
    shutil.copytree(straight[0] / "checkpoints" / "checkpoint-6", folder)
    assert checkpoint_problem(folder) is None
    if damage == "optimizer":
        (folder / "optimizer.pt").write_bytes((folder / "optimizer.pt").read_bytes()[:-100])
        expected = "optimizer.pt"
    elif damage == "trainer_state":
        (folder / "trainer_state.json").write_text((folder / "trainer_state.json").read_text()[:40])
        expected = "trainer_state.json"
    elif damage == "safetensors_header":
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[8:16] = b"\x00" * 8  # the JSON header no longer parses
        (folder / "model.safetensors").write_bytes(bytes(data))
        expected = "model.safetensors"
    else:
        (folder / "model.safetensors").unlink()
        expected = "no model weights"
    problem = checkpoint_problem(folder)
    assert problem is not None and expected in problem


def test_a_resumed_training_logs_each_step_once_and_reports_the_whole_runs_loss(tmp_path, straight):
    data = _crashed(tmp_path)  # steps 1-5 logged, checkpoint-4 kept: step 5 is trained and logged again
    _, summary = _resume(tmp_path, data)
    steps = [
        r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert summary["train_loss"] == pytest.approx(straight[2]["train_loss"], rel=1e-4)


def test_a_finished_training_whose_export_is_gone_exports_without_another_step(tmp_path, straight):
    data = tiny_prepared(tmp_path)
    student = tiny_model("llama", seed=2, num_layers=2)
    first = train(
        student, tiny_tokenizer(), data, teacher=tiny_model("llama", seed=1), output_dir=tmp_path / "run", **KWARGS
    )
    import shutil

    shutil.rmtree(tmp_path / "run" / "final")
    again, summary = _resume(tmp_path, data)
    assert summary["global_step"] == 6 and summary["resumed_from"] == 6
    assert summary["train_loss"] == pytest.approx(first["train_loss"], rel=1e-6)
    _assert_same_weights(again.state_dict(), student.state_dict())
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_the_export_holds_no_pickle_and_states_its_arguments_as_json(straight):
    final = straight[0] / "final"
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt")) and not list(final.glob("*.pth"))
    args = json.loads((final / "training_args.json").read_text())
    assert args["max_steps"] == 6 and args["learning_rate"] == 1e-3
