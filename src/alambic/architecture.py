"""Where things are in a decoder-only causal LM: its decoder blocks, sizes, per-layer modules, final norm.

Shared by importance measurement and slicing (students), feature capture (training.features) and layer compilation
(modeling), so all read a model the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel

Unit = Literal["channel", "query_head", "kv_head", "neuron"]
# Names decoders give the norm applied after the last layer (Llama/Qwen2/Mistral: `norm`).
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_norm", "ln_f")


class PruningError(ValueError):
    """A pruning request that cannot be applied to this model."""


@dataclass(frozen=True)
class ModelDims:
    """The teacher sizes the rules need; `intermediate_size` is None for configs without one (gpt2)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int | None

    @property
    def n_rep(self) -> int:
        """Query heads per KV group."""
        return self.num_heads // self.num_kv_heads

    def full_sizes(self) -> dict[Unit, int | None]:
        """Entries along a tensor dimension of each unit when nothing is pruned."""
        return {
            "channel": self.hidden_size,
            "query_head": self.num_heads * self.head_dim,
            "kv_head": self.num_kv_heads * self.head_dim,
            "neuron": self.intermediate_size,
        }


def model_dims(model: PreTrainedModel) -> ModelDims:
    """The sizes of `model` the pruning rules need (head_dim from the config, else hidden // heads)."""
    c = model.config
    heads = c.num_attention_heads
    return ModelDims(
        num_layers=c.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        hidden_size=c.hidden_size,
        intermediate_size=getattr(c, "intermediate_size", None),
    )


def decoder_layers(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks and its dotted name (`model.layers`, `transformer.h`, ...)."""
    n = model.config.num_hidden_layers
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(candidates) != 1:
        raise PruningError(
            f"cannot find the decoder layers of {family(model)}: expected one nn.ModuleList of "
            f"{n} blocks, found {[c[0] for c in candidates] or 'none'}"
        )
    return candidates[0]


def family(model: PreTrainedModel) -> str:
    """How messages name a model: its class and the `model_type` its config.json carries."""
    return f"{type(model).__name__} (model_type '{getattr(model.config, 'model_type', '?')}')"


# Where each role lives in a decoder block, as the families name it (Llama/Qwen/Mistral/Gemma/OLMo/Granite/
# Cohere/Phi-3: o_proj and down_proj; Phi: dense and fc2; StarCoder2: c_proj).
ATTENTION_OUTPUT = ("self_attn.o_proj", "self_attn.dense")
"""The attention output projection: its input is the heads' outputs side by side, (..., H * head_dim)."""
MLP_OUTPUT = ("mlp.down_proj", "mlp.fc2", "mlp.c_proj")
"""The FFN's output projection: its input is one entry per FFN neuron, (..., intermediate_size)."""


def role_modules(model: PreTrainedModel, paths: tuple[str, ...]) -> tuple[str, list[nn.Module]] | None:
    """The first of `paths` that every decoder layer has, and that module of each layer; None if none fits.

    Only nn.Linear counts: gpt2's Conv1D stores its weight transposed, so its input is not what the name says.
    """
    _, layers = decoder_layers(model)
    for path in paths:
        found = [_linear(layer, path) for layer in layers]
        if all(m is not None for m in found):
            return path, found
    return None


def _linear(layer: nn.Module, path: str) -> nn.Linear | None:
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


def is_residual_norm(name: str, module: nn.Module, hidden_size: int) -> bool:
    """A norm over the hidden channels: a block's pre-norm of a sublayer's input or post-norm of its output.

    Recognised by name (`*norm`, gpt2's `ln_1`) and by size: weights, when it has any (OLMo's norms have
    none), of `hidden_size` entries. Per-head norms live inside the attention module, never on the block.
    """
    leaf = name.rpartition(".")[2]
    if not (leaf.lower().endswith("norm") or leaf.startswith("ln_")):
        return False
    weight = getattr(module, "weight", None)
    return not isinstance(weight, torch.Tensor) or tuple(weight.shape) == (hidden_size,)


def residual_norms(model: PreTrainedModel) -> list[list[nn.Module]]:
    """Per decoder layer, the norms it applies over the hidden channels, in the block's own order.

    Pre-norm blocks (Llama: input_layernorm, post_attention_layernorm), post-norm blocks (OLMo 2:
    post_attention_layernorm, post_feedforward_layernorm), both (Gemma 2/3: four), one shared norm for
    parallel attention and MLP (Cohere, Phi): whatever the family's block holds as its direct children.
    """
    _, layers = decoder_layers(model)
    hidden = model.config.hidden_size
    return [[m for name, m in layer.named_children() if is_residual_norm(name, m, hidden)] for layer in layers]


def final_norm(model: PreTrainedModel) -> nn.Module:
    """The norm the decoder applies after its last layer (`model.model.norm` for Llama)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    for name in FINAL_NORM_NAMES:
        norm = getattr(decoder, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise PruningError(f"cannot find the final norm of {type(decoder).__name__}: looked for {list(FINAL_NORM_NAMES)}")
