"""A teacher with another tokenizer: detected before any data is made, then ULD or response distillation, end to end."""

import json

import pytest
import torch
from transformers import TrainingArguments

from alambic.config import ConfigError, LossConfig, validate_config
from alambic.data import DistillationCollator
from alambic.data.cross import tokenize_chat_pair
from alambic.losses import distillation_loss
from alambic.modeling import counted_positions
from alambic.pipeline import run_stages
from alambic.stages import STAGES
from alambic.training.trainer import DistillationTrainer
from helpers import NEWS, other_tokenizer, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {
        "messages": [
            {"role": "user", "content": NEWS[i % 6][: 20 + i]},
            {"role": "assistant", "content": NEWS[(i + 1) % 6]},
        ]
    }
    for i in range(16)
]


def _other_teacher(folder, seed=1):
    """A tiny teacher whose vocabulary is `other_tokenizer`'s."""
    tok = other_tokenizer()
    model = tiny_model(seed=seed, vocab_size=len(tok), hidden_size=48, intermediate_size=96)
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_the_trainer_loss_is_ce_plus_uld_where_the_tokenizations_line_up(tmp_path):
    student_tok, teacher_tok = tiny_tokenizer(), other_tokenizer()
    student = tiny_model(seed=2, num_layers=2)
    teacher = tiny_model(seed=1, vocab_size=len(teacher_tok), hidden_size=48, intermediate_size=96)
    samples = tokenize_chat_pair(ROWS[:4], student_tok, teacher_tok, max_seq_len=96)
    batch = DistillationCollator(student_tok.pad_token_id, teacher_pad_token_id=teacher_tok.pad_token_id)(samples)
    cfg = LossConfig(divergence="uld", alpha=0.6, temperature=2.0, chunk_size=5)
    trainer = DistillationTrainer(
        model=student,
        args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
        teacher=teacher,
        loss_config=cfg,
        cross_tokenizer=True,
    )
    loss = trainer.compute_loss(student, batch)

    # the plain reference: full logits of both models, rows picked by hand
    mask, targets = counted_positions(batch["labels"])
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    with torch.no_grad():
        t_all = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    pairs = [(b, t) for b, t in zip(*torch.nonzero(mask, as_tuple=True))]
    partner = [int(batch["teacher_positions"][b, t + 1]) for b, t in pairs]
    aligned = torch.tensor([q >= 0 for q in partner])
    t_rows = torch.stack([t_all[b, q] for (b, _), q in zip(pairs, partner) if q >= 0])
    n = len(pairs)
    hard = distillation_loss(s_logits.double(), None, targets, alpha=0.0).total
    soft = distillation_loss(
        s_logits[aligned].double(),
        t_rows.double(),
        targets[aligned],
        divergence="uld",
        alpha=1.0,
        temperature=2.0,
        num_items_in_batch=n,
    ).total
    assert 0.3 < aligned.float().mean() < 1
    torch.testing.assert_close(loss.double(), 0.6 * soft + 0.4 * hard, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.lm_head.weight.grad.abs().sum() > 0 and teacher.lm_head.weight.grad is None


def _cross_config(tmp_path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in ROWS))
    student = tmp_path / "student"
    tiny_model(seed=2, num_layers=2).save_pretrained(student)
    tiny_tokenizer().save_pretrained(student)
    data = {
        "name": "cross",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": str(_other_teacher(tmp_path / "teacher")), "device": "cpu"},
        "student": {"model": str(student)},
        "data": {
            "source": "files",
            "paths": [str(chat)],
            "format": "chat",
            "max_seq_len": 96,
            "validation_fraction": 0.25,
        },
        "loss": {"divergence": "uld", "alpha": 0.5, "temperature": 1.0},
        "training": {"max_steps": 2, "save_steps": 1, "logging_steps": 1, "learning_rate": 1e-3},
        "evaluation": {
            "ce_control": True,
            "batch_size": 4,
            "generation": {"max_new_tokens": 4},
            "cost": {"prompt_tokens": 8, "new_tokens": 2, "batch_size": 2, "warmup": 0, "repeats": 1},
        },
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    return validate_config(data)


def test_another_tokenizer_is_refused_before_any_data_with_the_two_choices(tmp_path):
    cfg = _cross_config(tmp_path, loss={"divergence": "forward_kl"})
    with pytest.raises(ConfigError) as err:
        run_stages(cfg, STAGES)
    message = str(err.value)
    assert "have different tokenizers" in message and "loss.divergence: uld" in message
    assert "data.teacher_responses" in message and "loss.alpha: 0" in message
    assert not (cfg.run_dir / "data").exists()
    with pytest.raises(ConfigError, match="loss.on_policy compare the models token by token"):
        run_stages(_cross_config(tmp_path / "b", loss={"on_policy": {"fraction": 0.5}}), STAGES)


def test_a_uld_run_from_a_teacher_with_another_tokenizer(tmp_path):
    cfg = _cross_config(tmp_path)
    run_stages(cfg, STAGES)
    run = cfg.run_dir
    split = json.loads((run / "data" / "split.json").read_text())
    assert split["teacher_tokenizer"] and 0.3 < split["aligned_share"]["train"] < 1
    assert json.loads((run / "student" / "student.json").read_text())["own_tokenizer"] is True
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_soft" in m and "loss_hard" in m for m in metrics)
    models = json.loads((run / "eval.json").read_text())["models"]
    teacher, student = models["teacher"], models["student_distilled"]
    # the teacher is scored on its own tokens, per student token of the same texts; nothing token by token
    assert teacher["num_tokens"] == student["num_tokens"] != teacher["own_tokens"]
    assert teacher["kl_to_teacher"] is None and student["top1_agreement"] is None
    assert teacher["cost"]["new_tokens"] == 2 and "teacher" in student["generation"]
    report = (run / "report.md").read_text()
    assert "The student has its own tokenizer" in report and "ULD" in report


def test_response_distillation_into_a_student_with_another_tokenizer(tmp_path):
    cfg = _cross_config(
        tmp_path,
        loss={"divergence": "forward_kl", "alpha": 0.0},
        evaluation={"ce_control": False, "cost": None},
        data={"teacher_responses": {"max_new_tokens": 6, "batch_size": 4, "filter_degenerate": False}},
    )
    run_stages(cfg, STAGES)
    run = cfg.run_dir
    from alambic.data.generate import load_response_set, read_generations

    responses = {r["response"] for r in read_generations(run / "generations" / "generations.jsonl")}
    trained = load_response_set(run / "generations")
    student_tok = tiny_tokenizer()
    # the teacher's text, in the student's own tokens and chat template
    for row in trained:
        counted = student_tok.decode([t for t in row["labels"] if t != -100])
        assert counted.removesuffix("<|im_end|>") in responses
    assert json.loads((run / "eval.json").read_text())["models"]["teacher"]["own_tokens"] > 0


def test_disjoint_vocabularies_of_one_size_are_not_one_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from alambic.stages.models import same_tokenizer
    from helpers import _tiny_tokenizer_json

    spec = json.loads(_tiny_tokenizer_json(320))
    # every token renamed: no token shared, so no shared token has another id, and the sizes are equal
    spec["model"]["vocab"] = {f"x{token}": i for token, i in spec["model"]["vocab"].items()}
    spec["model"]["merges"] = []
    for added in spec["added_tokens"]:
        added["content"] = f"x{added['content']}"
    renamed = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    assert len(renamed.get_vocab()) == len(tiny_tokenizer().get_vocab())
    assert not same_tokenizer(tiny_tokenizer(), renamed)
    assert same_tokenizer(tiny_tokenizer(), tiny_tokenizer(400))  # a larger vocabulary of the same family
