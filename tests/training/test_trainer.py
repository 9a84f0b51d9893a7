import copy

import pytest
import torch
from transformers import TrainingArguments

from alambic.config import LossConfig, TrainingConfig
from alambic.data import DistillationCollator
from alambic.evaluation.quality import evaluate_against_teacher
from alambic.training.checkpoints import last_complete_checkpoint
from alambic.training.run import train
from alambic.training.trainer import DistillationTrainer
from helpers import CrashAt, tiny_model, tiny_prepared, tiny_tokenizer


def _kl(teacher, student, data):
    res = evaluate_against_teacher(teacher, {"s": student}, data.validation, pad_token_id=3, batch_size=4)
    return res["s"]["kl_to_teacher"]


def test_distillation_moves_the_student_toward_the_teacher(tmp_path):
    data = tiny_prepared(tmp_path)
    teacher, student = tiny_model("llama", seed=1), tiny_model("llama", seed=2, num_layers=2)
    teacher_state = copy.deepcopy(teacher.state_dict())
    before = _kl(teacher, student, data)
    summary = train(
        student,
        tiny_tokenizer(),
        data,
        teacher=teacher,
        loss=LossConfig(alpha=1.0),
        training=TrainingConfig(max_steps=30, learning_rate=3e-3, logging_steps=10, save_steps=100, eval_steps=15),
        output_dir=tmp_path / "run",
    )
    after = _kl(teacher, student, data)
    assert after < 0.7 * before, (before, after)
    # the teacher is frozen and untouched
    assert all(not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_state[k], rtol=0, atol=0)
    # every loss part is logged, and the final model reloads
    logged = [r for r in summary["log_history"] if "loss_soft" in r]
    assert logged and all("tokens_per_second" in r for r in logged)
    assert "loss_hard" not in logged[0]  # alpha = 1: no hard term computed or logged
    evals = [r for r in summary["log_history"] if "eval_loss" in r]
    assert len(evals) == 2 and all("eval_loss_soft" in r for r in evals)
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("loss_soft") >= 3


