"""The offline teacher (`data.teacher_cache`): its top-k log-probabilities and the tail's mass at each counted
position, read from the cache written before training and brought by the batches (`data.cache.CachedTeacherCollator`);
the source `CachedTopK` (its batches check the cache against the data before any step), and the student's loss
against those rows, walked over token chunks.

The teacher side is already small, (N, k) per batch; the student's logits are the (N, V) problem. Each
chunk of `chunk_size` counted positions is projected through the student's head and scored by
`topk_distillation_loss`, fused with the head as the live-teacher loss is (`losses.chunked.chunked_head_loss`):
the chunk's gradients are taken in the forward, so one (chunk, V) logits block is alive at a time and the
backward recomputes nothing; the logits' gradient is in closed form (`losses.topk.topk_loss_and_logit_grad`),
which walks the block a third as often as autograd through the top-k buckets.

Every chunk is reduced with the whole call's denominator (`num_items_in_batch`, or the call's own
count of counted tokens), so the chunks' parts add up to the unchunked loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor
from transformers import PreTrainedModel

from alambic.combinations import CACHED, DECLARED
from alambic.data.cache.read import TEACHER_KEYS, CachedTeacherCollator, with_cached_rows
from alambic.layout import SPLITS
from alambic.losses.chunked import check_counted_rows, chunked_head_loss, resolve_chunk_size
from alambic.losses.divergences import IGNORE_INDEX, LossParts
from alambic.losses.topk import check_teacher_rows, check_topk_options, topk_loss_and_logit_grad
from alambic.sharding import head_rows, through_heads
from alambic.teachers.base import Batches, BatchSettings, NoLiveTeacher, Requirements, SoftLoss, StudentStep

if TYPE_CHECKING:
    from alambic.config import LossConfig
    from alambic.data import PreparedData

__all__ = ["TEACHER_KEYS", "CachedTopK", "OfflineCache", "cached_teacher_loss"]


def cached_teacher_loss(
    core: PreTrainedModel,
    hidden: Tensor,
    batch: dict[str, Any],
    targets: Tensor,
    loss_config: Any,
    num_items_in_batch: int | Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | str = 1024,
) -> LossParts:
    """`topk_distillation_loss(project(core, hidden), teacher rows, targets, ...)`, chunk by chunk.

    Args:
        core: the unwrapped student (its output head, logit scale and soft-capping are applied by
            `modeling.project`).
        hidden: (N, H) the student's final hidden states at the counted positions, in the row-major
            order of `hidden[:, :-1][mask]`, the order `CachedTeacherCollator` concatenates the rows in.
        batch: holds `teacher_ids` (N, k), `teacher_logprobs` (N, k), `teacher_tail` (N,) (not needed
            when `loss_config.alpha == 0`).
        targets: (N,) label ids at those positions (-100: not counted).
        loss_config: anything with alpha, divergence, temperature and divergence_spec (a `LossConfig`).
            `temperature` must be the cache's.
        num_items_in_batch: global count of counted tokens (gradient accumulation, data parallel); None:
            this call's count.
        vocab_size: score only the first `vocab_size` student logits (the vocabulary shared with the
            teacher); None: all of them.
        chunk_size: counted positions projected at once, or "auto" (`losses.chunked.resolve_chunk_size`).

    Returns:
        LossParts: `total` carries the gradient (to `hidden` and the head's parameters); `soft` and
        `hard` are detached, for logging.

    Raises:
        ValueError: rows that do not line up, ids outside the scored vocabulary, options out of range.
    """
    cfg = loss_config
    check_topk_options(cfg.divergence, cfg.alpha, cfg.temperature)
    head_vocab = head_rows(core)  # (a ZeRO-3 partition is empty: its full shape is kept aside)
    chunk_size = resolve_chunk_size(chunk_size, head_vocab)
    n = check_counted_rows(hidden, targets, chunk_size, names=("hidden", "targets"))
    if vocab_size is not None and not 1 <= vocab_size <= head_vocab:
        raise ValueError(f"vocab_size must be in [1, {head_vocab}] (the student head's size), got {vocab_size}")
    vocab = head_vocab if vocab_size is None else vocab_size

    use_teacher = cfg.alpha > 0.0
    if use_teacher:
        missing = [key for key in TEACHER_KEYS if batch.get(key) is None]
        if missing:
            raise ValueError(
                f"the batch has no {', '.join(missing)}: a cached teacher's rows come from CachedTeacherDataset and "
                "CachedTeacherCollator"
            )
        ids, logprobs, tail = (batch[key] for key in TEACHER_KEYS)
        check_teacher_rows(n, vocab, ids, logprobs, tail, cfg.alpha)  # once per call: it syncs the device
    else:
        ids = logprobs = tail = None

    # The whole call's denominator, given to every chunk's reduction, so the chunks add up.
    denominator = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    options = dict(divergence=cfg.divergence_spec, alpha=cfg.alpha, num_items_in_batch=denominator)

    def chunk_loss(logits: Tensor, rows: slice) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        parts, dlogits = topk_loss_and_logit_grad(
            logits.detach(), *(None if t is None else t[rows] for t in (ids, logprobs, tail)), targets[rows], **options
        )
        return parts.total, parts.soft, parts.hard, dlogits

    # run as the head's forward: FSDP / ZeRO-3 gather it where they shard it (`sharding.through_heads`)
    return through_heads(
        [core],
        lambda heads, rows: chunked_head_loss(
            rows, heads[0], targets, chunk_loss, vocab_size=vocab, chunk_size=chunk_size
        ),
        hidden,
    )


@dataclass(frozen=True)
class OfflineCache:
    """Where an offline cache is, and what each split's cache must have been made from.

    Attributes:
        folder: one cache per split (`train/`, `validation/`), as the cache stage writes them.
        fingerprint: a split's dataset -> the fingerprint its cache must carry (`data.cache.cache_fingerprint` of
            the run's teacher, tokenizer, k and temperature).
    """

    folder: Path
    fingerprint: Callable[[Any], dict[str, Any]]


class CachedTopK(NoLiveTeacher):
    """The offline teacher as a source: `cached_teacher_loss` on the rows the batches bring (`CachedTeacherCollator`);
    no teacher model is loaded while the student trains.

    Args:
        cache: where its batches read the rows from; None: a source for the loss alone (a trainer given batches that
            already carry the rows), which cannot make batches.
    """

    name: ClassVar[str] = CACHED
    requirements: ClassVar[Requirements] = replace(DECLARED[CACHED], columns=TEACHER_KEYS)

    def __init__(self, cache: OfflineCache | None = None):
        self.cache = cache

    def batches(self, data: PreparedData, settings: BatchSettings) -> Batches:
        """Each split with its cached rows, the cache checked against the split first (complete, made from this
        teacher, tokenizer, data, k and temperature: `data.cache.with_cached_rows`).

        Raises:
            ValueError: no `cache` was given.
            FileNotFoundError, CacheMismatchError: a split's cache is incomplete, or was made for something else.
        """
        if self.cache is None:
            raise ValueError(
                "CachedTopK() was made without its cache, so it cannot bring the teacher's rows to the "
                "batches: pass teachers.choose(..., cached=OfflineCache(folder, fingerprint))"
            )
        train, validation = (
            with_cached_rows(
                getattr(data, split), Path(self.cache.folder) / split, self.cache.fingerprint(getattr(data, split))
            )
            for split in SPLITS
        )
        return Batches(train, validation, CachedTeacherCollator(pad_token_id=settings.pad_token_id))

    def soft_loss(self, step: StudentStep, loss: LossConfig) -> SoftLoss:
        # The rows came with the batch, in counted-position order.
        return SoftLoss(
            cached_teacher_loss(
                step.core,
                step.hidden,
                step.inputs,
                step.targets,
                loss,
                step.num_items_in_batch,
                chunk_size=loss.chunk_size,
            )
        )
