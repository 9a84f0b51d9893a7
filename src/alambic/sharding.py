"""Output heads read whole where an engine shards them (FSDP2, DeepSpeed ZeRO-3), and a frozen teacher sharded.

The fused chunked loss (`losses.chunked`), the `full` loss and the offline cache's loss read the output heads'
weights as tensors, outside the models' forward, where FSDP2 and ZeRO-3 keep them sharded: a DTensor shard of the
(V, H) matrix, or an empty ZeRO-3 partition. `through_heads` is the one place every teacher source and the student
read their heads through. It has each engine gather the weights for the loss, and leaves the head's gradient where
that engine reduces it across the processes, as for a gradient made inside the model's forward:

- ZeRO-3: the loss runs as the forward of the head modules (Liger's fused losses run inside the model's forward for
  the same reason), so ZeRO-3's own module hooks gather the weights, gather them again when autograd accumulates the
  head's gradient, and reduce-scatter it.
- FSDP2: the head's unit is gathered with `FSDPModule.unshard()` where it was resharded after forward (in the root
  unit, or accelerate's unit of the final norm and head, it is still whole), and its post-backward reduce-scatters
  the gradient the loss gave the unsharded parameter.

Checked against one process with the same global batch (tests/distributed/test_fsdp.py, test_deepspeed.py): the
losses of three steps and the final weights agree, the head's gradient included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import fields
from typing import Any, Literal

import torch
from torch import Tensor, nn

from alambic.losses.divergences import LossParts
from alambic.losses.heads import OutputHead

__all__ = ["frozen_forward", "head_rows", "is_sharded", "shard_frozen", "should_shard_teacher", "through_heads"]


def _core(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP / DeepSpeed engine -> the model (FSDP2 shards in place)


def _head_module(core: nn.Module) -> nn.Module:
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"{type(core).__name__} has no output head with a weight (get_output_embeddings() -> "
            f"{type(head).__name__}): load the model with its LM head (AutoModelForCausalLM)"
        )
    return head


def _zero3_partitioned(p: Tensor) -> bool:
    return hasattr(p, "ds_id")  # DeepSpeed ZeRO-3 marks each parameter it partitions


def _fsdp_sharded(p: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)  # FSDP2's sharded parameters; unsharded ones are plain tensors


def head_rows(model: nn.Module) -> int:
    """Rows of the model's output head (a padded vocabulary counts its padding), also where ZeRO-3 has partitioned
    the weight to an empty tensor (its `ds_shape` keeps the full shape)."""
    weight = _head_module(_core(model)).weight
    return int(weight.ds_shape[0]) if _zero3_partitioned(weight) else weight.shape[0]


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 or ZeRO-3 shards the model's parameters."""
    return any(_fsdp_sharded(p) or _zero3_partitioned(p) for p in _core(model).parameters())


def frozen_forward(model: nn.Module) -> AbstractContextManager:
    """The mode a teacher's forward runs in: `torch.inference_mode`, or `torch.no_grad` where FSDP2 shards it (the
    buffers it gathers weights into are kept across calls: made under inference mode, a later all-gather outside it
    may not write them)."""
    sharded = any(_fsdp_sharded(p) for p in _core(model).parameters())
    return torch.no_grad() if sharded else torch.inference_mode()


Head = nn.Module | OutputHead  # a model whose output head is read, or a head already at hand (a copy)


