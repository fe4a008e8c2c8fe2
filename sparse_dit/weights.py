"""Small helpers every ``save_pretrained``/``from_pretrained`` shares (the DiT, the VAE, ``train.init_from``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

__all__ = ["atomic_write", "state_mismatch"]


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Write via a temp file in the same folder, then rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def state_mismatch(own: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], expects: str = "model expects",
                   listed: int = 5) -> Optional[str]:
    """Why ``loaded`` does not fit a model whose state dict is ``own`` (keys, then shapes), or None."""
    missing, unexpected = sorted(set(own) - set(loaded)), sorted(set(loaded) - set(own))
    if missing or unexpected:
        return f"does not fit: missing {missing[:listed]}, unexpected {unexpected[:listed]}"
    for k, v in loaded.items():
        if tuple(v.shape) != tuple(own[k].shape):
            return f"{k} has shape {tuple(v.shape)}, {expects} {tuple(own[k].shape)}"
    return None
