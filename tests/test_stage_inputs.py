"""Each stage's inputs hash covers exactly the config fields it reads (style.md: "Declare what you depend on")."""

from alambic.pipeline import _stage_hashes
from alambic.stages import STAGES
from test_pipeline import tiny_run_config


def _cached_config(tmp_path):
    return tiny_run_config(tmp_path, data={"teacher_cache": {"k": 8, "sequences_per_shard": 4}})


def _hashes(cfg):
    return _stage_hashes(cfg, [s for s in STAGES if s.enabled(cfg)])


def test_a_loss_alpha_sweep_shares_one_teacher_cache(tmp_path):
    """The cache holds the teacher's top-k at loss.temperature: alpha only weighs it in distillation."""
    cfg = _cached_config(tmp_path)
    other = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"alpha": 0.3})})
    before, after = _hashes(cfg), _hashes(other)
    assert before["cache"] == after["cache"]
    assert before["distill"] != after["distill"]
    hotter = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"temperature": 4.0})})
    assert _hashes(hotter)["cache"] != before["cache"]  # the cached log-probs are taken at this temperature


def test_changing_the_cache_size_redoes_the_cache_not_the_data_or_the_student(tmp_path):
    cfg = _cached_config(tmp_path)
    cache = cfg.data.teacher_cache.model_copy(update={"k": 16})
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"teacher_cache": cache})})
    before, after = _hashes(cfg), _hashes(other)
    assert before["data"] == after["data"] and before["student"] == after["student"]
    assert before["control"] == after["control"]  # the CE control never reads the cache
    assert before["cache"] != after["cache"] and before["distill"] != after["distill"]


