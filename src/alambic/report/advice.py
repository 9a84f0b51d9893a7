"""Advice drawn from a run's results: each rule reads measured figures and says what to try next, and why.

The thresholds are rules of thumb of the field, stated in each message so a user can judge them.
"""

from __future__ import annotations

import math
from typing import Any

# A near-uniform student: perplexity above this share of its vocabulary size (a uniform guess over V tokens scores
# exactly V; SmolLM2's student at learning rate 1e3 scored 49,151.98 of 49,152). Not lower: a pruned student can
# start far above V (every other layer of SmolLM2-135M: 1.4M) and pass V on its way down.
COLLAPSE_SHARE = 0.8
# Or distillation left the student this many times worse (perplexity) than it started: the training diverged.
COLLAPSE_WORSENING = 10.0
KEPT_ENOUGH = 0.85  # perplexity kept below this: the student lost much of the teacher
MIN_SPEEDUP = 1.5  # a student this much smaller should be at least this much faster
STILL_FALLING = 0.03  # relative drop of the training loss over the last fifth of the steps


def _overlap(a: list[float] | None, b: list[float] | None) -> bool:
    return bool(a and b) and a[0] <= b[1] and b[0] <= a[1]


def _loss_still_falling(records: list[dict[str, Any]]) -> float | None:
    """Relative drop of the logged training loss over the last fifth of the steps, or None if too few logs."""
    points = sorted((r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float)))
    if len(points) < 5:
        return None
    last_step = points[-1][0]
    window = [v for s, v in points if s >= 0.8 * last_step]
    earlier = [v for s, v in points if 0.6 * last_step <= s < 0.8 * last_step] or [points[-len(window) - 1][1]]
    before, after = sum(earlier) / len(earlier), sum(window) / len(window)
    return (before - after) / before if before > 0 else None


def _collapse(student: dict[str, Any], before: dict[str, Any] | None, training: dict[str, Any]) -> str | None:
    """Advice for a student the training broke (non-finite, near-uniform, or far worse than before), else None.
    Such a student makes every other rule's advice moot (more steps would only train the broken model longer)."""
    ppl = student.get("perplexity")
    if not isinstance(ppl, (int, float)):
        return None
    settings = (
        f"lower `training.learning_rate` (now {training.get('learning_rate')}) tenfold or more, keep a warm-up "
        f"(`training.warmup_ratio`, now {training.get('warmup_ratio')}) and gradient clipping "
        f"(`training.max_grad_norm`, now {training.get('max_grad_norm')}), and look in metrics.jsonl for the "
        "step where the loss rose"
    )
    if not math.isfinite(ppl):
        return (
            f"The distilled student's perplexity is not finite ({ppl}): its outputs overflow. More steps will not "
            f"help: {settings}; train in float32 (`training.bf16: false`) if it ran in half precision."
        )
    vocab = (student.get("architecture") or {}).get("vocab_size")
    before_ppl = (before or {}).get("perplexity")
    if vocab and ppl >= COLLAPSE_SHARE * vocab:
        why = (
            f"perplexity {ppl:,.0f} against a vocabulary of {vocab:,} tokens: it predicts about as well as a "
            "uniform guess over the vocabulary"
        )
    elif isinstance(before_ppl, (int, float)) and before_ppl > 0 and ppl >= COLLAPSE_WORSENING * before_ppl:
        why = (
            f"perplexity {ppl:,.0f}, {ppl / before_ppl:,.0f}× its {before_ppl:,.0f} before distillation "
            f"(more than {COLLAPSE_WORSENING:.0f}× worse)"
        )
    else:
        return None
    return (
        f"The distilled student collapsed ({why}): the training diverged, and more steps will not help. "
        f"{settings[0].upper()}{settings[1:]}."
    )


