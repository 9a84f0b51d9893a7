"""Classifiers on held-out examples: accuracy, macro-F1, agreement with the teacher's class, KL to the teacher's
class distribution, each with a bootstrap 95 % interval over examples; forward cost; retention.

Every figure is computed from the (N, C) class logits of each model and the (N,) labels, kept in memory once the
models have run, so the metrics are pure functions of tensors (`score_classifiers`) that tests check by hand.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from alambic.config import CostConfig, EvaluationConfig
from alambic.data.classification import ClassificationCollator
from alambic.evaluation.bootstrap import _percentiles, _resampled_totals, bootstrap_mean_intervals
from alambic.losses import forward_kl
from alambic.models import count_parameters
from alambic.utils import console

BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE = 1000, 0, 0.95  # as evaluation.quality
MEANS = ("accuracy", "teacher_agreement", "kl_to_teacher")  # per-example means; macro-F1 is not one


# ---------------------------------------------------------------------------------------------------- metrics


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    bad = [int(v) for v in np.concatenate([labels, predictions]) if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"class ids {sorted(set(bad))[:5]} outside [0, {num_classes})")
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def f1_from_counts(
    true_positives: np.ndarray, predicted: np.ndarray, actual: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class F1 and macro-F1 from counts of shape (..., C) (one leading axis per resample, or none).

    F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c) = 2 TP_c / (predicted_c + actual_c). Macro-F1 is the mean of F1_c over
    the classes that occur among the labels or the predictions (scikit-learn's convention without `labels`): a
    class never predicted but present scores 0 and counts; a class absent from both (which happens in bootstrap
    resamples) is left out rather than scored 0 or 1.

    Returns:
        (per-class F1 (..., C), macro-F1 (...)).
    """
    tp, predicted, actual = (np.asarray(x, dtype=np.float64) for x in (true_positives, predicted, actual))
    support = predicted + actual
    present = support > 0
    f1 = np.where(present, 2 * tp / np.maximum(support, 1.0), 0.0)
    return f1, f1.sum(-1) / np.maximum(present.sum(-1), 1)  # clamp: no class at all gives 0, not 0/0


