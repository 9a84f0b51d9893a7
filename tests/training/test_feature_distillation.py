"""Feature distillation in training: captures against the models' own outputs, the plan's refusals, the
trainer's total, and a training run across widths that logs each term, checkpoints the projector,
resumes it exactly and exports a plain student."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from alambic.architecture import decoder_layers
from alambic.config import ConfigError, FeatureLossConfig, LossConfig, TrainingConfig, validate_config
from alambic.data import DistillationCollator
from alambic.losses import attention_map_loss, attention_relation_loss, distillation_loss, hidden_state_loss
from alambic.modeling import counted_positions
from alambic.training.checkpoints import last_complete_checkpoint
from alambic.training.features import FeatureDistiller, FeatureProjector, FeatureSetupError, LayerCapture
from alambic.training.run import train
from alambic.training.trainer import PROJECTOR_FILE, DistillationTrainer
from helpers import TINY_ARCHS, tiny_model, tiny_prepared, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# Teacher wider than the student (48 vs 32 channels, head width 12 vs 8), same number of heads (4, 2 KV).
TEACHER = dict(hidden_size=48, intermediate_size=96)
ALL_TERMS = {"hidden_states": {}, "attention": {}, "attention_relations": {}}


def _pair(arch="llama"):
    teacher = tiny_model(arch, seed=1, **TEACHER)
    # random init attends almost uniformly: sharpen the teacher's maps so that there is something to learn
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(15)
    return teacher, tiny_model(arch, seed=2, num_layers=2)


def _batch(seed=0, arch="llama"):
    """Tokens with a right-padded row, as the collator pads them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 300, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------------------------
# capture


def test_capture_hooks_only_the_requested_layers_and_matches_the_models_outputs():
    model = tiny_model("llama")
    ids, mask = _batch()
    _, layers = decoder_layers(model)
    with LayerCapture(model, hidden=[1, 3], relations=[2], attention=[0]) as cap:
        assert [i for i, layer in enumerate(layers) if layer._forward_hooks] == [1, 3]
        assert [i for i, layer in enumerate(layers) if layer.self_attn.q_proj._forward_hooks] == [0, 2]
        assert [i for i, layer in enumerate(layers) if layer.self_attn.v_proj._forward_hooks] == [2]
        assert [i for i, layer in enumerate(layers) if layer.self_attn._forward_pre_hooks] == [0]
        model(input_ids=ids, attention_mask=mask)
    assert _no_hooks(model)
    feats = cap.features(mask.bool())
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(feats.hidden[1], out.hidden_states[2], rtol=0, atol=0)
    # HF's last entry is after the final norm; the capture is the layer's own output
    torch.testing.assert_close(model.model.norm(feats.hidden[3]), out.hidden_states[4], rtol=0, atol=0)
    layer = layers[2]
    x = layer.input_layernorm(out.hidden_states[2])
    for got, proj in zip(feats.qkv[2], (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)):
        torch.testing.assert_close(got, proj(x), rtol=1e-6, atol=1e-7)
    assert set(feats.attention) == {0} and set(feats.qkv) == {2}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_attention_maps_equal_eager_output_attentions(arch):
    model = tiny_model(arch)  # eager, 4 query heads over 2 KV heads
    ids, mask = _batch()
    expected = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    # the same weights under sdpa, which returns no maps: they are computed from the captured q and k
    sdpa = AutoModelForCausalLM.from_config(model.config, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(model.state_dict())
    rows = mask.bool()[:, None, :, None].expand_as(expected[0])  # padding queries count nowhere
    for m in (model, sdpa):
        with LayerCapture(m, attention=[1, 3]) as cap:
            m(input_ids=ids, attention_mask=mask)
        feats = cap.features(mask.bool())
        for i in (1, 3):
            got = feats.attention[i]
            assert got.shape == expected[i].shape
            diff = (got - expected[i])[rows].abs().max().item()
            assert diff < 1e-6, f"{arch} layer {i} ({m.config._attn_implementation}): max diff {diff:.2e}"


def test_student_features_keep_the_graph():
    model = tiny_model("qwen2").train()
    ids, mask = _batch()
    with LayerCapture(model, hidden=[0], attention=[1]) as cap:
        model(input_ids=ids, attention_mask=mask)
    feats = cap.features(mask.bool())
    (feats.hidden[0].sum() + feats.attention[1].square().sum()).backward()
    _, layers = decoder_layers(model)
    assert layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0
    assert layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_reentrant_gradient_checkpointing_is_refused_not_silently_untaught():
    model = tiny_model("llama").train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    ids, mask = _batch()
    with LayerCapture(model, relations=[2]) as cap:
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="use_reentrant: false"):
        FeatureDistiller.check_graph(cap.features(mask.bool()))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with LayerCapture(model, relations=[2]) as cap:
        model(input_ids=ids, attention_mask=mask)
    FeatureDistiller.check_graph(cap.features(mask.bool()))


