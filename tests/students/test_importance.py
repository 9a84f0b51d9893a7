import copy
import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM

from alambic.students.importance import (
    Importance,
    ImportanceError,
    calibration_batches,
    measure_importance,
)
from helpers import TINY_ARCHS, tiny_model, tiny_prepared

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 3
# (length, leading labels masked): odd lengths force padding, masked prefixes mimic chat prompts
_SHAPES = [(16, 0), (9, 3), (13, 0), (16, 5), (5, 0), (12, 2)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rows = tiny_prepared(tmp_path_factory.mktemp("importance")).train
    out = []
    for i, (length, masked) in enumerate(_SHAPES):
        ids = rows[i]["input_ids"][:length]
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * masked + ids[masked:]})
    return Dataset.from_list(out)


@pytest.fixture(scope="module")
def batches(dataset):
    return calibration_batches(dataset, num_sequences=len(_SHAPES), batch_size=4, pad_token_id=PAD)


def _mask(batch):
    """(B, T): position t predicts a counted, non-pad target (written out independently of the module)."""
    att, labels = batch["attention_mask"].bool(), batch["labels"]
    mask = torch.zeros_like(att)
    mask[:, :-1] = (labels[:, 1:] != -100) & att[:, 1:] & att[:, :-1]
    return mask


