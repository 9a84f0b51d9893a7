"""On-policy distillation: the student answers the batch's prompts, and learns from the teacher's scores of its answers.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models") and MiniLLM (Gu et al. 2024) train the
student on its own samples: at inference it conditions on the prefixes it generated itself, which supervised
distillation on fixed answers never shows it (exposure bias). With probability lambda (`loss.on_policy.fraction`)
an optimizer step replaces each micro-batch by

    input_ids = prompt + response,   labels = -100 on the prompt, the response ids on the response,

where the prompt is the sequence up to its last assistant turn (`data.tokenize.last_turn_start`, carried by the
collator as `prompt_length`) and the response is sampled from the student in eval mode with a KV cache
(`decoding.generate_token_responses`), its end-of-turn token included when produced. The trainer
then computes its configured objective on those sequences unchanged: the teacher scores them by its own forward.

Sampling settings (temperature, top-p, top-k) left unset in the config are the models' own: the first of the teacher's
and the student's `generation_config` that samples (do_sample), with transformers' defaults for what it leaves unset,
as `generate` would; else `DEFAULT_SAMPLING`. Responses stop at the tokenizer's eos and end-of-turn tokens and at the
models' `generation_config.eos_token_id`s. How many responses ran to `max_new_tokens` without ending is logged
(`on_policy_capped_share`): samples that never end never show the student an ending.

The choice of step and the sampling seed are pure functions of (seed, step, micro-batch, rank): a resumed run
draws exactly what an uninterrupted one would, without any state in the checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from alambic.config import OnPolicyConfig
from alambic.data.tokenize import IGNORE_INDEX
from alambic.decoding import generate_token_responses, stop_token_ids

# Where no model's generation_config samples: settings whose answers end. At temperature 1.0 and top-p 1.0 (GKD's)
# the responses of a small student nearly all ran to max_new_tokens (issue 6's chat benchmark); the teacher's own
# data (data.teacher_responses) samples at 0.7.
DEFAULT_SAMPLING: dict[str, Any] = {"temperature": 0.7, "top_p": 0.95, "top_k": 0}
# What `generate` uses for a field a sampling generation_config leaves unset (transformers v5 stores None there and
# applies GenerationConfig._get_default_generation_params() at generation time; v4 stored these values directly).
_GENERATE_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}


@dataclass(frozen=True)
class SamplingSettings:
    """The student's sampling settings, and where each came from: 'config', a model's role, or 'default'."""

    temperature: float
    top_p: float
    top_k: int
    source: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sampling_settings(cfg: OnPolicyConfig, generation_configs: Sequence[tuple[str, Any]]) -> SamplingSettings:
    """Each of temperature, top_p, top_k: the config's value when set; else that of the first `(role,
    generation_config)` that samples (`do_sample` true; its unset fields are transformers' defaults, as `generate`
    would use them); else `DEFAULT_SAMPLING`. A generation_config that does not sample (most GGUF and base models:
    no settings at all) is passed over, like a missing one (None)."""
    sampler = next(
        ((role, gen) for role, gen in generation_configs if gen is not None and getattr(gen, "do_sample", False)), None
    )
    configured = {"temperature": cfg.sampling_temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}
    values, source = {}, {}
    for name, value in configured.items():
        if value is not None:
            values[name], source[name] = value, "config"
        elif sampler is not None:
            own = getattr(sampler[1], name, None)
            values[name], source[name] = own if own is not None else _GENERATE_DEFAULTS[name], sampler[0]
        else:
            values[name], source[name] = DEFAULT_SAMPLING[name], "default"
    return SamplingSettings(float(values["temperature"]), float(values["top_p"]), int(values["top_k"]), source)


def generation_eos_ids(generation_configs: Sequence[tuple[str, Any]], vocab_size: int) -> set[int]:
    """The `eos_token_id`s (an int or a list) of the given generation configs that are real ids of the tokenizer:
    Llama 3 and Gemma 3 list their end-of-turn token there beside eos."""
    ids: set[int] = set()
    for _, gen in generation_configs:
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        for token_id in [eos] if isinstance(eos, int) else eos or []:
            if isinstance(token_id, int) and 0 <= token_id < vocab_size:
                ids.add(token_id)
    return ids


def is_on_policy_step(step: int, fraction: float, seed: int) -> bool:
    """Whether optimizer step `step` (0-based) trains on student responses: u < fraction, u ~ U[0, 1) from (seed, step).

    Each step draws independently, so over many steps the share tends to `fraction`; 0 never and 1 always.
    """
    return bool(np.random.default_rng([seed, step]).random() < fraction)


def sampling_seed(seed: int, step: int, micro_batch: int, rank: int) -> int:
    """Seed of one micro-batch's sampling: distinct per step, micro-batch and process, the same on every resume."""
    return int(np.random.SeedSequence([seed, step, micro_batch, rank]).generate_state(1)[0])


def batch_prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's prompt ids: `input_ids[b, :prompt_length[b]]` of a right-padded batch.

    Raises:
        KeyError: the batch has no `prompt_length` (a collator built without `prompt_lengths=True`).
        ValueError: a row with an empty prompt (text data: every token is counted, nothing is a prompt).
    """
    if "prompt_length" not in batch:
        raise KeyError(
            "on-policy distillation needs each row's prompt length: build the collator with "
            "DistillationCollator(..., prompt_lengths=True) (alambic.training.run.train does when "
            "loss.on_policy is set)"
        )
    lengths = batch["prompt_length"].tolist()
    empty = [row for row, n in enumerate(lengths) if n < 1]
    if empty:
        raise ValueError(
            f"rows {empty} of the batch have no prompt (prompt_length 0): on-policy distillation answers "
            "chat prompts, and text data has none; use data.format: chat"
        )
    return [ids[:n] for ids, n in zip(batch["input_ids"].tolist(), lengths)]


def on_policy_batch(
    prompts: list[list[int]], responses: list[list[int]], *, pad_token_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """(prompt, response) rows -> a right-padded training batch whose labels count the response tokens only.

    Returns:
        {"input_ids", "attention_mask", "labels", "prompt_length"}: (B, L), (B, L), (B, L), (B,), L the longest
        prompt + response; labels -100 on prompts and padding.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses: one response per prompt")
    rows = [p + r for p, r in zip(prompts, responses)]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for b, (prompt, row) in enumerate(zip(prompts, rows)):
        ids[b, : len(row)] = torch.tensor(row)
        attention[b, : len(row)] = 1
        labels[b, len(prompt) : len(row)] = ids[b, len(prompt) : len(row)]
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": labels,
        "prompt_length": torch.tensor([len(p) for p in prompts], dtype=torch.long),
    }
    return {k: v.to(device) for k, v in batch.items()}


@dataclass
class OnPolicyStats:
    """What on-policy sampling cost since the last log (this process): steps seen, steps on-policy, seconds, tokens,
    responses sampled, and those of them cut at max_new_tokens before a stop token."""

    steps: int = 0
    on_policy_steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    samples: int = 0
    capped: int = 0

    def pop(self) -> dict[str, float]:
        """The log fields of the window, then a fresh window; {} when no step was taken since the last log.
        `on_policy_capped_share` only where the window sampled (no 0/0)."""
        if self.steps == 0:
            return {}
        logs = {
            "on_policy_share": round(self.on_policy_steps / self.steps, 4),
            "on_policy_seconds": round(self.seconds, 4),
            "on_policy_tokens": self.tokens,
            "on_policy_samples": self.samples,
            "on_policy_capped": self.capped,
        }
        if self.samples:
            logs["on_policy_capped_share"] = round(self.capped / self.samples, 4)
        self.steps = self.on_policy_steps = self.tokens = self.samples = self.capped = 0
        self.seconds = 0.0
        return logs


class OnPolicySampler:
    """Turns the micro-batches of an on-policy step into (prompt, student response) batches (module docstring).

    Args:
        cfg: `loss.on_policy`.
        tokenizer: the student's tokenizer: its stop tokens end responses, ids past `len(tokenizer)` are never drawn.
        models: (role, model) pairs whose `generation_config` gives the sampling settings the config leaves unset
            (the first that samples) and further stop ids: the teacher, then the student.
    """

    def __init__(self, cfg: OnPolicyConfig, tokenizer, models: Sequence[tuple[str, nn.Module | None]] = ()):
        if tokenizer is None:
            raise ValueError(
                "loss.on_policy needs the tokenizer (its end-of-turn tokens stop the student's "
                "responses): pass processing_class=tokenizer to the trainer"
            )
        self.cfg = cfg
        generation = [(role, getattr(model, "generation_config", None)) for role, model in models]
        self.settings = sampling_settings(cfg, generation)
        self.stop_ids = sorted(set(stop_token_ids(tokenizer)) | generation_eos_ids(generation, len(tokenizer)))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.vocab_size = len(tokenizer)
        self.stats = OnPolicyStats()

    def is_on_policy(self, step: int) -> bool:
        return is_on_policy_step(step, self.cfg.fraction, self.cfg.seed)

    def steps_on_policy(self, num_steps: int) -> int:
        """How many of steps 0 .. num_steps - 1 were on-policy (exact: the draw is a function of the step)."""
        return sum(self.is_on_policy(step) for step in range(num_steps))

    def respond(self, model: nn.Module, batch: dict[str, torch.Tensor], *, seed: int) -> dict[str, torch.Tensor]:
        """One micro-batch -> the batch of its prompts and the `model`'s responses (all rows decoded together).

        `model` must be the unwrapped student (DDP / DeepSpeed hooks are not wanted while decoding); it is run in
        eval mode under inference mode and put back in the mode it was in.
        """
        prompts = batch_prompts(batch)
        cap, settings = self.cfg.max_new_tokens, self.settings
        responses = generate_token_responses(
            model,
            prompts,
            stop_ids=self.stop_ids,
            pad_id=self.pad_id,
            vocab_size=self.vocab_size,
            max_new_tokens=cap,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            seed=seed,
        )
        stops = set(self.stop_ids)
        self.stats.tokens += sum(len(r) for r in responses)
        self.stats.samples += len(responses)
        self.stats.capped += sum(len(r) == cap and r[-1] not in stops for r in responses)
        return on_policy_batch(prompts, responses, pad_token_id=self.pad_id, device=batch["input_ids"].device)

    def step_batches(
        self, model: nn.Module, batches: list[dict[str, torch.Tensor]], *, step: int, rank: int = 0
    ) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of optimizer step `step`: replaced by on-policy ones when the step is drawn, else as given.

        The whole step is on- or off-policy: the loss is divided by the step's count of counted tokens, which the
        Trainer takes before the first micro-batch, so the responses must exist by then.
        """
        self.stats.steps += 1
        if not batches or not self.is_on_policy(step):
            return batches
        started = time.perf_counter()
        out = [
            self.respond(model, batch, seed=sampling_seed(self.cfg.seed, step, i, rank))
            for i, batch in enumerate(batches)
        ]
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the time of the decoding itself, not of launching it
        self.stats.seconds += time.perf_counter() - started
        self.stats.on_policy_steps += 1
        return out