# --------------------------------------------------------------------------------------------
# projection and plan


def test_projector_is_linear_where_widths_differ_and_identity_where_equal():
    wide = FeatureProjector(32, 48, [0, 1])
    assert [tuple(p.shape) for p in wide.parameters()] == [(48, 32), (48, 32)]
    assert wide(1, torch.randn(2, 5, 32)).shape == (2, 5, 48)
    same = FeatureProjector(32, 32, [0, 1])
    x = torch.randn(2, 5, 32)
    assert not list(same.parameters()) and torch.equal(same(0, x), x)


def test_plan_pairs_the_layers_and_picks_the_relation_heads():
    teacher, student = _pair()
    plan = FeatureDistiller(FeatureLossConfig(**ALL_TERMS), student, teacher).plan
    assert plan.hidden == plan.attention == [(0, 1), (1, 3)]  # uniform: 2 student layers over 4
    # widths: student q/k/v 32/16/16, teacher 48/24/24 -> gcd 8, at most the student's 4 heads
    assert plan.relation == (1, 3) and plan.num_relation_heads == 4
    pruned = FeatureDistiller(
        FeatureLossConfig(hidden_states={"layers": [1]}, attention_relations={"layer": 0}),
        student,
        teacher,
        kept_layers=[0, 2],
    ).plan
    assert pruned.hidden == [(1, 2)] and pruned.relation == (0, 0) and pruned.attention == []


@pytest.mark.parametrize(
    "features, message",
    [
        ({"attention_relations": {"num_relation_heads": 3}}, r"num_relation_heads = 3 .* choose one of \[1, 2, 4, 8\]"),
        ({"hidden_states": {"layers": [5]}}, r"hidden_states.layers = \[5\]: student layers \[5\] have no partner"),
        ({"attention_relations": {"layer": 2}}, r"attention_relations.layer = 2 is out of range"),
        ({"attention_relations": {"layer": 0}, "layer_map": "last"}, "set teacher_layer"),
        ({"hidden_states": {}, "layer_map": [[0, 4]]}, r"layer_map: .*teacher layers 0\.\.3"),
    ],
)
def test_plan_refuses_what_cannot_work(features, message):
    teacher, student = _pair()
    with pytest.raises(FeatureSetupError, match=message):
        FeatureDistiller(FeatureLossConfig(**features), student, teacher)


def test_attention_maps_need_equal_head_counts():
    teacher = tiny_model("llama", seed=1, heads=6, kv_heads=2, hidden_size=48)
    with pytest.raises(FeatureSetupError, match="6.*use loss.features.attention_relations"):
        FeatureDistiller(FeatureLossConfig(attention={}), tiny_model("llama", num_layers=2), teacher)
    # relations work across head counts and widths
    FeatureDistiller(FeatureLossConfig(attention_relations={}), tiny_model("llama", num_layers=2), teacher)


def test_a_model_without_llama_style_attention_gets_hidden_states_only():
    teacher, student = tiny_model("gpt2", seed=1, **TEACHER), tiny_model("gpt2", seed=2, num_layers=2)
    for term in ("attention", "attention_relations"):
        with pytest.raises(FeatureSetupError, match="GPT2Block.*use loss.features.hidden_states alone"):
            FeatureDistiller(FeatureLossConfig(**{term: {}}), student, teacher)
    features = FeatureDistiller(FeatureLossConfig(hidden_states={}), student, teacher)
    ids, mask = _batch()
    with features.capture(student, "student") as cap:
        out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(cap.features(mask.bool()).hidden[0], out.hidden_states[1], rtol=0, atol=0)


def test_feature_terms_alone_teach_the_student():
    """Gradients reach the student (and projector) through the hooks: each term falls when optimised."""
    torch.manual_seed(0)
    teacher, student = _pair()
    student.train()
    features = FeatureDistiller(FeatureLossConfig(**ALL_TERMS), student, teacher)
    ids, mask = _batch()
    keys, counted = mask.bool(), F.pad(mask.bool()[:, 1:], (0, 1), value=False)
    with torch.inference_mode(), features.capture(teacher, "teacher") as cap:
        teacher(input_ids=ids, attention_mask=mask)
    target = cap.features(keys).clone()
    optimizer = torch.optim.Adam([*student.parameters(), *features.projector.parameters()], lr=1e-2)
    history = []
    for _ in range(30):
        with features.capture(student, "student") as cap:
            student(input_ids=ids, attention_mask=mask)
        terms = features.losses(cap.features(keys), target, counted, keys)
        history.append({k: v.item() for k, v in terms.items()})
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
    for name in ALL_TERMS:
        assert history[-1][name] < 0.3 * history[0][name], (name, history[0][name], history[-1][name])


