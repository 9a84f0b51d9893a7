"""Which parts of a causal LM matter: structured-pruning importance measured on calibration data.

Every statistic is an average over the *counted positions* t of the calibration batches: position t
counts when it predicts a counted target (labels[t + 1] != -100, with t and t + 1 real, non-pad
tokens). These are exactly the positions the calibration loss is computed on; the last position of a
sequence predicts nothing and never counts. N is their number.

Depth (whole decoder layers l, with input x_l and output x_{l+1}):
  block_influence[l]    = 1/N Σ_t (1 - cos(x_l[t], x_{l+1}[t]))                (ShortGPT, Men et al. 2024)
  skip_loss_increase[l] = CE(model with layer l replaced by x -> x) - CE(model)  (Minitron, Muralidharan et al. 2024)
Width (Minitron), from blocks with attention and FFN output projections (o_proj / down_proj, Phi's dense / fc2):
  head_activation[l, h]   = 1/N Σ_t ‖a_l[t, h, :]‖₂, a_l = the input of o_proj viewed as (..., H, head_dim)
  neuron_activation[l, i] = 1/N Σ_t |act(gate(x))[t, i] · up(x)[t, i]|  (the input of down_proj)
  channel_activation[c]   = Σ_norms 1/N Σ_t |norm(x)[t, c]|, over every norm over the hidden channels: each
                            layer's own, pre-norms (Llama: input_layernorm, post_attention_layernorm) and
                            post-norms (OLMo 2; Gemma 2/3 have both) alike, and the final norm
Michel et al. 2019 ("Are sixteen heads really better than one?"):
  head_gradient[l, h] = Σ_batches |∂L_batch / ∂m_{l,h}| at m = 1, where m_{l,h} multiplies head h's output
                        before o_proj and L_batch is the batch's mean next-token CE over counted targets.

CE is the mean next-token cross-entropy over all counted targets (token-weighted across batches).
Statistics are accumulated in float32 whatever the model's dtype. The model is left as it was found:
no hooks, the same parameters, requires_grad flags and train/eval mode of every module.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from alambic.architecture import (
    ATTENTION_OUTPUT,
    MLP_OUTPUT,
    PruningError,
    decoder_layers,
    family,
    final_norm,
    model_dims,
    residual_norms,
    role_modules,
)
from alambic.data import DistillationCollator
from alambic.losses import token_cross_entropy
from alambic.modeling import counted_positions, final_hidden_states, project
from alambic.utils import console

# Why width statistics are refused, and what still works: the layer scores, which need no module of the block.
_WIDTH_HINT = (
    "head, neuron and channel importance read decoders with separate attention and FFN output "
    "projections ({attention} / {mlp}); layer importance works for this model "
    "(measure_importance(..., width=False, head_gradient=False)), and student.from_teacher prunes it "
    "by depth (layers, num_layers)"
)


class ImportanceError(PruningError):
    """Importance cannot be measured on this model or this data; the message says why and what to do."""


@dataclass
class Importance:
    """Importance scores of one model on one calibration set (formulas in the module docstring).

    Per-layer lists and the first axis of the (L, ...) tensors follow the order of the decoder layers.
    A field is None (an empty list for block_influence) when it was not asked for.
    """

    num_sequences: int
    """Calibration sequences seen."""
    num_tokens: int
    """Counted positions N (those predicting a target with labels != -100), over all sequences."""
    base_loss: float
    """Mean next-token cross-entropy of the unpruned model over the N counted targets."""
    block_influence: list[float]
    """Per layer: mean over counted positions of 1 - cos(layer input, layer output); ~0 for a no-op layer."""
    skip_loss_increase: list[float] | None
    """Per layer: calibration CE with that layer skipped (output := input), minus base_loss."""
    head_activation: torch.Tensor | None
    """(L, H) float32: mean L2 norm over head_dim of each query head's attention output."""
    head_gradient: torch.Tensor | None
    """(L, H) float32: sum over batches of |dL/dm_h|, m_h = 1 scaling head h's output before o_proj."""
    neuron_activation: torch.Tensor | None
    """(L, I) float32: mean |act(gate(x)) * up(x)| per MLP neuron."""
    channel_activation: torch.Tensor | None
    """(hidden,) float32: sum over the residual-stream norms of the mean |norm output| per channel."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tensors become nested lists, floats rounded to 6 significant digits."""
        return {f.name: _json_ready(getattr(self, f.name)) for f in fields(self)}

    def layer_scores(self, metric: Literal["skip_loss", "block_influence"]) -> list[float]:
        """One score per decoder layer, higher = more important (removing it costs more)."""
        if metric == "skip_loss":
            if self.skip_loss_increase is None:
                raise ImportanceError(
                    "layer metric 'skip_loss' was not measured: call measure_importance(..., layers=True, "
                    "skip_loss=True), or rank by 'block_influence'"
                )
            return list(self.skip_loss_increase)
        if metric == "block_influence":
            if not self.block_influence:
                raise ImportanceError(
                    "layer metric 'block_influence' was not measured: call measure_importance(..., layers=True)"
                )
            return list(self.block_influence)
        raise ImportanceError(f"unknown layer metric {metric!r}; expected 'skip_loss' or 'block_influence'")


