"""`DistillationTrainer`: a `transformers.Trainer` whose loss is the configured distillation objective.

Everything Trainer users rely on is kept (checkpoints and resume, gradient accumulation, mixed precision,
evaluation, `report_to`, accelerate / DeepSpeed / FSDP launchers); only `compute_loss` is its own (logging,
`prediction_step` and the scaling for gradient accumulation are `AlambicTrainer`'s). The teacher is frozen, in eval
mode, and runs under `torch.inference_mode` (`torch.no_grad` where FSDP2 shards it).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from alambic.config import LossConfig
from alambic.modeling import counted_positions, final_hidden_states
from alambic.sharding import is_sharded, shard_frozen, should_shard_teacher
from alambic.teachers import StudentStep, TeacherSource, choose
from alambic.teachers.ensemble import WeightedTeacher
from alambic.training.base import AlambicTrainer
from alambic.training.features import LOG_NAMES, FeatureDistiller
from alambic.training.on_policy import OnPolicySampler

# The feature projector's weights, in each checkpoint folder beside the student's (never in final/).
PROJECTOR_FILE = "feature_projector.safetensors"


class DistillationTrainer(AlambicTrainer):
    """Trainer for `total = alpha * T^2 * soft + (1 - alpha) * hard (+ sum_i w_i * feature_i)`.

    The soft term comes from one `teachers.TeacherSource` (live, cached top-k, cross-tokenizer, or none at alpha 0),
    chosen once: given as `source` (`teachers.choose`), or chosen here from the teacher arguments below.

    Args:
        teacher: the teacher model; may be None only when `loss.alpha == 0` (plain cross-entropy) or `cached_teacher`.
        loss_config: divergence, temperature, alpha and their parameters; `features` adds feature terms.
        cached_teacher: the batches bring an offline cache's top-k rows (`CachedTeacherCollator`), no teacher.
        cross_tokenizer: the teacher has another tokenizer and the batches bring its own tokens (`data.cross`).
        kept_layers: the teacher layer each student layer was copied from (a student pruned from this
            teacher), for `loss.features.layer_map: auto`; None: any other student.
        additional_teachers: more teachers for the soft loss, combined with `teacher` as `loss.teachers` says
            (`losses.mixture`); they need the live primary teacher (not an offline cache).
        teacher_weight: the primary teacher's weight among several, before normalisation.
        source: the teacher source already chosen (then the teacher arguments above are not used).
        shard_teacher: `training.shard_teacher`: under FSDP2 or DeepSpeed, shard the teachers (True), keep a whole
            copy on each process (False), or "auto": shard them when the student is sharded.
        Remaining arguments go to `transformers.Trainer`.
    """

    def __init__(
        self,
        *args: Any,
        teacher: PreTrainedModel | None = None,
        loss_config: LossConfig,
        cached_teacher: bool = False,
        cross_tokenizer: bool = False,
        kept_layers: list[int] | None = None,
        additional_teachers: Sequence[WeightedTeacher] = (),
        teacher_weight: float = 1.0,
        source: TeacherSource | None = None,
        shard_teacher: bool | Literal["auto"] = "auto",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config
        self.shard_teacher = shard_teacher
        self.source = (
            source
            if source is not None
            else choose(
                loss_config,
                teacher=teacher,
                cached=cached_teacher,
                cross_tokenizer=cross_tokenizer,
                additional=additional_teachers,
                teacher_weight=teacher_weight,
            )
        )
        self.source.setup(self)
        self._check_fsdp_version()
        self.features = self._prepare_features(loss_config, kept_layers)
        self.on_policy = self._prepare_on_policy(loss_config)

    # -- set-up ---------------------------------------------------------------------------------------

    def prepare_teacher(self, teacher: PreTrainedModel) -> nn.Module:
        """The teacher frozen, in eval mode, placed as the student is (accelerate), and sharded across the processes
        where `shard_teacher` says so: FSDP2 units (`sharding.shard_frozen`) beside an FSDP student, ZeRO-3 beside a
        DeepSpeed one. Its output head is read whole by the loss wherever it is sharded (`sharding.through_heads`)."""
        teacher.eval()
        teacher.requires_grad_(False)
        if self.is_deepspeed_enabled:
            import copy

            import deepspeed

            ds_config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            ds_config.pop("optimizer", None)
            ds_config.pop("scheduler", None)
            zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
            if not should_shard_teacher(self.shard_teacher, zero3):
                ds_config["zero_optimization"] = {"stage": 0}  # a whole copy per rank
            elif not zero3:
                ds_config["zero_optimization"] = {"stage": 3}  # (ZeRO-1/2 shard no weights: the teacher's would be)
            engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
            engine.eval()
            return engine
        # An FSDP student is sharded by accelerate when training starts, after this; `is_sharded` covers a student
        # given already sharded (fully_shard applied by the caller).
        student_sharded = (self.is_fsdp_enabled and self.accelerator.is_fsdp2) or is_sharded(self.model)
        several = (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )
        if several and should_shard_teacher(self.shard_teacher, student_sharded):
            if self.is_fsdp_enabled and not self.accelerator.is_fsdp2:
                raise ValueError(
                    "training.shard_teacher shards the teacher with FSDP2 (fully_shard); this run's FSDP "
                    "is version 1: set fsdp_version: 2 in the accelerate config (fsdp_config "
                    "{'version': 2}), or training.shard_teacher: false"
                )
            return shard_frozen(teacher, self.args.device)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _check_fsdp_version(self) -> None:
        """The losses read the output heads' weights as tensors, outside the models' forward; `sharding.through_heads`
        gathers them where FSDP2 and ZeRO-3 shard them. FSDP version 1 flattens them into one sharded vector it alone
        can unflatten: refuse it, before the first step."""
        if self.is_fsdp_enabled and not self.accelerator.is_fsdp2:
            raise ValueError(
                "FSDP version 1 keeps the output heads flattened and sharded, and alambic's losses read them outside "
                "the models' forward (the chunked loss fuses them with the divergence): set fsdp_version: 2 in the "
                "accelerate config (or fsdp_config {'version': 2} in training.trainer_args), whose heads alambic "
                "gathers for the loss, or train under DDP or DeepSpeed"
            )

    def _prepare_features(self, cfg: LossConfig, kept_layers: list[int] | None) -> FeatureDistiller | None:
        if cfg.features is None:
            return None
        # (`teachers.rules` has refused a source without the teacher's live hidden states)
        features = FeatureDistiller(
            cfg.features, self.accelerator.unwrap_model(self.model), self.source.teacher_core, kept_layers
        )
        features.projector.to(self.args.device)
        if self._projector_parameters(features) and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError(
                "loss.features.hidden_states with a student narrower than the teacher trains a projection beside the "
                "student, which DeepSpeed / FSDP do not shard or save here: train under DDP or a single device, or "
                "drop hidden_states (attention and attention_relations need no projection)"
            )
        return features

    def _prepare_on_policy(self, cfg: LossConfig) -> OnPolicySampler | None:
        if cfg.on_policy is None:
            return None
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if zero3 or self.is_fsdp_enabled:
            # Their sharded forward gathers parameters collectively, step by step: ranks whose responses end at
            # different lengths would wait on each other forever.
            raise ValueError(
                "loss.on_policy decodes with the unwrapped student, which DeepSpeed ZeRO-3 and FSDP shard "
                "across processes: train under DDP, DeepSpeed ZeRO-1/2 or a single device"
            )
        # sampling settings the config leaves unset: the teacher's generation_config first, then the student's
        return OnPolicySampler(
            cfg.on_policy,
            self.processing_class,
            models=[("teacher", self.source.teacher_core), ("student", self.accelerator.unwrap_model(self.model))],
        )

    def _projector_parameters(self, features: FeatureDistiller | None = None) -> list[nn.Parameter]:
        features = features or getattr(self, "features", None)
        return list(features.projector.parameters()) if features is not None else []

    # -- loss -----------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        core = self.accelerator.unwrap_model(model)
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        mask, targets = counted_positions(inputs["labels"])  # (B, T-1), (N,)
        feats = self.features
        # Feature terms count the positions the logit loss counts, over (B, T); keys: every non-padding token.
        feature_mask = F.pad(mask, (0, 1), value=False)
        key_mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)

        # 1. the student's forward: its final hidden states at the counted positions
        with feats.capture(core, "student") if feats else nullcontext() as s_capture:
            hidden = final_hidden_states(model, core, input_ids, attention_mask, inputs.get("position_ids"))[:, :-1][
                mask
            ]  # (B, T, H) -> (N, H)
        # 2. the teacher's signal, soft and hard terms mixed
        step = StudentStep(
            core=core,
            inputs=inputs,
            targets=targets,
            num_items_in_batch=num_items_in_batch,
            hidden=hidden,
            mask=mask,
            features=feats,
            key_mask=key_mask,
        )
        soft = self.source.soft_loss(step, self.loss_config)
        parts, loss = soft.parts, soft.parts.total
        # 3. the feature terms
        terms: dict[str, torch.Tensor] = {}
        if feats is not None:
            s_feats = s_capture.features(key_mask)
            if model.training and torch.is_grad_enabled():
                feats.check_graph(s_feats)
            terms = feats.losses(s_feats, soft.teacher_features, feature_mask, key_mask, num_items_in_batch)
            loss = loss + feats.weighted_sum(terms)
        # 4. logging
        per_teacher = {}
        if parts.soft_per_teacher is not None and len(parts.soft_per_teacher) > 1:  # sum mode: each teacher's own
            per_teacher = dict(zip(self.source.ensemble.names, parts.soft_per_teacher.tolist()))
        self.record_parts(
            model.training,
            parts,
            num_items_in_batch,
            self.loss_config.alpha,
            soft_per_teacher=per_teacher,
            terms={LOG_NAMES[k]: v for k, v in terms.items()},
            counts={"counted_tokens": float(parts.num_tokens)},
        )
        loss = self.per_device_loss(loss, num_items_in_batch)
        return (loss, {"loss_parts": parts}) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The micro-batches of one optimizer step; on an on-policy step (loss.on_policy), the student's responses to
        their prompts, and the count of counted tokens (the loss's divisor) taken over those responses."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.on_policy is None:  # (only the training loop calls this: evaluation batches stay as they are)
            return batches, num_items_in_batch
        step = self.state.global_step  # optimizer steps done so far: this step's index, restored on resume
        new = self.on_policy.step_batches(
            self.accelerator.unwrap_model(self.model), batches, step=step, rank=self.args.process_index
        )
        if new is batches:
            return batches, num_items_in_batch
        return new, self._get_num_items_in_batch(new, device)

    # -- the feature projector trains, clips, syncs, saves and resumes with the student ------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        params = self._projector_parameters()
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if params and not any(id(p) in known for p in params):
            optimizer.add_param_group({"params": params, "weight_decay": self.args.weight_decay})
        return optimizer

    def _clip_grad_norm(self, model: nn.Module):
        params = self._projector_parameters()
        if not params:
            return super()._clip_grad_norm(model)
        # One norm over the student and its projector, as if the projector were part of the model.
        return self.accelerator.clip_grad_norm_([*model.parameters(), *params], self.args.max_grad_norm)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self._projector_parameters() and getattr(self, "_projector_step", None) != self.state.global_step:
            # First micro-batch of an optimizer step: the Trainer zeroes the model's gradients after each step
            # (`model.zero_grad()`), not the projector's, which would otherwise accumulate across steps.
            self.features.projector.zero_grad(set_to_none=True)
            self._projector_step = self.state.global_step
        loss = super().training_step(model, inputs, num_items_in_batch)
        world = self.accelerator.num_processes
        if world > 1:
            # DDP averages the student's gradients over ranks; the projector lives outside the wrapper, so its
            # gradients are averaged here (every micro-batch: averaging is linear, the sum comes out the same).
            for p in self._projector_parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
        return loss

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        if self._projector_parameters() and self.args.should_save:
            # Written before the Trainer's own files: trainer_state.json, written last, marks a complete checkpoint.
            folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.features.projector.state_dict().items()}
            save_file(state, str(folder / PROJECTOR_FILE))
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self._projector_parameters():
            return
        path = Path(resume_from_checkpoint) / PROJECTOR_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint was written without loss.features.hidden_states (or its "
                "projection); resume with the loss it was trained with, or start afresh (`alambic ... --restart`)"
            )
        device = next(self.features.projector.parameters()).device
        # In place: the optimizer already holds these parameters.
        self.features.projector.load_state_dict(load_file(str(path), device=str(device)))

    def throughput(self, counts: dict[str, list[float]], elapsed: float) -> dict[str, float]:
        logs = self.on_policy.stats.pop() if self.on_policy is not None else {}  # the decoding's own cost
        return {**logs, "tokens_per_second": round(sum(counts["counted_tokens"]) / elapsed, 1)}
