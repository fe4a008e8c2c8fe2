"""Any-size batching: (T, H, W) buckets with aspect-ratio buckets and a token budget.

Sora-style training takes videos at their native duration, resolution and aspect ratio. A batch
must still hold one shape (the model stacks it into one tensor), so each video is assigned a
bucket shape (T, H, W): a resolution tier (fixed pixel area), the aspect-ratio bucket nearest to
its own (in log ratio) within it, and the longest bucket duration it can fill. Batches are cut per
bucket with a *token budget*: ``batch_size = token_budget // tokens(T, H, W)``, so a batch of
short, small clips holds more videos than one of long clips and the activation memory of each
step stays about flat (the approach of NaViT's token budget and of Open-Sora's bucket config).

:class:`BucketBatchSampler` is a batch sampler for ``torch.utils.data.DataLoader``
(``batch_sampler=``). It shards like ``DistributedSampler``: all ranks build the same shuffled
list of batches from ``seed + epoch`` and rank r takes batches r, r + world_size, ...; the list is
padded (by repeating its first batches) or cut (``drop_last``) so every rank gets the same number
of batches and no collective waits on a rank that ran out. Call ``set_epoch(epoch)`` each epoch.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = [
    "Shape",
    "DEFAULT_ASPECT_RATIOS",
    "make_buckets",
    "assign_bucket",
    "tokens_per_sample",
    "BucketBatchSampler",
]

Shape = tuple[int, int, int]  # (T, H, W)

# Height / width ratios: portrait 9:16 and 3:4, square, landscape 4:3 and 16:9 (widescreen).
DEFAULT_ASPECT_RATIOS: tuple[float, ...] = (16 / 9, 4 / 3, 1.0, 3 / 4, 9 / 16)


def make_buckets(
    resolutions: Sequence[int] = (32,),
    frame_counts: Sequence[int] = (8, 16),
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    multiple: int = 8,
) -> list[Shape]:
    """All bucket shapes: for each resolution (side of the equal-area square), aspect ratio and
    frame count, (T, H, W) with H and W multiples of ``multiple`` and H * W close to res^2.

    Args:
        resolutions: square-equivalent sides in pixels (e.g. 256 means about 256 x 256 pixels).
        frame_counts: bucket durations in frames.
        aspect_ratios: height / width ratios.
        multiple: H and W are rounded to multiples of this (patch size x VAE downsampling).
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    shapes: set[Shape] = set()
    for res in resolutions:
        for ratio in aspect_ratios:
            if not ratio > 0:
                raise ValueError(f"aspect ratios must be > 0, got {ratio}")
            h = max(multiple, int(round(res * math.sqrt(ratio) / multiple)) * multiple)
            w = max(multiple, int(round(res / math.sqrt(ratio) / multiple)) * multiple)
            for t in frame_counts:
                if t < 1:
                    raise ValueError(f"frame counts must be >= 1, got {t}")
                shapes.add((int(t), h, w))
    return sorted(shapes)


def assign_bucket(num_frames: int, height: int, width: int, buckets: Sequence[Shape]) -> Shape | None:
    """The bucket for a video: first the resolution tier (the largest bucket area not above 1.25x
    the video's own, so videos are rarely upscaled; the smallest if none), then the nearest
    aspect ratio in that tier (log scale), then the longest duration the video can fill.

    Args:
        num_frames: frames available (after frame-rate subsampling).
        height: video height.
        width: video width.
        buckets: candidate shapes (T, H, W).

    Returns:
        The shape, or None when the video is shorter than every bucket duration.
    """
    if not buckets:
        raise ValueError("buckets must not be empty")
    area = height * width
    fits = [b for b in buckets if b[1] * b[2] <= 1.25 * area]
    if not fits:
        smallest = min(b[1] * b[2] for b in buckets)
        fits = [b for b in buckets if b[1] * b[2] <= 1.5 * smallest]
    top = max(b[1] * b[2] for b in fits)
    # One tier: areas within 1.5x of the largest fitting one. Rounding H and W to multiples
    # makes a tier's areas differ a little; tiers from make_buckets differ by more.
    tier = [b for b in fits if b[1] * b[2] * 1.5 >= top]
    ratio = math.log(height / width)
    best = min(abs(math.log(h / w) - ratio) for _, h, w in tier)
    spatial = {(h, w) for _, h, w in tier if abs(math.log(h / w) - ratio) <= best + 1e-9}
    hw = max(spatial, key=lambda s: s[0] * s[1])
    candidates = [b for b in tier if (b[1], b[2]) == hw and b[0] <= num_frames]
    return max(candidates) if candidates else None