# --------------------------------------------------------------------------------------------
# the trainer


def test_trainer_total_is_the_logit_loss_plus_each_weighted_term(tmp_path):
    teacher, student = _pair()
    features = {
        "layer_map": [[0, 1]],
        "hidden_states": {"weight": 0.3, "kind": "mse"},
        "attention": {"weight": 0.2, "kind": "kl"},
        "attention_relations": {"weight": 0.7, "num_relation_heads": 2, "layer": 0, "teacher_layer": 2},
    }
    cfg = LossConfig(alpha=0.6, temperature=2.0, implementation="full", features=features)
    trainer = DistillationTrainer(
        model=student,
        args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
        teacher=teacher,
        loss_config=cfg,
    )
    data = tiny_prepared(tmp_path, chat=True)  # prompt tokens not counted, rows padded
    batch = DistillationCollator(pad_token_id=3)([data.train[i] for i in range(3)])
    with torch.no_grad():
        loss = trainer.compute_loss(student, batch)

        ids, attn = batch["input_ids"], batch["attention_mask"]
        mask, targets = counted_positions(batch["labels"])
        s = student(input_ids=ids, attention_mask=attn, output_hidden_states=True, output_attentions=True)
        t = teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True, output_attentions=True)
        logit = distillation_loss(s.logits[:, :-1][mask], t.logits[:, :-1][mask], targets, alpha=0.6, temperature=2.0)
        counted, keys = F.pad(mask, (0, 1), value=False), attn.bool()

        def qkv(model, out, i):
            layer = decoder_layers(model)[1][i]
            x = layer.input_layernorm(out.hidden_states[i])
            return [getattr(layer.self_attn, p)(x) for p in ("q_proj", "k_proj", "v_proj")]

        terms = {
            "loss_hidden": hidden_state_loss(
                trainer.features.projector(0, s.hidden_states[1]), t.hidden_states[2], counted, kind="mse"
            ),
            "loss_attention": attention_map_loss(s.attentions[0], t.attentions[1], counted, kind="kl", key_mask=keys),
            "loss_relations": attention_relation_loss(
                qkv(student, s, 0), qkv(teacher, t, 2), counted, num_relation_heads=2, key_mask=keys
            ),
        }
    expected = logit.total + 0.3 * terms["loss_hidden"] + 0.2 * terms["loss_attention"] + 0.7 * terms["loss_relations"]
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, value in terms.items():  # each term logged unweighted, in eval mode here
        assert trainer._parts["eval"][name] == [pytest.approx(value.item(), rel=1e-5)]


@pytest.mark.parametrize(
    "loss, message",
    [
        ({"alpha": 0.0, "features": {"hidden_states": {}}}, "loss.features needs the live teacher"),
        ({"features": {}}, "asks for no term"),
        ({"features": {"hidden_states": {}, "layer_map": [[0, -1]]}}, "indices must be >= 0"),
        ({"features": {"hidden_states": {"kind": "l1"}}}, "hidden_states.kind"),
    ],
)
def test_config_refuses_impossible_features(loss, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"teacher": {"model": "t"}, "student": {"model": "s"}, "loss": loss})


def test_features_are_refused_without_a_live_teacher(tmp_path):
    with pytest.raises(ConfigError, match="data.teacher_cache does not keep"):  # refused when the config loads
        validate_config(
            {
                "teacher": {"model": "t"},
                "student": {"model": "s"},
                "data": {"teacher_cache": {}},
                "loss": {"alpha": 1.0, "features": {"hidden_states": {}}},
            }
        )
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="loss.features needs a live teacher"):
        DistillationTrainer(
            model=tiny_model(num_layers=2),
            args=args,
            teacher=None,
            cached_teacher=True,
            loss_config=LossConfig(alpha=1.0, features={"hidden_states": {}}),
        )


# --------------------------------------------------------------------------------------------
# a training run: logs, checkpoints, resume, export

STEPS = dict(max_steps=6, save_steps=2, learning_rate=3e-3, logging_steps=1, eval_steps=3, warmup_ratio=0.0)


def _train(folder, data, callbacks=None):
    teacher, student = _pair()
    summary = train(
        student,
        tiny_tokenizer(),
        data,
        teacher=teacher,
        output_dir=folder,
        callbacks=callbacks,
        loss=LossConfig(alpha=0.5, features=ALL_TERMS),
        training=TrainingConfig(**STEPS),
    )
    return summary, student


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    data = tiny_prepared(root, chat=True)
    summary, student = _train(root / "straight", data)
    return root, data, summary, student


def test_training_logs_every_term_and_exports_a_plain_student(straight_run):
    root, _, summary, student = straight_run
    train_logs = [r for r in summary["log_history"] if "loss_hidden" in r]
    eval_logs = [r for r in summary["log_history"] if "eval_loss" in r]
    assert len(train_logs) == 6 and len(eval_logs) == 2
    for name in ("loss_soft", "loss_hard", "loss_hidden", "loss_attention", "loss_relations"):
        assert all(torch.isfinite(torch.tensor(r[name])) and r[name] > 0 for r in train_logs), name
        assert all(torch.isfinite(torch.tensor(r["eval_" + name])) for r in eval_logs), name
    assert train_logs[-1]["loss_hidden"] < train_logs[0]["loss_hidden"]
    assert eval_logs[-1]["eval_loss_hidden"] < eval_logs[0]["eval_loss_hidden"]

    run = root / "straight"
    for step in (4, 6):  # every kept checkpoint holds the projector: one (48, 32) map per matched student layer
        saved = load_file(run / "checkpoints" / f"checkpoint-{step}" / PROJECTOR_FILE)
        assert {k: tuple(v.shape) for k, v in saved.items()} == {"maps.0.weight": (48, 32), "maps.1.weight": (48, 32)}
    # final/ is the student alone: an ordinary HF model, nothing missing, nothing extra
    final = run / "final"
    assert not (final / PROJECTOR_FILE).exists()
    assert not [k for k in load_file(final / "model.safetensors") if "maps." in k]
    reloaded, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, value in student.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, msg=key)


def test_gradient_accumulation_gives_the_same_update_with_features(tmp_path):
    """Feature terms divide by the global count of counted positions, as the logit loss does."""
    data = tiny_prepared(tmp_path, chat=True)  # micro-batches count different numbers of positions
    ends = []
    for batch, accumulation in ((4, 1), (1, 4)):
        teacher, student = _pair()
        out = tmp_path / f"b{batch}x{accumulation}"
        train(
            student,
            tiny_tokenizer(),
            data,
            teacher=teacher,
            output_dir=out,
            loss=LossConfig(alpha=0.5, features=ALL_TERMS),
            training=TrainingConfig(
                max_steps=1,
                per_device_train_batch_size=batch,
                save_steps=1,
                gradient_accumulation_steps=accumulation,
                learning_rate=1.0,
                warmup_ratio=0,
                lr_scheduler_type="constant",
                max_grad_norm=1e9,
                trainer_args={"optim": "sgd", "data_seed": 0},
            ),
        )
        ends.append({**student.state_dict(), **load_file(out / "checkpoints" / "checkpoint-1" / PROJECTOR_FILE)})
    for key in ends[0]:
        torch.testing.assert_close(ends[1][key], ends[0][key], rtol=1e-4, atol=1e-5, msg=key)


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt


class _ProjectorAtStart(TrainerCallback):
    """The projector's parameters (the optimizer's last group) when training starts, after any resume."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.values = [p.detach().clone() for p in optimizer.param_groups[-1]["params"]]


def test_resume_restores_the_projector_exactly(straight_run):
    root, data, _, _ = straight_run
    with pytest.raises(KeyboardInterrupt):
        _train(root / "resumed", data, callbacks=[_Crash()])
    checkpoint = last_complete_checkpoint(root / "resumed" / "checkpoints")
    assert checkpoint.name == "checkpoint-4"
    at_start = _ProjectorAtStart()
    summary, _ = _train(root / "resumed", data, callbacks=[at_start])
    assert summary["resumed_from"] == 4 and summary["global_step"] == 6
    saved = load_file(checkpoint / PROJECTOR_FILE)
    assert len(at_start.values) == len(saved) == 2
    for value, (key, expected) in zip(at_start.values, sorted(saved.items())):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    # and it goes on as the uninterrupted run did
    ends = [load_file(root / run / "checkpoints" / "checkpoint-6" / PROJECTOR_FILE) for run in ("straight", "resumed")]
    for key in ends[0]:
        torch.testing.assert_close(ends[1][key], ends[0][key], rtol=1e-5, atol=1e-6, msg=key)
