"""One autograd op: all experts' FFNs over expert-sorted rows, as a loop of in-place GEMMs.

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

__all__ = ["experts_loop"]


def _spans(sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    out, s = [], 0
    for e, n in enumerate(sizes):
        if n:
            out.append((e, s, s + n))
        s += n
    return out


class _ExpertsLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, activation, w1, w2, w3, b1, b2):  # type: ignore[override]
        R, D = x.shape
        E, _, Fh = w1.shape
        spans = _spans(sizes)
        kept = sum(sizes)
        x = x.contiguous()
        out = x.new_empty(R, D)
        if kept < R:
            out[kept:].zero_()
        if activation == "gelu_tanh":
            hp = x.new_empty(kept, Fh)  # pre-activation
            for e, s, t in spans:
                torch.addmm(b1[e], x[s:t], w1[e], out=hp[s:t])
            h = F.gelu(hp, approximate="tanh")
            for e, s, t in spans:
                torch.addmm(b2[e], h[s:t], w2[e], out=out[s:t])
            ctx.save_for_backward(x, w1, w2, hp, h)
        else:
            a = x.new_empty(kept, Fh)  # gate pre-activation
            g = x.new_empty(kept, Fh)  # up projection
            for e, s, t in spans:
                torch.mm(x[s:t], w1[e], out=a[s:t])
                torch.mm(x[s:t], w3[e], out=g[s:t])
            h = F.silu(a) * g
            for e, s, t in spans:
                torch.mm(h[s:t], w2[e], out=out[s:t])
            ctx.save_for_backward(x, w1, w2, w3, a, g, h)
        ctx.spans, ctx.kept, ctx.activation = spans, kept, activation
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        spans, kept, act = ctx.spans, ctx.kept, ctx.activation
        need_x, _, _, need_w1, need_w2, need_w3, need_b1, need_b2 = ctx.needs_input_grad
        gy = grad_out.contiguous()
        if act == "gelu_tanh":
            x, w1, w2, hp, h = ctx.saved_tensors
            w3 = a = g = None
        else:
            x, w1, w2, w3, a, g, h = ctx.saved_tensors
        R, D = x.shape
        E, _, Fh = w1.shape

        idle = [e for e in range(E) if e not in {sp[0] for sp in spans}]

        def stacked(flag: bool, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
            # Every expert with rows is overwritten with out=; only idle experts need zeros
            # (a full zero fill would be one more pass over [E, D, F]).
            if not flag:
                return None
            buf = x.new_empty(shape)
            for e in idle:
                buf[e].zero_()
            return buf

        dw2 = stacked(need_w2, (E, Fh, D))
        db2 = stacked(need_b2, (E, D))
        dh = x.new_empty(kept, Fh)
        for e, s, t in spans:
            if dw2 is not None:
                torch.mm(h[s:t].t(), gy[s:t], out=dw2[e])
            if db2 is not None:
                torch.sum(gy[s:t], 0, out=db2[e])
            torch.mm(gy[s:t], w2[e].t(), out=dh[s:t])
        dx = x.new_empty(R, D) if need_x else None
        if dx is not None and kept < R:
            dx[kept:].zero_()
        dw1 = stacked(need_w1, (E, D, Fh))
        if act == "gelu_tanh":
            dhp = torch.ops.aten.gelu_backward(dh, hp, approximate="tanh")
            db1 = stacked(need_b1, (E, Fh))
            for e, s, t in spans:
                if dw1 is not None:
                    torch.mm(x[s:t].t(), dhp[s:t], out=dw1[e])
                if db1 is not None:
                    torch.sum(dhp[s:t], 0, out=db1[e])
                if dx is not None:
                    torch.mm(dhp[s:t], w1[e].t(), out=dx[s:t])
            return dx, None, None, dw1, dw2, None, db1, db2
        # SwiGLU: h = silu(a) * g
        da = torch.ops.aten.silu_backward(dh * g, a)
        dg = dh * F.silu(a)
        dw3 = stacked(need_w3, (E, D, Fh))
        for e, s, t in spans:
            if dw1 is not None:
                torch.mm(x[s:t].t(), da[s:t], out=dw1[e])
            if dw3 is not None:
                torch.mm(x[s:t].t(), dg[s:t], out=dw3[e])
            if dx is not None:
                torch.mm(da[s:t], w1[e].t(), out=dx[s:t])
                dx[s:t].addmm_(dg[s:t], w3[e].t())
        return dx, None, None, dw1, dw2, dw3, None, None


def experts_loop(
    x: torch.Tensor,
    sizes: Sequence[int],
    activation: str,
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
        w1: [E, D, F]; w2: [E, F, D]; w3: [E, D, F] (SwiGLU gate); b1: [E, F]; b2: [E, D].

    Returns:
        (R, D) outputs in the same row order.
    """
    if activation == "gelu_tanh" and (b1 is None or b2 is None):
        raise ValueError("activation='gelu_tanh' needs biases b1 and b2")
    if activation == "swiglu" and w3 is None:
        raise ValueError("activation='swiglu' needs the gate weight w3")
    if any(p is not None and p.dtype != x.dtype for p in (w1, w2, w3, b1, b2)):
        raise ValueError(f"expert weights must have the input dtype {x.dtype}; cast the module (model.to(dtype))")
    return _ExpertsLoop.apply(x, tuple(int(n) for n in sizes), activation, w1, w2, w3, b1, b2)
