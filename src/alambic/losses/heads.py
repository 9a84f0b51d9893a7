"""Output heads as plain tensors, for the losses that project hidden states themselves, chunk by chunk.

`OutputHead` is what turns final hidden states (..., H) into logits (..., V): the output embedding, its
bias, and the logit scale and soft-cap some families apply. `head_logits` applies it to a block of rows;
`shared_vocab_size` decides how many logits a student and its teachers compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OutputHead", "head_logits", "module_logits", "shared_vocab_size"]


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensor fields with == is not a bool
class OutputHead:
    """What turns final hidden states (..., H) into logits (..., V):

        logits = softcap · tanh(logit_scale · (hidden @ weightᵀ + bias) / softcap)

    with the scale and the cap each skipped when None, as `alambic.modeling.project` does.

    Attributes:
        weight: (V, H) the output embedding (may be the tied input embedding).
        bias: (V,) or None.
        logit_scale: multiplies the logits (Cohere's `config.logit_scale`), or None.
        softcap: final-logit soft-capping (Gemma 2's `config.final_logit_softcapping`), or None.
    """

    weight: Tensor
    bias: Tensor | None = None
    logit_scale: float | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        if self.weight.dim() != 2:
            raise ValueError(f"output head weight must be (V, H), got shape {tuple(self.weight.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (self.weight.shape[0],):
            raise ValueError(
                f"output head bias {tuple(self.bias.shape)} must be (V,) = ({self.weight.shape[0]},) "
                f"for a weight of shape {tuple(self.weight.shape)}"
            )
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be > 0 (or None for no capping), got {self.softcap}")

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @classmethod
    def of(cls, model: nn.Module) -> OutputHead:
        """The output head of a Hugging Face causal LM (unwrapped: not DDP/FSDP), with its config's
        `logit_scale` and `final_logit_softcapping` when it has them.

        Raises:
            ValueError: the model has no output embeddings with a `weight` (a base model without LM head).
        """
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or getattr(head, "weight", None) is None:
            raise ValueError(
                f"{type(model).__name__} has no output head with a weight (get_output_embeddings() -> "
                f"{type(head).__name__}): load the model with its LM head (AutoModelForCausalLM)"
            )
        config = getattr(model, "config", None)
        scale = getattr(config, "logit_scale", None)
        cap = getattr(config, "final_logit_softcapping", None)
        return cls(
            weight=head.weight,
            bias=getattr(head, "bias", None),
            logit_scale=None if scale is None else float(scale),
            softcap=None if cap is None else float(cap),
        )


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, head: OutputHead) -> Tensor:
    """(c, H) -> (c, V') logits in float32 at least, differentiable in all three tensors."""
    # The head's dtype decides the matmul (a bf16 hidden state meeting an fp32 head is cast up, as
    # autocast would); the logits are upcast before scale, cap and softmax.
    logits = F.linear(hidden.to(weight.dtype), weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if head.logit_scale is not None:
        logits = logits * head.logit_scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


def module_logits(hidden: Tensor, head: OutputHead) -> Tensor:
    """(..., H) -> (..., V) logits as the model computes them itself (`alambic.modeling.project`): the linear layer
    in the head's dtype, then the logit scale and the soft-cap, without `head_logits`' float32 upcast. The `full`
    loss reads its logits this way where the head must be read as tensors (sharded, `alambic.sharding`)."""
    logits = F.linear(hidden, head.weight, head.bias)
    if head.logit_scale is not None:
        logits = logits * head.logit_scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def shared_vocab_size(student_head: OutputHead, teacher_heads: Sequence[OutputHead], vocab_size: int | None) -> int:
    """How many leading logits the student and teacher heads compare: `vocab_size`, or the heads' common V.

    Raises:
        ValueError: heads of different V without a `vocab_size`, or a `vocab_size` outside [1, smallest V].
    """
    v_s = student_head.vocab_size
    several = len(teacher_heads) > 1
    if vocab_size is None:
        for i, head in enumerate(teacher_heads):
            if head.vocab_size != v_s:
                raise ValueError(
                    f"student head vocab {v_s} != teacher{f' {i}' * several} head vocab {head.vocab_size} (weights "
                    f"{_shape(student_head.weight)} and {_shape(head.weight)}): if the tokenizers agree on the first "
                    f"ids, pass vocab_size=<shared size> to compare only those logits"
                )
        return v_s
    smallest = min([v_s, *(head.vocab_size for head in teacher_heads)])
    if not 1 <= vocab_size <= smallest:
        teacher_vocabs = ", ".join(str(head.vocab_size) for head in teacher_heads) or "none"
        raise ValueError(
            f"vocab_size must be in [1, {smallest}] (student head vocab {v_s}, teacher head vocab"
            f"{'s' * several} {teacher_vocabs}), got {vocab_size}"
        )
    return vocab_size