def through_heads(models: Sequence[Head], loss: Callable[..., LossParts], *tensors: Tensor) -> LossParts:
    """`loss(heads, *tensors)` with the `OutputHead` of each of `models` (in order; an `OutputHead` given is used as
    it is) holding its full weights, and the heads' gradients reduced across the processes as the engine reduces
    the rest of the model's.

    - ZeRO-3: the loss runs as the forward of the partitioned head modules (their `forward` replaced for the call
      alone): ZeRO-3's hooks on a module gather its weights before its forward, gather them again before its
      backward (autograd accumulates the head's gradient into the whole parameter) and reduce-scatter the gradient.
    - FSDP2: a head still whole after the model's forward (in the root unit, or in accelerate's unit of the final norm
      and head, neither resharded after forward) is read as it is; a sharded one is gathered by its unit's
      `unshard()`. Its gradient lands on the unsharded parameter, which the unit's post-backward reduce-scatters
      (that hook runs after the head's gradient is accumulated: it waits for the final norm's backward, which needs
      the gradient of the hidden states the loss gives at the same time). A frozen head is resharded after the loss;
      a trained one when FSDP reshards its unit after the backward. (Calling a head of a grouped unit as its forward
      instead crashes torch 2.13's partial-group backward on CPU: not done.)
    - Otherwise: one plain call.

    `tensors` go through the ZeRO-3 calls (its hooks attach to those that need a gradient, so `loss` must use the
    tensors it is given); the `LossParts` cross those calls as a tuple of tensors (what the output hooks walk).
    """
    modules = [None if isinstance(m, OutputHead) else _head_module(_core(m)) for m in models]
    zero3 = [m is not None and any(_zero3_partitioned(p) for p in m.parameters()) for m in modules]
    held: list[tuple[nn.Module, bool]] = []  # FSDP2 units this call unsharded, and whether to reshard them after
    for model, module in zip(models, modules):
        if module is not None and any(_fsdp_sharded(p) for p in module.parameters()):
            unit = _fsdp_unit(_core(model), module)
            unit.unshard()  # registers the unsharded parameters on the modules: `OutputHead.of` reads them
            trained = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
            held.append((unit, not trained))

    def run(i: int, *args: Tensor) -> tuple[Tensor | None, ...]:
        if i < len(models):
            if zero3[i]:
                return _call_as_forward(modules[i], lambda *a: run(i + 1, *a), *args)
            return run(i + 1, *args)
        parts = loss([m if isinstance(m, OutputHead) else OutputHead.of(_core(m)) for m in models], *args)
        return tuple(getattr(parts, f.name) for f in fields(parts))

    try:
        return LossParts(*run(0, *tensors))
    finally:
        for unit, frozen in held:
            if frozen:  # nothing comes back through it: free the gathered weights now
                unit.reshard()


def _fsdp_unit(core: nn.Module, head: nn.Module) -> nn.Module:
    """The FSDP2 unit that owns the head's parameters: the innermost `fully_shard`ed module holding the head, itself
    included (`fully_shard` gives a module's parameters to it unless an inner unit took them)."""
    from torch.distributed.fsdp import FSDPModule

    name = next(n for n, m in core.named_modules() if m is head)
    units = [
        (n, m)
        for n, m in core.named_modules()
        if isinstance(m, FSDPModule) and (n in ("", name) or name.startswith(n + "."))
    ]
    if not units:
        raise ValueError(
            f"{type(core).__name__}'s output head {name!r} is sharded (DTensor) but no module holding it "
            "is an FSDP2 unit: shard the model with torch.distributed.fsdp.fully_shard, its root included"
        )
    return max(units, key=lambda unit: len(unit[0]))[1]


def _call_as_forward(module: nn.Module, forward: Callable[..., Any], *args: Tensor) -> Any:
    """`forward(*args)` run as `module`'s forward: through `module.__call__`, so its hooks run around it."""
    own = module.__dict__.get("forward")  # an instance-level forward someone set (kept)
    module.forward = forward
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def should_shard_teacher(setting: bool | Literal["auto"], student_sharded: bool) -> bool:
    """`training.shard_teacher`: true / false as set; auto: shard the teacher when the student is sharded."""
    return student_sharded if setting == "auto" else bool(setting)


def shard_frozen(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A frozen model (a teacher) sharded with FSDP2 across the processes, in place: each decoder layer is a unit, the
    output head (with the input embeddings it is tied to) another, the root holds the rest; every unit is resharded
    after its forward, so a rank holds 1/N of the weights plus one unit's at a time. (There is no backward to
    prefetch for: the root's default would keep its weights whole for good.) The losses read the head through
    `through_heads`, which unshards its unit and reshards it after.

    Returns the model (FSDP2 changes its class in place, the object stays the same)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from alambic.architecture import decoder_layers

    if isinstance(model, FSDPModule):
        return model
    model.to(device)
    _, layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    head = _head_module(model)
    embed = model.get_input_embeddings()
    # a parameter shared by two units is refused: tied embeddings go with the head
    fully_shard(
        [head, *([embed] if embed is not None and embed.weight is head.weight else [])], reshard_after_forward=True
    )
    fully_shard(model, reshard_after_forward=True)
    return model
