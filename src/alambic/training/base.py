"""`AlambicTrainer`: what every alambic Trainer shares, whatever its loss.

- A step whose loss or gradient norm is NaN or inf is never taken. The Trainer alone would take it (one NaN
  gradient makes every weight NaN from then on) and log its loss as 0.0 (`logging_nan_inf_filter` adds the window's
  running mean, which is 0 at a window's start). By default the training stops there, naming the step and the likely
  cause; `training.on_nonfinite: skip` drops that step's gradients instead, counts and logs it, and stops after
  `MAX_SKIPPED_IN_A_ROW` in a row.
- The run's mean training loss (`train_loss`) covers every step of the run, across resumes: the Trainer's covers only
  the steps of its own `train()` call. The running totals travel in each checkpoint (`TOTALS_FILE`).
- The loss is divided by the whole accumulated batch's count (`num_items_in_batch`), so the Trainer does not divide it
  again for gradient accumulation; each micro-batch's loss parts (soft, hard, feature terms) are logged as means
  over the counted tokens (or examples) since the last log, with the throughput; evaluation returns the loss only.
- Under several processes (DDP, FSDP, DeepSpeed) the global count divides every rank's loss, and the logged parts
  and throughput are those of every rank's tokens, gathered at each log, not rank 0's share.
- Each checkpoint records the world size and engine that wrote it (`checkpoints.SCALE_FILE`), which a resume on
  another world size checks (`checkpoints.check_resume_scale`).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import gather_object
from torch import nn
from transformers import Trainer, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from alambic.losses.divergences import LossParts
from alambic.training.checkpoints import SCALE_FILE
from alambic.utils import DiagnosedFailure

OnNonFinite = Literal["stop", "skip"]
# Ten non-finite steps in a row are no passing spike (one odd batch): the weights or the settings are broken.
MAX_SKIPPED_IN_A_ROW = 10
# The run's loss totals, in each checkpoint folder beside the Trainer's files (written before trainer_state.json).
TOTALS_FILE = "alambic_totals.json"


class NonFiniteTrainingError(DiagnosedFailure):
    """A training step's loss or gradient norm was NaN or inf, and the training stopped before taking it."""


def _finite(value: float | torch.Tensor | None) -> bool:
    return value is None or math.isfinite(float(value))


def finite_mean(values: list[float], weights: list[float] | None = None) -> float | None:
    """The (weighted) mean of the finite `values`, or None if none is: a step left out under
    `training.on_nonfinite: skip` must not turn a logged loss part into NaN."""
    weights = weights if weights is not None and len(weights) == len(values) else [1.0] * len(values)
    kept = [(v, w) for v, w in zip(values, weights) if math.isfinite(v)]
    if not kept:
        return None
    return sum(v * w for v, w in kept) / max(sum(w for _, w in kept), 1e-12)


