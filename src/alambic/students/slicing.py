"""Cut a model by a `KeepPlan`: which tensors lose which rows and columns, the student, and its size.

One set of name rules (`_tensor_axes`) says, for every teacher tensor, which of its dimensions index
which kind of unit (hidden channel, query head, KV head, FFN neuron). `apply_plan` slices the tensors
along those dimensions; `planned_parameters` multiplies the kept sizes along the same dimensions. Both
read the same rules, so the count cannot drift from the model.

Width rules understand Llama/Qwen2/Mistral-style blocks only (q/k/v/o_proj attention, gate/up/down_proj
MLP, norms over the residual stream). Depth (which layers) needs no rule and works for any decoder.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from alambic.students.architecture import ModelDims, PruningError, Unit, decoder_layers, model_dims

# Per-layer lists some configs carry (Qwen2's sliding/full attention pattern, Gemma's...); kept in step
# with the layers so the student's config stays valid.
_PER_LAYER_CONFIG_LISTS = ("layer_types", "sliding_window_pattern_list", "no_rope_layers")
# Per-head norms (Qwen3's q_norm/k_norm) act on head_dim, never on the residual stream.
_PER_HEAD_NORMS = ("q_norm", "k_norm")

# (out, in) units of each projection's weight; its bias follows the first (output) axis.
_PROJECTION_AXES: dict[str, tuple[Unit, Unit]] = {
    "q_proj": ("query_head", "channel"),
    "k_proj": ("kv_head", "channel"),
    "v_proj": ("kv_head", "channel"),
    "o_proj": ("channel", "query_head"),
    "gate_proj": ("neuron", "channel"),
    "up_proj": ("neuron", "channel"),
    "down_proj": ("channel", "neuron"),
}
_PROJECTIONS = tuple(_PROJECTION_AXES)  # the only matrices a width-prunable decoder block may hold


@dataclass
class KeepPlan:
    """Which teacher units the student keeps (teacher numbering, each list increasing).

    A width field left None keeps every unit of that kind; a plan with only `layers` is depth pruning.
    """

    layers: list[int]
    """Kept teacher layer indices."""
    heads: list[list[int]] | None = None
    """Per kept layer (aligned with `layers`): kept query heads; the same count in every layer."""
    kv_heads: list[list[int]] | None = None
    """Per kept layer: kept KV heads (GQA groups); teacher query head q belongs to group q // (H // KV)."""
    neurons: list[list[int]] | None = None
    """Per kept layer: kept FFN neurons; the same count in every layer."""
    channels: list[int] | None = None
    """Kept hidden (residual-stream) channels, shared by every layer and the embeddings."""

    @property
    def prunes_width(self) -> bool:
        return any(x is not None for x in (self.heads, self.kv_heads, self.neurons, self.channels))

    def to_dict(self) -> dict[str, Any]:
        """json-ready: plain ints, None where a field keeps everything."""
        def plain(x: Any) -> Any:
            return x if x is None else [plain(i) for i in x] if isinstance(x, (list, tuple)) else int(x)

        return {f: plain(getattr(self, f)) for f in ("layers", "heads", "kv_heads", "neurons", "channels")}


def check_width_prunable(model: PreTrainedModel) -> None:
    """Raise unless every matrix inside the decoder blocks is one the width rules understand."""
    prefix, layers = decoder_layers(model)
    bad = []
    for name, module in layers.named_modules():
        weight = getattr(module, "weight", None)
        is_matrix = isinstance(module, nn.Linear) or (isinstance(weight, torch.Tensor) and weight.dim() >= 2)
        if is_matrix and name.rpartition(".")[2] not in _PROJECTIONS:
            bad.append(f"{prefix}.{name} ({type(module).__name__})")
    if bad:
        raise PruningError(
            f"cannot width-prune {type(model).__name__}: module {bad[0]} is not one of {', '.join(_PROJECTIONS)}"
            + (f" ({len(bad) - 1} more such modules)" if len(bad) > 1 else "")
            + ". Only Llama/Qwen2/Mistral-style blocks can be width-pruned; "
            "depth pruning (keep_layers, or a shape with only num_layers) works for this model"
        )


@dataclass(frozen=True)
class _Rules:
    prefix: str
    dims: ModelDims
    embedding_weights: frozenset[str]  # the input and output embeddings' `weight` names


