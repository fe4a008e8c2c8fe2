"""Cached latents: a video dataset encoded once through a VAE, stored as a Hugging Face dataset.

``sparse-dit data encode DATASET --vae DIR --out OUT`` writes one row per clip::

    latents       [float32]  the normalised posterior mean (what ``CausalVideoVAE.encode`` returns), flattened
    latent_shape  [int32]    [c, t, h, w]
    video_shape   [int32]    [T, H, W, 3] of the clip it encodes
    caption       string
    index         int32      the clip's index in the source dataset

and records in the dataset's description (JSON) the VAE's identity (``vae_id``: a hash of its
config and weights, :func:`sparse_dit.autoencoder.autoencoder_id`), its folder, config and
latent shift/scale. A recipe with ``data.source: latents`` trains on the rows directly; its
``autoencoder`` must be a VAE of the same identity, else the run stops with one line (the
latents of another VAE decode to garbage). Every clip of the source is encoded or the command
fails naming it: nothing is dropped.

# c, t, h, w = latent channels, frames, height, width
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import datasets
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from sparse_dit.autoencoder import autoencoder_config, autoencoder_id, encode_videos, load_autoencoder
from sparse_dit.data.hf import write_dataset
from sparse_dit.data.loaders import HFVideoDataset
from sparse_dit.schema import ConfigError, to_dict
from sparse_dit.vae import REFINE_LR

__all__ = ["LATENTS_KIND", "latent_features", "encode_dataset", "LatentDataset", "check_cached_vae", "add_encode_arguments", "run_encode"]

LATENTS_KIND = "sparse-dit latents"


def latent_features() -> datasets.Features:
    """The columns of a latent dataset (module docstring)."""
    return datasets.Features({
        "latents": datasets.List(datasets.Value("float32")),
        "latent_shape": datasets.List(datasets.Value("int32"), length=4),
        "video_shape": datasets.List(datasets.Value("int32"), length=4),
        "caption": datasets.Value("string"),
        "index": datasets.Value("int32"),
    })


def encode_dataset(dataset: Dataset, vae: nn.Module, out: str | os.PathLike, *, vae_dir: str, batch_size: int = 8,
                   overwrite: bool = False, progress: bool = True, inputs: Sequence[str | os.PathLike] = (),
                   source: str = "", refine_steps: int = 0, refine_lr: Optional[float] = None) -> datasets.Dataset:
    """Encode every clip of ``dataset`` (items ``{"video": (3, T, H, W) in [-1, 1], "caption"}``)
    through ``vae`` and write the latent dataset at ``out`` (atomically, streamed).

    Args:
        dataset: the clips, in order.
        vae: the frozen VAE (eval mode).
        out: output folder.
        vae_dir: the VAE's folder (recorded; recipes name it as ``autoencoder``).
        batch_size: clips per encoder call (consecutive clips of one shape are batched).
        overwrite: replace an existing ``out``.
        progress: show a progress bar.
        inputs: folders the command reads; ``out`` may not hold them.
        source: the source dataset's path (recorded).
        refine_steps, refine_lr: refine each batch's latents through the decoder
            (``CausalVideoVAE.refine``; recorded; 0 = the encoder's latents).

    Raises:
        ValueError: a clip whose shape the VAE cannot encode (named by index and shape).
    """
    if len(dataset) == 0:
        raise ValueError("the source dataset has no clips to encode")
    bar = tqdm(total=len(dataset), desc="encode", unit="clip", disable=not progress)

    def flush(batch: list[tuple[int, dict]]) -> Iterator[dict]:
        videos = torch.stack([it["video"] for _, it in batch]).float()
        T, H, W = videos.shape[2:]
        try:
            z = encode_videos(vae, videos, refine_steps, refine_lr).cpu()
        except ValueError as exc:
            raise ValueError(f"clip {batch[0][0]} of shape (T, H, W) = ({T}, {H}, {W}) cannot be encoded: {exc}") from None
        for (i, it), zi in zip(batch, z):
            yield {"latents": zi.flatten().tolist(), "latent_shape": list(zi.shape), "video_shape": [T, H, W, videos.shape[1]],
                   "caption": str(it.get("caption", "")), "index": i}
        bar.update(len(batch))

    def rows() -> Iterator[dict]:
        batch: list[tuple[int, dict]] = []
        for i in range(len(dataset)):
            item = dataset[i]
            if batch and (len(batch) == batch_size or item["video"].shape != batch[0][1]["video"].shape):
                yield from flush(batch)
                batch = []
            batch.append((i, item))
        if batch:
            yield from flush(batch)

    shift = vae.latent_shift.tolist() if hasattr(vae, "latent_shift") else None
    scale = vae.latent_scale.tolist() if hasattr(vae, "latent_scale") else None
    description = json.dumps({
        "kind": LATENTS_KIND, "vae_id": autoencoder_id(vae), "vae_dir": os.path.abspath(vae_dir),
        "vae_config": to_dict(vae.config) if hasattr(vae, "config") else None, "latent_shift": shift, "latent_scale": scale,
        "source": os.path.abspath(source) if source else "", "clips": len(dataset),
        "refine_steps": refine_steps, "refine_lr": (refine_lr if refine_lr is not None else REFINE_LR) if refine_steps else None,
    })
    try:
        ds = write_dataset(rows(), out, latent_features(), description=description, overwrite=overwrite, inputs=inputs)
    finally:
        bar.close()
    if len(ds) != len(dataset):  # write_dataset streams every row; a shortfall would be a bug, never a silent drop
        raise RuntimeError(f"wrote {len(ds)} rows for {len(dataset)} clips")
    return ds


def _meta(ds: datasets.Dataset, path: str) -> dict:
    try:
        meta = json.loads(ds.info.description or "{}")
    except ValueError:
        meta = {}
    if not isinstance(meta, dict) or meta.get("kind") != LATENTS_KIND:
        raise ConfigError(f"data.path={path!r} is not a latent dataset (write one with `sparse-dit data encode DATASET --vae DIR --out DIR`)")
    return meta


class LatentDataset(Dataset):
    """The rows of a latent dataset as ``{"latents": (c, t, h, w) float32, "caption": str}``.

    Args:
        path: the folder ``sparse-dit data encode`` wrote.
        indices: rows to use (default: all).
    """

    def __init__(self, path: str | os.PathLike, indices: Optional[Sequence[int]] = None) -> None:
        p = Path(path)
        if not (p / "dataset_info.json").is_file():
            raise FileNotFoundError(f"data.path={str(path)!r} is not a saved dataset; write one with `sparse-dit data encode DATASET --vae DIR --out DIR`")
        ds = datasets.load_from_disk(str(p))
        self.meta = _meta(ds, str(path))
        self.dataset = ds.with_format("numpy", columns=["latents", "latent_shape"], output_all_columns=True)
        self.indices = list(range(len(ds))) if indices is None else list(indices)
        self.vae_id: str = self.meta["vae_id"]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        row = self.dataset[self.indices[k]]
        z = torch.from_numpy(row["latents"].astype("float32")).reshape([int(s) for s in row["latent_shape"]])
        return {"latents": z, "caption": row["caption"]}


def check_cached_vae(meta: dict, vae: nn.Module, spec: str) -> None:
    """The recipe's autoencoder must be the VAE the latents were encoded with (ConfigError, one line)."""
    have = autoencoder_id(vae)
    if have != meta.get("vae_id"):
        raise ConfigError(f"autoencoder={spec!r} (id {have[:19]}) is not the VAE the cached latents were encoded with "
                          f"({meta.get('vae_dir')}, id {str(meta.get('vae_id'))[:19]}); set autoencoder to that folder or re-encode "
                          "with `sparse-dit data encode --vae`")


# --------------------------------------------------------------------------------------------
# `sparse-dit data encode`
# --------------------------------------------------------------------------------------------


def add_encode_arguments(sub: Any) -> None:
    """Register ``sparse-dit data encode`` on the ``data`` subparsers."""
    e = sub.add_parser("encode", help="encode a video dataset through a VAE once: cached latents for training")
    e.add_argument("dataset", help="a dataset folder (sparse-dit data physics / folder, or any saved HF video dataset)")
    e.add_argument("--vae", required=True, help="the VAE folder (sparse-dit train-vae's final/)")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--frames", type=int, default=None, help="frames per clip, from each video's start (default: all; the VAE needs 1 + ft*k)")
    e.add_argument("--resolution", default=None, help="HxW: resize to cover, centre-crop (default: native)")
    e.add_argument("--batch-size", type=int, default=8, help="clips per encoder call")
    e.add_argument("--refine-steps", type=int, default=0,
                   help="refine each clip's latents by this many Adam steps through the decoder (CausalVideoVAE.refine; docs/vae.md); 0: none")
    e.add_argument("--refine-lr", type=float, default=None, help=f"their learning rate (default {REFINE_LR})")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_encode(args: Any) -> int:
    """``sparse-dit data encode``: every clip of DATASET through the VAE into a latent dataset."""
    spec_size = None
    if args.resolution is not None:
        try:
            h, w = (int(v) for v in str(args.resolution).lower().split("x"))
        except ValueError:
            raise ValueError(f"--resolution={args.resolution!r} must be HxW, e.g. 64x64") from None
        spec_size = (h, w)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
    if args.refine_steps < 0:
        raise ValueError(f"--refine-steps={args.refine_steps} must be >= 0 (0: the encoder's latents as they are)")
    if args.refine_lr is not None and not args.refine_lr > 0:
        raise ValueError(f"--refine-lr={args.refine_lr} must be > 0")
    vae = load_autoencoder(args.vae)
    if autoencoder_config(args.vae) is None:
        raise ValueError("--vae identity caches nothing: pixel-space recipes read the videos themselves")
    clips = HFVideoDataset(args.dataset, num_frames=args.frames, size=spec_size, random_crop=False)
    dropped = len(clips.skipped) + len(clips.too_short) + len(getattr(clips, "fps_skipped", []))
    for name, detail in [*clips.skipped, *clips.too_short]:
        print(f"  skipped {name}: {detail}")
    out = encode_dataset(clips, vae, args.out, vae_dir=args.vae, batch_size=args.batch_size, overwrite=args.overwrite,
                         progress=not args.no_progress, inputs=[args.dataset, args.vae], source=args.dataset,
                         refine_steps=args.refine_steps, refine_lr=args.refine_lr)
    shape = tuple(out[0]["latent_shape"])
    print(f"wrote {len(out)} latent clips (c, t, h, w) = {shape} to {args.out}; VAE {args.vae} "
          f"({json.loads(out.info.description)['vae_id'][:19]}); {dropped} source clip(s) unreadable or too short (listed above)")
    return 0
