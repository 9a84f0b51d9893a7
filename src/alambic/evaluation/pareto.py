"""Retention (how much of the teacher each model keeps) and the Pareto front of quality against cost.

Pure functions of the `eval.json` records: the report and the sweep read them, nothing is measured here.
"""

from __future__ import annotations

from typing import Any

# quality retained: model ÷ teacher where higher is better, teacher ÷ model where lower is better (perplexity),
# so 1.0 is "as good as the teacher" for every metric.
HIGHER_IS_BETTER = {
    "perplexity": False,
    "top1_agreement": True,
    "top5_agreement": True,
    "rouge_l_reference": True,
    "exact_match_reference": True,
}
# cost gains: teacher ÷ model for costs (latency, size, memory), model ÷ teacher for throughput; > 1 is a saving.
COST_GAINS = {
    "speedup": ("latency_per_token_seconds", False),
    "throughput_gain": ("throughput_tokens_per_second", True),
    "size_reduction": ("parameters", False),
    "memory_reduction": ("peak_memory_bytes", False),
}


def _figure(record: dict[str, Any], key: str) -> float | None:
    """A metric or cost figure of one model record: top-level quality, `generation.*`, or `cost.*` (median)."""
    if key in ("rouge_l_reference", "exact_match_reference"):
        value = (record.get("generation") or {}).get("reference", {}).get(key.removesuffix("_reference"))
    elif key == "parameters":
        value = record.get("parameters")
    elif key in record:
        value = record[key]
    else:
        value = (record.get("cost") or {}).get(key)
    if isinstance(value, dict):
        value = value.get("median")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _ratio(model: float | None, teacher: float | None, model_over_teacher: bool) -> float | None:
    if model is None or teacher is None or model <= 0 or teacher <= 0:
        return None
    return model / teacher if model_over_teacher else teacher / model


def retention(models: dict[str, dict[str, Any]], reference: str = "teacher") -> dict[str, dict[str, float | None]]:
    """Per model: each quality metric retained and each cost gain, relative to `reference`.

    quality: perplexity -> ppl_teacher / ppl_model; agreements, ROUGE-L and exact match -> model / teacher
    (the teacher's own agreement is 1, so retained agreement is the agreement itself). cost: speedup =
    latency_teacher / latency_model (per generated token, batch 1); throughput_gain = tokens/s model / teacher
    (batch B); size_reduction = parameters teacher / model; memory_reduction = peak memory teacher / model.
    A figure either side lacks is None.
    """
    if reference not in models:
        return {}
    ref = models[reference]
    out = {}
    for name, record in models.items():
        row = {m: _ratio(_figure(record, m), _figure(ref, m), better) for m, better in HIGHER_IS_BETTER.items()}
        row |= {
            gain: _ratio(_figure(record, key), _figure(ref, key), higher) for gain, (key, higher) in COST_GAINS.items()
        }
        out[name] = row
    return out


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point dominates, both coordinates higher-is-better, sorted by the first.

    A point is dominated when another is at least as good on both coordinates and better on one.
    """
    front = [
        n
        for n, (x, y) in points.items()
        if not any(ox >= x and oy >= y and (ox > x or oy > y) for o, (ox, oy) in points.items() if o != n)
    ]
    return sorted(front, key=lambda n: points[n][0])


def pareto_fronts(ret: dict[str, dict[str, float | None]], quality: str = "perplexity") -> dict[str, list[str]]:
    """The front of `quality` retained against each cost gain, over the models that have both figures."""
    fronts = {}
    for gain in COST_GAINS:
        points = {
            n: (r[gain], r[quality]) for n, r in ret.items() if r.get(gain) is not None and r.get(quality) is not None
        }
        if len(points) > 1:
            fronts[gain] = pareto_front(points)
    return fronts