def _fully_sharded(model: nn.Module) -> bool:
    """Whether FSDP2's `fully_shard` was applied to `model` by its caller (the Trainer's FSDP options do not engage
    on CPU: design.md, Scale-out facts): its parameters are DTensors."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5: no public DTensor, no FSDP2 outside the Trainer's options
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


class AlambicTrainer(Trainer):
    """A `transformers.Trainer` that never takes a non-finite step and keeps the whole run's loss across resumes.

    `configure_nonfinite` sets what a non-finite step does (`fit_and_export` calls it from the run's config);
    until then a non-finite step stops the training.
    """

    # compute_loss divides by the Trainer's global count of counted tokens or examples (`num_items_in_batch`), so the
    # loss is already right for gradient accumulation: the Trainer must not divide it again.
    loss_is_scaled_for_ga = True
    # The `_parts` keys that are counts, not losses: the first weighs the logged means (`log`), all feed `throughput`.
    count_keys: tuple[str, ...] = ("counted_tokens",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Makes the Trainer count the tokens (labels != -100) of the whole accumulated batch for `num_items_in_batch`.
        self.model_accepts_loss_kwargs = True
        # Each micro-batch's loss parts and counts since the last log, per mode ('train', 'eval').
        self._parts: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._last_log_time = time.perf_counter()
        self.on_nonfinite: OnNonFinite = "stop"
        self.settings = "training"  # the config section the advice of an error names
        # The run's totals (every train() call, restored on resume): steps taken, their summed loss, steps skipped.
        self.totals = {"steps": 0, "loss": 0.0, "skipped": 0}
        self._window = {"steps": 0, "loss": 0.0, "skipped": 0}  # the same, since the last training log
        self._skipped_in_a_row = 0
        self._step_loss: torch.Tensor | None = None  # this optimizer step's micro-batch losses, summed on the device

    def configure_nonfinite(self, on_nonfinite: OnNonFinite, settings: str = "training") -> None:
        """`on_nonfinite`: 'stop' or 'skip'; `settings`: the config section whose learning rate and precision these
        trainings use, named in the error."""
        if on_nonfinite == "skip" and self.is_deepspeed_enabled:
            raise ValueError(
                f"{settings}.on_nonfinite: skip drops a step's gradients before the optimizer steps, "
                "which DeepSpeed does inside its engine: use 'stop' under DeepSpeed"
            )
        self.on_nonfinite, self.settings = on_nonfinite, settings

    # -- one step: its micro-batch losses, then the decision before the optimizer step ---------------------------

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Summed on the device (no sync per micro-batch): the step is judged once, before its optimizer step.
        self._step_loss = loss.detach().clone() if self._step_loss is None else self._step_loss + loss.detach()
        # The Trainer's own window sum must stay finite (a NaN there never resets: NaN - NaN); a skipped step's loss
        # is taken out of the logged figures below, from our own totals.
        return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        # The Trainer calls this after clipping and right before `optimizer.step()`: the last point to refuse a step.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        loss = float(self._step_loss) if self._step_loss is not None else 0.0
        self._step_loss = None
        # Under fp16 the loss scaler skips overflowing steps itself and lowers its scale: only the loss is judged there.
        norm_counts = self.accelerator.scaler is None
        bad = not _finite(loss) or (norm_counts and not _finite(grad_norm))
        if self.accelerator.num_processes > 1:
            # One decision for every rank (a rank's own loss may differ), and the step's loss as the Trainer logs it:
            # the mean over ranks.
            both = torch.tensor([loss, float(bad)], device=self.args.device, dtype=torch.float64)
            torch.distributed.all_reduce(both)
            loss, bad = both[0].item() / self.accelerator.num_processes, both[1].item() > 0
        if not bad:
            self._skipped_in_a_row = 0
            for totals in (self.totals, self._window):
                totals["steps"] += 1
                totals["loss"] += loss
            return grad_norm
        if self.on_nonfinite == "stop":
            raise NonFiniteTrainingError(self._nonfinite_message(loss, grad_norm))
        self._skipped_in_a_row += 1
        if self._skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteTrainingError(
                f"{self._skipped_in_a_row} non-finite steps in a row, the last at "
                + self._nonfinite_message(loss, grad_norm, skipping=True)
            )
        # The optimizer leaves a parameter without gradient as it is (AdamW: weights and moments unchanged).
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.totals["skipped"] += 1
        self._window["skipped"] += 1
        return grad_norm

    def _nonfinite_message(self, loss: float, grad_norm: Any, skipping: bool = False) -> str:
        step, args, s = self.state.global_step + 1, self.args, self.settings
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else None
        cause = f"a learning rate too high for this model ({s}.learning_rate = {args.learning_rate:g})" + (
            f", or an overflow in {precision} mixed precision (train in float32: {s}.{precision}: false)"
            if precision
            else ""
        )
        what = "loss" if not _finite(loss) else "gradient norm"
        grad = float(grad_norm) if grad_norm is not None else None
        text = (
            f"step {step} of {self.state.max_steps}: the {what} is not finite (loss {loss:g}"
            + (f", gradient norm {grad:g}" if grad is not None else "")
            + f"). Likely cause: {cause}. "
        )
        if skipping:
            return text + (
                "Skipping cannot recover from this: fix the cause and train again (`--restart`, or change "
                "the settings: a changed training starts afresh)."
            )
        skip = (
            (
                f", or set {s}.on_nonfinite: skip to leave such steps out (it still stops after "
                f"{MAX_SKIPPED_IN_A_ROW} in a row)"
            )
            if s == "training"
            else ""
        )  # (a teacher's fine-tuning has no skip)
        return (
            "training stopped before taking " + text + "The weights are those of the step before (nothing "
            f"non-finite is checkpointed or exported). Lower {s}.learning_rate{skip}."
        )

    # -- the loss of a micro-batch: scaled for the devices, its parts recorded --------------------------------

    def per_device_loss(self, loss: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
        """The loss this rank backpropagates: the global count divides every rank's loss, and DDP averages the
        gradients over ranks, so the mean is undone here."""
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return loss * self.accelerator.num_processes
        return loss

    def record_parts(
        self,
        training: bool,
        parts: LossParts,
        num_items_in_batch: torch.Tensor | int | None,
        alpha: float,
        *,
        soft_per_teacher: dict[str, float] | None = None,
        terms: dict[str, torch.Tensor] | None = None,
        counts: dict[str, float],
    ) -> None:
        """Keep a micro-batch's loss parts for the next log, as per-token (per-example) means of this micro-batch,
        whatever denominator the loss used: soft (alpha > 0), each teacher's soft (sum mode), hard (alpha < 1), the
        feature terms (unweighted, under their logged names), then `counts`."""
        record = self._parts["train" if training else "eval"]
        n = max(int(parts.num_tokens), 1)
        scale = (float(num_items_in_batch) / n) if num_items_in_batch is not None else 1.0
        if alpha > 0:
            record["loss_soft"].append(parts.soft.item() * scale)
        for name, value in (soft_per_teacher or {}).items():
            record[f"loss_soft_{name}"].append(value * scale)
        if alpha < 1:
            record["loss_hard"].append(parts.hard.item() * scale)
        for name, value in (terms or {}).items():
            record[name].append(value.item() * scale)
        for key, value in counts.items():
            record[key].append(value)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def throughput(self, counts: dict[str, list[float]], elapsed: float) -> dict[str, float]:
        """The rates logged with each training log, from the `count_keys` recorded over `elapsed` seconds."""
        return {}

    # -- logs: the loss parts; a skipped step adds no loss; train_loss covers the whole run ---------------------

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        parts = self._all_ranks_parts(mode)
        self._parts[mode] = defaultdict(list)
        if parts:
            counts = {key: parts.pop(key, []) for key in self.count_keys}
            if mode == "train":
                now = time.perf_counter()
                logs.update(self.throughput(counts, max(now - self._last_log_time, 1e-9)))
                self._last_log_time = now
                if torch.cuda.is_available():
                    logs["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            weights = counts[self.count_keys[0]]
            for key, values in parts.items():
                # count-weighted mean: the loss over all tokens (examples) seen since the last log
                value = finite_mean(values, weights if weights else None)
                if value is not None:
                    logs[("eval_" if mode == "eval" else "") + key] = round(value, 6)
        if "loss" in logs and "learning_rate" in logs:  # a training log (not the evaluation's, nor the final one)
            window = self._window
            if window["skipped"]:
                # The Trainer's figure divides by every step of the window, skipped ones (0) included.
                if window["steps"]:
                    logs["loss"] = window["loss"] / window["steps"]
                else:
                    del logs["loss"]  # no step taken since the last log: no loss to show (never a false 0.0)
            if self.totals["skipped"]:
                logs["nonfinite_steps_skipped"] = self.totals["skipped"]
            self._window = {"steps": 0, "loss": 0.0, "skipped": 0}
        if "train_loss" in logs:  # the Trainer's final record: its mean covers this train() call only
            logs["train_loss"] = self.run_train_loss()
            if self.totals["skipped"]:
                logs["nonfinite_steps_skipped"] = self.totals["skipped"]
        super().log(logs, *args, **kwargs)

    def _all_ranks_parts(self, mode: str) -> dict[str, list[float]]:
        """The micro-batch parts and counts recorded since the last log, of every rank (rank order within each key):
        each rank's are the means over its own tokens, so rank 0's alone would log its share of the batch. Every rank
        logs at the same points (the Trainer gathers the loss there too), so this gather always meets."""
        parts = self._parts[mode]
        if self.accelerator.num_processes == 1:
            return parts
        merged: dict[str, list[float]] = defaultdict(list)
        for rank_parts in gather_object([dict(parts)]):
            for key, values in rank_parts.items():
                merged[key].extend(values)
        return merged

    def run_train_loss(self) -> float:
        """The mean training loss over every step of the run taken so far, across resumes (NaN if none)."""
        return self.totals["loss"] / self.totals["steps"] if self.totals["steps"] else float("nan")

    def load_finished(self, checkpoint: Path) -> None:
        """Take the weights, state and totals of the checkpoint of a finished training (its step = max_steps),
        without training: what `train(resume_from_checkpoint=...)` restores, less the step it would take before it
        looks at `max_steps`."""
        self._load_from_checkpoint(str(checkpoint))
        self.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))

    # -- how the run is spread over processes ---------------------------------------------------------------------

    @property
    def engine(self) -> str:
        """What spreads the training over processes: 'single', 'ddp', 'fsdp' or 'deepspeed-zero<stage>'."""
        if self.is_deepspeed_enabled:
            return f"deepspeed-zero{self.accelerator.state.deepspeed_plugin.zero_stage}"
        if self.is_fsdp_enabled or _fully_sharded(self.model):
            return "fsdp"
        return "ddp" if self.accelerator.num_processes > 1 else "single"

    def scale_record(self) -> dict[str, Any]:
        """What a checkpoint records of the processes that wrote it (`checkpoints.SCALE_FILE`): world size and engine,
        which decide whether another world size can resume from it, and the batch that decides its data order."""
        return {
            "world_size": self.accelerator.num_processes,
            "engine": self.engine,
            "per_device_train_batch_size": self.args.per_device_train_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
        }

    # -- the totals travel with each checkpoint -------------------------------------------------------------------

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        if self.args.should_save:
            # Written before the Trainer's own files: trainer_state.json, written last, marks a complete checkpoint.
            folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / TOTALS_FILE).write_text(json.dumps(self.totals))
            (folder / SCALE_FILE).write_text(json.dumps(self.scale_record()))
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / TOTALS_FILE
        # A checkpoint written before these totals existed: the resumed segment's own (what the Trainer reported).
        self.totals = json.loads(path.read_text()) if path.is_file() else {"steps": 0, "loss": 0.0, "skipped": 0}
