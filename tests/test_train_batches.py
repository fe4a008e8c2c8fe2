"""The trainer's batch sources: every micro-batch is a function of (step, micro), so a resumed
run sees exactly the batches the uninterrupted run would have seen (issue 5)."""

from __future__ import annotations

import pytest

from sparse_dit.config import ConfigError
from sparse_dit.recipes.batches import BatchSource, BucketSource


class _Items:
    """A map-style dataset of n items; shapes for the bucket sampler."""

    def __init__(self, shapes):
        self.shapes = list(shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i):
        return i

    def sample_shapes(self):
        return list(self.shapes)


def _all(src, steps, accum):
    return [src.indices(s, m) for s in range(steps) for m in range(accum)]


def test_batch_source_walks_epochs_and_resumes_exactly() -> None:
    ds = _Items([(4, 8, 8)] * 10)
    src = BatchSource(ds, micro_batch=2, accum=2, rank=0, world_size=1, seed=3)
    assert src.per_epoch == 5
    seen = _all(src, steps=5, accum=2)  # 10 micro-batches = 2 epochs
    epoch0 = [i for b in seen[:5] for i in b]
    epoch1 = [i for b in seen[5:] for i in b]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))  # each epoch covers the data once
    assert epoch0 != epoch1  # reshuffled per epoch
    # A fresh source (a resumed run) positioned at any step gives the same micro-batches.
    fresh = BatchSource(ds, micro_batch=2, accum=2, rank=0, world_size=1, seed=3)
    assert [fresh.indices(s, m) for s in (4, 1, 3) for m in range(2)] == [seen[s * 2 + m] for s in (4, 1, 3) for m in range(2)]


def test_batch_source_shards_ranks_and_refuses_too_little_data() -> None:
    ds = _Items([(4, 8, 8)] * 8)
    ranks = [BatchSource(ds, micro_batch=2, accum=1, rank=r, world_size=2, seed=0) for r in range(2)]
    step0 = [i for r in ranks for i in r.indices(0, 0) + r.indices(1, 0)]
    assert sorted(step0) == list(range(8))  # the two ranks split the epoch
    with pytest.raises(ConfigError, match="fewer than one global micro-batch"):
        BatchSource(_Items([(4, 8, 8)] * 3), micro_batch=2, accum=1, rank=0, world_size=2, seed=0)


def test_bucket_source_batches_one_shape_per_micro_batch_and_resumes_exactly() -> None:
    shapes = [(4, 8, 8)] * 16 + [(8, 16, 16)] * 6
    ds = _Items(shapes)
    # Budget 512 tokens at patch (1, 2, 2): 8 clips of (4, 8, 8) (64 tokens each) or 1 of (8, 16, 16).
    src = BucketSource(ds, token_budget=512, patch_size=(1, 2, 2), accum=1, rank=0, world_size=1, seed=1)
    assert src.per_epoch == 2 + 6
    seen = _all(src, steps=2 * src.per_epoch, accum=1)
    for b in seen:
        assert len({shapes[i] for i in b}) == 1
        assert len(b) == (8 if shapes[b[0]] == (4, 8, 8) else 1)
    assert sorted(i for b in seen[: src.per_epoch] for i in b) == list(range(22))  # the epoch covers the data once
    assert seen[: src.per_epoch] != seen[src.per_epoch :]  # reshuffled per epoch
    fresh = BucketSource(ds, token_budget=512, patch_size=(1, 2, 2), accum=1, rank=0, world_size=1, seed=1)
    assert [fresh.indices(s, 0) for s in (11, 2, 9)] == [seen[11], seen[2], seen[9]]
