"""Quality against the teacher on held-out data: perplexity, top-1/top-5 agreement, KL(teacher || student),
each with a bootstrap interval over held-out sequences."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from rich.progress import track
from torch.utils.data import DataLoader, Subset
from transformers import PreTrainedModel

from alambic import distributed
from alambic.data import DistillationCollator
from alambic.evaluation.bootstrap import SUMS, bootstrap_intervals, metrics_from_sums
from alambic.losses import forward_kl, token_cross_entropy
from alambic.modeling import counted_positions, final_hidden_states, project
from alambic.models import count_parameters
from alambic.utils import console

TOP_K = 5
EVAL_CHUNK = 512  # counted tokens whose logits are held at once
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE = 1000, 0, 0.95


@torch.inference_mode()
def evaluate_against_teacher(
    teacher: PreTrainedModel,
    models: dict[str, PreTrainedModel],
    dataset,
    *,
    pad_token_id: int,
    batch_size: int = 8,
    teacher_pad_token_id: int | None = None,
    description: str = "held-out data",
    across_ranks: bool = False,
) -> dict[str, dict[str, Any]]:
    """Score the teacher and each model on the same held-out batches.

    Per model, over the counted tokens (labels != -100, causal shift):
      perplexity = exp(mean token cross-entropy); top1_agreement = share of positions where
      argmax model == argmax teacher; top5_agreement = share where the teacher's argmax is among the
      model's 5 most likely tokens; kl_to_teacher = mean KL(P_teacher || Q_model) at T = 1.
    Each metric also gets a 95 % percentile-bootstrap interval over held-out sequences
    (`evaluation.bootstrap`, 1000 resamples, fixed seed, the same resampled sets for every model).

    A teacher with another tokenizer (`dataset` made by `data.cross`, `teacher_pad_token_id` given): the teacher
    reads the same texts in its own tokens, and its summed cross-entropy over them is divided by the students' count
    of tokens of the same texts: a perplexity per student token, comparable with theirs (the teacher's own count is
    `own_tokens`). Agreement and KL, defined only over one vocabulary, are None.

    `dataset`: a `datasets.Dataset` or a list of tokenized samples; `description` names it in the progress bar.

    `across_ranks`: under a launcher, every rank calls it and scores its share of the batches (the batches one process
    would score, so the same sums); rank 0 puts the per-sequence sums together in order and computes the figures and
    intervals over all of them, which every rank returns: the figures of one process. False (a caller that runs on
    one rank alone): this process scores everything.

    Returns:
        {name: {"perplexity", "cross_entropy", "top1_agreement", "top5_agreement", "kl_to_teacher",
        "intervals": {metric: [low, high]}, "num_tokens", "num_sequences", "parameters", ...}},
        the teacher under the key "teacher".
    """
    cross = teacher_pad_token_id is not None
    collator = DistillationCollator(pad_token_id, teacher_pad_token_id=teacher_pad_token_id)
    if across_ranks:  # this rank's share of one process's batches: the same batches, so the same padding and sums
        batches = distributed.my_share(-(-len(dataset) // batch_size))
        dataset = Subset(dataset, range(batches.start * batch_size, min(batches.stop * batch_size, len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    everyone = {"teacher": teacher, **models}
    # (models, the columns they read, the model they are compared with): one tokenizer, everyone against the teacher;
    # across tokenizers, the teacher on its own tokens, the others on theirs, nothing compared token by token.
    groups = [({"teacher": teacher}, "teacher_", None), (models, "", None)] if cross else [(everyone, "", "teacher")]
    # Per-sequence sums (float64, on CPU): the bootstrap resamples sequences, so it needs nothing else.
    per_seq: dict[str, dict[str, list[torch.Tensor]]] = {name: {k: [] for k in SUMS} for name in everyone}
    for m in everyone.values():
        m.eval()
    for batch in track(
        loader,
        description=f"evaluating {len(everyone)} models on {description}",
        console=console,
        disable=across_ranks and not distributed.is_main(),
    ):
        for group, prefix, reference in groups:
            for name, sums in (_score_batch(group, batch, prefix, reference) if group else {}).items():
                for key in SUMS:
                    per_seq[name][key].append(sums[key])
    # {name: {sum: (S,)}}, S the sequences scored here
    sums = {
        name: {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in by_key.items()}
        for name, by_key in per_seq.items()
    }
    if not across_ranks:
        return _summarise(everyone, sums, cross=cross)
    gathered = distributed.gather_to_main(sums)
    return distributed.on_main(
        f"evaluation on {description}: the figures over every rank's sequences",
        lambda: _summarise(everyone, _concatenated(gathered), cross=cross),
    )


def _concatenated(shares: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """The ranks' per-sequence sums, one array per model and sum, in rank order: the sequences' own order."""
    return {name: {k: np.concatenate([share[name][k] for share in shares]) for k in SUMS} for name in shares[0]}


def _summarise(
    everyone: dict[str, PreTrainedModel], sums: dict[str, dict[str, np.ndarray]], *, cross: bool
) -> dict[str, dict[str, Any]]:
    """The figures, intervals and counts of each model from its per-sequence sums ((S,) arrays)."""
    models = [name for name in everyone if name != "teacher"]
    own_tokens = {}
    if cross and models:  # the teacher's cross-entropy per student token of the same texts
        own_tokens = {name: int(sums[name]["tokens"].sum()) for name in everyone}
        sums["teacher"] = {**sums["teacher"], "tokens": sums[models[0]]["tokens"]}
    results = {}
    for name, model in everyone.items():
        totals = {k: float(v.sum()) for k, v in sums[name].items()}
        n_tokens = int(totals["tokens"])
        params = count_parameters(model)
        metrics = metrics_from_sums(**totals)
        intervals = bootstrap_intervals(
            sums[name], resamples=BOOTSTRAP_RESAMPLES, confidence=CONFIDENCE, seed=BOOTSTRAP_SEED
        )
        if cross:  # no common vocabulary: only the perplexity means something
            metrics.update(top1_agreement=None, top5_agreement=None, kl_to_teacher=None)
            intervals = {"perplexity": intervals["perplexity"]}
        results[name] = {
            **metrics,
            "cross_entropy": totals["ce"] / max(n_tokens, 1),
            "intervals": intervals,
            "num_tokens": n_tokens,
            "num_sequences": len(sums[name]["tokens"]),
            "parameters": params["total"],
            "non_embedding_parameters": params["non_embedding"],
            "num_layers": getattr(model.config, "num_hidden_layers", None),
            **({"own_tokens": own_tokens[name]} if own_tokens else {}),
        }
    return results


def _score_batch(
    models: dict[str, PreTrainedModel], batch: dict[str, torch.Tensor], prefix: str, reference: str | None
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-sequence sums of one batch for `models`, which read the `prefix` columns (input_ids, attention_mask,
    labels), compared with model `reference` (None: agreement and KL left at 0)."""
    mask, targets = counted_positions(batch[prefix + "labels"])  # (B, T-1), (N,)
    # (N,): the sequence of each counted token (mask is flattened row-major, like the hidden states)
    seq_of_token = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]
    hidden = {}  # name -> (N, H): every model's final hidden states at the counted positions
    for name, model in models.items():
        device = next(model.parameters()).device
        ids, att = batch[prefix + "input_ids"].to(device), batch[prefix + "attention_mask"].to(device)
        hidden[name] = final_hidden_states(model, model, ids, att)[:, :-1][mask.to(device)]
    batch_sums = {name: {k: torch.zeros(mask.shape[0], dtype=torch.float64) for k in SUMS} for name in models}
    # Logits a chunk of tokens at a time: (chunk, V) temporaries of one fixed size, never (N, V) per model
    # (with several models those dominated the process's memory).
    for start in range(0, len(seq_of_token), EVAL_CHUNK):
        rows = slice(start, start + EVAL_CHUNK)
        seqs = seq_of_token[rows]
        ref = project(models[reference], hidden[reference][rows]).float() if reference else None  # (n, V)
        for name, model in models.items():
            logits = ref if name == reference else project(model, hidden[name][rows]).float()  # (n, V)
            per_token = {
                "ce": token_cross_entropy(logits, targets[rows].to(logits.device)),
                "tokens": torch.ones(len(seqs)),
            }
            if ref is not None:
                v = min(logits.shape[-1], ref.shape[-1])
                tl = ref.to(logits.device)[:, :v]
                t_top = tl.argmax(-1, keepdim=True)  # (n, 1)
                top = logits[:, :v].topk(min(TOP_K, v), dim=-1).indices  # (n, 5)
                # argmax, not top[:, 0]: topk orders ties arbitrarily, argmax as the teacher's own (so teacher = 1)
                per_token.update(
                    agree1=logits[:, :v].argmax(-1, keepdim=True) == t_top,
                    agree5=(top == t_top).any(-1),
                    kl=forward_kl(logits[:, :v], tl),
                )
            for key, values in per_token.items():
                batch_sums[name][key].index_add_(0, seqs, values.reshape(-1).double().cpu())
    return batch_sums
