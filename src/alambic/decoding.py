"""The decoding engine: batched generation with a KV cache, stopping at eos and the chat template's end-of-turn tokens,
greedy or sampled from a seeded generator, with a progress bar.

One engine for every caller: the teacher's responses (`data.generate`), the student's on-policy samples
(`training.on_policy`, from token ids) and the responses scored at evaluation (`evaluation.suite`), so all decode
the same way.

It is plain decoding written out rather than delegated to `model.generate`: that one fills every setting left unset
from the checkpoint's `generation_config` (a repetition penalty, a default temperature...), which would make
"greedy" mean something different per model, and it samples from torch's global generator. Here greedy is argmax
and nothing else, and sampling draws from a `torch.Generator` seeded by the caller.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Literal

import torch

from alambic.tokens import end_of_turn_tokens, leading_bos
from alambic.utils import console

FinishReason = Literal["stop", "length"]


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a response: eos and the chat template's end-of-turn tokens (`<|im_end|>`, `<|eot_id|>`...).

    Raises:
        ValueError: the tokenizer has none of them (a response could only end at the length cap).
    """
    ids = set()
    for token in end_of_turn_tokens(tokenizer):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos or end-of-turn token: responses "
            "could not stop; set tokenizer.eos_token"
        )
    return sorted(ids)


@torch.inference_mode()
def generate_responses(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    description: str = "generating",
    with_tokens: bool = False,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """The model's response to each conversation, rendered with the tokenizer's chat template.

    Each conversation is rendered with `add_generation_prompt=True` (the text ends where the assistant's
    answer starts) and decoded until a stop token (`stop_token_ids`) or `max_new_tokens`. Prompts are
    batched longest first with left padding, so every row's next token sits in the last column; under
    greedy decoding a batch gives the same responses as one prompt at a time. Logits of ids the tokenizer
    does not have (a model vocabulary padded past it) are never picked.

    Args:
        model: a causal LM; it is run in eval mode and put back in the mode it was in.
        tokenizer: its tokenizer, with a chat template; not modified.
        conversations: lists of {"role", "content"} messages, each ending before the turn to generate.
        max_new_tokens: cap on generated tokens per response, stop token included.
        batch_size: conversations decoded together.
        temperature: 0: greedy (argmax). > 0: sample from softmax(logits / temperature), after the
            top-k, then top-p (nucleus: the smallest set of most likely tokens holding top_p of the mass) filters.
        top_p: nucleus mass in (0, 1]; 1 keeps every token. Used only when sampling.
        top_k: keep the k most likely tokens; 0 keeps every token. Used only when sampling.
        seed: seed of the sampling generator (the same seed, batch size and inputs give the same responses).
        description: label of the progress bar.
        with_tokens: also return each response's token ids and its prompt's length (`data.generate` keeps
            them to count tokens and to detect repetition loops).
        show_progress: draw the progress bar (a caller with its own bar over many calls turns it off).

    Returns:
        One dict per conversation, in order: {"response": decoded text, special tokens skipped, stripped;
        "num_tokens": generated tokens up to and including the stop token; "finish_reason": "stop" when a
        stop token was produced, "length" when the cap was hit first}; with `with_tokens`, also
        "token_ids": the `num_tokens` generated ids (stop token included, no padding) and "prompt_tokens":
        the rendered prompt's length in tokens.

    Raises:
        ValueError: an argument out of range, a tokenizer without a chat template or stop token, or a
            conversation the template cannot render.
    """
    _check_generation_args(max_new_tokens, batch_size, temperature, top_p, top_k)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: responses are generated "
            "from chat prompts; use an instruct model's tokenizer or set tokenizer.chat_template"
        )
    if not conversations:
        return []
    prompts = encode_prompts(tokenizer, conversations)
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]  # masked: any valid id
    device = next(model.parameters()).device
    stop_tensor, stop_set = torch.tensor(stops, device=device), set(stops)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "generator": generator}
    # Longest first: prompts of similar length share a batch (less padding), and running out of memory
    # shows on the first batch rather than the last.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[dict[str, Any]] = [{} for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with progress_bar(disable=not show_progress) as bar:
            task = bar.add_task(description, total=len(prompts), rate="-")
            started, generated = time.perf_counter(), 0

            def on_step(active_rows: int) -> None:
                nonlocal generated
                generated += active_rows
                bar.update(task, rate=f"{generated / max(time.perf_counter() - started, 1e-9):,.0f}")

            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                ids, attention = _left_pad([prompts[i] for i in rows], pad_id)
                new = _decode(
                    model,
                    ids.to(device),
                    attention.to(device),
                    max_new_tokens=max_new_tokens,
                    stop_ids=stop_tensor,
                    pad_id=pad_id,
                    vocab_size=len(tokenizer),
                    on_step=on_step,
                    **sampling,
                )
                for row, index in zip(new.tolist(), rows):
                    results[index] = _response(row, stop_set, tokenizer)
                    if with_tokens:
                        results[index]["token_ids"] = row[: results[index]["num_tokens"]]
                        results[index]["prompt_tokens"] = len(prompts[index])
                bar.advance(task, len(rows))
    finally:
        model.train(was_training)
    return results


