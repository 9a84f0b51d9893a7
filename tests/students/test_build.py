"""From a student.from_teacher config to a student and its pruning record, on tiny random teachers."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from alambic.config import FromTeacherConfig
from alambic.models import count_parameters
from alambic.students.build import build_from_teacher
from alambic.students.importance import calibration_batches
from alambic.students.prune import PruningError
from helpers import tiny_model, tiny_prepared


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    data = tiny_prepared(tmp_path_factory.mktemp("data"))
    return calibration_batches(data.train, num_sequences=6, batch_size=3, pad_token_id=3)


def _gpt2():
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", vocab_size=320, n_embd=32, n_layer=4, n_head=4, n_positions=64)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def test_explicit_layers_with_width_keep_exactly_those_layers(batches):
    teacher = tiny_model("qwen2")
    student, record = build_from_teacher(
        teacher, FromTeacherConfig(layers=[0, 3], intermediate_size=32, num_attention_heads=2), batches
    )
    assert record["kept_layers"] == [0, 3] and record["layer_ranking"] == "explicit"
    assert record["student_shape"]["intermediate_size"] == 32 and record["student_shape"]["num_attention_heads"] == 2
    assert record["student_parameters"] == count_parameters(student)
    assert len(record["importance"]["neuron_activation"]) == 4  # scores of every teacher layer, for the report


def test_a_budget_by_depth_chooses_layers_by_importance(batches):
    teacher = tiny_model("llama")
    budget = count_parameters(teacher)["total"] * 0.8
    student, record = build_from_teacher(teacher, FromTeacherConfig(target_parameters=budget), batches)
    assert record["student_parameters"]["total"] <= budget
    scores = record["importance"]["skip_loss_increase"]
    assert record["kept_layers"] == sorted(sorted(range(4), key=lambda i: -scores[i])[: len(record["kept_layers"])])


def test_a_decoder_without_llama_blocks_is_depth_pruned_by_importance_but_not_width_pruned(batches):
    teacher = _gpt2()
    student, record = build_from_teacher(teacher, FromTeacherConfig(layers="importance", num_layers=2), batches)
    assert student.config.num_hidden_layers == 2 and len(record["importance"]["block_influence"]) == 4
    assert record["importance"]["head_activation"] is None
    with pytest.raises(PruningError, match=r"transformer\.h\.0\.attn\.c_attn"):
        build_from_teacher(teacher, FromTeacherConfig(hidden_size=16), batches)
