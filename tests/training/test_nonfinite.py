"""Non-finite training: a step whose loss or gradient norm is NaN or inf stops the training (naming the step and the
likely cause) or, under `training.on_nonfinite: skip`, is not taken; non-finite weights are never exported."""

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from alambic.config import DataConfig, FineTuneConfig, LossConfig, TrainingConfig
from alambic.data import prepare_datasets
from alambic.training.base import NonFiniteTrainingError
from alambic.training.checkpoints import NonFiniteWeightsError, check_finite_weights
from alambic.training.classifier import fine_tune_teacher, train_classifier
from alambic.training.run import train
from helpers import tiny_classifier, tiny_model, tiny_prepared, tiny_tokenizer, write_labelled_corpus


class _Poison(TrainerCallback):
    """Makes the student's embeddings NaN during the given (1-based) optimizer steps: that step's loss and gradients
    are NaN, the steps around it are not."""

    def __init__(self, model, steps):
        self.steps, self.active = set(steps), False
        model.get_input_embeddings().register_forward_hook(
            lambda module, args, out: out * float("nan") if self.active else out
        )

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step + 1 in self.steps

    def on_step_end(self, args, state, control, **kwargs):
        self.active = False


class _Weights(TrainerCallback):
    """The student's weights after each optimizer step."""

    def __init__(self):
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _training(**kw):
    return TrainingConfig(**{"max_steps": 6, "save_steps": 100, "logging_steps": 1, "learning_rate": 1e-3, **kw})


@pytest.mark.parametrize("run", ["distill", "ce_control"])
def test_a_learning_rate_that_blows_up_stops_the_training_before_any_export(tmp_path, run):
    data = tiny_prepared(tmp_path)
    teacher = tiny_model("llama", seed=1) if run == "distill" else None
    student = tiny_model("llama", seed=2, num_layers=2)
    with pytest.raises(NonFiniteTrainingError) as err:
        train(
            student,
            tiny_tokenizer(),
            data,
            teacher=teacher,
            loss=LossConfig(alpha=0.5 if teacher else 0.0),
            training=_training(max_steps=12, learning_rate=1e30),
            output_dir=tmp_path / "run",
        )
    message = str(err.value)
    assert "step" in message and "training.learning_rate = 1e+30" in message and "on_nonfinite" in message
    assert not (tmp_path / "run" / "final").exists()
    # every logged loss is a real figure: none of them a NaN shown as 0.0
    losses = [r["loss"] for r in _records(tmp_path / "run") if "loss" in r]
    assert losses and all(math.isfinite(v) and v > 0 for v in losses)
    # the step refused was not taken: the weights stayed finite
    assert all(torch.isfinite(p).all() for p in student.parameters())


def _labelled(tmp_path):
    path = write_labelled_corpus(tmp_path / "news.jsonl", n_docs=24)
    return prepare_datasets(
        DataConfig(source="files", format="classification", paths=[path], max_seq_len=24, validation_fraction=0.25),
        tiny_tokenizer(),
    )


def test_the_classifier_trainer_stops_on_a_non_finite_step_too(tmp_path):
    data = _labelled(tmp_path)
    student = tiny_classifier(seed=2, num_layers=2)
    with pytest.raises(NonFiniteTrainingError, match=r"step 2 of 4"):
        train_classifier(
            student,
            tiny_tokenizer(),
            data,
            teacher=tiny_classifier(seed=1),
            loss=LossConfig(alpha=0.5),
            training=_training(max_steps=4),
            output_dir=tmp_path / "run",
            callbacks=[_Poison(student, steps=[2])],
        )
    assert not (tmp_path / "run" / "final").exists()


def test_a_teachers_fine_tuning_stops_naming_its_own_settings(tmp_path):
    with pytest.raises(NonFiniteTrainingError, match=r"teacher\.fine_tune\.learning_rate = 1e\+30") as err:
        fine_tune_teacher(
            tiny_classifier(seed=1),
            tiny_tokenizer(),
            _labelled(tmp_path),
            FineTuneConfig(max_steps=12, batch_size=4, learning_rate=1e30),
            tmp_path / "ft",
        )
    assert "on_nonfinite" not in str(err.value)  # not a setting of the fine-tuning
    assert not (tmp_path / "ft" / "final").exists()


