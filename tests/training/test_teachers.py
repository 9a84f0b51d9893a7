"""Several teachers in training: the ensemble's states, the trainer's loss against the reference, chunked = full,
copies of one teacher = that teacher, the config's refusals, a tokenizer mismatch named, and whole runs through
run_stages (logs in sum mode, resume)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainingArguments

from alambic.config import ConfigError, LossConfig, TrainingConfig, validate_config
from alambic.data import DistillationCollator
from alambic.losses import multi_teacher_distillation_loss
from alambic.modeling import counted_positions
from alambic.pipeline import _stage_hashes, run_stages
from alambic.stages import STAGES, load_additional_teachers, stages_until
from alambic.teachers.ensemble import TeacherEnsemble, WeightedTeacher
from alambic.training.run import train
from alambic.training.trainer import DistillationTrainer
from helpers import CrashAt, save_tiny_pair, tiny_model, tiny_prepared, tiny_tokenizer, write_text_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(data, n=3):
    return DistillationCollator(pad_token_id=3)([data.train[i] for i in range(n)])


# --------------------------------------------------------------------------------------------
# the ensemble


def test_the_ensemble_runs_each_teacher_at_the_counted_positions(tmp_path):
    data = tiny_prepared(tmp_path, chat=True)  # prompt tokens not counted, rows padded
    batch = _batch(data)
    a, b = tiny_model("qwen2", seed=3), tiny_model("llama", seed=4, hidden_size=48, intermediate_size=96)
    prepared = []
    additional = [WeightedTeacher("expert", a, 3.0), WeightedTeacher("other", b, 1.0, follow_student=False)]
    ensemble = TeacherEnsemble(additional, primary_weight=4.0, device="cpu", prepare=lambda m: prepared.append(m) or m)
    assert prepared == [a]  # only the teacher that follows the student is placed by the trainer
    assert ensemble.names == ("teacher", "expert", "other") and ensemble.weights == (0.5, 0.375, 0.125)
    assert not any(p.requires_grad for p in b.parameters()) and not b.training

    mask, _ = counted_positions(batch["labels"])
    states = ensemble.hidden_states(batch["input_ids"], batch["attention_mask"], mask)
    for model, state in zip((a, b), states):
        decoder = model.get_decoder()
        want = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        torch.testing.assert_close(state, want[:, :-1][mask], rtol=1e-5, atol=1e-6)
        assert not state.is_inference() and state.shape == (int(mask.sum()), model.config.hidden_size)
    assert [h.weight is m.get_output_embeddings().weight for h, m in zip(ensemble.heads(), (a, b))] == [True, True]
    logits = ensemble.logits(states)
    torch.testing.assert_close(logits[1], b.lm_head(states[1]))


def test_ensemble_refusals():
    model = tiny_model(num_layers=1)
    with pytest.raises(ValueError, match="distinct"):
        TeacherEnsemble([WeightedTeacher("x", model), WeightedTeacher("x", model)], device="cpu", prepare=lambda m: m)
    with pytest.raises(ValueError, match="finite and > 0"):
        TeacherEnsemble([WeightedTeacher("x", model, weight=0.0)], device="cpu", prepare=lambda m: m)
    with pytest.raises(ValueError, match="primary teacher's"):
        WeightedTeacher("teacher", model)
    with pytest.raises(ValueError, match="letters, digits"):
        WeightedTeacher("my teacher", model)


# --------------------------------------------------------------------------------------------
# the trainer's loss


@pytest.mark.parametrize("implementation", ["chunked", "full"])
@pytest.mark.parametrize("mode", ["mixture", "sum"])
def test_the_trainer_loss_is_the_multi_teacher_loss_of_the_models_logits(tmp_path, mode, implementation):
    student, primary, expert = (
        tiny_model("llama", seed=2, num_layers=2),
        tiny_model("llama", seed=1),
        tiny_model("llama", seed=5, hidden_size=48, intermediate_size=96),
    )
    cfg = LossConfig(
        alpha=0.7, temperature=2.0, divergence="jsd", teachers=mode, implementation=implementation, chunk_size=7
    )
    trainer = DistillationTrainer(
        model=student,
        args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
        teacher=primary,
        loss_config=cfg,
        teacher_weight=1.0,
        additional_teachers=[WeightedTeacher("additional_0", expert, weight=3.0)],
    )
    batch = _batch(tiny_prepared(tmp_path, chat=True))
    with torch.no_grad():
        loss = trainer.compute_loss(student, batch)
        ids, attn = batch["input_ids"], batch["attention_mask"]
        mask, targets = counted_positions(batch["labels"])
        logits = [
            m(input_ids=ids, attention_mask=attn).logits[:, :-1][mask].double() for m in (student, primary, expert)
        ]
        want = multi_teacher_distillation_loss(
            logits[0],
            logits[1:],
            targets,
            weights=[1.0, 3.0],
            teachers=mode,
            divergence="jsd",
            alpha=0.7,
            temperature=2.0,
        )
    torch.testing.assert_close(loss.double(), want.total, rtol=1e-5, atol=1e-6)
    logged = trainer._parts["eval"]  # the student is in eval mode here
    assert ("loss_soft_additional_0" in logged) == (mode == "sum")
    if mode == "sum":
        soft = want.soft_per_teacher.tolist()
        assert logged["loss_soft_teacher"][0] == pytest.approx(soft[0], rel=1e-5)
        assert logged["loss_soft_additional_0"][0] == pytest.approx(soft[1], rel=1e-5)


def _one_sgd_step(tmp_path, name, models, *, teacher_weight=1.0, **loss):
    """One SGD step of a fresh student; `models`: the primary teacher, then (teacher, weight) pairs."""
    data = tiny_prepared(tmp_path, chat=True)
    student = tiny_model("qwen2", seed=2, num_layers=2)
    train(
        student,
        tiny_tokenizer(),
        data,
        teacher=models[0],
        additional_teachers=[WeightedTeacher(f"additional_{i}", t, w) for i, (t, w) in enumerate(models[1:])],
        teacher_weight=teacher_weight,
        loss=LossConfig(**{"alpha": 0.7, "temperature": 2.0, "divergence": "forward_kl", **loss}),
        training=TrainingConfig(
            max_steps=1,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            learning_rate=1.0,
            warmup_ratio=0,
            lr_scheduler_type="constant",
            max_grad_norm=1e9,
            save_steps=100,
            trainer_args={"optim": "sgd", "data_seed": 0},
        ),
        output_dir=tmp_path / name,
    )
    return student.state_dict()


@pytest.mark.parametrize("mode", ["mixture", "sum"])
def test_chunked_and_full_take_the_same_step_with_two_teachers(tmp_path, mode):
    models = lambda: [tiny_model("qwen2", seed=1), (tiny_model("qwen2", seed=6, num_layers=3), 2.0)]  # noqa: E731
    full = _one_sgd_step(tmp_path, "full", models(), teachers=mode, implementation="full", divergence="reverse_kl")
    chunked = _one_sgd_step(
        tmp_path, "chunked", models(), teachers=mode, implementation="chunked", chunk_size=5, divergence="reverse_kl"
    )
    for key in full:
        torch.testing.assert_close(chunked[key], full[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("mode", ["mixture", "sum"])
def test_copies_of_one_teacher_teach_what_that_teacher_teaches(tmp_path, mode):
    one = _one_sgd_step(tmp_path, "one", [tiny_model("qwen2", seed=1)], teachers=mode)
    copies = _one_sgd_step(
        tmp_path,
        "copies",
        [tiny_model("qwen2", seed=1), (tiny_model("qwen2", seed=1), 2.5)],
        teacher_weight=0.5,
        teachers=mode,
    )
    for key in one:
        torch.testing.assert_close(copies[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


def test_additional_teachers_need_the_live_primary_teacher(tmp_path):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    extra = [WeightedTeacher("additional_0", tiny_model(num_layers=1))]
    with pytest.raises(ValueError, match=r"additional teachers \['additional_0'\] need the live primary.*offline"):
        DistillationTrainer(
            model=tiny_model(num_layers=1),
            args=args,
            teacher=None,
            cached_teacher=True,
            loss_config=LossConfig(alpha=1.0),
            additional_teachers=extra,
        )
    with pytest.raises(ValueError, match=r"alpha = 0.0"):
        DistillationTrainer(
            model=tiny_model(num_layers=1),
            args=args,
            teacher=tiny_model(num_layers=1),
            loss_config=LossConfig(alpha=0.0),
            additional_teachers=extra,
        )


# --------------------------------------------------------------------------------------------
# config and stages


def _save_teacher(folder, seed, tokenizer=None):
    tiny_model("llama", seed=seed).save_pretrained(folder)
    (tokenizer or tiny_tokenizer()).save_pretrained(folder)
    return str(folder)


def _run_config(tmp_path, *, teachers="mixture", name="tiny", **overrides):
    data = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": str(save_tiny_pair(tmp_path)), "device": "cpu"},
        "teacher_weight": 2.0,
        "additional_teachers": [{"model": _save_teacher(tmp_path / "expert", seed=7), "device": "cpu", "weight": 1.0}],
        "student": {"from_teacher": {"layers": "every_other"}},
        "data": {
            "source": "files",
            "paths": [str(write_text_corpus(tmp_path / "corpus"))],
            "max_seq_len": 16,
            "validation_fraction": 0.2,
        },
        "loss": {"divergence": "forward_kl", "alpha": 0.8, "temperature": 2.0, "teachers": teachers},
        "training": {"max_steps": 4, "save_steps": 2, "logging_steps": 1, "learning_rate": 1e-3},
        "evaluation": {"ce_control": False},
    }
    data.update(overrides)
    return validate_config(data)


def test_config_refusals_are_collected_and_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        _run_config(
            tmp_path,
            data={"source": "files", "paths": [str(write_text_corpus(tmp_path / "c"))], "teacher_cache": {"k": 8}},
            loss={"alpha": 0.0},
        )
    assert "data.teacher_cache holds the top-k log-probs of `teacher` alone" in str(err.value)
    assert "loss.alpha = 0 (plain cross-entropy)" in str(err.value)
    with pytest.raises(ConfigError, match=r"additional_teachers\.0\.weight: .*greater than 0"):
        _run_config(tmp_path, additional_teachers=[{"model": "x", "weight": 0}])
    with pytest.raises(ConfigError, match=r"loss\.teachers"):
        _run_config(tmp_path, teachers="vote")
    assert _run_config(tmp_path, additional_teachers=[]).teacher_weight == 2.0  # one teacher: nothing to refuse


def test_a_teacher_with_another_tokenizer_is_refused_by_name(tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from helpers import _tiny_tokenizer_json

    spec = json.loads(_tiny_tokenizer_json(320))
    vocab = spec["model"]["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    a, b = by_id[100], by_id[101]  # two ordinary tokens trade ids: the same tokens, other numbers
    vocab[a], vocab[b] = vocab[b], vocab[a]
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>", pad_token="<pad>"
    )
    cfg = _run_config(
        tmp_path,
        additional_teachers=[
            {"model": _save_teacher(tmp_path / "good", seed=8), "device": "cpu"},
            {"model": _save_teacher(tmp_path / "shuffled", seed=9, tokenizer=other), "device": "cpu"},
        ],
    )
    with pytest.raises(ConfigError, match=r"'additional_teachers\[1\] \(.*shuffled\)' have different tokenizers"):
        load_additional_teachers(cfg)
    loaded = load_additional_teachers(_run_config(tmp_path / "ok"))
    assert [(t.name, t.weight, t.follow_student) for t in loaded] == [("additional_0", 1.0, False)]


def test_the_teachers_are_inputs_of_distillation_only(tmp_path):
    cfg = _run_config(tmp_path)
    heavier = cfg.model_copy(
        update={"additional_teachers": [cfg.additional_teachers[0].model_copy(update={"weight": 5.0})]}
    )
    before, after = _stage_hashes(cfg, STAGES), _stage_hashes(heavier, STAGES)
    assert before["student"] == after["student"] and before["data"] == after["data"]
    assert before["distill"] != after["distill"]


def test_a_run_with_two_teachers_in_sum_mode_logs_each(tmp_path):
    cfg = _run_config(tmp_path, teachers="sum")
    run_stages(cfg, stages_until("distill"))
    logged = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss_soft" in r]
    assert len(steps) == 4
    for r in steps:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "loss_soft", "loss_hard"))
        # soft = (2 * teacher + 1 * expert) / 3: the weights normalised
        weighted = (2 * r["loss_soft_teacher"] + r["loss_soft_additional_0"]) / 3
        assert r["loss_soft"] == pytest.approx(weighted, rel=1e-4, abs=1e-6)
    assert (cfg.run_dir / "final" / "config.json").is_file()


def test_an_interrupted_run_with_two_teachers_resumes_to_the_same_student(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import alambic.training.run as run_mod

    straight = _run_config(tmp_path, name="straight")
    run_stages(straight, stages_until("distill"))

    cut = _run_config(tmp_path, name="cut")
    original_train = run_mod.train
    crash = CrashAt(3, RuntimeError("power cut"))
    monkeypatch.setattr(run_mod, "train", lambda *a, **k: original_train(*a, callbacks=[crash], **k))
    with pytest.raises(RuntimeError, match="power cut"):
        run_stages(cut, stages_until("distill"))
    monkeypatch.setattr(run_mod, "train", original_train)
    run_stages(cut, stages_until("distill"))
    summary = json.loads((cut.run_dir / "train_summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["global_step"] == 4
    want = load_file(straight.run_dir / "final" / "model.safetensors")
    got = load_file(cut.run_dir / "final" / "model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