def _json_ready(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def calibration_batches(
    dataset, *, num_sequences: int, batch_size: int, pad_token_id: int
) -> list[dict[str, torch.Tensor]]:
    """The first `num_sequences` rows of `dataset` (all of them if it has fewer), right-padded into batches.

    Deterministic: rows are taken in order, so two runs measure on the same tokens.

    Args:
        dataset: rows with `input_ids` and `labels` lists (labels -100 where a token does not count,
            unshifted), e.g. `PreparedData.validation`.
        pad_token_id: the tokenizer's pad id (padding is masked by attention_mask and labels).

    Returns:
        [{"input_ids", "attention_mask", "labels"}: (B, T) long] from `DistillationCollator`.
    """
    if num_sequences < 1 or batch_size < 1:
        raise ImportanceError(f"num_sequences and batch_size must be >= 1, got {num_sequences} and {batch_size}")
    if len(dataset) == 0:
        raise ImportanceError(
            "the calibration dataset is empty: prepare data with a validation split, or pass the train split"
        )
    columns = getattr(dataset, "column_names", None)
    if columns is not None and not {"input_ids", "labels"} <= set(columns):
        raise ImportanceError(f"calibration rows need `input_ids` and `labels` columns, got {columns}")
    collate = DistillationCollator(pad_token_id)
    n = min(num_sequences, len(dataset))
    return [
        collate([dataset[i] for i in range(start, min(start + batch_size, n))]) for start in range(0, n, batch_size)
    ]


def measure_importance(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    layers: bool = True,
    skip_loss: bool = True,
    width: bool = True,
    head_gradient: bool = False,
    progress: bool = True,
) -> Importance:
    """Measure the importance of `model`'s layers, heads, MLP neurons and hidden channels.

    Passes over `batches`: one no-grad pass for base_loss, block influence and the width activations;
    one no-grad pass per layer for skip_loss; one gradient pass for head_gradient.

    Args:
        model: a causal LM: any model whose decoder layers `decoder_layers` finds for depth statistics;
            width statistics need attention and FFN output projections (`architecture.ATTENTION_OUTPUT`,
            `MLP_OUTPUT`), as Llama, Qwen, Mistral, Gemma, OLMo, Phi and most decoders have.
        batches: from `calibration_batches` ((B, T) input_ids, attention_mask, labels).
        layers: measure block influence (and skip loss if `skip_loss`).
        skip_loss: measure skip_loss_increase (L extra passes); only with `layers`.
        width: measure head, neuron and channel activations.
        head_gradient: measure head_gradient (one pass with backward).
        progress: show a progress bar over passes x batches.

    Raises:
        ImportanceError: no batches or no counted token; width or head_gradient asked of a model without
            the modules they read (named in the message).
    """
    if not batches:
        raise ImportanceError("no calibration batches: calibration_batches(...) of a non-empty dataset gives some")
    prefix, layer_list = decoder_layers(model)
    num_layers = len(layer_list)
    heads = _head_layout(model) if (width or head_gradient) else None
    mlp_norms = _mlp_and_norms(model) if width else None
    masks = [_counted_mask(b) for b in batches]  # (B, T) bool each
    num_tokens = sum(int(m.sum()) for m in masks)
    if num_tokens == 0:
        raise ImportanceError(
            f"none of the {len(batches)} calibration batches has a counted token (labels != -100 after the "
            "causal shift): calibration needs sequences of at least 2 tokens with unmasked labels"
        )
    device = next(model.parameters()).device
    data = [({k: v.to(device) for k, v in b.items()}, m.to(device)) for b, m in zip(batches, masks)]

    skip_layers = list(range(num_layers)) if (layers and skip_loss) else []
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with _progress_bar(progress) as bar:
            passes = 1 + len(skip_layers) + int(head_gradient)
            task = bar.add_task("importance: activations", total=len(data) * passes)

            def advance() -> None:
                bar.advance(task)

            base_sum, sums = _activation_pass(model, data, layer_list, heads, mlp_norms, layers=layers, advance=advance)
            base_loss = base_sum / num_tokens
            sums_skipped = _skip_loss_sums(
                model, data, layer_list, skip_layers, advance, lambda text: bar.update(task, description=text)
            )
            increases = [total / num_tokens - base_loss for total in sums_skipped]
            grads = None
            if head_gradient:
                bar.update(task, description="importance: head gradients")
                grads = _head_gradient_pass(model, data, heads, advance)
    finally:
        for module, training in modes.items():
            module.training = training

    def mean(key: str) -> torch.Tensor | None:
        return (sums[key] / num_tokens).cpu() if key in sums else None

    return Importance(
        num_sequences=sum(int(b["input_ids"].shape[0]) for b in batches),
        num_tokens=num_tokens,
        base_loss=base_loss,
        block_influence=mean("block").tolist() if layers else [],
        skip_loss_increase=increases if skip_layers else None,
        head_activation=mean("head"),
        head_gradient=grads.cpu() if grads is not None else None,
        neuron_activation=mean("neuron"),
        channel_activation=mean("channel"),
    )


# ---------------------------------------------------------------------------------------------- passes

_Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # (batch on the model's device, (B, T) counted mask)


def _counted_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) bool: position t counts when labels[t + 1] != -100 and tokens t and t + 1 are not padding."""
    labels = batch["labels"]
    real = batch.get("attention_mask", torch.ones_like(labels)).bool()
    counted, _ = counted_positions(labels)  # (B, T-1): the target of position t is counted
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = counted & real[:, :-1] & real[:, 1:]
    return mask


def _loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Σ next-token CE over the counted positions of one batch: float32 scalar, with its graph if grad is on."""
    hidden = final_hidden_states(model, model, batch["input_ids"], batch.get("attention_mask"))  # (B, T, D)
    return _head_loss_sum(model, hidden, batch, mask)


