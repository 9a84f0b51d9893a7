"""The pruning section of the report, from records shaped like the student stage writes them."""

from alambic.report.pruning import pruning_section

SHAPE = {
    "num_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "hidden_size": 32,
    "head_dim": 8,
}


def _pruning(**extra):
    return {
        "teacher_shape": SHAPE,
        "student_shape": {**SHAPE, "num_layers": 2, "num_attention_heads": 2},
        "teacher_parameters": {"total": 40_000, "non_embedding": 30_000},
        "student_parameters": {"total": 20_000, "non_embedding": 10_000},
        "teacher_tensor_bytes": 160_000,
        "student_tensor_bytes": 80_000,
        "kept_layers": [0, 3],
        "removed_layers": [1, 2],
        "layer_ranking": "skip_loss",
        "plan": {"layers": [0, 3], "heads": [[0, 2], [1, 3]], "kv_heads": [[0, 1], [0, 1]]},
        "importance": {
            "num_sequences": 4,
            "num_tokens": 60,
            "base_loss": 5.0,
            "block_influence": [0.9, 0.1, 0.2, 0.5],
            "skip_loss_increase": [3.0, 0.1, 0.2, 1.0],
            "head_activation": [[1.0, 0.5, 2.0, 0.1]] * 4,
        },
        **extra,
    }


def _model(ppl, agree, kl):
    return {"perplexity": ppl, "top1_agreement": agree, "kl_to_teacher": kl, "num_tokens": 60}


def test_the_section_has_shapes_sizes_quality_and_plots(tmp_path):
    evaluation = {
        "models": {
            "teacher": _model(30.0, 1.0, 0.0),
            "student_before": _model(900.0, 0.2, 3.0),
            "student_distilled": _model(80.0, 0.5, 1.0),
        }
    }
    pruning = _pruning(after_pruning={"teacher": _model(30.0, 1.0, 0.0), "student_pruned": _model(899.0, 0.2, 3.0)})
    text = "\n".join(pruning_section(pruning, evaluation, tmp_path))
    assert "| decoder layers | 4 | 2 |" in text and "| query heads | 4 | 2 |" in text
    assert "| parameters | 0.0M | 0.0M | 0.50 |" in text
    assert "removed: [1, 2]" in text and "2 of 4 query heads" in text
    assert "| right after pruning | 899.00 | 20.0% | 3.000 |" in text  # the student stage's own measurement
    assert "| after distillation | 80.00 | 50.0% | 1.000 |" in text
    for name in ("layer_importance.png", "head_importance.png"):
        assert f"(plots/{name})" in text and (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_without_its_own_measurement_it_takes_the_evaluate_stage_figures(tmp_path):
    evaluation = {"models": {"teacher": _model(30.0, 1.0, 0.0), "student_before": _model(900.0, 0.2, 3.0)}}
    text = "\n".join(pruning_section(_pruning(), evaluation, tmp_path))
    assert "| right after pruning | 900.00 | 20.0% | 3.000 |" in text
    assert "after distillation" not in text


def test_no_importance_no_plots(tmp_path):
    pruning = _pruning()
    del pruning["importance"]
    text = "\n".join(pruning_section(pruning, {}, tmp_path))
    assert "plots/" not in text and not (tmp_path / "plots").exists()
