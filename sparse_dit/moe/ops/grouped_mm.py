"""Backend ``"grouped_mm"``: the experts as ``torch._grouped_mm`` calls over expert-sorted rows.

# R = rows (sorted by expert), D = model dim, F = expert hidden, E = experts

``torch._grouped_mm`` takes int32 cumulative row offsets, has no bias argument and needs
16-byte-aligned strides (D and F multiples of 4 in fp32, of 8 in bf16). On CUDA it runs under
autograd with per-row bias gathers and needs no host sync; on CPU it runs inside the expert op
of :mod:`sparse_dit.moe.ops.expert_loop` (one grouped GEMM per shape; its bias adds and sums
need the host sizes). Measured constraints and speed: docs/moe.md, "Backends".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_dit.moe.ops.base import ExpertBackend, ExpertRows, ExpertWeights, check_expert_weights, add_row_bias, expert_of_rows
from sparse_dit.moe.ops.expert_loop import experts_loop

__all__ = ["grouped_mm_available", "grouped_mm_aligned", "run_grouped_mm", "grouped_mm_autograd", "GROUPED_MM"]


def grouped_mm_available() -> bool:
    """Whether this torch build has ``torch._grouped_mm``."""
    return hasattr(torch, "_grouped_mm")


def grouped_mm_aligned(dim: int, hidden: int, dtype: torch.dtype) -> bool:
    """``torch._grouped_mm`` needs 16-byte-aligned strides: D and F multiples of 16 / itemsize."""
    align = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return dim % align == 0 and hidden % align == 0


def run_grouped_mm(x: torch.Tensor, rows: ExpertRows, activation: str, w: ExpertWeights) -> torch.Tensor:
    """The ``"grouped_mm"`` backend on expert-sorted rows (sync-free on CUDA)."""
    if x.is_cuda:
        return grouped_mm_autograd(x, rows.counts, activation, w)
    # CPU: the loop op with grouped GEMMs (its bias adds and sums need the host sizes).
    sizes = rows.host_sizes()  # the one host sync
    if sum(sizes) > x.shape[0]:
        raise ValueError(f"tokens_per_expert sums to {sum(sizes)} > {x.shape[0]} rows")
    return experts_loop(x, sizes, activation, True, *w)


def grouped_mm_autograd(x: torch.Tensor, counts: torch.Tensor, activation: str, w: ExpertWeights) -> torch.Tensor:
    """``torch._grouped_mm`` under autograd, biases by per-row gathers: no host sync (the CUDA
    path; it runs on CPU too, which the tests use)."""
    check_expert_weights(activation, x.dtype, *w)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # (E,) cumulative row ends, int32 required
    x = x.contiguous()
    h1 = torch._grouped_mm(x, w.w1, offs=offs)  # (R, F)
    if w.b1 is not None:
        e_R = expert_of_rows(counts, x.shape[0])
        h1 = add_row_bias(h1, w.b1, e_R)
    if activation == "gelu_tanh":
        h = F.gelu(h1, approximate="tanh")
    else:
        h = F.silu(h1) * torch._grouped_mm(x, w.w3, offs=offs)
    y = torch._grouped_mm(h.contiguous(), w.w2, offs=offs)  # (R, D)
    if w.b2 is not None:
        y = add_row_bias(y, w.b2, e_R)
    return y


def _auto(x: torch.Tensor, dim: int, hidden: int, local: bool) -> bool:
    # GPU only: no host sync there. On CPU the loop (or the fused op) beats it on every
    # benchmark shape (BENCHMARKS.md, issue 3).
    return x.is_cuda and grouped_mm_available() and grouped_mm_aligned(dim, hidden, x.dtype)


def _check(x: torch.Tensor, dim: int, hidden: int, local: bool) -> None:
    if not grouped_mm_available():
        raise RuntimeError("backend='grouped_mm' needs torch._grouped_mm (torch >= 2.8); use backend='loop'")
    if not grouped_mm_aligned(dim, hidden, x.dtype):
        raise ValueError(
            f"backend='grouped_mm' needs dim and hidden_dim to be multiples of "
            f"{16 // x.element_size()} in {x.dtype} (16-byte strides); got dim={dim}, "
            f"hidden_dim={hidden}. Use backend='auto' or 'loop'."
        )


GROUPED_MM = ExpertBackend(run=run_grouped_mm, token_space=False, auto=_auto, check=_check)
"""Aligned shapes, fp32/bf16/fp16; ``"auto"`` picks it on CUDA."""
