"""Classifier runs end to end on tiny models: the depth-pruned classifier, a whole run through every stage
(fine-tuned teacher, distilled student, CE control, eval.json, report), and the configurations refused."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from alambic.config import ConfigError, validate_config
from alambic.pipeline import run_stages
from alambic.stages import STAGES, stages_until
from alambic.students.prune import keep_layers
from helpers import save_tiny_pair, tiny_classifier, write_labelled_corpus


def test_a_depth_pruned_classifier_reloads_with_the_same_logits(tmp_path, one_thread):
    teacher = tiny_classifier(num_layers=4, seed=3)
    student = keep_layers(teacher, [0, 2])
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    torch.testing.assert_close(student.score.weight, teacher.score.weight)  # the head is copied, not shared
    assert student.score.weight.data_ptr() != teacher.score.weight.data_ptr()
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    student.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    ids = torch.tensor([[10, 11, 12, 13, 3, 3], [14, 15, 16, 17, 18, 19]])
    mask = (ids != 3).long()
    torch.testing.assert_close(
        reloaded(input_ids=ids, attention_mask=mask).logits, student(input_ids=ids, attention_mask=mask).logits
    )
    assert reloaded.config.num_labels == 3 and reloaded.config.pad_token_id == 3


def _config(tmp_path, **overrides):
    data = {
        "name": "cls",
        "output_dir": str(tmp_path / "runs"),
        "task": "sequence_classification",
        "teacher": {
            "model": str(save_tiny_pair(tmp_path)),
            "device": "cpu",
            "fine_tune": {"max_steps": 6, "learning_rate": 3e-3, "batch_size": 6, "warmup_ratio": 0.0},
        },
        "student": {"from_teacher": {"layers": "every_other"}},
        "data": {
            "source": "files",
            "format": "classification",
            "paths": [str(write_labelled_corpus(tmp_path / "news.jsonl", 30))],
            "max_seq_len": 24,
            "validation_fraction": 0.2,
        },
        "loss": {"divergence": "forward_kl", "alpha": 0.5, "temperature": 2.0},
        "training": {
            "max_steps": 3,
            "per_device_train_batch_size": 4,
            "save_steps": 2,
            "logging_steps": 1,
            "learning_rate": 1e-3,
        },
        "evaluation": {"ce_control": True, "batch_size": 4, "cost": {"batch_size": 2, "warmup": 0, "repeats": 1}},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(data)


def test_a_whole_classification_run(tmp_path, one_thread):
    cfg = _config(tmp_path)
    run_stages(cfg, STAGES)
    run = cfg.run_dir
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert list(manifest) == ["data", "teacher", "student", "distill", "control", "evaluate", "report"]
    assert all(e["status"] == "done" for e in manifest.values())
    labels = json.loads((run / "data" / "split.json").read_text())["labels"]
    assert labels == ["business", "sport", "tech"]
    teacher = json.loads((run / "teacher" / "final" / "config.json").read_text())
    assert teacher["architectures"] == ["LlamaForSequenceClassification"]
    assert teacher["id2label"] == {str(i): name for i, name in enumerate(labels)}
    student = json.loads((run / "student" / "config.json").read_text())
    assert student["num_hidden_layers"] == 2 and student["id2label"] == teacher["id2label"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_soft" in r and "loss_hard" in r for r in logged)
    control_log = (run / "control" / "metrics.jsonl").read_text()
    assert "loss_hard" in control_log and "loss_soft" not in control_log  # the CE control: labels only

    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["task"] == "sequence_classification" and evaluation["labels"] == labels
    models = evaluation["models"]
    assert set(models) == {"teacher", "student_before", "student_distilled", "student_ce_control"}
    for name, m in models.items():
        assert m["num_examples"] == 6
        for metric in ("accuracy", "macro_f1", "teacher_agreement"):
            low, high = m["intervals"][metric]
            assert 0 <= low <= m[metric] <= high <= 1, (name, metric)
        assert m["cost"]["forward_seconds_per_batch"]["median"] > 0
    assert models["teacher"]["teacher_agreement"] == 1.0 and models["teacher"]["kl_to_teacher"] == pytest.approx(0)
    assert models["student_distilled"]["parameters"] < models["teacher"]["parameters"]
    assert evaluation["retention"]["student_distilled"]["size_reduction"] > 1
    report = (run / "report.md").read_text()
    assert "## Classification on held-out data (6 examples never trained on, 3 classes)" in report
    assert "macro-F1" in report and "F1 per class" in report and "student distilled" in report
    assert "perplexity" not in report.lower()  # the next-token sections are left out

    stamp = (run / "teacher" / "final" / "model.safetensors").stat().st_mtime_ns
    run_stages(cfg, STAGES)  # nothing redone
    assert (run / "teacher" / "final" / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_backbone_teacher_without_fine_tuning_is_refused(tmp_path, one_thread):
    cfg = _config(tmp_path, teacher={"fine_tune": None})
    with pytest.raises(ConfigError, match="is not a sequence classifier.*set teacher.fine_tune"):
        run_stages(cfg, stages_until("student"))


def test_impossible_combinations_are_refused_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        _config(
            tmp_path,
            data={"format": "text", "teacher_cache": {"k": 8}},
            student={"from_teacher": {"layers": "importance", "num_layers": 2}},
        )
    message = str(err.value)
    for expected in (
        "set data.format: classification (got 'text')",
        "remove data.teacher_cache",
        "choose layers every_other",
    ):
        assert expected in message, expected


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"task": "causal_lm"}, "set task: sequence_classification"),
        ({"data": {"format": "chat"}}, "set data.format: classification (got 'chat')"),
        ({"student": {"from_teacher": {"intermediate_size": 32}}}, "importance"),
        ({"loss": {"features": {"hidden_states": {"weight": 0.5}}}}, "remove loss.features"),
    ],
)
def test_each_refusal_names_the_fields(tmp_path, changes, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        _config(tmp_path, **changes)


def test_the_distill_stage_resolves_each_model_once(tmp_path, one_thread, monkeypatch):
    """Whether a model is a classifier, and its tokenizer, are asked once per model on the distill stage's path
    (`stages.run_models.RunModels`), not again by each helper."""
    import alambic.models as models

    cfg = _config(tmp_path, evaluation={"ce_control": False})
    run_stages(cfg, stages_until("student"))
    calls: dict[tuple[str, str], int] = {}
    for name in ("is_classifier", "load_tokenizer"):
        original = getattr(models, name)

        def counted(model_cfg, *args, _original=original, _name=name, **kwargs):
            key = (_name, model_cfg.model)
            calls[key] = calls.get(key, 0) + 1
            return _original(model_cfg, *args, **kwargs)

        monkeypatch.setattr(models, name, counted)
    run_stages(cfg, stages_until("distill"))
    assert calls and max(calls.values()) == 1, calls