def macro_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Macro-F1 of predictions against labels (see `f1_from_counts` for which classes are averaged)."""
    cm = confusion_matrix(labels, predictions, num_classes)
    return float(f1_from_counts(np.diag(cm), cm.sum(0), cm.sum(1))[1])


def macro_f1_interval(
    labels: np.ndarray,
    predictions: np.ndarray,
    num_classes: int,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> list[float]:
    """Percentile bootstrap interval of macro-F1 over examples.

    Macro-F1 is not a mean of per-example values, so each resample's F1 is recomputed from its own counts. The
    examples are drawn exactly as `bootstrap_mean_intervals` draws items (same generator, seed and order), so this
    interval is paired with the accuracy and agreement intervals of the same call, and with every other model's.
    """
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    n = labels.size
    if n == 0:
        raise ValueError("macro_f1_interval: no example")
    eye = np.eye(num_classes)
    # (N, 3C) per-example indicators: true positive of class c, predicted c, labelled c. Summed over a resample's
    # draws they are that resample's counts, (B, 3C), without a (B, N) gather.
    table = np.concatenate([eye[labels] * (labels == predictions)[:, None], eye[predictions], eye[labels]], axis=1)
    totals = _resampled_totals(table, resamples, seed).reshape(resamples, 3, num_classes)
    _, values = f1_from_counts(totals[:, 0], totals[:, 1], totals[:, 2])  # (B,)
    return _percentiles(values, confidence)


def score_classifiers(
    logits: dict[str, torch.Tensor],
    labels: torch.Tensor,
    label_names: list[str],
    *,
    teacher: str = "teacher",
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, dict[str, Any]]:
    """Quality of each model's class logits on the same N examples, against the labels and the teacher.

    Per model: accuracy = share of examples whose argmax is the label; macro_f1 (see `f1_from_counts`);
    teacher_agreement = share whose argmax is the teacher's; kl_to_teacher = mean over examples of
    KL(P_teacher || Q_model) over the classes at T = 1; per_class_f1; confusion_matrix (rows true, columns
    predicted); each of the four with a percentile bootstrap interval over examples (paired across models and
    metrics: same seed, same draws).

    Args:
        logits: {name: (N, C)}, the teacher's under `teacher`.
        labels: (N,) class ids.
        label_names: the C class names, in id order.

    Raises:
        ValueError: no teacher, shapes that disagree, or no example.
    """
    if teacher not in logits:
        raise ValueError(f"score_classifiers: no {teacher!r} among the models {list(logits)}")
    y = labels.detach().cpu().numpy().astype(np.int64)
    t_logits = logits[teacher].detach().cpu().double()
    n, c = t_logits.shape
    if n == 0 or y.shape != (n,) or c != len(label_names):
        raise ValueError(
            f"score_classifiers: teacher logits {tuple(t_logits.shape)}, labels {y.shape} and "
            f"{len(label_names)} label names must agree (N, C), (N,), C, with N >= 1"
        )
    t_pred = t_logits.argmax(-1).numpy()
    results = {}
    for name, raw in logits.items():
        z = raw.detach().cpu().double()
        if z.shape != t_logits.shape:
            raise ValueError(
                f"score_classifiers: {name} logits {tuple(z.shape)} differ from the teacher's "
                f"{tuple(t_logits.shape)}: every model must score the same examples over the same classes"
            )
        pred = z.argmax(-1).numpy()
        per_example = {
            "accuracy": (pred == y).astype(np.float64),
            "teacher_agreement": (pred == t_pred).astype(np.float64),
            "kl_to_teacher": forward_kl(z, t_logits).numpy(),
        }  # (N,) each
        cm = confusion_matrix(y, pred, c)
        per_class, macro = f1_from_counts(np.diag(cm), cm.sum(0), cm.sum(1))
        intervals = bootstrap_mean_intervals(per_example, resamples=resamples, confidence=confidence, seed=seed)
        intervals["macro_f1"] = macro_f1_interval(y, pred, c, resamples=resamples, confidence=confidence, seed=seed)
        results[name] = {
            **{k: float(v.mean()) for k, v in per_example.items()},
            "macro_f1": float(macro),
            "per_class_f1": {label: float(f) for label, f in zip(label_names, per_class)},
            "confusion_matrix": cm.tolist(),
            "intervals": {k: intervals[k] for k in ("accuracy", "macro_f1", "teacher_agreement", "kl_to_teacher")},
            "num_examples": int(n),
        }
    return results


# ---------------------------------------------------------------------------------------------------- models


@torch.inference_mode()
def class_logits(model: PreTrainedModel, dataset, *, pad_token_id: int, batch_size: int = 8) -> torch.Tensor:
    """(N, C) float32 class logits of `model` on every example of `dataset`, in order, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=ClassificationCollator(pad_token_id))
    out = [
        model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits.float().cpu()
        for b in loader
    ]
    return torch.cat(out) if out else torch.zeros(0, model.config.num_labels)


