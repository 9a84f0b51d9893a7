"""From a `student.from_teacher` config to a pruned student and the record of how it was cut.

The order is always the same: measure importance on calibration data (when anything is chosen by
importance, and for the report), resolve the target shape (explicit, named layer pattern, or a
parameter budget searched over shapes), turn shape + scores into a `KeepPlan`, slice.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from alambic.architecture import ATTENTION_OUTPUT, MLP_OUTPUT, role_modules
from alambic.config import FromTeacherConfig
from alambic.models import count_parameters
from alambic.students.importance import Importance, measure_importance
from alambic.students.prune import (
    PruningError,
    Shape,
    apply_plan,
    check_width_prunable,
    layer_indices,
    plan_for_shape,
    search_shape,
)


def target_shape(teacher: PreTrainedModel, cfg: FromTeacherConfig) -> tuple[Shape, list[int] | None]:
    """The student's shape, and the explicit teacher layers to keep when they are not chosen by importance."""
    n = teacher.config.num_hidden_layers
    layers = cfg.resolved_layers()
    if cfg.target_parameters is not None:
        return search_shape(teacher, int(cfg.target_parameters), cfg.target_axis, gqa=cfg.gqa), None
    width = {f: getattr(cfg, f) for f in FromTeacherConfig.WIDTH_FIELDS}
    if layers == "importance":
        return Shape(num_layers=cfg.num_layers, **width), None
    if layers == "all":
        return Shape(**width), None
    indices = layer_indices(layers, n)
    return Shape(num_layers=len(indices), **width), indices


def needs_skip_loss(cfg: FromTeacherConfig) -> bool:
    """Skip-loss costs one calibration pass per layer: measure it only when it ranks the layers."""
    return cfg.resolved_layers() == "importance" and cfg.layer_importance == "skip_loss"


def build_from_teacher(
    teacher: PreTrainedModel, cfg: FromTeacherConfig, calibration: list[dict[str, torch.Tensor]] | None
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Prune `teacher` as `cfg` asks; return the student and a json-ready record (shape, plan, scores, sizes).

    `calibration` batches (from `importance.calibration_batches`) are needed whenever something is chosen
    by importance; with them, layer and width scores are always measured so the report can plot them.
    """
    shape, explicit_layers = target_shape(teacher, cfg)
    plan_for_shape(teacher, shape, gqa=cfg.gqa)  # an impossible shape fails now, not after minutes of calibration
    importance: Importance | None = None
    if calibration is not None:
        importance = measure_importance(
            teacher,
            calibration,
            layers=True,
            skip_loss=needs_skip_loss(cfg),
            width=_width_prunable(teacher),
            head_gradient=cfg.prunes_width and cfg.head_importance == "gradient",
        )
    elif cfg.needs_importance:
        raise PruningError("student.from_teacher chooses units by importance: calibration batches are required")

    if explicit_layers is not None:
        # Explicit layers go through the same planner as ranked ones: kept layers score 1, others 0.
        layer_scores = [1.0 if i in explicit_layers else 0.0 for i in range(teacher.config.num_hidden_layers)]
    elif importance is not None and cfg.resolved_layers() == "importance":
        layer_scores = importance.layer_scores(cfg.layer_importance)
    else:
        layer_scores = None
    width_scores = {}
    if cfg.prunes_width and importance is not None:
        heads = importance.head_gradient if cfg.head_importance == "gradient" else importance.head_activation
        width_scores = dict(
            head_scores=heads, neuron_scores=importance.neuron_activation, channel_scores=importance.channel_activation
        )
    plan = plan_for_shape(teacher, shape, layer_scores=layer_scores, gqa=cfg.gqa, **width_scores)
    student = apply_plan(teacher, plan)

    record: dict[str, Any] = {
        "method": "prune",
        "teacher_layers": teacher.config.num_hidden_layers,
        "kept_layers": plan.layers,
        "removed_layers": [i for i in range(teacher.config.num_hidden_layers) if i not in plan.layers],
        "layer_ranking": "explicit"
        if explicit_layers is not None
        else (cfg.layer_importance if cfg.resolved_layers() == "importance" else "all kept"),
        "target": {
            "shape": shape.to_dict(),
            "target_parameters": cfg.target_parameters,
            "target_axis": cfg.target_axis if cfg.target_parameters else None,
        },
        "teacher_shape": shape_of(teacher),
        "student_shape": shape_of(student),
        "plan": plan.to_dict(),
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(student),
        "teacher_tensor_bytes": tensor_bytes(teacher),
        "student_tensor_bytes": tensor_bytes(student),
    }
    if importance is not None:
        record["importance"] = importance.to_dict()
    return student, record


def shape_of(model: PreTrainedModel) -> dict[str, int]:
    c = model.config
    return {
        "num_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
        "intermediate_size": getattr(c, "intermediate_size", None),
        "hidden_size": c.hidden_size,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    }


def tensor_bytes(model: PreTrainedModel) -> int:
    """Bytes of the weights as `save_pretrained` writes them (shared tensors once), at their current dtype."""
    seen, total = set(), 0
    for p in model.state_dict().values():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def _width_prunable(model: PreTrainedModel) -> bool:
    """Width statistics only for blocks the width rules understand and importance can read: a depth-only
    request never depends on them (a gpt2 or Mixtral teacher still gets layer scores)."""
    try:
        check_width_prunable(model)
    except PruningError:
        return False
    return role_modules(model, ATTENTION_OUTPUT) is not None and role_modules(model, MLP_OUTPUT) is not None
