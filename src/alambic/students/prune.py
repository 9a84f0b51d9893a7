"""Cut a student out of the teacher. First form: keep a subset of the decoder layers (depth pruning).

The result is an ordinary model of the teacher's class with an updated config: it saves with
`save_pretrained`, reloads with `from_pretrained`, and gives the logits it gave in memory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alambic.utils import atomic_write_json

# Per-layer lists some configs carry (Qwen2's sliding/full attention pattern, Gemma's...); kept in step
# with the layers so the student's config stays valid.
_PER_LAYER_CONFIG_LISTS = ("layer_types", "sliding_window_pattern_list", "no_rope_layers")


class PruningError(ValueError):
    """A pruning request that cannot be applied to this model."""


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
        raise PruningError(f"student.from_teacher.layers: indices {bad} out of range for a teacher of {num_layers} layers")
    return sorted(spec)


def keep_layers(model: PreTrainedModel, indices: list[int]) -> PreTrainedModel:
    """A new model holding copies of `model`'s decoder layers `indices` (and every other weight).

    The teacher is left untouched. Attention modules are rebuilt from the new config, so their layer
    index (used by the KV cache) is right.
    """
    prefix, _ = decoder_layers(model)
    n = model.config.num_hidden_layers
    indices = layer_indices(indices, n)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(indices)
    for attr in _PER_LAYER_CONFIG_LISTS:
        values = getattr(config, attr, None)
        if isinstance(values, list) and len(values) == n:
            setattr(config, attr, [values[i] for i in indices])
    if hasattr(config, "quantization_config"):
        del config.quantization_config

    with torch.device("meta"):
        student = type(model)(config)
    old_to_new = {old: new for new, old in enumerate(indices)}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix + "."):
            old, rest = key[len(prefix) + 1 :].split(".", 1)
            if int(old) not in old_to_new:
                continue
            key = f"{prefix}.{old_to_new[int(old)]}.{rest}"
        state[key] = value.detach().clone()
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
