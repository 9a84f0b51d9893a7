"""On-policy distillation: the student answers the batch's prompts, and learns from the teacher's scores of its answers.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models") and MiniLLM (Gu et al. 2024) train the
student on its own samples: at inference it conditions on the prefixes it generated itself, which supervised
distillation on fixed answers never shows it (exposure bias). With probability lambda (`loss.on_policy.fraction`)
an optimizer step replaces each micro-batch by

    input_ids = prompt + response,   labels = -100 on the prompt, the response ids on the response,

where the prompt is the sequence up to its last assistant turn (`data.tokenize.last_turn_start`, carried by the
collator as `prompt_length`) and the response is sampled from the student in eval mode with a KV cache
(`evaluation.generation.generate_token_responses`), its end-of-turn token included when produced. The trainer
then computes its configured objective on those sequences unchanged: the teacher scores them by its own forward.

The choice of step and the sampling seed are pure functions of (seed, step, micro-batch, rank): a resumed run
draws exactly what an uninterrupted one would, without any state in the checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from alambic.config import OnPolicyConfig
from alambic.data.tokenize import IGNORE_INDEX
from alambic.evaluation.generation import generate_token_responses, stop_token_ids


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
        raise KeyError("on-policy distillation needs each row's prompt length: build the collator with "
                       "DistillationCollator(..., prompt_lengths=True) (alambic.training.run.train does when "
                       "loss.on_policy is set)")
    lengths = batch["prompt_length"].tolist()
    empty = [row for row, n in enumerate(lengths) if n < 1]
    if empty:
        raise ValueError(f"rows {empty} of the batch have no prompt (prompt_length 0): on-policy distillation answers "
                         "chat prompts, and text data has none; use data.format: chat")
    return [ids[:n] for ids, n in zip(batch["input_ids"].tolist(), lengths)]


def on_policy_batch(prompts: list[list[int]], responses: list[list[int]], *, pad_token_id: int,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
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
        labels[b, len(prompt): len(row)] = ids[b, len(prompt): len(row)]
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels,
             "prompt_length": torch.tensor([len(p) for p in prompts], dtype=torch.long)}
    return {k: v.to(device) for k, v in batch.items()}


@dataclass
class OnPolicyStats:
    """What on-policy sampling cost since the last log (this process): steps seen, steps on-policy, seconds, tokens."""

    steps: int = 0
    on_policy_steps: int = 0
    seconds: float = 0.0
    tokens: int = 0

    def pop(self) -> dict[str, float]:
        """The log fields of the window, then a fresh window; {} when no step was taken since the last log."""
        if self.steps == 0:
            return {}
        logs = {"on_policy_share": round(self.on_policy_steps / self.steps, 4),
                "on_policy_seconds": round(self.seconds, 4), "on_policy_tokens": self.tokens}
        self.steps = self.on_policy_steps = self.tokens = 0
        self.seconds = 0.0
        return logs


class OnPolicySampler:
    """Turns the micro-batches of an on-policy step into (prompt, student response) batches (module docstring).

    Args:
        cfg: `loss.on_policy`.
        tokenizer: the student's tokenizer: its stop tokens end responses, ids past `len(tokenizer)` are never drawn.
    """

    def __init__(self, cfg: OnPolicyConfig, tokenizer):
        if tokenizer is None:
            raise ValueError("loss.on_policy needs the tokenizer (its end-of-turn tokens stop the student's responses): "
                             "pass processing_class=tokenizer to the trainer")
        self.cfg = cfg
        self.stop_ids = stop_token_ids(tokenizer)
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
        cfg = self.cfg
        responses = generate_token_responses(
            model, prompts, stop_ids=self.stop_ids, pad_id=self.pad_id, vocab_size=self.vocab_size,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.sampling_temperature, top_p=cfg.top_p,
            top_k=cfg.top_k, seed=seed,
        )
        self.stats.tokens += sum(len(r) for r in responses)
        return on_policy_batch(prompts, responses, pad_token_id=self.pad_id, device=batch["input_ids"].device)

    def step_batches(self, model: nn.Module, batches: list[dict[str, torch.Tensor]], *, step: int,
                     rank: int = 0) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of optimizer step `step`: replaced by on-policy ones when the step is drawn, else as given.

        The whole step is on- or off-policy: the loss is divided by the step's count of counted tokens, which the
        Trainer takes before the first micro-batch, so the responses must exist by then.
        """
        self.stats.steps += 1
        if not batches or not self.is_on_policy(step):
            return batches
        started = time.perf_counter()
        out = [self.respond(model, batch, seed=sampling_seed(self.cfg.seed, step, i, rank))
               for i, batch in enumerate(batches)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the time of the decoding itself, not of launching it
        self.stats.seconds += time.perf_counter() - started
        self.stats.on_policy_steps += 1
        return out