def test_skip_leaves_the_bad_steps_out_counts_them_and_logs_no_false_loss(tmp_path):
    data = tiny_prepared(tmp_path)
    teacher = tiny_model("llama", seed=1)
    summaries, weights = {}, _Weights()
    for logging_steps in (1, 2):
        student = tiny_model("llama", seed=2, num_layers=2)
        callbacks = [_Poison(student, steps=[3]), *([weights] if logging_steps == 1 else [])]
        summaries[logging_steps] = train(
            student,
            tiny_tokenizer(),
            data,
            teacher=teacher,
            loss=LossConfig(alpha=0.5),
            callbacks=callbacks,
            training=_training(on_nonfinite="skip", logging_steps=logging_steps),
            output_dir=tmp_path / f"log{logging_steps}",
        )
        assert (tmp_path / f"log{logging_steps}" / "final" / "config.json").is_file()
    # step 3 was not taken: the weights after it are those after step 2; step 4 moved them again
    for key, value in weights.after[2].items():
        torch.testing.assert_close(weights.after[3][key], value, rtol=0, atol=0, msg=key)
    assert any(not torch.equal(weights.after[4][k], v) for k, v in weights.after[3].items())
    assert summaries[1]["nonfinite_steps_skipped"] == 1
    every = {r["step"]: r for r in _records(tmp_path / "log1") if "learning_rate" in r}  # the training logs
    assert every[3]["nonfinite_steps_skipped"] == 1 and "loss" not in every[3]  # no loss shown for a skipped step
    # a window holding the skipped step logs the mean of the steps taken in it (step 4's), not a diluted figure
    pairs = {r["step"]: r for r in _records(tmp_path / "log2") if "loss" in r}
    assert pairs[4]["loss"] == pytest.approx(every[4]["loss"], rel=1e-5)
    assert pairs[6]["loss"] == pytest.approx((every[5]["loss"] + every[6]["loss"]) / 2, rel=1e-5)
    assert all(math.isfinite(r.get("loss_soft", 0.0)) for r in _records(tmp_path / "log2"))  # the parts too
    # the run's mean loss counts the five steps taken
    taken = [every[s]["loss"] for s in (1, 2, 4, 5, 6)]
    assert summaries[1]["train_loss"] == pytest.approx(sum(taken) / 5, rel=1e-4)


def test_skip_drops_a_whole_accumulated_step(tmp_path):
    """Under gradient accumulation the step is judged once, over all its micro-batches."""
    data = tiny_prepared(tmp_path)
    student, weights = tiny_model("llama", seed=2, num_layers=2), _Weights()
    summary = train(
        student,
        tiny_tokenizer(),
        data,
        teacher=None,
        loss=LossConfig(alpha=0.0),
        training=_training(max_steps=3, gradient_accumulation_steps=2, on_nonfinite="skip"),
        output_dir=tmp_path / "run",
        callbacks=[_Poison(student, steps=[2]), weights],
    )
    for key, value in weights.after[1].items():
        torch.testing.assert_close(weights.after[2][key], value, rtol=0, atol=0, msg=key)
    assert summary["nonfinite_steps_skipped"] == 1 and math.isfinite(summary["train_loss"])


def test_skip_still_stops_after_too_many_bad_steps_in_a_row(tmp_path):
    data = tiny_prepared(tmp_path)
    student = tiny_model("llama", seed=2, num_layers=2)
    with pytest.raises(NonFiniteTrainingError, match="in a row"):
        train(
            student,
            tiny_tokenizer(),
            data,
            teacher=None,
            loss=LossConfig(alpha=0.0),
            training=_training(max_steps=30, on_nonfinite="skip"),
            output_dir=tmp_path / "run",
            callbacks=[_Poison(student, steps=range(2, 31))],
        )
    assert not (tmp_path / "run" / "final").exists()


class _Break(TrainerCallback):
    """Sets one weight to NaN after the last optimizer step, where no later forward would notice."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")


def test_non_finite_weights_are_never_exported(tmp_path):
    data = tiny_prepared(tmp_path)
    with pytest.raises(NonFiniteWeightsError, match=r"model\.norm\.weight"):
        train(
            tiny_model("llama", seed=2, num_layers=2),
            tiny_tokenizer(),
            data,
            teacher=None,
            loss=LossConfig(alpha=0.0),
            training=_training(max_steps=2),
            output_dir=tmp_path / "run",
            callbacks=[_Break()],
        )
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "final.tmp").exists()


def test_check_finite_weights_names_every_broken_tensor(tmp_path):
    model = tiny_model("llama", num_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("inf")
        model.lm_head.weight[:] = float("nan")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(NonFiniteWeightsError) as err:
        check_finite_weights(tmp_path / "m")
    assert "model.layers.1.mlp.up_proj.weight (1 of" in str(err.value)
    good = tiny_model("llama", num_layers=2)
    good.save_pretrained(tmp_path / "good")
    check_finite_weights(tmp_path / "good")  # no error
