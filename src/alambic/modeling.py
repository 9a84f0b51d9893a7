"""Run a causal LM up to its final hidden states, and project only the tokens that count.

The full (B, T, V) logits tensor is never built: the model is called through its own (possibly
wrapped: DDP, DeepSpeed, FSDP) forward with `logits_to_keep=1`, the decoder's output is captured by a
hook, and the output head is applied to the counted positions alone.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
from torch import nn
from transformers import PreTrainedModel


@cache
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def final_hidden_states(
    model: nn.Module,
    core: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T, H) hidden states the output head would see, keeping the autograd graph.

    Args:
        model: what to call (the core model or its distributed wrapper).
        core: the unwrapped model, to find the decoder and check the forward's signature.
        position_ids: given for padding-free batches (several sequences in one row, no attention_mask).
    """
    captured: list[torch.Tensor] = []

    def grab(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = core.get_decoder().register_forward_hook(grab)
    try:
        kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(type(core)) else {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    finally:
        handle.remove()
    return captured[-1]


def project(core: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of `hidden` (..., H) -> (..., V), with the model's logit scale and soft-capping if it has them."""
    logits = core.get_output_embeddings()(hidden)
    scale = getattr(core.config, "logit_scale", None)  # Cohere
    if scale is not None:
        logits = logits * scale
    cap = getattr(core.config, "final_logit_softcapping", None)  # Gemma 2
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def counted_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal shift: position t predicts labels[t + 1]. Returns (mask over (B, T-1), targets (N,))."""
    shifted = labels[:, 1:]
    mask = shifted != -100
    return mask, shifted[mask]


def compile_layers(model: nn.Module, compiled: bool = True) -> int:
    """`torch.compile` each decoder layer of `model` in place (`nn.Module.compile`), or, with `compiled` False, give
    each its eager forward back. Layer by layer rather than the whole model: the hooks alambic puts on the decoder
    (`final_hidden_states`) stay outside the compiled regions, the parameter names do not change (checkpoints and
    exports are the same), and the layers share one compiled graph. Returns the number of layers."""
    from alambic.architecture import decoder_layers

    _, layers = decoder_layers(model)
    for layer in layers:
        if compiled:
            layer.compile()
        else:
            layer._compiled_call_impl = None
    model._alambic_compiled_layers = compiled  # read by `training.run.restore_forward`
    return len(layers)