def advice(
    evaluation: dict[str, Any],
    config: dict[str, Any],
    *,
    pruning: dict[str, Any] | None = None,
    metrics: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Markdown bullet texts (without the bullet), most important first; [] when nothing calls for action."""
    models = evaluation.get("models", {})
    ret = evaluation.get("retention", {})
    student = models.get("student_distilled")
    if not student:
        return []
    if collapsed := _collapse(student, models.get("student_before"), config.get("training", {})):
        return [collapsed]
    tips = []
    kept = (ret.get("student_distilled") or {}).get("perplexity")
    loss = config.get("loss", {})
    if kept is not None and kept < KEPT_ENOUGH:
        t = loss.get("temperature", 1)
        tips.append(
            f"The distilled student keeps {kept:.0%} of the teacher's perplexity (below {KEPT_ENOUGH:.0%}). "
            f"Try, in this order: more training steps or data; a higher temperature (now {t}; 2–4 passes more of "
            "the teacher's ranking of unlikely tokens); feature matching (`loss.features`: hidden states, "
            "attention relations); a larger student."
        )
    control = models.get("student_ce_control")
    if control and student.get("kl_to_teacher") is not None:  # None: a teacher with another tokenizer
        s_kl, c_kl = student["kl_to_teacher"], control["kl_to_teacher"]
        iv = lambda m: (m.get("intervals") or {}).get("kl_to_teacher")  # noqa: E731
        if s_kl >= c_kl:
            tips.append(
                f"Distillation did not beat plain cross-entropy (KL to teacher {s_kl:.3f} vs {c_kl:.3f} for "
                "the CE control): check that the teacher is good on this data (its perplexity above), raise "
                f"`loss.alpha` (now {loss.get('alpha')}) or try another divergence (reverse_kl, jsd)."
            )
        elif _overlap(iv(student), iv(control)):
            tips.append(
                f"The gain over the CE control (KL {s_kl:.3f} vs {c_kl:.3f}) is within the bootstrap "
                "intervals: evaluate on more held-out data (`data.max_validation_sequences`) before "
                "concluding."
            )
    r = ret.get("student_distilled") or {}
    speedup, smaller = r.get("speedup"), r.get("size_reduction")
    if speedup is not None and smaller is not None and smaller >= MIN_SPEEDUP and speedup < MIN_SPEEDUP:
        width = bool(pruning) and pruning.get("student_shape", {}).get("hidden_size") != pruning.get(
            "teacher_shape", {}
        ).get("hidden_size")
        tips.append(
            f"The student is {smaller:.1f}× smaller but only {speedup:.2f}× faster per generated token at batch 1: "
            "decoding one token at a time is bound by memory traffic and per-layer overheads, not arithmetic. "
            "Quantize the student (8- or 4-bit weights) to cut memory traffic"
            + (", and prefer removing layers to narrowing them: latency follows depth" if width else "")
            + "; measure at the batch you will serve (throughput column)."
        )
    skipped = max((r.get("nonfinite_steps_skipped", 0) for r in metrics or []), default=0)
    if skipped:
        training = config.get("training", {})
        tips.append(
            f"{skipped} of {training.get('max_steps')} training steps were left out for a non-finite loss or "
            "gradient norm (`training.on_nonfinite: skip`). A rare one is a passing spike; more point at a "
            f"learning rate too high (`training.learning_rate`, now {training.get('learning_rate')}) or an "
            "overflow in half precision (`training.bf16` / `training.fp16`)."
        )
    drop = _loss_still_falling(metrics or [])
    if drop is not None and drop > STILL_FALLING:
        tips.append(
            f"The training loss was still falling at the end ({drop:.0%} lower over the last fifth of the "
            f"steps than the fifth before): more steps (now {config.get('training', {}).get('max_steps')}) "
            "should help."
        )
    before = models.get("student_before")
    if pruning and before and pruning.get("layer_ranking") == "explicit" and before["kl_to_teacher"] > 2:
        tips.append(
            "The student's layers were chosen by position, not measured, and it started far from the "
            "teacher (KL "
            f"{before['kl_to_teacher']:.2f}): `student.from_teacher.layers: importance` keeps the layers "
            "whose removal costs most, measured to start and end closer to the teacher."
        )
    gen = (student.get("generation") or {}).get("reference")
    if gen and gen.get("truncated_share", 0) > 0.5:
        tips.append(
            f"{gen['truncated_share']:.0%} of the student's responses hit the length cap: raise "
            "`evaluation.generation.max_new_tokens`, or train on responses that end (chat data ending "
            "with the end-of-turn token)."
        )
    return tips
