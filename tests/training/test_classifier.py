"""Classifier distillation: the loss against a float64 hand reference (values and gradients), gradient
accumulation, the teacher fine-tuning and loading classifiers."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, TrainingArguments

from alambic.config import DataConfig, FineTuneConfig, LossConfig, ModelConfig, TrainingConfig
from alambic.data import prepare_datasets
from alambic.data.classification import ClassificationCollator
from alambic.evaluation.classification import class_logits
from alambic.models import ModelLoadError, is_classifier, load_model
from alambic.training.classifier import ClassifierDistillationTrainer, fine_tune_teacher, train_classifier
from helpers import save_tiny_pair, tiny_classifier, tiny_tokenizer, write_labelled_corpus

LABELS = ["business", "sport", "tech"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = write_labelled_corpus(tmp_path_factory.mktemp("corpus") / "news.jsonl", n_docs=24)
    cfg = DataConfig(source="files", format="classification", paths=[path], max_seq_len=24, validation_fraction=0.25)
    return prepare_datasets(cfg, tiny_tokenizer())


def _trainer(tmp_path, student, teacher, loss):
    args = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none")
    return ClassifierDistillationTrainer(
        model=student, args=args, teacher=teacher, loss_config=loss, data_collator=ClassificationCollator(3)
    )


def _hand_loss(student_logits, teacher_logits, labels, *, temperature, alpha):
    """alpha * T^2 * mean_i KL(P_i || Q_i) at T + (1 - alpha) * mean_i -log q_i(label), written out in float64."""
    s, t = student_logits.double(), teacher_logits.double()
    log_q, log_p = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    soft = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    hard = -torch.log_softmax(s, -1).gather(1, labels[:, None]).mean()
    return alpha * temperature**2 * soft + (1 - alpha) * hard


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_loss_and_gradients_equal_the_hand_reference(tmp_path, data, alpha, one_thread):
    teacher, student = tiny_classifier(seed=1), tiny_classifier(seed=2, num_layers=2)
    student.train()
    batch = ClassificationCollator(3)([data.train[i] for i in range(5)])
    trainer = _trainer(
        tmp_path,
        student,
        teacher if alpha > 0 else None,
        LossConfig(alpha=alpha, temperature=2.0, divergence="forward_kl"),
    )
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        t_logits = teacher(**inputs).logits
    reference = _hand_loss(student(**inputs).logits, t_logits, batch["labels"], temperature=2.0, alpha=alpha)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4, abs=1e-6)  # float32 loss, float64 reference
    assert set(grads) == {n for n, p in student.named_parameters() if p.grad is not None}
    for name, p in student.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert ("loss_soft" in trainer._parts["train"]) == (alpha > 0)
    assert ("loss_hard" in trainer._parts["train"]) == (alpha < 1)


def _one_sgd_step(tmp_path, data, batch, accumulation, name):
    teacher, student = tiny_classifier(seed=1), tiny_classifier(seed=2, num_layers=2)
    train_classifier(
        student,
        tiny_tokenizer(),
        data,
        teacher=teacher,
        loss=LossConfig(alpha=0.6, temperature=2.0, divergence="jsd"),
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


def test_gradient_accumulation_gives_the_same_update(tmp_path, data, one_thread):
    """One example per label: the Trainer must count all of a batch's examples (no causal shift)."""
    whole = _one_sgd_step(tmp_path, data, batch=4, accumulation=1, name="b4")
    split = _one_sgd_step(tmp_path, data, batch=2, accumulation=2, name="b2x2")
    start = tiny_classifier(seed=2, num_layers=2).state_dict()
    assert any(not torch.equal(whole[k], start[k]) for k in whole)  # the step did move the weights
    for key in whole:
        torch.testing.assert_close(whole[key], split[key], rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_fine_tuning_a_backbone_teaches_its_fresh_head(tmp_path, data, one_thread):
    backbone_dir = save_tiny_pair(tmp_path)  # a causal LM folder
    source = ModelConfig(model=str(backbone_dir), device="cpu")
    assert not is_classifier(source)
    torch.manual_seed(0)
    backbone = load_model(source, labels=LABELS)
    assert backbone.config.id2label == dict(enumerate(LABELS)) and backbone.config.pad_token_id == 3
    summary = fine_tune_teacher(
        backbone,
        tiny_tokenizer(),
        data,
        FineTuneConfig(max_steps=30, learning_rate=3e-3, batch_size=6, warmup_ratio=0.0),
        tmp_path / "teacher",
    )
    losses = [r["loss_hard"] for r in summary["log_history"] if "loss_hard" in r]
    assert summary["global_step"] == 30 and losses[-1] < 0.5 * losses[0], losses
    final = tmp_path / "teacher" / "final"
    assert is_classifier(ModelConfig(model=str(final)))
    reloaded = AutoModelForSequenceClassification.from_pretrained(final)
    assert reloaded.config.id2label == dict(enumerate(LABELS)) and reloaded.config.pad_token_id == 3
    torch.testing.assert_close(
        class_logits(reloaded, data.validation, pad_token_id=3), class_logits(backbone, data.validation, pad_token_id=3)
    )
    # the training split is learnt: one phrase per class
    predicted = class_logits(reloaded, data.train, pad_token_id=3).argmax(-1)
    assert (predicted == torch.tensor(list(data.train["labels"]))).float().mean() > 0.9
    # loaded again with the labels: used as it is, not given a new head
    same = load_model(ModelConfig(model=str(final)), labels=LABELS)
    torch.testing.assert_close(same.score.weight, reloaded.score.weight)
    with pytest.raises(ModelLoadError, match=r"has 3 labels .* but the data has 2"):
        load_model(ModelConfig(model=str(final)), labels=["a", "b"])
    with pytest.raises(ModelLoadError, match="but the data has 3"):
        load_model(ModelConfig(model=str(final)), labels=["tech", "sport", "business"])  # same names, other ids


def test_distillation_without_a_teacher_needs_alpha_zero(tmp_path, one_thread):
    with pytest.raises(ValueError, match="alpha = 0.5 needs a teacher"):
        _trainer(tmp_path, tiny_classifier(), None, LossConfig(alpha=0.5))
