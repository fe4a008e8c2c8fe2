"""Backend ``"megablocks"``: optional CUDA grouped GEMMs through ``megablocks.grouped_gemm_util``.

# R = rows (sorted by expert), D = model dim, F = expert hidden, E = experts

megablocks is imported inside the functions below, not at the top: it is an optional CUDA-only
dependency that pins torch 2.7 (install it with ``pip install --no-deps megablocks`` on GPU
machines), so importing it eagerly would break ``import sparse_dit`` everywhere else.
Never needed by the tests; ``"auto"`` never picks it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sparse_dit.moe.ops.base import ExpertBackend, ExpertRows, ExpertWeights, check_expert_weights, add_row_bias, expert_of_rows

__all__ = ["run_megablocks", "MEGABLOCKS"]


def _grouped_gemm_util() -> Any:
    try:
        # Deferred optional import (see the module docstring).
        from megablocks import grouped_gemm_util as gg  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ImportError(
            "backend='megablocks' needs the optional megablocks package (CUDA only; "
            "`pip install --no-deps megablocks` on a GPU machine). Use backend='auto' on CPU."
        ) from exc
    return gg


def run_megablocks(x: torch.Tensor, rows: ExpertRows, activation: str, w: ExpertWeights) -> torch.Tensor:
    """The ``"megablocks"`` backend on expert-sorted rows; tail rows get zero output."""
    gg = _grouped_gemm_util()
    check_expert_weights(activation, x.dtype, *w)
    batch_sizes = torch.tensor(rows.host_sizes())  # megablocks' grouped GEMM takes host batch sizes (one sync)
    n = int(batch_sizes.sum())
    xs = x[:n]
    h1 = gg.ops.gmm(xs, w.w1, batch_sizes)
    if w.b1 is not None:
        e_R = expert_of_rows(batch_sizes.to(x.device), n)
        h1 = add_row_bias(h1, w.b1, e_R)
    if activation == "gelu_tanh":
        h = F.gelu(h1, approximate="tanh")
    else:
        h = F.silu(h1) * gg.ops.gmm(xs, w.w3, batch_sizes)
    y = gg.ops.gmm(h, w.w2, batch_sizes)
    if w.b2 is not None:
        y = add_row_bias(y, w.b2, e_R)
    if n < x.shape[0]:
        y = torch.cat([y, y.new_zeros(x.shape[0] - n, y.shape[1])])
    return y


def _never(x: torch.Tensor, dim: int, hidden: int, local: bool) -> bool:
    return False


def _check(x: torch.Tensor, dim: int, hidden: int, local: bool) -> None:
    if x.dtype != torch.bfloat16:
        # grouped_gemm's kernels take bf16 only; an fp32 input reached them as a raw C++ check
        # failure on the H200 (BENCHMARKS.md, issue 16)
        raise ValueError(f"backend='megablocks' runs bf16 only (grouped_gemm's kernels); the input is {x.dtype}. "
                         "Use parallel.precision=bf16, or backend='auto' / 'grouped_mm'.")
    gg = _grouped_gemm_util()
    if not x.is_cuda or not gg.grouped_gemm_is_available():
        raise RuntimeError("backend='megablocks' needs a CUDA tensor and megablocks' grouped_gemm kernels; use backend='auto'")


MEGABLOCKS = ExpertBackend(run=run_megablocks, token_space=False, auto=_never, check=_check)
"""Optional, CUDA only, explicit choice only."""
