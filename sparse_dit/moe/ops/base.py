"""The expert-backend contract: what every backend in :data:`sparse_dit.moe.ops.EXPERT_BACKENDS`
receives and returns (the legend and the rules are in :mod:`sparse_dit.moe.ops`).

# T = tokens, R = rows, D = model dim, F = expert hidden, E = experts held here
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch

if TYPE_CHECKING:  # annotation only: fused_local imports this module
    from sparse_dit.moe.ops.fused_local import BlockPlan

__all__ = ["ExpertWeights", "ExpertRows", "ExpertBackend", "check_expert_weights", "expert_of_rows", "padded_bias", "add_row_bias", "row_group_sums"]


class ExpertWeights(NamedTuple):
    """Stacked expert weights, all in the input's dtype (the dtype rule, :mod:`sparse_dit.moe.ops`).

    Attributes:
        w1: [E, D, F]; w2: [E, F, D]; w3: [E, D, F] SwiGLU gate (``None`` for GELU);
        b1: [E, F], b2: [E, D] GELU biases (``None`` for SwiGLU).
    """

    w1: torch.Tensor
    w2: torch.Tensor
    w3: Optional[torch.Tensor]
    b1: Optional[torch.Tensor]
    b2: Optional[torch.Tensor]


@dataclass(frozen=True)
class ExpertRows:
    """Which expert computes which row of ``x``: one of two layouts.

    * **expert-sorted rows** (behind any dispatcher): ``x`` is (R, D) rows grouped by expert,
      ``counts[e]`` rows for expert e, then a tail of rows no expert owns; the backend returns
      (R, D) expert outputs in the same order (tail rows unspecified).
    * **token space** (the single-process layer, ``plan`` set): ``x`` is the (T, D) tokens,
      ``plan`` the route layout of :func:`sparse_dit.moe.ops.fused_local.plan_routes` and
      ``weight`` each route's combine weight; the backend gathers, runs the experts and returns
      the (T, D) weighted sums.
    * **inference** (the single-process layer with gradients off, ``routes`` set): token space
      as above, but the unsorted routes themselves (``routes``: each route's expert, a
      :class:`~sparse_dit.moe.routers.Routing`'s ``expert_idx``; ``route_tokens``: its
      ``token_idx``) instead of a plan; :mod:`sparse_dit.moe.ops.inference` runs them without
      autograd.

    Attributes:
        counts: (E,) int64 rows per expert on ``x``'s device (expert-sorted rows).
        sizes: the same counts on the host when the caller already paid the sync, else ``None``.
        plan: the token-space layout.
        weight: combine weight of each route, in route order (token space); differentiable.
        routes: (inference) each route's expert, ``E`` = dropped, (T, K) token-major or any
            2-D shape with ``route_tokens``.
        route_tokens: (inference) each route's token, or ``None`` for token-major routes.
    """

    counts: Optional[torch.Tensor] = None
    sizes: Optional[tuple[int, ...]] = None
    plan: Optional["BlockPlan"] = None
    weight: Optional[torch.Tensor] = None
    routes: Optional[torch.Tensor] = None
    route_tokens: Optional[torch.Tensor] = None

    @property
    def token_space(self) -> bool:
        return self.plan is not None or self.routes is not None

    @property
    def inference(self) -> bool:
        """The no-autograd layout (:mod:`sparse_dit.moe.ops.inference`)."""
        return self.routes is not None

    def host_sizes(self) -> tuple[int, ...]:
        """Rows per expert on the host: ``sizes``, or one device-to-host sync of ``counts``."""
        return tuple(self.sizes) if self.sizes is not None else tuple(self.counts.tolist())


BackendFn = Callable[[torch.Tensor, ExpertRows, str, ExpertWeights], torch.Tensor]
BackendRule = Callable[[torch.Tensor, int, int, bool], bool]
BackendCheck = Callable[[torch.Tensor, int, int, bool], None]


@dataclass(frozen=True)
class ExpertBackend:
    """One entry of :data:`sparse_dit.moe.ops.EXPERT_BACKENDS`.

    Attributes:
        run: ``run(x, rows, activation, weights) -> y`` (the contract in :mod:`sparse_dit.moe.ops`).
        token_space: ``run`` takes token-space rows (it gathers and combines itself, so it needs
            one process holding every expert) instead of expert-sorted rows.
        auto: ``auto(x, dim, hidden, local)``: whether ``backend="auto"`` may pick it for this
            input (the first such entry in table order wins); ``local``: the layer holds every
            expert behind the plain local dispatcher.
        check: ``check(x, dim, hidden, local)``: raise a clear error (naming the backend, the
            reason and what to use instead) when the backend cannot run on ``x``.
    """

    run: BackendFn
    token_space: bool
    auto: BackendRule
    check: BackendCheck


def check_expert_weights(activation: str, dtype: torch.dtype, w1, w2, w3, b1, b2) -> None:
    """The stacked expert weights an expert op needs for ``activation``, all in the input ``dtype``."""
    if activation == "gelu_tanh" and (b1 is None or b2 is None):
        raise ValueError("activation='gelu_tanh' needs biases b1 and b2")
    if activation == "swiglu" and w3 is None:
        raise ValueError("activation='swiglu' needs the gate weight w3")
    if any(p is not None and p.dtype != dtype for p in (w1, w2, w3, b1, b2)):
        raise ValueError(f"expert weights must have the input dtype {dtype}; cast the module (model.to(dtype))")


def expert_of_rows(counts: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows,) expert index of each sorted row; rows past the total get index E (a padding row
    of the bias table, so that unspecified tail rows never touch a real bias or its gradient).
    No host sync: ``repeat_interleave`` with ``output_size``."""
    E = counts.numel()
    sizes = torch.cat([counts, (rows - counts.sum()).view(1)])
    return torch.repeat_interleave(torch.arange(E + 1, device=counts.device), sizes, output_size=rows)


