"""The report's record of the run's configuration: loss terms, teachers, on-policy share, training."""

from alambic.report.spec import loss_section, training_section


def test_loss_section_names_every_term_the_run_trained_with():
    config = {
        "teacher": {"model": "instruct"},
        "teacher_weight": 0.5,
        "additional_teachers": [{"model": "expert", "weight": 0.5}],
        "loss": {
            "divergence": "jsd",
            "jsd_beta": 0.5,
            "temperature": 1.0,
            "alpha": 1.0,
            "teachers": "sum",
            "implementation": "chunked",
            "chunk_size": 1024,
            "features": {"layer_map": "auto", "hidden_states": {"weight": 0.5, "kind": "cosine"}},
            "on_policy": {"fraction": 0.5, "max_new_tokens": 64, "sampling_temperature": 1.0},
        },
    }
    text = "\n".join(loss_section(config))
    assert "total = 1 · T² · jsd(T = 1.0) + 0 · cross-entropy; JSD β = 0.5" in text
    assert "+ feature terms: hidden_states (weight 0.5, cosine); layer map auto" in text
    assert (
        "Teachers (sum: Σ wᵢ · divergence against each Pᵢ, weights normalised): `instruct` × 0.5, `expert` × 0.5"
    ) in text
    assert "On-policy: 50% of the steps train on the student's own responses (up to 64 tokens" in text
    assert "Implementation: chunked (chunks of 1024 tokens)" in text
    auto = "\n".join(loss_section({**config, "loss": {**config["loss"], "chunk_size": "auto"}}))
    assert "Implementation: chunked (chunks sized to the vocabulary, 'auto')" in auto
    classifier = "\n".join(loss_section({**config, "task": "sequence_classification", "additional_teachers": []}))
    assert "Implementation" not in classifier and "Teachers" not in classifier


def test_training_section_gives_tokens_hardware_and_on_policy_cost():
    config = {
        "data": {"source": "chatterbot", "format": "chat", "max_seq_len": 192},
        "training": {
            "max_steps": 100,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2,
            "learning_rate": 5e-4,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.05,
            "bf16": True,
        },
    }
    train = {
        "global_step": 100,
        "tokens_per_step": 3072,
        "train_seconds": 250.4,
        "device": "cpu",
        "torch_threads": 2,
        "on_policy": {"steps": 48, "share": 0.48, "tokens": 20000, "seconds": 90.2},
    }
    text = "\n".join(training_section(config, train, {}, "Fake CPU"))
    assert "(batch 16)" in text and "bf16 training" in text
    assert "- distillation: 100 steps, 307,200 sequence tokens, in 250 s on cpu (2 threads), Fake CPU" in text
    assert "- on-policy: 48 of the steps (48%) sampled 20,000 student tokens in 90 s of the training time" in text
    # training.bf16 'auto': the precision the run recorded, else what the config allows
    config["training"]["bf16"] = "auto"
    assert "fp32 training" in "\n".join(training_section(config, {**train, "precision": "fp32"}, {}, None))
    assert "bf16 where native training" in "\n".join(training_section(config, {}, {}, None))


def test_the_on_policy_samples_cut_at_the_cap_and_their_sampling_settings_are_reported():
    config = {
        "data": {"source": "chatterbot", "format": "chat", "max_seq_len": 192},
        "training": {"max_steps": 100, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1},
        "loss": {"on_policy": {"fraction": 0.5, "max_new_tokens": 64, "sampling_temperature": None}},
    }
    train = {
        "global_step": 100,
        "tokens_per_step": 1536,
        "train_seconds": 250.4,
        "device": "cpu",
        "torch_threads": 2,
        "on_policy": {
            "steps": 48,
            "share": 0.48,
            "tokens": 20000,
            "seconds": 90.2,
            "samples": 384,
            "capped": 96,
            "capped_share": 0.25,
            "sampling": {
                "temperature": 0.7,
                "top_p": 0.95,
                "top_k": 0,
                "source": {"temperature": "default", "top_p": "default", "top_k": "teacher"},
            },
        },
    }
    text = "\n".join(training_section(config, train, {}, None))
    assert "96 of the 384 responses (25%) ran to max_new_tokens (64) without ending" in text
    assert "sampled at temperature 0.7, top-p 0.95, top-k 0 (from: alambic default, teacher)" in text
    # the config's section says where unset sampling settings come from instead of printing None
    [line] = [line for line in loss_section(config) if "On-policy" in line]
    assert "(up to 64 tokens, the models' own sampling settings)" in line and "None" not in line