class ConfigProbe:
    """Stands in for a pydantic config object and records the field paths read through it.

    Why a runtime probe rather than an AST scan of the stages' code: the stages hand config objects on to library
    code (`prepare_datasets(config.data, ...)`, `load_model(config.teacher)`), and only running them sees what that
    code reads. A read of a field returns its value (recorded as a read of that path); a read of a sub-model returns
    a probe of it, recorded as a read of whether it is set ("data.teacher_cache?"): `x is not None` reads no
    attribute, so that is recorded when the sub-model is reached. Anything else taken from the object (model_dump,
    a method, a property such as run_dir) is recorded as a read of the whole object, except model_copy(update=...),
    whose copy is probed further with the updated fields left out (they are set by the stage, not read). isinstance
    still holds (`__class__` is the config's class), so library code takes the probe for the real thing.
    """

    def __init__(self, target, path: str, reads: set[str], overridden: frozenset[str] = frozenset()):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_reads", reads)
        object.__setattr__(self, "_overridden", overridden)

    @property
    def __class__(self):  # noqa: D105 - isinstance(probe, LossConfig) holds
        return type(self._target)

    def _at(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def __getattr__(self, name: str):
        from pydantic import BaseModel

        target = self._target
        if name in type(target).model_fields:
            value = getattr(target, name)
            if name in self._overridden:
                return value
            if value is None:  # unset: read is whether it is set
                self._reads.add(self._at(name) + "?")
                return value
            if isinstance(value, BaseModel):
                self._reads.add(self._at(name) + "?")
                return ConfigProbe(value, self._at(name), self._reads)
            self._reads.add(self._at(name))
            return value
        if name == "model_copy":

            def model_copy(*, update=None, deep=False):
                copy = target.model_copy(update=update, deep=deep)
                return ConfigProbe(copy, self._path, self._reads, self._overridden | frozenset(update or ()))

            return model_copy
        self._reads.add(self._path or "<the whole config>")
        return getattr(target, name)

    def __setattr__(self, name, value):
        raise AttributeError(f"a stage set {self._at(name)}: configs are not changed in place")

    def __eq__(self, other):
        self._reads.add(self._path or "<the whole config>")
        return self._target == other

    __hash__ = None


def _covered(read: str, declared: set[str]) -> bool:
    """Whether a read path is in a hash that covers the `declared` paths: a declared path covers itself and every
    field under it; a read of whether a field is set ("x.y?") is also covered by any declared field under it (a
    None field is left out of the hash, so setting it changes the hash)."""
    presence, path = read.endswith("?"), read.removesuffix("?")
    for d in declared:
        d_presence, d_path = d.endswith("?"), d.removesuffix("?")
        if path == d_path and (presence or not d_presence):
            return True
        if not d_presence and path.startswith(d_path + "."):
            return True
        if presence and d_path.startswith(path + "."):
            return True
    return False


def _hashed_inputs(stages) -> dict[str, set[str]]:
    """Per stage, every input its hash covers: its own, and those of the stages it chains on (the one before it,
    or its `after` stages), recursively, as `pipeline._stage_hashes` builds them."""
    chain, hashed, previous = {}, {}, set()
    for stage in stages:
        chain[stage.name] = previous = previous | set(stage.inputs)
        hashed[stage.name] = (
            previous
            if stage.after is None
            else set(stage.inputs).union(*(chain[name] for name in stage.after if name in chain))
        )
    return hashed


def _run_probed(cfg, monkeypatch) -> dict[str, set[str]]:
    """Run every enabled stage of `cfg` with a probe of the config; the field paths each stage read."""
    import alambic.stages
    from alambic.pipeline import Stage, run_stages

    reads: dict[str, set[str]] = {}

    def probed(stage):
        def run(config, ctx):
            reads[stage.name] = set()
            return stage.run(ConfigProbe(config, "", reads[stage.name]), ctx)

        return Stage(stage.name, stage.inputs, stage.outputs, run, stage.enabled, stage.after)

    monkeypatch.setattr(alambic.stages, "STAGES", [probed(s) for s in STAGES])
    run_stages(cfg, alambic.stages.STAGES)
    return reads


def _undeclared(cfg, reads) -> dict[str, list[str]]:
    """Per stage, the reads its hash does not cover. Whether a field is set is also covered by a stage left out of
    this run that declares it: setting it enables that stage, which joins the chain of hashes."""
    hashed = _hashed_inputs([s for s in STAGES if s.enabled(cfg)])
    for i, stage in enumerate(STAGES):
        if stage.name in hashed:
            hashed[stage.name] |= {
                f"{p.removesuffix('?')}?" for s in STAGES[:i] if not s.enabled(cfg) for p in s.inputs
            }
    return {
        name: sorted(r for r in read if not _covered(r, hashed[name]))
        for name, read in reads.items()
        if any(not _covered(r, hashed[name]) for r in read)
    }


def _unread(declared: tuple[str, ...], reads: set[str]) -> list[str]:
    """The declared inputs that no read touches (neither the field, nor one under it, nor one above it)."""

    def touched(d: str) -> bool:
        d = d.removesuffix("?")
        plain = (x.removesuffix("?") for x in reads)
        return any(r == d or r.startswith(d + ".") or d.startswith(r + ".") for r in plain)

    return [d for d in declared if not touched(d)]


def test_every_field_a_stage_reads_is_in_its_hash(tmp_path, monkeypatch):
    """Each stage of a whole tiny run (pruned student, CE control) and of one from the teacher cache is run on a
    probe of the config; every field it read must be covered by its inputs hash, and each field it declares must
    be read by it in one of the runs. A declaration broader than the reads (a whole section where the stage reads
    one field of it) passes here: the tests above pin the cases where that mattered (loss.alpha, the cache's k)."""
    plain = tiny_run_config(tmp_path / "plain")
    cached = _cached_config(tmp_path / "cached")
    reads: dict[str, set[str]] = {}
    for cfg in (plain, cached):
        found = _run_probed(cfg, monkeypatch)
        assert set(found) == {s.name for s in STAGES if s.enabled(cfg)}
        assert not (missing := _undeclared(cfg, found)), f"read but not in the stage's hash: {missing}"
        for name, paths in found.items():
            reads.setdefault(name, set()).update(paths)
    assert "cache" in reads
    # Declared but not read in these runs, by design: the teacher stage runs only with teacher.fine_tune, the data
    # stage reads the student's model only for a given student (these runs prune one), and the data fields of other
    # sources and formats (the runs read files of text).
    unread = {s.name: _unread(s.inputs, reads[s.name]) for s in STAGES if s.name in reads}
    unread["data"] = [
        d for d in unread["data"] if d not in ("student.model", "student.gguf_file") and not d.startswith("data.")
    ]
    assert not {k: v for k, v in unread.items() if v}, f"declared but never read: {unread}"
