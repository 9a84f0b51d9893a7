"""Offline teacher cache: run the teacher once over the training data, keep per counted token its top-k
log-probs, their ids and the log of its tail mass, and read them back during training.

Layout of a cache folder:

    shard-00000.safetensors   sequences [0, S), S = sequences_per_shard
        offsets   (S + 1,)  int64    rows of sequence j are [offsets[j], offsets[j + 1])
        ids       (n, k)    int32    the teacher's k most likely ids, most likely first
        logprobs  (n, k)    dtype    log softmax(z / T) at those ids (float16, bfloat16 or float32)
        tail      (n,)      float32  log(1 − Σ_topk p): the mass of the other V − k ids (floor when 0)
    shard-00001.safetensors   sequences [S, 2S) ...
    manifest.json             written last: its presence means the cache is complete

A sequence's rows are its counted positions in position order (position t predicts labels[t + 1],
`modeling.counted_positions`), so the rows of a batch, concatenated sample after sample, line up with
the student's `hidden[:, :-1][mask]` taken row-major.

Each shard is written under a temporary name and renamed (a reader sees a whole shard or none), and
carries in its metadata the key of the settings it was made with: re-running the writer keeps the
shards already complete for the same settings and writes only the others (resume after a crash).

Modules: `fingerprint` (what a cache is made from, the mismatch error), `write` (the writer, resumable),
`read` (`TeacherCache`, and the dataset and collator that feed its rows to training).
"""

from alambic.data.cache.fingerprint import (
    CacheMismatchError,
    cache_fingerprint,
    dataset_fingerprint,
    tokenizer_fingerprint,
)
from alambic.data.cache.read import (
    TEACHER_KEYS,
    CachedTeacherCollator,
    CachedTeacherDataset,
    TeacherCache,
    with_cached_rows,
)
from alambic.data.cache.write import write_teacher_cache

__all__ = [
    "TEACHER_KEYS",
    "CacheMismatchError",
    "CachedTeacherCollator",
    "CachedTeacherDataset",
    "TeacherCache",
    "cache_fingerprint",
    "dataset_fingerprint",
    "tokenizer_fingerprint",
    "with_cached_rows",
    "write_teacher_cache",
]
