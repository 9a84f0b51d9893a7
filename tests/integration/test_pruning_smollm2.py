"""Structured pruning of the real SmolLM2-135M-Instruct teacher, calibrated on real BBC News text."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from alambic.config import DataConfig
from alambic.data import prepare_datasets
from alambic.evaluation.quality import evaluate_against_teacher
from alambic.models import count_parameters
from alambic.students.importance import calibration_batches, measure_importance
from alambic.students.prune import (
    apply_plan,
    keep_layers,
    plan_for_shape,
    planned_parameters,
    save_student,
    search_shape,
)
from alambic.utils import native_bf16

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(tokenizer):
    return prepare_datasets(
        DataConfig(
            source="bbc_news", max_seq_len=64, max_documents=60, validation_fraction=0.2, max_validation_sequences=8
        ),
        tokenizer,
    )


@pytest.fixture(scope="module")
def importance(teacher, tokenizer, data):
    batches = calibration_batches(data.train, num_sequences=8, batch_size=8, pad_token_id=tokenizer.pad_token_id)
    # bf16 as the stage runs it: only where the CPU has it natively (emulated bf16 is several times slower than fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16("cpu")):
        return measure_importance(teacher, batches, skip_loss=True, width=True, progress=False)


def test_layers_chosen_by_importance_keep_more_of_the_teacher_than_every_other(teacher, tokenizer, data, importance):
    # The first layers of SmolLM2 carry the most: skipping layer 0 or 1 costs nats of loss, middle layers little.
    skip = importance.skip_loss_increase
    assert min(skip[0], skip[1]) > 5 * sorted(skip)[len(skip) // 2]
    ranked = plan_for_shape(
        teacher, search_shape(teacher, 82_000_000, "depth"), layer_scores=importance.layer_scores("skip_loss")
    ).layers
    assert len(ranked) == 15 and {0, 1} <= set(ranked)
    students = {"importance": keep_layers(teacher, ranked), "every_other": keep_layers(teacher, list(range(0, 30, 2)))}
    scores = evaluate_against_teacher(teacher, students, data.validation, pad_token_id=tokenizer.pad_token_id)
    assert scores["importance"]["kl_to_teacher"] < 0.6 * scores["every_other"]["kl_to_teacher"], scores


def test_a_70m_width_budget_gives_a_valid_llama_that_reloads(teacher, tokenizer, importance, tmp_path):
    shape = search_shape(teacher, 70_000_000, "width")
    plan = plan_for_shape(
        teacher,
        shape,
        head_scores=importance.head_activation,
        neuron_scores=importance.neuron_activation,
        channel_scores=importance.channel_activation,
    )
    student = apply_plan(teacher, plan)
    counted = count_parameters(student)
    assert counted["total"] == planned_parameters(teacher, plan)["total"] <= 70_000_000
    assert counted["total"] > 65_000_000 and student.config.num_hidden_layers == 30
    assert student.config.num_key_value_heads < 3 or student.config.num_attention_heads < 9  # GQA cut validly
    ids = tokenizer("The BBC reported that the economy grew", return_tensors="pt").input_ids
    with torch.no_grad():
        before = student(input_ids=ids).logits
    save_student(student, tokenizer, tmp_path / "student", {})
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "student", attn_implementation=student.config._attn_implementation
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, rtol=0, atol=0)
