"""Cut a student out of the teacher: which layers (depth), heads, FFN neurons and hidden channels (width).

A `Shape` says how big the student is; `plan_for_shape` turns it and importance scores into a `KeepPlan`
(which teacher units survive); `apply_plan` (in `slicing`) cuts the model. `search_shape` finds the shape
that meets a parameter budget. The result is an ordinary model of the teacher's class with an updated
config: it saves with `save_pretrained`, reloads with `from_pretrained`, and gives the logits it gave in memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Re-exported: callers import the whole pruning API from here.
from alambic.architecture import ModelDims, PruningError, decoder_layers, model_dims  # noqa: F401
from alambic.students.slicing import (  # noqa: F401
    _PER_LAYER_CONFIG_LISTS,
    KeepPlan,
    _materialize_buffers,
    apply_plan,
    check_width_prunable,
    count_terms,
    evaluate_terms,
    parameter_table,
    planned_parameters,
    student_config,
)
from alambic.utils import atomic_write_json

GQA = Literal["groups", "per_group"]


def layer_indices(spec: Literal["every_other", "first_half", "last_half"] | list[int], num_layers: int) -> list[int]:
    """Resolve a layer spec against a teacher of `num_layers` layers, in increasing order."""
    if spec == "every_other":
        return list(range(0, num_layers, 2))
    if spec == "first_half":
        return list(range((num_layers + 1) // 2))
    if spec == "last_half":
        return list(range(num_layers // 2, num_layers))
    bad = [i for i in spec if not 0 <= i < num_layers]
    if bad:
        raise PruningError(
            f"student.from_teacher.layers: indices {bad} out of range for a teacher of {num_layers} layers"
        )
    return sorted(spec)


def keep_layers(model: PreTrainedModel, indices: list[int]) -> PreTrainedModel:
    """A new model holding copies of `model`'s decoder layers `indices` (and every other weight).

    Depth pruning only, so it works for any decoder (gpt2 too). The teacher is left untouched.
    """
    return apply_plan(model, KeepPlan(layers=layer_indices(indices, model.config.num_hidden_layers)))


@dataclass
class Shape:
    """A target student shape; None keeps the teacher's value."""

    num_layers: int | None = None
    """Decoder layers to keep."""
    num_attention_heads: int | None = None
    """Query heads per layer."""
    num_key_value_heads: int | None = None
    """KV heads (GQA groups) per layer."""
    intermediate_size: int | None = None
    """FFN neurons per layer."""
    hidden_size: int | None = None
    """Hidden (residual-stream) channels."""

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)


@dataclass(frozen=True)
class _Targets:
    layers: int
    heads: int | None  # None: attention untouched
    kv_heads: int | None
    intermediate: int | None
    hidden: int | None


def _targets(shape: Shape, d: ModelDims, gqa: GQA) -> _Targets:
    """Fill the defaults of `shape` and check it against the teacher, reporting every problem at once."""
    problems = []
    layers = d.num_layers if shape.num_layers is None else shape.num_layers
    if not 1 <= layers <= d.num_layers:
        problems.append(f"num_layers={layers}: keep between 1 and the teacher's {d.num_layers}")
    heads, kv = shape.num_attention_heads, shape.num_key_value_heads
    if gqa not in ("groups", "per_group"):
        problems.append(f"gqa={gqa!r}: expected 'groups' or 'per_group'")
    if heads is not None and kv is None:
        # per_group keeps every group it can (for MHA, n_rep = 1, that is `heads` groups); groups keeps whole ones.
        kv = heads // d.n_rep if gqa == "groups" else min(d.num_kv_heads, heads)
    if kv is not None and heads is None:
        heads = kv * d.n_rep
    if heads is not None:
        if heads < 1 or kv < 1:
            problems.append(
                f"num_attention_heads={heads}, num_key_value_heads={kv}: keep at least 1 of each "
                f"(gqa={gqa!r} keeps whole groups of {d.n_rep} query heads)"
            )
        else:
            if kv > d.num_kv_heads:
                problems.append(
                    f"num_key_value_heads={kv} > the teacher's {d.num_kv_heads}: only existing groups can be kept"
                )
            if heads % kv:
                problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
            elif heads // kv > d.n_rep:
                problems.append(
                    f"num_attention_heads={heads} over {kv} KV groups is {heads // kv} per group, more "
                    f"than the teacher's {d.n_rep} (H={d.num_heads}, KV={d.num_kv_heads})"
                )
            if gqa == "groups" and heads != kv * d.n_rep:
                problems.append(
                    f"gqa='groups' keeps whole groups of {d.n_rep} query heads: "
                    f"num_attention_heads={heads} must be num_key_value_heads={kv} x {d.n_rep}; "
                    "use gqa='per_group' to thin groups"
                )
    for field, value, teacher in (
        ("intermediate_size", shape.intermediate_size, d.intermediate_size),
        ("hidden_size", shape.hidden_size, d.hidden_size),
    ):
        if value is not None and not 1 <= value <= (teacher or 0):
            problems.append(f"{field}={value}: keep between 1 and the teacher's {teacher}")
    if problems:
        raise PruningError("invalid student shape " + str(shape.to_dict()) + ":\n  - " + "\n  - ".join(problems))
    return _Targets(layers, heads, kv, shape.intermediate_size, shape.hidden_size)


