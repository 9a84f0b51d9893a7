"""Advice from results: each rule fires on the figures it reads, and stays quiet otherwise."""

from alambic.evaluation.pareto import retention
from alambic.report.advice import advice


def _m(ppl, kl, params, latency=None, interval=None, truncated=None):
    m = {
        "perplexity": ppl,
        "top1_agreement": 0.5,
        "kl_to_teacher": kl,
        "parameters": params,
        "intervals": {"kl_to_teacher": interval or [kl - 0.01, kl + 0.01]},
    }
    if latency is not None:
        m["cost"] = {"latency_per_token_seconds": {"median": latency}}
    if truncated is not None:
        m["generation"] = {"reference": {"truncated_share": truncated}}
    return m


def _evaluation(**models):
    return {"models": models, "retention": retention(models)}


CONFIG = {"loss": {"temperature": 1.0, "alpha": 1.0}, "training": {"max_steps": 150}}
GOOD = dict(
    teacher=_m(40, 0.0, 100, latency=0.02),
    student_distilled=_m(42, 0.3, 50, latency=0.01),
    student_ce_control=_m(60, 0.9, 50, latency=0.01),
)


def test_a_good_student_gets_no_advice():
    assert advice(_evaluation(**GOOD), CONFIG) == []


def test_low_retention_suggests_temperature_features_and_size():
    tips = advice(_evaluation(**{**GOOD, "student_distilled": _m(80, 0.8, 50, latency=0.01)}), CONFIG)
    assert len(tips) == 1 and "keeps 50% of the teacher's perplexity" in tips[0] and "temperature (now 1.0" in tips[0]


def test_losing_to_or_tying_the_ce_control_is_said():
    lose = advice(_evaluation(**{**GOOD, "student_ce_control": _m(41, 0.2, 50, latency=0.01)}), CONFIG)
    assert any("did not beat plain cross-entropy" in t for t in lose)
    tie = advice(
        _evaluation(**{**GOOD, "student_ce_control": _m(43, 0.35, 50, latency=0.01, interval=[0.25, 0.45])}), CONFIG
    )
    assert any("within the bootstrap intervals" in t for t in tie)


def test_small_but_not_faster_points_to_memory_bound_decoding():
    slow = {**GOOD, "student_distilled": _m(42, 0.3, 25, latency=0.016)}  # 4x smaller, 1.25x faster
    tips = advice(_evaluation(**slow), CONFIG)
    assert len(tips) == 1 and "4.0× smaller but only 1.25× faster" in tips[0] and "Quantize" in tips[0]
    width = {"teacher_shape": {"hidden_size": 576}, "student_shape": {"hidden_size": 384}}
    assert "prefer removing layers" in advice(_evaluation(**slow), CONFIG, pruning=width)[0]


def test_loss_still_falling_and_truncated_responses():
    falling = [{"step": s, "loss": 3.0 - s / 100} for s in range(10, 151, 10)]
    flat = [{"step": s, "loss": 1.0} for s in range(10, 151, 10)]
    assert any("still falling" in t for t in advice(_evaluation(**GOOD), CONFIG, metrics=falling))
    assert advice(_evaluation(**GOOD), CONFIG, metrics=flat) == []
    cut = {**GOOD, "student_distilled": _m(42, 0.3, 50, latency=0.01, truncated=0.8)}
    assert any("80% of the student's responses hit the length cap" in t for t in advice(_evaluation(**cut), CONFIG))


def test_positional_layer_choice_far_from_the_teacher_suggests_importance():
    models = {**GOOD, "student_before": _m(900, 5.0, 50)}
    tips = advice(_evaluation(**models), CONFIG, pruning={"layer_ranking": "explicit"})
    assert any("layers: importance" in t for t in tips)
    assert advice(_evaluation(**models), CONFIG, pruning={"layer_ranking": "skip_loss"}) == []


def test_a_collapsed_student_is_said_and_not_advised_more_steps():
    """lr 1e3 left a student near-uniform over its vocabulary: perplexity about the vocabulary size."""
    falling = [{"step": s, "loss": 11.0 - s / 1000} for s in range(10, 151, 10)]
    collapsed = {
        **GOOD,
        "student_before": _m(300, 2.0, 50),
        "student_distilled": {**_m(47_000, 6.0, 50, latency=0.01), "architecture": {"vocab_size": 49_152}},
    }
    tips = advice(_evaluation(**collapsed), CONFIG, metrics=falling)
    assert "collapsed" in tips[0] and "49,152" in tips[0] and "learning_rate" in tips[0]
    assert not any("more training steps" in t or "still falling" in t for t in tips)
    # far worse than before distillation, without the vocabulary size at hand
    worse = {**GOOD, "student_before": _m(300, 2.0, 50), "student_distilled": _m(9_000, 6.0, 50, latency=0.01)}
    assert "collapsed" in advice(_evaluation(**worse), CONFIG)[0]
    broken = {**GOOD, "student_distilled": _m(float("nan"), float("nan"), 50, latency=0.01)}
    assert "not finite" in advice(_evaluation(**broken), CONFIG)[0]


def test_steps_skipped_as_non_finite_are_said():
    metrics = [
        {"step": 1, "loss": 1.0},
        {"step": 2, "nonfinite_steps_skipped": 1},
        {"step": 3, "loss": 1.0, "nonfinite_steps_skipped": 3},
    ]
    tips = advice(_evaluation(**GOOD), CONFIG, metrics=metrics)
    assert len(tips) == 1 and tips[0].startswith("3 of 150 training steps were left out") and "learning_rate" in tips[0]