@torch.inference_mode()
def generate_token_responses(
    model,
    prompts: list[list[int]],
    *,
    stop_ids: list[int],
    pad_id: int,
    vocab_size: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> list[list[int]]:
    """Responses to prompts that are already token ids, decoded together as one batch (KV cache, left padding).

    The decoding of `generate_responses` without the chat rendering, batching and progress bar: for callers that
    hold token ids already (on-policy distillation cuts its prompts out of training sequences).

    Args:
        model: a causal LM; it is run in eval mode and put back in the mode it was in.
        prompts: one list of token ids per row, none empty.
        stop_ids: ids that end a response (`stop_token_ids(tokenizer)`).
        pad_id: id put left of the shorter prompts (masked out; any valid id).
        vocab_size: ids at or above it (a model vocabulary padded past its tokenizer) are never picked.
        max_new_tokens, temperature, top_p, top_k, seed: as in `generate_responses`.

    Returns:
        Per prompt, in order, its new ids up to and including the first stop token (all `max_new_tokens` of them
        when none was produced); never empty, never padded.
    Raises:
        ValueError: an argument out of range, no prompt, or an empty prompt.
    """
    _check_generation_args(max_new_tokens, 1, temperature, top_p, top_k)
    empty = [i for i, p in enumerate(prompts) if not p]
    if not prompts or empty:
        which = "no prompt" if not prompts else f"empty prompts at rows {empty}"
        raise ValueError(f"generate_token_responses: {which}; every row needs at least one token to continue")
    device = next(model.parameters()).device
    ids, attention = _left_pad(prompts, pad_id)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    was_training = model.training
    model.eval()
    try:
        new = _decode(
            model,
            ids.to(device),
            attention.to(device),
            max_new_tokens=max_new_tokens,
            stop_ids=torch.tensor(stop_ids, device=device),
            pad_id=pad_id,
            vocab_size=vocab_size,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            generator=generator,
            on_step=lambda _rows: None,
        )
    finally:
        model.train(was_training)
    stops = set(stop_ids)
    responses = []
    for row in new.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        responses.append(row if end is None else row[: end + 1])  # the stop token kept: it is learned too
    return responses


def _check_generation_args(max_new_tokens: int, batch_size: int, temperature: float, top_p: float, top_k: int) -> None:
    problems = [
        f"{name} = {value!r} {rule}"
        for name, value, ok, rule in (
            ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "must be >= 1"),
            ("batch_size", batch_size, batch_size >= 1, "must be >= 1"),
            ("temperature", temperature, temperature >= 0, "must be >= 0 (0: greedy)"),
            ("top_p", top_p, 0 < top_p <= 1, "must be in (0, 1] (1: no nucleus filter)"),
            ("top_k", top_k, top_k >= 0, "must be >= 0 (0: no top-k filter)"),
        )
        if not ok
    ]
    if problems:
        raise ValueError("generate_responses: " + "; ".join(problems))


def encode_prompts(tokenizer, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
    """Each conversation rendered with the generation prompt, as token ids; BOS in front where the tokenizer's
    convention asks for one and the rendering has none (`tokens.leading_bos`), as in training.

    Raises:
        ValueError: the chat template cannot render a conversation.
    """
    texts = []
    for index, conversation in enumerate(conversations):
        try:
            texts.append(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
        except Exception as exc:  # noqa: BLE001 - templates raise anything (jinja errors, their own checks)
            raise ValueError(
                f"conversation {index} could not be rendered by the chat template ({type(exc).__name__}: {exc}); "
                "it must be a list of {'role', 'content'} messages in an order the template accepts"
            ) from exc
    # The rendering carries its own role markers (and bos in some templates): add nothing else but the BOS the
    # tokenizer's convention asks for, as in training (data.tokenize.chat_ids_and_labels).
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [leading_bos(tokenizer, ids) + ids for ids in encoded]


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, L) input_ids padded on the left with `pad_id`, and the (B, L) attention mask."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention[row, length - len(seq) :] = 1
    return ids, attention


def _decode(
    model,
    ids: torch.Tensor,
    attention: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: torch.Tensor,
    pad_id: int,
    vocab_size: int,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None,
    on_step,
) -> torch.Tensor:
    """(B, L) left-padded prompts -> (B, n) new tokens, n <= max_new_tokens; `pad_id` after a row's stop token."""
    # Positions count real tokens only: a left-padded prompt starts at position 0, as it would alone.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, **extra)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :vocab_size].float()  # (B, V'): ids the tokenizer can decode
        chosen = _choose(logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)  # (B,)
        chosen = torch.where(done, torch.full_like(chosen, pad_id), chosen)
        tokens.append(chosen)
        on_step(int((~done).sum()))
        done = done | torch.isin(chosen, stop_ids)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=chosen[:, None],
            attention_mask=attention,
            position_ids=positions,
            past_key_values=out.past_key_values,
            use_cache=True,
            **extra,
        )
    return torch.stack(tokens, dim=1)


def _choose(
    logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax at temperature 0, else a draw after the top-k and top-p filters."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.softmax(-1)
        # keep a token while the more likely ones hold less than top_p: the most likely is always kept
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, ranked.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _response(tokens: list[int], stops: set[int], tokenizer) -> dict[str, Any]:
    end = next((i for i, t in enumerate(tokens) if t in stops), None)
    content = tokens if end is None else tokens[:end]  # the stop token itself is not part of the text
    return {
        "response": tokenizer.decode(content, skip_special_tokens=True).strip(),
        "num_tokens": len(tokens) if end is None else end + 1,
        "finish_reason": "length" if end is None else "stop",
    }


def progress_bar(disable: bool = False):
    """The decoding progress bar (prompts done of total, tokens per second in the task's `rate` field, time left):
    `generate_responses` draws it per call; a caller that loops over many calls (`data.generate`) draws one over all
    of them and turns the calls' own off."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("prompts"),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=disable,
    )
