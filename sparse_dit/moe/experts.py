"""Grouped experts: E feed-forward networks with stacked weights, run on expert-sorted rows.

# R = routed rows (sorted by expert), D = model dim, F = expert hidden, E = experts held here

Weights are stacked ``[E, D, F]`` / ``[E, F, D]`` (``x @ W`` layout, as torchtitan and
``torch._grouped_mm`` want), so an expert-parallel rank simply holds a slice along E.

Backends:

* ``"loop"``: behind a dispatcher, one autograd op (:mod:`sparse_dit.moe.expert_loop`)
  looping over the experts with ``torch.addmm(..., out=)`` (bias fused) and a hand-written
  backward that writes the stacked weight gradients in place. In the single-process layer,
  the fused op of :mod:`sparse_dit.moe.fused_local` (batched GEMMs over a padded layout).
  Autograd never sees a ``weight[e]`` slice: indexing a parameter in an autograd loop makes its
  backward allocate and accumulate a full-size [E, ...] gradient per expert (5-9x slower
  backward on CPU, /work/shared/PITFALLS.md).
* ``"grouped_mm"``: ``torch._grouped_mm`` with int32 cumulative offsets. It has no bias
  argument and needs 16-byte-aligned strides (D and F multiples of 4 in fp32, of 8 in bf16).
  On CUDA it runs under autograd with per-row bias gathers and needs no host sync; on CPU it
  runs inside the expert op of :mod:`sparse_dit.moe.expert_loop` (one GEMM call per shape).
* ``"megablocks"``: optional CUDA backend; megablocks is imported lazily.
* ``"auto"``: grouped_mm on CUDA for aligned shapes; on CPU the loop (the fused op in the
  single-process layer); measured in benchmarks/moe_layer.py.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sparse_dit.moe.expert_loop import experts_loop
from sparse_dit.moe.fused_local import BlockPlan, fused_local_moe

__all__ = ["GroupedExperts", "load_dense_into_experts", "BACKENDS", "grouped_mm_available"]

BACKENDS = ("auto", "grouped_mm", "loop", "megablocks")


def grouped_mm_available() -> bool:
    """Whether this torch build has ``torch._grouped_mm``."""
    return hasattr(torch, "_grouped_mm")


class GroupedExperts(nn.Module):
    """E independent FFN experts with the activations of :class:`sparse_dit.modules.mlp.FeedForward`.

    Args:
        num_experts: experts held by this module (a slice of the global experts under EP).
        dim: model width D.
        hidden_dim: expert hidden width F.
        activation: ``"gelu_tanh"`` (``gelu_tanh(x W1 + b1) W2 + b2``) or ``"swiglu"``
            (``(silu(x W1) * (x W3)) W2``, no biases).
        backend: ``"auto"``, ``"grouped_mm"``, ``"loop"`` or ``"megablocks"``.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "gelu_tanh", backend: str = "auto") -> None:
        super().__init__()
        if activation not in ("gelu_tanh", "swiglu"):
            raise ValueError(f"activation={activation!r} is not supported; choose one of ['gelu_tanh', 'swiglu']")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported; choose one of {list(BACKENDS)}")
        if num_experts < 1 or dim < 1 or hidden_dim < 1:
            raise ValueError(f"num_experts={num_experts}, dim={dim}, hidden_dim={hidden_dim} must all be >= 1")
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation, self.backend = activation, backend
        E, D, Fh = num_experts, dim, hidden_dim
        self.w1 = nn.Parameter(torch.empty(E, D, Fh))  # [E, D, F]
        self.w2 = nn.Parameter(torch.empty(E, Fh, D))  # [E, F, D]
        if activation == "swiglu":
            self.w3 = nn.Parameter(torch.empty(E, D, Fh))  # [E, D, F] gate
            self.b1 = self.b2 = None
        else:
            self.w3 = None
            self.b1 = nn.Parameter(torch.empty(E, Fh))  # [E, F]
            self.b2 = nn.Parameter(torch.empty(E, D))  # [E, D]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases per expert, as DiT initialises its dense MLP."""
        bound = math.sqrt(6.0 / (self.dim + self.hidden_dim))
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                nn.init.uniform_(w, -bound, bound)
        for b in (self.b1, self.b2):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, activation={self.activation}, backend={self.backend}"

    def params_in(self, dtype: torch.dtype) -> tuple[Optional[torch.Tensor], ...]:
        """``(w1, w2, w3, b1, b2)`` in ``dtype``: the parameters themselves when they already have
        it, else differentiable casts (mixed precision: fp32 master weights, bf16 compute, as
        autocast does for ``nn.Linear``)."""
        return tuple(None if p is None else (p if p.dtype == dtype else p.to(dtype)) for p in (self.w1, self.w2, self.w3, self.b1, self.b2))

    # ----------------------------------------------------------------------------------------
    def resolve_backend(self, x: torch.Tensor) -> str:
        """The backend ``"auto"`` picks for this input (see the module docstring)."""
        if self.backend != "auto":
            return self.backend
        # GPU: grouped_mm needs no host sync. CPU: the loop, which the single-process layer runs
        # as the fused batched op (fused_local.py); grouped_mm behind dispatch/combine is slower
        # on every benchmark shape (BENCHMARKS.md, issue 3).
        if x.is_cuda and grouped_mm_available() and self.grouped_mm_aligned(x.dtype):
            return "grouped_mm"
        return "loop"

    def grouped_mm_aligned(self, dtype: torch.dtype) -> bool:
        """``torch._grouped_mm`` needs 16-byte-aligned strides: D and F multiples of 16 / itemsize."""
        align = max(1, 16 // torch.empty((), dtype=dtype).element_size())
        return self.dim % align == 0 and self.hidden_dim % align == 0

    def forward(
        self,
        x_sorted: torch.Tensor,
        tokens_per_expert: Optional[torch.Tensor],
        split_sizes: Optional[Sequence[int]] = None,
        *,
        plan: Optional[BlockPlan] = None,
        weight_route: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run expert e on its rows.

        Args:
            x_sorted: (R, D) rows grouped by expert; rows past ``tokens_per_expert.sum()`` are
                ignored (their output rows are zero for the loop backend, unspecified otherwise).
                In fused mode: the (T, D) tokens themselves.
            tokens_per_expert: (E,) int64 rows per expert, on the device of ``x_sorted``
                (``None`` in fused mode, where the plan holds the layout).
            split_sizes: the same counts on the host when the caller already has them (saves
                the loop backend's one device-to-host sync).
            plan, weight_route: fused mode (the single-process path of
                :class:`~sparse_dit.moe.MoEFeedForward`, loop backend): the route layout from
                :func:`sparse_dit.moe.fused_local.plan_routes` and the combine weight of each
                route; the experts then gather, weight and combine themselves
                (:mod:`sparse_dit.moe.fused_local`). It goes through this ``forward`` so that
                module hooks (ZeRO-3 parameter gathering) still run.

        Returns:
            (R, D) expert outputs in the same row order; in fused mode the (T, D) weighted sums.
        """
        if plan is not None:
            if weight_route is None:
                raise ValueError("fused mode needs weight_route (the combine weight of each planned route)")
            return fused_local_moe(x_sorted, weight_route, plan, self.activation, *self.params_in(x_sorted.dtype))
        if x_sorted.ndim != 2 or x_sorted.shape[1] != self.dim:
            raise ValueError(f"x_sorted must be (rows, {self.dim}), got {tuple(x_sorted.shape)}")
        if tokens_per_expert is None or tokens_per_expert.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert must have shape ({self.num_experts},), got "
                f"{None if tokens_per_expert is None else tuple(tokens_per_expert.shape)}"
            )
        backend = self.resolve_backend(x_sorted)
        if backend == "loop":
            return self._forward_loop(x_sorted, tokens_per_expert, split_sizes)
        if backend == "grouped_mm":
            if not grouped_mm_available():
                raise RuntimeError("backend='grouped_mm' needs torch._grouped_mm (torch >= 2.8); use backend='loop'")
            if not self.grouped_mm_aligned(x_sorted.dtype):
                raise ValueError(
                    f"backend='grouped_mm' needs dim and hidden_dim to be multiples of "
                    f"{16 // x_sorted.element_size()} in {x_sorted.dtype} (16-byte strides); got dim={self.dim}, "
                    f"hidden_dim={self.hidden_dim}. Use backend='auto' or 'loop'."
                )
            if x_sorted.is_cuda:
                return self._forward_grouped_mm(x_sorted, tokens_per_expert)  # sync-free
            # CPU: the fused op with grouped GEMMs (its bias adds and sums need the host sizes).
            return self._forward_loop(x_sorted, tokens_per_expert, split_sizes, grouped=True)
        return self._forward_megablocks(x_sorted, tokens_per_expert)

    def _act(self, h1: torch.Tensor, h3: Optional[torch.Tensor]) -> torch.Tensor:
        if self.activation == "gelu_tanh":
            return F.gelu(h1, approximate="tanh")
        return F.silu(h1) * h3

    def _forward_loop(
        self, x: torch.Tensor, counts: torch.Tensor, split_sizes: Optional[Sequence[int]], grouped: bool = False
    ) -> torch.Tensor:
        sizes = list(split_sizes) if split_sizes is not None else counts.tolist()  # the one host sync
        if sum(sizes) > x.shape[0]:
            raise ValueError(f"tokens_per_expert sums to {sum(sizes)} > {x.shape[0]} rows")
        return experts_loop(x, sizes, self.activation, grouped, *self.params_in(x.dtype))

    def _forward_grouped_mm(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if not grouped_mm_available():
            raise RuntimeError("backend='grouped_mm' needs torch._grouped_mm (torch >= 2.8); use backend='loop'")
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # (E,) cumulative row ends, int32 required
        x = x.contiguous()
        h1 = torch._grouped_mm(x, self.w1.to(x.dtype), offs=offs)  # (R, F)
        if self.b1 is not None:
            expert_of_row = _expert_of_rows(counts, x.shape[0])
            h1 = h1 + _padded(self.b1, x.dtype).index_select(0, expert_of_row)
        h3 = torch._grouped_mm(x, self.w3.to(x.dtype), offs=offs) if self.w3 is not None else None
        h = self._act(h1, h3).contiguous()
        y = torch._grouped_mm(h, self.w2.to(x.dtype), offs=offs)  # (R, D)
        if self.b2 is not None:
            y = y + _padded(self.b2, x.dtype).index_select(0, expert_of_row)
        return y

    def _forward_megablocks(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        try:
            from megablocks import grouped_gemm_util as gg  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ImportError(
                "backend='megablocks' needs the optional megablocks package (CUDA only; "
                "`pip install --no-deps megablocks` on a GPU machine). Use backend='auto' on CPU."
            ) from exc
        if not x.is_cuda or not gg.grouped_gemm_is_available():
            raise RuntimeError("backend='megablocks' needs a CUDA tensor and megablocks' grouped_gemm kernels")
        batch_sizes = counts.cpu()  # megablocks' grouped GEMM takes host batch sizes (one sync)
        n = int(batch_sizes.sum())
        xs = x[:n]
        h1 = gg.ops.gmm(xs, self.w1, batch_sizes)
        if self.b1 is not None:
            h1 = h1 + _padded(self.b1, xs.dtype).index_select(0, _expert_of_rows(counts, n))
        h3 = gg.ops.gmm(xs, self.w3, batch_sizes) if self.w3 is not None else None
        y = gg.ops.gmm(self._act(h1, h3), self.w2, batch_sizes)
        if self.b2 is not None:
            y = y + _padded(self.b2, xs.dtype).index_select(0, _expert_of_rows(counts, n))
        if n < x.shape[0]:
            y = torch.cat([y, y.new_zeros(x.shape[0] - n, self.dim)])
        return y


def _expert_of_rows(counts: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows,) expert index of each sorted row; rows past the total get index E (a padding row
    of the bias table, so that unspecified tail rows never touch a real bias or its gradient).
    No host sync: ``repeat_interleave`` with ``output_size``."""
    E = counts.numel()
    sizes = torch.cat([counts, (rows - counts.sum()).view(1)])
    return torch.repeat_interleave(torch.arange(E + 1, device=counts.device), sizes, output_size=rows)


def _padded(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[E, n] bias -> [E + 1, n] with a zero last row (for the tail rows)."""
    return torch.cat([bias.to(dtype), bias.new_zeros(1, bias.shape[1], dtype=dtype)])


@torch.no_grad()
def load_dense_into_experts(experts: GroupedExperts, ffn: nn.Module, expert_ids: Optional[Sequence[int]] = None) -> None:
    """Copy a dense :class:`~sparse_dit.modules.mlp.FeedForward`'s weights into experts.

    Used to check that E=1, k=1 equals the dense FFN, and to upcycle a dense checkpoint into
    an MoE (Komatsuzaki et al. 2023, "Sparse Upcycling").

    Args:
        experts: the target; must have the FFN's dim, hidden width and activation.
        ffn: a ``FeedForward`` (``fc1``/``fc2`` for GELU, ``w1``/``w3``/``w2`` for SwiGLU).
        expert_ids: local experts to overwrite; ``None`` = all.
    """
    if getattr(ffn, "activation", None) != experts.activation:
        raise ValueError(f"ffn activation {getattr(ffn, 'activation', None)!r} != experts activation {experts.activation!r}")
    if ffn.dim != experts.dim or ffn.hidden_dim != experts.hidden_dim:
        raise ValueError(
            f"ffn (dim={ffn.dim}, hidden_dim={ffn.hidden_dim}) does not match experts "
            f"(dim={experts.dim}, hidden_dim={experts.hidden_dim})"
        )
    ids = range(experts.num_experts) if expert_ids is None else expert_ids
    for e in ids:
        if experts.activation == "gelu_tanh":
            experts.w1.data[e].copy_(ffn.fc1.weight.t())
            experts.w2.data[e].copy_(ffn.fc2.weight.t())
            experts.b1.data[e].copy_(ffn.fc1.bias if ffn.fc1.bias is not None else torch.zeros(experts.hidden_dim))
            experts.b2.data[e].copy_(ffn.fc2.bias if ffn.fc2.bias is not None else torch.zeros(experts.dim))
        else:
            experts.w1.data[e].copy_(ffn.w1.weight.t())
            experts.w3.data[e].copy_(ffn.w3.weight.t())
            experts.w2.data[e].copy_(ffn.w2.weight.t())
