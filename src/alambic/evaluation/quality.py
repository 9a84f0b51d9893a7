"""Quality against the teacher on held-out data: perplexity, top-1 agreement, KL(teacher || student)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from alambic.data import DistillationCollator
from alambic.losses import forward_kl, token_cross_entropy
from alambic.models import count_parameters
from alambic.modeling import counted_positions, final_hidden_states, project
from rich.progress import track

from alambic.utils import console


@torch.inference_mode()
def evaluate_against_teacher(
    teacher: PreTrainedModel,
    models: dict[str, PreTrainedModel],
    dataset,
    *,
    pad_token_id: int,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Score the teacher and each model on the same held-out batches.

    Per model, over the counted tokens (labels != -100, causal shift):
      perplexity = exp(mean token cross-entropy); top1_agreement = share of positions where
      argmax student == argmax teacher; kl_to_teacher = mean KL(P_teacher || Q_student) at T = 1.

    Returns:
        {name: {"perplexity", "top1_agreement", "kl_to_teacher", "num_tokens", "parameters", ...}},
        the teacher under the key "teacher".
    """
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=DistillationCollator(pad_token_id))
    everyone = {"teacher": teacher, **models}
    sums = {name: {"ce": 0.0, "agree": 0.0, "kl": 0.0} for name in everyone}
    n_tokens = 0
    for m in everyone.values():
        m.eval()
    for batch in track(loader, description=f"evaluating {len(everyone)} models on held-out data", console=console):
        mask, targets = counted_positions(batch["labels"])
        n_tokens += int(mask.sum())
        t_logits = None
        for name, model in everyone.items():
            device = next(model.parameters()).device
            ids, att = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            hidden = final_hidden_states(model, model, ids, att)[:, :-1][mask.to(device)]  # (N, H)
            logits = project(model, hidden).float()  # (N, V)
            if t_logits is None:
                t_logits = logits
            v = min(logits.shape[-1], t_logits.shape[-1])
            tl = t_logits.to(logits.device)[:, :v]
            sums[name]["ce"] += token_cross_entropy(logits, targets.to(device)).sum().item()
            sums[name]["agree"] += (logits[:, :v].argmax(-1) == tl.argmax(-1)).sum().item()
            sums[name]["kl"] += forward_kl(logits[:, :v], tl).sum().item()
    n = max(n_tokens, 1)
    results = {}
    for name, model in everyone.items():
        s = sums[name]
        params = count_parameters(model)
        results[name] = {
            "perplexity": math.exp(min(s["ce"] / n, 700.0)),
            "cross_entropy": s["ce"] / n,
            "top1_agreement": s["agree"] / n,
            "kl_to_teacher": s["kl"] / n,
            "num_tokens": n_tokens,
            "parameters": params["total"],
            "non_embedding_parameters": params["non_embedding"],
            "num_layers": getattr(model.config, "num_hidden_layers", None),
        }
    return results
