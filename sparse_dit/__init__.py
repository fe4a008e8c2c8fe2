"""sparse-dit: sparse (Mixture-of-Experts) video diffusion transformers.

    >>> import torch, sparse_dit
    >>> model = sparse_dit.SparseDiT(sparse_dit.preset_config("debug"))
    >>> v = model(torch.randn(1, 3, 4, 8, 8), torch.rand(1))      # (B, C, T, H, W) velocity

The model library is pure PyTorch. DeepSpeed training lives in ``sparse_dit.parallel`` and
``sparse_dit.recipes``; evaluations in ``sparse_dit.evals``.
"""

from sparse_dit.config import (
    ConfigError,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RecipeConfig,
    TrainConfig,
)
from sparse_dit.diffusion import EMA, FlowMatching, FlowMatchScheduler, sample
from sparse_dit.dit import SparseDiT
from sparse_dit.flops import count as count_flops
from sparse_dit.presets import PRESETS, list_presets, load_recipe, preset_config

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "RecipeConfig",
    "TrainConfig",
    "load_recipe",
    "EMA",
    "FlowMatching",
    "FlowMatchScheduler",
    "sample",
    "PRESETS",
    "SparseDiT",
    "list_presets",
    "preset_config",
    "count_flops",
    "__version__",
]