def _plain_loss(model, batches):
    """Token-weighted mean next-token CE from full logits."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits[:, :-1]
            m = _mask(b)[:, :-1]
            total += F.cross_entropy(logits[m].double(), b["labels"][:, 1:][m], reduction="sum").item()
            n += int(m.sum())
    return total / n


def _capture(model, batches, module, *, pre=True):
    """Per batch, the input (pre) or output of `module`, at the counted positions, float64: [(N_b, *)]."""
    seen = []
    if pre:
        handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    handle.remove()
    return torch.cat([x[_mask(b)].double() for x, b in zip(seen, batches)])


def _measure(model, batches, **kwargs):
    return measure_importance(model, batches, progress=False, **kwargs)


def test_calibration_batches_take_the_first_rows_in_order(dataset):
    batches = calibration_batches(dataset, num_sequences=5, batch_size=2, pad_token_id=PAD)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 5)]
    assert batches[0]["input_ids"][1, 9:].eq(PAD).all() and batches[0]["labels"][1, 9:].eq(-100).all()
    assert batches[2]["input_ids"][0, :5].tolist() == dataset[4]["input_ids"]
    more = calibration_batches(dataset, num_sequences=100, batch_size=4, pad_token_id=PAD)
    assert sum(b["input_ids"].shape[0] for b in more) == len(dataset)  # fewer rows than asked: all of them


def test_calibration_batches_reject_an_empty_dataset(dataset):
    with pytest.raises(ImportanceError, match="empty"):
        calibration_batches(dataset.select([]), num_sequences=4, batch_size=2, pad_token_id=PAD)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_field_has_its_shape_and_base_loss_matches_full_logits(arch, batches):
    model = tiny_model(arch)
    imp = _measure(model, batches, head_gradient=True)
    L, H, I, D = 4, 4, 64, 32  # noqa: E741 - layers, heads, intermediate, hidden: the shapes' usual letters
    assert imp.num_sequences == len(_SHAPES)
    assert imp.num_tokens == sum(length - max(masked, 1) for length, masked in _SHAPES)  # first token: no predictor
    assert len(imp.block_influence) == L and len(imp.skip_loss_increase) == L
    assert imp.head_activation.shape == imp.head_gradient.shape == (L, H)
    assert imp.neuron_activation.shape == (L, I) and imp.channel_activation.shape == (D,)
    for t in (imp.head_activation, imp.head_gradient, imp.neuron_activation, imp.channel_activation):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert imp.base_loss == pytest.approx(_plain_loss(model, batches), rel=1e-5)
    d = json.loads(json.dumps(imp.to_dict()))
    assert len(d["head_activation"]) == L and len(d["head_activation"][0]) == H
    assert d["base_loss"] == pytest.approx(imp.base_loss, rel=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_block_influence_matches_consecutive_hidden_states(arch, batches):
    model = tiny_model(arch)
    imp = _measure(model, batches, skip_loss=False, width=False)
    sums, n = torch.zeros(4, dtype=torch.float64), 0
    # HF's last hidden state is after the final norm: take the last layer's output from the norm's input
    last = _capture(model, batches, model.model.norm)
    with torch.no_grad():
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            hs = out.hidden_states  # (embeddings, layer 0 output, ..., final norm of the last layer's output)
            m = _mask(b)
            for i in range(4):
                out = hs[i + 1][m] if i < 3 else last[n : n + int(m.sum())]
                sums[i] += (1 - F.cosine_similarity(hs[i][m].double(), out.double(), dim=-1)).sum()
            n += int(m.sum())
    torch.testing.assert_close(torch.tensor(imp.block_influence, dtype=torch.float64), sums / n, rtol=1e-5, atol=1e-6)


def _without_layer(model, index):
    pruned = copy.deepcopy(model)
    del pruned.model.layers[index]
    pruned.config.num_hidden_layers -= 1
    if getattr(pruned.config, "layer_types", None):  # Qwen2 indexes its masks by layer position
        pruned.config.layer_types = [t for i, t in enumerate(pruned.config.layer_types) if i != index]
    return pruned


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_skip_loss_matches_a_model_without_the_layer(arch, batches):
    model = tiny_model(arch)
    imp = _measure(model, batches, width=False)
    base = _plain_loss(model, batches)
    for i in range(4):
        expected = _plain_loss(_without_layer(model, i), batches) - base
        assert imp.skip_loss_increase[i] == pytest.approx(expected, abs=1e-5), f"layer {i}"


def test_an_identity_layer_scores_zero_and_ranks_last(batches):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    imp = _measure(model, batches, width=False)
    assert abs(imp.block_influence[2]) < 1e-6 and abs(imp.skip_loss_increase[2]) < 1e-6
    scores = imp.layer_scores("block_influence")
    assert min(range(4), key=scores.__getitem__) == 2
    assert min(s for i, s in enumerate(scores) if i != 2) > 1e-3
    assert imp.layer_scores("skip_loss") == imp.skip_loss_increase


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_head_without_values_has_zero_activation_and_gradient(arch, batches):
    model = tiny_model(arch)  # 4 query heads over 2 KV heads: KV head 0 serves query heads 0 and 1
    attn = model.model.layers[1].self_attn
    head_dim = 32 // 4
    with torch.no_grad():
        attn.v_proj.weight[:head_dim].zero_()
        if attn.v_proj.bias is not None:  # Qwen2
            attn.v_proj.bias[:head_dim].zero_()
    imp = _measure(model, batches, layers=False, head_gradient=True)
    for field in (imp.head_activation, imp.head_gradient):
        assert field[1, :2].abs().max() < 1e-7
        assert field[1, 2:].min() > 1e-6 and field[[0, 2, 3]].min() > 1e-6


def test_head_activation_matches_a_manual_norm(batches):
    model = tiny_model("mistral")
    imp = _measure(model, batches, layers=False)
    a = _capture(model, batches, model.model.layers[3].self_attn.o_proj)  # (N, H * head_dim)
    expected = torch.stack([a[:, h * 8 : (h + 1) * 8].pow(2).sum(-1).sqrt().mean() for h in range(4)])
    torch.testing.assert_close(imp.head_activation[3].double(), expected, rtol=1e-5, atol=1e-7)


def test_head_gradient_matches_the_o_proj_weight_gradient(batches):
    """m_h scales the o_proj input columns of head h, so dL/dm_h = Σ_columns of h W ⊙ dL/dW."""
    model = tiny_model("qwen2")
    imp = _measure(model, batches, layers=False, width=False, head_gradient=True)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for b in batches:
        model.zero_grad()
        m = _mask(b)[:, :-1]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        F.cross_entropy(logits[m], b["labels"][:, 1:][m]).backward()
        for i, layer in enumerate(model.model.layers):
            w = layer.self_attn.o_proj.weight
            expected[i] += (w * w.grad).double().unflatten(1, (4, 8)).sum(dim=(0, 2)).abs()
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(imp.head_gradient.double(), expected, rtol=1e-4, atol=1e-7)


def test_neuron_activation_matches_the_mlp_by_hand(batches):
    model = tiny_model("llama")
    imp = _measure(model, batches, layers=False)
    mlp = model.model.layers[1].mlp
    x = _capture(model, batches, mlp)  # (N, D): the MLP's input
    w_gate, w_up = mlp.gate_proj.weight.double(), mlp.up_proj.weight.double()
    expected = (F.silu(x @ w_gate.T) * (x @ w_up.T)).abs().mean(0)
    torch.testing.assert_close(imp.neuron_activation[1].double(), expected, rtol=1e-5, atol=1e-7)


def test_channel_activation_sums_every_residual_norm(batches):
    model = tiny_model("llama")
    imp = _measure(model, batches, layers=False)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 2 * 4 + 1
    expected = sum(_capture(model, batches, norm, pre=False).abs().mean(0) for norm in norms)
    torch.testing.assert_close(imp.channel_activation.double(), expected, rtol=1e-5, atol=1e-6)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_model_is_left_as_it_was(batches):
    model = tiny_model("llama")
    before = model(input_ids=batches[0]["input_ids"]).logits
    model.train()
    model.model.layers[0].eval()  # mixed modes must come back per module
    model.lm_head.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    _measure(model, batches, head_gradient=True)
    assert _hook_count(model) == 0
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model(input_ids=batches[0]["input_ids"]).logits, before, rtol=0, atol=0)


def test_hooks_are_removed_when_a_pass_fails(batches):
    model = tiny_model("llama")
    bad = {k: v.clone() for k, v in batches[1].items()}
    bad["input_ids"][0, 0] = 10_000  # outside the vocabulary: the embedding lookup raises
    with pytest.raises(IndexError):
        _measure(model, [batches[0], bad], head_gradient=True)
    assert _hook_count(model) == 0 and not model.training


def test_padding_does_not_change_the_scores(dataset):
    model = tiny_model("qwen2")
    alone = _measure(model, calibration_batches(dataset, num_sequences=2, batch_size=1, pad_token_id=PAD))
    padded = _measure(model, calibration_batches(dataset, num_sequences=2, batch_size=2, pad_token_id=PAD))
    assert padded.num_tokens == alone.num_tokens
    for name in (
        "base_loss",
        "block_influence",
        "skip_loss_increase",
        "head_activation",
        "neuron_activation",
        "channel_activation",
    ):
        a, p = getattr(alone, name), getattr(padded, name)
        # losses are float32 sums of ~5.8 per token: differences of 1e-6 are summation order
        atol = 1e-5 if "loss" in name else 1e-6
        torch.testing.assert_close(torch.as_tensor(p), torch.as_tensor(a), rtol=1e-5, atol=atol, msg=name)


def test_bfloat16_models_accumulate_in_float32(batches):
    imp = _measure(tiny_model("llama").to(torch.bfloat16), batches, skip_loss=False)
    assert imp.head_activation.dtype == torch.float32 and isinstance(imp.base_loss, float)


def test_a_model_without_llama_modules_gets_depth_but_not_width(batches):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", vocab_size=320, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    imp = _measure(model, batches, width=False)
    assert len(imp.block_influence) == 3 and len(imp.skip_loss_increase) == 3
    assert imp.head_activation is None and imp.head_gradient is None
    with pytest.raises(ImportanceError, match=r"model_type 'gpt2'.*self_attn\.o_proj.*transformer\.h .*width=False"):
        _measure(model, batches)


def test_layer_scores_say_what_was_not_measured(batches):
    imp = _measure(tiny_model("llama"), batches, layers=False, width=False)
    assert imp.block_influence == [] and imp.skip_loss_increase is None
    with pytest.raises(ImportanceError, match="skip_loss=True"):
        imp.layer_scores("skip_loss")
    with pytest.raises(ImportanceError, match="layers=True"):
        imp.layer_scores("block_influence")
    with pytest.raises(ImportanceError, match="unknown layer metric 'bi'"):
        imp.layer_scores("bi")


def test_no_counted_token_is_a_clear_error():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "labels": torch.full((1, 3), -100),
    }
    with pytest.raises(ImportanceError, match="counted token"):
        _measure(tiny_model("llama"), [batch])
    with pytest.raises(ImportanceError, match="no calibration batches"):
        _measure(tiny_model("llama"), [])


def test_no_output_without_progress(batches, capsys):
    _measure(tiny_model("llama"), batches[:1], skip_loss=False)
    assert capsys.readouterr() == ("", "")


def test_importance_round_trips_through_json():
    imp = Importance(
        num_sequences=1,
        num_tokens=2,
        base_loss=1.23456789,
        block_influence=[0.1234567891],
        skip_loss_increase=None,
        head_activation=torch.tensor([[1 / 3]]),
        head_gradient=None,
        neuron_activation=None,
        channel_activation=None,
    )
    d = imp.to_dict()
    assert d["base_loss"] == 1.23457 and d["block_influence"] == [0.123457]
    assert d["head_activation"] == [[0.333333]] and d["skip_loss_increase"] is None


# ------------------------------------------------------------------------------ skip loss by replay


def _family(name):
    """Tiny models of families whose layers get more than the hidden states: gemma3_text (per-layer sliding and
    full masks, per-layer rotary tables, a sliding window shorter than the sequences) and gpt2."""
    torch.manual_seed(0)
    if name == "gemma3_text":
        cfg = AutoConfig.for_model(
            "gemma3_text",
            vocab_size=320,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            sliding_window=4,
            max_position_embeddings=512,
            pad_token_id=3,
            bos_token_id=1,
            eos_token_id=2,
        )
        cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    elif name == "gpt2":
        cfg = AutoConfig.for_model("gpt2", vocab_size=320, n_embd=32, n_layer=4, n_head=4, n_positions=64)
    else:
        return tiny_model(name)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def _full_passes(monkeypatch):
    """Force the path without replay: one full forward per skipped layer."""
    import alambic.students.importance as importance

    monkeypatch.setattr(importance, "_replayed_skip_losses", lambda *args, **kwargs: None)


def _layer_calls(model):
    """Count each decoder layer's calls (forward pre-hooks the caller removes)."""
    calls = [0] * len(model.model.layers if hasattr(model, "model") else model.transformer.h)
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h

    def counter(i):
        def hook(_module, _args):
            calls[i] += 1

        return hook

    return calls, [layer.register_forward_pre_hook(counter(i)) for i, layer in enumerate(layers)]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_skip_loss_by_replay_equals_one_full_pass_per_layer(arch, batches, monkeypatch):
    model = _family(arch)
    replayed = _measure(model, batches, width=False)
    _full_passes(monkeypatch)
    full = _measure(model, batches, width=False)
    assert replayed.skip_loss_increase == pytest.approx(full.skip_loss_increase, abs=1e-6)
    assert replayed.base_loss == full.base_loss

    def ranking(scores):
        return sorted(range(len(scores)), key=scores.__getitem__)

    assert ranking(replayed.skip_loss_increase) == ranking(full.skip_loss_increase)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_skip_loss_runs_only_the_layers_after_the_skipped_one(arch, batches):
    model = _family(arch)
    calls, handles = _layer_calls(model)
    _measure(model, batches, width=False)
    for h in handles:
        h.remove()
    # per batch, layer j runs once for the activations, once recorded, then once for each skipped layer before it
    assert calls == [len(batches) * (2 + j) for j in range(4)]


def test_replay_falls_back_when_something_runs_between_layers(batches, monkeypatch):
    model = tiny_model("llama")
    # a pre-hook rescaling layer 2's input: layer 1's output is not what layer 2 receives, so recorded inputs cannot
    # stand for "the previous layer's output" and replay would apply the hook twice
    model.model.layers[2].register_forward_pre_hook(lambda _m, args: (args[0] * 2, *args[1:]))
    calls, handles = _layer_calls(model)
    checked = _measure(model, batches, width=False)
    for h in handles:
        h.remove()
    # per batch the activation pass and L full passes, plus the first batch's recording forward that found out
    assert calls == [len(batches) * 5 + 1] * 4
    _full_passes(monkeypatch)
    full = _measure(model, batches, width=False)
    assert checked.skip_loss_increase == full.skip_loss_increase
