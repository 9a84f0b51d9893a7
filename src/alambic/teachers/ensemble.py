"""The teachers of one training beyond the primary: hold them, run them, hand the loss what it needs.

The primary teacher (`config.teacher`) is run by the trainer itself, as before, because the feature
losses capture its layers during that forward. The additional teachers (`config.additional_teachers`)
live here. Each step they run one after another, each under `torch.inference_mode`, and only their final
hidden states at the counted positions, (N, H_i), are kept (moved to the student's device) before the
next one runs: peak memory is one teacher's activations, not K of them. The loss then projects each
teacher's rows with that teacher's own output head, chunk by chunk (`losses.chunked`), and mixes them or
sums their divergences (`losses.mixture`).

A teacher may sit on its own device (config `device`): its forward runs there, and its output head is
copied once to the student's device, so the chunked loss never moves a (chunk, V) logits block between
devices; only the (N, H_i) states travel, once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from alambic.losses.chunked import OutputHead
from alambic.losses.mixture import normalize_weights
from alambic.modeling import final_hidden_states, project
from alambic.sharding import frozen_forward, head_rows

__all__ = ["PRIMARY_NAME", "TeacherEnsemble", "WeightedTeacher"]

# The primary teacher's name in logs (`loss_soft_teacher`) and messages.
PRIMARY_NAME = "teacher"


@dataclass(eq=False)
class WeightedTeacher:
    """An additional teacher as `train` receives it.

    Attributes:
        name: short name for logs and messages (`loss_soft_<name>`), e.g. 'additional_0'.
        model: the loaded causal LM (it is frozen and put in eval mode here).
        weight: its weight before normalisation, > 0.
        follow_student: True (config device 'auto'): placed like the primary teacher, on the training device
            of each process (DeepSpeed ZeRO-3 shards it too). False: it stays on the device it was loaded on.
    """

    name: str
    model: PreTrainedModel
    weight: float = 1.0
    follow_student: bool = True

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").isalnum():
            raise ValueError(f"teacher name {self.name!r} must be letters, digits and '_' (it names a logged metric)")
        if self.name == PRIMARY_NAME:
            raise ValueError(f"teacher name {PRIMARY_NAME!r} is the primary teacher's: choose another")


@dataclass(eq=False)
class _Member:
    name: str
    model: nn.Module  # what to call: the core, or its DeepSpeed / accelerate wrapper
    core: PreTrainedModel
    device: torch.device
    head: OutputHead | None  # a copy on the loss device, when the teacher lives elsewhere; None: read it live


def _core_of(model: nn.Module) -> PreTrainedModel:
    return getattr(model, "module", model)


def vocab_size_of(model: nn.Module) -> int:
    """Rows of the output head (a padded vocabulary counts its padding), sharded or not."""
    return head_rows(_core_of(model))


class TeacherEnsemble:
    """The additional teachers of one training, and the weights of all of them (primary first).

    Args:
        additional: the teachers beside the primary, in config order.
        primary_weight: the primary teacher's weight before normalisation.
        device: where the student and the loss live (the states and heads handed to the loss are there).
        prepare: places and freezes a teacher that follows the student (the trainer's own preparation,
            accelerate / DeepSpeed); the others are only frozen and put in eval mode, where they are.

    Raises:
        ValueError: two teachers with one name, or a weight that is not > 0.
    """

    def __init__(
        self,
        additional: Sequence[WeightedTeacher],
        *,
        primary_weight: float = 1.0,
        device: torch.device | str,
        prepare: Callable[[nn.Module], nn.Module],
    ):
        names = [PRIMARY_NAME, *(t.name for t in additional)]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be distinct, got {names}")
        self.weights: tuple[float, ...] = normalize_weights([primary_weight, *(t.weight for t in additional)])
        self.names: tuple[str, ...] = tuple(names)
        self.device = torch.device(device)
        self._members = [self._member(t, prepare) for t in additional]

    def _member(self, teacher: WeightedTeacher, prepare: Callable[[nn.Module], nn.Module]) -> _Member:
        if teacher.follow_student:
            model = prepare(teacher.model)
        else:
            model = teacher.model.eval().requires_grad_(False)
        core = _core_of(model)
        device = next(core.parameters()).device
        head = None
        # (a teacher that follows the student is placed beside it, possibly sharded: its head is read in place)
        if not teacher.follow_student and device != self.device:
            # Once: a copy of the (frozen) head beside the student, so each chunk's logits are made there.
            live = OutputHead.of(core)
            head = OutputHead(
                live.weight.detach().to(self.device),
                None if live.bias is None else live.bias.detach().to(self.device),
                logit_scale=live.logit_scale,
                softcap=live.softcap,
            )
        return _Member(teacher.name, model, core, device, head)

    def __len__(self) -> int:
        """Number of additional teachers (the primary not counted)."""
        return len(self._members)

    @property
    def vocab_sizes(self) -> list[int]:
        """Output-head rows of each additional teacher."""
        return [vocab_size_of(m.core) for m in self._members]

    def hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor | None, mask: Tensor, position_ids: Tensor | None = None
    ) -> list[Tensor]:
        """Each additional teacher's final hidden states at the counted positions, teacher after teacher.

        Args:
            input_ids: (B, T) on the student's device.
            attention_mask: (B, T) or None.
            mask: (B, T-1) bool, True where position t's next token counts (`modeling.counted_positions`).
            position_ids: (1, T) of a padding-free batch, or None.

        Returns:
            One (N, H_i) tensor per additional teacher, on the loss device, normal tensors (not inference
            tensors: the loss may save them for backward), in the row order of `hidden[:, :-1][mask]`.
        """
        states = []
        for m in self._members:
            with frozen_forward(m.core):  # inference mode (no_grad where FSDP2 shards it)
                ids = input_ids.to(m.device)
                attn = None if attention_mask is None else attention_mask.to(m.device)
                pos = None if position_ids is None else position_ids.to(m.device)
                hidden = final_hidden_states(m.model, m.core, ids, attn, pos)  # (B, T, H_i)
                # (B, T, H_i) -> (N, H_i) before anything else: only these rows cross devices and outlive the step.
                hidden = hidden[:, :-1][mask.to(m.device)].to(self.device)
            states.append(hidden.clone())  # a normal tensor: inference tensors cannot be saved for backward
            del hidden  # this teacher's activations go before the next teacher runs
        return states

    def heads(self) -> list[OutputHead]:
        """Each additional teacher's output head, on the loss device, as its model holds it (sharded or not)."""
        return [m.head if m.head is not None else OutputHead.of(m.core) for m in self._members]

    def head_sources(self) -> list[nn.Module | OutputHead]:
        """What `sharding.through_heads` reads each additional teacher's head from: the copy on the loss device, or
        the teacher itself (its head read in place, gathered where it is sharded with the student)."""
        return [m.head if m.head is not None else m.core for m in self._members]

    @torch.no_grad()
    def logits(self, states: Sequence[Tensor]) -> list[Tensor]:
        """Full (N, V_i) logits of each additional teacher from its `hidden_states`, unsharded teachers only (the `full`
        loss reads the heads through `sharding.through_heads` instead, `head_sources`).

        Made on the teacher's device with its own head, logit scale and soft-capping (`modeling.project`),
        then moved to the loss device.
        """
        if len(states) != len(self._members):
            raise ValueError(f"{len(states)} hidden-state tensors for {len(self._members)} additional teachers")
        return [project(m.core, h.to(m.device)).to(self.device) for m, h in zip(self._members, states)]
