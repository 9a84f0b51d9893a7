"""The real SmolLM2-135M-Instruct teacher (GGUF, via the built-in alias) on real BBC News and chatterbot data."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from alambic.config import DataConfig, LossConfig, TrainingConfig
from alambic.data import prepare_datasets
from alambic.evaluation.quality import evaluate_against_teacher
from alambic.students.prune import keep_layers, layer_indices, save_student
from alambic.training.run import train

pytestmark = pytest.mark.integration


def test_the_alias_loads_a_plain_float_llama(teacher, tokenizer):
    assert teacher.config.model_type == "llama" and teacher.config.num_hidden_layers == 30
    assert teacher.config.vocab_size == len(tokenizer) == 49152
    assert not hasattr(teacher.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in teacher.parameters())


def test_half_depth_student_reloads_with_the_same_logits(teacher, tokenizer, tmp_path):
    student = keep_layers(teacher, layer_indices("every_other", 30))
    ids = tokenizer("The BBC reported that the economy grew", return_tensors="pt").input_ids
    with torch.no_grad():
        before = student(input_ids=ids).logits
    save_student(student, tokenizer, tmp_path / "student", {"kept_layers": list(range(0, 30, 2))})
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "student", attn_implementation=student.config._attn_implementation
    ).eval()
    assert reloaded.config.num_hidden_layers == 15
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, rtol=0, atol=0)


def test_a_few_distillation_steps_on_bbc_news_bring_the_student_closer(teacher, tokenizer, tmp_path):
    data = prepare_datasets(
        DataConfig(
            source="bbc_news", max_seq_len=64, max_documents=60, validation_fraction=0.2, max_validation_sequences=8
        ),
        tokenizer,
    )
    student = keep_layers(teacher, layer_indices("every_other", 30))
    before = evaluate_against_teacher(teacher, {"s": student}, data.validation, pad_token_id=tokenizer.pad_token_id)
    train(
        student,
        tokenizer,
        data,
        teacher=teacher,
        loss=LossConfig(alpha=1.0),
        training=TrainingConfig(
            max_steps=8, per_device_train_batch_size=4, learning_rate=5e-4, save_steps=100, logging_steps=4
        ),
        output_dir=tmp_path / "run",
    )
    after = evaluate_against_teacher(teacher, {"s": student}, data.validation, pad_token_id=tokenizer.pad_token_id)
    assert after["s"]["kl_to_teacher"] < 0.8 * before["s"]["kl_to_teacher"], (before["s"], after["s"])
    assert after["s"]["perplexity"] < before["s"]["perplexity"]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_chatterbot_conversations_count_only_assistant_tokens(tokenizer):
    data = prepare_datasets(
        DataConfig(source="chatterbot", format="chat", max_seq_len=256, max_documents=40), tokenizer
    )
    sample = data.train[0]
    counted = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != -100]
    text = tokenizer.decode(sample["input_ids"])
    assert 0 < len(counted) < len(sample["input_ids"])
    assert "<|im_start|>user" in text
    assert "<|im_start|>" not in tokenizer.decode(counted)  # no role header is ever counted
