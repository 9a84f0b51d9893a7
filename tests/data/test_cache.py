"""alambic.data.cache: the offline teacher cache, written once, read back row for row.

- The stored ids and log-probs are the teacher's own top-k at the counted positions, in order.
- Writing resumes: shards already complete are kept (untouched on disk), only missing ones are run.
- A cache made from another tokenizer, dataset, k or temperature is refused with a message that says
  what differs and how to rebuild.
- The collated teacher rows line up with the student's `hidden[:, :-1][mask]`.
- Training from the cache moves a student toward the teacher; the manifest's KL(full ‖ cached) falls as
  k grows.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open

from alambic.config import LossConfig
from alambic.data.cache import (
    CachedTeacherCollator,
    CachedTeacherDataset,
    CacheMismatchError,
    TeacherCache,
    cache_fingerprint,
    write_teacher_cache,
)
from alambic.losses.divergences import distillation_loss
from alambic.modeling import counted_positions, final_hidden_states, project
from alambic.teachers.cached import cached_teacher_loss
from helpers import tiny_model, tiny_prepared, tiny_tokenizer

PAD = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    # chat: prompts and scaffolding masked, so sequences have different counted positions
    return tiny_prepared(tmp_path_factory.mktemp("data"), chat=True)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama", seed=0)


def ragged(dataset):
    """The sequences cut to different lengths (a list of dicts: the writer takes any indexable rows)."""
    rows = []
    for i in range(len(dataset)):
        row = dataset[i]
        cut = len(row["input_ids"]) - 5 * (i % 4)
        rows.append({key: row[key][:cut] for key in ("input_ids", "attention_mask", "labels")})
    return rows


def write(teacher, tokenizer, data, folder, *, k=8, temperature=1.0, **kwargs):
    fp = cache_fingerprint(tokenizer, data, k=k, temperature=temperature, teacher_id="tiny-llama")
    kwargs = {"dtype": "float32", "batch_size": 3, "sequences_per_shard": 5, "progress": False, **kwargs}
    return write_teacher_cache(teacher, data, folder, k=k, temperature=temperature, fingerprint=fp, **kwargs)


def direct_topk(teacher, row, k, temperature=1.0):
    """The teacher's top-k at the counted positions of one unpadded sequence, from its full logits."""
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits[0, :-1].double()  # (T-1, V)
    mask = torch.tensor(row["labels"][1:]) != -100
    log_p = torch.log_softmax(logits[mask] / temperature, dim=-1)
    top = log_p.topk(k, dim=-1)
    return top.indices, top.values, torch.log1p(-top.values.exp().sum(-1))


# --------------------------------------------------------------------------------------------
# write, read


@pytest.mark.parametrize("dtype, tol", [("float32", 2e-5), ("float16", 2e-3)])
def test_round_trip_matches_the_teachers_topk(teacher, tokenizer, prepared, tmp_path, dtype, tol):
    data = ragged(prepared.train)
    manifest = write(
        teacher, tokenizer, data, tmp_path / "cache", k=8, temperature=2.0, dtype=dtype, progress=dtype == "float16"
    )
    cache = TeacherCache(tmp_path / "cache")
    assert len(cache) == len(data) == 12 and cache.k == 8 and cache.temperature == 2.0
    assert [s["num_sequences"] for s in manifest["shards"]] == [5, 5, 2]
    counted = sum(sum(1 for label in r["labels"][1:] if label != -100) for r in data)
    assert manifest["totals"]["counted_tokens"] == counted == sum(s["num_tokens"] for s in manifest["shards"])
    payload = 8 * 4 + 8 * (2 if dtype == "float16" else 4) + 4
    assert manifest["payload_bytes_per_counted_token"] == payload <= manifest["bytes_per_counted_token"]
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["k"] == 8
    with safe_open(str(tmp_path / "cache" / "shard-00000.safetensors"), framework="pt") as f:
        assert f.get_slice("ids").get_dtype() == "I32"
        assert f.get_tensor("logprobs").dtype == getattr(torch, dtype)
        assert f.get_tensor("offsets").tolist()[0] == 0
    for i in range(len(data)):
        ids, logprobs, tail = direct_topk(teacher, data[i], 8, temperature=2.0)
        rows = cache[i]
        assert rows["ids"].dtype == torch.long and rows["logprobs"].dtype == rows["tail"].dtype == torch.float32
        assert torch.equal(rows["ids"], ids), f"sequence {i}"
        torch.testing.assert_close(rows["logprobs"].double(), logprobs, atol=tol, rtol=tol)
        torch.testing.assert_close(rows["tail"].double(), tail, atol=2e-5, rtol=2e-5)
    assert torch.equal(cache[-1]["ids"], cache[len(data) - 1]["ids"])
    assert torch.equal(pickle.loads(pickle.dumps(cache))[3]["ids"], cache[3]["ids"])  # data loader workers
    with pytest.raises(IndexError):
        cache[len(data)]