def _one_sgd_step(tmp_path, data, batch, accumulation, name, **loss):
    teacher, student = tiny_model("qwen2", seed=1), tiny_model("qwen2", seed=2, num_layers=2)
    train(
        student,
        tiny_tokenizer(),
        data,
        teacher=teacher,
        loss=LossConfig(**{"alpha": 0.7, "temperature": 2.0, "divergence": "jsd", **loss}),
        training=TrainingConfig(
            max_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
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


def test_gradient_accumulation_gives_the_same_update(tmp_path):
    # chat data: micro-batches count different numbers of tokens, so a per-micro-batch mean would differ
    data = tiny_prepared(tmp_path, chat=True)
    whole = _one_sgd_step(tmp_path, data, batch=4, accumulation=1, name="b4")
    split = _one_sgd_step(tmp_path, data, batch=1, accumulation=4, name="b1x4")
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("divergence", ["forward_kl", "skew_reverse_kl"])
def test_the_chunked_loss_takes_the_same_step_as_full_logits(tmp_path, divergence):
    data = tiny_prepared(tmp_path, chat=True)
    full = _one_sgd_step(tmp_path, data, 2, 2, "full", implementation="full", divergence=divergence)
    chunked = _one_sgd_step(
        tmp_path, data, 2, 2, "chunked", implementation="chunked", chunk_size=5, divergence=divergence
    )
    for key in full:
        torch.testing.assert_close(chunked[key], full[key], rtol=1e-4, atol=1e-6, msg=key)


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    data = tiny_prepared(tmp_path)
    kwargs = dict(loss=LossConfig(alpha=0.5), training=TrainingConfig(max_steps=6, save_steps=2, learning_rate=1e-3))
    teacher = tiny_model("llama", seed=1)

    straight = tiny_model("llama", seed=2, num_layers=2)
    train(straight, tiny_tokenizer(), data, teacher=teacher, output_dir=tmp_path / "a", **kwargs)

    interrupted = tiny_model("llama", seed=2, num_layers=2)
    with pytest.raises(KeyboardInterrupt):
        train(
            interrupted,
            tiny_tokenizer(),
            data,
            teacher=teacher,
            output_dir=tmp_path / "b",
            callbacks=[CrashAt(5)],
            **kwargs,
        )
    assert last_complete_checkpoint(tmp_path / "b" / "checkpoints").name == "checkpoint-4"
    # a checkpoint cut off mid-write is not resumed from
    (tmp_path / "b" / "checkpoints" / "checkpoint-5").mkdir()
    resumed = tiny_model("llama", seed=3, num_layers=2)  # weights come from the checkpoint, not from here
    summary = train(resumed, tiny_tokenizer(), data, teacher=teacher, output_dir=tmp_path / "b", **kwargs)
    assert summary["resumed_from"] == 4 and summary["global_step"] == 6
    assert not (tmp_path / "b" / "checkpoints" / "checkpoint-5").exists()
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_cross_entropy_control_needs_no_teacher_and_a_kd_loss_does(tmp_path):
    data = tiny_prepared(tmp_path)
    student = tiny_model("mistral", num_layers=2)
    summary = train(
        student,
        tiny_tokenizer(),
        data,
        teacher=None,
        loss=LossConfig(alpha=0.0),
        training=TrainingConfig(max_steps=2, save_steps=100),
        output_dir=tmp_path / "ce",
    )
    assert summary["global_step"] == 2
    with pytest.raises(ValueError, match="needs a teacher"):
        train(
            student,
            tiny_tokenizer(),
            data,
            teacher=None,
            loss=LossConfig(alpha=0.5),
            training=TrainingConfig(max_steps=1),
            output_dir=tmp_path / "kd",
        )


def test_collator_pads_for_the_trainer():
    batch = DistillationCollator(pad_token_id=3)(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [5], "attention_mask": [1], "labels": [5]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 3, 3]]
    assert batch["labels"].tolist()[1] == [5, -100, -100]


def test_the_teacher_leaves_training_with_its_own_forward(tmp_path):
    """Under bf16 the Trainer's accelerator wraps the teacher's forward in autocast, in place; the teacher object is
    shared with the evaluation (models.load_model cache), which must score and time it in its own dtype."""
    data = tiny_prepared(tmp_path)
    teacher, student = tiny_model("llama", seed=1), tiny_model("llama", seed=2, num_layers=2)
    ids = torch.tensor([data.validation[0]["input_ids"]])
    with torch.no_grad():
        before = teacher(ids).logits
    train(
        student,
        tiny_tokenizer(),
        data,
        teacher=teacher,
        loss=LossConfig(alpha=1.0),
        output_dir=tmp_path / "run",
        training=TrainingConfig(max_steps=2, bf16=True, logging_steps=1, save_steps=100),
    )
    assert "forward" not in teacher.__dict__ and "_original_forward" not in teacher.__dict__
    with torch.no_grad():
        after = teacher(ids).logits
    assert after.dtype == torch.float32
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # fp32 again, bit for bit


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_a_padding_free_batch_gives_the_padded_batchs_loss_and_gradients(tmp_path, divergence):
    """training.packing: padding_free changes the layout, not the objective: same loss, same gradients."""
    data = tiny_prepared(tmp_path, chat=True, max_seq_len=60)
    rows = [data.train[i] for i in range(4)]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # lengths differ: the padded batch has padding
    cfg = LossConfig(divergence=divergence, alpha=0.7, temperature=2.0, chunk_size=16)
    results = []
    for padding_free in (False, True):
        student, teacher = tiny_model("llama", seed=2, num_layers=2), tiny_model("llama", seed=1)
        trainer = DistillationTrainer(
            model=student,
            args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
            teacher=teacher,
            loss_config=cfg,
        )
        batch = DistillationCollator(tiny_tokenizer().pad_token_id, padding_free=padding_free)(rows)
        loss = trainer.compute_loss(student, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (padded, g_padded), (packed, g_packed) = results
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_packed, g_padded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packing", ["group_by_length", "padding_free"])
def test_training_with_each_packing(tmp_path, packing):
    data = tiny_prepared(tmp_path, chat=True, max_seq_len=60)
    summary = train(
        tiny_model("llama", seed=2, num_layers=2),
        tiny_tokenizer(),
        data,
        teacher=tiny_model("llama", seed=1),
        loss=LossConfig(alpha=0.5),
        training=TrainingConfig(
            max_steps=2, per_device_train_batch_size=4, save_steps=2, logging_steps=1, packing=packing
        ),
        output_dir=tmp_path / "out",
    )
    assert summary["global_step"] == 2 and (tmp_path / "out" / "final" / "config.json").is_file()


def test_padding_free_refuses_what_needs_one_row_per_sequence():
    from alambic.config import ConfigError, validate_config

    base = {
        "teacher": {"model": "t"},
        "student": {"model": "s"},
        "data": {"source": "chatterbot", "format": "chat"},
        "training": {"packing": "padding_free"},
    }
    with pytest.raises(ConfigError, match=r"padding_free .* loss.on_policy .* group_by_length"):
        validate_config({**base, "loss": {"alpha": 0.5, "on_policy": {"fraction": 0.5}}})
    assert validate_config({**base, "loss": {"features": {"hidden_states": {}}}}).training.packing == "padding_free"


def test_torch_compile_trains_the_same_and_gives_the_teacher_back_eager(tmp_path):
    data = tiny_prepared(tmp_path)
    losses, teachers = {}, {}
    for compiled in (False, True):
        teacher = tiny_model("llama", seed=1)
        summary = train(
            tiny_model("llama", seed=2, num_layers=2),
            tiny_tokenizer(),
            data,
            teacher=teacher,
            loss=LossConfig(alpha=0.5),
            training=TrainingConfig(
                max_steps=2, per_device_train_batch_size=4, save_steps=2, logging_steps=1, torch_compile=compiled
            ),
            output_dir=tmp_path / str(compiled),
        )
        losses[compiled] = [h["loss"] for h in summary["log_history"] if "loss" in h]
        teachers[compiled] = teacher
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    assert all(layer._compiled_call_impl is None for layer in teachers[True].model.layers)


def test_fsdp_version_1_is_refused_where_fsdp2_is_served(tmp_path, monkeypatch):
    # FSDP2 and ZeRO-3 heads are gathered for the loss (alambic.sharding, tests/distributed/test_fsdp.py); FSDP1
    # flattens them into a vector it alone can unflatten
    trainer = DistillationTrainer(
        model=tiny_model("llama", num_layers=1),
        args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
        teacher=tiny_model("llama", seed=1),
        loss_config=LossConfig(),
    )
    trainer.is_fsdp_enabled = True  # as the Trainer sets it under an FSDP launcher
    monkeypatch.setattr(type(trainer.accelerator), "is_fsdp2", property(lambda self: False))
    for implementation in ("chunked", "full"):
        trainer.loss_config = LossConfig(implementation=implementation)
        with pytest.raises(ValueError, match="FSDP version 1 .* set fsdp_version: 2"):
            trainer._check_fsdp_version()
    monkeypatch.setattr(type(trainer.accelerator), "is_fsdp2", property(lambda self: True))
    trainer._check_fsdp_version()


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_trains_in_bf16_only_where_the_device_has_it(monkeypatch, capsys, tmp_path, native):
    from alambic import utils
    from alambic.training import run

    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert utils.native_bf16("cpu") is native and utils.native_bf16("meta") is False
    assert run.training_arguments(TrainingConfig(bf16="auto"), tmp_path, has_eval=False).bf16 is native
    assert run.training_arguments(TrainingConfig(bf16=False), tmp_path, has_eval=False).bf16 is False
    capsys.readouterr()
    assert run.training_arguments(TrainingConfig(bf16=True), tmp_path, has_eval=False).bf16 is True
    warned = " ".join(capsys.readouterr().err.split())  # rich wraps its lines
    assert ("no native bfloat16" in warned) is not native and ("training.bf16: auto" in warned) is not native
