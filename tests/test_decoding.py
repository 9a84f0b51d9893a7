"""alambic.decoding: batched decoding against a cache-free loop, stops, sampling, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alambic.decoding import _choose, _left_pad, generate_responses, stop_token_ids
from helpers import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. What is your name?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Markets"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Parliament?"},
    ],
    [{"role": "user", "content": "A new phone was released with a faster chip."}],
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    # untied: a tied random model maps a token's state back onto the same token and greedily repeats it forever
    return tiny_model(tie=False)


def _prompt_ids(tok, conversation) -> list[int]:
    return tok(
        tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]


def _reference_greedy(model, tok, conversation, max_new_tokens: int) -> dict:
    """The slow twin: no padding, no cache, the whole sequence through the model for every new token."""
    ids = _prompt_ids(tok, conversation)
    stops = set(stop_token_ids(tok))
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1, : len(tok)]
            new.append(int(logits.argmax()))
            if new[-1] in stops:
                return {
                    "response": tok.decode(new[:-1], skip_special_tokens=True).strip(),
                    "num_tokens": len(new),
                    "finish_reason": "stop",
                }
    return {
        "response": tok.decode(new, skip_special_tokens=True).strip(),
        "num_tokens": len(new),
        "finish_reason": "length",
    }


class _ForcedStop(torch.nn.Module):
    """Wraps a model: in rows whose prompt holds `marker`, the `at`-th new token is `stop_id` (logit +1e4)."""

    def __init__(self, inner, *, marker: int, stop_id: int, at: int):
        super().__init__()
        self.inner, self.marker, self.stop_id, self.at = inner, marker, stop_id, at

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        if input_ids.shape[1] > 1:  # the prompt pass: a new batch starts
            self.rows, self.step = (input_ids == self.marker).any(-1), 0
        else:
            self.step += 1
        if self.step == self.at - 1:
            out.logits[self.rows, -1, self.stop_id] += 1e4
        return out


def test_left_pad():
    ids, attention = _left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert attention.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_stop_tokens_are_eos_and_end_of_turn(tok):
    assert stop_token_ids(tok) == sorted(tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))


# gpt2 has absolute positions: a left-padded prompt must still start at 0 (RoPE alone would not notice a shift)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_batched_greedy_equals_one_at_a_time_and_a_cache_free_loop(tok, arch):
    model = tiny_model(arch, tie=False)
    reference = [_reference_greedy(model, tok, c, max_new_tokens=10) for c in CONVERSATIONS]
    assert len({r["response"] for r in reference}) > 1, "degenerate model: responses all alike, the test proves nothing"
    one_at_a_time = [generate_responses(model, tok, [c], max_new_tokens=10)[0] for c in CONVERSATIONS]
    assert one_at_a_time == reference
    for batch_size in (2, 5):  # prompts of different lengths share a batch: left padding must not matter
        assert generate_responses(model, tok, CONVERSATIONS, max_new_tokens=10, batch_size=batch_size) == reference


@pytest.mark.parametrize("stop", ["<|im_end|>", "<|endoftext|>"])
@pytest.mark.parametrize("at", [1, 4])
def test_stop_token_ends_its_row_only(tok, model, stop, at):
    stopping = CONVERSATIONS[2]  # the only one with a system turn
    others = set().union(*(_prompt_ids(tok, c) for c in CONVERSATIONS if c is not stopping))
    marker = next(iter(set(_prompt_ids(tok, stopping)) - others))
    forced = _ForcedStop(model, marker=marker, stop_id=tok.convert_tokens_to_ids(stop), at=at)
    out = generate_responses(forced, tok, CONVERSATIONS, max_new_tokens=6, batch_size=5)
    free = _reference_greedy(model, tok, stopping, max_new_tokens=at - 1)  # what it said before the stop
    assert out[2] == {"response": free["response"], "num_tokens": at, "finish_reason": "stop"}
    if at == 1:
        assert out[2]["response"] == ""
    for i, conversation in enumerate(CONVERSATIONS):
        if i != 2:  # the other rows of the batch run on unaffected, to the cap or their own stop
            assert out[i] == _reference_greedy(model, tok, conversation, max_new_tokens=6)
    assert sum(o["finish_reason"] == "length" and o["num_tokens"] == 6 for o in out) >= 2


def test_cap_of_one_token(tok, model):
    out = generate_responses(model, tok, CONVERSATIONS[:2], max_new_tokens=1)
    assert [(o["num_tokens"], o["finish_reason"]) for o in out] == [(1, "length")] * 2


def test_eval_mode_during_generation_and_restored(tok, model):
    modes = []
    handle = model.model.layers[0].register_forward_hook(lambda module, args, output: modes.append(module.training))
    try:
        model.train()
        generate_responses(model, tok, CONVERSATIONS[:2], max_new_tokens=3)
        assert model.training and all(m.training for m in model.modules())
        model.eval()
        generate_responses(model, tok, CONVERSATIONS[:2], max_new_tokens=3)
        assert not model.training
    finally:
        handle.remove()
        model.eval()
    assert modes and not any(modes)


def test_sampling_is_seeded_and_leaves_the_global_generator_alone(tok, model):
    def sample(**kw):
        return generate_responses(model, tok, CONVERSATIONS, max_new_tokens=8, batch_size=2, **kw)

    torch.manual_seed(123)
    first = sample(temperature=1.0, seed=7)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the draws came from the seeded generator, not torch's global one
    assert sample(temperature=1.0, seed=7) == first
    assert sample(temperature=1.0, seed=8) != first
    greedy = sample()
    assert first != greedy
    assert sample(temperature=1.0, top_k=1) == greedy  # one token left: sampling is argmax
    assert sample(temperature=0.7, top_p=1e-6) == greedy  # nucleus of the most likely token alone


def test_choose_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    drawn = _choose(logits, temperature=1.0, top_p=1.0, top_k=0, generator=gen)
    np.testing.assert_allclose(torch.bincount(drawn, minlength=4).numpy() / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top2 = _choose(logits, temperature=1.0, top_p=1.0, top_k=2, generator=gen)
    assert set(top2.tolist()) == {0, 1}
    assert abs((top2 == 0).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised over the two kept
    # top_p 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it -> the two most likely tokens
    assert set(_choose(logits, temperature=1.0, top_p=0.7, top_k=0, generator=gen).tolist()) == {0, 1}
    assert set(_choose(logits, temperature=1.0, top_p=0.81, top_k=0, generator=gen).tolist()) == {0, 1, 2}
    assert _choose(logits, temperature=0.0, top_p=1.0, top_k=0, generator=None).eq(0).all()


def test_ids_past_the_tokenizer_vocab_are_never_generated(tok):
    model = tiny_model(vocab_size=400, tie=False)  # a vocabulary padded past the tokenizer's 320 ids
    handle = model.lm_head.register_forward_hook(lambda m, a, out: out.index_fill(-1, torch.tensor([350]), 1e4))
    try:
        out = generate_responses(model, tok, CONVERSATIONS[:2], max_new_tokens=4)
    finally:
        handle.remove()
    assert all(o["num_tokens"] == 4 for o in out) and any(o["response"] for o in out)


def test_errors(tok, model):
    no_template = tiny_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        generate_responses(model, no_template, CONVERSATIONS[:1])
    with pytest.raises(ValueError, match=r"max_new_tokens = 0 must be >= 1.*top_p = 1.5"):
        generate_responses(model, tok, CONVERSATIONS[:1], max_new_tokens=0, top_p=1.5)
    with pytest.raises(ValueError, match="conversation 1 could not be rendered"):
        generate_responses(model, tok, [CONVERSATIONS[0], [{"text": "no role"}]])
    assert generate_responses(model, tok, []) == []