def tokens_per_sample(shape: Shape, patch_size: Sequence[int] = (1, 2, 2), downsample: Sequence[int] = (1, 1, 1)) -> int:
    """Transformer tokens of one video: ceil(T / (dt * pt)) * ceil(H / (dh * ph)) * ceil(W / (dw * pw)).

    Args:
        shape: (T, H, W) in pixels and frames.
        patch_size: spacetime patch (pt, ph, pw).
        downsample: compression network strides (dt, dh, dw); (1, 1, 1) in pixel space.
    """
    return int(np.prod([math.ceil(s / (p * d)) for s, p, d in zip(shape, patch_size, downsample)]))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices that share one shape, sized by a token budget, sharded over ranks.

    Args:
        shapes: the (T, H, W) each dataset index will have (``dataset.sample_shapes()``).
        token_budget: max tokens per batch (batch size x tokens per sample).
        patch_size: spacetime patch (pt, ph, pw) used to count tokens.
        downsample: compression network strides (dt, dh, dw).
        max_batch_size: optional cap on videos per batch.
        shuffle: shuffle indices within buckets and the order of batches each epoch.
        seed: shuffling seed, shared by all ranks.
        rank: this process's rank.
        world_size: number of ranks.
        drop_last: drop each bucket's incomplete last batch, and cut (rather than pad) the batch
            list to a multiple of world_size.
    """

    def __init__(
        self,
        shapes: Sequence[Shape],
        token_budget: int,
        patch_size: Sequence[int] = (1, 2, 2),
        downsample: Sequence[int] = (1, 1, 1),
        max_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.shapes = [tuple(int(x) for x in s) for s in shapes]
        self.token_budget, self.patch_size, self.downsample = int(token_budget), tuple(patch_size), tuple(downsample)
        self.max_batch_size, self.shuffle, self.seed = max_batch_size, shuffle, int(seed)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.buckets: dict[Shape, list[int]] = {}
        for index, shape in enumerate(self.shapes):
            self.buckets.setdefault(shape, []).append(index)
        for shape in self.buckets:
            if tokens_per_sample(shape, self.patch_size, self.downsample) > self.token_budget:
                raise ValueError(
                    f"a video of shape (T, H, W)={shape} has {tokens_per_sample(shape, self.patch_size, self.downsample)} tokens "
                    f"> token_budget={self.token_budget}; raise token_budget or use smaller buckets"
                )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch (same on every rank)."""
        self.epoch = int(epoch)

    def batch_size_for(self, shape: Shape) -> int:
        """Videos per batch for this shape under the token budget.

        Args:
            shape: (T, H, W).
        """
        size = self.token_budget // tokens_per_sample(shape, self.patch_size, self.downsample)
        return min(size, self.max_batch_size) if self.max_batch_size else size

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        for shape in sorted(self.buckets):
            indices = np.array(self.buckets[shape])
            if self.shuffle:
                indices = rng.permutation(indices)
            size = self.batch_size_for(shape)
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size].tolist()
                if len(chunk) == size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.world_size > 1 and batches:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % self.world_size]
            else:  # pad by repeating batches so every rank gets as many
                pad = (-len(batches)) % self.world_size
                batches = batches + [batches[i % len(batches)] for i in range(pad)]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._all_batches()[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self._all_batches()) // self.world_size