def _config_sizes(
    heads: int | None, kv_heads: int | None, intermediate: int | None, hidden: int | None
) -> dict[str, int | None]:
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "hidden_size": hidden,
    }


def _scores(values: Any, shape: tuple[int, ...], name: str, meaning: str) -> torch.Tensor:
    """Scores as float64 on the CPU; None scores every unit 0, so the stable top-k keeps the first ones."""
    if values is None:
        return torch.zeros(shape, dtype=torch.float64)
    t = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if tuple(t.shape) != shape:
        raise PruningError(f"{name} has shape {tuple(t.shape)}, expected {shape} ({meaning})")
    if torch.isnan(t).any():
        raise PruningError(f"{name} contains NaN at {torch.isnan(t).nonzero().tolist()[:5]}: re-measure importance")
    return t


def _top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, increasing; ties keep the earlier unit (stable sort)."""
    return sorted(torch.sort(scores, descending=True, stable=True).indices[:k].tolist())


def plan_for_shape(
    model: PreTrainedModel,
    shape: Shape,
    *,
    layer_scores: Any = None,
    head_scores: Any = None,
    neuron_scores: Any = None,
    channel_scores: Any = None,
    gqa: GQA = "per_group",
) -> KeepPlan:
    """The units of `model` to keep for a student of `shape`: the highest-scoring ones.

    Args:
        layer_scores: (L,) per teacher layer. head_scores: (L, H) per layer and query head. neuron_scores:
            (L, I). channel_scores: (hidden,). Higher = more important = kept; None keeps the first units.
        gqa: with H query heads in KV groups of n_rep = H // KV, a group scores the sum of its heads.
            'groups' keeps the best KV' groups whole (needs H' = KV' x n_rep); 'per_group' keeps the best
            KV' groups and the best H'/KV' heads in each. KV' defaults to min(KV, H') under per_group and to
            H' / n_rep under groups; H' defaults to KV' x n_rep.

    Returns:
        A `KeepPlan` (teacher numbering, lists increasing). Width fields the shape leaves None stay None,
        so a depth-only shape works for any decoder.

    Raises:
        PruningError: the shape does not fit the teacher, scores have the wrong shape, or width is asked
            of blocks the width rules do not understand.
    """
    d = model_dims(model)
    width = any(
        v is not None
        for v in (shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size, shape.hidden_size)
    )
    if width:
        check_width_prunable(model)
    t = _targets(shape, d, gqa)
    if width:  # the config class's own rules (e.g. hidden divisible by heads), before any scoring
        student_config(model, list(range(t.layers)), _config_sizes(t.heads, t.kv_heads, t.intermediate, t.hidden))
    L = d.num_layers
    layers = _top_k(_scores(layer_scores, (L,), "layer_scores", "one per teacher layer"), t.layers)
    plan = KeepPlan(layers=layers)
    if t.heads is not None:
        scores = _scores(head_scores, (L, d.num_heads), "head_scores", "teacher layers x query heads")
        per_group = t.heads // t.kv_heads
        plan.heads, plan.kv_heads = [], []
        for layer in layers:
            s = scores[layer].view(d.num_kv_heads, d.n_rep)  # (KV, n_rep): group g holds heads g*n_rep ...
            groups = _top_k(s.sum(dim=1), t.kv_heads)
            # increasing heads lie group by group, as the student's repeat_kv expects
            plan.heads.append([g * d.n_rep + r for g in groups for r in _top_k(s[g], per_group)])
            plan.kv_heads.append(groups)
    if t.intermediate is not None:
        scores = _scores(neuron_scores, (L, d.intermediate_size), "neuron_scores", "teacher layers x FFN neurons")
        plan.neurons = [_top_k(scores[layer], t.intermediate) for layer in layers]
    if t.hidden is not None:
        plan.channels = _top_k(_scores(channel_scores, (d.hidden_size,), "channel_scores", "hidden channels"), t.hidden)
    return plan


def search_shape(
    model: PreTrainedModel,
    target_parameters: int,
    axis: Literal["depth", "width"],
    *,
    multiple: int | None = None,
    gqa: GQA = "per_group",
) -> Shape:
    """The student shape that best uses a budget of `target_parameters` parameters along one axis.

    Parameters are counted as `alambic.models.count_parameters` counts "total" (tied weights once,
    embeddings included), from the teacher's tensor shapes by the same rules `apply_plan` slices with;
    no model is built, so a 1.7B config is searched in well under a second (on the meta device too).

    depth: the most layers whose count is <= the budget; every other size is kept. If layers differ in
        size, the k largest are counted, so the budget holds whichever k layers `plan_for_shape` keeps.
        Returns `Shape(num_layers=k)`.
    width: every layer kept; a grid of candidates
        - hidden_size and intermediate_size: the teacher's value and every multiple of `multiple` below it
          (default 64, or 8 when the teacher's hidden size is below 1024);
        - attention: all KV groups with 1..n_rep query heads each (gqa='per_group' only), and whole
          groups removed, 1..KV groups of all n_rep heads;
        less the (hidden, heads) pairs the config class refuses (LlamaConfig: hidden % heads != 0).
        Among candidates within budget, the one whose smallest keep ratio (kept / teacher) over hidden
        channels, FFN neurons and query heads is largest: balanced pruning, as Minitron's width search keeps
        the axes in proportion rather than emptying one. Ties go to the count closest to the budget, then
        to the larger hidden size, FFN and head count. Returns a Shape with all four width fields set.

    Raises:
        PruningError: the budget exceeds the teacher's count, or is below the smallest reachable count
            (both are in the message); width asked of blocks the width rules do not understand.
    """
    d = model_dims(model)
    if axis == "depth":
        table = parameter_table(model, width=False)
        base = evaluate_terms(count_terms(table, []), {})[0]
        per_layer = sorted(
            (evaluate_terms(count_terms(table, [i]), {})[0] - base for i in range(d.num_layers)), reverse=True
        )
        counts = [base + sum(per_layer[:k]) for k in range(1, d.num_layers + 1)]  # counts[k - 1]: k layers
        _check_budget(target_parameters, counts[0], counts[-1], "depth")
        return Shape(num_layers=max(k for k in range(1, d.num_layers + 1) if counts[k - 1] <= target_parameters))
    if axis != "width":
        raise PruningError(f"search_shape axis={axis!r}: expected 'depth' or 'width'")

    check_width_prunable(model)
    m = multiple or (64 if d.hidden_size >= 1024 else 8)
    if m < 1:
        raise PruningError(f"search_shape multiple={multiple}: expected a positive grid step")
    hidden = _grid(d.hidden_size, m)
    inter = _grid(d.intermediate_size, m)
    attention = sorted(
        {(d.num_kv_heads * r, d.num_kv_heads) for r in range(1, d.n_rep + 1) if gqa == "per_group"}
        | {(g * d.n_rep, g) for g in range(1, d.num_kv_heads + 1)},
        reverse=True,
    )
    # Candidate axes broadcast to (hidden, intermediate, attention); grids descend so the teacher comes first.
    c = torch.tensor(hidden).view(-1, 1, 1)
    n = torch.tensor(inter).view(1, -1, 1)
    q = torch.tensor([a[0] for a in attention]).view(1, 1, -1)
    kv = torch.tensor([a[1] for a in attention]).view(1, 1, -1)
    grid = (len(hidden), len(inter), len(attention))
    total = torch.broadcast_to(
        torch.as_tensor(
            evaluate_terms(
                count_terms(parameter_table(model, width=True)),
                {"channel": c, "neuron": n, "query_head": q * d.head_dim, "kv_head": kv * d.head_dim},
            )[0]
        ),
        grid,
    )
    # The config class may refuse some (hidden, heads) pairs (LlamaConfig: hidden % heads != 0): drop them.
    # The teacher's own pair, first in the grid, is always accepted, so `accepted` is never empty.
    accepted = torch.tensor([[_accepts(model, h, a) for a in attention] for h in hidden]).view(len(hidden), 1, -1)
    accepted = torch.broadcast_to(accepted, grid)
    _check_budget(target_parameters, int(total[accepted].min()), int(total[0, 0, 0]), "width")

    ratio = torch.minimum(
        torch.minimum(c.double() / d.hidden_size, n.double() / d.intermediate_size), q.double() / d.num_heads
    )
    ratio = torch.broadcast_to(ratio, grid)
    fits = (total <= target_parameters) & accepted
    best = fits & (ratio == ratio[fits].max())
    best &= total == total[best].max()
    i, j, k = torch.nonzero(best)[0].tolist()  # first in grid order: larger hidden, then FFN, then heads
    return Shape(
        num_attention_heads=attention[k][0],
        num_key_value_heads=attention[k][1],
        intermediate_size=inter[j],
        hidden_size=hidden[i],
    )


def _accepts(model: PreTrainedModel, hidden: int, attention: tuple[int, int]) -> bool:
    try:
        student_config(model, [0], _config_sizes(attention[0], attention[1], None, hidden))
    except PruningError:
        return False
    return True


def _grid(size: int, multiple: int) -> list[int]:
    """`size` itself, then every multiple of `multiple` below it, descending."""
    return [size] + [v for v in range((size - 1) // multiple * multiple, 0, -multiple)]


def _check_budget(target: int, smallest: int, teacher: int, axis: str) -> None:
    if target > teacher:
        raise PruningError(f"target_parameters={target:,} exceeds the teacher's {teacher:,}: nothing to prune")
    if target < smallest:
        raise PruningError(
            f"target_parameters={target:,} is below the smallest {axis} pruning reaches "
            f"({smallest:,}); raise the budget" + (" or prune width" if axis == "depth" else "")
        )


def save_student(
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    record: dict,
) -> None:
    """Save the student in HF format with its tokenizer and a `student.json` record of how it was made."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / "student.json", record)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