@torch.inference_mode()
def forward_cost(model: PreTrainedModel, dataset, cfg: CostConfig, *, pad_token_id: int) -> dict[str, Any]:
    """Time and memory of one forward pass over a batch of `cfg.batch_size` held-out examples (tiled when there are
    fewer), padded to the longest: `cfg.warmup` untimed runs, then `cfg.repeats` timed ones.

    Returns:
        forward_seconds_per_batch and examples_per_second (`summarize` dicts), weight_bytes, working_memory_bytes,
        peak_memory_bytes, memory_method, device, device_name, torch_threads, dtype, parameters, batch_size,
        sequence_tokens (padded length), warmup, repeats, load_average_1min.
    """
    from alambic.evaluation.cost import _device_name, _model_device, _repeat, _working_memory, summarize, weight_bytes

    if len(dataset) == 0:
        raise ValueError("the held-out split is empty: nothing to time the forward pass on")
    device = _model_device(model)
    rows = [dataset[i % len(dataset)] for i in range(cfg.batch_size)]
    batch = ClassificationCollator(pad_token_id)(rows)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    was_training = model.training
    model.eval()
    try:

        def run() -> None:
            model(input_ids=ids, attention_mask=mask)

        times = _repeat(run, device, warmup=cfg.warmup, repeats=cfg.repeats)
        working, method = _working_memory(run, device)
    finally:
        model.train(was_training)
    weights = weight_bytes(model)
    return {
        "forward_seconds_per_batch": summarize(times),
        "examples_per_second": summarize([cfg.batch_size / t for t in times]),
        "weight_bytes": weights,
        "working_memory_bytes": working,
        "peak_memory_bytes": None if working is None else weights + working,
        "memory_method": method,
        "device": str(device),
        "device_name": _device_name(device),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "parameters": count_parameters(model)["total"],
        "batch_size": cfg.batch_size,
        "sequence_tokens": int(ids.shape[1]),
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def classification_retention(
    models: dict[str, dict[str, Any]], reference: str = "teacher"
) -> dict[str, dict[str, Any]]:
    """Per model, relative to the teacher: accuracy and macro-F1 kept (model / teacher), speedup (teacher's
    forward time per batch / model's), size_reduction (parameters) and memory_reduction (peak memory), teacher /
    model. A figure either side lacks is None."""
    ref = models.get(reference)
    if ref is None:
        return {}

    def ratio(a: Any, b: Any) -> float | None:
        return (
            float(a) / float(b)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > 0
            else None
        )

    def cost(m: dict[str, Any], key: str) -> Any:
        value = (m.get("cost") or {}).get(key)
        return value.get("median") if isinstance(value, dict) else value

    return {
        name: {
            "accuracy": ratio(m["accuracy"], ref["accuracy"]),
            "macro_f1": ratio(m["macro_f1"], ref["macro_f1"]),
            "speedup": ratio(cost(ref, "forward_seconds_per_batch"), cost(m, "forward_seconds_per_batch")),
            "size_reduction": ratio(ref["parameters"], m["parameters"]),
            "memory_reduction": ratio(cost(ref, "peak_memory_bytes"), cost(m, "peak_memory_bytes")),
        }
        for name, m in models.items()
    }


def evaluate_classifier_models(
    teacher: PreTrainedModel,
    models: dict[str, PreTrainedModel],
    data,
    cfg: EvaluationConfig,
    *,
    labels: list[str],
    sources: dict[str, tuple[str, str | None]],
) -> dict[str, Any]:
    """Score the teacher and `models` on the held-out examples; the content of `eval.json` for classifiers.

    Args:
        data: `PreparedData` of format classification (`validation`: input_ids, attention_mask, labels).
        labels: class names in id order (`split.json`).
        sources: {name: (folder or hub id, gguf file or None)} the weights were loaded from, for size on disk.

    Returns:
        {"task", "split", "labels", "models": {name: metrics + parameters + architecture + cost}, "retention",
        "pareto_front"}.
    """
    from alambic.evaluation.cost import disk_size
    from alambic.evaluation.pareto import pareto_fronts
    from alambic.evaluation.suite import architecture

    everyone = {"teacher": teacher, **models}
    pad = teacher.config.pad_token_id
    logits = {}
    for name, model in everyone.items():
        console.print(f"classifying {len(data.validation)} held-out examples: {name}")
        logits[name] = class_logits(model, data.validation, pad_token_id=pad, batch_size=cfg.batch_size)
    results = score_classifiers(logits, torch.tensor(list(data.validation["labels"])), labels)
    for name, model in everyone.items():
        params = count_parameters(model)
        results[name].update(
            parameters=params["total"],
            non_embedding_parameters=params["non_embedding"],
            num_layers=getattr(model.config, "num_hidden_layers", None),
            architecture=architecture(model),
        )
        if cfg.cost is not None:
            console.print(f"cost: {name} ({cfg.cost.repeats} timed forward passes of {cfg.cost.batch_size} examples)")
            cost = forward_cost(model, data.validation, cfg.cost, pad_token_id=pad)
            path, gguf = sources[name]
            if gguf is not None or Path(path).is_dir():
                cost["disk"] = disk_size(path, gguf)
            results[name]["cost"] = cost
    ret = classification_retention(results)
    return {
        "task": "sequence_classification",
        "split": "validation",
        "labels": list(labels),
        "models": results,
        "retention": ret,
        "pareto_front": pareto_fronts(ret, quality="accuracy"),
    }