def _rules(model: PreTrainedModel) -> _Rules:
    prefix, _ = decoder_layers(model)
    embeddings = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    names = frozenset(f"{name}.weight" for name, m in model.named_modules(remove_duplicate=False)
                      if any(m is e for e in embeddings))
    return _Rules(prefix, model_dims(model), names)


def _split_layer(name: str, prefix: str) -> tuple[int | None, str]:
    """`model.layers.3.mlp.up_proj.weight` -> (3, `mlp.up_proj.weight`); names outside the layers -> (None, name)."""
    if not name.startswith(prefix + "."):
        return None, name
    index, rest = name[len(prefix) + 1 :].split(".", 1)
    return int(index), rest


def _tensor_axes(name: str, shape: tuple[int, ...], rules: _Rules) -> tuple[Unit | None, ...]:
    """The width rules: which unit each dimension of teacher tensor `name` indexes (None: never sliced)."""
    dims = rules.dims
    module, _, param = name.rpartition(".")
    leaf = module.rpartition(".")[2]
    axes: tuple[Unit | None, ...] = (None,) * len(shape)
    if name in rules.embedding_weights:
        axes = (None, "channel")  # (vocab, hidden), input embedding and LM head alike
    elif leaf in _PROJECTION_AXES and name.startswith(rules.prefix + ".") and param in ("weight", "bias"):
        axes = _PROJECTION_AXES[leaf][: len(shape)]
    elif leaf.endswith("norm") and leaf not in _PER_HEAD_NORMS and shape == (dims.hidden_size,):
        axes = ("channel",)
    full = dims.full_sizes()
    for axis, (unit, size) in enumerate(zip(axes, shape)):
        if unit is not None and size != full[unit]:
            raise PruningError(f"tensor {name} has {size} entries along dimension {axis}, but the config implies "
                               f"{full[unit]} {unit} entries; this block layout is not understood by the width rules")
    return axes


