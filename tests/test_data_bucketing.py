"""Any-size batching: shapes never mix, the token budget holds, ranks shard like DistributedSampler."""

import math
from collections import Counter

import numpy as np
import pytest

from sparse_dit.data.bucketing import BucketBatchSampler, assign_bucket, make_buckets, tokens_per_sample


def random_shapes(n=300, seed=0):
    rng = np.random.default_rng(seed)
    choices = [(4, 16, 16), (8, 16, 16), (16, 16, 16), (8, 16, 24), (8, 24, 16), (16, 32, 32), (4, 32, 56)]
    return [choices[i] for i in rng.integers(0, len(choices), n)]


def test_batches_hold_one_shape_and_respect_the_token_budget():
    shapes = random_shapes()
    budget = 4096
    sampler = BucketBatchSampler(shapes, token_budget=budget, patch_size=(1, 2, 2), seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    sizes = Counter()
    for batch in batches:
        assert len({shapes[i] for i in batch}) == 1  # never mixes shapes
        shape = shapes[batch[0]]
        tokens = len(batch) * tokens_per_sample(shape, (1, 2, 2))
        assert tokens <= budget
        sizes[shape] = max(sizes[shape], len(batch))
    # Token-budget batch size: more short/small videos per batch, fewer long/large ones.
    assert sizes[(4, 16, 16)] == budget // (4 * 8 * 8) == 16
    assert sizes[(16, 32, 32)] == budget // (16 * 16 * 16) == 1
    assert sizes[(4, 16, 16)] > sizes[(8, 16, 16)] > sizes[(16, 16, 16)]
    # Each index exactly once per epoch on one rank; shapes vary across batches.
    assert sorted(i for b in batches for i in b) == list(range(len(shapes)))
    assert len({shapes[b[0]] for b in batches}) == len(set(shapes))


def test_rank_sharding_epochs_and_determinism():
    shapes = random_shapes(101, seed=1)
    world = 3
    per_rank = [list(BucketBatchSampler(shapes, 8192, seed=5, rank=r, world_size=world)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    covered = [i for batches in per_rank for b in batches for i in b]
    assert set(covered) == set(range(len(shapes)))  # padding may repeat, never drops
    padded = len(per_rank[0]) * world - len(list(BucketBatchSampler(shapes, 8192, seed=5)))
    assert 0 <= padded < world

    a = BucketBatchSampler(shapes, 8192, seed=5)
    b = BucketBatchSampler(shapes, 8192, seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(i for x in a for i in x) == list(range(101))

    dropped = [list(BucketBatchSampler(shapes, 8192, seed=5, rank=r, world_size=world, drop_last=True)) for r in range(world)]
    assert len({len(b) for b in dropped}) == 1
    for batches in dropped:
        for batch in batches:
            assert len(batch) == BucketBatchSampler(shapes, 8192).batch_size_for(shapes[batch[0]])
    flat = [i for batches in dropped for b in batches for i in b]
    assert len(flat) == len(set(flat))  # drop_last never repeats an index


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="token_budget"):
        BucketBatchSampler([(16, 64, 64)], token_budget=100)
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler([(4, 8, 8)], token_budget=100, rank=2, world_size=2)


def test_aspect_ratio_buckets():
    buckets = make_buckets(resolutions=(32, 64), frame_counts=(8, 16), multiple=8)
    for t, h, w in buckets:
        assert h % 8 == 0 and w % 8 == 0
    assert (16, 32, 32) in buckets and (8, 64, 64) in buckets
    # Landscape 1080p video of 100 frames -> the 16:9-ish bucket, largest area, longest duration.
    t, h, w = assign_bucket(100, 1080, 1920, buckets)
    assert t == 16 and w > h and abs(math.log(h / w) - math.log(9 / 16)) < 0.15 and h * w > 32 * 32 * 2
    # Portrait phone clip of 10 frames at low resolution -> portrait, small area, 8 frames.
    t, h, w = assign_bucket(10, 48, 27, buckets)
    assert t == 8 and h > w and h * w <= 48 * 27 * 1.5
    assert assign_bucket(5, 64, 64, buckets) is None  # shorter than every bucket duration