def _head_loss_sum(
    model: nn.Module, hidden: torch.Tensor, batch: dict[str, torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Σ next-token CE over the counted positions, from the final (normed) hidden states (B, T, D)."""
    # (B, T, D) -> (N, D): the output head only sees positions predicting a counted target
    logits = project(model, hidden[mask])  # (N, V)
    targets = batch["labels"][:, 1:][mask[:, :-1]]  # (N,), same row-major order as hidden[mask]
    return token_cross_entropy(logits, targets).sum()


def _hook(hooks: ExitStack, module: nn.Module, fn: Callable, *, pre: bool = False) -> None:
    """Register `fn` (with kwargs) on `module`; the pass's ExitStack removes it, even when the pass raises."""
    register = module.register_forward_pre_hook if pre else module.register_forward_hook
    hooks.callback(register(fn, with_kwargs=True).remove)


def _input(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _output(output: Any) -> torch.Tensor:
    # decoder layers return a tensor in transformers v5, a tuple (hidden, ...) before
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def _activation_pass(
    model: nn.Module,
    data: list[_Batch],
    layer_list: nn.ModuleList,
    heads: _Heads | None,
    mlp_norms: _MlpNorms | None,
    *,
    layers: bool,
    advance: Callable[[], None],
) -> tuple[float, dict[str, torch.Tensor]]:
    """One pass: Σ CE over counted targets, and float32 sums over counted positions of each statistic."""
    device = data[0][1].device
    num_layers = len(layer_list)
    sums: dict[str, torch.Tensor] = {}
    current: list[torch.Tensor] = []  # [the (B, T) mask of the batch being run]

    def counted(x: torch.Tensor) -> torch.Tensor:
        return x[current[0]].float()  # (B, T, *) -> (N, *)

    def on_block(i: int) -> Callable:
        def hook(_module, args, kwargs, output) -> None:
            x_in, x_out = counted(_input(args, kwargs, "hidden_states")), counted(_output(output))  # (N, D)
            sums["block"][i] += (1 - F.cosine_similarity(x_in, x_out, dim=-1)).sum()

        return hook

    def on_heads(i: int) -> Callable:
        def hook(_module, args, kwargs) -> None:
            a = counted(_input(args, kwargs, "input"))  # (N, H * head_dim)
            sums["head"][i] += a.unflatten(-1, (heads.num_heads, heads.head_dim)).norm(dim=-1).sum(0)  # (H,)

        return hook

    def on_neurons(i: int) -> Callable:
        def hook(_module, args, kwargs) -> None:
            sums["neuron"][i] += counted(_input(args, kwargs, "input")).abs().sum(0)  # (I,)

        return hook

    def on_norm(_module, _args, _kwargs, output) -> None:
        sums["channel"] += counted(_output(output)).abs().sum(0)  # (D,)

    with ExitStack() as hooks:
        if layers:
            sums["block"] = torch.zeros(num_layers, device=device)
            for i, layer in enumerate(layer_list):
                _hook(hooks, layer, on_block(i))
        if mlp_norms is not None:
            sums["head"] = torch.zeros(num_layers, heads.num_heads, device=device)
            sums["neuron"] = torch.zeros(num_layers, mlp_norms.intermediate_size, device=device)
            sums["channel"] = torch.zeros(mlp_norms.hidden_size, device=device)
            for i in range(num_layers):
                _hook(hooks, heads.o_proj[i], on_heads(i), pre=True)
                _hook(hooks, mlp_norms.down_proj[i], on_neurons(i), pre=True)
            for norm in mlp_norms.norms:
                _hook(hooks, norm, on_norm)
        total = 0.0  # a Python float (double): skip_loss_increase is a small difference of two such totals
        for batch, mask in data:
            current[:] = [mask]
            total += float(_loss_sum(model, batch, mask))
            advance()
    return total, sums


def _skip(_module, args, kwargs, output) -> Any:
    """Forward hook making a decoder layer the identity: its output := its input."""
    x_in = _input(args, kwargs, "hidden_states")
    return (x_in, *output[1:]) if isinstance(output, tuple) else x_in


def _skip_loss_sums(
    model: nn.Module,
    data: list[_Batch],
    layer_list: nn.ModuleList,
    skip_layers: list[int],
    advance: Callable[[], None],
    describe: Callable[[str], None],
) -> list[float]:
    """For each layer in `skip_layers`: Σ CE over counted targets with that layer replaced by the identity.

    By replay (`_replayed_skip_losses`) where it applies, else one full forward per skipped layer.
    """
    if not skip_layers:
        return []
    replayed = _replayed_skip_losses(model, data, layer_list, skip_layers, advance, describe)
    if replayed is not None:
        return replayed
    totals = []
    for i in skip_layers:
        describe(f"importance: skip layer {i + 1}/{len(layer_list)}")
        totals.append(_skipped_loss_sum(model, data, layer_list[i], advance))
    return totals


@torch.no_grad()
def _replayed_skip_losses(
    model: nn.Module,
    data: list[_Batch],
    layer_list: nn.ModuleList,
    skip_layers: list[int],
    advance: Callable[[], None],
    describe: Callable[[str], None],
) -> list[float] | None:
    """Skip losses from one recorded forward per batch, or None where replay does not apply.

    With layer i the identity, layer i + 1 receives layer i's input, and every layer's other arguments (position
    embeddings, per-layer masks: sliding or full) do not depend on the hidden states. So one forward records each
    layer's input and call arguments, and skipping layer i runs only layers i + 1 .. L - 1 from layer i's recorded
    input, then the final norm and the head: L(L - 1)/2 layer calls per batch instead of L². The calls are the same
    as a full pass's, with the same inputs, so the losses are too. Per batch the totals add in the same order as
    the full passes' (batch by batch), so each layer's sum is the same float.

    The rule: replay applies when `_replay_fits` (memory), and when the recorded forward shows the decoder calls each
    layer once, hands each layer's output unchanged to the next, and returns the final norm of the last layer's
    output (`_record_layer_calls`, checked on every batch). Otherwise None: the caller runs the full passes.
    """
    if not _replay_fits(model, data, len(layer_list)):
        return None
    try:
        norm = final_norm(model)
    except PruningError:
        return None
    totals = [0.0] * len(skip_layers)
    for b, (batch, mask) in enumerate(data):
        calls = _record_layer_calls(model, batch, layer_list, norm)
        if calls is None:
            return None
        describe(f"importance: skip loss, batch {b + 1}/{len(data)}")
        for k, i in enumerate(skip_layers):
            hidden = _input(*calls[i], "hidden_states")  # (B, T, D): what layer i + 1 sees when layer i is skipped
            for j in range(i + 1, len(layer_list)):
                args, kwargs = calls[j]
                args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
                hidden = _output(layer_list[j](*args, **kwargs))
            totals[k] += float(_head_loss_sum(model, norm(hidden), batch, mask))
            advance()
    return totals


def _replay_fits(model: nn.Module, data: list[_Batch], num_layers: int) -> bool:
    """Replay keeps one batch's L layer inputs (L, B, T, D): allowed where they take no more memory than the (N, V)
    float32 logits the loss already builds for that batch, so the pass's peak memory at most doubles."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2:
        return False
    vocab, width = weight.shape
    itemsize = max(weight.element_size(), 4)  # the residual stream stays float32 under autocast
    return all(
        num_layers * batch["input_ids"].numel() * width * itemsize <= int(mask.sum()) * vocab * 4
        for batch, mask in data
    )


def _same(a: Any, b: Any) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and (a is b or (a.shape == b.shape and torch.equal(a, b)))
    )


def _record_layer_calls(
    model: nn.Module, batch: dict[str, torch.Tensor], layer_list: nn.ModuleList, norm: nn.Module
) -> list[tuple[tuple, dict]] | None:
    """Each decoder layer's (args, kwargs) in one forward of `batch`, or None when the forward is not a plain chain
    layer 0 -> ... -> layer L-1 -> final norm -> output (see `_replayed_skip_losses`)."""
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layer_list]
    outputs: list[list[torch.Tensor]] = [[] for _ in layer_list]
    normed: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(i: int) -> Callable:
        def hook(_module, args, kwargs) -> None:
            calls[i].append((args, kwargs))

        return hook

    def keep(i: int) -> Callable:
        def hook(_module, _args, _kwargs, output) -> None:
            outputs[i].append(_output(output))

        return hook

    def on_norm(_module, args, kwargs, output) -> None:
        normed.append((args[0] if args else next(iter(kwargs.values()), None), _output(output)))

    with ExitStack() as hooks:
        for i, layer in enumerate(layer_list):
            _hook(hooks, layer, record(i), pre=True)
            _hook(hooks, layer, keep(i))
        _hook(hooks, norm, on_norm)
        final = final_hidden_states(model, model, batch["input_ids"], batch.get("attention_mask"))
    if any(len(c) != 1 for c in calls) or any(len(o) != 1 for o in outputs) or len(normed) != 1:
        return None
    chained = all(_same(outputs[i][0], _input(*calls[i + 1][0], "hidden_states")) for i in range(len(layer_list) - 1))
    norm_in, norm_out = normed[0]
    if not (chained and _same(outputs[-1][0], norm_in) and _same(norm_out, final)):
        return None
    return [c[0] for c in calls]


@torch.no_grad()
def _skipped_loss_sum(model: nn.Module, data: list[_Batch], layer: nn.Module, advance: Callable[[], None]) -> float:
    """Σ CE over counted targets with `layer` replaced by the identity: one full forward per batch."""
    total = 0.0
    with ExitStack() as hooks:
        _hook(hooks, layer, _skip)
        for batch, mask in data:
            total += float(_loss_sum(model, batch, mask))
            advance()
    return total


def _head_gradient_pass(
    model: nn.Module, data: list[_Batch], heads: _Heads, advance: Callable[[], None]
) -> torch.Tensor:
    """(L, H) Σ_batches |∂L_batch/∂m| at m = 1, m scaling each head's output before o_proj."""
    device = data[0][1].device
    gates = torch.ones(len(heads.o_proj), heads.num_heads, device=device, requires_grad=True)  # (L, H)
    total = torch.zeros_like(gates, requires_grad=False)

    def gate(i: int) -> Callable:
        def hook(_module, args, kwargs):
            a = _input(args, kwargs, "input")  # (B, T, H * head_dim)
            gated = (a.unflatten(-1, (heads.num_heads, heads.head_dim)) * gates[i, :, None].to(a.dtype)).flatten(-2)
            return ((gated, *args[1:]), kwargs) if args else (args, {**kwargs, "input": gated})

        return hook

    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    try:
        # only the gates need a gradient: no parameter .grad is built or touched
        for p in params:
            p.requires_grad_(False)
        with ExitStack() as hooks, torch.inference_mode(False), torch.enable_grad():
            for i, o_proj in enumerate(heads.o_proj):
                _hook(hooks, o_proj, gate(i), pre=True)
            for batch, mask in data:
                n = int(mask.sum())
                if n:  # a batch without counted targets has loss 0 and gradient 0
                    (grad,) = torch.autograd.grad(_loss_sum(model, batch, mask) / n, gates)
                    total += grad.abs()
                advance()
    finally:
        for p, flag in zip(params, requires):
            p.requires_grad_(flag)
    return total


# --------------------------------------------------------------------------------- finding the modules


@dataclass
class _Heads:
    o_proj: list[nn.Module]
    num_heads: int
    head_dim: int


@dataclass
class _MlpNorms:
    down_proj: list[nn.Module]
    norms: list[nn.Module]  # each layer's norms over the hidden channels, then the final norm
    intermediate_size: int
    hidden_size: int


def _head_layout(model: nn.Module) -> _Heads:
    dims = model_dims(model)
    num_heads, head_dim = dims.num_heads, dims.head_dim
    path, o_proj = _role(model, ATTENTION_OUTPUT, "attention output projection")
    widths = {m.in_features for m in o_proj}
    if widths != {num_heads * head_dim}:
        raise ImportanceError(
            f"{family(model)}: {path} input widths {sorted(widths)} != num_attention_heads {num_heads} x head_dim "
            f"{head_dim}: cannot split the attention output into heads"
        )
    return _Heads(o_proj, num_heads, head_dim)


def _mlp_and_norms(model: nn.Module) -> _MlpNorms:
    path, down_proj = _role(model, MLP_OUTPUT, "FFN output projection")
    sizes = {m.in_features for m in down_proj}
    if len(sizes) != 1:
        raise ImportanceError(
            f"{family(model)}: {path} input widths {sorted(sizes)} differ between layers: neuron_activation "
            "needs one intermediate size"
        )
    # every norm over the hidden channels, pre- or post-norm, as the family's block has them; then the final one
    norms = [n for layer_norms in residual_norms(model) for n in layer_norms] + [final_norm(model)]
    return _MlpNorms(down_proj, norms, sizes.pop(), model.config.hidden_size)


def _role(model: nn.Module, paths: tuple[str, ...], role: str) -> tuple[str, list[nn.Linear]]:
    found = role_modules(model, paths)
    if found is None:
        prefix, layers = decoder_layers(model)
        raise ImportanceError(
            f"{family(model)} has no {role} ({' or '.join(paths)}, an nn.Linear) in every layer of {prefix} "
            f"({type(layers[0]).__name__}): " + _WIDTH_HINT.format(attention=ATTENTION_OUTPUT[0], mlp=MLP_OUTPUT[0])
        )
    return found


def _progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )
