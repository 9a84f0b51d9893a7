"""On-policy distillation: prompts cut from chat sequences, the step draw, the (prompt, response) batch and its loss
by hand, the student's mode and gradients, lambda 0 = off-policy bit for bit, lambda 1 every step, resume, a run
through the stages, and the config's refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from alambic.config import ConfigError, LossConfig, OnPolicyConfig, TrainingConfig, validate_config
from alambic.data import DistillationCollator
from alambic.decoding import stop_token_ids
from alambic.pipeline import run_stages
from alambic.stages import stages_until
from alambic.training.on_policy import (
    DEFAULT_SAMPLING,
    OnPolicySampler,
    batch_prompts,
    is_on_policy_step,
    sampling_settings,
)
from alambic.training.run import train, training_arguments
from alambic.training.trainer import DistillationTrainer
from helpers import CrashAt, save_tiny_pair, tiny_model, tiny_prepared, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

STOPS = set(stop_token_ids(tiny_tokenizer()))


def _loss(fraction=1.0, **kwargs) -> LossConfig:
    on_policy = OnPolicyConfig(fraction=fraction, max_new_tokens=6, seed=kwargs.pop("seed", 0))
    return LossConfig(**{"divergence": "reverse_kl", "alpha": 1.0, **kwargs}, on_policy=on_policy)


def _trainer(tmp_path, data, loss, teacher=None) -> DistillationTrainer:
    tok = tiny_tokenizer()
    return DistillationTrainer(
        model=tiny_model("llama", seed=2, num_layers=2).train(),
        args=training_arguments(TrainingConfig(max_steps=1, save_steps=100), tmp_path / "trainer", has_eval=False),
        train_dataset=data.train,
        data_collator=DistillationCollator(pad_token_id=3, prompt_lengths=True),
        processing_class=tok,
        teacher=teacher or tiny_model("llama", seed=1),
        loss_config=loss,
    )


def _batch(data, n=3):
    return DistillationCollator(pad_token_id=3, prompt_lengths=True)([data.train[i] for i in range(n)])


# --------------------------------------------------------------------------------------------
# prompts and the step draw


def test_the_collator_carries_each_rows_prompt_up_to_its_last_assistant_turn(tmp_path):
    tok = tiny_tokenizer()
    data = tiny_prepared(tmp_path, chat=True)
    batch = _batch(data, n=4)
    for ids, labels, n in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["prompt_length"].tolist()):
        assert tok.decode(ids[:n]).endswith("<|im_start|>assistant\n")  # the generation prompt, header included
        assert labels[n - 1] == -100 and labels[n] != -100 and all(t == -100 for t in labels[:n])
    # exactly what the chat template renders as the prompt of the conversation
    conversation = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi, fine"}]
    full = tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    prompt = tok(
        tok.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]
    from alambic.data.tokenize import tokenize_chat

    sample = tokenize_chat([{"id": "a", "messages": conversation}], tok, 64)[0]
    assert sample["input_ids"] == full
    assert DistillationCollator(pad_token_id=3, prompt_lengths=True)([sample])["prompt_length"].item() == len(prompt)
    assert "prompt_length" not in DistillationCollator(pad_token_id=3)([sample])  # only when asked


def test_the_step_draw_is_reproducible_with_the_asked_share():
    draws = [is_on_policy_step(s, 0.3, seed=7) for s in range(2000)]
    assert draws == [is_on_policy_step(s, 0.3, seed=7) for s in range(2000)]  # a function of (seed, step)
    assert 0.27 < sum(draws) / len(draws) < 0.33
    assert draws != [is_on_policy_step(s, 0.3, seed=8) for s in range(2000)]
    assert not any(is_on_policy_step(s, 0.0, seed=7) for s in range(200))
    assert all(is_on_policy_step(s, 1.0, seed=7) for s in range(200))


# --------------------------------------------------------------------------------------------
# one on-policy batch


def test_an_on_policy_batch_counts_only_the_generated_tokens(tmp_path):
    data = tiny_prepared(tmp_path, chat=True)
    teacher = tiny_model("llama", seed=1)
    trainer = _trainer(tmp_path, data, _loss(temperature=2.0, implementation="chunked", chunk_size=7), teacher)
    batch = _batch(data)
    prompts = batch_prompts(batch)
    [new], num_items = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))

    responses = []
    for b, prompt in enumerate(prompts):
        ids, labels, attention = (new[k][b].tolist() for k in ("input_ids", "labels", "attention_mask"))
        n = sum(attention)
        response = ids[len(prompt) : n]
        responses.append(response)
        assert ids[: len(prompt)] == prompt and new["prompt_length"][b] == len(prompt)
        assert 1 <= len(response) <= 6 and (response[-1] in STOPS or len(response) == 6)
        assert not STOPS & set(response[:-1])  # decoding stops at the first end-of-turn
        assert labels == [-100] * len(prompt) + response + [-100] * (len(ids) - n)
    assert int(num_items) == sum(len(r) for r in responses)

    # the configured objective by hand: T^2 * mean over response tokens of KL(Q_T || P_T)
    model = trainer.model
    loss = trainer.compute_loss(model, new, num_items_in_batch=num_items)
    with torch.no_grad():
        s = model(input_ids=new["input_ids"], attention_mask=new["attention_mask"]).logits[:, :-1].double()
        t = teacher(input_ids=new["input_ids"], attention_mask=new["attention_mask"]).logits[:, :-1].double()
    counted = new["labels"][:, 1:] != -100
    log_q, log_p = F.log_softmax(s[counted] / 2.0, -1), F.log_softmax(t[counted] / 2.0, -1)
    want = 4.0 * (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_the_student_decodes_in_eval_mode_with_a_cache_then_trains_with_gradients(tmp_path):
    data = tiny_prepared(tmp_path, chat=True)
    trainer = _trainer(tmp_path, data, _loss())
    model = trainer.model
    calls = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((module.training, kwargs.get("use_cache"))), with_kwargs=True
    )
    try:
        [new], num_items = trainer.get_batch_samples(iter([_batch(data)]), 1, torch.device("cpu"))
    finally:
        hook.remove()
    assert calls and all(mode is False and cache is True for mode, cache in calls)  # KV-cached decoding, eval mode
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # decoding left no gradient behind
    trainer.training_step(model, new, num_items)
    assert model.training
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_batches_without_a_prompt_are_refused():
    batch = DistillationCollator(pad_token_id=3)([{"input_ids": [5, 6], "labels": [5, 6]}])
    with pytest.raises(KeyError, match="prompt_lengths=True"):
        batch_prompts(batch)
    text = DistillationCollator(pad_token_id=3, prompt_lengths=True)([{"input_ids": [5, 6], "labels": [5, 6]}])
    with pytest.raises(ValueError, match=r"rows \[0\] .* no prompt .*data.format: chat"):
        batch_prompts(text)


# --------------------------------------------------------------------------------------------
# training


def _train(tmp_path, data, name, loss, steps=3, callbacks=None, **training):
    student = tiny_model("llama", seed=2, num_layers=2)
    summary = train(
        student,
        tiny_tokenizer(),
        data,
        teacher=tiny_model("llama", seed=1),
        loss=loss,
        training=TrainingConfig(
            **{"max_steps": steps, "logging_steps": 1, "save_steps": 100, "learning_rate": 3e-3, **training}
        ),
        output_dir=tmp_path / name,
        callbacks=callbacks,
    )
    return student.state_dict(), summary


def _per_step(summary, key):
    return [r[key] for r in summary["log_history"] if key in r and "train_runtime" not in r]


def test_lambda_zero_is_exactly_the_off_policy_trainer(tmp_path):
    data = tiny_prepared(tmp_path, chat=True)
    off, _ = _train(tmp_path, data, "off", LossConfig(divergence="jsd", alpha=0.7))
    zero, summary = _train(tmp_path, data, "zero", _loss(0.0, divergence="jsd", alpha=0.7))
    for key, value in off.items():
        torch.testing.assert_close(zero[key], value, rtol=0, atol=0, msg=key)
    assert _per_step(summary, "on_policy_share") == [0.0] * 3 and _per_step(summary, "on_policy_tokens") == [0] * 3
    assert summary["on_policy"]["steps"] == 0


def test_lambda_one_generates_every_step_and_logs_its_cost(tmp_path):
    data = tiny_prepared(tmp_path, chat=True)
    _, summary = _train(
        tmp_path, data, "one", _loss(1.0, alpha=0.5), gradient_accumulation_steps=2, per_device_train_batch_size=2
    )
    assert _per_step(summary, "on_policy_share") == [1.0] * 3
    assert all(s > 0 for s in _per_step(summary, "on_policy_seconds"))
    # two micro-batches of two rows per step, each response 1..6 tokens
    assert all(4 <= n <= 24 for n in _per_step(summary, "on_policy_tokens"))
    assert len(_per_step(summary, "loss_soft")) == len(_per_step(summary, "loss_hard")) == 3
    cost = summary["on_policy"]
    assert cost["steps"] == 3 and cost["share"] == 1.0 and cost["seconds"] > 0
    assert cost["tokens"] == sum(_per_step(summary, "on_policy_tokens"))
    # every response counted once, and the share of them that hit max_new_tokens in the logs and the summary
    assert sum(_per_step(summary, "on_policy_samples")) == cost["samples"] == 12
    capped = sum(_per_step(summary, "on_policy_capped"))
    assert cost["capped"] == capped and cost["capped_share"] == round(capped / 12, 4)
    assert all(0 <= s <= 1 for s in _per_step(summary, "on_policy_capped_share"))
    assert cost["sampling"]["temperature"] == DEFAULT_SAMPLING["temperature"]


def test_the_on_policy_steps_and_samples_survive_a_resume(tmp_path):
    data = tiny_prepared(tmp_path, chat=True)
    loss = _loss(0.5, seed=5)
    drawn = [float(is_on_policy_step(s, 0.5, seed=5)) for s in range(6)]
    assert set(drawn[4:]) == {0.0, 1.0}  # (seed chosen so that) the resumed steps are of both kinds
    straight, summary = _train(tmp_path, data, "a", loss, steps=6, save_steps=2)
    assert _per_step(summary, "on_policy_share") == drawn
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, data, "b", loss, steps=6, save_steps=2, callbacks=[CrashAt(5)])
    resumed, summary = _train(tmp_path, data, "b", loss, steps=6, save_steps=2)
    assert summary["resumed_from"] == 4 and summary["on_policy"]["steps"] == sum(drawn)
    assert _per_step(summary, "on_policy_share")[-2:] == drawn[4:]
    for key, value in straight.items():  # the same steps drawn, the same responses sampled
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _chat_run(tmp_path, **loss):
    rows = [
        {"messages": [{"role": "user", "content": f"hello there {i}"}, {"role": "assistant", "content": "hi, fine"}]}
        for i in range(12)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": str(save_tiny_pair(tmp_path)), "device": "cpu"},
        "student": {"from_teacher": {"layers": "every_other", "evaluate": False}},
        "data": {"source": "files", "format": "chat", "paths": [str(path)], "max_seq_len": 32},
        "loss": {"divergence": "jsd", "alpha": 1.0, "on_policy": {"fraction": 1.0, "max_new_tokens": 4}, **loss},
        "training": {"max_steps": 2, "logging_steps": 1, "save_steps": 10},
        "evaluation": {"ce_control": True},
    }


def test_a_run_through_the_stages_logs_the_on_policy_cost(tmp_path):
    cfg = validate_config(_chat_run(tmp_path))
    run_stages(cfg, stages_until("control"))
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss_soft" in r]
    assert steps and all(r["on_policy_share"] == 1.0 and r["on_policy_seconds"] > 0 for r in steps)
    summary = json.loads((cfg.run_dir / "train_summary.json").read_text())
    assert summary["on_policy"]["steps"] == 2 and summary["on_policy"]["tokens"] > 0
    assert all("on_policy_capped_share" in r for r in steps) and summary["on_policy"]["samples"] > 0
    # the CE control trains on the corpus answers: no decoding, no teacher
    control = (cfg.run_dir / "control" / "metrics.jsonl").read_text()
    assert "on_policy" not in control and "loss_hard" in control


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data": {"format": "text", "source": "files"}}, "needs prompts to answer: set data.format: chat"),
        ({"data": {"teacher_cache": {"k": 8}}}, "data.teacher_cache .* remove one of them"),
        ({"loss": {"alpha": 0.0}}, "alpha = 0 .* raise loss.alpha above 0"),
        (
            {"task": "sequence_classification", "data": {"format": "classification"}},
            "task 'sequence_classification' has none",
        ),
        ({"loss": {"on_policy": {"fraction": 1.5}}}, "loss.on_policy.fraction"),
        ({"loss": {"on_policy": {"temperature": 1.0}}}, "loss.on_policy.temperature: unknown key"),
    ],
)
def test_the_config_refuses_what_on_policy_cannot_use(tmp_path, change, message):
    data = _chat_run(tmp_path)
    for section, value in change.items():
        data[section] = {**data[section], **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=message):
        validate_config(data)


def test_the_trainer_refuses_on_policy_without_a_live_teacher(tmp_path):
    data = tiny_prepared(tmp_path, chat=True)
    with pytest.raises(ValueError, match="loss.on_policy needs a live teacher"):
        DistillationTrainer(
            model=tiny_model(num_layers=1),
            args=training_arguments(TrainingConfig(max_steps=1), tmp_path / "t", has_eval=False),
            train_dataset=data.train,
            processing_class=tiny_tokenizer(),
            teacher=None,
            cached_teacher=True,
            loss_config=_loss(),
        )


# --------------------------------------------------------------------------------------------
# sampling settings: the models' own unless the config sets them; the share of responses cut at the cap


def _sampling(**kwargs) -> GenerationConfig:
    return GenerationConfig(do_sample=True, **kwargs)


def test_sampling_follows_the_first_model_whose_generation_config_samples():
    cfg = OnPolicyConfig()
    assert cfg.sampling_temperature is None and cfg.top_p is None and cfg.top_k is None
    greedy = GenerationConfig(eos_token_id=2)  # no do_sample: nothing to take from it
    got = sampling_settings(cfg, [("teacher", greedy), ("student", _sampling(temperature=0.6, top_p=0.9, top_k=20))])
    assert (got.temperature, got.top_p, got.top_k) == (0.6, 0.9, 20)
    assert got.source == {"temperature": "student", "top_p": "student", "top_k": "student"}
    first = sampling_settings(cfg, [("teacher", _sampling(temperature=0.3)), ("student", _sampling(temperature=0.9))])
    # transformers' own defaults fill what a sampling generation_config leaves unset (top_k 50), as generate() would
    assert (first.temperature, first.top_p, first.top_k) == (0.3, 1.0, 50) and first.source["top_k"] == "teacher"


def test_the_config_overrides_each_setting_and_the_default_ends_where_no_model_samples():
    got = sampling_settings(
        OnPolicyConfig(sampling_temperature=1.0, top_k=0),
        [("teacher", _sampling(temperature=0.6, top_p=0.9, top_k=20))],
    )
    assert (got.temperature, got.top_p, got.top_k) == (1.0, 0.9, 0)
    assert got.source == {"temperature": "config", "top_p": "teacher", "top_k": "config"}
    fallback = sampling_settings(OnPolicyConfig(), [("teacher", GenerationConfig()), ("student", None)])
    assert (fallback.temperature, fallback.top_p, fallback.top_k) == (
        DEFAULT_SAMPLING["temperature"],
        DEFAULT_SAMPLING["top_p"],
        DEFAULT_SAMPLING["top_k"],
    )
    assert set(fallback.source.values()) == {"default"} and fallback.temperature < 1.0 and fallback.top_p < 1.0


def test_the_models_eos_ids_also_stop_the_responses():
    tok = tiny_tokenizer()
    student = tiny_model("llama", seed=2, num_layers=2)
    teacher = tiny_model("llama", seed=1)
    teacher.generation_config.eos_token_id = [2, 7]  # e.g. Llama 3 / Gemma 3: an end-of-turn id beside eos
    sampler = OnPolicySampler(OnPolicyConfig(), tok, models=[("teacher", teacher), ("student", student)])
    assert set(sampler.stop_ids) == STOPS | {7}


def test_the_trainer_samples_with_the_teachers_generation_settings(tmp_path):
    data = tiny_prepared(tmp_path, chat=True)
    teacher = tiny_model("llama", seed=1)
    teacher.generation_config = _sampling(temperature=0.5, top_p=0.8, top_k=7, eos_token_id=2)
    trainer = _trainer(tmp_path, data, LossConfig(divergence="jsd", alpha=1.0, on_policy=OnPolicyConfig()), teacher)
    settings = trainer.on_policy.settings
    assert (settings.temperature, settings.top_p, settings.top_k) == (0.5, 0.8, 7)


def test_responses_cut_at_max_new_tokens_are_counted(tmp_path):
    data = tiny_prepared(tmp_path, chat=True)
    trainer = _trainer(tmp_path, data, _loss())
    sampler, batch = trainer.on_policy, _batch(data, n=4)
    [new] = sampler.step_batches(trainer.model, [batch], step=0)
    lengths = new["attention_mask"].sum(1) - new["prompt_length"]
    last = new["input_ids"].gather(1, new["attention_mask"].sum(1, keepdim=True) - 1)[:, 0]
    capped = sum(int(n) == 6 and int(t) not in sampler.stop_ids for n, t in zip(lengths, last))
    assert 0 < capped  # a random tiny student rarely ends within 6 tokens
    logs = sampler.stats.pop()
    assert logs["on_policy_samples"] == 4 and logs["on_policy_capped"] == capped
    assert logs["on_policy_capped_share"] == round(capped / 4, 4)