def test_resume_writes_only_missing_shards(teacher, tokenizer, prepared, tmp_path):
    folder = tmp_path / "cache"
    first = write(teacher, tokenizer, prepared.train, folder)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    (folder / "manifest.json").unlink()
    (folder / "shard-00002.safetensors").unlink()
    (folder / ".shard-00001.safetensors.tmp").write_text("cut off mid-write")

    seen = []
    hook = teacher.register_forward_hook(lambda _m, _a, kw, _o: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        again = write(teacher, tokenizer, prepared.train, folder)
        assert sum(seen) == 2  # the last shard's 2 sequences, nothing else
        seen.clear()
        assert write(teacher, tokenizer, prepared.train, folder)["key"] == first["key"]
        assert sum(seen) == 0  # complete: nothing to run
        # other settings in the same folder: every shard is rebuilt
        rebuilt = write(teacher, tokenizer, prepared.train, folder, k=4)
        assert sum(seen) == 12 and rebuilt["k"] == 4
    finally:
        hook.remove()
    for name in ("shard-00000.safetensors", "shard-00001.safetensors"):
        assert mtimes[name] != (folder / name).stat().st_mtime_ns  # rewritten by the k = 4 build
    assert not list(folder.glob(".*.tmp"))
    assert {k: v for k, v in again.items() if k != "created"} == {k: v for k, v in first.items() if k != "created"}


def test_resume_leaves_complete_shards_untouched(teacher, tokenizer, prepared, tmp_path):
    folder = tmp_path / "cache"
    write(teacher, tokenizer, prepared.train, folder)
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    (folder / "manifest.json").unlink()
    (folder / "shard-00002.safetensors").unlink()
    write(teacher, tokenizer, prepared.train, folder)
    for name in ("shard-00000.safetensors", "shard-00001.safetensors"):
        assert (folder / name).stat().st_mtime_ns == before[name]
    assert (folder / "shard-00002.safetensors").is_file() and (folder / "manifest.json").is_file()


def test_refuses_another_tokenizer_dataset_or_k(teacher, tokenizer, prepared, tmp_path):
    folder = tmp_path / "teacher_cache"
    write(teacher, tokenizer, prepared.train, folder, k=8)
    cache = TeacherCache(folder)
    same = cache_fingerprint(tokenizer, prepared.train, k=8, temperature=1.0, teacher_id="tiny-llama")
    cache.check_compatible(same)

    other_tok = cache_fingerprint(tiny_tokenizer(300), prepared.train, k=8, temperature=1.0, teacher_id="tiny-llama")
    mismatch = r"was made for another tokenizer \(tokenizer: cached .*size.*320"
    with pytest.raises(CacheMismatchError, match=mismatch) as e:
        cache.check_compatible(other_tok)
    assert str(folder) in str(e.value) and "rebuild it with `alambic cache CONFIG`" in str(e.value)
    assert "data.teacher_cache" in str(e.value)

    other_data = cache_fingerprint(tokenizer, prepared.validation, k=8, temperature=1.0, teacher_id="tiny-llama")
    with pytest.raises(CacheMismatchError, match="another dataset"):
        cache.check_compatible(other_data)
    with pytest.raises(CacheMismatchError, match=r"another k \(ids kept per token\), temperature \(.*cached 8, now 16"):
        cache.check_compatible({**same, "k": 16, "temperature": 2.0})
    with pytest.raises(CacheMismatchError, match="holds 12"):
        CachedTeacherDataset(prepared.validation, cache)
    with pytest.raises(FileNotFoundError, match="alambic cache CONFIG"):
        TeacherCache(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# training from the cache


def test_collated_rows_line_up_with_the_students_positions(teacher, tokenizer, prepared, tmp_path):
    data = ragged(prepared.train)
    write(teacher, tokenizer, data, tmp_path / "cache", k=8)
    cache = TeacherCache(tmp_path / "cache")
    dataset = CachedTeacherDataset(data, cache)
    collate = CachedTeacherCollator(pad_token_id=PAD)
    order = [6, 1, 11, 3]  # lengths 38, 43, 33, 33: padded, in no particular order
    batch = collate([dataset[i] for i in order])

    mask, targets = counted_positions(batch["labels"])
    assert batch["teacher_ids"].shape == (int(mask.sum()), 8) == (len(targets), 8)
    assert batch["teacher_tail"].shape == (len(targets),)
    assert torch.equal(batch["teacher_ids"], torch.cat([cache[i]["ids"] for i in order]))
    # what the trainer computes: the teacher's own top-k at hidden[:, :-1][mask], row-major
    with torch.no_grad():
        hidden = final_hidden_states(teacher, teacher, batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
        log_p = torch.log_softmax(project(teacher, hidden).double(), dim=-1)
    assert torch.equal(log_p.topk(8, dim=-1).indices, batch["teacher_ids"])
    torch.testing.assert_close(
        log_p.gather(-1, batch["teacher_ids"]), batch["teacher_logprobs"].double(), atol=2e-5, rtol=2e-5
    )

    broken = dataset[1]
    broken["teacher_ids"] = broken["teacher_ids"][1:]
    with pytest.raises(ValueError, match=r"counted positions but .* teacher rows.*\(1, "):
        collate([dataset[0], broken])
    with pytest.raises(ValueError, match="CachedTeacherDataset"):
        collate([data[0]])


def test_sgd_from_the_cache_moves_the_student_toward_the_teacher(tokenizer, prepared, tmp_path):
    # A peaked teacher (a random tiny model is near-uniform): most of its mass in its top-16.
    sharp = tiny_model("llama", seed=0, tie=False)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(60.0)
    manifest = write(sharp, tokenizer, prepared.train, tmp_path / "cache", k=16)
    assert manifest["quality"]["mean_tail_mass"] < 0.5
    student = tiny_model("llama", seed=1, num_layers=2, tie=False).train()
    dataset = CachedTeacherDataset(prepared.train, TeacherCache(tmp_path / "cache"))
    batch = CachedTeacherCollator(pad_token_id=PAD)([dataset[i] for i in range(len(dataset))])
    mask, targets = counted_positions(batch["labels"])
    cfg = LossConfig(divergence="forward_kl", alpha=1.0)

    def kl_to_teacher() -> float:
        with torch.no_grad():
            s = project(student, final_hidden_states(student, student, batch["input_ids"], batch["attention_mask"]))
            t = project(sharp, final_hidden_states(sharp, sharp, batch["input_ids"], batch["attention_mask"]))
            return distillation_loss(s[:, :-1][mask], t[:, :-1][mask], targets, alpha=1.0).soft.item()

    before = kl_to_teacher()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(15):
        hidden = final_hidden_states(student, student, batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
        loss = cached_teacher_loss(student, hidden, batch, targets, cfg, chunk_size=64).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = kl_to_teacher()
    assert after < 0.5 * before, (before, after)


def test_manifest_kl_to_the_full_teacher_falls_as_k_grows(teacher, tokenizer, prepared, tmp_path):
    data = [prepared.train[i] for i in range(4)]
    kl = []
    for k in (1, 8, 64, 320):
        manifest = write(teacher, tokenizer, data, tmp_path / f"k{k}", k=k, sequences_per_shard=2)
        kl.append(manifest["quality"]["kl_full_to_cached"])
    assert all(a > b for a, b in zip(kl, kl[1:])), kl
    assert kl[-1] == 0.0 and kl[0] > 0.0
