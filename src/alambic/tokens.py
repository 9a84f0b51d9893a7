"""What a tokenizer puts at the edges of a sequence: the BOS in front, the tokens that end a turn.

Shared by data preparation (`data.tokenize`, `data.cross`, `data.classification`) and decoding (`decoding`), so
training sequences and generation prompts start and stop the same way. It knows nothing of either: it reads
the tokenizer only.
"""

from __future__ import annotations

import re

# Special tokens that close a turn, which the model must learn to emit (ChatML <|im_end|>, Llama 3
# <|eot_id|>, Gemma <end_of_turn>, </s>...). Start-of-turn tokens do not match.
_END_OF_TURN = re.compile(r"end|eot|eos|</s>", re.IGNORECASE)


def leading_bos(tokenizer, ids: list[int] | tuple[int, ...] = ()) -> list[int]:
    """The tokens to put in front of `ids` so the sequence starts as the tokenizer's own encoding does.

    `[bos_token_id]` where the tokenizer starts every encoded text with BOS (Gemma, Llama 3, Mistral: their models
    are badly off without it, a Gemma 3 perplexity of 658 instead of 30 on news text) and `ids` do not start with
    it already (a chat template that renders BOS itself); `[]` otherwise (SmolLM2, GPT-2: no BOS). Every place that
    makes a sequence from pieces encoded with `add_special_tokens=False` calls this, so each model sees sequences
    that start as in its own training; the BOS is never counted in the labels.

    Decided from what the tokenizer does, not from a flag: encoding "x" with and without its special tokens.
    """
    bos = tokenizer.bos_token_id
    if bos is None or (len(ids) > 0 and ids[0] == bos):
        return []
    with_special = tokenizer("x")["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    adds = len(with_special) > len(without) and with_special[0] == bos and without[:1] != [bos]
    return [bos] if adds else []


def end_of_turn_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens that end a turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`...), its eos
    included, longest first: a rendering is matched against them in that order, so a token that is a prefix of a
    longer one never cuts it short."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    ends = {t for t in special if _END_OF_TURN.search(t)}
    if tokenizer.eos_token:
        ends.add(tokenizer.eos_token)
    return sorted(ends, key=len, reverse=True)
