"""Cut a model by a `KeepPlan`: which tensors lose which rows and columns, the student, and its size.

One set of name rules (`_tensor_parts`) says, for every teacher tensor, which of its dimensions index
which kind of unit (hidden channel, query head, KV head, FFN neuron). `apply_plan` slices the tensors
along those dimensions; `planned_parameters` multiplies the kept sizes along the same dimensions. Both
read the same rules, so the count cannot drift from the model.

Width rules understand blocks of separate nn.Linear projections as most decoders name them (Llama, Qwen,
Mistral, Gemma, OLMo, Granite, Cohere: q/k/v/o_proj, gate/up/down_proj; Phi: dense, fc1/fc2; StarCoder2:
c_fc/c_proj), Phi-3's fused q|k|v and gate|up rows, norms over the hidden channels (pre- or post-norm), and
query/key norms over whole heads or over all of them (OLMo 2). Depth (which layers) needs no rule and works
for any decoder.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from alambic.architecture import (
    ModelDims,
    PruningError,
    Unit,
    decoder_layers,
    family,
    model_dims,
)

# Per-layer lists some configs carry (Qwen2's sliding/full attention pattern, Gemma's...); kept in step
# with the layers so the student's config stays valid.
_PER_LAYER_CONFIG_LISTS = ("layer_types", "sliding_window_pattern_list", "no_rope_layers")
# Norms by where they sit in a block. On the block itself (and outside the layers): over the hidden channels.
# Inside attention: over head_dim, shared by every head (Qwen3, Gemma 3: never sliced), or over all heads'
# entries at once (OLMo 2's q_norm/k_norm, BitNet's attn_sub_norm: sliced with the heads; `k*` ones with the
# KV heads). Inside the MLP: over the FFN neurons (BitNet's ffn_sub_norm).
_ATTENTION_PARENTS = ("self_attn", "attention", "self_attention", "attn")

# (out, in) units of each projection's weight, by its `parent.name` in the block; its bias follows the first
# (output) axis. Keyed with the parent so a name means one thing (gpt2's attn.c_proj is not an FFN matrix).
_PROJECTION_AXES: dict[str, tuple[Unit, Unit]] = {
    "self_attn.q_proj": ("query_head", "channel"),
    "self_attn.k_proj": ("kv_head", "channel"),
    "self_attn.v_proj": ("kv_head", "channel"),
    "self_attn.o_proj": ("channel", "query_head"),
    "self_attn.dense": ("channel", "query_head"),  # Phi
    "mlp.gate_proj": ("neuron", "channel"),
    "mlp.up_proj": ("neuron", "channel"),
    "mlp.down_proj": ("channel", "neuron"),
    "mlp.fc1": ("neuron", "channel"),  # Phi
    "mlp.fc2": ("channel", "neuron"),
    "mlp.c_fc": ("neuron", "channel"),  # StarCoder2 (nn.Linear, unlike gpt2's Conv1D)
    "mlp.c_proj": ("channel", "neuron"),
}
# Fused projections (Phi-3): the output rows are several units' rows stacked, in this order, each as many
# rows as that unit's full size (q | k | v: H*d, KV*d, KV*d rows; gate | up: I, I rows). Input axis: channels.
_FUSED_ROWS: dict[str, tuple[Unit, ...]] = {
    "self_attn.qkv_proj": ("query_head", "kv_head", "kv_head"),
    "mlp.gate_up_proj": ("neuron", "neuron"),
}
_PROJECTIONS = (*_PROJECTION_AXES, *_FUSED_ROWS)  # the only matrices a width-prunable decoder block may hold
_WIDTH_FIELDS = ", ".join(
    f"student.from_teacher.{f}"
    for f in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size")
)
_DEPTH_ONLY = (
    f"Leave {_WIDTH_FIELDS} unset (or target_axis: depth): depth pruning (student.from_teacher.layers or "
    "num_layers) works for any decoder"
)


def _role(name: str) -> str:
    """`self_attn.q_proj.weight` or `model.layers.0.self_attn.q_proj` -> `self_attn.q_proj` (parent.module)."""
    parts = name.split(".")
    if parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return ".".join(parts[-2:])


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
    """Raise unless every matrix inside the decoder blocks is an nn.Linear the width rules understand."""
    prefix, layers = decoder_layers(model)
    bad = []
    for name, module in layers.named_modules():
        weights = [p for p in module.parameters(recurse=False) if p.dim() >= 2]  # MoE experts hold 3-d ones
        known = isinstance(module, nn.Linear) and _role(name) in _PROJECTIONS
        if (weights or isinstance(module, nn.Linear)) and not known:
            bad.append(f"{prefix}.{name} ({type(module).__name__})")
    if bad:
        raise PruningError(
            f"cannot width-prune {family(model)}: module {bad[0]} is not one the width rules slice"
            + (f" ({len(bad) - 1} more such modules)" if len(bad) > 1 else "")
            + f" (nn.Linear {', '.join(_PROJECTIONS)}). {_WIDTH_FIELDS} need such blocks; depth pruning "
            "(student.from_teacher.layers or num_layers; keep_layers in Python) works for this model"
        )


@dataclass(frozen=True)
class _Rules:
    prefix: str
    dims: ModelDims
    embedding_weights: frozenset[str]  # the input and output embeddings' `weight` names
    family: str  # how messages name the model


def _rules(model: PreTrainedModel) -> _Rules:
    prefix, _ = decoder_layers(model)
    embeddings = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    names = frozenset(
        f"{name}.weight" for name, m in model.named_modules(remove_duplicate=False) if any(m is e for e in embeddings)
    )
    return _Rules(prefix, model_dims(model), names, family(model))


def _split_layer(name: str, prefix: str) -> tuple[int | None, str]:
    """`model.layers.3.mlp.up_proj.weight` -> (3, `mlp.up_proj.weight`); names outside the layers -> (None, name)."""
    if not name.startswith(prefix + "."):
        return None, name
    index, rest = name[len(prefix) + 1 :].split(".", 1)
    return int(index), rest


_Part = tuple[tuple[int, ...], tuple[Unit | None, ...]]  # (shape, unit each dimension indexes; None: never sliced)


def _tensor_parts(name: str, shape: tuple[int, ...], rules: _Rules) -> list[_Part]:
    """The width rules: teacher tensor `name` as [(part shape, unit of each dimension or None: never sliced)].

    One part for every tensor but a fused projection's, whose rows split into one part per stacked unit.
    """
    dims = rules.dims
    module, _, param = name.rpartition(".")
    leaf = module.rpartition(".")[2]
    role = _role(name)
    in_layers = name.startswith(rules.prefix + ".") and param in ("weight", "bias")
    full = dims.full_sizes()
    axes: tuple[Unit | None, ...] = (None,) * len(shape)
    if name in rules.embedding_weights:
        axes = (None, "channel")  # (vocab, hidden), input embedding and LM head alike
    elif in_layers and role in _FUSED_ROWS:
        rows = [full[u] for u in _FUSED_ROWS[role]]
        if sum(rows) != shape[0]:
            raise PruningError(
                f"{rules.family}: tensor {name} has {shape[0]} rows, but the config implies "
                f"{' + '.join(map(str, rows))} ({' | '.join(_FUSED_ROWS[role])}); this fused "
                f"layout is not understood by the width rules. {_DEPTH_ONLY}"
            )
        return [((n, *shape[1:]), (u, "channel")[: len(shape)]) for u, n in zip(_FUSED_ROWS[role], rows)]
    elif in_layers and role in _PROJECTION_AXES:
        axes = _PROJECTION_AXES[role][: len(shape)]
    elif (leaf.lower().endswith("norm") or leaf.startswith("ln_")) and len(shape) == 1:
        axes = (_norm_unit(name, shape[0], rules),)
    for axis, (unit, size) in enumerate(zip(axes, shape)):
        if unit is not None and size != full[unit]:
            raise PruningError(
                f"{rules.family}: tensor {name} has {size} entries along dimension {axis}, but the "
                f"config implies {full[unit]} {unit} entries; this block layout is not understood by "
                f"the width rules. {_DEPTH_ONLY}"
            )
    return [(shape, axes)]


def _norm_unit(name: str, size: int, rules: _Rules) -> Unit | None:
    """The unit a norm's weight or bias of `size` entries indexes, from where the norm sits (see _ATTENTION_PARENTS)."""
    dims, full = rules.dims, rules.dims.full_sizes()
    layer, rest = _split_layer(name, rules.prefix)
    path = rest.split(".")[:-2]  # the modules between the block and the norm; [] for a norm on the block itself
    if layer is None or not path:
        return "channel" if size == dims.hidden_size else None
    leaf = rest.split(".")[-2]
    if path[-1] in _ATTENTION_PARENTS:
        unit: Unit = "kv_head" if leaf.startswith("k") else "query_head"
        return unit if size == full[unit] and size != dims.head_dim else None
    return "neuron" if path[-1] == "mlp" and size == dims.intermediate_size else None


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
        per_layer = {
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.neurons,
        }
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
            problems.append(
                f"KeepPlan.{field} has {len(value)} rows but {n} layers are kept: give one row per kept layer"
            )
            continue
        for layer, row in zip(plan.layers, value):
            _check_indices(f"KeepPlan.{field} (teacher layer {layer})", list(row), sizes[field] or 0, problems)
        if len({len(row) for row in value}) > 1:
            problems.append(
                f"KeepPlan.{field} keeps {[len(r) for r in value]} units per layer: "
                "every layer must keep the same number (the config has one size)"
            )
    if plan.channels is not None:
        _check_indices("KeepPlan.channels", list(plan.channels), d.hidden_size, problems)
    if heads is not None and kv_heads is not None and not problems:
        for layer, q_row, kv_row in zip(plan.layers, heads, kv_heads):
            per_group = Counter(h // d.n_rep for h in q_row)
            if set(per_group) != set(kv_row) or len(set(per_group.values())) != 1:
                problems.append(
                    f"teacher layer {layer}: query heads {q_row} fall in groups {dict(per_group)} but KV heads "
                    f"{kv_row} are kept; every kept KV group needs the same number (>= 1) of kept query heads"
                )
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
        derived = config.hidden_size // config.num_attention_heads
        if derived != d.head_dim and not _reads_config_head_dim(model):
            heads = config.num_attention_heads
            raise PruningError(
                f"{family(model)} ties its attention to hidden_size (num_attention_heads x head_dim = hidden_size; "
                f"config.head_dim alone is not followed): student.from_teacher.hidden_size {config.hidden_size} / "
                f"num_attention_heads {heads} = {derived} would change the teacher's head_dim {d.head_dim}. Cut both "
                f"together (hidden_size = num_attention_heads x {d.head_dim}, e.g. {heads * d.head_dim})"
            )
    if hasattr(config, "validate"):
        from huggingface_hub.errors import StrictDataclassError

        try:
            config.validate()
        except (ValueError, TypeError, StrictDataclassError) as e:
            raise PruningError(
                f"{type(config).__name__} refuses the student's sizes {sizes}: "
                f"{str(e).splitlines()[-1].strip()} Choose sizes this architecture accepts"
            ) from e
    return config


_READS_HEAD_DIM: dict[type, bool] = {}


def _reads_config_head_dim(model: PreTrainedModel) -> bool:
    """Whether `model`'s family sizes attention by config.head_dim (most) or ties it to hidden_size, so that
    num_attention_heads x head_dim must stay hidden_size (StableLM's head_dim, Helium's o_proj, BitNet's
    attn_sub_norm).

    Asked of the modeling code itself, once per class: a one-layer copy on the meta device with twice the
    hidden size and the same heads and head_dim, whose tensors must have the shapes the width rules predict.
    """
    cls = type(model)
    if cls not in _READS_HEAD_DIM:
        d, rules = model_dims(model), _rules(model)
        probe = student_config(model, [0])
        probe.head_dim, probe.hidden_size = d.head_dim, 2 * d.hidden_size
        with torch.device("meta"):
            built = {name: tuple(p.shape) for name, p in cls(probe).named_parameters()}
        sizes = {**d.full_sizes(), "channel": probe.hidden_size}
        follows = True
        for name, p in model.named_parameters():
            if _split_layer(name, rules.prefix)[0] not in (0, None):
                continue
            parts = [
                tuple(n if u is None else sizes[u] for u, n in zip(axes, shape))
                for shape, axes in _tensor_parts(name, tuple(p.shape), rules)
            ]
            expected = (sum(part[0] for part in parts), *parts[0][1:]) if len(parts) > 1 else parts[0]
            follows &= built.get(name) == expected
        _READS_HEAD_DIM[cls] = follows
    return _READS_HEAD_DIM[cls]


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
        if plan.prunes_width:
            parts = _tensor_parts(key, tuple(value.shape), rules)
            if len(parts) == 1:  # also 0-d tensors (Apertus' activation scalars), which have no rows to split
                value = _slice(value, parts[0][1], kept, j, rules.dims.head_dim)
            else:  # fused rows: each stacked part sliced by its own unit, then stacked again
                pieces = value.split([shape[0] for shape, _ in parts])
                value = torch.cat(
                    [_slice(piece, axes, kept, j, rules.dims.head_dim) for piece, (_, axes) in zip(pieces, parts)]
                )
        value = value.clone() if value is original else value
        if new_key not in expected:
            raise PruningError(f"tensor {key} of the teacher has no place in the student ({new_key})")
        if tuple(value.shape) != expected[new_key]:
            raise PruningError(
                f"{rules.family}: tensor {key} would have shape {tuple(value.shape)} but the student "
                f"expects {expected[new_key]}: no width rule slices it, so this model cannot be cut "
                f"this way. {_DEPTH_ONLY}"
            )
        state[new_key] = value
    missing = sorted(set(expected) - set(state))
    if missing:
        raise PruningError(f"the student expects tensors the teacher does not provide: {missing[:5]}")
    # Before the weights arrive: the buffers' init runs while every parameter is still on the meta device.
    _materialize_buffers(student, model)
    student.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        student.tie_weights()
    return student.eval()


def _slice(
    value: torch.Tensor, axes: tuple[Unit | None, ...], kept: _Kept, j: int | None, head_dim: int
) -> torch.Tensor:
    """`value` with only the kept entries along each dimension that indexes a unit."""
    for dim, unit in enumerate(axes):
        keep = None if unit is None else kept.indices(unit, j, head_dim)
        if keep is not None:  # index_select copies, so the student never shares memory with the teacher
            value = value.index_select(dim, torch.tensor(keep, device=value.device))
    return value


def _materialize_buffers(student: PreTrainedModel, source: PreTrainedModel) -> None:
    """Give the meta student's buffers values, as `from_pretrained` does: computed from the student's config.

    Non-persistent buffers (rotary inverse frequencies, Gemma's embedding scale sqrt(hidden_size)) are not
    in the state dict, so a reload recomputes them from the config; the student in memory must hold the same,
    or a hidden-size cut would give other logits after `save_pretrained`. The class's own `_init_weights`
    computes them (the meta parameters it also visits are untouched); a buffer it leaves unset is copied
    from the teacher, whose layers' buffers are all alike.
    """
    source_buffers = dict(source.named_buffers())
    device = next(source.parameters()).device

    def place(name: str, value: torch.Tensor) -> nn.Module:
        module_name, _, attr = name.rpartition(".")
        module = student.get_submodule(module_name)
        module.register_buffer(attr, value, persistent=attr not in module._non_persistent_buffers_set)
        return module

    owners = []
    for name, buf in list(student.named_buffers()):
        if buf.device.type == "meta":  # NaN: "not computed yet"; integer buffers have no init to run
            owners.append(
                place(
                    name,
                    torch.full(buf.shape, float("nan"), dtype=buf.dtype, device=device)
                    if buf.is_floating_point()
                    else _source_buffer(name, source_buffers),
                )
            )
    if hasattr(student, "_init_weights"):
        for module in {id(m): m for m in owners}.values():
            student._init_weights(module)
    for name, buf in list(student.named_buffers()):
        if buf.is_floating_point() and buf.isnan().any():  # left unset by the init: the teacher's value
            place(name, _source_buffer(name, source_buffers))


def _source_buffer(name: str, source_buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    src_name = name
    if src_name not in source_buffers:  # a layer buffer renumbered: any layer's copy is identical
        attr = name.rpartition(".")[2]
        src_name = next((k for k in source_buffers if k.endswith("." + attr)), None)
    if src_name is None:
        raise PruningError(f"cannot rebuild buffer {name} of the student")
    return source_buffers[src_name].detach().clone()


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
    embedding_ids = {
        id(p)
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None
        for p in m.parameters()
    }
    table = []
    for name, p in model.named_parameters():  # deduplicated: a tied LM head appears once
        shape = tuple(p.shape)
        parts = _tensor_parts(name, shape, rules) if width else [(shape, (None,) * len(shape))]
        for part_shape, axes in parts:  # a fused projection counts as its stacked parts
            table.append(_Entry(_split_layer(name, rules.prefix)[0], id(p) in embedding_ids, part_shape, axes))
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
