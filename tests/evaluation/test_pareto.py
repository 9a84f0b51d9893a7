"""Retention against the teacher and the Pareto front, on hand-made eval.json records."""

import pytest

from alambic.evaluation.pareto import pareto_front, pareto_fronts, retention


def _model(ppl, top1, params, latency=None, throughput=None, peak=None, rouge=None):
    m = {"perplexity": ppl, "top1_agreement": top1, "top5_agreement": top1, "parameters": params}
    if latency is not None:
        m["cost"] = {
            "latency_per_token_seconds": {"median": latency, "min": latency, "max": latency},
            "throughput_tokens_per_second": {"median": throughput},
            "peak_memory_bytes": peak,
        }
    if rouge is not None:
        m["generation"] = {"reference": {"rouge_l": rouge, "exact_match": 0.0}}
    return m


def test_retention_is_model_over_teacher_for_quality_and_teacher_over_model_for_cost():
    models = {
        "teacher": _model(40.0, 1.0, 100, latency=0.02, throughput=400, peak=1000, rouge=0.5),
        "student": _model(50.0, 0.6, 50, latency=0.01, throughput=1000, peak=400, rouge=0.4),
    }
    r = retention(models)
    assert r["teacher"]["perplexity"] == 1.0 and r["teacher"]["speedup"] == 1.0
    s = r["student"]
    assert s["perplexity"] == pytest.approx(40 / 50)  # lower perplexity is better: teacher ÷ model
    assert s["top1_agreement"] == pytest.approx(0.6)
    assert s["rouge_l_reference"] == pytest.approx(0.8)
    assert s["exact_match_reference"] is None  # the teacher's is 0: no ratio
    assert s["speedup"] == pytest.approx(2.0) and s["throughput_gain"] == pytest.approx(2.5)
    assert s["size_reduction"] == pytest.approx(2.0) and s["memory_reduction"] == pytest.approx(2.5)


def test_missing_figures_give_none_not_errors():
    r = retention({"teacher": _model(40.0, 1.0, 100), "student": _model(50.0, 0.6, 50, latency=0.01)})
    assert r["student"]["speedup"] is None and r["student"]["size_reduction"] == 2.0
    assert retention({"student": _model(1.0, 1.0, 1)}) == {}  # no teacher, nothing to be relative to


def test_pareto_front_drops_dominated_points_and_keeps_ties():
    points = {"a": (1.0, 1.0), "b": (2.0, 0.8), "c": (1.5, 0.7), "d": (2.0, 0.8), "e": (3.0, 0.5), "f": (0.9, 0.9)}
    # c is dominated by b (faster and better); f by a; b and d are equal, neither dominates the other
    assert pareto_front(points) == ["a", "b", "d", "e"]
    assert pareto_front({"only": (1.0, 1.0)}) == ["only"]


def test_fronts_per_cost_saving_only_where_two_models_have_it():
    models = {
        "teacher": _model(40.0, 1.0, 100, latency=0.02, throughput=400, peak=1000),
        "small": _model(60.0, 0.5, 40, latency=0.008, throughput=900, peak=300),
        "mid": _model(45.0, 0.7, 70, latency=0.015, throughput=500, peak=700),
        "bad": _model(80.0, 0.4, 70, latency=0.015, throughput=450, peak=800),
    }
    fronts = pareto_fronts(retention(models))
    assert set(fronts) == {"speedup", "throughput_gain", "size_reduction", "memory_reduction"}
    assert fronts["speedup"] == ["teacher", "mid", "small"] and "bad" not in fronts["size_reduction"]
    assert pareto_fronts(retention({"teacher": _model(40.0, 1.0, 100)})) == {}
