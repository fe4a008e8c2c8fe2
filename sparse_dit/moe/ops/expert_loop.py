"""Backend ``"loop"``: all experts' FFNs over expert-sorted rows as one autograd op, a loop of
in-place GEMMs (any device, any dispatcher; also the CPU body of ``"grouped_mm"``).

# R = rows (sorted by expert), D = model dim, F = expert hidden, E = experts

Why a hand-written backward instead of autograd over ``torch.addmm`` per expert:

* outputs and gradients are written with ``out=`` straight into their final buffers (the
  (R, D) output, the (R, D) input gradient and the stacked [E, D, F] weight gradients), so
  there is no ``torch.cat`` of expert outputs in forward and no ``stack`` of per-expert
  weight gradients in backward (each a full extra pass over memory);
* the activation and its derivative run once over all R rows, not once per expert, which
  keeps both CPU cores busy on small experts (E=64);
* gradients that are not needed are not computed.

Indexing ``w[e]`` inside this op is a plain view: the autograd cost of ``weight[e]`` slicing
(a full-size gradient per expert) does not arise because autograd never sees it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from sparse_dit.moe.ops.base import ExpertBackend, ExpertRows, ExpertWeights, check_expert_weights, row_group_sums

__all__ = ["experts_loop", "run_loop", "LOOP"]


def _spans(sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    out, s = [], 0
    for e, n in enumerate(sizes):
        if n:
            out.append((e, s, s + n))
        s += n
    return out


class _Mat:
    """The two GEMM shapes of the op, as a loop of ``out=`` GEMMs or as ``torch._grouped_mm``."""

    def __init__(self, spans: list[tuple[int, int, int]], kept: int, offs: Optional[torch.Tensor]) -> None:
        self.spans, self.kept, self.offs = spans, kept, offs

    def rows(self, a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``out[rows of e] = a[rows of e] @ w[e] (+ bias[e])`` for every expert e (w may be a transposed view)."""
        if self.offs is not None:
            res = torch._grouped_mm(a[: self.kept], w, offs=self.offs)  # (kept, n)
            if bias is not None:
                for e, s, t in self.spans:
                    res[s:t].add_(bias[e])
            if out is None:
                return res
            out[: self.kept].copy_(res)
            return out
        if out is None:
            out = a.new_empty(self.kept, w.shape[-1])
        for e, s, t in self.spans:
            if bias is None:
                torch.mm(a[s:t], w[e], out=out[s:t])
            else:
                torch.addmm(bias[e], a[s:t], w[e], out=out[s:t])
        return out

    def weight_grad(self, a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Stacked ``[E, m, n]`` with ``[e] = a[rows of e]^T @ b[rows of e]`` (zero for idle experts)."""
        if self.offs is not None:
            return torch._grouped_mm(a[: self.kept].t(), b[: self.kept], offs=self.offs)
        out = a.new_empty(shape)
        busy = {e for e, _, _ in self.spans}
        for e in range(shape[0]):
            if e not in busy:
                out[e].zero_()  # only idle experts need zeros: the others are overwritten
        for e, s, t in self.spans:
            torch.mm(a[s:t].t(), b[s:t], out=out[e])
        return out

    def bias_grad(self, g: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """``[E, n]`` per-expert row sums as one ``index_add_`` into the small [E, n] table.

        E separate sums cost E parallel regions (40x slower for E=64 on a busy 2-core machine);
        ``torch.segment_reduce`` does it in one op but measured 4.7x slower than ``index_add_``.
        """
        E = len(sizes)
        expert_of_row = torch.repeat_interleave(
            torch.arange(E, device=g.device), torch.tensor(list(sizes), device=g.device), output_size=self.kept
        )
        if g.dtype == torch.float64:
            return g.new_zeros(E, g.shape[1]).index_add_(0, expert_of_row, g[: self.kept])
        # fp32 accumulation (a 16-bit table takes one rounded atomic add per row on CUDA): see
        # sparse_dit.moe.ops.base.row_group_sums
        return row_group_sums(g[: self.kept], expert_of_row, E)


class _ExpertsLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, activation, grouped, w1, w2, w3, b1, b2):  # type: ignore[override]
        R, D = x.shape
        spans = _spans(sizes)
        kept = sum(sizes)
        x = x.contiguous()
        offs = torch.tensor(list(_cumsum(sizes)), dtype=torch.int32, device=x.device) if grouped else None
        mat = _Mat(spans, kept, offs)
        if activation == "gelu_tanh":
            hp = mat.rows(x, w1, b1)  # (kept, F) pre-activation
            h = F.gelu(hp, approximate="tanh")
            out = mat.rows(h, w2, b2, out=_out_buffer(x, kept, grouped))
            ctx.save_for_backward(x, w1, w2, hp, h)
        else:
            a = mat.rows(x, w1)  # (kept, F) gate pre-activation
            g = mat.rows(x, w3)  # (kept, F) up projection
            h = F.silu(a) * g
            out = mat.rows(h, w2, out=_out_buffer(x, kept, grouped))
            ctx.save_for_backward(x, w1, w2, w3, a, g, h)
        ctx.mat, ctx.activation, ctx.sizes = mat, activation, sizes
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        mat, act = ctx.mat, ctx.activation
        need_x, _, _, _, need_w1, need_w2, need_w3, need_b1, need_b2 = ctx.needs_input_grad
        gy = grad_out.contiguous()
        if act == "gelu_tanh":
            x, w1, w2, hp, h = ctx.saved_tensors
        else:
            x, w1, w2, w3, a, g, h = ctx.saved_tensors
        R, D = x.shape
        E, _, Fh = w1.shape
        dw2 = mat.weight_grad(h, gy, (E, Fh, D)) if need_w2 else None
        db2 = mat.bias_grad(gy, ctx.sizes) if need_b2 else None
        dh = mat.rows(gy, w2.transpose(1, 2))  # (kept, F)
        dx = None
        if act == "gelu_tanh":
            dhp = torch.ops.aten.gelu_backward(dh, hp, approximate="tanh")
            dw1 = mat.weight_grad(x, dhp, (E, D, Fh)) if need_w1 else None
            db1 = mat.bias_grad(dhp, ctx.sizes) if need_b1 else None
            if need_x:
                dx = mat.rows(dhp, w1.transpose(1, 2), out=_out_buffer(x, mat.kept, mat.offs is not None))
        else:
            # SwiGLU: h = silu(a) * g
            da = torch.ops.aten.silu_backward(dh * g, a)
            dg = dh * F.silu(a)
            dw1 = mat.weight_grad(x, da, (E, D, Fh)) if need_w1 else None
            dw3 = mat.weight_grad(x, dg, (E, D, Fh)) if need_w3 else None
            if need_x:
                dx = mat.rows(da, w1.transpose(1, 2), out=_out_buffer(x, mat.kept, mat.offs is not None))
                dx[: mat.kept].add_(mat.rows(dg, w3.transpose(1, 2)))
        if act == "gelu_tanh":
            return dx, None, None, None, dw1, dw2, None, db1, db2
        return dx, None, None, None, dw1, dw2, dw3, None, None


def _out_buffer(x: torch.Tensor, kept: int, grouped: bool) -> Optional[torch.Tensor]:
    """An (R, D) output with zero tail rows; ``None`` (use the GEMM's own result, no copy) when
    grouped GEMMs cover every row."""
    R = x.shape[0]
    if grouped and kept == R:
        return None
    out = x.new_empty(R, x.shape[1])
    if kept < R:
        out[kept:].zero_()
    return out


def _cumsum(sizes: Sequence[int]) -> list[int]:
    out, s = [], 0
    for n in sizes:
        s += n
        out.append(s)
    return out


def experts_loop(
    x: torch.Tensor,
    sizes: Sequence[int],
    activation: str,
    grouped: bool,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: Optional[torch.Tensor] = None,
    b1: Optional[torch.Tensor] = None,
    b2: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Expert FFNs over rows grouped by expert (``sizes[e]`` rows for expert e, then a tail).

    Args:
        x: (R, D) rows; rows past ``sum(sizes)`` get zero output and zero gradient.
        sizes: rows per expert, on the host.
        activation: ``"gelu_tanh"`` (needs b1, b2) or ``"swiglu"`` (needs w3).
        grouped: run the GEMMs as ``torch._grouped_mm`` calls (one per GEMM shape) instead of a
            loop of per-expert GEMMs; needs 16-byte-aligned D and F.
        w1: [E, D, F]; w2: [E, F, D]; w3: [E, D, F] (SwiGLU gate); b1: [E, F]; b2: [E, D].

    Returns:
        (R, D) outputs in the same row order.
    """
    check_expert_weights(activation, x.dtype, w1, w2, w3, b1, b2)
    return _ExpertsLoop.apply(x, tuple(int(n) for n in sizes), activation, grouped, w1, w2, w3, b1, b2)


def run_loop(x: torch.Tensor, rows: ExpertRows, activation: str, w: ExpertWeights) -> torch.Tensor:
    """The ``"loop"`` backend: :func:`experts_loop` over expert-sorted rows (one host sync for
    the row counts unless ``rows.sizes`` has them)."""
    sizes = rows.host_sizes()  # the one host sync
    if sum(sizes) > x.shape[0]:
        raise ValueError(f"tokens_per_expert sums to {sum(sizes)} > {x.shape[0]} rows")
    return experts_loop(x, sizes, activation, False, *w)


def _always(x: torch.Tensor, dim: int, hidden: int, local: bool) -> bool:
    return True


def _runs_anywhere(x: torch.Tensor, dim: int, hidden: int, local: bool) -> None:
    return None


LOOP = ExpertBackend(run=run_loop, token_space=False, auto=_always, check=_runs_anywhere)
"""Any device, dtype and dispatcher: what ``"auto"`` falls back to."""
