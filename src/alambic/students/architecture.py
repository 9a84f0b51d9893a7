"""Where things are in a decoder-only causal LM: its decoder blocks, sizes, per-layer modules, final norm.

Shared by importance measurement and slicing, so both read a model the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
        return {"channel": self.hidden_size, "query_head": self.num_heads * self.head_dim,
                "kv_head": self.num_kv_heads * self.head_dim, "neuron": self.intermediate_size}


def model_dims(model: PreTrainedModel) -> ModelDims:
    """The sizes of `model` the pruning rules need (head_dim from the config, else hidden // heads)."""
    c = model.config
    heads = c.num_attention_heads
    return ModelDims(
        num_layers=c.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        hidden_size=c.hidden_size, intermediate_size=getattr(c, "intermediate_size", None),
    )


def decoder_layers(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks and its dotted name (`model.layers`, `transformer.h`, ...)."""
    n = model.config.num_hidden_layers
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(candidates) != 1:
        raise PruningError(
            f"cannot find the decoder layers of {type(model).__name__}: expected one nn.ModuleList of "
            f"{n} blocks, found {[c[0] for c in candidates] or 'none'}"
        )
    return candidates[0]




def layer_submodules(model: PreTrainedModel, path: str, hint: str,
                     error: type[PruningError] = PruningError) -> list[nn.Module]:
    """`path` (e.g. `self_attn.o_proj`) of every decoder layer; `error` naming the layer and `hint` if absent."""
    prefix, layers = decoder_layers(model)
    found = []
    for i, layer in enumerate(layers):
        try:
            found.append(layer.get_submodule(path))
        except AttributeError:
            raise error(f"{prefix}.{i} ({type(layer).__name__}) has no `{path}` module: {hint}") from None
    return found


def final_norm(model: PreTrainedModel) -> nn.Module:
    """The norm the decoder applies after its last layer (`model.model.norm` for Llama)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    for name in FINAL_NORM_NAMES:
        norm = getattr(decoder, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise PruningError(f"cannot find the final norm of {type(decoder).__name__}: looked for {list(FINAL_NORM_NAMES)}")
