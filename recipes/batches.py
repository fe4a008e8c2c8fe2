"""Training batches for the trainer: data sources, sharding, conditioning, context-frame masks.

Everything random in a batch is a pure function of (seed, step, micro-step, rank): the batch
indices come from a ``DistributedSampler`` whose epoch and position follow from the step, and
timesteps, noise, context masks and CFG dropout use a generator seeded from the same numbers
(:func:`step_generator`). A resumed run therefore sees exactly the batches an uninterrupted run
would, with no sampler or RNG state to checkpoint.

# B = batch, C = channels, T = frames, H/W = height/width
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sparse_dit.config import CONTEXT_TASKS, ConfigError, ContextConfig, RecipeConfig
from sparse_dit.data.bucketing import BucketBatchSampler, make_buckets
from sparse_dit.data.sources import DATA_SOURCES
from sparse_dit.data.text import load_text_encoder

__all__ = ["step_generator", "context_mask", "build_dataset", "BatchSource", "BucketSource", "bucket_shapes", "collate", "Conditioner"]

def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step, micro-step, rank): same numbers, same draws.

    Args:
        seed: ``train.seed``.
        step: optimizer step (0-based).
        micro: micro-step inside the step (gradient accumulation).
        rank: global rank.
    """
    # Distinct large odd multipliers keep the combined seeds of nearby tuples apart.
    mixed = (seed * 1_000_003 + step * 7_919 + micro * 104_729 + rank * 15_485_863) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def context_mask(batch: int, frames: int, context: ContextConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, T) bool: True where a frame is given clean (``train.context``).

    ``mode: prefix`` gives every sample its first ``frames`` frames. ``mode: random`` gives a
    sample a mask with probability ``prob``: one task of :data:`~sparse_dit.config.CONTEXT_TASKS`
    drawn with the ``tasks`` weights; ``predict`` keeps the first k frames, ``extend_backward``
    the last k, ``interpolate`` the first k1 and last k2, with k (and k1 + k2) uniform in
    [1, T - 1]; ``image_to_video`` keeps frame 0. At least one frame is always left to
    generate, and single-frame samples never get a mask. ``mode: none`` gives no mask.

    Args:
        batch: B.
        frames: T (latent frames).
        context: the recipe's ``train.context``.
        generator: the step's generator.

    Raises:
        ValueError: a prefix that would leave no frame to generate on a clip of ``frames`` frames.
    """
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    if context.mode == "prefix":
        if frames < 2:
            return mask  # an image: nothing to predict from
        if context.frames >= frames:
            raise ValueError(
                f"train.context.frames={context.frames} leaves no frame to generate in a clip of {frames} (latent) frames; "
                f"allowed: 1..{frames - 1}"
            )
        mask[:, : context.frames] = True
        return mask
    if context.mode == "none" or frames < 2 or context.prob <= 0:
        return mask
    weights = torch.tensor([float(context.tasks.get(t, 0.0)) for t in CONTEXT_TASKS], dtype=torch.float64)
    use = torch.rand(batch, generator=generator) < context.prob
    modes = torch.multinomial(weights, batch, replacement=True, generator=generator)
    ks = torch.randint(1, frames, (batch, 2), generator=generator)  # in [1, T-1]
    for b in range(batch):
        if not use[b]:
            continue
        mode, k = CONTEXT_TASKS[int(modes[b])], int(ks[b, 0])
        if mode == "predict":
            mask[b, :k] = True
        elif mode == "extend_backward":
            mask[b, frames - k :] = True
        elif mode == "interpolate" and frames >= 3:
            k1 = max(1, min(k, frames - 2))
            k2 = max(1, min(int(ks[b, 1]), frames - 1 - k1))
            mask[b, :k1] = True
            mask[b, frames - k2 :] = True
        else:  # image_to_video (and interpolate on 2-frame clips)
            mask[b, 0] = True
    return mask


def bucket_shapes(recipe: RecipeConfig) -> list[tuple[int, int, int]]:
    """The (T, H, W) buckets of ``data.bucket_resolutions`` x ``bucket_frame_counts`` x the
    default aspect ratios, with H and W multiples of 8 and of the spatial patch."""

    d, (pt, ph, pw) = recipe.data, recipe.model.patch_size
    multiple = math.lcm(8, ph, pw)
    bad = [t for t in d.bucket_frame_counts if t % pt]
    if bad:
        raise ConfigError(f"data.bucket_frame_counts={list(d.bucket_frame_counts)} must be multiples of the temporal patch {pt}")
    return make_buckets(d.bucket_resolutions, d.bucket_frame_counts, multiple=multiple)


def build_dataset(recipe: RecipeConfig, held_out: bool = False) -> Dataset:
    """The training (or a small held-out) dataset of ``recipe.data``.

    Items are dicts with ``video`` (C, T, H, W) in [-1, 1], ``caption`` and, for the synthetic
    source, ``label``. The source is looked up in
    :data:`sparse_dit.data.sources.DATA_SOURCES` (``synthetic``, ``physics``, ``folder``,
    ``hf``). Real-video sources are cropped to ``data.num_frames`` x ``data.height`` x
    ``data.width`` so every batch has one shape, or to the ``data.token_budget`` buckets.

    Args:
        recipe: the recipe.
        held_out: a few clips the training set does not contain (for sample videos).
    """
    d = recipe.data
    source = DATA_SOURCES.get(d.source)
    if source is None:
        raise ConfigError(f"data.source={d.source!r} is not a data source; allowed: {sorted(DATA_SOURCES)}")
    if source.needs_path and d.path is None:
        raise ConfigError(f"data.source={d.source!r} needs data.path (a dataset folder)")
    buckets = bucket_shapes(recipe) if source.bucketed and d.token_budget is not None and not held_out else None
    return source.build(d, held_out=held_out, seed=recipe.train.seed, buckets=buckets)


class BatchSource:
    """Micro-batches for one rank: ``DistributedSampler`` order, positioned by the step.

    Global micro-batch ``k = step * accum + micro`` of an epoch of ``len(sampler) // micro_batch``
    micro-batches; the epoch is ``k // that`` (``sampler.set_epoch``) and the position the rest.

    Args:
        dataset: map-style dataset.
        micro_batch: samples per rank per micro-step.
        accum: micro-steps per optimizer step.
        rank, world_size: data-parallel coordinates (every rank is one).
        seed: shuffling seed (``train.seed``).
    """

    def __init__(self, dataset: Dataset, micro_batch: int, accum: int, rank: int, world_size: int, seed: int) -> None:
        self.dataset, self.micro_batch, self.accum = dataset, micro_batch, accum
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = len(self.sampler) // micro_batch
        if self.per_epoch < 1:
            raise ConfigError(
                f"the dataset has {len(dataset)} videos, fewer than one global micro-batch "
                f"({micro_batch} x {world_size} ranks); add data (data.num_videos) or lower train.global_batch_size"
            )
        self._epoch: Optional[int] = None
        self._order: list[int] = []

    def indices(self, step: int, micro: int) -> list[int]:
        """Dataset indices of this rank's micro-batch ``micro`` of optimizer step ``step``."""
        k = step * self.accum + micro
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._order, self._epoch = list(iter(self.sampler)), epoch
        if hasattr(self.dataset, "set_epoch"):  # real video: the epoch's random windows (a pure function of it)
            self.dataset.set_epoch(epoch)
        return self._select(pos)

    def _select(self, pos: int) -> list[int]:
        """Micro-batch ``pos`` of the epoch's order (the sampler yields sample indices)."""
        return self._order[pos * self.micro_batch : (pos + 1) * self.micro_batch]

    def batch(self, step: int, micro: int) -> dict[str, Any]:
        """Collated micro-batch: ``video`` (B, C, T, H, W), ``caption`` list, ``label`` (B,) if any."""
        return collate([self.dataset[i] for i in self.indices(step, micro)])

    def loader(self, start_step: int, end_step: int, num_workers: int = 0) -> Iterator[dict[str, Any]]:
        """Micro-batches of steps ``start_step .. end_step - 1`` in order, decoded by
        ``num_workers`` DataLoader workers (0 = in this process). The index lists are fixed
        up front, so workers change only speed, never the order."""
        if num_workers == 0:
            return (self.batch(s, m) for s in range(start_step, end_step) for m in range(self.accum))
        batches = [self.indices(s, m) for s in range(start_step, end_step) for m in range(self.accum)]
        if hasattr(self.dataset, "set_epoch"):  # workers hold copies: each index carries its epoch
            per = [step * self.accum + m for step in range(start_step, end_step) for m in range(self.accum)]
            batches = [[(i, k // self.per_epoch) for i in b] for b, k in zip(batches, per)]
        return iter(DataLoader(self.dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate, persistent_workers=False))


class BucketSource(BatchSource):
    """Any-size micro-batches: the data package's ``BucketBatchSampler`` (one shape per batch,
    batch size from ``data.token_budget``), sharded over ranks and positioned by the step like
    :class:`BatchSource` (epoch = k // batches per rank, ``set_epoch``, position = the rest).

    Args:
        dataset: a dataset with ``sample_shapes()`` (built with buckets).
        token_budget: tokens per micro-batch.
        patch_size: the model's (pt, ph, pw).
        accum, rank, world_size, seed: as :class:`BatchSource`.
    """

    def __init__(self, dataset: Dataset, token_budget: int, patch_size: tuple[int, int, int], accum: int, rank: int, world_size: int, seed: int) -> None:

        self.dataset, self.accum, self.micro_batch = dataset, accum, None
        # drop_last: every rank gets the same number of full batches, so no collective waits
        self.sampler = BucketBatchSampler(dataset.sample_shapes(), token_budget, patch_size=patch_size, shuffle=True,
                                          seed=seed, rank=rank, world_size=world_size, drop_last=True)
        self.per_epoch = len(self.sampler)
        if self.per_epoch < 1:
            raise ConfigError(f"data.token_budget={token_budget} leaves no full bucket batch per rank; add data or lower the budget")
        self._epoch, self._order = None, []

    def _select(self, pos: int) -> list[int]:
        """Micro-batch ``pos`` of the epoch's order (the bucket sampler yields whole batches)."""
        return self._order[pos]


def collate(items: list[dict]) -> dict[str, Any]:
    """Stack items into a batch: ``video`` (B, C, T, H, W) (cached ``latents`` (B, c, t, h, w) for the
    ``latents`` source), ``caption`` list, ``label`` (B,) if all have one."""
    key = "latents" if "latents" in items[0] else "video"
    out: dict[str, Any] = {key: torch.stack([it[key] for it in items]), "caption": [it.get("caption", "") for it in items]}
    if all("label" in it for it in items):
        out["label"] = torch.tensor([int(it["label"]) for it in items])
    return out


class Conditioner:
    """Turns a batch into model kwargs: captions through a frozen text encoder (models with
    ``text_dim > 0``), else class labels (``num_classes > 0``), else nothing (unconditional).

    Args:
        recipe: the recipe (model + data sections).
        device: where the kwargs go.
        dtype: float dtype of the model inputs.
    """

    def __init__(self, recipe: RecipeConfig, device: Any, dtype: torch.dtype) -> None:
        m = recipe.model
        self.device, self.dtype = device, dtype
        self.kind = "text" if m.text_dim > 0 else "class" if m.num_classes > 0 else "none"
        self.num_classes = m.num_classes
        self.encoder = None
        if self.kind == "text":

            name = recipe.data.text_encoder
            self.encoder = load_text_encoder(name, dim=m.text_dim) if name in ("hash", "tiny") else load_text_encoder(name)
            if self.encoder.dim != m.text_dim:
                raise ConfigError(
                    f"data.text_encoder={name!r} gives {self.encoder.dim}-wide embeddings but model.text_dim={m.text_dim}; "
                    "set model.text_dim to the encoder width"
                )

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Model kwargs for ``batch`` (before CFG dropout)."""
        if self.kind == "text":
            with torch.no_grad():
                emb = self.encoder(batch["caption"])
            return {"text_emb": emb.tokens.to(self.device, self.dtype), "text_mask": emb.mask.to(self.device)}
        if self.kind == "class":
            if "label" not in batch:
                raise ConfigError(
                    f"model.num_classes={self.num_classes} needs class labels, but data.source gives none; "
                    "use a text-conditioned model (model.text_dim > 0) for this data"
                )
            labels = batch["label"]
            if int(labels.max()) >= self.num_classes:
                raise ConfigError(f"label {int(labels.max())} >= model.num_classes={self.num_classes}")
            return {"class_labels": labels.to(self.device)}
        return {}