@dataclass
class _Kept:
    """A validated plan: per kept layer index sets, KV heads derived from query heads and vice versa."""

    layers: list[int]
    heads: list[list[int]] | None
    kv_heads: list[list[int]] | None
    neurons: list[list[int]] | None
    channels: list[int] | None

    def indices(self, unit: Unit, j: int | None, head_dim: int) -> list[int] | None:
        """Element indices kept along a dimension of `unit` in kept layer j (None: the whole dimension)."""
        units = {"query_head": self.heads, "kv_head": self.kv_heads, "neuron": self.neurons}.get(unit)
        if unit == "channel" or units is None:
            return self.channels if unit == "channel" else None
        if unit == "neuron":
            return units[j]
        return [h * head_dim + i for h in units[j] for i in range(head_dim)]  # head h = rows h*d:(h+1)*d

    def sizes(self, dims: ModelDims) -> dict[Unit, int | None]:
        """Entries kept along a dimension of each unit; every kept layer keeps as many (validated)."""
        full = dims.full_sizes()
        return {u: full[u] if (keep := self.indices(u, 0, dims.head_dim)) is None else len(keep) for u in full}

    def config_sizes(self) -> dict[str, int | None]:
        """Config field -> kept count (None: unchanged)."""
        per_layer = {"num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                     "intermediate_size": self.neurons}
        sizes = {field: None if rows is None else len(rows[0]) for field, rows in per_layer.items()}
        return {**sizes, "hidden_size": None if self.channels is None else len(self.channels)}


def _check_indices(field: str, values: list[int], size: int, problems: list[str]) -> None:
    if not values:
        problems.append(f"{field} is empty: keep at least one")
    elif any(not 0 <= v < size for v in values) or any(a >= b for a, b in zip(values, values[1:])):
        problems.append(f"{field}={values} must be strictly increasing indices in [0, {size})")


def resolve_plan(model: PreTrainedModel, plan: KeepPlan) -> _Kept:
    """Validate `plan` against `model` (every problem at once) and derive the KV heads / query heads it implies."""
    d = model_dims(model)
    problems: list[str] = []
    _check_indices("KeepPlan.layers", list(plan.layers), d.num_layers, problems)
    n = len(plan.layers)
    heads, kv_heads = plan.heads, plan.kv_heads
    # Query heads alone imply their groups; groups alone imply all their query heads.
    if heads is not None and kv_heads is None:
        kv_heads = [sorted({h // d.n_rep for h in row}) for row in heads]
    if kv_heads is not None and heads is None:
        heads = [[g * d.n_rep + r for g in row for r in range(d.n_rep)] for row in kv_heads]
    sizes = {"heads": d.num_heads, "kv_heads": d.num_kv_heads, "neurons": d.intermediate_size}
    for field, value in (("heads", heads), ("kv_heads", kv_heads), ("neurons", plan.neurons)):
        if value is None:
            continue
        if len(value) != n:
            problems.append(f"KeepPlan.{field} has {len(value)} rows but {n} layers are kept: "
                            "give one row per kept layer")
            continue
        for layer, row in zip(plan.layers, value):
            _check_indices(f"KeepPlan.{field} (teacher layer {layer})", list(row), sizes[field] or 0, problems)
        if len({len(row) for row in value}) > 1:
            problems.append(f"KeepPlan.{field} keeps {[len(r) for r in value]} units per layer: "
                            "every layer must keep the same number (the config has one size)")
    if plan.channels is not None:
        _check_indices("KeepPlan.channels", list(plan.channels), d.hidden_size, problems)
    if heads is not None and kv_heads is not None and not problems:
        for layer, q_row, kv_row in zip(plan.layers, heads, kv_heads):
            per_group = Counter(h // d.n_rep for h in q_row)
            if set(per_group) != set(kv_row) or len(set(per_group.values())) != 1:
                problems.append(
                    f"teacher layer {layer}: query heads {q_row} fall in groups {dict(per_group)} but KV heads "
                    f"{kv_row} are kept; every kept KV group needs the same number (>= 1) of kept query heads")
    if problems:
        raise PruningError("invalid KeepPlan for " + type(model).__name__ + ":\n  - " + "\n  - ".join(problems))
    return _Kept(list(plan.layers), heads, kv_heads, plan.neurons, plan.channels)


def student_config(model: PreTrainedModel, layers: list[int], sizes: dict[str, int | None] | None = None) -> Any:
    """The student's config: `model`'s with the kept `layers` and the width `sizes` (config field -> value).

    A width change also sets `head_dim` explicitly to the teacher's, so fewer heads or channels never
    change the head (and rotary) dimension. The result passes the config class's own validation, which
    `save_pretrained` and `from_pretrained` run (LlamaConfig wants hidden_size divisible by num_attention_heads).
    """
    d = model_dims(model)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(layers)
    for attr in _PER_LAYER_CONFIG_LISTS:
        values = getattr(config, attr, None)
        if isinstance(values, list) and len(values) == d.num_layers:
            setattr(config, attr, [values[i] for i in layers])
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    sizes = {k: v for k, v in (sizes or {}).items() if v is not None}
    if sizes:
        config.head_dim = d.head_dim
        for field, value in sizes.items():
            setattr(config, field, value)
    if hasattr(config, "validate"):
        from huggingface_hub.errors import StrictDataclassError

        try:
            config.validate()
        except (ValueError, TypeError, StrictDataclassError) as e:
            raise PruningError(f"{type(config).__name__} refuses the student's sizes {sizes}: "
                               f"{str(e).splitlines()[-1].strip()} Choose sizes this architecture accepts") from e
    return config


def apply_plan(model: PreTrainedModel, plan: KeepPlan) -> PreTrainedModel:
    """A new model of `model`'s class holding copies of the kept layers, heads, neurons and channels.

    The teacher is left untouched. The student is built on the meta device from the updated config and
    receives the sliced tensors; attention modules are rebuilt, so their layer index (used by the KV cache)
    is right. A plan with only `layers` works for any decoder; width plans need Llama-style blocks.

    Raises:
        PruningError: the plan does not fit the model, the model's blocks are not width-prunable, or a
            tensor no rule slices would change shape.
    """
    if plan.prunes_width:
        check_width_prunable(model)
    kept = resolve_plan(model, plan)
    rules = _rules(model)
    config = student_config(model, kept.layers, kept.config_sizes())
    with torch.device("meta"):
        student = type(model)(config)
    expected = {k: tuple(v.shape) for k, v in student.state_dict().items()}

    new_index = {old: new for new, old in enumerate(kept.layers)}
    state = {}
    for key, value in model.state_dict().items():
        layer, rest = _split_layer(key, rules.prefix)
        if layer is not None and layer not in new_index:
            continue
        j = None if layer is None else new_index[layer]
        new_key = key if layer is None else f"{rules.prefix}.{j}.{rest}"
        original = value = value.detach()
        for dim, unit in enumerate(_tensor_axes(key, tuple(value.shape), rules) if plan.prunes_width else ()):
            keep = None if unit is None else kept.indices(unit, j, rules.dims.head_dim)
            if keep is not None:  # index_select copies, so the student never shares memory with the teacher
                value = value.index_select(dim, torch.tensor(keep, device=value.device))
        value = value.clone() if value is original else value
        if new_key not in expected:
            raise PruningError(f"tensor {key} of the teacher has no place in the student ({new_key})")
        if tuple(value.shape) != expected[new_key]:
            raise PruningError(f"tensor {key} would have shape {tuple(value.shape)} but the student expects "
                               f"{expected[new_key]}: no width rule slices it, so this model cannot be cut this way")
        state[new_key] = value
    missing = sorted(set(expected) - set(state))
    if missing:
        raise PruningError(f"the student expects tensors the teacher does not provide: {missing[:5]}")
    student.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        student.tie_weights()
    # Non-persistent buffers (rotary inverse frequencies) are not in the state dict: recompute them.
    _materialize_buffers(student, model)
    return student.eval()


def _materialize_buffers(student: PreTrainedModel, source: PreTrainedModel) -> None:
    source_buffers = dict(source.named_buffers())
    for name, buf in list(student.named_buffers()):
        if buf.device.type != "meta":
            continue
        module_name, _, attr = name.rpartition(".")
        module = student.get_submodule(module_name) if module_name else student
        src_name = name
        if src_name not in source_buffers:  # a layer buffer renumbered: any layer's copy is identical
            src_name = next((k for k in source_buffers if k.endswith("." + attr)), None)
        if src_name is None:
            raise PruningError(f"cannot rebuild buffer {name} of the student")
        module.register_buffer(attr, source_buffers[src_name].detach().clone(), persistent=False)


# ---- counting: the same rules applied to shapes --------------------------------------------------------

# (is_embedding, units of the sliced dimensions) -> sum over tensors of the product of their unsliced dims.
Terms = Counter[tuple[bool, tuple[Unit, ...]]]


@dataclass(frozen=True)
class _Entry:
    layer: int | None
    is_embedding: bool
    shape: tuple[int, ...]
    axes: tuple[Unit | None, ...]


def parameter_table(model: PreTrainedModel, *, width: bool) -> list[_Entry]:
    """One entry per parameter (tied weights once); `axes` from the width rules when `width`, else unsliced."""
    rules = _rules(model)
    embedding_ids = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                     for p in m.parameters()}
    table = []
    for name, p in model.named_parameters():  # deduplicated: a tied LM head appears once
        shape = tuple(p.shape)
        axes = _tensor_axes(name, shape, rules) if width else (None,) * len(shape)
        table.append(_Entry(_split_layer(name, rules.prefix)[0], id(p) in embedding_ids, shape, axes))
    return table


def count_terms(table: list[_Entry], layers: list[int] | None = None) -> Terms:
    """Fold the table into a polynomial in the kept sizes, over the teacher layers `layers` (None: all)."""
    terms: Terms = Counter()
    keep = None if layers is None else set(layers)
    for e in table:
        if e.layer is not None and keep is not None and e.layer not in keep:
            continue
        fixed = 1
        for unit, size in zip(e.axes, e.shape):
            fixed *= size if unit is None else 1
        terms[(e.is_embedding, tuple(sorted(u for u in e.axes if u is not None)))] += fixed
    return terms


def evaluate_terms(terms: Terms, sizes: dict[str, Any]) -> tuple[Any, Any]:
    """(total, embedding) for kept sizes per unit: ints, or int64 tensors that broadcast over candidates."""
    total, embedding = 0, 0
    for (is_embedding, units), coefficient in terms.items():
        value = coefficient
        for unit in units:
            value = value * sizes[unit]
        total = total + value
        if is_embedding:
            embedding = embedding + value
    return total, embedding


def planned_parameters(model: PreTrainedModel, plan: KeepPlan) -> dict[str, int]:
    """Parameters `apply_plan(model, plan)` would have, counted from shapes without building it.

    Returns `{"total", "embedding", "non_embedding"}`, as `alambic.models.count_parameters` counts them
    (tied weights once; "embedding" = input embedding, plus the LM head when untied).
    """
    if plan.prunes_width:
        check_width_prunable(model)
    kept = resolve_plan(model, plan)
    student_config(model, kept.layers, kept.config_sizes())  # refuse what apply_plan would refuse
    terms = count_terms(parameter_table(model, width=plan.prunes_width), kept.layers)
    total, embedding = evaluate_terms(terms, kept.sizes(model_dims(model)))
    return {"total": int(total), "embedding": int(embedding), "non_embedding": int(total - embedding)}
