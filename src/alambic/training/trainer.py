"""`DistillationTrainer`: a `transformers.Trainer` whose loss is the configured distillation objective.

Everything Trainer users rely on is kept (checkpoints and resume, gradient accumulation, mixed precision,
evaluation, `report_to`, accelerate / DeepSpeed / FSDP launchers); only `compute_loss`, `prediction_step`
and `log` are extended. The teacher is frozen, in eval mode, and runs under `torch.inference_mode`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from alambic.config import LossConfig
from alambic.losses.chunked import OutputHead, chunked_distillation_loss
from alambic.losses.divergences import LossParts, mix_soft_and_hard
from alambic.losses.mixture import multi_teacher_distillation_loss
from alambic.training.base import AlambicTrainer, finite_mean
from alambic.training.cached import cached_teacher_loss
from alambic.training.features import LOG_NAMES, FeatureDistiller
from alambic.training.on_policy import OnPolicySampler
from alambic.training.teachers import TeacherEnsemble, WeightedTeacher, vocab_size_of
from alambic.modeling import counted_positions, final_hidden_states, project

# The feature projector's weights, in each checkpoint folder beside the student's (never in final/).
PROJECTOR_FILE = "feature_projector.safetensors"


class DistillationTrainer(AlambicTrainer):
    """Trainer for `total = alpha * T^2 * soft + (1 - alpha) * hard (+ sum_i w_i * feature_i)`.

    Args:
        teacher: the teacher model; may be None only when `loss.alpha == 0` (plain cross-entropy).
        loss_config: divergence, temperature, alpha and their parameters; `features` adds feature terms.
        kept_layers: the teacher layer each student layer was copied from (a student pruned from this
            teacher), for `loss.features.layer_map: auto`; None: any other student.
        additional_teachers: more teachers for the soft loss, combined with `teacher` as `loss.teachers` says
            (`losses.mixture`); they need the live primary teacher (not an offline cache).
        teacher_weight: the primary teacher's weight among several, before normalisation.
        Remaining arguments go to `transformers.Trainer`.
    """

    # compute_loss divides by the Trainer's global count of counted tokens (`num_items_in_batch`), so the
    # loss is already right for gradient accumulation: the Trainer must not divide it again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, teacher: PreTrainedModel | None, loss_config: LossConfig,
                 cached_teacher: bool = False, kept_layers: list[int] | None = None,
                 additional_teachers: Sequence[WeightedTeacher] = (), teacher_weight: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if teacher is None and loss_config.alpha > 0 and not cached_teacher:
            raise ValueError(f"loss.alpha = {loss_config.alpha} needs a teacher (or an offline teacher cache); "
                             "only alpha = 0 (plain CE) runs without one")
        if additional_teachers and (teacher is None or loss_config.alpha == 0):
            raise ValueError(
                f"additional teachers {[t.name for t in additional_teachers]} need the live primary teacher and "
                f"loss.alpha > 0 (got teacher={'None' if teacher is None else 'a model'}, alpha = {loss_config.alpha}"
                f"{', an offline teacher cache' if cached_teacher else ''}): an offline cache holds one teacher")
        self.loss_config = loss_config
        # Makes the Trainer count the tokens of the whole accumulated batch (labels[..., 1:] != -100).
        self.model_accepts_loss_kwargs = True
        self.teacher = self._prepare_teacher(teacher) if teacher is not None and loss_config.alpha > 0 else None
        # The other teachers and every teacher's weight (primary first); one teacher: weights (1.0,).
        self.ensemble = (TeacherEnsemble(additional_teachers, primary_weight=teacher_weight, device=self.args.device,
                                         prepare=self._prepare_teacher) if self.teacher is not None else None)
        self._parts: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._last_log_time = time.perf_counter()
        self._check_unsharded_heads()
        self.shared_vocab = self._shared_vocab()
        self.features = self._prepare_features(loss_config, kept_layers)
        self.on_policy = self._prepare_on_policy(loss_config)

    # -- set-up ---------------------------------------------------------------------------------------

    def _prepare_teacher(self, teacher: PreTrainedModel) -> nn.Module:
        teacher.eval()
        teacher.requires_grad_(False)
        if self.is_deepspeed_enabled:
            # ZeRO-3 shards the teacher like the student; other stages keep a full copy per rank.
            import copy

            import deepspeed

            ds_config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            ds_config.pop("optimizer", None)
            ds_config.pop("scheduler", None)
            if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
                ds_config["zero_optimization"] = {"stage": 0}
            engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
            engine.eval()
            return engine
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _check_unsharded_heads(self) -> None:
        """The chunked loss reads the output heads' weights between forwards, where DeepSpeed ZeRO-3 and FSDP keep
        them sharded (an empty or flat shard, not the (V, H) matrix): refuse it there, before the first step."""
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if (zero3 or self.is_fsdp_enabled) and self.loss_config.implementation == "chunked":
            raise ValueError(
                f"loss.implementation: chunked reads the output heads' weights outside the models' forward, where "
                f"{'DeepSpeed ZeRO-3' if zero3 else 'FSDP'} keeps them sharded. Train under DDP or DeepSpeed ZeRO-1/2 "
                "(the chunked loss's memory savings stay), or set loss.implementation: full, whose heads run as "
                "modules (ZeRO-3 gathers them; under FSDP wrap the output head as its own unit)")

    def _shared_vocab(self) -> int | None:
        """Logit width both models share when their output heads differ, else None.

        Checkpoints of one family often pad the vocabulary differently (151936 vs 152064); the stages
        check beforehand that the tokenizers agree, so the logits are compared over the shared ids.
        """
        if self.teacher is None:
            return None
        sizes = {vocab_size_of(self.accelerator.unwrap_model(self.model)), vocab_size_of(self._teacher_core),
                 *self.ensemble.vocab_sizes}
        return min(sizes) if len(sizes) > 1 else None

    def _prepare_features(self, cfg: LossConfig, kept_layers: list[int] | None) -> FeatureDistiller | None:
        if cfg.features is None:
            return None
        if self.teacher is None:
            raise ValueError("loss.features needs a live teacher's hidden states: an offline teacher cache has none, "
                             "and alpha = 0 loads no teacher; remove loss.features or distil from the live teacher")
        features = FeatureDistiller(cfg.features, self.accelerator.unwrap_model(self.model), self._teacher_core,
                                    kept_layers)
        features.projector.to(self.args.device)
        if self._projector_parameters(features) and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError(
                "loss.features.hidden_states with a student narrower than the teacher trains a projection beside the "
                "student, which DeepSpeed / FSDP do not shard or save here: train under DDP or a single device, or "
                "drop hidden_states (attention and attention_relations need no projection)")
        return features

    def _prepare_on_policy(self, cfg: LossConfig) -> OnPolicySampler | None:
        if cfg.on_policy is None:
            return None
        if self.teacher is None:
            raise ValueError("loss.on_policy needs a live teacher to score the student's responses: an offline teacher "
                             "cache has none, and alpha = 0 loads none; remove loss.on_policy or distil from the live "
                             "teacher with alpha > 0")
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if zero3 or self.is_fsdp_enabled:
            # Their sharded forward gathers parameters collectively, step by step: ranks whose responses end at
            # different lengths would wait on each other forever.
            raise ValueError("loss.on_policy decodes with the unwrapped student, which DeepSpeed ZeRO-3 and FSDP shard "
                             "across processes: train under DDP, DeepSpeed ZeRO-1/2 or a single device")
        # sampling settings the config leaves unset: the teacher's generation_config first, then the student's
        return OnPolicySampler(cfg.on_policy, self.processing_class, models=[
            ("teacher", self._teacher_core), ("student", self.accelerator.unwrap_model(self.model))])

    def _projector_parameters(self, features: FeatureDistiller | None = None) -> list[nn.Parameter]:
        features = features or getattr(self, "features", None)
        return list(features.projector.parameters()) if features is not None else []

    @property
    def _teacher_core(self) -> PreTrainedModel:
        teacher = self.teacher
        return getattr(teacher, "module", teacher)

    # -- loss -----------------------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        core = self.accelerator.unwrap_model(model)
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        position_ids = inputs.get("position_ids")  # padding-free batches (training.packing): one row, no mask
        mask, targets = counted_positions(inputs["labels"])  # (B, T-1), (N,)
        feats = self.features
        # Feature terms count the positions the logit loss counts, over (B, T); keys: every non-padding token.
        feature_mask = F.pad(mask, (0, 1), value=False)
        key_mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)

        with feats.capture(core, "student") if feats else nullcontext() as s_capture:
            hidden = final_hidden_states(model, core, input_ids, attention_mask,
                                         position_ids)[:, :-1][mask]  # (B, T, H) -> (N, H)
        t_hidden = t_feats = None
        t_hiddens: list[torch.Tensor] = []  # every teacher's (N, H_i), the primary first
        cross = "teacher_positions" in inputs  # a teacher with another tokenizer (data.cross): its own tokens
        if self.teacher is not None and not cross:
            with torch.inference_mode():
                with feats.capture(self._teacher_core, "teacher") if feats else nullcontext() as t_capture:
                    t_hidden = final_hidden_states(self.teacher, self._teacher_core, input_ids, attention_mask,
                                                   position_ids)
                t_hidden = t_hidden[:, :-1][mask]  # (N, H_t)
                t_feats = t_capture.features(key_mask) if feats else None
            # Inference tensors cannot be saved for backward: a normal copy of the (N, H_t) states is cheap.
            t_hidden = t_hidden.clone()
            t_feats = t_feats.clone() if t_feats is not None else None
            # The other teachers, one after another (their activations freed in between).
            t_hiddens = [t_hidden, *self.ensemble.hidden_states(input_ids, attention_mask, mask, position_ids)]

        cfg = self.loss_config
        options = dict(divergence=cfg.divergence, temperature=cfg.temperature, alpha=cfg.alpha,
                       jsd_beta=cfg.jsd_beta, skew=cfg.skew, num_items_in_batch=num_items_in_batch)
        weights = self.ensemble.weights if self.ensemble is not None else None
        if "teacher_ids" in inputs:
            # Offline teacher: its top-k log-probs (+ tail) came with the batch, in counted-position order.
            parts = cached_teacher_loss(core, hidden, inputs, targets, cfg, num_items_in_batch,
                                        chunk_size=cfg.chunk_size)
        elif cross:
            parts = self._cross_tokenizer_loss(core, hidden, mask, targets, inputs, num_items_in_batch)
        elif cfg.implementation == "chunked":
            # Heads and divergence fused, token chunk by token chunk: no (N, V) tensor is ever held.
            # Several teachers: each projected by its own head per chunk, then mixed or summed (loss.teachers).
            heads = [OutputHead.of(self._teacher_core), *self.ensemble.heads()] if t_hiddens else None
            parts = chunked_distillation_loss(
                hidden, OutputHead.of(core), t_hiddens or None, heads, targets, chunk_size=cfg.chunk_size,
                vocab_size=self.shared_vocab, teacher_weights=weights, teachers=cfg.teachers, **options,
            )
        else:
            student_logits = project(core, hidden)[:, : self.shared_vocab]  # (N, V)
            teacher_logits = []
            if t_hiddens:
                with torch.no_grad():
                    teacher_logits = [project(self._teacher_core, t_hidden),
                                      *self.ensemble.logits(t_hiddens[1:])]
                teacher_logits = [z[:, : self.shared_vocab] for z in teacher_logits]  # (N, V) each
            parts = multi_teacher_distillation_loss(student_logits, teacher_logits, targets, weights=weights,
                                                    teachers=cfg.teachers, **options)
        loss = parts.total
        terms: dict[str, torch.Tensor] = {}
        if feats is not None:
            s_feats = s_capture.features(key_mask)
            if model.training and torch.is_grad_enabled():
                feats.check_graph(s_feats)
            terms = feats.losses(s_feats, t_feats, feature_mask, key_mask, num_items_in_batch)
            loss = loss + feats.weighted_sum(terms)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # The global token count divides every rank's loss; DDP averages gradients over ranks: undo that.
            loss = loss * self.accelerator.num_processes

        mode = "train" if model.training else "eval"
        # Log per-token means of this micro-batch (independent of how the batch was split).
        n = max(int(parts.num_tokens), 1)
        scale = (float(num_items_in_batch) / n) if num_items_in_batch is not None else 1.0
        if cfg.alpha > 0:
            self._parts[mode]["loss_soft"].append(parts.soft.item() * scale)
        if parts.soft_per_teacher is not None and len(parts.soft_per_teacher) > 1:  # sum mode: each teacher's own
            for name, value in zip(self.ensemble.names, parts.soft_per_teacher.tolist()):
                self._parts[mode][f"loss_soft_{name}"].append(value * scale)
        if cfg.alpha < 1:
            self._parts[mode]["loss_hard"].append(parts.hard.item() * scale)
        for name, value in terms.items():  # unweighted, like loss_soft / loss_hard
            self._parts[mode][LOG_NAMES[name]].append(value.item() * scale)
        self._parts[mode]["counted_tokens"].append(float(parts.num_tokens))
        return (loss, {"loss_parts": parts}) if return_outputs else loss

    def _cross_tokenizer_loss(self, core: PreTrainedModel, hidden: torch.Tensor, mask: torch.Tensor,
                              targets: torch.Tensor, inputs: dict[str, torch.Tensor],
                              num_items_in_batch: torch.Tensor | int | None) -> LossParts:
        """A teacher with another tokenizer (`data.cross`): hard CE on every counted student token, and the
        tokenizer-free ULD (loss.divergence 'uld') at the counted positions lined up with a teacher position, where
        the teacher read the same text in its own tokens. Both are divided by the count of counted student tokens,
        so a position without a partner adds nothing to the soft term (`aligned_share` in data/split.json says how
        many have one)."""
        cfg = self.loss_config
        head = OutputHead.of(core)
        # The whole micro-batch's count: the soft term, over the lined-up rows only, must use the same divisor.
        count = num_items_in_batch if num_items_in_batch is not None else targets.shape[0]
        hard = soft = None
        if cfg.alpha < 1:
            hard = chunked_distillation_loss(hidden, head, None, None, targets, alpha=0.0, num_items_in_batch=count,
                                             chunk_size=cfg.chunk_size)
        if self.teacher is not None:
            partner = inputs["teacher_positions"][:, 1:][mask]  # (N,): the teacher row of each counted row, or -1
            aligned = partner >= 0
            rows = mask.nonzero()[:, 0][aligned]  # (M,): their sequence in the batch
            with torch.inference_mode():
                states = final_hidden_states(self.teacher, self._teacher_core, inputs["teacher_input_ids"],
                                             inputs["teacher_attention_mask"])
                t_hidden = states[rows, partner[aligned]]  # (M, H_t)
            soft = chunked_distillation_loss(
                hidden[aligned], head, t_hidden.clone(), OutputHead.of(self._teacher_core), targets[aligned],
                divergence="uld", temperature=cfg.temperature, alpha=1.0, num_items_in_batch=count,
                chunk_size=cfg.chunk_size)
        ref = hard if hard is not None else soft
        zero = ref.total.detach().new_zeros(())
        return LossParts(total=mix_soft_and_hard(None if soft is None else soft.total,
                                                 None if hard is None else hard.total, cfg.alpha),
                         soft=zero if soft is None else soft.soft, hard=zero if hard is None else hard.hard,
                         num_tokens=mask.sum())

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The micro-batches of one optimizer step; on an on-policy step (loss.on_policy), the student's responses to
        their prompts, and the count of counted tokens (the loss's divisor) taken over those responses."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.on_policy is None:  # (only the training loop calls this: evaluation batches stay as they are)
            return batches, num_items_in_batch
        step = self.state.global_step  # optimizer steps done so far: this step's index, restored on resume
        new = self.on_policy.step_batches(self.accelerator.unwrap_model(self.model), batches, step=step,
                                          rank=self.args.process_index)
        if new is batches:
            return batches, num_items_in_batch
        return new, self._get_num_items_in_batch(new, device)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

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
                "projection); resume with the loss it was trained with, or start afresh (`alambic ... --restart`)")
        device = next(self.features.projector.parameters()).device
        # In place: the optimizer already holds these parameters.
        self.features.projector.load_state_dict(load_file(str(path), device=str(device)))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        parts = self._parts[mode]
        if parts:
            tokens = parts.pop("counted_tokens", [])
            if mode == "train":
                if self.on_policy is not None:  # the decoding's own cost, apart from the update
                    logs.update(self.on_policy.stats.pop())
                now = time.perf_counter()
                logs["tokens_per_second"] = round(sum(tokens) / max(now - self._last_log_time, 1e-9), 1)
                self._last_log_time = now
                if torch.cuda.is_available():
                    logs["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            for key, values in parts.items():
                # token-weighted mean: the loss over all tokens seen since the last log
                value = finite_mean(values, tokens if tokens else None)
                if value is not None:
                    logs[("eval_" if mode == "eval" else "") + key] = round(value, 6)
            parts.clear()
        super().log(logs, *args, **kwargs)