def padded_bias(bias: torch.Tensor) -> torch.Tensor:
    """[E, n] bias -> [E + 1, n] with a zero last row (for the tail rows of :func:`expert_of_rows`)."""
    return torch.cat([bias, bias.new_zeros(1, bias.shape[1])])


def row_group_sums(g: torch.Tensor, group: torch.Tensor, n: int, method: str = "auto") -> torch.Tensor:
    """(n, F) sums of the rows of ``g`` (R, F) by ``group`` (R,) in ``[0, n)``, accumulated in fp32,
    returned in ``g``'s dtype.

    ``method``: ``"gemm"`` = one-hot (n, R) @ (R, F), one GEMM with fp32 accumulation and no
    atomics; ``"index_add"`` = an ``index_add_`` into an fp32 table; ``"auto"`` = the GEMM for
    16-bit gradients on CUDA (the H200's bf16 ``index_add_`` of a 32768 x 1536 gradient into 9
    rows, every row of an expert adding into one row with atomics, cost 0.6 ms of a 3.7 ms layer
    step), ``index_add_`` otherwise: on CPU the scatter is a plain loop and the one-hot product n
    times the work, and fp32 atomics stay exact where a TF32-enabled GEMM would round the rows
    (both paths matched the CPU reference to 7e-7 on the H200 in fp32).
    """
    if method == "auto":
        method = "gemm" if g.is_cuda and g.dtype in (torch.bfloat16, torch.float16) else "index_add"
    if method == "gemm":
        onehot = (group[:, None] == torch.arange(n, device=group.device)).to(g.dtype)  # (R, n); F.one_hot reads its indices back
        return onehot.t().matmul(g)  # cuBLAS accumulates in fp32 for 16-bit inputs
    if method != "index_add":
        raise ValueError(f"method={method!r} is not allowed; choose 'auto', 'gemm' or 'index_add'")
    acc = torch.zeros(n, g.shape[1], dtype=torch.float32, device=g.device)
    return acc.index_add_(0, group, g if g.dtype == torch.float32 else g.float()).to(g.dtype)


class _RowBias(torch.autograd.Function):
    """``h + [bias; 0][e_R]`` whose bias gradient is summed per expert in fp32."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, bias: torch.Tensor, e_R: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(e_R)
        ctx.num_experts, ctx.bias_dtype = bias.shape[0], bias.dtype
        return h + padded_bias(bias).index_select(0, e_R)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (e_R,) = ctx.saved_tensors
        db = None
        if ctx.needs_input_grad[1]:
            db = row_group_sums(g, e_R, ctx.num_experts + 1)[: ctx.num_experts].to(ctx.bias_dtype)
        return g, db, None


def add_row_bias(h: torch.Tensor, bias: torch.Tensor, e_R: torch.Tensor) -> torch.Tensor:
    """``h`` (R, n) plus each row's expert bias (``e_R`` from :func:`expert_of_rows`; tail rows
    get none), differentiable in ``h`` and ``bias``.

    The bias gradient is a sum over each expert's rows. Autograd's own (the backward of
    ``index_select``) scatter-adds into a table of the bias dtype: on CUDA that is one atomic add
    per row, each rounded to bf16, and the H200 run measured 3.7e-2 relative error in bf16 bias
    gradients (fp32 accumulation: 4e-3, the rounding of the result alone). Here the sum runs in fp32
    (:func:`row_group_sums`).
    """
    return _RowBias.apply(h, bias, e_R)
